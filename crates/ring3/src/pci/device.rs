//! Discovery: reading PCI devices, their BARs and IOMMU groups from sysfs.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::address::PciAddress;
use super::class::class_name;
use crate::error::{Error, Result};

/// The sysfs tree (and the few other system files) that PCI discovery and binding read.
///
/// [`Sysfs::system`] is the running machine. Tests point [`Sysfs::at`] at a fixture tree,
/// and [`Sysfs::with_mountinfo`] and [`Sysfs::with_state_dir`] at fixture files, so that
/// nothing they do touches the machine.
#[derive(Clone, Debug)]
pub struct Sysfs {
    root: PathBuf,
    pub(super) mountinfo: PathBuf,
    pub(super) state_dir: PathBuf,
}

/// Where a process sees its mounts.
const SYSTEM_MOUNTINFO: &str = "/proc/self/mountinfo";
/// Where ring3 remembers which driver a device had before it was bound to vfio-pci.
const SYSTEM_STATE_DIR: &str = "/run/ring3/original-drivers";

/// A PCI function as sysfs describes it.
#[derive(Clone, Debug)]
pub struct PciDevice {
    /// Where the device is.
    pub address: PciAddress,
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Subsystem vendor ID (0 if sysfs does not say).
    pub subsystem_vendor_id: u16,
    /// Subsystem ID (0 if sysfs does not say).
    pub subsystem_id: u16,
    /// Class code: base class, subclass and programming interface in the low 24 bits.
    pub class_code: u32,
    /// Revision ID (0 if sysfs does not say).
    pub revision: u8,
    /// The kernel driver bound to the device, if any.
    pub driver: Option<String>,
    /// The device's IOMMU group, if the IOMMU is on.
    pub iommu_group: Option<u32>,
    /// The BARs that have an address range, in index order.
    pub bars: Vec<BarInfo>,
    /// The NUMA node the device is attached to, if the machine has more than one.
    pub numa_node: Option<i32>,
}

impl PciDevice {
    /// A short name for the device's class, such as `"Mass storage controller: NVM Express"`;
    /// `"Unclassified device"` for classes without a name.
    pub fn class_name(&self) -> &'static str {
        class_name(self.class_code)
    }
}

/// One base address register's range, as the kernel assigned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// BAR number, 0–5. A 64-bit BAR uses two registers and is listed under the first.
    pub index: u8,
    /// Physical (bus) start address.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Address space and width.
    pub kind: BarKind,
    /// Whether reads have no side effects, so the range may be mapped write-combining.
    pub prefetchable: bool,
}

/// The address space a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BarKind {
    /// Memory space, below 4 GiB.
    Memory32,
    /// Memory space, anywhere in 64 bits.
    Memory64,
    /// I/O port space.
    Io,
}

/// Resource flags in sysfs `resource` (include/linux/ioport.h).
mod resource_flags {
    pub const IO: u64 = 0x100;
    pub const MEM: u64 = 0x200;
    pub const PREFETCH: u64 = 0x2000;
    pub const MEM_64: u64 = 0x10_0000;
}

/// The number of BARs in a type 0 header; further `resource` lines are the ROM and bridge windows.
const BAR_COUNT: usize = 6;

impl Sysfs {
    /// The running machine's sysfs at `/sys`.
    pub fn system() -> Self {
        Sysfs {
            root: PathBuf::from("/sys"),
            mountinfo: PathBuf::from(SYSTEM_MOUNTINFO),
            state_dir: PathBuf::from(SYSTEM_STATE_DIR),
        }
    }

    /// A sysfs tree at `root`. Mounts are still read from `/proc/self/mountinfo` and
    /// binding state kept in `/run/ring3` unless changed with [`Sysfs::with_mountinfo`]
    /// and [`Sysfs::with_state_dir`].
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Sysfs {
            root: root.into(),
            ..Sysfs::system()
        }
    }

    /// Reads mounts from `path` (in `/proc/self/mountinfo` format) instead.
    pub fn with_mountinfo(mut self, path: impl Into<PathBuf>) -> Self {
        self.mountinfo = path.into();
        self
    }

    /// Keeps the record of each bound device's original driver in `dir` instead.
    pub fn with_state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = dir.into();
        self
    }

    /// The root of the sysfs tree.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The device's directory, `<root>/bus/pci/devices/<address>` (which may not exist).
    pub fn device_path(&self, address: PciAddress) -> PathBuf {
        self.pci_bus_path()
            .join("devices")
            .join(address.to_string())
    }

    pub(super) fn pci_bus_path(&self) -> PathBuf {
        self.root.join("bus/pci")
    }

    /// Every PCI device, sorted by address.
    pub fn devices(&self) -> Result<Vec<PciDevice>> {
        let dir = self.pci_bus_path().join("devices");
        let entries = fs::read_dir(&dir).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                Error::Unavailable {
                    what: format!("no PCI bus in sysfs: {} does not exist", dir.display()),
                    fix:
                        "mount sysfs at /sys (`mount -t sysfs sysfs /sys`); a machine or container \
                          without PCI has no devices to drive"
                            .into(),
                }
            } else {
                Error::path("listing PCI devices in", &dir, source)
            }
        })?;
        let mut devices = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::path("listing PCI devices in", &dir, e))?;
            let name = entry.file_name();
            let Some(address) = name
                .to_str()
                .and_then(|name| name.parse::<PciAddress>().ok())
            else {
                // Domains wider than 16 bits (Intel VMD) and stray entries: not ours to drive.
                tracing::debug!(entry = ?name, "skipping a sysfs PCI entry that is not a PCI address");
                continue;
            };
            match self.device(address) {
                Ok(device) => devices.push(device),
                // Removed (hot unplug) while we were listing.
                Err(Error::NoSuchDevice { .. }) => continue,
                Err(error) => return Err(error),
            }
        }
        devices.sort_by_key(|device| device.address);
        Ok(devices)
    }

    /// The device at `address`, or [`Error::NoSuchDevice`].
    pub fn device(&self, address: PciAddress) -> Result<PciDevice> {
        let dir = self.device_path(address);
        let no_such_device = || Error::NoSuchDevice {
            address: address.to_string(),
        };
        match fs::symlink_metadata(&dir) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(no_such_device()),
            Err(e) => return Err(Error::path("reading", &dir, e)),
        }
        let vendor = dir.join("vendor");
        let vendor_id = match read_hex(&vendor, HEX16) {
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                // The directory went away under us.
                return Err(no_such_device());
            }
            result => result?,
        };
        let class_code = read_hex(&dir.join("class"), HEX24)?;
        if class_code > 0xff_ffff {
            return Err(malformed(
                &dir.join("class"),
                &format!("{class_code:#x}"),
                HEX24,
            ));
        }
        Ok(PciDevice {
            address,
            vendor_id,
            device_id: read_hex(&dir.join("device"), HEX16)?,
            subsystem_vendor_id: read_optional_hex(&dir.join("subsystem_vendor"), HEX16)?
                .unwrap_or(0),
            subsystem_id: read_optional_hex(&dir.join("subsystem_device"), HEX16)?.unwrap_or(0),
            class_code,
            revision: read_optional_hex(&dir.join("revision"), HEX8)?.unwrap_or(0),
            driver: link_name(&dir.join("driver"))?,
            iommu_group: read_iommu_group(&dir.join("iommu_group"))?,
            bars: read_bars(&dir.join("resource"))?,
            numa_node: read_numa_node(&dir.join("numa_node"))?,
        })
    }

    /// The PCI devices in IOMMU group `group`, sorted by address.
    pub fn iommu_group_devices(&self, group: u32) -> Result<Vec<PciAddress>> {
        let dir = self
            .root
            .join("kernel/iommu_groups")
            .join(group.to_string())
            .join("devices");
        let entries = fs::read_dir(&dir).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                Error::Unavailable {
                    what: format!(
                        "IOMMU group {group} does not exist ({} is missing)",
                        dir.display()
                    ),
                    fix: "`ring3 list` shows each device's IOMMU group".into(),
                }
            } else {
                Error::path("listing the members of IOMMU group in", &dir, source)
            }
        })?;
        let mut members = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| Error::path("listing IOMMU group members in", &dir, e))?;
            match entry.file_name().to_str().map(str::parse::<PciAddress>) {
                Some(Ok(address)) => members.push(address),
                // Non-PCI members (platform devices) can share a group on some machines.
                _ => {
                    tracing::debug!(entry = ?entry.file_name(), group, "skipping a non-PCI IOMMU group member")
                }
            }
        }
        members.sort();
        Ok(members)
    }

    /// Whether kernel module `name` is loaded (or built in with parameters):
    /// `<root>/module/<name>` exists, with `-` in the name read as `_`.
    pub fn module_loaded(&self, name: &str) -> bool {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return false;
        }
        self.root
            .join("module")
            .join(name.replace('-', "_"))
            .exists()
    }
}

/// What a sysfs ID file holds, for error messages.
const HEX8: &str = "an 8-bit hex number such as 0x01";
const HEX16: &str = "a 16-bit hex number such as 0x8086";
const HEX24: &str = "a 24-bit hex class code such as 0x010802";

pub(super) fn malformed(path: &Path, found: &str, expected: &'static str) -> Error {
    Error::MalformedFile {
        path: path.to_path_buf(),
        found: found.to_string(),
        expected,
    }
}

/// Reads a text file; `Ok(None)` if it does not exist.
pub(super) fn read_optional(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            Err(malformed(path, "<not UTF-8>", "text"))
        }
        Err(e) => Err(Error::path("reading", path, e)),
    }
}

/// Parses `0x`-prefixed hex as sysfs writes it (`"0x8086\n"`).
pub(super) fn parse_hex<T: TryFrom<u64>>(
    path: &Path,
    text: &str,
    expected: &'static str,
) -> Result<T> {
    let trimmed = text.trim();
    trimmed
        .strip_prefix("0x")
        .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|digits| u64::from_str_radix(digits, 16).ok())
        .and_then(|value| T::try_from(value).ok())
        .ok_or_else(|| malformed(path, trimmed, expected))
}

fn read_hex<T: TryFrom<u64>>(path: &Path, expected: &'static str) -> Result<T> {
    match fs::read_to_string(path) {
        Ok(text) => parse_hex(path, &text, expected),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            Err(malformed(path, "<not UTF-8>", expected))
        }
        Err(e) => Err(Error::path("reading", path, e)),
    }
}

fn read_optional_hex<T: TryFrom<u64>>(path: &Path, expected: &'static str) -> Result<Option<T>> {
    read_optional(path)?
        .map(|text| parse_hex(path, &text, expected))
        .transpose()
}

/// The last component of symlink `path`'s target (a driver's or group's name);
/// `Ok(None)` if there is no such link.
pub(super) fn link_name(path: &Path) -> Result<Option<String>> {
    let target = match fs::read_link(path) {
        Ok(target) => target,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::path("reading the link", path, e)),
    };
    let name = target
        .file_name()
        .and_then(|name| name.to_str())
        .filter(|name| !name.is_empty())
        .ok_or_else(|| {
            malformed(
                path,
                &target.display().to_string(),
                "a link to a named directory",
            )
        })?;
    Ok(Some(name.to_string()))
}

fn read_iommu_group(path: &Path) -> Result<Option<u32>> {
    link_name(path)?
        .map(|name| {
            name.parse::<u32>()
                .map_err(|_| malformed(path, &name, "a link to kernel/iommu_groups/<number>"))
        })
        .transpose()
}

fn read_numa_node(path: &Path) -> Result<Option<i32>> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    let node = text
        .trim()
        .parse::<i32>()
        .map_err(|_| malformed(path, text.trim(), "a NUMA node number, or -1"))?;
    Ok((node >= 0).then_some(node))
}

fn read_bars(path: &Path) -> Result<Vec<BarInfo>> {
    match read_optional(path)? {
        Some(text) => parse_bars(path, &text),
        None => Ok(Vec::new()),
    }
}

/// Parses sysfs `resource`: one `0x<start> 0x<end> 0x<flags>` line per resource, the BARs first.
pub(super) fn parse_bars(path: &Path, text: &str) -> Result<Vec<BarInfo>> {
    const EXPECTED: &str = "lines of `0x<start> 0x<end> 0x<flags>`";
    let mut bars = Vec::new();
    for (index, line) in (0u8..).zip(text.lines().take(BAR_COUNT)) {
        let bad_line = || malformed(path, line, EXPECTED);
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [start, end, flags] = fields.as_slice() else {
            return Err(bad_line());
        };
        let start: u64 = parse_hex(path, start, EXPECTED).map_err(|_| bad_line())?;
        let end: u64 = parse_hex(path, end, EXPECTED).map_err(|_| bad_line())?;
        let flags: u64 = parse_hex(path, flags, EXPECTED).map_err(|_| bad_line())?;
        if start == 0 && end == 0 {
            continue;
        }
        let size = end
            .checked_sub(start)
            .and_then(|span| span.checked_add(1))
            .ok_or_else(bad_line)?;
        let kind = if flags & resource_flags::IO != 0 {
            BarKind::Io
        } else if flags & resource_flags::MEM != 0 {
            if flags & resource_flags::MEM_64 != 0 {
                BarKind::Memory64
            } else {
                BarKind::Memory32
            }
        } else {
            continue;
        };
        bars.push(BarInfo {
            index,
            start,
            size,
            kind,
            prefetchable: flags & resource_flags::PREFETCH != 0,
        });
    }
    Ok(bars)
}
