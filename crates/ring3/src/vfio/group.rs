//! A VFIO group: `/dev/vfio/<n>`, the devices of one IOMMU group.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use vfio_bindings::bindings::vfio as sys;

use super::device::Device;
use super::ioctl;
use crate::error::{Error, Result};

/// `/dev/vfio/<n>`: the handle through which VFIO hands out the devices of IOMMU group n.
///
/// Only one process can hold a group open. Attach it to a [`super::Container`] with
/// [`super::Container::attach`] before opening its devices.
#[derive(Debug)]
pub struct Group {
    fd: OwnedFd,
    number: u32,
}

impl Group {
    /// The group's device node.
    pub fn path(number: u32) -> PathBuf {
        PathBuf::from(format!("/dev/vfio/{number}"))
    }

    /// Opens `/dev/vfio/<number>`.
    pub fn open(number: u32) -> Result<Self> {
        Self::open_for(number, None)
    }

    /// Opens the group for the device at `address`, if given (named in errors).
    pub(crate) fn open_for(number: u32, address: Option<&str>) -> Result<Self> {
        let path = Self::path(number);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| open_error(number, address, path, e))?;
        Ok(Group {
            fd: file.into(),
            number,
        })
    }

    /// Takes over the open group file `fd` of IOMMU group `number`.
    pub(super) fn adopt(fd: OwnedFd, number: u32) -> Self {
        Group { fd, number }
    }

    /// The IOMMU group number.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// Whether every device of the group is bound to vfio-pci (or to no driver, or is a
    /// PCIe port): VFIO refuses to hand out any device of a group that is not viable.
    pub fn is_viable(&self) -> Result<bool> {
        Ok(self.status()? & sys::VFIO_GROUP_FLAGS_VIABLE != 0)
    }

    fn status(&self) -> Result<u32> {
        ioctl::group_get_status(self.fd.as_fd()).map_err(|e| {
            Error::io(
                format!("VFIO_GROUP_GET_STATUS on IOMMU group {}", self.number),
                e,
            )
        })
    }

    /// Opens the device at `address` (such as `0000:00:03.0`), which must be in this group.
    ///
    /// The group must be attached to a container first.
    pub fn open_device(&self, address: &str) -> Result<Device> {
        if self.status()? & sys::VFIO_GROUP_FLAGS_CONTAINER_SET == 0 {
            return Err(Error::InvalidArgument {
                what: format!(
                    "IOMMU group {} must be attached to a VFIO container before opening {address}",
                    self.number
                ),
            });
        }
        let name = CString::new(address).map_err(|_| Error::InvalidAddress {
            input: address.into(),
        })?;
        let fd = ioctl::group_get_device_fd(self.fd.as_fd(), &name).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::EBUSY) => Error::Busy {
                    address: address.into(),
                    reason: "another process (ring3, or a VM through VFIO) has the device open"
                        .into(),
                },
                Some(libc::ENODEV) | Some(libc::EINVAL) => Error::Unavailable {
                    what: format!(
                        "{address} is not a device of IOMMU group {} ({e})",
                        self.number
                    ),
                    fix: format!(
                        "check /sys/bus/pci/devices/{address}/iommu_group and that the device is bound to vfio-pci"
                    ),
                },
                _ => Error::io(
                    format!("VFIO_GROUP_GET_DEVICE_FD for {address} in IOMMU group {}", self.number),
                    e,
                ),
            }
        })?;
        Device::new(fd, address.into())
    }
}

impl AsFd for Group {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn open_error(number: u32, address: Option<&str>, path: PathBuf, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::EBUSY) => Error::Busy {
            address: address.map_or_else(|| format!("IOMMU group {number}"), String::from),
            reason: format!(
                "{} is already open in another process (ring3, or a VM using VFIO): stop it first",
                path.display()
            ),
        },
        Some(libc::ENOENT) => Error::Unavailable {
            what: format!("{} does not exist", path.display()),
            fix: format!(
                "no device of IOMMU group {number} is bound to vfio-pci yet: run `ring3 bind {}`",
                address.unwrap_or("<address>")
            ),
        },
        Some(libc::EACCES) | Some(libc::EPERM) => Error::PermissionDenied { path, source: e },
        _ => Error::io(format!("opening {}", path.display()), e),
    }
}
