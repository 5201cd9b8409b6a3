//! The network bench's output: net.md, net.json and the packets-per-second chart.

use std::fmt::Write as _;

use serde_json::{json, Value};

use super::parse::{self, GuestCpu, Rates};
use super::qemu::QemuCpu;
use super::script::{HUGEPAGES, TESTPMD_MEMORY_MIB};
use super::{Driver, Nic, FRAME_SIZES};
use crate::bench::plot::{self, Axes, Series};
use crate::bench::report::{heading, thousands, Environment};

/// ring3 against DPDK and against the kernel: the ratios the project aims for.
pub const TARGET_OVER_DPDK: f64 = 1.0;
pub const TARGET_OVER_KERNEL: f64 = 2.0;

/// The bench's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub nic: Nic,
    pub duration_s: u64,
    pub batch: u16,
    pub guest_cpus: u32,
    pub guest_memory_mib: u32,
}

/// One driver at one frame size.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    pub driver: Driver,
    pub size: usize,
    pub rates: Result<Rates, String>,
    /// The guest's CPUs over the measurement.
    pub guest_cpu: Option<GuestCpu>,
    /// QEMU's threads over the measurement, sampled on the host.
    pub qemu: Option<QemuCpu>,
}

/// Everything the bench found out.
#[derive(Debug, Clone, PartialEq)]
pub struct NetReport {
    pub environment: Environment,
    pub settings: Settings,
    pub measurements: Vec<Measurement>,
    pub notes: Vec<String>,
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

fn times(value: Option<f64>) -> String {
    value
        .map(|r| format!("{r:.2}×"))
        .unwrap_or_else(|| "—".into())
}

fn percent(value: Option<f64>) -> String {
    value
        .map(|p| format!("{p:.0}%"))
        .unwrap_or_else(|| "—".into())
}

impl Measurement {
    /// Guest CPU time per frame received, in µs (all the guest's CPUs). For ring3, its two
    /// threads' own CPU time, which leaves out its start-up (opening both NICs); for the
    /// others, the guest's `/proc/stat` over the run.
    fn guest_us_per_frame(&self, guest_cpus: u32) -> Option<f64> {
        let rates = self.rates.as_ref().ok()?;
        if self.driver == Driver::Ring3 {
            let cpu = |side: &str| rates.raw.pointer(&format!("/{side}/cpu_s"))?.as_f64();
            if let (Some(tx), Some(rx)) = (cpu("tx"), cpu("rx")) {
                return ratio((tx + rx) * 1e6, rates.rx_packets as f64);
            }
        }
        let cpu = self.guest_cpu?;
        let busy_cpus = cpu.busy_percent() / 100.0 * f64::from(guest_cpus);
        ratio(busy_cpus * 1e6, rates.rx_pps)
    }

    /// QEMU main-loop time per frame received, in µs.
    fn main_loop_us_per_frame(&self) -> Option<f64> {
        let rates = self.rates.as_ref().ok()?;
        ratio(self.qemu?.main_loop_percent / 100.0 * 1e6, rates.rx_pps)
    }
}

impl NetReport {
    pub fn find(&self, driver: Driver, size: usize) -> Option<&Rates> {
        self.measurement(driver, size)?.rates.as_ref().ok()
    }

    fn measurement(&self, driver: Driver, size: usize) -> Option<&Measurement> {
        self.measurements
            .iter()
            .find(|m| m.driver == driver && m.size == size)
    }

    /// ring3's received packets per second over another driver's, at one size.
    fn rx_ratio(&self, other: Driver, size: usize) -> Option<f64> {
        ratio(
            self.find(Driver::Ring3, size)?.rx_pps,
            self.find(other, size)?.rx_pps,
        )
    }

    fn tx_ratio(&self, other: Driver, size: usize) -> Option<f64> {
        ratio(
            self.find(Driver::Ring3, size)?.tx_pps,
            self.find(other, size)?.tx_pps,
        )
    }

    /// Whether every target was met, `None` when a measurement is missing.
    pub fn targets_met(&self) -> Option<bool> {
        let mut met = true;
        for &size in &FRAME_SIZES {
            met &= self.rx_ratio(Driver::Dpdk, size)? >= TARGET_OVER_DPDK;
            met &= self.rx_ratio(Driver::Kernel, size)? >= TARGET_OVER_KERNEL;
        }
        Some(met)
    }

    /// Packets per second of every driver at every size, and where the CPU time went.
    pub fn summary_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| frame | driver | sent pps | received pps | received MB/s | lost | guest CPU busy (user + system) | QEMU main loop | QEMU vCPUs |"
        );
        let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        for m in &self.measurements {
            let guest = m
                .guest_cpu
                .map(|c| {
                    format!(
                        "{:.0}% ({:.0} + {:.0})",
                        c.busy_percent(),
                        c.user_percent,
                        c.system_percent
                    )
                })
                .unwrap_or_else(|| "—".into());
            let main_loop = percent(m.qemu.map(|q| q.main_loop_percent));
            let vcpus = percent(m.qemu.map(|q| q.vcpus_percent));
            match &m.rates {
                Ok(r) => {
                    let _ = writeln!(
                        s,
                        "| {} B | {} | {} | {} | {:.2} | {} | {guest} | {main_loop} | {vcpus} |",
                        m.size,
                        m.driver.label(),
                        thousands(r.tx_pps),
                        thousands(r.rx_pps),
                        r.rx_bytes_per_s / 1e6,
                        if r.tx_packets > 0 {
                            format!("{:.1}%", 100.0 * r.lost() as f64 / r.tx_packets as f64)
                        } else {
                            "—".into()
                        },
                    );
                }
                Err(_) => {
                    let _ = writeln!(
                        s,
                        "| {} B | {} | failed | failed | — | — | {guest} | {main_loop} | {vcpus} |",
                        m.size,
                        m.driver.label()
                    );
                }
            }
        }
        s
    }

    fn targets_section(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## Against the target\n");
        let _ = writeln!(
            s,
            "The target: ring3 at least as fast as DPDK ({TARGET_OVER_DPDK:.0}×) and at least \
             {TARGET_OVER_KERNEL:.0}× the kernel, in packets per second received (the rate \
             frames actually cross the link); the sending side's ratios are beside them.\n"
        );
        let _ = writeln!(
            s,
            "| frame | ring3 / DPDK, received | target | ring3 / kernel, received | target | ring3 / DPDK, sent | ring3 / kernel, sent |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|");
        let mark = |value: Option<f64>, target: f64| match value {
            Some(v) if v >= target => format!("{target:.0}× met"),
            Some(_) => format!("{target:.0}× **not met**"),
            None => format!("{target:.0}× —"),
        };
        for &size in &FRAME_SIZES {
            let over_dpdk = self.rx_ratio(Driver::Dpdk, size);
            let over_kernel = self.rx_ratio(Driver::Kernel, size);
            let _ = writeln!(
                s,
                "| {size} B | {} | {} | {} | {} | {} | {} |",
                times(over_dpdk),
                mark(over_dpdk, TARGET_OVER_DPDK),
                times(over_kernel),
                mark(over_kernel, TARGET_OVER_KERNEL),
                times(self.tx_ratio(Driver::Dpdk, size)),
                times(self.tx_ratio(Driver::Kernel, size)),
            );
        }
        s
    }

    /// Where the time went: the guest's and QEMU's CPU per frame, and ring3's waiting.
    fn profile_section(&self) -> String {
        let host_cpus = self.environment.host_cpus;
        let guest_cpus = self.settings.guest_cpus;
        let mut s = String::new();
        let _ = writeln!(s, "## Where the time goes\n");
        let _ = writeln!(
            s,
            "Under TCG the guest's vCPUs are host threads running translated code, and the \
             emulated NICs live in QEMU's main loop thread: it takes frames off the \
             transmitting NIC's ring, passes them through the hub and writes them into the \
             receiving NIC's ring. The guest's CPU time comes from its `/proc/stat` around each \
             run; QEMU's threads' CPU time, and the host's, was sampled on the host \
             ({host_cpus} CPUs) at the start and end of each run. Percentages of QEMU's threads are of one host CPU; the \
             guest's are of all its {guest_cpus} vCPUs.\n"
        );
        let _ = writeln!(
            s,
            "| frame | driver | guest CPU µs per frame | QEMU main loop µs per frame | QEMU main loop | QEMU vCPUs | all QEMU threads | host CPU taken by other processes |"
        );
        let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|---:|");
        let micros = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "—".into());
        for m in &self.measurements {
            let _ = writeln!(
                s,
                "| {} B | {} | {} | {} | {} | {} | {} | {} |",
                m.size,
                m.driver.label(),
                micros(m.guest_us_per_frame(guest_cpus)),
                micros(m.main_loop_us_per_frame()),
                percent(m.qemu.map(|q| q.main_loop_percent)),
                percent(m.qemu.map(|q| q.vcpus_percent)),
                percent(
                    m.qemu
                        .map(|q| q.main_loop_percent + q.vcpus_percent + q.other_percent)
                ),
                m.qemu
                    .map(|q| format!("{:.1}%", q.host_others_percent))
                    .unwrap_or_else(|| "—".into()),
            );
        }
        s.push('\n');
        let ring3: Vec<&Measurement> = self
            .measurements
            .iter()
            .filter(|m| m.driver == Driver::Ring3 && m.rates.is_ok())
            .collect();
        if !ring3.is_empty() {
            let _ = writeln!(
                s,
                "ring3's own counters: how often its sender found the transmit ring full (the \
                 device had not yet taken the frames before) and how many times its receiver \
                 looked at an empty ring per frame it got.\n"
            );
            let _ = writeln!(
                s,
                "| frame | transmit calls with the ring full | empty receive polls per frame | sender CPU s | receiver CPU s |"
            );
            let _ = writeln!(s, "|---:|---:|---:|---:|---:|");
            for m in &ring3 {
                let Ok(rates) = &m.rates else { continue };
                let (full, empty) =
                    parse::ring3_waiting(&rates.raw).unwrap_or((f64::NAN, f64::NAN));
                let cpu = |side: &str| {
                    rates
                        .raw
                        .pointer(&format!("/{side}/cpu_s"))
                        .and_then(Value::as_f64)
                        .map(|v| format!("{v:.2}"))
                        .unwrap_or_else(|| "—".into())
                };
                let _ = writeln!(
                    s,
                    "| {} B | {:.1}% | {:.1} | {} | {} |",
                    m.size,
                    100.0 * full,
                    empty,
                    cpu("tx"),
                    cpu("rx")
                );
            }
            s.push('\n');
        }
        let findings = self.findings();
        if !findings.is_empty() {
            let _ = writeln!(s, "What the numbers say:\n");
            for finding in findings {
                let _ = writeln!(s, "- {finding}");
            }
            s.push('\n');
        }
        s
    }

    /// Statements the measurements support, each with its numbers.
    fn findings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let host_cpus = self.environment.host_cpus.max(1) as f64;
        for m in &self.measurements {
            if m.driver != Driver::Ring3 {
                continue;
            }
            let (Ok(rates), Some(qemu)) = (&m.rates, m.qemu) else {
                continue;
            };
            let all = qemu.main_loop_percent + qemu.vcpus_percent + qemu.other_percent;
            let mut sentence = format!(
                "{} B, ring3: QEMU's threads used {all:.0}% of one host CPU: the vCPUs \
                 {:.0}%, the main loop (the device model) {:.0}%",
                m.size, qemu.vcpus_percent, qemu.main_loop_percent,
            );
            // What the host had for this VM: its CPUs less what other processes took.
            let available = host_cpus * (100.0 - qemu.host_others_percent);
            sentence.push_str(&format!(
                ", of the {available:.0}% the host's {host_cpus:.0} CPUs had left after other \
                 processes."
            ));
            let saturated = all >= 0.9 * available;
            if saturated {
                sentence.push_str(
                    " QEMU got all the host CPU there was: the guest's two polling threads \
                     keep both vCPUs busy, and the device model has to win host CPU time from \
                     them to move a frame.",
                );
            }
            if let Some((full, empty)) = parse::ring3_waiting(&rates.raw) {
                if full >= 0.5 || empty >= 1.0 {
                    sentence.push_str(&format!(
                        " ring3 waited on the device: {:.1}% of its transmit calls found the \
                         ring full, and its receiver looked at an empty ring {empty:.1} times \
                         per frame.",
                        100.0 * full
                    ));
                }
                if saturated && full >= 0.5 {
                    sentence.push_str(
                        " So the emulated NIC, short of host CPU, set the pace, not the \
                         driver's cost per frame.",
                    );
                }
            }
            out.push(sentence);
        }
        for &size in &FRAME_SIZES {
            let per_frame = |driver| {
                self.measurement(driver, size)?
                    .guest_us_per_frame(self.settings.guest_cpus)
            };
            if let (Some(ring3), Some(kernel)) =
                (per_frame(Driver::Ring3), per_frame(Driver::Kernel))
            {
                out.push(format!(
                    "{size} B: the guest spent {ring3:.1} µs of CPU per frame received with \
                     ring3 and {kernel:.1} µs with the kernel. ring3's threads never sleep, so \
                     its figure is mostly polling; the kernel's is system time (pktgen, \
                     interrupts, softirq)."
                ));
            }
            if let (Some(ring3), Some(dpdk)) = (
                self.find(Driver::Ring3, size),
                self.find(Driver::Dpdk, size),
            ) {
                let loss = |r: &Rates| 100.0 * r.lost() as f64 / r.tx_packets.max(1) as f64;
                let gaps = ring3
                    .raw
                    .pointer("/rx/gaps")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                let drops = ring3
                    .raw
                    .pointer("/rx/device_drops")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                if loss(ring3) >= 1.0 && loss(ring3) > 2.0 * loss(dpdk) {
                    out.push(format!(
                        "{size} B: ring3's sender got {} pps into its NIC, more than the \
                         receiving NIC took ({} pps), and {:.1}% of the frames sent never \
                         arrived ({} sequence gaps, {drops} drops counted by the receiving \
                         device): the hub does not hold the sender back, so the excess is \
                         dropped inside QEMU after the device model has carried it. DPDK's \
                         txonly sent {} pps and lost {:.1}%.",
                        thousands(ring3.tx_pps),
                        thousands(ring3.rx_pps),
                        loss(ring3),
                        thousands(gaps as f64),
                        thousands(dpdk.tx_pps),
                        loss(dpdk)
                    ));
                }
            }
            let main_loop = |driver| self.measurement(driver, size)?.main_loop_us_per_frame();
            let cells: Vec<String> = Driver::ALL
                .iter()
                .filter_map(|&d| main_loop(d).map(|us| format!("{} {us:.1} µs", d.label())))
                .collect();
            if cells.len() >= 2 {
                out.push(format!(
                    "{size} B: QEMU's main loop spent per frame received: {}.",
                    cells.join(", ")
                ));
            }
        }
        out
    }

    /// The report as Markdown; `chart` and `json` are the files beside it.
    pub fn markdown(&self, chart: &str, json_file: &str) -> String {
        let env = &self.environment;
        let set = &self.settings;
        let mut s = heading("Network: ring3 against DPDK and the kernel", "net", env);
        let _ = writeln!(
            s,
            "Packets per second from one emulated {nic} NIC to another on the same QEMU hub, \
             in one lab VM: ring3 (`ring3 bench net`), DPDK's testpmd (txonly on one NIC, \
             rxonly on the other, {pmd} over vfio-pci) and the kernel's driver (pktgen on one \
             interface, the other's counters). QEMU runs under TCG here: only the ratios \
             between drivers measured in one run mean anything, not the absolute rates. The \
             raw numbers are in [{json_file}]({json_file}).\n",
            nic = set.nic.name(),
            pmd = set.nic.dpdk_pmd(),
        );
        let _ = writeln!(s, "## Packets per second\n");
        s.push_str(&self.summary_table());
        let _ = writeln!(s, "\n![packets per second by frame size]({chart})\n");
        s.push_str(&self.targets_section());
        s.push('\n');
        match self.targets_met() {
            Some(true) => {
                let _ = writeln!(s, "Every target is met.\n");
            }
            Some(false) => {
                let _ = writeln!(
                    s,
                    "Not every target is met; the next section shows what limits the rates.\n"
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "Some ratios could not be computed: a driver was not measured (see the \
                     notes).\n"
                );
            }
        }
        s.push_str(&self.profile_section());
        if !self.notes.is_empty() {
            let _ = writeln!(s, "## Notes\n");
            for note in &self.notes {
                let _ = writeln!(s, "- {note}");
            }
            s.push('\n');
        }
        let unknown = "unknown";
        let _ = writeln!(s, "## How it was measured\n");
        let _ = writeln!(
            s,
            "- Host: {}, {} CPUs, Linux {}.",
            env.host_cpu.as_deref().unwrap_or(unknown),
            env.host_cpus,
            env.host_kernel.as_deref().unwrap_or(unknown)
        );
        let _ = writeln!(
            s,
            "- VM: {}, `-machine q35,accel=tcg -cpu max -smp {} -m {}M`, `intel-iommu` with \
             interrupt remapping; two {} NICs on one hub (`-netdev hubport,hubid=0`) and \
             nothing else on it; guest kernel {}, clocksource `{}`. In the lab guest \
             `clock_gettime` reaches the kernel (strace shows it as a system call), so `ring3 \
             bench net` reads the clock once per 256 transmit calls; testpmd reads the TSC.",
            env.qemu.as_deref().unwrap_or("QEMU (version unknown)"),
            set.guest_cpus,
            set.guest_memory_mib,
            set.nic.name(),
            env.guest("guest_kernel").unwrap_or(unknown),
            env.guest("clocksource").unwrap_or(unknown)
        );
        let _ = writeln!(
            s,
            "- Each driver sends for {} s per frame size; sizes are frame bytes without the \
             FCS. The lower PCI address sends, the higher receives. Order: the kernel at each \
             size, then both NICs to vfio-pci, then ring3 and DPDK at 64 bytes, then at 1500.",
            set.duration_s
        );
        let _ = writeln!(
            s,
            "- ring3: `ring3 bench net --tx ADDR --rx ADDR --size N --batch {}`: one polling \
             thread per NIC, one queue pair each, frames of ethertype 0x88b5 with a sequence \
             number; rates over each side's own time (the receiver's until its last frame).",
            set.batch
        );
        let _ = writeln!(
            s,
            "- DPDK {}: two `dpdk-testpmd` instances with {} MiB each of {} 2 MiB hugepages, \
             `--burst={}`, forwarding lcores on different vCPUs; the rate is the mean of the \
             per-second `Tx-pps`/`Rx-pps` while traffic flowed, less the partial first and \
             last seconds.",
            env.guest("dpdk").unwrap_or(""),
            TESTPMD_MEMORY_MIB,
            HUGEPAGES,
            set.batch
        );
        let _ = writeln!(
            s,
            "- Kernel: `{}` driver, pktgen with `delay 0`, `clone_skb 0`, `count 0` on the \
             sending interface; received pps from the receiving interface's `rx_packets` over \
             the same window.",
            env.guest("kernel_driver")
                .unwrap_or(set.nic.kernel_module())
        );
        let _ = writeln!(
            s,
            "- Host load while the VM ran: {}.",
            match &env.host_load {
                Some(load) => format!(
                    "other processes used {:.1}% of the host's CPU time, steal {:.1}%",
                    load.others_percent, load.steal_percent
                ),
                None => "not measured".to_string(),
            }
        );
        s
    }

    pub fn json(&self) -> Value {
        let env = &self.environment;
        let set = &self.settings;
        let guest: serde_json::Map<String, Value> = env
            .guest
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let measurements: Vec<Value> = self
            .measurements
            .iter()
            .map(|m| {
                let mut value = match &m.rates {
                    Ok(r) => json!({
                        "status": "measured",
                        "tx_pps": r.tx_pps,
                        "rx_pps": r.rx_pps,
                        "rx_bytes_per_s": r.rx_bytes_per_s,
                        "tx_packets": r.tx_packets,
                        "rx_packets": r.rx_packets,
                        "lost": r.lost(),
                        "seconds": r.seconds,
                        "raw": r.raw,
                    }),
                    Err(reason) => json!({ "status": "failed", "reason": reason }),
                };
                value["driver"] = json!(m.driver.name());
                value["frame_bytes"] = json!(m.size);
                value["guest_cpu"] = json!(m.guest_cpu.map(|c| json!({
                    "user_percent": c.user_percent,
                    "system_percent": c.system_percent,
                })));
                value["qemu_cpu"] = json!(m.qemu.map(|q| json!({
                    "main_loop_percent": q.main_loop_percent,
                    "vcpus_percent": q.vcpus_percent,
                    "other_percent": q.other_percent,
                    "seconds": q.seconds,
                })));
                value
            })
            .collect();
        let ratios: Vec<Value> = FRAME_SIZES
            .iter()
            .map(|&size| {
                json!({
                    "frame_bytes": size,
                    "ring3_over_dpdk_rx_pps": self.rx_ratio(Driver::Dpdk, size),
                    "ring3_over_kernel_rx_pps": self.rx_ratio(Driver::Kernel, size),
                    "ring3_over_dpdk_tx_pps": self.tx_ratio(Driver::Dpdk, size),
                    "ring3_over_kernel_tx_pps": self.tx_ratio(Driver::Kernel, size),
                })
            })
            .collect();
        json!({
            "benchmark": "net",
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
                "nic": set.nic.name(),
                "duration_s": set.duration_s,
                "batch": set.batch,
                "guest_cpus": set.guest_cpus,
                "guest_memory_mib": set.guest_memory_mib,
                "hugepages": HUGEPAGES,
                "testpmd_memory_mib": TESTPMD_MEMORY_MIB,
            },
            "targets": {
                "ring3_over_dpdk": TARGET_OVER_DPDK,
                "ring3_over_kernel": TARGET_OVER_KERNEL,
                "met": self.targets_met(),
            },
            "ratios": ratios,
            "measurements": measurements,
            "notes": self.notes,
        })
    }

    /// Packets per second against frame size: received (solid) and sent (dashed).
    pub fn chart(&self) -> String {
        let colors = [
            (Driver::Ring3, "#d62728"),
            (Driver::Dpdk, "#2ca02c"),
            (Driver::Kernel, "#1f77b4"),
        ];
        let mut series = Vec::new();
        for (driver, color) in colors {
            for (sent, label) in [(false, "received"), (true, "sent")] {
                let points = FRAME_SIZES
                    .iter()
                    .filter_map(|&size| {
                        let r = self.find(driver, size)?;
                        Some((size as u32, if sent { r.tx_pps } else { r.rx_pps }))
                    })
                    .collect();
                series.push(Series {
                    label: format!("{}, {label}", driver.label()),
                    color,
                    dashed: sent,
                    points,
                });
            }
        }
        plot::line_chart(
            &format!(
                "Packets per second, {} to {}",
                self.settings.nic.name(),
                self.settings.nic.name()
            ),
            &format!(
                "QEMU TCG lab, {} s per point, {}; only the ratios mean anything",
                self.settings.duration_s, self.environment.date
            ),
            &Axes {
                x_label: "frame size in bytes (log scale)",
                y_label: "packets per second",
                x_prefix: "",
                y_unit: "pps",
            },
            &series,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse::samples::*;
    use super::*;

    fn report() -> NetReport {
        let mut measurements = Vec::new();
        for &size in &FRAME_SIZES {
            for driver in Driver::ALL {
                let rates = match driver {
                    Driver::Ring3 => parse::ring3(
                        &RING3.replace("\"frame_bytes\":64", &format!("\"frame_bytes\":{size}")),
                        size,
                    ),
                    Driver::Dpdk => parse::dpdk(TESTPMD_TX, TESTPMD_RX),
                    Driver::Kernel => parse::kernel(PKTGEN),
                }
                .map_err(|e| e.to_string());
                measurements.push(Measurement {
                    driver,
                    size,
                    rates,
                    guest_cpu: Some(GuestCpu {
                        user_percent: 90.0,
                        system_percent: 10.0,
                    }),
                    qemu: Some(QemuCpu {
                        main_loop_percent: 60.0,
                        vcpus_percent: 130.0,
                        other_percent: 1.0,
                        host_others_percent: 0.5,
                        seconds: 3.0,
                    }),
                });
            }
        }
        measurements[5].rates = Err("testpmd: EAL: Error".into());
        NetReport {
            environment: Environment {
                date: "2026-12-01 10:00 UTC".into(),
                commit: Some("abc1234".into()),
                host_cpus: 2,
                ..Environment::default()
            },
            settings: Settings {
                nic: Nic::VirtioNet,
                duration_s: 3,
                batch: 32,
                guest_cpus: 2,
                guest_memory_mib: 2048,
            },
            measurements,
            notes: vec!["kernel + pktgen at 1500 bytes: failed".into()],
        }
    }

    #[test]
    fn tables_ratios_and_targets() {
        let report = report();
        // ring3 receives 19000 pps, DPDK 15000, the kernel 10000.
        assert_eq!(report.rx_ratio(Driver::Dpdk, 64), Some(19000.0 / 15000.0));
        assert_eq!(report.rx_ratio(Driver::Kernel, 64), Some(1.9));
        assert_eq!(report.targets_met(), None, "the kernel failed at 1500");
        let md = report.markdown("net-pps.svg", "net.json");
        assert!(md.contains("| 64 B | ring3 | 20,000 | 19,000 |"), "{md}");
        assert!(
            md.contains("| 64 B | 1.27× | 1× met | 1.90× | 2× **not met** |"),
            "{md}"
        );
        assert!(md.contains("| 1500 B | kernel + pktgen | failed |"), "{md}");
        assert!(md.contains("## Where the time goes"), "{md}");
        assert!(
            md.contains("QEMU's threads used 191% of one host CPU: the vCPUs 130%"),
            "{md}"
        );
        assert!(
            md.contains("(net-pps.svg)") && md.contains("abc1234"),
            "{md}"
        );
        assert!(
            md.contains("5.0% of the frames sent never arrived (3,000 sequence gaps"),
            "{md}"
        );
        assert!(md.contains("| 0.5% |"), "{md}");
        assert!(
            md.contains("- kernel + pktgen at 1500 bytes: failed"),
            "{md}"
        );
    }

    #[test]
    fn json_and_chart() {
        let report = report();
        let value = report.json();
        assert_eq!(value["measurements"].as_array().map(Vec::len), Some(6));
        assert_eq!(value["measurements"][0]["driver"], "ring3");
        assert_eq!(value["measurements"][5]["status"], "failed");
        assert_eq!(value["ratios"][0]["frame_bytes"], 64);
        assert!(value["ratios"][1]["ring3_over_kernel_rx_pps"].is_null());
        let svg = report.chart();
        assert_eq!(svg.matches("<polyline").count(), 6, "{svg}");
        assert!(svg.contains("ring3, received"));
        assert!(svg.contains("frame size in bytes"));
    }
}
