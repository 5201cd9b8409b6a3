//! Bringing a controller up and talking to it over the admin queue.
//!
//! [`Controller::new`] follows NVMe Base 2.0, 3.5.1 "Memory-based Controller
//! Initialization": disable the controller and wait for CSTS.RDY to clear, program the
//! admin queue (AQA, ASQ, ACQ), choose the command set, page size and entry sizes in CC,
//! enable it and wait for CSTS.RDY, then Identify the controller (5.17).

use std::time::{Duration, Instant};

use ring3::backend::config;
use ring3::mmio::Registers;
use ring3::{Backend, Bar};

use crate::command::{cns, SubmissionEntry, SUBMISSION_ENTRY_SHIFT, SUBMISSION_ENTRY_SIZE};
use crate::completion::{CompletionEntry, COMPLETION_ENTRY_SHIFT, COMPLETION_ENTRY_SIZE};
use crate::error::{Error, Result};
use crate::identify::{ControllerInfo, IDENTIFY_SIZE};
use crate::queue::{Backoff, QueuePair};
use crate::registers::{
    admin_queue_attributes, Capabilities, Configuration, ControllerRegisters, Status, Version,
    CLASS_CODE, MAX_ADMIN_QUEUE_ENTRIES, MIN_BAR0_SIZE,
};

/// How a [`Controller`] is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerOptions {
    /// Slots in the admin submission and completion queues (2..=4096).
    pub admin_queue_entries: u16,
    /// How long an admin command may take.
    pub command_timeout: Duration,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            admin_queue_entries: 32,
            command_timeout: Duration::from_secs(5),
        }
    }
}

/// The floor for CAP.TO-based waits: a controller reporting TO = 0 still gets this long.
const MIN_READY_TIMEOUT: Duration = Duration::from_millis(500);

/// What CSTS reads when the device is gone (a PCIe read that nobody answers).
const GONE: u32 = u32::MAX;

/// A driver for one NVMe controller, enabled and with its admin queue running.
pub struct Controller<B: Backend> {
    backend: B,
    bar: Bar,
    cap: Capabilities,
    version: Version,
    page_shift: u8,
    ready_timeout: Duration,
    admin: QueuePair,
    command_timeout: Duration,
}

impl<B: Backend> std::fmt::Debug for Controller<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("address", &self.backend.address())
            .field("version", &self.version)
            .field("cap", &format_args!("{:#x}", self.cap.0))
            .field("admin", &self.admin)
            .finish()
    }
}

fn registers(bar: &Bar) -> Result<Registers<'_, ControllerRegisters>> {
    Ok(bar.registers::<ControllerRegisters>(0)?)
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
        let admin = QueuePair::new(0, entries, sq, cq, bar.clone(), cap.doorbell_stride_shift())?;

        // From here on, Drop disables the controller again if a step fails.
        let mut controller = Controller {
            backend,
            bar,
            cap,
            version,
            page_shift,
            ready_timeout,
            admin,
            command_timeout: options.command_timeout,
        };
        controller.enable()?;
        Ok(controller)
    }

    /// 3.5.1 steps 1–6: reset, admin queue, configuration, enable.
    fn enable(&mut self) -> Result<()> {
        let regs = registers(&self.bar)?;
        let cc = regs.field(|r| &r.cc);

        // Step 1: clear CC.EN and wait for CSTS.RDY to follow, which resets the controller.
        // Queue state from a previous user is gone after this.
        let current = Configuration(cc.read());
        if current.enabled() {
            cc.write(current.with_enabled(false).0);
        }
        self.wait_ready(false, "the controller to disable (CSTS.RDY = 0)")?;

        // Step 2: the admin queue (3.1.4.9–3.1.4.11).
        let entries = self.admin.entries();
        regs.field(|r| &r.aqa)
            .write(admin_queue_attributes(entries, entries));
        regs.field(|r| &r.asq).write(self.admin.sq_iova());
        regs.field(|r| &r.acq).write(self.admin.cq_iova());

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

    /// The platform backend (a fake backend's model, for tests).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// CAP as read at bring-up.
    pub fn capabilities(&self) -> Capabilities {
        self.cap
    }

    /// The specification version the controller reports in VS.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The memory page size in use, as a shift.
    pub fn page_shift(&self) -> u8 {
        self.page_shift
    }

    /// The admin queue pair, for inspection.
    pub fn admin_queue(&self) -> &QueuePair {
        &self.admin
    }

    /// CSTS now.
    pub fn status(&self) -> Result<Status> {
        Ok(Status::from_bits_retain(
            registers(&self.bar)?.field(|r| &r.csts).read(),
        ))
    }

    /// Runs one admin command and waits for its completion; a failure status is an error.
    pub fn admin_command(&mut self, entry: SubmissionEntry) -> Result<CompletionEntry> {
        let command_id = self.admin.submit(entry)?;
        let completion = self.admin.wait_for(command_id, self.command_timeout)?;
        if !completion.status.is_success() {
            return Err(Error::CommandFailed {
                opcode: entry.opcode(),
                status: completion.status,
            });
        }
        Ok(completion)
    }

    /// Identify Controller (5.17.2.1, CNS 01h), checked against what the driver relies on.
    pub fn identify_controller(&mut self) -> Result<ControllerInfo> {
        let buffer = self.backend.dma_alloc(IDENTIFY_SIZE)?;
        // Page-aligned and one page (or more) long, so PRP1 alone describes it.
        self.admin_command(SubmissionEntry::identify(cns::CONTROLLER, 0, buffer.iova()))?;
        let mut data = [0u8; IDENTIFY_SIZE];
        buffer.read(0, &mut data)?;
        ControllerInfo::parse(&data, self.cap)
    }
}

impl<B: Backend> Drop for Controller<B> {
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
        if let Err(error) = self.backend.set_bus_master(false) {
            tracing::warn!(address = self.backend.address(), %error, "could not turn bus mastering off");
        }
    }
}
