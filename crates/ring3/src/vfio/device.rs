//! A VFIO device: its regions (BARs, config space), interrupts and reset.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};

use vfio_bindings::bindings::vfio as sys;

use super::ioctl;
use crate::error::{Error, Result};
use crate::irq::{Interrupt, IrqMode};
use crate::mmio::{Bar, RegisterModel};
use crate::sys::Mapping;

/// Region index of PCI configuration space (`VFIO_PCI_CONFIG_REGION_INDEX`).
pub const CONFIG_REGION: u32 = sys::VFIO_PCI_CONFIG_REGION_INDEX;
/// Region index of the expansion ROM (`VFIO_PCI_ROM_REGION_INDEX`).
pub const ROM_REGION: u32 = sys::VFIO_PCI_ROM_REGION_INDEX;
/// Number of BARs of a PCI function.
pub const BAR_COUNT: u8 = 6;

bitflags::bitflags! {
    /// `VFIO_DEVICE_FLAGS_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct DeviceFlags: u32 {
        /// The device supports `VFIO_DEVICE_RESET`.
        const RESET = sys::VFIO_DEVICE_FLAGS_RESET;
        /// A PCI device (vfio-pci).
        const PCI = sys::VFIO_DEVICE_FLAGS_PCI;
        /// The info reply has a capability chain.
        const CAPS = sys::VFIO_DEVICE_FLAGS_CAPS;
        const _ = !0;
    }

    /// `VFIO_REGION_INFO_FLAG_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct RegionFlags: u32 {
        /// The region can be read with pread.
        const READ = sys::VFIO_REGION_INFO_FLAG_READ;
        /// The region can be written with pwrite.
        const WRITE = sys::VFIO_REGION_INFO_FLAG_WRITE;
        /// The region can be mmap'd.
        const MMAP = sys::VFIO_REGION_INFO_FLAG_MMAP;
        /// The info reply has a capability chain.
        const CAPS = sys::VFIO_REGION_INFO_FLAG_CAPS;
        const _ = !0;
    }

    /// `VFIO_IRQ_INFO_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct IrqFlags: u32 {
        /// Interrupts can be signalled to an eventfd.
        const EVENTFD = sys::VFIO_IRQ_INFO_EVENTFD;
        /// The interrupt can be masked and unmasked.
        const MASKABLE = sys::VFIO_IRQ_INFO_MASKABLE;
        /// The kernel masks the interrupt on delivery (level-triggered INTx): unmask after handling.
        const AUTOMASKED = sys::VFIO_IRQ_INFO_AUTOMASKED;
        /// The vector count cannot change while enabled.
        const NORESIZE = sys::VFIO_IRQ_INFO_NORESIZE;
        const _ = !0;
    }
}

/// `VFIO_DEVICE_GET_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// What the device supports.
    pub flags: DeviceFlags,
    /// Number of regions (9 for PCI: BAR0–5, ROM, config, VGA).
    pub regions: u32,
    /// Number of interrupt indexes (INTx, MSI, MSI-X, error, request for PCI).
    pub irqs: u32,
}

/// One region of a device (`VFIO_DEVICE_GET_REGION_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index: BAR n is n, then [`ROM_REGION`], [`CONFIG_REGION`].
    pub index: u32,
    /// Access allowed.
    pub flags: RegionFlags,
    /// Size in bytes (0 if the device does not implement it).
    pub size: u64,
    /// Offset of the region within the device fd, for pread/pwrite/mmap.
    pub offset: u64,
}

/// One interrupt index of a device (`VFIO_DEVICE_GET_IRQ_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// Interrupt kind.
    pub mode: IrqMode,
    /// What the kernel can do with it.
    pub flags: IrqFlags,
    /// Vectors available (0: the device has none of this kind).
    pub count: u32,
}

fn irq_index(mode: IrqMode) -> u32 {
    match mode {
        IrqMode::Intx => sys::VFIO_PCI_INTX_IRQ_INDEX,
        IrqMode::Msi => sys::VFIO_PCI_MSI_IRQ_INDEX,
        IrqMode::MsiX => sys::VFIO_PCI_MSIX_IRQ_INDEX,
    }
}

/// A PCI device opened through VFIO.
///
/// Dropping it disables its interrupts and closes it; vfio-pci then turns off bus
/// mastering and resets the function, so the device cannot DMA afterwards. BARs handed
/// out by [`Device::bar`] keep their mapping (and the device fd) alive on their own.
pub struct Device {
    fd: Arc<OwnedFd>,
    address: String,
    info: DeviceInfo,
    config: RegionInfo,
    bars: Mutex<[Option<Bar>; BAR_COUNT as usize]>,
    irq_mode: Mutex<Option<IrqMode>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("address", &self.address)
            .field("info", &self.info)
            .finish()
    }
}

impl Device {
    pub(super) fn new(fd: OwnedFd, address: String) -> Result<Self> {
        let raw = ioctl::device_get_info(fd.as_fd())
            .map_err(|e| Error::io(format!("{address}: VFIO_DEVICE_GET_INFO"), e))?;
        let info = DeviceInfo {
            flags: DeviceFlags::from_bits_retain(raw.flags),
            regions: raw.num_regions,
            irqs: raw.num_irqs,
        };
        if !info.flags.contains(DeviceFlags::PCI) || info.regions <= CONFIG_REGION {
            return Err(Error::Unsupported {
                address,
                what: format!(
                    "VFIO PCI access (device flags {:#x}, {} regions)",
                    raw.flags, raw.num_regions
                ),
            });
        }
        let mut device = Device {
            fd: Arc::new(fd),
            address,
            info,
            config: RegionInfo {
                index: CONFIG_REGION,
                flags: RegionFlags::empty(),
                size: 0,
                offset: 0,
            },
            bars: Mutex::default(),
            irq_mode: Mutex::default(),
        };
        device.config = device.region_info(CONFIG_REGION)?;
        Ok(device)
    }

    /// The PCI address the device was opened by.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Flags and counts from `VFIO_DEVICE_GET_INFO`.
    pub fn info(&self) -> DeviceInfo {
        self.info
    }

    /// Information about region `index` (see [`RegionInfo::index`]).
    pub fn region_info(&self, index: u32) -> Result<RegionInfo> {
        if index >= self.info.regions {
            return Err(Error::InvalidArgument {
                what: format!(
                    "{}: region {index} does not exist (the device has {})",
                    self.address, self.info.regions
                ),
            });
        }
        let raw = ioctl::device_get_region_info(self.fd.as_fd(), index).map_err(|e| {
            Error::io(
                format!(
                    "{}: VFIO_DEVICE_GET_REGION_INFO for region {index}",
                    self.address
                ),
                e,
            )
        })?;
        Ok(RegionInfo {
            index,
            flags: RegionFlags::from_bits_retain(raw.flags),
            size: raw.size,
            offset: raw.offset,
        })
    }

    fn region_name(&self, index: u32) -> String {
        match index {
            0..=5 => format!("{} BAR{index}", self.address),
            ROM_REGION => format!("{} expansion ROM", self.address),
            CONFIG_REGION => format!("{} config space", self.address),
            _ => format!("{} region {index}", self.address),
        }
    }

    /// The position in the device fd of `len` bytes at `offset` of `region`, if inside it.
    fn file_offset(&self, region: &RegionInfo, offset: u64, len: usize) -> Result<u64> {
        let inside = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= region.size);
        match region.offset.checked_add(offset) {
            Some(position) if inside => Ok(position),
            _ => Err(Error::OutOfBounds {
                region: self.region_name(region.index),
                offset,
                size: len as u64,
                len: region.size,
            }),
        }
    }

    fn pread(&self, region: &RegionInfo, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut position = self.file_offset(region, offset, buf.len())?;
        let mut rest = buf;
        while !rest.is_empty() {
            match rustix::io::pread(&*self.fd, &mut *rest, position) {
                Ok(0) => {
                    return Err(Error::io(
                        format!("reading {}", self.region_name(region.index)),
                        std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                    ))
                }
                Ok(n) => {
                    rest = &mut rest[n..];
                    position += n as u64;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("reading {} at {offset:#x}", self.region_name(region.index)),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    fn pwrite(&self, region: &RegionInfo, offset: u64, data: &[u8]) -> Result<()> {
        let mut position = self.file_offset(region, offset, data.len())?;
        let mut rest = data;
        while !rest.is_empty() {
            match rustix::io::pwrite(&*self.fd, rest, position) {
                Ok(0) => {
                    return Err(Error::io(
                        format!("writing {}", self.region_name(region.index)),
                        std::io::Error::from(std::io::ErrorKind::WriteZero),
                    ))
                }
                Ok(n) => {
                    rest = &rest[n..];
                    position += n as u64;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("writing {} at {offset:#x}", self.region_name(region.index)),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of region `index` at `offset` through the kernel.
    pub fn read_region(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let region = self.region_info(index)?;
        self.pread(&region, offset, buf)
    }

    /// Writes `data` to region `index` at `offset` through the kernel.
    pub fn write_region(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let region = self.region_info(index)?;
        self.pwrite(&region, offset, data)
    }

    /// Reads configuration space at `offset` (vfio-pci virtualises parts of it).
    pub fn config_read(&self, offset: u16, buf: &mut [u8]) -> Result<()> {
        self.pread(&self.config, offset.into(), buf)
    }

    /// Writes configuration space at `offset` (vfio-pci filters writes it must not allow).
    pub fn config_write(&self, offset: u16, data: &[u8]) -> Result<()> {
        self.pwrite(&self.config, offset.into(), data)
    }

    /// BAR `index` (0–5) for register access, mapped once and shared by every caller.
    ///
    /// A BAR VFIO lets us mmap is accessed directly; any other (an I/O-port BAR, or one
    /// the kernel will not map) goes through pread/pwrite on the device fd, slower but
    /// with the same interface.
    pub fn bar(&self, index: u8) -> Result<Bar> {
        if index >= BAR_COUNT {
            return Err(Error::InvalidArgument {
                what: format!(
                    "{}: BAR {index} does not exist (BARs are 0–5)",
                    self.address
                ),
            });
        }
        let mut bars = self.bars.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bar) = &bars[usize::from(index)] {
            return Ok(bar.clone());
        }
        let bar = self.map_bar(index)?;
        bars[usize::from(index)] = Some(bar.clone());
        Ok(bar)
    }

    fn map_bar(&self, index: u8) -> Result<Bar> {
        let region = self.region_info(index.into())?;
        let name = self.region_name(index.into());
        if region.size == 0 {
            return Err(Error::Unsupported {
                address: self.address.clone(),
                what: format!("BAR {index} (the device does not implement it)"),
            });
        }
        let len = usize::try_from(region.size).map_err(|_| Error::InvalidArgument {
            what: format!("{name} is {:#x} bytes, too large to map", region.size),
        })?;
        if region.flags.contains(RegionFlags::MMAP) {
            match Mapping::shared(self.fd.as_fd(), region.offset, len) {
                Ok(mapping) => {
                    let base = mapping.ptr();
                    let owner = Arc::new(BarMapping {
                        _mapping: mapping,
                        _device: Arc::clone(&self.fd),
                    });
                    // SAFETY: `mapping` covers at least `len` bytes of the BAR, mapped
                    // read/write and shared; it lives in `owner`, which the Bar keeps, and
                    // nothing creates Rust references into it.
                    return Ok(unsafe { Bar::from_mapping(name, base, len, owner) });
                }
                // Older kernels refuse to map a BAR that holds the MSI-X table as a whole
                // (only its sparse areas); the slow path still works.
                Err(error) => {
                    tracing::warn!(bar = %name, %error, "mmap of the BAR failed; using pread/pwrite");
                }
            }
        }
        if !region
            .flags
            .contains(RegionFlags::READ | RegionFlags::WRITE)
        {
            return Err(Error::Unsupported {
                address: self.address.clone(),
                what: format!("access to BAR {index} (VFIO allows neither mmap nor read/write)"),
            });
        }
        let io = Arc::new(RegionIo {
            fd: Arc::clone(&self.fd),
            offset: region.offset,
            name: name.clone(),
        });
        Ok(Bar::from_model(name, len, io))
    }

    /// What the device offers for interrupts of `mode`.
    pub fn irq_info(&self, mode: IrqMode) -> Result<IrqInfo> {
        let index = irq_index(mode);
        if index >= self.info.irqs {
            return Ok(IrqInfo {
                mode,
                flags: IrqFlags::empty(),
                count: 0,
            });
        }
        let raw = ioctl::device_get_irq_info(self.fd.as_fd(), index).map_err(|e| {
            Error::io(
                format!("{}: VFIO_DEVICE_GET_IRQ_INFO for {mode}", self.address),
                e,
            )
        })?;
        Ok(IrqInfo {
            mode,
            flags: IrqFlags::from_bits_retain(raw.flags),
            count: raw.count,
        })
    }

    /// Routes `count` vectors of `mode` to new eventfds, replacing whatever interrupts
    /// were enabled before (VFIO allows one mode at a time).
    ///
    /// INTx vectors unmask themselves after each delivery they report (VFIO masks the
    /// level-triggered line on delivery), so acknowledge the device before waiting again.
    pub fn enable_irqs(&self, mode: IrqMode, count: u32) -> Result<Vec<Interrupt>> {
        let info = self.irq_info(mode)?;
        if count == 0 || count > info.count || !info.flags.contains(IrqFlags::EVENTFD) {
            return Err(Error::Unsupported {
                address: self.address.clone(),
                what: format!("{count} {mode} vectors (it offers {})", info.count),
            });
        }
        let mut current = self.irq_mode.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(previous) = *current {
            self.set_irqs_none(previous)?;
            *current = None;
        }
        let mut vectors: Vec<Interrupt> = (0..count)
            .map(|vector| Interrupt::new(mode, vector))
            .collect::<Result<_>>()?;
        let fds: Vec<i32> = vectors
            .iter()
            .map(|irq| std::os::fd::AsRawFd::as_raw_fd(&irq.as_fd()))
            .collect();
        ioctl::device_set_irqs(
            self.fd.as_fd(),
            sys::VFIO_IRQ_SET_DATA_EVENTFD | sys::VFIO_IRQ_SET_ACTION_TRIGGER,
            irq_index(mode),
            0,
            count,
            &fds,
        )
        .map_err(|e| {
            Error::io(
                format!(
                    "{}: enabling {count} {mode} vectors (VFIO_DEVICE_SET_IRQS)",
                    self.address
                ),
                e,
            )
        })?;
        *current = Some(mode);
        if mode == IrqMode::Intx {
            let device = Arc::clone(&self.fd);
            let address = self.address.clone();
            let unmask: Arc<dyn Fn() -> Result<()> + Send + Sync> =
                Arc::new(move || unmask_intx(device.as_fd(), &address));
            vectors = vectors
                .into_iter()
                .map(|irq| irq.with_unmask(Arc::clone(&unmask)))
                .collect();
        }
        Ok(vectors)
    }

    /// Stops delivering interrupts of `mode`; nothing happens if `mode` is not enabled.
    pub fn disable_irqs(&self, mode: IrqMode) -> Result<()> {
        let mut current = self.irq_mode.lock().unwrap_or_else(PoisonError::into_inner);
        if *current == Some(mode) {
            self.set_irqs_none(mode)?;
            *current = None;
        }
        Ok(())
    }

    /// Which interrupt mode is enabled, if any.
    pub fn enabled_irq_mode(&self) -> Option<IrqMode> {
        *self.irq_mode.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_irqs_none(&self, mode: IrqMode) -> Result<()> {
        ioctl::device_set_irqs(
            self.fd.as_fd(),
            sys::VFIO_IRQ_SET_DATA_NONE | sys::VFIO_IRQ_SET_ACTION_TRIGGER,
            irq_index(mode),
            0,
            0,
            &[],
        )
        .map_err(|e| {
            Error::io(
                format!(
                    "{}: disabling {mode} interrupts (VFIO_DEVICE_SET_IRQS)",
                    self.address
                ),
                e,
            )
        })
    }

    /// Lets the next INTx through after VFIO masked the line on delivery.
    pub fn unmask_intx(&self) -> Result<()> {
        unmask_intx(self.fd.as_fd(), &self.address)
    }

    /// Resets the function (FLR, power-management or bus reset, whichever vfio-pci can do).
    ///
    /// vfio-pci saves and restores config space around the reset, so BAR mappings and
    /// the command register survive; the device's own state does not.
    pub fn reset(&self) -> Result<()> {
        if !self.info.flags.contains(DeviceFlags::RESET) {
            return Err(Error::Unsupported {
                address: self.address.clone(),
                what:
                    "reset (vfio-pci found no function-level, power-management or bus reset for it)"
                        .into(),
            });
        }
        ioctl::device_reset(self.fd.as_fd())
            .map_err(|e| Error::io(format!("{}: VFIO_DEVICE_RESET", self.address), e))
    }
}

fn unmask_intx(device: BorrowedFd<'_>, address: &str) -> Result<()> {
    ioctl::device_set_irqs(
        device,
        sys::VFIO_IRQ_SET_DATA_NONE | sys::VFIO_IRQ_SET_ACTION_UNMASK,
        sys::VFIO_PCI_INTX_IRQ_INDEX,
        0,
        1,
        &[],
    )
    .map_err(|e| {
        Error::io(
            format!("{address}: unmasking INTx (VFIO_DEVICE_SET_IRQS)"),
            e,
        )
    })
}

impl AsFd for Device {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let current = *self
            .irq_mode
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(mode) = current {
            if let Err(error) = self.set_irqs_none(mode) {
                tracing::error!(address = %self.address, %error, "disabling interrupts on close failed");
            }
        }
    }
}

/// Keeps a mapped BAR and the device fd alive for as long as any [`Bar`] clone uses them.
struct BarMapping {
    _mapping: Mapping,
    _device: Arc<OwnedFd>,
}

/// A BAR reached through pread/pwrite on the device fd instead of a mapping.
///
/// [`RegisterModel`] cannot return errors: a failed access is logged and reads as all
/// ones, which is what a PCI read from a device that has gone away returns, and what
/// drivers already have to treat as "device gone".
struct RegionIo {
    fd: Arc<OwnedFd>,
    offset: u64,
    name: String,
}

impl RegisterModel for RegionIo {
    fn read(&self, offset: u64, size: u8) -> u64 {
        let mut bytes = [0u8; 8];
        let buf = &mut bytes[..usize::from(size.min(8))];
        let read = rustix::io::pread(&*self.fd, &mut *buf, self.offset + offset);
        if read != Ok(buf.len()) {
            tracing::error!(region = %self.name, offset, size, result = ?read, "register read failed");
            return if size >= 8 {
                u64::MAX
            } else {
                (1u64 << (8 * size)) - 1
            };
        }
        // vfio-pci returns region data little-endian, as the device holds it.
        u64::from_le_bytes(bytes)
    }

    fn write(&self, offset: u64, size: u8, value: u64) {
        let bytes = value.to_le_bytes();
        let data = &bytes[..usize::from(size.min(8))];
        let written = rustix::io::pwrite(&*self.fd, data, self.offset + offset);
        if written != Ok(data.len()) {
            tracing::error!(region = %self.name, offset, size, result = ?written, "register write failed");
        }
    }
}
