//! How a user names a USB device: by where it is plugged in, or by what it is.
//!
//! | form | example | meaning |
//! |---|---|---|
//! | `BUS-PORT[.PORT...]` | `3-1.2` | the device on port 2 of the hub on port 1 of bus 3, as sysfs names it (`/sys/bus/usb/devices/3-1.2`) |
//! | `VID:PID` | `0403:6001` | the only device with these IDs (hexadecimal) |
//! | `VID:PID:SERIAL` | `0403:6001:R3SERIAL0` | the device with these IDs and this serial number string |
//!
//! A port path stays the same across replugging into the same port and across reboots;
//! device numbers (`/dev/bus/usb/BBB/DDD`) change every time, so they are not an address.

use std::fmt;
use std::str::FromStr;

/// Hubs may be chained at most this deep (USB 2.0 §4.1.1: five hubs, so six ports on a
/// path below the root hub; Linux allows seven levels of ports).
pub const MAX_PORT_DEPTH: usize = 7;

/// A device's place in the bus topology: the bus number and the port numbers from the
/// root hub down, as in the sysfs name `3-1.2`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortPath {
    /// The bus (root hub) number, from 1.
    pub bus: u16,
    /// Port numbers from the root hub down, each from 1; never empty.
    pub ports: Vec<u8>,
}

impl fmt::Display for PortPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-", self.bus)?;
        for (i, port) in self.ports.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "{port}")?;
        }
        Ok(())
    }
}

impl FromStr for PortPath {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<Self, AddressError> {
        let bad = |why: &str| AddressError::new(text, why);
        let (bus, ports) = text
            .split_once('-')
            .ok_or_else(|| bad("a port path is BUS-PORT[.PORT...], e.g. 3-1.2"))?;
        let bus = parse_decimal(bus)
            .and_then(|bus| u16::try_from(bus).ok())
            .filter(|&bus| bus >= 1)
            .ok_or_else(|| bad("the bus number must be a decimal number from 1 to 65535"))?;
        let ports = ports
            .split('.')
            .map(|port| {
                parse_decimal(port)
                    .and_then(|port| u8::try_from(port).ok())
                    .filter(|&port| port >= 1)
                    .ok_or_else(|| bad("each port number must be a decimal number from 1 to 255"))
            })
            .collect::<Result<Vec<u8>, _>>()?;
        if ports.len() > MAX_PORT_DEPTH {
            return Err(bad("a port path has at most 7 ports"));
        }
        Ok(PortPath { bus, ports })
    }
}

/// Decimal digits only (no sign, no spaces), at most 5 of them.
fn parse_decimal(text: &str) -> Option<u32> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// One to four hexadecimal digits.
fn parse_hex_id(text: &str) -> Option<u16> {
    if text.is_empty() || text.len() > 4 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u16::from_str_radix(text, 16).ok()
}

/// How a user names a USB device; see the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UsbAddress {
    /// Where it is plugged in: `3-1.2`.
    Port(PortPath),
    /// What it is: `VID:PID` or `VID:PID:SERIAL`.
    Ids {
        /// `idVendor`.
        vendor_id: u16,
        /// `idProduct`.
        product_id: u16,
        /// The serial number string, if the address names one.
        serial: Option<String>,
    },
}

impl UsbAddress {
    /// Whether a device with this place and these IDs is the one this address names.
    pub fn matches(
        &self,
        port_path: &PortPath,
        vendor_id: u16,
        product_id: u16,
        serial: Option<&str>,
    ) -> bool {
        match self {
            UsbAddress::Port(path) => path == port_path,
            UsbAddress::Ids {
                vendor_id: vid,
                product_id: pid,
                serial: wanted,
            } => {
                *vid == vendor_id
                    && *pid == product_id
                    && wanted
                        .as_deref()
                        .is_none_or(|wanted| serial == Some(wanted))
            }
        }
    }
}

impl fmt::Display for UsbAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsbAddress::Port(path) => path.fmt(f),
            UsbAddress::Ids {
                vendor_id,
                product_id,
                serial,
            } => {
                write!(f, "{vendor_id:04x}:{product_id:04x}")?;
                if let Some(serial) = serial {
                    write!(f, ":{serial}")?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for UsbAddress {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<Self, AddressError> {
        let bad = |why: &str| AddressError::new(text, why);
        if text.is_empty() {
            return Err(bad(FORMS));
        }
        if !text.contains(':') {
            if text.contains('-') {
                return text.parse().map(UsbAddress::Port);
            }
            return Err(bad(FORMS));
        }
        let mut parts = text.splitn(3, ':');
        let vendor = parts.next().unwrap_or_default();
        let product = parts.next().unwrap_or_default();
        let serial = parts.next();
        let vendor_id =
            parse_hex_id(vendor).ok_or_else(|| bad("the vendor ID must be 1 to 4 hex digits"))?;
        let product_id =
            parse_hex_id(product).ok_or_else(|| bad("the product ID must be 1 to 4 hex digits"))?;
        let serial = match serial {
            None => None,
            Some("") => return Err(bad("the serial number after the second `:` is empty")),
            Some(serial) if serial.chars().any(char::is_control) => {
                return Err(bad("the serial number contains control characters"))
            }
            Some(serial) => Some(serial.to_owned()),
        };
        Ok(UsbAddress::Ids {
            vendor_id,
            product_id,
            serial,
        })
    }
}

const FORMS: &str =
    "a USB address is BUS-PORT[.PORT...] (e.g. 3-1.2), VID:PID (e.g. 0403:6001) or VID:PID:SERIAL";

/// A string that is not a [`UsbAddress`] or [`PortPath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid USB address `{text}`: {why}")]
pub struct AddressError {
    text: String,
    why: String,
}

impl AddressError {
    fn new(text: &str, why: &str) -> Self {
        AddressError {
            text: text.escape_debug().to_string(),
            why: why.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn port(text: &str) -> PortPath {
        text.parse().unwrap()
    }

    #[test]
    fn the_documented_forms_parse() {
        assert_eq!(
            "3-1.2".parse::<UsbAddress>().unwrap(),
            UsbAddress::Port(PortPath {
                bus: 3,
                ports: vec![1, 2]
            })
        );
        assert_eq!(
            "0403:6001".parse::<UsbAddress>().unwrap(),
            UsbAddress::Ids {
                vendor_id: 0x0403,
                product_id: 0x6001,
                serial: None
            }
        );
        assert_eq!(
            "46F4:1:R3:RAW".parse::<UsbAddress>().unwrap(),
            UsbAddress::Ids {
                vendor_id: 0x46f4,
                product_id: 1,
                serial: Some("R3:RAW".into())
            }
        );
        assert_eq!(
            "46F4:1:R3RAW".parse::<UsbAddress>().unwrap().to_string(),
            "46f4:0001:R3RAW"
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        for (text, why) in [
            ("", "BUS-PORT"),
            ("3", "BUS-PORT"),
            ("3-", "port number"),
            ("3-0", "port number"),
            ("3-1..2", "port number"),
            ("3-256", "port number"),
            ("0-1", "bus number"),
            ("x-1", "bus number"),
            ("3-1.2.3.4.5.6.7.8", "at most 7"),
            ("0403", "BUS-PORT"),
            (":6001", "vendor ID"),
            ("04031:6001", "vendor ID"),
            ("0403:", "product ID"),
            ("0403:60g1", "product ID"),
            ("0403:6001:", "serial"),
            ("0403:6001:a\nb", "control"),
        ] {
            let error = text.parse::<UsbAddress>().unwrap_err().to_string();
            assert!(error.contains(why), "{text:?}: {error}");
            assert!(error.starts_with("invalid USB address"), "{error}");
        }
    }

    #[test]
    fn matching() {
        let path = port("1-4");
        let ids: UsbAddress = "0403:6001".parse().unwrap();
        assert!(ids.matches(&path, 0x0403, 0x6001, None));
        assert!(ids.matches(&path, 0x0403, 0x6001, Some("A")));
        assert!(!ids.matches(&path, 0x0403, 0x6010, Some("A")));
        let serial: UsbAddress = "0403:6001:A".parse().unwrap();
        assert!(serial.matches(&path, 0x0403, 0x6001, Some("A")));
        assert!(!serial.matches(&path, 0x0403, 0x6001, Some("B")));
        assert!(!serial.matches(&path, 0x0403, 0x6001, None));
        let place: UsbAddress = "1-4".parse().unwrap();
        assert!(place.matches(&path, 1, 2, None));
        assert!(!place.matches(&port("1-4.1"), 1, 2, None));
    }

    fn arbitrary_address() -> impl Strategy<Value = UsbAddress> {
        prop_oneof![
            (1u16.., proptest::collection::vec(1u8.., 1..=MAX_PORT_DEPTH))
                .prop_map(|(bus, ports)| UsbAddress::Port(PortPath { bus, ports })),
            (
                any::<u16>(),
                any::<u16>(),
                proptest::option::of("[ -~]{1,40}")
            )
                .prop_map(|(vendor_id, product_id, serial)| UsbAddress::Ids {
                    vendor_id,
                    product_id,
                    serial
                }),
        ]
    }

    proptest! {
        #[test]
        fn display_then_parse_is_the_identity(address in arbitrary_address()) {
            let text = address.to_string();
            prop_assert_eq!(text.parse::<UsbAddress>(), Ok(address));
        }

        #[test]
        fn parsing_any_text_never_panics(text in "\\PC{0,40}") {
            if let Ok(address) = text.parse::<UsbAddress>() {
                // What parses prints in the canonical form, which parses to the same.
                prop_assert_eq!(address.to_string().parse::<UsbAddress>(), Ok(address));
            }
        }

        #[test]
        fn parsing_address_like_text_never_panics(text in "[0-9a-fA-F:.\\-]{0,24}") {
            let _ = text.parse::<UsbAddress>();
        }
    }
}
