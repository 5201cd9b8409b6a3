//! `cargo xtask bench ...`: benchmarks in the lab, each comparing a ring3 driver with its
//! kernel peer on the same emulated device in one VM.
//!
//! Numbers from the lab come from QEMU under TCG, so only ratios measured in one run mean
//! anything; every report says so.

mod capture;
mod hostload;
pub mod nvme;
mod plot;
mod report;
mod results;
mod script;
mod workload;

use anyhow::Result;
use clap::Subcommand;

/// `cargo xtask bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// ring3's NVMe driver against the kernel's `nvme` driver (fio with io_uring) on one
    /// emulated controller in one lab VM; writes nvme.md, nvme.json and
    /// nvme-iops-vs-qd.svg to bench/results.
    Nvme(nvme::NvmeArgs),
}

impl BenchCommand {
    /// Runs the benchmark and returns the exit status for the process.
    pub fn run(self) -> Result<i32> {
        match self {
            BenchCommand::Nvme(args) => nvme::run(args),
        }
    }
}
