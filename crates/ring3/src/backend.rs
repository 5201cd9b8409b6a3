//! The backend trait: everything a driver needs from the platform.
//!
//! Drivers are generic over [`Backend`], so one driver runs over VFIO on a real machine
//! ([`crate::vfio::VfioBackend`]) and over an in-process device model in unit tests
//! ([`crate::fake::FakeBackend`]).

use std::sync::Arc;

use crate::dma::{DmaBuffer, DmaSpace};
use crate::error::{Error, Result};
use crate::irq::{Interrupt, IrqMode};
use crate::mmio::Bar;

/// PCI configuration-space offsets used by the generic helpers (PCI Local Bus 3.0, 6.1).
pub mod config {
    /// Vendor ID (16 bits).
    pub const VENDOR_ID: u16 = 0x00;
    /// Device ID (16 bits).
    pub const DEVICE_ID: u16 = 0x02;
    /// Command register (16 bits).
    pub const COMMAND: u16 = 0x04;
    /// Status register (16 bits).
    pub const STATUS: u16 = 0x06;
    /// Revision ID (8 bits).
    pub const REVISION_ID: u16 = 0x08;
    /// Class code (24 bits at 0x09).
    pub const CLASS_CODE: u16 = 0x09;
    /// Capabilities pointer (8 bits).
    pub const CAPABILITIES_POINTER: u16 = 0x34;

    bitflags::bitflags! {
        /// The command register's bits.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct Command: u16 {
            /// Responds to I/O space accesses.
            const IO_SPACE = 1 << 0;
            /// Responds to memory space accesses.
            const MEMORY_SPACE = 1 << 1;
            /// May issue DMA.
            const BUS_MASTER = 1 << 2;
            /// INTx assertion disabled.
            const INTX_DISABLE = 1 << 10;
        }
    }
}

/// What a driver needs from the platform to run a PCI device.
pub trait Backend: Send + Sync + 'static {
    /// The device's PCI address (or a fake's name), for messages.
    fn address(&self) -> &str;

    /// Reads configuration space at `offset`.
    fn config_read(&self, offset: u16, buf: &mut [u8]) -> Result<()>;

    /// Writes configuration space at `offset`.
    fn config_write(&self, offset: u16, data: &[u8]) -> Result<()>;

    /// Memory BAR `index` (0–5), mapped for register access.
    fn bar(&self, index: u8) -> Result<Bar>;

    /// The device's DMA address space.
    fn dma_space(&self) -> &Arc<DmaSpace>;

    /// Enables `count` vectors of `mode` interrupts, each delivered to its own eventfd.
    fn enable_interrupts(&self, mode: IrqMode, count: u32) -> Result<Vec<Interrupt>>;

    /// Disables interrupts of `mode`.
    fn disable_interrupts(&self, mode: IrqMode) -> Result<()>;

    /// How many vectors of `mode` the device offers (0 if none).
    fn interrupt_count(&self, mode: IrqMode) -> Result<u32>;

    /// Resets the device (function-level reset where it has one).
    fn reset(&self) -> Result<()>;

    /// A zeroed DMA buffer of at least `size` bytes, mapped for the device.
    fn dma_alloc(&self, size: usize) -> Result<DmaBuffer> {
        self.dma_space().alloc(size)
    }

    /// Limits DMA addresses to what the device can generate.
    fn set_dma_mask(&self, bits: u8) {
        self.dma_space().set_mask(bits);
    }

    /// Reads a 16-bit configuration register.
    fn config_read_u16(&self, offset: u16) -> Result<u16> {
        let mut buf = [0; 2];
        self.config_read(offset, &mut buf)?;
        Ok(u16::from_le_bytes(buf))
    }

    /// Reads a 32-bit configuration register.
    fn config_read_u32(&self, offset: u16) -> Result<u32> {
        let mut buf = [0; 4];
        self.config_read(offset, &mut buf)?;
        Ok(u32::from_le_bytes(buf))
    }

    /// Writes a 16-bit configuration register.
    fn config_write_u16(&self, offset: u16, value: u16) -> Result<()> {
        self.config_write(offset, &value.to_le_bytes())
    }

    /// Vendor and device ID from configuration space.
    fn ids(&self) -> Result<(u16, u16)> {
        Ok((
            self.config_read_u16(config::VENDOR_ID)?,
            self.config_read_u16(config::DEVICE_ID)?,
        ))
    }

    /// Turns memory decoding and bus mastering (DMA) on or off.
    fn set_bus_master(&self, enable: bool) -> Result<()> {
        let mut command = config::Command::from_bits_retain(self.config_read_u16(config::COMMAND)?);
        command.set(config::Command::MEMORY_SPACE, true);
        command.set(config::Command::BUS_MASTER, enable);
        self.config_write_u16(config::COMMAND, command.bits())
    }

    /// Finds a standard capability by ID in the capability list (PCI 3.0, 6.7).
    fn find_capability(&self, id: u8) -> Result<Option<u16>> {
        let status = self.config_read_u16(config::STATUS)?;
        if status & (1 << 4) == 0 {
            return Ok(None);
        }
        let mut buf = [0u8; 2];
        self.config_read(config::CAPABILITIES_POINTER, &mut buf[..1])?;
        let mut pointer = u16::from(buf[0] & !3);
        // 48 capabilities fit in the 192 bytes after the header; more means a loop.
        for _ in 0..48 {
            if pointer == 0 {
                return Ok(None);
            }
            self.config_read(pointer, &mut buf)?;
            if buf[0] == id {
                return Ok(Some(pointer));
            }
            pointer = u16::from(buf[1] & !3);
        }
        Err(Error::BadDeviceValue {
            what: format!("{}: capability list does not end", self.address()),
            value: u64::from(pointer),
        })
    }
}
