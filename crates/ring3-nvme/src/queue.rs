//! A submission/completion queue pair (NVMe Base 2.0, 3.3 "NVM Queue Models" and 4.1
//! "Submission Queue and Completion Queue Definition").
//!
//! Both rings live in [`DmaBuffer`]s. The driver writes submission entries at the SQ tail
//! and tells the controller the new tail through the SQ tail doorbell; the controller
//! writes completion entries at the CQ tail with the current phase tag and the driver
//! finds them by the phase flipping, consumes them at its CQ head and tells the controller
//! through the CQ head doorbell. The phase the driver expects starts at 1 (the ring is
//! zeroed) and flips at every wrap.
//!
//! Nothing in a completion is trusted: the SQ ID must be this pair's, the command ID must
//! belong to a command in flight, and the SQ head must lie between the last one reported
//! and the tail. A completion that breaks these rules is an [`Error::Misbehaved`] and
//! leaves the pair unusable ([`Error::QueueBroken`]) until the controller is reset,
//! because the rings' positions can no longer be known.
//!
//! The pair belongs to one thread (`&mut self`): there are no locks on this path.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring3::{Bar, DmaBuffer};

use crate::command::{SubmissionEntry, SUBMISSION_ENTRY_SIZE};
use crate::completion::{CompletionEntry, COMPLETION_ENTRY_SIZE, STATUS_OFFSET};
use crate::error::{Error, Result};
use crate::registers::{doorbell_offset, DOORBELL_BASE};

/// Shadow doorbells (NVMe Base 2.0, 5.9 "Doorbell Buffer Config"): one page where the
/// host writes the doorbell values, and one where the controller writes, per doorbell, the
/// value after which it wants an MMIO write again (its event index). While the controller
/// is busy with a queue it reads new tails from memory, so most doorbell MMIO writes,
/// which are slow on emulated and virtualised controllers, go away.
#[derive(Debug, Clone)]
pub struct ShadowDoorbells {
    shadow: Arc<DmaBuffer>,
    event_index: Arc<DmaBuffer>,
}

impl ShadowDoorbells {
    /// The two pages (zeroed here), to hand to the controller with Doorbell Buffer Config.
    pub fn new(shadow: DmaBuffer, event_index: DmaBuffer) -> Self {
        shadow.fill(0);
        event_index.fill(0);
        ShadowDoorbells {
            shadow: Arc::new(shadow),
            event_index: Arc::new(event_index),
        }
    }

    /// IOVA of the shadow doorbell page (PRP1 of Doorbell Buffer Config).
    pub fn shadow_iova(&self) -> u64 {
        self.shadow.iova()
    }

    /// IOVA of the event index page (PRP2).
    pub fn event_index_iova(&self) -> u64 {
        self.event_index.iova()
    }

    /// Zeroes both pages (before configuring them again after a reset).
    pub fn clear(&self) {
        self.shadow.fill(0);
        self.event_index.fill(0);
    }

    /// Writes `value` to the shadow of the doorbell at BAR offset `doorbell` and says
    /// whether the controller asked for an MMIO write to see it: the event index lies in
    /// `old..new` (modulo 2^16, as the specification and Linux compare them).
    fn update(&self, doorbell: usize, old: u16, new: u16) -> Result<bool> {
        let at = doorbell - DOORBELL_BASE;
        self.shadow.write_volatile(at, u32::from(new))?;
        // The shadow value must be visible before the event index is read, or the
        // controller may finish, publish an old event index, and never see this value.
        fence(Ordering::SeqCst);
        let event: u32 = self.event_index.read_volatile(at)?;
        let event = event as u16;
        Ok(new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old))
    }

    /// Writes `value` to the shadow of the doorbell at BAR offset `doorbell`, without
    /// looking at the event index.
    fn store(&self, doorbell: usize, value: u16) -> Result<()> {
        self.shadow
            .write_volatile(doorbell - DOORBELL_BASE, u32::from(value))?;
        Ok(())
    }

    /// Sets the shadow of a doorbell to `value`, the value last written to the doorbell
    /// (0 for a new queue), and its event index to 0.
    fn reset_slot(&self, doorbell: usize, value: u16) -> Result<()> {
        let at = doorbell - DOORBELL_BASE;
        self.shadow.write_volatile(at, u32::from(value))?;
        self.event_index.write_volatile(at, 0u32)?;
        Ok(())
    }

    fn covers(&self, doorbell: usize) -> bool {
        doorbell
            .checked_sub(DOORBELL_BASE)
            .is_some_and(|at| at + 4 <= self.shadow.len() && at + 4 <= self.event_index.len())
    }
}

/// Sleeps a little longer each round, so short waits stay short and long ones stay cheap.
pub(crate) struct Backoff {
    spins: u32,
    sleep: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff {
            spins: 0,
            sleep: Duration::from_micros(1),
        }
    }

    pub(crate) fn pause(&mut self) {
        if self.spins < 64 {
            self.spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::sleep(self.sleep);
            self.sleep = (self.sleep * 2).min(Duration::from_millis(1));
        }
    }
}

/// One submission queue and the completion queue its completions go to.
pub struct QueuePair {
    id: u16,
    entries: u16,
    sq: DmaBuffer,
    cq: DmaBuffer,
    bar: Bar,
    sq_doorbell: usize,
    cq_doorbell: usize,
    sq_tail: u16,
    /// The SQ tail and CQ head last written to the doorbells.
    sq_rung: u16,
    cq_rung: u16,
    /// The SQ head the controller last reported: slots from here to the tail are its.
    sq_head: u16,
    cq_head: u16,
    /// Slots in the completion ring (at least `entries`).
    cq_entries: u16,
    /// Completions taken since the head doorbell was last written.
    cq_unreported: u16,
    /// With a completion ring larger than the submission ring, the head doorbell may wait
    /// until this many completions were taken (see [`QueuePair::ring_completions_lazily`]).
    cq_slack: u16,
    /// The phase tag a new completion carries in the current lap.
    phase: bool,
    /// The opcode of each command in flight, indexed by command ID.
    in_flight: Vec<Option<u8>>,
    free_ids: Vec<u16>,
    completion_laps: u64,
    broken: bool,
    sq_doorbell_due: bool,
    cq_doorbell_due: bool,
    /// Shadow doorbells, and whether MMIO is written every time anyway (the admin queue,
    /// whose shadow only some controllers read).
    shadow: Option<(ShadowDoorbells, bool)>,
    /// Doorbell writes that went to the device by MMIO.
    mmio_writes: u64,
}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("id", &self.id)
            .field("entries", &self.entries)
            .field("sq_tail", &self.sq_tail)
            .field("sq_head", &self.sq_head)
            .field("cq_head", &self.cq_head)
            .field("phase", &self.phase)
            .field("in_flight", &self.in_flight())
            .field("broken", &self.broken)
            .finish()
    }
}

impl QueuePair {
    /// A pair with ID `id` of `entries` slots each, in the two buffers given (zeroed, at
    /// least `entries` × 64 and `entries` × 16 bytes), ringing the doorbells in `bar` that
    /// stride `4 << stride_shift` gives.
    pub fn new(
        id: u16,
        entries: u16,
        sq: DmaBuffer,
        cq: DmaBuffer,
        bar: Bar,
        stride_shift: u8,
    ) -> Result<Self> {
        Self::with_completion_entries(id, entries, entries, sq, cq, bar, stride_shift)
    }

    /// As [`QueuePair::new`], with a completion ring of `cq_entries` slots (at least
    /// `entries`). A larger completion ring lets the driver tell the controller about
    /// consumed completions in batches: the controller never has more than `entries - 1`
    /// completions to post, so `cq_entries - entries` of them may go unreported.
    pub fn with_completion_entries(
        id: u16,
        entries: u16,
        cq_entries: u16,
        sq: DmaBuffer,
        cq: DmaBuffer,
        bar: Bar,
        stride_shift: u8,
    ) -> Result<Self> {
        if cq_entries < entries {
            return Err(Error::InvalidArgument {
                what: format!(
                    "queue {id}: a completion ring of {cq_entries} entries is smaller than its \
                     submission ring of {entries}"
                ),
            });
        }
        if entries < 2 {
            return Err(Error::InvalidArgument {
                what: format!("queue {id}: {entries} entries; a queue needs at least 2"),
            });
        }
        let slots = usize::from(entries);
        if sq.len() < slots * SUBMISSION_ENTRY_SIZE
            || cq.len() < usize::from(cq_entries) * COMPLETION_ENTRY_SIZE
        {
            return Err(Error::InvalidArgument {
                what: format!(
                    "queue {id}: buffers of {} and {} bytes are too small for {entries} entries",
                    sq.len(),
                    cq.len()
                ),
            });
        }
        let sq_doorbell = doorbell_offset(id, false, stride_shift, bar.len())?;
        let cq_doorbell = doorbell_offset(id, true, stride_shift, bar.len())?;
        // A fresh ring must hold no phase-1 entries, or stale bytes would pass for completions.
        cq.fill(0);
        Ok(QueuePair {
            id,
            entries,
            sq,
            cq,
            bar,
            sq_doorbell,
            cq_doorbell,
            sq_tail: 0,
            sq_rung: 0,
            cq_rung: 0,
            sq_head: 0,
            cq_head: 0,
            cq_entries,
            cq_unreported: 0,
            cq_slack: (cq_entries - entries).max(1),
            phase: true,
            in_flight: vec![None; slots],
            // Popped from the end: IDs are handed out from 0 upwards.
            free_ids: (0..entries).rev().collect(),
            completion_laps: 0,
            broken: false,
            sq_doorbell_due: false,
            cq_doorbell_due: false,
            shadow: None,
            mmio_writes: 0,
        })
    }

    /// The queue ID (0 is the admin queue).
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Slots in the submission ring.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// Slots in the completion ring.
    pub fn completion_entries(&self) -> u16 {
        self.cq_entries
    }

    /// IOVA of the submission ring (for ASQ or Create I/O SQ).
    pub fn sq_iova(&self) -> u64 {
        self.sq.iova()
    }

    /// IOVA of the completion ring (for ACQ or Create I/O CQ).
    pub fn cq_iova(&self) -> u64 {
        self.cq.iova()
    }

    /// Commands submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        usize::from(self.entries) - self.free_ids.len()
    }

    /// How many times the completion head wrapped around (and the phase flipped).
    pub fn completion_laps(&self) -> u64 {
        self.completion_laps
    }

    /// The phase tag the next completion must carry.
    pub fn phase(&self) -> bool {
        self.phase
    }

    /// Whether a misbehaving completion made the pair unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    fn next(&self, index: u16) -> u16 {
        if index + 1 == self.entries {
            0
        } else {
            index + 1
        }
    }

    /// Distance from `from` forward to `to` around the ring.
    fn distance(&self, from: u16, to: u16) -> u16 {
        if to >= from {
            to - from
        } else {
            self.entries - from + to
        }
    }

    /// Places `entry` at the SQ tail with a fresh command ID, rings the doorbell, and
    /// returns the command ID.
    pub fn submit(&mut self, entry: SubmissionEntry) -> Result<u16> {
        let command_id = self.push(entry)?;
        self.ring_submissions()?;
        Ok(command_id)
    }

    /// Uses shadow doorbells from now on (before the queue is created on the controller,
    /// or for the admin queue once Doorbell Buffer Config completed): the shadows start at
    /// the values last written to the doorbells, which the controller may read from them
    /// at any time (0 for a queue not created yet; not 0 for the admin queue, which has
    /// been used). With `always_ring`, every doorbell is also written by MMIO.
    pub fn use_shadow_doorbells(
        &mut self,
        shadow: ShadowDoorbells,
        always_ring: bool,
    ) -> Result<()> {
        if !shadow.covers(self.sq_doorbell) || !shadow.covers(self.cq_doorbell) {
            // Beyond the one page the specification gives the shadows: plain MMIO.
            return Ok(());
        }
        shadow.reset_slot(self.sq_doorbell, self.sq_rung)?;
        shadow.reset_slot(self.cq_doorbell, self.cq_rung)?;
        self.shadow = Some((shadow, always_ring));
        Ok(())
    }

    /// Whether doorbells go through shadows.
    pub fn uses_shadow_doorbells(&self) -> bool {
        self.shadow.is_some()
    }

    /// Writes both doorbells by MMIO whatever the shadows say: a safety net for a
    /// controller that missed an update (the values are the same, so it costs nothing but
    /// the writes).
    pub fn kick(&mut self) -> Result<()> {
        self.bar
            .write32(self.sq_doorbell, u32::from(self.sq_tail))?;
        self.bar
            .write32(self.cq_doorbell, u32::from(self.cq_head))?;
        self.mmio_writes += 2;
        Ok(())
    }

    /// Doorbell writes that reached the device by MMIO so far.
    pub fn mmio_doorbell_writes(&self) -> u64 {
        self.mmio_writes
    }

    /// Writes a doorbell: to its shadow, and by MMIO unless the shadow's event index says
    /// the controller will see it anyway.
    fn write_doorbell(&mut self, doorbell: usize, old: u16, new: u16) -> Result<()> {
        let mmio = match &self.shadow {
            Some((shadow, always)) => shadow.update(doorbell, old, new)? || *always,
            None => true,
        };
        if mmio {
            self.bar.write32(doorbell, u32::from(new))?;
            self.mmio_writes += 1;
        }
        Ok(())
    }

    /// The command ID the next [`QueuePair::push`] will use, if one is free.
    pub fn next_command_id(&self) -> Option<u16> {
        self.free_ids.last().copied()
    }

    /// Gives up the rings' memory for ever, still mapped, for when the controller could not
    /// be made to forget the queue. The pair is broken afterwards.
    pub fn leak_rings(&mut self) {
        self.sq.leak();
        self.cq.leak();
        self.broken = true;
    }

    /// Whether another command fits (a free slot and a free command ID).
    pub fn has_room(&self) -> bool {
        !self.broken && self.next(self.sq_tail) != self.sq_head && !self.free_ids.is_empty()
    }

    /// Places `entry` at the SQ tail with a fresh command ID and returns the ID; the
    /// controller learns of it at the next [`QueuePair::ring_submissions`], so a batch of
    /// commands costs one doorbell write.
    pub fn push(&mut self, entry: SubmissionEntry) -> Result<u16> {
        if self.broken {
            return Err(Error::QueueBroken { queue_id: self.id });
        }
        let next_tail = self.next(self.sq_tail);
        // One slot stays empty: head == tail means empty, so tail + 1 == head means full.
        if next_tail == self.sq_head {
            return Err(Error::QueueFull {
                queue_id: self.id,
                entries: self.entries,
            });
        }
        let Some(command_id) = self.free_ids.pop() else {
            return Err(Error::QueueFull {
                queue_id: self.id,
                entries: self.entries,
            });
        };
        let entry = entry.with_command_id(command_id);
        let slot = usize::from(self.sq_tail) * SUBMISSION_ENTRY_SIZE;
        if let Err(error) = self.sq.write(slot, &entry.to_bytes()) {
            self.free_ids.push(command_id);
            return Err(error.into());
        }
        self.in_flight[usize::from(command_id)] = Some(entry.opcode());
        self.sq_tail = next_tail;
        self.sq_doorbell_due = true;
        Ok(command_id)
    }

    /// Tells the controller about the entries pushed since the last call (one doorbell
    /// write; nothing if there are none).
    pub fn ring_submissions(&mut self) -> Result<()> {
        if !self.sq_doorbell_due {
            return Ok(());
        }
        // The controller fetches entries as soon as it sees the new tail: their bytes in
        // host memory must be visible before the doorbell store reaches it.
        fence(Ordering::Release);
        self.write_doorbell(self.sq_doorbell, self.sq_rung, self.sq_tail)?;
        self.sq_rung = self.sq_tail;
        self.sq_doorbell_due = false;
        Ok(())
    }

    /// Tells the controller how far the completions were consumed (one doorbell write;
    /// nothing if no completion was taken since the last call).
    pub fn ring_completions(&mut self) -> Result<()> {
        if !self.cq_doorbell_due {
            return Ok(());
        }
        // The head doorbell hands slots back to the controller, which may overwrite them at
        // once: our reads of the entries must be complete before that store.
        fence(Ordering::Release);
        self.write_doorbell(self.cq_doorbell, self.cq_rung, self.cq_head)?;
        self.cq_rung = self.cq_head;
        self.cq_doorbell_due = false;
        self.cq_unreported = 0;
        Ok(())
    }

    /// Like [`QueuePair::ring_completions`], but by MMIO only once the completions taken
    /// since the last MMIO write fill the slack between the completion and submission
    /// rings: until then the controller has room for every command in flight anyway.
    /// With shadow doorbells the new head goes to the shadow at once (a plain memory
    /// write), so a controller that reads shadows frees the slots sooner; its event index
    /// is not consulted, because the slack already guarantees it never waits for room.
    /// Saves most completion MMIO writes on a polled queue.
    pub fn ring_completions_lazily(&mut self) -> Result<()> {
        if !self.cq_doorbell_due {
            return Ok(());
        }
        // As in `ring_completions`: the entries are read before the slots are handed back.
        fence(Ordering::Release);
        if self.cq_unreported >= self.cq_slack {
            if let Some((shadow, _)) = &self.shadow {
                shadow.store(self.cq_doorbell, self.cq_head)?;
            }
            self.bar
                .write32(self.cq_doorbell, u32::from(self.cq_head))?;
            self.mmio_writes += 1;
            self.cq_rung = self.cq_head;
            self.cq_doorbell_due = false;
            self.cq_unreported = 0;
        } else if let Some((shadow, _)) = &self.shadow {
            shadow.store(self.cq_doorbell, self.cq_head)?;
            self.cq_rung = self.cq_head;
        }
        Ok(())
    }

    /// Back to the state of a freshly created queue (after a controller reset, when the
    /// controller has forgotten the queue): returns the command IDs that were in flight,
    /// with their opcodes.
    pub fn reset(&mut self) -> Vec<(u16, u8)> {
        let lost = self
            .in_flight
            .iter()
            .enumerate()
            .filter_map(|(id, opcode)| opcode.map(|opcode| (id as u16, opcode)))
            .collect();
        self.cq.fill(0);
        self.sq_tail = 0;
        self.sq_rung = 0;
        self.cq_rung = 0;
        self.sq_head = 0;
        self.cq_head = 0;
        self.cq_unreported = 0;
        self.phase = true;
        self.in_flight.fill(None);
        self.free_ids = (0..self.entries).rev().collect();
        self.broken = false;
        self.sq_doorbell_due = false;
        self.cq_doorbell_due = false;
        // A reset controller forgot the shadow pages; they are configured again later.
        self.shadow = None;
        lost
    }

    /// The command IDs in flight, with their opcodes.
    pub fn commands_in_flight(&self) -> impl Iterator<Item = (u16, u8)> + '_ {
        self.in_flight
            .iter()
            .enumerate()
            .filter_map(|(id, opcode)| opcode.map(|opcode| (id as u16, opcode)))
    }

    /// Takes the next completion if the controller has posted one, after checking it, and
    /// rings the completion doorbell.
    pub fn poll(&mut self) -> Result<Option<CompletionEntry>> {
        let entry = self.take()?;
        if entry.is_some() {
            self.ring_completions()?;
        }
        Ok(entry)
    }

    /// Takes the next completion if the controller has posted one, after checking it; the
    /// controller learns that its slot is free at the next [`QueuePair::ring_completions`].
    pub fn take(&mut self) -> Result<Option<CompletionEntry>> {
        if self.broken {
            return Err(Error::QueueBroken { queue_id: self.id });
        }
        let slot = usize::from(self.cq_head) * COMPLETION_ENTRY_SIZE;
        let status_word: u16 = self.cq.read_volatile(slot + STATUS_OFFSET)?;
        if (status_word & 1 != 0) != self.phase {
            return Ok(None);
        }
        // The controller writes the entry before (or with) its phase tag: do not let the
        // reads of the rest of the entry move before the read that saw the new phase.
        fence(Ordering::Acquire);
        let mut bytes = [0u8; COMPLETION_ENTRY_SIZE];
        self.cq.read(slot, &mut bytes)?;
        let entry = CompletionEntry::parse(&bytes);
        if let Err(error) = self.check(&entry) {
            self.broken = true;
            return Err(error);
        }

        let command_id = usize::from(entry.command_id);
        self.in_flight[command_id] = None;
        self.free_ids.push(entry.command_id);
        self.sq_head = entry.sq_head;
        self.cq_head = if self.cq_head + 1 == self.cq_entries {
            0
        } else {
            self.cq_head + 1
        };
        self.cq_unreported = self.cq_unreported.saturating_add(1);
        if self.cq_head == 0 {
            self.phase = !self.phase;
            self.completion_laps += 1;
        }
        self.cq_doorbell_due = true;
        Ok(Some(entry))
    }

    /// The rules every completion must follow.
    fn check(&self, entry: &CompletionEntry) -> Result<()> {
        let at = self.cq_head;
        if entry.phase != self.phase {
            return Err(Error::Misbehaved {
                what: format!(
                    "queue {}: completion at slot {at} changed its phase tag while read",
                    self.id
                ),
                value: u64::from(entry.phase),
            });
        }
        if entry.sq_id != self.id {
            return Err(Error::Misbehaved {
                what: format!(
                    "queue {}: completion at slot {at} names submission queue {}",
                    self.id, entry.sq_id
                ),
                value: u64::from(entry.sq_id),
            });
        }
        let in_flight = self
            .in_flight
            .get(usize::from(entry.command_id))
            .is_some_and(Option::is_some);
        if !in_flight {
            return Err(Error::Misbehaved {
                what: format!(
                    "queue {}: completion at slot {at} for command ID {}, which is not in flight",
                    self.id, entry.command_id
                ),
                value: u64::from(entry.command_id),
            });
        }
        // The controller only ever consumes entries: the new head lies between the old head
        // and the tail, going forward.
        let valid_head = entry.sq_head < self.entries
            && self.distance(self.sq_head, entry.sq_head)
                <= self.distance(self.sq_head, self.sq_tail);
        if !valid_head {
            return Err(Error::Misbehaved {
                what: format!(
                    "queue {}: completion at slot {at} reports SQ head {}, outside {}..={} of {} entries",
                    self.id, entry.sq_head, self.sq_head, self.sq_tail, self.entries
                ),
                value: u64::from(entry.sq_head),
            });
        }
        Ok(())
    }

    /// The opcode of command `command_id` while it is in flight.
    pub fn opcode_of(&self, command_id: u16) -> Option<u8> {
        self.in_flight
            .get(usize::from(command_id))
            .copied()
            .flatten()
    }

    /// Waits up to `timeout` for the completion of `command_id`, the only command in flight
    /// (the synchronous use of the admin queue).
    pub fn wait_for(&mut self, command_id: u16, timeout: Duration) -> Result<CompletionEntry> {
        let Some(opcode) = self.opcode_of(command_id) else {
            return Err(Error::InvalidArgument {
                what: format!("queue {}: command {command_id} is not in flight", self.id),
            });
        };
        if self.in_flight() != 1 {
            return Err(Error::InvalidArgument {
                what: format!(
                    "queue {}: wait_for needs exactly one command in flight, not {}",
                    self.id,
                    self.in_flight()
                ),
            });
        }
        let start = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            if let Some(entry) = self.poll()? {
                // `check` proved the ID was in flight, and only `command_id` was.
                return Ok(entry);
            }
            if start.elapsed() >= timeout {
                return Err(Error::CommandTimeout {
                    queue_id: self.id,
                    command_id,
                    opcode,
                    timeout,
                });
            }
            backoff.pause();
        }
    }
}
