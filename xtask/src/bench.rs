//! `cargo xtask bench ...`: benchmarks in the lab, each comparing a ring3 driver with its
//! kernel peer on the same emulated device in one VM.
//!
//! Numbers from the lab come from QEMU under TCG, so only ratios measured in one run mean
//! anything; every report says so.

mod capture;
mod host;
mod hostload;
pub mod net;
pub mod nvme;
mod outcome;
mod plot;
mod report;
mod results;
mod script;
pub mod ublk;
pub mod usb;
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
    /// ring3's NVMe driver run by ring3d and exposed as a ublk block device, against the
    /// kernel's `nvme` driver (fio with io_uring on both) and against ring3's own API (the
    /// cost of the ublk hop), and how fast the device comes back after its driver process
    /// is killed; one lab VM; writes ublk.md and ublk.json to bench/results.
    Ublk(ublk::UblkArgs),
    /// Packets per second between two emulated NICs through ring3's network driver,
    /// DPDK's testpmd and the kernel's driver with pktgen, at 64 and 1500 bytes, in one
    /// lab VM; writes net.md, net.json and net-pps.svg to bench/results.
    Net(net::NetArgs),
    /// ring3's USB mass storage driver run by ring3d and exposed as a ublk block device,
    /// against the kernel's `usb-storage` driver (fio with io_uring on both), on the lab's
    /// emulated USB stick in one lab VM; writes usb.md and usb.json to bench/results.
    Usb(usb::UsbArgs),
}

impl BenchCommand {
    /// Runs the benchmark and returns the exit status for the process.
    pub fn run(self) -> Result<i32> {
        match self {
            BenchCommand::Nvme(args) => nvme::run(args),
            BenchCommand::Ublk(args) => ublk::run(args),
            BenchCommand::Net(args) => net::run(args),
            BenchCommand::Usb(args) => usb::run(args),
        }
    }
}

/// A bench's options parsed from `line`, as after `cargo xtask bench NAME`.
#[cfg(test)]
fn parse_args<A: clap::Args + clap::FromArgMatches>(line: &[&str]) -> Result<A, clap::Error> {
    let command = A::augment_args(clap::Command::new("bench"));
    let matches = command.try_get_matches_from(std::iter::once(&"bench").chain(line))?;
    A::from_arg_matches(&matches)
}
