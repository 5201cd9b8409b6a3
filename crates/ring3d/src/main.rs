//! `ring3d`: the ring3 driver host (see the crate's documentation).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ring3::pci::Sysfs;
use ring3d::config::DEFAULT_CONFIG_PATH;
use ring3d::Config;

/// The ring3 driver host: binds the devices named in its config file to vfio-pci, runs
/// each driver in its own unprivileged process, restarts it if it dies, and exposes it as
/// a standard device (a ublk block device per NVMe namespace).
///
/// Runs in the foreground until SIGTERM or SIGINT, which stop every driver and give the
/// devices back to their kernel drivers. `ring3 status`, `ring3 restart DEV` and
/// `ring3 stop DEV` talk to it through its control socket. Needs root.
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

    #[command(subcommand)]
    internal: Option<Internal>,
}

/// What ring3d runs itself; not for people.
#[derive(Subcommand, Debug)]
enum Internal {
    /// A driver process (started by ring3d with its channel on fd 3).
    #[command(hide = true)]
    Driver,
    /// Enter a driver's sandbox as USER and print what it allows, as JSON.
    #[command(hide = true)]
    SandboxCheck {
        /// The user to become.
        #[arg(long)]
        user: String,
    },
}

const EXIT_STATUS: &str = "Exit status: 0 the config is valid (--check) or the daemon stopped \
                           cleanly, 1 the config is invalid (every problem is listed) or the \
                           daemon could not start, 2 a usage error.";

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    match args.internal {
        Some(Internal::Driver) => return ring3d::driver::main(),
        Some(Internal::SandboxCheck { user }) => return ring3d::sandbox::sandbox_check_main(&user),
        None => {}
    }
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(errors) => return fail(&errors),
    };
    if args.check && args.no_resolve {
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
    let sysfs = Sysfs::at(&args.sysfs);
    let plan = match config.resolve(&sysfs) {
        Ok(plan) => plan,
        Err(errors) => return fail(&errors),
    };
    if args.check {
        println!(
            "{}: valid; {} device{}:",
            args.config.display(),
            plan.devices.len(),
            plural(plan.devices.len())
        );
        println!("{plan}");
        return ExitCode::SUCCESS;
    }
    match ring3d::daemon::run(config, plan, sysfs) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            tracing::error!("{reason}");
            eprintln!("ring3d: {reason}");
            ExitCode::from(1)
        }
    }
}

/// Logs to stderr; RUST_LOG overrides the level (info by default).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
