//! The driver process: what `ring3d` runs, one per device, as `ring3d driver`.
//!
//! It receives its device's VFIO files over the channel on fd 3 (see [`crate::ipc`]),
//! enters its sandbox (an unprivileged user, no capabilities, a seccomp filter) before it
//! reads anything the device wrote, brings the device up and serves it until the host
//! stops the exposed devices. Whatever goes wrong, it tells the host why and exits: the
//! host restarts it.

mod ftdi;
mod net;
mod nvme;
mod usb_storage;

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ring3_ublk::Op;

use ring3::vfio::{VfioBackend, VfioFds};

use crate::control::IoCounters;
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
        "usb-storage" => usb_storage::run(channel, &setup, fds),
        "ftdi" => ftdi::run(channel, &setup, fds),
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

/// I/O counters shared by the queue threads and read by the heartbeat.
#[derive(Default)]
pub(super) struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    errors: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> IoCounters {
        IoCounters {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            discards: self.discards.load(Ordering::Relaxed),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            written_bytes: self.written_bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }

    pub(super) fn count(&self, op: Op, bytes: u64, ok: bool) {
        let add = |counter: &AtomicU64, n: u64| {
            counter.fetch_add(n, Ordering::Relaxed);
        };
        if !ok {
            add(&self.errors, 1);
            return;
        }
        match op {
            Op::Read => {
                add(&self.reads, 1);
                add(&self.read_bytes, bytes);
            }
            Op::Write => {
                add(&self.writes, 1);
                add(&self.written_bytes, bytes);
            }
            Op::Flush => add(&self.flushes, 1),
            Op::Discard | Op::WriteZeroes => add(&self.discards, 1),
            Op::Other(_) => {}
        }
    }
}

/// The serving threads of a driver, as [`beat_while_serving`] watches them.
pub(super) struct Serving<'a> {
    /// One lap counter per thread, bumped on every round of its loop.
    pub laps: &'a [AtomicU64],
    /// The threads.
    pub threads: Vec<JoinHandle<Result<(), String>>>,
    /// Where a thread may say why it failed.
    pub failures: &'a mpsc::Receiver<Result<(), String>>,
    /// Set by a thread that failed.
    pub failed: &'a AtomicBool,
    /// The I/O counters the heartbeats carry.
    pub counters: &'a Counters,
    /// How long a thread may go without a lap before the heartbeats stop.
    pub stuck_after: Duration,
}

/// Sends a heartbeat every `setup.heartbeat_ms` while the serving threads go round their
/// loops, until they have all finished; then joins them. Each thread bumps its lap
/// counter in `laps` on every round: a thread stuck anywhere stops the heartbeats, so
/// the host deems the driver hung and restarts it. A thread that fails sets `failed` (and
/// may say why on `failures`).
pub(super) fn beat_while_serving(
    channel: &Channel,
    setup: &Setup,
    serving: Serving<'_>,
) -> Result<(), String> {
    let Serving {
        laps,
        threads,
        failures,
        failed,
        counters,
        stuck_after,
    } = serving;
    let period = Duration::from_millis(setup.heartbeat_ms.max(1));
    let mut seen: Vec<(u64, Instant)> = laps
        .iter()
        .map(|lap| (lap.load(Ordering::Relaxed), Instant::now()))
        .collect();
    loop {
        if let Ok(Err(reason)) = failures.recv_timeout(period) {
            return Err(reason);
        }
        if failed.load(Ordering::Acquire) {
            return Err("a serving thread failed".into());
        }
        if threads.iter().all(|t| t.is_finished()) {
            break;
        }
        let now = Instant::now();
        let mut stuck = None;
        for (index, (lap, (last, since))) in laps.iter().zip(seen.iter_mut()).enumerate() {
            let lap = lap.load(Ordering::Relaxed);
            if lap != *last {
                (*last, *since) = (lap, now);
            } else if now.duration_since(*since) > stuck_after && !threads[index].is_finished() {
                stuck = Some(index);
            }
        }
        if let Some(index) = stuck {
            tracing::warn!(
                thread = index,
                "a serving thread is not making progress; no heartbeat"
            );
            continue;
        }
        let io = counters.snapshot();
        let beat = ToHost::Heartbeat {
            io,
            net: Vec::new(),
        };
        if let Err(e) = channel.send(&beat, &[]) {
            return Err(ipc_failed("sending a heartbeat", e));
        }
    }
    for thread in threads {
        match thread.join() {
            Ok(result) => result?,
            Err(_) => return Err("a serving thread panicked".into()),
        }
    }
    Ok(())
}

/// Takes the usbfs file of the setup, enters the sandbox (from here on the driver reads
/// what the device sends, so it has no privileges) and wraps the file as a USB device:
/// the driver reaches nothing but this one device.
fn sandboxed_usb_device(setup: &Setup, fds: Vec<OwnedFd>) -> Result<ring3_usb::UsbDevice, String> {
    let mut fds = fds.into_iter();
    let (Some(file), None) = (fds.next(), fds.next()) else {
        return Err("the setup did not carry exactly the device's usbfs file".into());
    };
    Sandbox {
        uid: setup.uid,
        gid: setup.gid,
        memlock_bytes: setup.memlock_bytes,
    }
    .enter()
    .map_err(|e| format!("could not enter the sandbox: {e}"))?;
    tracing::info!(uid = setup.uid, driver = %setup.driver, "sandboxed; taking the device over");
    ring3_usb::UsbDevice::from_fd(file).map_err(|e| format!("taking over the USB device: {e}"))
}

/// A message the driver could not exchange with the host.
pub(crate) fn ipc_failed(what: &str, error: IpcError) -> String {
    format!("{what}: {error}")
}
