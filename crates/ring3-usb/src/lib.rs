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

pub mod transport;

pub use transport::{ControlRequest, Recipient, RequestType, TransferError, UsbTransport};
