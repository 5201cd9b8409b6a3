//! `cargo xtask bench ublk`: ring3's NVMe driver run by ring3d and exposed through ublk,
//! against the kernel's `nvme` driver, in one lab VM on one emulated controller; with
//! ring3's direct API for the cost of the ublk hop, and the time the device takes to
//! come back after its driver process is killed.
//!
//! The host builds `ring3` and `ring3d` in release mode, boots the lab with one NVMe
//! controller and `ublk_drv`, and runs the guest script of [`script`]. The results come
//! back on the console as in the NVMe bench; [`recovery`] reads the kill timings and
//! [`report`] writes ublk.md and ublk.json.

mod recovery;
mod report;
mod script;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use self::recovery::Recovery;
use self::report::{Reader, UblkReport};
use self::script::Plan;
use super::capture::Block;
use super::host::{self, VmArgs};
use super::outcome::{self, guest_info};
use super::report::{Outcome, Row, Settings};
use super::script as nvme_script;
use super::workload::{self, Completion, Pattern, Workload, SMALL_BLOCK};
use crate::lab::{self, NVME_MAX_IO_QUEUE_PAIRS};
use crate::tasks;

const MIB: u64 = 1 << 20;

/// The kernel driver's polled queues, as in the NVMe bench.
const POLL_QUEUES: u32 = 2;

/// The files the bench writes into its output directory.
pub const REPORT_FILE: &str = "ublk.md";
pub const JSON_FILE: &str = "ublk.json";

/// Options of `cargo xtask bench ublk`.
#[derive(Debug, Clone, clap::Args)]
pub struct UblkArgs {
    /// Seconds each workload runs, on each path [default: 10, or 3 with --quick].
    #[arg(long, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: Option<u64>,

    /// A shorter run to try the bench out: 3 s per workload, 3 kills and a 256 MiB
    /// region.
    #[arg(long)]
    pub quick: bool,

    /// Times the driver process is killed (SIGKILL) to measure recovery [default: 10, or
    /// 3 with --quick].
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub kills: Option<u32>,

    /// Directory for ublk.md and ublk.json [default: bench/results in the workspace].
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,

    #[command(flatten)]
    pub vm: VmArgs,
}

/// The bench's settings, resolved from the arguments.
#[derive(Debug, Clone, PartialEq)]
struct Config {
    duration_s: u64,
    namespace_bytes: u64,
    region_bytes: u64,
    kills: u32,
    workloads: Vec<Workload>,
    direct: Vec<Workload>,
    output: PathBuf,
    /// How long the VM is expected to run.
    expected: Duration,
    timeout: Duration,
}

/// The NVMe bench's workloads this bench runs on the kernel driver and through ublk:
/// 4 KiB random reads at QD1 and QD32, 4 KiB random writes at QD32, 128 KiB sequential
/// reads at QD32, all with interrupts (ublk has no polled completion).
fn ublk_workloads() -> Vec<Workload> {
    let wanted = [
        (Pattern::RandRead, SMALL_BLOCK, 1),
        (Pattern::RandRead, SMALL_BLOCK, 32),
        (Pattern::RandWrite, SMALL_BLOCK, 32),
        (Pattern::SeqRead, 128 * 1024, 32),
    ];
    workload::workloads(false)
        .into_iter()
        .filter(|w| {
            w.completion == Completion::Interrupt
                && wanted.contains(&(w.pattern, w.block_size, w.queue_depth))
        })
        .collect()
}

/// The workloads measured with ring3's API for the hop: 4 KiB random reads at QD1 and
/// QD32, polled like ring3d's driver.
fn direct_workloads() -> Vec<Workload> {
    workload::workloads(false)
        .into_iter()
        .filter(|w| {
            w.pattern == Pattern::RandRead
                && w.block_size == SMALL_BLOCK
                && w.completion == Completion::Poll
                && matches!(w.queue_depth, 1 | 32)
        })
        .collect()
}

impl Config {
    fn from_args(args: &UblkArgs) -> Result<Config> {
        let duration_s = args.duration.unwrap_or(if args.quick { 3 } else { 10 });
        let kills = args.kills.unwrap_or(if args.quick { 3 } else { 10 });
        let (namespace_bytes, region_bytes) = args.vm.namespace_and_region(args.quick)?;
        let workloads = ublk_workloads();
        let direct = direct_workloads();
        if let Some(big) = workloads
            .iter()
            .find(|w| u64::from(w.block_size) > region_bytes)
        {
            bail!("the region is smaller than one I/O of {big}");
        }
        let output = host::output_dir(args.output.as_deref());
        // Boot, the fill at about 100 MiB/s, each run its duration plus a program's
        // start-up under TCG, two moves of the controller, ring3d's start and stop, and
        // per kill a restart of the driver with the controller's reset.
        let runs = 2 * workloads.len() as u64 + direct.len() as u64;
        let expected = 30
            + region_bytes / MIB / 100
            + runs * (duration_s + 4)
            + 2 * 3
            + 2 * 15
            + u64::from(kills) * 8;
        let timeout = Duration::from_secs(args.vm.guest.timeout.unwrap_or(2 * expected + 300));
        Ok(Config {
            duration_s,
            namespace_bytes,
            region_bytes,
            kills,
            workloads,
            direct,
            output,
            expected: Duration::from_secs(expected),
            timeout,
        })
    }
}

/// Runs the bench and returns the exit status: 0 when every part was measured, 1 when
/// something is missing.
pub fn run(args: UblkArgs) -> Result<i32> {
    let config = Config::from_args(&args)?;
    host::create_output_dir(&config.output)?;

    tasks::step("checking the host (QEMU, the guest kernel, fio)");
    host::check_fio()?;
    lab::prepare()?;
    let release = host::build_release(&["ring3d", "ring3-cli"], "the bench runs both")?;
    let (ring3, ring3d) = (release.join("ring3"), release.join("ring3d"));
    host::check_commands(
        "ublk",
        &[
            (&ring3, &["bench", "nvme", "--help"]),
            (&ring3, &["status", "--help"]),
            (&ring3d, &["--help"]),
        ],
    )?;
    let (ring3, ring3d) = (host::guest_binary(&ring3)?, host::guest_binary(&ring3d)?);

    let plan = Plan {
        workloads: &config.workloads,
        direct: &config.direct,
        duration_s: config.duration_s,
        region_bytes: config.region_bytes,
        kills: config.kills,
        ring3: &ring3,
        ring3d: &ring3d,
    };
    let options = args.vm.lab_options(
        config.namespace_bytes,
        vec![
            format!("nvme poll_queues={POLL_QUEUES}"),
            "ublk_drv".to_string(),
        ],
        config.timeout,
    );
    tasks::step(&format!(
        "measuring {} workloads of {} s each on the kernel driver and through ublk, {} on \
         ring3's API, then {} kills of the driver (one VM, about {} min)",
        config.workloads.len(),
        config.duration_s,
        config.direct.len(),
        config.kills,
        config.expected.as_secs().div_ceil(60)
    ));
    let known: Vec<Workload> = config
        .workloads
        .iter()
        .chain(&config.direct)
        .copied()
        .collect();
    let run = host::run_script(
        &options,
        script::guest_script(&plan),
        Box::new(move |block, out| print_progress(block, &known, out)),
    );
    let report = build_report(
        &config,
        &args,
        &run.blocks,
        &run.status,
        host::environment(run.date, run.host_load, guest_info(&run.blocks)),
    );
    write_report(&report, &config.output)?;
    println!("\n{}", report.summary_table());
    if let Some(hop) = report.qd1_hop_us() {
        println!("QD1 4 KiB random read: ublk adds {hop:.1} µs to ring3's direct API");
    }
    if let Ok(recovery) = &report.recovery {
        if let Some(read) = recovery.read_ms() {
            println!(
                "recovery (kill to the first read completed): median {:.0} ms, max {:.0} ms \
                 over {} of {} kills",
                read.median,
                read.max,
                read.count,
                recovery.kills.len()
            );
        }
    }
    host::print_notes_and_files(&report.notes, &config.output, &[REPORT_FILE, JSON_FILE]);

    let status = run.status?;
    let complete = report
        .rows
        .iter()
        .all(|row| row.kernel.measurement().is_some() && row.ring3.measurement().is_some())
        && report.direct.iter().all(|(_, o)| o.measurement().is_some())
        && report.recovery.as_ref().is_ok_and(|r| {
            r.recovered().count() == r.kills.len() && r.kills.len() as u32 == config.kills
        });
    Ok(host::exit_status(status, complete))
}

fn build_report(
    config: &Config,
    args: &UblkArgs,
    blocks: &[Block],
    lab_result: &Result<i32>,
    environment: super::report::Environment,
) -> UblkReport {
    let rows: Vec<Row> = config
        .workloads
        .iter()
        .map(|&workload| Row {
            workload,
            kernel: outcome::fio_result(blocks, "kernel", &workload),
            ring3: outcome::fio_result(blocks, "ublk", &workload),
        })
        .collect();
    let direct: Vec<(Workload, Outcome)> = config
        .direct
        .iter()
        .map(|&workload| {
            let outcome = match outcome::find_block(blocks, "direct", &workload.id()) {
                Some(block) => outcome::or_failed(outcome::ring3_outcome(block, &workload)),
                None => outcome::missing(),
            };
            (workload, outcome)
        })
        .collect();
    let recovery = match outcome::find_block(blocks, "recovery", "kills") {
        Some(block) if !block.complete => Err("the recovery block was cut short".to_string()),
        Some(block) => Recovery::parse(&block.text).map_err(|e| format!("{e:#}")),
        None => Err("the guest did not get to it (see the output above)".to_string()),
    };
    let reader = outcome::find_block(blocks, "reader", "reader")
        .and_then(|block| super::results::parse_fio_output(&block.text).ok())
        .map(Reader::from_fio);

    let mut notes = Vec::new();
    notes.extend(nvme_script::exit_note(
        lab_result,
        &[(
            script::EXIT_DAEMON_FAILED,
            "ring3d did not bring the device up, or it did not come back after a kill",
        )],
    ));
    notes.extend(host::busy_host_note(environment.host_load));
    for (driver, pick) in [
        ("kernel", (|row: &Row| &row.kernel) as fn(&Row) -> &Outcome),
        ("ublk", |row: &Row| &row.ring3),
    ] {
        let (driver_notes, _) =
            outcome::driver_notes(driver, rows.iter().map(|row| (row.workload, pick(row))));
        notes.extend(driver_notes);
    }
    let (direct_notes, _) = outcome::driver_notes(
        "the direct API",
        direct
            .iter()
            .map(|(workload, outcome)| (*workload, outcome)),
    );
    notes.extend(direct_notes);
    match &recovery {
        Ok(recovery) => {
            let failed: Vec<String> = recovery
                .kills
                .iter()
                .enumerate()
                .filter(|(_, kill)| !kill.recovered())
                .map(|(i, kill)| {
                    format!(
                        "kill {} (dd exit status {}{})",
                        i + 1,
                        kill.read_status,
                        if kill.read_status == 124 {
                            ", timed out"
                        } else {
                            ""
                        }
                    )
                })
                .collect();
            if !failed.is_empty() {
                notes.push(format!(
                    "The read after the kill failed after {}; those kills are left out of the \
                     recovery times.",
                    failed.join(", ")
                ));
            }
            if (recovery.kills.len() as u32) < config.kills {
                notes.push(format!(
                    "Only {} of {} kills were made: the device did not run again after the \
                     last.",
                    recovery.kills.len(),
                    config.kills
                ));
            }
        }
        Err(why) => notes.push(format!("Recovery: {why}.")),
    }
    if let Some(errors) = reader.as_ref().and_then(|r| r.errors).filter(|&n| n > 0) {
        notes.push(format!(
            "The reader running during the kills saw {errors} failed reads: recovery lost I/O."
        ));
    }
    UblkReport {
        environment,
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
        kills: config.kills,
        daemon_queues: (script::DAEMON_QUEUES, script::DAEMON_QUEUE_DEPTH),
        fill: outcome::fill_result(blocks),
        rows,
        direct,
        recovery,
        reader,
        status: outcome::ring3d_status(blocks),
        notes,
    }
}

fn write_report(report: &UblkReport, dir: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(&report.json()).context("serialising the results")?;
    host::write_files(
        dir,
        [
            (REPORT_FILE, report.markdown(JSON_FILE)),
            (JSON_FILE, json + "\n"),
        ],
    )
}

/// One line on the terminal per result as it arrives.
fn print_progress(block: &Block, workloads: &[Workload], out: &mut dyn Write) {
    let line = match block.source.as_str() {
        "info" | "status" | "reader" => return,
        "fill" => outcome::fill_line(block),
        "recovery" => match Recovery::parse(&block.text) {
            Ok(recovery) => match recovery.read_ms() {
                Some(read) => format!(
                    "recovery: median {:.0} ms, max {:.0} ms from the kill to the first read \
                     ({} of {} kills)",
                    read.median,
                    read.max,
                    read.count,
                    recovery.kills.len()
                ),
                None => "recovery: no read completed after a kill".to_string(),
            },
            Err(err) => format!("recovery: {err:#}"),
        },
        source => {
            return outcome::write_progress(out, block, workloads, |workload| {
                outcome::or_failed(if source == "direct" {
                    outcome::ring3_outcome(block, workload)
                } else {
                    outcome::fio_outcome(block, workload)
                })
            })
        }
    };
    let _ = writeln!(out, "    {line}");
}

#[cfg(test)]
mod tests {
    use super::super::parse_args;
    use super::super::results::samples::{FIO_RANDREAD, RING3_RANDREAD};
    use super::*;

    fn args(line: &[&str]) -> UblkArgs {
        parse_args(line).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_workloads_are_the_nvme_benchs() {
        let ids: Vec<String> = ublk_workloads().iter().map(Workload::id).collect();
        assert_eq!(
            ids,
            [
                "randread-4k-qd1-interrupt",
                "randread-4k-qd32-interrupt",
                "randwrite-4k-qd32-interrupt",
                "read-128k-qd32-interrupt",
            ]
        );
        let direct: Vec<String> = direct_workloads().iter().map(Workload::id).collect();
        assert_eq!(direct, ["randread-4k-qd1-poll", "randread-4k-qd32-poll"]);
    }

    #[test]
    fn defaults_quick_and_options() {
        let config = Config::from_args(&args(&[])).expect("valid");
        assert_eq!((config.duration_s, config.kills), (10, 10));
        assert_eq!(config.region_bytes, 1 << 30);
        assert!(config.output.ends_with("bench/results"));
        let quick = Config::from_args(&args(&["--quick"])).expect("valid");
        assert_eq!((quick.duration_s, quick.kills), (3, 3));
        assert_eq!(quick.region_bytes, 256 << 20);
        assert!(quick.timeout < config.timeout);
        let explicit = Config::from_args(&args(&[
            "--quick",
            "--duration",
            "2",
            "--kills",
            "5",
            "--output",
            "out",
            "--timeout",
            "99",
        ]))
        .expect("valid");
        assert_eq!((explicit.duration_s, explicit.kills), (2, 5));
        assert_eq!(explicit.output, PathBuf::from("out"));
        assert_eq!(explicit.timeout, Duration::from_secs(99));
        assert!(Config::from_args(&args(&["--namespace", "64", "--region", "128"])).is_err());
        for line in [&["--kills", "0"][..], &["--duration", "0"]] {
            assert!(parse_args::<UblkArgs>(line).is_err(), "{line:?}");
        }
    }

    fn block(source: &str, id: &str, text: &str) -> Block {
        Block::finished(source, id, 0, text)
    }

    #[test]
    fn report_from_blocks() {
        let config = Config::from_args(&args(&["--quick", "--kills", "2"])).expect("valid");
        let qd32 = config.workloads[1];
        let blocks = [
            block("kernel", &qd32.id(), FIO_RANDREAD),
            block("ublk", &qd32.id(), FIO_RANDREAD),
            block("direct", &config.direct[1].id(), RING3_RANDREAD),
            block(
                "recovery",
                "kills",
                "kill 1 pid=5 us=2000000 status=0 running_us=2100000 new_pid=6 running=1\n",
            ),
        ];
        let report = build_report(
            &config,
            &args(&["--quick"]),
            &blocks,
            &Ok(0),
            Default::default(),
        );
        assert_eq!(report.rows[1].ratio(), Some(1.0));
        assert_eq!(report.target_met(), Some(true));
        assert!(report.direct[1].1.measurement().is_some());
        assert!(report.direct[0].1.measurement().is_none());
        let notes = report.notes.join("\n");
        assert!(notes.contains("Only 1 of 2 kills"), "{notes}");
        assert!(
            notes.contains("4 KiB random read, QD1, interrupts on ublk: no result"),
            "{notes}"
        );
    }
}
