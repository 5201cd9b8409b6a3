//! Submission and completion queues as the controller sees them (NVMe Base 2.0, 3.3.1
//! "Memory-based Transport Queue Model"): fetching commands at the SQ head, posting
//! completions at the CQ tail with the phase tag, and the doorbells that move the other ends.

use std::collections::VecDeque;

use ring3::IrqMode;

use super::shadow::Doorbell;
use super::{aborted, NvmeModel, State};
use crate::command::{SubmissionEntry, SUBMISSION_ENTRY_SIZE};
use crate::completion::{CompletionEntry, Status as CompletionStatus, COMPLETION_ENTRY_SIZE};

/// A submission queue: the driver moves the tail, the controller the head.
#[derive(Debug, Clone)]
pub(super) struct SubmissionQueue {
    pub base: u64,
    pub entries: u16,
    pub head: u16,
    pub tail: u16,
    pub cq_id: u16,
}

impl SubmissionQueue {
    pub fn new(base: u64, entries: u16, cq_id: u16) -> Self {
        SubmissionQueue {
            base,
            entries,
            head: 0,
            tail: 0,
            cq_id,
        }
    }
}

/// A completion the controller owes: posted when the CQ has room (and is not held).
#[derive(Debug, Clone, Copy)]
pub(super) struct PendingCompletion {
    pub sq_id: u16,
    pub command_id: u16,
    /// The SQ head just after the command was fetched, reported if the SQ is gone by the
    /// time the completion is posted.
    pub sq_head: u16,
    pub status: CompletionStatus,
    pub result: u32,
}

/// A completion queue: the controller moves the tail, the driver the head.
#[derive(Debug, Clone)]
pub(super) struct CompletionQueue {
    pub base: u64,
    pub entries: u16,
    pub head: u16,
    pub tail: u16,
    pub phase: bool,
    /// The interrupt vector, if interrupts are enabled (IEN).
    pub vector: Option<u16>,
    /// Completions ready to post, in order.
    pub waiting: VecDeque<PendingCompletion>,
    /// Completions held back by the hold knob.
    pub held: Vec<PendingCompletion>,
}

impl CompletionQueue {
    pub fn new(base: u64, entries: u16, vector: Option<u16>) -> Self {
        CompletionQueue {
            base,
            entries,
            head: 0,
            tail: 0,
            phase: true,
            vector,
            waiting: VecDeque::new(),
            held: Vec::new(),
        }
    }

    fn used(&self) -> u32 {
        (u32::from(self.tail) + u32::from(self.entries) - u32::from(self.head))
            % u32::from(self.entries)
    }

    /// Free slots: a queue is full when the tail is one behind the head.
    fn free(&self) -> u32 {
        u32::from(self.entries) - 1 - self.used()
    }

    /// Whether `value` is a head the host may report: inside the queue, and moving only over
    /// entries the controller posted.
    pub fn head_is_valid(&self, value: u32) -> bool {
        let entries = u32::from(self.entries);
        value < entries && (value + entries - u32::from(self.head)) % entries <= self.used()
    }

    /// Completions this queue will have to take, besides `extra` being gathered now.
    fn has_room_for_another(&self, extra: usize) -> bool {
        let owed = self.waiting.len() + self.held.len() + extra;
        usize::try_from(self.free()).is_ok_and(|free| free > owed)
    }
}

impl NvmeModel {
    pub(super) fn submission_tail_doorbell(&self, state: &mut State, sq_id: u16, value: u32) {
        let Some(sq) = state.submission_queues.get_mut(&sq_id) else {
            return;
        };
        // A tail outside the queue is an invalid doorbell write value (3.3.1.2); the
        // model ignores it (it has no asynchronous events to report it with).
        if value >= u32::from(sq.entries) {
            return;
        }
        sq.tail = value as u16;
        self.write_shadow(state, sq_id, Doorbell::SubmissionTail, value as u16);
        self.process_submission_queue(state, sq_id);
    }

    pub(super) fn completion_head_doorbell(&self, state: &mut State, cq_id: u16, value: u32) {
        let Some(cq) = state.completion_queues.get_mut(&cq_id) else {
            return;
        };
        // The head may only move over entries the controller posted.
        if !cq.head_is_valid(value) {
            return;
        }
        cq.head = value as u16;
        self.write_shadow(state, cq_id, Doorbell::CompletionHead, value as u16);
        self.post_waiting(state, cq_id);
        // Submission queues that stopped for lack of room carry on.
        let blocked: Vec<u16> = state
            .submission_queues
            .iter()
            .filter(|(_, sq)| sq.cq_id == cq_id && sq.head != sq.tail)
            .map(|(&id, _)| id)
            .collect();
        for sq_id in blocked {
            self.process_submission_queue(state, sq_id);
        }
    }

    /// Fetches and executes commands from the SQ head to its tail while the CQ has room,
    /// then posts their completions (reversed or held, if the knobs say so). With shadow
    /// doorbells, the tail and the CQ head are read from the shadows as it goes.
    pub(super) fn process_submission_queue(&self, state: &mut State, sq_id: u16) {
        let mut batch = Vec::new();
        let mut cq_id = None;
        self.refresh_sq_tail(state, sq_id);
        while state.running() && state.knobs.fatal_after != Some(0) {
            let Some(sq_cq_id) = state.submission_queues.get(&sq_id).map(|sq| sq.cq_id) else {
                break;
            };
            self.refresh_cq_head(state, sq_cq_id);
            let Some(sq) = state.submission_queues.get(&sq_id).cloned() else {
                break;
            };
            let Some(cq) = state.completion_queues.get(&sq.cq_id) else {
                break;
            };
            if sq.head == sq.tail || !cq.has_room_for_another(batch.len()) {
                break;
            }
            cq_id = Some(sq.cq_id);
            let mut bytes = [0u8; SUBMISSION_ENTRY_SIZE];
            let fetched = u64::from(sq.head)
                .checked_mul(SUBMISSION_ENTRY_SIZE as u64)
                .and_then(|offset| sq.base.checked_add(offset))
                .is_some_and(|address| self.ctx.dma_read(address, &mut bytes).is_ok());
            if !fetched {
                // The queue memory is gone: nothing sensible is left to do (3.7.4).
                state.fail();
                break;
            }
            let entry = SubmissionEntry::from_bytes(bytes);
            state.commands.push(entry);
            let head = (sq.head + 1) % sq.entries;
            if let Some(sq) = state.submission_queues.get_mut(&sq_id) {
                sq.head = head;
            }
            self.fetched_from(state, sq_id);
            if let Some(left) = state.knobs.fatal_after.as_mut() {
                *left = left.saturating_sub(1);
            }
            let outcome = if sq_id == 0 {
                self.execute_admin(state, &entry)
            } else {
                Some(self.execute_io(state, sq_id, &entry))
            };
            if let Some(outcome) = outcome {
                batch.push(PendingCompletion {
                    sq_id,
                    command_id: entry.command_id(),
                    sq_head: head,
                    status: outcome.status,
                    result: outcome.result,
                });
            }
        }

        if state.knobs.reorder_completions {
            batch.reverse();
        }
        let hold = sq_id != 0 && state.knobs.hold_completions;
        if let Some(cq) = cq_id.and_then(|id| state.completion_queues.get_mut(&id)) {
            if hold {
                cq.held.extend(batch);
            } else {
                cq.waiting.extend(batch);
            }
        }
        if let Some(cq_id) = cq_id {
            self.post_waiting(state, cq_id);
        }
        if state.knobs.fatal_after == Some(0) {
            state.knobs.fatal_after = None;
            state.fail();
        }
    }

    /// Moves held completions to their queues and posts them.
    pub(super) fn release_held(&self, state: &mut State) {
        let ids: Vec<u16> = state.completion_queues.keys().copied().collect();
        for cq_id in ids {
            if let Some(cq) = state.completion_queues.get_mut(&cq_id) {
                let held = std::mem::take(&mut cq.held);
                cq.waiting.extend(held);
            }
            self.post_waiting(state, cq_id);
        }
    }

    /// Completes held commands of `sq_id` (all, or only `command_id`) with `code` instead
    /// of their status; returns how many.
    pub(super) fn abort_held(
        &self,
        state: &mut State,
        sq_id: u16,
        command_id: Option<u16>,
        code: u8,
    ) -> usize {
        let Some(cq_id) = state.submission_queues.get(&sq_id).map(|sq| sq.cq_id) else {
            return 0;
        };
        let Some(cq) = state.completion_queues.get_mut(&cq_id) else {
            return 0;
        };
        let matches = |pending: &PendingCompletion| {
            pending.sq_id == sq_id && command_id.is_none_or(|id| id == pending.command_id)
        };
        let (mut hit, kept): (Vec<_>, Vec<_>) = cq.held.drain(..).partition(|p| matches(p));
        cq.held = kept;
        let count = hit.len();
        for pending in &mut hit {
            pending.status = aborted(code);
            pending.result = 0;
        }
        cq.waiting.extend(hit);
        self.post_waiting(state, cq_id);
        count
    }

    /// Posts waiting completions of `cq_id` while it has room.
    pub(super) fn post_waiting(&self, state: &mut State, cq_id: u16) {
        while state.running() {
            let waiting = state
                .completion_queues
                .get(&cq_id)
                .is_some_and(|cq| !cq.waiting.is_empty());
            if !waiting {
                return;
            }
            self.refresh_cq_head(state, cq_id);
            let Some(cq) = state.completion_queues.get_mut(&cq_id) else {
                return;
            };
            if cq.free() == 0 {
                return;
            }
            let Some(pending) = cq.waiting.pop_front() else {
                return;
            };
            self.post(state, cq_id, pending);
        }
    }

    /// Writes one completion at the CQ tail (4.2.1) and signals its interrupt.
    fn post(&self, state: &mut State, cq_id: u16, pending: PendingCompletion) {
        let sq_head = state
            .submission_queues
            .get(&pending.sq_id)
            .map_or(pending.sq_head, |sq| sq.head);
        let knobs = &mut state.knobs;
        let sq_head = knobs.bogus_sq_head.take().unwrap_or(sq_head);
        let command_id = knobs.bogus_command_id.take().unwrap_or(pending.command_id);
        let status = knobs.bogus_status.take().unwrap_or(pending.status);
        let Some(cq) = state.completion_queues.get_mut(&cq_id) else {
            return;
        };
        let completion = CompletionEntry {
            result: pending.result,
            dword1: 0,
            sq_head,
            sq_id: pending.sq_id,
            command_id,
            phase: cq.phase,
            status,
        };
        let written = u64::from(cq.tail)
            .checked_mul(COMPLETION_ENTRY_SIZE as u64)
            .and_then(|offset| cq.base.checked_add(offset))
            .is_some_and(|address| self.ctx.dma_write(address, &completion.to_bytes()).is_ok());
        if !written {
            state.fail();
            return;
        }
        cq.tail = (cq.tail + 1) % cq.entries;
        let wrapped = cq.tail == 0;
        if wrapped {
            cq.phase = !cq.phase;
        }
        let vector = cq.vector;
        state.counters.completions += 1;
        if wrapped && cq_id == 0 {
            state.counters.phase_flips += 1;
        }
        if let Some(vector) = vector {
            self.signal(state, vector);
        }
    }

    /// Raises a completion queue's interrupt. Under MSI-X each queue has its vector and
    /// INTMS does not apply; with MSI (one message) or INTx everything is vector 0, which
    /// INTMS bit 0 masks (3.1.4.3).
    fn signal(&self, state: &mut State, vector: u16) {
        let vector = if self.ctx.irq_mode() == Some(IrqMode::MsiX) {
            u32::from(vector)
        } else if state.interrupt_mask & 1 != 0 {
            return;
        } else {
            0
        };
        *state.counters.interrupts.entry(vector).or_default() += 1;
        self.ctx.raise_irq(vector);
    }
}
