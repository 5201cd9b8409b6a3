//! What each result block the guest sent comes to: a [`Measurement`] checked for
//! errors and empty runs, or the reason there is none.

use anyhow::{bail, Result};

use super::capture::Block;
use super::report::Outcome;
use super::results::{self, Direction};
use super::workload::Workload;

/// `key=value` lines of the guest's `info` blocks.
pub fn guest_info(blocks: &[Block]) -> Vec<(String, String)> {
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

/// The last block from `source` about `id` (a rerun replaces an earlier one).
pub fn find_block<'a>(blocks: &'a [Block], source: &str, id: &str) -> Option<&'a Block> {
    blocks
        .iter()
        .rev()
        .find(|b| b.source == source && b.id == id)
}

/// What fio's run of `workload` on `source` came to.
pub fn fio_result(blocks: &[Block], source: &str, workload: &Workload) -> Outcome {
    match find_block(blocks, source, &workload.id()) {
        Some(block) => or_failed(fio_outcome(block, workload)),
        None => missing(),
    }
}

/// What the fill pass (the block `fill fill`) came to.
pub fn fill_result(blocks: &[Block]) -> Outcome {
    match find_block(blocks, "fill", "fill") {
        Some(block) => fill_outcome(block),
        None => Outcome::Failed {
            reason: "the fill pass did not report".into(),
        },
    }
}

/// `ring3 status --json` as the guest sent it (the block `status ring3d`).
pub fn ring3d_status(blocks: &[Block]) -> Option<serde_json::Value> {
    find_block(blocks, "status", "ring3d")
        .and_then(|block| serde_json::from_str(block.text.trim()).ok())
}

/// A failure for a block the guest never sent.
pub fn missing() -> Outcome {
    Outcome::Failed {
        reason: "no result: the guest did not get to it (see the output above)".into(),
    }
}

/// Turns a parse into an outcome, the error becoming the reason.
pub fn or_failed(parsed: Result<Outcome>) -> Outcome {
    parsed.unwrap_or_else(|err| Outcome::Failed {
        reason: format!("{err:#}"),
    })
}

pub fn check_block(block: &Block, tool: &str) -> Result<()> {
    if !block.complete {
        bail!("{tool}'s output was cut short");
    }
    if block.status != 0 {
        bail!("{tool} exited with status {}", block.status);
    }
    Ok(())
}

/// The fill pass: fio's sequential writes.
pub fn fill_outcome(block: &Block) -> Outcome {
    or_failed(check_block(block, "fio").and_then(|()| {
        let output = results::parse_fio_output(&block.text)?;
        let job = results::fio_job(&output)?;
        let measurement = results::fio_measurement(job, Direction::Write)?;
        Ok(Outcome::Measured {
            measurement,
            raw: output,
        })
    }))
}

/// The fill pass's line on the terminal.
pub fn fill_line(block: &Block) -> String {
    match fill_outcome(block) {
        Outcome::Measured { measurement, .. } => format!(
            "filled at {:.0} MiB/s",
            measurement.bandwidth_bytes_per_s / f64::from(1u32 << 20)
        ),
        other => describe_failure(&other),
    }
}

/// A workload measured with fio, on whichever block device.
pub fn fio_outcome(block: &Block, workload: &Workload) -> Result<Outcome> {
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

/// A workload measured with `ring3 bench nvme`, which must have run what was asked.
pub fn ring3_outcome(block: &Block, workload: &Workload) -> Result<Outcome> {
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

pub fn describe_failure(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Measured { .. } => "measured".into(),
        Outcome::Failed { reason } => format!("FAILED: {reason}"),
        Outcome::Skipped { reason } => format!("skipped: {reason}"),
    }
}

/// The notes for one driver's outcomes: each failure, and the latencies that fail the
/// Little's-law check (one note for all of them). Returns the notes and how many
/// latencies failed.
pub fn driver_notes<'a>(
    driver: &str,
    outcomes: impl IntoIterator<Item = (Workload, &'a Outcome)>,
) -> (Vec<String>, usize) {
    let mut notes = Vec::new();
    let mut problems = Vec::new();
    let mut count = 0;
    for (workload, outcome) in outcomes {
        count += 1;
        match outcome {
            Outcome::Failed { reason } => notes.push(format!("{workload} on {driver}: {reason}")),
            Outcome::Measured { measurement, .. } => {
                if let Some(problem) =
                    results::implausible_latency(workload.queue_depth, measurement)
                {
                    problems.push(format!("{workload}: {problem}"));
                }
            }
            Outcome::Skipped { .. } => {}
        }
    }
    match problems.as_slice() {
        [] => {}
        [only] => notes.push(format!("{driver}'s latency is implausible for {only}")),
        [first, ..] => notes.push(format!(
            "{driver}'s latencies are implausible in {} of {count} workloads (mean latency × \
             IOPS should be about the queue depth); for example {first}",
            problems.len(),
        )),
    }
    (notes, problems.len())
}

/// Writes the progress line of a workload's result block (see [`progress_line`]), its
/// outcome from `outcome`; or, for a workload not in `workloads`, says so.
pub fn write_progress(
    out: &mut dyn std::io::Write,
    block: &Block,
    workloads: &[Workload],
    outcome: impl FnOnce(&Workload) -> Outcome,
) {
    let line = match workloads.iter().find(|w| w.id() == block.id) {
        Some(workload) => progress_line(&block.source, workload, &outcome(workload)),
        None => format!("(a result for an unknown workload {})", block.id),
    };
    let _ = writeln!(out, "    {line}");
}

/// One line on the terminal for a measured workload (or why it was not).
pub fn progress_line(label: &str, workload: &Workload, outcome: &Outcome) -> String {
    match outcome {
        Outcome::Measured { measurement: m, .. } => {
            let mut line = format!(
                "{label}: {:.0} IOPS, {:.1} MiB/s, latency p50 {:.1} µs, p99 {:.1} µs",
                m.iops,
                m.bandwidth_bytes_per_s / f64::from(1u32 << 20),
                m.latency_us.p50,
                m.latency_us.p99
            );
            if let Some(problem) = results::implausible_latency(workload.queue_depth, m) {
                line.push_str(&format!("\n    warning: implausible latency: {problem}"));
            }
            line
        }
        other => format!("{label}: {}", describe_failure(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::results::samples::FIO_RANDREAD;
    use super::super::workload::{Completion, Pattern};
    use super::*;

    #[test]
    fn guest_info_lines() {
        let blocks = [Block::finished(
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
    fn driver_notes_list_failures_and_one_latency_note() {
        let workload = Workload {
            pattern: Pattern::RandRead,
            block_size: 4096,
            queue_depth: 32,
            completion: Completion::Interrupt,
        };
        let output = results::parse_fio_output(FIO_RANDREAD).expect("parses");
        let job = results::fio_job(&output).expect("a job");
        let mut measurement = results::fio_measurement(job, Direction::Read).expect("valid");
        measurement.latency_us.mean = 0.002;
        let bad = Outcome::Measured {
            measurement,
            raw: output,
        };
        let failed = Outcome::Failed {
            reason: "exit status 1".into(),
        };
        let (notes, implausible) = driver_notes(
            "ublk",
            [(workload, &bad), (workload, &bad), (workload, &failed)],
        );
        assert_eq!(implausible, 2);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("on ublk: exit status 1"), "{notes:?}");
        assert!(notes[1].contains("in 2 of 3 workloads"), "{notes:?}");
    }
}
