//! Discovery: the USB devices the kernel knows, read from sysfs (`/sys/bus/usb/devices`).
//!
//! Each device is a directory named by its port path (`3-1.2`) with attributes such as
//! `idVendor`, `serial`, `speed`, `devnum` and `descriptors` (the raw descriptors, readable
//! by everyone); each interface of its active configuration is a directory
//! `3-1.2:CONFIG.IFACE` whose `driver` link names the kernel driver bound to it. Root hubs
//! (`usb3`) are not listed: they are part of the host controller.
//!
//! [`Sysfs::at`] reads another directory laid out the same way, which is how the tests
//! run against a fake tree.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::address::{PortPath, UsbAddress};
use crate::descriptor::{self, EndpointDescriptor};
use crate::error::{Result, UsbError};

/// Where the kernel lists USB devices.
pub const SYSFS_USB_DEVICES: &str = "/sys/bus/usb/devices";

/// The signalling rate of a device (sysfs `speed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Speed {
    /// 1.5 Mbit/s (USB 1.x).
    Low,
    /// 12 Mbit/s (USB 1.x).
    Full,
    /// 480 Mbit/s (USB 2.0).
    High,
    /// 5 Gbit/s (USB 3.x).
    Super,
    /// 10 Gbit/s or more (USB 3.1 and later).
    SuperPlus,
}

impl Speed {
    /// From sysfs's `speed` attribute, in Mbit/s ("1.5", "12", "480", "5000", "10000", ...).
    pub fn from_sysfs(text: &str) -> Option<Speed> {
        match text.trim() {
            "1.5" => Some(Speed::Low),
            "12" => Some(Speed::Full),
            "480" => Some(Speed::High),
            "5000" => Some(Speed::Super),
            "10000" | "20000" | "40000" => Some(Speed::SuperPlus),
            _ => None,
        }
    }
}

impl fmt::Display for Speed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Speed::Low => "1.5M",
            Speed::Full => "12M",
            Speed::High => "480M",
            Speed::Super => "5G",
            Speed::SuperPlus => "10G+",
        })
    }
}

/// One endpoint of an interface, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointSummary {
    /// `bEndpointAddress` (0x81: IN 1).
    pub address: u8,
    /// "bulk", "interrupt", "isochronous".
    pub transfer_type: String,
    /// The largest packet, in bytes.
    pub max_packet_size: usize,
}

impl From<&EndpointDescriptor> for EndpointSummary {
    fn from(endpoint: &EndpointDescriptor) -> Self {
        EndpointSummary {
            address: endpoint.address,
            transfer_type: endpoint.transfer_type().to_string(),
            max_packet_size: endpoint.max_packet_bytes(),
        }
    }
}

/// One interface of a device's active configuration, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InterfaceSummary {
    /// `bInterfaceNumber`.
    pub number: u8,
    /// `bAlternateSetting` currently selected.
    pub alternate_setting: u8,
    /// `bInterfaceClass`.
    pub class: u8,
    /// `bInterfaceSubClass`.
    pub subclass: u8,
    /// `bInterfaceProtocol`.
    pub protocol: u8,
    /// The kernel driver bound to it (`usb-storage`; `usbfs` when a process claimed it),
    /// or `None`.
    pub driver: Option<String>,
    /// Its endpoints, from the device's descriptors (empty if they could not be parsed).
    pub endpoints: Vec<EndpointSummary>,
}

/// A USB device, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsbDeviceSummary {
    /// Bus number (`/dev/bus/usb/BBB/...`).
    pub bus: u16,
    /// Device number on the bus (`/dev/bus/usb/.../DDD`); changes at every replug.
    #[serde(rename = "devnum")]
    pub device_number: u16,
    /// Where it is plugged in; also its sysfs name.
    #[serde(serialize_with = "serialize_display")]
    pub port_path: PortPath,
    /// `idVendor` (four hex digits in JSON).
    #[serde(serialize_with = "serialize_hex16")]
    pub vendor_id: u16,
    /// `idProduct` (four hex digits in JSON).
    #[serde(serialize_with = "serialize_hex16")]
    pub product_id: u16,
    /// `bDeviceClass` (0: defined per interface).
    pub class: u8,
    /// `bDeviceSubClass`.
    pub subclass: u8,
    /// `bDeviceProtocol`.
    pub protocol: u8,
    /// Manufacturer string, if the device has one.
    pub manufacturer: Option<String>,
    /// Product string.
    pub product: Option<String>,
    /// Serial number string.
    pub serial: Option<String>,
    /// Signalling rate.
    pub speed: Option<Speed>,
    /// `bConfigurationValue` of the active configuration; `None` if unconfigured.
    pub configuration: Option<u8>,
    /// The interfaces of the active configuration, by number.
    pub interfaces: Vec<InterfaceSummary>,
}

fn serialize_display<S: serde::Serializer>(
    value: &PortPath,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

fn serialize_hex16<S: serde::Serializer>(
    value: &u16,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    serializer.collect_str(&format_args!("{value:04x}"))
}

impl UsbDeviceSummary {
    /// The usbfs node: `/dev/bus/usb/BBB/DDD`.
    pub fn usbfs_path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/dev/bus/usb/{:03}/{:03}",
            self.bus, self.device_number
        ))
    }

    /// Whether `address` names this device.
    pub fn matches(&self, address: &UsbAddress) -> bool {
        address.matches(
            &self.port_path,
            self.vendor_id,
            self.product_id,
            self.serial.as_deref(),
        )
    }

    /// `VID:PID` or `VID:PID:SERIAL`, the address that names this device by what it is.
    pub fn id_address(&self) -> UsbAddress {
        UsbAddress::Ids {
            vendor_id: self.vendor_id,
            product_id: self.product_id,
            serial: self.serial.clone(),
        }
    }

    /// The interface numbered `number`.
    pub fn interface(&self, number: u8) -> Option<&InterfaceSummary> {
        self.interfaces.iter().find(|i| i.number == number)
    }
}

/// A sysfs USB device directory tree: the system's, or a fake one for tests.
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

impl Sysfs {
    /// The system's: `/sys/bus/usb/devices`.
    pub fn system() -> Self {
        Sysfs::at(SYSFS_USB_DEVICES)
    }

    /// A directory laid out like `/sys/bus/usb/devices`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Sysfs { root: root.into() }
    }

    /// The directory of the device at `port_path`.
    pub fn device_dir(&self, port_path: &PortPath) -> PathBuf {
        self.root.join(port_path.to_string())
    }

    /// Every USB device except root hubs, in port-path order. A device that disappears
    /// while being read is left out.
    pub fn devices(&self) -> Result<Vec<UsbDeviceSummary>> {
        let entries = fs::read_dir(&self.root)
            .map_err(|e| UsbError::io("listing USB devices in", &self.root, e))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| UsbError::io("listing USB devices in", &self.root, e))?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        let mut devices = Vec::new();
        for name in &names {
            // Interfaces (`3-1:1.0`) and root hubs (`usb3`) are not devices here.
            let Ok(port_path) = name.parse::<PortPath>() else {
                continue;
            };
            match self.device(&port_path, &names) {
                Ok(device) => devices.push(device),
                Err(error) if is_gone(&error) => continue,
                Err(error) => return Err(UsbError::io("reading", self.root.join(name), error)),
            }
        }
        devices.sort_by(|a, b| a.port_path.cmp(&b.port_path));
        Ok(devices)
    }

    /// The one device `address` names: an error if none does or if several do.
    pub fn find(&self, address: &UsbAddress) -> Result<UsbDeviceSummary> {
        let mut matching: Vec<UsbDeviceSummary> = self
            .devices()?
            .into_iter()
            .filter(|d| d.matches(address))
            .collect();
        match matching.len() {
            0 => Err(UsbError::NotFound {
                address: address.clone(),
            }),
            1 => Ok(matching.remove(0)),
            _ => Err(UsbError::Ambiguous {
                address: address.clone(),
                candidates: matching
                    .iter()
                    .map(|d| format!("{} ({})", d.port_path, d.id_address()))
                    .collect(),
            }),
        }
    }

    /// The kernel driver bound to interface `interface` of the device at `port_path`
    /// in configuration `configuration`, if any.
    pub fn interface_driver(
        &self,
        port_path: &PortPath,
        configuration: u8,
        interface: u8,
    ) -> Option<String> {
        let dir = self
            .root
            .join(format!("{port_path}:{configuration}.{interface}"));
        driver_name(&dir)
    }

    fn device(&self, port_path: &PortPath, names: &[String]) -> io::Result<UsbDeviceSummary> {
        let name = port_path.to_string();
        let dir = self.root.join(&name);
        let hex = |attribute: &str| -> io::Result<u16> {
            let text = read_attribute(&dir, attribute)?;
            u16::from_str_radix(text.trim(), 16).map_err(|_| bad_attribute(&dir, attribute, &text))
        };
        let decimal = |attribute: &str| -> io::Result<u16> {
            let text = read_attribute(&dir, attribute)?;
            text.trim()
                .parse()
                .map_err(|_| bad_attribute(&dir, attribute, &text))
        };
        let optional = |attribute: &str| -> io::Result<Option<String>> {
            match read_attribute(&dir, attribute) {
                Ok(text) => Ok(Some(text.trim_end_matches('\n').to_owned())),
                Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(error) => Err(error),
            }
        };
        let byte = |attribute: &str| -> io::Result<u8> {
            let value = hex(attribute)?;
            u8::try_from(value).map_err(|_| bad_attribute(&dir, attribute, &value.to_string()))
        };
        let configuration = optional("bConfigurationValue")?
            .and_then(|text| text.trim().parse::<u8>().ok())
            .filter(|&value| value != 0);
        // The raw descriptors give each interface's endpoints; a device whose descriptors
        // do not parse is still listed, without endpoints.
        let descriptors = match fs::read(dir.join("descriptors")) {
            Ok(bytes) => descriptor::parse_descriptors(&bytes).ok(),
            Err(_) => None,
        };
        let active = descriptors
            .as_ref()
            .and_then(|(_, configs)| configs.iter().find(|c| Some(c.value) == configuration));

        let prefix = format!("{name}:");
        let mut interfaces = Vec::new();
        for interface_name in names.iter().filter(|n| n.starts_with(&prefix)) {
            let interface_dir = self.root.join(interface_name);
            let attribute = |attribute: &str| -> io::Result<u8> {
                let text = read_attribute(&interface_dir, attribute)?;
                u8::from_str_radix(text.trim(), 16)
                    .map_err(|_| bad_attribute(&interface_dir, attribute, &text))
            };
            let number = attribute("bInterfaceNumber")?;
            // bAlternateSetting is printed in decimal (" 0"), the others in hex.
            let alternate_setting = read_attribute(&interface_dir, "bAlternateSetting")
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .unwrap_or(0);
            let endpoints = active
                .and_then(|config| config.interface(number, alternate_setting))
                .map(|interface| {
                    interface
                        .endpoints
                        .iter()
                        .map(EndpointSummary::from)
                        .collect()
                })
                .unwrap_or_default();
            interfaces.push(InterfaceSummary {
                number,
                alternate_setting,
                class: attribute("bInterfaceClass")?,
                subclass: attribute("bInterfaceSubClass")?,
                protocol: attribute("bInterfaceProtocol")?,
                driver: driver_name(&interface_dir),
                endpoints,
            });
        }
        interfaces.sort_by_key(|i| i.number);

        Ok(UsbDeviceSummary {
            bus: decimal("busnum")?,
            device_number: decimal("devnum")?,
            port_path: port_path.clone(),
            vendor_id: hex("idVendor")?,
            product_id: hex("idProduct")?,
            class: byte("bDeviceClass")?,
            subclass: byte("bDeviceSubClass")?,
            protocol: byte("bDeviceProtocol")?,
            manufacturer: optional("manufacturer")?,
            product: optional("product")?,
            serial: optional("serial")?,
            speed: optional("speed")?.as_deref().and_then(Speed::from_sysfs),
            configuration,
            interfaces,
        })
    }
}

/// The last component of the `driver` link in `dir`.
fn driver_name(dir: &Path) -> Option<String> {
    let target = fs::read_link(dir.join("driver")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

fn read_attribute(dir: &Path, attribute: &str) -> io::Result<String> {
    fs::read_to_string(dir.join(attribute))
}

fn bad_attribute(dir: &Path, attribute: &str, text: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{}/{attribute} holds {:?}, not a number",
            dir.display(),
            text.trim()
        ),
    )
}

/// Whether an error reading a device means it went away meanwhile.
fn is_gone(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::NotFound
        || error.raw_os_error() == Some(rustix::io::Errno::NODEV.raw_os_error())
}

/// All USB devices except root hubs: [`Sysfs::devices`] of the system.
pub fn list_devices() -> Result<Vec<UsbDeviceSummary>> {
    Sysfs::system().devices()
}

/// The one device `address` names: [`Sysfs::find`] of the system.
pub fn find(address: &UsbAddress) -> Result<UsbDeviceSummary> {
    Sysfs::system().find(address)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptor::{ConfigurationDescriptor, DeviceDescriptor, InterfaceDescriptor};
    use std::os::unix::fs::symlink;

    struct FakeDevice<'a> {
        name: &'a str,
        ids: (u16, u16),
        serial: Option<&'a str>,
        devnum: u16,
        /// (interface number, class, driver)
        interfaces: &'a [(u8, u8, Option<&'a str>)],
    }

    fn write(dir: &Path, attribute: &str, value: &str) {
        fs::write(dir.join(attribute), value).unwrap();
    }

    fn add(root: &Path, device: &FakeDevice) {
        let dir = root.join(device.name);
        fs::create_dir_all(&dir).unwrap();
        let bus = device.name.split('-').next().unwrap();
        write(&dir, "busnum", &format!("{bus}\n"));
        write(&dir, "devnum", &format!("{}\n", device.devnum));
        write(&dir, "idVendor", &format!("{:04x}\n", device.ids.0));
        write(&dir, "idProduct", &format!("{:04x}\n", device.ids.1));
        write(&dir, "bDeviceClass", "00\n");
        write(&dir, "bDeviceSubClass", "00\n");
        write(&dir, "bDeviceProtocol", "00\n");
        write(&dir, "speed", "480\n");
        write(&dir, "bConfigurationValue", "1\n");
        write(&dir, "product", "QEMU USB thing\n");
        if let Some(serial) = device.serial {
            write(&dir, "serial", &format!("{serial}\n"));
        }
        let config = ConfigurationDescriptor {
            num_interfaces: device.interfaces.len() as u8,
            value: 1,
            string_index: 0,
            attributes: 0x80,
            max_power: 50,
            interfaces: device
                .interfaces
                .iter()
                .map(|&(number, class, _)| InterfaceDescriptor {
                    number,
                    alternate_setting: 0,
                    num_endpoints: 2,
                    class,
                    subclass: 6,
                    protocol: 0x50,
                    string_index: 0,
                    endpoints: vec![
                        EndpointDescriptor {
                            address: 0x81,
                            attributes: 2,
                            max_packet_size: 512,
                            interval: 0,
                        },
                        EndpointDescriptor {
                            address: 0x02,
                            attributes: 2,
                            max_packet_size: 512,
                            interval: 0,
                        },
                    ],
                })
                .collect(),
        };
        let mut blob = DeviceDescriptor {
            usb_version: 0x200,
            class: 0,
            subclass: 0,
            protocol: 0,
            max_packet_size0: 64,
            vendor_id: device.ids.0,
            product_id: device.ids.1,
            device_version: 0,
            manufacturer_index: 0,
            product_index: 0,
            serial_index: 0,
            num_configurations: 1,
        }
        .to_bytes()
        .to_vec();
        blob.extend_from_slice(&config.to_bytes());
        fs::write(dir.join("descriptors"), blob).unwrap();
        for &(number, class, driver) in device.interfaces {
            let interface = root.join(format!("{}:1.{number}", device.name));
            fs::create_dir_all(&interface).unwrap();
            write(&interface, "bInterfaceNumber", &format!("{number:02x}\n"));
            write(&interface, "bAlternateSetting", " 0\n");
            write(&interface, "bInterfaceClass", &format!("{class:02x}\n"));
            write(&interface, "bInterfaceSubClass", "06\n");
            write(&interface, "bInterfaceProtocol", "50\n");
            if let Some(driver) = driver {
                let target = root.join("drivers").join(driver);
                fs::create_dir_all(&target).unwrap();
                symlink(&target, interface.join("driver")).unwrap();
            }
        }
    }

    fn fake_tree() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        // A root hub, which is not listed.
        fs::create_dir_all(root.path().join("usb3")).unwrap();
        add(
            root.path(),
            &FakeDevice {
                name: "3-1",
                ids: (0x46f4, 0x0001),
                serial: Some("R3RAW"),
                devnum: 2,
                interfaces: &[(0, 8, Some("usb-storage"))],
            },
        );
        add(
            root.path(),
            &FakeDevice {
                name: "3-2",
                ids: (0x46f4, 0x0001),
                serial: Some("R3FAT"),
                devnum: 3,
                interfaces: &[(0, 8, None)],
            },
        );
        add(
            root.path(),
            &FakeDevice {
                name: "3-1.4",
                ids: (0x0403, 0x6001),
                serial: None,
                devnum: 7,
                interfaces: &[(1, 0xff, None), (0, 0xff, Some("ftdi_sio"))],
            },
        );
        root
    }

    #[test]
    fn devices_are_read_with_their_interfaces_and_drivers() {
        let root = fake_tree();
        let sysfs = Sysfs::at(root.path());
        let devices = sysfs.devices().unwrap();
        let paths: Vec<String> = devices.iter().map(|d| d.port_path.to_string()).collect();
        assert_eq!(paths, ["3-1", "3-1.4", "3-2"]);

        let raw = &devices[0];
        assert_eq!((raw.vendor_id, raw.product_id), (0x46f4, 1));
        assert_eq!((raw.bus, raw.device_number), (3, 2));
        assert_eq!(raw.serial.as_deref(), Some("R3RAW"));
        assert_eq!(raw.product.as_deref(), Some("QEMU USB thing"));
        assert_eq!(raw.manufacturer, None);
        assert_eq!(raw.speed, Some(Speed::High));
        assert_eq!(raw.configuration, Some(1));
        assert_eq!(raw.usbfs_path(), Path::new("/dev/bus/usb/003/002"));
        let interface = raw.interface(0).unwrap();
        assert_eq!(interface.class, 8);
        assert_eq!(interface.driver.as_deref(), Some("usb-storage"));
        assert_eq!(interface.endpoints.len(), 2);
        assert_eq!(interface.endpoints[0].address, 0x81);
        assert_eq!(interface.endpoints[0].max_packet_size, 512);
        assert_eq!(interface.endpoints[0].transfer_type, "bulk");

        let serial = &devices[1];
        let numbers: Vec<u8> = serial.interfaces.iter().map(|i| i.number).collect();
        assert_eq!(numbers, [0, 1]);
        assert_eq!(serial.interfaces[0].driver.as_deref(), Some("ftdi_sio"));
        assert_eq!(serial.interfaces[1].driver, None);
        assert_eq!(
            sysfs.interface_driver(&serial.port_path, 1, 0).as_deref(),
            Some("ftdi_sio")
        );
        assert_eq!(sysfs.interface_driver(&serial.port_path, 1, 1), None);
    }

    #[test]
    fn find_picks_exactly_one_or_says_why_not() {
        let root = fake_tree();
        let sysfs = Sysfs::at(root.path());
        let find = |text: &str| sysfs.find(&text.parse().unwrap());

        assert_eq!(
            find("46f4:0001:R3FAT").unwrap().port_path.to_string(),
            "3-2"
        );
        assert_eq!(find("3-1.4").unwrap().vendor_id, 0x0403);
        assert_eq!(find("403:6001").unwrap().port_path.to_string(), "3-1.4");

        let error = find("46f4:0001").unwrap_err().to_string();
        assert!(error.contains("2 USB devices match 46f4:0001"), "{error}");
        assert!(error.contains("3-1 (46f4:0001:R3RAW)"), "{error}");
        assert!(error.contains("3-2 (46f4:0001:R3FAT)"), "{error}");
        assert!(error.contains(":SERIAL"), "{error}");

        for missing in ["46f4:0001:NOPE", "1-1", "1234:5678"] {
            let error = find(missing).unwrap_err().to_string();
            assert!(error.contains("ring3 usb list"), "{error}");
            assert!(error.contains(missing), "{error}");
        }
    }

    #[test]
    fn broken_attributes_are_errors_naming_the_file() {
        let root = fake_tree();
        write(&root.path().join("3-2"), "idVendor", "zz\n");
        let error = Sysfs::at(root.path()).devices().unwrap_err();
        let text = format!("{error}: {}", std::error::Error::source(&error).unwrap());
        assert!(text.contains("3-2"), "{text}");
        assert!(text.contains("idVendor"), "{text}");
    }

    #[test]
    fn malformed_descriptors_leave_the_device_listed_without_endpoints() {
        let root = fake_tree();
        fs::write(root.path().join("3-2/descriptors"), [18, 1, 0]).unwrap();
        let devices = Sysfs::at(root.path()).devices().unwrap();
        let fat = devices
            .iter()
            .find(|d| d.port_path.to_string() == "3-2")
            .unwrap();
        assert!(fat.interfaces[0].endpoints.is_empty());
        assert_eq!(fat.interfaces[0].class, 8);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_it() {
        let error = Sysfs::at("/nonexistent/usb").devices().unwrap_err();
        assert!(error.to_string().contains("/nonexistent/usb"), "{error}");
    }
}
