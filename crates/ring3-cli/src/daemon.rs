//! `ring3 status`, `ring3 restart DEV`, `ring3 stop DEV`: ask the ring3d daemon, over its
//! control socket, what its devices are doing, or to restart or stop one.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use ring3d::config::DaemonConfig;
use ring3d::control::{self, DeviceStatus, Request, Response};

/// How long `status` waits for the daemon.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `restart` and `stop` wait: the daemon answers once the driver is down (and,
/// for a restart, up again), which includes resetting the controller.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the daemon listens.
#[derive(Args, Debug)]
pub struct SocketArg {
    /// The daemon's control socket (`socket` in the [daemon] section of ring3d's config).
    #[arg(long, value_name = "PATH", default_value = DaemonConfig::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// Arguments of `ring3 status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print the devices as JSON (an array of objects, one per device) instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

/// Arguments of `ring3 restart` and `ring3 stop`.
#[derive(Args, Debug)]
pub struct DeviceArgs {
    /// The device's name in ring3d's config, as `ring3 status` lists it.
    #[arg(value_name = "DEV")]
    pub device: String,
    #[command(flatten)]
    pub socket: SocketArg,
}

/// The daemon understood the request and refused it, or answered something unexpected.
#[derive(Debug)]
pub struct DaemonError(String);

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ring3d: {}", self.0)
    }
}

impl std::error::Error for DaemonError {}

fn ask(
    socket: &SocketArg,
    request: &Request,
    timeout: Duration,
) -> Result<Response, crate::CommandError> {
    match control::request(&socket.socket, request, timeout)? {
        Response::Error { message } => Err(DaemonError(message).into()),
        response => Ok(response),
    }
}

/// `ring3 status`.
pub fn status(args: StatusArgs) -> Result<(), crate::CommandError> {
    let devices = match ask(&args.socket, &Request::Status, STATUS_TIMEOUT)? {
        Response::Status { devices } => devices,
        other => {
            return Err(DaemonError(format!("answered a status request with {other:?}")).into())
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&devices)?);
    } else {
        print!("{}", render_table(&devices));
    }
    Ok(())
}

/// `ring3 restart DEV`.
pub fn restart(args: DeviceArgs) -> Result<(), crate::CommandError> {
    change(
        Request::Restart {
            device: args.device,
        },
        &args.socket,
    )
}

/// `ring3 stop DEV`.
pub fn stop(args: DeviceArgs) -> Result<(), crate::CommandError> {
    change(
        Request::Stop {
            device: args.device,
        },
        &args.socket,
    )
}

fn change(request: Request, socket: &SocketArg) -> Result<(), crate::CommandError> {
    match ask(socket, &request, CHANGE_TIMEOUT)? {
        Response::Done { message } => {
            println!("{message}");
            Ok(())
        }
        other => Err(DaemonError(format!("answered {request:?} with {other:?}")).into()),
    }
}

/// States whose reason is shown under the device's row.
const STATES_WITH_REASON: [&str; 2] = ["failed", "restarting"];

/// The devices as a table with a header row, columns padded to their widest cell; a
/// failed (or restarting) device's reason on its own line below it.
pub fn render_table(devices: &[DeviceStatus]) -> String {
    const HEADER: [&str; 10] = [
        "NAME", "PCI", "DRIVER", "STATE", "PID", "RESTARTS", "EXPOSED", "READS", "WRITES", "ERRORS",
    ];
    if devices.is_empty() {
        return "ring3d drives no devices\n".to_string();
    }
    let rows: Vec<[String; 10]> = devices
        .iter()
        .map(|device| {
            [
                device.name.clone(),
                device.pci.clone(),
                device.driver.clone(),
                device.state.clone(),
                device
                    .pid
                    .map_or_else(|| "-".to_string(), |pid| pid.to_string()),
                device.restarts.to_string(),
                if device.exposed.is_empty() {
                    "-".to_string()
                } else {
                    device.exposed.join(",")
                },
                device.io.reads.to_string(),
                device.io.writes.to_string(),
                device.io.errors.to_string(),
            ]
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    // Text columns to the left, numbers to the right.
    let numeric = [
        false, false, false, false, true, true, false, true, true, true,
    ];
    let line = |cells: &[&str]| {
        let mut text = String::new();
        for (column, cell) in cells.iter().enumerate() {
            if column > 0 {
                text.push_str("  ");
            }
            let width = widths[column];
            if numeric[column] {
                text.push_str(&format!("{cell:>width$}"));
            } else {
                text.push_str(&format!("{cell:<width$}"));
            }
        }
        text.truncate(text.trim_end().len());
        text.push('\n');
        text
    };
    let mut table = line(&HEADER);
    for (device, row) in devices.iter().zip(&rows) {
        table.push_str(&line(&row.each_ref().map(String::as_str)));
        if let Some(reason) = device
            .reason
            .as_deref()
            .filter(|_| STATES_WITH_REASON.contains(&device.state.as_str()))
        {
            table.push_str(&format!("  reason: {reason}\n"));
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring3d::control::IoCounters;

    fn device(name: &str, state: &str) -> DeviceStatus {
        DeviceStatus {
            name: name.to_string(),
            pci: "0000:03:00.0".to_string(),
            driver: "nvme".to_string(),
            expose: "ublk".to_string(),
            state: state.to_string(),
            pid: None,
            restarts: 0,
            since_s: 0,
            reason: None,
            exposed: Vec::new(),
            io: IoCounters::default(),
            net: Vec::new(),
        }
    }

    #[test]
    fn the_table_lines_up_and_shows_why_a_device_failed() {
        let running = DeviceStatus {
            pid: Some(4242),
            restarts: 1,
            exposed: vec!["/dev/ublkb0".to_string(), "/dev/ublkb1".to_string()],
            io: IoCounters {
                reads: 123_456,
                writes: 78,
                errors: 0,
                ..IoCounters::default()
            },
            ..device("fast0", "running")
        };
        let failed = DeviceStatus {
            pci: "0000:04:00.0".to_string(),
            restarts: 5,
            reason: Some("controller fatal status (CSTS.CFS) during reset".to_string()),
            io: IoCounters {
                errors: 3,
                ..IoCounters::default()
            },
            ..device("slow1", "failed")
        };
        let stopped = DeviceStatus {
            reason: Some("not shown: the device was stopped on purpose".to_string()),
            ..device("spare", "stopped")
        };
        let table = render_table(&[running, failed, stopped]);
        let expected = "\
NAME   PCI           DRIVER  STATE     PID  RESTARTS  EXPOSED                   READS  WRITES  ERRORS
fast0  0000:03:00.0  nvme    running  4242         1  /dev/ublkb0,/dev/ublkb1  123456      78       0
slow1  0000:04:00.0  nvme    failed      -         5  -                             0       0       3
  reason: controller fatal status (CSTS.CFS) during reset
spare  0000:03:00.0  nvme    stopped     -         0  -                             0       0       0
";
        assert_eq!(table, expected, "\n{table}");
    }

    #[test]
    fn no_devices_is_said_in_words() {
        assert_eq!(render_table(&[]), "ring3d drives no devices\n");
    }
}
