//! The report of `bench ublk`: ublk.md and ublk.json.

use std::fmt::Write as _;

use serde_json::{json, Value};

use super::recovery::{Recovery, Stats};
use crate::bench::report::{
    comparison_table, environment_json, heading, mib, micros, notes_and_setup, thousands,
    Environment, Outcome, Row, Settings,
};
use crate::bench::results::Measurement;
use crate::bench::workload::{Pattern, Workload, SMALL_BLOCK};

/// The queue depth of the target: at QD32, 4 KiB random reads through ublk must reach at
/// least the kernel driver's IOPS.
pub const TARGET_DEPTH: u32 = 32;
pub const TARGET_RATIO: f64 = 1.0;

/// What the reader that ran during the kills saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Reader {
    pub ios: Option<u64>,
    /// I/Os that failed (fio's `total_err` with `--continue_on_error`).
    pub errors: Option<u64>,
    pub raw: Value,
}

impl Reader {
    /// From fio's JSON.
    pub fn from_fio(raw: Value) -> Reader {
        let job = &raw["jobs"][0];
        Reader {
            ios: job["read"]["total_ios"].as_u64(),
            errors: job["total_err"].as_u64(),
            raw,
        }
    }
}

/// Everything `bench ublk` found out.
#[derive(Debug, Clone, PartialEq)]
pub struct UblkReport {
    pub environment: Environment,
    pub settings: Settings,
    /// How many kills were asked for.
    pub kills: u32,
    /// ring3d's driver: I/O queue pairs and their depth.
    pub daemon_queues: (u32, u32),
    pub fill: Outcome,
    /// The kernel driver against ublk (the `ring3` side of each row).
    pub rows: Vec<Row>,
    /// ring3's API without ublk.
    pub direct: Vec<(Workload, Outcome)>,
    /// The kills, or why there are none.
    pub recovery: Result<Recovery, String>,
    pub reader: Option<Reader>,
    /// `ring3 status --json` after the kills.
    pub status: Option<Value>,
    pub notes: Vec<String>,
}

/// The ublk side's 4 KiB random reads at `depth`.
fn randread_row(rows: &[Row], depth: u32) -> Option<&Row> {
    rows.iter().find(|row| {
        row.workload.pattern == Pattern::RandRead
            && row.workload.block_size == SMALL_BLOCK
            && row.workload.queue_depth == depth
    })
}

/// One comparison of the direct API with ublk at one depth.
struct Hop<'a> {
    depth: u32,
    direct: &'a Measurement,
    ublk: &'a Measurement,
}

impl Hop<'_> {
    /// What ublk adds to the mean latency, in µs.
    fn mean_us(&self) -> f64 {
        self.ublk.latency_us.mean - self.direct.latency_us.mean
    }

    fn p50_us(&self) -> f64 {
        self.ublk.latency_us.p50 - self.direct.latency_us.p50
    }
}

fn ms(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.0}")
    }
}

impl UblkReport {
    /// ublk's IOPS over the kernel's at the target's depth, with both measurements.
    pub fn target(&self) -> Option<(f64, &Measurement, &Measurement)> {
        let row = randread_row(&self.rows, TARGET_DEPTH)?;
        Some((
            row.ratio()?,
            row.kernel.measurement()?,
            row.ring3.measurement()?,
        ))
    }

    /// Whether the target is met; `None` when it could not be measured.
    pub fn target_met(&self) -> Option<bool> {
        self.target().map(|(ratio, ..)| ratio >= TARGET_RATIO)
    }

    fn hops(&self) -> Vec<Hop<'_>> {
        self.direct
            .iter()
            .filter_map(|(workload, outcome)| {
                let row = randread_row(&self.rows, workload.queue_depth)?;
                Some(Hop {
                    depth: workload.queue_depth,
                    direct: outcome.measurement()?,
                    ublk: row.ring3.measurement()?,
                })
            })
            .collect()
    }

    /// The QD1 hop cost in µs (mean latency), for the terminal.
    pub fn qd1_hop_us(&self) -> Option<f64> {
        self.hops()
            .iter()
            .find(|hop| hop.depth == 1)
            .map(Hop::mean_us)
    }

    /// The main table, for the report and the terminal.
    pub fn summary_table(&self) -> String {
        comparison_table(&self.rows, "ublk")
    }

    fn target_section(&self, s: &mut String) {
        let _ = writeln!(s, "## Against the target\n");
        let _ = writeln!(
            s,
            "The target: through ublk, ring3 reaches at least the kernel driver's IOPS for 4 KiB \
             random reads at QD{TARGET_DEPTH}.\n"
        );
        let _ = writeln!(
            s,
            "| comparison | kernel IOPS | ublk IOPS | ublk / kernel | target | |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---|");
        match self.target() {
            Some((ratio, kernel, ublk)) => {
                let met = ratio >= TARGET_RATIO;
                let _ = writeln!(
                    s,
                    "| 4 KiB random read, QD{TARGET_DEPTH} | {} | {} | {ratio:.2}× | ≥ {TARGET_RATIO:.2}× | {} |",
                    thousands(kernel.iops),
                    thousands(ublk.iops),
                    if met { "met" } else { "**not met**" }
                );
                if !met {
                    let _ = writeln!(
                        s,
                        "\n> **Not met.** Through ublk ring3 reached {:.0}% of the kernel \
                         driver's IOPS at QD{TARGET_DEPTH}; the direct-API comparison below \
                         shows how much of the gap is the ublk hop rather than the driver.",
                        ratio * 100.0
                    );
                }
            }
            None => {
                let _ = writeln!(
                    s,
                    "| 4 KiB random read, QD{TARGET_DEPTH} | — | — | — | ≥ {TARGET_RATIO:.2}× | not measured |"
                );
            }
        }
        s.push('\n');
    }

    fn hop_section(&self, s: &mut String) {
        let _ = writeln!(s, "## What the ublk hop costs\n");
        let _ = writeln!(
            s,
            "4 KiB random reads through ring3's own API (`ring3 bench nvme`, polling the \
             completion queue as ring3d's driver does while I/O is in flight) and through \
             ublk (fio on `/dev/ublkbN`, the same driver behind it). The hop is the \
             difference in latency: the block layer, ublk's io_uring round trip to the \
             driver process and the copy between the request's pages and the driver's DMA \
             buffer.\n"
        );
        let _ = writeln!(
            s,
            "| QD | direct IOPS | ublk IOPS | ublk / direct | direct mean µs | ublk mean µs | hop (mean) µs | direct p50 µs | ublk p50 µs | hop (p50) µs |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let hops = self.hops();
        for hop in &hops {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.2}× | {} | {} | {} | {} | {} | {} |",
                hop.depth,
                thousands(hop.direct.iops),
                thousands(hop.ublk.iops),
                hop.ublk.iops / hop.direct.iops.max(f64::MIN_POSITIVE),
                micros(hop.direct.latency_us.mean),
                micros(hop.ublk.latency_us.mean),
                signed_micros(hop.mean_us()),
                micros(hop.direct.latency_us.p50),
                micros(hop.ublk.latency_us.p50),
                signed_micros(hop.p50_us()),
            );
        }
        if hops.is_empty() {
            let _ = writeln!(s, "| — | not measured | | | | | | | | |");
        }
        if let Some(hop) = hops.iter().find(|hop| hop.depth == 1) {
            let _ = writeln!(
                s,
                "\nAt QD1 an I/O through ublk takes {} µs longer on average than through the \
                 API ({} against {} µs), so ublk delivers {:.0}% of the direct API's IOPS. At \
                 higher depths the latencies include queueing, so the IOPS ratio says more than \
                 the difference.",
                micros(hop.mean_us().abs()),
                micros(hop.ublk.latency_us.mean),
                micros(hop.direct.latency_us.mean),
                100.0 * hop.ublk.iops / hop.direct.iops.max(f64::MIN_POSITIVE)
            );
        }
        s.push('\n');
    }

    fn recovery_section(&self, s: &mut String) {
        let _ = writeln!(s, "## Recovery after the driver process is killed\n");
        let recovery = match &self.recovery {
            Ok(recovery) => recovery,
            Err(why) => {
                let _ = writeln!(s, "Not measured: {why}\n");
                return;
            }
        };
        let stats = |stats: Option<Stats>| match stats {
            Some(st) => (ms(st.median), ms(st.max)),
            None => ("—".into(), "—".into()),
        };
        let (read_median, read_max) = stats(recovery.read_ms());
        let (running_median, running_max) = stats(recovery.running_ms());
        let (base_median, base_max) = stats(recovery.baseline_ms());
        let _ = writeln!(
            s,
            "| measured | kills | median ms | max ms |\n|---|---:|---:|---:|"
        );
        let _ = writeln!(
            s,
            "| **kill → first read completed** | {} of {} recovered | **{read_median}** | **{read_max}** |",
            recovery.recovered().count(),
            recovery.kills.len()
        );
        let _ = writeln!(
            s,
            "| kill → `ring3 status` shows it running again | {} | {running_median} | {running_max} |",
            recovery.kills.iter().filter(|k| k.running).count()
        );
        let _ = writeln!(
            s,
            "| one read with nothing killed (the measurement's own cost) | {} reads | {base_median} | {base_max} |",
            recovery.baseline.len()
        );
        let _ = writeln!(
            s,
            "\nWhat it includes: with a QD1 4 KiB random reader (fio, psync, O_DIRECT) running \
             on the ublk device, the guest script sends SIGKILL to the driver process (its pid \
             from `ring3 status --json`) and at once reads one 4 KiB block with `dd \
             iflag=direct`; the time runs from just before the kill to dd's exit. The kernel \
             holds the read (and the reader's) while the device has no driver; ring3d sees the \
             process die, starts a new one, which opens the controller through VFIO again, \
             resets and initialises it, and takes the ublk device back (`START_USER_RECOVERY` \
             / `END_USER_RECOVERY`); then the held reads are served. So the figure is ring3d's \
             detection of the death, the new process's start-up and sandboxing, the controller's \
             reset and initialisation, the ublk recovery and one read, plus starting `date` \
             and `dd` under TCG (the last row: about {base_median} ms). Between kills the script \
             waits until `ring3 status` shows the device running with a new pid (second row; it \
             polls every 100 ms, each poll a new process under TCG, so it lags the read).\n"
        );
        if let Some(reader) = &self.reader {
            let _ = writeln!(
                s,
                "The reader completed {} reads over the kills with {} failed.\n",
                reader
                    .ios
                    .map(|n| thousands(n as f64))
                    .unwrap_or_else(|| "an unknown number of".into()),
                reader
                    .errors
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "an unknown number".into())
            );
        }
    }

    /// The Markdown report.
    pub fn markdown(&self, json_file: &str) -> String {
        let env = &self.environment;
        let set = &self.settings;
        let mut s = String::new();
        s.push_str(&heading(
            "ublk: ring3's NVMe driver as a block device against the Linux kernel driver",
            "ublk",
            env,
        ));
        let _ = writeln!(
            s,
            "> **Only the ratios mean anything.** The lab emulates the whole machine with QEMU's \
             TCG (no KVM), so absolute IOPS, latencies and recovery times say nothing about real \
             hardware; what counts is how the kernel driver, ring3 behind ublk and ring3's own \
             API compare, measured one after the other on the same emulated controller in the \
             same VM. Each cell is a single run of {} s; under TCG results can differ by tens \
             of percent from one run to the next.\n",
            set.duration_s
        );
        let _ = writeln!(
            s,
            "fio with the same options on the kernel's `/dev/nvme0n1` and on the `/dev/ublkbN` \
             ring3d exposes for the same namespace:\n"
        );
        s.push_str(&self.summary_table());
        s.push('\n');
        self.target_section(&mut s);
        self.hop_section(&mut s);
        self.recovery_section(&mut s);

        s.push_str(&notes_and_setup(&self.notes, env, set));
        let unknown = "unknown";
        let _ = writeln!(
            s,
            "- Guest: Linux {}, booted once, with `nvme poll_queues={}` and `ublk_drv`. In \
             order: the fill, every workload on the kernel driver, the direct API (the \
             controller, {}, moved to vfio-pci with `ring3 bind` and back with `ring3 \
             unbind`), then ring3d started on the controller (it unbinds `nvme` itself), \
             every workload through ublk, the kills, and ring3d stopped with SIGTERM{}.",
            env.guest("guest_kernel").unwrap_or(unknown),
            set.nvme_poll_queues,
            env.guest("device").unwrap_or(unknown),
            env.guest("after_stop")
                .map(|after| format!(" (the controller was then {after})"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "- fio: {} with `--ioengine=io_uring --direct=1 --fixedbufs=1 --registerfiles=1`, \
             one job, interrupts (no `--hipri`: ublk has no polled completion), on both block \
             devices. Latency is fio's total latency (submission to completion).",
            env.guest("fio").unwrap_or("fio")
        );
        let _ = writeln!(
            s,
            "- ring3d: one device, `queues = {}`, `queue_depth = {}`, `namespaces = [1]`, \
             heartbeat every 200 ms (timeout 3 s), driver process as `nobody`; namespace 1 \
             exposed as {}. {} kills asked for.",
            self.daemon_queues.0,
            self.daemon_queues.1,
            env.guest("ublk_device").unwrap_or("a ublk device"),
            self.kills
        );
        let _ = writeln!(
            s,
            "- Direct API: `ring3 bench nvme` with one I/O queue pair, polled."
        );
        let _ = writeln!(
            s,
            "- Every workload ran {} s over the first {} of namespace 1, which a 128 KiB \
             sequential write pass filled first.",
            set.duration_s,
            mib(set.region_bytes)
        );
        let _ = writeln!(
            s,
            "- All numbers, with fio's and ring3's full output and each kill: \
             [{json_file}]({json_file})."
        );
        s
    }

    /// All numbers, raw tool output included.
    pub fn json(&self) -> Value {
        let mut value = environment_json("ublk", &self.environment, &self.settings);
        value["settings"]["kills"] = json!(self.kills);
        value["settings"]["ring3d_queues"] = json!(self.daemon_queues.0);
        value["settings"]["ring3d_queue_depth"] = json!(self.daemon_queues.1);
        value["fill"] = self.fill.to_json();
        value["workloads"] = self
            .rows
            .iter()
            .map(|row| {
                json!({
                    "id": row.workload.id(),
                    "description": row.workload.describe(),
                    "ublk_over_kernel_iops": row.ratio(),
                    "kernel": row.kernel.to_json(),
                    "ublk": row.ring3.to_json(),
                })
            })
            .collect();
        value["direct"] = self
            .direct
            .iter()
            .map(|(workload, outcome)| {
                json!({
                    "id": workload.id(),
                    "description": workload.describe(),
                    "ring3": outcome.to_json(),
                })
            })
            .collect();
        value["target"] = json!({
            "description": "4 KiB random read at QD32: ublk IOPS >= kernel IOPS",
            "ratio": self.target().map(|(ratio, ..)| ratio),
            "met": self.target_met(),
        });
        value["hop"] = self
            .hops()
            .iter()
            .map(|hop| {
                json!({
                    "queue_depth": hop.depth,
                    "direct_iops": hop.direct.iops,
                    "ublk_iops": hop.ublk.iops,
                    "mean_us": hop.mean_us(),
                    "p50_us": hop.p50_us(),
                })
            })
            .collect();
        value["recovery"] = match &self.recovery {
            Ok(recovery) => recovery.json(),
            Err(why) => json!({ "status": "failed", "reason": why }),
        };
        value["reader"] = self.reader.as_ref().map_or(
            Value::Null,
            |reader| json!({ "ios": reader.ios, "errors": reader.errors, "raw": reader.raw }),
        );
        value["ring3d_status"] = self.status.clone().unwrap_or(Value::Null);
        value["notes"] = json!(self.notes);
        value
    }
}

fn signed_micros(value: f64) -> String {
    if value < 0.0 {
        format!("−{}", micros(-value))
    } else {
        format!("+{}", micros(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::results::Latency;
    use crate::bench::workload::Completion;

    fn measured(iops: f64, depth: u32) -> Outcome {
        let mean = f64::from(depth) * 1e6 / iops;
        Outcome::Measured {
            measurement: Measurement {
                iops,
                bandwidth_bytes_per_s: iops * 4096.0,
                ios: (iops * 10.0) as u64,
                latency_us: Latency {
                    mean,
                    p50: mean,
                    p99: mean * 2.0,
                    p99_9: mean * 3.0,
                    max: mean * 10.0,
                },
                cpu_percent: Some(50.0),
                errors: 0,
                duration_s: 10.0,
            },
            raw: json!({ "iops": iops }),
        }
    }

    fn randread(depth: u32, completion: Completion) -> Workload {
        Workload {
            pattern: Pattern::RandRead,
            block_size: 4096,
            queue_depth: depth,
            completion,
        }
    }

    fn report(ublk_qd32: f64) -> UblkReport {
        let rows = vec![
            Row {
                workload: randread(1, Completion::Interrupt),
                kernel: measured(4000.0, 1),
                ring3: measured(5000.0, 1),
            },
            Row {
                workload: randread(32, Completion::Interrupt),
                kernel: measured(12000.0, 32),
                ring3: measured(ublk_qd32, 32),
            },
        ];
        UblkReport {
            environment: Environment {
                date: "2026-12-01 10:00 UTC".into(),
                guest: vec![("ublk_device".into(), "/dev/ublkb0".into())],
                ..Environment::default()
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
            kills: 3,
            daemon_queues: (2, 64),
            fill: measured(100.0, 32),
            rows,
            direct: vec![
                (randread(1, Completion::Poll), measured(10000.0, 1)),
                (randread(32, Completion::Poll), measured(50000.0, 32)),
            ],
            recovery: Recovery::parse(
                "baseline 1 us=8000 status=0\n\
                 kill 1 pid=10 us=1500000 status=0 running_us=1700000 new_pid=11 running=1\n\
                 kill 2 pid=11 us=2500000 status=0 running_us=2700000 new_pid=12 running=1\n",
            )
            .map_err(|e| e.to_string()),
            reader: Some(Reader::from_fio(
                json!({ "jobs": [{ "read": { "total_ios": 1234 }, "total_err": 0 }] }),
            )),
            status: None,
            notes: Vec::new(),
        }
    }

    #[test]
    fn target_met_or_not() {
        let met = report(15000.0);
        assert_eq!(met.target_met(), Some(true));
        let md = met.markdown("ublk.json");
        assert!(md.contains("| 1.25× | ≥ 1.00× | met |"), "{md}");
        assert!(!md.contains("Not met"));
        let short = report(9000.0);
        assert_eq!(short.target_met(), Some(false));
        let md = short.markdown("ublk.json");
        assert!(md.contains("**not met**"), "{md}");
        assert!(md.contains("> **Not met.**"), "{md}");
        assert!(md.contains("75% of the kernel"), "{md}");
    }

    #[test]
    fn hop_and_recovery_are_reported() {
        let report = report(15000.0);
        // Direct at QD1: 100 µs; ublk: 200 µs.
        assert_eq!(report.qd1_hop_us(), Some(100.0));
        let md = report.markdown("ublk.json");
        assert!(
            md.contains("| 1 | 10,000 | 5,000 | 0.50× | 100 | 200 | +100 |"),
            "{md}"
        );
        assert!(md.contains("takes 100 µs longer"), "{md}");
        assert!(
            md.contains(
                "| **kill → first read completed** | 2 of 2 recovered | **2000** | **2500** |"
            ),
            "{md}"
        );
        assert!(
            md.contains("1,234 reads over the kills with 0 failed"),
            "{md}"
        );
        assert!(md.contains("| workload | kernel IOPS | ublk IOPS | ublk / kernel |"));
        let json = report.json();
        assert_eq!(json["benchmark"], "ublk");
        assert_eq!(json["target"]["met"], true);
        assert_eq!(json["hop"][0]["mean_us"], 100.0);
        assert_eq!(json["recovery"]["kill_to_read"]["median_ms"], 2000.0);
        assert_eq!(json["workloads"][1]["ublk_over_kernel_iops"], 1.25);
        assert_eq!(json["settings"]["kills"], 3);
    }

    #[test]
    fn missing_parts_say_so() {
        let mut report = report(15000.0);
        report.rows[1].ring3 = Outcome::Failed {
            reason: "ring3d died".into(),
        };
        report.recovery = Err("ring3d did not start".into());
        report.direct.clear();
        let md = report.markdown("ublk.json");
        assert!(md.contains("| not measured |"), "{md}");
        assert!(md.contains("Not measured: ring3d did not start"), "{md}");
        assert_eq!(report.target_met(), None);
        assert_eq!(report.json()["recovery"]["status"], "failed");
    }
}
