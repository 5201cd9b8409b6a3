//! The model driven as a driver would: raw register writes, queues and data in DMA buffers.

use std::collections::BTreeMap;

use proptest::prelude::*;
use ring3::fake::FakeBackend;
use ring3::{Backend, Bar, DmaBuffer, IrqMode};

use super::{aborted, fake_nvme, generic, sc, specific, NvmeModel, ACQ, AQA, ASQ, CC, CSTS};
use crate::command::{admin, SubmissionEntry};
use crate::completion::{CompletionEntry, Status as CompletionStatus, COMPLETION_ENTRY_SIZE};
use crate::registers::{Configuration, Status};

const PAGE: usize = 4096;
const WRITE: u8 = 0x01;
const READ: u8 = 0x02;
const FLUSH: u8 = 0x00;

struct Queue {
    sq: DmaBuffer,
    cq: DmaBuffer,
    sq_entries: u16,
    cq_entries: u16,
    tail: u16,
    head: u16,
    phase: bool,
}

impl Queue {
    fn new(backend: &FakeBackend<NvmeModel>, sq_entries: u16, cq_entries: u16) -> Self {
        Queue {
            sq: backend.dma_alloc(usize::from(sq_entries) * 64).unwrap(),
            cq: backend.dma_alloc(usize::from(cq_entries) * 16).unwrap(),
            sq_entries,
            cq_entries,
            tail: 0,
            head: 0,
            phase: true,
        }
    }
}

/// An enabled controller with a 16-entry admin queue, in 4 KiB pages.
struct Harness {
    backend: FakeBackend<NvmeModel>,
    bar: Bar,
    queues: BTreeMap<u16, Queue>,
    next_command_id: u16,
}

impl Harness {
    fn new() -> Self {
        let backend = fake_nvme("model-test");
        backend.set_bus_master(true).unwrap();
        let bar = backend.bar(0).unwrap();
        let admin = Queue::new(&backend, 16, 16);
        bar.write32(AQA as usize, 15 | (15 << 16)).unwrap();
        bar.write::<u64>(ASQ as usize, admin.sq.iova()).unwrap();
        bar.write::<u64>(ACQ as usize, admin.cq.iova()).unwrap();
        let mut harness = Harness {
            backend,
            bar,
            queues: BTreeMap::from([(0, admin)]),
            next_command_id: 0,
        };
        harness.enable();
        harness
    }

    fn enable(&mut self) {
        let cc = Configuration::new(0, 12, 6, 4).with_enabled(true);
        self.bar.write32(CC as usize, cc.0).unwrap();
        assert_eq!(self.csts(), Status::RDY);
    }

    fn csts(&self) -> Status {
        Status::from_bits_retain(self.bar.read32(CSTS as usize).unwrap())
    }

    fn model(&self) -> &NvmeModel {
        self.backend.model()
    }

    fn buffer(&self, len: usize) -> DmaBuffer {
        self.backend.dma_alloc(len).unwrap()
    }

    /// Writes `entry` at the SQ tail (without ringing); returns its command ID.
    fn push(&mut self, queue_id: u16, entry: SubmissionEntry) -> u16 {
        let command_id = self.next_command_id;
        self.next_command_id = self.next_command_id.wrapping_add(1);
        let queue = self.queues.get_mut(&queue_id).unwrap();
        let entry = entry.with_command_id(command_id);
        let at = usize::from(queue.tail) * 64;
        queue.sq.write(at, &entry.to_bytes()).unwrap();
        queue.tail = (queue.tail + 1) % queue.sq_entries;
        command_id
    }

    fn ring(&self, queue_id: u16) {
        let tail = self.queues[&queue_id].tail;
        let doorbell = 0x1000 + 8 * usize::from(queue_id);
        self.bar.write32(doorbell, u32::from(tail)).unwrap();
    }

    /// Takes every new completion, then writes the CQ head doorbell once.
    fn reap(&mut self, queue_id: u16) -> Vec<CompletionEntry> {
        let queue = self.queues.get_mut(&queue_id).unwrap();
        let mut found = Vec::new();
        loop {
            let mut bytes = [0u8; COMPLETION_ENTRY_SIZE];
            let at = usize::from(queue.head) * COMPLETION_ENTRY_SIZE;
            queue.cq.read(at, &mut bytes).unwrap();
            let entry = CompletionEntry::parse(&bytes);
            if entry.phase != queue.phase {
                break;
            }
            found.push(entry);
            queue.head = (queue.head + 1) % queue.cq_entries;
            if queue.head == 0 {
                queue.phase = !queue.phase;
            }
        }
        if !found.is_empty() {
            let doorbell = 0x1000 + 8 * usize::from(queue_id) + 4;
            self.bar.write32(doorbell, u32::from(queue.head)).unwrap();
        }
        found
    }

    fn submit(&mut self, queue_id: u16, entry: SubmissionEntry) -> CompletionEntry {
        let command_id = self.push(queue_id, entry);
        self.ring(queue_id);
        let mut completions = self.reap(queue_id);
        assert_eq!(completions.len(), 1, "{completions:?}");
        assert_eq!(completions[0].command_id, command_id);
        completions.remove(0)
    }

    fn admin(&mut self, entry: SubmissionEntry) -> CompletionEntry {
        self.submit(0, entry)
    }

    /// Creates I/O CQ and SQ `queue_id` of `entries` slots.
    fn create_pair(&mut self, queue_id: u16, entries: u16, vector: Option<u16>) {
        self.create_sized_pair(queue_id, entries, entries, vector);
    }

    fn create_sized_pair(&mut self, queue_id: u16, sqs: u16, cqs: u16, vector: Option<u16>) {
        let queue = Queue::new(&self.backend, sqs, cqs);
        let cq = create_cq(queue_id, cqs, queue.cq.iova(), vector);
        assert_eq!(self.admin(cq).status, CompletionStatus::SUCCESS);
        let sq = create_sq(queue_id, sqs, queue.sq.iova(), queue_id);
        assert_eq!(self.admin(sq).status, CompletionStatus::SUCCESS);
        self.queues.insert(queue_id, queue);
    }
}

fn create_cq(queue_id: u16, entries: u16, iova: u64, vector: Option<u16>) -> SubmissionEntry {
    let interrupts = vector.map_or(0, |v| (u32::from(v) << 16) | 0b10);
    SubmissionEntry::new(admin::CREATE_IO_CQ)
        .with_prp1(iova)
        .with_dword(10, u32::from(queue_id) | (u32::from(entries - 1) << 16))
        .with_dword(11, interrupts | 1)
}

fn create_sq(queue_id: u16, entries: u16, iova: u64, cq_id: u16) -> SubmissionEntry {
    SubmissionEntry::new(admin::CREATE_IO_SQ)
        .with_prp1(iova)
        .with_dword(10, u32::from(queue_id) | (u32::from(entries - 1) << 16))
        .with_dword(11, (u32::from(cq_id) << 16) | 1)
}

fn delete(opcode: u8, queue_id: u16) -> SubmissionEntry {
    SubmissionEntry::new(opcode).with_dword(10, u32::from(queue_id))
}

fn io(opcode: u8, nsid: u32, lba: u64, blocks: u32) -> SubmissionEntry {
    SubmissionEntry::new(opcode)
        .with_namespace_id(nsid)
        .with_dword(10, lba as u32)
        .with_dword(11, (lba >> 32) as u32)
        .with_dword(12, blocks - 1)
}

fn get_log_page(log_id: u8, bytes: u32, iova: u64) -> SubmissionEntry {
    let numd = bytes / 4 - 1;
    SubmissionEntry::new(admin::GET_LOG_PAGE)
        .with_prp1(iova)
        .with_dword(10, u32::from(log_id) | ((numd & 0xffff) << 16))
        .with_dword(11, numd >> 16)
}

fn u64_at(data: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(data[at..at + 8].try_into().unwrap())
}

#[test]
fn identify_reports_namespaces_and_the_active_list() {
    let mut h = Harness::new();
    let page = h.buffer(PAGE);
    let identify = |cns: u32, nsid: u32| {
        SubmissionEntry::new(admin::IDENTIFY)
            .with_namespace_id(nsid)
            .with_prp1(page.iova())
            .with_dword(10, cns)
    };
    assert!(h.admin(identify(0, 2)).status.is_success());
    let data = page.to_vec();
    assert_eq!(u64_at(&data, 0), 16_384, "NSZE");
    assert_eq!((data[25], data[26], data[33]), (0, 0, 0x09));
    assert_eq!(data[128 + 2], 12, "LBADS: 4096-byte blocks");

    assert!(h.admin(identify(1, 0)).status.is_success());
    let data = page.to_vec();
    assert_eq!(
        u32::from_le_bytes(data[516..520].try_into().unwrap()),
        2,
        "NN"
    );
    assert_eq!(
        (data[520] & 0b1100, data[525] & 1),
        (0b1100, 1),
        "ONCS, VWC"
    );

    assert!(h.admin(identify(2, 0)).status.is_success());
    assert_eq!(&page.to_vec()[..12], &[1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    for nsid in [0, 3, u32::MAX] {
        let status = h.admin(identify(0, nsid)).status;
        assert_eq!(status, generic(sc::INVALID_NAMESPACE), "NSID {nsid}");
    }
}

#[test]
fn number_of_queues_is_bounded_and_fixed_until_reset() {
    let mut h = Harness::new();
    let set = |sq: u32, cq: u32| {
        SubmissionEntry::new(admin::SET_FEATURES)
            .with_dword(10, 0x07)
            .with_dword(11, sq | (cq << 16))
    };
    let get = SubmissionEntry::new(admin::GET_FEATURES).with_dword(10, 0x07);
    assert_eq!(h.admin(get).result, 7 | (7 << 16), "default: the maximum");
    assert_eq!(h.admin(set(0xffff, 0)).status, generic(sc::INVALID_FIELD));
    assert_eq!(h.admin(set(2, 100)).result, 2 | (7 << 16));
    assert_eq!(
        h.admin(set(5, 5)).result,
        2 | (7 << 16),
        "already allocated"
    );
    assert_eq!(h.admin(get).result, 2 | (7 << 16));
    // SQ 4 is beyond the three granted.
    let sq = h.buffer(PAGE);
    let cq = h.buffer(PAGE);
    assert!(h
        .admin(create_cq(4, 8, cq.iova(), None))
        .status
        .is_success());
    let status = h.admin(create_sq(4, 8, sq.iova(), 4)).status;
    assert_eq!(status, specific(sc::INVALID_QUEUE_IDENTIFIER));
    assert_eq!(
        h.admin(set(1, 1)).status,
        generic(sc::COMMAND_SEQUENCE_ERROR)
    );
}

#[test]
fn queue_creation_checks_its_fields() {
    let mut h = Harness::new();
    let memory = h.buffer(PAGE).iova();
    let bad = [
        (
            create_cq(0, 8, memory, None),
            specific(sc::INVALID_QUEUE_IDENTIFIER),
        ),
        (
            create_cq(9, 8, memory, None),
            specific(sc::INVALID_QUEUE_IDENTIFIER),
        ),
        (
            create_cq(1, 1, memory, None),
            specific(sc::INVALID_QUEUE_SIZE),
        ),
        (
            create_cq(1, 4096, memory, None),
            specific(sc::INVALID_QUEUE_SIZE),
        ),
        (
            create_cq(1, 8, memory, Some(9)),
            specific(sc::INVALID_INTERRUPT_VECTOR),
        ),
        (
            create_cq(1, 8, memory + 64, None),
            generic(sc::PRP_OFFSET_INVALID),
        ),
        (
            create_cq(1, 8, memory, None).with_dword(11, 0),
            generic(sc::INVALID_FIELD),
        ),
        (
            create_sq(1, 8, memory, 1),
            specific(sc::COMPLETION_QUEUE_INVALID),
        ),
        (
            create_sq(1, 8, memory, 0),
            specific(sc::COMPLETION_QUEUE_INVALID),
        ),
    ];
    for (entry, status) in bad {
        assert_eq!(h.admin(entry).status, status, "{entry:?}");
    }
    assert_eq!(h.model().io_queue_count(), 0);
    h.create_pair(1, 8, Some(8));
    assert!(h.model().queue_exists(1));
    let status = h.admin(create_cq(1, 8, memory, None)).status;
    assert_eq!(status, specific(sc::INVALID_QUEUE_IDENTIFIER), "exists");
}

#[test]
fn queue_deletion_checks_ids_and_order() {
    let mut h = Harness::new();
    h.create_pair(1, 8, None);
    let sq_op = admin::DELETE_IO_SQ;
    let cq_op = admin::DELETE_IO_CQ;
    let invalid_id = specific(sc::INVALID_QUEUE_IDENTIFIER);
    assert_eq!(h.admin(delete(sq_op, 0)).status, invalid_id);
    assert_eq!(h.admin(delete(sq_op, 2)).status, invalid_id);
    assert_eq!(h.admin(delete(cq_op, 0)).status, invalid_id);
    let status = h.admin(delete(cq_op, 1)).status;
    assert_eq!(
        status,
        specific(sc::INVALID_QUEUE_DELETION),
        "SQ 1 still uses it"
    );
    assert!(h.admin(delete(sq_op, 1)).status.is_success());
    assert!(h.admin(delete(cq_op, 1)).status.is_success());
    assert!(!h.model().queue_exists(1));
    assert_eq!(h.admin(delete(cq_op, 1)).status, invalid_id);
}

#[test]
fn write_then_read_back_through_chained_prp_lists() {
    let mut h = Harness::new();
    h.create_pair(1, 8, None);
    // Five 4 KiB blocks in pages out of order; the list starts two slots before the end
    // of its page, so its second slot chains to the next list page.
    let pages = h.buffer(6 * PAGE);
    let page = |i: usize| pages.iova() + (i * PAGE) as u64;
    let order = [3, 0, 5, 1, 4];
    for (n, &i) in order.iter().enumerate() {
        pages.write(i * PAGE, &vec![n as u8 + 1; PAGE]).unwrap();
    }
    let list = h.buffer(2 * PAGE);
    list.write(PAGE - 16, &page(order[1]).to_le_bytes())
        .unwrap();
    list.write(PAGE - 8, &(list.iova() + PAGE as u64).to_le_bytes())
        .unwrap();
    for (slot, &i) in order[2..].iter().enumerate() {
        list.write(PAGE + slot * 8, &page(i).to_le_bytes()).unwrap();
    }
    let write = io(WRITE, 2, 10, 5)
        .with_prp1(page(order[0]))
        .with_prp2(list.iova() + (PAGE - 16) as u64);
    assert!(h.submit(1, write).status.is_success());
    let expected: Vec<u8> = (1..=5u8).flat_map(|n| vec![n; PAGE]).collect();
    assert_eq!(h.model().namespace_read(2, 10, 5), expected);

    // Read back into contiguous pages through a plain list.
    let target = h.buffer(5 * PAGE);
    let plain = h.buffer(PAGE);
    for slot in 0..4 {
        let address = target.iova() + ((slot + 1) * PAGE) as u64;
        plain.write(slot * 8, &address.to_le_bytes()).unwrap();
    }
    let read = io(READ, 2, 10, 5)
        .with_prp1(target.iova())
        .with_prp2(plain.iova());
    assert!(h.submit(1, read).status.is_success());
    assert_eq!(target.to_vec(), expected);
    assert_eq!(h.model().reads_and_writes(), (1, 1));
}

#[test]
fn prp1_may_start_inside_a_page_but_entries_must_be_aligned() {
    let mut h = Harness::new();
    h.create_pair(1, 8, None);
    let data = h.buffer(2 * PAGE);
    let pattern: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8).collect();
    data.write(512, &pattern).unwrap();
    // Eight 512-byte blocks from 512 bytes into the first page: PRP2 is the second page.
    let write = io(WRITE, 1, 0, 8)
        .with_prp1(data.iova() + 512)
        .with_prp2(data.iova() + PAGE as u64);
    assert!(h.submit(1, write).status.is_success());
    assert_eq!(h.model().namespace_read(1, 0, 8), pattern);

    let invalid = generic(sc::PRP_OFFSET_INVALID);
    let unaligned_prp1 = io(READ, 1, 0, 1).with_prp1(data.iova() + 2);
    assert_eq!(h.submit(1, unaligned_prp1).status, invalid);
    let unaligned_prp2 = write.with_prp2(data.iova() + PAGE as u64 + 8);
    assert_eq!(h.submit(1, unaligned_prp2).status, invalid);
    let too_big = io(READ, 2, 0, 129).with_prp1(data.iova());
    assert_eq!(
        h.submit(1, too_big).status,
        generic(sc::INVALID_FIELD),
        "MDTS"
    );
    let unmapped = io(READ, 1, 0, 1).with_prp1(0x10);
    let status = h.submit(1, unmapped).status;
    assert_eq!(status, generic(sc::DATA_TRANSFER_ERROR));
}

#[test]
fn failures_are_answered_and_logged() {
    let mut h = Harness::new();
    h.create_pair(1, 8, None);
    let data = h.buffer(PAGE);
    let last = 131_071;
    let at_end = io(READ, 1, last, 1).with_prp1(data.iova());
    assert!(h.submit(1, at_end).status.is_success());
    let past_end = io(READ, 1, last, 2).with_prp1(data.iova());
    assert_eq!(h.submit(1, past_end).status, generic(sc::LBA_OUT_OF_RANGE));
    let no_namespace = io(READ, 3, 0, 1).with_prp1(data.iova());
    assert_eq!(
        h.submit(1, no_namespace).status,
        generic(sc::INVALID_NAMESPACE)
    );
    let unknown = h.submit(1, SubmissionEntry::new(0x7e).with_namespace_id(1));
    assert_eq!(unknown.status, generic(sc::INVALID_OPCODE));
    assert_eq!(h.model().error_count(), 3);

    let log = h.buffer(PAGE);
    assert!(h
        .admin(get_log_page(1, 4096, log.iova()))
        .status
        .is_success());
    let entries = log.to_vec();
    assert_eq!(u64_at(&entries, 0), 3, "newest first");
    assert_eq!(u16::from_le_bytes([entries[8], entries[9]]), 1, "SQ ID");
    assert_eq!(
        u16::from_le_bytes([entries[10], entries[11]]),
        unknown.command_id
    );
    assert_eq!(
        u64_at(&entries, 128 + 16),
        last,
        "LBA of the out-of-range read"
    );
    let status = u16::from_le_bytes([entries[140], entries[141]]);
    assert_eq!((status >> 1) & 0xff, 0x80, "SC");

    assert!(h
        .admin(get_log_page(2, 512, log.iova()))
        .status
        .is_success());
    let smart = log.to_vec();
    assert_eq!(u16::from_le_bytes([smart[1], smart[2]]), 310);
    assert_eq!(u64_at(&smart, 32), 1, "data units read, rounded up");
    assert_eq!(u64_at(&smart, 64), 1, "host read commands");
    assert_eq!(u64_at(&smart, 176), 3, "error log entries");
    let status = h.admin(get_log_page(0x42, 512, log.iova())).status;
    assert_eq!(status, specific(sc::INVALID_LOG_PAGE));
}

#[test]
fn deallocated_blocks_read_as_zeroes() {
    let mut h = Harness::new();
    h.create_pair(1, 8, None);
    h.model().namespace_write(1, 100, &[0xab; 8 * 512]);
    let ranges = h.buffer(PAGE);
    let range = |blocks: u32, lba: u64| {
        [[0; 4], blocks.to_le_bytes()]
            .concat()
            .into_iter()
            .chain(lba.to_le_bytes())
            .collect::<Vec<u8>>()
    };
    ranges.write(0, &range(4, 102)).unwrap();
    ranges.write(16, &range(8, 131_070)).unwrap();
    let dsm = |count: u32| {
        SubmissionEntry::new(0x09)
            .with_namespace_id(1)
            .with_prp1(ranges.iova())
            .with_dword(10, count - 1)
            .with_dword(11, 1 << 2)
    };
    assert_eq!(h.submit(1, dsm(2)).status, generic(sc::LBA_OUT_OF_RANGE));
    assert_eq!(h.model().namespace_read(1, 100, 8), vec![0xab; 8 * 512]);
    assert!(h.submit(1, dsm(1)).status.is_success());
    let data = h.buffer(PAGE);
    assert!(h
        .submit(1, io(READ, 1, 100, 8).with_prp1(data.iova()))
        .status
        .is_success());
    let read = data.to_vec();
    assert!(read[..1024].iter().all(|&b| b == 0xab));
    assert!(read[1024..3072].iter().all(|&b| b == 0));
    assert!(read[3072..].iter().all(|&b| b == 0xab));
}

#[test]
fn reordered_completions_come_in_reverse() {
    let mut h = Harness::new();
    h.create_pair(1, 8, None);
    h.model().set_reorder_completions(true);
    let ids: Vec<u16> = (0..3).map(|_| h.push(1, io(FLUSH, 1, 0, 1))).collect();
    h.ring(1);
    let completions = h.reap(1);
    let order: Vec<u16> = completions.iter().map(|c| c.command_id).collect();
    assert_eq!(order, vec![ids[2], ids[1], ids[0]]);
    assert!(completions.iter().all(|c| c.sq_head == 3 && c.sq_id == 1));
    assert_eq!(h.model().flushes(), 3);
}

#[test]
fn held_completions_wait_for_the_knob_an_abort_or_sq_deletion() {
    let mut h = Harness::new();
    h.create_pair(1, 8, None);
    let data = h.buffer(PAGE);
    h.model().set_hold_completions(true);
    h.push(1, io(WRITE, 1, 0, 1).with_prp1(data.iova()));
    h.ring(1);
    assert!(h.reap(1).is_empty());
    assert_eq!(h.model().held_completions(), 1);
    h.model().set_hold_completions(false);
    assert_eq!(h.reap(1).len(), 1, "posted when released");

    h.model().set_hold_completions(true);
    let aborted_id = h.push(1, io(FLUSH, 1, 0, 1));
    let deleted_id = h.push(1, io(FLUSH, 1, 0, 1));
    h.ring(1);
    let abort = SubmissionEntry::new(admin::ABORT).with_dword(10, 1 | u32::from(aborted_id) << 16);
    assert_eq!(h.admin(abort).result, 0, "aborted");
    assert_eq!(h.admin(abort).result, 1, "nothing left to abort");
    assert!(h.admin(delete(admin::DELETE_IO_SQ, 1)).status.is_success());
    let completions = h.reap(1);
    let statuses: Vec<(u16, CompletionStatus)> = completions
        .iter()
        .map(|c| (c.command_id, c.status))
        .collect();
    assert_eq!(
        statuses,
        vec![
            (aborted_id, aborted(sc::ABORT_REQUESTED)),
            (deleted_id, aborted(sc::ABORTED_SQ_DELETION))
        ]
    );
    assert_eq!(h.model().held_completions(), 0);
}

#[test]
fn a_full_completion_queue_stops_fetching() {
    let mut h = Harness::new();
    h.create_sized_pair(1, 8, 2, None);
    let fetched = h.model().commands().len();
    for _ in 0..3 {
        h.push(1, io(FLUSH, 1, 0, 1));
    }
    h.ring(1);
    assert_eq!(
        h.model().commands().len(),
        fetched + 1,
        "room for one completion"
    );
    // Each head doorbell makes room for the next.
    for _ in 0..3 {
        assert_eq!(h.reap(1).len(), 1);
    }
    assert_eq!(h.model().commands().len(), fetched + 3);
}

#[test]
fn fatal_after_fails_the_controller() {
    let mut h = Harness::new();
    h.create_pair(1, 8, None);
    h.model().set_fatal_after(2);
    for _ in 0..3 {
        h.push(1, io(FLUSH, 1, 0, 1));
    }
    h.ring(1);
    assert_eq!(h.reap(1).len(), 2);
    assert!(h.csts().contains(Status::CFS));
    assert_eq!(h.model().flushes(), 2);
}

#[test]
fn reset_drops_queues_and_features_but_keeps_data() {
    let mut h = Harness::new();
    h.create_pair(1, 8, None);
    h.model().namespace_write(2, 7, &[5; 4096]);
    h.bar.write32(CC as usize, 0).unwrap();
    assert_eq!(h.csts(), Status::empty());
    assert!(!h.model().queue_exists(1) && !h.model().queue_exists(0));
    h.queues.retain(|&id, _| id == 0);
    let admin_queue = h.queues.get_mut(&0).unwrap();
    (admin_queue.head, admin_queue.tail, admin_queue.phase) = (0, 0, true);
    admin_queue.cq.fill(0);
    h.enable();
    h.create_pair(1, 8, None);
    assert_eq!(h.model().namespace_read(2, 7, 1), vec![5; 4096]);
}

#[test]
fn interrupts_go_to_the_queue_vector() {
    let mut h = Harness::new();
    h.model().set_msix_vectors(4);
    assert_eq!(h.backend.interrupt_count(IrqMode::MsiX).unwrap(), 4);
    let vectors = h.backend.enable_interrupts(IrqMode::MsiX, 4).unwrap();
    let memory = h.buffer(PAGE).iova();
    let status = h.admin(create_cq(1, 8, memory, Some(4))).status;
    assert_eq!(status, specific(sc::INVALID_INTERRUPT_VECTOR));
    h.create_pair(1, 8, Some(3));
    h.submit(1, io(FLUSH, 1, 0, 1));
    assert_eq!(h.model().interrupts_raised(3), 1);
    assert_eq!(vectors[3].poll().unwrap(), 1);
    // The admin queue is vector 0: one completion for each of the three commands.
    assert_eq!(h.model().interrupts_raised(0), 3);
}

#[test]
fn bogus_status_replaces_the_next_completion_only() {
    let mut h = Harness::new();
    h.create_pair(1, 8, None);
    h.model().set_bogus_status(generic(sc::LBA_OUT_OF_RANGE));
    assert_eq!(
        h.submit(1, io(FLUSH, 1, 0, 1)).status,
        generic(sc::LBA_OUT_OF_RANGE)
    );
    assert!(h.submit(1, io(FLUSH, 1, 0, 1)).status.is_success());
}

fn garbage_entry() -> impl Strategy<Value = (SubmissionEntry, bool, bool)> {
    let opcode = prop_oneof![
        prop::sample::select(vec![
            0x00u8, 0x01, 0x02, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0a, 0x0c
        ]),
        any::<u8>()
    ];
    (opcode, any::<[u32; 16]>(), any::<bool>(), any::<bool>()).prop_map(
        |(opcode, words, real_prp1, real_prp2)| {
            let mut entry = SubmissionEntry::new(opcode);
            for (index, &word) in words.iter().enumerate().skip(1) {
                entry = entry.with_dword(index, word);
            }
            (entry, real_prp1, real_prp2)
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the driver writes, the model answers or fails the controller; it never
    /// panics.
    #[test]
    fn garbage_never_panics(
        entries in prop::collection::vec((garbage_entry(), 0u16..2), 1..12),
        doorbells in prop::collection::vec((0usize..0x3000, any::<u32>()), 0..8),
    ) {
        let mut h = Harness::new();
        h.create_pair(1, 8, Some(1));
        let memory = h.buffer(4 * PAGE);
        for ((entry, real_prp1, real_prp2), queue_id) in entries {
            // Some data pointers land in mapped memory, at random offsets.
            let mut entry = entry;
            if real_prp1 {
                entry = entry.with_prp1(memory.iova() + (entry.prp1() % (4 * PAGE as u64)));
            }
            if real_prp2 {
                entry = entry.with_prp2(memory.iova() + (entry.prp2() % (4 * PAGE as u64)));
            }
            h.push(queue_id, entry);
            h.ring(queue_id);
            h.reap(queue_id);
        }
        for (offset, value) in doorbells {
            h.bar.write32(0x1000 + (offset & !3), value).unwrap();
        }
        let _ = h.model().commands();
    }
}

/// Plausible commands: known opcodes, mostly small values (queue IDs, sizes, namespaces,
/// LBAs) with some of any, a queue of the test's three, and a knob to flip first.
fn plausible_entry() -> impl Strategy<Value = (u8, [u32; 8], u16, u8)> {
    let opcode = prop::sample::select(vec![
        0x00u8, 0x01, 0x02, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0a, 0x0c,
    ]);
    let field = prop_oneof![4 => 0u32..5, 1 => 0u32..0x40, 1 => any::<u32>()];
    (opcode, prop::array::uniform8(field), 0u16..3, 0u8..8)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Commands that reach deep into queue management and data transfer, with data
    /// pointers into memory full of PRP entries (half of them pointing back into it).
    #[test]
    fn plausible_commands_never_panic(
        commands in prop::collection::vec(plausible_entry(), 1..24),
        prp_entries in prop::collection::vec((any::<bool>(), 0u64..0x8000), 64),
    ) {
        let mut h = Harness::new();
        h.create_pair(1, 4, Some(1));
        h.create_sized_pair(2, 8, 2, None);
        let memory = h.buffer(8 * PAGE);
        for (slot, &(inside, value)) in prp_entries.iter().cycle().take(8 * PAGE / 8).enumerate() {
            let value = if inside { memory.iova() + (value & !0xfff) } else { value };
            memory.write(slot * 8, &value.to_le_bytes()).unwrap();
        }
        for (opcode, fields, queue_id, knob) in commands {
            let [nsid, cdw10, cdw10_high, cdw11, cdw11_high, cdw12, prp1, prp2] = fields;
            // Page-aligned pointers are likely (queue bases), odd ones possible.
            let pointer = |value: u32| memory.iova() + u64::from(value % 0x20) * 1024;
            let entry = SubmissionEntry::new(opcode)
                .with_namespace_id(nsid)
                .with_prp1(pointer(prp1))
                .with_prp2(pointer(prp2) + u64::from(cdw12 % 2) * 8)
                // Admin commands take queue sizes, CQ IDs and vectors from the upper
                // halves; for I/O, CDW10 and CDW11 are the LBA, so mostly small.
                .with_dword(10, match queue_id {
                    0 => cdw10 | (cdw10_high << 16),
                    _ => cdw10,
                })
                .with_dword(11, match queue_id {
                    0 => cdw11 | (cdw11_high << 16),
                    _ => cdw11 & cdw11_high,
                })
                .with_dword(12, cdw12);
            match knob {
                0 => h.model().set_hold_completions(true),
                1 => h.model().set_hold_completions(false),
                2 => h.model().set_reorder_completions(cdw12 % 2 == 0),
                3 => h.model().set_mdts((cdw12 % 4) as u8),
                _ => {}
            }
            h.push(queue_id, entry);
            h.ring(queue_id);
            h.reap(queue_id);
        }
    }
}

fn doorbell_buffer_config(shadow: u64, event_index: u64) -> SubmissionEntry {
    SubmissionEntry::doorbell_buffer_config(shadow, event_index)
}

fn u32_at(page: &DmaBuffer, at: usize) -> u32 {
    let mut bytes = [0u8; 4];
    page.read(at, &mut bytes).unwrap();
    u32::from_le_bytes(bytes)
}

#[test]
fn doorbell_buffer_config_checks_its_pages_and_shadows_move_the_queues() {
    let mut h = Harness::new();
    let shadow = h.buffer(PAGE);
    let event_index = h.buffer(PAGE);
    let invalid = generic(sc::INVALID_FIELD);
    for (prp1, prp2) in [
        (0, event_index.iova()),
        (shadow.iova(), 0),
        (shadow.iova() + 4, event_index.iova()),
        (shadow.iova(), event_index.iova() + 512),
    ] {
        assert_eq!(h.admin(doorbell_buffer_config(prp1, prp2)).status, invalid);
    }
    assert_eq!(h.model().shadow_doorbell_pages(), None);
    let config = doorbell_buffer_config(shadow.iova(), event_index.iova());
    assert_eq!(h.admin(config).status, CompletionStatus::SUCCESS);
    assert_eq!(h.model().doorbell_buffer_configs(), 1);
    // The admin SQ shadow starts at its tail (SQ 0 at 0, CQ 0 at 4).
    assert_eq!(u32_at(&shadow, 0), u32::from(h.queues[&0].tail));

    h.create_pair(1, 8, None);
    let (sq_mmio, _) = h.model().mmio_doorbell_writes(1);
    // Two commands announced through the shadow only (SQ 1 tail at 8).
    h.push(1, io(FLUSH, 1, 0, 1));
    h.push(1, io(FLUSH, 1, 0, 1));
    shadow.write(8, &2u32.to_le_bytes()).unwrap();
    assert_eq!(h.model().flushes(), 0, "not looked at yet");
    h.model().process_shadow_doorbells();
    assert_eq!(h.model().flushes(), 2);
    assert_eq!(u32_at(&event_index, 8), 2, "event index: the tail it saw");
    assert_eq!(h.reap(1).len(), 2);
    // Any register access also makes the model look.
    h.push(1, io(FLUSH, 1, 0, 1));
    shadow.write(8, &3u32.to_le_bytes()).unwrap();
    h.csts();
    assert_eq!(h.model().flushes(), 3);
    assert_eq!(h.model().mmio_doorbell_writes(1).0, sq_mmio, "no SQ MMIO");
    // An MMIO write still works, and lands in the shadow too.
    h.push(1, io(FLUSH, 1, 0, 1));
    h.ring(1);
    assert_eq!(h.model().flushes(), 4);
    assert_eq!(u32_at(&shadow, 8), 4);
    assert_eq!(h.reap(1).len(), 2);

    // Garbage in the shadow is ignored like a bad doorbell.
    shadow.write(8, &0xffffu32.to_le_bytes()).unwrap();
    shadow.write(12, &0x1234u32.to_le_bytes()).unwrap();
    h.model().process_shadow_doorbells();
    assert_eq!(h.model().flushes(), 4);

    // Ignored shadows: only MMIO moves the queue.
    h.model().set_ignore_shadow(true);
    h.push(1, io(FLUSH, 1, 0, 1));
    shadow.write(8, &5u32.to_le_bytes()).unwrap();
    h.model().process_shadow_doorbells();
    assert_eq!(h.model().flushes(), 4);
    h.ring(1);
    assert_eq!(h.model().flushes(), 5);
    assert_eq!(u32_at(&event_index, 8), 4, "event index left alone");

    // A reset forgets the pages.
    h.bar.write32(CC as usize, 0).unwrap();
    assert_eq!(h.model().shadow_doorbell_pages(), None);
}

#[test]
fn doorbell_buffer_config_is_an_invalid_opcode_unless_offered() {
    let mut h = Harness::new();
    h.model().set_shadow_doorbells(false);
    let page = h.buffer(PAGE);
    let config = doorbell_buffer_config(page.iova(), page.iova());
    assert_eq!(h.admin(config).status, generic(sc::INVALID_OPCODE));
}
