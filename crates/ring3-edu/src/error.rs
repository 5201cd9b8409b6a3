//! The driver's error type: ring3's errors plus what can go wrong with an edu device.

use std::time::Duration;

use ring3::ErrorKind;

use crate::registers::{DEVICE_ID, DMA_MASK_BITS, DMA_USABLE_SIZE, VENDOR_ID};

/// Result with the driver's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the edu driver can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The platform failed (VFIO, DMA mapping, interrupts, ...).
    #[error(transparent)]
    Core(#[from] ring3::Error),

    /// The device at the address is not an edu device.
    #[error(
        "{address} is {vendor_id:04x}:{device_id:04x}, not QEMU's edu device \
         ({VENDOR_ID:04x}:{DEVICE_ID:04x}): check the address with `ring3 list`"
    )]
    WrongDevice {
        address: String,
        vendor_id: u16,
        device_id: u16,
    },

    /// BAR0 is smaller than edu's.
    #[error("{address}: BAR0 is {len:#x} bytes, edu's is {expected:#x}")]
    BarTooSmall {
        address: String,
        len: usize,
        expected: usize,
    },

    /// The identification register does not end in edu's 0xed.
    #[error("identification register reads {value:#010x}, expected 0xRRrr00ed")]
    BadIdentification { value: u32 },

    /// The liveness register did not answer with the inverse of what was written.
    #[error(
        "liveness check failed: wrote {wrote:#010x}, expected {expected:#010x}, read {read:#010x}"
    )]
    LivenessMismatch {
        wrote: u32,
        expected: u32,
        read: u32,
    },

    /// A DMA range outside the part of the device's buffer a transfer may cover
    /// ([`DMA_USABLE_SIZE`](crate::registers::DMA_USABLE_SIZE) bytes); refused before
    /// touching the device, which would abort the VM.
    #[error(
        "DMA of {len:#x} bytes at device offset {offset:#x} does not fit in the first \
         {DMA_USABLE_SIZE} bytes of edu's buffer (QEMU aborts on transfers that reach its last byte)"
    )]
    OutOfRange { offset: usize, len: usize },

    /// A host-side DMA range the device cannot address; refused before touching the device.
    #[error(
        "DMA of {len:#x} bytes at IOVA {iova:#x} reaches past edu's {DMA_MASK_BITS}-bit DMA mask"
    )]
    AboveDmaMask { iova: u64, len: usize },

    /// The device did not finish an operation in time.
    #[error(
        "timed out after {timeout:?} waiting for the {operation}: \
         {register} register ({offset:#x}) last read {last:#x}"
    )]
    Timeout {
        operation: &'static str,
        register: &'static str,
        offset: usize,
        last: u64,
        timeout: Duration,
    },

    /// The device finished an operation but its interrupt never arrived.
    #[error(
        "the {operation} finished ({register} register reads {last:#x}) but its interrupt did \
         not arrive within {timeout:?} (interrupt status {interrupt_status:#x})"
    )]
    LostInterrupt {
        operation: &'static str,
        register: &'static str,
        last: u64,
        interrupt_status: u32,
        timeout: Duration,
    },

    /// The device reported something that breaks its specification.
    #[error("device misbehaved: {what} ({register} register reads {value:#x})")]
    Misbehaved {
        what: String,
        register: &'static str,
        value: u64,
    },
}

impl Error {
    /// What a caller can do about this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Core(error) => error.kind(),
            Error::WrongDevice { .. } | Error::OutOfRange { .. } | Error::AboveDmaMask { .. } => {
                ErrorKind::InvalidInput
            }
            Error::BarTooSmall { .. }
            | Error::BadIdentification { .. }
            | Error::LivenessMismatch { .. }
            | Error::Timeout { .. }
            | Error::LostInterrupt { .. }
            | Error::Misbehaved { .. } => ErrorKind::Device,
        }
    }

    /// Whether resetting the device or restarting its driver may make the operation succeed.
    pub fn restart_may_help(&self) -> bool {
        self.kind() == ErrorKind::Device
    }
}

/// For callers that speak only ring3's error type (the `ring3` command): keeps the message
/// and the [`ErrorKind`].
impl From<Error> for ring3::Error {
    fn from(error: Error) -> Self {
        match error {
            Error::Core(error) => error,
            other => ring3::Error::driver(other.kind(), other),
        }
    }
}
