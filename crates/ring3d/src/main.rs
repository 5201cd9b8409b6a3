//! `ring3d`: the ring3 driver host. For now it only checks its config file:
//! `ring3d --config FILE --check`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ring3::pci::Sysfs;
use ring3d::config::DEFAULT_CONFIG_PATH;
use ring3d::Config;

/// The ring3 driver host: binds the devices named in its config file to vfio-pci, runs
/// each driver in its own unprivileged process, restarts it if it dies, and exposes it as
/// a standard device (ublk block device, network interface).
///
/// Only the config check is implemented so far: run with --check.
#[derive(Parser, Debug)]
#[command(name = "ring3d", version, after_help = EXIT_STATUS)]
struct Args {
    /// The config file (TOML): which devices to drive, with which driver, exposed how.
    /// See ring3d.example.toml in the ring3d crate for every key.
    #[arg(long, short = 'c', value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,

    /// Check the config file and print the device plan (each device's PCI address,
    /// driver and exposure), or every problem found, then exit. Only reads: nothing is
    /// bound, unbound or started.
    #[arg(long)]
    check: bool,

    /// With --check: check the file alone, without looking for its devices on this
    /// machine (for checking a config meant for another machine).
    #[arg(long, requires = "check")]
    no_resolve: bool,

    /// Where sysfs is, to find the PCI devices (a copy of another machine's tree works too).
    #[arg(long, value_name = "DIR", default_value = "/sys")]
    sysfs: PathBuf,
}

const EXIT_STATUS: &str = "Exit status: 0 the config is valid, 1 it is not (every problem is \
                           listed), 2 a usage error or the daemon was asked to run (not \
                           implemented yet).";

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.check {
        eprintln!(
            "ring3d: the daemon is not implemented yet; this version only checks a config \
             file: ring3d --config {} --check",
            args.config.display()
        );
        return ExitCode::from(2);
    }
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(errors) => return fail(&errors),
    };
    if args.no_resolve {
        println!(
            "{}: valid ({} device{}; not looked up on this machine)",
            args.config.display(),
            config.devices.len(),
            plural(config.devices.len())
        );
        for device in &config.devices {
            println!(
                "{}: {} -> {} exposed as {}",
                device.name, device.selector, device.driver, device.expose
            );
        }
        return ExitCode::SUCCESS;
    }
    match config.resolve(&Sysfs::at(&args.sysfs)) {
        Ok(plan) => {
            println!(
                "{}: valid; {} device{}:",
                args.config.display(),
                plan.devices.len(),
                plural(plan.devices.len())
            );
            println!("{plan}");
            ExitCode::SUCCESS
        }
        Err(errors) => fail(&errors),
    }
}

fn fail(errors: &ring3d::ConfigErrors) -> ExitCode {
    eprintln!("{errors}");
    eprintln!(
        "ring3d: {} problem{} in the config; nothing was changed",
        errors.len(),
        plural(errors.len())
    );
    ExitCode::from(1)
}

fn plural(count: usize) -> &'static str {
    if count == 1 {
        ""
    } else {
        "s"
    }
}
