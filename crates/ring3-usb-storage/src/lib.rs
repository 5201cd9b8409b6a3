//! User-mode driver for USB mass storage: the Bulk-Only Transport (BOT 1.0) carrying
//! SCSI block commands (SPC-4 / SBC-3), the protocol of flash drives, card readers and
//! USB disks (interface class 08h, subclass 06h, protocol 50h).
//!
//! ```no_run
//! # fn example<T: ring3_usb::UsbTransport>(transport: T, endpoints: ring3_usb_storage::BulkEndpoints)
//! # -> Result<(), ring3_usb_storage::StorageError> {
//! use ring3_usb_storage::MassStorage;
//!
//! // `transport` is a claimed interface (ring3-usb), `endpoints` its two bulk endpoints.
//! let disk = MassStorage::new(transport, endpoints, 0)?;
//! println!(
//!     "{} {}: {} blocks of {} bytes",
//!     disk.inquiry().vendor,
//!     disk.inquiry().product,
//!     disk.block_count(),
//!     disk.block_size()
//! );
//! let mut first = vec![0; disk.block_size() as usize];
//! disk.read(0, &mut first)?;
//! disk.write(0, &first)?;
//! disk.synchronize_cache()?;
//! # Ok(())
//! # }
//! ```
//!
//! The layers, bottom up:
//!
//! - [`bot`]: Command Block and Command Status Wrappers, and [`bot::BulkOnly`], which runs
//!   one command at a time over a [`ring3_usb::UsbTransport`] with the error recovery of
//!   the BOT specification (clearing stalls, Reset Recovery after a phase error, a corrupt
//!   status or a timeout).
//! - [`scsi`]: command blocks and parsers of INQUIRY, READ CAPACITY and sense data.
//! - [`MassStorage`]: a logical unit as an array of blocks: checked requests, split into
//!   commands of at most [`MassStorage::max_transfer_bytes`], errors that name the
//!   sense key and additional sense code.
//! - [`fake`]: an in-process Bulk-Only device with an in-memory disk and fault injection,
//!   for tests of this crate and of crates built on it.
//!
//! Nothing the device sends is trusted: short or overlong data, a residue that does not
//! match, an absurd capacity or block size are errors, never a panic.

pub mod bot;
mod device;
mod error;
pub mod fake;
pub mod scsi;
#[cfg(test)]
mod tests;

pub use device::{MassStorage, MassStorageOptions, DEFAULT_MAX_TRANSFER_BYTES, MAX_TRANSFER_LIMIT};
pub use error::{Result, StorageError};
pub use ring3_usb::BulkEndpoints;
pub use scsi::{InquiryData, Sense, SenseKey};
