//! Submission queue entries (NVMe Base 2.0, 4.2, "Submission Queue Entry").
//!
//! Every command is 64 bytes: command dword 0 (opcode, fused operation, PRP or SGL choice,
//! command identifier), the namespace ID, a metadata pointer, the data pointer (two PRP
//! entries here) and the command dwords 10–15. [`SubmissionEntry`] builds those bytes; the
//! queue sets the command identifier when it submits the entry.

/// Size of a submission queue entry in bytes (IOSQES = 6).
pub const SUBMISSION_ENTRY_SIZE: usize = 64;
/// log2 of [`SUBMISSION_ENTRY_SIZE`], the value for CC.IOSQES and Identify's SQES.
pub const SUBMISSION_ENTRY_SHIFT: u8 = 6;

/// Admin command opcodes (NVMe Base 2.0, 5, figure "Opcodes for Admin Commands").
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_IO_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_IO_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_IO_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_IO_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Doorbell Buffer Config.
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
}

/// NVM command set I/O opcodes (NVM Command Set Specification 1.0, 3, figure "Opcodes
/// for NVM Commands").
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DATASET_MANAGEMENT: u8 = 0x09;

    /// A name for an I/O opcode, for messages.
    pub fn name(opcode: u8) -> &'static str {
        match opcode {
            FLUSH => "flush",
            WRITE => "write",
            READ => "read",
            WRITE_ZEROES => "write zeroes",
            DATASET_MANAGEMENT => "dataset management",
            _ => "I/O command",
        }
    }
}

/// Feature identifiers for Get and Set Features (NVMe Base 2.0, 5.27.1).
pub mod feature {
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
}

/// Identify's CNS values (NVMe Base 2.0, 5.17.1, figure "CNS Values").
pub mod cns {
    /// Identify Namespace data structure for the NSID.
    pub const NAMESPACE: u8 = 0x00;
    /// Identify Controller data structure.
    pub const CONTROLLER: u8 = 0x01;
    /// Active namespace ID list.
    pub const ACTIVE_NAMESPACES: u8 = 0x02;
}

/// A 64-byte submission queue entry under construction.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SubmissionEntry {
    bytes: [u8; SUBMISSION_ENTRY_SIZE],
}

impl std::fmt::Debug for SubmissionEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubmissionEntry")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("command_id", &self.command_id())
            .field("nsid", &self.namespace_id())
            .field("prp1", &format_args!("{:#x}", self.prp1()))
            .field("prp2", &format_args!("{:#x}", self.prp2()))
            .field("cdw10", &format_args!("{:#x}", self.dword(10)))
            .finish()
    }
}

impl SubmissionEntry {
    /// A zeroed entry for `opcode`, with PRPs for the data pointer (PSDT = 0, no fusing).
    pub fn new(opcode: u8) -> Self {
        let mut bytes = [0; SUBMISSION_ENTRY_SIZE];
        bytes[0] = opcode;
        SubmissionEntry { bytes }
    }

    /// Identify (admin 0x06) of data structure `cns` for namespace `nsid`, returning its
    /// 4096 bytes into the page at `buffer_iova` (which must be aligned to the memory page
    /// size, so one PRP entry covers it).
    pub fn identify(cns: u8, nsid: u32, buffer_iova: u64) -> Self {
        Self::new(admin::IDENTIFY)
            .with_namespace_id(nsid)
            .with_prp1(buffer_iova)
            .with_dword(10, u32::from(cns))
    }

    /// Set Features Number of Queues (5.27.1.5): asks for `submission` and `completion`
    /// I/O queues (1-based here; 0-based on the wire).
    pub fn set_number_of_queues(submission: u16, completion: u16) -> Self {
        let zero_based = |n: u16| u32::from(n.clamp(1, 0xfffe) - 1);
        Self::new(admin::SET_FEATURES)
            .with_dword(10, u32::from(feature::NUMBER_OF_QUEUES))
            .with_dword(11, zero_based(submission) | (zero_based(completion) << 16))
    }

    /// Create I/O Completion Queue (5.4): physically contiguous ring of `entries` slots at
    /// `iova`, with interrupts on `vector` if given.
    pub fn create_io_cq(queue_id: u16, entries: u16, iova: u64, vector: Option<u16>) -> Self {
        let interrupts = match vector {
            Some(vector) => (u32::from(vector) << 16) | 0b10,
            None => 0,
        };
        Self::new(admin::CREATE_IO_CQ)
            .with_prp1(iova)
            .with_dword(10, u32::from(queue_id) | (u32::from(entries - 1) << 16))
            .with_dword(11, interrupts | 1)
    }

    /// Create I/O Submission Queue (5.5): physically contiguous ring of `entries` slots at
    /// `iova`, completing into completion queue `cq_id`.
    pub fn create_io_sq(queue_id: u16, entries: u16, iova: u64, cq_id: u16) -> Self {
        Self::new(admin::CREATE_IO_SQ)
            .with_prp1(iova)
            .with_dword(10, u32::from(queue_id) | (u32::from(entries - 1) << 16))
            .with_dword(11, (u32::from(cq_id) << 16) | 1)
    }

    /// Doorbell Buffer Config (5.9): shadow doorbells in the page at `shadow_iova`,
    /// event indexes in the page at `event_index_iova`.
    pub fn doorbell_buffer_config(shadow_iova: u64, event_index_iova: u64) -> Self {
        Self::new(admin::DOORBELL_BUFFER_CONFIG)
            .with_prp1(shadow_iova)
            .with_prp2(event_index_iova)
    }

    /// Delete I/O Submission Queue (5.7) or, with `completion`, Completion Queue (5.6).
    pub fn delete_io_queue(queue_id: u16, completion: bool) -> Self {
        let opcode = if completion {
            admin::DELETE_IO_CQ
        } else {
            admin::DELETE_IO_SQ
        };
        Self::new(opcode).with_dword(10, u32::from(queue_id))
    }

    /// Get Log Page (5.16) of `dwords` dwords of log `log_id` into the data pointer given
    /// later.
    pub fn get_log_page(log_id: u8, nsid: u32, dwords: u32) -> Self {
        let numd = dwords.max(1) - 1;
        Self::new(admin::GET_LOG_PAGE)
            .with_namespace_id(nsid)
            .with_dword(10, u32::from(log_id) | ((numd & 0xffff) << 16))
            .with_dword(11, numd >> 16)
    }

    /// Read (02h) or Write (01h) of `blocks` logical blocks (1..=65536) at `lba`.
    pub fn read_write(opcode: u8, nsid: u32, lba: u64, blocks: u32) -> Self {
        Self::new(opcode)
            .with_namespace_id(nsid)
            .with_qword(10, lba)
            .with_dword(12, blocks.saturating_sub(1) & 0xffff)
    }

    /// Write Zeroes (08h) of `blocks` logical blocks (1..=65536) at `lba`.
    pub fn write_zeroes(nsid: u32, lba: u64, blocks: u32) -> Self {
        Self::read_write(io::WRITE_ZEROES, nsid, lba, blocks)
    }

    /// Flush (00h) of namespace `nsid` (0xffffffff: all).
    pub fn flush(nsid: u32) -> Self {
        Self::new(io::FLUSH).with_namespace_id(nsid)
    }

    /// Dataset Management (09h) with the Deallocate attribute over `ranges` (1..=256) range
    /// entries, whose list is at the data pointer.
    pub fn deallocate(nsid: u32, ranges: u16) -> Self {
        Self::new(io::DATASET_MANAGEMENT)
            .with_namespace_id(nsid)
            .with_dword(10, u32::from(ranges.saturating_sub(1)) & 0xff)
            .with_dword(11, 1 << 2)
    }

    /// An entry from its bytes (as read back from a queue, or by a device model).
    pub fn from_bytes(bytes: [u8; SUBMISSION_ENTRY_SIZE]) -> Self {
        SubmissionEntry { bytes }
    }

    /// The entry's bytes, as the controller reads them.
    pub fn to_bytes(&self) -> [u8; SUBMISSION_ENTRY_SIZE] {
        self.bytes
    }

    /// Command dword `index` (0–15).
    ///
    /// # Panics
    /// If `index` is above 15 (a programming error, never device input).
    pub fn dword(&self, index: usize) -> u32 {
        let at = index * 4;
        let mut word = [0; 4];
        word.copy_from_slice(&self.bytes[at..at + 4]);
        u32::from_le_bytes(word)
    }

    /// Sets command dword `index` (0–15).
    ///
    /// # Panics
    /// If `index` is above 15 (a programming error, never device input).
    pub fn with_dword(mut self, index: usize, value: u32) -> Self {
        let at = index * 4;
        self.bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
        self
    }

    fn qword(&self, dword_index: usize) -> u64 {
        u64::from(self.dword(dword_index)) | (u64::from(self.dword(dword_index + 1)) << 32)
    }

    fn with_qword(self, dword_index: usize, value: u64) -> Self {
        self.with_dword(dword_index, value as u32)
            .with_dword(dword_index + 1, (value >> 32) as u32)
    }

    /// CDW0 bits 7:0.
    pub fn opcode(&self) -> u8 {
        self.bytes[0]
    }

    /// CDW0 bits 31:16, the command identifier the completion echoes.
    pub fn command_id(&self) -> u16 {
        u16::from_le_bytes([self.bytes[2], self.bytes[3]])
    }

    /// Sets the command identifier (the queue does this on submission).
    pub fn with_command_id(mut self, command_id: u16) -> Self {
        self.bytes[2..4].copy_from_slice(&command_id.to_le_bytes());
        self
    }

    /// NSID, dword 1.
    pub fn namespace_id(&self) -> u32 {
        self.dword(1)
    }

    /// Sets the namespace ID.
    pub fn with_namespace_id(self, nsid: u32) -> Self {
        self.with_dword(1, nsid)
    }

    /// MPTR, dwords 4–5.
    pub fn metadata_pointer(&self) -> u64 {
        self.qword(4)
    }

    /// Sets the metadata pointer.
    pub fn with_metadata_pointer(self, iova: u64) -> Self {
        self.with_qword(4, iova)
    }

    /// PRP entry 1, dwords 6–7.
    pub fn prp1(&self) -> u64 {
        self.qword(6)
    }

    /// Sets PRP entry 1.
    pub fn with_prp1(self, iova: u64) -> Self {
        self.with_qword(6, iova)
    }

    /// PRP entry 2, dwords 8–9.
    pub fn prp2(&self) -> u64 {
        self.qword(8)
    }

    /// Sets PRP entry 2 (a second page, or a PRP list).
    pub fn with_prp2(self, iova: u64) -> Self {
        self.with_qword(8, iova)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identify_lays_out_its_fields() {
        let entry =
            SubmissionEntry::identify(cns::CONTROLLER, 0, 0x1234_5000_0000).with_command_id(0xbeef);
        let bytes = entry.to_bytes();
        assert_eq!(bytes[0], 0x06);
        assert_eq!(&bytes[2..4], &[0xef, 0xbe]);
        assert_eq!(&bytes[24..32], &0x1234_5000_0000u64.to_le_bytes());
        assert_eq!(bytes[40], 1, "CDW10.CNS");
        assert_eq!(entry.prp1(), 0x1234_5000_0000);
        assert_eq!(entry.prp2(), 0);
        assert_eq!(SubmissionEntry::from_bytes(bytes), entry);
    }

    #[test]
    fn every_field_round_trips() {
        let entry = SubmissionEntry::new(0x02)
            .with_command_id(7)
            .with_namespace_id(0xffff_ffff)
            .with_metadata_pointer(0x1111_2222_3333_4444)
            .with_prp1(0x5555_6666_7777_8000)
            .with_prp2(0x9999_aaaa_bbbb_c000)
            .with_dword(15, 0xdead_beef);
        assert_eq!(entry.opcode(), 0x02);
        assert_eq!(entry.command_id(), 7);
        assert_eq!(entry.namespace_id(), 0xffff_ffff);
        assert_eq!(entry.metadata_pointer(), 0x1111_2222_3333_4444);
        assert_eq!(entry.prp1(), 0x5555_6666_7777_8000);
        assert_eq!(entry.prp2(), 0x9999_aaaa_bbbb_c000);
        assert_eq!(entry.dword(15), 0xdead_beef);
        assert_eq!(&entry.to_bytes()[60..64], &0xdead_beefu32.to_le_bytes());
    }
}
