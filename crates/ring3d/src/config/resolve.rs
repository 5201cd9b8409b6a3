//! Finding each configured device on this machine, without touching any of them.

use std::collections::HashMap;
use std::fmt;

use ring3::pci::{PciAddress, PciDevice, Sysfs};

use super::{Config, DeviceConfig, DeviceSelector, DriverConfig, Exposure};
use crate::error::{ConfigError, ConfigErrors};

/// What the daemon will do: for each configured device, the PCI device it resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// One entry per `[[device]]`, in file order.
    pub devices: Vec<PlannedDevice>,
}

/// Where a planned device is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceAddress {
    /// The PCI device at this address.
    Pci(PciAddress),
    /// The USB device this address names, looked up each time its driver starts: USB
    /// devices come and go, and come back under another device number.
    Usb(ring3_usb::UsbAddress),
}

impl DeviceAddress {
    /// The PCI address, for a PCI device.
    pub fn pci(&self) -> Option<PciAddress> {
        match self {
            DeviceAddress::Pci(address) => Some(*address),
            DeviceAddress::Usb(_) => None,
        }
    }
}

impl fmt::Display for DeviceAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceAddress::Pci(address) => write!(f, "{address}"),
            DeviceAddress::Usb(address) => write!(f, "usb {address}"),
        }
    }
}

/// A configured device found on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedDevice {
    /// The configured name.
    pub name: String,
    /// The device it resolved to.
    pub address: DeviceAddress,
    /// Its vendor ID.
    pub vendor_id: u16,
    /// Its device ID.
    pub device_id: u16,
    /// The kernel driver bound to it now (which `ring3d` will unbind), if any.
    pub current_driver: Option<String>,
    /// The driver to run on it, with its options.
    pub driver: DriverConfig,
    /// How it will be exposed.
    pub expose: Exposure,
    /// USB devices: whether a kernel driver bound to the interface may be detached.
    pub force: bool,
}

impl fmt::Display for PlannedDevice {
    /// `fast0: 0000:03:00.0 (1b36:0010, now nvme) -> nvme (queues 4, …) exposed as ublk`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let DeviceAddress::Usb(address) = &self.address {
            return write!(
                f,
                "{}: usb {address} (looked up when its driver starts{}) -> {} exposed as {}",
                self.name,
                if self.force {
                    "; a kernel driver on it is detached"
                } else {
                    ""
                },
                self.driver,
                self.expose
            );
        }
        write!(
            f,
            "{}: {} ({:04x}:{:04x}, kernel driver {}) -> {} exposed as {}",
            self.name,
            self.address,
            self.vendor_id,
            self.device_id,
            self.current_driver.as_deref().unwrap_or("none"),
            self.driver,
            self.expose
        )
    }
}

impl fmt::Display for Plan {
    /// One device per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, device) in self.devices.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{device}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Finds every configured device in `sysfs` ([`Sysfs::system`] on a real machine).
    /// Only reads: nothing is bound, unbound or opened.
    ///
    /// Fails, listing every problem, if a `pci` address has no device, a `match` finds no
    /// device or several (without an `index` to choose), a device is not of the kind its
    /// driver drives, or two entries resolve to the same device.
    pub fn resolve(&self, sysfs: &Sysfs) -> Result<Plan, ConfigErrors> {
        let devices = sysfs.devices().map_err(|error| {
            ConfigError::new(
                &self.path,
                None,
                format!("cannot list the PCI devices of this machine: {error}"),
            )
        })?;
        self.resolve_against(&devices)
    }

    /// Like [`Config::resolve`], against a given list of PCI devices (such as
    /// [`Sysfs::devices`] returns).
    pub fn resolve_against(&self, pci_devices: &[PciDevice]) -> Result<Plan, ConfigErrors> {
        let mut sorted: Vec<&PciDevice> = pci_devices.iter().collect();
        sorted.sort_by_key(|device| device.address);
        let mut errors = Vec::new();
        let mut planned = Vec::new();
        let mut taken: HashMap<PciAddress, &DeviceConfig> = HashMap::new();
        for device in &self.devices {
            if let DeviceSelector::Usb(address) = &device.selector {
                planned.push(PlannedDevice {
                    name: device.name.clone(),
                    address: DeviceAddress::Usb(address.clone()),
                    vendor_id: 0,
                    device_id: 0,
                    current_driver: None,
                    driver: device.driver.clone(),
                    expose: device.expose,
                    force: device.force,
                });
                continue;
            }
            let Some(found) = self.find(device, &sorted, &mut errors) else {
                continue;
            };
            let error = |message: String| {
                ConfigError::new(&self.path, Some(device.selector_location), message)
            };
            let driver = device.driver.driver();
            let class_code = driver.class_code().unwrap_or_default();
            if found.class_code != class_code {
                errors.push(error(format!(
                    "device {:?}: {} is a {} (class {:06x}), not {} (class {:06x}); name the \
                     right device or the right driver",
                    device.name,
                    found.address,
                    found.class_name(),
                    found.class_code,
                    driver.device_kind(),
                    class_code
                )));
                continue;
            }
            if let Some(ids) = driver.device_ids() {
                if !ids.contains(&(found.vendor_id, found.device_id)) {
                    errors.push(error(format!(
                        "device {:?}: {} is {:04x}:{:04x}, not {}; name the right device or \
                         the right driver",
                        device.name,
                        found.address,
                        found.vendor_id,
                        found.device_id,
                        driver.device_kind(),
                    )));
                    continue;
                }
            }
            if let Some(first) = taken.get(&found.address) {
                errors.push(error(format!(
                    "device {:?}: {} resolves to {}, which device {:?} (line {}) already uses; \
                     each device can be driven only once",
                    device.name, device.selector, found.address, first.name, first.location.line
                )));
                continue;
            }
            taken.insert(found.address, device);
            planned.push(PlannedDevice {
                name: device.name.clone(),
                address: DeviceAddress::Pci(found.address),
                vendor_id: found.vendor_id,
                device_id: found.device_id,
                current_driver: found.driver.clone(),
                driver: device.driver.clone(),
                expose: device.expose,
                force: false,
            });
        }
        if errors.is_empty() {
            Ok(Plan { devices: planned })
        } else {
            Err(ConfigErrors::new(errors))
        }
    }

    /// The one PCI device `device` selects, or a report of why there is none.
    fn find<'d>(
        &self,
        device: &DeviceConfig,
        sorted: &[&'d PciDevice],
        errors: &mut Vec<ConfigError>,
    ) -> Option<&'d PciDevice> {
        let mut fail = |message: String| {
            errors.push(ConfigError::new(
                &self.path,
                Some(device.selector_location),
                format!("device {:?}: {message}", device.name),
            ));
            None
        };
        match device.selector {
            DeviceSelector::Usb(_) => None,
            DeviceSelector::Address(address) => {
                match sorted.iter().find(|found| found.address == address) {
                    Some(found) => Some(*found),
                    None => fail(format!(
                        "no PCI device at {address} on this machine; `ring3 list` shows the \
                         devices there are"
                    )),
                }
            }
            DeviceSelector::Match {
                vendor_id,
                device_id,
                index,
            } => {
                let matching: Vec<&PciDevice> = sorted
                    .iter()
                    .copied()
                    .filter(|found| found.vendor_id == vendor_id && found.device_id == device_id)
                    .collect();
                let ids = format!("{vendor_id:04x}:{device_id:04x}");
                let addresses = || {
                    matching
                        .iter()
                        .map(|found| found.address.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                match (matching.len(), index) {
                    (0, _) => fail(format!(
                        "no PCI device matches {ids} on this machine; `ring3 list` shows the \
                         devices there are"
                    )),
                    (1, None) => Some(matching[0]),
                    (count, None) => fail(format!(
                        "match {ids} fits {count} devices ({}); add index = N (0 to {}) to \
                         pick one in this order, or name it with pci = ADDRESS",
                        addresses(),
                        count - 1
                    )),
                    (count, Some(index)) => match usize::try_from(index)
                        .ok()
                        .and_then(|index| matching.get(index))
                    {
                        Some(found) => Some(*found),
                        None => fail(format!(
                            "index {index} is out of range: match {ids} fits {count} device{} \
                             ({}), so index is 0 to {}",
                            if count == 1 { "" } else { "s" },
                            addresses(),
                            count - 1
                        )),
                    },
                }
            }
        }
    }
}
