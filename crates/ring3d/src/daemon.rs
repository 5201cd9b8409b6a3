//! The daemon: binds every configured device, supervises one driver process per device,
//! answers the control socket, and on SIGTERM gives everything back.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ring3::pci::Sysfs;
use ring3_ublk::Control;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::config::{Config, Plan};
use crate::control::{ControlServer, Handler, Request, Response};
use crate::sandbox::Sandbox;
use crate::supervisor::{self, Context, Supervisor};

/// How long `ring3 restart` and `ring3 stop` wait for the device's supervisor.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs the daemon until SIGTERM or SIGINT. Errors come back before anything is bound
/// when the setup is wrong (the driver user, ublk, the socket), so a failed start leaves
/// the machine as it was.
pub fn run(config: Config, plan: Plan, sysfs: Sysfs) -> Result<(), String> {
    let daemon = config.daemon.clone();
    let sandbox = Sandbox::for_user(&daemon.driver_user, 0).map_err(|e| e.to_string())?;
    let needs_ublk = plan
        .devices
        .iter()
        .any(|d| d.expose == crate::config::Exposure::Ublk);
    let ublk = if needs_ublk {
        Some(Arc::new(Control::open().map_err(|e| format!("ublk: {e}"))?))
    } else {
        None
    };
    let program = std::env::current_exe()
        .map_err(|e| format!("could not find ring3d's own executable: {e}"))?;
    let mut signals = Signals::new([SIGTERM, SIGINT])
        .map_err(|e| format!("could not set up signal handling: {e}"))?;

    // Bind everything first; undo what was bound if any device refuses.
    let mut bound = Vec::new();
    for device in &plan.devices {
        // USB devices are claimed through usbfs when their driver starts.
        let Some(address) = device.address.pci() else {
            continue;
        };
        match sysfs.bind_to_vfio(address, false) {
            Ok(outcome) => {
                tracing::info!(pci = %address, name = %device.name, ?outcome, "bound to vfio-pci");
                bound.push(address);
            }
            Err(e) => {
                for address in bound {
                    if let Err(undo) = sysfs.unbind_from_vfio(address) {
                        tracing::warn!(pci = %address, error = %undo, "could not give the device back");
                    }
                }
                return Err(format!("{}: {}: {e}", device.name, device.address));
            }
        }
    }

    let supervisors: Arc<Mutex<Vec<Supervisor>>> = Arc::default();
    let server = ControlServer::start(
        &daemon.socket,
        daemon.socket_group.as_deref(),
        Arc::new(Supervisors(Arc::clone(&supervisors))),
    );
    let server = match server {
        Ok(server) => server,
        Err(e) => {
            for address in bound {
                let _ = sysfs.unbind_from_vfio(address);
            }
            return Err(format!("control socket {}: {e}", daemon.socket.display()));
        }
    };
    for device in plan.devices {
        let context = Context {
            device,
            daemon: daemon.clone(),
            uid: sandbox.uid,
            gid: sandbox.gid,
            ublk: ublk.clone(),
            sysfs: sysfs.clone(),
            tty_dir: std::path::PathBuf::from(crate::usb::TTY_DIR),
            program: program.clone(),
        };
        match Supervisor::start(context) {
            Ok(supervisor) => lock(&supervisors).push(supervisor),
            Err(e) => tracing::error!("could not start a supervisor thread: {e}"),
        }
    }
    tracing::info!(socket = %daemon.socket.display(), "ring3d running");

    if let Some(signal) = signals.forever().next() {
        tracing::info!(signal, "shutting down: stopping every device");
    }
    let all: Vec<Supervisor> = std::mem::take(&mut *lock(&supervisors));
    // Stop devices in parallel: each drains its own I/O.
    let stopping: Vec<_> = all
        .into_iter()
        .map(|s| std::thread::spawn(move || s.shutdown()))
        .collect();
    for handle in stopping {
        let _ = handle.join();
    }
    server.shutdown();
    tracing::info!("ring3d stopped");
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The control socket's view of the supervisors.
struct Supervisors(Arc<Mutex<Vec<Supervisor>>>);

impl Handler for Supervisors {
    fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => Response::Status {
                devices: lock(&self.0).iter().map(Supervisor::status).collect(),
            },
            Request::Restart { device } => self.ask(&device, supervisor::Request::Restart),
            Request::Stop { device } => self.ask(&device, supervisor::Request::Stop),
        }
    }
}

impl Supervisors {
    fn ask(
        &self,
        device: &str,
        make: fn(std::sync::mpsc::Sender<Result<String, String>>) -> supervisor::Request,
    ) -> Response {
        let (reply, answer) = std::sync::mpsc::channel();
        {
            let supervisors = lock(&self.0);
            let Some(supervisor) = supervisors.iter().find(|s| s.is(device)) else {
                let known: Vec<String> = supervisors.iter().map(|s| s.status().name).collect();
                return Response::Error {
                    message: format!(
                        "no device {device:?}; ring3d drives: {}",
                        if known.is_empty() {
                            "none".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                };
            };
            if !supervisor.ask(make(reply)) {
                return Response::Error {
                    message: format!("{device} is stopped"),
                };
            }
        }
        match answer.recv_timeout(REQUEST_TIMEOUT) {
            Ok(Ok(message)) => Response::Done { message },
            Ok(Err(message)) => Response::Error { message },
            Err(_) => Response::Error {
                message: format!("{device}: no answer within {} s", REQUEST_TIMEOUT.as_secs()),
            },
        }
    }
}
