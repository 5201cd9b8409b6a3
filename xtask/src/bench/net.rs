//! `cargo xtask bench net`: packets per second between two emulated NICs on the lab's
//! hub, through ring3's driver (`ring3 bench net`), DPDK's testpmd and the kernel's driver
//! (pktgen), in one lab VM, at 64 and 1500 bytes per frame.
//!
//! The host builds `ring3` in release mode and boots the lab with two NICs of one kind
//! (virtio-net or e1000e) on one hub, the kernel's driver for them and pktgen loaded, and
//! the memory DPDK's hugepages need; [`script`] runs the three drivers in turn. Results
//! come back on the console as in the NVMe bench; while they do, [`qemu`] samples QEMU's
//! threads at the start and end of each measurement, so that the report can say whether
//! the guest or QEMU's device model set the pace. [`report`] writes net.md, net.json and
//! net-pps.svg.

mod parse;
mod qemu;
mod report;
mod script;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use self::parse::Rates;
use self::qemu::Profiler;
use self::report::{Measurement, NetReport, Settings};
use super::capture::Block;
use super::host;
use super::outcome::{self, guest_info};
use super::script as nvme_script;
use crate::lab::{self, host::find_program, LabDevice, LabOptions};
use crate::tasks;

/// The files the bench writes into its output directory.
pub const REPORT_FILE: &str = "net.md";
pub const JSON_FILE: &str = "net.json";
pub const CHART_FILE: &str = "net-pps.svg";

/// Other processes' share of the host's CPU time during one run above which the report
/// says that run was disturbed.
const BUSY_HOST_PERCENT: f64 = 5.0;

/// Frame sizes measured: the smallest Ethernet frame (64 bytes with its FCS, so 60
/// without, which is what the drivers hand over) is spelled 64 by every tool here, as
/// frames of 64 bytes before the FCS; and a full 1500-byte frame.
pub const FRAME_SIZES: [usize; 2] = [64, 1500];

/// The NIC pair the bench runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Nic {
    /// Two modern virtio-net devices (1af4:1041).
    VirtioNet,
    /// Two Intel 82574L (8086:10d3).
    E1000e,
}

impl Nic {
    pub fn name(self) -> &'static str {
        match self {
            Nic::VirtioNet => "virtio-net",
            Nic::E1000e => "e1000e",
        }
    }

    /// PCI vendor and device ID.
    pub fn ids(self) -> (u16, u16) {
        match self {
            Nic::VirtioNet => (0x1af4, 0x1041),
            Nic::E1000e => (0x8086, 0x10d3),
        }
    }

    fn lab_device(self) -> LabDevice {
        match self {
            Nic::VirtioNet => LabDevice::VirtioNet,
            Nic::E1000e => LabDevice::E1000e,
        }
    }

    /// The kernel's driver module (virtio-pci is already loaded for the lab's own 9p).
    pub fn kernel_module(self) -> &'static str {
        match self {
            Nic::VirtioNet => "virtio_net",
            Nic::E1000e => "e1000e",
        }
    }

    /// DPDK's poll-mode driver for it.
    pub fn dpdk_pmd(self) -> &'static str {
        match self {
            Nic::VirtioNet => "net_virtio",
            Nic::E1000e => "net_e1000_em",
        }
    }
}

/// The three drivers measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Driver {
    Ring3,
    Dpdk,
    Kernel,
}

impl Driver {
    pub const ALL: [Driver; 3] = [Driver::Ring3, Driver::Dpdk, Driver::Kernel];

    /// The name in block IDs and the script's functions.
    pub fn name(self) -> &'static str {
        match self {
            Driver::Ring3 => "ring3",
            Driver::Dpdk => "dpdk",
            Driver::Kernel => "kernel",
        }
    }

    /// For people.
    pub fn label(self) -> &'static str {
        match self {
            Driver::Ring3 => "ring3",
            Driver::Dpdk => "DPDK testpmd",
            Driver::Kernel => "kernel + pktgen",
        }
    }
}

/// Options of `cargo xtask bench net`.
#[derive(Debug, Clone, clap::Args)]
pub struct NetArgs {
    /// Seconds each driver transmits, per frame size [default: 10, or 3 with --quick].
    #[arg(long, value_name = "S",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: Option<u64>,

    /// A shorter run to try the bench out: 3 s per measurement.
    #[arg(long)]
    pub quick: bool,

    /// Directory for net.md, net.json and net-pps.svg [default: bench/results in the
    /// workspace].
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// The NIC pair: two virtio-net or two e1000e on the lab's hub.
    #[arg(long, value_enum, default_value_t = Nic::VirtioNet)]
    pub nic: Nic,

    /// Frames per transmit and receive call of `ring3 bench net` (testpmd's --burst too).
    #[arg(long, value_name = "N", default_value_t = 32,
          value_parser = clap::value_parser!(u16).range(1..=512))]
    pub batch: u16,

    /// Guest CPUs: one for each side of the ring3 and DPDK runs.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(2..=64))]
    pub cpus: u32,

    /// Guest memory in MiB (DPDK's hugepages come out of it).
    #[arg(long, value_name = "MIB", default_value_t = 2048,
          value_parser = clap::value_parser!(u32).range(1024..))]
    pub memory: u32,

    /// Kill the VM after this many seconds [default: twice the expected run, plus 5
    /// minutes].
    #[arg(long, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: Option<u64>,

    /// Print the QEMU command line before booting.
    #[arg(short, long)]
    pub verbose: bool,
}

/// The bench's settings, resolved from the arguments.
#[derive(Debug, Clone, PartialEq)]
struct Config {
    duration_s: u64,
    output: PathBuf,
    expected: Duration,
    timeout: Duration,
}

impl Config {
    fn from_args(args: &NetArgs) -> Config {
        let duration_s = args.duration.unwrap_or(if args.quick { 3 } else { 10 });
        let output = host::output_dir(args.output.as_deref());
        // Boot; per frame size the kernel's run, ring3's (with its start-up and the
        // receiver's drain) and DPDK's (two testpmd start-ups under TCG, about 20 s each).
        let per_size = (duration_s + 3) + (duration_s + 5) + (duration_s + 45);
        let expected = 40 + FRAME_SIZES.len() as u64 * per_size;
        let timeout = Duration::from_secs(args.timeout.unwrap_or(2 * expected + 300));
        Config {
            duration_s,
            output,
            expected: Duration::from_secs(expected),
            timeout,
        }
    }
}

/// The lab VM: two NICs of one kind on hub 0, their kernel driver and pktgen, QEMU's
/// threads named so the host can tell the vCPUs from the main loop.
fn lab_options(args: &NetArgs, timeout: Duration) -> LabOptions {
    LabOptions {
        devices: vec![args.nic.lab_device(), args.nic.lab_device()],
        qemu_args: vec!["-name".into(), "ring3-bench-net,debug-threads=on".into()],
        load_vfio: true,
        extra_modules: vec![args.nic.kernel_module().into(), "pktgen".into()],
        memory_mib: args.memory,
        cpus: args.cpus,
        timeout: Some(timeout),
        workdir: Some(lab::workspace_root()),
        verbose: args.verbose,
        ..LabOptions::default()
    }
}

/// Where distributions put DPDK's poll-mode drivers (`pmds-<ABI>/librte_net_*.so`).
const DPDK_LIBRARY_DIRS: [&str; 3] = [
    "/usr/lib/x86_64-linux-gnu/dpdk",
    "/usr/lib64/dpdk",
    "/usr/local/lib/x86_64-linux-gnu/dpdk",
];

/// Whether a poll-mode driver library named `librte_net_<pmd>.so...` is installed.
fn pmd_installed(library: &str) -> bool {
    DPDK_LIBRARY_DIRS
        .iter()
        .filter_map(|dir| fs::read_dir(dir).ok())
        .flatten()
        .flatten()
        .filter_map(|abi| fs::read_dir(abi.path()).ok())
        .flatten()
        .flatten()
        .any(|file| {
            file.file_name()
                .to_str()
                .is_some_and(|name| name.starts_with(&format!("librte_net_{library}.so")))
        })
}

/// DPDK's testpmd runs in the guest from the host's file system, so the host needs it and
/// the poll-mode driver for `nic`.
fn check_dpdk(nic: Nic) -> Result<()> {
    let install = "install it with:\n    sudo apt-get install -y dpdk dpdk-dev\n(Debian ships \
                   testpmd in dpdk-dev and the poll-mode drivers in dpdk)";
    if find_program("dpdk-testpmd").is_none() {
        bail!(
            "the bench runs DPDK's testpmd inside the lab guest, which uses the host's \
             programs, but dpdk-testpmd is not installed; {install}"
        );
    }
    let library = match nic {
        Nic::VirtioNet => "virtio",
        Nic::E1000e => "e1000",
    };
    if !pmd_installed(library) {
        bail!(
            "dpdk-testpmd is installed but DPDK's {} poll-mode driver (librte_net_{library}) \
             is not in {}; {install}",
            nic.dpdk_pmd(),
            DPDK_LIBRARY_DIRS.join(", ")
        );
    }
    Ok(())
}

/// Runs the bench and returns the exit status: 0 when every driver was measured at every
/// size, 1 when something is missing.
pub fn run(args: NetArgs) -> Result<i32> {
    let config = Config::from_args(&args);
    host::create_output_dir(&config.output)?;

    tasks::step("checking the host (QEMU, the guest kernel, DPDK's testpmd)");
    check_dpdk(args.nic)?;
    lab::prepare()?;
    let release = host::build_release(&["ring3-cli"], "the bench runs it in the guest")?;
    let ring3 = release.join("ring3");
    host::check_commands("net", &[(&ring3, &["bench", "net", "--help"])])?;
    let ring3 = host::guest_binary(&ring3)?;

    let plan = script::Plan {
        nic: args.nic,
        sizes: &FRAME_SIZES,
        duration_s: config.duration_s,
        batch: args.batch,
        ring3: &ring3,
    };
    let options = lab_options(&args, config.timeout);
    tasks::step(&format!(
        "measuring the kernel, ring3 and DPDK on two {} NICs, {} s per frame size and driver \
         (one VM, about {} min)",
        args.nic.name(),
        config.duration_s,
        config.expected.as_secs().div_ceil(60)
    ));
    let profiler = Arc::new(Mutex::new(Profiler::default()));
    let on_block = {
        let profiler = Arc::clone(&profiler);
        let mut dpdk_tx: Option<Block> = None;
        Box::new(move |block: &Block, out: &mut dyn Write| {
            let mut profiler = profiler.lock().unwrap_or_else(PoisonError::into_inner);
            match block.source.as_str() {
                "mark" => profiler.start(&block.id),
                "cpu" => profiler.stop(&block.id),
                "dpdk-tx" => dpdk_tx = Some(block.clone()),
                "dpdk-rx" => {
                    let tx = dpdk_tx.take();
                    print_progress(tx.iter().chain([block]), out);
                }
                _ => print_progress([block], out),
            }
        })
    };
    let run = host::run_script(&options, script::guest_script(&plan), on_block);
    let qemu = std::mem::take(
        &mut profiler
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .measured,
    );
    let report = build_report(
        &config,
        &args,
        &run.blocks,
        &run.status,
        &qemu,
        host::environment(run.date, run.host_load, guest_info(&run.blocks)),
    );
    write_report(&report, &config.output)?;
    println!("\n{}", report.summary_table());
    host::print_notes_and_files(
        &report.notes,
        &config.output,
        &[REPORT_FILE, JSON_FILE, CHART_FILE],
    );
    let status = run.status?;
    let complete = report.measurements.iter().all(|m| m.rates.is_ok());
    Ok(host::exit_status(status, complete))
}

/// One measurement's rates from the blocks.
fn rates(blocks: &[Block], driver: Driver, size: usize) -> Result<Rates, String> {
    let id = size.to_string();
    let block = |source: &str| outcome::find_block(blocks, source, &id);
    let checked = |block: Option<&Block>, tool: &str| -> Result<String, String> {
        let block = block.ok_or("no result: the guest did not get to it (see the output above)")?;
        if !block.complete {
            return Err(format!("{tool}'s output was cut short"));
        }
        if block.status != 0 {
            let said = block.text.lines().rev().find(|l| !l.trim().is_empty());
            return Err(format!(
                "{tool} exited with status {}{}",
                block.status,
                said.map(|l| format!(": {}", l.trim())).unwrap_or_default()
            ));
        }
        Ok(block.text.clone())
    };
    let parsed = match driver {
        Driver::Kernel => {
            parse::kernel(&checked(block("kernel"), "pktgen")?).map_err(|e| format!("{e:#}"))
        }
        Driver::Ring3 => parse::ring3(&checked(block("ring3"), "ring3 bench net")?, size)
            .map_err(|e| format!("{e:#}")),
        Driver::Dpdk => {
            let tx = block("dpdk-tx").ok_or("no result: the guest did not get to it")?;
            let rx = block("dpdk-rx").map(|b| b.text.as_str()).unwrap_or("");
            if tx.status != 0 && rx.is_empty() {
                // The script's own reason (dpdk-testpmd missing, no hugepages).
                return Err(parse::testpmd_failure(&tx.text));
            }
            parse::dpdk(&tx.text, rx).map_err(|e| format!("{e:#}"))
        }
    };
    let rates = parsed?;
    if rates.tx_packets == 0 && rates.tx_pps == 0.0 {
        return Err("nothing was sent".into());
    }
    Ok(rates)
}

fn build_report(
    config: &Config,
    args: &NetArgs,
    blocks: &[Block],
    lab_result: &Result<i32>,
    qemu: &std::collections::HashMap<String, qemu::QemuCpu>,
    environment: super::report::Environment,
) -> NetReport {
    let mut measurements = Vec::new();
    for &size in &FRAME_SIZES {
        for driver in Driver::ALL {
            let id = script::measurement_id(driver, size);
            measurements.push(Measurement {
                driver,
                size,
                rates: rates(blocks, driver, size),
                guest_cpu: outcome::find_block(blocks, "cpu", &id)
                    .and_then(|b| parse::guest_cpu(&b.text)),
                qemu: qemu.get(&id).copied(),
            });
        }
    }
    let mut notes = Vec::new();
    notes.extend(nvme_script::exit_note(
        lab_result,
        &[
            (
                script::EXIT_NO_NICS,
                "the guest did not have two NICs of the kind asked for",
            ),
            (
                script::EXIT_BIND_FAILED,
                "moving the NICs to vfio-pci failed",
            ),
        ],
    ));
    notes.extend(host::busy_host_note(environment.host_load));
    for m in &measurements {
        if let Some(qemu) = m.qemu.filter(|q| q.host_others_percent > BUSY_HOST_PERCENT) {
            notes.push(format!(
                "While {} ran at {} bytes, other processes took {:.0}% of the host's CPU time: \
                 that run is slowed, and its ratios with it.",
                m.driver.label(),
                m.size,
                qemu.host_others_percent
            ));
        }
        if let Err(why) = &m.rates {
            notes.push(format!("{} at {} bytes: {why}", m.driver.label(), m.size));
        }
    }
    NetReport {
        environment,
        settings: Settings {
            nic: args.nic,
            duration_s: config.duration_s,
            batch: args.batch,
            guest_cpus: args.cpus,
            guest_memory_mib: args.memory,
        },
        measurements,
        notes,
    }
}

fn write_report(report: &NetReport, dir: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(&report.json()).context("serialising the results")?;
    host::write_files(
        dir,
        [
            (REPORT_FILE, report.markdown(CHART_FILE, JSON_FILE)),
            (JSON_FILE, json + "\n"),
            (CHART_FILE, report.chart()),
        ],
    )
}

/// One line on the terminal per result as it arrives (DPDK's once both logs are in).
fn print_progress<'a>(blocks: impl IntoIterator<Item = &'a Block>, out: &mut dyn Write) {
    let blocks: Vec<Block> = blocks.into_iter().cloned().collect();
    let Some(last) = blocks.last() else {
        return;
    };
    let Ok(size) = last.id.parse::<usize>() else {
        return;
    };
    let driver = match last.source.as_str() {
        "kernel" => Driver::Kernel,
        "ring3" => Driver::Ring3,
        "dpdk-rx" => Driver::Dpdk,
        _ => return,
    };
    let line = match rates(&blocks, driver, size) {
        Ok(r) => format!(
            "{} pps sent, {} pps received, {} lost",
            r.tx_pps.round(),
            r.rx_pps.round(),
            r.lost()
        ),
        Err(why) => format!("FAILED: {why}"),
    };
    let _ = writeln!(out, "  -> {} at {size} bytes: {line}", driver.label());
}

#[cfg(test)]
mod tests {
    use super::super::parse_args;
    use super::parse::samples::*;
    use super::*;

    fn args(line: &[&str]) -> NetArgs {
        parse_args(line).expect("valid options")
    }

    #[test]
    fn defaults_quick_and_options() {
        let config = Config::from_args(&args(&[]));
        assert_eq!(config.duration_s, 10);
        assert!(config.output.ends_with("bench/results"));
        let quick = Config::from_args(&args(&["--quick"]));
        assert_eq!(quick.duration_s, 3);
        assert!(quick.timeout < config.timeout);
        let explicit = args(&["--duration", "5", "--nic", "e1000e", "--timeout", "99"]);
        assert_eq!(explicit.nic, Nic::E1000e);
        assert_eq!(
            Config::from_args(&explicit).timeout,
            Duration::from_secs(99)
        );
        let options = lab_options(&explicit, Duration::from_secs(1));
        assert_eq!(options.devices, [LabDevice::E1000e, LabDevice::E1000e]);
        assert_eq!(options.extra_modules, ["e1000e", "pktgen"]);
        assert!(options
            .qemu_args
            .iter()
            .any(|a| a.contains("debug-threads=on")));
        for line in [
            &["--cpus", "1"][..],
            &["--duration", "0"],
            &["--memory", "512"],
        ] {
            assert!(parse_args::<NetArgs>(line).is_err(), "{line:?}");
        }
    }

    #[test]
    fn report_from_blocks() {
        let config = Config::from_args(&args(&["--quick"]));
        let blocks = [
            Block::finished("kernel", "64", 0, PKTGEN),
            Block::finished("ring3", "64", 0, RING3),
            Block::finished("dpdk-tx", "64", 0, TESTPMD_TX),
            Block::finished("dpdk-rx", "64", 0, TESTPMD_RX),
            Block::finished(
                "cpu",
                "ring3-64",
                0,
                "before cpu  0 0 0 100 0 0 0 0\nafter cpu  150 0 50 100 0 0 0 0\n",
            ),
            Block::finished("dpdk-tx", "1500", 1, "EAL: Error - exiting with code: 1\n"),
        ];
        let report = build_report(
            &config,
            &args(&["--quick"]),
            &blocks,
            &Ok(0),
            &Default::default(),
            Default::default(),
        );
        let ring3 = report.find(Driver::Ring3, 64).expect("measured");
        assert_eq!(ring3.rx_pps, 19000.0);
        let cpu = report.measurements[0]
            .guest_cpu
            .expect("the ring3 run's CPU");
        assert_eq!(cpu.busy_percent(), 100.0);
        let notes = report.notes.join("\n");
        assert!(notes.contains("EAL: Error"), "{notes}");
        assert!(notes.contains("ring3 at 1500 bytes: no result"), "{notes}");
    }
}
