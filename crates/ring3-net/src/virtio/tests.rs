//! The driver against the virtio-net model.

use std::time::Duration;

use proptest::prelude::*;
use ring3::fake::FakeBackend;
use ring3::Backend;

use super::model::{self, fake_virtio_net, Corruption, Knobs, VirtioNetModel};
use super::pci::status;
use super::{features, VirtioNet, VirtioOptions, VirtioQueue, MAX_FRAME};
use crate::{Error, NetDevice, NetQueue, Packet};

type Nic = VirtioNet<FakeBackend<VirtioNetModel>>;
type Queue = VirtioQueue<FakeBackend<VirtioNetModel>>;

fn options(queue_pairs: u16, queue_size: u16) -> VirtioOptions {
    VirtioOptions {
        queue_pairs,
        queue_size,
        interrupts: false,
        mac: None,
    }
}

fn nic_with(knobs: Knobs, options: VirtioOptions) -> (Nic, std::sync::Arc<VirtioNetModel>) {
    let backend = fake_virtio_net("virtio-net0", knobs);
    let model = backend.model().clone();
    let nic = VirtioNet::new(backend, options).expect("the driver brings the model up");
    (nic, model)
}

/// A frame of `len` bytes whose payload encodes `seq`.
fn frame(seq: u32, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    bytes[..6].fill(0xff);
    bytes[6..12].copy_from_slice(&model::MODEL_MAC);
    bytes[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    for (i, byte) in bytes[14..].iter_mut().enumerate() {
        *byte = (seq as usize).wrapping_mul(31).wrapping_add(i) as u8;
    }
    if len >= 18 {
        bytes[14..18].copy_from_slice(&seq.to_le_bytes());
    }
    bytes
}

fn send(queue: &mut Queue, frames: &[Vec<u8>]) -> usize {
    // As many as there are free buffers for.
    let mut packets: Vec<Packet> = frames
        .iter()
        .map_while(|bytes| {
            let mut packet = queue.alloc()?;
            queue.data_mut(&mut packet)[..bytes.len()].copy_from_slice(bytes);
            packet.set_len(bytes.len());
            Some(packet)
        })
        .collect();
    let sent = queue.transmit(&mut packets).expect("transmit");
    for packet in packets {
        queue.free(packet);
    }
    sent
}

fn receive_all(queue: &mut Queue, max: usize) -> Vec<Vec<u8>> {
    let mut packets = Vec::new();
    queue.receive(&mut packets, max).expect("receive");
    let frames = packets.iter().map(|p| queue.data(p).to_vec()).collect();
    for packet in packets {
        queue.free(packet);
    }
    frames
}

#[test]
fn init_follows_the_handshake_and_negotiates_only_what_the_driver_handles() {
    let (nic, model) = nic_with(Knobs::default(), options(1, 64));
    let wanted = model.driver_features();
    assert_eq!(
        wanted,
        features::F_VERSION_1
            | features::F_ACCESS_PLATFORM
            | features::NET_F_MAC
            | features::NET_F_STATUS
            | features::NET_F_SPEED_DUPLEX,
        "no offloads, no merged buffers, no event index, no MQ for one pair: {wanted:#x}"
    );
    assert_eq!(nic.negotiated_features(), wanted);
    let expected = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
    assert_eq!(model.status(), expected);
    assert_eq!(model.resets(), 1);
    assert_eq!(nic.mac(), model::MODEL_MAC);
    assert_eq!(nic.max_frame(), MAX_FRAME);
    assert_eq!(nic.queue_count(), 1);
    let link = nic.link().unwrap();
    assert!(link.up);
    assert_eq!(link.speed_mbps, Some(10_000));
    assert_eq!(link.full_duplex, Some(true));
    assert_eq!(model.queue_setup(0), Some((64, 0xffff, true)));
    assert_eq!(model.queue_setup(1), Some((64, 0xffff, true)));
    assert!(model.errors().is_empty(), "{:?}", model.errors());
    drop(nic);
    assert_eq!(model.status(), 0, "dropping the driver resets the device");
}

#[test]
fn link_down_and_configured_mac_are_reported() {
    let knobs = Knobs {
        link_up: false,
        ..Knobs::default()
    };
    let mac = [0x02, 1, 2, 3, 4, 5];
    let (nic, _model) = nic_with(
        knobs,
        VirtioOptions {
            mac: Some(mac),
            ..options(1, 16)
        },
    );
    assert!(!nic.link().unwrap().up);
    assert_eq!(nic.mac(), mac);
}

#[test]
fn a_device_without_a_mac_gets_a_locally_administered_one() {
    let knobs = Knobs {
        features: model::DEFAULT_FEATURES & !features::NET_F_MAC & !features::NET_F_STATUS,
        ..Knobs::default()
    };
    let (nic, _model) = nic_with(knobs, options(1, 16));
    let mac = nic.mac();
    assert_eq!(
        mac[0] & 0x03,
        0x02,
        "locally administered unicast: {mac:02x?}"
    );
    assert!(
        nic.link().unwrap().up,
        "without a status field the link is up"
    );
}

#[test]
fn a_device_without_version_1_is_refused() {
    let backend = fake_virtio_net(
        "legacy",
        Knobs {
            features: model::DEFAULT_FEATURES & !features::F_VERSION_1,
            ..Knobs::default()
        },
    );
    let error = VirtioNet::new(backend, options(1, 16)).unwrap_err();
    assert!(matches!(error, Error::Unsupported { .. }), "{error}");
    assert!(error.to_string().contains("VERSION_1"), "{error}");
}

#[test]
fn a_device_that_clears_features_ok_is_refused() {
    let backend = fake_virtio_net(
        "picky",
        Knobs {
            refuse_features: true,
            ..Knobs::default()
        },
    );
    let model = backend.model().clone();
    let error = VirtioNet::new(backend, options(1, 16)).unwrap_err();
    assert!(error.to_string().contains("FEATURES_OK"), "{error}");
    assert_eq!(model.status(), 0, "the failed device is reset");
}

#[test]
fn a_reset_that_never_finishes_times_out() {
    let backend = fake_virtio_net(
        "stuck",
        Knobs {
            never_reset: true,
            ..Knobs::default()
        },
    );
    // The model starts in status 0; make the reset the driver waits for observable.
    backend.model().knobs(|_| {});
    let model = backend.model().clone();
    // A device that is stuck mid-life: set a status the reset must clear.
    let bar = backend.bar(model::BAR).unwrap();
    bar.write::<u8>(0x14, status::ACKNOWLEDGE).unwrap();
    let error = VirtioNet::new(backend, options(1, 16)).unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error}");
    assert!(error.to_string().contains("device_status"), "{error}");
    assert!(model.resets() >= 1);
}

#[test]
fn bad_options_and_bad_capabilities_are_errors() {
    let backend = fake_virtio_net("opts", Knobs::default());
    assert!(matches!(
        VirtioNet::new(backend, options(1, 100)),
        Err(Error::InvalidArgument(_))
    ));
    let backend = fake_virtio_net("opts", Knobs::default());
    assert!(VirtioNet::new(backend, options(0, 16)).is_err());

    // The common structure claimed beyond the end of its BAR.
    let backend = fake_virtio_net("caps", Knobs::default());
    let offset_field = model::COMMON_CAPABILITY + 8;
    backend.set_config(offset_field, &0x3ff0u32.to_le_bytes());
    let error = VirtioNet::new(backend, options(1, 16)).unwrap_err();
    assert!(matches!(error, Error::Misbehaved { .. }), "{error}");
    assert!(
        error.to_string().contains("common configuration"),
        "{error}"
    );

    // A capability list that loops.
    let backend = fake_virtio_net("loop", Knobs::default());
    backend.set_config(
        model::NOTIFY_CAPABILITY + 1,
        &[model::COMMON_CAPABILITY as u8],
    );
    let error = VirtioNet::new(backend, options(1, 16)).unwrap_err();
    assert!(error.to_string().contains("does not end"), "{error}");

    // No notify capability at all (its type changed to an unknown one).
    let backend = fake_virtio_net("nonotify", Knobs::default());
    backend.set_config(model::NOTIFY_CAPABILITY + 3, &[0x7f]);
    let error = VirtioNet::new(backend, options(1, 16)).unwrap_err();
    assert!(matches!(error, Error::Unsupported { .. }), "{error}");
}

#[test]
fn the_queue_size_is_capped_by_the_device() {
    let knobs = Knobs {
        max_queue_size: 32,
        ..Knobs::default()
    };
    let (mut nic, model) = nic_with(knobs, options(1, 1024));
    assert_eq!(model.queue_setup(0).map(|s| s.0), Some(32));
    let queue = nic.take_queue(0).unwrap();
    assert_eq!(queue.ring_size(), 32);
    assert!(nic.take_queue(0).is_err(), "a queue is taken once");
    assert!(nic.take_queue(1).is_err());
}

#[test]
fn frames_go_out_and_come_back_through_the_loopback() {
    let (mut nic, model) = nic_with(Knobs::default(), options(1, 64));
    let mut queue = nic.take_queue(0).unwrap();
    let frames: Vec<Vec<u8>> = (0..10).map(|i| frame(i, 60 + i as usize * 100)).collect();
    assert_eq!(send(&mut queue, &frames), 10);
    let sent: Vec<Vec<u8>> = model.sent().into_iter().map(|(_, f)| f).collect();
    assert_eq!(sent, frames, "the device read exactly the frames");
    let received = receive_all(&mut queue, 64);
    assert_eq!(received, frames);
    let stats = queue.stats();
    assert_eq!((stats.tx_packets, stats.rx_packets), (10, 10));
    assert_eq!(
        stats.rx_bytes,
        frames.iter().map(|f| f.len() as u64).sum::<u64>()
    );
    assert!(model.errors().is_empty(), "{:?}", model.errors());
    // One notify for the batch (plus the initial RX post).
    assert_eq!(model.notifications(1), 1);
}

#[test]
fn the_rings_wrap_many_times() {
    let (mut nic, model) = nic_with(Knobs::default(), options(1, 8));
    let mut queue = nic.take_queue(0).unwrap();
    let mut expected = 0u32;
    for round in 0..200u32 {
        let batch = (round % 7 + 1) as usize;
        let frames: Vec<Vec<u8>> = (0..batch as u32)
            .map(|i| frame(round * 10 + i, 64 + (i as usize * 37) % 1400))
            .collect();
        assert_eq!(send(&mut queue, &frames), batch);
        let received = receive_all(&mut queue, 16);
        assert_eq!(received, frames, "round {round}");
        expected += batch as u32;
    }
    assert_eq!(queue.stats().rx_packets, u64::from(expected));
    assert!(model.errors().is_empty(), "{:?}", model.errors());
}

#[test]
fn a_full_ring_leaves_the_rest_with_the_caller() {
    let knobs = Knobs {
        loopback: false,
        ..Knobs::default()
    };
    let (mut nic, model) = nic_with(knobs, options(1, 8));
    let mut queue = nic.take_queue(0).unwrap();
    // The model completes transmits at once, so fill the ring by sending more than it.
    let mut packets: Vec<Packet> = (0..12)
        .map(|i| {
            let bytes = frame(i, 100);
            let mut packet = queue.alloc().unwrap();
            queue.data_mut(&mut packet)[..100].copy_from_slice(&bytes);
            packet.set_len(100);
            packet
        })
        .collect();
    assert_eq!(queue.transmit(&mut packets).unwrap(), 8);
    assert_eq!(packets.len(), 4, "the four that did not fit stay");
    assert_eq!(queue.stats().tx_busy, 4);
    assert_eq!(
        queue.transmit(&mut packets).unwrap(),
        4,
        "reclaimed, so they fit now"
    );
    assert_eq!(model.sent().len(), 12);
}

#[test]
fn frames_of_bad_length_are_refused_before_anything_is_sent() {
    let (mut nic, model) = nic_with(Knobs::default(), options(1, 8));
    let mut queue = nic.take_queue(0).unwrap();
    let mut good = queue.alloc().unwrap();
    good.set_len(60);
    let mut huge = queue.alloc().unwrap();
    huge.set_len(MAX_FRAME + 1);
    let mut packets = vec![good, huge];
    assert!(matches!(
        queue.transmit(&mut packets),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(packets.len(), 2);
    assert!(model.sent().is_empty());
    for packet in packets {
        queue.free(packet);
    }
}

#[test]
fn receive_hands_out_at_most_max_and_keeps_the_rest() {
    let (mut nic, _model) = nic_with(Knobs::default(), options(1, 32));
    let mut queue = nic.take_queue(0).unwrap();
    let frames: Vec<Vec<u8>> = (0..20).map(|i| frame(i, 64)).collect();
    send(&mut queue, &frames);
    let first = receive_all(&mut queue, 5);
    let rest = receive_all(&mut queue, 100);
    assert_eq!(first, frames[..5]);
    assert_eq!(rest, frames[5..]);
}

#[test]
fn frames_arriving_without_posted_buffers_wait_in_the_device() {
    let knobs = Knobs {
        loopback: false,
        ..Knobs::default()
    };
    let (mut nic, model) = nic_with(knobs, options(1, 4));
    let mut queue = nic.take_queue(0).unwrap();
    for i in 0..6 {
        model.inject(0, &frame(i, 80));
    }
    // Only four buffers were posted; the caller keeps them, the pool refills the ring and
    // its notification lets the device deliver the two that waited.
    let mut held = Vec::new();
    assert_eq!(queue.receive(&mut held, 64).unwrap(), 4);
    model.inject(0, &frame(6, 80));
    let mut more = Vec::new();
    assert_eq!(queue.receive(&mut more, 64).unwrap(), 3);
    let seqs: Vec<u32> = held
        .iter()
        .chain(&more)
        .map(|p| u32::from_le_bytes(queue.data(p)[14..18].try_into().unwrap()))
        .collect();
    assert_eq!(seqs, (0..7).collect::<Vec<_>>());
}

#[test]
fn runt_frames_are_dropped_and_counted() {
    let knobs = Knobs {
        loopback: false,
        ..Knobs::default()
    };
    let (mut nic, model) = nic_with(knobs, options(1, 8));
    let mut queue = nic.take_queue(0).unwrap();
    model.inject(0, &[1, 2, 3]);
    model.inject(0, &frame(1, 64));
    let received = receive_all(&mut queue, 8);
    assert_eq!(received, vec![frame(1, 64)]);
    assert_eq!(queue.stats().rx_drops, 1);
}

fn corrupted(corruption: Corruption, on_transmit: bool) -> (Error, Queue) {
    let (mut nic, model) = nic_with(Knobs::default(), options(1, 16));
    let mut queue = nic.take_queue(0).unwrap();
    send(&mut queue, &[frame(0, 64)]);
    receive_all(&mut queue, 8);
    model.knobs(|k| {
        k.corruption = Some(corruption);
        k.loopback = !on_transmit;
    });
    let result = if on_transmit {
        // The corrupted completion is seen when the next transmit reclaims.
        let mut packet = queue.alloc().unwrap();
        packet.set_len(64);
        let mut packets = vec![packet];
        queue.transmit(&mut packets).map(|_| ()).and_then(|_| {
            let mut again = vec![];
            queue.transmit(&mut again).map(|_| ())
        })
    } else {
        model.inject(0, &frame(1, 64));
        let mut packets = Vec::new();
        queue.receive(&mut packets, 8).map(|_| ())
    };
    let error = result.expect_err("the corruption is caught");
    drop(nic);
    (error, queue)
}

#[test]
fn a_used_index_too_far_ahead_is_misbehaviour() {
    for on_transmit in [false, true] {
        let (error, mut queue) = corrupted(Corruption::UsedIndexJump(100), on_transmit);
        assert!(matches!(error, Error::Misbehaved { .. }), "{error}");
        assert!(error.to_string().contains("used index"), "{error}");
        assert_eq!(queue.stats().errors, 1);
        let mut packets = Vec::new();
        assert!(
            queue.receive(&mut packets, 8).is_err(),
            "the queue stays stopped"
        );
    }
}

#[test]
fn a_used_id_out_of_range_or_not_in_flight_is_misbehaviour() {
    // Every receive descriptor is posted, so only IDs past the ring are wrong there; on
    // the transmit ring, descriptor 3 was never used.
    for (id, on_transmit) in [(16, false), (0xffff_ffff, false), (16, true), (3, true)] {
        {
            let (error, _queue) = corrupted(Corruption::Id(id), on_transmit);
            assert!(matches!(error, Error::Misbehaved { .. }), "{id}: {error}");
            assert!(error.to_string().contains("not the head"), "{error}");
        }
    }
}

#[test]
fn a_length_beyond_the_buffer_or_short_of_the_header_is_misbehaviour() {
    for len in [2049, 11, u32::MAX] {
        let (error, _queue) = corrupted(Corruption::Length(len), false);
        assert!(matches!(error, Error::Misbehaved { .. }), "{len}: {error}");
        assert!(error.to_string().contains("length"), "{error}");
    }
}

#[test]
fn multiqueue_sets_the_pairs_and_keeps_queues_apart() {
    let (mut nic, model) = nic_with(Knobs::default(), options(3, 16));
    assert_eq!(nic.queue_count(), 3);
    assert_eq!(model.pairs_active(), 3, "VQ_PAIRS_SET reached the device");
    let negotiated = model.driver_features();
    assert_ne!(negotiated & features::NET_F_MQ, 0);
    assert_ne!(negotiated & features::NET_F_CTRL_VQ, 0);
    let mut queues: Vec<Queue> = (0..3).map(|i| nic.take_queue(i).unwrap()).collect();
    for (i, queue) in queues.iter_mut().enumerate() {
        let frames: Vec<Vec<u8>> = (0..5).map(|n| frame(i as u32 * 100 + n, 90)).collect();
        send(queue, &frames);
        assert_eq!(receive_all(queue, 16), frames, "pair {i}");
    }
    let pairs: Vec<u16> = model.sent().iter().map(|(p, _)| *p).collect();
    assert_eq!(pairs, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
    assert!(model.errors().is_empty(), "{:?}", model.errors());
}

#[test]
fn more_pairs_than_the_device_has_are_capped_and_without_mq_there_is_one() {
    let knobs = Knobs {
        max_pairs: 2,
        ..Knobs::default()
    };
    let (nic, model) = nic_with(knobs, options(8, 16));
    assert_eq!(nic.queue_count(), 2);
    assert_eq!(model.pairs_active(), 2);

    let knobs = Knobs {
        features: model::DEFAULT_FEATURES & !features::NET_F_MQ,
        ..Knobs::default()
    };
    let (nic, model) = nic_with(knobs, options(4, 16));
    assert_eq!(nic.queue_count(), 1);
    assert_eq!(model.driver_features() & features::NET_F_CTRL_VQ, 0);
}

#[test]
fn interrupts_wake_the_waiting_queue() {
    let (mut nic, model) = nic_with(
        Knobs::default(),
        VirtioOptions {
            interrupts: true,
            ..options(2, 16)
        },
    );
    assert_eq!(model.queue_setup(0).map(|s| s.1), Some(0));
    assert_eq!(model.queue_setup(3).map(|s| s.1), Some(1));
    let mut queue = nic.take_queue(1).unwrap();
    // Nothing pending: the wait times out quietly.
    queue.wait(Duration::from_millis(10)).unwrap();
    model.knobs(|k| k.loopback = false);
    model.inject(1, &frame(5, 64));
    let start = std::time::Instant::now();
    queue.wait(Duration::from_secs(5)).unwrap();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(receive_all(&mut queue, 8), vec![frame(5, 64)]);
}

#[test]
fn a_device_that_wants_no_notifications_gets_none() {
    let knobs = Knobs {
        no_notify: true,
        ..Knobs::default()
    };
    let (mut nic, model) = nic_with(knobs, options(1, 16));
    let mut queue = nic.take_queue(0).unwrap();
    let before = model.notifications(1);
    send(&mut queue, &[frame(0, 64)]);
    assert_eq!(model.notifications(1), before, "suppressed");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Any sequence of batch sizes and frame lengths comes back intact and in order.
    #[test]
    fn batches_come_back_in_order(
        batches in proptest::collection::vec(
            proptest::collection::vec(14usize..=MAX_FRAME, 1..20), 1..20),
        queue_size in prop_oneof![Just(4u16), Just(16), Just(64)],
    ) {
        let (mut nic, model) = nic_with(Knobs::default(), options(1, queue_size));
        let mut queue = nic.take_queue(0).unwrap();
        let mut seq = 0;
        for lengths in batches {
            let frames: Vec<Vec<u8>> = lengths
                .iter()
                .map(|&len| { seq += 1; frame(seq, len) })
                .collect();
            let mut sent = 0;
            let mut received = Vec::new();
            while sent < frames.len() {
                sent += send(&mut queue, &frames[sent..]);
                received.extend(receive_all(&mut queue, 1000));
            }
            received.extend(receive_all(&mut queue, 1000));
            prop_assert_eq!(received, frames);
        }
        prop_assert!(model.errors().is_empty());
    }

    /// Whatever a used element says, the driver returns an error or a frame inside its
    /// buffer, and never panics.
    #[test]
    fn arbitrary_used_elements_never_panic(id in any::<u32>(), len in any::<u32>(), jump in 0u16..3) {
        let (mut nic, model) = nic_with(
            Knobs { loopback: false, ..Knobs::default() },
            options(1, 8),
        );
        let mut queue = nic.take_queue(0).unwrap();
        let corruption = match jump {
            0 => Corruption::Id(id),
            1 => Corruption::Length(len),
            _ => Corruption::UsedIndexJump(id as u16),
        };
        model.knobs(|k| k.corruption = Some(corruption));
        model.inject(0, &frame(1, 64));
        let mut packets = Vec::new();
        if queue.receive(&mut packets, 8).is_ok() {
            for packet in &packets {
                prop_assert!(queue.data(packet).len() <= 2048);
            }
        }
    }
}

#[test]
fn the_16_bit_ring_indices_wrap() {
    let (mut nic, model) = nic_with(Knobs::default(), options(1, 4));
    let mut queue = nic.take_queue(0).unwrap();
    // Past 65536 available and used entries on both rings.
    let frames: Vec<Vec<u8>> = (0..4).map(|i| frame(i, 60)).collect();
    for round in 0..16_500 {
        assert_eq!(send(&mut queue, &frames), 4, "round {round}");
        assert_eq!(receive_all(&mut queue, 8), frames, "round {round}");
    }
    assert_eq!(queue.stats().rx_packets, 66_000);
    assert!(model.errors().is_empty(), "{:?}", model.errors());
}
