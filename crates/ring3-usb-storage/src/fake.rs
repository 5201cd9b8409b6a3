//! An in-process USB mass-storage device: a Bulk-Only Transport interface with an
//! in-memory disk behind SCSI block commands, implementing [`UsbTransport`] so that the
//! driver (and crates built on it) can be tested without hardware.
//!
//! The model checks what the host sends the way a device must (a CBW that is not valid
//! is answered by stalling both endpoints until Reset Recovery, §6.6.1; a data stage of
//! the wrong direction or length is a phase error) and can misbehave on request
//! ([`Fault`]): stalls, corrupt or mismatched status wrappers, phase errors, lying
//! residues, short or overlong data, timeouts, disconnection.
//!
//! ```
//! use ring3_usb_storage::fake::{FakeMassStorage, FakeConfig};
//! use ring3_usb_storage::MassStorage;
//!
//! let device = FakeMassStorage::new(FakeConfig::default());
//! let disk = MassStorage::new(device.clone(), device.endpoints(), 0).unwrap();
//! disk.write(3, &[0x5a; 512]).unwrap();
//! assert_eq!(device.read_block(3)[0], 0x5a);
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ring3_usb::{ControlRequest, Recipient, RequestType, TransferError, UsbTransport};

use crate::bot::{
    CommandBlockWrapper, CommandStatusWrapper, CswStatus, Direction, CBW_LEN, CSW_LEN,
    REQUEST_GET_MAX_LUN, REQUEST_RESET,
};
use crate::scsi::opcode;
use ring3_usb::BulkEndpoints;

/// The model's interface number.
pub const INTERFACE: u8 = 0;
/// The model's bulk-in endpoint.
pub const BULK_IN: u8 = 0x81;
/// The model's bulk-out endpoint.
pub const BULK_OUT: u8 = 0x02;

/// How the model device is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeConfig {
    /// Logical block length (any value: a test may give an absurd one).
    pub block_size: u32,
    /// Number of blocks (the disk is sparse: only written blocks take memory).
    pub block_count: u64,
    /// The highest LUN (Get Max LUN); every LUN shares the same disk.
    pub max_lun: u8,
    /// Get Max LUN stalls, as devices with one LUN may do.
    pub stall_get_max_lun: bool,
    /// `wMaxPacketSize` of both bulk endpoints.
    pub max_packet_size: usize,
    /// INQUIRY byte 0 (peripheral qualifier and device type).
    pub peripheral: u8,
    /// INQUIRY vendor, product, revision (padded or cut to 8, 16, 4 bytes).
    pub vendor: String,
    pub product: String,
    pub revision: String,
    /// TEST UNIT READY answers UNIT ATTENTION (power on) once first.
    pub unit_attention_at_start: bool,
    /// TEST UNIT READY answers NOT READY, becoming ready, this many times.
    pub not_ready_polls: u32,
    /// REQUEST SENSE answers in descriptor format (72h) instead of fixed (70h).
    pub descriptor_sense: bool,
    /// WRITE fails with DATA PROTECT.
    pub write_protected: bool,
    /// SYNCHRONIZE CACHE fails with ILLEGAL REQUEST, invalid operation code.
    pub no_synchronize_cache: bool,
    /// A failed command with a data-in stage fills the host's whole transfer (whole
    /// packets, possibly more than the CBW asked for) with zeros instead of stalling,
    /// as QEMU's usb-storage does.
    pub pad_failed_data_in: bool,
    /// The Bulk-Only Mass Storage Reset request stalls (a device that cannot recover).
    pub stall_reset: bool,
    /// READ CAPACITY(10) answers these raw 8 bytes instead of the real capacity.
    pub read_capacity_10_override: Option<Vec<u8>>,
    /// READ CAPACITY(16) answers these raw bytes instead of the real capacity.
    pub read_capacity_16_override: Option<Vec<u8>>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            block_size: 512,
            block_count: 2048,
            max_lun: 0,
            stall_get_max_lun: true,
            max_packet_size: 512,
            peripheral: 0x00,
            vendor: "RING3".into(),
            product: "FAKE DISK".into(),
            revision: "1.0".into(),
            unit_attention_at_start: false,
            not_ready_polls: 0,
            descriptor_sense: false,
            write_protected: false,
            no_synchronize_cache: false,
            stall_reset: false,
            pad_failed_data_in: false,
            read_capacity_10_override: None,
            read_capacity_16_override: None,
        }
    }
}

/// A misbehaviour for the model to act out on the next command (the next CBW it
/// accepts; faults are queued and used one per command).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Stall bulk-in (or bulk-out) in the data stage, then report the command failed
    /// with MEDIUM ERROR.
    StallData,
    /// Stall bulk-in when the host first reads the CSW (the CSW follows after the host
    /// clears the halt).
    StallCsw,
    /// Stall bulk-in on every read of the CSW until Reset Recovery.
    StallCswAlways,
    /// Send the CSW with a wrong signature.
    BadCswSignature,
    /// Send the CSW with another tag than the CBW's.
    WrongCswTag,
    /// Send a CSW one byte too long.
    LongCsw,
    /// Send a reserved status (3).
    ReservedCswStatus,
    /// Report a phase error (status 2) and refuse commands until Reset Recovery.
    PhaseError,
    /// Report this residue with status passed (after a full data stage).
    LyingResidue(u32),
    /// Send only this many bytes of the data-in stage (with an honest residue).
    ShortData(usize),
    /// Send this many bytes more than the command asked for in the data-in stage.
    ExtraData(usize),
    /// The CBW transfer times out.
    TimeoutCbw,
    /// The data stage times out.
    TimeoutData,
    /// Reading the CSW times out.
    TimeoutCsw,
    /// The command fails with CHECK CONDITION and this sense (key, ASC, ASCQ).
    CheckCondition(u8, u8, u8),
    /// The device disappears (every later call fails with `Disconnected`).
    Disconnect,
}

/// What the model has seen, for tests to check the host's behaviour.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeStats {
    /// CBWs accepted.
    pub commands: u64,
    /// Opcodes of the accepted CBWs, in order.
    pub opcodes: Vec<u8>,
    /// Bulk-Only Mass Storage Resets received.
    pub resets: u64,
    /// Clear Feature HALT requests received.
    pub clear_halts: u64,
    /// SYNCHRONIZE CACHE commands completed.
    pub flushes: u64,
    /// CBWs refused as not valid or not meaningful.
    pub invalid_cbws: u64,
    /// The largest data stage of a READ or WRITE, in bytes.
    pub largest_transfer: usize,
}

/// Where the device is in the Bulk-Only protocol (§5, §6).
#[derive(Debug)]
enum Phase {
    /// Waiting for a CBW.
    Command,
    /// Sending data; then the CSW.
    DataIn {
        data: Vec<u8>,
        sent: usize,
        csw: CommandStatusWrapper,
        /// Fill the host's buffer, whatever its size (padding of a failed command).
        fill_buffer: bool,
    },
    /// Receiving `expected` bytes; then the command runs and the CSW is sent.
    DataOut {
        cbw: CommandBlockWrapper,
        received: Vec<u8>,
    },
    /// Sending the CSW (raw bytes, possibly corrupted by a fault).
    Status { raw: Vec<u8> },
    /// Wedged (after a timeout or a refused CBW) until Reset Recovery.
    NeedsReset,
}

#[derive(Debug)]
struct State {
    config: FakeConfig,
    /// Written blocks; others read as zeros.
    blocks: BTreeMap<u64, Vec<u8>>,
    phase: Phase,
    in_halted: bool,
    out_halted: bool,
    faults: VecDeque<Fault>,
    /// The fault of the command in progress.
    fault: Option<Fault>,
    /// CSW stalls still to give before the CSW.
    csw_stalls: u32,
    sense: Option<(u8, u8, u8)>,
    unit_attention: bool,
    not_ready_polls: u32,
    disconnected: bool,
    stats: FakeStats,
}

/// The model device; clones share it (one clone is the driver's transport, another the
/// test's handle on the disk and the faults).
#[derive(Debug, Clone)]
pub struct FakeMassStorage {
    state: Arc<Mutex<State>>,
}

impl FakeMassStorage {
    /// A device with an empty (zeroed) disk.
    pub fn new(config: FakeConfig) -> Self {
        let state = State {
            unit_attention: config.unit_attention_at_start,
            not_ready_polls: config.not_ready_polls,
            config,
            blocks: BTreeMap::new(),
            phase: Phase::Command,
            in_halted: false,
            out_halted: false,
            faults: VecDeque::new(),
            fault: None,
            csw_stalls: 0,
            sense: None,
            disconnected: false,
            stats: FakeStats::default(),
        };
        Self {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The endpoints to give the driver.
    pub fn endpoints(&self) -> BulkEndpoints {
        let packet = self.state().config.max_packet_size;
        BulkEndpoints {
            interface: INTERFACE,
            bulk_in: BULK_IN,
            bulk_out: BULK_OUT,
            max_packet_in: packet,
            max_packet_out: packet,
        }
    }

    /// Queues a fault for the next command.
    pub fn inject(&self, fault: Fault) {
        self.state().faults.push_back(fault);
    }

    /// Faults queued and not yet acted out.
    pub fn pending_faults(&self) -> usize {
        self.state().faults.len()
    }

    /// What the model has seen so far.
    pub fn stats(&self) -> FakeStats {
        self.state().stats.clone()
    }

    /// Changes the configuration (capacity, block size, behaviour) of a running device.
    pub fn configure(&self, change: impl FnOnce(&mut FakeConfig)) {
        change(&mut self.state().config);
    }

    /// The contents of one block as the device holds them.
    pub fn read_block(&self, lba: u64) -> Vec<u8> {
        let state = self.state();
        state.read_blocks(lba, 1)
    }

    /// Reports UNIT ATTENTION on the next command (as after a medium change).
    pub fn raise_unit_attention(&self) {
        self.state().unit_attention = true;
    }
}

impl State {
    fn block_size(&self) -> usize {
        self.config.block_size as usize
    }

    fn read_blocks(&self, lba: u64, count: u64) -> Vec<u8> {
        let block = self.block_size();
        let mut data = Vec::with_capacity(block * count as usize);
        for index in lba..lba + count {
            match self.blocks.get(&index) {
                Some(contents) => data.extend_from_slice(contents),
                None => data.resize(data.len() + block, 0),
            }
        }
        data
    }

    fn write_blocks(&mut self, lba: u64, data: &[u8]) {
        let block = self.block_size().max(1);
        for (index, contents) in data.chunks(block).enumerate() {
            self.blocks.insert(lba + index as u64, contents.to_vec());
        }
    }

    fn check_condition(&mut self, key: u8, asc: u8, ascq: u8) -> CswStatus {
        self.sense = Some((key, asc, ascq));
        CswStatus::Failed
    }

    fn sense_data(&mut self) -> Vec<u8> {
        let (key, asc, ascq) = self.sense.take().unwrap_or((0, 0, 0));
        if self.config.descriptor_sense {
            vec![0x72, key, asc, ascq, 0, 0, 0, 0]
        } else {
            let mut data = vec![0; 18];
            data[0] = 0x70;
            data[2] = key;
            data[7] = 10;
            data[12] = asc;
            data[13] = ascq;
            data
        }
    }

    fn inquiry_data(&self) -> Vec<u8> {
        let mut data = vec![0; 36];
        data[0] = self.config.peripheral;
        data[1] = 0x80;
        data[2] = 0x06;
        data[3] = 0x02;
        data[4] = 31;
        let mut put = |at: usize, len: usize, text: &str| {
            let mut field = text.as_bytes().to_vec();
            field.resize(len, b' ');
            data[at..at + len].copy_from_slice(&field);
        };
        put(8, 8, &self.config.vendor);
        put(16, 16, &self.config.product);
        put(32, 4, &self.config.revision);
        data
    }

    fn capacity_10(&self) -> Vec<u8> {
        if let Some(raw) = &self.config.read_capacity_10_override {
            return raw.clone();
        }
        let last = self.config.block_count.saturating_sub(1);
        let last = u32::try_from(last).unwrap_or(u32::MAX);
        let mut data = last.to_be_bytes().to_vec();
        data.extend_from_slice(&self.config.block_size.to_be_bytes());
        data
    }

    fn capacity_16(&self) -> Vec<u8> {
        if let Some(raw) = &self.config.read_capacity_16_override {
            return raw.clone();
        }
        let mut data = vec![0; 32];
        data[0..8].copy_from_slice(&self.config.block_count.saturating_sub(1).to_be_bytes());
        data[8..12].copy_from_slice(&self.config.block_size.to_be_bytes());
        data
    }

    /// Takes a CBW: checks it, runs commands without data-out, and sets the next phase.
    fn accept_cbw(&mut self, bytes: &[u8]) {
        let cbw = match CommandBlockWrapper::parse(bytes) {
            Ok(cbw) if cbw.lun <= self.config.max_lun => cbw,
            _ => return self.refuse_cbw(),
        };
        self.stats.commands += 1;
        let command = cbw.command().to_vec();
        self.stats.opcodes.push(command[0]);
        self.fault = self.faults.pop_front();
        self.csw_stalls = match self.fault {
            Some(Fault::StallCsw) => 1,
            Some(Fault::StallCswAlways) => u32::MAX,
            _ => 0,
        };
        if self.fault == Some(Fault::Disconnect) {
            self.disconnected = true;
            return;
        }
        if self.fault == Some(Fault::TimeoutCbw) {
            self.phase = Phase::NeedsReset;
            return;
        }
        let expected = cbw.data_transfer_length as usize;

        // Commands with a data-out stage run once the data is in.
        let is_write = matches!(command[0], opcode::WRITE_10 | opcode::WRITE_16);
        if is_write && expected > 0 && cbw.direction == Direction::Out {
            self.phase = Phase::DataOut {
                cbw,
                received: Vec::new(),
            };
            return;
        }
        let (status, data) = self.run_command(&cbw, None);
        self.start_data_in(&cbw, status, data);
    }

    /// A CBW that is not valid or not meaningful: stall both endpoints until reset (§6.6.1).
    fn refuse_cbw(&mut self) {
        self.stats.invalid_cbws += 1;
        self.in_halted = true;
        self.out_halted = true;
        self.phase = Phase::NeedsReset;
    }

    /// Runs a command, returning its status and the data it sends to the host.
    /// `written` is the data-out stage of a WRITE.
    fn run_command(
        &mut self,
        cbw: &CommandBlockWrapper,
        written: Option<&[u8]>,
    ) -> (CswStatus, Vec<u8>) {
        let cdb = cbw.command();
        let op = cdb[0];
        if let Some(Fault::CheckCondition(key, asc, ascq)) = self.fault {
            return (self.check_condition(key, asc, ascq), Vec::new());
        }
        if self.unit_attention && !matches!(op, opcode::INQUIRY | opcode::REQUEST_SENSE) {
            self.unit_attention = false;
            return (self.check_condition(0x6, 0x29, 0x00), Vec::new());
        }
        let byte = |index: usize| cdb.get(index).copied().unwrap_or(0);
        let be32 =
            |at: usize| u32::from_be_bytes([byte(at), byte(at + 1), byte(at + 2), byte(at + 3)]);
        let be64 = |at: usize| (u64::from(be32(at)) << 32) | u64::from(be32(at + 4));
        match op {
            opcode::TEST_UNIT_READY => {
                if self.not_ready_polls > 0 {
                    self.not_ready_polls -= 1;
                    return (self.check_condition(0x2, 0x04, 0x01), Vec::new());
                }
                (CswStatus::Passed, Vec::new())
            }
            opcode::REQUEST_SENSE => {
                let mut data = self.sense_data();
                data.truncate(usize::from(byte(4)));
                (CswStatus::Passed, data)
            }
            opcode::INQUIRY => {
                let mut data = self.inquiry_data();
                data.truncate(usize::from(u16::from_be_bytes([byte(3), byte(4)])));
                (CswStatus::Passed, data)
            }
            opcode::READ_CAPACITY_10 => (CswStatus::Passed, self.capacity_10()),
            opcode::SERVICE_ACTION_IN_16
                if byte(1) & 0x1F == opcode::SERVICE_ACTION_READ_CAPACITY_16 =>
            {
                let mut data = self.capacity_16();
                data.truncate(be32(10) as usize);
                (CswStatus::Passed, data)
            }
            opcode::READ_10 | opcode::READ_16 | opcode::WRITE_10 | opcode::WRITE_16 => {
                let (lba, count) = if matches!(op, opcode::READ_10 | opcode::WRITE_10) {
                    (
                        u64::from(be32(2)),
                        u64::from(u16::from_be_bytes([byte(7), byte(8)])),
                    )
                } else {
                    (be64(2), u64::from(be32(10)))
                };
                let bytes = count.saturating_mul(u64::from(self.config.block_size));
                if bytes != u64::from(cbw.data_transfer_length) {
                    // The host's CBW and CDB disagree: a phase error in the model's eyes.
                    return (CswStatus::PhaseError, Vec::new());
                }
                let in_range = lba
                    .checked_add(count)
                    .is_some_and(|end| end <= self.config.block_count);
                if !in_range {
                    return (self.check_condition(0x5, 0x21, 0x00), Vec::new());
                }
                self.stats.largest_transfer = self.stats.largest_transfer.max(bytes as usize);
                match written {
                    Some(data) => {
                        if self.config.write_protected {
                            return (self.check_condition(0x7, 0x27, 0x00), Vec::new());
                        }
                        self.write_blocks(lba, data);
                        (CswStatus::Passed, Vec::new())
                    }
                    None if matches!(op, opcode::READ_10 | opcode::READ_16) => {
                        (CswStatus::Passed, self.read_blocks(lba, count))
                    }
                    // A WRITE without a data-out stage.
                    None if count == 0 => (CswStatus::Passed, Vec::new()),
                    None => (CswStatus::PhaseError, Vec::new()),
                }
            }
            opcode::SYNCHRONIZE_CACHE_10 => {
                if self.config.no_synchronize_cache {
                    return (self.check_condition(0x5, 0x20, 0x00), Vec::new());
                }
                self.stats.flushes += 1;
                (CswStatus::Passed, Vec::new())
            }
            _ => (self.check_condition(0x5, 0x20, 0x00), Vec::new()),
        }
    }

    /// Sets up the data-in stage (possibly empty) and the CSW after it.
    fn start_data_in(&mut self, cbw: &CommandBlockWrapper, status: CswStatus, mut data: Vec<u8>) {
        let expected = cbw.data_transfer_length as usize;
        let mut status = status;
        if !data.is_empty() && cbw.direction != Direction::In {
            // Case 10 (Ho <> Di): the device has data for a host that wants to send.
            status = CswStatus::PhaseError;
            data.clear();
        }
        // Case 7 (Hi < Di): more data than the host asked for is a phase error, unless a
        // fault makes the device send it anyway.
        if data.len() > expected && !matches!(self.fault, Some(Fault::ExtraData(_))) {
            data.truncate(expected);
            if status == CswStatus::Passed
                && !matches!(cbw.command()[0], opcode::INQUIRY | opcode::REQUEST_SENSE)
            {
                status = CswStatus::PhaseError;
            }
        }
        match self.fault {
            Some(Fault::ShortData(count)) => data.truncate(count),
            Some(Fault::ExtraData(count)) => data.resize(expected + count, 0xEE),
            _ => {}
        }
        if self.fault == Some(Fault::StallData) && cbw.direction == Direction::In && expected > 0 {
            data.clear();
            self.in_halted = true;
            status = self.check_condition(0x3, 0x11, 0x00);
        }
        // A failed command with a data-in stage ends it by stalling (§6.7.2), or pads it.
        let failed_data_in = status == CswStatus::Failed
            && cbw.direction == Direction::In
            && expected > 0
            && data.is_empty();
        let fill_buffer = failed_data_in && self.config.pad_failed_data_in;
        if failed_data_in && !fill_buffer {
            self.in_halted = true;
        }
        if fill_buffer {
            data = vec![0; expected];
        }
        let residue = if fill_buffer {
            expected as u32
        } else {
            expected.saturating_sub(data.len().min(expected)) as u32
        };
        let csw = CommandStatusWrapper {
            tag: cbw.tag,
            residue,
            status,
        };
        if data.is_empty() {
            self.phase = Phase::Status {
                raw: self.status_bytes(csw),
            };
        } else {
            self.phase = Phase::DataIn {
                data,
                sent: 0,
                csw,
                fill_buffer,
            };
        }
    }

    /// The CSW as sent, with the fault of the command applied.
    fn status_bytes(&mut self, mut csw: CommandStatusWrapper) -> Vec<u8> {
        match self.fault {
            Some(Fault::PhaseError) => csw.status = CswStatus::PhaseError,
            Some(Fault::LyingResidue(residue)) => csw.residue = residue,
            Some(Fault::WrongCswTag) => csw.tag = csw.tag.wrapping_add(1),
            _ => {}
        }
        let mut raw = csw.encode().to_vec();
        match self.fault {
            Some(Fault::BadCswSignature) => raw[3] ^= 0xFF,
            Some(Fault::LongCsw) => raw.push(0),
            Some(Fault::ReservedCswStatus) => raw[12] = 3,
            _ => {}
        }
        raw
    }

    fn bulk_in(&mut self, buf: &mut [u8]) -> Result<usize, TransferError> {
        if self.in_halted {
            return Err(TransferError::Stall);
        }
        match &mut self.phase {
            Phase::DataIn {
                data,
                sent,
                csw,
                fill_buffer,
            } => {
                if self.fault == Some(Fault::TimeoutData) {
                    self.phase = Phase::NeedsReset;
                    return Err(TransferError::Timeout);
                }
                let count = if *fill_buffer {
                    buf.fill(0);
                    *sent = data.len();
                    buf.len()
                } else {
                    let count = buf.len().min(data.len() - *sent);
                    buf[..count].copy_from_slice(&data[*sent..*sent + count]);
                    *sent += count;
                    count
                };
                if *sent == data.len() {
                    let csw = *csw;
                    self.phase = Phase::Status {
                        raw: self.status_bytes(csw),
                    };
                }
                Ok(count)
            }
            Phase::Status { raw } => {
                if self.fault == Some(Fault::TimeoutCsw) {
                    self.phase = Phase::NeedsReset;
                    return Err(TransferError::Timeout);
                }
                if self.csw_stalls > 0 {
                    self.csw_stalls -= 1;
                    self.in_halted = true;
                    return Err(TransferError::Stall);
                }
                if buf.len() < raw.len() {
                    // The device sends more than the host's buffer holds: babble.
                    self.phase = Phase::NeedsReset;
                    return Err(TransferError::Fault);
                }
                let count = raw.len();
                buf[..count].copy_from_slice(raw);
                // After a phase error the device waits for Reset Recovery (§6.7).
                self.phase = if raw.get(12) == Some(&2) {
                    Phase::NeedsReset
                } else {
                    Phase::Command
                };
                Ok(count)
            }
            // Nothing to send: the device NAKs until the host gives up.
            Phase::Command | Phase::DataOut { .. } | Phase::NeedsReset => {
                Err(TransferError::Timeout)
            }
        }
    }

    fn bulk_out(&mut self, data: &[u8]) -> Result<usize, TransferError> {
        if self.out_halted {
            return Err(TransferError::Stall);
        }
        match &mut self.phase {
            Phase::Command => {
                if data.len() != CBW_LEN {
                    self.refuse_cbw();
                    return Err(TransferError::Stall);
                }
                self.accept_cbw(data);
                if self.disconnected {
                    return Err(TransferError::Disconnected);
                }
                if matches!(self.phase, Phase::NeedsReset) {
                    if self.fault == Some(Fault::TimeoutCbw) {
                        return Err(TransferError::Timeout);
                    }
                    return Err(TransferError::Stall);
                }
                Ok(data.len())
            }
            Phase::DataOut { cbw, received } => {
                if self.fault == Some(Fault::TimeoutData) {
                    self.phase = Phase::NeedsReset;
                    return Err(TransferError::Timeout);
                }
                let expected = cbw.data_transfer_length as usize;
                if self.fault == Some(Fault::StallData) {
                    let cbw = cbw.clone();
                    self.out_halted = true;
                    let status = self.check_condition(0x3, 0x0C, 0x00);
                    let csw = CommandStatusWrapper {
                        tag: cbw.tag,
                        residue: cbw.data_transfer_length,
                        status,
                    };
                    self.phase = Phase::Status {
                        raw: self.status_bytes(csw),
                    };
                    return Err(TransferError::Stall);
                }
                let room = expected - received.len();
                let take = data.len().min(room);
                received.extend_from_slice(&data[..take]);
                if received.len() == expected {
                    let cbw = cbw.clone();
                    let received = std::mem::take(received);
                    let (status, _) = self.run_command(&cbw, Some(&received));
                    let csw = CommandStatusWrapper {
                        tag: cbw.tag,
                        residue: 0,
                        status,
                    };
                    self.phase = Phase::Status {
                        raw: self.status_bytes(csw),
                    };
                }
                if take < data.len() {
                    // More than the CBW announced: the device stalls the rest.
                    self.out_halted = true;
                    return Err(TransferError::Stall);
                }
                Ok(data.len())
            }
            // The host sends while the device has data or status for it.
            Phase::DataIn { .. } | Phase::Status { .. } | Phase::NeedsReset => {
                self.out_halted = true;
                Err(TransferError::Stall)
            }
        }
    }
}

impl UsbTransport for FakeMassStorage {
    fn control_in(
        &self,
        request: ControlRequest,
        length: u16,
        _timeout: Duration,
    ) -> Result<Vec<u8>, TransferError> {
        let state = self.state();
        if state.disconnected {
            return Err(TransferError::Disconnected);
        }
        let is_get_max_lun = request.request_type == RequestType::Class
            && request.recipient == Recipient::Interface
            && request.request == REQUEST_GET_MAX_LUN
            && request.value == 0
            && request.index == u16::from(INTERFACE)
            && length == 1;
        if !is_get_max_lun || state.config.stall_get_max_lun {
            return Err(TransferError::Stall);
        }
        Ok(vec![state.config.max_lun])
    }

    fn control_out(
        &self,
        request: ControlRequest,
        data: &[u8],
        _timeout: Duration,
    ) -> Result<(), TransferError> {
        let mut state = self.state();
        if state.disconnected {
            return Err(TransferError::Disconnected);
        }
        let is_reset = request.request_type == RequestType::Class
            && request.recipient == Recipient::Interface
            && request.request == REQUEST_RESET
            && request.value == 0
            && request.index == u16::from(INTERFACE)
            && data.is_empty();
        if !is_reset || state.config.stall_reset {
            return Err(TransferError::Stall);
        }
        // §3.1: ready for the next CBW; the halts stay until the host clears them.
        state.stats.resets += 1;
        state.phase = Phase::Command;
        state.fault = None;
        state.csw_stalls = 0;
        Ok(())
    }

    fn bulk_in(
        &self,
        endpoint: u8,
        buf: &mut [u8],
        _timeout: Duration,
    ) -> Result<usize, TransferError> {
        let mut state = self.state();
        if state.disconnected {
            return Err(TransferError::Disconnected);
        }
        if endpoint != BULK_IN {
            return Err(TransferError::Other(format!("no endpoint {endpoint:#04x}")));
        }
        state.bulk_in(buf)
    }

    fn bulk_out(
        &self,
        endpoint: u8,
        data: &[u8],
        _timeout: Duration,
    ) -> Result<usize, TransferError> {
        let mut state = self.state();
        if state.disconnected {
            return Err(TransferError::Disconnected);
        }
        if endpoint != BULK_OUT {
            return Err(TransferError::Other(format!("no endpoint {endpoint:#04x}")));
        }
        state.bulk_out(data)
    }

    fn clear_halt(&self, endpoint: u8) -> Result<(), TransferError> {
        let mut state = self.state();
        if state.disconnected {
            return Err(TransferError::Disconnected);
        }
        state.stats.clear_halts += 1;
        // §6.6.1: after a refused CBW the endpoints stay halted until Reset Recovery; the
        // reset puts the phase back to Command, so a halt cleared then really clears.
        let wedged = matches!(state.phase, Phase::NeedsReset);
        match endpoint {
            BULK_IN if !wedged => state.in_halted = false,
            BULK_OUT if !wedged => state.out_halted = false,
            BULK_IN | BULK_OUT => {}
            _ => return Err(TransferError::Other(format!("no endpoint {endpoint:#04x}"))),
        }
        Ok(())
    }

    fn max_packet_size(&self, endpoint: u8) -> Option<usize> {
        match endpoint {
            BULK_IN | BULK_OUT => Some(self.state().config.max_packet_size),
            _ => None,
        }
    }
}

/// Sanity of the constants the model relies on.
const _: () = assert!(CSW_LEN == 13 && CBW_LEN == 31);
