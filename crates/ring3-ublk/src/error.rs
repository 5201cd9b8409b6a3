//! The crate's error type: what can go wrong talking to ublk_drv, and what to do about it.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a caller can do about an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The input was wrong (a size, a tag, a buffer's state): fix the caller.
    InvalidInput,
    /// The system is not set up for this (module missing, no permission): fix the system.
    Environment,
    /// Someone else holds the device, or it is not in the state the command needs yet:
    /// retry later or stop the other user.
    Busy,
    /// The kernel refused or broke off the device, or handed over something impossible:
    /// delete and re-add the device, or restart the server.
    Device,
    /// An operating-system call failed unexpectedly.
    Os,
}

/// Everything this crate can fail with. The variants' fields are named for what they
/// hold; `source` is the OS error.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/ublk-control` does not exist.
    #[error("{path} does not exist: the ublk_drv kernel module is not loaded, run `modprobe ublk_drv` as root")]
    ModuleNotLoaded { path: PathBuf },

    /// The caller may not open a ublk node or send a control command.
    #[error("{what}: permission denied; ublk control commands need root (CAP_SYS_ADMIN), run this in ring3d or as root")]
    PermissionDenied {
        what: String,
        #[source]
        source: io::Error,
    },

    /// Opening a device node failed for another reason.
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Setting up or entering an io_uring failed.
    #[error("io_uring {operation} failed (io_uring needs Linux 5.19 or later and must not be disabled by sysctl kernel.io_uring_disabled or seccomp)")]
    Ring {
        operation: &'static str,
        #[source]
        source: io::Error,
    },

    /// A device or queue description the kernel would reject, caught before asking it.
    #[error("invalid {what}: {value} ({rule})")]
    InvalidSpec {
        what: &'static str,
        value: u64,
        rule: &'static str,
    },

    /// The device ID names no ublk device.
    #[error("ublk device {id} does not exist: list them with `ls /sys/class/ublk-char`")]
    NoSuchDevice { id: u32 },

    /// A control command failed.
    #[error("ublk {command} of device {id} failed")]
    Command {
        command: &'static str,
        id: u32,
        #[source]
        source: io::Error,
    },

    /// A control command did not complete in time and was cancelled.
    #[error("ublk {command} of device {id} did not complete within {timeout:?}: {hint}")]
    CommandTimeout {
        command: &'static str,
        id: u32,
        timeout: Duration,
        hint: &'static str,
    },

    /// START_USER_RECOVERY stayed busy: the old server is still around.
    #[error(
        "device {id} did not become recoverable within {timeout:?} (state {state}): every \
         copy of /dev/ublkc{id} must be closed (the old server gone, and no one else holding \
         the descriptor) and the device quiesced"
    )]
    RecoveryBusy {
        id: u32,
        timeout: Duration,
        state: String,
    },

    /// The device's char node did not appear.
    #[error("{path} did not appear within {timeout:?}: is udev/devtmpfs running, and was the device added?")]
    CharDeviceTimeout { path: PathBuf, timeout: Duration },

    /// Mapping the I/O descriptors of a queue failed.
    #[error("cannot map the I/O descriptors of queue {queue_id} from the ublk char device: the queue ID or depth does not match the device, or another process serves it")]
    Map {
        queue_id: u16,
        #[source]
        source: io::Error,
    },

    /// A tag outside the queue.
    #[error("tag {tag} is out of range for queue {queue_id} of depth {depth}")]
    TagOutOfRange { queue_id: u16, tag: u16, depth: u16 },

    /// A fetch or complete for a tag that is not in the state it needs.
    #[error("cannot {operation} tag {tag} of queue {queue_id}: it is {state}")]
    TagState {
        queue_id: u16,
        tag: u16,
        operation: &'static str,
        state: &'static str,
    },

    /// Queue commands were submitted from another thread than the first ones.
    #[error("queue {queue_id} is served by another thread: ublk_drv accepts a queue's commands only from the thread that fetched first; keep each Queue on one thread")]
    WrongThread { queue_id: u16 },

    /// The kernel failed an I/O command of a tag.
    #[error("ublk I/O command for tag {tag} of queue {queue_id} failed")]
    IoCommand {
        queue_id: u16,
        tag: u16,
        #[source]
        source: io::Error,
    },

    /// The kernel handed over something this crate cannot make sense of.
    #[error("ublk_drv handed over an invalid {what} (value {value:#x}) on queue {queue_id}: restart the server")]
    Misbehaved {
        queue_id: u16,
        what: &'static str,
        value: u64,
    },
}

impl Error {
    /// What the caller can do about this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::ModuleNotLoaded { .. } | Error::PermissionDenied { .. } => {
                ErrorKind::Environment
            }
            Error::Open { source, .. } if source.raw_os_error() == Some(libc::EBUSY) => {
                ErrorKind::Busy
            }
            Error::Open { .. } | Error::Ring { .. } | Error::Map { .. } => ErrorKind::Os,
            Error::InvalidSpec { .. }
            | Error::TagOutOfRange { .. }
            | Error::TagState { .. }
            | Error::WrongThread { .. }
            | Error::NoSuchDevice { .. } => ErrorKind::InvalidInput,
            Error::Command { source, .. } => match source.raw_os_error() {
                Some(libc::EBUSY) | Some(libc::EAGAIN) | Some(libc::EINTR) => ErrorKind::Busy,
                Some(libc::EINVAL) => ErrorKind::InvalidInput,
                _ => ErrorKind::Device,
            },
            Error::CommandTimeout { .. }
            | Error::RecoveryBusy { .. }
            | Error::CharDeviceTimeout { .. } => ErrorKind::Busy,
            Error::IoCommand { .. } | Error::Misbehaved { .. } => ErrorKind::Device,
        }
    }

    /// Maps the errno of a failed control command to the error that says what to do.
    pub(crate) fn from_command(command: &'static str, id: u32, errno: i32) -> Error {
        let source = io::Error::from_raw_os_error(errno);
        match errno {
            libc::EPERM | libc::EACCES => Error::PermissionDenied {
                what: format!("ublk {command} of device {id}"),
                source,
            },
            libc::ENODEV => Error::NoSuchDevice { id },
            _ => Error::Command {
                command,
                id,
                source,
            },
        }
    }

    /// Maps a failed `open` of a ublk node.
    pub(crate) fn from_open(path: PathBuf, source: io::Error) -> Error {
        match source.raw_os_error() {
            Some(libc::ENOENT) if path.as_os_str() == crate::control::CONTROL_PATH => {
                Error::ModuleNotLoaded { path }
            }
            Some(libc::EPERM) | Some(libc::EACCES) => Error::PermissionDenied {
                what: format!("opening {}", path.display()),
                source,
            },
            _ => Error::Open { path, source },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_control_node_says_modprobe() {
        let error = Error::from_open(
            PathBuf::from(crate::control::CONTROL_PATH),
            io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert!(matches!(error, Error::ModuleNotLoaded { .. }));
        assert!(error.to_string().contains("modprobe ublk_drv"));
        assert_eq!(error.kind(), ErrorKind::Environment);
    }

    #[test]
    fn missing_char_node_is_a_plain_open_error() {
        let error = Error::from_open(
            PathBuf::from("/dev/ublkc3"),
            io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert!(matches!(error, Error::Open { .. }));
    }

    #[test]
    fn permission_errors_say_root() {
        for errno in [libc::EPERM, libc::EACCES] {
            let error = Error::from_open(
                PathBuf::from(crate::control::CONTROL_PATH),
                io::Error::from_raw_os_error(errno),
            );
            assert!(error.to_string().contains("CAP_SYS_ADMIN"), "{error}");
            assert_eq!(error.kind(), ErrorKind::Environment);
            let error = Error::from_command("ADD_DEV", 0, errno);
            assert!(error.to_string().contains("root"), "{error}");
        }
    }

    #[test]
    fn command_errors_map_to_kinds() {
        assert!(matches!(
            Error::from_command("GET_DEV_INFO", 9, libc::ENODEV),
            Error::NoSuchDevice { id: 9 }
        ));
        assert_eq!(
            Error::from_command("START_USER_RECOVERY", 1, libc::EBUSY).kind(),
            ErrorKind::Busy
        );
        assert_eq!(
            Error::from_command("SET_PARAMS", 1, libc::EINVAL).kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            Error::from_command("START_DEV", 1, libc::EIO).kind(),
            ErrorKind::Device
        );
        let busy_open = Error::from_open(
            PathBuf::from("/dev/ublkc0"),
            io::Error::from_raw_os_error(libc::EBUSY),
        );
        assert_eq!(busy_open.kind(), ErrorKind::Busy);
    }
}
