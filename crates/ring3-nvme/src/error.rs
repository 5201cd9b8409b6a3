//! The driver's error type: ring3's errors plus what can go wrong with an NVMe controller.

use std::time::Duration;

use ring3::ErrorKind;

use crate::completion::Status as CompletionStatus;

/// Result with the driver's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the NVMe driver can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The platform failed (VFIO, DMA mapping, register access, ...).
    #[error(transparent)]
    Core(#[from] ring3::Error),

    /// The device at the address is not an NVMe controller.
    #[error(
        "{address} has class code {class_code:06x}, not an NVMe controller (010802): \
         check the address with `ring3 list`"
    )]
    NotNvme { address: String, class_code: u32 },

    /// BAR0 is too small for the registers and the doorbells the driver needs.
    #[error("{address}: BAR0 is {len:#x} bytes, at least {needed:#x} are needed")]
    BarTooSmall {
        address: String,
        len: usize,
        needed: usize,
    },

    /// A doorbell the stride puts outside BAR0.
    #[error(
        "the {} doorbell of queue {queue_id} (stride shift {stride_shift}) lies outside BAR0 \
         ({bar_len:#x} bytes)",
        if *completion { "completion head" } else { "submission tail" }
    )]
    DoorbellOutOfRange {
        queue_id: u16,
        completion: bool,
        stride_shift: u8,
        bar_len: usize,
    },

    /// The controller lacks something this driver needs.
    #[error("the controller does not support {what} ({register} reads {value:#x})")]
    Unsupported {
        what: String,
        register: &'static str,
        value: u64,
    },

    /// A register did not reach the expected state in time.
    #[error(
        "timed out after {timeout:?} waiting for {operation}: \
         {register} register ({offset:#x}) last read {last:#x}"
    )]
    Timeout {
        operation: &'static str,
        register: &'static str,
        offset: usize,
        last: u64,
        timeout: Duration,
    },

    /// CSTS.CFS is set: the controller hit a fatal error and needs a reset.
    #[error("controller fatal status (CSTS.CFS) while {operation}: CSTS reads {csts:#x}")]
    ControllerFatal { operation: &'static str, csts: u32 },

    /// A command did not complete in time.
    #[error(
        "command {command_id} (opcode {opcode:#04x}) on queue {queue_id} did not complete \
         within {timeout:?}"
    )]
    CommandTimeout {
        queue_id: u16,
        command_id: u16,
        opcode: u8,
        timeout: Duration,
    },

    /// The controller completed a command with an error status.
    #[error("command opcode {opcode:#04x} failed: {status}")]
    CommandFailed {
        opcode: u8,
        status: CompletionStatus,
    },

    /// The submission queue has no free slot.
    #[error("submission queue {queue_id} is full ({entries} entries)")]
    QueueFull { queue_id: u16, entries: u16 },

    /// An earlier completion broke the rules, so the queue's state can no longer be trusted.
    #[error("queue {queue_id} is unusable after a misbehaving completion: reset the controller")]
    QueueBroken { queue_id: u16 },

    /// The device wrote or reported something that breaks the specification.
    #[error("device misbehaved: {what} (got {value:#x})")]
    Misbehaved { what: String, value: u64 },

    /// An I/O command completed with an error status.
    #[error("{command} of namespace {nsid} at LBA {lba} ({blocks} blocks) failed: {status}")]
    IoFailed {
        command: &'static str,
        nsid: u32,
        lba: u64,
        blocks: u32,
        status: CompletionStatus,
    },

    /// The controller was reset while the command was in flight, so it did not complete.
    #[error("the controller was reset before the command completed: {reason}")]
    ControllerReset { reason: String },

    /// A reset did not bring the controller back: it is out of service until the driver
    /// starts over.
    #[error("the controller is out of service: {reason}")]
    ControllerFailed { reason: String },

    /// No active namespace has this ID.
    #[error("namespace {nsid} does not exist or is not active (active: {active:?})")]
    NoSuchNamespace { nsid: u32, active: Vec<u32> },

    /// The controller has no I/O queue (or interrupt vector) left for another queue.
    #[error("no {what} left: {used} of {granted} are in use")]
    NoQueueLeft {
        what: &'static str,
        used: usize,
        granted: usize,
    },

    /// An argument was out of range.
    #[error("{what}")]
    InvalidArgument { what: String },
}

impl Error {
    /// What a caller can do about this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Core(error) => error.kind(),
            Error::NotNvme { .. }
            | Error::InvalidArgument { .. }
            | Error::NoSuchNamespace { .. } => ErrorKind::InvalidInput,
            Error::NoQueueLeft { .. } => ErrorKind::Busy,
            Error::IoFailed { status, .. } if !status.is_device_fault() => ErrorKind::InvalidInput,
            Error::Unsupported { .. } => ErrorKind::Environment,
            Error::QueueFull { .. } => ErrorKind::Busy,
            Error::CommandFailed { status, .. } if !status.is_device_fault() => {
                ErrorKind::InvalidInput
            }
            Error::BarTooSmall { .. }
            | Error::DoorbellOutOfRange { .. }
            | Error::Timeout { .. }
            | Error::ControllerFatal { .. }
            | Error::CommandTimeout { .. }
            | Error::CommandFailed { .. }
            | Error::QueueBroken { .. }
            | Error::IoFailed { .. }
            | Error::ControllerReset { .. }
            | Error::ControllerFailed { .. }
            | Error::Misbehaved { .. } => ErrorKind::Device,
        }
    }

    /// Whether resetting the controller or restarting its driver may make the operation succeed.
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
