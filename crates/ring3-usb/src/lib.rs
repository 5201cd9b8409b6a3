//! USB devices for ring3 user-mode drivers.
//!
//! The kernel keeps only its generic USB layer and usbfs (`/dev/bus/usb/BBB/DDD`); every
//! device-specific driver runs in an ordinary process on top of this crate:
//!
//! - [`transport`]: [`UsbTransport`], the small set of USB operations a driver needs
//!   (control and bulk transfers, clearing a halt). Drivers are generic over it, so the
//!   same driver runs over usbfs and over an in-process device model in unit tests.
//! - the usbfs backend over the [nusb](https://docs.rs/nusb) crate: discovery, opening,
//!   claiming (detaching a kernel driver only when asked) and giving interfaces back.

//! - [`address`]: [`UsbAddress`], how users name a device (`3-1.2`, `0403:6001`,
//!   `0403:6001:SERIAL`).
//! - [`sysfs`]: discovery ([`list_devices`], [`find`]) with each interface's kernel driver.
//! - [`device`]: [`UsbDevice`] (an open usbfs node) and [`ClaimedInterface`] (an interface
//!   this process claimed, the [`UsbTransport`] over usbfs).
//! - [`descriptor`]: a parser of device and configuration descriptors that trusts no
//!   length the device sent.
//!
//! ```no_run
//! use std::time::Duration;
//! use ring3_usb::{UsbAddress, UsbDevice, UsbTransport};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let address: UsbAddress = "46f4:0001:R3RAW".parse()?;
//! let device = UsbDevice::open(&address)?;
//! let interface = device.find_interface(0x08, 0x06, 0x50)?; // mass storage, bulk-only
//! let claimed = device.claim(interface, false)?; // refuses if usb-storage has it
//! let endpoints = claimed.bulk_endpoints()?;
//! let mut reply = vec![0u8; 13];
//! let _ = claimed.bulk_in(endpoints.bulk_in, &mut reply, Duration::from_secs(1));
//! # Ok(())
//! # }
//! ```

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod address;
pub mod descriptor;
pub mod device;
pub mod error;
pub mod sysfs;
pub mod transport;
mod usbfs;

pub use address::{AddressError, PortPath, UsbAddress};
pub use device::{BulkEndpoints, ClaimedInterface, NusbTransport, UsbDevice};
pub use error::{Result, UsbError};
pub use sysfs::{find, list_devices, InterfaceSummary, Speed, UsbDeviceSummary};
pub use transport::{ControlRequest, Recipient, RequestType, TransferError, UsbTransport};
