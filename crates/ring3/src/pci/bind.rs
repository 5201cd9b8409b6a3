//! Binding devices to vfio-pci and giving them back to their original drivers.
//!
//! The kernel interface (Documentation/ABI/testing/sysfs-bus-pci):
//! - `<device>/driver_override`: the only driver that may take the device from now on
//!   (`"\n"` clears it);
//! - `<device>/driver/unbind`: writing the address detaches the device from its driver;
//! - `bus/pci/drivers_probe`: writing the address makes the kernel find a driver for it;
//! - `bus/pci/drivers/<name>/bind`: writing the address offers the device to one driver.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use super::address::PciAddress;
use super::device::{link_name, malformed, parse_hex, read_optional, PciDevice, Sysfs};
use crate::error::{Error, Result};

/// The driver that hands devices to user space.
const VFIO_PCI: &str = "vfio-pci";

/// Drivers that may hold the other devices of a group while one of them is used through
/// VFIO: the kernel's own list of drivers that leave a group viable
/// (`vfio_pci_core`'s `vfio_pci_dev_below_slot`/`vfio_dev_driver_allowed`).
const GROUP_SAFE_DRIVERS: [&str; 3] = [VFIO_PCI, "pcieport", "pci-stub"];

/// How long a probe may take to show in sysfs.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How deep to look below a PCI device for its block devices and network interfaces:
/// a SATA partition sits at `ata1/host0/target0:0:0/0:0:0:0/block/sda/sda1`.
const MAX_CLASS_DEVICE_DEPTH: usize = 12;

/// What [`Sysfs::bind_to_vfio`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindOutcome {
    /// The device was already bound to vfio-pci; nothing changed.
    AlreadyBound,
    /// The device is now bound to vfio-pci; before, it was bound to `previous_driver`.
    Bound { previous_driver: Option<String> },
}

/// What [`Sysfs::unbind_from_vfio`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnbindOutcome {
    /// The device was not bound to vfio-pci (but to `driver`, if any); nothing changed.
    NotBound { driver: Option<String> },
    /// The device left vfio-pci and is now bound to `driver` (`None`: no driver took it).
    Released { driver: Option<String> },
}

/// A reason a device is in use by the running system.
#[derive(Debug, PartialEq, Eq)]
enum Usage {
    Mounted {
        block: String,
        mount_points: Vec<String>,
    },
    Held {
        block: String,
        holder: String,
    },
    InterfaceUp {
        interface: String,
    },
}

impl Usage {
    fn describe(&self) -> String {
        match self {
            Usage::Mounted {
                block,
                mount_points,
            } => {
                // Bind mounts can repeat a device many times; a few show the point.
                const SHOWN: usize = 3;
                let mut places = mount_points
                    .iter()
                    .take(SHOWN)
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ");
                if mount_points.len() > SHOWN {
                    places.push_str(&format!(" and {} more", mount_points.len() - SHOWN));
                }
                format!("/dev/{block} is mounted on {places}: unmount it first")
            }
            Usage::Held { block, holder } => {
                format!("/dev/{block} is used by {holder} (device mapper, RAID or LVM): stop {holder} first")
            }
            Usage::InterfaceUp { interface } => format!(
                "network interface {interface} is up: take it down first (`ip link set {interface} down`)"
            ),
        }
    }
}

/// A block device or network interface found below a PCI device.
#[derive(Debug)]
struct ClassDevice {
    class: DeviceClass,
    name: String,
    dir: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceClass {
    Block,
    Net,
}

/// One line of mountinfo: what is mounted where (proc(5)).
#[derive(Debug)]
struct Mount {
    device_number: String,
    mount_point: String,
    source: String,
}

impl Sysfs {
    /// Binds the device at `address` to vfio-pci, so that a ring3 driver can open it.
    ///
    /// Refuses ([`Error::Busy`]) when another device in its IOMMU group is bound to a
    /// driver that keeps the group from VFIO, and, unless `force`, when the device is in
    /// use: one of its block devices is mounted or held by device mapper / RAID, or one
    /// of its network interfaces is up. The original driver's name is kept in the state
    /// directory so that [`Sysfs::unbind_from_vfio`] — from any process — can give the
    /// device back. Needs root.
    pub fn bind_to_vfio(&self, address: PciAddress, force: bool) -> Result<BindOutcome> {
        // A wrong address is the first thing to tell about, as VfioBackend::open does.
        let device = self.device(address)?;
        if !self.module_loaded(VFIO_PCI) {
            return Err(Error::ModuleMissing { module: VFIO_PCI });
        }
        if device.driver.as_deref() == Some(VFIO_PCI) {
            return Ok(BindOutcome::AlreadyBound);
        }
        self.check_can_bind(&device, force)?;

        let previous_driver = device.driver.clone();
        if let Some(driver) = &previous_driver {
            self.remember_original_driver(address, driver)?;
        }
        let dir = self.device_path(address);
        tracing::info!(%address, from = ?previous_driver, "binding to vfio-pci");
        if let Err(error) = write_attribute(&dir.join("driver_override"), VFIO_PCI) {
            // Nothing changed on the device; only the record needs undoing.
            if let Err(forget_error) = self.forget_original_driver(address) {
                tracing::warn!(%address, error = %forget_error, "could not remove the original-driver record");
            }
            return Err(error);
        }
        let result = self.detach_and_probe_vfio(address, &dir, previous_driver.is_some());
        if let Err(error) = result {
            self.roll_back_bind(address);
            return Err(error);
        }
        Ok(BindOutcome::Bound { previous_driver })
    }

    /// Gives a device bound to vfio-pci back to the driver it had before
    /// [`Sysfs::bind_to_vfio`] (or, if ring3 did not record one, to whichever driver the
    /// kernel matches).
    ///
    /// While a process has the device open through VFIO, the kernel's unbind waits
    /// (inside the write to `driver/unbind`) until that process closes it; vfio-pci asks
    /// the process to let go through the device's request interrupt. So this call can
    /// block for as long as the device's user keeps it. Needs root.
    pub fn unbind_from_vfio(&self, address: PciAddress) -> Result<UnbindOutcome> {
        let device = self.device(address)?;
        if device.driver.as_deref() != Some(VFIO_PCI) {
            return Ok(UnbindOutcome::NotBound {
                driver: device.driver,
            });
        }
        let original = self.original_driver(address)?;
        let dir = self.device_path(address);
        let name = address.to_string();
        tracing::info!(%address, to = ?original, "releasing from vfio-pci");
        write_attribute(&dir.join("driver_override"), "\n")?;
        // Blocks while a process holds the device open (see above).
        write_attribute(&dir.join("driver/unbind"), &name)?;
        write_attribute(&self.pci_bus_path().join("drivers_probe"), &name)?;
        let result = self.await_original_driver(address, &dir, original.as_deref());
        // The device has left vfio-pci either way; the record has served its purpose.
        self.forget_original_driver(address)?;
        result.map(|driver| UnbindOutcome::Released { driver })
    }

    fn detach_and_probe_vfio(&self, address: PciAddress, dir: &Path, bound: bool) -> Result<()> {
        let name = address.to_string();
        if bound {
            write_attribute(&dir.join("driver/unbind"), &name)?;
        }
        write_attribute(&self.pci_bus_path().join("drivers_probe"), &name)?;
        let driver = wait_for_driver(dir, |driver| driver == Some(VFIO_PCI))?;
        if driver.as_deref() == Some(VFIO_PCI) {
            return Ok(());
        }
        Err(Error::Unavailable {
            what: format!(
                "{address} is bound to {} after probing, not to vfio-pci",
                driver.as_deref().unwrap_or("no driver")
            ),
            fix: "the kernel log (`dmesg`) says why vfio-pci did not take it; vfio-pci takes \
                  only endpoint devices, not bridges"
                .into(),
        })
    }

    /// After a failed bind: lets the original driver have the device again.
    fn roll_back_bind(&self, address: PciAddress) {
        let dir = self.device_path(address);
        tracing::warn!(%address, "binding to vfio-pci failed; giving the device back");
        if let Err(error) = write_attribute(&dir.join("driver_override"), "\n") {
            tracing::warn!(%address, %error, "could not clear driver_override");
        }
        if matches!(link_name(&dir.join("driver")), Ok(None)) {
            let probe = self.pci_bus_path().join("drivers_probe");
            if let Err(error) = write_attribute(&probe, &address.to_string()) {
                tracing::warn!(%address, %error, "could not reprobe the device");
            }
        }
        if let Err(error) = self.forget_original_driver(address) {
            tracing::warn!(%address, %error, "could not remove the original-driver record");
        }
    }

    /// Waits for the kernel's probe to bind the device; offers it to `original` itself
    /// if no driver took it.
    fn await_original_driver(
        &self,
        address: PciAddress,
        dir: &Path,
        original: Option<&str>,
    ) -> Result<Option<String>> {
        let Some(original) = original else {
            // No record: whatever the kernel matched (maybe nothing) is the answer.
            return wait_for_driver(dir, |driver| driver.is_some_and(|d| d != VFIO_PCI));
        };
        let driver = wait_for_driver(dir, |driver| driver == Some(original))?;
        if driver.is_some() {
            return Ok(driver);
        }
        let bind = self
            .pci_bus_path()
            .join("drivers")
            .join(original)
            .join("bind");
        if !bind.exists() {
            return Err(Error::Unavailable {
                what: format!(
                    "{address} left vfio-pci, but its original driver {original} is not loaded"
                ),
                fix: format!(
                    "as root: `modprobe {original}`, then `echo {address} > /sys/bus/pci/drivers/{original}/bind`"
                ),
            });
        }
        write_attribute(&bind, &address.to_string())?;
        let driver = wait_for_driver(dir, |driver| driver.is_some())?;
        if driver.is_none() {
            return Err(Error::Unavailable {
                what: format!("{address} left vfio-pci, but {original} did not take it back"),
                fix: "the kernel log (`dmesg`) says why".into(),
            });
        }
        Ok(driver)
    }

    /// Err(Busy) if binding `device` would take it from the running system or cannot
    /// work because of its IOMMU group.
    pub(super) fn check_can_bind(&self, device: &PciDevice, force: bool) -> Result<()> {
        let address = device.address;
        let group = device.iommu_group.ok_or_else(|| Error::Unavailable {
            what: format!("no IOMMU group for {address}"),
            fix: "boot with intel_iommu=on (or amd_iommu=on) and enable VT-d/AMD-Vi in firmware"
                .into(),
        })?;
        for member in self.iommu_group_devices(group)? {
            if member == address {
                continue;
            }
            let driver = link_name(&self.device_path(member).join("driver"))?;
            if let Some(driver) = driver.filter(|d| !GROUP_SAFE_DRIVERS.contains(&d.as_str())) {
                return Err(Error::Busy {
                    address: address.to_string(),
                    reason: format!(
                        "{member}, in the same IOMMU group {group}, is bound to {driver}, and VFIO \
                         can only use a whole group: bind it to vfio-pci too (`ring3 bind {member}`) \
                         or unbind it from {driver}"
                    ),
                });
            }
        }
        if force {
            return Ok(());
        }
        let usages = self.usages(address)?;
        if usages.is_empty() {
            return Ok(());
        }
        let reasons: Vec<String> = usages.iter().map(Usage::describe).collect();
        Err(Error::Busy {
            address: address.to_string(),
            reason: format!(
                "{}; or pass --force to bind it anyway (its users lose it)",
                reasons.join("; ")
            ),
        })
    }

    /// How the running system uses the device: mounted or held block devices, and
    /// network interfaces that are up.
    fn usages(&self, address: PciAddress) -> Result<Vec<Usage>> {
        let mut class_devices = Vec::new();
        find_class_devices(&self.device_path(address), 0, &mut class_devices)?;
        let has_block_devices = class_devices
            .iter()
            .any(|class_device| class_device.class == DeviceClass::Block);
        let mounts = if has_block_devices {
            read_mounts(&self.mountinfo)?
        } else {
            Vec::new()
        };
        let mut usages = Vec::new();
        for class_device in &class_devices {
            match class_device.class {
                DeviceClass::Block => block_usages(class_device, &mounts, &mut usages)?,
                DeviceClass::Net => {
                    if interface_is_up(&class_device.dir)? {
                        usages.push(Usage::InterfaceUp {
                            interface: class_device.name.clone(),
                        });
                    }
                }
            }
        }
        Ok(usages)
    }

    fn state_path(&self, address: PciAddress) -> PathBuf {
        self.state_dir.join(address.to_string())
    }

    fn remember_original_driver(&self, address: PciAddress, driver: &str) -> Result<()> {
        fs::create_dir_all(&self.state_dir)
            .map_err(|e| Error::path("creating", &self.state_dir, e))?;
        let path = self.state_path(address);
        fs::write(&path, format!("{driver}\n")).map_err(|e| Error::path("writing", &path, e))
    }

    /// The driver recorded by an earlier bind, if any.
    fn original_driver(&self, address: PciAddress) -> Result<Option<String>> {
        let path = self.state_path(address);
        let Some(text) = read_optional(&path)? else {
            return Ok(None);
        };
        let name = text.trim();
        if !is_driver_name(name) {
            return Err(malformed(
                &path,
                name,
                "a kernel driver name (delete the file if it is stale)",
            ));
        }
        Ok(Some(name.to_string()))
    }

    fn forget_original_driver(&self, address: PciAddress) -> Result<()> {
        let path = self.state_path(address);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::path("removing", &path, e)),
        }
    }
}

/// A name that can be a directory under `bus/pci/drivers`.
fn is_driver_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Writes `value` to sysfs attribute `path` in one write, as the kernel expects.
fn write_attribute(path: &Path, value: &str) -> Result<()> {
    let what = format!("writing {:?} to", value.trim_end());
    let mut file = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::path(&what, path, e))?;
    file.write_all(value.as_bytes())
        .map_err(|e| Error::path(&what, path, e))
}

/// Polls the device's driver link until `done` accepts it or [`PROBE_TIMEOUT`] passes;
/// returns the last driver seen.
fn wait_for_driver(dir: &Path, done: impl Fn(Option<&str>) -> bool) -> Result<Option<String>> {
    let deadline = Instant::now() + PROBE_TIMEOUT;
    loop {
        let driver = link_name(&dir.join("driver"))?;
        if done(driver.as_deref()) || Instant::now() >= deadline {
            return Ok(driver);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Collects the block devices (with partitions) and network interfaces below `dir`.
///
/// Their directories sit at different depths (`nvme/nvme0/nvme0n1`, `virtio1/block/vda`,
/// `net/eth0`), so this walks real directories, not symlinks, which would lead out of
/// the device's subtree.
fn find_class_devices(dir: &Path, depth: usize, found: &mut Vec<ClassDevice>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        // Gone (hot unplug, an interface renamed) while we looked.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::path("reading", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::path("reading", dir, e))?;
        let is_dir = entry
            .file_type()
            .map_err(|e| Error::path("reading", entry.path(), e))?
            .is_dir();
        if !is_dir {
            continue;
        }
        let path = entry.path();
        if let Some(class) = class_of(&path)? {
            if let Some(name) = entry.file_name().to_str() {
                found.push(ClassDevice {
                    class,
                    name: name.to_string(),
                    dir: path.clone(),
                });
            }
        }
        if depth < MAX_CLASS_DEVICE_DEPTH {
            find_class_devices(&path, depth + 1, found)?;
        }
    }
    Ok(())
}

/// Block or net, from the `subsystem` link (`../../class/block`), or failing that from
/// the parent directory's name (`block/sda`, `net/eth0`).
fn class_of(dir: &Path) -> Result<Option<DeviceClass>> {
    let name = match link_name(&dir.join("subsystem"))? {
        Some(subsystem) => Some(subsystem),
        None => dir
            .parent()
            .and_then(Path::file_name)
            .and_then(|name| name.to_str())
            .map(str::to_string),
    };
    Ok(match name.as_deref() {
        Some("block") => Some(DeviceClass::Block),
        Some("net") => Some(DeviceClass::Net),
        _ => None,
    })
}

fn block_usages(block: &ClassDevice, mounts: &[Mount], usages: &mut Vec<Usage>) -> Result<()> {
    let device_number = read_optional(&block.dir.join("dev"))?.map(|text| text.trim().to_string());
    let source = format!("/dev/{}", block.name);
    let mut mount_points: Vec<String> = Vec::new();
    for mount in mounts {
        let same_number = device_number.as_deref() == Some(mount.device_number.as_str());
        if (same_number || mount.source == source) && !mount_points.contains(&mount.mount_point) {
            mount_points.push(mount.mount_point.clone());
        }
    }
    if !mount_points.is_empty() {
        usages.push(Usage::Mounted {
            block: block.name.clone(),
            mount_points,
        });
    }
    let holders = block.dir.join("holders");
    if let Ok(entries) = fs::read_dir(&holders) {
        for entry in entries {
            let entry = entry.map_err(|e| Error::path("reading", &holders, e))?;
            usages.push(Usage::Held {
                block: block.name.clone(),
                holder: entry.file_name().to_string_lossy().into_owned(),
            });
        }
    }
    Ok(())
}

fn interface_is_up(dir: &Path) -> Result<bool> {
    /// IFF_UP in `<interface>/flags` (include/uapi/linux/if.h).
    const IFF_UP: u64 = 0x1;
    let flags_path = dir.join("flags");
    if let Some(flags) = read_optional(&flags_path)? {
        let flags = parse_hex::<u64>(&flags_path, &flags, "interface flags such as 0x1003")?;
        return Ok(flags & IFF_UP != 0);
    }
    let operstate = read_optional(&dir.join("operstate"))?;
    Ok(operstate.is_some_and(|state| state.trim() == "up"))
}

/// Reads mountinfo (proc(5)): `id parent major:minor root mount-point options
/// [optional fields...] - fstype source super-options`.
fn read_mounts(path: &Path) -> Result<Vec<Mount>> {
    const EXPECTED: &str = "mountinfo lines such as `36 35 98:0 / /mnt rw - ext4 /dev/sda1 rw`";
    let text = fs::read_to_string(path).map_err(|e| Error::path("reading", path, e))?;
    let mut mounts = Vec::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let fields: Vec<&str> = line.split(' ').collect();
        let separator = fields.iter().position(|field| *field == "-");
        let (Some(separator), Some(device_number), Some(mount_point)) =
            (separator, fields.get(2), fields.get(4))
        else {
            return Err(malformed(path, line, EXPECTED));
        };
        let Some(source) = fields.get(separator + 2).filter(|_| separator >= 6) else {
            return Err(malformed(path, line, EXPECTED));
        };
        mounts.push(Mount {
            device_number: device_number.to_string(),
            mount_point: mount_point.to_string(),
            source: source.to_string(),
        });
    }
    Ok(mounts)
}
