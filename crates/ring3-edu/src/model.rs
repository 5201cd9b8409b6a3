//! A model of QEMU's edu device for [`ring3::fake::FakeBackend`], so the driver (and
//! anything built on it) is tested without QEMU.
//!
//! It follows QEMU's `hw/misc/edu.c`: the factorial is computed on a background thread
//! after a short delay while [`Status::COMPUTING`] is set; a DMA runs on a background
//! thread after a short delay while [`DmaCommand::START`] is set, through the fake IOMMU
//! ([`DeviceContext::dma_read`] / [`DeviceContext::dma_write`], which record faults); source,
//! destination and count written while a transfer runs are ignored; host addresses are
//! masked to the device's 28-bit DMA mask; accesses of the wrong size are ignored (reads
//! give all ones); interrupts go out on vector 0 whenever a bit is raised.
//!
//! Where QEMU 7.2 (the lab's) aborts the whole VM — `hw_error` on a DMA outside the device's
//! buffer, with its off-by-one that also rejects a transfer reaching the last byte, or an
//! empty one — the model records [`EduModel::aborted`] and then behaves like a device that
//! is gone: reads return all ones, writes are ignored.
//!
//! Knobs let tests break it on purpose: drop the next interrupt, raise a spurious one,
//! answer liveness wrongly, report a wrong identification, hide MSI, slow it down.
//!
//! ```
//! use ring3_edu::{model, Completion, Edu};
//!
//! let backend = model::fake_edu("edu0");
//! backend.model().set_wrong_liveness(true);
//! let mut edu = Edu::new(backend, Completion::Poll).unwrap();
//! assert!(edu.check_liveness(7).is_err());
//! ```

use std::mem::offset_of;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ring3::fake::{DeviceContext, DeviceModel, FakeBackend, FakeDevice};
use ring3::IrqMode;

use crate::registers::{
    DmaCommand, EduRegisters, InterruptStatus, Status, BAR0_SIZE, DEVICE_ID, DMA_BUFFER_ADDRESS,
    DMA_BUFFER_SIZE, DMA_MASK_BITS, VENDOR_ID,
};
use crate::wrapping_factorial;

/// The PCI identity of an edu device: 1234:11e8, class "other" (0xff).
pub const EDU_FAKE_DEVICE: FakeDevice = FakeDevice {
    vendor_id: VENDOR_ID,
    device_id: DEVICE_ID,
    class_code: 0x00ff_0000,
};

/// The identification QEMU's edu reports: version 1.0.
pub const EDU_IDENTIFICATION: u32 = 0x0100_00ed;

/// A fake backend with an edu model, named `name` (used as its address in messages).
pub fn fake_edu(name: &str) -> FakeBackend<EduModel> {
    FakeBackend::new(name, EDU_FAKE_DEVICE, EduModel::new)
}

const IDENTIFICATION: u64 = offset_of!(EduRegisters, identification) as u64;
const LIVENESS: u64 = offset_of!(EduRegisters, liveness) as u64;
const FACTORIAL: u64 = offset_of!(EduRegisters, factorial) as u64;
const STATUS: u64 = offset_of!(EduRegisters, status) as u64;
const INTERRUPT_STATUS: u64 = offset_of!(EduRegisters, interrupt_status) as u64;
const INTERRUPT_RAISE: u64 = offset_of!(EduRegisters, interrupt_raise) as u64;
const INTERRUPT_ACKNOWLEDGE: u64 = offset_of!(EduRegisters, interrupt_acknowledge) as u64;
const DMA_SOURCE: u64 = offset_of!(EduRegisters, dma_source) as u64;
const DMA_DESTINATION: u64 = offset_of!(EduRegisters, dma_destination) as u64;
const DMA_COUNT: u64 = offset_of!(EduRegisters, dma_count) as u64;
const DMA_COMMAND: u64 = offset_of!(EduRegisters, dma_command) as u64;

/// What a read of the wrong size, or of a device that is gone, returns.
const ALL_ONES: u64 = u64::MAX;

/// The device's registers and buffer.
struct State {
    liveness: u32,
    factorial: u32,
    status: Status,
    interrupt_status: u32,
    dma_source: u64,
    dma_destination: u64,
    dma_count: u64,
    dma_command: DmaCommand,
    buffer: Box<[u8; DMA_BUFFER_SIZE]>,
    aborted: bool,
    /// Bumped by reset, so work started before it does not land after it.
    generation: u64,
}

impl State {
    fn power_on(generation: u64) -> Self {
        State {
            liveness: 0,
            factorial: 0,
            status: Status::empty(),
            interrupt_status: 0,
            dma_source: 0,
            dma_destination: 0,
            dma_count: 0,
            dma_command: DmaCommand::empty(),
            buffer: Box::new([0; DMA_BUFFER_SIZE]),
            aborted: false,
            generation,
        }
    }
}

struct Inner {
    ctx: DeviceContext,
    state: Mutex<State>,
    identification: AtomicU32,
    wrong_liveness: AtomicBool,
    drop_next_interrupt: AtomicBool,
    msi: AtomicBool,
    factorial_delay_us: AtomicU64,
    dma_delay_us: AtomicU64,
    dma_mask: AtomicU64,
    dmas_started: AtomicU32,
    interrupts_sent: AtomicU32,
    interrupts_dropped: AtomicU32,
    ignored_writes: AtomicU32,
}

/// QEMU's edu device, modelled for [`FakeBackend`]. Build it with [`fake_edu`].
pub struct EduModel {
    inner: Arc<Inner>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EduModel {
    /// A powered-on edu device that does DMA and raises interrupts through `ctx`.
    pub fn new(ctx: DeviceContext) -> Self {
        EduModel {
            inner: Arc::new(Inner {
                ctx,
                state: Mutex::new(State::power_on(0)),
                identification: AtomicU32::new(EDU_IDENTIFICATION),
                wrong_liveness: AtomicBool::new(false),
                drop_next_interrupt: AtomicBool::new(false),
                msi: AtomicBool::new(true),
                factorial_delay_us: AtomicU64::new(1_000),
                dma_delay_us: AtomicU64::new(1_000),
                dma_mask: AtomicU64::new((1 << DMA_MASK_BITS) - 1),
                dmas_started: AtomicU32::new(0),
                interrupts_sent: AtomicU32::new(0),
                interrupts_dropped: AtomicU32::new(0),
                ignored_writes: AtomicU32::new(0),
            }),
        }
    }

    // --- knobs ---

    /// Makes the identification register read `value` (QEMU's is [`EDU_IDENTIFICATION`]).
    pub fn set_identification(&self, value: u32) {
        self.inner.identification.store(value, Ordering::SeqCst);
    }

    /// Makes the liveness register answer something other than the inverse of what was written.
    pub fn set_wrong_liveness(&self, wrong: bool) {
        self.inner.wrong_liveness.store(wrong, Ordering::SeqCst);
    }

    /// Loses the next interrupt: its status bit is set, but no interrupt is delivered.
    pub fn drop_next_interrupt(&self) {
        self.inner.drop_next_interrupt.store(true, Ordering::SeqCst);
    }

    /// Delivers an interrupt without setting any status bit (like a shared INTx line firing
    /// for another device).
    pub fn raise_spurious_interrupt(&self) {
        self.inner.ctx.raise_irq(0);
    }

    /// Whether the device offers MSI (default: yes; without it, the driver must use INTx).
    pub fn set_msi_capable(&self, capable: bool) {
        self.inner.msi.store(capable, Ordering::SeqCst);
    }

    /// How long a factorial takes (default 1 ms).
    pub fn set_factorial_delay(&self, delay: Duration) {
        store_duration(&self.inner.factorial_delay_us, delay);
    }

    /// How long a DMA transfer takes (default 1 ms; QEMU's takes 100 ms of virtual time).
    pub fn set_dma_delay(&self, delay: Duration) {
        store_duration(&self.inner.dma_delay_us, delay);
    }

    /// Sets the mask applied to host DMA addresses (QEMU's `dma_mask` property; default 28 bits).
    pub fn set_dma_mask(&self, mask: u64) {
        self.inner.dma_mask.store(mask, Ordering::SeqCst);
    }

    // --- inspection ---

    /// Whether a DMA fell outside the device's buffer: QEMU 7.2 would have aborted the VM.
    pub fn aborted(&self) -> bool {
        lock(&self.inner.state).aborted
    }

    /// A copy of the device's 4096-byte DMA buffer.
    pub fn device_buffer(&self) -> Vec<u8> {
        lock(&self.inner.state).buffer.to_vec()
    }

    /// Writes `data` straight into the device's DMA buffer at `offset` (test set-up).
    ///
    /// # Panics
    /// If the range does not fit in the buffer.
    pub fn fill_device_buffer(&self, offset: usize, data: &[u8]) {
        lock(&self.inner.state).buffer[offset..offset + data.len()].copy_from_slice(data);
    }

    /// The interrupt status register.
    pub fn interrupt_status(&self) -> u32 {
        lock(&self.inner.state).interrupt_status
    }

    /// How many DMA transfers were started (command written with the start bit while idle).
    pub fn dmas_started(&self) -> u32 {
        self.inner.dmas_started.load(Ordering::SeqCst)
    }

    /// How many interrupts were delivered to the driver's eventfd (or would have been, had
    /// the driver enabled them).
    pub fn interrupts_sent(&self) -> u32 {
        self.inner.interrupts_sent.load(Ordering::SeqCst)
    }

    /// How many interrupts [`EduModel::drop_next_interrupt`] swallowed.
    pub fn interrupts_dropped(&self) -> u32 {
        self.inner.interrupts_dropped.load(Ordering::SeqCst)
    }

    /// How many register writes the device ignored because the operation they belong to was
    /// running (a factorial operand while computing, DMA registers while transferring).
    pub fn ignored_writes(&self) -> u32 {
        self.inner.ignored_writes.load(Ordering::SeqCst)
    }
}

fn store_duration(cell: &AtomicU64, delay: Duration) {
    cell.store(
        u64::try_from(delay.as_micros()).unwrap_or(u64::MAX),
        Ordering::SeqCst,
    );
}

fn load_duration(cell: &AtomicU64) -> Duration {
    Duration::from_micros(cell.load(Ordering::SeqCst))
}

impl Inner {
    /// edu_raise_irq: sets the bits and, while any is set, sends an interrupt.
    fn raise(&self, state: &mut State, bits: u32) {
        state.interrupt_status |= bits;
        if state.interrupt_status == 0 {
            return;
        }
        if self.drop_next_interrupt.swap(false, Ordering::SeqCst) {
            self.interrupts_dropped.fetch_add(1, Ordering::SeqCst);
            return;
        }
        self.interrupts_sent.fetch_add(1, Ordering::SeqCst);
        self.ctx.raise_irq(0);
    }

    fn start_factorial(self: &Arc<Self>, state: &mut State, n: u32) {
        if state.status.contains(Status::COMPUTING) {
            self.ignored_writes.fetch_add(1, Ordering::SeqCst);
            return;
        }
        state.factorial = n;
        state.status.insert(Status::COMPUTING);
        let generation = state.generation;
        let delay = load_duration(&self.factorial_delay_us);
        let inner = Arc::clone(self);
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            let mut state = lock(&inner.state);
            if state.generation != generation || state.aborted {
                return;
            }
            state.factorial = wrapping_factorial(n);
            state.status.remove(Status::COMPUTING);
            if state.status.contains(Status::RAISE_ON_FACTORIAL) {
                inner.raise(&mut state, InterruptStatus::FACTORIAL.bits());
            }
        });
    }

    fn start_dma(self: &Arc<Self>, state: &mut State, command: u64) {
        let command = DmaCommand::from_bits_retain(command);
        // A command without the start bit is ignored, as is any write while a transfer runs.
        if !command.contains(DmaCommand::START) {
            return;
        }
        if state.dma_command.contains(DmaCommand::START) {
            self.ignored_writes.fetch_add(1, Ordering::SeqCst);
            return;
        }
        state.dma_command = command;
        self.dmas_started.fetch_add(1, Ordering::SeqCst);
        let generation = state.generation;
        let delay = load_duration(&self.dma_delay_us);
        let inner = Arc::clone(self);
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            let mut state = lock(&inner.state);
            if state.generation == generation && !state.aborted {
                inner.run_dma(&mut state);
            }
        });
    }

    /// edu_dma_timer: performs the programmed transfer.
    fn run_dma(&self, state: &mut State) {
        if !state.dma_command.contains(DmaCommand::START) {
            return;
        }
        let to_ram = state.dma_command.contains(DmaCommand::DEVICE_TO_RAM);
        let device_address = if to_ram {
            state.dma_source
        } else {
            state.dma_destination
        };
        let Some(range) = buffer_range(device_address, state.dma_count) else {
            // QEMU 7.2: hw_error() — the VM is gone. The device never answers again.
            state.aborted = true;
            return;
        };
        let mask = self.dma_mask.load(Ordering::SeqCst);
        // edu does not look at the result of its DMA: after an IOMMU fault (recorded by the
        // fake IOMMU) the transfer still "completes". A faulting read gives zeros, as QEMU's
        // reads of unassigned memory do (seen in the lab: the buffer comes back zeroed).
        if to_ram {
            let host = state.dma_destination & mask;
            let _ = self.ctx.dma_write(host, &state.buffer[range]);
        } else {
            let host = state.dma_source & mask;
            let mut data = vec![0; range.len()];
            if self.ctx.dma_read(host, &mut data).is_err() {
                data.fill(0);
            }
            state.buffer[range].copy_from_slice(&data);
        }
        state.dma_command.remove(DmaCommand::START);
        if state.dma_command.contains(DmaCommand::RAISE_ON_COMPLETION) {
            self.raise(state, InterruptStatus::DMA.bits());
        }
    }
}

/// The part of the device's buffer that `count` bytes at device address `address` cover, or
/// `None` where QEMU 7.2's `edu_check_range` calls `hw_error`. Its test is kept as it is,
/// off-by-one included: the end of the transfer must lie strictly below the end of the
/// buffer, and the (wrapping) end above the start, so a transfer reaching the last byte, an
/// empty one and one that wraps all abort.
fn buffer_range(address: u64, count: u64) -> Option<std::ops::Range<usize>> {
    let buffer_end = DMA_BUFFER_ADDRESS + DMA_BUFFER_SIZE as u64;
    let end = address.wrapping_add(count);
    let within = |at: u64| DMA_BUFFER_ADDRESS <= at && at < buffer_end;
    if !(within(address) && end > address && within(end)) {
        return None;
    }
    let start = usize::try_from(address - DMA_BUFFER_ADDRESS).ok()?;
    let end = usize::try_from(end - DMA_BUFFER_ADDRESS).ok()?;
    Some(start..end)
}

impl DeviceModel for EduModel {
    fn bar_len(&self, index: u8) -> Option<usize> {
        (index == 0).then_some(BAR0_SIZE)
    }

    fn bar_read(&self, bar: u8, offset: u64, size: u8) -> u64 {
        // Only 32-bit accesses below 0x80, 32- or 64-bit from there (edu.rst, "MMIO area spec").
        let size_ok = if offset < DMA_SOURCE {
            size == 4
        } else {
            size == 4 || size == 8
        };
        let state = lock(&self.inner.state);
        if bar != 0 || !size_ok || state.aborted {
            return ALL_ONES;
        }
        match offset {
            IDENTIFICATION => u64::from(self.inner.identification.load(Ordering::SeqCst)),
            LIVENESS => {
                let value = if self.inner.wrong_liveness.load(Ordering::SeqCst) {
                    state.liveness ^ 0x0000_0100
                } else {
                    state.liveness
                };
                u64::from(value)
            }
            FACTORIAL => u64::from(state.factorial),
            STATUS => u64::from(state.status.bits()),
            INTERRUPT_STATUS => u64::from(state.interrupt_status),
            DMA_SOURCE => state.dma_source,
            DMA_DESTINATION => state.dma_destination,
            DMA_COUNT => state.dma_count,
            DMA_COMMAND => state.dma_command.bits(),
            _ => ALL_ONES,
        }
    }

    fn bar_write(&self, bar: u8, offset: u64, size: u8, value: u64) {
        let size_ok = if offset < DMA_SOURCE {
            size == 4
        } else {
            size == 4 || size == 8
        };
        let inner = &self.inner;
        let mut state = lock(&inner.state);
        if bar != 0 || !size_ok || state.aborted {
            return;
        }
        let dma_running = state.dma_command.contains(DmaCommand::START);
        // Registers below 0x80 are 32 bits wide.
        let word = value as u32;
        match offset {
            LIVENESS => state.liveness = !word,
            FACTORIAL => inner.start_factorial(&mut state, word),
            STATUS => {
                // Only the raise-on-factorial bit is writable.
                let raise = Status::from_bits_retain(word).contains(Status::RAISE_ON_FACTORIAL);
                state.status.set(Status::RAISE_ON_FACTORIAL, raise);
            }
            INTERRUPT_RAISE => inner.raise(&mut state, word),
            INTERRUPT_ACKNOWLEDGE => state.interrupt_status &= !word,
            DMA_SOURCE | DMA_DESTINATION | DMA_COUNT if dma_running => {
                inner.ignored_writes.fetch_add(1, Ordering::SeqCst);
            }
            DMA_SOURCE => state.dma_source = value,
            DMA_DESTINATION => state.dma_destination = value,
            DMA_COUNT => state.dma_count = value,
            DMA_COMMAND => inner.start_dma(&mut state, value),
            _ => {}
        }
    }

    fn interrupt_count(&self, mode: IrqMode) -> u32 {
        match mode {
            IrqMode::Msi => u32::from(self.inner.msi.load(Ordering::SeqCst)),
            IrqMode::Intx => 1,
            IrqMode::MsiX => 0,
        }
    }

    fn reset(&self) {
        let mut state = lock(&self.inner.state);
        let generation = state.generation + 1;
        *state = State::power_on(generation);
    }
}
