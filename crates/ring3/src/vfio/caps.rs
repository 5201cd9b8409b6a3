//! VFIO capability chains, parsed from the bytes the kernel returned.
//!
//! Several VFIO replies (IOMMU info, region info, device info) end in a chain of
//! capabilities: each starts with `struct vfio_info_cap_header { u16 id; u16 version;
//! u32 next; }`, where `next` is the offset of the following header from the start of the
//! reply, 0 at the end. The walker below trusts none of it: every offset is bounds-checked,
//! a revisited offset is reported as a loop, and nothing panics on any input.

use std::collections::BTreeSet;

use crate::error::{Error, Result};

/// Size of `struct vfio_info_cap_header`.
const HEADER_LEN: usize = 8;

/// `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`.
pub const IOMMU_CAP_IOVA_RANGE: u16 =
    vfio_bindings::bindings::vfio::VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16;

/// `VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL`.
pub const IOMMU_CAP_DMA_AVAIL: u16 =
    vfio_bindings::bindings::vfio::VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL as u16;

/// One capability in a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability<'a> {
    /// Capability ID (meaning depends on the reply it came in).
    pub id: u16,
    /// Version of the capability's layout.
    pub version: u16,
    /// Offset of its header in the reply.
    pub offset: usize,
    /// The reply's bytes from the header to the end of the reply (the kernel does not
    /// state a capability's length; each parser checks the lengths it needs).
    pub bytes: &'a [u8],
}

fn bad(what: impl Into<String>, value: u64) -> Error {
    Error::BadKernelValue {
        what: what.into(),
        value,
    }
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    let raw = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes(raw.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let raw = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(raw.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    let raw = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_ne_bytes(raw.try_into().ok()?))
}

/// Walks the capability chain of `reply` starting at `first` (0: no capabilities).
///
/// Errors if a header lies outside `reply`, is not 4-byte aligned, or the chain comes back
/// to an offset it has already visited.
pub fn capabilities(reply: &[u8], first: u32) -> Result<Vec<Capability<'_>>> {
    let mut found = Vec::new();
    let mut visited = BTreeSet::new();
    let mut offset = first;
    while offset != 0 {
        let at = offset as usize;
        if !visited.insert(at) {
            return Err(bad(
                "VFIO capability chain loops back to offset",
                offset.into(),
            ));
        }
        if at % 4 != 0 {
            return Err(bad(
                "VFIO capability header is misaligned at offset",
                offset.into(),
            ));
        }
        let header_fits = at
            .checked_add(HEADER_LEN)
            .is_some_and(|end| end <= reply.len());
        let (Some(id), Some(version), Some(next), true) = (
            u16_at(reply, at),
            u16_at(reply, at + 2),
            u32_at(reply, at + 4),
            header_fits,
        ) else {
            return Err(bad(
                format!(
                    "VFIO capability header lies outside the {}-byte reply, at offset",
                    reply.len()
                ),
                offset.into(),
            ));
        };
        found.push(Capability {
            id,
            version,
            offset: at,
            bytes: &reply[at..],
        });
        offset = next;
    }
    Ok(found)
}

/// A range of IOVAs the IOMMU can translate, both ends inclusive (as the kernel reports them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IovaRange {
    /// First usable IOVA.
    pub start: u64,
    /// Last usable IOVA.
    pub last: u64,
}

/// The ranges of a `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE` capability:
/// `{ header; u32 nr_iovas; u32 reserved; struct { u64 start, end; } iova_ranges[]; }`.
pub fn parse_iova_ranges(cap: &Capability<'_>) -> Result<Vec<IovaRange>> {
    const COUNT_AT: usize = HEADER_LEN;
    const RANGES_AT: usize = HEADER_LEN + 8;
    const RANGE_LEN: usize = 16;
    if cap.id != IOMMU_CAP_IOVA_RANGE {
        return Err(bad(
            "capability is not an IOVA range list; its ID is",
            cap.id.into(),
        ));
    }
    let count = u32_at(cap.bytes, COUNT_AT).ok_or_else(|| {
        bad(
            "IOVA range capability is cut short; bytes left",
            cap.bytes.len() as u64,
        )
    })?;
    let needed = (count as usize)
        .checked_mul(RANGE_LEN)
        .and_then(|n| n.checked_add(RANGES_AT));
    if needed.is_none_or(|needed| needed > cap.bytes.len()) {
        return Err(bad(
            format!(
                "IOVA range capability claims more ranges than its {} bytes hold",
                cap.bytes.len()
            ),
            count.into(),
        ));
    }
    (0..count as usize)
        .map(|i| {
            let at = RANGES_AT + i * RANGE_LEN;
            let (Some(start), Some(last)) = (u64_at(cap.bytes, at), u64_at(cap.bytes, at + 8))
            else {
                return Err(bad(
                    "IOVA range lies outside the capability; index",
                    i as u64,
                ));
            };
            if start > last {
                return Err(bad(
                    format!("IOVA range {i} ends before it starts at {start:#x}; end"),
                    last,
                ));
            }
            Ok(IovaRange { start, last })
        })
        .collect()
}

/// The number of DMA mappings the container still allows, from `VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL`:
/// `{ header; u32 avail; }`.
pub fn parse_dma_avail(cap: &Capability<'_>) -> Result<u32> {
    if cap.id != IOMMU_CAP_DMA_AVAIL {
        return Err(bad(
            "capability is not a DMA-available count; its ID is",
            cap.id.into(),
        ));
    }
    u32_at(cap.bytes, HEADER_LEN).ok_or_else(|| {
        bad(
            "DMA-available capability is cut short; bytes left",
            cap.bytes.len() as u64,
        )
    })
}

/// The half-open ranges `(start, end)` the DMA allocator may use, from the IOMMU's valid
/// ranges: the first 64 KiB are left out, so that a zero or small bogus address a device
/// sends never hits a buffer (the same rule as [`crate::dma::IovaAllocator::for_mask`]).
pub fn allocator_ranges(valid: &[IovaRange]) -> Vec<(u64, u64)> {
    const LOWEST: u64 = 0x1_0000;
    valid
        .iter()
        .filter_map(|range| {
            let start = range.start.max(LOWEST);
            // Exclusive end; a range reaching u64::MAX loses its last byte, which no page uses.
            let end = range.last.saturating_add(1);
            (start < end).then_some((start, end))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A reply with a 24-byte fixed part, then the given capabilities laid out in order.
    fn reply(caps: &[(u16, Vec<u8>)]) -> (Vec<u8>, u32) {
        let mut bytes = vec![0u8; 24];
        let mut previous_next: Option<usize> = None;
        for (id, body) in caps {
            let at = bytes.len();
            if let Some(link) = previous_next {
                bytes[link..link + 4].copy_from_slice(&(at as u32).to_ne_bytes());
            }
            bytes.extend(id.to_ne_bytes());
            bytes.extend(1u16.to_ne_bytes());
            previous_next = Some(bytes.len());
            bytes.extend(0u32.to_ne_bytes());
            bytes.extend(body);
            while bytes.len() % 8 != 0 {
                bytes.push(0);
            }
        }
        let first = if caps.is_empty() { 0 } else { 24 };
        (bytes, first)
    }

    fn iova_body(ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend((ranges.len() as u32).to_ne_bytes());
        body.extend(0u32.to_ne_bytes());
        for (start, end) in ranges {
            body.extend(start.to_ne_bytes());
            body.extend(end.to_ne_bytes());
        }
        body
    }

    #[test]
    fn finds_iova_ranges_after_another_capability() {
        // What an x86 VT-d host reports: everything but the MSI window, 48-bit address width.
        let ranges = [(0, 0xfedf_ffff), (0xfef0_0000, 0xffff_ffff_ffff)];
        let (bytes, first) = reply(&[
            (IOMMU_CAP_DMA_AVAIL, 65535u32.to_ne_bytes().to_vec()),
            (IOMMU_CAP_IOVA_RANGE, iova_body(&ranges)),
        ]);
        let caps = capabilities(&bytes, first).unwrap();
        assert_eq!(caps.len(), 2);
        assert_eq!(parse_dma_avail(&caps[0]).unwrap(), 65535);
        let parsed = parse_iova_ranges(&caps[1]).unwrap();
        assert_eq!(
            parsed,
            [
                IovaRange {
                    start: 0,
                    last: 0xfedf_ffff
                },
                IovaRange {
                    start: 0xfef0_0000,
                    last: 0xffff_ffff_ffff
                },
            ]
        );
        assert_eq!(
            allocator_ranges(&parsed),
            [(0x1_0000, 0xfee0_0000), (0xfef0_0000, 0x1_0000_0000_0000)]
        );
    }

    #[test]
    fn no_capabilities_is_an_empty_chain() {
        assert!(capabilities(&[0u8; 24], 0).unwrap().is_empty());
    }

    #[test]
    fn a_loop_is_an_error() {
        let (mut bytes, first) = reply(&[(IOMMU_CAP_DMA_AVAIL, vec![0; 8]), (7, vec![])]);
        // Point the second header's `next` back at the first.
        let second = 24 + 16;
        bytes[second + 4..second + 8].copy_from_slice(&24u32.to_ne_bytes());
        let err = capabilities(&bytes, first).unwrap_err();
        assert!(err.to_string().contains("loops"), "{err}");
        // A header pointing at itself is the shortest loop.
        bytes[24 + 4..24 + 8].copy_from_slice(&24u32.to_ne_bytes());
        assert!(capabilities(&bytes, first).is_err());
    }

    #[test]
    fn offsets_outside_the_reply_are_errors() {
        let (bytes, _) = reply(&[(IOMMU_CAP_DMA_AVAIL, vec![0; 8])]);
        assert!(capabilities(&bytes, bytes.len() as u32).is_err());
        assert!(capabilities(&bytes, bytes.len() as u32 - 4).is_err());
        assert!(capabilities(&bytes, !3u32).is_err());
        assert!(capabilities(&bytes, 26).is_err(), "misaligned");
    }

    #[test]
    fn a_range_count_larger_than_the_capability_is_an_error() {
        let mut body = iova_body(&[(0x1000, 0x1fff)]);
        body[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        let (bytes, first) = reply(&[(IOMMU_CAP_IOVA_RANGE, body)]);
        let caps = capabilities(&bytes, first).unwrap();
        assert!(parse_iova_ranges(&caps[0]).is_err());
    }

    #[test]
    fn a_backwards_range_is_an_error() {
        let (bytes, first) = reply(&[(IOMMU_CAP_IOVA_RANGE, iova_body(&[(0x2000, 0x1000)]))]);
        let caps = capabilities(&bytes, first).unwrap();
        assert!(parse_iova_ranges(&caps[0]).is_err());
    }

    #[test]
    fn ranges_below_64k_are_left_to_nobody() {
        let ranges = [
            IovaRange {
                start: 0,
                last: 0xffff,
            },
            IovaRange {
                start: 0x8000,
                last: 0x1_ffff,
            },
            IovaRange {
                start: 0x10_0000,
                last: u64::MAX,
            },
        ];
        assert_eq!(
            allocator_ranges(&ranges),
            [(0x1_0000, 0x2_0000), (0x10_0000, u64::MAX)]
        );
    }

    proptest! {
        #[test]
        fn the_walker_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), first in any::<u32>()) {
            if let Ok(caps) = capabilities(&bytes, first) {
                for cap in &caps {
                    let _ = parse_iova_ranges(cap);
                    let _ = parse_dma_avail(cap);
                }
            }
        }

        #[test]
        fn the_walker_never_panics_on_small_offsets(
            bytes in proptest::collection::vec(any::<u8>(), 0..128),
            first in 0u32..128,
        ) {
            // Small offsets land inside the buffer often, so chains are actually followed.
            if let Ok(caps) = capabilities(&bytes, first) {
                prop_assert!(caps.len() <= bytes.len() / 4 + 1);
                for cap in &caps {
                    let _ = parse_iova_ranges(cap);
                }
            }
        }

        #[test]
        fn the_range_parser_never_panics_and_returns_what_fits(
            count in 0u32..8,
            rest in proptest::collection::vec(any::<u8>(), 0..160),
        ) {
            let mut bytes = vec![0u8; 8];
            bytes.extend(count.to_ne_bytes());
            bytes.extend(rest);
            let cap = Capability { id: IOMMU_CAP_IOVA_RANGE, version: 1, offset: 0, bytes: &bytes };
            if let Ok(ranges) = parse_iova_ranges(&cap) {
                prop_assert_eq!(ranges.len(), count as usize);
                prop_assert!(bytes.len() >= 16 + 16 * count as usize);
                prop_assert!(ranges.iter().all(|r| r.start <= r.last));
            }
        }
    }
}
