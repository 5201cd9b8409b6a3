//! The few usbfs calls made directly rather than through nusb: which kernel driver has
//! an interface, and reading the descriptors the kernel cached. Everything else goes
//! through nusb.

use std::io;
use std::os::fd::AsFd;

use rustix::io::Errno;
use rustix::ioctl::{opcode, Updater};

/// `USBDEVFS_MAXDRIVERNAME` (include/uapi/linux/usbdevice_fs.h).
const MAX_DRIVER_NAME: usize = 255;

/// `struct usbdevfs_getdriver`.
#[repr(C)]
struct GetDriver {
    interface: u32,
    driver: [u8; MAX_DRIVER_NAME + 1],
}

/// `USBDEVFS_GETDRIVER`: `_IOW('U', 8, struct usbdevfs_getdriver)`.
const USBDEVFS_GETDRIVER: rustix::ioctl::Opcode = opcode::write::<GetDriver>(b'U', 8);

/// What has an interface, according to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InterfaceOwner {
    /// Nothing: free to claim.
    Nobody,
    /// A process, through usbfs (this one or another).
    Usbfs,
    /// A kernel driver, by name.
    KernelDriver(String),
}

/// Which driver has `interface` (`USBDEVFS_GETDRIVER`). `ENODEV` means the device is gone;
/// the kernel answers it for every call on a disconnected device, which makes this the
/// cheap liveness check too.
pub(crate) fn interface_owner(fd: impl AsFd, interface: u8) -> Result<InterfaceOwner, Errno> {
    let mut request = GetDriver {
        interface: u32::from(interface),
        driver: [0; MAX_DRIVER_NAME + 1],
    };
    // SAFETY: USBDEVFS_GETDRIVER reads and writes a `struct usbdevfs_getdriver`, which
    // `GetDriver` lays out exactly; `request` lives across the call.
    let result =
        unsafe { rustix::ioctl::ioctl(fd, Updater::<USBDEVFS_GETDRIVER, _>::new(&mut request)) };
    match result {
        Ok(()) => {
            let end = request
                .driver
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(request.driver.len());
            let name = String::from_utf8_lossy(&request.driver[..end]).into_owned();
            if name == "usbfs" {
                Ok(InterfaceOwner::Usbfs)
            } else {
                Ok(InterfaceOwner::KernelDriver(name))
            }
        }
        Err(Errno::NODATA) => Ok(InterfaceOwner::Nobody),
        Err(error) => Err(error),
    }
}

/// The largest descriptor blob read: a device descriptor and 255 configurations of the
/// largest size.
const MAX_DESCRIPTORS: usize = 18 + 255 * 65535;

/// The descriptors the kernel cached when the device was enumerated: reading the usbfs
/// node from offset 0 gives the device descriptor and then every configuration.
pub(crate) fn read_descriptors(fd: impl AsFd) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 4096];
    loop {
        let read = rustix::io::pread(&fd, &mut chunk, bytes.len() as u64)?;
        if read == 0 {
            return Ok(bytes);
        }
        bytes.extend_from_slice(&chunk[..read]);
        if bytes.len() > MAX_DESCRIPTORS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the device's descriptors are larger than any device's can be",
            ));
        }
    }
}
