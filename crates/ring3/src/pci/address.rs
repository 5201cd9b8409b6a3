//! PCI addresses: domain, bus, device and function.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// A PCI function's address, `DDDD:BB:DD.F` (domain, bus, device, function) as Linux
/// names it in sysfs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct PciAddress {
    /// PCI segment (domain), 0 on most machines.
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number, 0–0x1f.
    pub device: u8,
    /// Function number, 0–7.
    pub function: u8,
}

impl PciAddress {
    /// The largest device number.
    pub const MAX_DEVICE: u8 = 0x1f;
    /// The largest function number.
    pub const MAX_FUNCTION: u8 = 7;
}

/// Parses a field of 1 to `max_digits` hexadecimal digits (no sign, no prefix, no spaces).
fn hex_field(text: &str, max_digits: usize) -> Option<u32> {
    if text.is_empty() || text.len() > max_digits || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(text, 16).ok()
}

impl FromStr for PciAddress {
    type Err = Error;

    /// Parses `DDDD:BB:DD.F` or `BB:DD.F` (domain 0), in hex, upper or lower case.
    fn from_str(input: &str) -> Result<Self, Error> {
        let invalid = || Error::InvalidAddress {
            input: input.to_string(),
        };
        let (rest, function) = input.rsplit_once('.').ok_or_else(invalid)?;
        let fields: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match fields.as_slice() {
            [domain, bus, device] => (
                hex_field(domain, 4),
                hex_field(bus, 2),
                hex_field(device, 2),
            ),
            [bus, device] => (Some(0), hex_field(bus, 2), hex_field(device, 2)),
            _ => return Err(invalid()),
        };
        let (Some(domain), Some(bus), Some(device), Some(function)) =
            (domain, bus, device, hex_field(function, 1))
        else {
            return Err(invalid());
        };
        let (Ok(domain), Ok(bus), Ok(device), Ok(function)) = (
            u16::try_from(domain),
            u8::try_from(bus),
            u8::try_from(device),
            u8::try_from(function),
        ) else {
            return Err(invalid());
        };
        if device > Self::MAX_DEVICE || function > Self::MAX_FUNCTION {
            return Err(invalid());
        }
        Ok(PciAddress {
            domain,
            bus,
            device,
            function,
        })
    }
}

impl fmt::Display for PciAddress {
    /// Formats as sysfs names the device: `0000:00:03.0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn address(domain: u16, bus: u8, device: u8, function: u8) -> PciAddress {
        PciAddress {
            domain,
            bus,
            device,
            function,
        }
    }

    #[test]
    fn pci_address_parses_valid_forms() {
        let cases = [
            ("0000:00:03.0", address(0, 0, 3, 0)),
            ("00:03.0", address(0, 0, 3, 0)),
            ("0001:af:1f.7", address(1, 0xaf, 0x1f, 7)),
            ("FFFF:FF:1F.7", address(0xffff, 0xff, 0x1f, 7)),
            ("0000:3B:00.1", address(0, 0x3b, 0, 1)),
            ("0:0:3.0", address(0, 0, 3, 0)),
        ];
        for (input, expected) in cases {
            let parsed: PciAddress = input
                .parse()
                .unwrap_or_else(|e| panic!("{input:?} should parse: {e}"));
            assert_eq!(parsed, expected, "{input:?}");
        }
    }

    #[test]
    fn pci_address_rejects_invalid_forms() {
        let cases = [
            "",
            "0000:00:03",
            "0000:00:03.",
            "0000:00:20.0", // device > 0x1f
            "0000:00:03.8", // function > 7
            "00000:00:03.0",
            "0000:100:03.0",
            "0000:00:003.0",
            "0000:00:03.00",
            "0000:0g:03.0",
            "0000:00:+3.0",
            "0000:00:03.-1",
            " 0000:00:03.0",
            "0000:00:03.0 ",
            "0000::03.0",
            "1:0000:00:03.0",
            "0000:00:03.0.0",
            "03.0",
            "0x00:03.0",
        ];
        for input in cases {
            match input.parse::<PciAddress>() {
                Err(Error::InvalidAddress { input: reported }) => assert_eq!(reported, input),
                other => panic!("{input:?} should be rejected, got {other:?}"),
            }
        }
    }

    #[test]
    fn pci_address_displays_like_sysfs() {
        assert_eq!(address(0, 0, 3, 0).to_string(), "0000:00:03.0");
        assert_eq!(address(0xabcd, 0xef, 0x1f, 7).to_string(), "abcd:ef:1f.7");
    }

    #[test]
    fn pci_address_orders_by_domain_bus_device_function() {
        let mut addresses = vec![
            address(1, 0, 0, 0),
            address(0, 1, 0, 0),
            address(0, 0, 2, 0),
            address(0, 0, 1, 1),
            address(0, 0, 1, 0),
        ];
        addresses.sort();
        assert_eq!(
            addresses,
            vec![
                address(0, 0, 1, 0),
                address(0, 0, 1, 1),
                address(0, 0, 2, 0),
                address(0, 1, 0, 0),
                address(1, 0, 0, 0),
            ]
        );
    }

    proptest! {
        #[test]
        fn pci_address_display_then_parse_round_trips(
            domain in any::<u16>(),
            bus in any::<u8>(),
            device in 0..=PciAddress::MAX_DEVICE,
            function in 0..=PciAddress::MAX_FUNCTION,
        ) {
            let original = address(domain, bus, device, function);
            let text = original.to_string();
            prop_assert_eq!(text.parse::<PciAddress>().ok(), Some(original));
            prop_assert_eq!(text.to_uppercase().parse::<PciAddress>().ok(), Some(original));
        }

        #[test]
        fn pci_address_parser_never_panics(input in "\\PC{0,20}") {
            let _ = input.parse::<PciAddress>();
        }
    }
}
