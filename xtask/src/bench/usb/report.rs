//! The report of `bench usb`: usb.md and usb.json.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::bench::report::{
    cell, environment_json, heading, host_load_line, mib, micros, notes_and_host, thousands,
    Environment, Outcome, Row, Settings,
};
use crate::bench::results::implausible_latency;

/// The bench's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct UsbSettings {
    pub duration_s: u64,
    /// Bytes of the device every workload uses (the whole R3RAW image).
    pub region_bytes: u64,
    pub guest_cpus: u32,
    pub guest_memory_mib: u32,
    /// Whether ring3's side was left out (`--kernel-only`).
    pub kernel_only: bool,
}

/// Everything `bench usb` found out.
#[derive(Debug, Clone, PartialEq)]
pub struct UsbReport {
    pub environment: Environment,
    pub settings: UsbSettings,
    pub fill: Outcome,
    /// The kernel's usb-storage against ring3's driver behind ublk (the `ring3` side).
    pub rows: Vec<Row>,
    /// `ring3 status --json` after the ublk runs.
    pub status: Option<Value>,
    pub notes: Vec<String>,
}

fn mib_per_s(bytes_per_s: f64) -> String {
    let value = bytes_per_s / f64::from(1u32 << 20);
    if value < 10.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.1}")
    }
}

impl UsbReport {
    /// IOPS, bandwidth and latency of both drivers and their ratio, one row per workload.
    pub fn summary_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| workload | kernel IOPS | kernel MiB/s | ring3 IOPS | ring3 MiB/s | ring3 / kernel | kernel p50 µs | kernel p99 µs | ring3 p50 µs | ring3 p99 µs |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut flagged = false;
        for row in &self.rows {
            let depth = row.workload.queue_depth;
            let latency = |outcome: &Outcome, p99: bool| {
                cell(outcome, |m| {
                    let value = if p99 {
                        m.latency_us.p99
                    } else {
                        m.latency_us.p50
                    };
                    if implausible_latency(depth, m).is_some() {
                        format!("{} †", micros(value))
                    } else {
                        micros(value)
                    }
                })
            };
            let cells = [
                latency(&row.kernel, false),
                latency(&row.kernel, true),
                latency(&row.ring3, false),
                latency(&row.ring3, true),
            ];
            flagged |= cells.iter().any(|c| c.ends_with('†'));
            let ratio = row
                .ratio()
                .map(|r| format!("{r:.2}×"))
                .unwrap_or_else(|| "—".to_string());
            let ring3 = |value: String| {
                if self.settings.kernel_only {
                    "not run".to_string()
                } else {
                    value
                }
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                row.workload.describe(),
                cell(&row.kernel, |m| thousands(m.iops)),
                cell(&row.kernel, |m| mib_per_s(m.bandwidth_bytes_per_s)),
                ring3(cell(&row.ring3, |m| thousands(m.iops))),
                ring3(cell(&row.ring3, |m| mib_per_s(m.bandwidth_bytes_per_s))),
                ratio,
                cells[0],
                cells[1],
                ring3(cells[2].clone()),
                ring3(cells[3].clone()),
            );
        }
        if flagged {
            let _ = writeln!(
                s,
                "\n† fails the Little's-law check (mean latency × IOPS should be about the \
                 queue depth), so this latency cannot be right; see the notes."
            );
        }
        s
    }

    /// The Markdown report.
    pub fn markdown(&self, json_file: &str) -> String {
        let env = &self.environment;
        let set = &self.settings;
        let unknown = "unknown";
        let mut s = heading(
            "usb: ring3's USB mass storage driver as a block device against the Linux kernel's usb-storage",
            "usb",
            env,
        );
        let _ = writeln!(
            s,
            "> **Only the ratios mean anything.** The lab emulates the whole machine, the xHCI \
             controller and the USB stick with QEMU's TCG (no KVM), so absolute IOPS and \
             bandwidth say nothing about real hardware; what counts is how the kernel's \
             usb-storage driver and ring3's driver (run by ring3d, exposed through ublk) \
             compare, measured one after the other on the same emulated device in the same \
             VM. Each cell is a single run of {} s; under TCG results can differ by tens of \
             percent from one run to the next.\n",
            set.duration_s
        );
        let _ = writeln!(
            s,
            "fio with the same options on the kernel's `/dev/sdX` and on the `/dev/ublkbN` \
             ring3d exposes for the same device:\n"
        );
        s.push_str(&self.summary_table());
        s.push('\n');
        if set.kernel_only {
            let _ = writeln!(
                s,
                "Only the kernel driver was measured (`--kernel-only`).\n"
            );
        }
        s.push_str(&notes_and_host(&self.notes, env));
        let _ = writeln!(
            s,
            "- VM: {}, `-machine q35,accel=tcg -cpu max -smp {} -m {}M`; one `qemu-xhci` \
             controller with QEMU's `usb-storage` (USB `46f4:0001`, serial `R3RAW`, \
             Bulk-Only Transport, {} Mbit/s) on a fresh sparse raw image of {}, and the lab's \
             other USB devices idle beside it.",
            env.qemu.as_deref().unwrap_or("QEMU (version unknown)"),
            set.guest_cpus,
            set.guest_memory_mib,
            env.guest("usb_speed_mbps").unwrap_or(unknown),
            mib(set.region_bytes)
        );
        s.push_str(&host_load_line(env));
        let ring3_part = if set.kernel_only {
            " (ring3's side was not run: `--kernel-only`)".to_string()
        } else {
            format!(
                ", `rmmod usb-storage`, then ring3d started on the device (`usb = \
                 \"46f4:0001:R3RAW\"`, `driver = \"usb-storage\"`, `expose = \"ublk\"`, driver \
                 process as `nobody`), every workload through ublk ({}), and ring3d stopped \
                 with SIGTERM",
                env.guest("ublk_device").unwrap_or("not reached")
            )
        };
        let _ = writeln!(
            s,
            "- Guest: Linux {}, booted once with `xhci_pci` and `ublk_drv`. In order: \
             `sd_mod` and `usb-storage` loaded (the disk was {}, `max_sectors_kb` {}, SCSI \
             queue depth {}), the fill, every workload on the kernel driver{ring3_part}.",
            env.guest("guest_kernel").unwrap_or(unknown),
            env.guest("disk").unwrap_or(unknown),
            env.guest("kernel_max_sectors_kb").unwrap_or(unknown),
            env.guest("kernel_queue_depth").unwrap_or(unknown),
        );
        let _ = writeln!(
            s,
            "- fio: {} with `--ioengine=io_uring --direct=1 --fixedbufs=1 --registerfiles=1`, \
             one job, on both block devices; every workload ran {} s over the whole device, \
             which a 128 KiB sequential write pass (QD8) filled first. Latency is fio's total \
             latency (submission to completion). USB mass storage (Bulk-Only Transport) runs \
             one command at a time, so a queue depth above 1 only queues in the block layer \
             (or in ublk).",
            env.guest("fio").unwrap_or("fio"),
            set.duration_s,
        );
        let _ = writeln!(
            s,
            "- All numbers, with fio's full output: [{json_file}]({json_file})."
        );
        s
    }

    /// All numbers, raw tool output included.
    pub fn json(&self) -> Value {
        let set = &self.settings;
        let shared = Settings {
            duration_s: set.duration_s,
            region_bytes: set.region_bytes,
            namespace_bytes: set.region_bytes,
            block_size: 512,
            guest_cpus: set.guest_cpus,
            guest_memory_mib: set.guest_memory_mib,
            nvme_poll_queues: 0,
            nvme_max_io_queue_pairs: 0,
        };
        let mut value = environment_json("usb", &self.environment, &shared);
        value["settings"] = json!({
            "duration_s": set.duration_s,
            "region_bytes": set.region_bytes,
            "device": "46f4:0001:R3RAW",
            "guest_cpus": set.guest_cpus,
            "guest_memory_mib": set.guest_memory_mib,
            "kernel_only": set.kernel_only,
        });
        value["fill"] = self.fill.to_json();
        value["workloads"] = self
            .rows
            .iter()
            .map(|row| {
                json!({
                    "id": row.workload.id(),
                    "description": row.workload.describe(),
                    "ring3_over_kernel_iops": row.ratio(),
                    "kernel": row.kernel.to_json(),
                    "ring3_ublk": row.ring3.to_json(),
                })
            })
            .collect();
        value["ring3d_status"] = self.status.clone().unwrap_or(Value::Null);
        value["notes"] = json!(self.notes);
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::results::{Latency, Measurement};
    use crate::bench::workload::{Completion, Pattern, Workload};

    fn measured(iops: f64, block: u32, depth: u32) -> Outcome {
        let mean = f64::from(depth) * 1e6 / iops;
        Outcome::Measured {
            measurement: Measurement {
                iops,
                bandwidth_bytes_per_s: iops * f64::from(block),
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

    fn report(ring3: Outcome, kernel_only: bool) -> UsbReport {
        let seq = Workload {
            pattern: Pattern::SeqRead,
            block_size: 128 << 10,
            queue_depth: 1,
            completion: Completion::Interrupt,
        };
        UsbReport {
            environment: Environment {
                date: "2026-12-01 10:00 UTC".into(),
                guest: vec![
                    ("usb_speed_mbps".into(), "5000".into()),
                    ("disk".into(), "/dev/sda".into()),
                ],
                ..Environment::default()
            },
            settings: UsbSettings {
                duration_s: 10,
                region_bytes: 64 << 20,
                guest_cpus: 2,
                guest_memory_mib: 1024,
                kernel_only,
            },
            fill: measured(100.0, 128 << 10, 8),
            rows: vec![Row {
                workload: seq,
                kernel: measured(400.0, 128 << 10, 1),
                ring3,
            }],
            status: None,
            notes: vec!["a note".into()],
        }
    }

    #[test]
    fn both_drivers_with_bandwidth_and_ratio() {
        let report = report(measured(500.0, 128 << 10, 1), false);
        let md = report.markdown("usb.json");
        assert!(
            md.contains(
                "| 128 KiB sequential read, QD1, interrupts | 400 | 50.0 | 500 | 62.5 | 1.25× |"
            ),
            "{md}"
        );
        assert!(md.contains("- a note"), "{md}");
        assert!(md.contains("5000 Mbit/s"), "{md}");
        assert!(md.contains("64 MiB"), "{md}");
        assert!(
            md.contains("every workload through ublk (not reached), and ring3d stopped"),
            "{md}"
        );
        let json = report.json();
        assert_eq!(json["benchmark"], "usb");
        assert_eq!(json["workloads"][0]["ring3_over_kernel_iops"], 1.25);
        assert_eq!(json["workloads"][0]["ring3_ublk"]["status"], "measured");
        assert_eq!(json["settings"]["region_bytes"], 64 << 20);
        assert!(json["settings"].get("nvme_poll_queues").is_none());
    }

    #[test]
    fn kernel_only_says_so() {
        let report = report(
            Outcome::Skipped {
                reason: "--kernel-only".into(),
            },
            true,
        );
        let md = report.markdown("usb.json");
        assert!(
            md.contains("| 400 | 50.0 | not run | not run | — |"),
            "{md}"
        );
        assert!(md.contains("Only the kernel driver was measured"), "{md}");
        assert!(!md.contains("rmmod"), "{md}");
        assert!(
            md.contains("every workload on the kernel driver (ring3's side was not run"),
            "{md}"
        );
        assert_eq!(
            report.json()["workloads"][0]["ring3_ublk"]["status"],
            "skipped"
        );
    }
}
