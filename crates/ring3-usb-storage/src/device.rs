//! [`MassStorage`]: one logical unit of a USB mass-storage device as a block device.

use std::time::{Duration, Instant};

use ring3_usb::UsbTransport;

use crate::bot::{BotTimeouts, BulkOnly, CswStatus, DataStage};
use crate::error::{Result, StorageError};
use crate::scsi::{self, opcode, Capacity, InquiryData, Sense, SenseKey};
use ring3_usb::BulkEndpoints;

/// The default largest transfer of one command: 128 KiB, what common flash drives and
/// Linux's usb-storage use.
pub const DEFAULT_MAX_TRANSFER_BYTES: usize = 128 * 1024;
/// The largest transfer the driver will put in one command (usbfs caps a single
/// transfer by its memory budget, 16 MiB by default).
pub const MAX_TRANSFER_LIMIT: usize = 8 * 1024 * 1024;

/// How a [`MassStorage`] talks to its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MassStorageOptions {
    /// Timeouts of every bulk transfer and control request.
    pub timeouts: BotTimeouts,
    /// How long [`MassStorage::new`] waits for the unit to become ready (TEST UNIT READY
    /// answered with UNIT ATTENTION or NOT READY, becoming ready).
    pub ready_timeout: Duration,
    /// Requests larger than this are split into several commands (rounded down to whole
    /// blocks, at least one).
    pub max_transfer_bytes: usize,
    /// Timeout of SYNCHRONIZE CACHE, which can take long on a slow medium.
    pub flush_timeout: Duration,
}

impl Default for MassStorageOptions {
    fn default() -> Self {
        Self {
            timeouts: BotTimeouts::default(),
            ready_timeout: Duration::from_secs(20),
            max_transfer_bytes: DEFAULT_MAX_TRANSFER_BYTES,
            flush_timeout: Duration::from_secs(60),
        }
    }
}

/// A logical unit of a USB mass-storage device (Bulk-Only Transport, SCSI transparent
/// command set) as an array of blocks.
///
/// Commands run one at a time (the Bulk-Only Transport has no queueing); the methods take
/// `&self` and serialise internally, so one `MassStorage` may be shared between threads.
#[derive(Debug)]
pub struct MassStorage<T> {
    bot: BulkOnly<T>,
    lun: u8,
    inquiry: InquiryData,
    block_size: u32,
    block_count: u64,
    max_transfer_bytes: usize,
    flush_timeout: Duration,
}

/// Polling interval while the unit becomes ready.
const READY_POLL: Duration = Duration::from_millis(50);

impl<T: UsbTransport> MassStorage<T> {
    /// Opens logical unit `lun` with [`MassStorageOptions::default`].
    ///
    /// Initialisation: Get Max LUN (the LUN must exist), INQUIRY (it must be a
    /// direct-access block device), TEST UNIT READY until ready (answering UNIT
    /// ATTENTION, waiting out NOT READY while it is becoming ready), READ CAPACITY(10),
    /// and READ CAPACITY(16) when the medium is too large for the 10-byte command.
    pub fn new(transport: T, endpoints: BulkEndpoints, lun: u8) -> Result<Self> {
        Self::with_options(transport, endpoints, lun, MassStorageOptions::default())
    }

    /// Opens logical unit `lun` with the given options.
    pub fn with_options(
        transport: T,
        endpoints: BulkEndpoints,
        lun: u8,
        options: MassStorageOptions,
    ) -> Result<Self> {
        if endpoints.bulk_in & 0x80 == 0 || endpoints.bulk_out & 0x80 != 0 {
            return Err(StorageError::InvalidArgument {
                what: format!(
                    "bulk-in {:#04x} must be an IN endpoint (bit 7 set) and bulk-out {:#04x} an OUT \
                     endpoint",
                    endpoints.bulk_in, endpoints.bulk_out
                ),
            });
        }
        let bot = BulkOnly::new(transport, endpoints, options.timeouts);

        // §3.2: the device says how many LUNs it has.
        let max_lun = bot.get_max_lun()?;
        if lun > max_lun {
            return Err(StorageError::NoSuchLun { lun, max_lun });
        }

        // INQUIRY is answered even before the unit is ready (SPC-4 §6.6).
        let inquiry = {
            let mut data = [0; scsi::INQUIRY_LEN];
            let len = data_in(
                &bot,
                lun,
                "INQUIRY",
                &scsi::inquiry(scsi::INQUIRY_LEN as u8),
                &mut data,
            )?;
            InquiryData::parse(&data[..len]).map_err(|what| StorageError::BadResponse {
                command: "INQUIRY",
                what,
            })?
        };
        if !inquiry.is_block_device() {
            return Err(StorageError::NotBlockDevice {
                lun,
                qualifier: inquiry.peripheral_qualifier,
                device_type: inquiry.peripheral_device_type,
            });
        }

        wait_until_ready(&bot, lun, options.ready_timeout)?;
        let (block_size, block_count) = read_capacity(&bot, lun)?;

        let mut storage = Self {
            bot,
            lun,
            inquiry,
            block_size,
            block_count,
            max_transfer_bytes: DEFAULT_MAX_TRANSFER_BYTES,
            flush_timeout: options.flush_timeout,
        };
        storage.set_max_transfer_bytes(options.max_transfer_bytes);
        tracing::debug!(
            lun,
            vendor = storage.inquiry.vendor,
            product = storage.inquiry.product,
            block_size,
            block_count,
            "mass storage ready"
        );
        Ok(storage)
    }

    /// The logical block size in bytes (a power of two, 512 to 65536).
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The number of logical blocks (at least 1).
    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    /// The size of the medium in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        // Checked when the capacity was read.
        self.block_count.saturating_mul(u64::from(self.block_size))
    }

    /// What the device said about itself in INQUIRY.
    pub fn inquiry(&self) -> &InquiryData {
        &self.inquiry
    }

    /// The logical unit in use.
    pub fn lun(&self) -> u8 {
        self.lun
    }

    /// The largest transfer of one command; larger requests are split.
    pub fn max_transfer_bytes(&self) -> usize {
        self.max_transfer_bytes
    }

    /// Sets the largest transfer of one command, rounded down to whole blocks and kept
    /// between one block and [`MAX_TRANSFER_LIMIT`]. Returns the value in effect.
    pub fn set_max_transfer_bytes(&mut self, bytes: usize) -> usize {
        let block = self.block_size as usize;
        let bytes = bytes.clamp(block, MAX_TRANSFER_LIMIT.max(block));
        self.max_transfer_bytes = bytes / block * block;
        self.max_transfer_bytes
    }

    /// The Bulk-Only layer, for class requests and raw commands.
    pub fn bulk_only(&self) -> &BulkOnly<T> {
        &self.bot
    }

    /// The transport underneath.
    pub fn transport(&self) -> &T {
        self.bot.transport()
    }

    /// Gives the transport back.
    pub fn into_transport(self) -> T {
        self.bot.into_transport()
    }

    /// Checks that `len` bytes at `lba` are whole blocks inside the medium; returns the
    /// number of blocks.
    fn check_request(&self, operation: &str, lba: u64, len: usize) -> Result<u64> {
        let block = self.block_size as usize;
        if len % block != 0 {
            return Err(StorageError::InvalidArgument {
                what: format!(
                    "{operation} of {len} bytes: the length must be a multiple of the block size \
                     ({block} bytes)"
                ),
            });
        }
        let blocks = (len / block) as u64;
        if lba > self.block_count || blocks > self.block_count - lba {
            return Err(StorageError::OutOfRange {
                lba,
                blocks,
                block_count: self.block_count,
            });
        }
        Ok(blocks)
    }

    /// Reads `buf.len()` bytes (whole blocks) starting at block `lba`.
    pub fn read(&self, lba: u64, buf: &mut [u8]) -> Result<()> {
        self.check_request("read", lba, buf.len())?;
        let block = self.block_size as usize;
        let mut lba = lba;
        for chunk in buf.chunks_mut(self.max_transfer_bytes) {
            let blocks = chunk.len() / block;
            let (command, cdb) = rw_command(opcode::READ_10, opcode::READ_16, lba, blocks);
            retry_unit_attention(|| {
                let outcome = self
                    .bot
                    .execute(command, self.lun, &cdb, DataStage::In(chunk))?;
                finish(&self.bot, self.lun, command, outcome)?;
                expect_all(command, chunk.len(), outcome.transferred, outcome.residue)
            })?;
            lba += blocks as u64;
        }
        Ok(())
    }

    /// Writes `data` (whole blocks) starting at block `lba`. The device may keep the data
    /// in a volatile cache until [`Self::synchronize_cache`].
    pub fn write(&self, lba: u64, data: &[u8]) -> Result<()> {
        self.check_request("write", lba, data.len())?;
        let block = self.block_size as usize;
        let mut lba = lba;
        for chunk in data.chunks(self.max_transfer_bytes) {
            let blocks = chunk.len() / block;
            let (command, cdb) = rw_command(opcode::WRITE_10, opcode::WRITE_16, lba, blocks);
            retry_unit_attention(|| {
                let outcome = self
                    .bot
                    .execute(command, self.lun, &cdb, DataStage::Out(chunk))?;
                finish(&self.bot, self.lun, command, outcome)?;
                expect_all(command, chunk.len(), outcome.transferred, outcome.residue)
            })?;
            lba += blocks as u64;
        }
        Ok(())
    }

    /// SYNCHRONIZE CACHE(10) of the whole medium: what was written is on the medium when
    /// this returns. A device without a cache that rejects the command as unknown
    /// (ILLEGAL REQUEST, invalid operation code) has nothing to flush, which counts as
    /// success.
    pub fn synchronize_cache(&self) -> Result<()> {
        const COMMAND: &str = "SYNCHRONIZE CACHE(10)";
        let cdb = scsi::synchronize_cache_10();
        let result = retry_unit_attention(|| {
            let timeout = self.flush_timeout.max(self.bot.timeouts().command);
            let outcome =
                self.bot
                    .execute_with_timeout(COMMAND, self.lun, &cdb, DataStage::None, timeout)?;
            finish(&self.bot, self.lun, COMMAND, outcome)
        });
        match result {
            Err(StorageError::CommandFailed { sense, .. })
                if sense.key == SenseKey::ILLEGAL_REQUEST && sense.asc == 0x20 =>
            {
                tracing::debug!("the device has no SYNCHRONIZE CACHE; nothing to flush");
                Ok(())
            }
            result => result,
        }
    }

    /// Runs any SCSI command on the logical unit (a pass-through for commands this driver
    /// has no method for): `command` names it in errors, `cdb` is its command block (1 to
    /// 16 bytes), `data` its data stage. Returns how many bytes moved in the data stage.
    /// CHECK CONDITION comes back as [`StorageError::CommandFailed`] with the sense.
    pub fn scsi_command(
        &self,
        command: &'static str,
        cdb: &[u8],
        data: DataStage<'_>,
    ) -> Result<usize> {
        let outcome = self.bot.execute(command, self.lun, cdb, data)?;
        finish(&self.bot, self.lun, command, outcome)?;
        Ok(outcome.transferred)
    }

    /// TEST UNIT READY once: `Ok` when the unit is ready, the sense otherwise.
    pub fn test_unit_ready(&self) -> Result<()> {
        test_unit_ready(&self.bot, self.lun)
    }
}

/// READ/WRITE(10) when the LBA and count fit, else (16).
pub(crate) fn rw_command(op_10: u8, op_16: u8, lba: u64, blocks: usize) -> (&'static str, Vec<u8>) {
    match (u32::try_from(lba), u16::try_from(blocks)) {
        (Ok(lba), Ok(blocks)) => (
            if op_10 == opcode::READ_10 {
                "READ(10)"
            } else {
                "WRITE(10)"
            },
            scsi::rw_10(op_10, lba, blocks).to_vec(),
        ),
        // Requests are at most MAX_TRANSFER_LIMIT bytes, far below u32::MAX blocks.
        _ => (
            if op_16 == opcode::READ_16 {
                "READ(16)"
            } else {
                "WRITE(16)"
            },
            scsi::rw_16(op_16, lba, u32::try_from(blocks).unwrap_or(u32::MAX)).to_vec(),
        ),
    }
}

/// A command that must move all its data: a short transfer or a residue is an error.
fn expect_all(command: &'static str, expected: usize, actual: usize, residue: u32) -> Result<()> {
    if actual != expected || residue != 0 {
        return Err(StorageError::ShortTransfer {
            command,
            expected,
            actual,
            residue,
        });
    }
    Ok(())
}

/// Turns a failed status into the sense the device reports (REQUEST SENSE).
fn finish<T: UsbTransport>(
    bot: &BulkOnly<T>,
    lun: u8,
    command: &'static str,
    outcome: crate::bot::CommandOutcome,
) -> Result<()> {
    match outcome.status {
        CswStatus::Passed => Ok(()),
        // Phase errors come back as errors from `execute`.
        CswStatus::Failed | CswStatus::PhaseError => match request_sense(bot, lun) {
            Ok(sense) => Err(StorageError::CommandFailed { command, sense }),
            Err(error) => Err(StorageError::CommandFailedNoSense {
                command,
                sense_error: Box::new(error),
            }),
        },
    }
}

/// A command with a data-in stage of variable length (INQUIRY, READ CAPACITY, ...):
/// returns how many bytes arrived.
fn data_in<T: UsbTransport>(
    bot: &BulkOnly<T>,
    lun: u8,
    command: &'static str,
    cdb: &[u8],
    buf: &mut [u8],
) -> Result<usize> {
    let outcome = bot.execute(command, lun, cdb, DataStage::In(buf))?;
    finish(bot, lun, command, outcome)?;
    Ok(outcome.transferred)
}

/// REQUEST SENSE (SPC-4 §6.29).
fn request_sense<T: UsbTransport>(bot: &BulkOnly<T>, lun: u8) -> Result<Sense> {
    const COMMAND: &str = "REQUEST SENSE";
    let mut data = [0; scsi::SENSE_LEN];
    let outcome = bot.execute(
        COMMAND,
        lun,
        &scsi::request_sense(scsi::SENSE_LEN as u8),
        DataStage::In(&mut data),
    )?;
    if outcome.status != CswStatus::Passed {
        return Err(StorageError::BadResponse {
            command: COMMAND,
            what: "REQUEST SENSE itself failed".into(),
        });
    }
    Sense::parse(&data[..outcome.transferred]).map_err(|what| StorageError::BadResponse {
        command: COMMAND,
        what,
    })
}

fn test_unit_ready<T: UsbTransport>(bot: &BulkOnly<T>, lun: u8) -> Result<()> {
    const COMMAND: &str = "TEST UNIT READY";
    let outcome = bot.execute(COMMAND, lun, &scsi::test_unit_ready(), DataStage::None)?;
    finish(bot, lun, COMMAND, outcome)
}

/// TEST UNIT READY until the unit is ready: UNIT ATTENTION (power on, reset, medium
/// changed) is reported once and cleared; NOT READY is waited out unless the medium is
/// missing, for at most `timeout`.
fn wait_until_ready<T: UsbTransport>(bot: &BulkOnly<T>, lun: u8, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let sense = match test_unit_ready(bot, lun) {
            Ok(()) => return Ok(()),
            Err(StorageError::CommandFailed { sense, .. }) => sense,
            Err(error) => return Err(error),
        };
        let waited = start.elapsed();
        match sense.key {
            SenseKey::UNIT_ATTENTION | SenseKey::NOT_READY if !sense.medium_not_present() => {
                tracing::debug!(%sense, "waiting for the unit to become ready");
            }
            _ => {
                return Err(StorageError::CommandFailed {
                    command: "TEST UNIT READY",
                    sense,
                })
            }
        }
        if waited >= timeout {
            return Err(StorageError::NotReady {
                waited,
                last_sense: Some(sense),
            });
        }
        if sense.key == SenseKey::NOT_READY {
            std::thread::sleep(READY_POLL.min(timeout - waited));
        }
    }
}

/// READ CAPACITY(10), then (16) when the medium has more than 2^32 - 1 blocks.
fn read_capacity<T: UsbTransport>(bot: &BulkOnly<T>, lun: u8) -> Result<(u32, u64)> {
    let mut data = [0; scsi::READ_CAPACITY_10_LEN];
    let command = "READ CAPACITY(10)";
    let len =
        retry_unit_attention(|| data_in(bot, lun, command, &scsi::read_capacity_10(), &mut data))?;
    let bad = |command, what| StorageError::BadResponse { command, what };
    let mut capacity = scsi::Capacity::parse_10(&data[..len]).map_err(|what| bad(command, what))?;
    let mut command = command;
    if capacity.needs_16() {
        command = "READ CAPACITY(16)";
        let mut data = [0; scsi::READ_CAPACITY_16_LEN];
        let cdb = scsi::read_capacity_16(scsi::READ_CAPACITY_16_LEN as u32);
        let len = retry_unit_attention(|| data_in(bot, lun, command, &cdb, &mut data))?;
        capacity = Capacity::parse_16(&data[..len]).map_err(|what| bad(command, what))?;
    }
    let block_count = capacity.block_count().map_err(|what| bad(command, what))?;
    Ok((capacity.block_size, block_count))
}

/// Runs `f` again once when it failed with UNIT ATTENTION (a reset or medium change
/// the device reports on the next command, not about the command itself).
fn retry_unit_attention<R>(mut f: impl FnMut() -> Result<R>) -> Result<R> {
    match f() {
        Err(StorageError::CommandFailed { sense, .. }) if sense.key == SenseKey::UNIT_ATTENTION => {
            tracing::debug!(%sense, "retrying after unit attention");
            f()
        }
        result => result,
    }
}
