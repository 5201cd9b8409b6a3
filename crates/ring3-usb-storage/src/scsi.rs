//! The SCSI commands a USB mass-storage device understands (the "SCSI transparent
//! command set", subclass 06h): command blocks of SPC-4 and SBC-3, and parsers of what
//! the device answers. The parsers check lengths and fields; nothing a device sends is
//! trusted.

use std::fmt;

use ring3::ErrorKind;

/// Operation codes (SPC-4 §6, SBC-3 §5).
pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const INQUIRY: u8 = 0x12;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8A;
    /// SERVICE ACTION IN(16); READ CAPACITY(16) is its service action 10h.
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const SERVICE_ACTION_READ_CAPACITY_16: u8 = 0x10;
}

/// The INQUIRY allocation length: the standard data up to the revision level.
pub const INQUIRY_LEN: usize = 36;
/// The REQUEST SENSE allocation length: fixed-format sense without extras, the length
/// every Bulk-Only device handles (some misbehave when asked for more).
pub const SENSE_LEN: usize = 18;
/// READ CAPACITY(10) parameter data.
pub const READ_CAPACITY_10_LEN: usize = 8;
/// READ CAPACITY(16) allocation length (SBC-3 §5.16.2).
pub const READ_CAPACITY_16_LEN: usize = 32;

/// TEST UNIT READY (SPC-4 §6.37).
pub fn test_unit_ready() -> [u8; 6] {
    [opcode::TEST_UNIT_READY, 0, 0, 0, 0, 0]
}

/// REQUEST SENSE (SPC-4 §6.29) asking for fixed-format sense (DESC = 0).
pub fn request_sense(allocation_length: u8) -> [u8; 6] {
    [opcode::REQUEST_SENSE, 0, 0, 0, allocation_length, 0]
}

/// INQUIRY of the standard data (SPC-4 §6.6).
pub fn inquiry(allocation_length: u8) -> [u8; 6] {
    [opcode::INQUIRY, 0, 0, 0, allocation_length, 0]
}

/// READ CAPACITY(10) (SBC-3 §5.15).
pub fn read_capacity_10() -> [u8; 10] {
    [opcode::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// READ CAPACITY(16) (SBC-3 §5.16).
pub fn read_capacity_16(allocation_length: u32) -> [u8; 16] {
    let mut cdb = [0; 16];
    cdb[0] = opcode::SERVICE_ACTION_IN_16;
    cdb[1] = opcode::SERVICE_ACTION_READ_CAPACITY_16;
    cdb[10..14].copy_from_slice(&allocation_length.to_be_bytes());
    cdb
}

/// READ(10) or WRITE(10) (SBC-3 §5.11, §5.35).
pub fn rw_10(opcode: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut cdb = [0; 10];
    cdb[0] = opcode;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// READ(16) or WRITE(16) (SBC-3 §5.13, §5.37).
pub fn rw_16(opcode: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut cdb = [0; 16];
    cdb[0] = opcode;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// SYNCHRONIZE CACHE(10) of the whole medium (SBC-3 §5.22: LBA 0 and 0 blocks).
pub fn synchronize_cache_10() -> [u8; 10] {
    [opcode::SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// Standard INQUIRY data (SPC-4 §6.6.2), the fields a driver and a person need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InquiryData {
    /// PERIPHERAL QUALIFIER: 0 when a device of the type is connected to the LUN.
    pub peripheral_qualifier: u8,
    /// PERIPHERAL DEVICE TYPE: 00h direct access (disk), 05h CD/DVD, 0Eh simplified
    /// direct access, ...
    pub peripheral_device_type: u8,
    /// RMB: the medium is removable.
    pub removable: bool,
    /// VERSION: the SPC standard the device claims.
    pub version: u8,
    /// T10 VENDOR IDENTIFICATION, trimmed.
    pub vendor: String,
    /// PRODUCT IDENTIFICATION, trimmed.
    pub product: String,
    /// PRODUCT REVISION LEVEL, trimmed.
    pub revision: String,
}

impl InquiryData {
    /// Parses standard INQUIRY data. The first five bytes (up to ADDITIONAL LENGTH) are
    /// required; the identification strings are taken from what is there, as printable
    /// ASCII (other bytes are shown as `?`).
    pub fn parse(data: &[u8]) -> Result<Self, String> {
        if data.len() < 5 {
            return Err(format!(
                "{} bytes of INQUIRY data, at least 5 are needed",
                data.len()
            ));
        }
        // ADDITIONAL LENGTH says how much follows byte 4; never read past what arrived.
        let end = data.len().min(5 + usize::from(data[4]));
        let field = |range: std::ops::Range<usize>| -> String {
            let start = range.start.min(end);
            let stop = range.end.min(end);
            ascii_field(&data[start..stop])
        };
        Ok(Self {
            peripheral_qualifier: data[0] >> 5,
            peripheral_device_type: data[0] & 0x1F,
            removable: data[1] & 0x80 != 0,
            version: data[2],
            vendor: field(8..16),
            product: field(16..32),
            revision: field(32..36),
        })
    }

    /// Whether the LUN is a block device this driver can read and write: a connected
    /// direct-access (00h) or simplified direct-access (0Eh) device.
    pub fn is_block_device(&self) -> bool {
        self.peripheral_qualifier == 0 && matches!(self.peripheral_device_type, 0x00 | 0x0E)
    }
}

fn ascii_field(bytes: &[u8]) -> String {
    let text: String = bytes
        .iter()
        .map(|&byte| {
            if byte.is_ascii_graphic() || byte == b' ' {
                char::from(byte)
            } else {
                '?'
            }
        })
        .collect();
    text.trim().to_string()
}

/// The size of the medium (READ CAPACITY parameter data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// RETURNED LOGICAL BLOCK ADDRESS: the last LBA.
    pub last_lba: u64,
    /// LOGICAL BLOCK LENGTH IN BYTES.
    pub block_size: u32,
}

/// The smallest block size the driver accepts.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// The largest block size the driver accepts.
pub const MAX_BLOCK_SIZE: u32 = 64 * 1024;

impl Capacity {
    /// READ CAPACITY(10) parameter data (SBC-3 §5.15.2). A last LBA of FFFFFFFFh means
    /// the medium is too large for it: ask READ CAPACITY(16).
    pub fn parse_10(data: &[u8]) -> Result<Self, String> {
        let data: &[u8; 8] = data
            .get(..8)
            .and_then(|data| data.try_into().ok())
            .ok_or_else(|| {
                format!(
                    "{} bytes of READ CAPACITY(10) data, 8 are needed",
                    data.len()
                )
            })?;
        Ok(Self {
            last_lba: u64::from(u32::from_be_bytes([data[0], data[1], data[2], data[3]])),
            block_size: u32::from_be_bytes([data[4], data[5], data[6], data[7]]),
        })
    }

    /// READ CAPACITY(16) parameter data (SBC-3 §5.16.2); only the first 12 bytes matter.
    pub fn parse_16(data: &[u8]) -> Result<Self, String> {
        let data: &[u8; 12] = data
            .get(..12)
            .and_then(|data| data.try_into().ok())
            .ok_or_else(|| {
                format!(
                    "{} bytes of READ CAPACITY(16) data, 12 are needed",
                    data.len()
                )
            })?;
        let mut last_lba = [0; 8];
        last_lba.copy_from_slice(&data[0..8]);
        Ok(Self {
            last_lba: u64::from_be_bytes(last_lba),
            block_size: u32::from_be_bytes([data[8], data[9], data[10], data[11]]),
        })
    }

    /// Whether READ CAPACITY(10) said the medium needs READ CAPACITY(16).
    pub fn needs_16(&self) -> bool {
        self.last_lba == u64::from(u32::MAX)
    }

    /// Checks the block size and size are usable, returning the number of blocks.
    pub fn block_count(&self) -> Result<u64, String> {
        if !self.block_size.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&self.block_size)
        {
            return Err(format!(
                "block size {} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}",
                self.block_size
            ));
        }
        let count = self.last_lba.checked_add(1).ok_or_else(|| {
            format!(
                "last LBA {:#x} leaves no room for a block count",
                self.last_lba
            )
        })?;
        // The byte size must fit a u64 (and the LBA space of READ(16)).
        count
            .checked_mul(u64::from(self.block_size))
            .ok_or_else(|| {
                format!(
                    "{count} blocks of {} bytes overflow a 64-bit byte count",
                    self.block_size
                )
            })?;
        Ok(count)
    }
}

/// SENSE KEY (SPC-4 §4.5.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenseKey(pub u8);

impl SenseKey {
    pub const NO_SENSE: SenseKey = SenseKey(0x0);
    pub const RECOVERED_ERROR: SenseKey = SenseKey(0x1);
    pub const NOT_READY: SenseKey = SenseKey(0x2);
    pub const MEDIUM_ERROR: SenseKey = SenseKey(0x3);
    pub const HARDWARE_ERROR: SenseKey = SenseKey(0x4);
    pub const ILLEGAL_REQUEST: SenseKey = SenseKey(0x5);
    pub const UNIT_ATTENTION: SenseKey = SenseKey(0x6);
    pub const DATA_PROTECT: SenseKey = SenseKey(0x7);
    pub const BLANK_CHECK: SenseKey = SenseKey(0x8);
    pub const VENDOR_SPECIFIC: SenseKey = SenseKey(0x9);
    pub const COPY_ABORTED: SenseKey = SenseKey(0xA);
    pub const ABORTED_COMMAND: SenseKey = SenseKey(0xB);
    pub const VOLUME_OVERFLOW: SenseKey = SenseKey(0xD);
    pub const MISCOMPARE: SenseKey = SenseKey(0xE);

    /// The key's name in the standard.
    pub fn name(self) -> &'static str {
        match self.0 {
            0x0 => "NO SENSE",
            0x1 => "RECOVERED ERROR",
            0x2 => "NOT READY",
            0x3 => "MEDIUM ERROR",
            0x4 => "HARDWARE ERROR",
            0x5 => "ILLEGAL REQUEST",
            0x6 => "UNIT ATTENTION",
            0x7 => "DATA PROTECT",
            0x8 => "BLANK CHECK",
            0x9 => "VENDOR SPECIFIC",
            0xA => "COPY ABORTED",
            0xB => "ABORTED COMMAND",
            0xD => "VOLUME OVERFLOW",
            0xE => "MISCOMPARE",
            _ => "RESERVED",
        }
    }
}

impl fmt::Display for SenseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:X}h)", self.name(), self.0)
    }
}

/// Sense data: why a command ended with CHECK CONDITION.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// RESPONSE CODE: 70h/71h fixed format, 72h/73h descriptor format.
    pub response_code: u8,
    /// SENSE KEY.
    pub key: SenseKey,
    /// ADDITIONAL SENSE CODE.
    pub asc: u8,
    /// ADDITIONAL SENSE CODE QUALIFIER.
    pub ascq: u8,
}

impl Sense {
    /// Parses sense data in fixed (SPC-4 §4.5.3) or descriptor (§4.5.2) format.
    pub fn parse(data: &[u8]) -> Result<Self, String> {
        let Some(&first) = data.first() else {
            return Err("no sense data".into());
        };
        let response_code = first & 0x7F;
        match response_code {
            0x70 | 0x71 => {
                if data.len() < 3 {
                    return Err(format!("{} bytes of fixed-format sense data", data.len()));
                }
                // ASC and ASCQ are at bytes 12 and 13, within the ADDITIONAL SENSE LENGTH
                // (byte 7); a device may leave them out.
                let end = data
                    .len()
                    .min(8 + usize::from(data.get(7).copied().unwrap_or(0)));
                let byte = |index: usize| if index < end { data[index] } else { 0 };
                Ok(Self {
                    response_code,
                    key: SenseKey(data[2] & 0x0F),
                    asc: byte(12),
                    ascq: byte(13),
                })
            }
            0x72 | 0x73 => {
                if data.len() < 4 {
                    return Err(format!(
                        "{} bytes of descriptor-format sense data",
                        data.len()
                    ));
                }
                Ok(Self {
                    response_code,
                    key: SenseKey(data[1] & 0x0F),
                    asc: data[2],
                    ascq: data[3],
                })
            }
            other => Err(format!(
                "sense response code {other:#04x} is not 70h to 73h"
            )),
        }
    }

    /// The standard's description of ASC/ASCQ, for the common codes.
    pub fn description(&self) -> Option<&'static str> {
        Some(match (self.asc, self.ascq) {
            (0x00, 0x00) => "no additional sense information",
            (0x04, 0x00) => "logical unit not ready, cause not reportable",
            (0x04, 0x01) => "logical unit is in process of becoming ready",
            (0x04, 0x02) => "logical unit not ready, initializing command required",
            (0x04, 0x03) => "logical unit not ready, manual intervention required",
            (0x04, 0x04) => "logical unit not ready, format in progress",
            (0x0C, 0x00) => "write error",
            (0x0C, 0x02) => "write error, auto reallocation failed",
            (0x11, 0x00) => "unrecovered read error",
            (0x1A, 0x00) => "parameter list length error",
            (0x20, 0x00) => "invalid command operation code",
            (0x21, 0x00) => "logical block address out of range",
            (0x24, 0x00) => "invalid field in CDB",
            (0x25, 0x00) => "logical unit not supported",
            (0x26, 0x00) => "invalid field in parameter list",
            (0x27, 0x00) => "write protected",
            (0x28, 0x00) => "not ready to ready change, medium may have changed",
            (0x29, 0x00) => "power on, reset, or bus device reset occurred",
            (0x29, 0x01) => "power on occurred",
            (0x29, 0x02) => "SCSI bus reset occurred",
            (0x2A, 0x01) => "mode parameters changed",
            (0x3A, _) => "medium not present",
            (0x44, 0x00) => "internal target failure",
            (0x5D, _) => "failure prediction threshold exceeded",
            _ => return None,
        })
    }

    /// Whether the medium is missing (no card in the reader, no disc): waiting will not help.
    pub fn medium_not_present(&self) -> bool {
        self.key == SenseKey::NOT_READY && self.asc == 0x3A
    }

    /// What a caller can do about a command that failed with this sense.
    pub fn error_kind(&self) -> ErrorKind {
        match self.key {
            SenseKey::ILLEGAL_REQUEST | SenseKey::DATA_PROTECT => ErrorKind::InvalidInput,
            SenseKey::NOT_READY if self.medium_not_present() => ErrorKind::Environment,
            _ => ErrorKind::Device,
        }
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sense key {}, ASC/ASCQ {:02X}h/{:02X}h",
            self.key, self.asc, self.ascq
        )?;
        if let Some(description) = self.description() {
            write!(f, " ({description})")?;
        }
        Ok(())
    }
}
