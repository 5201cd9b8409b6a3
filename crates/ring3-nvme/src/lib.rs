//! A ring3 driver for NVMe controllers (NVM Express Base Specification 2.0, over PCIe).
//!
//! The driver runs in user mode over [`ring3::Backend`]: over VFIO on a real machine (or
//! QEMU's `-device nvme` in the lab), and over [`ring3::fake::FakeBackend`] with the
//! controller model in [`model`] in unit tests:
//!
//! ```
//! use ring3_nvme::{model, Controller, ControllerOptions};
//!
//! # fn main() -> ring3_nvme::Result<()> {
//! let mut nvme = Controller::new(model::fake_nvme("nvme0"), ControllerOptions::default())?;
//! let info = nvme.identify_controller()?;
//! assert_eq!(info.model, "ring3 fake NVMe controller");
//! assert!(nvme.status()?.contains(ring3_nvme::registers::Status::RDY));
//! # Ok(()) }
//! ```
//!
//! Concepts:
//!
//! - **Registers** ([`registers`]): CAP, VS, CC, CSTS, AQA, ASQ, ACQ at the start of BAR0,
//!   then one doorbell per queue and direction from 0x1000, spaced by CAP.DSTRD.
//! - **Queues** ([`queue`]): commands go into a submission ring in host memory, the
//!   controller posts completions into a completion ring; each side tells the other how
//!   far it got through a doorbell (driver → controller) or the completion's SQ head and
//!   phase tag (controller → driver). Queue 0 is the admin queue.
//! - **Commands and completions** ([`command`], [`completion`]): 64-byte submission
//!   entries and 16-byte completion entries. Completions are written by the device, so
//!   they are parsed without trusting any bit and checked against what is in flight.
//! - **Bring-up** ([`Controller::new`]): the order of section 3.5.1, with every wait
//!   bounded by CAP.TO, then Identify Controller ([`identify`]).
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod command;
pub mod completion;
pub mod controller;
pub mod error;
pub mod identify;
pub mod io;
pub mod log;
pub mod model;
pub mod namespace;
pub mod prp;
pub mod queue;
pub mod registers;
#[cfg(test)]
mod tests;

pub use controller::{Controller, ControllerOptions};
pub use error::{Error, Result};
pub use identify::ControllerInfo;
pub use io::{IoCompletion, IoQueue, IoQueueOptions, Rejected, MAX_BLOCKS_PER_COMMAND};
pub use log::{ErrorLogEntry, SmartLog};
pub use namespace::Namespace;
pub use queue::QueuePair;
#[cfg(test)]
mod io_tests;
