//! The driver process: what `ring3d` runs, one per device, as `ring3d driver`.
//!
//! It receives its device's VFIO files over the channel on fd 3 (see [`crate::ipc`]),
//! enters its sandbox (an unprivileged user, no capabilities, a seccomp filter) before it
//! reads anything the device wrote, brings the device up and serves it until the host
//! stops the exposed devices. Whatever goes wrong, it tells the host why and exits: the
//! host restarts it.

mod net;
mod nvme;

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::Duration;

use ring3::vfio::{VfioBackend, VfioFds};

use crate::ipc::{Channel, IpcError, Setup, ToDriver, ToHost, DRIVER_FD};
use crate::sandbox::Sandbox;

pub use nvme::{memlock_estimate, plan_request, Planned};

/// How long a driver waits for the host's first message and its devices.
const HOST_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the driver process. Only `ring3d` itself starts this, with the channel on fd 3.
pub fn main() -> ExitCode {
    // SAFETY: fd 3 is the channel ring3d set up for this process before exec; nothing
    // else in this process owns it.
    let channel = Channel::from_fd(unsafe { OwnedFd::from_raw_fd(DRIVER_FD) });
    match run(&channel) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            tracing::error!("{reason}");
            // The host may be gone too; the exit status says it anyway.
            let _ = channel.send(&ToHost::Failed { reason }, &[]);
            ExitCode::from(1)
        }
    }
}

fn run(channel: &Channel) -> Result<(), String> {
    let (message, fds) = channel
        .recv::<ToDriver>(Some(HOST_TIMEOUT))
        .map_err(|e| format!("no setup from ring3d: {e}"))?;
    let ToDriver::Setup(setup) = message else {
        return Err("ring3d's first message was not the setup".into());
    };
    let span = tracing::info_span!("driver", pci = %setup.pci, name = %setup.name);
    let _entered = span.enter();
    // For testing supervision: a driver that crashes as it starts, every time.
    if std::env::var("RING3_DRIVER_FAULT").as_deref() == Ok("abort-on-start") {
        tracing::error!("RING3_DRIVER_FAULT=abort-on-start: aborting");
        std::process::abort();
    }
    match setup.driver.as_str() {
        "nvme" => nvme::run(channel, &setup, fds),
        _ => net::run(channel, &setup, fds),
    }
}

/// Takes the three VFIO files of the setup, enters the sandbox (everything after this
/// reads what the device writes, so from here on there are no privileges) and rebuilds
/// the device from the files.
fn sandboxed_device(setup: &Setup, fds: Vec<OwnedFd>) -> Result<VfioBackend, String> {
    let mut fds = fds.into_iter();
    let (Some(container), Some(group), Some(device), None) =
        (fds.next(), fds.next(), fds.next(), fds.next())
    else {
        return Err("the setup did not carry exactly the three VFIO files".into());
    };
    Sandbox {
        uid: setup.uid,
        gid: setup.gid,
        memlock_bytes: setup.memlock_bytes,
    }
    .enter()
    .map_err(|e| format!("could not enter the sandbox: {e}"))?;
    tracing::info!(uid = setup.uid, driver = %setup.driver, "sandboxed; taking the device over");
    VfioBackend::from_fds(
        VfioFds {
            container,
            group,
            device,
            group_number: setup.group,
        },
        &setup.pci,
    )
    .map_err(|e| format!("taking over the VFIO device: {e}"))
}

/// A message the driver could not exchange with the host.
pub(crate) fn ipc_failed(what: &str, error: IpcError) -> String {
    format!("{what}: {error}")
}
