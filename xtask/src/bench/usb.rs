//! `cargo xtask bench usb`: ring3's USB mass storage driver, run by ring3d and exposed
//! through ublk, against the kernel's `usb-storage` driver, in one lab VM on one emulated
//! USB stick (the lab's `R3RAW` device, see [`crate::lab::usb`]).
//!
//! The host builds `ring3` and `ring3d` in release mode (not with `--kernel-only`), boots
//! the lab with its USB devices, `xhci_pci` and `ublk_drv`, and runs the guest script of
//! [`script`]. The results come back on the console as in the other benches; [`report`]
//! writes usb.md and usb.json.

mod report;
mod script;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use self::report::{UsbReport, UsbSettings};
use self::script::Plan;
use super::capture::Block;
use super::host::{self, GuestArgs};
use super::outcome::{self, guest_info};
use super::report::{Outcome, Row};
use super::workload::{Completion, Pattern, Workload, SMALL_BLOCK};
use crate::lab::{self, usb, LabDevice, LabOptions};
use crate::tasks;

/// The files the bench writes into its output directory.
pub const REPORT_FILE: &str = "usb.md";
pub const JSON_FILE: &str = "usb.json";

/// Options of `cargo xtask bench usb`.
#[derive(Debug, Clone, clap::Args)]
pub struct UsbArgs {
    /// Seconds each workload runs, on each driver [default: 10, or 3 with --quick].
    #[arg(long, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: Option<u64>,

    /// A shorter run to try the bench out: 3 s per workload.
    #[arg(long)]
    pub quick: bool,

    /// Measure only the kernel's usb-storage driver (no ring3 build, no ring3d).
    #[arg(long)]
    pub kernel_only: bool,

    /// Directory for usb.md and usb.json [default: bench/results in the workspace].
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,

    #[command(flatten)]
    pub vm: GuestArgs,
}

/// The bench's settings, resolved from the arguments.
#[derive(Debug, Clone, PartialEq)]
struct Config {
    duration_s: u64,
    region_bytes: u64,
    workloads: Vec<Workload>,
    kernel_only: bool,
    output: PathBuf,
    /// How long the VM is expected to run.
    expected: Duration,
    timeout: Duration,
}

/// 128 KiB sequential reads and writes and 4 KiB random reads and writes, each at QD1
/// and QD8, with interrupts (neither driver polls).
fn usb_workloads() -> Vec<Workload> {
    let mut list = Vec::new();
    for (pattern, block_size) in [
        (Pattern::SeqRead, 128 * 1024),
        (Pattern::SeqWrite, 128 * 1024),
        (Pattern::RandRead, SMALL_BLOCK),
        (Pattern::RandWrite, SMALL_BLOCK),
    ] {
        for queue_depth in [1, 8] {
            list.push(Workload {
                pattern,
                block_size,
                queue_depth,
                completion: Completion::Interrupt,
            });
        }
    }
    list
}

impl Config {
    fn from_args(args: &UsbArgs) -> Config {
        let duration_s = args.duration.unwrap_or(if args.quick { 3 } else { 10 });
        let workloads = usb_workloads();
        let output = host::output_dir(args.output.as_deref());
        let region_bytes = usb::RAW_IMAGE_BYTES;
        // Boot, the fill at a few MiB/s, each run its duration plus fio's start-up and
        // its report under TCG (about 15 s on a busy host), and ring3d's start and stop.
        let drivers = if args.kernel_only { 1 } else { 2 };
        let expected =
            30 + region_bytes / (2 << 20) + drivers * workloads.len() as u64 * (duration_s + 15);
        let expected = expected + if args.kernel_only { 0 } else { 40 };
        let timeout = Duration::from_secs(args.vm.timeout.unwrap_or(2 * expected + 300));
        Config {
            duration_s,
            region_bytes,
            workloads,
            kernel_only: args.kernel_only,
            output,
            expected: Duration::from_secs(expected),
            timeout,
        }
    }
}

fn lab_options(args: &UsbArgs, timeout: Duration) -> LabOptions {
    LabOptions {
        devices: vec![LabDevice::Usb],
        load_vfio: false,
        extra_modules: vec!["xhci_pci".into(), "ublk_drv".into()],
        ..args.vm.lab_options(timeout)
    }
}

/// Runs the bench and returns the exit status: 0 when every part was measured, 1 when
/// something is missing.
pub fn run(args: UsbArgs) -> Result<i32> {
    let config = Config::from_args(&args);
    host::create_output_dir(&config.output)?;

    tasks::step("checking the host (QEMU, the guest kernel, fio)");
    host::check_fio()?;
    lab::prepare()?;
    let binaries = if config.kernel_only {
        None
    } else {
        let release = host::build_release(&["ring3d", "ring3-cli"], "the bench runs both")?;
        let (ring3, ring3d) = (release.join("ring3"), release.join("ring3d"));
        host::check_commands(
            "usb",
            &[(&ring3, &["status", "--help"]), (&ring3d, &["--help"])],
        )?;
        Some((host::guest_binary(&ring3)?, host::guest_binary(&ring3d)?))
    };

    let plan = Plan {
        workloads: &config.workloads,
        duration_s: config.duration_s,
        region_bytes: config.region_bytes,
        ring3: binaries.as_ref().map(|(a, b)| (a.as_str(), b.as_str())),
    };
    let options = lab_options(&args, config.timeout);
    tasks::step(&format!(
        "measuring {} workloads of {} s each on the kernel's usb-storage{} (one VM, about {} \
         min)",
        config.workloads.len(),
        config.duration_s,
        if config.kernel_only {
            ""
        } else {
            " and through ring3d and ublk"
        },
        config.expected.as_secs().div_ceil(60)
    ));
    let known = config.workloads.clone();
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
    host::print_notes_and_files(&report.notes, &config.output, &[REPORT_FILE, JSON_FILE]);

    let status = run.status?;
    let complete = report.rows.iter().all(|row| {
        row.kernel.measurement().is_some()
            && (config.kernel_only || row.ring3.measurement().is_some())
    });
    Ok(host::exit_status(status, complete))
}

fn build_report(
    config: &Config,
    args: &UsbArgs,
    blocks: &[Block],
    lab_result: &Result<i32>,
    environment: super::report::Environment,
) -> UsbReport {
    let rows: Vec<Row> = config
        .workloads
        .iter()
        .map(|&workload| Row {
            workload,
            kernel: outcome::fio_result(blocks, "kernel", &workload),
            ring3: if config.kernel_only {
                Outcome::Skipped {
                    reason: "--kernel-only".into(),
                }
            } else {
                outcome::fio_result(blocks, "ublk", &workload)
            },
        })
        .collect();
    let mut notes = Vec::new();
    notes.extend(script::exit_note(lab_result));
    notes.extend(host::busy_host_note(environment.host_load));
    let (kernel_notes, _) = outcome::driver_notes(
        "the kernel's usb-storage",
        rows.iter().map(|row| (row.workload, &row.kernel)),
    );
    notes.extend(kernel_notes);
    if !config.kernel_only {
        let (ring3_notes, _) = outcome::driver_notes(
            "ring3 (ublk)",
            rows.iter().map(|row| (row.workload, &row.ring3)),
        );
        notes.extend(ring3_notes);
    }
    UsbReport {
        environment,
        settings: UsbSettings {
            duration_s: config.duration_s,
            region_bytes: config.region_bytes,
            guest_cpus: args.vm.cpus,
            guest_memory_mib: args.vm.memory,
            kernel_only: config.kernel_only,
        },
        fill: outcome::fill_result(blocks),
        rows,
        status: outcome::ring3d_status(blocks),
        notes,
    }
}

fn write_report(report: &UsbReport, dir: &Path) -> Result<()> {
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
        "info" | "status" => return,
        "fill" => outcome::fill_line(block),
        _ => {
            return outcome::write_progress(out, block, workloads, |workload| {
                outcome::or_failed(outcome::fio_outcome(block, workload))
            })
        }
    };
    let _ = writeln!(out, "    {line}");
}

#[cfg(test)]
mod tests {
    use super::super::parse_args;
    use super::super::results::samples::FIO_RANDREAD;
    use super::*;

    fn args(line: &[&str]) -> UsbArgs {
        parse_args(line).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_workloads() {
        let ids: Vec<String> = usb_workloads().iter().map(Workload::id).collect();
        assert_eq!(
            ids,
            [
                "read-128k-qd1-interrupt",
                "read-128k-qd8-interrupt",
                "write-128k-qd1-interrupt",
                "write-128k-qd8-interrupt",
                "randread-4k-qd1-interrupt",
                "randread-4k-qd8-interrupt",
                "randwrite-4k-qd1-interrupt",
                "randwrite-4k-qd8-interrupt",
            ]
        );
    }

    #[test]
    fn defaults_quick_and_options() {
        let config = Config::from_args(&args(&[]));
        assert_eq!(config.duration_s, 10);
        assert_eq!(config.region_bytes, 64 << 20);
        assert!(!config.kernel_only);
        assert!(config.output.ends_with("bench/results"));
        let quick = Config::from_args(&args(&["--quick", "--kernel-only"]));
        assert_eq!(quick.duration_s, 3);
        assert!(quick.kernel_only);
        assert!(quick.timeout < config.timeout);
        let explicit = Config::from_args(&args(&[
            "--duration",
            "2",
            "--output",
            "out",
            "--timeout",
            "99",
        ]));
        assert_eq!(explicit.duration_s, 2);
        assert_eq!(explicit.output, PathBuf::from("out"));
        assert_eq!(explicit.timeout, Duration::from_secs(99));
        assert!(parse_args::<UsbArgs>(&["--duration", "0"]).is_err());
        let options = lab_options(&args(&[]), Duration::from_secs(5));
        assert_eq!(options.devices, [LabDevice::Usb]);
        assert!(!options.load_vfio);
        assert!(options.extra_modules.iter().any(|m| m == "xhci_pci"));
        assert!(options.extra_modules.iter().any(|m| m == "ublk_drv"));
    }

    #[test]
    fn report_from_blocks() {
        let config = Config::from_args(&args(&["--quick"]));
        let randread = config.workloads[4];
        let blocks = [
            Block::finished("kernel", &randread.id(), 0, FIO_RANDREAD),
            Block::finished("ublk", &randread.id(), 0, FIO_RANDREAD),
        ];
        let report = build_report(
            &config,
            &args(&["--quick"]),
            &blocks,
            &Ok(script::EXIT_DAEMON_FAILED),
            Default::default(),
        );
        assert_eq!(report.rows[4].ratio(), Some(1.0));
        assert!(report.rows[0].kernel.measurement().is_none());
        let notes = report.notes.join("\n");
        assert!(
            notes.contains("exit status 6: ring3d did not bring the device up"),
            "{notes}"
        );
        assert!(
            notes.contains("128 KiB sequential read, QD1, interrupts on ring3 (ublk): no result"),
            "{notes}"
        );

        let kernel_only = Config::from_args(&args(&["--kernel-only"]));
        let report = build_report(
            &kernel_only,
            &args(&["--kernel-only"]),
            &blocks,
            &Ok(0),
            Default::default(),
        );
        assert!(matches!(report.rows[4].ring3, Outcome::Skipped { .. }));
        assert!(!report.notes.join("\n").contains("ring3 (ublk)"));
    }
}
