//! Data pointers (NVMe Base 2.0, 4.1.1 "Physical Region Page Entry and List"): where in
//! host memory a command's data lies, and copying it there and back.
//!
//! PRP1 addresses the first page and may start at any dword inside it. If the rest fits in
//! one page, PRP2 is that page; otherwise PRP2 points to a PRP list (it may start inside a
//! page), whose entries address whole pages; when a list page is full and more entries are
//! needed, its last entry points to the next list page. Pages are CC.MPS bytes.

use super::{generic, sc, NvmeModel};
use crate::command::SubmissionEntry;
use crate::completion::Status as CompletionStatus;

/// A run of host memory inside one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segment {
    pub address: u64,
    pub len: usize,
}

fn offset_invalid() -> CompletionStatus {
    generic(sc::PRP_OFFSET_INVALID)
}

fn transfer_error() -> CompletionStatus {
    generic(sc::DATA_TRANSFER_ERROR)
}

impl NvmeModel {
    /// The host memory of the first `wanted` bytes of a `len`-byte transfer described by
    /// `entry`'s PRP1 and PRP2 in pages of `1 << page_shift` bytes. (Only part of a
    /// transfer is wanted when the data ends early, as a log page does; the command's
    /// length still decides how PRP2 is read.)
    pub(super) fn prp_segments(
        &self,
        page_shift: u8,
        entry: &SubmissionEntry,
        len: u64,
        wanted: u64,
    ) -> Result<Vec<Segment>, CompletionStatus> {
        let page = 1u64 << page_shift.min(16);
        let mask = page - 1;
        let (prp1, prp2) = (entry.prp1(), entry.prp2());
        let mut wanted = wanted.min(len);
        let mut segments = Vec::new();
        if wanted == 0 {
            return Ok(segments);
        }
        if prp1 & 0x3 != 0 {
            return Err(offset_invalid());
        }
        let first = len.min(page - (prp1 & mask));
        let take = first.min(wanted);
        segments.push(Segment {
            address: prp1,
            len: take as usize,
        });
        wanted -= take;
        let rest = len - first;
        if wanted == 0 {
            return Ok(segments);
        }
        if rest <= page {
            if prp2 & mask != 0 {
                return Err(offset_invalid());
            }
            segments.push(Segment {
                address: prp2,
                len: wanted as usize,
            });
            return Ok(segments);
        }

        // A PRP list of 8-byte entries.
        if prp2 & 0x7 != 0 {
            return Err(offset_invalid());
        }
        let mut list = prp2;
        let mut entries_left = rest.div_ceil(page);
        while wanted > 0 {
            let slots = (page - (list & mask)) / 8;
            let chained = entries_left > slots;
            let data_slots = if chained { slots - 1 } else { entries_left };
            let take = data_slots.min(wanted.div_ceil(page));
            let read = take + u64::from(chained && take == data_slots);
            let mut raw = vec![0u8; (read * 8) as usize];
            self.ctx
                .dma_read(list, &mut raw)
                .map_err(|_| transfer_error())?;
            let values: Vec<u64> = raw
                .chunks_exact(8)
                .map(|bytes| {
                    let mut qword = [0u8; 8];
                    qword.copy_from_slice(bytes);
                    u64::from_le_bytes(qword)
                })
                .collect();
            for &address in values.iter().take(take as usize) {
                if address & mask != 0 {
                    return Err(offset_invalid());
                }
                let len = wanted.min(page);
                segments.push(Segment {
                    address,
                    len: len as usize,
                });
                wanted -= len;
            }
            entries_left -= take;
            if wanted == 0 {
                break;
            }
            // More is wanted, so this page was full and its last entry was read: the next
            // list page.
            let Some(&next) = values.get(take as usize) else {
                return Err(transfer_error());
            };
            if next & mask != 0 {
                return Err(offset_invalid());
            }
            list = next;
        }
        Ok(segments)
    }

    /// Copies `data` into the segments in order (they cover exactly `data.len()` bytes).
    pub(super) fn copy_to_host(
        &self,
        segments: &[Segment],
        data: &[u8],
    ) -> Result<(), CompletionStatus> {
        let mut at = 0usize;
        for segment in segments {
            let end = at.saturating_add(segment.len);
            let chunk = data.get(at..end).ok_or_else(transfer_error)?;
            self.ctx
                .dma_write(segment.address, chunk)
                .map_err(|_| transfer_error())?;
            at = end;
        }
        Ok(())
    }

    /// Copies the segments in order into `out` (they cover exactly `out.len()` bytes).
    pub(super) fn copy_from_host(
        &self,
        segments: &[Segment],
        out: &mut [u8],
    ) -> Result<(), CompletionStatus> {
        let mut at = 0usize;
        for segment in segments {
            let end = at.saturating_add(segment.len);
            let chunk = out.get_mut(at..end).ok_or_else(transfer_error)?;
            self.ctx
                .dma_read(segment.address, chunk)
                .map_err(|_| transfer_error())?;
            at = end;
        }
        Ok(())
    }
}
