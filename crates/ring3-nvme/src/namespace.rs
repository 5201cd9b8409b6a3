//! Namespaces: the active namespace ID list (Identify CNS 02h) and the Identify
//! Namespace data structure (CNS 00h, NVM Command Set Specification 1.0, 4.1.5.1).
//!
//! Both are written by the device, so both parsers accept any 4096 bytes and check what
//! the driver relies on: IDs ascending and within NN, a block size the driver can
//! address, a format index that exists.

use crate::error::{Error, Result};
use crate::identify::IDENTIFY_SIZE;

/// Byte offsets in Identify Namespace.
pub mod offsets {
    /// NSZE: namespace size in logical blocks.
    pub const NSZE: usize = 0;
    /// NCAP: namespace capacity in logical blocks.
    pub const NCAP: usize = 8;
    /// NUSE: namespace utilization in logical blocks.
    pub const NUSE: usize = 16;
    /// NSFEAT: namespace features.
    pub const NSFEAT: usize = 24;
    /// NLBAF: number of LBA formats, 0-based.
    pub const NLBAF: usize = 25;
    /// FLBAS: formatted LBA size (index of the format in use).
    pub const FLBAS: usize = 26;
    /// DLFEAT: deallocate logical block features.
    pub const DLFEAT: usize = 33;
    /// LBAF0: the first LBA format descriptor (4 bytes each).
    pub const LBAF: usize = 128;
}

/// Smallest logical block the specification allows (512 bytes).
pub const MIN_BLOCK_SHIFT: u8 = 9;
/// Largest logical block this driver accepts (64 KiB).
pub const MAX_BLOCK_SHIFT: u8 = 16;

/// One active namespace, as Identify Namespace describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// NSID.
    pub id: u32,
    /// NSZE: size in logical blocks (the LBA range is `0..blocks`).
    pub blocks: u64,
    /// NCAP: blocks that may be allocated at once.
    pub capacity: u64,
    /// NUSE: blocks allocated now.
    pub utilization: u64,
    /// log2 of the logical block size.
    pub block_shift: u8,
    /// Metadata bytes per block in the format in use (this driver moves no metadata, so
    /// I/O to a namespace with metadata is refused).
    pub metadata_size: u16,
    /// DLFEAT bits 2:0 = 001b: deallocated blocks read back as zeroes.
    pub deallocated_reads_zeroes: bool,
    /// NSFEAT bit 3: deallocated blocks are reported by DLFEAT.
    pub thin_provisioned: bool,
}

fn u64_at(data: &[u8; IDENTIFY_SIZE], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&data[at..at + 8]);
    u64::from_le_bytes(bytes)
}

impl Namespace {
    /// Bytes per logical block.
    pub fn block_size(&self) -> u32 {
        1 << self.block_shift
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_size()))
    }

    /// Decodes Identify Namespace for `id`; `Ok(None)` if the namespace is inactive
    /// (NSZE = 0, the all-zero structure an inactive NSID returns).
    pub fn parse(id: u32, data: &[u8; IDENTIFY_SIZE]) -> Result<Option<Self>> {
        let blocks = u64_at(data, offsets::NSZE);
        if blocks == 0 {
            return Ok(None);
        }
        let capacity = u64_at(data, offsets::NCAP);
        let utilization = u64_at(data, offsets::NUSE);
        let formats = usize::from(data[offsets::NLBAF]) + 1;
        let flbas = data[offsets::FLBAS];
        // FLBAS bits 3:0 with bits 6:5 as the upper bits when more than 16 formats exist.
        let index = usize::from(flbas & 0xf) | (usize::from((flbas >> 5) & 0x3) << 4);
        if index >= formats || formats > 64 {
            return Err(Error::Misbehaved {
                what: format!(
                    "Identify Namespace {id}: FLBAS selects LBA format {index}, but NLBAF says \
                     there are {formats}"
                ),
                value: u64::from(flbas),
            });
        }
        let at = offsets::LBAF + index * 4;
        let format = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
        let metadata_size = format as u16;
        let block_shift = (format >> 16) as u8;
        if !(MIN_BLOCK_SHIFT..=MAX_BLOCK_SHIFT).contains(&block_shift) {
            return Err(Error::Misbehaved {
                what: format!(
                    "Identify Namespace {id}: LBA format {index} has blocks of 2^{block_shift} \
                     bytes; 2^{MIN_BLOCK_SHIFT} to 2^{MAX_BLOCK_SHIFT} are supported"
                ),
                value: u64::from(format),
            });
        }
        if capacity > blocks || utilization > capacity {
            return Err(Error::Misbehaved {
                what: format!(
                    "Identify Namespace {id}: NUSE {utilization} <= NCAP {capacity} <= NSZE \
                     {blocks} does not hold"
                ),
                value: capacity,
            });
        }
        if blocks.checked_mul(1u64 << block_shift).is_none() {
            return Err(Error::Misbehaved {
                what: format!("Identify Namespace {id}: NSZE {blocks} blocks overflow 64 bits"),
                value: blocks,
            });
        }
        Ok(Some(Namespace {
            id,
            blocks,
            capacity,
            utilization,
            block_shift,
            metadata_size,
            deallocated_reads_zeroes: data[offsets::DLFEAT] & 0x7 == 1,
            thin_provisioned: data[offsets::NSFEAT] & 1 != 0,
        }))
    }
}

/// Decodes an active namespace ID list (CNS 02h): ascending IDs, ended by a zero or by
/// the end of the page; every ID must lie in `1..=namespace_count` (NN).
pub fn parse_active_list(data: &[u8; IDENTIFY_SIZE], namespace_count: u32) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for chunk in data.chunks_exact(4) {
        let id = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        if id == 0 {
            break;
        }
        if id > namespace_count || ids.last().is_some_and(|&last| id <= last) {
            return Err(Error::Misbehaved {
                what: format!(
                    "the active namespace list holds ID {id} after {:?} (NN is {namespace_count}; \
                     IDs must ascend)",
                    ids.last()
                ),
                value: u64::from(id),
            });
        }
        ids.push(id);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn identify(blocks: u64, shift: u8) -> [u8; IDENTIFY_SIZE] {
        let mut data = [0u8; IDENTIFY_SIZE];
        data[offsets::NSZE..offsets::NSZE + 8].copy_from_slice(&blocks.to_le_bytes());
        data[offsets::NCAP..offsets::NCAP + 8].copy_from_slice(&blocks.to_le_bytes());
        data[offsets::NLBAF] = 1;
        data[offsets::FLBAS] = 1;
        data[offsets::DLFEAT] = 0x09;
        // Format 0: 512 bytes; format 1 (in use): 2^shift.
        data[offsets::LBAF + 2] = 9;
        data[offsets::LBAF + 6] = shift;
        data
    }

    #[test]
    fn the_format_in_use_gives_the_block_size() {
        let ns = Namespace::parse(3, &identify(1000, 12)).unwrap().unwrap();
        assert_eq!(ns.id, 3);
        assert_eq!(ns.blocks, 1000);
        assert_eq!(ns.block_size(), 4096);
        assert_eq!(ns.size_bytes(), 4096 * 1000);
        assert!(ns.deallocated_reads_zeroes);
        assert_eq!(ns.metadata_size, 0);
    }

    #[test]
    fn an_all_zero_structure_is_an_inactive_namespace() {
        assert_eq!(Namespace::parse(1, &[0; IDENTIFY_SIZE]).unwrap(), None);
    }

    #[test]
    fn impossible_values_are_errors() {
        let mut data = identify(1000, 12);
        data[offsets::FLBAS] = 2;
        assert!(Namespace::parse(1, &data).is_err(), "format beyond NLBAF");
        assert!(Namespace::parse(1, &identify(1000, 8)).is_err());
        assert!(Namespace::parse(1, &identify(1000, 40)).is_err());
        assert!(Namespace::parse(1, &identify(u64::MAX, 12)).is_err());
        let mut data = identify(1000, 12);
        data[offsets::NCAP..offsets::NCAP + 8].copy_from_slice(&2000u64.to_le_bytes());
        assert!(Namespace::parse(1, &data).is_err(), "NCAP above NSZE");
    }

    #[test]
    fn the_active_list_ends_at_zero_and_must_ascend() {
        let mut data = [0u8; IDENTIFY_SIZE];
        for (i, id) in [1u32, 2, 5].iter().enumerate() {
            data[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
        }
        assert_eq!(parse_active_list(&data, 5).unwrap(), vec![1, 2, 5]);
        assert!(parse_active_list(&data, 4).is_err(), "5 is beyond NN");
        data[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert!(parse_active_list(&data, 5).is_err(), "2 after 2");
        assert!(parse_active_list(&[0; IDENTIFY_SIZE], 5)
            .unwrap()
            .is_empty());
    }

    proptest! {
        #[test]
        fn any_identify_namespace_parses_or_errs(head in any::<[u8; 64]>(), formats in any::<[u8; 64]>(), id: u32) {
            let mut data = [0u8; IDENTIFY_SIZE];
            data[..64].copy_from_slice(&head);
            data[offsets::LBAF..offsets::LBAF + 64].copy_from_slice(&formats);
            if let Ok(Some(ns)) = Namespace::parse(id, &data) {
                prop_assert!(ns.blocks > 0);
                prop_assert!((MIN_BLOCK_SHIFT..=MAX_BLOCK_SHIFT).contains(&ns.block_shift));
            }
        }

        #[test]
        fn any_active_list_parses_or_errs(words in proptest::collection::vec(any::<u32>(), 0..1024), nn: u32) {
            let mut data = [0u8; IDENTIFY_SIZE];
            for (i, w) in words.iter().enumerate() {
                data[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            if let Ok(ids) = parse_active_list(&data, nn) {
                prop_assert!(ids.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(ids.iter().all(|&id| id >= 1 && id <= nn));
            }
        }
    }
}
