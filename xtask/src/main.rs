//! `cargo xtask`: developer tasks for the ring3 workspace.
//!
//! Add a subcommand by adding a variant to [`Command`] and an arm to
//! [`Command::run`]; each arm returns the process exit status.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::{bench, lab, tasks};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for the ring3 workspace",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a throwaway QEMU VM (TCG, virtual IOMMU, emulated PCI devices)
    /// and run commands in it, with the host's file system mounted read-only
    /// as the guest's root.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Run every test: format check, clippy, unit tests, then the lab tests inside the VM.
    Test(tasks::TestArgs),
    /// Boot the lab VM and run the edu driver through VFIO, printing each step.
    Demo,
    /// Measure a ring3 driver against its kernel peer in the lab VM and write a report
    /// (QEMU TCG: only the ratios between drivers mean anything).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

impl Command {
    /// Runs the subcommand and returns the exit status for the process.
    fn run(self) -> Result<i32> {
        match self {
            Command::Lab(cmd) => cmd.run(),
            Command::Test(args) => tasks::test(args),
            Command::Demo => tasks::demo(),
            Command::Bench(cmd) => cmd.run(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.run() {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(1)),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(lab::exit_status_for_error(&err))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_and_option_has_help() {
        fn check(command: &clap::Command, path: &str) {
            let path = format!("{path} {}", command.get_name());
            assert!(command.get_about().is_some(), "`{path}` has no help text");
            for argument in command.get_arguments() {
                let id = argument.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(
                    argument.get_help().is_some(),
                    "`{path}` option {id} has no help text"
                );
            }
            for subcommand in command.get_subcommands() {
                if subcommand.get_name() != "help" {
                    check(subcommand, &path);
                }
            }
        }
        check(&Cli::command(), "");
    }
}
