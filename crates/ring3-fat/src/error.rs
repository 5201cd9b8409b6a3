//! Errors: [`Errno`] for file operations (what FUSE passes back to the caller), [`Error`] for
//! opening and mounting a volume.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// A POSIX error number, the answer to a failed file operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const EFBIG: Errno = Errno(libc::EFBIG);

    /// The errno for an error from fatfs or the device. fatfs reports most conditions as
    /// `ErrorKind::Other` with a fixed message, so those are recognised by their text.
    pub fn from_io(error: &io::Error) -> Errno {
        if let Some(code) = error.raw_os_error() {
            return Errno(code);
        }
        match error.kind() {
            io::ErrorKind::NotFound => return Errno::ENOENT,
            io::ErrorKind::AlreadyExists => return Errno::EEXIST,
            io::ErrorKind::InvalidInput => return Errno::EINVAL,
            io::ErrorKind::WriteZero => return Errno::ENOSPC,
            _ => {}
        }
        let text = error.to_string();
        let known = [
            ("No space left on device", Errno::ENOSPC),
            ("Directory not empty", Errno::ENOTEMPTY),
            ("Is a directory", Errno::EISDIR),
            ("Not a directory", Errno::ENOTDIR),
            ("File name too long", Errno::ENAMETOOLONG),
            ("File name is empty", Errno::EINVAL),
            ("unsupported characters", Errno::EINVAL),
        ];
        known
            .iter()
            .find(|(message, _)| text.contains(message))
            .map(|(_, errno)| *errno)
            .unwrap_or(Errno::EIO)
    }
}

impl From<io::Error> for Errno {
    fn from(error: io::Error) -> Self {
        let errno = Errno::from_io(&error);
        if errno == Errno::EIO {
            tracing::warn!("I/O error on the FAT volume: {error}");
        }
        errno
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", io::Error::from_raw_os_error(self.0))
    }
}

impl std::error::Error for Errno {}

/// Why a volume could not be opened, mounted or written back.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device or image does not exist.
    #[error("{0} does not exist (for a USB stick, see `ring3 usb list` and the /dev/ublkbN it is served as)")]
    DeviceMissing(PathBuf),
    /// No permission to open the device.
    #[error("no permission to open {0} read-write: run as root, or give your user access to it (or use --read-only)")]
    DevicePermission(PathBuf),
    /// Opening the device failed otherwise.
    #[error("cannot open {path}")]
    OpenDevice {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The device holds no FAT file system.
    #[error("{path} does not hold a FAT file system ({detail})")]
    NotFat { path: PathBuf, detail: String },
    /// The mount point does not exist or is not a directory.
    #[error("the mount point {0} is not a directory (create it with `mkdir -p`)")]
    MountpointNotDirectory(PathBuf),
    /// `/dev/fuse` does not exist.
    #[error("/dev/fuse does not exist: load the FUSE module with `modprobe fuse`")]
    FuseMissing,
    /// Mounting failed.
    #[error("mounting {device} on {mountpoint} failed (as a user, this needs `fusermount3` from the fuse3 package)")]
    Mount {
        device: PathBuf,
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Serving the mount failed.
    #[error("serving the FUSE mount on {mountpoint} failed")]
    Session {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Writing the volume back at the end failed; the device may be inconsistent.
    #[error("writing the volume back to {path} failed; check it with `fsck.vfat -n {path}`")]
    WriteBack {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The thread serving the volume stopped unexpectedly.
    #[error("the FAT volume thread stopped unexpectedly")]
    VolumeThread,
}

/// Result of opening, mounting and unmounting.
pub type Result<T> = std::result::Result<T, Error>;
