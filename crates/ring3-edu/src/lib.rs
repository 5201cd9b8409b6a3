//! A ring3 driver for `edu`, QEMU's educational PCI device (`-device edu`, PCI 1234:11e8).
//!
//! edu is small enough to read in one sitting and still has everything a real device has:
//! an identification register, a register that answers with computed values, a slow
//! operation with a busy bit (factorial), interrupts (MSI, else INTx) with a status and an
//! acknowledge register, and a DMA engine that copies between host memory and a 4 KiB
//! buffer inside the device. Its register map is in [`registers`], citing QEMU's
//! `docs/specs/edu.rst`.
//!
//! [`Edu`] is generic over [`ring3::Backend`]: on a real machine (or the lab VM) it runs over
//! `ring3::vfio::VfioBackend`, in unit tests over [`ring3::fake::FakeBackend`] with the
//! device model in [`model`]:
//!
//! ```
//! use ring3_edu::{model, Completion, Edu};
//!
//! # fn main() -> ring3_edu::Result<()> {
//! let mut edu = Edu::new(model::fake_edu("edu0"), Completion::Interrupt)?;
//! assert_eq!(edu.identification()?.to_string(), "1.0");
//! assert_eq!(edu.factorial(5)?, 120);
//! edu.write_to_device(16, b"hello")?;
//! assert_eq!(edu.read_from_device(16, 5)?, b"hello");
//! # Ok(()) }
//! ```
//!
//! Concepts:
//!
//! - **Completion.** Every operation that takes time (factorial, DMA) ends either by
//!   polling the device's busy bit or by waiting for its interrupt ([`Completion`]). Both
//!   are bounded by [`Edu::timeout`]; an interrupt that does not come although the device
//!   says it is done is an error ([`Error::LostInterrupt`]), never a silent success.
//! - **DMA.** The driver owns one 4 KiB [`ring3::DmaBuffer`] in host memory, mapped in the
//!   IOMMU below edu's 28-bit DMA mask. [`Edu::write_to_device`] copies data into it and has
//!   the device fetch it; [`Edu::read_from_device`] has the device write it back.
//! - **The device's own limits are checked first.** QEMU 7.2's edu aborts the whole VM when
//!   a transfer falls outside its buffer — including one that reaches the buffer's last
//!   byte, through an off-by-one in its check, so transfers cover at most the first
//!   [`DMA_USABLE_SIZE`](registers::DMA_USABLE_SIZE) (4095) bytes — and it silently ignores
//!   registers written while a transfer runs. The driver validates every range and waits
//!   for the engine to be idle before it programs a transfer.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod error;
pub mod model;
pub mod registers;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use ring3::irq::Interrupt;
use ring3::mmio::Registers;
use ring3::{Backend, Bar, DmaBuffer, IrqMode};

pub use error::{Error, Result};
use registers::{
    DmaCommand, EduRegisters, InterruptStatus, Status, BAR0_SIZE, DEVICE_ID, DMA_BUFFER_ADDRESS,
    DMA_BUFFER_SIZE, DMA_MASK_BITS, DMA_USABLE_SIZE, IDENTIFICATION_MAGIC, VENDOR_ID,
};

/// How [`Edu`] learns that an operation finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Read the busy bit until it clears.
    Poll,
    /// Wait for the device's interrupt: MSI if the device offers it, else INTx.
    Interrupt,
}

/// Which way a DMA transfer copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Host memory → the device's buffer.
    ToDevice,
    /// The device's buffer → host memory.
    FromDevice,
}

/// The device's version, from the identification register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// Major version (`RR` in `0xRRrr00ed`).
    pub major: u8,
    /// Minor version (`rr` in `0xRRrr00ed`).
    pub minor: u8,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// How long each wait on the device lasts by default. QEMU's DMA engine takes 100 ms of
/// virtual time per transfer; the rest is headroom for a slow (TCG) guest.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// n! modulo 2³², which is what edu computes (its multiplication wraps at 32 bits).
///
/// From 34! on, the product holds at least 32 factors of two, so the result is 0.
pub fn wrapping_factorial(n: u32) -> u32 {
    if n >= 34 {
        return 0;
    }
    (1..=n).fold(1u32, u32::wrapping_mul)
}

/// The operations the driver waits for, and the registers that tell their state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Factorial,
    Dma,
    SelfTest,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::Factorial => "factorial",
            Operation::Dma => "DMA transfer",
            Operation::SelfTest => "software-raised interrupt",
        }
    }

    fn interrupt(self) -> InterruptStatus {
        match self {
            Operation::Factorial => InterruptStatus::FACTORIAL,
            Operation::Dma => InterruptStatus::DMA,
            Operation::SelfTest => InterruptStatus::SELF_TEST,
        }
    }
}

/// One look at the register that says whether an operation is still running.
#[derive(Debug, Clone, Copy)]
struct Observation {
    busy: bool,
    register: &'static str,
    offset: usize,
    value: u64,
}

/// Sleeps a little longer each round, so short waits stay short and long ones stay cheap.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_micros(10))
    }

    fn pause(&mut self) {
        std::thread::sleep(self.0);
        self.0 = (self.0 * 2).min(Duration::from_millis(1));
    }
}

/// A driver for one edu device.
///
/// Operations that start device work take `&mut self`: the device has one factorial unit
/// and one DMA engine, so one caller at a time drives it.
pub struct Edu<B: Backend> {
    backend: B,
    bar: Bar,
    buffer: DmaBuffer,
    irq: Option<Interrupt>,
    timeout: Duration,
}

impl<B: Backend> fmt::Debug for Edu<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Edu")
            .field("address", &self.backend.address())
            .field("irq", &self.irq)
            .field("buffer", &self.buffer)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl<B: Backend> Edu<B> {
    /// Takes over the edu device behind `backend`.
    ///
    /// Checks the PCI IDs and BAR0, limits DMA to edu's 28-bit mask, allocates the DMA
    /// buffer, sets up the interrupt for [`Completion::Interrupt`] (MSI if offered, else
    /// INTx), enables bus mastering, and clears any interrupt left pending.
    pub fn new(backend: B, completion: Completion) -> Result<Self> {
        // PCI identity (edu.rst, "PCI specs"): refuse anything that is not edu.
        let (vendor_id, device_id) = backend.ids()?;
        if (vendor_id, device_id) != (VENDOR_ID, DEVICE_ID) {
            return Err(Error::WrongDevice {
                address: backend.address().to_string(),
                vendor_id,
                device_id,
            });
        }

        // Region 0: 1 MiB of registers.
        let bar = backend.bar(0)?;
        if bar.len() < BAR0_SIZE {
            return Err(Error::BarTooSmall {
                address: backend.address().to_string(),
                len: bar.len(),
                expected: BAR0_SIZE,
            });
        }

        // DMA mask (edu.rst, "Command line switches"): the device drops address bits above
        // 28, so every buffer it reaches must have an IOVA below 2^28.
        backend.set_dma_mask(DMA_MASK_BITS);
        let buffer = backend.dma_alloc(DMA_BUFFER_SIZE)?;

        let mut edu = Edu {
            backend,
            bar,
            buffer,
            irq: None,
            timeout: DEFAULT_TIMEOUT,
        };

        // Interrupts (edu.rst, "IRQ controller"): MSI when the device offers it, else INTx.
        // Built after `edu` so that its Drop disables them again if a later step fails.
        if completion == Completion::Interrupt {
            let mode = if edu.backend.interrupt_count(IrqMode::Msi)? >= 1 {
                IrqMode::Msi
            } else {
                IrqMode::Intx
            };
            let mut vectors = edu.backend.enable_interrupts(mode, 1)?;
            edu.irq = vectors.pop();
            if edu.irq.is_none() {
                return Err(ring3::Error::Unsupported {
                    address: edu.backend.address().to_string(),
                    what: format!("a {mode} interrupt"),
                }
                .into());
            }
        }

        edu.backend.set_bus_master(true)?;

        // Start quiet: no factorial interrupt requested, nothing pending from a previous user.
        let regs = edu.registers()?;
        regs.field(|r| &r.status).write(Status::empty().bits());
        regs.field(|r| &r.interrupt_acknowledge).write(u32::MAX);
        edu.drain_interrupts()?;
        Ok(edu)
    }

    /// The platform backend, for inspection (a fake backend's model, its DMA faults, ...).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// How operations complete: [`Completion::Interrupt`] if an interrupt is set up.
    pub fn completion(&self) -> Completion {
        match self.irq {
            Some(_) => Completion::Interrupt,
            None => Completion::Poll,
        }
    }

    /// The interrupt kind in use (MSI or INTx), or `None` when polling.
    pub fn irq_mode(&self) -> Option<IrqMode> {
        self.irq.as_ref().map(Interrupt::mode)
    }

    /// How long each wait on the device may last.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes how long each wait on the device may last.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The IOVA of the driver's host-side DMA buffer (what the device is told to access).
    pub fn dma_buffer_iova(&self) -> u64 {
        self.buffer.iova()
    }

    fn registers(&self) -> Result<Registers<'_, EduRegisters>> {
        Ok(self.bar.registers::<EduRegisters>(0)?)
    }

    /// Reads the identification register (0x00) and checks edu's `0xed` low byte.
    pub fn identification(&self) -> Result<Version> {
        let value = self.registers()?.field(|r| &r.identification).read();
        let [magic, _, minor, major] = value.to_le_bytes();
        if magic != IDENTIFICATION_MAGIC {
            return Err(Error::BadIdentification { value });
        }
        Ok(Version { major, minor })
    }

    /// Writes `value` to the liveness register (0x04) and checks that it reads back inverted.
    pub fn check_liveness(&mut self, value: u32) -> Result<()> {
        let liveness = self.registers()?.field(|r| &r.liveness);
        liveness.write(value);
        let read = liveness.read();
        if read != !value {
            return Err(Error::LivenessMismatch {
                wrote: value,
                expected: !value,
                read,
            });
        }
        Ok(())
    }

    /// Has the device compute `n!` and returns its answer, which wraps at 32 bits (see
    /// [`wrapping_factorial`]). The device multiplies `n` times: very large `n` take long
    /// enough to hit the timeout.
    pub fn factorial(&mut self, n: u32) -> Result<u32> {
        let regs = self.registers()?;
        // The device ignores a new operand while it computes (edu.rst, 0x08): let an earlier
        // computation (one that timed out) finish first.
        self.wait_polled(Operation::Factorial)?;
        let raise = match self.irq {
            Some(_) => Status::RAISE_ON_FACTORIAL,
            None => Status::empty(),
        };
        regs.field(|r| &r.status).write(raise.bits());
        self.clear_interrupt(InterruptStatus::FACTORIAL)?;
        regs.field(|r| &r.factorial).write(n);
        self.wait_for(Operation::Factorial)?;
        Ok(regs.field(|r| &r.factorial).read())
    }

    /// Raises an interrupt by hand (0x60), waits for it when interrupts are in use, checks
    /// the interrupt status shows it, acknowledges it (0x64) and checks the status cleared.
    ///
    /// A self-test of the interrupt path, for tests and `ring3 edu`.
    pub fn raise_and_ack_interrupt(&mut self) -> Result<()> {
        let regs = self.registers()?;
        let bit = Operation::SelfTest.interrupt();
        self.clear_interrupt(bit)?;
        regs.field(|r| &r.interrupt_raise).write(bit.bits());
        if let Some(irq) = &self.irq {
            self.wait_for_interrupt(irq, Operation::SelfTest)?;
        }
        let pending = self.interrupt_status()?;
        if !pending.contains(bit) {
            return Err(Error::Misbehaved {
                what: format!("bit {:#x} raised through 0x60 is not pending", bit.bits()),
                register: "interrupt status",
                value: u64::from(pending.bits()),
            });
        }
        self.acknowledge(bit)?;
        let after = self.interrupt_status()?;
        if after.intersects(bit) {
            return Err(Error::Misbehaved {
                what: format!("bit {:#x} still pending after acknowledge", bit.bits()),
                register: "interrupt status",
                value: u64::from(after.bits()),
            });
        }
        Ok(())
    }

    /// Copies `data` into the device's buffer at `offset`: host buffer → device by DMA.
    ///
    /// `offset + data.len()` must not exceed [`DMA_USABLE_SIZE`] (4095): a range beyond it is
    /// refused with [`Error::OutOfRange`] before the device is touched. Empty data is a no-op.
    pub fn write_to_device(&mut self, offset: usize, data: &[u8]) -> Result<()> {
        check_device_range(offset, data.len())?;
        // The engine may still be running a transfer that timed out, which may write our
        // buffer: wait for it before filling the buffer.
        self.wait_polled(Operation::Dma)?;
        self.buffer.write(0, data)?;
        self.transfer(Direction::ToDevice, self.buffer.iova(), offset, data.len())
    }

    /// Copies `len` bytes at `offset` out of the device's buffer: device → host buffer by DMA.
    ///
    /// `offset + len` must not exceed [`DMA_USABLE_SIZE`] (4095): a range beyond it is
    /// refused with [`Error::OutOfRange`] before the device is touched. `len == 0` is a no-op.
    pub fn read_from_device(&mut self, offset: usize, len: usize) -> Result<Vec<u8>> {
        check_device_range(offset, len)?;
        self.wait_polled(Operation::Dma)?;
        // Clear what a previous transfer left, so stale bytes cannot pass for the device's.
        self.buffer.fill(0);
        self.transfer(Direction::FromDevice, self.buffer.iova(), offset, len)?;
        let mut data = vec![0; len];
        self.buffer.read(0, &mut data)?;
        Ok(data)
    }

    /// **For tests:** programs one transfer between an arbitrary IOVA and the device's buffer
    /// and waits for it to complete.
    ///
    /// Meant for the IOMMU test: aim the device at an IOVA that was never mapped and check
    /// that nothing reaches host memory (the IOMMU blocks it; on the fake backend the fault
    /// is recorded in `FakeBackend::dma_faults`). edu does not report DMA errors, so the
    /// transfer "completes" either way. The device-side range is still checked (QEMU would
    /// abort the VM), and `host_iova..host_iova + len` must lie below the 28-bit DMA mask,
    /// since the device would otherwise clip it to some other address. Drivers use
    /// [`Edu::write_to_device`] and [`Edu::read_from_device`].
    pub fn dma_raw(
        &mut self,
        direction: Direction,
        host_iova: u64,
        device_offset: usize,
        len: usize,
    ) -> Result<()> {
        check_device_range(device_offset, len)?;
        self.wait_polled(Operation::Dma)?;
        self.transfer(direction, host_iova, device_offset, len)
    }

    /// Programs and runs one transfer (edu.rst, "DMA controller"). The caller has checked the
    /// device range and waited for the engine to be idle (the device ignores source,
    /// destination and count written while a transfer runs).
    fn transfer(
        &self,
        direction: Direction,
        host_iova: u64,
        device_offset: usize,
        len: usize,
    ) -> Result<()> {
        let mask_limit = 1u64 << DMA_MASK_BITS;
        if host_iova
            .checked_add(len as u64)
            .is_none_or(|end| end > mask_limit)
        {
            return Err(Error::AboveDmaMask {
                iova: host_iova,
                len,
            });
        }
        if len == 0 {
            return Ok(());
        }
        let regs = self.registers()?;
        self.clear_interrupt(InterruptStatus::DMA)?;

        let device_address = DMA_BUFFER_ADDRESS + device_offset as u64;
        let (source, destination, mut command) = match direction {
            Direction::ToDevice => (host_iova, device_address, DmaCommand::START),
            Direction::FromDevice => (
                device_address,
                host_iova,
                DmaCommand::START | DmaCommand::DEVICE_TO_RAM,
            ),
        };
        if self.irq.is_some() {
            command |= DmaCommand::RAISE_ON_COMPLETION;
        }
        regs.field(|r| &r.dma_source).write(source);
        regs.field(|r| &r.dma_destination).write(destination);
        regs.field(|r| &r.dma_count).write(len as u64);
        // The device reads the host buffer once the command is written: the copy into it
        // must be complete (and not reordered past the MMIO store) by then.
        fence(Ordering::Release);
        regs.field(|r| &r.dma_command).write(command.bits());
        self.wait_for(Operation::Dma)?;
        // The device's writes to the host buffer happened before it reported completion:
        // do not let reads of the buffer move before that report.
        fence(Ordering::Acquire);
        Ok(())
    }

    /// Reads the register that says whether `operation` is still running.
    fn observe(&self, operation: Operation) -> Result<Observation> {
        let regs = self.registers()?;
        Ok(match operation {
            Operation::Factorial => {
                let field = regs.field(|r| &r.status);
                let value = field.read();
                Observation {
                    busy: Status::from_bits_retain(value).contains(Status::COMPUTING),
                    register: "status",
                    offset: field.offset(),
                    value: u64::from(value),
                }
            }
            Operation::Dma => {
                let field = regs.field(|r| &r.dma_command);
                let value = field.read();
                Observation {
                    busy: DmaCommand::from_bits_retain(value).contains(DmaCommand::START),
                    register: "DMA command",
                    offset: field.offset(),
                    value,
                }
            }
            Operation::SelfTest => {
                let field = regs.field(|r| &r.interrupt_status);
                let value = field.read();
                Observation {
                    // Raising is immediate: the only thing to wait for is the interrupt.
                    busy: false,
                    register: "interrupt status",
                    offset: field.offset(),
                    value: u64::from(value),
                }
            }
        })
    }

    /// Waits for `operation` to finish, the way [`Completion`] says; acknowledges its interrupt.
    fn wait_for(&self, operation: Operation) -> Result<()> {
        match &self.irq {
            None => self.wait_polled(operation),
            Some(irq) => {
                self.wait_for_interrupt(irq, operation)?;
                self.acknowledge(operation.interrupt())?;
                let seen = self.observe(operation)?;
                if seen.busy {
                    return Err(Error::Misbehaved {
                        what: format!("{} interrupt raised while still busy", operation.name()),
                        register: seen.register,
                        value: seen.value,
                    });
                }
                Ok(())
            }
        }
    }

    /// Reads the busy bit of `operation` until it clears or the timeout passes.
    fn wait_polled(&self, operation: Operation) -> Result<()> {
        let start = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            let seen = self.observe(operation)?;
            if !seen.busy {
                return Ok(());
            }
            if start.elapsed() >= self.timeout {
                return Err(Error::Timeout {
                    operation: operation.name(),
                    register: seen.register,
                    offset: seen.offset,
                    last: seen.value,
                    timeout: self.timeout,
                });
            }
            backoff.pause();
        }
    }

    /// Waits until the interrupt arrives with `operation`'s bit pending. Interrupts without
    /// it are spurious (a shared INTx line, a re-raised level) and are skipped. If none
    /// comes in time but the device is done, the interrupt was lost: that is an error too.
    fn wait_for_interrupt(&self, irq: &Interrupt, operation: Operation) -> Result<()> {
        let expected = operation.interrupt();
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match irq.wait(left) {
                Ok(_) => {
                    let pending = self.interrupt_status()?;
                    if pending.contains(expected) {
                        return Ok(());
                    }
                    let foreign = pending.difference(expected);
                    tracing::debug!(
                        address = self.backend.address(),
                        pending = pending.bits(),
                        "spurious edu interrupt while waiting for the {}",
                        operation.name()
                    );
                    if !foreign.is_empty() {
                        // Nobody else waits on these bits; left pending, a level-triggered
                        // INTx line would fire again and again.
                        tracing::warn!(
                            address = self.backend.address(),
                            bits = foreign.bits(),
                            "acknowledging unexpected edu interrupt bits"
                        );
                        self.acknowledge(foreign)?;
                    }
                }
                Err(ring3::Error::Timeout { .. }) => {
                    let seen = self.observe(operation)?;
                    let pending = self.interrupt_status()?;
                    if seen.busy {
                        return Err(Error::Timeout {
                            operation: operation.name(),
                            register: seen.register,
                            offset: seen.offset,
                            last: seen.value,
                            timeout: self.timeout,
                        });
                    }
                    // Done without telling us: leave the device clean for the next operation.
                    self.acknowledge(expected)?;
                    return Err(Error::LostInterrupt {
                        operation: operation.name(),
                        register: seen.register,
                        last: seen.value,
                        interrupt_status: pending.bits(),
                        timeout: self.timeout,
                    });
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    fn interrupt_status(&self) -> Result<InterruptStatus> {
        let value = self.registers()?.field(|r| &r.interrupt_status).read();
        Ok(InterruptStatus::from_bits_retain(value))
    }

    fn acknowledge(&self, bits: InterruptStatus) -> Result<()> {
        self.registers()?
            .field(|r| &r.interrupt_acknowledge)
            .write(bits.bits());
        Ok(())
    }

    /// Clears `bits` left pending on the device and interrupts already delivered, so the next
    /// wait sees only what the next operation raises.
    fn clear_interrupt(&self, bits: InterruptStatus) -> Result<()> {
        self.acknowledge(bits)?;
        self.drain_interrupts()
    }

    fn drain_interrupts(&self) -> Result<()> {
        if let Some(irq) = &self.irq {
            // Taking the count also unmasks INTx, whose line the acknowledge above lowered.
            irq.poll()?;
        }
        Ok(())
    }
}

impl<B: Backend> Drop for Edu<B> {
    fn drop(&mut self) {
        // Stop the device's DMA before the buffer (dropped after this) is unmapped and freed;
        // the unmap alone would also keep it out, this makes it quiet.
        if let Err(error) = self.backend.set_bus_master(false) {
            tracing::warn!(address = self.backend.address(), %error, "disabling edu bus mastering");
        }
        if let Some(irq) = &self.irq {
            if let Err(error) = self.backend.disable_interrupts(irq.mode()) {
                tracing::warn!(address = self.backend.address(), %error, "disabling edu interrupts");
            }
        }
    }
}

/// Refuses a transfer whose device-side range leaves the usable part of the device's buffer
/// (QEMU 7.2's edu would abort the VM: see [`DMA_USABLE_SIZE`]).
fn check_device_range(offset: usize, len: usize) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= DMA_USABLE_SIZE => Ok(()),
        _ => Err(Error::OutOfRange { offset, len }),
    }
}
