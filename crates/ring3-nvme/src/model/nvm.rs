//! NVM command set I/O commands (NVM Command Set Specification 1.0, 3): Read, Write,
//! Flush, Write Zeroes and Dataset Management.

use super::admin::unsupported_cdw0;
use super::{generic, sc, ErrorRecord, NvmeModel, Outcome, State, ERROR_LOG_ENTRIES};
use crate::command::SubmissionEntry;
use crate::completion::Status as CompletionStatus;

const FLUSH: u8 = 0x00;
const WRITE: u8 = 0x01;
const READ: u8 = 0x02;
const WRITE_ZEROES: u8 = 0x08;
const DATASET_MANAGEMENT: u8 = 0x09;

/// Flush's NSID for every namespace.
const ALL_NAMESPACES: u32 = 0xffff_ffff;

/// A failed I/O command: its status and the LBA the Error Information log names.
struct Failure {
    status: CompletionStatus,
    lba: u64,
}

impl From<CompletionStatus> for Failure {
    fn from(status: CompletionStatus) -> Self {
        Failure { status, lba: 0 }
    }
}

/// The starting LBA in CDW10–11 and the 1-based block count from CDW12 bits 15:0.
fn lba_range(entry: &SubmissionEntry) -> (u64, u64) {
    let lba = u64::from(entry.dword(10)) | (u64::from(entry.dword(11)) << 32);
    (lba, u64::from(entry.dword(12) & 0xffff) + 1)
}

impl NvmeModel {
    /// Executes an I/O command from submission queue `sq_id`; failures are recorded in the
    /// Error Information log.
    pub(super) fn execute_io(
        &self,
        state: &mut State,
        sq_id: u16,
        entry: &SubmissionEntry,
    ) -> Outcome {
        match self.run_io(state, entry) {
            Ok(()) => Outcome::success(0),
            Err(Failure { status, lba }) => {
                state.counters.errors += 1;
                let record = ErrorRecord {
                    count: state.counters.errors,
                    sq_id,
                    command_id: entry.command_id(),
                    status,
                    lba,
                    nsid: entry.namespace_id(),
                };
                state.error_log.push_front(record);
                state.error_log.truncate(ERROR_LOG_ENTRIES);
                Outcome::failed(status)
            }
        }
    }

    fn run_io(&self, state: &mut State, entry: &SubmissionEntry) -> Result<(), Failure> {
        if unsupported_cdw0(entry) {
            return Err(generic(sc::INVALID_FIELD).into());
        }
        let nsid = entry.namespace_id();
        if entry.opcode() == FLUSH && nsid == ALL_NAMESPACES {
            state.counters.flushes += 1;
            return Ok(());
        }
        let index = match entry.opcode() {
            FLUSH | WRITE | READ | WRITE_ZEROES | DATASET_MANAGEMENT => state
                .namespace_index(nsid)
                .ok_or_else(|| generic(sc::INVALID_NAMESPACE))?,
            _ => return Err(generic(sc::INVALID_OPCODE).into()),
        };
        match entry.opcode() {
            FLUSH => {
                state.counters.flushes += 1;
                Ok(())
            }
            READ | WRITE => self.read_write(state, index, entry),
            WRITE_ZEROES => {
                let (lba, blocks) = lba_range(entry);
                let namespace = &mut state.namespaces[index];
                if !namespace.contains(lba, blocks) {
                    return Err(out_of_range(lba));
                }
                let block_size = u64::from(namespace.block_size());
                namespace.zero(lba * block_size, blocks * block_size);
                state.counters.writes += 1;
                Ok(())
            }
            _ => self.dataset_management(state, index, entry),
        }
    }

    /// Read and Write: whole blocks between the namespace and the data pointer.
    fn read_write(
        &self,
        state: &mut State,
        index: usize,
        entry: &SubmissionEntry,
    ) -> Result<(), Failure> {
        let (lba, blocks) = lba_range(entry);
        let block_size = u64::from(state.namespaces[index].block_size());
        let len = blocks * block_size;
        if self.exceeds_mdts(state, len) {
            return Err(generic(sc::INVALID_FIELD).into());
        }
        if !state.namespaces[index].contains(lba, blocks) {
            return Err(out_of_range(lba));
        }
        let segments = self.prp_segments(state.page_shift, entry, len, len)?;
        let namespace = &mut state.namespaces[index];
        let mut offset = lba * block_size;
        let mut buffer = Vec::new();
        let writing = entry.opcode() == WRITE;
        for segment in &segments {
            buffer.resize(segment.len, 0);
            let done = if writing {
                let read = self.ctx.dma_read(segment.address, &mut buffer);
                if read.is_ok() {
                    namespace.write(offset, &buffer);
                }
                read
            } else {
                namespace.read(offset, &mut buffer);
                self.ctx.dma_write(segment.address, &buffer)
            };
            if done.is_err() {
                return Err(Failure {
                    status: generic(sc::DATA_TRANSFER_ERROR),
                    lba,
                });
            }
            offset += segment.len as u64;
        }
        if writing {
            state.counters.writes += 1;
            state.counters.bytes_written += len;
        } else {
            state.counters.reads += 1;
            state.counters.bytes_read += len;
        }
        Ok(())
    }

    /// Dataset Management: NR + 1 ranges of 16 bytes (context attributes, length in blocks,
    /// starting LBA); with AD set, the ranges are deallocated (and then read as zeroes).
    fn dataset_management(
        &self,
        state: &mut State,
        index: usize,
        entry: &SubmissionEntry,
    ) -> Result<(), Failure> {
        let count = u64::from(entry.dword(10) & 0xff) + 1;
        let deallocate = entry.dword(11) & (1 << 2) != 0;
        let len = count * 16;
        let segments = self.prp_segments(state.page_shift, entry, len, len)?;
        let mut list = vec![0u8; len as usize];
        self.copy_from_host(&segments, &mut list)?;
        let ranges: Vec<(u64, u64)> = list
            .chunks_exact(16)
            .map(|range| {
                let mut blocks = [0u8; 4];
                blocks.copy_from_slice(&range[4..8]);
                let mut lba = [0u8; 8];
                lba.copy_from_slice(&range[8..16]);
                (
                    u64::from_le_bytes(lba),
                    u64::from(u32::from_le_bytes(blocks)),
                )
            })
            .collect();
        let namespace = &mut state.namespaces[index];
        if let Some(&(lba, _)) = ranges
            .iter()
            .find(|&&(lba, blocks)| !namespace.contains(lba, blocks))
        {
            return Err(out_of_range(lba));
        }
        if deallocate {
            let block_size = u64::from(namespace.block_size());
            for (lba, blocks) in ranges {
                namespace.zero(lba * block_size, blocks * block_size);
            }
        }
        Ok(())
    }
}

fn out_of_range(lba: u64) -> Failure {
    Failure {
        status: generic(sc::LBA_OUT_OF_RANGE),
        lba,
    }
}
