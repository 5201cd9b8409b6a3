//! USB device and configuration descriptors (USB 2.0 §9.6), parsed from the bytes a device
//! sent, which are not trusted.
//!
//! usbfs (reading `/dev/bus/usb/BBB/DDD`) and sysfs (`/sys/bus/usb/devices/*/descriptors`)
//! both give the device descriptor followed by every configuration descriptor with its
//! interfaces and endpoints, as the kernel read them from the device: [`parse_descriptors`].
//!
//! Every length is checked against the bytes there are: `bLength` of each descriptor,
//! `wTotalLength` of each configuration, the minimum size of each descriptor type. A
//! malformed blob gives a [`DescriptorError`] saying where; the parser never panics and
//! never reads past its input. Descriptors it does not need (class-specific, interface
//! associations, SuperSpeed companions, ...) are skipped by their `bLength`.

use std::fmt;

/// `bDescriptorType` of a device descriptor.
pub const DEVICE: u8 = 1;
/// `bDescriptorType` of a configuration descriptor.
pub const CONFIGURATION: u8 = 2;
/// `bDescriptorType` of an interface descriptor.
pub const INTERFACE: u8 = 4;
/// `bDescriptorType` of an endpoint descriptor.
pub const ENDPOINT: u8 = 5;

/// Size of a device descriptor (§9.6.1).
pub const DEVICE_LEN: usize = 18;
/// Size of a configuration descriptor's own header (§9.6.3).
pub const CONFIGURATION_LEN: usize = 9;
/// Size of an interface descriptor (§9.6.5).
pub const INTERFACE_LEN: usize = 9;
/// Size of an endpoint descriptor (§9.6.6).
pub const ENDPOINT_LEN: usize = 7;

/// What is wrong with a descriptor blob.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// The blob ends before a descriptor does.
    #[error("{what} at byte {offset} needs {needed} bytes but only {available} remain")]
    Truncated {
        /// Which descriptor.
        what: &'static str,
        /// Where it starts in the blob.
        offset: usize,
        /// How many bytes it needs.
        needed: usize,
        /// How many bytes there are from `offset`.
        available: usize,
    },
    /// A `bLength` too small for its descriptor type (or below 2, which would not advance).
    #[error("{what} at byte {offset} has bLength {length}, less than its minimum {minimum}")]
    TooShort {
        /// Which descriptor.
        what: &'static str,
        /// Where it starts in the blob.
        offset: usize,
        /// Its `bLength` (or `wTotalLength`).
        length: usize,
        /// The least that descriptor can be.
        minimum: usize,
    },
    /// Not the descriptor type expected here.
    #[error("expected a {what} descriptor (type {expected}) at byte {offset}, found type {found}")]
    WrongType {
        /// Which descriptor was expected.
        what: &'static str,
        /// Where it starts in the blob.
        offset: usize,
        /// The expected `bDescriptorType`.
        expected: u8,
        /// The `bDescriptorType` found.
        found: u8,
    },
}

type Result<T> = std::result::Result<T, DescriptorError>;

/// The header of the descriptor at `offset`: its `bLength` and `bDescriptorType`, checked
/// against the bytes that remain and against `minimum`.
fn header(bytes: &[u8], offset: usize, what: &'static str, minimum: usize) -> Result<(usize, u8)> {
    let rest = bytes.get(offset..).unwrap_or_default();
    let truncated = |needed| DescriptorError::Truncated {
        what,
        offset,
        needed,
        available: rest.len(),
    };
    let (&length, &kind) = match rest {
        [length, kind, ..] => (length, kind),
        _ => return Err(truncated(2)),
    };
    let length = usize::from(length);
    if length < minimum.max(2) {
        return Err(DescriptorError::TooShort {
            what,
            offset,
            length,
            minimum: minimum.max(2),
        });
    }
    if length > rest.len() {
        return Err(truncated(length));
    }
    Ok((length, kind))
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    match bytes.get(at..at + 2) {
        Some(&[low, high]) => u16::from_le_bytes([low, high]),
        _ => 0,
    }
}

fn u8_at(bytes: &[u8], at: usize) -> u8 {
    bytes.get(at).copied().unwrap_or(0)
}

/// A device descriptor (USB 2.0 §9.6.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDescriptor {
    /// `bcdUSB`: the USB version, BCD (0x0200 is USB 2.0).
    pub usb_version: u16,
    /// `bDeviceClass` (0: per interface).
    pub class: u8,
    /// `bDeviceSubClass`.
    pub subclass: u8,
    /// `bDeviceProtocol`.
    pub protocol: u8,
    /// `bMaxPacketSize0`: the control endpoint's packet size.
    pub max_packet_size0: u8,
    /// `idVendor`.
    pub vendor_id: u16,
    /// `idProduct`.
    pub product_id: u16,
    /// `bcdDevice`: the device's release number, BCD.
    pub device_version: u16,
    /// `iManufacturer`: string descriptor index, 0 for none.
    pub manufacturer_index: u8,
    /// `iProduct`.
    pub product_index: u8,
    /// `iSerialNumber`.
    pub serial_index: u8,
    /// `bNumConfigurations`.
    pub num_configurations: u8,
}

impl DeviceDescriptor {
    /// Parses the device descriptor at the start of `bytes` (which may go on with more).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let (length, kind) = header(bytes, 0, "device descriptor", DEVICE_LEN)?;
        if kind != DEVICE {
            return Err(DescriptorError::WrongType {
                what: "device",
                offset: 0,
                expected: DEVICE,
                found: kind,
            });
        }
        let d = &bytes[..length];
        Ok(DeviceDescriptor {
            usb_version: u16_at(d, 2),
            class: u8_at(d, 4),
            subclass: u8_at(d, 5),
            protocol: u8_at(d, 6),
            max_packet_size0: u8_at(d, 7),
            vendor_id: u16_at(d, 8),
            product_id: u16_at(d, 10),
            device_version: u16_at(d, 12),
            manufacturer_index: u8_at(d, 14),
            product_index: u8_at(d, 15),
            serial_index: u8_at(d, 16),
            num_configurations: u8_at(d, 17),
        })
    }

    /// The descriptor's 18 bytes as a device sends them.
    pub fn to_bytes(&self) -> [u8; DEVICE_LEN] {
        let [usb_low, usb_high] = self.usb_version.to_le_bytes();
        let [vid_low, vid_high] = self.vendor_id.to_le_bytes();
        let [pid_low, pid_high] = self.product_id.to_le_bytes();
        let [rel_low, rel_high] = self.device_version.to_le_bytes();
        [
            DEVICE_LEN as u8,
            DEVICE,
            usb_low,
            usb_high,
            self.class,
            self.subclass,
            self.protocol,
            self.max_packet_size0,
            vid_low,
            vid_high,
            pid_low,
            pid_high,
            rel_low,
            rel_high,
            self.manufacturer_index,
            self.product_index,
            self.serial_index,
            self.num_configurations,
        ]
    }
}

/// A configuration descriptor with everything it contains (USB 2.0 §9.6.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigurationDescriptor {
    /// `bNumInterfaces` as the device states it (interfaces, not alternate settings).
    pub num_interfaces: u8,
    /// `bConfigurationValue`: the value SET_CONFIGURATION selects it with.
    pub value: u8,
    /// `iConfiguration`: string descriptor index, 0 for none.
    pub string_index: u8,
    /// `bmAttributes` (bit 6 self-powered, bit 5 remote wakeup).
    pub attributes: u8,
    /// `bMaxPower`, in units of 2 mA (8 mA for SuperSpeed).
    pub max_power: u8,
    /// Every interface descriptor, one per alternate setting, in the order given.
    pub interfaces: Vec<InterfaceDescriptor>,
}

impl ConfigurationDescriptor {
    /// Parses one configuration at the start of `bytes`; returns it and its
    /// `wTotalLength` (where the next one starts).
    pub fn parse(bytes: &[u8]) -> Result<(Self, usize)> {
        Self::parse_at(bytes, 0)
    }

    fn parse_at(blob: &[u8], offset: usize) -> Result<(Self, usize)> {
        let what = "configuration descriptor";
        let (length, kind) = header(blob, offset, what, CONFIGURATION_LEN)?;
        if kind != CONFIGURATION {
            return Err(DescriptorError::WrongType {
                what: "configuration",
                offset,
                expected: CONFIGURATION,
                found: kind,
            });
        }
        let rest = &blob[offset..];
        let total = usize::from(u16_at(rest, 2));
        if total < length {
            return Err(DescriptorError::TooShort {
                what: "configuration's wTotalLength",
                offset,
                length: total,
                minimum: length,
            });
        }
        if total > rest.len() {
            return Err(DescriptorError::Truncated {
                what,
                offset,
                needed: total,
                available: rest.len(),
            });
        }
        let mut config = ConfigurationDescriptor {
            num_interfaces: u8_at(rest, 4),
            value: u8_at(rest, 5),
            string_index: u8_at(rest, 6),
            attributes: u8_at(rest, 7),
            max_power: u8_at(rest, 8),
            interfaces: Vec::new(),
        };
        // Everything inside wTotalLength; offsets below stay relative to the whole blob
        // so that errors point at the right byte.
        let end = offset + total;
        let inside = &blob[..end];
        let mut at = offset + length;
        while at < end {
            let (length, kind) = header(inside, at, "descriptor", 2)?;
            match kind {
                INTERFACE => {
                    let (length, _) = header(inside, at, "interface descriptor", INTERFACE_LEN)?;
                    let d = &inside[at..at + length];
                    config.interfaces.push(InterfaceDescriptor {
                        number: u8_at(d, 2),
                        alternate_setting: u8_at(d, 3),
                        num_endpoints: u8_at(d, 4),
                        class: u8_at(d, 5),
                        subclass: u8_at(d, 6),
                        protocol: u8_at(d, 7),
                        string_index: u8_at(d, 8),
                        endpoints: Vec::new(),
                    });
                }
                ENDPOINT => {
                    let (length, _) = header(inside, at, "endpoint descriptor", ENDPOINT_LEN)?;
                    let d = &inside[at..at + length];
                    let endpoint = EndpointDescriptor {
                        address: u8_at(d, 2),
                        attributes: u8_at(d, 3),
                        max_packet_size: u16_at(d, 4),
                        interval: u8_at(d, 6),
                    };
                    // An endpoint before any interface belongs to nothing: skipped.
                    if let Some(interface) = config.interfaces.last_mut() {
                        interface.endpoints.push(endpoint);
                    }
                }
                // Class-specific, interface association, SuperSpeed companion, ...: not
                // needed here, skipped whole.
                _ => {}
            }
            at += length;
        }
        Ok((config, total))
    }

    /// The alternate setting `alternate_setting` of interface `number`.
    pub fn interface(&self, number: u8, alternate_setting: u8) -> Option<&InterfaceDescriptor> {
        self.interfaces
            .iter()
            .find(|i| i.number == number && i.alternate_setting == alternate_setting)
    }

    /// The bytes of this configuration as a device sends them (standard descriptors only).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = vec![
            CONFIGURATION_LEN as u8,
            CONFIGURATION,
            0,
            0,
            self.num_interfaces,
            self.value,
            self.string_index,
            self.attributes,
            self.max_power,
        ];
        for interface in &self.interfaces {
            bytes.extend_from_slice(&[
                INTERFACE_LEN as u8,
                INTERFACE,
                interface.number,
                interface.alternate_setting,
                interface.num_endpoints,
                interface.class,
                interface.subclass,
                interface.protocol,
                interface.string_index,
            ]);
            for endpoint in &interface.endpoints {
                let [mps_low, mps_high] = endpoint.max_packet_size.to_le_bytes();
                bytes.extend_from_slice(&[
                    ENDPOINT_LEN as u8,
                    ENDPOINT,
                    endpoint.address,
                    endpoint.attributes,
                    mps_low,
                    mps_high,
                    endpoint.interval,
                ]);
            }
        }
        let total = u16::try_from(bytes.len()).unwrap_or(u16::MAX).to_le_bytes();
        bytes[2..4].copy_from_slice(&total);
        bytes
    }
}

/// One alternate setting of an interface (USB 2.0 §9.6.5) with its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceDescriptor {
    /// `bInterfaceNumber`.
    pub number: u8,
    /// `bAlternateSetting`.
    pub alternate_setting: u8,
    /// `bNumEndpoints` as the device states it; [`endpoints`](Self::endpoints) holds
    /// those that actually follow.
    pub num_endpoints: u8,
    /// `bInterfaceClass` (8 mass storage, 0xff vendor-specific, ...).
    pub class: u8,
    /// `bInterfaceSubClass`.
    pub subclass: u8,
    /// `bInterfaceProtocol`.
    pub protocol: u8,
    /// `iInterface`: string descriptor index, 0 for none.
    pub string_index: u8,
    /// The endpoint descriptors that follow this interface descriptor.
    pub endpoints: Vec<EndpointDescriptor>,
}

impl InterfaceDescriptor {
    /// The first bulk endpoint in direction `direction`.
    pub fn first_bulk(&self, direction: Direction) -> Option<&EndpointDescriptor> {
        self.endpoints
            .iter()
            .find(|e| e.transfer_type() == TransferType::Bulk && e.direction() == direction)
    }

    /// The endpoint with this address.
    pub fn endpoint(&self, address: u8) -> Option<&EndpointDescriptor> {
        self.endpoints.iter().find(|e| e.address == address)
    }
}

/// The direction of an endpoint, from the host's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Device to host (address bit 7 set).
    In,
    /// Host to device.
    Out,
}

/// How an endpoint transfers data (`bmAttributes` bits 1..0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferType {
    /// The default pipe's type; not used by endpoint descriptors.
    Control,
    /// Isochronous.
    Isochronous,
    /// Bulk.
    Bulk,
    /// Interrupt.
    Interrupt,
}

impl fmt::Display for TransferType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransferType::Control => "control",
            TransferType::Isochronous => "isochronous",
            TransferType::Bulk => "bulk",
            TransferType::Interrupt => "interrupt",
        })
    }
}

/// An endpoint descriptor (USB 2.0 §9.6.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointDescriptor {
    /// `bEndpointAddress`: number in bits 3..0, direction in bit 7.
    pub address: u8,
    /// `bmAttributes`: transfer type in bits 1..0.
    pub attributes: u8,
    /// `wMaxPacketSize` as sent: size in bits 10..0, extra transactions per microframe
    /// in bits 12..11.
    pub max_packet_size: u16,
    /// `bInterval`.
    pub interval: u8,
}

impl EndpointDescriptor {
    /// In or out.
    pub fn direction(&self) -> Direction {
        if self.address & 0x80 != 0 {
            Direction::In
        } else {
            Direction::Out
        }
    }

    /// Bulk, interrupt, ...
    pub fn transfer_type(&self) -> TransferType {
        match self.attributes & 0x3 {
            0 => TransferType::Control,
            1 => TransferType::Isochronous,
            2 => TransferType::Bulk,
            _ => TransferType::Interrupt,
        }
    }

    /// The largest packet in bytes (bits 10..0 of `wMaxPacketSize`).
    pub fn max_packet_bytes(&self) -> usize {
        usize::from(self.max_packet_size & 0x7ff)
    }
}

/// A short name of a USB class code (`bDeviceClass`, `bInterfaceClass`), from the USB-IF
/// list of defined class codes.
pub fn class_name(class: u8) -> &'static str {
    match class {
        0x00 => "per interface",
        0x01 => "audio",
        0x02 => "communications",
        0x03 => "HID",
        0x05 => "physical",
        0x06 => "image",
        0x07 => "printer",
        0x08 => "mass storage",
        0x09 => "hub",
        0x0a => "CDC data",
        0x0b => "smart card",
        0x0d => "content security",
        0x0e => "video",
        0x0f => "healthcare",
        0x10 => "audio/video",
        0x11 => "billboard",
        0x12 => "USB-C bridge",
        0xdc => "diagnostic",
        0xe0 => "wireless",
        0xef => "miscellaneous",
        0xfe => "application specific",
        0xff => "vendor specific",
        _ => "unknown class",
    }
}

/// The device descriptor and configurations as usbfs and sysfs give them: a device
/// descriptor, then each configuration with its `wTotalLength` bytes, back to back.
pub fn parse_descriptors(bytes: &[u8]) -> Result<(DeviceDescriptor, Vec<ConfigurationDescriptor>)> {
    let device = DeviceDescriptor::parse(bytes)?;
    let mut at = usize::from(u8_at(bytes, 0));
    let mut configurations = Vec::new();
    while at < bytes.len() {
        let (config, total) = ConfigurationDescriptor::parse_at(bytes, at)?;
        configurations.push(config);
        at += total;
    }
    Ok((device, configurations))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A USB flash drive as a device would describe it: one bulk-only mass storage
    /// interface, with a class-specific descriptor and an interface association thrown
    /// in to be skipped.
    fn storage_blob() -> Vec<u8> {
        let mut blob = vec![
            18, 1, 0x00, 0x02, 0, 0, 0, 64, 0xf4, 0x46, 0x01, 0x00, 0x00, 0x01, 1, 2, 3, 1,
        ];
        let config = [
            9, 2, 0, 0, 1, 1, 0, 0x80, 50, // configuration
            8, 11, 0, 1, 8, 6, 0x50, 0, // interface association (skipped)
            9, 4, 0, 0, 2, 8, 6, 0x50, 0, // interface 0: mass storage BOT
            5, 0x24, 1, 2, 3, // class-specific (skipped)
            7, 5, 0x81, 2, 0x00, 0x02, 0, // bulk IN 1, 512 bytes
            7, 5, 0x02, 2, 0x00, 0x02, 0, // bulk OUT 2, 512 bytes
        ];
        let mut config = config.to_vec();
        let total = (config.len() as u16).to_le_bytes();
        config[2..4].copy_from_slice(&total);
        blob.extend_from_slice(&config);
        blob
    }

    #[test]
    fn a_storage_device_parses() {
        let (device, configs) = parse_descriptors(&storage_blob()).unwrap();
        assert_eq!((device.vendor_id, device.product_id), (0x46f4, 0x0001));
        assert_eq!(device.serial_index, 3);
        assert_eq!(configs.len(), 1);
        let interface = configs[0].interface(0, 0).unwrap();
        assert_eq!(
            (interface.class, interface.subclass, interface.protocol),
            (8, 6, 0x50)
        );
        let bulk_in = interface.first_bulk(Direction::In).unwrap();
        let bulk_out = interface.first_bulk(Direction::Out).unwrap();
        assert_eq!((bulk_in.address, bulk_in.max_packet_bytes()), (0x81, 512));
        assert_eq!((bulk_out.address, bulk_out.max_packet_bytes()), (0x02, 512));
        assert_eq!(interface.endpoint(0x81), Some(bulk_in));
    }

    #[test]
    fn malformed_blobs_are_errors_that_say_where() {
        let good = storage_blob();
        // Cut anywhere inside a descriptor: an error, never a panic. (A device
        // descriptor alone, 18 bytes, is a device without configurations.)
        assert!(parse_descriptors(&good[..18]).unwrap().1.is_empty());
        for cut in (0..good.len()).filter(|&cut| cut != 18) {
            assert!(parse_descriptors(&good[..cut]).is_err(), "cut at {cut}");
        }
        // A zero bLength would never advance.
        let mut zero = good.clone();
        zero[18 + 9] = 0;
        assert!(matches!(
            parse_descriptors(&zero),
            Err(DescriptorError::TooShort { offset: 27, .. })
        ));
        // An endpoint descriptor too short for its type.
        let mut short_endpoint = good.clone();
        let at = 18 + 9 + 8 + 9 + 5;
        short_endpoint[at] = 6;
        let error = parse_descriptors(&short_endpoint).unwrap_err();
        assert!(error.to_string().contains("endpoint descriptor"), "{error}");
        // wTotalLength beyond the blob.
        let mut long = good.clone();
        long[18 + 2] = 0xff;
        assert!(matches!(
            parse_descriptors(&long),
            Err(DescriptorError::Truncated { offset: 18, .. })
        ));
        // wTotalLength shorter than the configuration header.
        let mut tiny = good.clone();
        tiny[18 + 2] = 4;
        tiny[18 + 3] = 0;
        assert!(parse_descriptors(&tiny).is_err());
        // Not a device descriptor first.
        let mut wrong = good;
        wrong[1] = 2;
        assert!(matches!(
            parse_descriptors(&wrong),
            Err(DescriptorError::WrongType { .. })
        ));
    }

    fn arbitrary_endpoint() -> impl Strategy<Value = EndpointDescriptor> {
        (any::<u8>(), any::<u8>(), any::<u16>(), any::<u8>()).prop_map(
            |(address, attributes, max_packet_size, interval)| EndpointDescriptor {
                address,
                attributes,
                max_packet_size,
                interval,
            },
        )
    }

    fn arbitrary_interface() -> impl Strategy<Value = InterfaceDescriptor> {
        (
            any::<[u8; 6]>(),
            proptest::collection::vec(arbitrary_endpoint(), 0..6),
        )
            .prop_map(|(fields, endpoints)| InterfaceDescriptor {
                number: fields[0],
                alternate_setting: fields[1],
                num_endpoints: endpoints.len() as u8,
                class: fields[2],
                subclass: fields[3],
                protocol: fields[4],
                string_index: fields[5],
                endpoints,
            })
    }

    fn arbitrary_configuration() -> impl Strategy<Value = ConfigurationDescriptor> {
        (
            any::<[u8; 5]>(),
            proptest::collection::vec(arbitrary_interface(), 0..6),
        )
            .prop_map(|(fields, interfaces)| ConfigurationDescriptor {
                num_interfaces: fields[0],
                value: fields[1],
                string_index: fields[2],
                attributes: fields[3],
                max_power: fields[4],
                interfaces,
            })
    }

    fn arbitrary_device() -> impl Strategy<Value = DeviceDescriptor> {
        (any::<[u16; 4]>(), any::<[u8; 8]>()).prop_map(|(words, bytes)| DeviceDescriptor {
            usb_version: words[0],
            class: bytes[0],
            subclass: bytes[1],
            protocol: bytes[2],
            max_packet_size0: bytes[3],
            vendor_id: words[1],
            product_id: words[2],
            device_version: words[3],
            manufacturer_index: bytes[4],
            product_index: bytes[5],
            serial_index: bytes[6],
            num_configurations: bytes[7],
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_descriptors(&bytes);
            let _ = ConfigurationDescriptor::parse(&bytes);
        }

        #[test]
        fn plausible_bytes_never_panic(
            device in arbitrary_device(),
            config in arbitrary_configuration(),
            flips in proptest::collection::vec((any::<u16>(), any::<u8>()), 1..8),
        ) {
            // Well-formed descriptors with a few bytes changed exercise the paths past
            // the first header check that random bytes rarely reach.
            let mut blob = device.to_bytes().to_vec();
            blob.extend_from_slice(&config.to_bytes());
            for (at, value) in flips {
                let at = usize::from(at) % blob.len();
                blob[at] = value;
            }
            let _ = parse_descriptors(&blob);
        }

        #[test]
        fn generated_descriptors_round_trip(
            device in arbitrary_device(),
            configs in proptest::collection::vec(arbitrary_configuration(), 0..3),
        ) {
            let mut blob = device.to_bytes().to_vec();
            for config in &configs {
                blob.extend_from_slice(&config.to_bytes());
            }
            let (parsed_device, parsed_configs) = parse_descriptors(&blob).unwrap();
            prop_assert_eq!(parsed_device, device);
            prop_assert_eq!(parsed_configs, configs);
        }
    }
}
