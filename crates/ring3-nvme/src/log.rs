//! Log pages read with Get Log Page (NVMe Base 2.0, 5.16): Error Information (01h) and
//! SMART / Health Information (02h).
//!
//! Both are device-written; the parsers take any bytes of the right length.

use crate::completion::Status as CompletionStatus;

/// Log identifiers.
pub mod lid {
    /// Error Information.
    pub const ERROR: u8 = 0x01;
    /// SMART / Health Information.
    pub const SMART: u8 = 0x02;
}

/// Size of the SMART / Health Information log page.
pub const SMART_LOG_SIZE: usize = 512;
/// Size of one Error Information log entry.
pub const ERROR_ENTRY_SIZE: usize = 64;

fn u16_at(data: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([data[at], data[at + 1]])
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
}

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&data[at..at + 8]);
    u64::from_le_bytes(bytes)
}

fn u128_at(data: &[u8], at: usize) -> u128 {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&data[at..at + 16]);
    u128::from_le_bytes(bytes)
}

bitflags::bitflags! {
    /// SMART critical warning bits (byte 0).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct CriticalWarning: u8 {
        /// Available spare capacity fell below the threshold.
        const SPARE = 1 << 0;
        /// A temperature is outside its threshold.
        const TEMPERATURE = 1 << 1;
        /// Reliability is degraded by media or internal errors.
        const RELIABILITY = 1 << 2;
        /// All media is read-only.
        const READ_ONLY = 1 << 3;
        /// The volatile memory backup device failed.
        const BACKUP = 1 << 4;
        /// Persistent memory region became read-only.
        const PMR_READ_ONLY = 1 << 5;
    }
}

/// The SMART / Health Information log page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmartLog {
    /// Critical warnings in effect.
    pub critical_warning: CriticalWarning,
    /// Composite temperature in kelvins.
    pub temperature_kelvin: u16,
    /// Available spare, percent.
    pub available_spare: u8,
    /// Available spare threshold, percent.
    pub spare_threshold: u8,
    /// Percentage of the rated life used (may exceed 100).
    pub percentage_used: u8,
    /// Data read, in units of 1000 512-byte blocks.
    pub data_units_read: u128,
    /// Data written, in units of 1000 512-byte blocks.
    pub data_units_written: u128,
    /// Read commands completed.
    pub host_reads: u128,
    /// Write commands completed.
    pub host_writes: u128,
    /// Minutes the controller was busy with I/O.
    pub busy_minutes: u128,
    /// Power cycles.
    pub power_cycles: u128,
    /// Power-on hours.
    pub power_on_hours: u128,
    /// Unsafe shutdowns.
    pub unsafe_shutdowns: u128,
    /// Unrecovered data integrity errors.
    pub media_errors: u128,
    /// Error Information log entries over the controller's life.
    pub error_log_entries: u128,
}

impl SmartLog {
    /// Decodes the 512-byte page.
    pub fn parse(data: &[u8; SMART_LOG_SIZE]) -> Self {
        SmartLog {
            critical_warning: CriticalWarning::from_bits_retain(data[0]),
            temperature_kelvin: u16_at(data, 1),
            available_spare: data[3],
            spare_threshold: data[4],
            percentage_used: data[5],
            data_units_read: u128_at(data, 32),
            data_units_written: u128_at(data, 48),
            host_reads: u128_at(data, 64),
            host_writes: u128_at(data, 80),
            busy_minutes: u128_at(data, 96),
            power_cycles: u128_at(data, 112),
            power_on_hours: u128_at(data, 128),
            unsafe_shutdowns: u128_at(data, 144),
            media_errors: u128_at(data, 160),
            error_log_entries: u128_at(data, 176),
        }
    }

    /// Composite temperature in degrees Celsius.
    pub fn temperature_celsius(&self) -> i32 {
        i32::from(self.temperature_kelvin) - 273
    }

    /// Bytes read (data units are 512 000 bytes).
    pub fn bytes_read(&self) -> u128 {
        self.data_units_read.saturating_mul(512_000)
    }

    /// Bytes written.
    pub fn bytes_written(&self) -> u128 {
        self.data_units_written.saturating_mul(512_000)
    }
}

/// One Error Information log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorLogEntry {
    /// Unique, increasing error count (0 marks an empty entry).
    pub error_count: u64,
    /// Submission queue of the failed command.
    pub sq_id: u16,
    /// Command ID of the failed command.
    pub command_id: u16,
    /// Its completion status.
    pub status: CompletionStatus,
    /// Byte and bit in the command of the field in error (0xffff if not applicable).
    pub parameter_location: u16,
    /// First LBA that had the error.
    pub lba: u64,
    /// Namespace.
    pub namespace_id: u32,
}

impl ErrorLogEntry {
    /// Decodes the entries of an Error Information page, dropping empty ones (error count 0).
    /// Trailing bytes short of a whole entry are ignored.
    pub fn parse_page(data: &[u8]) -> Vec<Self> {
        data.chunks_exact(ERROR_ENTRY_SIZE)
            .map(|entry| ErrorLogEntry {
                error_count: u64_at(entry, 0),
                sq_id: u16_at(entry, 8),
                command_id: u16_at(entry, 10),
                status: CompletionStatus::from_word(u16_at(entry, 12)),
                parameter_location: u16_at(entry, 14),
                lba: u64_at(entry, 16),
                namespace_id: u32_at(entry, 24),
            })
            .filter(|entry| entry.error_count != 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn smart_fields_decode() {
        let mut data = [0u8; SMART_LOG_SIZE];
        data[0] = 0x04;
        data[1..3].copy_from_slice(&310u16.to_le_bytes());
        data[3] = 100;
        data[4] = 10;
        data[32..48].copy_from_slice(&7u128.to_le_bytes());
        data[80..96].copy_from_slice(&42u128.to_le_bytes());
        data[176..192].copy_from_slice(&3u128.to_le_bytes());
        let log = SmartLog::parse(&data);
        assert_eq!(log.critical_warning, CriticalWarning::RELIABILITY);
        assert_eq!(log.temperature_celsius(), 37);
        assert_eq!(log.available_spare, 100);
        assert_eq!(log.bytes_read(), 7 * 512_000);
        assert_eq!(log.host_writes, 42);
        assert_eq!(log.error_log_entries, 3);
    }

    #[test]
    fn empty_error_entries_are_dropped() {
        let mut page = vec![0u8; ERROR_ENTRY_SIZE * 3];
        page[64..72].copy_from_slice(&9u64.to_le_bytes());
        page[72..74].copy_from_slice(&1u16.to_le_bytes());
        page[76..78].copy_from_slice(&(0x80u16 << 1).to_le_bytes());
        page[80..88].copy_from_slice(&1234u64.to_le_bytes());
        let entries = ErrorLogEntry::parse_page(&page);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].error_count, 9);
        assert_eq!(entries[0].sq_id, 1);
        assert_eq!(entries[0].status.code, 0x80);
        assert_eq!(entries[0].lba, 1234);
    }

    proptest! {
        #[test]
        fn any_bytes_parse(data in proptest::collection::vec(any::<u8>(), SMART_LOG_SIZE..=SMART_LOG_SIZE), page in proptest::collection::vec(any::<u8>(), 0..1000)) {
            let mut smart = [0u8; SMART_LOG_SIZE];
            smart.copy_from_slice(&data);
            let _ = SmartLog::parse(&smart);
            let entries = ErrorLogEntry::parse_page(&page);
            prop_assert!(entries.len() <= page.len() / ERROR_ENTRY_SIZE);
        }
    }
}
