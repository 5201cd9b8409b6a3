//! Completion queue entries (NVMe Base 2.0, 4.2.1 "Common Completion Queue Entry Layout"
//! and 4.2.3 "Status Field Definition").
//!
//! A completion is 16 bytes the device writes into host memory, so everything in it is
//! untrusted: [`CompletionEntry::parse`] accepts any 16 bytes without panicking and
//! decodes every bit; checking the values against what the driver submitted is the
//! queue's job ([`crate::queue`]).

use std::fmt;

/// Size of a completion queue entry in bytes (IOCQES = 4).
pub const COMPLETION_ENTRY_SIZE: usize = 16;
/// log2 of [`COMPLETION_ENTRY_SIZE`], the value for CC.IOCQES and Identify's CQES.
pub const COMPLETION_ENTRY_SHIFT: u8 = 4;
/// Where the 16-bit status-and-phase word lies in an entry (dword 3, bits 31:16).
pub const STATUS_OFFSET: usize = 14;

/// Status Code Type, the kind of status (4.2.3.1, figure "Status Code – Status Code Type Values").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusCodeType {
    /// 0: generic command status.
    Generic,
    /// 1: command-specific status.
    CommandSpecific,
    /// 2: media and data integrity errors.
    MediaError,
    /// 3: path-related status.
    PathRelated,
    /// 7: vendor specific.
    VendorSpecific,
    /// 4–6: reserved values.
    Reserved(u8),
}

impl StatusCodeType {
    /// Decodes the 3-bit SCT field.
    pub fn from_bits(bits: u8) -> Self {
        match bits & 0x7 {
            0 => StatusCodeType::Generic,
            1 => StatusCodeType::CommandSpecific,
            2 => StatusCodeType::MediaError,
            3 => StatusCodeType::PathRelated,
            7 => StatusCodeType::VendorSpecific,
            other => StatusCodeType::Reserved(other),
        }
    }

    /// The 3-bit SCT field.
    pub fn bits(self) -> u8 {
        match self {
            StatusCodeType::Generic => 0,
            StatusCodeType::CommandSpecific => 1,
            StatusCodeType::MediaError => 2,
            StatusCodeType::PathRelated => 3,
            StatusCodeType::VendorSpecific => 7,
            StatusCodeType::Reserved(bits) => bits & 0x7,
        }
    }
}

/// The status field of a completion (dword 3 bits 31:17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// SCT: what kind of status [`Status::code`] is.
    pub code_type: StatusCodeType,
    /// SC: the status code within its type.
    pub code: u8,
    /// CRD: which Command Retry Delay time applies (0 = none).
    pub retry_delay: u8,
    /// M: more information is in the Error Information log page.
    pub more: bool,
    /// DNR: retrying the same command is expected to fail again.
    pub do_not_retry: bool,
}

impl Status {
    /// Decodes the status from the 16-bit status-and-phase word (the phase is bit 0).
    pub fn from_word(word: u16) -> Self {
        Status {
            code: (word >> 1) as u8,
            code_type: StatusCodeType::from_bits((word >> 9) as u8),
            retry_delay: ((word >> 12) & 0x3) as u8,
            more: word & (1 << 14) != 0,
            do_not_retry: word & (1 << 15) != 0,
        }
    }

    /// The status bits of the status-and-phase word (bit 0, the phase, is clear).
    pub fn to_word(self) -> u16 {
        (u16::from(self.code) << 1)
            | (u16::from(self.code_type.bits()) << 9)
            | (u16::from(self.retry_delay & 0x3) << 12)
            | (u16::from(self.more) << 14)
            | (u16::from(self.do_not_retry) << 15)
    }

    /// Successful completion: generic status 0.
    pub const SUCCESS: Status = Status {
        code_type: StatusCodeType::Generic,
        code: 0,
        retry_delay: 0,
        more: false,
        do_not_retry: false,
    };

    /// A generic status `code` with DNR set (what a device model answers for bad commands).
    pub fn generic(code: u8) -> Self {
        Status {
            code,
            do_not_retry: code != 0,
            ..Self::SUCCESS
        }
    }

    /// Whether the command succeeded.
    pub fn is_success(&self) -> bool {
        self.code_type == StatusCodeType::Generic && self.code == 0
    }

    /// Whether the failure lies with the device (media, data transfer, internal, path)
    /// rather than with the command the driver built.
    pub fn is_device_fault(&self) -> bool {
        match self.code_type {
            StatusCodeType::Generic => matches!(self.code, 0x04 | 0x06 | 0x07 | 0x08),
            StatusCodeType::CommandSpecific => false,
            _ => true,
        }
    }

    /// A readable description of the status, where the driver knows it.
    pub fn description(&self) -> Option<&'static str> {
        use StatusCodeType::*;
        Some(match (self.code_type, self.code) {
            (Generic, 0x00) => "successful completion",
            (Generic, 0x01) => "invalid command opcode",
            (Generic, 0x02) => "invalid field in command",
            (Generic, 0x03) => "command ID conflict",
            (Generic, 0x04) => "data transfer error",
            (Generic, 0x05) => "command aborted due to power loss notification",
            (Generic, 0x06) => "internal error",
            (Generic, 0x07) => "command abort requested",
            (Generic, 0x08) => "command aborted due to SQ deletion",
            (Generic, 0x09) => "command aborted due to failed fused command",
            (Generic, 0x0a) => "command aborted due to missing fused command",
            (Generic, 0x0b) => "invalid namespace or format",
            (Generic, 0x0c) => "command sequence error",
            (Generic, 0x0d) => "invalid SGL segment descriptor",
            (Generic, 0x0e) => "invalid number of SGL descriptors",
            (Generic, 0x0f) => "data SGL length invalid",
            (Generic, 0x10) => "metadata SGL length invalid",
            (Generic, 0x11) => "SGL descriptor type invalid",
            (Generic, 0x12) => "invalid use of controller memory buffer",
            (Generic, 0x13) => "PRP offset invalid",
            (Generic, 0x14) => "atomic write unit exceeded",
            (Generic, 0x15) => "operation denied",
            (Generic, 0x16) => "SGL offset invalid",
            (Generic, 0x18) => "host identifier inconsistent format",
            (Generic, 0x19) => "keep alive timer expired",
            (Generic, 0x1a) => "keep alive timeout invalid",
            (Generic, 0x1b) => "command aborted due to preempt and abort",
            (Generic, 0x1c) => "sanitize failed",
            (Generic, 0x1d) => "sanitize in progress",
            (Generic, 0x20) => "namespace is write protected",
            (Generic, 0x21) => "command interrupted",
            (Generic, 0x22) => "transient transport error",
            (Generic, 0x80) => "LBA out of range",
            (Generic, 0x81) => "capacity exceeded",
            (Generic, 0x82) => "namespace not ready",
            (Generic, 0x83) => "reservation conflict",
            (Generic, 0x84) => "format in progress",
            (CommandSpecific, 0x00) => "completion queue invalid",
            (CommandSpecific, 0x01) => "invalid queue identifier",
            (CommandSpecific, 0x02) => "invalid queue size",
            (CommandSpecific, 0x03) => "abort command limit exceeded",
            (CommandSpecific, 0x05) => "asynchronous event request limit exceeded",
            (CommandSpecific, 0x08) => "invalid interrupt vector",
            (CommandSpecific, 0x09) => "invalid log page",
            (CommandSpecific, 0x0a) => "invalid format",
            (CommandSpecific, 0x0d) => "feature identifier not saveable",
            (CommandSpecific, 0x80) => "conflicting attributes",
            (CommandSpecific, 0x81) => "invalid protection information",
            (CommandSpecific, 0x82) => "attempted write to read only range",
            (MediaError, 0x80) => "write fault",
            (MediaError, 0x81) => "unrecovered read error",
            (MediaError, 0x82) => "end-to-end guard check error",
            (MediaError, 0x83) => "end-to-end application tag check error",
            (MediaError, 0x84) => "end-to-end reference tag check error",
            (MediaError, 0x85) => "compare failure",
            (MediaError, 0x86) => "access denied",
            (MediaError, 0x87) => "deallocated or unwritten logical block",
            (PathRelated, 0x00) => "internal path error",
            _ => return None,
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.code_type {
            StatusCodeType::Generic => "generic",
            StatusCodeType::CommandSpecific => "command specific",
            StatusCodeType::MediaError => "media error",
            StatusCodeType::PathRelated => "path related",
            StatusCodeType::VendorSpecific => "vendor specific",
            StatusCodeType::Reserved(_) => "reserved type",
        };
        match self.description() {
            Some(text) => write!(f, "{text} ({kind} status {:#04x}", self.code)?,
            None => write!(
                f,
                "{kind} status {:#04x} (SCT {}",
                self.code,
                self.code_type.bits()
            )?,
        }
        if self.do_not_retry {
            f.write_str(", do not retry")?;
        }
        if self.more {
            f.write_str(", more in the error log")?;
        }
        f.write_str(")")
    }
}

/// One 16-byte completion queue entry, decoded but not yet validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompletionEntry {
    /// Dword 0: command-specific result.
    pub result: u32,
    /// Dword 1: command specific (reserved for most commands).
    pub dword1: u32,
    /// SQHD: the submission queue head pointer as the controller last consumed it.
    pub sq_head: u16,
    /// SQID: which submission queue the command came from.
    pub sq_id: u16,
    /// CID: the command identifier from the submission entry.
    pub command_id: u16,
    /// P: the phase tag, which flips each time the controller wraps around the queue.
    pub phase: bool,
    /// The status field.
    pub status: Status,
}

impl CompletionEntry {
    /// Decodes any 16 bytes (never panics; all bits are kept).
    pub fn parse(bytes: &[u8; COMPLETION_ENTRY_SIZE]) -> Self {
        let dword =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let half = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        let status_word = half(STATUS_OFFSET);
        CompletionEntry {
            result: dword(0),
            dword1: dword(4),
            sq_head: half(8),
            sq_id: half(10),
            command_id: half(12),
            phase: status_word & 1 != 0,
            status: Status::from_word(status_word),
        }
    }

    /// The entry's bytes (what a device model writes).
    pub fn to_bytes(&self) -> [u8; COMPLETION_ENTRY_SIZE] {
        let mut bytes = [0; COMPLETION_ENTRY_SIZE];
        bytes[0..4].copy_from_slice(&self.result.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.dword1.to_le_bytes());
        bytes[8..10].copy_from_slice(&self.sq_head.to_le_bytes());
        bytes[10..12].copy_from_slice(&self.sq_id.to_le_bytes());
        bytes[12..14].copy_from_slice(&self.command_id.to_le_bytes());
        let word = self.status.to_word() | u16::from(self.phase);
        bytes[14..16].copy_from_slice(&word.to_le_bytes());
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_successful_completion_decodes() {
        let mut bytes = [0u8; 16];
        bytes[0..4].copy_from_slice(&0x1234_5678u32.to_le_bytes());
        bytes[8..10].copy_from_slice(&5u16.to_le_bytes());
        bytes[12..14].copy_from_slice(&42u16.to_le_bytes());
        bytes[14] = 1;
        let entry = CompletionEntry::parse(&bytes);
        assert_eq!(entry.result, 0x1234_5678);
        assert_eq!((entry.sq_head, entry.sq_id, entry.command_id), (5, 0, 42));
        assert!(entry.phase);
        assert!(entry.status.is_success());
        assert_eq!(
            entry.status.to_string(),
            "successful completion (generic status 0x00)"
        );
    }

    #[test]
    fn common_failures_have_readable_messages() {
        let lba = Status::from_word(0x80 << 1 | 1 << 15);
        assert_eq!(lba.code_type, StatusCodeType::Generic);
        assert!(lba.do_not_retry);
        assert_eq!(
            lba.to_string(),
            "LBA out of range (generic status 0x80, do not retry)"
        );
        assert_eq!(
            Status::generic(0x01).to_string(),
            "invalid command opcode (generic status 0x01, do not retry)"
        );
        assert_eq!(
            Status::generic(0x02).description(),
            Some("invalid field in command")
        );
        let queue = Status::from_word(1 << 9 | 0x02 << 1);
        assert_eq!(
            queue.to_string(),
            "invalid queue size (command specific status 0x02)"
        );
        let odd = Status::from_word(5 << 9 | 0x42 << 1 | 1 << 14);
        assert_eq!(
            odd.to_string(),
            "reserved type status 0x42 (SCT 5, more in the error log)"
        );
        assert!(Status::from_word(2 << 9 | 0x81 << 1).is_device_fault());
        assert!(!Status::generic(0x80).is_device_fault());
    }

    proptest! {
        #[test]
        fn any_bytes_parse_and_round_trip(bytes in any::<[u8; 16]>()) {
            let entry = CompletionEntry::parse(&bytes);
            prop_assert_eq!(entry.to_bytes(), bytes);
            let word = u16::from_le_bytes([bytes[14], bytes[15]]);
            prop_assert_eq!(entry.phase, word & 1 == 1);
            prop_assert_eq!(entry.status.code, (word >> 1) as u8);
            prop_assert_eq!(entry.status.code_type.bits(), ((word >> 9) & 7) as u8);
            prop_assert_eq!(entry.command_id, u16::from_le_bytes([bytes[12], bytes[13]]));
            prop_assert_eq!(entry.sq_head, u16::from_le_bytes([bytes[8], bytes[9]]));
            // Formatting never panics either.
            let _ = entry.status.to_string();
        }
    }
}
