//! edu's registers and constants, as QEMU's `docs/specs/edu.rst` describes them.
//!
//! Every register below 0x80 is 32 bits wide and must be accessed with 32-bit loads and
//! stores; the DMA registers from 0x80 are 64 bits wide (edu.rst, "MMIO area spec"). The
//! device ignores accesses of other sizes.

use std::mem::offset_of;

use ring3::mmio::{ReadOnly, ReadWrite, RegisterBlock, WriteOnly};

/// PCI vendor ID of QEMU's emulated devices (edu.rst, "PCI specs": `1234:11e8`).
pub const VENDOR_ID: u16 = 0x1234;
/// PCI device ID of edu.
pub const DEVICE_ID: u16 = 0x11e8;

/// Size of BAR0, edu's only region (edu.rst, "PCI specs": "PCI Region 0 ... 1 MB in size").
pub const BAR0_SIZE: usize = 1 << 20;

/// The low byte of the identification register (edu.rst, "MMIO area spec", 0x00: `0xRRrr00ed`).
pub const IDENTIFICATION_MAGIC: u8 = 0xed;

/// Where the device's own DMA buffer sits in the device-side address space of a transfer
/// (edu.rst, "DMA controller": one 4096-byte buffer at offset 0x40000).
pub const DMA_BUFFER_ADDRESS: u64 = 0x4_0000;
/// Size of the device's DMA buffer in bytes.
pub const DMA_BUFFER_SIZE: usize = 4096;
/// How much of the device's buffer a transfer may cover: `offset + len` must not exceed
/// this, and `len` must not be 0.
///
/// QEMU up to 7.2 (the lab's) aborts the whole VM (`hw_error` in `edu_check_range`) for a
/// transfer outside the buffer, and its check is off by one: it wants the end of the
/// transfer *strictly* below the end of the buffer, so a transfer that includes the last
/// byte (offset + len = 4096) aborts too, as does an empty one. Later QEMUs fixed the check
/// and merely log; staying within these limits is safe on all of them.
pub const DMA_USABLE_SIZE: usize = DMA_BUFFER_SIZE - 1;
/// Bits of host (RAM-side) address the device generates: it masks DMA addresses to 28 bits
/// unless QEMU's `dma_mask` property says otherwise (edu.rst, "Command line switches").
pub const DMA_MASK_BITS: u8 = 28;

/// edu's register block at the start of BAR0 (edu.rst, "MMIO area spec").
#[repr(C)]
#[derive(bytemuck::Zeroable)]
pub struct EduRegisters {
    /// 0x00 RO: `0xRRrr00ed`, major version `RR`, minor version `rr`.
    pub identification: ReadOnly<u32>,
    /// 0x04 RW: card liveness check; reads back the bitwise NOT of the value written.
    pub liveness: ReadWrite<u32>,
    /// 0x08 RW: factorial; a write starts computing n! (ignored while computing), a read
    /// gives the result once [`Status::COMPUTING`] is clear. The result wraps at 32 bits.
    pub factorial: ReadWrite<u32>,
    _reserved_0c: [u32; 5],
    /// 0x20 RW: [`Status`]; only [`Status::RAISE_ON_FACTORIAL`] is writable.
    pub status: ReadWrite<u32>,
    /// 0x24 RO: [`InterruptStatus`], why the interrupt is raised.
    pub interrupt_status: ReadOnly<u32>,
    _reserved_28: [u32; 14],
    /// 0x60 WO: interrupt raise; sets the written bits in the interrupt status and raises
    /// the interrupt.
    pub interrupt_raise: WriteOnly<u32>,
    /// 0x64 WO: interrupt acknowledge; clears the written bits in the interrupt status
    /// (INTx is lowered once the status is 0).
    pub interrupt_acknowledge: WriteOnly<u32>,
    _reserved_68: [u32; 6],
    /// 0x80 RW: DMA source address (RAM address, or the buffer's device address).
    /// Writes are ignored while a transfer runs.
    pub dma_source: ReadWrite<u64>,
    /// 0x88 RW: DMA destination address. Writes are ignored while a transfer runs.
    pub dma_destination: ReadWrite<u64>,
    /// 0x90 RW: DMA transfer count in bytes. Writes are ignored while a transfer runs.
    pub dma_count: ReadWrite<u64>,
    /// 0x98 RW: [`DmaCommand`]; writing one with [`DmaCommand::START`] starts a transfer.
    pub dma_command: ReadWrite<u64>,
}

// SAFETY: EduRegisters is repr(C) and made only of register fields and integer padding arrays.
unsafe impl RegisterBlock for EduRegisters {}

const _: () = assert!(offset_of!(EduRegisters, identification) == 0x00);
const _: () = assert!(offset_of!(EduRegisters, liveness) == 0x04);
const _: () = assert!(offset_of!(EduRegisters, factorial) == 0x08);
const _: () = assert!(offset_of!(EduRegisters, status) == 0x20);
const _: () = assert!(offset_of!(EduRegisters, interrupt_status) == 0x24);
const _: () = assert!(offset_of!(EduRegisters, interrupt_raise) == 0x60);
const _: () = assert!(offset_of!(EduRegisters, interrupt_acknowledge) == 0x64);
const _: () = assert!(offset_of!(EduRegisters, dma_source) == 0x80);
const _: () = assert!(offset_of!(EduRegisters, dma_destination) == 0x88);
const _: () = assert!(offset_of!(EduRegisters, dma_count) == 0x90);
const _: () = assert!(offset_of!(EduRegisters, dma_command) == 0x98);
const _: () = assert!(std::mem::size_of::<EduRegisters>() == 0xa0);

bitflags::bitflags! {
    /// The status register, 0x20 (edu.rst, "MMIO area spec").
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Status: u32 {
        /// 0x01 (RO): the device is computing a factorial.
        const COMPUTING = 0x01;
        /// 0x80 (RW): raise interrupt [`InterruptStatus::FACTORIAL`] when the factorial is done.
        const RAISE_ON_FACTORIAL = 0x80;
    }

    /// Interrupt status (0x24), raise (0x60) and acknowledge (0x64) bits.
    ///
    /// The register is a plain 32-bit bitmap: the device sets the two named bits itself, and
    /// software may raise any bit through 0x60.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct InterruptStatus: u32 {
        /// 0x001: a factorial finished (QEMU `hw/misc/edu.c`, `FACT_IRQ`).
        const FACTORIAL = 0x0000_0001;
        /// 0x100: a DMA transfer finished (edu.rst, DMA command bit 0x04).
        const DMA = 0x0000_0100;
        /// Not used by the device: the bit the driver's interrupt self-test raises by hand.
        const SELF_TEST = 0x0001_0000;
        const _ = !0;
    }

    /// The DMA command register, 0x98 (edu.rst, "MMIO area spec" and "DMA controller").
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct DmaCommand: u64 {
        /// Start the transfer; stays set until the transfer is done.
        const START = 0x1;
        /// Direction: set for device buffer → RAM, clear for RAM → device buffer.
        const DEVICE_TO_RAM = 0x2;
        /// Raise interrupt [`InterruptStatus::DMA`] when the transfer is done.
        const RAISE_ON_COMPLETION = 0x4;
    }
}
