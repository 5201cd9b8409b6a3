//! Bringing a controller up, talking to it over the admin queue, and resetting it.
//!
//! [`Controller::new`] follows NVMe Base 2.0, 3.5.1 "Memory-based Controller
//! Initialization": disable the controller and wait for CSTS.RDY to clear, program the
//! admin queue (AQA, ASQ, ACQ), choose the command set, page size and entry sizes in CC,
//! enable it and wait for CSTS.RDY, then Identify the controller (5.17), ask for I/O
//! queues (Set Features, Number of Queues) and Identify the active namespaces.
//!
//! The state the I/O queues share with the controller lives in one [`Arc`]: the BAR, the
//! admin queue behind a mutex (admin commands are rare), and a reset generation. A reset
//! (asked for, or after a command timeout, a fatal status or a misbehaving completion)
//! disables and re-enables the controller and bumps the generation; every [`IoQueue`]
//! notices at its next call, fails the commands it had in flight with the reason, hands
//! their buffers back and creates itself on the controller again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ring3::backend::config;
use ring3::mmio::Registers;
use ring3::{Backend, Bar, DmaBuffer, Interrupt, IrqMode};

use crate::command::{cns, SubmissionEntry, SUBMISSION_ENTRY_SHIFT, SUBMISSION_ENTRY_SIZE};
use crate::completion::{CompletionEntry, COMPLETION_ENTRY_SHIFT, COMPLETION_ENTRY_SIZE};
use crate::error::{Error, Result};
use crate::identify::{ControllerInfo, IDENTIFY_SIZE};
use crate::io::{IoQueue, IoQueueOptions};
use crate::log::{lid, ErrorLogEntry, SmartLog, ERROR_ENTRY_SIZE, SMART_LOG_SIZE};
use crate::namespace::{parse_active_list, Namespace};
use crate::prp;
use crate::queue::{Backoff, QueuePair, ShadowDoorbells};
use crate::registers::{
    admin_queue_attributes, Capabilities, Configuration, ControllerRegisters, Status, Version,
    CLASS_CODE, MAX_ADMIN_QUEUE_ENTRIES, MIN_BAR0_SIZE,
};

/// How a [`Controller`] is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerOptions {
    /// Slots in the admin submission and completion queues (2..=4096).
    pub admin_queue_entries: u16,
    /// How long an admin or I/O command may take before the controller is reset.
    pub command_timeout: Duration,
    /// I/O queue pairs to ask the controller for (it may grant fewer).
    pub io_queues: u16,
    /// Use shadow doorbells if the controller offers them (OACS bit 8): fewer MMIO writes
    /// at high queue depths. Off by default: on QEMU 7.2's emulated controller they saved
    /// nothing measurable (batching already brings MMIO writes to 0.06 per I/O at QD32,
    /// and at QD1 every submission needs one anyway) and they add the rare missed update
    /// that only the idle kick recovers from.
    pub shadow_doorbells: bool,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            admin_queue_entries: 32,
            command_timeout: Duration::from_secs(5),
            io_queues: 64,
            shadow_doorbells: false,
        }
    }
}

/// The floor for CAP.TO-based waits: a controller reporting TO = 0 still gets this long.
const MIN_READY_TIMEOUT: Duration = Duration::from_millis(500);

/// What CSTS reads when the device is gone (a PCIe read that nobody answers).
const GONE: u32 = u32::MAX;

/// Pages of the admin data buffer (Identify, log pages): 16 KiB.
const ADMIN_BUFFER_PAGES: usize = 4;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn registers(bar: &Bar) -> Result<Registers<'_, ControllerRegisters>> {
    Ok(bar.registers::<ControllerRegisters>(0)?)
}

/// The admin queue and the buffer admin commands move data through.
pub(crate) struct Admin {
    queue: QueuePair,
    buffer: DmaBuffer,
    prp_list: DmaBuffer,
}

/// Who uses which I/O queue ID and interrupt vector.
#[derive(Debug, Default)]
struct Allocation {
    /// Index `i` is queue ID `i + 1`.
    queue_ids: Vec<bool>,
    /// MSI-X vectors, enabled the first time a queue asks for interrupts; index 0 (the
    /// admin queue's) is never handed out.
    vectors: Vec<Interrupt>,
    vectors_used: Vec<bool>,
}

/// What a controller and its I/O queues share.
pub(crate) struct Shared<B: Backend> {
    pub(crate) backend: B,
    pub(crate) bar: Bar,
    pub(crate) cap: Capabilities,
    pub(crate) page_shift: u8,
    pub(crate) command_timeout: Duration,
    pub(crate) stride_shift: u8,
    version: Version,
    ready_timeout: Duration,
    requested_io_queues: u16,
    admin: Mutex<Admin>,
    allocation: Mutex<Allocation>,
    /// Bumped by every reset; queues compare it with the one they were created in.
    generation: AtomicU64,
    /// Why the last reset happened, and whether the controller came back.
    last_reset: Mutex<Option<(String, bool)>>,
    /// Shadow doorbells, if the controller has them and they are configured.
    shadow: Mutex<Option<ShadowDoorbells>>,
    /// The pages for them, kept across resets.
    shadow_pages: Mutex<Option<ShadowDoorbells>>,
}

/// A driver for one NVMe controller, enabled and with its admin queue running.
///
/// Create I/O queues with [`Controller::io_queue`]; each is owned by one thread. The
/// controller is disabled when it and all its queues are gone.
pub struct Controller<B: Backend> {
    shared: Arc<Shared<B>>,
    info: ControllerInfo,
    namespaces: Arc<[Namespace]>,
    io_queues: u16,
}

impl<B: Backend> std::fmt::Debug for Controller<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("address", &self.shared.backend.address())
            .field("version", &self.shared.version)
            .field("cap", &format_args!("{:#x}", self.shared.cap.0))
            .field("model", &self.info.model)
            .field("namespaces", &self.namespaces.len())
            .field("io_queues", &self.io_queues)
            .finish()
    }
}

impl<B: Backend> Controller<B> {
    /// Takes over the NVMe controller behind `backend` and brings it up.
    pub fn new(backend: B, options: ControllerOptions) -> Result<Self> {
        // PCI identity: any vendor's NVMe controller has class code 01:08:02.
        let mut class = [0u8; 4];
        backend.config_read(config::CLASS_CODE, &mut class[..3])?;
        let class_code = u32::from_le_bytes(class);
        if class_code != CLASS_CODE {
            return Err(Error::NotNvme {
                address: backend.address().to_string(),
                class_code,
            });
        }
        let entries = options.admin_queue_entries;
        if !(2..=MAX_ADMIN_QUEUE_ENTRIES).contains(&entries) {
            return Err(Error::InvalidArgument {
                what: format!("{entries} admin queue entries; AQA allows 2 to 4096"),
            });
        }
        if options.io_queues == 0 {
            return Err(Error::InvalidArgument {
                what: "0 I/O queues: at least one is needed".into(),
            });
        }

        // BAR0 holds the registers (3.1.4) and, from 0x1000, the doorbells.
        let bar = backend.bar(0)?;
        if bar.len() < MIN_BAR0_SIZE {
            return Err(Error::BarTooSmall {
                address: backend.address().to_string(),
                len: bar.len(),
                needed: MIN_BAR0_SIZE,
            });
        }
        let regs = registers(&bar)?;
        let cap = Capabilities(regs.field(|r| &r.cap).read());
        let version = Version::from_register(regs.field(|r| &r.vs).read());

        // CAP.CSS: this driver speaks the NVM command set.
        if !cap.supports_nvm_command_set() {
            return Err(Error::Unsupported {
                what: "the NVM command set (CAP.CSS bit 0)".into(),
                register: "CAP",
                value: cap.0,
            });
        }
        // CAP.MPSMIN/MPSMAX: queues and PRPs are in host pages, so the controller's memory
        // page size must be the host's.
        let page_shift = ring3::sys::page_size().trailing_zeros() as u8;
        if !(cap.min_page_shift()..=cap.max_page_shift()).contains(&page_shift) {
            return Err(Error::Unsupported {
                what: format!(
                    "the host page size of {} bytes (CAP.MPSMIN/MPSMAX allow 2^{}..=2^{})",
                    1u64 << page_shift,
                    cap.min_page_shift(),
                    cap.max_page_shift()
                ),
                register: "CAP",
                value: cap.0,
            });
        }
        let ready_timeout = cap.ready_timeout().max(MIN_READY_TIMEOUT);

        backend.set_bus_master(true)?;

        let slots = usize::from(entries);
        let sq = backend.dma_alloc(slots * SUBMISSION_ENTRY_SIZE)?;
        let cq = backend.dma_alloc(slots * COMPLETION_ENTRY_SIZE)?;
        let stride_shift = cap.doorbell_stride_shift();
        let queue = QueuePair::new(0, entries, sq, cq, bar.clone(), stride_shift)?;
        let buffer = backend.dma_alloc(ADMIN_BUFFER_PAGES << page_shift)?;
        let prp_list = backend.dma_alloc(1 << page_shift)?;

        // From here on, dropping `shared` disables the controller again if a step fails.
        let shared = Arc::new(Shared {
            backend,
            bar,
            cap,
            page_shift,
            command_timeout: options.command_timeout,
            stride_shift,
            version,
            ready_timeout,
            requested_io_queues: options.io_queues,
            admin: Mutex::new(Admin {
                queue,
                buffer,
                prp_list,
            }),
            allocation: Mutex::new(Allocation::default()),
            generation: AtomicU64::new(0),
            last_reset: Mutex::new(None),
            shadow: Mutex::new(None),
            shadow_pages: Mutex::new(None),
        });
        let io_queues = {
            let mut admin = lock(&shared.admin);
            shared.enable(&mut admin)?;
            shared.set_number_of_queues(&mut admin)?
        };
        lock(&shared.allocation).queue_ids = vec![false; usize::from(io_queues)];

        let info = shared.identify_controller()?;
        if info.supports_shadow_doorbells() && options.shadow_doorbells {
            let pages = ShadowDoorbells::new(
                shared.dma_alloc(1 << page_shift)?,
                shared.dma_alloc(1 << page_shift)?,
            );
            *lock(&shared.shadow_pages) = Some(pages);
            let mut admin = lock(&shared.admin);
            shared.configure_shadow_doorbells(&mut admin)?;
        }
        let namespaces = shared.identify_namespaces(&info)?;
        tracing::debug!(
            address = shared.backend.address(),
            model = info.model,
            io_queues,
            namespaces = namespaces.len(),
            "NVMe controller ready"
        );
        Ok(Controller {
            shared,
            info,
            namespaces: namespaces.into(),
            io_queues,
        })
    }

    /// The platform backend (a fake backend's model, for tests).
    pub fn backend(&self) -> &B {
        &self.shared.backend
    }

    /// The device's address.
    pub fn address(&self) -> &str {
        self.shared.backend.address()
    }

    /// CAP as read at bring-up.
    pub fn capabilities(&self) -> Capabilities {
        self.shared.cap
    }

    /// The specification version the controller reports in VS.
    pub fn version(&self) -> Version {
        self.shared.version
    }

    /// The memory page size in use, as a shift.
    pub fn page_shift(&self) -> u8 {
        self.shared.page_shift
    }

    /// Identify Controller, as read at bring-up.
    pub fn info(&self) -> &ControllerInfo {
        &self.info
    }

    /// The active namespaces, by ascending ID.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    /// The active namespace `nsid`.
    pub fn namespace(&self, nsid: u32) -> Result<&Namespace> {
        find_namespace(&self.namespaces, nsid)
    }

    /// I/O queue pairs the controller granted (Set Features, Number of Queues).
    pub fn max_io_queues(&self) -> u16 {
        self.io_queues
    }

    /// The largest transfer of one read or write, in bytes: MDTS, and at most what one
    /// PRP list page describes.
    pub fn max_transfer_bytes(&self) -> usize {
        max_transfer_bytes(&self.info, self.shared.page_shift)
    }

    /// How many resets happened since bring-up.
    pub fn resets(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// Looks at the admin queue pair (for inspection; admin commands wait meanwhile).
    pub fn with_admin_queue<R>(&self, look: impl FnOnce(&QueuePair) -> R) -> R {
        look(&lock(&self.shared.admin).queue)
    }

    /// CSTS now.
    pub fn status(&self) -> Result<Status> {
        Ok(Status::from_bits_retain(
            registers(&self.shared.bar)?.field(|r| &r.csts).read(),
        ))
    }

    /// Creates an I/O queue pair on the controller, for one thread to own.
    pub fn io_queue(&self, options: IoQueueOptions) -> Result<IoQueue<B>> {
        IoQueue::create(
            Arc::clone(&self.shared),
            Arc::clone(&self.namespaces),
            max_transfer_bytes(&self.info, self.shared.page_shift),
            options,
        )
    }

    /// Runs one admin command without data and waits for its completion; a failure
    /// status is an error.
    pub fn admin_command(&self, entry: SubmissionEntry) -> Result<CompletionEntry> {
        let mut admin = lock(&self.shared.admin);
        self.shared.admin_command(&mut admin, entry)
    }

    /// Identify Controller (5.17.2.1, CNS 01h), read again and checked.
    pub fn identify_controller(&self) -> Result<ControllerInfo> {
        self.shared.identify_controller()
    }

    /// The SMART / Health Information log page (controller-wide).
    pub fn smart_log(&self) -> Result<SmartLog> {
        let data = self.shared.read_log(lid::SMART, u32::MAX, SMART_LOG_SIZE)?;
        let mut page = [0u8; SMART_LOG_SIZE];
        page.copy_from_slice(&data);
        Ok(SmartLog::parse(&page))
    }

    /// The Error Information log page: the controller's most recent errors (ELPE + 1
    /// entries at most, and no more than 256).
    pub fn error_log(&self) -> Result<Vec<ErrorLogEntry>> {
        let entries = usize::from(self.info.error_log_entries).min(256);
        let data = self
            .shared
            .read_log(lid::ERROR, 0, entries * ERROR_ENTRY_SIZE)?;
        Ok(ErrorLogEntry::parse_page(&data))
    }

    /// Resets the controller (disable, re-enable, queues again). I/O queues fail the
    /// commands they had in flight with [`Error::ControllerReset`] and carry on.
    pub fn reset(&self, reason: &str) -> Result<()> {
        let generation = self.shared.generation();
        self.shared.reset(generation, reason)
    }
}

pub(crate) fn find_namespace(namespaces: &[Namespace], nsid: u32) -> Result<&Namespace> {
    namespaces
        .iter()
        .find(|ns| ns.id == nsid)
        .ok_or_else(|| Error::NoSuchNamespace {
            nsid,
            active: namespaces.iter().map(|ns| ns.id).collect(),
        })
}

pub(crate) fn max_transfer_bytes(info: &ControllerInfo, page_shift: u8) -> usize {
    let list_limit = prp::max_transfer_bytes(page_shift);
    match info.max_transfer_bytes {
        Some(mdts) => usize::try_from(mdts).unwrap_or(usize::MAX).min(list_limit),
        None => list_limit,
    }
}

impl<B: Backend> Shared<B> {
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The reason of the last reset, and whether the controller came back from it.
    pub(crate) fn last_reset(&self) -> Option<(String, bool)> {
        lock(&self.last_reset).clone()
    }

    /// 3.5.1 steps 1–6: reset, admin queue, configuration, enable.
    fn enable(&self, admin: &mut Admin) -> Result<()> {
        let regs = registers(&self.bar)?;
        let cc = regs.field(|r| &r.cc);

        // Step 1: clear CC.EN and wait for CSTS.RDY to follow, which resets the controller.
        // Queue state from a previous user is gone after this.
        let current = Configuration(cc.read());
        if current.enabled() {
            cc.write(current.with_enabled(false).0);
        }
        self.wait_ready(false, "the controller to disable (CSTS.RDY = 0)")?;

        // Step 2: the admin queue (3.1.4.9–3.1.4.11), starting empty.
        admin.queue.reset();
        let entries = admin.queue.entries();
        regs.field(|r| &r.aqa)
            .write(admin_queue_attributes(entries, entries));
        regs.field(|r| &r.asq).write(admin.queue.sq_iova());
        regs.field(|r| &r.acq).write(admin.queue.cq_iova());

        // Steps 3–5: NVM command set, host page size, round robin, 64-byte submission and
        // 16-byte completion entries for the I/O queues to come; then enable.
        let config = Configuration::new(
            Configuration::CSS_NVM,
            self.page_shift,
            SUBMISSION_ENTRY_SHIFT,
            COMPLETION_ENTRY_SHIFT,
        );
        cc.write(config.0);
        cc.write(config.with_enabled(true).0);

        // Step 6: wait for CSTS.RDY, within CAP.TO.
        self.wait_ready(true, "the controller to become ready (CSTS.RDY = 1)")
    }

    /// Polls CSTS until RDY equals `ready`, within the CAP.TO timeout. While enabling, a
    /// set CSTS.CFS is a fatal error at once.
    fn wait_ready(&self, ready: bool, operation: &'static str) -> Result<()> {
        let csts = registers(&self.bar)?.field(|r| &r.csts);
        let start = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            let value = csts.read();
            if value == GONE {
                return Err(Error::Misbehaved {
                    what: format!(
                        "CSTS reads all ones while waiting for {operation}: the device is gone"
                    ),
                    value: u64::from(value),
                });
            }
            let status = Status::from_bits_retain(value);
            if ready && status.contains(Status::CFS) {
                return Err(Error::ControllerFatal {
                    operation,
                    csts: value,
                });
            }
            if status.contains(Status::RDY) == ready {
                return Ok(());
            }
            if start.elapsed() >= self.ready_timeout {
                return Err(Error::Timeout {
                    operation,
                    register: "CSTS",
                    offset: csts.offset(),
                    last: u64::from(value),
                    timeout: self.ready_timeout,
                });
            }
            backoff.pause();
        }
    }

    /// Set Features, Number of Queues: how many I/O queue pairs the controller grants.
    fn set_number_of_queues(&self, admin: &mut Admin) -> Result<u16> {
        let wanted = self.requested_io_queues;
        // Part of bring-up and of resets: a failure here is reported, not reset again.
        let completion = self.admin_command_then(
            admin,
            SubmissionEntry::set_number_of_queues(wanted, wanted),
            false,
        )?;
        // DW0: NSQA in 15:0, NCQA in 31:16, both 0-based; the controller may grant more
        // than asked, but only what was asked for may be used.
        let submission = (completion.result & 0xffff) as u16;
        let completion_queues = (completion.result >> 16) as u16;
        let granted = submission.min(completion_queues).saturating_add(1);
        Ok(granted.min(wanted))
    }

    /// Runs one admin command and waits for its completion; a failure status is an error.
    /// A command that does not complete in time, or a completion that breaks the rules,
    /// resets the controller.
    pub(crate) fn admin_command(
        &self,
        admin: &mut Admin,
        entry: SubmissionEntry,
    ) -> Result<CompletionEntry> {
        self.admin_command_then(admin, entry, true)
    }

    /// [`Shared::admin_command`], resetting on a timeout or misbehaviour only if
    /// `reset_on_failure` (not while a reset is already under way).
    fn admin_command_then(
        &self,
        admin: &mut Admin,
        entry: SubmissionEntry,
        reset_on_failure: bool,
    ) -> Result<CompletionEntry> {
        let command_id = admin.queue.submit(entry)?;
        match admin.queue.wait_for(command_id, self.command_timeout) {
            Ok(completion) if completion.status.is_success() => Ok(completion),
            Ok(completion) => Err(Error::CommandFailed {
                opcode: entry.opcode(),
                status: completion.status,
            }),
            Err(error @ (Error::CommandTimeout { .. } | Error::Misbehaved { .. }))
                if reset_on_failure =>
            {
                let reason = self.fatal_reason(&error);
                // The admin queue is ours already: reset in place.
                let generation = self.generation();
                self.reset_locked(admin, generation, &reason);
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    /// An admin command moving `len` bytes from the device through the admin buffer.
    fn admin_read(&self, entry: SubmissionEntry, len: usize) -> Result<Vec<u8>> {
        let mut admin = lock(&self.admin);
        if len > admin.buffer.len() {
            return Err(Error::InvalidArgument {
                what: format!("{len} bytes exceed the admin buffer"),
            });
        }
        let Admin {
            buffer, prp_list, ..
        } = &*admin;
        let pointer = prp::layout(
            buffer.iova(),
            len,
            self.page_shift,
            prp_list.iova(),
            |index, address| {
                // In bounds: the list page holds more entries than the buffer has pages.
                let _ = prp_list.write(index * prp::PRP_ENTRY_SIZE, &address.to_le_bytes());
            },
        )?;
        buffer.fill(0);
        let entry = entry.with_prp1(pointer.prp1).with_prp2(pointer.prp2);
        self.admin_command(&mut admin, entry)?;
        let mut data = vec![0u8; len];
        admin.buffer.read(0, &mut data)?;
        Ok(data)
    }

    fn identify(&self, cns: u8, nsid: u32) -> Result<[u8; IDENTIFY_SIZE]> {
        let data = self.admin_read(SubmissionEntry::identify(cns, nsid, 0), IDENTIFY_SIZE)?;
        let mut page = [0u8; IDENTIFY_SIZE];
        page.copy_from_slice(&data);
        Ok(page)
    }

    fn identify_controller(&self) -> Result<ControllerInfo> {
        ControllerInfo::parse(&self.identify(cns::CONTROLLER, 0)?, self.cap)
    }

    /// The active namespace IDs (CNS 02h; controllers before 1.1 lack it, so every ID up
    /// to NN is tried), then Identify Namespace for each.
    fn identify_namespaces(&self, info: &ControllerInfo) -> Result<Vec<Namespace>> {
        let ids = match self.identify(cns::ACTIVE_NAMESPACES, 0) {
            Ok(page) => parse_active_list(&page, info.namespace_count)?,
            Err(Error::CommandFailed { .. }) => (1..=info.namespace_count.min(1024)).collect(),
            Err(error) => return Err(error),
        };
        let mut namespaces = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(namespace) = Namespace::parse(id, &self.identify(cns::NAMESPACE, id)?)? {
                namespaces.push(namespace);
            }
        }
        Ok(namespaces)
    }

    fn read_log(&self, log_id: u8, nsid: u32, len: usize) -> Result<Vec<u8>> {
        let dwords = u32::try_from(len / 4).unwrap_or(u32::MAX);
        self.admin_read(SubmissionEntry::get_log_page(log_id, nsid, dwords), len)
    }

    /// The message for a reset caused by `error`, with CSTS.CFS named if it is set.
    pub(crate) fn fatal_reason(&self, error: &Error) -> String {
        let csts = registers(&self.bar)
            .map(|regs| regs.field(|r| &r.csts).read())
            .unwrap_or(0);
        if csts != GONE && Status::from_bits_retain(csts).contains(Status::CFS) {
            format!("controller fatal status (CSTS.CFS, CSTS {csts:#x}) after: {error}")
        } else {
            error.to_string()
        }
    }

    /// Whether CSTS.CFS is set now.
    pub(crate) fn fatal_status(&self) -> bool {
        registers(&self.bar)
            .map(|regs| regs.field(|r| &r.csts).read())
            .is_ok_and(|csts| csts != GONE && Status::from_bits_retain(csts).contains(Status::CFS))
    }

    /// Resets the controller unless a reset already happened since `seen_generation`.
    pub(crate) fn reset(&self, seen_generation: u64, reason: &str) -> Result<()> {
        let mut admin = lock(&self.admin);
        self.reset_locked(&mut admin, seen_generation, reason);
        match self.last_reset() {
            Some((_, true)) | None => Ok(()),
            Some((reason, false)) => Err(Error::ControllerFailed { reason }),
        }
    }

    fn reset_locked(&self, admin: &mut Admin, seen_generation: u64, reason: &str) {
        if self.generation() != seen_generation {
            return; // Someone else reset it in the meantime.
        }
        tracing::warn!(
            address = self.backend.address(),
            reason,
            "resetting the NVMe controller"
        );
        *lock(&self.shadow) = None;
        let outcome = self
            .enable(admin)
            .and_then(|()| self.set_number_of_queues(admin))
            .and_then(|_| self.configure_shadow_doorbells(admin));
        let came_back = match outcome {
            Ok(_) => true,
            Err(error) => {
                tracing::error!(address = self.backend.address(), %error, "the NVMe controller did not come back");
                false
            }
        };
        let recorded = if came_back {
            reason.to_string()
        } else {
            format!("{reason}; the reset failed too")
        };
        *lock(&self.last_reset) = Some((recorded, came_back));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Hands the shadow doorbell pages (if any) to the controller, zeroed, and has the
    /// admin queue write its shadows too (and MMIO as well, as not every controller reads
    /// the admin queue's shadows).
    fn configure_shadow_doorbells(&self, admin: &mut Admin) -> Result<()> {
        let Some(pages) = lock(&self.shadow_pages).clone() else {
            return Ok(());
        };
        pages.clear();
        let entry =
            SubmissionEntry::doorbell_buffer_config(pages.shadow_iova(), pages.event_index_iova());
        match self.admin_command_then(admin, entry, false) {
            Ok(_) => {
                admin.queue.use_shadow_doorbells(pages.clone(), true)?;
                *lock(&self.shadow) = Some(pages);
                Ok(())
            }
            // Offered but refused: carry on with MMIO doorbells.
            Err(Error::CommandFailed { status, .. }) => {
                tracing::info!(address = self.backend.address(), %status, "shadow doorbells refused; using MMIO doorbells");
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// The shadow doorbells in use, if any.
    pub(crate) fn shadow_doorbells(&self) -> Option<ShadowDoorbells> {
        lock(&self.shadow).clone()
    }

    /// Runs an admin command for a queue in the generation it was created in; `Ok(None)` if
    /// a reset happened since, so the command is moot.
    pub(crate) fn admin_in_generation(
        &self,
        generation: u64,
        entry: SubmissionEntry,
    ) -> Result<Option<CompletionEntry>> {
        let mut admin = lock(&self.admin);
        if self.generation() != generation {
            return Ok(None);
        }
        self.admin_command(&mut admin, entry).map(Some)
    }

    /// Takes the lowest free I/O queue ID.
    pub(crate) fn allocate_queue_id(&self) -> Result<u16> {
        let mut allocation = lock(&self.allocation);
        let granted = allocation.queue_ids.len();
        let free = allocation.queue_ids.iter().position(|used| !used);
        match free {
            Some(index) => {
                allocation.queue_ids[index] = true;
                Ok(index as u16 + 1)
            }
            None => Err(Error::NoQueueLeft {
                what: "I/O queue pairs",
                used: granted,
                granted,
            }),
        }
    }

    pub(crate) fn release_queue_id(&self, id: u16) {
        let mut allocation = lock(&self.allocation);
        if let Some(used) = allocation.queue_ids.get_mut(usize::from(id) - 1) {
            *used = false;
        }
    }

    /// Takes a free MSI-X vector (1 and up), enabling MSI-X on first use.
    pub(crate) fn allocate_vector(&self) -> Result<(u16, Interrupt)> {
        let mut allocation = lock(&self.allocation);
        if allocation.vectors.is_empty() {
            let offered = self.backend.interrupt_count(IrqMode::MsiX)?;
            let wanted = (allocation.queue_ids.len() as u32 + 1).min(offered);
            if wanted < 2 {
                return Err(Error::Unsupported {
                    what: format!(
                        "interrupts for I/O queues: it offers {offered} MSI-X vectors, 2 are needed"
                    ),
                    register: "MSI-X table size",
                    value: u64::from(offered),
                });
            }
            allocation.vectors = self.backend.enable_interrupts(IrqMode::MsiX, wanted)?;
            allocation.vectors_used = vec![false; allocation.vectors.len()];
            allocation.vectors_used[0] = true;
        }
        let total = allocation.vectors.len();
        match allocation.vectors_used.iter().position(|used| !used) {
            Some(index) => {
                allocation.vectors_used[index] = true;
                Ok((index as u16, allocation.vectors[index].clone()))
            }
            None => Err(Error::NoQueueLeft {
                what: "MSI-X vectors for I/O queues",
                used: total - 1,
                granted: total - 1,
            }),
        }
    }

    pub(crate) fn release_vector(&self, vector: u16) {
        let mut allocation = lock(&self.allocation);
        if vector > 0 {
            if let Some(used) = allocation.vectors_used.get_mut(usize::from(vector)) {
                *used = false;
            }
        }
    }

    pub(crate) fn dma_alloc(&self, len: usize) -> Result<DmaBuffer> {
        Ok(self.backend.dma_alloc(len)?)
    }
}

impl<B: Backend> Drop for Shared<B> {
    fn drop(&mut self) {
        // Stop the controller before the queues' memory goes: clearing CC.EN makes it drop
        // its queues, and with bus mastering off it cannot reach host memory at all.
        if let Ok(regs) = registers(&self.bar) {
            let cc = regs.field(|r| &r.cc);
            cc.write(Configuration(cc.read()).with_enabled(false).0);
            if let Err(error) = self.wait_ready(false, "the controller to disable on drop") {
                tracing::warn!(address = self.backend.address(), %error, "NVMe controller did not stop");
            }
        }
        let vectors = !lock(&self.allocation).vectors.is_empty();
        if vectors {
            if let Err(error) = self.backend.disable_interrupts(IrqMode::MsiX) {
                tracing::warn!(address = self.backend.address(), %error, "could not disable MSI-X");
            }
        }
        if let Err(error) = self.backend.set_bus_master(false) {
            tracing::warn!(address = self.backend.address(), %error, "could not turn bus mastering off");
        }
    }
}
