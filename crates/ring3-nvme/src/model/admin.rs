//! Admin commands (NVMe Base 2.0, 5): queue management, Identify, features, log pages.

use super::queues::{CompletionQueue, SubmissionQueue};
use super::{
    generic, sc, specific, Counters, ErrorRecord, NvmeModel, Outcome, State, ERROR_LOG_ENTRIES,
    MODEL_MAX_QUEUE_ENTRIES, MODEL_NUMBER, VERSION,
};
use crate::command::{admin, SubmissionEntry};
use crate::completion::Status as CompletionStatus;
use crate::identify::{offsets, IDENTIFY_SIZE};
use crate::registers::Configuration;

pub(super) type Answer = Result<u32, CompletionStatus>;

/// Asynchronous Event Request (5.2).
const ASYNC_EVENT_REQUEST: u8 = 0x0c;

/// CNS 03h: Namespace Identification Descriptor list.
const CNS_NAMESPACE_DESCRIPTORS: u8 = 0x03;
const CNS_NAMESPACE: u8 = 0x00;
const CNS_CONTROLLER: u8 = 0x01;
const CNS_ACTIVE_NAMESPACES: u8 = 0x02;

/// Feature identifiers (5.27.1).
const FID_VOLATILE_WRITE_CACHE: u8 = 0x06;
const FID_NUMBER_OF_QUEUES: u8 = 0x07;

/// Log page identifiers (5.16.1).
const LID_ERROR_INFORMATION: u8 = 0x01;
const LID_SMART: u8 = 0x02;
const LID_FIRMWARE_SLOT: u8 = 0x03;

/// ACL and AERL, 0-based: four Aborts and four Asynchronous Event Requests at a time.
const ABORT_LIMIT: u8 = 3;
const ASYNC_EVENT_LIMIT: u8 = 3;

/// Composite temperature reported in SMART, in kelvin, and its thresholds.
const TEMPERATURE: u16 = 310;
const WARNING_TEMPERATURE: u16 = 343;
const CRITICAL_TEMPERATURE: u16 = 358;

const FIRMWARE_REVISION: &str = "1.0";

/// Identify Controller fields beyond those the driver's parser names (figure "Identify
/// Controller Data Structure").
mod controller_offsets {
    pub const CNTRLTYPE: usize = 111;
    pub const OACS: usize = 256;
    pub const ACL: usize = 258;
    pub const AERL: usize = 259;
    pub const FRMW: usize = 260;
    pub const LPA: usize = 261;
    pub const ELPE: usize = 262;
    pub const WCTEMP: usize = 266;
    pub const CCTEMP: usize = 268;
    pub const ONCS: usize = 520;
    pub const VWC: usize = 525;
    pub const SUBNQN: usize = 768;
}

/// Identify Namespace fields (NVM Command Set 1.0, figure "Identify Namespace Data
/// Structure, NVM Command Set").
mod namespace_offsets {
    pub const NSZE: usize = 0;
    pub const NCAP: usize = 8;
    pub const NUSE: usize = 16;
    pub const NLBAF: usize = 25;
    pub const FLBAS: usize = 26;
    pub const DLFEAT: usize = 33;
    pub const LBAF0: usize = 128;
}

fn put(data: &mut [u8], at: usize, bytes: &[u8]) {
    data[at..at + bytes.len()].copy_from_slice(bytes);
}

fn padded(text: &str, len: usize) -> Vec<u8> {
    let mut field = vec![b' '; len];
    field[..text.len()].copy_from_slice(text.as_bytes());
    field
}

/// CDW10 or CDW11 split into its low and high 16 bits.
fn halves(dword: u32) -> (u16, u16) {
    (dword as u16, (dword >> 16) as u16)
}

/// CDW0 fields the model does not support: fused operations and SGLs (PSDT).
pub(super) fn unsupported_cdw0(entry: &SubmissionEntry) -> bool {
    let fuse = (entry.dword(0) >> 8) & 0x3;
    let psdt = (entry.dword(0) >> 14) & 0x3;
    fuse != 0 || psdt != 0
}

impl NvmeModel {
    /// Executes an admin command; `None` if it completes later (never, for Asynchronous
    /// Event Requests, since the model has no events).
    pub(super) fn execute_admin(
        &self,
        state: &mut State,
        entry: &SubmissionEntry,
    ) -> Option<Outcome> {
        if unsupported_cdw0(entry) {
            return Some(Outcome::failed(generic(sc::INVALID_FIELD)));
        }
        let answer = match entry.opcode() {
            admin::DELETE_IO_SQ => self.delete_io_sq(state, entry),
            admin::CREATE_IO_SQ => create_io_sq(state, entry),
            admin::GET_LOG_PAGE => self.get_log_page(state, entry),
            admin::DELETE_IO_CQ => delete_io_cq(state, entry),
            admin::CREATE_IO_CQ => create_io_cq(state, entry),
            admin::IDENTIFY => self.identify(state, entry),
            admin::ABORT => Ok(self.abort(state, entry)),
            admin::SET_FEATURES => set_features(state, entry),
            admin::GET_FEATURES => get_features(state, entry),
            admin::DOORBELL_BUFFER_CONFIG if state.knobs.shadow_doorbells => {
                self.doorbell_buffer_config(state, entry)
            }
            ASYNC_EVENT_REQUEST => {
                if state.async_events_outstanding > u32::from(ASYNC_EVENT_LIMIT) {
                    Err(specific(sc::ASYNC_EVENT_LIMIT_EXCEEDED))
                } else {
                    state.async_events_outstanding += 1;
                    return None;
                }
            }
            _ => Err(generic(sc::INVALID_OPCODE)),
        };
        Some(answer.into())
    }

    /// Delete I/O Submission Queue (5.7): commands still held are completed as aborted
    /// first; commands not yet fetched are dropped.
    fn delete_io_sq(&self, state: &mut State, entry: &SubmissionEntry) -> Answer {
        let (queue_id, _) = halves(entry.dword(10));
        if queue_id == 0 || !state.submission_queues.contains_key(&queue_id) {
            return Err(specific(sc::INVALID_QUEUE_IDENTIFIER));
        }
        self.abort_held(state, queue_id, None, sc::ABORTED_SQ_DELETION);
        state.submission_queues.remove(&queue_id);
        Ok(0)
    }

    /// Abort (5.1): a held command completes with "command abort requested" (DW0 bit 0
    /// clear); anything else has already completed or is not found (DW0 bit 0 set).
    fn abort(&self, state: &mut State, entry: &SubmissionEntry) -> u32 {
        let (sq_id, command_id) = halves(entry.dword(10));
        let aborted = self.abort_held(state, sq_id, Some(command_id), sc::ABORT_REQUESTED);
        u32::from(aborted == 0)
    }

    /// Identify (5.17): one 4096-byte structure through the data pointer.
    fn identify(&self, state: &State, entry: &SubmissionEntry) -> Answer {
        let cns = entry.dword(10) as u8;
        let nsid = entry.namespace_id();
        let data = match cns {
            CNS_NAMESPACE => {
                if nsid == 0 || nsid > state.namespace_count() {
                    return Err(generic(sc::INVALID_NAMESPACE));
                }
                identify_namespace(state, nsid)
            }
            CNS_CONTROLLER => identify_controller(state),
            CNS_ACTIVE_NAMESPACES => {
                if nsid >= 0xffff_fffe {
                    return Err(generic(sc::INVALID_NAMESPACE));
                }
                active_namespaces(state, nsid)
            }
            CNS_NAMESPACE_DESCRIPTORS => {
                if state.namespace_index(nsid).is_none() {
                    return Err(generic(sc::INVALID_NAMESPACE));
                }
                namespace_descriptors(nsid)
            }
            _ => return Err(generic(sc::INVALID_FIELD)),
        };
        let size = IDENTIFY_SIZE as u64;
        let segments = self.prp_segments(state.page_shift, entry, size, size)?;
        self.copy_to_host(&segments, &data)?;
        Ok(0)
    }

    /// Get Log Page (5.16): NUMD + 1 dwords from byte offset LPO of the log.
    fn get_log_page(&self, state: &State, entry: &SubmissionEntry) -> Answer {
        let (cdw10, cdw11) = (entry.dword(10), entry.dword(11));
        let log_id = cdw10 as u8;
        let dwords = u64::from((cdw10 >> 16) | ((cdw11 & 0xffff) << 16)) + 1;
        let len = dwords * 4;
        let offset = u64::from(entry.dword(12)) | (u64::from(entry.dword(13)) << 32);
        let log = match log_id {
            LID_ERROR_INFORMATION => error_log(state),
            LID_SMART => smart_log(state),
            LID_FIRMWARE_SLOT => firmware_slot_log(),
            _ => return Err(specific(sc::INVALID_LOG_PAGE)),
        };
        if self.exceeds_mdts(state, len) || offset % 4 != 0 || offset > log.len() as u64 {
            return Err(generic(sc::INVALID_FIELD));
        }
        // The transfer stops at the end of the log.
        let start = offset as usize;
        let wanted = len.min((log.len() - start) as u64);
        let segments = self.prp_segments(state.page_shift, entry, len, wanted)?;
        self.copy_to_host(&segments, &log[start..start + wanted as usize])?;
        Ok(0)
    }

    /// Whether a transfer of `len` bytes is larger than MDTS allows (in CAP.MPSMIN pages,
    /// 4 KiB here; 0 is no limit).
    pub(super) fn exceeds_mdts(&self, state: &State, len: u64) -> bool {
        let mdts = u32::from(state.knobs.mdts);
        mdts != 0 && 1u64.checked_shl(mdts + 12).is_some_and(|limit| len > limit)
    }
}

/// Create I/O Completion Queue (5.4).
fn create_io_cq(state: &mut State, entry: &SubmissionEntry) -> Answer {
    let (queue_id, size) = halves(entry.dword(10));
    let cdw11 = entry.dword(11);
    let (contiguous, interrupts) = (cdw11 & 1 != 0, cdw11 & 2 != 0);
    let vector = (cdw11 >> 16) as u16;
    let (_, allowed) = state.queues_allocated();
    if queue_id == 0 || queue_id > allowed || state.completion_queues.contains_key(&queue_id) {
        return Err(specific(sc::INVALID_QUEUE_IDENTIFIER));
    }
    let entries = check_queue_size(size)?;
    // CAP.CQR: only physically contiguous queues; entries of 16 bytes (CC.IOCQES).
    if !contiguous || Configuration(state.cc).io_cq_entry_shift() != 4 {
        return Err(generic(sc::INVALID_FIELD));
    }
    let base = check_queue_base(state, entry.prp1(), entries, 16)?;
    if interrupts && u32::from(vector) >= state.knobs.msix_vectors {
        return Err(specific(sc::INVALID_INTERRUPT_VECTOR));
    }
    let vector = interrupts.then_some(vector);
    state
        .completion_queues
        .insert(queue_id, CompletionQueue::new(base, entries, vector));
    Ok(0)
}

/// Create I/O Submission Queue (5.5).
fn create_io_sq(state: &mut State, entry: &SubmissionEntry) -> Answer {
    let (queue_id, size) = halves(entry.dword(10));
    let cdw11 = entry.dword(11);
    let contiguous = cdw11 & 1 != 0;
    let cq_id = (cdw11 >> 16) as u16;
    let (allowed, _) = state.queues_allocated();
    if queue_id == 0 || queue_id > allowed || state.submission_queues.contains_key(&queue_id) {
        return Err(specific(sc::INVALID_QUEUE_IDENTIFIER));
    }
    if cq_id == 0 || !state.completion_queues.contains_key(&cq_id) {
        return Err(specific(sc::COMPLETION_QUEUE_INVALID));
    }
    let entries = check_queue_size(size)?;
    if !contiguous || Configuration(state.cc).io_sq_entry_shift() != 6 {
        return Err(generic(sc::INVALID_FIELD));
    }
    let base = check_queue_base(state, entry.prp1(), entries, 64)?;
    state
        .submission_queues
        .insert(queue_id, SubmissionQueue::new(base, entries, cq_id));
    Ok(0)
}

/// QSIZE is 0-based: at least 2 entries, at most CAP.MQES + 1.
fn check_queue_size(size: u16) -> Result<u16, CompletionStatus> {
    if size == 0 || u32::from(size) >= MODEL_MAX_QUEUE_ENTRIES {
        return Err(specific(sc::INVALID_QUEUE_SIZE));
    }
    Ok(size + 1)
}

/// A contiguous queue starts on a page boundary and must not wrap the address space.
fn check_queue_base(
    state: &State,
    base: u64,
    entries: u16,
    entry_size: u64,
) -> Result<u64, CompletionStatus> {
    let page_mask = (1u64 << state.page_shift) - 1;
    if base & page_mask != 0 {
        return Err(generic(sc::PRP_OFFSET_INVALID));
    }
    if base.checked_add(u64::from(entries) * entry_size).is_none() {
        return Err(generic(sc::INVALID_FIELD));
    }
    Ok(base)
}

/// Delete I/O Completion Queue (5.6): only once no submission queue uses it.
fn delete_io_cq(state: &mut State, entry: &SubmissionEntry) -> Answer {
    let (queue_id, _) = halves(entry.dword(10));
    if queue_id == 0 || !state.completion_queues.contains_key(&queue_id) {
        return Err(specific(sc::INVALID_QUEUE_IDENTIFIER));
    }
    if state
        .submission_queues
        .values()
        .any(|sq| sq.cq_id == queue_id)
    {
        return Err(specific(sc::INVALID_QUEUE_DELETION));
    }
    state.completion_queues.remove(&queue_id);
    Ok(0)
}

/// Set Features (5.27): Number of Queues and Volatile Write Cache; nothing is saveable.
fn set_features(state: &mut State, entry: &SubmissionEntry) -> Answer {
    let cdw10 = entry.dword(10);
    if cdw10 & (1 << 31) != 0 {
        return Err(specific(sc::FEATURE_NOT_SAVEABLE));
    }
    match cdw10 as u8 {
        FID_NUMBER_OF_QUEUES => {
            // 5.27.1.5: allocated once per reset, before any I/O queue exists.
            if state.has_io_queues() {
                return Err(generic(sc::COMMAND_SEQUENCE_ERROR));
            }
            let (submission, completion) = halves(entry.dword(11));
            if submission == u16::MAX || completion == u16::MAX {
                return Err(generic(sc::INVALID_FIELD));
            }
            let most = state.max_io_queues() - 1;
            let granted = state
                .features
                .queues
                .unwrap_or((submission.min(most), completion.min(most)));
            state.features.queues = Some(granted);
            Ok(u32::from(granted.0) | (u32::from(granted.1) << 16))
        }
        FID_VOLATILE_WRITE_CACHE => {
            state.features.volatile_write_cache = entry.dword(11) & 1 != 0;
            Ok(0)
        }
        _ => Err(generic(sc::INVALID_FIELD)),
    }
}

/// Get Features (5.15): SEL 0 current, 1 default, 2 saved (the default), 3 capabilities
/// (changeable, not saveable).
fn get_features(state: &State, entry: &SubmissionEntry) -> Answer {
    let cdw10 = entry.dword(10);
    let select = (cdw10 >> 8) & 0x7;
    if select == 3 {
        return match cdw10 as u8 {
            FID_NUMBER_OF_QUEUES | FID_VOLATILE_WRITE_CACHE => Ok(1 << 2),
            _ => Err(generic(sc::INVALID_FIELD)),
        };
    }
    let current = select == 0;
    match cdw10 as u8 {
        FID_NUMBER_OF_QUEUES => {
            let most = state.max_io_queues() - 1;
            let (submission, completion) = match state.features.queues {
                Some(granted) if current => granted,
                _ => (most, most),
            };
            Ok(u32::from(submission) | (u32::from(completion) << 16))
        }
        FID_VOLATILE_WRITE_CACHE => Ok(u32::from(!current || state.features.volatile_write_cache)),
        _ => Err(generic(sc::INVALID_FIELD)),
    }
}

fn identify_controller(state: &State) -> Vec<u8> {
    use controller_offsets::*;
    let knobs = &state.knobs;
    let mut data = vec![0u8; IDENTIFY_SIZE];
    put(&mut data, offsets::VID, &0x1b36u16.to_le_bytes());
    put(&mut data, offsets::SSVID, &0x1af4u16.to_le_bytes());
    put(&mut data, offsets::SN, &padded("RING3FAKE0001", 20));
    put(&mut data, offsets::MN, &padded(MODEL_NUMBER, 40));
    put(&mut data, offsets::FR, &padded(FIRMWARE_REVISION, 8));
    put(&mut data, offsets::MDTS, &[knobs.mdts]);
    put(&mut data, offsets::CNTLID, &1u16.to_le_bytes());
    put(&mut data, offsets::VER, &VERSION.to_le_bytes());
    // An I/O controller whose only optional admin command is Doorbell Buffer Config
    // (OACS bit 8), if the knob offers it.
    put(&mut data, CNTRLTYPE, &[1]);
    let oacs = if knobs.shadow_doorbells { 1u16 << 8 } else { 0 };
    put(&mut data, OACS, &oacs.to_le_bytes());
    put(&mut data, ACL, &[ABORT_LIMIT]);
    put(&mut data, AERL, &[ASYNC_EVENT_LIMIT]);
    // One read-only firmware slot; Get Log Page takes NUMDU and offsets.
    put(&mut data, FRMW, &[0b11]);
    put(&mut data, LPA, &[1 << 2]);
    put(&mut data, ELPE, &[(ERROR_LOG_ENTRIES - 1) as u8]);
    put(&mut data, WCTEMP, &WARNING_TEMPERATURE.to_le_bytes());
    put(&mut data, CCTEMP, &CRITICAL_TEMPERATURE.to_le_bytes());
    put(&mut data, offsets::SQES, &[knobs.sqes]);
    put(&mut data, offsets::CQES, &[knobs.cqes]);
    put(
        &mut data,
        offsets::NN,
        &state.namespace_count().to_le_bytes(),
    );
    // ONCS: Dataset Management and Write Zeroes. VWC: a volatile write cache.
    put(&mut data, ONCS, &((1u16 << 2) | (1 << 3)).to_le_bytes());
    put(&mut data, VWC, &[1]);
    put(&mut data, SUBNQN, b"nqn.2024-01.dev.ring3:fake-nvme");
    data
}

/// Identify Namespace; an inactive but valid NSID gets zeroes (5.17.2.1).
fn identify_namespace(state: &State, nsid: u32) -> Vec<u8> {
    use namespace_offsets::*;
    let mut data = vec![0u8; IDENTIFY_SIZE];
    let Some(index) = state.namespace_index(nsid) else {
        return data;
    };
    let namespace = &state.namespaces[index];
    put(&mut data, NSZE, &namespace.blocks().to_le_bytes());
    put(&mut data, NCAP, &namespace.blocks().to_le_bytes());
    put(&mut data, NUSE, &namespace.blocks_in_use().to_le_bytes());
    // One LBA format (NLBAF is 0-based), in use (FLBAS 0), without metadata.
    put(&mut data, NLBAF, &[0]);
    put(&mut data, FLBAS, &[0]);
    // Deallocated blocks read as zeroes; Write Zeroes may deallocate.
    put(&mut data, DLFEAT, &[0x09]);
    put(&mut data, LBAF0, &[0, 0, namespace.block_shift(), 0]);
    data
}

/// Active namespace IDs above `after`, ascending, zero-terminated (at most 1024).
fn active_namespaces(state: &State, after: u32) -> Vec<u8> {
    let mut data = vec![0u8; IDENTIFY_SIZE];
    let ids = (1..=state.namespaces.len() as u64)
        .filter_map(|id| u32::try_from(id).ok())
        .filter(|&id| id > after)
        .take(IDENTIFY_SIZE / 4);
    for (slot, id) in ids.enumerate() {
        put(&mut data, slot * 4, &id.to_le_bytes());
    }
    data
}

/// One UUID descriptor (NIDT 3), made from the NSID.
fn namespace_descriptors(nsid: u32) -> Vec<u8> {
    let mut data = vec![0u8; IDENTIFY_SIZE];
    put(&mut data, 0, &[3, 16, 0, 0]);
    let mut uuid = *b"ring3-fake-ns\0\0\0";
    uuid[12..16].copy_from_slice(&nsid.to_be_bytes());
    put(&mut data, 4, &uuid);
    data
}

/// Error Information log (5.16.1.2): 64-byte entries, newest first.
fn error_log(state: &State) -> Vec<u8> {
    let mut data = vec![0u8; ERROR_LOG_ENTRIES * 64];
    for (slot, record) in state.error_log.iter().enumerate() {
        let at = slot * 64;
        let ErrorRecord {
            count,
            sq_id,
            command_id,
            status,
            lba,
            nsid,
        } = *record;
        put(&mut data, at, &count.to_le_bytes());
        put(&mut data, at + 8, &sq_id.to_le_bytes());
        put(&mut data, at + 10, &command_id.to_le_bytes());
        put(&mut data, at + 12, &status.to_word().to_le_bytes());
        // Parameter error location: not pinned down.
        put(&mut data, at + 14, &0xffffu16.to_le_bytes());
        put(&mut data, at + 16, &lba.to_le_bytes());
        put(&mut data, at + 24, &nsid.to_le_bytes());
    }
    data
}

/// SMART / Health Information log (5.16.1.3), for the whole controller.
fn smart_log(state: &State) -> Vec<u8> {
    let Counters {
        reads,
        writes,
        bytes_read,
        bytes_written,
        errors,
        unsafe_shutdowns,
        ..
    } = state.counters;
    // Data units are thousands of 512-byte units, rounded up.
    let units = |bytes: u64| u128::from((bytes / 512).div_ceil(1000));
    let mut data = vec![0u8; 512];
    put(&mut data, 1, &TEMPERATURE.to_le_bytes());
    put(&mut data, 3, &[100, 10, 0]);
    put(&mut data, 32, &units(bytes_read).to_le_bytes());
    put(&mut data, 48, &units(bytes_written).to_le_bytes());
    put(&mut data, 64, &u128::from(reads).to_le_bytes());
    put(&mut data, 80, &u128::from(writes).to_le_bytes());
    put(&mut data, 112, &1u128.to_le_bytes());
    put(&mut data, 144, &u128::from(unsafe_shutdowns).to_le_bytes());
    put(&mut data, 176, &u128::from(errors).to_le_bytes());
    data
}

/// Firmware Slot Information log (5.16.1.4): slot 1 active, running [`FIRMWARE_REVISION`].
fn firmware_slot_log() -> Vec<u8> {
    let mut data = vec![0u8; 512];
    put(&mut data, 0, &[1]);
    put(&mut data, 8, &padded(FIRMWARE_REVISION, 8));
    data
}
