//! Lab tests of the virtio-net driver against QEMU's virtio-net (modern only, behind the
//! IOMMU), inside the lab VM (`cargo xtask test`).
//!
//! The VM's NICs share one QEMU hub, so a frame sent by one arrives at every other. The
//! tests take the two virtio-nets that are alone in their IOMMU groups (the third sits
//! behind a PCIe-to-PCI bridge, on another hub), send numbered, checksummed frames from
//! one and check that the other receives each exactly once, in order and intact. Frames
//! of other senders on the hub are told apart by their ethertype and a per-run ID.

use std::io::Write;
use std::time::{Duration, Instant};

use ring3::pci::{PciAddress, Sysfs};
use ring3::vfio::VfioBackend;
use ring3_net::virtio::{VirtioNet, VirtioOptions};
use ring3_net::{NetDevice, NetQueue, Packet};

const VIRTIO_NET: (u16, u16) = (0x1af4, 0x1041);
/// IEEE 802 local experimental ethertype.
const ETHERTYPE: u16 = 0x88b5;
const FRAMES: u32 = 10_000;
/// Frames in flight at most: fewer than the receiver has buffers posted, so that QEMU
/// never has to hold or drop frames for want of a buffer.
const WINDOW: u32 = 128;
const BATCH: usize = 32;

fn in_lab() {
    assert_eq!(
        std::env::var("RING3_LAB").as_deref(),
        Ok("1"),
        "lab tests run inside the lab VM: use `cargo xtask test`"
    );
}

/// Binds a device to vfio-pci for the test and gives it back to its driver afterwards, so
/// other lab tests find the VM as it was.
struct Bound(PciAddress);

impl Drop for Bound {
    fn drop(&mut self) {
        if let Err(error) = Sysfs::system().unbind_from_vfio(self.0) {
            eprintln!("giving {} back to its driver: {error}", self.0);
        }
    }
}

/// The two hub virtio-nets, bound to vfio-pci.
fn hub_nics() -> Vec<Bound> {
    in_lab();
    let sysfs = Sysfs::system();
    let nics: Vec<PciAddress> = sysfs
        .devices()
        .expect("listing PCI devices")
        .into_iter()
        .filter(|d| (d.vendor_id, d.device_id) == VIRTIO_NET)
        .filter(|d| {
            d.iommu_group.is_some_and(|group| {
                sysfs
                    .iommu_group_devices(group)
                    .is_ok_and(|members| members.len() == 1)
            })
        })
        .map(|d| d.address)
        .collect();
    assert_eq!(
        nics.len(),
        2,
        "the lab VM has two lone virtio-nets: {nics:?}"
    );
    nics.into_iter()
        .map(|address| {
            sysfs
                .bind_to_vfio(address, true)
                .expect("binding a virtio-net to vfio-pci");
            Bound(address)
        })
        .collect()
}

fn open(bound: &Bound, interrupts: bool) -> VirtioNet<VfioBackend> {
    let backend = VfioBackend::open(&bound.0.to_string()).expect("opening the NIC through VFIO");
    VirtioNet::new(
        backend,
        VirtioOptions {
            queue_pairs: 1,
            queue_size: 256,
            interrupts,
            mac: None,
        },
    )
    .expect("bringing the NIC up")
}

fn run_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 40)
}

/// FNV-1a, for the frames' checksum.
fn checksum(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Frame layout: broadcast destination, source, ethertype, run ID (8), sequence number
/// (4), a pattern, and the checksum of everything before it (4) at the end.
fn build(frame: &mut [u8], source: [u8; 6], run: u64, seq: u32) {
    frame[..6].fill(0xff);
    frame[6..12].copy_from_slice(&source);
    frame[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    frame[14..22].copy_from_slice(&run.to_le_bytes());
    frame[22..26].copy_from_slice(&seq.to_le_bytes());
    let end = frame.len() - 4;
    for (i, byte) in frame[26..end].iter_mut().enumerate() {
        *byte = (seq as usize).wrapping_mul(7).wrapping_add(i) as u8;
    }
    let sum = checksum(&frame[..end]);
    frame[end..].copy_from_slice(&sum.to_le_bytes());
}

/// What a received frame is: not ours (`None`), or ours with its sequence number, checked.
fn parse(frame: &[u8], run: u64, len: usize) -> Option<u32> {
    if frame.len() < 26
        || frame[12..14] != ETHERTYPE.to_be_bytes()
        || frame[14..22] != run.to_le_bytes()
    {
        return None;
    }
    let seq = u32::from_le_bytes(frame[22..26].try_into().ok()?);
    assert_eq!(frame.len(), len, "frame {seq} has the wrong length");
    let end = frame.len() - 4;
    let sum = u32::from_le_bytes(frame[end..].try_into().ok()?);
    assert_eq!(sum, checksum(&frame[..end]), "frame {seq} is corrupted");
    Some(seq)
}

/// Sends [`FRAMES`] frames of `len` bytes from `tx` and checks `rx` gets each once, in
/// order; returns frames per second.
fn transfer<Q: NetQueue>(tx: &mut Q, source: [u8; 6], rx: &mut Q, len: usize, wait: bool) -> f64 {
    let run = run_id();
    let mut next_seq = 0u32;
    let mut expected = 0u32;
    let mut others = 0u64;
    let mut outgoing: Vec<Packet> = Vec::with_capacity(BATCH);
    let mut incoming: Vec<Packet> = Vec::with_capacity(BATCH);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    while expected < FRAMES {
        assert!(
            Instant::now() < deadline,
            "only {expected} of {FRAMES} frames of {len} bytes arrived (sent {next_seq})"
        );
        while outgoing.len() < BATCH && next_seq < FRAMES && next_seq - expected < WINDOW {
            let Some(mut packet) = tx.alloc() else { break };
            build(&mut tx.data_mut(&mut packet)[..len], source, run, next_seq);
            packet.set_len(len);
            outgoing.push(packet);
            next_seq += 1;
        }
        // Unsent frames stay in `outgoing`, in order, for the next round.
        tx.transmit(&mut outgoing).expect("transmit");
        let got = rx.receive(&mut incoming, BATCH).expect("receive");
        for packet in incoming.drain(..) {
            match parse(rx.data(&packet), run, len) {
                Some(seq) => {
                    assert_eq!(seq, expected, "frame {seq} arrived when {expected} was due");
                    expected += 1;
                }
                None => others += 1,
            }
            rx.free(packet);
        }
        if got == 0 && wait {
            rx.wait(Duration::from_millis(100))
                .expect("waiting for the interrupt");
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let rx_stats = rx.stats();
    let tx_stats = tx.stats();
    // Straight to stderr, past the test harness's capture, so the lab log has the rates.
    let _ = writeln!(
        std::io::stderr(),
        "{FRAMES} frames of {len} bytes in {elapsed:.2} s: {:.0} frames/s ({others} others); \
         tx {tx_stats:?}; rx {rx_stats:?}",
        f64::from(FRAMES) / elapsed
    );
    assert_eq!(rx_stats.errors, 0);
    assert_eq!(tx_stats.errors, 0);
    f64::from(FRAMES) / elapsed
}

fn both_ways(interrupts: bool) {
    let nics = hub_nics();
    let mut a = open(&nics[0], interrupts);
    let mut b = open(&nics[1], interrupts);
    assert!(a.link().expect("link of A").up, "A's link is up");
    assert!(b.link().expect("link of B").up, "B's link is up");
    assert_ne!(a.mac(), b.mac(), "the NICs have their own MACs");
    assert_eq!(a.max_frame(), 1514);
    let (mac_a, mac_b) = (a.mac(), b.mac());
    let mut qa = a.take_queue(0).expect("A's queue");
    let mut qb = b.take_queue(0).expect("B's queue");
    for len in [64, 1500] {
        transfer(&mut qa, mac_a, &mut qb, len, interrupts);
        transfer(&mut qb, mac_b, &mut qa, len, interrupts);
    }
    drop((qa, qb, a, b));
    drop(nics);
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_virtio_frames_cross_the_hub_intact_polling() {
    both_ways(false);
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_virtio_frames_cross_the_hub_intact_with_interrupts() {
    both_ways(true);
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_virtio_reopening_resets_and_works_again() {
    let nics = hub_nics();
    for round in 0..3 {
        let mut a = open(&nics[0], round % 2 == 1);
        let mut b = open(&nics[1], false);
        let mac = a.mac();
        let mut qa = a.take_queue(0).unwrap();
        let mut qb = b.take_queue(0).unwrap();
        let run = run_id();
        let mut packet = qa.alloc().unwrap();
        build(&mut qa.data_mut(&mut packet)[..100], mac, run, 0);
        packet.set_len(100);
        let mut out = vec![packet];
        assert_eq!(qa.transmit(&mut out).unwrap(), 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = false;
        while !seen {
            assert!(
                Instant::now() < deadline,
                "round {round}: the frame did not arrive"
            );
            let mut incoming = Vec::new();
            qb.receive(&mut incoming, 8).unwrap();
            for p in incoming {
                seen |= parse(qb.data(&p), run, 100) == Some(0);
                qb.free(p);
            }
        }
    }
}
