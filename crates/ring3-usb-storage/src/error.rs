//! The driver's error type.

use std::time::Duration;

use ring3::ErrorKind;
use ring3_usb::TransferError;

use crate::scsi::Sense;

/// Result with the driver's [`StorageError`].
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Everything the mass-storage driver can fail with.
///
/// Errors that come from the device's side of the Bulk-Only protocol (a corrupt status
/// wrapper, a phase error, a timeout) have already been followed by a Reset Recovery
/// when they are returned, so the next command starts from a clean state;
/// [`StorageError::ResetFailed`] says when even that did not work.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The device went away (unplugged, reset, or its usbfs node revoked).
    #[error("the USB device was disconnected during {command}")]
    Disconnected { command: &'static str },

    /// A USB transfer failed in a way the Bulk-Only Transport has no recovery for.
    #[error("{command}: {phase} failed")]
    Transfer {
        command: &'static str,
        phase: &'static str,
        #[source]
        source: TransferError,
    },

    /// A transfer did not complete in time; the device was reset (Reset Recovery).
    #[error(
        "{command}: the device did not complete the {phase} within {timeout:?} \
         (the interface was reset)"
    )]
    Timeout {
        command: &'static str,
        phase: &'static str,
        timeout: Duration,
    },

    /// The device answered with a status wrapper that is not valid or not meaningful
    /// (BOT §6.3); the device was reset (Reset Recovery).
    #[error(
        "{command}: the device's status wrapper is not valid: {reason} (the interface was reset)"
    )]
    InvalidStatus {
        command: &'static str,
        reason: String,
    },

    /// The device reported a phase error (CSW status 2); the device was reset.
    #[error("{command}: the device reported a phase error (the interface was reset)")]
    PhaseError { command: &'static str },

    /// Reset Recovery itself failed: the device is out of step with the driver and the
    /// interface needs a USB port reset or a re-plug.
    #[error("{command}: reset recovery after {cause} failed: {step} failed")]
    ResetFailed {
        command: &'static str,
        cause: String,
        step: &'static str,
        #[source]
        source: TransferError,
    },

    /// The command ended with CHECK CONDITION; the sense data says why.
    #[error("{command} failed: {sense}")]
    CommandFailed { command: &'static str, sense: Sense },

    /// The command ended with CHECK CONDITION and the sense data could not be fetched.
    #[error("{command} failed (CHECK CONDITION), and REQUEST SENSE failed too: {sense_error}")]
    CommandFailedNoSense {
        command: &'static str,
        sense_error: Box<StorageError>,
    },

    /// The device moved less data than the command needed.
    #[error(
        "{command}: the device transferred {actual} of {expected} bytes (it reported a residue of {residue})"
    )]
    ShortTransfer {
        command: &'static str,
        expected: usize,
        actual: usize,
        residue: u32,
    },

    /// The device answered with data that breaks the SCSI or Bulk-Only specification.
    #[error("{command}: the device's answer is not valid: {what}")]
    BadResponse { command: &'static str, what: String },

    /// The unit did not become ready within the time allowed.
    #[error("the device did not become ready within {waited:?}{}", match last_sense {
        Some(sense) => format!(": {sense}"),
        None => String::new(),
    })]
    NotReady {
        waited: Duration,
        last_sense: Option<Sense>,
    },

    /// The logical unit is not a block device (disk, flash drive, card reader).
    #[error(
        "logical unit {lun} is not a direct-access block device \
         (peripheral qualifier {qualifier}, device type {device_type:#04x})"
    )]
    NotBlockDevice {
        lun: u8,
        qualifier: u8,
        device_type: u8,
    },

    /// The logical unit does not exist on this device.
    #[error("logical unit {lun} does not exist: the device has LUNs 0 to {max_lun}")]
    NoSuchLun { lun: u8, max_lun: u8 },

    /// A request reaches past the end of the device.
    #[error(
        "blocks {lba}..{} are outside the device: it has {block_count} blocks (LBA 0 to {})",
        u128::from(*lba) + u128::from(*blocks),
        block_count.saturating_sub(1)
    )]
    OutOfRange {
        lba: u64,
        blocks: u64,
        block_count: u64,
    },

    /// An argument was not valid (a length that is not a multiple of the block size, ...).
    #[error("{what}")]
    InvalidArgument { what: String },
}

impl StorageError {
    /// What a caller can do about this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StorageError::OutOfRange { .. }
            | StorageError::InvalidArgument { .. }
            | StorageError::NoSuchLun { .. }
            | StorageError::NotBlockDevice { .. } => ErrorKind::InvalidInput,
            StorageError::CommandFailed { sense, .. } => sense.error_kind(),
            StorageError::Transfer {
                source: TransferError::Other(_),
                ..
            } => ErrorKind::Os,
            StorageError::Disconnected { .. }
            | StorageError::Transfer { .. }
            | StorageError::Timeout { .. }
            | StorageError::InvalidStatus { .. }
            | StorageError::PhaseError { .. }
            | StorageError::ResetFailed { .. }
            | StorageError::CommandFailedNoSense { .. }
            | StorageError::ShortTransfer { .. }
            | StorageError::BadResponse { .. }
            | StorageError::NotReady { .. } => ErrorKind::Device,
        }
    }

    /// The sense data, when the device failed the command with CHECK CONDITION.
    pub fn sense(&self) -> Option<&Sense> {
        match self {
            StorageError::CommandFailed { sense, .. } => Some(sense),
            StorageError::NotReady { last_sense, .. } => last_sense.as_ref(),
            _ => None,
        }
    }

    /// Whether this handle is beyond use: the device is gone, or Reset Recovery failed so
    /// the driver and the device are out of step. Only reopening the device (after a USB
    /// port reset or a re-plug) can go on. Other errors, including timeouts and protocol
    /// errors after a successful Reset Recovery, leave the handle usable.
    pub fn needs_restart(&self) -> bool {
        matches!(
            self,
            StorageError::Disconnected { .. } | StorageError::ResetFailed { .. }
        )
    }

    /// Whether the device is gone, so that retrying on this handle cannot help.
    pub fn is_disconnected(&self) -> bool {
        matches!(
            self,
            StorageError::Disconnected { .. }
                | StorageError::ResetFailed {
                    source: TransferError::Disconnected,
                    ..
                }
        )
    }
}
