//! The Identify Controller data structure (NVMe Base 2.0, 5.17.2.1, figure "Identify –
//! Identify Controller Data Structure"), decoded and checked.
//!
//! The 4096 bytes come from the device, so every field the driver relies on is validated:
//! entry sizes must allow the 64/16-byte entries it uses, MDTS must give a representable
//! size, and NN must not include the broadcast namespace ID.

use crate::command::SUBMISSION_ENTRY_SHIFT;
use crate::completion::COMPLETION_ENTRY_SHIFT;
use crate::error::{Error, Result};
use crate::registers::Capabilities;

/// Size of every Identify data structure.
pub const IDENTIFY_SIZE: usize = 4096;

/// Byte offsets of the fields used (figure "Identify Controller Data Structure").
pub mod offsets {
    /// VID, PCI vendor ID (2 bytes).
    pub const VID: usize = 0;
    /// SSVID, PCI subsystem vendor ID (2 bytes).
    pub const SSVID: usize = 2;
    /// SN, serial number (20 ASCII bytes).
    pub const SN: usize = 4;
    /// MN, model number (40 ASCII bytes).
    pub const MN: usize = 24;
    /// FR, firmware revision (8 ASCII bytes).
    pub const FR: usize = 64;
    /// MDTS, maximum data transfer size (1 byte; a power of two of CAP.MPSMIN pages).
    pub const MDTS: usize = 77;
    /// CNTLID, controller ID (2 bytes).
    pub const CNTLID: usize = 78;
    /// VER, version (4 bytes, as VS).
    pub const VER: usize = 80;
    /// SQES, submission queue entry sizes (1 byte: required in bits 3:0, maximum in 7:4).
    pub const SQES: usize = 512;
    /// CQES, completion queue entry sizes (1 byte, as SQES).
    pub const CQES: usize = 513;
    /// NN, number of namespaces (4 bytes: the largest namespace ID).
    pub const NN: usize = 516;
    /// OACS, optional admin command support (2 bytes).
    pub const OACS: usize = 256;
    /// ELPE, error log page entries (1 byte, 0-based).
    pub const ELPE: usize = 262;
    /// ONCS, optional NVM command support (2 bytes).
    pub const ONCS: usize = 520;
    /// VWC, volatile write cache (1 byte; bit 0: present).
    pub const VWC: usize = 525;
}

/// OACS bits.
pub mod oacs {
    /// Doorbell Buffer Config (shadow doorbells) is supported.
    pub const DOORBELL_BUFFER_CONFIG: u16 = 1 << 8;
}

/// ONCS bits.
pub mod oncs {
    /// Dataset Management is supported.
    pub const DATASET_MANAGEMENT: u16 = 1 << 2;
    /// Write Zeroes is supported.
    pub const WRITE_ZEROES: u16 = 1 << 3;
}

/// What the driver takes from Identify Controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerInfo {
    /// PCI vendor ID.
    pub vendor_id: u16,
    /// PCI subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Serial number, trailing spaces removed, anything but printable ASCII as '?'.
    pub serial: String,
    /// Model number, cleaned like the serial.
    pub model: String,
    /// Firmware revision, cleaned like the serial.
    pub firmware: String,
    /// Largest data transfer of one command in bytes, or `None` for no limit (MDTS = 0).
    pub max_transfer_bytes: Option<u64>,
    /// Controller ID.
    pub controller_id: u16,
    /// VER, raw (0 for controllers older than 1.2).
    pub version: u32,
    /// Required and maximum submission entry size, as shifts.
    pub sq_entry_shifts: (u8, u8),
    /// Required and maximum completion entry size, as shifts.
    pub cq_entry_shifts: (u8, u8),
    /// NN: namespace IDs run from 1 to this.
    pub namespace_count: u32,
    /// OACS: optional admin commands ([`oacs`]).
    pub optional_admin_commands: u16,
    /// ONCS: optional NVM commands ([`oncs`]).
    pub optional_commands: u16,
    /// VWC bit 0: a volatile write cache is present, so Flush matters.
    pub volatile_write_cache: bool,
    /// ELPE + 1: entries in the Error Information log page.
    pub error_log_entries: u16,
}

impl ControllerInfo {
    /// Whether Dataset Management (deallocate) is supported.
    pub fn supports_deallocate(&self) -> bool {
        self.optional_commands & oncs::DATASET_MANAGEMENT != 0
    }

    /// Whether shadow doorbells (Doorbell Buffer Config) are supported.
    pub fn supports_shadow_doorbells(&self) -> bool {
        self.optional_admin_commands & oacs::DOORBELL_BUFFER_CONFIG != 0
    }

    /// Whether Write Zeroes is supported.
    pub fn supports_write_zeroes(&self) -> bool {
        self.optional_commands & oncs::WRITE_ZEROES != 0
    }
}

fn text(bytes: &[u8]) -> String {
    let cleaned: String = bytes
        .iter()
        .map(|&b| match b {
            // Padding is spaces in the specification, NULs on some devices.
            0 => ' ',
            0x20..0x7f => b as char,
            _ => '?',
        })
        .collect();
    cleaned.trim_end().to_string()
}

fn u16_at(data: &[u8; IDENTIFY_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([data[at], data[at + 1]])
}

fn u32_at(data: &[u8; IDENTIFY_SIZE], at: usize) -> u32 {
    u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
}

impl ControllerInfo {
    /// Decodes and checks the structure; `cap` gives MDTS its unit (CAP.MPSMIN).
    pub fn parse(data: &[u8; IDENTIFY_SIZE], cap: Capabilities) -> Result<Self> {
        let entry_shifts = |byte: u8| (byte & 0xf, byte >> 4);
        let sq_entry_shifts = entry_shifts(data[offsets::SQES]);
        let cq_entry_shifts = entry_shifts(data[offsets::CQES]);
        let allows = |(required, max): (u8, u8), shift: u8| required <= shift && shift <= max;
        if !allows(sq_entry_shifts, SUBMISSION_ENTRY_SHIFT) {
            return Err(Error::Misbehaved {
                what: format!(
                    "Identify Controller SQES does not allow 64-byte submission entries \
                     (required 2^{}, maximum 2^{})",
                    sq_entry_shifts.0, sq_entry_shifts.1
                ),
                value: u64::from(data[offsets::SQES]),
            });
        }
        if !allows(cq_entry_shifts, COMPLETION_ENTRY_SHIFT) {
            return Err(Error::Misbehaved {
                what: format!(
                    "Identify Controller CQES does not allow 16-byte completion entries \
                     (required 2^{}, maximum 2^{})",
                    cq_entry_shifts.0, cq_entry_shifts.1
                ),
                value: u64::from(data[offsets::CQES]),
            });
        }

        let mdts = data[offsets::MDTS];
        let max_transfer_bytes = match mdts {
            0 => None,
            _ => {
                let shift = u32::from(mdts) + u32::from(cap.min_page_shift());
                match 1u64.checked_shl(shift) {
                    Some(bytes) => Some(bytes),
                    None => {
                        return Err(Error::Misbehaved {
                            what: format!(
                                "Identify Controller MDTS of 2^{mdts} pages of 2^{} bytes does \
                                 not fit in 64 bits",
                                cap.min_page_shift()
                            ),
                            value: u64::from(mdts),
                        })
                    }
                }
            }
        };

        let namespace_count = u32_at(data, offsets::NN);
        // 0xffffffff is the broadcast NSID, never a namespace.
        if namespace_count == u32::MAX {
            return Err(Error::Misbehaved {
                what: "Identify Controller NN includes the broadcast namespace ID".into(),
                value: u64::from(namespace_count),
            });
        }

        Ok(ControllerInfo {
            vendor_id: u16_at(data, offsets::VID),
            subsystem_vendor_id: u16_at(data, offsets::SSVID),
            serial: text(&data[offsets::SN..offsets::SN + 20]),
            model: text(&data[offsets::MN..offsets::MN + 40]),
            firmware: text(&data[offsets::FR..offsets::FR + 8]),
            max_transfer_bytes,
            controller_id: u16_at(data, offsets::CNTLID),
            version: u32_at(data, offsets::VER),
            sq_entry_shifts,
            cq_entry_shifts,
            namespace_count,
            optional_admin_commands: u16_at(data, offsets::OACS),
            optional_commands: u16_at(data, offsets::ONCS),
            volatile_write_cache: data[offsets::VWC] & 1 != 0,
            error_log_entries: u16::from(data[offsets::ELPE]) + 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn valid() -> [u8; IDENTIFY_SIZE] {
        let mut data = [0u8; IDENTIFY_SIZE];
        data[offsets::SN..offsets::SN + 20].copy_from_slice(b"SN123               ");
        data[offsets::MN..offsets::MN + 4].copy_from_slice(b"M\x01X ");
        data[offsets::MDTS] = 5;
        data[offsets::SQES] = 0x66;
        data[offsets::CQES] = 0x44;
        data[offsets::NN..offsets::NN + 4].copy_from_slice(&3u32.to_le_bytes());
        data
    }

    #[test]
    fn fields_decode_and_text_is_cleaned() {
        let info = ControllerInfo::parse(&valid(), Capabilities(0)).unwrap();
        assert_eq!(info.serial, "SN123");
        assert_eq!(info.model, "M?X");
        assert_eq!(info.max_transfer_bytes, Some(128 * 1024));
        assert_eq!(info.namespace_count, 3);
        assert_eq!(info.sq_entry_shifts, (6, 6));
    }

    #[test]
    fn unusable_values_are_errors() {
        for (at, value) in [
            (offsets::SQES, 0x55u8),
            (offsets::SQES, 0x77),
            (offsets::CQES, 0x33),
            (offsets::MDTS, 60),
        ] {
            let mut data = valid();
            data[at] = value;
            let error = ControllerInfo::parse(&data, Capabilities(0)).unwrap_err();
            assert!(matches!(error, Error::Misbehaved { .. }), "{at}: {error}");
        }
        let mut data = valid();
        data[offsets::NN..offsets::NN + 4].copy_from_slice(&[0xff; 4]);
        assert!(ControllerInfo::parse(&data, Capabilities(0)).is_err());
        let mut data = valid();
        data[offsets::MDTS] = 0;
        assert_eq!(
            ControllerInfo::parse(&data, Capabilities(0))
                .unwrap()
                .max_transfer_bytes,
            None
        );
    }

    proptest! {
        #[test]
        fn any_identify_data_parses_or_errs(head in any::<[u8; 128]>(), sqes: u8, cqes: u8, mdts: u8, mpsmin in 0u64..16) {
            let mut data = [0u8; IDENTIFY_SIZE];
            data[..128].copy_from_slice(&head);
            data[offsets::SQES] = sqes;
            data[offsets::CQES] = cqes;
            data[offsets::MDTS] = mdts;
            let _ = ControllerInfo::parse(&data, Capabilities(mpsmin << 48));
        }
    }
}
