//! A model of an NVMe controller for [`ring3::fake::FakeBackend`], so the driver is tested
//! without QEMU.
//!
//! It behaves like an NVMe Base 2.0 controller on PCIe with the NVM command set:
//!
//! - **Registers** (3.1.4): CAP, VS, INTMS/INTMC, CC, CSTS, AQA, ASQ, ACQ, and the
//!   enable/disable handshake (CC.EN → CSTS.RDY). Clearing CC.EN is a controller reset: every
//!   I/O queue, held completion and feature value is dropped; namespace data persists, as
//!   media would.
//! - **Queues** (3.3): a write to an SQ tail doorbell makes the model fetch each new entry by
//!   DMA ([`DeviceContext::dma_read`]), execute it and post a completion with the queue's
//!   phase tag ([`DeviceContext::dma_write`]), then signal the completion queue's interrupt
//!   ([`DeviceContext::raise_irq`]; the vector is the queue's IV under MSI-X, vector 0
//!   otherwise, where INTMS bit 0 masks it). A full completion queue stops fetching until
//!   its head doorbell moves. Doorbell values outside a queue are ignored.
//! - **Shadow doorbells** (5.9), as QEMU's controller has them: after Doorbell Buffer
//!   Config, an MMIO doorbell write still starts the work (its value is copied into the
//!   shadow too); while working on an SQ the model writes the tail it has seen to the event
//!   index page after each command it fetches and reads the shadow tail again, and it reads
//!   CQ heads from the shadows when it looks for room. Since the model only acts inside a
//!   register access, it also works on every queue whose shadows moved whenever the driver
//!   reads or writes any register, and [`NvmeModel::process_shadow_doorbells`] lets a test
//!   play a controller that notices later. A controller reset forgets the pages.
//! - **Admin commands** (5): Identify (CNS 00h namespace, 01h controller, 02h active
//!   namespace list, 03h namespace identification descriptors), Set/Get Features (Number of
//!   Queues, Volatile Write Cache), Create/Delete I/O Submission and Completion Queue, Get
//!   Log Page (Error Information, SMART / Health Information, Firmware Slot Information),
//!   Doorbell Buffer Config, Abort and Asynchronous Event Request (accepted, never
//!   completed: nothing happens).
//! - **NVM commands**: Read, Write, Flush, Write Zeroes and Dataset Management (deallocated
//!   blocks read back as zeroes), with data through PRP entries and PRP lists in pages of
//!   CC.MPS. Namespaces live in memory, sparsely, so a large one costs only what is written.
//!
//! Everything happens synchronously inside the register write that starts it, so tests are
//! deterministic. Nothing the driver writes makes the model panic: bad commands get the
//! specification's status, bad queue memory sets CSTS.CFS.
//!
//! Knobs make it misbehave: never set CSTS.RDY, set CSTS.CFS on enable or after some
//! commands, answer with a command ID, SQ head or status of its choosing, ignore doorbells
//! or their shadows, post completions in reverse order or hold them back, report other
//! Identify values or no shadow doorbells.
//!
//! ```
//! use ring3_nvme::{model, Controller, ControllerOptions};
//!
//! let backend = model::fake_nvme("nvme0");
//! backend.model().set_never_ready(true);
//! assert!(Controller::new(backend, ControllerOptions::default()).is_err());
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::mem::offset_of;
use std::sync::{Mutex, MutexGuard, PoisonError};

use ring3::fake::{DeviceContext, DeviceModel, FakeBackend, FakeDevice};
use ring3::IrqMode;

use crate::command::SubmissionEntry;
use crate::completion::{Status as CompletionStatus, StatusCodeType};
use crate::registers::{Configuration, ControllerRegisters, Status, CLASS_CODE, DOORBELL_BASE};

mod admin;
mod media;
mod nvm;
mod queues;
mod shadow;
#[cfg(test)]
mod tests;
mod transfer;

use media::Namespace;
use queues::{CompletionQueue, SubmissionQueue};
use shadow::ShadowPages;

/// The PCI identity of QEMU's NVMe controller (1b36:0010), class NVMe.
pub const NVME_FAKE_DEVICE: FakeDevice = FakeDevice {
    vendor_id: 0x1b36,
    device_id: 0x0010,
    class_code: CLASS_CODE,
};

/// Size of the model's BAR0: registers, then doorbells for 1536 queue pairs.
pub const MODEL_BAR0_SIZE: usize = 0x4000;

/// The model's model number in Identify Controller.
pub const MODEL_NUMBER: &str = "ring3 fake NVMe controller";

/// CAP.MQES + 1: the most entries an I/O queue may have.
pub const MODEL_MAX_QUEUE_ENTRIES: u32 = 2048;

/// The most I/O queues whose doorbells fit in [`MODEL_BAR0_SIZE`] (queue IDs 1..=1535).
pub const MODEL_MAX_IO_QUEUES: u16 = ((MODEL_BAR0_SIZE - DOORBELL_BASE) / 8 - 1) as u16;

/// Namespaces after power-on: NSID 1 of 64 MiB in 512-byte blocks, NSID 2 of 64 MiB in
/// 4096-byte blocks, as (blocks, block size).
pub const DEFAULT_NAMESPACES: [(u64, u32); 2] = [(131_072, 512), (16_384, 4096)];

/// A fake backend with an NVMe model, named `name`.
pub fn fake_nvme(name: &str) -> FakeBackend<NvmeModel> {
    FakeBackend::new(name, NVME_FAKE_DEVICE, NvmeModel::new)
}

const CAP: u64 = offset_of!(ControllerRegisters, cap) as u64;
const VS: u64 = offset_of!(ControllerRegisters, vs) as u64;
const INTMS: u64 = offset_of!(ControllerRegisters, intms) as u64;
const INTMC: u64 = offset_of!(ControllerRegisters, intmc) as u64;
const CC: u64 = offset_of!(ControllerRegisters, cc) as u64;
const CSTS: u64 = offset_of!(ControllerRegisters, csts) as u64;
const NSSR: u64 = offset_of!(ControllerRegisters, nssr) as u64;
const AQA: u64 = offset_of!(ControllerRegisters, aqa) as u64;
const ASQ: u64 = offset_of!(ControllerRegisters, asq) as u64;
const ACQ: u64 = offset_of!(ControllerRegisters, acq) as u64;

/// Bytes between doorbells: `4 << CAP.DSTRD`, and DSTRD is 0.
const DOORBELL_STRIDE: u64 = 4;

/// VS: NVMe 2.0.0.
const VERSION: u32 = 0x0002_0000;

/// Status codes the model answers with (4.2.3, figures "Generic Command Status Values" and
/// "Command Specific Status Values").
mod sc {
    pub const INVALID_OPCODE: u8 = 0x01;
    pub const INVALID_FIELD: u8 = 0x02;
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    pub const ABORT_REQUESTED: u8 = 0x07;
    pub const ABORTED_SQ_DELETION: u8 = 0x08;
    pub const INVALID_NAMESPACE: u8 = 0x0b;
    pub const COMMAND_SEQUENCE_ERROR: u8 = 0x0c;
    pub const PRP_OFFSET_INVALID: u8 = 0x13;
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;

    // Command specific.
    pub const COMPLETION_QUEUE_INVALID: u8 = 0x00;
    pub const INVALID_QUEUE_IDENTIFIER: u8 = 0x01;
    pub const INVALID_QUEUE_SIZE: u8 = 0x02;
    pub const ASYNC_EVENT_LIMIT_EXCEEDED: u8 = 0x05;
    pub const INVALID_INTERRUPT_VECTOR: u8 = 0x08;
    pub const INVALID_LOG_PAGE: u8 = 0x09;
    pub const INVALID_QUEUE_DELETION: u8 = 0x0c;
    pub const FEATURE_NOT_SAVEABLE: u8 = 0x0d;
}

/// A generic status with DNR set: the same command would fail again.
fn generic(code: u8) -> CompletionStatus {
    CompletionStatus::generic(code)
}

/// A command-specific status with DNR set.
fn specific(code: u8) -> CompletionStatus {
    CompletionStatus {
        code_type: StatusCodeType::CommandSpecific,
        do_not_retry: true,
        ..generic(code)
    }
}

/// A generic status without DNR: the command was aborted, and resubmitting it may succeed.
fn aborted(code: u8) -> CompletionStatus {
    CompletionStatus {
        code,
        ..CompletionStatus::SUCCESS
    }
}

/// What executing a command produced: its status and completion dword 0.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    status: CompletionStatus,
    result: u32,
}

impl Outcome {
    fn success(result: u32) -> Self {
        Outcome {
            status: CompletionStatus::SUCCESS,
            result,
        }
    }

    fn failed(status: CompletionStatus) -> Self {
        Outcome { status, result: 0 }
    }
}

impl From<Result<u32, CompletionStatus>> for Outcome {
    fn from(result: Result<u32, CompletionStatus>) -> Self {
        match result {
            Ok(dword0) => Outcome::success(dword0),
            Err(status) => Outcome::failed(status),
        }
    }
}

/// What the model answers, and how it misbehaves.
#[derive(Debug, Clone)]
struct Knobs {
    timeout_units: u8,
    never_ready: bool,
    fatal_on_enable: bool,
    bogus_command_id: Option<u16>,
    bogus_sq_head: Option<u16>,
    bogus_status: Option<CompletionStatus>,
    ignore_doorbells: bool,
    reorder_completions: bool,
    hold_completions: bool,
    fatal_after: Option<u64>,
    mdts: u8,
    sqes: u8,
    cqes: u8,
    namespace_count: Option<u32>,
    max_io_queues: u16,
    msix_vectors: u32,
    shadow_doorbells: bool,
    ignore_shadow: bool,
}

/// Feature values, back to their defaults on every controller reset.
#[derive(Debug, Clone, Copy)]
struct Features {
    /// Number of Queues as allocated by Set Features: (NSQA, NCQA), 0-based.
    queues: Option<(u16, u16)>,
    volatile_write_cache: bool,
}

impl Default for Features {
    fn default() -> Self {
        Features {
            queues: None,
            volatile_write_cache: true,
        }
    }
}

/// One entry of the Error Information log (5.16.1.2).
#[derive(Debug, Clone, Copy)]
struct ErrorRecord {
    count: u64,
    sq_id: u16,
    command_id: u16,
    status: CompletionStatus,
    lba: u64,
    nsid: u32,
}

/// How many entries the Error Information log keeps (ELPE + 1).
const ERROR_LOG_ENTRIES: usize = 64;

/// Counts for SMART / Health Information and for tests.
#[derive(Debug, Default, Clone)]
struct Counters {
    completions: u64,
    phase_flips: u64,
    interrupts: BTreeMap<u32, u64>,
    flushes: u64,
    reads: u64,
    writes: u64,
    bytes_read: u64,
    bytes_written: u64,
    errors: u64,
    unsafe_shutdowns: u64,
    /// Doorbell writes by MMIO per queue: (SQ tail, CQ head).
    mmio_doorbells: BTreeMap<u16, (u64, u64)>,
    doorbell_buffer_configs: u64,
}

struct State {
    cc: u32,
    csts: u32,
    interrupt_mask: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    /// CC.MPS as a shift, fixed when the controller was enabled.
    page_shift: u8,
    submission_queues: BTreeMap<u16, SubmissionQueue>,
    completion_queues: BTreeMap<u16, CompletionQueue>,
    features: Features,
    async_events_outstanding: u32,
    namespaces: Vec<Namespace>,
    knobs: Knobs,
    commands: Vec<SubmissionEntry>,
    counters: Counters,
    error_log: VecDeque<ErrorRecord>,
    /// Shadow doorbell pages, once Doorbell Buffer Config succeeded (until a reset).
    shadow: Option<ShadowPages>,
}

impl State {
    /// Whether the controller processes commands: enabled, ready and not failed.
    fn running(&self) -> bool {
        self.csts & (Status::RDY.bits() | Status::CFS.bits()) == Status::RDY.bits()
    }

    fn fail(&mut self) {
        self.csts |= Status::CFS.bits();
    }

    /// NN: the largest namespace ID (the knob may claim more than there are).
    fn namespace_count(&self) -> u32 {
        self.knobs
            .namespace_count
            .unwrap_or(u32::try_from(self.namespaces.len()).unwrap_or(u32::MAX))
    }

    /// The active namespace `nsid`, if there is one.
    fn namespace_index(&self, nsid: u32) -> Option<usize> {
        let index = usize::try_from(nsid.checked_sub(1)?).ok()?;
        (index < self.namespaces.len()).then_some(index)
    }

    /// Submission and completion I/O queues allocated (1-based).
    fn queues_allocated(&self) -> (u16, u16) {
        let (sq, cq) = self.features.queues.unwrap_or_else(|| {
            let most = self.max_io_queues() - 1;
            (most, most)
        });
        (sq + 1, cq + 1)
    }

    fn max_io_queues(&self) -> u16 {
        self.knobs.max_io_queues.clamp(1, MODEL_MAX_IO_QUEUES)
    }

    fn has_io_queues(&self) -> bool {
        self.submission_queues
            .keys()
            .chain(self.completion_queues.keys())
            .any(|&id| id != 0)
    }

    /// Controller reset (CC.EN 1 → 0, 3.7.2): queues, in-flight work and features are gone.
    fn reset_controller(&mut self) {
        self.submission_queues.clear();
        self.completion_queues.clear();
        self.features = Features::default();
        self.async_events_outstanding = 0;
        self.shadow = None;
        self.csts = 0;
    }
}

/// The NVMe controller model.
pub struct NvmeModel {
    ctx: DeviceContext,
    state: Mutex<State>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

fn namespaces_from(list: &[(u64, u32)]) -> Vec<Namespace> {
    list.iter()
        .map(|&(blocks, block_size)| Namespace::new(blocks, block_size))
        .collect()
}

impl NvmeModel {
    /// A model in its power-on state, doing DMA and interrupts through `ctx`.
    pub fn new(ctx: DeviceContext) -> Self {
        NvmeModel {
            ctx,
            state: Mutex::new(State {
                cc: 0,
                csts: 0,
                interrupt_mask: 0,
                aqa: 0,
                asq: 0,
                acq: 0,
                page_shift: 12,
                submission_queues: BTreeMap::new(),
                completion_queues: BTreeMap::new(),
                features: Features::default(),
                async_events_outstanding: 0,
                namespaces: namespaces_from(&DEFAULT_NAMESPACES),
                knobs: Knobs {
                    timeout_units: 1,
                    never_ready: false,
                    fatal_on_enable: false,
                    bogus_command_id: None,
                    bogus_sq_head: None,
                    bogus_status: None,
                    ignore_doorbells: false,
                    reorder_completions: false,
                    hold_completions: false,
                    fatal_after: None,
                    mdts: 7,
                    sqes: 0x66,
                    cqes: 0x44,
                    namespace_count: None,
                    max_io_queues: 8,
                    msix_vectors: 9,
                    shadow_doorbells: true,
                    ignore_shadow: false,
                },
                commands: Vec::new(),
                counters: Counters::default(),
                error_log: VecDeque::new(),
                shadow: None,
            }),
        }
    }

    // --- knobs ---

    /// CAP.TO in 500 ms units (default 1, so a failing wait ends quickly).
    pub fn set_timeout_units(&self, units: u8) {
        lock(&self.state).knobs.timeout_units = units;
    }

    /// Never set CSTS.RDY after CC.EN is set.
    pub fn set_never_ready(&self, never: bool) {
        lock(&self.state).knobs.never_ready = never;
    }

    /// Set CSTS.CFS instead of CSTS.RDY when enabled.
    pub fn set_fatal_on_enable(&self, fatal: bool) {
        lock(&self.state).knobs.fatal_on_enable = fatal;
    }

    /// Answer the next completion (on any queue) with this command ID instead of the
    /// submitted one.
    pub fn set_bogus_command_id(&self, command_id: u16) {
        lock(&self.state).knobs.bogus_command_id = Some(command_id);
    }

    /// Report this SQ head in the next completion (on any queue) instead of the real one.
    pub fn set_bogus_sq_head(&self, sq_head: u16) {
        lock(&self.state).knobs.bogus_sq_head = Some(sq_head);
    }

    /// Post the next completion (on any queue) with this status instead of the real one
    /// (the command still takes effect).
    pub fn set_bogus_status(&self, status: CompletionStatus) {
        lock(&self.state).knobs.bogus_status = Some(status);
    }

    /// Ignore doorbell writes, so commands are never fetched or completed.
    pub fn set_ignore_doorbells(&self, ignore: bool) {
        lock(&self.state).knobs.ignore_doorbells = ignore;
    }

    /// Post the completions of the commands fetched by one doorbell write in reverse order.
    pub fn set_reorder_completions(&self, reorder: bool) {
        lock(&self.state).knobs.reorder_completions = reorder;
    }

    /// Fetch and execute I/O commands but hold their completions back; clearing the knob
    /// posts the held ones at once. The admin queue keeps completing, so the driver can
    /// abort commands (which completes them with "command abort requested") and delete
    /// queues (which completes them with "command aborted due to SQ deletion").
    pub fn set_hold_completions(&self, hold: bool) {
        let mut state = lock(&self.state);
        state.knobs.hold_completions = hold;
        if !hold {
            self.release_held(&mut state);
        }
    }

    /// Set CSTS.CFS and stop processing once `commands` more commands (on any queue) have
    /// been executed and completed; 0 fails the controller now. A reset clears the knob.
    pub fn set_fatal_after(&self, commands: u64) {
        let mut state = lock(&self.state);
        if commands == 0 {
            state.knobs.fatal_after = None;
            state.fail();
        } else {
            state.knobs.fatal_after = Some(commands);
        }
    }

    /// Identify Controller's MDTS (default 7: 512 KiB in 4 KiB pages), also enforced on
    /// transfers; 0 is no limit.
    pub fn set_mdts(&self, mdts: u8) {
        lock(&self.state).knobs.mdts = mdts;
    }

    /// Identify Controller's SQES byte (default 0x66).
    pub fn set_sqes(&self, sqes: u8) {
        lock(&self.state).knobs.sqes = sqes;
    }

    /// Overrides Identify Controller's NN (default: the number of namespaces). IDs above
    /// the namespaces that exist are valid but inactive.
    pub fn set_namespace_count(&self, count: u32) {
        lock(&self.state).knobs.namespace_count = Some(count);
    }

    /// Replaces the namespaces with empty ones of (blocks, block size), NSIDs from 1.
    ///
    /// # Panics
    /// If a block size is not a power of two from 512 to 65536, or a namespace has no
    /// blocks or more bytes than fit in 64 bits (a mistake in the test).
    pub fn set_namespaces(&self, namespaces: &[(u64, u32)]) {
        lock(&self.state).namespaces = namespaces_from(namespaces);
    }

    /// The most I/O queues of each kind Set Features Number of Queues grants (default 8,
    /// limited to 1..=[`MODEL_MAX_IO_QUEUES`]).
    pub fn set_max_io_queues(&self, queues: u16) {
        lock(&self.state).knobs.max_io_queues = queues;
    }

    /// How many MSI-X vectors the device offers (default 9: admin plus 8 I/O queues);
    /// Create I/O Completion Queue refuses vectors from this number up.
    pub fn set_msix_vectors(&self, vectors: u32) {
        lock(&self.state).knobs.msix_vectors = vectors;
    }

    /// Offer Doorbell Buffer Config (OACS bit 8 in Identify Controller; default true).
    /// Without it the command is an invalid opcode.
    pub fn set_shadow_doorbells(&self, offered: bool) {
        lock(&self.state).knobs.shadow_doorbells = offered;
    }

    /// Stop reading the shadow page (SQ tails and CQ heads) and updating event indexes,
    /// as a controller that missed the updates: only MMIO doorbell writes move the queues.
    pub fn set_ignore_shadow(&self, ignore: bool) {
        lock(&self.state).knobs.ignore_shadow = ignore;
    }

    /// Looks at every queue's shadow doorbells now and works on what moved, as a
    /// controller polling them would (the model otherwise only looks during a register
    /// access).
    pub fn process_shadow_doorbells(&self) {
        let mut state = lock(&self.state);
        self.process_shadows(&mut state);
    }

    // --- inspection ---

    /// How many times queue `queue_id`'s doorbells were written by MMIO, ignored writes
    /// included: (SQ tail, CQ head).
    pub fn mmio_doorbell_writes(&self, queue_id: u16) -> (u64, u64) {
        let state = lock(&self.state);
        state
            .counters
            .mmio_doorbells
            .get(&queue_id)
            .copied()
            .unwrap_or((0, 0))
    }

    /// How many Doorbell Buffer Config commands succeeded.
    pub fn doorbell_buffer_configs(&self) -> u64 {
        lock(&self.state).counters.doorbell_buffer_configs
    }

    /// The shadow doorbell and event index pages in use, if any.
    pub fn shadow_doorbell_pages(&self) -> Option<(u64, u64)> {
        let state = lock(&self.state);
        state
            .shadow
            .map(|pages| (pages.doorbells, pages.event_indexes))
    }

    /// Writes `data` at `iova` as the device would (tests forge completions with it).
    pub fn dma_write(&self, iova: u64, data: &[u8]) -> ring3::Result<()> {
        self.ctx.dma_write(iova, data)
    }

    /// Every submission entry the controller fetched, on any queue, in order.
    pub fn commands(&self) -> Vec<SubmissionEntry> {
        lock(&self.state).commands.clone()
    }

    /// How many completions it posted, on all queues.
    pub fn completions_posted(&self) -> u64 {
        lock(&self.state).counters.completions
    }

    /// How many times its admin completion tail wrapped (and its phase flipped).
    pub fn phase_flips(&self) -> u64 {
        lock(&self.state).counters.phase_flips
    }

    /// How many times it signalled interrupt `vector` (delivered or not: a vector the
    /// driver did not enable loses its interrupts, as on hardware).
    pub fn interrupts_raised(&self, vector: u32) -> u64 {
        let state = lock(&self.state);
        state.counters.interrupts.get(&vector).copied().unwrap_or(0)
    }

    /// How many Flush commands succeeded.
    pub fn flushes(&self) -> u64 {
        lock(&self.state).counters.flushes
    }

    /// How many Read and Write commands succeeded: (reads, writes).
    pub fn reads_and_writes(&self) -> (u64, u64) {
        let state = lock(&self.state);
        (state.counters.reads, state.counters.writes)
    }

    /// How many I/O submission queues exist.
    pub fn io_queue_count(&self) -> usize {
        let state = lock(&self.state);
        state
            .submission_queues
            .keys()
            .filter(|&&id| id != 0)
            .count()
    }

    /// How many I/O completion queues exist.
    pub fn io_completion_queue_count(&self) -> usize {
        let state = lock(&self.state);
        state
            .completion_queues
            .keys()
            .filter(|&&id| id != 0)
            .count()
    }

    /// Whether submission queue `queue_id` exists (0 is the admin queue, while enabled).
    pub fn submission_queue_exists(&self, queue_id: u16) -> bool {
        lock(&self.state).submission_queues.contains_key(&queue_id)
    }

    /// Whether completion queue `queue_id` exists.
    pub fn completion_queue_exists(&self, queue_id: u16) -> bool {
        lock(&self.state).completion_queues.contains_key(&queue_id)
    }

    /// Whether a submission or completion queue `queue_id` exists.
    pub fn queue_exists(&self, queue_id: u16) -> bool {
        self.submission_queue_exists(queue_id) || self.completion_queue_exists(queue_id)
    }

    /// How many completions are being held back ([`NvmeModel::set_hold_completions`]).
    pub fn held_completions(&self) -> usize {
        let state = lock(&self.state);
        state
            .completion_queues
            .values()
            .map(|cq| cq.held.len())
            .sum()
    }

    /// Asynchronous Event Requests outstanding (they never complete).
    pub fn async_events_outstanding(&self) -> u32 {
        lock(&self.state).async_events_outstanding
    }

    /// How many failed I/O commands were recorded in the Error Information log.
    pub fn error_count(&self) -> u64 {
        lock(&self.state).counters.errors
    }

    /// `blocks` blocks of namespace `nsid` from `lba`, straight from the media.
    ///
    /// # Panics
    /// If the namespace does not exist or the range is outside it (a mistake in the test).
    pub fn namespace_read(&self, nsid: u32, lba: u64, blocks: u64) -> Vec<u8> {
        let state = lock(&self.state);
        let namespace = Self::test_range(&state, nsid, lba, blocks);
        let mut data = vec![0; (blocks * u64::from(namespace.block_size())) as usize];
        namespace.read(lba * u64::from(namespace.block_size()), &mut data);
        data
    }

    /// Writes `data` (whole blocks) to namespace `nsid` from `lba`, straight to the media.
    ///
    /// # Panics
    /// If the namespace does not exist, `data` is not whole blocks or the range is outside
    /// the namespace (a mistake in the test).
    pub fn namespace_write(&self, nsid: u32, lba: u64, data: &[u8]) {
        let mut state = lock(&self.state);
        let block_size = Self::test_range(&state, nsid, lba, 0).block_size();
        assert!(
            data.len() % block_size as usize == 0,
            "{} bytes are not whole blocks of {block_size}",
            data.len()
        );
        let blocks = (data.len() / block_size as usize) as u64;
        Self::test_range(&state, nsid, lba, blocks);
        let index = (nsid - 1) as usize;
        state.namespaces[index].write(lba * u64::from(block_size), data);
    }

    fn test_range(state: &State, nsid: u32, lba: u64, blocks: u64) -> &Namespace {
        let index = state
            .namespace_index(nsid)
            .unwrap_or_else(|| panic!("namespace {nsid} does not exist"));
        let namespace = &state.namespaces[index];
        assert!(
            lba.checked_add(blocks)
                .is_some_and(|end| end <= namespace.blocks()),
            "blocks {lba}..+{blocks} are outside namespace {nsid} of {} blocks",
            namespace.blocks()
        );
        namespace
    }

    /// CC as last written.
    pub fn configuration(&self) -> Configuration {
        Configuration(lock(&self.state).cc)
    }

    /// (AQA, ASQ, ACQ) as last written.
    pub fn admin_queue_registers(&self) -> (u32, u64, u64) {
        let state = lock(&self.state);
        (state.aqa, state.asq, state.acq)
    }

    // --- registers ---

    fn capabilities(knobs: &Knobs) -> u64 {
        // MQES, CQR, TO, DSTRD 0, CSS NVM, MPSMIN 4 KiB, MPSMAX 64 KiB.
        u64::from(MODEL_MAX_QUEUE_ENTRIES - 1)
            | (1 << 16)
            | (u64::from(knobs.timeout_units) << 24)
            | (1 << 37)
            | (4 << 52)
    }

    fn read_dword(&self, state: &State, offset: u64) -> u32 {
        let cap = Self::capabilities(&state.knobs);
        match offset {
            CAP => cap as u32,
            o if o == CAP + 4 => (cap >> 32) as u32,
            VS => VERSION,
            INTMS | INTMC => state.interrupt_mask,
            CC => state.cc,
            CSTS => state.csts,
            NSSR => 0,
            AQA => state.aqa,
            ASQ => state.asq as u32,
            o if o == ASQ + 4 => (state.asq >> 32) as u32,
            ACQ => state.acq as u32,
            o if o == ACQ + 4 => (state.acq >> 32) as u32,
            _ => 0,
        }
    }

    fn write_dword(&self, state: &mut State, offset: u64, value: u32) {
        let set_low = |reg: &mut u64| *reg = (*reg & !0xffff_ffff) | u64::from(value);
        let set_high = |reg: &mut u64| *reg = (*reg & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            INTMS => state.interrupt_mask |= value,
            INTMC => state.interrupt_mask &= !value,
            CC => self.write_cc(state, value),
            AQA => state.aqa = value & 0x0fff_0fff,
            ASQ => set_low(&mut state.asq),
            o if o == ASQ + 4 => set_high(&mut state.asq),
            ACQ => set_low(&mut state.acq),
            o if o == ACQ + 4 => set_high(&mut state.acq),
            o if o >= DOORBELL_BASE as u64 => self.doorbell(state, o, value),
            _ => {}
        }
    }

    /// CC: the EN transitions and shutdown notifications (3.1.4.5, 3.5).
    fn write_cc(&self, state: &mut State, value: u32) {
        let old = Configuration(state.cc);
        let new = Configuration(value);
        state.cc = value;
        if !old.enabled() && new.enabled() {
            // AQA sizes are 0-based; each queue needs at least two slots.
            let sq_entries = (state.aqa & 0xfff) + 1;
            let cq_entries = ((state.aqa >> 16) & 0xfff) + 1;
            let page_shift = new.page_shift();
            let page_mask = 1u64
                .checked_shl(u32::from(page_shift))
                .map_or(u64::MAX, |page| page - 1);
            let valid = sq_entries >= 2
                && cq_entries >= 2
                && state.asq != 0
                && state.acq != 0
                && (state.asq | state.acq) & page_mask == 0
                && new.command_set() == Configuration::CSS_NVM
                && (12..=16).contains(&page_shift);
            if state.knobs.fatal_on_enable || !valid {
                state.fail();
                return;
            }
            state.page_shift = page_shift;
            state
                .submission_queues
                .insert(0, SubmissionQueue::new(state.asq, sq_entries as u16, 0));
            state.completion_queues.insert(
                0,
                CompletionQueue::new(state.acq, cq_entries as u16, Some(0)),
            );
            if !state.knobs.never_ready {
                state.csts |= Status::RDY.bits();
            }
        } else if old.enabled() && !new.enabled() {
            // Controller reset: queues are gone, status back to its reset value. Without a
            // completed shutdown first, it counts as an unsafe shutdown.
            if (state.csts >> 2) & 0x3 != 2 {
                state.counters.unsafe_shutdowns += 1;
            }
            state.reset_controller();
        }
        if new.shutdown_bits() != 0 {
            state.csts = (state.csts & !(0x3 << 2)) | (2 << 2);
        }
    }

    /// A doorbell write (3.1.4 "Offset 1000h + ..."; DSTRD is 0, so doorbells are 4 bytes
    /// apart: SQ y tail at 2y, CQ y head at 2y + 1).
    fn doorbell(&self, state: &mut State, offset: u64, value: u32) {
        if offset % DOORBELL_STRIDE != 0 {
            return;
        }
        let index = (offset - DOORBELL_BASE as u64) / DOORBELL_STRIDE;
        let Ok(queue_id) = u16::try_from(index / 2) else {
            return;
        };
        let count = state.counters.mmio_doorbells.entry(queue_id).or_default();
        if index % 2 == 1 {
            count.1 += 1;
        } else {
            count.0 += 1;
        }
        if state.knobs.ignore_doorbells || !state.running() {
            return;
        }
        if index % 2 == 1 {
            self.completion_head_doorbell(state, queue_id, value);
        } else {
            self.submission_tail_doorbell(state, queue_id, value);
        }
    }
}

impl DeviceModel for NvmeModel {
    fn bar_len(&self, index: u8) -> Option<usize> {
        (index == 0).then_some(MODEL_BAR0_SIZE)
    }

    fn bar_read(&self, bar: u8, offset: u64, size: u8) -> u64 {
        let mut state = lock(&self.state);
        // Any register access is a moment the model can look at the shadows.
        self.process_shadows(&mut state);
        match (bar, size) {
            (0, 4) => u64::from(self.read_dword(&state, offset)),
            (0, 8) => {
                u64::from(self.read_dword(&state, offset))
                    | (u64::from(self.read_dword(&state, offset.saturating_add(4))) << 32)
            }
            _ => 0,
        }
    }

    fn bar_write(&self, bar: u8, offset: u64, size: u8, value: u64) {
        let mut state = lock(&self.state);
        match (bar, size) {
            (0, 4) => self.write_dword(&mut state, offset, value as u32),
            (0, 8) => {
                self.write_dword(&mut state, offset, value as u32);
                self.write_dword(&mut state, offset.saturating_add(4), (value >> 32) as u32);
            }
            _ => {}
        }
        self.process_shadows(&mut state);
    }

    fn interrupt_count(&self, mode: IrqMode) -> u32 {
        match mode {
            IrqMode::Intx | IrqMode::Msi => 1,
            IrqMode::MsiX => lock(&self.state).knobs.msix_vectors,
        }
    }

    fn reset(&self) {
        let mut state = lock(&self.state);
        state.reset_controller();
        state.cc = 0;
        state.aqa = 0;
        state.asq = 0;
        state.acq = 0;
        state.interrupt_mask = 0;
    }
}
