//! Physical Region Page entries (NVMe Base 2.0, 4.1.1 "Physical Region Page Entry and
//! List").
//!
//! A command's data pointer is two PRP entries. PRP1 addresses the first byte and may
//! start anywhere in a page (dword aligned); every later entry addresses the start of a
//! memory page. If the data ends within the page after PRP1's, PRP2 addresses that page;
//! if it needs more pages, PRP2 addresses a PRP list: an array of page addresses in host
//! memory. This driver keeps one list page per command slot, so a transfer may span at
//! most one list page of entries ([`max_transfer_pages`]); that covers 2 MiB with 4 KiB
//! pages, and larger requests are split by the caller.

use crate::error::{Error, Result};

/// Bytes per PRP entry.
pub const PRP_ENTRY_SIZE: usize = 8;

/// The data pointer of one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataPointer {
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2: 0, the second page, or the PRP list.
    pub prp2: u64,
    /// Entries written to the PRP list (0 when PRP2 is not a list).
    pub list_entries: usize,
}

/// How many pages one list page can describe after the first page.
pub fn list_capacity(page_shift: u8) -> usize {
    (1usize << page_shift) / PRP_ENTRY_SIZE
}

/// The longest transfer one command with one PRP list page can carry, in bytes, for a
/// buffer that starts on a page boundary.
pub fn max_transfer_bytes(page_shift: u8) -> usize {
    max_transfer_pages(page_shift) << page_shift
}

/// [`max_transfer_bytes`] in pages: the first page plus a full list.
pub fn max_transfer_pages(page_shift: u8) -> usize {
    list_capacity(page_shift)
}

/// Lays out the data pointer for `len` bytes at `iova`, writing list entries (if any) with
/// `write_entry(index, address)`; the list itself is at `list_iova`, page aligned.
///
/// Fails if `iova` is not dword aligned, `len` is zero, or the transfer needs more than
/// one list page of entries.
pub fn layout(
    iova: u64,
    len: usize,
    page_shift: u8,
    list_iova: u64,
    mut write_entry: impl FnMut(usize, u64),
) -> Result<DataPointer> {
    let page = 1u64 << page_shift;
    let mask = page - 1;
    if len == 0 || iova % 4 != 0 || list_iova & mask != 0 {
        return Err(Error::InvalidArgument {
            what: format!(
                "a data pointer for {len} bytes at IOVA {iova:#x} (list at {list_iova:#x}): \
                 data must be non-empty and dword aligned, the list page aligned"
            ),
        });
    }
    let len = len as u64;
    let end = iova
        .checked_add(len)
        .ok_or_else(|| Error::InvalidArgument {
            what: format!("{len} bytes at IOVA {iova:#x} wrap around the address space"),
        })?;
    let first_page = iova & !mask;
    // Pages touched after the first one.
    let last_page = (end - 1) & !mask;
    let later_pages = ((last_page - first_page) >> page_shift) as usize;
    let second = first_page + page;
    match later_pages {
        0 => Ok(DataPointer {
            prp1: iova,
            prp2: 0,
            list_entries: 0,
        }),
        1 => Ok(DataPointer {
            prp1: iova,
            prp2: second,
            list_entries: 0,
        }),
        n if n <= list_capacity(page_shift) => {
            for index in 0..n {
                write_entry(index, second + ((index as u64) << page_shift));
            }
            Ok(DataPointer {
                prp1: iova,
                prp2: list_iova,
                list_entries: n,
            })
        }
        n => Err(Error::InvalidArgument {
            what: format!(
                "{len} bytes at IOVA {iova:#x} span {} pages; one command carries at most {}",
                n + 1,
                list_capacity(page_shift) + 1
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SHIFT: u8 = 12;
    const PAGE: u64 = 4096;
    const LIST: u64 = 0x90_0000;

    fn lay(iova: u64, len: usize) -> (DataPointer, Vec<u64>) {
        let mut entries = Vec::new();
        let pointer = layout(iova, len, SHIFT, LIST, |index, address| {
            assert_eq!(index, entries.len());
            entries.push(address);
        })
        .unwrap();
        (pointer, entries)
    }

    #[test]
    fn one_page_needs_only_prp1() {
        for (iova, len) in [(0x10000, 1), (0x10000, 4096), (0x10ffc, 4), (0x10800, 2048)] {
            let (pointer, entries) = lay(iova, len);
            assert_eq!((pointer.prp1, pointer.prp2), (iova, 0), "{iova:#x}+{len}");
            assert!(entries.is_empty());
        }
    }

    #[test]
    fn two_pages_use_prp2_as_the_second_page() {
        let (pointer, entries) = lay(0x10000, 8192);
        assert_eq!((pointer.prp1, pointer.prp2), (0x10000, 0x11000));
        assert!(entries.is_empty());
        // An offset start crossing one boundary is still two pages.
        let (pointer, _) = lay(0x10800, 4096);
        assert_eq!((pointer.prp1, pointer.prp2), (0x10800, 0x11000));
    }

    #[test]
    fn one_byte_past_two_pages_needs_a_list() {
        let (pointer, entries) = lay(0x10000, 8193);
        assert_eq!((pointer.prp1, pointer.prp2), (0x10000, LIST));
        assert_eq!(entries, vec![0x11000, 0x12000]);
        assert_eq!(pointer.list_entries, 2);
        // An offset start that makes 8 KiB touch three pages.
        let (pointer, entries) = lay(0x10200, 8192);
        assert_eq!(pointer.prp2, LIST);
        assert_eq!(entries, vec![0x11000, 0x12000]);
    }

    #[test]
    fn a_full_list_is_the_limit() {
        let max = max_transfer_bytes(SHIFT);
        assert_eq!(max, 2 << 20);
        let (pointer, entries) = lay(0x100000, max);
        assert_eq!(pointer.list_entries, 511);
        assert_eq!(entries.last(), Some(&(0x100000 + (511 * PAGE))));
        // With an offset, the same length touches one page more: 512 entries still fit.
        let (pointer, _) = lay(0x100004, max);
        assert_eq!(pointer.list_entries, 512);
        assert!(layout(0x100004, max + 4096, SHIFT, LIST, |_, _| {}).is_err());
        assert!(layout(0x100000, max + 4097, SHIFT, LIST, |_, _| {}).is_err());
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(layout(0x10000, 0, SHIFT, LIST, |_, _| {}).is_err());
        assert!(layout(0x10002, 16, SHIFT, LIST, |_, _| {}).is_err());
        assert!(layout(0x10000, 16, SHIFT, LIST + 8, |_, _| {}).is_err());
        assert!(layout(u64::MAX - 3, 16, SHIFT, LIST, |_, _| {}).is_err());
    }

    proptest! {
        /// The entries, read as the controller would, cover exactly the bytes asked for.
        #[test]
        fn entries_cover_the_transfer(page in 0u64..1 << 20, offset in 0u64..1024, len in 1usize..(2 << 20)) {
            let iova = (page << SHIFT) + offset * 4;
            let mut entries = Vec::new();
            let Ok(pointer) = layout(iova, len, SHIFT, LIST, |_, a| entries.push(a)) else {
                return Ok(());
            };
            let mut pages = vec![pointer.prp1];
            match pointer.prp2 {
                0 => {}
                LIST => pages.extend(&entries),
                second => pages.push(second),
            }
            let mut covered = PAGE - (iova % PAGE);
            let mut expected = (iova & !(PAGE - 1)) + PAGE;
            for &address in &pages[1..] {
                prop_assert_eq!(address, expected);
                expected += PAGE;
                covered += PAGE;
            }
            prop_assert!(covered >= len as u64);
            prop_assert!(covered - (len as u64) < PAGE);
        }
    }
}
