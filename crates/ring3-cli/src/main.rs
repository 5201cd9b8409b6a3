//! `ring3`: list PCI devices, hand them to vfio-pci and back, and run ring3 drivers.
//!
//! Logging goes to standard error and is chosen with `RUST_LOG` (default: warnings),
//! for example `RUST_LOG=ring3=debug ring3 bind 0000:00:03.0`.

mod bench;
mod bench_net;
mod daemon;
mod edu;
mod hexdump;
mod mount_fat;
mod net;
mod nvme;
mod pci;
mod size;
mod usb;
mod usb_serial;
mod usb_storage;

use std::error::Error as StdError;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// User-mode device drivers over Linux VFIO.
#[derive(Parser, Debug)]
#[command(name = "ring3", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Every `ring3` subcommand. A driver crate adds its own as a variant whose arguments
/// and `run` function live in a module of this crate named after it.
#[derive(Subcommand, Debug)]
enum Command {
    /// List the PCI devices with their drivers and IOMMU groups.
    List(pci::ListArgs),
    /// Bind a PCI device to vfio-pci, so that ring3 drivers can use it (needs root).
    Bind(pci::BindArgs),
    /// Give a device on vfio-pci back to the kernel driver it had before (needs root).
    Unbind(pci::UnbindArgs),
    /// Drive QEMU's edu test device.
    Edu(edu::EduArgs),
    /// Serve the FAT file system on a device (a USB stick) or image through FUSE, until unmounted.
    MountFat(mount_fat::MountFatArgs),
    /// Drive an NVMe controller: identify, read, write, trim, SMART log.
    Nvme(nvme::NvmeArgs),
    /// Drive a network card: show it, bridge it to a TAP interface, show its counters.
    Net(net::NetArgs),
    /// Measure a device through a ring3 driver (IOPS, bandwidth, latency, CPU).
    Bench(bench::BenchArgs),
    /// USB devices through usbfs: list them, claim an interface from the kernel.
    #[command(subcommand)]
    Usb(usb::UsbArgs),
    /// Show the devices the ring3d daemon drives: state, process, restarts, I/O counts.
    Status(daemon::StatusArgs),
    /// Ask the ring3d daemon to restart a device's driver (also one it gave up on).
    Restart(daemon::DeviceArgs),
    /// Ask the ring3d daemon to stop a device's driver and leave it stopped.
    Stop(daemon::DeviceArgs),
}

/// An error from any subcommand; printed with its chain of causes.
type CommandError = Box<dyn StdError>;

fn run(command: Command) -> Result<(), CommandError> {
    match command {
        Command::List(args) => pci::list(args)?,
        Command::Bind(args) => pci::bind(args)?,
        Command::Unbind(args) => pci::unbind(args)?,
        Command::Edu(args) => edu::run(args)?,
        Command::MountFat(args) => mount_fat::run(args)?,
        Command::Nvme(args) => nvme::run(args)?,
        Command::Net(args) => net::run(args)?,
        Command::Bench(args) => bench::run(args)?,
        Command::Usb(args) => usb::run(args)?,
        Command::Status(args) => daemon::status(args)?,
        Command::Restart(args) => daemon::restart(args)?,
        Command::Stop(args) => daemon::stop(args)?,
    }
    Ok(())
}

/// `error: <message>`, then each underlying cause on its own line.
fn render_error(error: &dyn StdError) -> String {
    let mut text = format!("error: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    text
}

fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{}", render_error(error.as_ref()));
            ExitCode::FAILURE
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
    fn every_command_and_flag_has_help() {
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
                    "`{path}` argument {id} has no help text"
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

    #[test]
    fn bind_parses_address_and_force() {
        let cli = Cli::try_parse_from(["ring3", "bind", "00:03.0", "--force"]).expect("valid");
        match cli.command {
            Command::Bind(args) => {
                assert_eq!(args.address.to_string(), "0000:00:03.0");
                assert!(args.force);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn an_invalid_address_is_a_usage_error() {
        let error = Cli::try_parse_from(["ring3", "unbind", "00:20.0"]).expect_err("invalid");
        assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation);
        assert_eq!(error.exit_code(), 2);
        assert!(error.to_string().contains("DDDD:BB:DD.F"), "{error}");
    }

    #[test]
    fn errors_are_printed_with_their_causes() {
        let error = ring3::Error::io(
            "writing to /sys/bus/pci/drivers_probe",
            std::io::Error::from_raw_os_error(19),
        );
        let text = render_error(&error);
        assert!(
            text.starts_with("error: writing to /sys/bus/pci/drivers_probe\n  caused by: "),
            "{text}"
        );
        assert_eq!(text.lines().count(), 2, "{text}");
    }
}
