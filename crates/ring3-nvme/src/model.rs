//! A model of an NVMe controller for [`ring3::fake::FakeBackend`], so the driver is tested
//! without QEMU.
//!
//! It implements the registers of NVMe Base 2.0, 3.1.4, the enable/disable handshake
//! (CC.EN → CSTS.RDY), and the admin queue: a write to the admin SQ tail doorbell makes
//! it fetch each new submission entry by DMA ([`DeviceContext::dma_read`]), execute it
//! (Identify Controller; anything else fails with "invalid command opcode") and post a
//! completion with the current phase tag ([`DeviceContext::dma_write`]). The work is done
//! synchronously inside the doorbell write, so tests are deterministic.
//!
//! Knobs make it misbehave: never set CSTS.RDY, set CSTS.CFS on enable, answer with a
//! command ID or an SQ head of its choosing, report other Identify values.
//!
//! ```
//! use ring3_nvme::{model, Controller, ControllerOptions};
//!
//! let backend = model::fake_nvme("nvme0");
//! backend.model().set_never_ready(true);
//! assert!(Controller::new(backend, ControllerOptions::default()).is_err());
//! ```

use std::mem::offset_of;
use std::sync::{Mutex, MutexGuard, PoisonError};

use ring3::fake::{DeviceContext, DeviceModel, FakeBackend, FakeDevice};
use ring3::IrqMode;

use crate::command::{admin, cns, SubmissionEntry, SUBMISSION_ENTRY_SIZE};
use crate::completion::{CompletionEntry, Status as CompletionStatus, COMPLETION_ENTRY_SIZE};
use crate::identify::{offsets, IDENTIFY_SIZE};
use crate::registers::{Configuration, ControllerRegisters, Status, CLASS_CODE, DOORBELL_BASE};

/// The PCI identity of QEMU's NVMe controller (1b36:0010), class NVMe.
pub const NVME_FAKE_DEVICE: FakeDevice = FakeDevice {
    vendor_id: 0x1b36,
    device_id: 0x0010,
    class_code: CLASS_CODE,
};

/// Size of the model's BAR0: registers, then doorbells for 1024 queue pairs.
pub const MODEL_BAR0_SIZE: usize = 0x4000;

/// The model's model number in Identify Controller.
pub const MODEL_NUMBER: &str = "ring3 fake NVMe controller";

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

/// What the model answers, and how it misbehaves.
#[derive(Debug, Clone)]
struct Knobs {
    timeout_units: u8,
    never_ready: bool,
    fatal_on_enable: bool,
    bogus_command_id: Option<u16>,
    bogus_sq_head: Option<u16>,
    ignore_doorbells: bool,
    mdts: u8,
    sqes: u8,
    cqes: u8,
    namespace_count: u32,
}

/// The admin queue as the controller sees it.
#[derive(Debug, Default, Clone, Copy)]
struct AdminQueue {
    sq_entries: u16,
    cq_entries: u16,
    sq_head: u16,
    sq_tail: u16,
    cq_head: u16,
    cq_tail: u16,
    phase: bool,
}

struct State {
    cc: u32,
    csts: u32,
    interrupt_mask: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    admin: AdminQueue,
    knobs: Knobs,
    commands: Vec<SubmissionEntry>,
    completions: u64,
    phase_flips: u64,
}

/// The NVMe controller model.
pub struct NvmeModel {
    ctx: DeviceContext,
    state: Mutex<State>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
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
                admin: AdminQueue::default(),
                knobs: Knobs {
                    timeout_units: 1,
                    never_ready: false,
                    fatal_on_enable: false,
                    bogus_command_id: None,
                    bogus_sq_head: None,
                    ignore_doorbells: false,
                    mdts: 7,
                    sqes: 0x66,
                    cqes: 0x44,
                    namespace_count: 1,
                },
                commands: Vec::new(),
                completions: 0,
                phase_flips: 0,
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

    /// Answer the next command with this command ID instead of the submitted one.
    pub fn set_bogus_command_id(&self, command_id: u16) {
        lock(&self.state).knobs.bogus_command_id = Some(command_id);
    }

    /// Report this SQ head in the next completion instead of the real one.
    pub fn set_bogus_sq_head(&self, sq_head: u16) {
        lock(&self.state).knobs.bogus_sq_head = Some(sq_head);
    }

    /// Ignore doorbell writes, so commands are never fetched or completed.
    pub fn set_ignore_doorbells(&self, ignore: bool) {
        lock(&self.state).knobs.ignore_doorbells = ignore;
    }

    /// Identify Controller's MDTS (default 7: 512 KiB with 4 KiB pages).
    pub fn set_mdts(&self, mdts: u8) {
        lock(&self.state).knobs.mdts = mdts;
    }

    /// Identify Controller's SQES byte (default 0x66).
    pub fn set_sqes(&self, sqes: u8) {
        lock(&self.state).knobs.sqes = sqes;
    }

    /// Identify Controller's NN (default 1).
    pub fn set_namespace_count(&self, count: u32) {
        lock(&self.state).knobs.namespace_count = count;
    }

    // --- inspection ---

    /// Writes `data` at `iova` as the device would (tests forge completions with it).
    pub fn dma_write(&self, iova: u64, data: &[u8]) -> ring3::Result<()> {
        self.ctx.dma_write(iova, data)
    }

    /// Every submission entry the controller fetched, in order.
    pub fn commands(&self) -> Vec<SubmissionEntry> {
        lock(&self.state).commands.clone()
    }

    /// How many completions it posted.
    pub fn completions_posted(&self) -> u64 {
        lock(&self.state).completions
    }

    /// How many times its admin completion tail wrapped (and its phase flipped).
    pub fn phase_flips(&self) -> u64 {
        lock(&self.state).phase_flips
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

    fn capabilities(knobs: &Knobs) -> u64 {
        // MQES 2047, CQR, TO, DSTRD 0, CSS NVM, MPSMIN 4 KiB, MPSMAX 64 KiB.
        0x7ff | (1 << 16) | (u64::from(knobs.timeout_units) << 24) | (1 << 37) | (4 << 52)
    }

    fn read_dword(&self, state: &State, offset: u64) -> u32 {
        let cap = Self::capabilities(&state.knobs);
        match offset {
            CAP => cap as u32,
            o if o == CAP + 4 => (cap >> 32) as u32,
            VS => 0x0002_0000,
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
            let sq_entries = (state.aqa & 0xfff) as u16 + 1;
            let cq_entries = ((state.aqa >> 16) & 0xfff) as u16 + 1;
            let page_mask = (1u64 << new.page_shift()) - 1;
            let valid = state.aqa != 0
                && state.asq != 0
                && state.acq != 0
                && (state.asq | state.acq) & page_mask == 0
                && new.command_set() == Configuration::CSS_NVM
                && (12..=16).contains(&new.page_shift());
            if state.knobs.fatal_on_enable || !valid {
                state.csts |= Status::CFS.bits();
                return;
            }
            state.admin = AdminQueue {
                sq_entries,
                cq_entries,
                phase: true,
                ..AdminQueue::default()
            };
            if !state.knobs.never_ready {
                state.csts |= Status::RDY.bits();
            }
        } else if old.enabled() && !new.enabled() {
            // Controller reset: queues are gone, status back to its reset value.
            state.admin = AdminQueue::default();
            state.csts = 0;
        }
        if new.shutdown_bits() != 0 {
            state.csts = (state.csts & !(0x3 << 2)) | (2 << 2);
        }
    }

    fn doorbell(&self, state: &mut State, offset: u64, value: u32) {
        let index = (offset - DOORBELL_BASE as u64) / 4;
        let (queue, completion) = (index / 2, index % 2 == 1);
        let ready = state.csts & Status::RDY.bits() != 0;
        if queue != 0 || !ready || state.knobs.ignore_doorbells {
            return;
        }
        let admin = &mut state.admin;
        if completion {
            if value < u32::from(admin.cq_entries) {
                admin.cq_head = value as u16;
            }
            // A head moved on may make room for completions that were waiting.
            self.process_admin(state);
        } else if value < u32::from(admin.sq_entries) {
            admin.sq_tail = value as u16;
            self.process_admin(state);
        }
    }

    /// Executes admin commands from the SQ head to the tail while the CQ has room.
    fn process_admin(&self, state: &mut State) {
        loop {
            let admin = state.admin;
            if admin.sq_head == admin.sq_tail {
                return;
            }
            let next_cq_tail = (admin.cq_tail + 1) % admin.cq_entries;
            if next_cq_tail == admin.cq_head {
                return;
            }
            let mut bytes = [0u8; SUBMISSION_ENTRY_SIZE];
            let fetch = state.asq + u64::from(admin.sq_head) * SUBMISSION_ENTRY_SIZE as u64;
            if self.ctx.dma_read(fetch, &mut bytes).is_err() {
                state.csts |= Status::CFS.bits();
                return;
            }
            let entry = SubmissionEntry::from_bytes(bytes);
            state.commands.push(entry);
            state.admin.sq_head = (admin.sq_head + 1) % admin.sq_entries;
            let (status, result) = self.execute(state, &entry);

            let admin = state.admin;
            let completion = CompletionEntry {
                result,
                dword1: 0,
                sq_head: state.knobs.bogus_sq_head.take().unwrap_or(admin.sq_head),
                sq_id: 0,
                command_id: state
                    .knobs
                    .bogus_command_id
                    .take()
                    .unwrap_or(entry.command_id()),
                phase: admin.phase,
                status,
            };
            let post = state.acq + u64::from(admin.cq_tail) * COMPLETION_ENTRY_SIZE as u64;
            if self.ctx.dma_write(post, &completion.to_bytes()).is_err() {
                state.csts |= Status::CFS.bits();
                return;
            }
            state.completions += 1;
            state.admin.cq_tail = next_cq_tail;
            if next_cq_tail == 0 {
                state.admin.phase = !admin.phase;
                state.phase_flips += 1;
            }
            if state.interrupt_mask & 1 == 0 {
                self.ctx.raise_irq(0);
            }
        }
    }

    fn execute(&self, state: &State, entry: &SubmissionEntry) -> (CompletionStatus, u32) {
        match entry.opcode() {
            admin::IDENTIFY => {
                let cns = (entry.dword(10) & 0xff) as u8;
                if cns != cns::CONTROLLER {
                    return (CompletionStatus::generic(0x02), 0);
                }
                // One page at PRP1: it must start on a page boundary.
                let page_mask = (1u64 << Configuration(state.cc).page_shift()) - 1;
                if entry.prp1() & page_mask != 0 {
                    return (CompletionStatus::generic(0x13), 0);
                }
                let data = self.identify_controller(&state.knobs);
                match self.ctx.dma_write(entry.prp1(), &data) {
                    Ok(()) => (CompletionStatus::SUCCESS, 0),
                    Err(_) => (CompletionStatus::generic(0x04), 0),
                }
            }
            _ => (CompletionStatus::generic(0x01), 0),
        }
    }

    fn identify_controller(&self, knobs: &Knobs) -> Vec<u8> {
        let mut data = vec![0u8; IDENTIFY_SIZE];
        let mut put = |at: usize, bytes: &[u8]| data[at..at + bytes.len()].copy_from_slice(bytes);
        let padded = |text: &str, len: usize| {
            let mut field = vec![b' '; len];
            field[..text.len()].copy_from_slice(text.as_bytes());
            field
        };
        put(offsets::VID, &0x1b36u16.to_le_bytes());
        put(offsets::SSVID, &0x1af4u16.to_le_bytes());
        put(offsets::SN, &padded("RING3FAKE0001", 20));
        put(offsets::MN, &padded(MODEL_NUMBER, 40));
        put(offsets::FR, &padded("1.0", 8));
        put(offsets::MDTS, &[knobs.mdts]);
        put(offsets::CNTLID, &1u16.to_le_bytes());
        put(offsets::VER, &0x0002_0000u32.to_le_bytes());
        put(offsets::SQES, &[knobs.sqes]);
        put(offsets::CQES, &[knobs.cqes]);
        put(offsets::NN, &knobs.namespace_count.to_le_bytes());
        data
    }
}

impl DeviceModel for NvmeModel {
    fn bar_len(&self, index: u8) -> Option<usize> {
        (index == 0).then_some(MODEL_BAR0_SIZE)
    }

    fn bar_read(&self, bar: u8, offset: u64, size: u8) -> u64 {
        let state = lock(&self.state);
        match (bar, size) {
            (0, 4) => u64::from(self.read_dword(&state, offset)),
            (0, 8) => {
                u64::from(self.read_dword(&state, offset))
                    | (u64::from(self.read_dword(&state, offset + 4)) << 32)
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
                self.write_dword(&mut state, offset + 4, (value >> 32) as u32);
            }
            _ => {}
        }
    }

    fn interrupt_count(&self, mode: IrqMode) -> u32 {
        match mode {
            IrqMode::Intx | IrqMode::Msi => 1,
            IrqMode::MsiX => 0,
        }
    }

    fn reset(&self) {
        let mut state = lock(&self.state);
        state.cc = 0;
        state.csts = 0;
        state.aqa = 0;
        state.asq = 0;
        state.acq = 0;
        state.interrupt_mask = 0;
        state.admin = AdminQueue::default();
    }
}
