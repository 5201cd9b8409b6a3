//! Shadow doorbells (NVMe Base 2.0, 5.9 "Doorbell Buffer Config"), as QEMU's controller
//! does them: the host writes doorbell values to a page in its memory, the controller
//! reads them whenever it works on a queue and writes, per submission queue, the tail it
//! has seen to the event index page, so the host knows when an MMIO write is needed again.
//!
//! Slots follow the doorbell registers: SQ y tail at `(2y) * (4 << DSTRD)`, CQ y head at
//! `(2y + 1) * (4 << DSTRD)`, in both pages; queues whose slots lie beyond the page use MMIO
//! doorbells only. A value in the shadow page is checked like a doorbell write, so garbage
//! there is ignored, never trusted.

use super::admin::Answer;
use super::{generic, sc, NvmeModel, State, DOORBELL_STRIDE};
use crate::command::SubmissionEntry;

/// The pages Doorbell Buffer Config handed over (PRP1 and PRP2).
#[derive(Debug, Clone, Copy)]
pub(super) struct ShadowPages {
    pub doorbells: u64,
    pub event_indexes: u64,
}

/// One of a queue pair's two doorbells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Doorbell {
    SubmissionTail,
    CompletionHead,
}

/// The byte offset of a doorbell's slot inside the shadow and event index pages, if it
/// lies within one page of `page_shift`.
fn slot_offset(page_shift: u8, queue_id: u16, doorbell: Doorbell) -> Option<u64> {
    let index = 2 * u64::from(queue_id) + u64::from(doorbell == Doorbell::CompletionHead);
    let offset = index * DOORBELL_STRIDE;
    (offset + 4 <= 1u64 << page_shift).then_some(offset)
}

impl NvmeModel {
    /// Doorbell Buffer Config (5.9): both pages must be given and page aligned. The
    /// shadows of queues that exist already start at their doorbells' values (QEMU does
    /// the same), so the host's next update is compared with the right value.
    pub(super) fn doorbell_buffer_config(
        &self,
        state: &mut State,
        entry: &SubmissionEntry,
    ) -> Answer {
        let page_mask = (1u64 << state.page_shift) - 1;
        let (doorbells, event_indexes) = (entry.prp1(), entry.prp2());
        if doorbells == 0 || event_indexes == 0 || (doorbells | event_indexes) & page_mask != 0 {
            return Err(generic(sc::INVALID_FIELD));
        }
        state.shadow = Some(ShadowPages {
            doorbells,
            event_indexes,
        });
        state.counters.doorbell_buffer_configs += 1;
        let tails: Vec<(u16, u16)> = state
            .submission_queues
            .iter()
            .map(|(&id, sq)| (id, sq.tail))
            .collect();
        let heads: Vec<(u16, u16)> = state
            .completion_queues
            .iter()
            .map(|(&id, cq)| (id, cq.head))
            .collect();
        for (id, tail) in tails {
            self.write_shadow(state, id, Doorbell::SubmissionTail, tail);
        }
        for (id, head) in heads {
            self.write_shadow(state, id, Doorbell::CompletionHead, head);
        }
        Ok(0)
    }

    /// The address of a doorbell's slot in the shadow page, or in the event index page.
    fn slot_address(
        state: &State,
        queue_id: u16,
        doorbell: Doorbell,
        event_index: bool,
    ) -> Option<u64> {
        let pages = state.shadow?;
        let offset = slot_offset(state.page_shift, queue_id, doorbell)?;
        let page = if event_index {
            pages.event_indexes
        } else {
            pages.doorbells
        };
        page.checked_add(offset)
    }

    /// Whether the model looks at the shadow page now.
    fn reads_shadows(state: &State) -> bool {
        state.shadow.is_some()
            && state.running()
            && !state.knobs.ignore_shadow
            && !state.knobs.ignore_doorbells
    }

    /// The value in a doorbell's shadow slot, if the model reads shadows and the read works.
    fn read_shadow(&self, state: &State, queue_id: u16, doorbell: Doorbell) -> Option<u32> {
        if !Self::reads_shadows(state) {
            return None;
        }
        let address = Self::slot_address(state, queue_id, doorbell, false)?;
        let mut bytes = [0u8; 4];
        self.ctx.dma_read(address, &mut bytes).ok()?;
        Some(u32::from_le_bytes(bytes))
    }

    /// Copies a value written by MMIO into the shadow slot, so both say the same (QEMU does
    /// this for the admin queue, whose shadows some hosts never update).
    pub(super) fn write_shadow(
        &self,
        state: &State,
        queue_id: u16,
        doorbell: Doorbell,
        value: u16,
    ) {
        if let Some(address) = Self::slot_address(state, queue_id, doorbell, false) {
            // Unreachable host memory: the host loses its shadow, nothing else happens.
            let _ = self.ctx.dma_write(address, &u32::from(value).to_le_bytes());
        }
    }

    /// Publishes the value the controller has seen, after which the host must write the
    /// doorbell by MMIO again.
    fn write_event_index(&self, state: &State, queue_id: u16, doorbell: Doorbell, value: u16) {
        if !Self::reads_shadows(state) {
            return;
        }
        if let Some(address) = Self::slot_address(state, queue_id, doorbell, true) {
            let _ = self.ctx.dma_write(address, &u32::from(value).to_le_bytes());
        }
    }

    /// Takes a new SQ tail from the shadow, if there is a valid one.
    pub(super) fn refresh_sq_tail(&self, state: &mut State, sq_id: u16) {
        let Some(value) = self.read_shadow(state, sq_id, Doorbell::SubmissionTail) else {
            return;
        };
        if let Some(sq) = state.submission_queues.get_mut(&sq_id) {
            // Outside the queue: an invalid doorbell value, ignored as by MMIO.
            if value < u32::from(sq.entries) {
                sq.tail = value as u16;
            }
        }
    }

    /// After fetching from `sq_id`: tells the host which tail the controller has seen, then
    /// looks for a newer one.
    pub(super) fn fetched_from(&self, state: &mut State, sq_id: u16) {
        let Some(tail) = state.submission_queues.get(&sq_id).map(|sq| sq.tail) else {
            return;
        };
        self.write_event_index(state, sq_id, Doorbell::SubmissionTail, tail);
        self.refresh_sq_tail(state, sq_id);
    }

    /// Takes a new CQ head from the shadow, if there is a valid one, and publishes the head
    /// the controller has seen as its event index (as QEMU does before posting).
    pub(super) fn refresh_cq_head(&self, state: &mut State, cq_id: u16) {
        let Some(value) = self.read_shadow(state, cq_id, Doorbell::CompletionHead) else {
            return;
        };
        let Some(cq) = state.completion_queues.get_mut(&cq_id) else {
            return;
        };
        if cq.head_is_valid(value) {
            cq.head = value as u16;
        }
        let head = cq.head;
        self.write_event_index(state, cq_id, Doorbell::CompletionHead, head);
    }

    /// Works on every queue whose shadows moved, as a controller polling them would:
    /// completions waiting for room first, then new commands.
    pub(super) fn process_shadows(&self, state: &mut State) {
        if !Self::reads_shadows(state) {
            return;
        }
        let cq_ids: Vec<u16> = state.completion_queues.keys().copied().collect();
        for cq_id in cq_ids {
            self.post_waiting(state, cq_id);
        }
        let sq_ids: Vec<u16> = state.submission_queues.keys().copied().collect();
        for sq_id in sq_ids {
            self.process_submission_queue(state, sq_id);
        }
    }
}
