//! The VFIO container: one IOMMU address space, shared by the groups attached to it.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use vfio_bindings::bindings::vfio as sys;

use super::caps::{self, IovaRange};
use super::group::Group;
use super::ioctl;
use crate::dma::DmaMapper;
use crate::error::{Error, Result};

/// The IOMMU models ring3 can drive through a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IommuType {
    /// `VFIO_TYPE1v2_IOMMU`: type1 with exact unmap semantics (preferred).
    Type1v2,
    /// `VFIO_TYPE1_IOMMU`: the original type1.
    Type1,
}

impl IommuType {
    fn raw(self) -> u32 {
        match self {
            IommuType::Type1v2 => sys::VFIO_TYPE1v2_IOMMU,
            IommuType::Type1 => sys::VFIO_TYPE1_IOMMU,
        }
    }
}

/// What the container's IOMMU reports about itself (`VFIO_IOMMU_GET_INFO`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuInfo {
    /// Bitmap of the page sizes the IOMMU maps (bit n set: 2^n bytes).
    pub page_sizes: u64,
    /// The IOVA ranges the IOMMU translates, if the kernel reports them (Linux 5.4+);
    /// addresses outside them (such as x86's MSI window) must never be used for DMA.
    pub iova_ranges: Option<Vec<IovaRange>>,
    /// How many more DMA mappings the container allows, if reported (Linux 5.10+).
    pub dma_mappings_available: Option<u32>,
}

/// `/dev/vfio/vfio`: an IOMMU address space for the groups attached to it.
///
/// The container owns the groups attached to it, so a group stays attached (and its DMA
/// mappings stay valid and removable) for as long as anything — such as a live
/// [`crate::DmaBuffer`] through its [`crate::dma::DmaSpace`] — holds the container.
#[derive(Debug)]
pub struct Container {
    fd: OwnedFd,
    iommu: IommuType,
    state: Mutex<ContainerState>,
}

#[derive(Debug, Default)]
struct ContainerState {
    iommu_set: bool,
    groups: Vec<Arc<Group>>,
}

impl Container {
    /// Where the container device lives.
    pub const PATH: &'static str = "/dev/vfio/vfio";

    /// Opens a new container and checks that the kernel speaks the VFIO API and has a
    /// type1 IOMMU driver.
    pub fn open() -> Result<Self> {
        let fd: OwnedFd = OpenOptions::new()
            .read(true)
            .write(true)
            .open(Self::PATH)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => Error::ModuleMissing { module: "vfio-pci" },
                _ => Error::path("opening", Self::PATH, e),
            })?
            .into();
        let version = ioctl::get_api_version(fd.as_fd())
            .map_err(|e| Error::io("VFIO_GET_API_VERSION on /dev/vfio/vfio", e))?;
        if version != sys::VFIO_API_VERSION as i32 {
            return Err(Error::Unavailable {
                what: format!(
                    "the kernel's VFIO API version is {version}, ring3 speaks {}",
                    sys::VFIO_API_VERSION
                ),
                fix: "use a kernel with the standard VFIO API".into(),
            });
        }
        let mut iommu = None;
        for candidate in [IommuType::Type1v2, IommuType::Type1] {
            let supported = ioctl::check_extension(fd.as_fd(), candidate.raw()).map_err(|e| {
                Error::io(
                    format!("VFIO_CHECK_EXTENSION({candidate:?}) on /dev/vfio/vfio"),
                    e,
                )
            })?;
            if supported {
                iommu = Some(candidate);
                break;
            }
        }
        // With no type1 driver registered, the kernel reports neither extension.
        let iommu = iommu.ok_or(Error::ModuleMissing {
            module: "vfio_iommu_type1",
        })?;
        Ok(Container {
            fd,
            iommu,
            state: Mutex::default(),
        })
    }

    /// Takes over a container another process set up and handed over (see
    /// [`super::VfioFds`]): `group` is already attached to it and its IOMMU is set.
    pub(super) fn adopt(fd: OwnedFd, group: Group) -> Result<(Self, Arc<Group>)> {
        let mut iommu = None;
        for candidate in [IommuType::Type1v2, IommuType::Type1] {
            if ioctl::check_extension(fd.as_fd(), candidate.raw())
                .map_err(|e| Error::io("VFIO_CHECK_EXTENSION on a handed-over container", e))?
            {
                iommu = Some(candidate);
                break;
            }
        }
        let iommu = iommu.ok_or(Error::ModuleMissing {
            module: "vfio_iommu_type1",
        })?;
        let group = Arc::new(group);
        let container = Container {
            fd,
            iommu,
            state: Mutex::new(ContainerState {
                iommu_set: true,
                groups: vec![Arc::clone(&group)],
            }),
        };
        Ok((container, group))
    }

    /// The IOMMU model this container uses.
    pub fn iommu_type(&self) -> IommuType {
        self.iommu
    }

    /// Attaches `group` and, for the first group, sets up the IOMMU. The container keeps
    /// the group from now on.
    pub fn attach(&self, group: Group) -> Result<Arc<Group>> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        ioctl::group_set_container(group.as_fd(), self.fd.as_fd()).map_err(|e| {
            Error::io(
                format!(
                    "attaching IOMMU group {} to a VFIO container",
                    group.number()
                ),
                e,
            )
        })?;
        if !state.iommu_set {
            ioctl::set_iommu(self.fd.as_fd(), self.iommu.raw()).map_err(|e| {
                Error::Unavailable {
                    what: format!(
                        "VFIO could not set up the {:?} IOMMU for group {} ({e})",
                        self.iommu,
                        group.number()
                    ),
                    fix:
                        "the IOMMU must be on, with interrupt remapping: boot with intel_iommu=on \
                          (Intel) or amd_iommu=on (AMD), enable VT-d / AMD-Vi in the firmware, \
                          and see `dmesg` for what VFIO refused"
                            .into(),
                }
            })?;
            state.iommu_set = true;
        }
        let group = Arc::new(group);
        state.groups.push(Arc::clone(&group));
        Ok(group)
    }

    fn require_iommu(&self, doing: &str) -> Result<()> {
        if self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iommu_set
        {
            Ok(())
        } else {
            Err(Error::InvalidArgument {
                what: format!("{doing} needs a VFIO container with a group attached"),
            })
        }
    }

    /// What the IOMMU reports: page sizes, valid IOVA ranges, mappings left.
    pub fn iommu_info(&self) -> Result<IommuInfo> {
        self.require_iommu("VFIO_IOMMU_GET_INFO")?;
        let (info, reply) = ioctl::iommu_get_info(self.fd.as_fd())
            .map_err(|e| Error::io("VFIO_IOMMU_GET_INFO on a VFIO container", e))?;
        let mut result = IommuInfo {
            page_sizes: info.iova_pgsizes,
            iova_ranges: None,
            dma_mappings_available: None,
        };
        if info.flags & sys::VFIO_IOMMU_INFO_CAPS != 0 && !reply.is_empty() {
            for cap in caps::capabilities(&reply, info.cap_offset)? {
                match cap.id {
                    caps::IOMMU_CAP_IOVA_RANGE => {
                        result.iova_ranges = Some(caps::parse_iova_ranges(&cap)?)
                    }
                    caps::IOMMU_CAP_DMA_AVAIL => {
                        result.dma_mappings_available = Some(caps::parse_dma_avail(&cap)?)
                    }
                    _ => {}
                }
            }
        }
        Ok(result)
    }

    /// Makes `len` bytes at `vaddr` reachable by the container's devices at `iova`.
    ///
    /// # Safety
    /// `vaddr..vaddr+len` must be memory the caller owns and keeps allocated until
    /// [`Container::unmap_dma`] has returned `Ok` for the same range: devices may read and
    /// write it at any time until then.
    pub unsafe fn map_dma(&self, vaddr: NonNull<u8>, len: usize, iova: u64) -> Result<()> {
        self.require_iommu("VFIO_IOMMU_MAP_DMA")?;
        // SAFETY: forwarded from the caller's contract.
        let mapped =
            unsafe { ioctl::map_dma(self.fd.as_fd(), vaddr.as_ptr() as u64, len as u64, iova) };
        mapped.map_err(|e| map_error(len, iova, e))
    }

    /// Removes a mapping made by [`Container::map_dma`]; after `Ok` no device reaches it.
    pub fn unmap_dma(&self, iova: u64, len: usize) -> Result<()> {
        self.require_iommu("VFIO_IOMMU_UNMAP_DMA")?;
        let unmapped = ioctl::unmap_dma(self.fd.as_fd(), iova, len as u64).map_err(|e| {
            Error::io(
                format!("VFIO_IOMMU_UNMAP_DMA of {len:#x} bytes at IOVA {iova:#x}"),
                e,
            )
        })?;
        if unmapped != len as u64 {
            return Err(Error::BadKernelValue {
                what: format!(
                    "VFIO_IOMMU_UNMAP_DMA of {len:#x} bytes at IOVA {iova:#x} unmapped a different size:"
                ),
                value: unmapped,
            });
        }
        Ok(())
    }
}

fn map_error(len: usize, iova: u64, e: io::Error) -> Error {
    match e.raw_os_error() {
        // type1 pins the pages and charges them to RLIMIT_MEMLOCK.
        Some(libc::ENOMEM) => Error::Unavailable {
            what: format!("could not pin {len:#x} bytes of DMA memory at IOVA {iova:#x} ({e})"),
            fix: "the locked-memory limit is probably too low: raise it (`ulimit -l unlimited`, \
                  `LimitMEMLOCK=infinity` for a systemd service) or run as root"
                .into(),
        },
        // type1 limits the number of mappings (module parameter dma_entry_limit).
        Some(libc::ENOSPC) => Error::Unavailable {
            what: format!("the IOMMU allows no more DMA mappings ({e})"),
            fix: "use fewer, larger DMA buffers, or raise vfio_iommu_type1's dma_entry_limit"
                .into(),
        },
        _ => Error::io(
            format!("VFIO_IOMMU_MAP_DMA of {len:#x} bytes at IOVA {iova:#x}"),
            e,
        ),
    }
}

impl DmaMapper for Container {
    unsafe fn map(&self, vaddr: NonNull<u8>, len: usize, iova: u64) -> Result<()> {
        // SAFETY: DmaMapper::map has the same contract as Container::map_dma.
        unsafe { self.map_dma(vaddr, len, iova) }
    }

    fn unmap(&self, iova: u64, len: usize) -> Result<()> {
        self.unmap_dma(iova, len)
    }
}

impl AsFd for Container {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
