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

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::capture::Block;
use super::host::{self, VmArgs};
use super::outcome::{self, guest_info};
use super::report::{Outcome, Report, Row, Settings};
use super::script::{self, Plan};
use super::workload::{self, Workload, SMALL_BLOCK};
use crate::lab::{self, NVME_MAX_IO_QUEUE_PAIRS};
use crate::tasks;

const MIB: u64 = 1 << 20;

/// The kernel driver's polled queues (`nvme poll_queues=`), which fio's `--hipri` needs.
const POLL_QUEUES: u32 = 2;

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

    #[command(flatten)]
    pub vm: VmArgs,

    /// Measure only the kernel driver: no ring3 build, the controller stays on `nvme`.
    #[arg(long)]
    pub kernel_only: bool,

    /// Run this ring3 binary instead of building target/release/ring3.
    #[arg(long, value_name = "PATH", conflicts_with = "kernel_only")]
    pub ring3: Option<PathBuf>,
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
        let (namespace_bytes, region_bytes) = args.vm.namespace_and_region(args.quick)?;
        let workloads = workload::workloads(args.quick);
        if let Some(big) = workloads
            .iter()
            .find(|w| u64::from(w.block_size) > region_bytes)
        {
            bail!("the region is smaller than one I/O of {big}");
        }
        let output = host::output_dir(args.output.as_deref());
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
        let timeout = Duration::from_secs(args.vm.guest.timeout.unwrap_or(2 * expected + 300));
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
    host::create_output_dir(&config.output)?;

    tasks::step("checking the host (QEMU, the guest kernel, fio)");
    host::check_fio()?;
    lab::prepare()?;

    let (ring3, ring3_missing) = if args.kernel_only {
        (None, Some("not run (--kernel-only)".to_string()))
    } else {
        let binary = match &args.ring3 {
            Some(path) => path.clone(),
            None => host::build_release(
                &["ring3-cli"],
                "use --kernel-only to measure the kernel driver alone",
            )?
            .join("ring3"),
        };
        let guest_path = host::guest_binary(&binary)?;
        match host::command_available(&binary, &["bench", "nvme", "--help"]) {
            Ok(()) => (Some(guest_path), None),
            Err(why) => {
                eprintln!(
                    "\nbench: ring3 cannot run the NVMe benchmark: {why}\n\
                     bench: measuring the kernel driver only; the report will have no ring3 numbers\n"
                );
                (None, Some(format!("not run: {why}")))
            }
        }
    };
    let plan = Plan {
        workloads: &config.workloads,
        duration_s: config.duration_s,
        region_bytes: config.region_bytes,
        ring3: ring3.as_deref(),
    };
    let options = args.vm.lab_options(
        config.namespace_bytes,
        vec![format!("nvme poll_queues={POLL_QUEUES}")],
        config.timeout,
    );
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
    let workloads = config.workloads.clone();
    let run = host::run_script(
        &options,
        script::guest_script(&plan),
        Box::new(move |block, out| print_progress(block, &workloads, out)),
    );
    let (blocks, lab_result, host_load) = (run.blocks, run.status, run.host_load);
    let mut notes = Vec::new();
    let guest = guest_info(&blocks);
    let fill = outcome::fill_result(&blocks);
    let rows: Vec<Row> = config
        .workloads
        .iter()
        .map(|&workload| Row {
            workload,
            kernel: outcome_for(&blocks, "kernel", &workload, None),
            ring3: outcome_for(&blocks, "ring3", &workload, ring3_missing.as_deref()),
        })
        .collect();
    notes.extend(script::exit_note(&lab_result, &[]));
    notes.extend(host::busy_host_note(host_load));
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
        let (driver_notes, problems) =
            outcome::driver_notes(driver, rows.iter().map(|row| (row.workload, pick(row))));
        notes.extend(driver_notes);
        implausible += problems;
    }
    let report = Report {
        environment: host::environment(run.date, host_load, guest),
        settings: Settings {
            duration_s: config.duration_s,
            region_bytes: config.region_bytes,
            namespace_bytes: config.namespace_bytes,
            block_size: SMALL_BLOCK,
            guest_cpus: args.vm.guest.cpus,
            guest_memory_mib: args.vm.guest.memory,
            nvme_poll_queues: POLL_QUEUES,
            nvme_max_io_queue_pairs: NVME_MAX_IO_QUEUE_PAIRS,
        },
        fill,
        rows,
        notes,
    };
    write_report(&report, &config.output)?;
    println!("\n{}", report.summary_table());
    host::print_notes_and_files(
        &report.notes,
        &config.output,
        &[REPORT_FILE, JSON_FILE, CHART_FILE],
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
    host::write_files(
        dir,
        [
            (REPORT_FILE, report.markdown(CHART_FILE, JSON_FILE)),
            (JSON_FILE, json + "\n"),
            (CHART_FILE, report.chart()),
        ],
    )
}

// ---------------------------------------------------------------------------
// Reading the guest's results
// ---------------------------------------------------------------------------

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
    match outcome::find_block(blocks, source, &workload.id()) {
        Some(block) => block_outcome(block, workload),
        None => outcome::missing(),
    }
}

fn block_outcome(block: &Block, workload: &Workload) -> Outcome {
    outcome::or_failed(match block.source.as_str() {
        "kernel" => outcome::fio_outcome(block, workload),
        "ring3" => outcome::ring3_outcome(block, workload),
        other => Err(anyhow::anyhow!("unexpected result source {other}")),
    })
}

/// One line on the terminal per result as it arrives.
fn print_progress(block: &Block, workloads: &[Workload], out: &mut dyn Write) {
    let line = match block.source.as_str() {
        "info" => return,
        "fill" => outcome::fill_line(block),
        _ => {
            return outcome::write_progress(out, block, workloads, |workload| {
                block_outcome(block, workload)
            })
        }
    };
    let _ = writeln!(out, "    {line}");
}

#[cfg(test)]
mod tests {
    use super::super::parse_args;
    use super::super::results::samples::{FIO_RANDREAD, RING3_RANDREAD};
    use super::super::workload::{Completion, Pattern};
    use super::*;

    fn args(line: &[&str]) -> NvmeArgs {
        parse_args(line).unwrap_or_else(|e| panic!("{e}"))
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
            assert!(parse_args::<NvmeArgs>(line).is_err(), "{line:?}");
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

    #[test]
    fn outcomes_from_blocks() {
        let irq = randread_qd32(Completion::Interrupt);
        let poll = randread_qd32(Completion::Poll);
        let blocks = [
            Block::finished("kernel", &irq.id(), 0, FIO_RANDREAD),
            Block::finished("ring3", &poll.id(), 0, RING3_RANDREAD),
            Block::finished("ring3", &irq.id(), 2, "error: no such command"),
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
        let blocks = [Block::finished("ring3", &irq.id(), 0, RING3_RANDREAD)];
        match outcome_for(&blocks, "ring3", &irq, None) {
            Outcome::Failed { reason } => assert!(reason.contains("not ("), "{reason}"),
            other => panic!("{other:?}"),
        }
        let with_errors = RING3_RANDREAD.replace("\"errors\":0", "\"errors\":3");
        let poll = randread_qd32(Completion::Poll);
        let blocks = [Block::finished("ring3", &poll.id(), 0, &with_errors)];
        match outcome_for(&blocks, "ring3", &poll, None) {
            Outcome::Failed { reason } => assert!(reason.contains("3 I/O errors"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cut_short_output_is_a_failure() {
        let irq = randread_qd32(Completion::Interrupt);
        let mut cut = Block::finished("kernel", &irq.id(), 0, &FIO_RANDREAD[..200]);
        cut.complete = false;
        match outcome_for(&[cut], "kernel", &irq, None) {
            Outcome::Failed { reason } => assert!(reason.contains("cut short"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}
