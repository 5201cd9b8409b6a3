//! `ring3 bench net`: packets per second between two NICs through ring3's network
//! drivers, one transmitting and one receiving.
//!
//! Both NICs are bound to vfio-pci and each opened with the driver its PCI IDs call for
//! (as `ring3 net` does), with one queue pair, polled. One thread builds frames of
//! `--size` bytes in the transmitting queue's pool (ethertype 0x88b5, a per-run ID and a
//! sequence number; the rest of the buffer is left as it is) and hands them to the device
//! in batches of `--batch` as fast as the ring takes them, for `--duration` seconds. A
//! second thread takes frames off the receiving queue in batches of the same size, counts
//! the run's own frames, notes gaps and reordering in their sequence numbers, and keeps
//! going until no frame has come for a moment after the sender stopped.
//!
//! The report has both sides' packet rates, the receiver's byte rate, the frames lost
//! between them, each thread's CPU time, and how often the sender found the ring full
//! and the receiver found nothing: the two signs that the device, not the driver, set the
//! pace.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ring3::pci::PciAddress;
use ring3::vfio::VfioBackend;
use ring3_net::e1000e::{E1000e, E1000eOptions};
use ring3_net::virtio::{VirtioNet, VirtioOptions};
use ring3_net::{NetDevice, NetQueue, Packet};
use serde::Serialize;

use crate::net::{self, Driver, NetError};
use crate::CommandError;

/// IEEE 802 local experimental ethertype: no stack on the receiving side claims these.
pub const ETHERTYPE: u16 = 0x88b5;
/// Destination, source, ethertype, run ID (8 bytes), sequence number (8 bytes).
const HEADER: usize = 30;
/// The smallest frame without its FCS (Ethernet's 64 bytes less the 4 the NIC adds).
const MIN_SIZE: usize = 60;
/// How long the receiver keeps looking once the sender has stopped and no frame came.
const DRAIN: Duration = Duration::from_millis(500);
/// The receiver gives up this long after the sender stopped, frames or not.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// How long to wait for each NIC's link.
const LINK_TIMEOUT: Duration = Duration::from_secs(5);
/// The sender reads the clock once per this many transmit calls. Reading it can be a
/// system call (in the lab's TCG guest strace shows `clock_gettime` entering the kernel),
/// and a sender spinning on a full ring would otherwise spend most of its time in it.
const CALLS_PER_CLOCK_READ: u64 = 256;

/// Options of `ring3 bench net`.
#[derive(Debug, clap::Args)]
pub struct NetBenchArgs {
    /// PCI address of the transmitting NIC (virtio-net 1af4:1041 or e1000e 8086:10d3),
    /// bound to vfio-pci.
    #[arg(long, value_name = "ADDR")]
    pub tx: PciAddress,
    /// PCI address of the receiving NIC, on the same network as the transmitting one,
    /// bound to vfio-pci.
    #[arg(long, value_name = "ADDR")]
    pub rx: PciAddress,
    /// Frame size in bytes, Ethernet header included and FCS not (60 to the NIC's
    /// largest frame).
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    pub size: usize,
    /// Seconds to transmit.
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    pub duration: f64,
    /// Frames per transmit and per receive call.
    #[arg(long, value_name = "N", default_value_t = 32,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub batch: u16,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A NIC opened for the bench: its queue pair 0, and the device it came from.
struct OpenNic {
    address: String,
    driver: Driver,
    mac: [u8; 6],
    max_frame: usize,
    link_up: bool,
    /// Declared before `_device`, so it is dropped first.
    queue: Box<dyn NetQueue>,
    _device: Box<dyn Send>,
}

fn open(address: PciAddress) -> Result<OpenNic, CommandError> {
    let driver = net::driver_for(address)?;
    let name = address.to_string();
    let backend = VfioBackend::open(&name)?;
    match driver {
        Driver::Virtio => take_queue(
            name,
            driver,
            VirtioNet::new(backend, VirtioOptions::default())?,
        ),
        Driver::E1000e => take_queue(
            name,
            driver,
            E1000e::new(backend, E1000eOptions::default())?,
        ),
    }
}

fn take_queue<D: NetDevice + 'static>(
    address: String,
    driver: Driver,
    mut device: D,
) -> Result<OpenNic, CommandError> {
    let queue = device.take_queue(0)?;
    let started = Instant::now();
    let link_up = loop {
        let up = device.link()?.up;
        if up || started.elapsed() >= LINK_TIMEOUT {
            break up;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(OpenNic {
        address,
        driver,
        mac: device.mac(),
        max_frame: device.max_frame(),
        link_up,
        queue: Box::new(queue),
        _device: Box::new(device),
    })
}

/// What the transmitting thread did.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct TxSide {
    /// Frames the device took.
    pub packets: u64,
    pub bytes: u64,
    /// Seconds from the first transmit call to the last.
    pub seconds: f64,
    pub pps: f64,
    /// Transmit calls, and those that found the ring full (nothing went).
    pub calls: u64,
    pub ring_full_calls: u64,
    /// Times no free buffer was left in the pool to build a frame in.
    pub pool_empty: u64,
    /// This thread's CPU time, in seconds.
    pub cpu_s: f64,
    /// Device errors on the queue.
    pub errors: u64,
}

/// What the receiving thread saw.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct RxSide {
    /// This run's frames received.
    pub packets: u64,
    pub bytes: u64,
    /// Seconds from the start of the run to the last of its frames.
    pub seconds: f64,
    pub pps: f64,
    pub bytes_per_s: f64,
    /// Frames that were not this run's (other traffic on the network).
    pub foreign: u64,
    /// Sequence numbers skipped (frames lost on the way), and frames that came after a
    /// later one.
    pub gaps: u64,
    pub out_of_order: u64,
    /// Receive calls, and those that found no frame.
    pub polls: u64,
    pub empty_polls: u64,
    /// Frames the device or driver dropped, as the queue counts them.
    pub device_drops: u64,
    pub cpu_s: f64,
    pub errors: u64,
}

/// One run's results.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NetBenchReport {
    pub tx_device: String,
    pub rx_device: String,
    pub tx_driver: &'static str,
    pub rx_driver: &'static str,
    pub frame_bytes: usize,
    pub batch: u16,
    pub duration_s: f64,
    pub tx: TxSide,
    pub rx: RxSide,
    /// Frames sent that did not arrive, and their share of those sent, in percent.
    pub lost: u64,
    pub loss_percent: f64,
    /// The process's CPU time over the run (both threads and the rest).
    pub cpu: ProcessCpu,
}

/// CPU time of the whole process over the run.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct ProcessCpu {
    pub user_s: f64,
    pub system_s: f64,
    /// User and system time over wall time, in percent of one CPU.
    pub percent: f64,
}

fn thread_cpu_seconds() -> f64 {
    let time = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    time.tv_sec as f64 + time.tv_nsec as f64 / 1e9
}

/// The fixed part of every frame: addresses, ethertype and the run's ID.
fn frame_header(destination: [u8; 6], source: [u8; 6], run: u64) -> [u8; 22] {
    let mut header = [0u8; 22];
    header[..6].copy_from_slice(&destination);
    header[6..12].copy_from_slice(&source);
    header[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    header[14..22].copy_from_slice(&run.to_le_bytes());
    header
}

/// The sequence number of one of run `run`'s frames, or `None` for any other frame.
fn sequence_of(frame: &[u8], run: u64) -> Option<u64> {
    if frame.len() < HEADER
        || frame[12..14] != ETHERTYPE.to_be_bytes()
        || frame[14..22] != run.to_le_bytes()
    {
        return None;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&frame[22..30]);
    Some(u64::from_le_bytes(seq))
}

/// Counts sequence numbers as they arrive: gaps (lost frames) and late arrivals.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SequenceCheck {
    next: u64,
    gaps: u64,
    out_of_order: u64,
}

impl SequenceCheck {
    fn saw(&mut self, seq: u64) {
        if seq < self.next {
            self.out_of_order += 1;
            // A late frame had been counted as lost.
            self.gaps = self.gaps.saturating_sub(1);
        } else {
            self.gaps += seq - self.next;
            self.next = seq + 1;
        }
    }
}

/// Sends frames until `deadline`; sets `stopped` when done.
fn transmit(
    queue: &mut dyn NetQueue,
    header: &[u8; 22],
    size: usize,
    batch: usize,
    deadline: Instant,
    stopped: &AtomicBool,
) -> ring3_net::Result<TxSide> {
    struct SetOnDrop<'a>(&'a AtomicBool);
    impl Drop for SetOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let _stopped = SetOnDrop(stopped);
    let cpu_before = thread_cpu_seconds();
    let before = queue.stats();
    let mut pending: Vec<Packet> = Vec::with_capacity(batch);
    let (mut seq, mut calls, mut ring_full, mut pool_empty) = (0u64, 0u64, 0u64, 0u64);
    let started = Instant::now();
    loop {
        if calls % CALLS_PER_CLOCK_READ == 0 && Instant::now() >= deadline {
            break;
        }
        while pending.len() < batch {
            let Some(mut packet) = queue.alloc() else {
                pool_empty += 1;
                break;
            };
            let data = queue.data_mut(&mut packet);
            data[..22].copy_from_slice(header);
            data[22..HEADER].copy_from_slice(&seq.to_le_bytes());
            packet.set_len(size);
            pending.push(packet);
            seq += 1;
        }
        let sent = queue.transmit(&mut pending)?;
        calls += 1;
        if sent == 0 {
            ring_full += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    for packet in pending.drain(..) {
        queue.free(packet);
    }
    let after = queue.stats();
    let packets = after.tx_packets - before.tx_packets;
    Ok(TxSide {
        packets,
        bytes: after.tx_bytes - before.tx_bytes,
        seconds,
        pps: packets as f64 / seconds.max(1e-9),
        calls,
        ring_full_calls: ring_full,
        pool_empty,
        cpu_s: thread_cpu_seconds() - cpu_before,
        errors: after.errors - before.errors,
    })
}

/// Receives until the sender has stopped and the frames in flight have come in. While the
/// sender runs, the clock is not read at all (see [`CALLS_PER_CLOCK_READ`]); afterwards it
/// is read on every poll, to time the drain and the last frame.
fn receive(
    queue: &mut dyn NetQueue,
    run: u64,
    batch: usize,
    started: Instant,
    sender_stopped: &AtomicBool,
) -> ring3_net::Result<RxSide> {
    let cpu_before = thread_cpu_seconds();
    let before = queue.stats();
    let mut packets: Vec<Packet> = Vec::with_capacity(batch);
    let mut side = RxSide::default();
    let mut check = SequenceCheck::default();
    // Until the sender stops, the last frame's time is taken to be the moment the
    // receiver learns that it has; after that, each batch's.
    let mut last_frame = started;
    let mut stopped_at: Option<Instant> = None;
    loop {
        let received = queue.receive(&mut packets, batch)?;
        side.polls += 1;
        if stopped_at.is_none() && sender_stopped.load(Ordering::Acquire) {
            let now = Instant::now();
            stopped_at = Some(now);
            last_frame = now;
        }
        if received == 0 {
            side.empty_polls += 1;
            if let Some(at) = stopped_at {
                let now = Instant::now();
                if now.duration_since(last_frame) >= DRAIN || now.duration_since(at) >= DRAIN_LIMIT
                {
                    break;
                }
            }
            continue;
        }
        for packet in packets.drain(..) {
            match sequence_of(queue.data(&packet), run) {
                Some(seq) => {
                    check.saw(seq);
                    side.packets += 1;
                    side.bytes += packet.len() as u64;
                }
                None => side.foreign += 1,
            }
            queue.free(packet);
        }
        if let Some(at) = stopped_at {
            last_frame = Instant::now();
            if last_frame.duration_since(at) >= DRAIN_LIMIT {
                break;
            }
        }
    }
    let after = queue.stats();
    side.seconds = last_frame.duration_since(started).as_secs_f64();
    side.pps = side.packets as f64 / side.seconds.max(1e-9);
    side.bytes_per_s = side.bytes as f64 / side.seconds.max(1e-9);
    side.gaps = check.gaps;
    side.out_of_order = check.out_of_order;
    side.device_drops = after.rx_drops - before.rx_drops;
    side.errors = after.errors - before.errors;
    side.cpu_s = thread_cpu_seconds() - cpu_before;
    Ok(side)
}

fn run_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// Runs `ring3 bench net`.
pub fn run(args: NetBenchArgs) -> Result<(), CommandError> {
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        return Err(NetError(format!(
            "--duration {} must be a positive number of seconds",
            args.duration
        ))
        .into());
    }
    if args.tx == args.rx {
        return Err(NetError(format!(
            "--tx and --rx are both {}: the bench needs two NICs on one network",
            args.tx
        ))
        .into());
    }
    let mut tx = open(args.tx)?;
    let mut rx = open(args.rx)?;
    let largest = tx.max_frame.min(rx.max_frame);
    if !(MIN_SIZE..=largest).contains(&args.size) {
        return Err(NetError(format!(
            "--size {}: frames are {MIN_SIZE} to {largest} bytes on these NICs",
            args.size
        ))
        .into());
    }
    for nic in [&tx, &rx] {
        if !nic.link_up {
            return Err(NetError(format!(
                "{}: the link is still down after {} s",
                nic.address,
                LINK_TIMEOUT.as_secs()
            ))
            .into());
        }
    }
    let run = run_id();
    let header = frame_header(rx.mac, tx.mac, run);
    let batch = usize::from(args.batch);
    let duration = Duration::from_secs_f64(args.duration);
    let stopped = AtomicBool::new(false);
    let (user_before, system_before) = crate::bench::cpu_seconds();
    let started = Instant::now();
    let (tx_side, rx_side) = std::thread::scope(|scope| {
        let (tx_queue, rx_queue, stopped) = (&mut tx.queue, &mut rx.queue, &stopped);
        let receiver =
            scope.spawn(move || receive(rx_queue.as_mut(), run, batch, started, stopped));
        let sender = scope.spawn(move || {
            transmit(
                tx_queue.as_mut(),
                &header,
                args.size,
                batch,
                started + duration,
                stopped,
            )
        });
        let panicked = || -> CommandError { NetError("a bench thread panicked".into()).into() };
        let tx_side = sender
            .join()
            .map_err(|_| panicked())
            .and_then(|side| side.map_err(CommandError::from));
        // If the sender failed, the receiver still stops: `stopped` was set on its way out.
        let rx_side = receiver
            .join()
            .map_err(|_| panicked())
            .and_then(|side| side.map_err(CommandError::from));
        (tx_side, rx_side)
    });
    let elapsed = started.elapsed().as_secs_f64();
    let (user_after, system_after) = crate::bench::cpu_seconds();
    let (tx_side, rx_side) = (tx_side?, rx_side?);
    let lost = tx_side.packets.saturating_sub(rx_side.packets);
    let report = NetBenchReport {
        tx_device: tx.address.clone(),
        rx_device: rx.address.clone(),
        tx_driver: tx.driver.name(),
        rx_driver: rx.driver.name(),
        frame_bytes: args.size,
        batch: args.batch,
        duration_s: tx_side.seconds,
        tx: tx_side,
        rx: rx_side,
        lost,
        loss_percent: 100.0 * lost as f64 / tx_side.packets.max(1) as f64,
        cpu: ProcessCpu {
            user_s: user_after - user_before,
            system_s: system_after - system_before,
            percent: 100.0 * (user_after - user_before + system_after - system_before)
                / elapsed.max(1e-9),
        },
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", render(&report));
    }
    if report.tx.packets == 0 || report.rx.packets == 0 {
        return Err(NetError(format!(
            "{} frames sent, {} of them received: nothing went through",
            report.tx.packets, report.rx.packets
        ))
        .into());
    }
    Ok(())
}

fn render(report: &NetBenchReport) -> String {
    let (tx, rx) = (&report.tx, &report.rx);
    let per = |count: u64, of: u64| count as f64 / of.max(1) as f64;
    format!(
        "{} ({}) -> {} ({}): {}-byte frames, batches of {}, {:.1} s\n\
         \x20 tx  {:.0} pps, {} frames; ring full on {:.1}% of {} transmit calls; CPU {:.2} s\n\
         \x20 rx  {:.0} pps, {:.2} MB/s, {} frames ({} others); {:.2} empty polls per frame; \
         CPU {:.2} s\n\
         \x20 lost {} ({:.2}%): {} sequence gaps, {} out of order, {} dropped by the device\n\
         \x20 CPU {:.0}% of one CPU (user {:.2} s, system {:.2} s)\n",
        report.tx_device,
        report.tx_driver,
        report.rx_device,
        report.rx_driver,
        report.frame_bytes,
        report.batch,
        report.duration_s,
        tx.pps,
        tx.packets,
        100.0 * per(tx.ring_full_calls, tx.calls),
        tx.calls,
        tx.cpu_s,
        rx.pps,
        rx.bytes_per_s / 1e6,
        rx.packets,
        rx.foreign,
        per(rx.empty_polls, rx.packets),
        rx.cpu_s,
        report.lost,
        report.loss_percent,
        rx.gaps,
        rx.out_of_order,
        rx.device_drops,
        report.cpu.percent,
        report.cpu.user_s,
        report.cpu.system_s,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_the_run_and_sequence() {
        let header = frame_header([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], 0xfeed);
        let mut frame = vec![0u8; 64];
        frame[..22].copy_from_slice(&header);
        frame[22..30].copy_from_slice(&41u64.to_le_bytes());
        assert_eq!(&frame[12..14], &[0x88, 0xb5]);
        assert_eq!(sequence_of(&frame, 0xfeed), Some(41));
        assert_eq!(sequence_of(&frame, 0xbeef), None, "another run's frame");
        assert_eq!(sequence_of(&frame[..29], 0xfeed), None, "too short");
        frame[12] = 0x08;
        assert_eq!(sequence_of(&frame, 0xfeed), None, "another ethertype");
    }

    #[test]
    fn gaps_and_late_frames_are_counted() {
        let mut check = SequenceCheck::default();
        for seq in [0, 1, 2, 5, 6, 4, 7, 10] {
            check.saw(seq);
        }
        // 3, 8 and 9 never came; 4 came late.
        assert_eq!(check.gaps, 3);
        assert_eq!(check.out_of_order, 1);
        assert_eq!(check.next, 11);
    }

    #[test]
    fn the_text_report_has_both_sides() {
        let report = NetBenchReport {
            tx_device: "0000:00:01.0".into(),
            rx_device: "0000:00:02.0".into(),
            tx_driver: "virtio-net",
            rx_driver: "virtio-net",
            frame_bytes: 64,
            batch: 32,
            duration_s: 2.0,
            tx: TxSide {
                packets: 2000,
                pps: 1000.0,
                calls: 100,
                ring_full_calls: 25,
                ..TxSide::default()
            },
            rx: RxSide {
                packets: 1990,
                pps: 995.0,
                empty_polls: 995,
                ..RxSide::default()
            },
            lost: 10,
            loss_percent: 0.5,
            cpu: ProcessCpu::default(),
        };
        let text = render(&report);
        assert!(
            text.contains("tx  1000 pps, 2000 frames; ring full on 25.0%"),
            "{text}"
        );
        assert!(text.contains("rx  995 pps"), "{text}");
        assert!(text.contains("0.50 empty polls per frame"), "{text}");
        assert!(text.contains("lost 10 (0.50%)"), "{text}");
    }
}
