//! The driver against the fake 82574L of `model.rs`.

use std::time::Duration;

use proptest::prelude::*;
use ring3::fake::FakeBackend;

use super::model::{self, offsets::*, E1000eModel, Mischief, MODEL_MAC};
use super::regs::{self, Ctrl, Interrupts, Rctl, Tctl};
use super::ring::rx;
use super::*;

type Nic = E1000e<FakeBackend<E1000eModel>>;
type Queue = E1000eQueue<FakeBackend<E1000eModel>>;

fn options(rx_ring: u16, tx_ring: u16, interrupts: bool) -> E1000eOptions {
    E1000eOptions {
        rx_ring,
        tx_ring,
        interrupts,
    }
}

fn nic_with(options: E1000eOptions, setup: impl FnOnce(&mut model::State)) -> Nic {
    E1000e::new(model::backend(setup), options).unwrap()
}

/// A frame to `dst` carrying `seq` in its payload, `len` bytes long.
fn frame(seq: u32, len: usize) -> Vec<u8> {
    let mut frame = vec![0u8; len];
    frame[..6].copy_from_slice(&MODEL_MAC);
    frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    for (i, byte) in frame[14..].iter_mut().enumerate() {
        *byte = (seq as usize).wrapping_mul(31).wrapping_add(i) as u8;
    }
    if len >= 18 {
        frame[14..18].copy_from_slice(&seq.to_le_bytes());
    }
    frame
}

fn build(queue: &mut Queue, bytes: &[u8]) -> Packet {
    let mut packet = queue.alloc().expect("a free buffer");
    queue.data_mut(&mut packet)[..bytes.len()].copy_from_slice(bytes);
    packet.set_len(bytes.len());
    packet
}

fn receive_all(queue: &mut Queue) -> Vec<Vec<u8>> {
    let mut packets = Vec::new();
    queue.receive(&mut packets, usize::MAX).unwrap();
    let frames = packets.iter().map(|p| queue.data(p).to_vec()).collect();
    for packet in packets {
        queue.free(packet);
    }
    frames
}

#[test]
fn init_follows_the_datasheet_and_programs_the_rings() {
    let mut nic = nic_with(options(64, 32, false), |_| {});
    let state = nic.backend().model().state();
    let writes: Vec<usize> = state.writes.iter().map(|(offset, _)| *offset).collect();
    // 4.6.1 before 4.6.2: interrupts masked, then the reset, then masked again.
    assert_eq!(writes[0], IMC);
    let reset = state
        .writes
        .iter()
        .position(|(o, v)| *o == CTRL && v & Ctrl::RST.bits() != 0)
        .unwrap();
    assert_eq!(reset, 1);
    assert_eq!(writes[2], IMC);
    // General configuration: link up, auto speed, nothing forced.
    let ctrl = Ctrl::from_bits_retain(state.reg(CTRL));
    assert!(ctrl.contains(Ctrl::SLU | Ctrl::ASDE));
    assert!(!ctrl.intersects(Ctrl::RST | Ctrl::FRCSPD | Ctrl::FRCDPLX | Ctrl::PHY_RST));
    // Multicast table cleared, legacy descriptors.
    for i in 0..regs::MULTICAST_TABLE_ENTRIES {
        assert_eq!(state.writes_to(MTA + 4 * i), 1, "MTA[{i}]");
    }
    assert_eq!(state.reg(RFCTL), 0);
    // Receive: the ring, all but one slot posted with one tail write, RCTL.
    assert_eq!(state.reg(RDLEN), 64 * 16);
    assert_eq!(state.reg(RDT), 63);
    assert_eq!(
        state
            .writes
            .iter()
            .filter(|(o, v)| *o == RDT && *v != 0)
            .count(),
        1
    );
    let rctl_at = writes.iter().position(|o| *o == RCTL).unwrap();
    let rdt_at = writes.iter().rposition(|o| *o == RDT).unwrap();
    assert!(rctl_at < rdt_at, "RCTL before the buffers are handed over");
    assert_eq!(
        Rctl::from_bits_retain(state.reg(RCTL)),
        Rctl::EN | Rctl::BAM | Rctl::SECRC,
        "2048-byte buffers, legacy type, no promiscuous or long packets"
    );
    // Transmit: ring, TIPG, TCTL.
    assert_eq!(state.reg(TDLEN), 32 * 16);
    assert_eq!(state.reg(TDT), 0);
    assert_eq!(state.reg(TIPG), 0x0060_2008);
    let tctl = state.reg(TCTL);
    assert!(Tctl::from_bits_retain(tctl).contains(Tctl::EN | Tctl::PSP));
    assert_eq!((tctl >> 4) & 0xff, 0x0f, "CT");
    assert_eq!((tctl >> 12) & 0x3ff, 0x3f, "COLD");
    // Polling: no cause unmasked.
    assert_eq!(state.reg(IMS), 0);
    drop(state);
    assert_eq!(nic.mac(), MODEL_MAC);
    assert_eq!(nic.max_frame(), 1514);
    assert_eq!(nic.queue_count(), 1);
    assert_eq!(
        nic.link().unwrap(),
        LinkStatus {
            up: true,
            speed_mbps: Some(1000),
            full_duplex: Some(true)
        }
    );
    let queue = nic.take_queue(0).unwrap();
    assert!(nic.take_queue(0).is_err(), "one queue pair, taken once");
    assert!(nic.take_queue(1).is_err());
    assert_eq!(queue.free_buffers(), 2 * (64 + 32) - 63);
}

#[test]
fn the_mac_comes_from_the_nvm_when_rah0_is_not_valid() {
    let nic = nic_with(options(8, 8, false), |state| state.mac_only_in_nvm = true);
    assert_eq!(nic.mac(), MODEL_MAC);
    let state = nic.backend().model().state();
    assert_ne!(state.reg(RAH0) & regs::RAH_AV, 0, "written back as valid");
    assert_eq!(
        state.reg(RAL0),
        u32::from_le_bytes([0x52, 0x54, 0x00, 0x12])
    );
}

#[test]
fn a_reset_that_never_finishes_times_out_naming_ctrl() {
    let error = E1000e::new(
        model::backend(|state| state.stuck_in_reset = true),
        options(8, 8, false),
    )
    .unwrap_err();
    match error {
        Error::Timeout { what, waited, .. } => {
            assert!(what.contains("CTRL.RST"), "{what}");
            assert_eq!(waited, RESET_TIMEOUT);
        }
        other => panic!("expected a timeout, got {other}"),
    }
}

#[test]
fn bad_options_and_other_devices_are_refused() {
    for (rx_ring, tx_ring) in [(0, 8), (12, 8), (8, 4), (8, 8192)] {
        let error = E1000e::new(model::backend(|_| {}), options(rx_ring, tx_ring, false));
        assert!(
            matches!(error, Err(Error::InvalidArgument(_))),
            "{rx_ring}/{tx_ring}"
        );
    }
    let device = ring3::fake::FakeDevice {
        vendor_id: 0x8086,
        device_id: 0x100e,
        class_code: 0x02_00_00,
    };
    let backend = FakeBackend::new("e1000", device, |_| Nothing);
    assert!(matches!(
        E1000e::new(backend, E1000eOptions::default()),
        Err(Error::Unsupported { .. })
    ));
}

struct Nothing;
impl ring3::fake::DeviceModel for Nothing {
    fn bar_len(&self, _: u8) -> Option<usize> {
        Some(0x20000)
    }
    fn bar_read(&self, _: u8, _: u64, _: u8) -> u64 {
        0
    }
    fn bar_write(&self, _: u8, _: u64, _: u8, _: u64) {}
}

/// Sends `count` frames in batches of `batch`, receiving after each, and checks that
/// every one came back once, in order, intact.
fn loop_frames(queue: &mut Queue, count: u32, batch: usize, len: usize) {
    let mut next_sent = 0u32;
    let mut next_received = 0u32;
    while next_received < count {
        let mut packets = Vec::new();
        for seq in (next_sent..count).take(batch) {
            let Some(mut packet) = queue.alloc() else {
                break;
            };
            let bytes = frame(seq, len);
            queue.data_mut(&mut packet)[..len].copy_from_slice(&bytes);
            packet.set_len(len);
            packets.push(packet);
        }
        let offered = packets.len();
        let sent = queue.transmit(&mut packets).unwrap();
        assert!(sent <= offered);
        assert_eq!(packets.len(), offered - sent);
        for packet in packets.drain(..) {
            queue.free(packet);
        }
        next_sent += sent as u32;
        for bytes in receive_all(queue) {
            assert_eq!(bytes, frame(next_received, len), "frame {next_received}");
            next_received += 1;
        }
        assert!(next_received <= next_sent);
    }
}

#[test]
fn frames_loop_back_in_order_across_ring_wrap_around() {
    let mut nic = nic_with(options(8, 8, false), |_| {});
    let mut queue = nic.take_queue(0).unwrap();
    let free_at_start = queue.free_buffers();
    loop_frames(&mut queue, 100, 3, 64);
    loop_frames(&mut queue, 50, 7, 1514);
    loop_frames(&mut queue, 20, 1, 14);
    // Let the last transmit buffers come back.
    let mut none = Vec::new();
    queue.transmit(&mut none).unwrap();
    assert_eq!(queue.free_buffers(), free_at_start, "no buffer leaked");
    let stats = queue.stats();
    assert_eq!(stats.tx_packets, 170);
    assert_eq!(stats.rx_packets, 170);
    assert_eq!(stats.rx_bytes, 100 * 64 + 50 * 1514 + 20 * 14);
    assert_eq!(stats.rx_drops, 0);
    assert_eq!(stats.errors, 0);
    let state = nic.backend().model().state();
    assert_eq!(state.sent.len(), 170);
    assert!(nic.backend().dma_faults().is_empty());
}

#[test]
fn a_batch_larger_than_the_ring_leaves_the_rest_and_rings_once() {
    let mut nic = nic_with(options(32, 8, false), |state| state.loopback = false);
    let mut queue = nic.take_queue(0).unwrap();
    let mut packets: Vec<Packet> = (0..20)
        .map(|seq| build(&mut queue, &frame(seq, 60)))
        .collect();
    let tdt_writes = nic.backend().model().state().writes_to(TDT);
    assert_eq!(
        queue.transmit(&mut packets).unwrap(),
        7,
        "one slot stays empty"
    );
    assert_eq!(packets.len(), 13);
    assert_eq!(nic.backend().model().state().writes_to(TDT), tdt_writes + 1);
    assert_eq!(queue.stats().tx_busy, 13);
    // The device sent them all at the doorbell; the next call reclaims and sends 7 more.
    assert_eq!(queue.transmit(&mut packets).unwrap(), 7);
    assert_eq!(queue.transmit(&mut packets).unwrap(), 6);
    assert!(packets.is_empty());
    let state = nic.backend().model().state();
    let seqs: Vec<u32> = state
        .sent
        .iter()
        .map(|f| u32::from_le_bytes(f[14..18].try_into().unwrap()))
        .collect();
    assert_eq!(seqs, (0..20).collect::<Vec<_>>());
}

#[test]
fn receive_hands_out_at_most_max_and_refills_with_one_tail_write() {
    let mut nic = nic_with(options(16, 16, false), |_| {});
    let mut queue = nic.take_queue(0).unwrap();
    let mut packets: Vec<Packet> = (0..10)
        .map(|seq| build(&mut queue, &frame(seq, 100)))
        .collect();
    assert_eq!(queue.transmit(&mut packets).unwrap(), 10);
    let rdt_writes = nic.backend().model().state().writes_to(RDT);
    let mut received = Vec::new();
    assert_eq!(queue.receive(&mut received, 4).unwrap(), 4);
    assert_eq!(nic.backend().model().state().writes_to(RDT), rdt_writes + 1);
    assert_eq!(queue.receive(&mut received, 100).unwrap(), 6);
    assert_eq!(queue.receive(&mut received, 100).unwrap(), 0);
    for (seq, packet) in received.iter().enumerate() {
        assert_eq!(queue.data(packet), frame(seq as u32, 100));
    }
    let state = nic.backend().model().state();
    assert_eq!(
        state.reg(RDT),
        (state.reg(RDH) + 15) % 16,
        "all but one slot posted"
    );
}

#[test]
fn frames_without_a_free_descriptor_count_as_drops() {
    let mut nic = nic_with(options(8, 16, false), |_| {});
    let mut queue = nic.take_queue(0).unwrap();
    let mut packets: Vec<Packet> = (0..10)
        .map(|seq| build(&mut queue, &frame(seq, 60)))
        .collect();
    assert_eq!(queue.transmit(&mut packets).unwrap(), 10);
    let frames = receive_all(&mut queue);
    assert_eq!(frames.len(), 7, "7 buffers were posted");
    assert_eq!(queue.stats().rx_drops, 3);
    assert_eq!(
        queue.stats().rx_drops,
        3,
        "MPC is summed, not re-read as new"
    );
}

#[test]
fn frames_with_error_bits_or_too_short_are_dropped() {
    let mut nic = nic_with(options(8, 8, false), |state| {
        state.mischief = Mischief::RxErrors(rx::ERROR_CE)
    });
    let mut queue = nic.take_queue(0).unwrap();
    nic.backend().model().inject(&frame(1, 60));
    assert!(receive_all(&mut queue).is_empty());
    assert_eq!(queue.stats().errors, 1);
    assert_eq!(queue.stats().rx_drops, 1);
    nic.backend().model().state().mischief = Mischief::RxLength(10);
    nic.backend().model().inject(&frame(2, 60));
    assert!(receive_all(&mut queue).is_empty());
    assert_eq!(queue.stats().rx_drops, 2);
    nic.backend().model().state().mischief = Mischief::None;
    nic.backend().model().inject(&frame(3, 60));
    assert_eq!(receive_all(&mut queue), vec![frame(3, 60)]);
}

fn misbehaving(mischief: Mischief) -> (Nic, Queue) {
    let mut nic = nic_with(options(8, 8, false), |_| {});
    let queue = nic.take_queue(0).unwrap();
    nic.backend().model().state().mischief = mischief;
    (nic, queue)
}

fn assert_misbehaved(result: Result<usize>, needle: &str) {
    match result {
        Err(Error::Misbehaved { what, .. }) => assert!(what.contains(needle), "{what}"),
        other => panic!("expected Misbehaved({needle}), got {other:?}"),
    }
}

#[test]
fn a_length_beyond_the_buffer_is_misbehaviour_and_sticks() {
    let (nic, mut queue) = misbehaving(Mischief::RxLength(4000));
    nic.backend().model().inject(&frame(0, 60));
    let mut out = Vec::new();
    assert_misbehaved(queue.receive(&mut out, 8), "length 4000");
    assert!(out.is_empty());
    nic.backend().model().state().mischief = Mischief::None;
    assert_misbehaved(queue.receive(&mut out, 8), "needs a reset");
    assert_misbehaved(queue.transmit(&mut out), "needs a reset");
}

#[test]
fn a_frame_without_eop_is_misbehaviour() {
    let (nic, mut queue) = misbehaving(Mischief::RxNoEop);
    nic.backend().model().inject(&frame(0, 60));
    assert_misbehaved(queue.receive(&mut Vec::new(), 8), "without EOP");
}

#[test]
fn dd_on_a_slot_never_posted_is_misbehaviour() {
    let (nic, mut queue) = misbehaving(Mischief::RxDoneUnposted);
    nic.backend().model().inject(&frame(0, 60));
    let mut out = Vec::new();
    assert_misbehaved(queue.receive(&mut out, 8), "never posted");
}

#[test]
fn a_head_outside_the_ring_is_misbehaviour() {
    let (_nic, mut queue) = misbehaving(Mischief::HeadOutOfRange);
    match queue.wait(Duration::ZERO) {
        Err(Error::Misbehaved { what, .. }) => assert!(what.contains("RDH 11"), "{what}"),
        other => panic!("expected Misbehaved, got {other:?}"),
    }
}

#[test]
fn transmit_refuses_frames_of_bad_length_without_touching_the_ring() {
    let mut nic = nic_with(options(8, 8, false), |_| {});
    let mut queue = nic.take_queue(0).unwrap();
    let good = build(&mut queue, &frame(0, 60));
    let mut long = queue.alloc().unwrap();
    long.set_len(1515);
    let mut packets = vec![good, long];
    assert!(matches!(
        queue.transmit(&mut packets),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(packets.len(), 2);
    assert_eq!(nic.backend().model().state().reg(TDT), 0);
}

#[test]
fn msix_maps_both_queues_to_vector_0_and_wakes_the_waiter() {
    let mut nic = nic_with(options(8, 8, true), |_| {});
    {
        let state = nic.backend().model().state();
        let ivar = state.reg(IVAR);
        assert_eq!(regs::ivar::vector(ivar, regs::ivar::RXQ0_SHIFT), Some(0));
        assert_eq!(regs::ivar::vector(ivar, regs::ivar::TXQ0_SHIFT), Some(0));
        assert_eq!(regs::ivar::vector(ivar, regs::ivar::OTHER_SHIFT), Some(0));
        assert_eq!(ivar, 0x0008_0808);
        let queue_causes = (Interrupts::RXQ0 | Interrupts::TXQ0).bits();
        assert_eq!(state.reg(EIAC), queue_causes);
        assert_eq!(state.reg(IMS), queue_causes);
    }
    let mut queue = nic.take_queue(0).unwrap();
    // Nothing pending: the wait times out quietly.
    queue.wait(Duration::from_millis(5)).unwrap();
    let mut packets = vec![build(&mut queue, &frame(9, 64))];
    queue.transmit(&mut packets).unwrap();
    assert!(!nic.backend().model().state().messages.is_empty());
    let start = std::time::Instant::now();
    queue.wait(Duration::from_secs(5)).unwrap();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(receive_all(&mut queue), vec![frame(9, 64)]);
    // EIAC cleared the causes as the messages went out.
    assert_eq!(nic.backend().model().state().reg(ICR) & (1 << 20), 0);
}

#[test]
fn dropping_the_queue_stops_and_resets_the_device() {
    let mut nic = nic_with(options(8, 8, false), |_| {});
    let queue = nic.take_queue(0).unwrap();
    let resets = |nic: &Nic| {
        nic.backend()
            .model()
            .state()
            .writes
            .iter()
            .filter(|(o, v)| *o == CTRL && v & Ctrl::RST.bits() != 0)
            .count()
    };
    assert_eq!(resets(&nic), 1);
    drop(queue);
    assert_eq!(resets(&nic), 2);
    assert_eq!(nic.backend().model().state().reg(RCTL), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn any_batching_delivers_every_frame_once_in_order(
        ring in prop::sample::select(vec![8u16, 16, 32]),
        batches in prop::collection::vec((1usize..40, 14usize..=1514), 1..12),
    ) {
        let mut nic = nic_with(options(ring, ring, false), |_| {});
        let mut queue = nic.take_queue(0).unwrap();
        for (batch, len) in batches {
            loop_frames(&mut queue, batch as u32 * 2, batch, len);
        }
        prop_assert_eq!(queue.stats().rx_drops, 0);
        prop_assert!(nic.backend().dma_faults().is_empty());
    }
}
