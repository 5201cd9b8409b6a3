//! The FTDI serial driver process: an FT232 bridged to the pseudo-terminal ring3d
//! keeps for it.
//!
//! ring3d creates the terminal (and its `/run/ring3/ttyUSB-<serial>` link) once and
//! hands its master side to each driver process, so applications keep the terminal
//! open while a driver restarts. The bridge copies bytes both ways and applies the line
//! settings applications make on the terminal (`stty`, `tcsetattr`) to the adapter.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ring3_ftdi::{serial, Ft232};

use super::ipc_failed;
use crate::control::IoCounters;
use crate::ipc::{Channel, Setup, ToDriver, ToHost};

/// The FT232's one interface.
const INTERFACE: u8 = 0;

pub(super) fn run(channel: &Channel, setup: &Setup, fds: Vec<OwnedFd>) -> Result<(), String> {
    let device = super::sandboxed_usb_device(setup, fds)?;
    // ring3d has detached any kernel driver it was allowed to; never force here.
    let claimed = device
        .claim(INTERFACE, false)
        .map_err(|e| format!("claiming interface {INTERFACE}: {e}"))?;
    let endpoints = claimed
        .bulk_endpoints()
        .map_err(|e| format!("interface {INTERFACE}: {e}"))?;
    let port = Ft232::new(claimed, endpoints).map_err(|e| format!("bringing the FT232 up: {e}"))?;
    // The line settings come from the terminal: the bridge applies them as it starts.
    tracing::info!("serial port up");
    channel
        .send(
            &ToHost::SerialHello {
                pid: std::process::id(),
            },
            &[],
        )
        .map_err(|e| ipc_failed("telling ring3d the port is up", e))?;

    let (message, mut fds) = channel
        .recv::<ToDriver>(Some(super::HOST_TIMEOUT))
        .map_err(|e| ipc_failed("waiting for the terminal to serve", e))?;
    let ToDriver::ServePty { path } = message else {
        return Err("ring3d sent something other than the terminal to serve".into());
    };
    let (Some(master), true) = (fds.pop(), fds.is_empty()) else {
        return Err("ring3d sent the terminal without exactly one file".into());
    };

    let stop = Arc::new(AtomicBool::new(false));
    let port = Arc::new(port);
    let bridge = {
        let stop = Arc::clone(&stop);
        let port = Arc::clone(&port);
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("serial-bridge".into())
            .spawn(move || {
                let _entered = span.enter();
                serial::run_bridge(&port, master.as_fd(), &stop).map_err(|e| e.to_string())
            })
            .map_err(|e| format!("starting the bridge: {e}"))?
    };
    channel
        .send(&ToHost::Ready { id: 0 }, &[])
        .map_err(|e| ipc_failed("telling ring3d the bridge is ready", e))?;
    tracing::info!(%path, "bridging");

    let period = Duration::from_millis(setup.heartbeat_ms.max(1));
    while !bridge.is_finished() {
        std::thread::sleep(period);
        let stats = port.stats();
        let io = IoCounters {
            reads: stats.read_transfers,
            writes: stats.write_transfers,
            read_bytes: stats.bytes_read,
            written_bytes: stats.bytes_written,
            errors: stats.line_errors(),
            ..IoCounters::default()
        };
        let beat = ToHost::Heartbeat {
            io,
            net: Vec::new(),
        };
        if let Err(e) = channel.send(&beat, &[]) {
            stop.store(true, Ordering::Release);
            return Err(ipc_failed("sending a heartbeat", e));
        }
    }
    match bridge.join() {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(reason)) => Err(format!("the bridge stopped: {reason}")),
        Err(_) => Err("the bridge panicked".into()),
    }
}
