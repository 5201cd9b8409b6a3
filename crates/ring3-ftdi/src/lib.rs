//! User-mode driver for FTDI FT232 USB serial adapters, exposed as a pseudo-terminal.
//!
//! ```no_run
//! # fn example<T: ring3_usb::UsbTransport>(transport: T) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::atomic::AtomicBool;
//! use std::os::fd::AsFd;
//! use ring3_ftdi::{serial, Endpoints, Ft232};
//!
//! let port = Ft232::new(transport, Endpoints::default())?;   // reset, 9600 8N1, DTR/RTS on
//! let pty = serial::Pty::open()?;                              // raw mode
//! println!("{}", pty.slave_path().display());                  // /dev/pts/N
//! let stop = AtomicBool::new(false);
//! // Moves bytes both ways until `stop` is set; `stty -F /dev/pts/N 115200` on the
//! // terminal reconfigures the chip.
//! let stats = serial::run_bridge(&port, pty.master(), &stop)?;
//! # let _ = stats; Ok(()) }
//! ```
//!
//! # Concepts
//!
//! - [`Ft232`] drives the chip over any [`ring3_usb::UsbTransport`]: vendor control
//!   requests for the line settings ([`protocol`] has their encoding, including the
//!   baud rate divisor), one bulk OUT endpoint for data to send, one bulk IN endpoint
//!   whose every packet starts with two status bytes, which [`Ft232::read`] strips and
//!   counts.
//! - [`serial`] exposes the chip as a pseudo-terminal: applications open `/dev/pts/N`
//!   (or a stable symlink such as `/run/ring3/ttyUSB-<serial>`) like any serial port;
//!   the bridge copies data between the pty master and the chip and mirrors the
//!   terminal settings applications make (`stty`, `tcsetattr`) to the chip.
//! - [`fake`] is an in-process FT232 model for tests: it decodes the requests it gets,
//!   loops data back or records it, and injects errors and malformed packets.
//!
//! Nothing the device sends is trusted: short packets, replies of the wrong length and
//! error bits are counted or reported, never a panic.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

mod device;
pub mod fake;
pub mod protocol;
pub mod serial;

pub use device::{Endpoints, Ft232, Ft232Stats};
pub use protocol::{
    DataBits, FlowControl, LineSettings, ModemStatus, PacketStatus, Parity, StopBits,
};

use ring3_usb::TransferError;

/// Why an FT232 operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FtdiError {
    /// A vendor control request failed.
    #[error("FT232 request {request} failed: {source}")]
    Control {
        /// The request's name (`SIO_SET_BAUD_RATE`, ...).
        request: &'static str,
        /// What the transport said.
        #[source]
        source: TransferError,
    },
    /// A bulk transfer failed.
    #[error("FT232 bulk {direction} transfer failed: {source}")]
    Bulk {
        /// `IN` or `OUT`.
        direction: &'static str,
        /// What the transport said.
        #[source]
        source: TransferError,
    },
    /// The rate is not within 3 % of any rate the chip can make.
    #[error(
        "the FT232 cannot run at {requested} baud (3 MHz / divisor in eighths, within 3 %); the closest rate it can make is {closest} baud"
    )]
    UnsupportedBaud {
        /// The rate asked for.
        requested: u32,
        /// The closest rate the chip makes.
        closest: u32,
    },
    /// A framing the chip does not have (5 or 6 data bits).
    #[error("the FT232 has no {0} data bits; use 7 or 8")]
    UnsupportedDataBits(u8),
    /// The endpoint is not one of the claimed interface's.
    #[error("endpoint {0:#04x} is not an endpoint of the claimed interface; is this an FT232?")]
    NoEndpoint(u8),
    /// An endpoint's maximum packet size cannot carry the status bytes.
    #[error(
        "endpoint {endpoint:#04x} has a maximum packet size of {size}, too small for an FT232"
    )]
    BadMaxPacket {
        /// The endpoint.
        endpoint: u8,
        /// Its maximum packet size.
        size: usize,
    },
    /// The device answered a request with fewer bytes than it must.
    #[error("the FT232 answered {request} with {got} bytes instead of {expected}")]
    ShortReply {
        /// The request's name.
        request: &'static str,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// Another thread panicked while holding the receive state.
    #[error("a thread reading from the FT232 panicked")]
    Poisoned,
}

impl FtdiError {
    /// Whether the device is gone, so that only reopening it (after it comes back) helps.
    pub fn is_disconnected(&self) -> bool {
        matches!(
            self,
            FtdiError::Control {
                source: TransferError::Disconnected,
                ..
            } | FtdiError::Bulk {
                source: TransferError::Disconnected,
                ..
            }
        )
    }
}

/// `Result` with [`FtdiError`].
pub type Result<T, E = FtdiError> = std::result::Result<T, E>;
