//! VFIO: a PCI device handed to this process by the kernel's vfio-pci driver.
//!
//! VFIO is the kernel shim ring3 drivers stand on. Three kinds of file make it up:
//!
//! - a [`Container`] (`/dev/vfio/vfio`) is one IOMMU address space: memory mapped into it
//!   with [`Container::map_dma`] is what the devices attached to it can reach by DMA, and
//!   nothing else;
//! - a [`Group`] (`/dev/vfio/<n>`) stands for an IOMMU group, the smallest set of devices
//!   the IOMMU can isolate from each other. Every device in it must be bound to vfio-pci
//!   (or to no driver) before VFIO hands any of them out, and only one process can hold it;
//! - a [`Device`] gives access to one function's regions (BARs, config space), its
//!   interrupts (each routed to an eventfd) and its reset.
//!
//! Most code needs none of this directly: [`VfioBackend::open`] checks the system, opens
//! all three and implements [`crate::Backend`], which is what drivers use.
//!
//! ```no_run
//! use std::time::Duration;
//! use ring3::{Backend, IrqMode, vfio::VfioBackend};
//!
//! # fn main() -> ring3::Result<()> {
//! // The device must be bound to vfio-pci first (`ring3 bind 0000:00:03.0`).
//! let device = VfioBackend::open("0000:00:03.0")?;
//! let bar0 = device.bar(0)?;
//! println!("identification register: {:#x}", bar0.read32(0)?);
//! let interrupts = device.enable_interrupts(IrqMode::Msi, 1)?;
//! // ... make the device raise an interrupt ...
//! interrupts[0].wait(Duration::from_secs(1))?;
//! # Ok(()) }
//! ```
//!
//! One device per process is the model: each [`VfioBackend`] has its own container.
//! DMA memory is mapped through that container; a [`crate::DmaBuffer`] keeps the
//! container (and the group attached to it) alive until the buffer is unmapped.

mod caps;
mod container;
mod device;
mod group;
mod ioctl;
#[cfg(test)]
mod tests;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

pub use caps::{capabilities, parse_iova_ranges, Capability, IovaRange};
pub use container::{Container, IommuInfo, IommuType};
pub use device::{
    Device, DeviceFlags, DeviceInfo, IrqFlags, IrqInfo, RegionFlags, RegionInfo, BAR_COUNT,
    CONFIG_REGION, ROM_REGION,
};
pub use group::Group;

use crate::backend::Backend;
use crate::dma::{DmaSpace, IovaAllocator};
use crate::error::{Error, Result};
use crate::irq::{Interrupt, IrqMode};
use crate::mmio::Bar;
use crate::pci::{PciAddress, Sysfs};

/// The widest DMA mask; drivers narrow it with [`Backend::set_dma_mask`].
const FULL_DMA_MASK: u8 = 64;

/// A PCI device driven through VFIO: the real [`Backend`].
pub struct VfioBackend {
    // Dropped first: disables interrupts and closes the device, after which vfio-pci has
    // turned bus mastering off.
    device: Device,
    group: Arc<Group>,
    container: Arc<Container>,
    dma: Arc<DmaSpace>,
}

impl std::fmt::Debug for VfioBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioBackend")
            .field("device", &self.device)
            .field("group", &self.group.number())
            .field("iommu", &self.container.iommu_type())
            .finish()
    }
}

impl VfioBackend {
    /// Opens the device at `address` (such as `0000:00:03.0`), which must already be
    /// bound to vfio-pci.
    ///
    /// Each way this can fail has its own error naming the fix: a malformed address
    /// ([`Error::InvalidAddress`]), no such device ([`Error::NoSuchDevice`]), vfio-pci not
    /// loaded ([`Error::ModuleMissing`]), the device bound to another driver
    /// ([`Error::NotBoundToVfio`]), no IOMMU or a group with devices still on host drivers
    /// ([`Error::Unavailable`]), the device open elsewhere ([`Error::Busy`]), or no access
    /// to `/dev/vfio/<group>` ([`Error::PermissionDenied`]).
    pub fn open(address: &str) -> Result<Self> {
        Self::open_with(&Sysfs::system(), address)
    }

    /// Like [`VfioBackend::open`], reading device information from `sysfs`.
    pub fn open_with(sysfs: &Sysfs, address: &str) -> Result<Self> {
        let address: PciAddress = address.parse()?;
        let name = address.to_string();
        let pci = sysfs.device(address)?;
        if !sysfs.module_loaded("vfio_pci") {
            return Err(Error::ModuleMissing { module: "vfio-pci" });
        }
        match pci.driver.as_deref() {
            Some(driver) if is_vfio_driver(driver) => {}
            other => {
                return Err(Error::NotBoundToVfio {
                    address: name,
                    driver: other.unwrap_or("no driver").into(),
                })
            }
        }
        let group_number = pci.iommu_group.ok_or_else(|| Error::Unavailable {
            what: format!("{name} has no IOMMU group, so VFIO cannot isolate it"),
            fix: "turn the IOMMU on: VT-d / AMD-Vi in the firmware and intel_iommu=on or \
                  amd_iommu=on on the kernel command line"
                .into(),
        })?;
        let group = Group::open_for(group_number, Some(&name))?;
        if !group.is_viable()? {
            return Err(not_viable(sysfs, group_number));
        }
        let container = Arc::new(Container::open()?);
        let group = container.attach(group)?;
        let device = group.open_device(&name)?;
        let allocator = match container.iommu_info()?.iova_ranges {
            Some(ranges) => IovaAllocator::new(&caps::allocator_ranges(&ranges), FULL_DMA_MASK),
            None => IovaAllocator::for_mask(FULL_DMA_MASK),
        };
        let dma = DmaSpace::new(Arc::clone(&container) as _, allocator);
        tracing::debug!(address = %name, group = group_number, "opened through VFIO");
        Ok(VfioBackend {
            device,
            group,
            container,
            dma,
        })
    }

    /// The three open files of this device, for handing it to another process (such as
    /// a driver process started by `ring3d`), which rebuilds it with
    /// [`VfioBackend::from_fds`]. Duplicates of these files share their state: the
    /// device stays open, and its DMA mappings stay in place, until the last copy of each
    /// is closed.
    pub fn handoff_fds(&self) -> VfioFds<BorrowedFd<'_>> {
        VfioFds {
            container: self.container.as_fd(),
            group: self.group.as_fd(),
            device: self.device.as_fd(),
            group_number: self.group.number(),
        }
    }

    /// Rebuilds a backend from files another process opened with [`VfioBackend::open`]
    /// and handed over (see [`VfioBackend::handoff_fds`]): the group attached to the
    /// container, its IOMMU set up, and the device at `address` opened from the group.
    /// Needs no privileges beyond holding the files (and a locked-memory limit large
    /// enough for the driver's DMA memory).
    pub fn from_fds(fds: VfioFds<OwnedFd>, address: &str) -> Result<Self> {
        let group = Group::adopt(fds.group, fds.group_number);
        let (container, group) = Container::adopt(fds.container, group)?;
        let container = Arc::new(container);
        let device = Device::new(fds.device, address.into())?;
        let allocator = match container.iommu_info()?.iova_ranges {
            Some(ranges) => IovaAllocator::new(&caps::allocator_ranges(&ranges), FULL_DMA_MASK),
            None => IovaAllocator::for_mask(FULL_DMA_MASK),
        };
        let dma = DmaSpace::new(Arc::clone(&container) as _, allocator);
        tracing::debug!(
            address,
            group = fds.group_number,
            "took over from another process"
        );
        Ok(VfioBackend {
            device,
            group,
            container,
            dma,
        })
    }

    /// The VFIO device: regions, interrupts and reset beyond what [`Backend`] offers.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The device's IOMMU group.
    pub fn group(&self) -> &Arc<Group> {
        &self.group
    }

    /// The container whose IOMMU address space the device's DMA goes through.
    pub fn container(&self) -> &Arc<Container> {
        &self.container
    }
}

/// The open files that make up a [`VfioBackend`], as handed from one process to another.
#[derive(Debug)]
pub struct VfioFds<Fd> {
    /// `/dev/vfio/vfio`, with the group attached and the IOMMU set up.
    pub container: Fd,
    /// `/dev/vfio/<group_number>`.
    pub group: Fd,
    /// The device, from `VFIO_GROUP_GET_DEVICE_FD`.
    pub device: Fd,
    /// The IOMMU group's number.
    pub group_number: u32,
}

/// vfio-pci, or one of its vendor variants (such as mlx5_vfio_pci), which also hand
/// devices out through VFIO groups.
fn is_vfio_driver(driver: &str) -> bool {
    driver == "vfio-pci" || driver.ends_with("_vfio_pci")
}

/// Drivers the kernel lets share a group with a device handed to user space.
fn allowed_in_vfio_group(driver: Option<&str>) -> bool {
    match driver {
        None => true,
        Some(driver) => is_vfio_driver(driver) || driver == "pci-stub" || driver == "pcieport",
    }
}

/// The error for a group VFIO will not hand out, naming the devices that hold it back.
fn not_viable(sysfs: &Sysfs, group: u32) -> Error {
    let members = sysfs.iommu_group_devices(group).unwrap_or_default();
    let describe = |address: &PciAddress| {
        let driver = sysfs.device(*address).ok().and_then(|device| device.driver);
        (
            driver.clone(),
            format!("{address} ({})", driver.as_deref().unwrap_or("no driver")),
        )
    };
    let described: Vec<(Option<String>, String)> = members.iter().map(describe).collect();
    let blocking: Vec<&str> = described
        .iter()
        .filter(|(driver, _)| !allowed_in_vfio_group(driver.as_deref()))
        .map(|(_, text)| text.as_str())
        .collect();
    let listed = if blocking.is_empty() {
        described
            .iter()
            .map(|(_, text)| text.as_str())
            .collect::<Vec<_>>()
    } else {
        blocking
    };
    Error::Unavailable {
        what: format!(
            "IOMMU group {group} is not viable: all devices in it must be bound to vfio-pci"
        ),
        fix: if listed.is_empty() {
            format!("bind every device in /sys/kernel/iommu_groups/{group}/devices to vfio-pci (`ring3 bind <address>`)")
        } else {
            format!(
                "bind these to vfio-pci too (`ring3 bind <address>`), or unbind them: {}",
                listed.join(", ")
            )
        },
    }
}

impl Backend for VfioBackend {
    fn address(&self) -> &str {
        self.device.address()
    }

    fn config_read(&self, offset: u16, buf: &mut [u8]) -> Result<()> {
        self.device.config_read(offset, buf)
    }

    fn config_write(&self, offset: u16, data: &[u8]) -> Result<()> {
        self.device.config_write(offset, data)
    }

    fn bar(&self, index: u8) -> Result<Bar> {
        self.device.bar(index)
    }

    fn dma_space(&self) -> &Arc<DmaSpace> {
        &self.dma
    }

    fn enable_interrupts(&self, mode: IrqMode, count: u32) -> Result<Vec<Interrupt>> {
        self.device.enable_irqs(mode, count)
    }

    fn disable_interrupts(&self, mode: IrqMode) -> Result<()> {
        self.device.disable_irqs(mode)
    }

    fn interrupt_count(&self, mode: IrqMode) -> Result<u32> {
        Ok(self.device.irq_info(mode)?.count)
    }

    fn reset(&self) -> Result<()> {
        self.device.reset()
    }
}
