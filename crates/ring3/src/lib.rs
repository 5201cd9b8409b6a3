//! ring3: device drivers in user mode.
//!
//! The kernel keeps only its thin, existing shim — VFIO maps a PCI device's BARs and DMA
//! memory into a process, routes its interrupts to eventfds and fences its DMA with the
//! IOMMU — and all driver logic runs in an ordinary process. This crate is the core every
//! ring3 driver builds on, in layers, each using only those above it in this list:
//!
//! - [`sys`]: the system calls, as small typed wrappers;
//! - [`pci`]: finding PCI devices in sysfs, binding them to vfio-pci and back;
//! - [`vfio`]: VFIO container, group and device: regions, BARs, config space, reset, interrupts;
//! - [`dma`]: DMA buffers that map themselves into the IOMMU and unmap on drop;
//! - [`mmio`]: typed register access;
//! - [`irq`]: waiting on interrupts, blocking or async;
//! - [`Backend`]: what a driver needs from the platform, implemented by
//!   [`vfio::VfioBackend`] for real devices and [`fake::FakeBackend`] for unit tests.
//!
//! A driver is generic over [`Backend`]:
//!
//! ```no_run
//! use ring3::{Backend, vfio::VfioBackend};
//!
//! # fn main() -> ring3::Result<()> {
//! let device = VfioBackend::open("0000:00:03.0")?;
//! let (vendor, id) = device.ids()?;
//! let bar = device.bar(0)?;
//! let buffer = device.dma_alloc(4096)?; // mapped in the IOMMU; unmapped on drop
//! println!("{vendor:04x}:{id:04x}, BAR0 {} bytes, buffer at IOVA {:#x}", bar.len(), buffer.iova());
//! # Ok(()) }
//! ```
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod dma;
pub mod error;
pub mod fake;
pub mod irq;
pub mod mmio;
pub mod pci;
pub mod sys;
pub mod vfio;

pub use backend::Backend;
pub use dma::DmaBuffer;
pub use error::{Error, ErrorKind, Result};
pub use irq::{Interrupt, IrqMode};
pub use mmio::Bar;
