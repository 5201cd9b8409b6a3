//! `ring3 bench nvme`: load an NVMe namespace through the ring3 driver the way fio would,
//! and report IOPS, bandwidth, latency percentiles and CPU use.
//!
//! One thread per queue pair, each keeping `--qd` commands in flight: a completion is
//! answered at once with the next command in its slot, with the same buffer. Completions
//! are polled (the default) or waited for on the queue's MSI-X interrupt.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use ring3::Backend;
use ring3_nvme::{Controller, IoCompletion, IoQueueOptions, Namespace};
use serde_json::json;

use crate::size::parse_size;

/// Measure a device through a ring3 driver.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub target: BenchTarget,
}

/// What to measure.
#[derive(Debug, clap::Subcommand)]
pub enum BenchTarget {
    /// An NVMe namespace, with fio-like workloads.
    Nvme(NvmeBenchArgs),
    /// Packets per second from one NIC to another (both on vfio-pci, on one network).
    Net(crate::bench_net::NetBenchArgs),
}

/// The access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads and writes, --read-percent of them reads.
    Mixed,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Randread => "randread",
            Pattern::Randwrite => "randwrite",
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::Mixed => "mixed",
        }
    }

    fn random(self) -> bool {
        matches!(
            self,
            Pattern::Randread | Pattern::Randwrite | Pattern::Mixed
        )
    }
}

/// Options of `ring3 bench nvme`.
#[derive(Debug, clap::Args)]
pub struct NvmeBenchArgs {
    /// PCI address of the NVMe controller, bound to vfio-pci (for example 0000:00:03.0).
    #[arg(value_name = "ADDR")]
    pub address: String,
    /// Namespace ID.
    #[arg(long, short = 'n', default_value_t = 1)]
    pub nsid: u32,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Pattern::Randread)]
    pub pattern: Pattern,
    /// Bytes per I/O, a multiple of the block size (4096, 4k, 128k, ...).
    #[arg(long, visible_alias = "block-size", default_value = "4k", value_parser = parse_size)]
    pub bs: u64,
    /// Commands in flight per queue.
    #[arg(long, visible_alias = "iodepth", default_value_t = 32,
          value_parser = clap::value_parser!(u16).range(1..=4095))]
    pub qd: u16,
    /// Queue pairs, each driven by its own thread.
    #[arg(long, visible_alias = "numjobs", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub queues: u16,
    /// Seconds to run.
    #[arg(long, visible_alias = "runtime", default_value_t = 10.0)]
    pub duration: f64,
    /// Wait for completions on MSI-X interrupts instead of polling.
    #[arg(long)]
    pub interrupts: bool,
    /// Share of reads for --pattern mixed, in percent.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub read_percent: u8,
    /// Start of the byte range used (a multiple of the block size).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub offset: u64,
    /// Length of the byte range used [default: the rest of the namespace].
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Use shadow doorbells if the controller offers them (default: every doorbell by MMIO).
    #[arg(long)]
    pub shadow_doorbells: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The longest latency recorded exactly (an hour, in nanoseconds); longer ones count as
/// this. (A histogram without fixed bounds would clamp at its initial range instead.)
const LATENCY_LIMIT_NS: u64 = 3_600_000_000_000;

fn latency_histogram() -> ring3::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, LATENCY_LIMIT_NS, 3).map_err(|e| invalid(e.to_string()))
}

/// What one queue's thread measured.
struct QueueResult {
    latency_ns: Histogram<u64>,
    /// MMIO doorbell writes, kicks, and whether shadow doorbells were on.
    doorbells: (u64, u64, bool),
    /// Polls that found nothing while I/O was in flight.
    empty_polls: u64,
    ios: u64,
    errors: u64,
    first_error: Option<String>,
}

/// The byte range and block geometry a run uses, checked against the namespace.
#[derive(Debug, Clone, Copy)]
struct Region {
    first_block: u64,
    blocks: u64,
    blocks_per_io: u32,
}

fn invalid(what: String) -> ring3::Error {
    ring3_nvme::Error::InvalidArgument { what }.into()
}

fn region(args: &NvmeBenchArgs, ns: &Namespace, max_transfer: usize) -> ring3::Result<Region> {
    let block = u64::from(ns.block_size());
    if args.bs == 0 || args.bs % block != 0 {
        return Err(invalid(format!(
            "--bs {} is not a multiple of namespace {}'s {block}-byte blocks",
            args.bs, ns.id
        )));
    }
    if args.bs > max_transfer as u64 {
        return Err(invalid(format!(
            "--bs {} exceeds the largest transfer of one command, {max_transfer} bytes",
            args.bs
        )));
    }
    if args.offset % block != 0 {
        return Err(invalid(format!(
            "--offset {} is not a multiple of the {block}-byte block size",
            args.offset
        )));
    }
    let total = ns.size_bytes();
    let size = args
        .size
        .unwrap_or_else(|| total.saturating_sub(args.offset));
    let end = args.offset.checked_add(size);
    if end.is_none_or(|end| end > total) || size < args.bs {
        return Err(invalid(format!(
            "--offset {} --size {size} does not fit namespace {} ({total} bytes) or holds \
             less than one I/O of {} bytes",
            args.offset, ns.id, args.bs
        )));
    }
    Ok(Region {
        first_block: args.offset / block,
        blocks: size / block,
        blocks_per_io: (args.bs / block) as u32,
    })
}

/// Runs `ring3 bench`.
pub fn run(args: BenchArgs) -> Result<(), crate::CommandError> {
    match args.target {
        BenchTarget::Nvme(args) => nvme(args)?,
        BenchTarget::Net(args) => crate::bench_net::run(args)?,
    }
    Ok(())
}

/// The process's user and system CPU time so far, in seconds.
pub(crate) fn cpu_seconds() -> (f64, f64) {
    // utime and stime are fields 14 and 15 of /proc/self/stat, after the command name
    // in parentheses (which may hold spaces).
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return (0.0, 0.0);
    };
    let Some(after) = stat.rfind(')').map(|at| &stat[at + 1..]) else {
        return (0.0, 0.0);
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Field 14 is the 12th after the state (field 3).
    (field(11) / ticks, field(12) / ticks)
}

fn nvme(args: NvmeBenchArgs) -> ring3::Result<()> {
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        return Err(invalid(format!(
            "--duration {} must be a positive number of seconds",
            args.duration
        )));
    }
    let options = ring3_nvme::ControllerOptions {
        shadow_doorbells: args.shadow_doorbells,
        ..Default::default()
    };
    let controller = crate::nvme::open_with(&args.address, options)?;
    let ns = controller.namespace(args.nsid)?.clone();
    let region = region(&args, &ns, controller.max_transfer_bytes())?;
    let granted = controller.max_io_queues();
    if args.queues > granted {
        return Err(invalid(format!(
            "--queues {}: the controller granted {granted} I/O queue pairs",
            args.queues
        )));
    }
    let max_depth = controller.capabilities().max_queue_entries() - 1;
    if u32::from(args.qd) > max_depth {
        return Err(invalid(format!(
            "--qd {}: this controller's queues hold at most {max_depth} commands (CAP.MQES)",
            args.qd
        )));
    }
    let duration = Duration::from_secs_f64(args.duration);
    let completed = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let (user_before, system_before) = cpu_seconds();
    let started = Instant::now();

    let results: Vec<ring3::Result<QueueResult>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..args.queues)
            .map(|index| {
                let (controller, args, completed, stop) = (&controller, &args, &completed, &stop);
                scope.spawn(move || {
                    worker(controller, args, region, index, duration, completed, stop)
                })
            })
            .collect();
        progress(duration, &completed, &stop, started);
        workers
            .into_iter()
            .map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|_| Err(invalid("a benchmark thread panicked".into())))
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let (user_after, system_after) = cpu_seconds();

    let mut latency = latency_histogram()?;
    let (mut ios, mut errors, mut first_error) = (0u64, 0u64, None);
    let (mut mmio_doorbells, mut kicks, mut shadow) = (0u64, 0u64, true);
    let mut empty_polls = 0u64;
    for result in results {
        let result = result?;
        mmio_doorbells += result.doorbells.0;
        kicks += result.doorbells.1;
        shadow &= result.doorbells.2;
        empty_polls += result.empty_polls;
        latency
            .add(&result.latency_ns)
            .map_err(|e| invalid(e.to_string()))?;
        ios += result.ios;
        errors += result.errors;
        if first_error.is_none() {
            first_error = result.first_error;
        }
    }
    let seconds = duration.as_secs_f64().min(elapsed);
    let iops = ios as f64 / seconds;
    let bandwidth = iops * args.bs as f64;
    let us = |ns: u64| ns as f64 / 1000.0;
    let user = user_after - user_before;
    let system = system_after - system_before;
    let percent = 100.0 * (user + system) / elapsed;
    let completion = if args.interrupts { "interrupt" } else { "poll" };
    if args.json {
        let value = json!({
            "device": args.address,
            "nsid": args.nsid,
            "pattern": args.pattern.name(),
            "block_size": args.bs,
            "queue_depth": args.qd,
            "queues": args.queues,
            "completion": completion,
            "duration_s": seconds,
            "ios": ios,
            "iops": iops,
            "bandwidth_bytes_per_s": bandwidth,
            "latency_us": {
                "mean": latency.mean() / 1000.0,
                "p50": us(latency.value_at_quantile(0.5)),
                "p99": us(latency.value_at_quantile(0.99)),
                "p99_9": us(latency.value_at_quantile(0.999)),
                "max": us(latency.max()),
            },
            "cpu": {"user_s": user, "system_s": system, "percent": percent},
            "errors": errors,
            "first_error": first_error,
            "doorbells": {
                "shadow": shadow,
                "mmio_writes": mmio_doorbells,
                "mmio_writes_per_io": mmio_doorbells as f64 / ios.max(1) as f64,
                "kicks": kicks,
            },
            // Many empty polls per I/O: the driver is waiting for the device, not working.
            "empty_polls_per_io": empty_polls as f64 / ios.max(1) as f64,
        });
        println!("{value}");
    } else {
        println!(
            "{} namespace {}: {}, {}-byte I/O, QD {} × {} queue{}, completion by {}, {:.1} s",
            args.address,
            args.nsid,
            args.pattern.name(),
            args.bs,
            args.qd,
            args.queues,
            if args.queues == 1 { "" } else { "s" },
            if args.interrupts {
                "MSI-X interrupt"
            } else {
                "polling"
            },
            seconds
        );
        println!("  IOPS       {iops:.0}");
        println!("  bandwidth  {:.1} MiB/s", bandwidth / f64::from(1 << 20));
        println!(
            "  latency    mean {:.1} µs, p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs",
            latency.mean() / 1000.0,
            us(latency.value_at_quantile(0.5)),
            us(latency.value_at_quantile(0.99)),
            us(latency.value_at_quantile(0.999)),
            us(latency.max())
        );
        println!("  CPU        {percent:.0}% (user {user:.2} s, system {system:.2} s)");
        println!(
            "  doorbells  {:.2} MMIO writes per I/O ({}shadow doorbells{})",
            mmio_doorbells as f64 / ios.max(1) as f64,
            if shadow { "" } else { "no " },
            if kicks > 0 {
                format!(", {kicks} kicks")
            } else {
                String::new()
            }
        );
        if !args.interrupts {
            println!(
                "  waiting    {:.1} empty polls per I/O",
                empty_polls as f64 / ios.max(1) as f64
            );
        }
        println!("  errors     {errors}");
        if let Some(error) = &first_error {
            println!("  first error: {error}");
        }
    }
    if ios == 0 {
        return Err(invalid(match first_error {
            Some(error) => format!("no I/O completed successfully: {error}"),
            None => "no I/O completed".into(),
        }));
    }
    Ok(())
}

/// Shows completed I/Os and the current rate while the workers run.
fn progress(duration: Duration, completed: &AtomicU64, stop: &AtomicBool, started: Instant) {
    let terminal = std::io::stderr().is_terminal();
    let bar = if terminal {
        let bar = ProgressBar::new(duration.as_millis() as u64);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{bar:30}] {elapsed}/{duration} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Some(bar)
    } else {
        None
    };
    let mut last = (Instant::now(), 0u64);
    let mut last_line = Instant::now();
    while !stop.load(Ordering::Acquire) && started.elapsed() < duration + Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(250));
        let now = Instant::now();
        let done = completed.load(Ordering::Relaxed);
        let rate = (done - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
        last = (now, done);
        let message = format!("{done} I/Os, {rate:.0} IOPS");
        match &bar {
            Some(bar) => {
                bar.set_position(started.elapsed().as_millis().min(duration.as_millis()) as u64);
                bar.set_message(message);
            }
            None => {
                if now.duration_since(last_line) >= Duration::from_secs(5) {
                    eprintln!("  {:.0} s: {message}", started.elapsed().as_secs_f64());
                    last_line = now;
                }
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

/// Marks the run as over when dropped, so the progress loop ends even if a worker fails.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn worker<B: Backend>(
    controller: &Controller<B>,
    args: &NvmeBenchArgs,
    region: Region,
    index: u16,
    duration: Duration,
    completed: &AtomicU64,
    stop: &AtomicBool,
) -> ring3::Result<QueueResult> {
    let _stop = StopOnDrop(stop);
    let depth = usize::from(args.qd);
    // One slot of the ring always stays empty.
    let entries = (args.qd + 1).max(2);
    let mut queue = controller.io_queue(IoQueueOptions {
        entries,
        interrupts: args.interrupts,
    })?;
    let mut buffers = Vec::with_capacity(depth);
    for slot in 0..depth {
        let buffer = queue.alloc_buffer(args.bs as usize)?;
        // Writes carry recognisable, non-zero data.
        let pattern: Vec<u8> = (0..args.bs as usize)
            .map(|i| (i as u8) ^ (slot as u8) ^ 0x5a)
            .collect();
        buffer.write(0, &pattern)?;
        buffers.push(buffer);
    }

    let mut rng = fastrand::Rng::with_seed(0x7269_6e67_3300 + u64::from(index));
    let ios_in_region = region.blocks / u64::from(region.blocks_per_io);
    // Sequential patterns: each queue walks its own share of the region.
    let share = (ios_in_region / u64::from(args.queues)).max(1);
    let mut cursor = share * u64::from(index) % ios_in_region.max(1);
    let mut next_io = |rng: &mut fastrand::Rng| -> (bool, u64) {
        let slot = if args.pattern.random() {
            rng.u64(0..ios_in_region)
        } else {
            let at = cursor;
            cursor = (cursor + 1) % ios_in_region;
            at
        };
        let write = match args.pattern {
            Pattern::Randread | Pattern::Read => false,
            Pattern::Randwrite | Pattern::Write => true,
            Pattern::Mixed => rng.u8(0..100) >= args.read_percent,
        };
        (
            write,
            region.first_block + slot * u64::from(region.blocks_per_io),
        )
    };

    let nsid = args.nsid;
    let blocks = region.blocks_per_io;
    let mut started_at = vec![Instant::now(); depth];
    let submit = |queue: &mut ring3_nvme::IoQueue<B>, write: bool, lba: u64, buffer, tag: u64| {
        let placed = if write {
            queue.write(nsid, lba, blocks, buffer, tag)
        } else {
            queue.read(nsid, lba, blocks, buffer, tag)
        };
        placed.map_err(ring3_nvme::Error::from)
    };
    let start = Instant::now();
    for (slot, buffer) in buffers.into_iter().enumerate() {
        let (write, lba) = next_io(&mut rng);
        submit(&mut queue, write, lba, buffer, slot as u64)?;
        started_at[slot] = start;
    }
    let deadline = start + duration;
    let mut latency = latency_histogram()?;
    let (mut ios, mut errors, mut first_error) = (0u64, 0u64, None);
    let mut out: Vec<IoCompletion> = Vec::with_capacity(depth);
    loop {
        if args.interrupts {
            queue.wait(&mut out)?;
        } else {
            queue.poll(&mut out)?;
        }
        if out.is_empty() {
            if queue.in_flight() == 0 {
                break;
            }
            continue;
        }
        let now = Instant::now();
        let running = now < deadline;
        let batch = out.len() as u64;
        for completion in out.drain(..) {
            let slot = completion.tag as usize;
            let Some(since) = started_at.get(slot) else {
                continue;
            };
            match completion.result {
                Ok(()) => {
                    ios += 1;
                    let nanos = now.duration_since(*since).as_nanos() as u64;
                    latency.saturating_record(nanos.max(1));
                }
                Err(error) => {
                    errors += 1;
                    first_error.get_or_insert_with(|| error.to_string());
                }
            }
            if running {
                if let Some(buffer) = completion.buffer {
                    let (write, lba) = next_io(&mut rng);
                    submit(&mut queue, write, lba, buffer, slot as u64)?;
                    started_at[slot] = now;
                }
            }
        }
        completed.fetch_add(batch, Ordering::Relaxed);
        if !running && queue.in_flight() == 0 {
            break;
        }
    }
    let stats = queue.stats();
    Ok(QueueResult {
        doorbells: (
            stats.mmio_doorbells,
            stats.kicks,
            queue.uses_shadow_doorbells(),
        ),
        empty_polls: stats.empty_polls,
        latency_ns: latency,
        ios,
        errors,
        first_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(bs: u64, offset: u64, size: Option<u64>) -> NvmeBenchArgs {
        NvmeBenchArgs {
            address: "0000:00:03.0".into(),
            nsid: 1,
            pattern: Pattern::Randread,
            bs,
            qd: 1,
            queues: 1,
            duration: 1.0,
            interrupts: false,
            read_percent: 70,
            offset,
            size,
            shadow_doorbells: false,
            json: false,
        }
    }

    fn namespace(blocks: u64, block_shift: u8) -> Namespace {
        Namespace {
            id: 1,
            blocks,
            capacity: blocks,
            utilization: 0,
            block_shift,
            metadata_size: 0,
            deallocated_reads_zeroes: true,
            thin_provisioned: false,
        }
    }

    #[test]
    fn latencies_from_nanoseconds_to_seconds_are_kept() {
        let mut histogram = latency_histogram().unwrap();
        for nanos in [900, 250_000, 250_000, 250_000, 3_000_000_000] {
            histogram.saturating_record(nanos);
        }
        let p50 = histogram.value_at_quantile(0.5);
        assert!((249_000..=251_000).contains(&p50), "{p50}");
        assert!(histogram.max() >= 2_990_000_000);
        assert!(histogram.min() <= 901);
    }

    #[test]
    fn the_region_is_checked_against_the_namespace() {
        let ns = namespace(1000, 9);
        let region = region(&args(4096, 1024, Some(8192)), &ns, 1 << 20).unwrap();
        assert_eq!(
            (region.first_block, region.blocks, region.blocks_per_io),
            (2, 16, 8)
        );
        let whole = super::region(&args(512, 0, None), &ns, 1 << 20).unwrap();
        assert_eq!(whole.blocks, 1000);
        for bad in [
            args(1000, 0, None),          // not a multiple of the block size
            args(4096, 100, None),        // misaligned offset
            args(4096, 0, Some(2048)),    // smaller than one I/O
            args(4096, 0, Some(1 << 30)), // beyond the namespace
            args(2 << 20, 0, None),       // beyond the transfer limit
        ] {
            assert!(super::region(&bad, &ns, 1 << 20).is_err(), "{bad:?}");
        }
    }
}
