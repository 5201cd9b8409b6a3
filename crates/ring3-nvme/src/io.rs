//! I/O queue pairs: reads, writes, flushes, write zeroes and deallocation.
//!
//! An [`IoQueue`] belongs to one thread and takes no lock on its hot path. Commands are
//! placed in the submission ring by [`IoQueue::read`], [`IoQueue::write`] and friends and
//! reach the controller with one doorbell write at the next [`IoQueue::submit`],
//! [`IoQueue::poll`] or [`IoQueue::wait`], so a batch costs one MMIO store; completions are
//! reaped in batches with one doorbell write as well.
//!
//! **Buffers are owned by the queue while the device may touch them.** A read or write
//! takes its [`DmaBuffer`] by value and the buffer comes back only inside the
//! [`IoCompletion`] of that command, so no code can read, write or free memory the device
//! is still transferring to or from. If the queue is dropped with commands in flight, it
//! waits for them (within the command timeout) and deletes itself on the controller
//! before the buffers go; if the controller cannot confirm that, the buffers and rings
//! are leaked rather than freed.
//!
//! **Nothing from the device is trusted.** Completions are checked by [`QueuePair`]; a
//! completion that breaks the rules, a command that outlives the command timeout, or a
//! controller fatal status resets the controller. The commands in flight then complete
//! with [`Error::ControllerReset`] naming the cause, and the queue creates itself on the
//! controller again and goes on.
//!
//! Completion is by polling (the default) or by an MSI-X interrupt per queue, delivered
//! to an eventfd ([`IoQueueOptions::interrupts`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ring3::{Backend, DmaBuffer, Interrupt};

use crate::command::{io, SubmissionEntry, SUBMISSION_ENTRY_SIZE};
use crate::completion::{CompletionEntry, StatusCodeType, COMPLETION_ENTRY_SIZE};
use crate::controller::{find_namespace, Shared};
use crate::error::{Error, Result};
use crate::namespace::Namespace;
use crate::prp::{self, PRP_ENTRY_SIZE};
use crate::queue::{Backoff, QueuePair};

/// Ranges one Dataset Management command carries at most.
pub const MAX_DEALLOCATE_RANGES: usize = 256;
/// Bytes of one Dataset Management range.
const RANGE_SIZE: usize = 16;
/// With shadow doorbells, after this many empty polls in a row with commands in flight
/// the doorbells are written by MMIO anyway, in case the controller missed a shadow update.
const KICK_AFTER_IDLE_POLLS: u32 = 2048;

/// With shadow doorbells, how long [`IoQueue::wait`] waits without a completion before it
/// writes the doorbells by MMIO anyway. Its polls are spaced by sleeps of up to 1 ms, so
/// [`KICK_AFTER_IDLE_POLLS`] of them would take seconds, past the command timeout.
const KICK_AFTER_IDLE_WAIT: Duration = Duration::from_millis(10);

/// Command-specific status of a queue command naming a queue the controller lacks.
const INVALID_QUEUE_IDENTIFIER: u8 = 0x01;
/// Blocks one read, write or write zeroes command carries at most (NLB is 16 bits).
pub const MAX_BLOCKS_PER_COMMAND: u32 = 1 << 16;

/// How an [`IoQueue`] is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoQueueOptions {
    /// Slots in each ring; one stays empty, so `entries - 1` commands fit in flight.
    /// Limited by CAP.MQES.
    pub entries: u16,
    /// Wait for completions on an MSI-X interrupt instead of polling.
    pub interrupts: bool,
}

impl Default for IoQueueOptions {
    fn default() -> Self {
        IoQueueOptions {
            entries: 256,
            interrupts: false,
        }
    }
}

/// A finished command: its tag, its buffer back, and how it went.
#[derive(Debug)]
pub struct IoCompletion {
    /// The tag the command was submitted with.
    pub tag: u64,
    /// The buffer of a read or write, handed back (`None` for commands without one, or
    /// if the controller could not be stopped and the buffer had to be leaked).
    pub buffer: Option<DmaBuffer>,
    /// Success, or the command's error.
    pub result: Result<()>,
}

/// A command refused before it reached the device, with its buffer handed back.
#[derive(Debug)]
pub struct Rejected {
    /// Why.
    pub error: Error,
    /// The buffer that came with the command.
    pub buffer: Option<DmaBuffer>,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for Rejected {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl From<Rejected> for Error {
    fn from(rejected: Rejected) -> Self {
        rejected.error
    }
}

/// What the queue remembers of a command in flight.
#[derive(Debug, Default)]
struct Slot {
    opcode: u8,
    tag: u64,
    buffer: Option<DmaBuffer>,
    nsid: u32,
    lba: u64,
    blocks: u32,
}

/// Counters of one queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// Commands submitted.
    pub submitted: u64,
    /// Commands completed (successfully or not).
    pub completed: u64,
    /// Commands that completed with an error.
    pub failed: u64,
    /// Submission doorbell writes.
    pub sq_doorbells: u64,
    /// Controller resets this queue went through.
    pub resets: u64,
    /// Doorbells written by MMIO after a long wait, although the shadows said not to.
    pub kicks: u64,
    /// Doorbell writes (submission and completion) that reached the device by MMIO.
    pub mmio_doorbells: u64,
    /// Polls that found no completion while commands were in flight: time spent waiting
    /// for the device rather than working.
    pub empty_polls: u64,
}

/// One I/O submission and completion queue pair, owned by one thread.
pub struct IoQueue<B: Backend> {
    shared: Arc<Shared<B>>,
    namespaces: Arc<[Namespace]>,
    pair: QueuePair,
    slots: Vec<Slot>,
    /// One page per command slot, for its PRP list or its deallocate ranges.
    lists: DmaBuffer,
    interrupt: Option<(u16, Interrupt)>,
    generation: u64,
    /// Set once the controller is out of service: every call fails.
    dead: Option<String>,
    /// Whether the controller has this queue (Create I/O SQ succeeded in this generation).
    on_controller: bool,
    /// Completions produced by a reset, handed out at the next poll.
    failed: Vec<IoCompletion>,
    max_transfer: usize,
    stats: QueueStats,
    /// Polls in a row that found nothing while commands were in flight.
    idle_polls: u32,
}

impl<B: Backend> std::fmt::Debug for IoQueue<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoQueue")
            .field("pair", &self.pair)
            .field(
                "interrupt",
                &self.interrupt.as_ref().map(|(vector, _)| vector),
            )
            .field("stats", &self.stats)
            .finish()
    }
}

impl<B: Backend> IoQueue<B> {
    pub(crate) fn create(
        shared: Arc<Shared<B>>,
        namespaces: Arc<[Namespace]>,
        max_transfer: usize,
        options: IoQueueOptions,
    ) -> Result<Self> {
        let limit = shared.cap.max_queue_entries();
        if options.entries < 2 || u32::from(options.entries) > limit {
            return Err(Error::InvalidArgument {
                what: format!(
                    "{} queue entries: this controller allows 2 to {limit} (CAP.MQES)",
                    options.entries
                ),
            });
        }
        let id = shared.allocate_queue_id()?;
        let interrupt = if options.interrupts {
            match shared.allocate_vector() {
                Ok(vector) => Some(vector),
                Err(error) => {
                    shared.release_queue_id(id);
                    return Err(error);
                }
            }
        } else {
            None
        };
        let release = |shared: &Shared<B>| {
            shared.release_queue_id(id);
            if let Some((vector, _)) = &interrupt {
                shared.release_vector(*vector);
            }
        };
        // A polled queue gets a completion ring larger than its submission ring (as far as
        // CAP.MQES allows), so it can tell the controller about consumed completions every
        // few dozen instead of every time: the MMIO write per I/O that this saves is one of
        // the two an emulated controller costs.
        let cq_entries = if options.interrupts {
            options.entries
        } else {
            let entries = u32::from(options.entries);
            (entries * 2).max(entries + 64).min(limit).min(4096) as u16
        };
        let built = (|| {
            let slots = usize::from(options.entries);
            let sq = shared.dma_alloc(slots * SUBMISSION_ENTRY_SIZE)?;
            let cq = shared.dma_alloc(usize::from(cq_entries) * COMPLETION_ENTRY_SIZE)?;
            let pair = QueuePair::with_completion_entries(
                id,
                options.entries,
                cq_entries,
                sq,
                cq,
                shared.bar.clone(),
                shared.stride_shift,
            )?;
            let lists = shared.dma_alloc(slots << shared.page_shift)?;
            Ok::<_, Error>((pair, lists))
        })();
        let (pair, lists) = match built {
            Ok(parts) => parts,
            Err(error) => {
                release(&shared);
                return Err(error);
            }
        };
        let generation = shared.generation();
        let mut pair = pair;
        if let Some(shadow) = shared.shadow_doorbells() {
            if let Err(error) = pair.use_shadow_doorbells(shadow, false) {
                release(&shared);
                return Err(error);
            }
        }
        let mut queue = IoQueue {
            slots: (0..options.entries).map(|_| Slot::default()).collect(),
            shared,
            namespaces,
            pair,
            lists,
            interrupt,
            generation,
            dead: None,
            on_controller: false,
            failed: Vec::new(),
            max_transfer,
            stats: QueueStats::default(),
            idle_polls: 0,
        };
        // On failure, Drop gives the ID and vector back (nothing is in flight yet).
        queue.create_on_controller()?;
        Ok(queue)
    }

    /// Create I/O CQ, then Create I/O SQ (a submission queue names its completion queue,
    /// which must exist first).
    fn create_on_controller(&mut self) -> Result<()> {
        self.on_controller = false;
        let id = self.pair.id();
        let entries = self.pair.entries();
        let vector = self.interrupt.as_ref().map(|(vector, _)| *vector);
        let create_cq = SubmissionEntry::create_io_cq(
            id,
            self.pair.completion_entries(),
            self.pair.cq_iova(),
            vector,
        );
        let create_sq = SubmissionEntry::create_io_sq(id, entries, self.pair.sq_iova(), id);
        for entry in [create_cq, create_sq] {
            match self.shared.admin_in_generation(self.generation, entry)? {
                Some(_) => {}
                None => {
                    return Err(Error::ControllerReset {
                        reason: "the controller was reset while the queue was being created".into(),
                    })
                }
            }
        }
        self.on_controller = true;
        Ok(())
    }

    /// The queue ID on the controller (1 and up).
    pub fn id(&self) -> u16 {
        self.pair.id()
    }

    /// How many commands fit in flight at once.
    pub fn depth(&self) -> usize {
        usize::from(self.pair.entries()) - 1
    }

    /// Commands submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.pair.in_flight()
    }

    /// Whether another command fits now.
    pub fn has_room(&self) -> bool {
        self.pair.has_room()
    }

    /// The largest read or write, in bytes.
    pub fn max_transfer_bytes(&self) -> usize {
        self.max_transfer
    }

    /// The interrupt vector, if completions are signalled by interrupt.
    pub fn interrupt_vector(&self) -> Option<u16> {
        self.interrupt.as_ref().map(|(vector, _)| *vector)
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        QueueStats {
            mmio_doorbells: self.pair.mmio_doorbell_writes(),
            ..self.stats
        }
    }

    /// Whether doorbells go through shadow doorbells (fewer MMIO writes).
    pub fn uses_shadow_doorbells(&self) -> bool {
        self.pair.uses_shadow_doorbells()
    }

    /// The active namespace `nsid`.
    pub fn namespace(&self, nsid: u32) -> Result<&Namespace> {
        find_namespace(&self.namespaces, nsid)
    }

    fn queue_full(&self) -> Error {
        Error::QueueFull {
            queue_id: self.pair.id(),
            entries: self.pair.entries(),
        }
    }

    /// A DMA buffer for reads and writes on this queue's controller.
    pub fn alloc_buffer(&self, len: usize) -> Result<DmaBuffer> {
        self.shared.dma_alloc(len)
    }

    fn usable(&mut self) -> Result<()> {
        if self.generation != self.shared.generation() {
            self.recover();
        }
        match &self.dead {
            Some(reason) => Err(Error::ControllerFailed {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Checks the namespace, the block count and the queue's room for a command.
    fn check(&mut self, nsid: u32, blocks: u32) -> Result<u8> {
        self.usable()?;
        let ns = self.namespace(nsid)?;
        if ns.metadata_size != 0 {
            return Err(Error::InvalidArgument {
                what: format!(
                    "namespace {nsid} is formatted with {} bytes of metadata per block, \
                     which this driver does not move",
                    ns.metadata_size
                ),
            });
        }
        let shift = ns.block_shift;
        if blocks == 0 || blocks > MAX_BLOCKS_PER_COMMAND {
            return Err(Error::InvalidArgument {
                what: format!("{blocks} blocks: one command carries 1 to {MAX_BLOCKS_PER_COMMAND}"),
            });
        }
        if !self.pair.has_room() {
            return Err(self.queue_full());
        }
        Ok(shift)
    }

    /// Places a read of `blocks` logical blocks at `lba` of namespace `nsid` into
    /// `buffer` (from its start); the buffer comes back in the command's completion.
    pub fn read(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u32,
        buffer: DmaBuffer,
        tag: u64,
    ) -> std::result::Result<(), Rejected> {
        self.transfer(io::READ, nsid, lba, blocks, buffer, tag)
    }

    /// Places a write of `blocks` logical blocks at `lba` of namespace `nsid` from
    /// `buffer` (from its start); the buffer comes back in the command's completion.
    pub fn write(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u32,
        buffer: DmaBuffer,
        tag: u64,
    ) -> std::result::Result<(), Rejected> {
        self.transfer(io::WRITE, nsid, lba, blocks, buffer, tag)
    }

    fn transfer(
        &mut self,
        opcode: u8,
        nsid: u32,
        lba: u64,
        blocks: u32,
        buffer: DmaBuffer,
        tag: u64,
    ) -> std::result::Result<(), Rejected> {
        match self.try_transfer(opcode, nsid, lba, blocks, &buffer) {
            Ok(entry) => self.push(entry, tag, Some(buffer), nsid, lba, blocks),
            Err(error) => Err(Rejected {
                error,
                buffer: Some(buffer),
            }),
        }
    }

    /// Everything about a read or write but placing it: checks and the data pointer.
    fn try_transfer(
        &mut self,
        opcode: u8,
        nsid: u32,
        lba: u64,
        blocks: u32,
        buffer: &DmaBuffer,
    ) -> Result<SubmissionEntry> {
        let shift = self.check(nsid, blocks)?;
        let len = (blocks as usize) << shift;
        if len > buffer.len() || len > self.max_transfer {
            return Err(Error::InvalidArgument {
                what: format!(
                    "{} of {blocks} blocks ({len} bytes): the buffer holds {} bytes and one \
                     command moves at most {} bytes",
                    io::name(opcode),
                    buffer.len(),
                    self.max_transfer
                ),
            });
        }
        let list_offset = self.next_list_offset()?;
        let lists = &self.lists;
        let pointer = prp::layout(
            buffer.iova(),
            len,
            self.shared.page_shift,
            lists.iova() + list_offset as u64,
            |index, address| {
                // In bounds: `layout` writes at most one page of entries.
                let _ = lists.write(list_offset + index * PRP_ENTRY_SIZE, &address.to_le_bytes());
            },
        )?;
        Ok(SubmissionEntry::read_write(opcode, nsid, lba, blocks)
            .with_prp1(pointer.prp1)
            .with_prp2(pointer.prp2))
    }

    /// The list page of the command about to be pushed: each command ID has its own page,
    /// and an ID is handed out again only after its command completed.
    fn next_list_offset(&self) -> Result<usize> {
        match self.pair.next_command_id() {
            Some(command_id) => Ok(usize::from(command_id) << self.shared.page_shift),
            None => Err(self.queue_full()),
        }
    }

    /// Places a Flush of namespace `nsid` (`u32::MAX`: all namespaces).
    pub fn flush(&mut self, nsid: u32, tag: u64) -> Result<()> {
        self.usable()?;
        if nsid != u32::MAX {
            self.namespace(nsid)?;
        }
        self.push(SubmissionEntry::flush(nsid), tag, None, nsid, 0, 0)
            .map_err(Error::from)
    }

    /// Places a Write Zeroes of `blocks` blocks at `lba`.
    pub fn write_zeroes(&mut self, nsid: u32, lba: u64, blocks: u32, tag: u64) -> Result<()> {
        self.check(nsid, blocks)?;
        let entry = SubmissionEntry::write_zeroes(nsid, lba, blocks);
        self.push(entry, tag, None, nsid, lba, blocks)
            .map_err(Error::from)
    }

    /// Places a Dataset Management command deallocating `ranges` of (first LBA, blocks):
    /// afterwards the blocks read back as zeroes on namespaces that say so
    /// ([`Namespace::deallocated_reads_zeroes`]).
    pub fn deallocate(&mut self, nsid: u32, ranges: &[(u64, u32)], tag: u64) -> Result<()> {
        self.usable()?;
        self.namespace(nsid)?;
        if ranges.is_empty() || ranges.len() > MAX_DEALLOCATE_RANGES {
            return Err(Error::InvalidArgument {
                what: format!(
                    "{} ranges: one deallocate carries 1 to {MAX_DEALLOCATE_RANGES}",
                    ranges.len()
                ),
            });
        }
        if !self.pair.has_room() {
            return Err(self.queue_full());
        }
        // The range list goes in the command's list page (256 × 16 bytes fit any page).
        let offset = self.next_list_offset()?;
        let mut list = vec![0u8; ranges.len() * RANGE_SIZE];
        for (range, &(lba, blocks)) in list.chunks_exact_mut(RANGE_SIZE).zip(ranges) {
            range[4..8].copy_from_slice(&blocks.to_le_bytes());
            range[8..16].copy_from_slice(&lba.to_le_bytes());
        }
        self.lists.write(offset, &list)?;
        let entry = SubmissionEntry::deallocate(nsid, ranges.len() as u16)
            .with_prp1(self.lists.iova() + offset as u64);
        let first = ranges.first().map_or(0, |range| range.0);
        let blocks = ranges
            .iter()
            .fold(0u32, |sum, range| sum.saturating_add(range.1));
        self.push(entry, tag, None, nsid, first, blocks)
            .map_err(Error::from)
    }

    fn push(
        &mut self,
        entry: SubmissionEntry,
        tag: u64,
        buffer: Option<DmaBuffer>,
        nsid: u32,
        lba: u64,
        blocks: u32,
    ) -> std::result::Result<(), Rejected> {
        match self.pair.push(entry) {
            Ok(command_id) => {
                self.slots[usize::from(command_id)] = Slot {
                    opcode: entry.opcode(),
                    tag,
                    buffer,
                    nsid,
                    lba,
                    blocks,
                };
                self.stats.submitted += 1;
                Ok(())
            }
            Err(error) => Err(Rejected { error, buffer }),
        }
    }

    /// Sends the commands placed since the last call to the controller (one doorbell
    /// write).
    pub fn submit(&mut self) -> Result<()> {
        self.usable()?;
        self.ring()
    }

    fn ring(&mut self) -> Result<()> {
        let before = self.pair.in_flight();
        self.pair.ring_submissions()?;
        if before > 0 {
            self.stats.sq_doorbells += 1;
        }
        Ok(())
    }

    /// Sends pending commands, then moves every completion the controller has posted into
    /// `out`; returns how many were added. Never blocks.
    pub fn poll(&mut self, out: &mut Vec<IoCompletion>) -> Result<usize> {
        let before = out.len();
        if self.generation != self.shared.generation() {
            self.recover();
        }
        out.append(&mut self.failed);
        if self.dead.is_some() {
            return Ok(out.len() - before);
        }
        if let Err(error) = self.ring() {
            self.fail_all(&error);
            out.append(&mut self.failed);
            return Ok(out.len() - before);
        }
        let taken_before = out.len();
        loop {
            match self.pair.take() {
                Ok(Some(entry)) => out.push(self.complete(&entry)),
                Ok(None) => break,
                Err(error) => {
                    // A completion broke the rules: the rings can no longer be trusted.
                    self.fail_all(&error);
                    out.append(&mut self.failed);
                    return Ok(out.len() - before);
                }
            }
        }
        if out.len() > taken_before || self.pair.in_flight() == 0 {
            self.idle_polls = 0;
        } else {
            self.stats.empty_polls += 1;
            if self.pair.uses_shadow_doorbells() {
                self.idle_polls += 1;
                if self.idle_polls >= KICK_AFTER_IDLE_POLLS {
                    self.idle_polls = 0;
                    self.stats.kicks += 1;
                    if let Err(error) = self.pair.kick() {
                        self.fail_all(&error);
                        out.append(&mut self.failed);
                        return Ok(out.len() - before);
                    }
                }
            }
        }
        // A polled queue reports consumed completions in batches; with interrupts, every
        // time (the controller may hold back the next interrupt until the head moves).
        let rung = if self.interrupt.is_some() {
            self.pair.ring_completions()
        } else {
            self.pair.ring_completions_lazily()
        };
        if let Err(error) = rung {
            self.fail_all(&error);
            out.append(&mut self.failed);
        }
        Ok(out.len() - before)
    }

    fn complete(&mut self, entry: &CompletionEntry) -> IoCompletion {
        let slot = std::mem::take(&mut self.slots[usize::from(entry.command_id)]);
        self.stats.completed += 1;
        let result = if entry.status.is_success() {
            Ok(())
        } else {
            self.stats.failed += 1;
            Err(Error::IoFailed {
                command: io::name(slot.opcode),
                nsid: slot.nsid,
                lba: slot.lba,
                blocks: slot.blocks,
                status: entry.status,
            })
        };
        IoCompletion {
            tag: slot.tag,
            buffer: slot.buffer,
            result,
        }
    }

    /// Sends pending commands and waits until at least one completion is in `out`, or
    /// nothing is in flight. If no command completes within the command timeout, the
    /// controller is reset and the commands in flight complete with the reason.
    pub fn wait(&mut self, out: &mut Vec<IoCompletion>) -> Result<usize> {
        let mut added = self.poll(out)?;
        if added > 0 || self.pair.in_flight() == 0 {
            return Ok(added);
        }
        let start = Instant::now();
        let mut last_kick = start;
        let mut backoff = Backoff::new();
        loop {
            match &self.interrupt {
                Some((_, interrupt)) => {
                    let slice = self.shared.command_timeout.min(Duration::from_millis(10));
                    match interrupt.wait(slice) {
                        Ok(_) => {}
                        Err(ring3::Error::Timeout { .. }) => {
                            // Nothing for a while: make sure the controller saw the
                            // doorbells, whatever the shadows said.
                            if self.pair.uses_shadow_doorbells() {
                                self.stats.kicks += 1;
                                self.pair.kick()?;
                            }
                        }
                        Err(error) => return Err(error.into()),
                    }
                }
                None => {
                    backoff.pause();
                    if self.pair.uses_shadow_doorbells()
                        && last_kick.elapsed() >= KICK_AFTER_IDLE_WAIT
                    {
                        last_kick = Instant::now();
                        self.stats.kicks += 1;
                        self.pair.kick()?;
                    }
                }
            }
            added += self.poll(out)?;
            if added > 0 || self.pair.in_flight() == 0 {
                return Ok(added);
            }
            let waited = start.elapsed();
            if waited >= self.shared.command_timeout || self.fatal_check(waited) {
                let error = match self.pair.commands_in_flight().next() {
                    Some((command_id, opcode)) => Error::CommandTimeout {
                        queue_id: self.pair.id(),
                        command_id,
                        opcode,
                        timeout: self.shared.command_timeout,
                    },
                    None => return Ok(added),
                };
                self.fail_all(&error);
                added += self.failed.len();
                out.append(&mut self.failed);
                return Ok(added);
            }
        }
    }

    /// While waiting long, looks at CSTS.CFS every so often (an MMIO read, too slow for
    /// every poll).
    fn fatal_check(&self, waited: Duration) -> bool {
        waited >= Duration::from_millis(100) && self.shared.fatal_status()
    }

    /// Waits for every command in flight; their completions go into `out`.
    pub fn drain(&mut self, out: &mut Vec<IoCompletion>) -> Result<()> {
        self.poll(out)?;
        while self.pair.in_flight() > 0 && self.dead.is_none() {
            self.wait(out)?;
        }
        out.append(&mut self.failed);
        Ok(())
    }

    /// Runs one read to completion and returns the buffer with the data.
    pub fn read_sync(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u32,
        buffer: DmaBuffer,
    ) -> Result<DmaBuffer> {
        self.transfer_sync(io::READ, nsid, lba, blocks, buffer)
    }

    /// Runs one write to completion and returns the buffer.
    pub fn write_sync(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u32,
        buffer: DmaBuffer,
    ) -> Result<DmaBuffer> {
        self.transfer_sync(io::WRITE, nsid, lba, blocks, buffer)
    }

    fn transfer_sync(
        &mut self,
        opcode: u8,
        nsid: u32,
        lba: u64,
        blocks: u32,
        buffer: DmaBuffer,
    ) -> Result<DmaBuffer> {
        self.transfer(opcode, nsid, lba, blocks, buffer, 0)?;
        self.run_one()?.ok_or_else(|| Error::ControllerFailed {
            reason: "the controller could not be stopped, so the buffer was given up".into(),
        })
    }

    /// Waits for the one command placed last (nothing else may be in flight).
    pub fn run_one(&mut self) -> Result<Option<DmaBuffer>> {
        let mut out = Vec::with_capacity(1);
        self.drain(&mut out)?;
        let mut buffer = None;
        let mut first_error = None;
        for completion in out {
            if let Err(error) = completion.result {
                first_error.get_or_insert(error);
            }
            buffer = buffer.or(completion.buffer);
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(buffer),
        }
    }

    /// A command went wrong in a way that leaves the queue's state unknown: reset the
    /// controller (unless someone did already) and fail what was in flight.
    fn fail_all(&mut self, error: &Error) {
        let reason = self.shared.fatal_reason(error);
        let _ = self.shared.reset(self.generation, &reason);
        self.recover();
    }

    /// After a reset: fail the commands in flight, hand their buffers back, and create the
    /// queue on the controller again.
    fn recover(&mut self) {
        let (reason, came_back) = self
            .shared
            .last_reset()
            .unwrap_or_else(|| ("the controller was reset".into(), true));
        let lost = self.pair.reset();
        for (command_id, _) in lost {
            let slot = std::mem::take(&mut self.slots[usize::from(command_id)]);
            let buffer = if came_back {
                // The controller went through CC.EN = 0 and CSTS.RDY = 0: it has dropped
                // the command and will not touch the buffer again.
                slot.buffer
            } else {
                // Not known to have stopped: the device may still write there.
                if let Some(mut buffer) = slot.buffer {
                    buffer.leak();
                }
                None
            };
            self.stats.completed += 1;
            self.stats.failed += 1;
            self.failed.push(IoCompletion {
                tag: slot.tag,
                buffer,
                result: Err(Error::ControllerReset {
                    reason: reason.clone(),
                }),
            });
        }
        self.stats.resets += 1;
        self.generation = self.shared.generation();
        if !came_back {
            self.dead = Some(reason);
            return;
        }
        let shadow = match self.shared.shadow_doorbells() {
            Some(shadow) => self.pair.use_shadow_doorbells(shadow, false),
            None => Ok(()),
        };
        if let Err(error) = shadow.and_then(|()| self.create_on_controller()) {
            self.dead = Some(format!(
                "{reason}; recreating queue {} failed: {error}",
                self.pair.id()
            ));
        }
    }
}

impl<B: Backend> Drop for IoQueue<B> {
    fn drop(&mut self) {
        let id = self.pair.id();
        if self.generation != self.shared.generation() {
            self.recover();
        }
        let mut stopped = self.dead.is_none();
        if stopped && self.on_controller {
            if self.pair.in_flight() > 0 {
                let mut out = Vec::new();
                let _ = self.drain(&mut out);
            }
            // Delete the SQ first (a CQ with an SQ attached cannot be deleted); once that
            // completes, the controller has finished or aborted every command of it.
            for completion in [false, true] {
                let entry = SubmissionEntry::delete_io_queue(id, completion);
                match self.shared.admin_in_generation(self.generation, entry) {
                    // Done, or a reset since made the controller forget the queue.
                    Ok(_) => {}
                    // The controller says it has no such queue: nothing of it is in use.
                    Err(Error::CommandFailed { status, .. })
                        if status.code_type == StatusCodeType::CommandSpecific
                            && status.code == INVALID_QUEUE_IDENTIFIER => {}
                    Err(error) => {
                        tracing::warn!(address = self.shared.backend.address(), queue = id, %error, "could not delete the I/O queue");
                        // A reset that came back also makes the controller forget it.
                        stopped = self.generation != self.shared.generation()
                            && self
                                .shared
                                .last_reset()
                                .is_some_and(|(_, came_back)| came_back);
                        break;
                    }
                }
            }
        }
        if !stopped {
            // The controller may still own the rings and the buffers in flight: leak them.
            for slot in &mut self.slots {
                if let Some(buffer) = &mut slot.buffer {
                    buffer.leak();
                }
            }
            self.lists.leak();
            self.pair.leak_rings();
        }
        self.shared.release_queue_id(id);
        if let Some((vector, _)) = &self.interrupt {
            self.shared.release_vector(*vector);
        }
    }
}
