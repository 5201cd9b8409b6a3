//! [`UsbError`]: what went wrong finding, opening or claiming a USB device, and what to do.

use std::io;
use std::path::PathBuf;

use crate::address::UsbAddress;
use crate::descriptor::DescriptorError;

/// What went wrong finding, opening or claiming a USB device. Each message says what to
/// do about it.
#[derive(Debug, thiserror::Error)]
pub enum UsbError {
    /// No device has this address.
    #[error("no USB device matches {address}; `ring3 usb list` shows the USB devices and their addresses")]
    NotFound {
        /// The address asked for.
        address: UsbAddress,
    },
    /// More than one device has these IDs.
    #[error(
        "{} USB devices match {address}: {}; add :SERIAL to the address or name the device by its port path (`ring3 usb list` shows both)",
        candidates.len(), candidates.join(", ")
    )]
    Ambiguous {
        /// The address asked for.
        address: UsbAddress,
        /// Each matching device, as "port path (VID:PID:SERIAL)".
        candidates: Vec<String>,
    },
    /// The usbfs node may not be opened by this user.
    #[error("cannot open {}: permission denied; run as root, or under ring3d, which hands drivers the open device", path.display())]
    PermissionDenied {
        /// The usbfs node.
        path: PathBuf,
        /// The error from open.
        #[source]
        source: io::Error,
    },
    /// A kernel driver has the interface and `force` was not given.
    #[error("interface {interface} is bound to the kernel driver {driver}; pass --force to detach it (it is re-attached when ring3 lets the interface go)")]
    KernelDriverBound {
        /// The interface number.
        interface: u8,
        /// The kernel driver's name (`usb-storage`, `ftdi_sio`, ...).
        driver: String,
    },
    /// Another process (or another handle in this one) has claimed the interface.
    #[error("interface {interface} is claimed by another process (through usbfs); stop that process first (is ring3d driving this device?)")]
    Busy {
        /// The interface number.
        interface: u8,
    },
    /// The device has no interface by that number in its active configuration.
    #[error("the device has no interface {interface}{}", if available.is_empty() { String::new() } else { format!(" (it has {})", available) })]
    NoSuchInterface {
        /// The interface number asked for.
        interface: u8,
        /// The interface numbers it has, comma separated.
        available: String,
    },
    /// No interface of the active configuration has this class.
    #[error("the device has no interface of class {class:02x}, subclass {subclass:02x}, protocol {protocol:02x}")]
    NoInterfaceOfClass {
        /// `bInterfaceClass` asked for.
        class: u8,
        /// `bInterfaceSubClass` asked for.
        subclass: u8,
        /// `bInterfaceProtocol` asked for.
        protocol: u8,
    },
    /// The interface lacks a bulk IN or OUT endpoint.
    #[error("interface {interface} has no bulk {direction} endpoint")]
    NoBulkEndpoint {
        /// The interface number.
        interface: u8,
        /// "IN" or "OUT".
        direction: &'static str,
    },
    /// The device is not in a configured state (or its active configuration is missing).
    #[error("the device is not configured (no active configuration); replug it or check `dmesg`")]
    NotConfigured,
    /// The device is gone: unplugged, reset away, or its usbfs node revoked.
    #[error("the USB device was disconnected")]
    Disconnected,
    /// The device's descriptors are malformed.
    #[error("the device's descriptors are malformed")]
    Descriptor(#[from] DescriptorError),
    /// A system call on a file failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done ("opening", "reading").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// nusb reported an error.
    #[error("{what}")]
    Nusb {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: nusb::Error,
    },
}

impl UsbError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        UsbError::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// Whether the device is gone (so waiting for it to come back is the only remedy).
    pub fn is_disconnected(&self) -> bool {
        match self {
            UsbError::Disconnected => true,
            UsbError::Nusb { source, .. } => source.kind() == nusb::ErrorKind::Disconnected,
            UsbError::Io { source, .. } => {
                source.raw_os_error() == Some(rustix::io::Errno::NODEV.raw_os_error())
            }
            _ => false,
        }
    }
}

/// The result of fallible calls in this crate.
pub type Result<T, E = UsbError> = std::result::Result<T, E>;
