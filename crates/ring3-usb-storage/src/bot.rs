//! USB Mass Storage Class Bulk-Only Transport, revision 1.0 (BOT).
//!
//! Every command is three stages on the interface's two bulk endpoints (§5):
//!
//! 1. the host sends a 31-byte Command Block Wrapper ([`CommandBlockWrapper`]) on bulk-out;
//! 2. optionally, data moves on bulk-in or bulk-out (the direction the CBW announced);
//! 3. the device answers with a 13-byte Command Status Wrapper ([`CommandStatusWrapper`])
//!    on bulk-in.
//!
//! [`BulkOnly`] runs that exchange and the error handling of §5.3 and §6.7: a stall in the
//! data stage is cleared and the CSW is still read; a stall on the CSW is cleared and the
//! CSW read once more; a CSW that is not valid or not meaningful, a phase error, or a
//! timeout is followed by Reset Recovery (§5.3.4), after which the next command starts
//! afresh.

use std::sync::Mutex;
use std::time::Duration;

use ring3_usb::{ControlRequest, Recipient, RequestType, TransferError, UsbTransport};

use crate::error::{Result, StorageError};
use ring3_usb::BulkEndpoints;

/// `dCBWSignature`: "USBC" in little-endian (§5.1).
pub const CBW_SIGNATURE: u32 = 0x4342_5355;
/// `dCSWSignature`: "USBS" in little-endian (§5.2).
pub const CSW_SIGNATURE: u32 = 0x5342_5355;
/// The length of a Command Block Wrapper (§5.1).
pub const CBW_LEN: usize = 31;
/// The length of a Command Status Wrapper (§5.2).
pub const CSW_LEN: usize = 13;
/// The longest command block a CBW carries (`bCBWCBLength` 1..=16).
pub const MAX_CB_LEN: usize = 16;
/// The highest LUN a CBW can address (`bCBWLUN` is four bits).
pub const MAX_LUN: u8 = 15;

/// Bulk-Only Mass Storage Reset, a class request to the interface (§3.1).
pub const REQUEST_RESET: u8 = 0xFF;
/// Get Max LUN, a class request to the interface (§3.2).
pub const REQUEST_GET_MAX_LUN: u8 = 0xFE;

/// Which way the data stage of a command goes (`bmCBWFlags` bit 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Device to host (bit 7 set); also used when there is no data stage.
    In,
    /// Host to device (bit 7 clear).
    Out,
}

/// Why bytes are not a well-formed CBW, or a CBW cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CbwError {
    #[error("a CBW is {CBW_LEN} bytes, not {0}")]
    Length(usize),
    #[error("dCBWSignature is {0:#010x}, not {CBW_SIGNATURE:#010x}")]
    Signature(u32),
    #[error("bCBWLUN {0} is above {MAX_LUN} (or reserved bits are set)")]
    Lun(u8),
    #[error("bCBWCBLength {0} is not in 1..={MAX_CB_LEN} (or reserved bits are set)")]
    CommandLength(u8),
    #[error("bmCBWFlags {0:#04x} has reserved bits set")]
    Flags(u8),
}

/// A Command Block Wrapper (BOT §5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandBlockWrapper {
    /// `dCBWTag`: echoed by the device in the CSW that ends this command.
    pub tag: u32,
    /// `dCBWDataTransferLength`: the bytes the host expects to move in the data stage.
    pub data_transfer_length: u32,
    /// `bmCBWFlags` bit 7 (meaningless when the length is 0).
    pub direction: Direction,
    /// `bCBWLUN`.
    pub lun: u8,
    command: [u8; MAX_CB_LEN],
    command_len: u8,
}

impl CommandBlockWrapper {
    /// A CBW for `command` (1 to 16 bytes) to `lun` (0 to 15).
    pub fn new(
        tag: u32,
        data_transfer_length: u32,
        direction: Direction,
        lun: u8,
        command: &[u8],
    ) -> Result<Self, CbwError> {
        if lun > MAX_LUN {
            return Err(CbwError::Lun(lun));
        }
        if command.is_empty() || command.len() > MAX_CB_LEN {
            return Err(CbwError::CommandLength(command.len().min(255) as u8));
        }
        let mut block = [0; MAX_CB_LEN];
        block[..command.len()].copy_from_slice(command);
        Ok(Self {
            tag,
            data_transfer_length,
            direction,
            lun,
            command: block,
            command_len: command.len() as u8,
        })
    }

    /// The command block (`CBWCB`, `bCBWCBLength` bytes).
    pub fn command(&self) -> &[u8] {
        &self.command[..usize::from(self.command_len)]
    }

    /// The 31 bytes sent on bulk-out.
    pub fn encode(&self) -> [u8; CBW_LEN] {
        let mut bytes = [0; CBW_LEN];
        bytes[0..4].copy_from_slice(&CBW_SIGNATURE.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.tag.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.data_transfer_length.to_le_bytes());
        bytes[12] = match self.direction {
            Direction::In => 0x80,
            Direction::Out => 0x00,
        };
        bytes[13] = self.lun;
        bytes[14] = self.command_len;
        bytes[15..31].copy_from_slice(&self.command);
        bytes
    }

    /// Parses and checks a CBW the way a device must (§6.2.1: valid; §6.2.2: meaningful).
    /// Bytes of the command block past `bCBWCBLength` are kept as they were.
    pub fn parse(bytes: &[u8]) -> Result<Self, CbwError> {
        let bytes: &[u8; CBW_LEN] = bytes
            .try_into()
            .map_err(|_| CbwError::Length(bytes.len()))?;
        let signature = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if signature != CBW_SIGNATURE {
            return Err(CbwError::Signature(signature));
        }
        let flags = bytes[12];
        if flags & 0x7F != 0 {
            return Err(CbwError::Flags(flags));
        }
        if bytes[13] > MAX_LUN {
            return Err(CbwError::Lun(bytes[13]));
        }
        let command_len = bytes[14];
        if command_len == 0 || usize::from(command_len) > MAX_CB_LEN {
            return Err(CbwError::CommandLength(command_len));
        }
        let mut command = [0; MAX_CB_LEN];
        command.copy_from_slice(&bytes[15..31]);
        Ok(Self {
            tag: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            data_transfer_length: u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
            direction: if flags & 0x80 != 0 {
                Direction::In
            } else {
                Direction::Out
            },
            lun: bytes[13],
            command,
            command_len,
        })
    }
}

/// `bCSWStatus` (§5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CswStatus {
    /// 0: Command Passed ("good status").
    Passed,
    /// 1: Command Failed: the host fetches sense data with REQUEST SENSE.
    Failed,
    /// 2: Phase Error: the host must do Reset Recovery.
    PhaseError,
}

impl CswStatus {
    /// The `bCSWStatus` byte.
    pub fn code(self) -> u8 {
        match self {
            CswStatus::Passed => 0,
            CswStatus::Failed => 1,
            CswStatus::PhaseError => 2,
        }
    }
}

/// Why a CSW is not valid or not meaningful (§6.3): the host answers with Reset Recovery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CswError {
    #[error("it is {0} bytes long, not {CSW_LEN}")]
    Length(usize),
    #[error("its signature is {0:#010x}, not {CSW_SIGNATURE:#010x}")]
    Signature(u32),
    #[error("its tag is {actual:#010x}, the command's is {expected:#010x}")]
    Tag { expected: u32, actual: u32 },
    #[error("its status byte {0:#04x} is reserved")]
    Status(u8),
    #[error("its residue {residue} exceeds the {expected} bytes the command expected")]
    Residue { residue: u32, expected: u32 },
}

/// A Command Status Wrapper (BOT §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandStatusWrapper {
    /// `dCSWTag`: the tag of the CBW this status ends.
    pub tag: u32,
    /// `dCSWDataResidue`: how much of the expected data the device did not process.
    pub residue: u32,
    /// `bCSWStatus`.
    pub status: CswStatus,
}

impl CommandStatusWrapper {
    /// The 13 bytes a device sends on bulk-in.
    pub fn encode(&self) -> [u8; CSW_LEN] {
        let mut bytes = [0; CSW_LEN];
        bytes[0..4].copy_from_slice(&CSW_SIGNATURE.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.tag.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.residue.to_le_bytes());
        bytes[12] = self.status.code();
        bytes
    }

    /// Parses a CSW and checks it is valid (size, signature) and has a defined status.
    /// [`Self::check`] then checks it belongs to the command.
    pub fn parse(bytes: &[u8]) -> Result<Self, CswError> {
        let bytes: &[u8; CSW_LEN] = bytes
            .try_into()
            .map_err(|_| CswError::Length(bytes.len()))?;
        let signature = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if signature != CSW_SIGNATURE {
            return Err(CswError::Signature(signature));
        }
        let status = match bytes[12] {
            0 => CswStatus::Passed,
            1 => CswStatus::Failed,
            2 => CswStatus::PhaseError,
            other => return Err(CswError::Status(other)),
        };
        Ok(Self {
            tag: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            residue: u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
            status,
        })
    }

    /// Checks the CSW ends the command `cbw` (§6.3): same tag, and for passed or failed
    /// commands a residue no larger than the data the command expected.
    pub fn check(&self, cbw: &CommandBlockWrapper) -> Result<(), CswError> {
        if self.tag != cbw.tag {
            return Err(CswError::Tag {
                expected: cbw.tag,
                actual: self.tag,
            });
        }
        if self.status != CswStatus::PhaseError && self.residue > cbw.data_transfer_length {
            return Err(CswError::Residue {
                residue: self.residue,
                expected: cbw.data_transfer_length,
            });
        }
        Ok(())
    }
}

/// The data stage of one command.
#[derive(Debug)]
pub enum DataStage<'a> {
    /// No data stage.
    None,
    /// Device to host, into the buffer (its length is `dCBWDataTransferLength`).
    In(&'a mut [u8]),
    /// Host to device (its length is `dCBWDataTransferLength`).
    Out(&'a [u8]),
}

impl DataStage<'_> {
    fn len(&self) -> usize {
        match self {
            DataStage::None => 0,
            DataStage::In(buf) => buf.len(),
            DataStage::Out(data) => data.len(),
        }
    }
}

/// What the data-in stage brought.
enum DataIn {
    /// This many bytes, at most what the command asked for.
    Received(usize),
    /// More than the command asked for (this many, as far as the buffer saw); the
    /// command's part was kept.
    Overrun(usize),
}

/// How a command that reached its status stage ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandOutcome {
    /// Passed or failed (a phase error is returned as [`StorageError::PhaseError`]).
    pub status: CswStatus,
    /// `dCSWDataResidue` as the device reported it.
    pub residue: u32,
    /// The bytes that actually moved in the data stage, as the host counted them.
    pub transferred: usize,
    /// Whether the device stalled the data stage.
    pub data_stalled: bool,
}

/// Timeouts of the Bulk-Only exchanges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BotTimeouts {
    /// Each bulk transfer of a command (CBW, data, CSW).
    pub command: Duration,
    /// Class control requests (reset, Get Max LUN) and clearing halts.
    pub control: Duration,
}

impl Default for BotTimeouts {
    fn default() -> Self {
        Self {
            command: Duration::from_secs(20),
            control: Duration::from_secs(5),
        }
    }
}

/// A Bulk-Only Transport interface: runs commands one at a time and recovers from the
/// device's errors as §5.3 and §6.7 prescribe.
#[derive(Debug)]
pub struct BulkOnly<T> {
    transport: T,
    endpoints: BulkEndpoints,
    timeouts: BotTimeouts,
    /// The next `dCBWTag`; the lock also serialises commands (BOT runs one at a time).
    next_tag: Mutex<u32>,
}

/// Which transfer of a command went wrong, for error messages.
const PHASE_CBW: &str = "command transport (CBW)";
const PHASE_DATA_IN: &str = "data-in stage";
const PHASE_DATA_OUT: &str = "data-out stage";
const PHASE_CSW: &str = "status transport (CSW)";

impl<T: UsbTransport> BulkOnly<T> {
    /// Wraps a claimed interface whose bulk endpoints are `endpoints`.
    pub fn new(transport: T, endpoints: BulkEndpoints, timeouts: BotTimeouts) -> Self {
        Self {
            transport,
            endpoints,
            timeouts,
            next_tag: Mutex::new(1),
        }
    }

    /// The transport underneath.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Gives the transport back.
    pub fn into_transport(self) -> T {
        self.transport
    }

    /// The endpoints in use.
    pub fn endpoints(&self) -> &BulkEndpoints {
        &self.endpoints
    }

    /// The timeouts in use.
    pub fn timeouts(&self) -> BotTimeouts {
        self.timeouts
    }

    /// Changes the timeouts.
    pub fn set_timeouts(&mut self, timeouts: BotTimeouts) {
        self.timeouts = timeouts;
    }

    fn interface_request(&self, request: u8) -> ControlRequest {
        ControlRequest {
            request_type: RequestType::Class,
            recipient: Recipient::Interface,
            request,
            value: 0,
            index: u16::from(self.endpoints.interface),
        }
    }

    /// Get Max LUN (§3.2): the highest LUN of the device. A device with one LUN may stall
    /// the request, which means 0.
    pub fn get_max_lun(&self) -> Result<u8> {
        const COMMAND: &str = "Get Max LUN";
        let request = self.interface_request(REQUEST_GET_MAX_LUN);
        match self.transport.control_in(request, 1, self.timeouts.control) {
            Ok(reply) => match reply.as_slice() {
                [max_lun] if *max_lun <= MAX_LUN => Ok(*max_lun),
                [max_lun] => Err(StorageError::BadResponse {
                    command: COMMAND,
                    what: format!("max LUN {max_lun} is above {MAX_LUN}"),
                }),
                // No data: treated like a stall by hosts in practice.
                [] => Ok(0),
                _ => Err(StorageError::BadResponse {
                    command: COMMAND,
                    what: format!("{} bytes instead of 1", reply.len()),
                }),
            },
            Err(TransferError::Stall) => Ok(0),
            Err(TransferError::Disconnected) => {
                Err(StorageError::Disconnected { command: COMMAND })
            }
            Err(TransferError::Timeout) => Err(StorageError::Timeout {
                command: COMMAND,
                phase: "control request",
                timeout: self.timeouts.control,
            }),
            Err(source) => Err(StorageError::Transfer {
                command: COMMAND,
                phase: "control request",
                source,
            }),
        }
    }

    /// Reset Recovery (§5.3.4): Bulk-Only Mass Storage Reset, then Clear Feature
    /// HALT on bulk-in and on bulk-out. `cause` and `command` name why, for the error.
    pub fn reset_recovery(&self, command: &'static str, cause: &str) -> Result<()> {
        tracing::debug!(command, cause, "bulk-only reset recovery");
        let failed = |step, source: TransferError| {
            if source == TransferError::Disconnected {
                StorageError::Disconnected { command }
            } else {
                StorageError::ResetFailed {
                    command,
                    cause: cause.to_string(),
                    step,
                    source,
                }
            }
        };
        let request = self.interface_request(REQUEST_RESET);
        self.transport
            .control_out(request, &[], self.timeouts.control)
            .map_err(|source| failed("Bulk-Only Mass Storage Reset", source))?;
        self.transport
            .clear_halt(self.endpoints.bulk_in)
            .map_err(|source| failed("clearing the halt of bulk-in", source))?;
        self.transport
            .clear_halt(self.endpoints.bulk_out)
            .map_err(|source| failed("clearing the halt of bulk-out", source))?;
        Ok(())
    }

    /// Resets, then returns `error` (or the reset's own failure, which is worse).
    fn recover_with(&self, command: &'static str, error: StorageError) -> StorageError {
        match self.reset_recovery(command, &error.to_string()) {
            Ok(()) => error,
            Err(reset_error) => reset_error,
        }
    }

    /// A transfer error that ends the command: a timeout or anything unrecoverable gets a
    /// Reset Recovery so that the next command starts in step.
    fn transfer_failed(
        &self,
        command: &'static str,
        phase: &'static str,
        source: TransferError,
        timeout: Duration,
    ) -> StorageError {
        match source {
            TransferError::Disconnected => StorageError::Disconnected { command },
            TransferError::Timeout => self.recover_with(
                command,
                StorageError::Timeout {
                    command,
                    phase,
                    timeout,
                },
            ),
            source => self.recover_with(
                command,
                StorageError::Transfer {
                    command,
                    phase,
                    source,
                },
            ),
        }
    }

    fn clear_halt(&self, command: &'static str, endpoint: u8) -> Result<()> {
        self.transport.clear_halt(endpoint).map_err(|source| {
            self.transfer_failed(
                command,
                "clearing an endpoint halt",
                source,
                self.timeouts.control,
            )
        })
    }

    /// Runs one command: CBW, data stage, CSW, with the recovery of §5.3 / §6.7.
    ///
    /// Returns the outcome when the device answered with a meaningful CSW of status
    /// passed or failed; `command` names the command for error messages.
    pub fn execute(
        &self,
        command: &'static str,
        lun: u8,
        command_block: &[u8],
        data: DataStage<'_>,
    ) -> Result<CommandOutcome> {
        self.execute_with_timeout(command, lun, command_block, data, self.timeouts.command)
    }

    /// [`Self::execute`] with another timeout for each of its transfers (a flush of a
    /// slow medium may need longer than reads and writes).
    pub fn execute_with_timeout(
        &self,
        command: &'static str,
        lun: u8,
        command_block: &[u8],
        mut data: DataStage<'_>,
        timeout: Duration,
    ) -> Result<CommandOutcome> {
        let mut next_tag = self
            .next_tag
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let tag = *next_tag;
        *next_tag = next_tag.wrapping_add(1);

        let expected = data.len();
        let data_transfer_length =
            u32::try_from(expected).map_err(|_| StorageError::InvalidArgument {
                what: format!("{command}: {expected} bytes do not fit one Bulk-Only command"),
            })?;
        let direction = match data {
            DataStage::Out(_) => Direction::Out,
            DataStage::None | DataStage::In(_) => Direction::In,
        };
        let cbw =
            CommandBlockWrapper::new(tag, data_transfer_length, direction, lun, command_block)
                .map_err(|error| StorageError::InvalidArgument {
                    what: format!("{command}: {error}"),
                })?;

        // Command transport (§5.1). A device that stalls the CBW found it not valid or
        // not meaningful (§6.6.1) and waits for Reset Recovery.
        match self
            .transport
            .bulk_out(self.endpoints.bulk_out, &cbw.encode(), timeout)
        {
            Ok(CBW_LEN) => {}
            Ok(sent) => {
                return Err(self.recover_with(
                    command,
                    StorageError::BadResponse {
                        command,
                        what: format!("the device took {sent} of the {CBW_LEN} CBW bytes"),
                    },
                ));
            }
            Err(source) => return Err(self.transfer_failed(command, PHASE_CBW, source, timeout)),
        }

        // Data transport (§5.3.2, §6.7): a stall ends the data stage early; the host
        // clears it and goes on to the status stage.
        let mut transferred = 0;
        let mut data_stalled = false;
        let mut overrun = None;
        match &mut data {
            DataStage::None => {}
            DataStage::In(buf) => match self.read_data(command, buf, timeout)? {
                Some(DataIn::Received(count)) => transferred = count,
                Some(DataIn::Overrun(count)) => {
                    transferred = buf.len();
                    overrun = Some(count);
                }
                None => {
                    data_stalled = true;
                    self.clear_halt(command, self.endpoints.bulk_in)?;
                }
            },
            DataStage::Out(bytes) => {
                match self
                    .transport
                    .bulk_out(self.endpoints.bulk_out, bytes, timeout)
                {
                    Ok(count) => transferred = count.min(bytes.len()),
                    Err(TransferError::Stall) => {
                        data_stalled = true;
                        self.clear_halt(command, self.endpoints.bulk_out)?;
                    }
                    Err(source) => {
                        return Err(self.transfer_failed(command, PHASE_DATA_OUT, source, timeout))
                    }
                }
            }
        }

        // Status transport (§5.3.3): a stall on the CSW is cleared and the CSW read once more.
        let raw = match self.read_status(command, timeout)? {
            Some(raw) => raw,
            None => {
                self.clear_halt(command, self.endpoints.bulk_in)?;
                match self.read_status(command, timeout)? {
                    Some(raw) => raw,
                    None => {
                        return Err(self.recover_with(
                            command,
                            StorageError::InvalidStatus {
                                command,
                                reason: "bulk-in stalled twice in the status stage".into(),
                            },
                        ));
                    }
                }
            }
        };
        let csw =
            match CommandStatusWrapper::parse(&raw).and_then(|csw| csw.check(&cbw).map(|()| csw)) {
                Ok(csw) => csw,
                Err(error) => {
                    return Err(self.recover_with(
                        command,
                        StorageError::InvalidStatus {
                            command,
                            reason: error.to_string(),
                        },
                    ));
                }
            };
        if csw.status == CswStatus::PhaseError {
            return Err(self.recover_with(command, StorageError::PhaseError { command }));
        }
        // A device that sent more than asked and then a meaningful CSW is in step; a
        // failed command's padding is harmless, but passed data of the wrong length is
        // not to be trusted.
        if let (Some(count), CswStatus::Passed) = (overrun, csw.status) {
            return Err(StorageError::BadResponse {
                command,
                what: format!("the device sent at least {count} bytes, {expected} were expected"),
            });
        }
        Ok(CommandOutcome {
            status: csw.status,
            residue: csw.residue,
            transferred,
            data_stalled,
        })
    }

    /// Reads the data-in stage into `buf`. `None` when the device stalled it.
    ///
    /// Transfers on the bus are whole packets, so when `buf` is not a whole number of
    /// them a bounce buffer rounded up to one is used. A device may fill it past the
    /// command's length (QEMU pads the data stage of a failed command to the host's
    /// buffer): the excess is dropped and reported as `Overrun`; the CSW then decides
    /// whether the device is still in step.
    fn read_data(
        &self,
        command: &'static str,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<Option<DataIn>> {
        let packet = self.endpoints.max_packet_in.max(1);
        let received = if buf.len() % packet == 0 {
            self.transport
                .bulk_in(self.endpoints.bulk_in, buf, timeout)
                .map(|count| DataIn::Received(count.min(buf.len())))
        } else {
            let mut bounce = vec![0; buf.len().div_ceil(packet) * packet];
            self.transport
                .bulk_in(self.endpoints.bulk_in, &mut bounce, timeout)
                .map(|count| {
                    let kept = count.min(buf.len());
                    buf[..kept].copy_from_slice(&bounce[..kept]);
                    if count > buf.len() {
                        DataIn::Overrun(count)
                    } else {
                        DataIn::Received(count)
                    }
                })
        };
        match received {
            Ok(data) => Ok(Some(data)),
            Err(TransferError::Stall) => Ok(None),
            Err(source) => Err(self.transfer_failed(command, PHASE_DATA_IN, source, timeout)),
        }
    }

    /// Reads what should be the CSW. `None` when bulk-in stalled. The buffer is a whole
    /// packet so that a device still sending data, or a long CSW, is seen as such.
    fn read_status(&self, command: &'static str, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let mut raw = vec![0; self.endpoints.max_packet_in.max(CSW_LEN)];
        match self
            .transport
            .bulk_in(self.endpoints.bulk_in, &mut raw, timeout)
        {
            Ok(count) => {
                raw.truncate(count);
                Ok(Some(raw))
            }
            Err(TransferError::Stall) => Ok(None),
            Err(source) => Err(self.transfer_failed(command, PHASE_CSW, source, timeout)),
        }
    }
}
