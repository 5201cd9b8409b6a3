//! `cargo xtask bench nvme`: ring3's NVMe driver against the kernel's `nvme` driver, in
//! one lab VM on one emulated controller.
//!
//! The host checks its tools, builds `ring3` in release mode, boots the lab with one NVMe
//! controller (one namespace, 4096-byte blocks) and runs the guest script of
//! [`super::script`], which measures each workload with fio on the kernel driver and with
//! `ring3 bench nvme`, alternating which goes first. The results come back on the console
//! ([`super::capture`]); the host parses and checks them ([`super::results`]), notes how
//! busy the host was meanwhile ([`super::hostload`]) and writes the report
//! ([`super::report`]).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use super::capture::{Block, CaptureSink, Captured};
use super::hostload;
use super::report::{self, Environment, Outcome, Report, Row, Settings};
use super::results;
use super::script::{self, Plan};
use super::workload::{self, Workload, SMALL_BLOCK};
use crate::lab::{self, host, LabDevice, LabOptions, NvmeNamespace, NVME_MAX_IO_QUEUE_PAIRS};
use crate::tasks;

const MIB: u64 = 1 << 20;

/// The kernel driver's polled queues (`nvme poll_queues=`), which fio's `--hipri` needs.
const POLL_QUEUES: u32 = 2;

/// Other processes' (or the hypervisor's) share of the host's CPU time above which the
/// report warns that the numbers are disturbed.
const BUSY_HOST_PERCENT: f64 = 5.0;

/// The files the bench writes into its output directory.
pub const REPORT_FILE: &str = "nvme.md";
pub const JSON_FILE: &str = "nvme.json";
pub const CHART_FILE: &str = "nvme-iops-vs-qd.svg";

/// Options of `cargo xtask bench nvme`.
#[derive(Debug, Clone, clap::Args)]
pub struct NvmeArgs {
    /// Seconds each workload runs, for each driver [default: 10, or 3 with --quick].
    #[arg(long, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: Option<u64>,

    /// A shorter run to try the bench out: 3 s per workload, a queue-depth sweep of 1, 4
    /// and 32, one random-write depth and a 256 MiB region.
    #[arg(long)]
    pub quick: bool,

    /// Directory for nvme.md, nvme.json and nvme-iops-vs-qd.svg [default: bench/results
    /// in the workspace].
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// MiB at the start of the namespace that every workload uses, filled with data
    /// before the first read [default: the whole namespace, or 256 with --quick].
    #[arg(long, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub region: Option<u64>,

    /// Size of the emulated NVMe namespace in MiB (a sparse image on the host).
    #[arg(long, value_name = "MIB", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(16..=65536))]
    pub namespace: u64,

    /// Guest CPUs. Under TCG each one is a host thread and QEMU's device emulation needs
    /// another, so more than the host's cores only adds contention; both drivers share
    /// the same VM either way.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cpus: u32,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(256..))]
    pub memory: u32,

    /// Measure only the kernel driver: no ring3 build, the controller stays on `nvme`.
    #[arg(long)]
    pub kernel_only: bool,

    /// Run this ring3 binary instead of building target/release/ring3.
    #[arg(long, value_name = "PATH", conflicts_with = "kernel_only")]
    pub ring3: Option<PathBuf>,

    /// Kill the VM after this many seconds [default: estimated from the workloads].
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
    namespace_bytes: u64,
    region_bytes: u64,
    workloads: Vec<Workload>,
    output: PathBuf,
    /// How long the VM is expected to run.
    expected: Duration,
    timeout: Duration,
}

impl Config {
    fn from_args(args: &NvmeArgs) -> Result<Config> {
        let duration_s = args.duration.unwrap_or(if args.quick { 3 } else { 10 });
        let namespace_bytes = args.namespace * MIB;
        let region_bytes = match args.region {
            Some(mib) => mib * MIB,
            None if args.quick => namespace_bytes.min(256 * MIB),
            None => namespace_bytes,
        };
        if region_bytes > namespace_bytes {
            bail!(
                "--region {} MiB is larger than the namespace ({} MiB); raise --namespace",
                region_bytes / MIB,
                args.namespace
            );
        }
        let workloads = workload::workloads(args.quick);
        if let Some(big) = workloads
            .iter()
            .find(|w| u64::from(w.block_size) > region_bytes)
        {
            bail!("the region is smaller than one I/O of {big}");
        }
        let output = match &args.output {
            Some(dir) => dir.clone(),
            None => lab::workspace_root().join("bench").join("results"),
        };
        let runs = workloads.len() as u64 * if args.kernel_only { 1 } else { 2 };
        let moves = if args.kernel_only {
            0
        } else {
            workloads.len() as u64
        };
        // Boot, the fill pass at about 100 MiB/s, per run its duration plus the start-up
        // of a program under TCG (fio takes a few seconds), and the moves of the
        // controller between drivers; the timeout leaves room for a slower host.
        let expected = 30 + region_bytes / MIB / 100 + runs * (duration_s + 4) + moves * 3;
        let timeout = Duration::from_secs(args.timeout.unwrap_or(2 * expected + 300));
        Ok(Config {
            duration_s,
            namespace_bytes,
            region_bytes,
            workloads,
            output,
            expected: Duration::from_secs(expected),
            timeout,
        })
    }
}

/// Runs the bench and returns the exit status: 0 when every workload was measured on
/// both drivers (or on the kernel's with `--kernel-only`), 1 when something is missing.
pub fn run(args: NvmeArgs) -> Result<i32> {
    let config = Config::from_args(&args)?;
    fs::create_dir_all(&config.output).with_context(|| {
        format!(
            "could not create the output directory {}",
            config.output.display()
        )
    })?;

    tasks::step("checking the host (QEMU, the guest kernel, fio)");
    check_fio()?;
    lab::prepare()?;

    let (ring3, ring3_missing) = if args.kernel_only {
        (None, Some("not run (--kernel-only)".to_string()))
    } else {
        let binary = match &args.ring3 {
            Some(path) => path.clone(),
            None => build_ring3()?,
        };
        let binary = binary
            .canonicalize()
            .with_context(|| format!("no ring3 binary at {}", binary.display()))?;
        check_visible_to_guest(&binary)?;
        match ring3_bench_available(&binary) {
            Ok(()) => (Some(binary), None),
            Err(why) => {
                eprintln!(
                    "\nbench: ring3 cannot run the NVMe benchmark: {why}\n\
                     bench: measuring the kernel driver only; the report will have no ring3 numbers\n"
                );
                (None, Some(format!("not run: {why}")))
            }
        }
    };
    let ring3_text = ring3
        .as_ref()
        .map(|p| {
            p.to_str()
                .map(str::to_string)
                .with_context(|| format!("the path {} is not UTF-8", p.display()))
        })
        .transpose()?;

    let plan = Plan {
        workloads: &config.workloads,
        duration_s: config.duration_s,
        region_bytes: config.region_bytes,
        ring3: ring3_text.as_deref(),
    };
    let options = LabOptions {
        devices: vec![LabDevice::Nvme],
        nvme_namespaces: vec![NvmeNamespace {
            bytes: config.namespace_bytes,
            block_size: SMALL_BLOCK,
        }],
        load_vfio: true,
        extra_modules: vec![format!("nvme poll_queues={POLL_QUEUES}")],
        memory_mib: args.memory,
        cpus: args.cpus,
        timeout: Some(config.timeout),
        workdir: Some(lab::workspace_root()),
        verbose: args.verbose,
        ..LabOptions::default()
    };
    tasks::step(&format!(
        "measuring {} workloads of {} s each on {} (one VM, about {} min)",
        config.workloads.len(),
        config.duration_s,
        if ring3.is_some() {
            "the kernel driver and ring3, alternating"
        } else {
            "the kernel driver"
        },
        config.expected.as_secs().div_ceil(60)
    ));
    let captured = Captured::default();
    let workloads = config.workloads.clone();
    let sink = CaptureSink::new(
        Box::new(io::stdout()),
        captured.clone(),
        Box::new(move |block, out| print_progress(block, &workloads, out)),
    );
    let started = Instant::now();
    let environment_date = report::utc_timestamp(SystemTime::now());
    let command = [
        "sh".to_string(),
        "-c".to_string(),
        script::guest_script(&plan),
    ];
    let cpu_before = hostload::snapshot();
    let lab_result = lab::run_in_lab_with_output(&options, &command, Box::new(sink));
    let host_load = cpu_before
        .zip(hostload::snapshot())
        .and_then(|(before, after)| hostload::between(&before, &after));
    eprintln!(
        "bench: the VM ran for {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let blocks = captured.blocks();
    let mut notes = Vec::new();
    let guest = guest_info(&blocks);
    let fill = match blocks.iter().find(|b| b.source == "fill") {
        Some(block) => fill_outcome(block),
        None => Outcome::Failed {
            reason: "the fill pass did not report".into(),
        },
    };
    let rows: Vec<Row> = config
        .workloads
        .iter()
        .map(|&workload| Row {
            workload,
            kernel: outcome_for(&blocks, "kernel", &workload, None),
            ring3: outcome_for(&blocks, "ring3", &workload, ring3_missing.as_deref()),
        })
        .collect();
    match &lab_result {
        Ok(0) => {}
        Ok(status) => notes.push(format!(
            "The guest script stopped with exit status {status}{}.",
            match *status {
                script::EXIT_NO_DEVICE => ": no usable NVMe namespace under the kernel driver",
                script::EXIT_FILL_FAILED => ": the fill pass failed",
                script::EXIT_SWITCH_FAILED => {
                    ": moving the controller between nvme and vfio-pci failed"
                }
                _ => "",
            }
        )),
        Err(err) => notes.push(format!("The lab run failed: {err:#}.")),
    }
    if let Some(load) = host_load {
        if load.others_percent > BUSY_HOST_PERCENT || load.steal_percent > BUSY_HOST_PERCENT {
            notes.push(format!(
                "While the VM ran, other processes used {:.0}% of the host's CPU time and the \
                 hypervisor under the host took {:.0}%. Under TCG that slows whichever driver \
                 is running at the time; rerun on an idle host before trusting a ratio.",
                load.others_percent, load.steal_percent
            ));
        }
    }
    if let Some(why) = &ring3_missing {
        if !args.kernel_only {
            notes.push(format!("ring3 was {why}."));
        }
    }
    let mut implausible = 0;
    for (driver, pick) in [
        ("kernel", (|row: &Row| &row.kernel) as fn(&Row) -> &Outcome),
        ("ring3", |row: &Row| &row.ring3),
    ] {
        let mut problems = Vec::new();
        for row in &rows {
            match pick(row) {
                Outcome::Failed { reason } => {
                    notes.push(format!("{} on {driver}: {reason}", row.workload));
                }
                Outcome::Measured { measurement, .. } => {
                    if let Some(problem) =
                        results::implausible_latency(row.workload.queue_depth, measurement)
                    {
                        problems.push(format!("{}: {problem}", row.workload));
                    }
                }
                Outcome::Skipped { .. } => {}
            }
        }
        implausible += problems.len();
        match problems.as_slice() {
            [] => {}
            [only] => notes.push(format!("{driver}'s latency is implausible for {only}")),
            [first, ..] => notes.push(format!(
                "{driver}'s latencies are implausible in {} of {} workloads (mean latency × \
                 IOPS should be about the queue depth); for example {first}",
                problems.len(),
                rows.len()
            )),
        }
    }
    let report = Report {
        environment: Environment {
            date: environment_date,
            commit: git_commit(),
            host_cpu: host_cpu_model(),
            host_cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            host_kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| s.trim().to_string()),
            qemu: qemu_version(),
            host_load,
            guest,
        },
        settings: Settings {
            duration_s: config.duration_s,
            region_bytes: config.region_bytes,
            namespace_bytes: config.namespace_bytes,
            block_size: SMALL_BLOCK,
            guest_cpus: args.cpus,
            guest_memory_mib: args.memory,
            nvme_poll_queues: POLL_QUEUES,
            nvme_max_io_queue_pairs: NVME_MAX_IO_QUEUE_PAIRS,
        },
        fill,
        rows,
        notes,
    };
    write_report(&report, &config.output)?;
    println!("\n{}", report.summary_table());
    for note in &report.notes {
        println!("note: {note}");
    }
    println!(
        "\nwrote {}, {} and {}",
        config.output.join(REPORT_FILE).display(),
        config.output.join(JSON_FILE).display(),
        config.output.join(CHART_FILE).display()
    );

    let status = lab_result?;
    let complete = report.rows.iter().all(|row| {
        row.kernel.measurement().is_some()
            && (args.kernel_only || row.ring3.measurement().is_some())
    });
    if status != 0 || !complete {
        eprintln!("bench: some workloads were not measured; see the notes above");
        return Ok(1);
    }
    if implausible > 0 {
        eprintln!("bench: some latencies failed the Little's-law check; see the notes above");
        return Ok(1);
    }
    Ok(0)
}

fn write_report(report: &Report, dir: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(&report.json()).context("serialising the results")?;
    for (name, text) in [
        (REPORT_FILE, report.markdown(CHART_FILE, JSON_FILE)),
        (JSON_FILE, json + "\n"),
        (CHART_FILE, report.chart()),
    ] {
        let path = dir.join(name);
        fs::write(&path, text).with_context(|| format!("could not write {}", path.display()))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Reading the guest's results
// ---------------------------------------------------------------------------

/// `key=value` lines of the guest's `info` block.
fn guest_info(blocks: &[Block]) -> Vec<(String, String)> {
    blocks
        .iter()
        .filter(|b| b.source == "info")
        .flat_map(|b| b.text.lines())
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            Some((key.trim().to_string(), value.trim().to_string()))
        })
        .collect()
}

fn fill_outcome(block: &Block) -> Outcome {
    let parsed = check_block(block, "fio").and_then(|()| {
        let output = results::parse_fio_output(&block.text)?;
        let job = results::fio_job(&output)?;
        let measurement = results::fio_measurement(job, results::Direction::Write)?;
        Ok(Outcome::Measured {
            measurement,
            raw: output,
        })
    });
    parsed.unwrap_or_else(|err| Outcome::Failed {
        reason: format!("{err:#}"),
    })
}

fn check_block(block: &Block, tool: &str) -> Result<()> {
    if !block.complete {
        bail!("{tool}'s output was cut short");
    }
    if block.status != 0 {
        bail!("{tool} exited with status {}", block.status);
    }
    Ok(())
}

/// What one driver's run of `workload` came to, from the guest's blocks.
fn outcome_for(
    blocks: &[Block],
    source: &str,
    workload: &Workload,
    skipped: Option<&str>,
) -> Outcome {
    if let Some(reason) = skipped {
        return Outcome::Skipped {
            reason: reason.to_string(),
        };
    }
    let id = workload.id();
    match blocks
        .iter()
        .rev()
        .find(|b| b.source == source && b.id == id)
    {
        Some(block) => block_outcome(block, workload),
        None => Outcome::Failed {
            reason: "no result: the guest did not get to it (see the output above)".into(),
        },
    }
}

fn block_outcome(block: &Block, workload: &Workload) -> Outcome {
    let parsed = match block.source.as_str() {
        "kernel" => kernel_outcome(block, workload),
        "ring3" => ring3_outcome(block, workload),
        other => Err(anyhow::anyhow!("unexpected result source {other}")),
    };
    parsed.unwrap_or_else(|err| Outcome::Failed {
        reason: format!("{err:#}"),
    })
}

fn kernel_outcome(block: &Block, workload: &Workload) -> Result<Outcome> {
    check_block(block, "fio")?;
    let output = results::parse_fio_output(&block.text)?;
    let job = results::fio_job(&output)?;
    let measurement = results::fio_measurement(job, workload.pattern.direction())?;
    if measurement.errors != 0 {
        bail!("fio reported error {}", measurement.errors);
    }
    if measurement.ios == 0 {
        bail!("fio completed no I/O");
    }
    Ok(Outcome::Measured {
        measurement,
        raw: output,
    })
}

fn ring3_outcome(block: &Block, workload: &Workload) -> Result<Outcome> {
    check_block(block, "ring3 bench")?;
    let (raw, report) = results::parse_ring3_output(&block.text)?;
    let ran = (
        report.pattern.as_str(),
        report.block_size,
        report.queue_depth,
        report.completion.as_str(),
        report.nsid,
    );
    let asked = (
        workload.pattern.name(),
        u64::from(workload.block_size),
        workload.queue_depth,
        workload.completion.name(),
        1,
    );
    if ran != asked {
        bail!("ring3 bench ran {ran:?} (pattern, block size, QD, completion, nsid), not {asked:?}");
    }
    let measurement = report.measurement()?;
    if measurement.errors != 0 {
        bail!("ring3 bench reported {} I/O errors", measurement.errors);
    }
    if measurement.ios == 0 {
        bail!("ring3 bench completed no I/O");
    }
    Ok(Outcome::Measured { measurement, raw })
}

/// One line on the terminal per result as it arrives.
fn print_progress(block: &Block, workloads: &[Workload], out: &mut dyn Write) {
    let line = match block.source.as_str() {
        "info" => return,
        "fill" => match fill_outcome(block) {
            Outcome::Measured { measurement, .. } => format!(
                "filled at {:.0} MiB/s",
                measurement.bandwidth_bytes_per_s / MIB as f64
            ),
            other => describe_failure(&other),
        },
        _ => {
            let Some(workload) = workloads.iter().find(|w| w.id() == block.id) else {
                let _ = writeln!(out, "    (a result for an unknown workload {})", block.id);
                return;
            };
            match block_outcome(block, workload) {
                Outcome::Measured { measurement: m, .. } => {
                    let mut line = format!(
                        "{}: {:.0} IOPS, {:.1} MiB/s, latency p50 {:.1} µs, p99 {:.1} µs",
                        block.source,
                        m.iops,
                        m.bandwidth_bytes_per_s / MIB as f64,
                        m.latency_us.p50,
                        m.latency_us.p99
                    );
                    if let Some(problem) = results::implausible_latency(workload.queue_depth, &m) {
                        line.push_str(&format!("\n    warning: implausible latency: {problem}"));
                    }
                    line
                }
                other => format!("{}: {}", block.source, describe_failure(&other)),
            }
        }
    };
    let _ = writeln!(out, "    {line}");
}

fn describe_failure(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Measured { .. } => "measured".into(),
        Outcome::Failed { reason } => format!("FAILED: {reason}"),
        Outcome::Skipped { reason } => format!("skipped: {reason}"),
    }
}

// ---------------------------------------------------------------------------
// Host checks and facts
// ---------------------------------------------------------------------------

/// fio runs in the guest from the host's file system, so the host needs it, with io_uring.
fn check_fio() -> Result<()> {
    let Some(fio) = host::find_program("fio") else {
        bail!(
            "the bench runs fio inside the lab guest, which uses the host's programs, but fio \
             is not installed; install it with:\n    sudo apt-get install -y fio"
        );
    };
    let io_uring = Command::new(&fio)
        .arg("--enghelp=io_uring")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("could not run {}", fio.display()))?;
    if !io_uring.success() {
        bail!(
            "{} has no io_uring engine; install a fio built with it (Debian's fio package is)",
            fio.display()
        );
    }
    Ok(())
}

/// `cargo build --release -p ring3-cli`, returning the binary.
fn build_ring3() -> Result<PathBuf> {
    tasks::step("building ring3 (release)");
    let mut build = tasks::cargo();
    build.args(["build", "--release", "--package", "ring3-cli"]);
    tasks::run_checked(
        build,
        "building ring3 (use --kernel-only to measure the kernel driver alone)",
    )?;
    Ok(lab::target_dir().join("release").join("ring3"))
}

/// The guest sees the host's files except under its own `/tmp`, `/run` and `/var/tmp`
/// (the workspace and target directories excepted).
fn check_visible_to_guest(binary: &Path) -> Result<()> {
    let shared = [lab::workspace_root(), lab::target_dir()];
    let private = ["/tmp", "/run", "/var/tmp"]
        .iter()
        .any(|dir| binary.starts_with(dir));
    if private && !shared.iter().any(|dir| binary.starts_with(dir)) {
        bail!(
            "{} is under /tmp, /run or /var/tmp, which the lab guest does not share with the \
             host; copy it into the workspace",
            binary.display()
        );
    }
    Ok(())
}

/// Whether this `ring3` has the `bench nvme` command.
fn ring3_bench_available(binary: &Path) -> std::result::Result<(), String> {
    let output = Command::new(binary)
        .args(["bench", "nvme", "--help"])
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("could not run {}: {err}", binary.display()))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let first = stderr
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message");
    Err(format!(
        "`{} bench nvme --help` failed ({}): {}",
        binary.display(),
        output.status,
        first.trim()
    ))
}

fn first_line_of(program: &str, args: &[&str]) -> Option<String> {
    let path = host::find_program(program)?;
    let output = Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output.status.success().then_some(())?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
}

fn qemu_version() -> Option<String> {
    first_line_of("qemu-system-x86_64", &["--version"])
}

/// The workspace's commit, `-dirty` when the tree has changes.
fn git_commit() -> Option<String> {
    let root = lab::workspace_root();
    let root = root.to_str()?;
    let commit = first_line_of("git", &["-C", root, "rev-parse", "--short=12", "HEAD"])?;
    let dirty = first_line_of("git", &["-C", root, "status", "--porcelain"]).is_some();
    Some(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}

fn host_cpu_model() -> Option<String> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "model name").then(|| value.trim().to_string())
        })
        .filter(|model| !model.is_empty())
}

#[cfg(test)]
mod tests {
    use super::super::results::samples::{FIO_RANDREAD, RING3_RANDREAD};
    use super::super::workload::{Completion, Pattern};
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: NvmeArgs,
    }

    fn args(line: &[&str]) -> NvmeArgs {
        let mut argv = vec!["bench"];
        argv.extend(line);
        Cli::try_parse_from(argv)
            .map(|cli| cli.args)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn defaults_and_quick() {
        let config = Config::from_args(&args(&[])).expect("valid");
        assert_eq!(config.duration_s, 10);
        assert_eq!(config.namespace_bytes, 1 << 30);
        assert_eq!(config.region_bytes, 1 << 30);
        assert!(config.output.ends_with("bench/results"));
        let quick = Config::from_args(&args(&["--quick"])).expect("valid");
        assert_eq!(quick.duration_s, 3);
        assert_eq!(quick.region_bytes, 256 << 20);
        assert!(quick.workloads.len() < config.workloads.len());
        assert!(quick.timeout < config.timeout);
        let explicit = Config::from_args(&args(&[
            "--quick",
            "--duration",
            "5",
            "--region",
            "64",
            "--output",
            "out",
            "--timeout",
            "99",
        ]))
        .expect("valid");
        assert_eq!(explicit.duration_s, 5);
        assert_eq!(explicit.region_bytes, 64 << 20);
        assert_eq!(explicit.output, PathBuf::from("out"));
        assert_eq!(explicit.timeout, Duration::from_secs(99));
    }

    #[test]
    fn bad_settings_are_refused() {
        let err = Config::from_args(&args(&["--namespace", "64", "--region", "128"]))
            .expect_err("region larger than the namespace");
        assert!(err.to_string().contains("--namespace"), "{err}");
        for line in [
            &["--duration", "0"][..],
            &["--kernel-only", "--ring3", "x"],
            &["--namespace", "8"],
            &["--cpus", "0"],
        ] {
            let mut argv = vec!["bench"];
            argv.extend(line);
            assert!(Cli::try_parse_from(argv).is_err(), "{line:?}");
        }
    }

    fn randread_qd32(completion: Completion) -> Workload {
        Workload {
            pattern: Pattern::RandRead,
            block_size: 4096,
            queue_depth: 32,
            completion,
        }
    }

    fn block(source: &str, id: &str, status: i32, text: &str) -> Block {
        Block {
            source: source.into(),
            id: id.into(),
            status,
            text: text.into(),
            complete: true,
        }
    }

    #[test]
    fn outcomes_from_blocks() {
        let irq = randread_qd32(Completion::Interrupt);
        let poll = randread_qd32(Completion::Poll);
        let blocks = [
            block("kernel", &irq.id(), 0, FIO_RANDREAD),
            block("ring3", &poll.id(), 0, RING3_RANDREAD),
            block("ring3", &irq.id(), 2, "error: no such command"),
        ];
        let kernel = outcome_for(&blocks, "kernel", &irq, None);
        assert_eq!(kernel.measurement().map(|m| m.ios), Some(100005));
        let ring3 = outcome_for(&blocks, "ring3", &poll, None);
        assert_eq!(ring3.measurement().map(|m| m.ios), Some(123000));
        match outcome_for(&blocks, "ring3", &irq, None) {
            Outcome::Failed { reason } => assert!(reason.contains("status 2"), "{reason}"),
            other => panic!("{other:?}"),
        }
        match outcome_for(&blocks, "kernel", &poll, None) {
            Outcome::Failed { reason } => assert!(reason.contains("did not get to it")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            outcome_for(&blocks, "ring3", &poll, Some("not run")),
            Outcome::Skipped { .. }
        ));
    }

    #[test]
    fn ring3_must_run_what_was_asked() {
        // The sample reports polled completion; asking for interrupts is a mismatch.
        let irq = randread_qd32(Completion::Interrupt);
        let blocks = [block("ring3", &irq.id(), 0, RING3_RANDREAD)];
        match outcome_for(&blocks, "ring3", &irq, None) {
            Outcome::Failed { reason } => assert!(reason.contains("not ("), "{reason}"),
            other => panic!("{other:?}"),
        }
        let with_errors = RING3_RANDREAD.replace("\"errors\":0", "\"errors\":3");
        let poll = randread_qd32(Completion::Poll);
        let blocks = [block("ring3", &poll.id(), 0, &with_errors)];
        match outcome_for(&blocks, "ring3", &poll, None) {
            Outcome::Failed { reason } => assert!(reason.contains("3 I/O errors"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cut_short_output_is_a_failure() {
        let irq = randread_qd32(Completion::Interrupt);
        let mut cut = block("kernel", &irq.id(), 0, &FIO_RANDREAD[..200]);
        cut.complete = false;
        match outcome_for(&[cut], "kernel", &irq, None) {
            Outcome::Failed { reason } => assert!(reason.contains("cut short"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn guest_info_lines() {
        let blocks = [block(
            "info",
            "guest",
            0,
            "guest_kernel=6.12\nfio=fio-3.33\nnvme_queues=2/0/2 default/read/poll queues\nnoise\n",
        )];
        let info = guest_info(&blocks);
        assert_eq!(info.len(), 3);
        assert_eq!(info[2].1, "2/0/2 default/read/poll queues");
    }

    #[test]
    fn guest_visibility() {
        assert!(check_visible_to_guest(Path::new("/tmp/elsewhere/ring3")).is_err());
        assert!(check_visible_to_guest(Path::new("/usr/local/bin/ring3")).is_ok());
        assert!(check_visible_to_guest(&lab::target_dir().join("release/ring3")).is_ok());
    }
}
