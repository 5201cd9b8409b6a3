//! The crate's one error type, and what a caller can do about each error.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a caller can do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The input was wrong (an address, a size, an offset): fix the input.
    InvalidInput,
    /// The system is not set up for this (module missing, no permission, no IOMMU): fix the system.
    Environment,
    /// Someone else holds the device or resource: stop them, or retry later.
    Busy,
    /// The device did something wrong or stopped answering: a reset or driver restart may help.
    Device,
    /// An operating-system call failed unexpectedly.
    Os,
}

/// Every error the ring3 core library returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A string that is not a PCI address.
    #[error("invalid PCI address {input:?}: expected DDDD:BB:DD.F or BB:DD.F in hex, for example 0000:00:03.0")]
    InvalidAddress { input: String },

    /// No device at a well-formed address.
    #[error("no PCI device at {address}: `ring3 list` shows the devices of this machine")]
    NoSuchDevice { address: String },

    /// The device, or a device in its IOMMU group, is in use.
    #[error("{address} is busy: {reason}")]
    Busy { address: String, reason: String },

    /// A kernel module is missing.
    #[error("the {module} kernel module is not loaded: run `modprobe {module}` as root")]
    ModuleMissing { module: &'static str },

    /// The device is not bound to vfio-pci.
    #[error("{address} is bound to {driver}, not vfio-pci: run `ring3 bind {address}` first")]
    NotBoundToVfio { address: String, driver: String },

    /// The system lacks something the operation needs (IOMMU, permission, ...).
    #[error("{what}: {fix}")]
    Unavailable { what: String, fix: String },

    /// An OS call on a path failed with permission denied.
    #[error("permission denied: {path}: run as root, or give your user access to it (for VFIO: `chown $USER /dev/vfio/<group>`)")]
    PermissionDenied {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A system file (sysfs, procfs, ring3's own state) did not contain what it should.
    #[error("unexpected contents in {}: {found:?}, expected {expected}", path.display())]
    MalformedFile {
        path: PathBuf,
        found: String,
        expected: &'static str,
    },

    /// An OS call failed.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },

    /// A wait on hardware did not end in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },

    /// The device wrote or reported a value that breaks the rules.
    #[error("device misbehaved: {what} (got {value:#x})")]
    BadDeviceValue { what: String, value: u64 },

    /// The kernel answered a VFIO request with data that breaks the ABI's rules.
    #[error("unexpected reply from the kernel: {what} {value:#x}")]
    BadKernelValue { what: String, value: u64 },

    /// An argument was out of the range the operation accepts.
    #[error("{what}")]
    InvalidArgument { what: String },

    /// An access fell outside a region (BAR, DMA buffer, config space).
    #[error("access of {size} bytes at {offset:#x} is outside {region} ({len:#x} bytes)")]
    OutOfBounds {
        region: String,
        offset: u64,
        size: u64,
        len: u64,
    },

    /// No IOVA range is free for an allocation under the device's DMA mask.
    #[error("no free DMA address space for {size:#x} bytes below the {mask_bits}-bit DMA mask")]
    IovaExhausted { size: u64, mask_bits: u8 },

    /// The device lacks a feature the operation needs.
    #[error("{address}: {what} is not supported by this device")]
    Unsupported { address: String, what: String },

    /// An error of a driver built on ring3, carried with what a caller can do about it.
    #[error(transparent)]
    Driver(DriverError),

    /// A device access that an IOMMU refused (reported by the fake backend).
    #[error("DMA fault: the device accessed IOVA {iova:#x} ({len} bytes), which is not mapped")]
    DmaFault { iova: u64, len: u64 },
}

impl Error {
    /// A driver's own error, for callers that speak only this crate's error type; keeps the
    /// driver error's message, causes and kind.
    pub fn driver(kind: ErrorKind, error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Driver(DriverError {
            kind,
            error: Box::new(error),
        })
    }

    /// What a caller can do about this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidAddress { .. }
            | Error::NoSuchDevice { .. }
            | Error::InvalidArgument { .. }
            | Error::OutOfBounds { .. } => ErrorKind::InvalidInput,
            Error::ModuleMissing { .. }
            | Error::NotBoundToVfio { .. }
            | Error::Unavailable { .. }
            | Error::PermissionDenied { .. }
            | Error::MalformedFile { .. }
            | Error::Unsupported { .. } => ErrorKind::Environment,
            Error::Busy { .. } | Error::IovaExhausted { .. } => ErrorKind::Busy,
            Error::Timeout { .. } | Error::BadDeviceValue { .. } | Error::DmaFault { .. } => {
                ErrorKind::Device
            }
            Error::Io { .. } | Error::BadKernelValue { .. } => ErrorKind::Os,
            Error::Driver(error) => error.kind,
        }
    }

    /// Whether resetting the device or restarting its driver may make the operation succeed.
    pub fn restart_may_help(&self) -> bool {
        self.kind() == ErrorKind::Device
    }

    /// An [`Error::Io`] with a description of what was being done.
    pub fn io(what: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Error::Io {
            what: what.into(),
            source: source.into(),
        }
    }

    /// An OS error on a path, turned into [`Error::PermissionDenied`] when that is what it was.
    pub fn path(what: &str, path: impl Into<PathBuf>, source: impl Into<io::Error>) -> Self {
        let path = path.into();
        let source = source.into();
        if source.kind() == io::ErrorKind::PermissionDenied {
            Error::PermissionDenied { path, source }
        } else {
            Error::Io {
                what: format!("{what} {}", path.display()),
                source,
            }
        }
    }
}

/// A driver crate's error inside [`Error::Driver`]: shows as the driver's error itself.
#[derive(Debug)]
pub struct DriverError {
    kind: ErrorKind,
    error: Box<dyn std::error::Error + Send + Sync>,
}

impl std::fmt::Display for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for DriverError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}
