//! Lab tests of the e1000e driver against QEMU's 82574L model (`-device e1000e`), inside
//! the lab VM (`cargo xtask test`).
//!
//! The VM's two e1000e NICs sit on the same QEMU hub as the virtio-nets, so a frame one
//! sends arrives at every other. The tests send numbered, checksummed frames from one
//! NIC to the other's MAC and check that each arrives exactly once, in order and intact,
//! both ways, at 64 and 1514 bytes, polling and with MSI-X; and the same between an
//! e1000e and a virtio-net. Frames of other senders are told apart by their ethertype
//! and a per-run ID.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring3::pci::{PciAddress, Sysfs};
use ring3::vfio::VfioBackend;
use ring3_net::e1000e::{E1000e, E1000eOptions};
use ring3_net::virtio::{VirtioNet, VirtioOptions};
use ring3_net::{NetDevice, NetQueue, Packet};

const E1000E: (u16, u16) = (0x8086, 0x10d3);
const VIRTIO_NET: (u16, u16) = (0x1af4, 0x1041);
/// IEEE 802 local experimental ethertype.
const ETHERTYPE: u16 = 0x88b5;
const FRAMES: u32 = 10_000;
/// Frames in flight at most: fewer than the receiver has buffers posted (255), so QEMU
/// never has to hold or drop a frame for want of a descriptor.
const WINDOW: u32 = 128;
const BATCH: usize = 32;
/// How long a transfer may go without progress before it fails.
const STALL: Duration = Duration::from_secs(5);

/// The tests share the two NICs: one at a time.
static NICS: Mutex<()> = Mutex::new(());

fn in_lab() {
    assert_eq!(
        std::env::var("RING3_LAB").as_deref(),
        Ok("1"),
        "lab tests run inside the lab VM: use `cargo xtask test`"
    );
}

/// A device bound to vfio-pci for the test, given back to its driver afterwards.
struct Bound(PciAddress);

impl Drop for Bound {
    fn drop(&mut self) {
        if let Err(error) = Sysfs::system().unbind_from_vfio(self.0) {
            eprintln!("giving {} back to its driver: {error}", self.0);
        }
    }
}

/// The devices with `ids` that are alone in their IOMMU groups, bound to vfio-pci.
fn bind_all(ids: (u16, u16)) -> Vec<Bound> {
    in_lab();
    let sysfs = Sysfs::system();
    sysfs
        .devices()
        .expect("listing PCI devices")
        .into_iter()
        .filter(|d| (d.vendor_id, d.device_id) == ids)
        .filter(|d| {
            d.iommu_group.is_some_and(|group| {
                sysfs
                    .iommu_group_devices(group)
                    .is_ok_and(|members| members.len() == 1)
            })
        })
        .map(|d| {
            sysfs
                .bind_to_vfio(d.address, true)
                .expect("binding a NIC to vfio-pci");
            Bound(d.address)
        })
        .collect()
}

fn two_e1000e() -> Vec<Bound> {
    let nics = bind_all(E1000E);
    assert_eq!(
        nics.len(),
        2,
        "the lab VM has two e1000e NICs: {:?}",
        nics.iter().map(|b| b.0).collect::<Vec<_>>()
    );
    nics
}

fn open_e1000e(bound: &Bound, interrupts: bool) -> E1000e<VfioBackend> {
    let backend = VfioBackend::open(&bound.0.to_string()).expect("opening the NIC through VFIO");
    let nic = E1000e::new(
        backend,
        E1000eOptions {
            rx_ring: 256,
            tx_ring: 256,
            interrupts,
        },
    )
    .expect("bringing the e1000e up");
    let link = nic
        .wait_for_link(Duration::from_secs(5))
        .expect("reading the link");
    assert!(link.up, "{}: link down: {link:?}", bound.0);
    nic
}

fn run_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    nanos ^ u64::from(std::process::id()) << 32
}

/// FNV-1a over the frame's payload.
fn checksum(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |hash, b| {
        (hash ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// Destination, source, ethertype, run ID (8), sequence (4), a pattern, checksum (last 4).
fn build(frame: &mut [u8], destination: [u8; 6], source: [u8; 6], run: u64, seq: u32) {
    frame[..6].copy_from_slice(&destination);
    frame[6..12].copy_from_slice(&source);
    frame[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    frame[14..22].copy_from_slice(&run.to_le_bytes());
    frame[22..26].copy_from_slice(&seq.to_le_bytes());
    let end = frame.len() - 4;
    for (i, byte) in frame[26..end].iter_mut().enumerate() {
        *byte = (seq.wrapping_mul(7) as usize).wrapping_add(i) as u8;
    }
    let sum = checksum(&frame[14..end]);
    frame[end..].copy_from_slice(&sum.to_le_bytes());
}

/// The sequence number of one of this run's frames, checked; `None` for others' frames.
fn parse(frame: &[u8], run: u64, len: usize) -> Option<u32> {
    if frame.len() < 26
        || frame[12..14] != ETHERTYPE.to_be_bytes()
        || frame[14..22] != run.to_le_bytes()
    {
        return None;
    }
    // QEMU pads short frames to 60 bytes; ours are at least 64.
    assert_eq!(frame.len(), len, "frame length");
    let end = len - 4;
    let seq = u32::from_le_bytes(frame[22..26].try_into().unwrap_or_default());
    let sum = u32::from_le_bytes(frame[end..].try_into().unwrap_or_default());
    assert_eq!(checksum(&frame[14..end]), sum, "frame {seq} corrupted");
    Some(seq)
}

/// Sends [`FRAMES`] frames of `len` bytes from `tx` to `rx` (whose MAC is `destination`),
/// checks each arrives once, in order, intact; returns frames per second.
fn transfer<T: NetQueue, R: NetQueue>(
    tx: &mut T,
    source: [u8; 6],
    rx: &mut R,
    destination: [u8; 6],
    len: usize,
    wait: bool,
) -> f64 {
    let run = run_id();
    let start = Instant::now();
    let mut last_progress = Instant::now();
    let mut next_seq = 0u32;
    let mut expected = 0u32;
    let mut pending: Vec<Packet> = Vec::new();
    let mut received: Vec<Packet> = Vec::new();
    while expected < FRAMES {
        // Fill the window.
        while pending.len() < BATCH && next_seq < FRAMES && next_seq - expected < WINDOW {
            let Some(mut packet) = tx.alloc() else {
                break;
            };
            build(
                &mut tx.data_mut(&mut packet)[..len],
                destination,
                source,
                run,
                next_seq,
            );
            packet.set_len(len);
            pending.push(packet);
            next_seq += 1;
        }
        // Pacing: what does not fit the ring stays in `pending` for the next round.
        tx.transmit(&mut pending).expect("transmit");
        rx.receive(&mut received, BATCH).expect("receive");
        if received.is_empty() {
            assert!(
                last_progress.elapsed() < STALL,
                "no frame for {STALL:?}: {expected} of {FRAMES} received, {next_seq} built; \
                 sender {:?}, receiver {:?}",
                tx.stats(),
                rx.stats()
            );
            if wait {
                rx.wait(Duration::from_millis(10)).expect("wait");
            }
            continue;
        }
        last_progress = Instant::now();
        for packet in received.drain(..) {
            if let Some(seq) = parse(rx.data(&packet), run, len) {
                assert_eq!(seq, expected, "frame lost, duplicated or reordered");
                expected += 1;
            }
            rx.free(packet);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Let the last transmit buffers come back.
    tx.transmit(&mut Vec::new()).expect("reclaim");
    FRAMES as f64 / elapsed
}

fn both_ways(interrupts: bool) {
    let _lock = NICS.lock().unwrap_or_else(|e| e.into_inner());
    let bound = two_e1000e();
    let mut a = open_e1000e(&bound[0], interrupts);
    let mut b = open_e1000e(&bound[1], interrupts);
    let (mac_a, mac_b) = (a.mac(), b.mac());
    assert_ne!(mac_a, mac_b);
    let mut qa = a.take_queue(0).expect("queue of A");
    let mut qb = b.take_queue(0).expect("queue of B");
    for len in [64, 1514] {
        let rate = transfer(&mut qa, mac_a, &mut qb, mac_b, len, interrupts);
        eprintln!("e1000e A -> B, {len}-byte frames, interrupts {interrupts}: {rate:.0} frames/s");
        let rate = transfer(&mut qb, mac_b, &mut qa, mac_a, len, interrupts);
        eprintln!("e1000e B -> A, {len}-byte frames, interrupts {interrupts}: {rate:.0} frames/s");
    }
    for (name, queue) in [("A", qa.stats()), ("B", qb.stats())] {
        eprintln!("{name}: {queue:?}");
        assert_eq!(queue.errors, 0, "{name}: device errors");
    }
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_e1000e_frames_cross_the_hub_intact_polling() {
    both_ways(false);
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_e1000e_frames_cross_the_hub_intact_with_msix() {
    both_ways(true);
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_e1000e_reports_link_mac_and_frame_size() {
    let _lock = NICS.lock().unwrap_or_else(|e| e.into_inner());
    let bound = two_e1000e();
    let nic = open_e1000e(&bound[0], false);
    let link = nic.link().expect("link");
    eprintln!("{}: MAC {:02x?}, {link:?}", bound[0].0, nic.mac());
    assert!(link.up);
    assert_eq!(link.speed_mbps, Some(1000));
    assert_eq!(link.full_duplex, Some(true));
    assert_ne!(nic.mac(), [0; 6]);
    assert_eq!(nic.mac()[0] & 1, 0, "a unicast MAC");
    assert_eq!(nic.max_frame(), 1514);
    assert_eq!(nic.queue_count(), 1);
    // Reopening resets the device and works again.
    drop(nic);
    let mut nic = open_e1000e(&bound[0], false);
    let mut queue = nic.take_queue(0).expect("queue");
    assert_eq!(queue.receive(&mut Vec::new(), 1).map(|_| ()).ok(), Some(()));
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_e1000e_and_virtio_net_talk_both_ways() {
    let _lock = NICS.lock().unwrap_or_else(|e| e.into_inner());
    let bound = two_e1000e();
    let virtio = bind_all(VIRTIO_NET);
    assert!(!virtio.is_empty(), "the lab VM has a lone virtio-net");
    let mut e1000e = open_e1000e(&bound[0], false);
    let backend =
        VfioBackend::open(&virtio[0].0.to_string()).expect("opening the virtio-net through VFIO");
    let mut virtio_net = VirtioNet::new(backend, VirtioOptions::default()).expect("virtio-net up");
    let (mac_e, mac_v) = (e1000e.mac(), virtio_net.mac());
    let mut qe = e1000e.take_queue(0).expect("e1000e queue");
    let mut qv = virtio_net.take_queue(0).expect("virtio-net queue");
    for len in [64, 1514] {
        let rate = transfer(&mut qe, mac_e, &mut qv, mac_v, len, false);
        eprintln!("e1000e -> virtio-net, {len}-byte frames: {rate:.0} frames/s");
        let rate = transfer(&mut qv, mac_v, &mut qe, mac_e, len, false);
        eprintln!("virtio-net -> e1000e, {len}-byte frames: {rate:.0} frames/s");
    }
}
