//! The bench's output: a Markdown report, the raw numbers as JSON and the IOPS-against-
//! queue-depth chart.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::hostload::HostLoad;
use super::plot::{self, Series};
use super::results::{implausible_latency, Latency, Measurement};
use super::workload::{Completion, Pattern, Workload, SMALL_BLOCK};

/// What became of one workload on one driver.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// It ran; `raw` is the tool's own JSON (fio's job object, or ring3's report).
    Measured {
        measurement: Measurement,
        raw: Value,
    },
    /// It ran and failed, or its output could not be read.
    Failed { reason: String },
    /// It was not run.
    Skipped { reason: String },
}

impl Outcome {
    pub fn measurement(&self) -> Option<&Measurement> {
        match self {
            Outcome::Measured { measurement, .. } => Some(measurement),
            _ => None,
        }
    }

    pub(super) fn to_json(&self) -> Value {
        match self {
            Outcome::Measured { measurement, raw } => json!({
                "status": "measured",
                "summary": measurement_json(measurement),
                "raw": raw,
            }),
            Outcome::Failed { reason } => json!({ "status": "failed", "reason": reason }),
            Outcome::Skipped { reason } => json!({ "status": "skipped", "reason": reason }),
        }
    }

    pub(super) fn short(&self) -> &'static str {
        match self {
            Outcome::Measured { .. } => "",
            Outcome::Failed { .. } => "failed",
            Outcome::Skipped { .. } => "skipped",
        }
    }
}

fn latency_json(latency: &Latency) -> Value {
    json!({
        "mean": latency.mean,
        "p50": latency.p50,
        "p99": latency.p99,
        "p99_9": latency.p99_9,
        "max": latency.max,
    })
}

fn measurement_json(m: &Measurement) -> Value {
    json!({
        "iops": m.iops,
        "bandwidth_bytes_per_s": m.bandwidth_bytes_per_s,
        "ios": m.ios,
        "duration_s": m.duration_s,
        "latency_us": latency_json(&m.latency_us),
        "cpu_percent": m.cpu_percent,
        "errors": m.errors,
    })
}

/// One workload, both drivers.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub workload: Workload,
    pub kernel: Outcome,
    pub ring3: Outcome,
}

impl Row {
    /// ring3's IOPS over the kernel's, when both were measured.
    pub fn ratio(&self) -> Option<f64> {
        let kernel = self.kernel.measurement()?;
        let ring3 = self.ring3.measurement()?;
        (kernel.iops > 0.0).then(|| ring3.iops / kernel.iops)
    }
}

/// Where and how the numbers were taken.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Environment {
    /// `YYYY-MM-DD HH:MM UTC`.
    pub date: String,
    /// The workspace's commit, with `-dirty` when it had changes.
    pub commit: Option<String>,
    pub host_cpu: Option<String>,
    pub host_cpus: usize,
    pub host_kernel: Option<String>,
    pub qemu: Option<String>,
    /// Where the host's CPU time went while the VM ran.
    pub host_load: Option<HostLoad>,
    /// `key=value` facts the guest reported (kernel, fio version, queues, ...).
    pub guest: Vec<(String, String)>,
}

impl Environment {
    pub(super) fn guest(&self, key: &str) -> Option<&str> {
        self.guest
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
}

/// The bench's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub duration_s: u64,
    pub region_bytes: u64,
    pub namespace_bytes: u64,
    pub block_size: u32,
    pub guest_cpus: u32,
    pub guest_memory_mib: u32,
    pub nvme_poll_queues: u32,
    pub nvme_max_io_queue_pairs: u32,
}

/// Everything the bench found out.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub environment: Environment,
    pub settings: Settings,
    /// The fio pass that filled the region before the reads.
    pub fill: Outcome,
    pub rows: Vec<Row>,
    /// Things that went wrong or were left out, for the reader.
    pub notes: Vec<String>,
}

/// `2025-01-31 12:34 UTC`.
pub fn utc_timestamp(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let (year, month, day) = civil_from_days(days);
    let rest = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `12,345`.
pub(super) fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Microseconds with sensible precision.
pub(super) fn micros(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.2}")
    } else if value < 100.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.0}")
    }
}

pub(super) fn mib(bytes: u64) -> String {
    if bytes % (1 << 30) == 0 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes as f64 / f64::from(1u32 << 20))
    }
}

pub(super) fn cell(outcome: &Outcome, value: impl Fn(&Measurement) -> String) -> String {
    match outcome.measurement() {
        Some(m) => value(m),
        None => outcome.short().to_string(),
    }
}

/// IOPS and latency of the kernel driver and of `other` (the `ring3` side of each row),
/// and their ratio, one row per workload; latencies failing the Little's-law check are
/// marked.
pub(super) fn comparison_table(rows: &[Row], other: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| workload | kernel IOPS | {other} IOPS | {other} / kernel | kernel p50 µs | kernel p99 µs | {other} p50 µs | {other} p99 µs |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
    let flagged = std::cell::Cell::new(false);
    for row in rows {
        let depth = row.workload.queue_depth;
        let latency = |m: &Measurement, value: f64| {
            if implausible_latency(depth, m).is_some() {
                flagged.set(true);
                format!("{} †", micros(value))
            } else {
                micros(value)
            }
        };
        let ratio = row
            .ratio()
            .map(|r| format!("{r:.2}×"))
            .unwrap_or_else(|| "—".to_string());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            row.workload.describe(),
            cell(&row.kernel, |m| thousands(m.iops)),
            cell(&row.ring3, |m| thousands(m.iops)),
            ratio,
            cell(&row.kernel, |m| latency(m, m.latency_us.p50)),
            cell(&row.kernel, |m| latency(m, m.latency_us.p99)),
            cell(&row.ring3, |m| latency(m, m.latency_us.p50)),
            cell(&row.ring3, |m| latency(m, m.latency_us.p99)),
        );
    }
    if flagged.get() {
        let _ = writeln!(
            s,
            "\n† fails the Little's-law check (mean latency × IOPS should be about the \
             queue depth), so this latency cannot be right; see the notes."
        );
    }
    s
}

/// A report's title and the line saying when and from which commit it was measured.
pub(super) fn heading(title: &str, bench: &str, env: &Environment) -> String {
    format!(
        "# {title}\n\nMeasured {} with `cargo xtask bench {bench}`{}.\n\n",
        env.date,
        env.commit
            .as_deref()
            .map(|c| format!(" at commit `{c}`"))
            .unwrap_or_default()
    )
}

/// The notes (when there are any), then the start of "How it was measured": the host,
/// the VM and the host's load while the VM ran.
pub(super) fn notes_and_setup(notes: &[String], env: &Environment, set: &Settings) -> String {
    let mut s = notes_and_host(notes, env);
    let _ = writeln!(
        s,
        "- VM: {}, `-machine q35,accel=tcg -cpu max -smp {} -m {}M`, `intel-iommu` with \
         interrupt remapping; one NVMe controller (`max_ioqpairs={}`) with one namespace of \
         {} and {}-byte blocks, on a sparse raw image on the host.",
        env.qemu.as_deref().unwrap_or("QEMU (version unknown)"),
        set.guest_cpus,
        set.guest_memory_mib,
        set.nvme_max_io_queue_pairs,
        mib(set.namespace_bytes),
        set.block_size
    );
    s.push_str(&host_load_line(env));
    s
}

/// The notes (when there are any), then "How it was measured" up to its host.
pub(super) fn notes_and_host(notes: &[String], env: &Environment) -> String {
    let unknown = "unknown";
    let mut s = String::new();
    if !notes.is_empty() {
        let _ = writeln!(s, "## Notes\n");
        for note in notes {
            let _ = writeln!(s, "- {note}");
        }
        s.push('\n');
    }
    let _ = writeln!(s, "## How it was measured\n");
    let _ = writeln!(
        s,
        "- Host: {}, {} CPUs, Linux {}.",
        env.host_cpu.as_deref().unwrap_or(unknown),
        env.host_cpus,
        env.host_kernel.as_deref().unwrap_or(unknown)
    );
    s
}

/// The list item on the host's load while the VM ran.
pub(super) fn host_load_line(env: &Environment) -> String {
    format!(
        "- Host load while the VM ran: {}.\n",
        match &env.host_load {
            Some(load) => format!(
                "other processes used {:.1}% of the host's CPU time, steal {:.1}%",
                load.others_percent, load.steal_percent
            ),
            None => "not measured".to_string(),
        }
    )
}

/// The environment and settings as JSON, under the keys every bench's JSON shares.
pub(super) fn environment_json(benchmark: &str, env: &Environment, set: &Settings) -> Value {
    let guest: serde_json::Map<String, Value> = env
        .guest
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "benchmark": benchmark,
        "date": env.date,
        "commit": env.commit,
        "note": "QEMU TCG lab: absolute numbers are meaningless; compare the drivers' ratios",
        "host": {
            "cpu": env.host_cpu,
            "cpus": env.host_cpus,
            "kernel": env.host_kernel,
            "qemu": env.qemu,
            "others_cpu_percent": env.host_load.map(|l| l.others_percent),
            "steal_cpu_percent": env.host_load.map(|l| l.steal_percent),
        },
        "guest": guest,
        "settings": {
            "duration_s": set.duration_s,
            "region_bytes": set.region_bytes,
            "namespace_bytes": set.namespace_bytes,
            "block_size": set.block_size,
            "guest_cpus": set.guest_cpus,
            "guest_memory_mib": set.guest_memory_mib,
            "nvme_poll_queues": set.nvme_poll_queues,
            "nvme_max_io_queue_pairs": set.nvme_max_io_queue_pairs,
        },
    })
}

impl Report {
    /// The main table: IOPS and latency of both drivers, and their ratio.
    pub fn summary_table(&self) -> String {
        comparison_table(&self.rows, "ring3")
    }

    /// The measurement of 4 KiB random reads at `depth` with `completion`, for one driver.
    fn randread(&self, depth: u32, completion: Completion, ring3: bool) -> Option<&Measurement> {
        let row = self.rows.iter().find(|row| {
            row.workload.pattern == Pattern::RandRead
                && row.workload.block_size == SMALL_BLOCK
                && row.workload.queue_depth == depth
                && row.workload.completion == completion
        })?;
        if ring3 {
            row.ring3.measurement()
        } else {
            row.kernel.measurement()
        }
    }

    /// The ratios the project set itself as targets, and where the time goes.
    fn analysis(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## Against the targets\n");
        let _ = writeln!(
            s,
            "ring3's fastest mode (polling) against the kernel driver, 4 KiB random reads; the \
             targets are what the best existing user-space NVMe driver reaches on this lab \
             device.\n"
        );
        let _ = writeln!(
            s,
            "| comparison | kernel IOPS | ring3 IOPS | ratio | target |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        let targets = [
            (
                "QD1: ring3 polled / kernel with interrupts",
                1,
                Completion::Interrupt,
                7.0,
            ),
            (
                "QD32: ring3 polled / kernel with interrupts",
                32,
                Completion::Interrupt,
                13.0,
            ),
            (
                "QD32: ring3 polled / kernel polled (`--hipri`)",
                32,
                Completion::Poll,
                8.0,
            ),
        ];
        for (label, depth, kernel_mode, target) in targets {
            let kernel = self.randread(depth, kernel_mode, false);
            let ring3 = self.randread(depth, Completion::Poll, true);
            if let (Some(kernel), Some(ring3)) = (kernel, ring3) {
                let _ = writeln!(
                    s,
                    "| {label} | {} | {} | {:.2}× | {target:.0}× |",
                    thousands(kernel.iops),
                    thousands(ring3.iops),
                    ring3.iops / kernel.iops.max(f64::MIN_POSITIVE)
                );
            }
        }
        let _ = writeln!(s, "\n## Where the time goes\n");
        let _ = writeln!(
            s,
            "Guest CPU time per I/O (user + system, from each tool's own accounting) shows the \
             cost of each driver's path; ring3's counters show whether it was busy or waiting: \
             an *empty poll* is a look at the completion queue that found nothing while commands \
             were in flight, and *MMIO doorbells* are register writes, each of which leaves \
             translated code for QEMU's device model.\n"
        );
        let _ = writeln!(
            s,
            "| workload | kernel CPU µs/I/O | ring3 CPU µs/I/O | ring3 empty polls/I/O | ring3 MMIO doorbells/I/O |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        let cpu_per_io = |m: &Measurement| {
            m.cpu_percent
                .filter(|_| m.ios > 0)
                .map(|percent| {
                    format!("{:.1}", percent / 100.0 * m.duration_s * 1e6 / m.ios as f64)
                })
                .unwrap_or_else(|| "—".into())
        };
        for row in &self.rows {
            let raw = match &row.ring3 {
                Outcome::Measured { raw, .. } => Some(raw),
                _ => None,
            };
            let number = |value: Option<f64>| {
                value
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or_else(|| "—".into())
            };
            let empty = raw.and_then(|raw| raw["empty_polls_per_io"].as_f64());
            let mmio = raw.and_then(|raw| raw["doorbells"]["mmio_writes_per_io"].as_f64());
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                row.workload.describe(),
                cell(&row.kernel, cpu_per_io),
                cell(&row.ring3, cpu_per_io),
                if row.workload.completion == Completion::Poll {
                    number(empty)
                } else {
                    "—".into()
                },
                number(mmio),
            );
        }
        let _ = writeln!(
            s,
            "\nReading it: the kernel spends its guest CPU in the block layer, io_uring and \
             interrupt handling, so it is CPU-bound and its polled mode (`--hipri`) runs a guest \
             CPU at 100% for little gain. ring3 needs a fraction of that CPU per I/O; from QD4 \
             up its poll loop mostly finds nothing (dozens of empty polls per I/O) and MMIO \
             doorbells fall well below one per I/O because submissions and completions are \
             batched: ring3 is then waiting for QEMU's NVMe model, which processes commands in \
             QEMU's main loop on the host's other core. That device model, not the driver, caps \
             ring3's IOPS at high queue depths here; the ratios at QD32 measure how much of the \
             device the kernel's per-I/O cost leaves unused. Shadow doorbells (`ring3 bench \
             --shadow-doorbells`) did not change this: with batching there are few MMIO writes \
             left to save.\n"
        );
        s
    }

    pub fn markdown(&self, chart_file: &str, json_file: &str) -> String {
        let env = &self.environment;
        let set = &self.settings;
        let mut s = String::new();
        s.push_str(&heading(
            "NVMe: ring3 against the Linux kernel driver",
            "nvme",
            env,
        ));
        let _ = writeln!(
            s,
            "> **Only the ratios mean anything.** The lab emulates the whole machine with QEMU's \
             TCG (no KVM): the CPUs, the NVMe controller and its interrupts all run in software on \
             the host, many host instructions per guest instruction. Absolute IOPS and latencies \
             here say nothing about real hardware; what counts is the ratio between the two \
             drivers, measured one after the other on the same emulated device in the same VM. \
             Each cell is a single run of {} s, and under TCG results (low queue depths with \
             interrupts most of all) can differ by tens of percent from one run to the next.\n",
            set.duration_s
        );
        s.push_str(&self.summary_table());
        let _ = writeln!(
            s,
            "\nCPU time (user + system, percent of one guest CPU) and bandwidth:\n"
        );
        let _ = writeln!(
            s,
            "| workload | kernel CPU % | ring3 CPU % | kernel MiB/s | ring3 MiB/s |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        let cpu = |m: &Measurement| {
            m.cpu_percent
                .map(|c| format!("{c:.0}"))
                .unwrap_or_else(|| "—".into())
        };
        let bandwidth = |m: &Measurement| format!("{:.1}", m.bandwidth_bytes_per_s / 1048576.0);
        for row in &self.rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                row.workload.describe(),
                cell(&row.kernel, cpu),
                cell(&row.ring3, cpu),
                cell(&row.kernel, bandwidth),
                cell(&row.ring3, bandwidth),
            );
        }
        let _ = writeln!(
            s,
            "\n![4 KiB random read: IOPS against queue depth]({chart_file})\n"
        );

        s.push_str(&self.analysis());

        s.push_str(&notes_and_setup(&self.notes, env, set));
        let unknown = "unknown";
        let _ = writeln!(
            s,
            "- Guest: Linux {}, booted once. Each workload ran on both drivers back to back, \
             alternately kernel first and ring3 first, the controller ({}) moving between \
             `nvme` and vfio-pci with `ring3 bind` and `ring3 unbind`.",
            env.guest("guest_kernel").unwrap_or(unknown),
            env.guest("device").unwrap_or(unknown)
        );
        let _ = writeln!(
            s,
            "- Kernel driver: `nvme` with `poll_queues={}` ({}); {} with `--ioengine=io_uring \
             --direct=1 --fixedbufs=1 --registerfiles=1`, one job; polled rows add `--hipri`. \
             Latency is fio's total latency (submission to completion).",
            set.nvme_poll_queues,
            env.guest("nvme_queues").unwrap_or("queue layout unknown"),
            env.guest("fio").unwrap_or("fio")
        );
        let _ = writeln!(
            s,
            "- ring3: `ring3 bench nvme` over vfio-pci with one I/O queue pair; polled rows poll \
             the completion queue, interrupt rows wait for MSI-X (`--interrupts`)."
        );
        let _ = writeln!(
            s,
            "- Every workload ran {} s over the first {} of namespace 1, which a 128 KiB \
             sequential write pass filled first, so reads hit written blocks for both drivers.",
            set.duration_s,
            mib(set.region_bytes)
        );
        let _ = writeln!(
            s,
            "- All numbers, including fio's full latency percentiles and ring3's report: \
             [{json_file}]({json_file})."
        );
        s
    }

    /// All numbers, raw tool output included.
    pub fn json(&self) -> Value {
        let mut value = environment_json("nvme", &self.environment, &self.settings);
        value["fill"] = self.fill.to_json();
        value["workloads"] = self
            .rows
            .iter()
            .map(|row| {
                json!({
                    "id": row.workload.id(),
                    "description": row.workload.describe(),
                    "pattern": row.workload.pattern.name(),
                    "block_size": row.workload.block_size,
                    "queue_depth": row.workload.queue_depth,
                    "completion": row.workload.completion.name(),
                    "ring3_over_kernel_iops": row.ratio(),
                    "kernel": row.kernel.to_json(),
                    "ring3": row.ring3.to_json(),
                })
            })
            .collect();
        value["notes"] = json!(self.notes);
        value
    }
    /// The IOPS-against-queue-depth chart of the 4 KiB random reads.
    pub fn chart(&self) -> String {
        let line = |label: &str, color, completion, pick: fn(&Row) -> &Outcome| Series {
            label: label.to_string(),
            color,
            dashed: completion == Completion::Poll,
            points: self
                .rows
                .iter()
                .filter(|row| {
                    row.workload.pattern == Pattern::RandRead
                        && row.workload.block_size == SMALL_BLOCK
                        && row.workload.completion == completion
                })
                .filter_map(|row| Some((row.workload.queue_depth, pick(row).measurement()?.iops)))
                .collect(),
        };
        let series = [
            line(
                "kernel nvme, interrupts",
                "#1f5fa8",
                Completion::Interrupt,
                |r| &r.kernel,
            ),
            line(
                "kernel nvme, polled (hipri)",
                "#1f5fa8",
                Completion::Poll,
                |r| &r.kernel,
            ),
            line("ring3, interrupts", "#c0392b", Completion::Interrupt, |r| {
                &r.ring3
            }),
            line("ring3, polled", "#c0392b", Completion::Poll, |r| &r.ring3),
        ];
        plot::iops_vs_queue_depth(
            "4 KiB random read: IOPS against queue depth",
            &format!(
                "QEMU TCG lab, one VM, {}; only the ratio between drivers counts",
                self.environment.date
            ),
            &series,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::workload::workloads;
    use super::*;

    /// A result with a given IOPS, median latency and mean latency.
    fn measured_with_mean(iops: f64, p50: f64, mean: f64) -> Outcome {
        Outcome::Measured {
            measurement: Measurement {
                iops,
                bandwidth_bytes_per_s: iops * 4096.0,
                ios: (iops * 10.0) as u64,
                latency_us: Latency {
                    mean,
                    p50,
                    p99: p50 * 2.0,
                    p99_9: p50 * 3.0,
                    max: p50 * 10.0,
                },
                cpu_percent: Some(50.0),
                errors: 0,
                duration_s: 10.0,
            },
            raw: json!({ "iops": iops }),
        }
    }

    /// A closed loop at `depth` consistent with Little's law.
    fn measured(iops: f64, p50: f64, depth: u32) -> Outcome {
        measured_with_mean(iops, p50, f64::from(depth) * 1e6 / iops)
    }

    fn report() -> Report {
        let rows = workloads(true)
            .into_iter()
            .enumerate()
            .map(|(i, workload)| Row {
                workload,
                kernel: measured(1000.0 * (i + 1) as f64, 80.0, workload.queue_depth),
                ring3: if i == 1 {
                    Outcome::Failed {
                        reason: "exit status 1".into(),
                    }
                } else if i == 2 {
                    measured_with_mean(1500.0 * (i + 1) as f64, 0.002, 0.002)
                } else {
                    measured(1500.0 * (i + 1) as f64, 50.0, workload.queue_depth)
                },
            })
            .collect();
        Report {
            environment: Environment {
                date: "2025-01-31 12:34 UTC".into(),
                commit: Some("abc1234".into()),
                host_cpu: Some("Some CPU".into()),
                host_cpus: 2,
                host_kernel: Some("6.1.0".into()),
                qemu: Some("QEMU emulator version 7.2.22".into()),
                host_load: Some(HostLoad {
                    others_percent: 1.25,
                    steal_percent: 0.0,
                }),
                guest: vec![
                    ("guest_kernel".into(), "6.12.117+deb12-amd64".into()),
                    ("device".into(), "0000:00:01.0".into()),
                    (
                        "nvme_queues".into(),
                        "2/0/2 default/read/poll queues".into(),
                    ),
                ],
            },
            settings: Settings {
                duration_s: 10,
                region_bytes: 1 << 30,
                namespace_bytes: 1 << 30,
                block_size: 4096,
                guest_cpus: 2,
                guest_memory_mib: 1024,
                nvme_poll_queues: 2,
                nvme_max_io_queue_pairs: 8,
            },
            fill: measured(100.0, 1000.0, 32),
            rows,
            notes: vec!["ring3 failed one workload".into()],
        }
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_089), (2025, 1, 1));
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_738_326_840);
        assert_eq!(utc_timestamp(t), "2025-01-31 12:34 UTC");
    }

    #[test]
    fn number_formats() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.6), "1,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(micros(5.123), "5.12");
        assert_eq!(micros(55.55), "55.5");
        assert_eq!(micros(1234.4), "1234");
        assert_eq!(mib(1 << 30), "1 GiB");
        assert_eq!(mib(256 << 20), "256 MiB");
    }

    #[test]
    fn the_targets_and_the_time_per_io_are_reported() {
        let md = report().markdown("nvme-iops-vs-qd.svg", "nvme.json");
        assert!(md.contains("## Against the targets"), "{md}");
        assert!(
            md.contains("| QD1: ring3 polled / kernel with interrupts |"),
            "{md}"
        );
        assert!(md.contains("## Where the time goes"), "{md}");
        assert!(md.contains("| workload | kernel CPU µs/I/O |"), "{md}");
    }

    #[test]
    fn markdown_table_has_both_drivers_and_the_ratio() {
        let md = report().markdown("nvme-iops-vs-qd.svg", "nvme.json");
        assert!(md.contains("Only the ratios mean anything"));
        assert!(md.contains("| 4 KiB random read, QD1, interrupts | 1,000 | 1,500 | 1.50× | 80.0 | 160 | 50.0 | 100 |"), "{md}");
        assert!(
            md.contains("| 4 KiB random read, QD4, interrupts | 2,000 | failed | — |"),
            "{md}"
        );
        assert!(
            md.contains("| 4 KiB random read, QD32, interrupts | 3,000 | 4,500 | 1.50× | 80.0 | 160 | 0.00 † | 0.00 † |"),
            "{md}"
        );
        assert!(md.contains("† fails the Little's-law check"));
        assert!(md.contains("2025-01-31 12:34 UTC"));
        assert!(md.contains("abc1234"));
        assert!(md.contains("QEMU emulator version 7.2.22"));
        assert!(md.contains("6.12.117+deb12-amd64"));
        assert!(md.contains("poll_queues=2"));
        assert!(md.contains("(nvme-iops-vs-qd.svg)"));
        assert!(md.contains("- ring3 failed one workload"));
        assert!(
            md.contains("other processes used 1.2% of the host's CPU time"),
            "{md}"
        );
    }

    #[test]
    fn json_keeps_raw_output_and_status() {
        let value = report().json();
        let workloads = value["workloads"].as_array().expect("workloads");
        assert_eq!(workloads.len(), report().rows.len());
        assert_eq!(workloads[0]["kernel"]["status"], "measured");
        assert_eq!(workloads[0]["kernel"]["raw"]["iops"], 1000.0);
        assert_eq!(workloads[0]["ring3_over_kernel_iops"], 1.5);
        assert_eq!(workloads[1]["ring3"]["status"], "failed");
        assert!(workloads[1]["ring3_over_kernel_iops"].is_null());
        assert_eq!(value["guest"]["device"], "0000:00:01.0");
        assert_eq!(value["settings"]["nvme_poll_queues"], 2);
    }

    #[test]
    fn chart_has_a_line_per_driver_and_mode() {
        let svg = report().chart();
        assert_eq!(svg.matches("<polyline").count(), 4);
        for label in [
            "kernel nvme, interrupts",
            "kernel nvme, polled (hipri)",
            "ring3, interrupts",
            "ring3, polled",
        ] {
            assert!(svg.contains(label), "{label}");
        }
    }
}
