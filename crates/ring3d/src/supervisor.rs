//! One device's supervisor: a thread that starts its driver process, exposes what the
//! driver serves, watches it, and restarts it within the restart budget.
//!
//! Life of a device: `starting` → `running` → (the driver exits, crashes or misses its
//! heartbeats) → `restarting` → `running` … → `failed` once the budget is spent, or
//! `stopped` when asked (`ring3 stop`, SIGTERM), which gives the device back to its
//! kernel driver.
//!
//! The ublk devices outlive driver processes: they are created once, with user recovery,
//! so that while a driver is dead the kernel holds the applications' requests, and hands
//! them (including the ones the dead driver had taken and not answered) to the next one.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ring3::pci::Sysfs;
use ring3::vfio::VfioBackend;
use ring3_ublk::{Control, DeviceSpec, Discard, Params};

use crate::config::{DaemonConfig, DeviceAddress, DriverConfig, Namespaces, PlannedDevice};
use crate::control::{DeviceStatus, IoCounters};
use crate::ipc::{
    Channel, Hello, IpcError, NamespaceInfo, ServeDevice, Setup, ToDriver, ToHost, DRIVER_FD,
};

/// The largest request a ublk device takes, unless the controller allows less.
pub const MAX_IO_BYTES: u32 = 128 * 1024;

/// How long a starting driver may take to bring its device up and get ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the kernel may take to start a ublk device or end its recovery, and to let a
/// dead driver's device go for recovery.
const UBLK_TIMEOUT: Duration = Duration::from_secs(30);

/// Requests a USB mass storage driver takes at once (it serves them one at a time: the
/// Bulk-Only Transport has one command in flight).
const USB_STORAGE_DEPTH: u16 = 32;

/// How often ring3d looks for an unplugged USB device.
const USB_POLL: Duration = Duration::from_millis(500);

/// How a device goes to a new driver process.
enum Handoff {
    /// The VFIO container, group and device.
    Vfio(Box<VfioBackend>),
    /// The usbfs file of the USB device.
    Usb(OwnedFd),
}

/// How long a driver may take to exit once its ublk devices are stopped.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// What a supervisor is asked to do.
pub enum Request {
    /// Restart the driver now (also brings a failed device back, with a fresh budget).
    Restart(Sender<Result<String, String>>),
    /// Stop the driver and give the device back to its kernel driver.
    Stop(Sender<Result<String, String>>),
    /// ring3d is shutting down: stop, as for `Stop`.
    Shutdown,
}

/// What the supervisor publishes for `ring3 status`.
#[derive(Debug)]
struct Published {
    status: DeviceStatus,
    since: Instant,
}

/// A running supervisor.
pub struct Supervisor {
    name: String,
    pci: String,
    published: Arc<Mutex<Published>>,
    requests: Sender<Request>,
    thread: Option<JoinHandle<()>>,
}

/// Everything a supervisor needs.
#[derive(Clone)]
pub struct Context {
    /// The device and its driver.
    pub device: PlannedDevice,
    /// The daemon's settings (heartbeats, budget).
    pub daemon: DaemonConfig,
    /// The user drivers run as.
    pub uid: u32,
    /// The group drivers run as.
    pub gid: u32,
    /// `/dev/ublk-control`, when a device is exposed through ublk.
    pub ublk: Option<Arc<Control>>,
    /// Where the PCI devices are.
    pub sysfs: Sysfs,
    /// Where `/run/ring3/ttyUSB-<serial>` links go (serial drivers).
    pub tty_dir: std::path::PathBuf,
    /// The program to run as the driver (`ring3d` itself, with `driver`).
    pub program: std::path::PathBuf,
}

impl Supervisor {
    /// Starts supervising the device; the driver starts on the new thread.
    pub fn start(context: Context) -> std::io::Result<Supervisor> {
        let now = Instant::now();
        let status = DeviceStatus {
            name: context.device.name.clone(),
            pci: context.device.address.to_string(),
            driver: context.device.driver.driver().name().into(),
            expose: context.device.expose.name().into(),
            state: "starting".into(),
            pid: None,
            restarts: 0,
            since_s: 0,
            reason: None,
            exposed: Vec::new(),
            io: IoCounters::default(),
            net: Vec::new(),
        };
        let published = Arc::new(Mutex::new(Published { status, since: now }));
        let (requests, receiver) = mpsc::channel();
        let shared = Arc::clone(&published);
        let name = context.device.name.clone();
        let pci = context.device.address.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("supervise-{name}"))
            .spawn(move || {
                let span = tracing::info_span!(
                    "device",
                    pci = %context.device.address,
                    name = %context.device.name
                );
                let _entered = span.enter();
                Runner::new(context, shared).run(&receiver);
            })?;
        Ok(Supervisor {
            name,
            pci,
            published,
            requests,
            thread: Some(thread),
        })
    }

    /// Whether `device` (a name or PCI address) means this device.
    pub fn is(&self, device: &str) -> bool {
        self.name == device || self.pci == device
    }

    /// The device's status now.
    pub fn status(&self) -> DeviceStatus {
        let published = self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut status = published.status.clone();
        status.since_s = published.since.elapsed().as_secs();
        status
    }

    /// Asks for `request`; false if the supervisor has already finished.
    pub fn ask(&self, request: Request) -> bool {
        self.requests.send(request).is_ok()
    }

    /// Stops the device (if not already stopped) and waits for the supervisor to end.
    pub fn shutdown(mut self) {
        let _ = self.requests.send(Request::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A ublk device created for one namespace; it lives across driver restarts.
#[derive(Debug, Clone)]
struct Exposed {
    id: u32,
    namespace: NamespaceInfo,
}

/// A driver process and its channel.
struct Driver {
    child: Child,
    channel: Channel,
}

impl Driver {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process (if still alive) and collects it; returns how it ended.
    fn kill(&mut self) -> String {
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(status) => describe_exit(status),
            Err(e) => format!("could not be waited for: {e}"),
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    fn wait_exit(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(describe_exit(status)),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => return None,
                Err(e) => return Some(format!("could not be waited for: {e}")),
            }
        }
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(0), _) => "exited".into(),
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal} ({})", signal_name(signal)),
        _ => format!("ended ({status})"),
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGBUS => "SIGBUS",
        libc::SIGSYS => "SIGSYS",
        libc::SIGILL => "SIGILL",
        _ => "signal",
    }
}

/// Why a running driver stopped being watched.
enum Watched {
    /// It died or hung; the reason.
    Died(String),
    /// Someone asked for something.
    Asked(Request),
}

struct Runner {
    context: Context,
    published: Arc<Mutex<Published>>,
    exposed: Vec<Exposed>,
    /// The TAP interface a NIC is bridged to; it outlives driver processes, so the
    /// interface (and its addresses) stay while a driver restarts.
    tap: Option<ring3_net::tap::Tap>,
    /// The pseudo-terminal a serial port is bridged to; like the TAP interface, it
    /// outlives driver processes, so applications keep their terminal open across a
    /// restart.
    pty: Option<crate::usb::PtyExposure>,
    /// The USB device a driver was started on last, and the kernel driver detached from
    /// it (given back when ring3d lets the device go).
    usb: Option<crate::usb::Opened>,
    /// I/O done by earlier driver processes of this device.
    io_before: IoCounters,
    /// When the driver died, within the budget's window.
    deaths: VecDeque<Instant>,
}

impl Runner {
    fn new(context: Context, published: Arc<Mutex<Published>>) -> Runner {
        Runner {
            context,
            published,
            exposed: Vec::new(),
            tap: None,
            pty: None,
            usb: None,
            io_before: IoCounters::default(),
            deaths: VecDeque::new(),
        }
    }

    fn published_io(&self) -> IoCounters {
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .status
            .io
    }

    fn publish(&self, change: impl FnOnce(&mut DeviceStatus)) {
        let mut published = self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let before = published.status.state.clone();
        change(&mut published.status);
        if published.status.state != before {
            published.since = Instant::now();
        }
    }

    fn set_state(&self, state: &str, pid: Option<u32>) {
        self.publish(|s| {
            s.state = state.into();
            s.pid = pid;
        });
    }

    fn run(mut self, requests: &Receiver<Request>) {
        let mut state = "starting";
        loop {
            if let Some(request) = self.wait_for_usb_device(requests) {
                match request {
                    Request::Restart(reply) => {
                        let _ = reply.send(Err(format!(
                            "{}: the USB device is not plugged in; its driver starts when it is",
                            self.context.device.name
                        )));
                        continue;
                    }
                    Request::Stop(reply) => {
                        let _ = reply.send(self.stop(None));
                        return;
                    }
                    Request::Shutdown => {
                        if let Err(e) = self.stop(None) {
                            tracing::error!("{e}");
                        }
                        return;
                    }
                }
            }
            self.set_state(state, None);
            let reason = match self.start_driver() {
                Ok(mut driver) => {
                    tracing::info!(pid = driver.pid(), "driver running");
                    self.set_state("running", Some(driver.pid()));
                    let watched = loop {
                        match self.watch(&mut driver, requests) {
                            Watched::Asked(Request::Stop(reply)) => match self.in_use() {
                                Some(why) => {
                                    let _ = reply.send(Err(why));
                                }
                                None => break Watched::Asked(Request::Stop(reply)),
                            },
                            other => break other,
                        }
                    };
                    match watched {
                        Watched::Died(reason) => reason,
                        Watched::Asked(Request::Restart(reply)) => {
                            let how = driver.kill();
                            self.io_before = self.published_io();
                            tracing::info!(how, "driver restarted on request");
                            let _ = reply.send(Ok(format!(
                                "{}: driver restarted",
                                self.context.device.name
                            )));
                            state = "restarting";
                            continue;
                        }
                        Watched::Asked(Request::Stop(reply)) => {
                            let result = self.stop(Some(driver));
                            let _ = reply.send(result);
                            return;
                        }
                        Watched::Asked(Request::Shutdown) => {
                            if let Err(e) = self.stop(Some(driver)) {
                                tracing::error!("{e}");
                            }
                            return;
                        }
                    }
                }
                Err((driver, reason)) => {
                    if let Some(mut driver) = driver {
                        driver.kill();
                    }
                    reason
                }
            };
            tracing::warn!(%reason, "driver failed");
            self.io_before = self.published_io();
            self.publish(|s| {
                s.reason = Some(reason.clone());
                s.pid = None;
            });
            if self.usb_device_gone() {
                // Unplugged: not the driver's fault, so no restart is charged; the loop
                // waits for the device to come back.
                tracing::warn!("the USB device is gone; waiting for it to come back");
                state = "restarting";
                continue;
            }
            if self.spend_budget() {
                state = "restarting";
                self.publish(|s| s.restarts += 1);
                continue;
            }
            let budget = self.context.daemon.restart_budget;
            let failure = format!(
                "gave up after {} restarts in {} s: {reason}",
                budget.restarts,
                budget.window.as_secs()
            );
            tracing::error!("{failure}");
            // Nothing will answer the held requests now: fail them rather than leave
            // applications waiting forever.
            self.remove_exposed();
            self.publish(|s| {
                s.state = "failed".into();
                s.reason = Some(failure.clone());
                s.exposed.clear();
            });
            match requests.recv() {
                Ok(Request::Restart(reply)) => {
                    self.deaths.clear();
                    let _ = reply.send(Ok(format!(
                        "{}: restarting with a fresh budget",
                        self.context.device.name
                    )));
                    state = "starting";
                }
                Ok(Request::Stop(reply)) => {
                    let _ = reply.send(self.stop(None));
                    return;
                }
                Ok(Request::Shutdown) | Err(_) => {
                    if let Err(e) = self.stop(None) {
                        tracing::error!("{e}");
                    }
                    return;
                }
            }
        }
    }

    /// Counts a death; false once the budget is spent.
    fn spend_budget(&mut self) -> bool {
        let budget = self.context.daemon.restart_budget;
        let now = Instant::now();
        self.deaths.push_back(now);
        while self
            .deaths
            .front()
            .is_some_and(|t| now.duration_since(*t) > budget.window)
        {
            self.deaths.pop_front();
        }
        self.deaths.len() as u64 <= u64::from(budget.restarts)
    }

    /// Queues, their depth (ring size for NICs), namespaces (NVMe) and the locked memory
    /// the driver may pin.
    fn driver_options(&self) -> (u16, u16, Vec<u32>, u64) {
        match &self.context.device.driver {
            DriverConfig::Nvme(options) => {
                let namespaces = match &options.namespaces {
                    Namespaces::All => Vec::new(),
                    Namespaces::Only(ids) => ids.clone(),
                };
                let listed = if namespaces.is_empty() {
                    16
                } else {
                    namespaces.len()
                };
                let memlock = crate::driver::memlock_estimate(
                    options.queues,
                    options.queue_depth,
                    MAX_IO_BYTES,
                    listed,
                );
                (options.queues, options.queue_depth, namespaces, memlock)
            }
            // USB drivers pin no DMA memory of their own: usbfs maps its buffers.
            DriverConfig::UsbStorage => (1, USB_STORAGE_DEPTH, Vec::new(), 16 << 20),
            DriverConfig::Ftdi(_) => (1, 0, Vec::new(), 16 << 20),
            DriverConfig::Net(_, options) => {
                // Receive and transmit rings of 2 KiB buffers, and the rings themselves.
                let memlock = crate::driver::memlock_estimate(
                    options.queues,
                    options.ring_size.saturating_mul(4),
                    2048,
                    1,
                );
                (options.queues, options.ring_size, Vec::new(), memlock)
            }
        }
    }

    /// Opens the device for a new driver: through VFIO (reset first) for a PCI device,
    /// through usbfs for a USB one.
    fn open_device(&mut self) -> Result<(Handoff, String, u32), String> {
        match &self.context.device.address {
            DeviceAddress::Pci(pci) => {
                let address = pci.to_string();
                let backend = VfioBackend::open_with(&self.context.sysfs, &address)
                    .map_err(|e| format!("opening the device through VFIO: {e}"))?;
                if backend
                    .device()
                    .info()
                    .flags
                    .contains(ring3::vfio::DeviceFlags::RESET)
                {
                    if let Err(e) = backend.device().reset() {
                        tracing::warn!(error = %e, "device reset before starting the driver failed");
                    }
                }
                let group = backend.group().number();
                Ok((Handoff::Vfio(Box::new(backend)), address, group))
            }
            DeviceAddress::Usb(address) => {
                let address = address.clone();
                let detached_before = self.usb.as_ref().and_then(|usb| usb.detached.clone());
                let (fd, opened) = crate::usb::open(
                    &address,
                    self.context.device.driver.driver(),
                    self.context.device.force,
                    detached_before,
                )?;
                let name = opened.to_string();
                self.usb = Some(opened);
                Ok((Handoff::Usb(fd), name, 0))
            }
        }
    }

    /// Starts a driver process and brings its exposed devices up (or back).
    fn start_driver(&mut self) -> Result<Driver, (Option<Driver>, String)> {
        let (handoff, address, group) = self.open_device().map_err(|e| (None, e))?;
        let (channel, driver_end) =
            Channel::pair().map_err(|e| (None, format!("creating the driver's channel: {e}")))?;
        let child = spawn_driver(&self.context.program, driver_end)
            .map_err(|e| (None, format!("starting the driver process: {e}")))?;
        let mut driver = Driver { child, channel };
        let (queues, queue_depth, namespaces, memlock_bytes) = self.driver_options();
        let setup = Setup {
            driver: self.context.device.driver.driver().name().into(),
            name: self.context.device.name.clone(),
            pci: address.clone(),
            group,
            uid: self.context.uid,
            gid: self.context.gid,
            memlock_bytes,
            heartbeat_ms: self.context.daemon.heartbeat.as_millis() as u64,
            queues,
            queue_depth,
            max_io_bytes: MAX_IO_BYTES,
            namespaces,
        };
        let sent = match &handoff {
            Handoff::Vfio(backend) => {
                let fds = backend.handoff_fds();
                driver.channel.send(
                    &ToDriver::Setup(setup),
                    &[fds.container, fds.group, fds.device],
                )
            }
            Handoff::Usb(fd) => driver.channel.send(&ToDriver::Setup(setup), &[fd.as_fd()]),
        };
        // The driver has its own copies now; ring3d keeps none (a usbfs file left open
        // here would keep a dead driver's transfers and claims alive).
        drop(handoff);
        if let Err(e) = sent {
            let reason = failure("sending the setup", e, &mut driver);
            return Err((Some(driver), reason));
        }
        let hello = match driver.channel.recv::<ToHost>(Some(START_TIMEOUT)) {
            Ok((ToHost::Hello(hello), _)) => hello,
            Ok((
                ToHost::NetHello {
                    pid,
                    mac,
                    queues,
                    link_up,
                },
                _,
            )) => {
                tracing::info!(pid, %mac, queues, link_up, "driver brought the NIC up");
                return match self.expose_tap(&mut driver, &mac) {
                    Ok(()) => Ok(driver),
                    Err(reason) => Err((Some(driver), reason)),
                };
            }
            Ok((ToHost::SerialHello { pid }, _)) => {
                tracing::info!(pid, "driver brought the serial port up");
                return match self.expose_pty(&mut driver) {
                    Ok(()) => Ok(driver),
                    Err(reason) => Err((Some(driver), reason)),
                };
            }
            Ok((ToHost::Failed { reason }, _)) => return Err((Some(driver), reason)),
            Ok((other, _)) => {
                return Err((
                    Some(driver),
                    format!("the driver said {other:?} before hello"),
                ))
            }
            Err(e) => {
                let reason = failure(
                    "waiting for the driver to bring the device up",
                    e,
                    &mut driver,
                );
                return Err((Some(driver), reason));
            }
        };
        tracing::info!(
            pid = hello.pid,
            namespaces = hello.namespaces.len(),
            queues = hello.queues,
            "driver brought the device up"
        );
        match self.expose(&mut driver, &hello, queue_depth) {
            Ok(()) => Ok(driver),
            Err(reason) => Err((Some(driver), reason)),
        }
    }

    /// Creates the TAP interface (first start) and bridges the driver to it.
    fn expose_tap(&mut self, driver: &mut Driver, mac: &str) -> Result<(), String> {
        if self.tap.is_none() {
            let name = ring3_net::tap::interface_name(&self.context.device.address.to_string());
            let tap = ring3_net::tap::Tap::create(&name, Some(self.context.uid))
                .map_err(|e| format!("creating the TAP interface {name}: {e}"))?;
            let parsed = parse_mac(mac)
                .ok_or_else(|| format!("the driver reported a malformed MAC address {mac:?}"))?;
            tap.set_mac(parsed)
                .map_err(|e| format!("setting {name}'s MAC address: {e}"))?;
            tap.set_up(true)
                .map_err(|e| format!("bringing {name} up: {e}"))?;
            self.tap = Some(tap);
        }
        let Some(tap) = &self.tap else {
            return Err("no TAP interface".into());
        };
        let interface = tap.name().to_string();
        driver
            .channel
            .send(
                &ToDriver::ServeTap {
                    interface: interface.clone(),
                },
                &[tap.as_fd()],
            )
            .map_err(|e| failure("handing the TAP interface over", e, driver))?;
        match driver.channel.recv::<ToHost>(Some(START_TIMEOUT)) {
            Ok((ToHost::Ready { .. }, _)) => {}
            Ok((ToHost::Failed { reason }, _)) => return Err(reason),
            Ok((other, _)) => return Err(format!("the driver said {other:?} instead of ready")),
            Err(e) => return Err(failure("waiting for the driver's queues", e, driver)),
        }
        tracing::info!(%interface, "bridged");
        self.publish(|s| s.exposed = vec![interface]);
        Ok(())
    }

    /// Creates the pseudo-terminal and its link (first start) and bridges the driver to it.
    fn expose_pty(&mut self, driver: &mut Driver) -> Result<(), String> {
        if self.pty.is_none() {
            let serial = self.usb.as_ref().and_then(|usb| usb.serial.clone());
            let label = serial.unwrap_or_else(|| self.context.device.name.clone());
            let baud = match &self.context.device.driver {
                DriverConfig::Ftdi(options) => options.baud,
                _ => crate::config::SerialOptions::default().baud,
            };
            self.pty = Some(crate::usb::PtyExposure::create(
                &self.context.tty_dir,
                &label,
                baud,
            )?);
        }
        let Some(pty) = &self.pty else {
            return Err("no pseudo-terminal".into());
        };
        let path = pty.path().to_string();
        driver
            .channel
            .send(&ToDriver::ServePty { path: path.clone() }, &[pty.master()])
            .map_err(|e| failure("handing the pseudo-terminal over", e, driver))?;
        match driver.channel.recv::<ToHost>(Some(START_TIMEOUT)) {
            Ok((ToHost::Ready { .. }, _)) => {}
            Ok((ToHost::Failed { reason }, _)) => return Err(reason),
            Ok((other, _)) => return Err(format!("the driver said {other:?} instead of ready")),
            Err(e) => return Err(failure("waiting for the driver's bridge", e, driver)),
        }
        let exposed = pty.exposed();
        tracing::info!(terminal = ?exposed, "bridged");
        self.publish(|s| s.exposed = exposed);
        Ok(())
    }

    /// For a USB device that is not plugged in: waits, as `waiting`, until it is, or a
    /// request comes (returned). `None` at once for PCI devices and present USB ones.
    fn wait_for_usb_device(&mut self, requests: &Receiver<Request>) -> Option<Request> {
        let DeviceAddress::Usb(address) = &self.context.device.address else {
            return None;
        };
        let address = address.clone();
        let mut announced = false;
        while !crate::usb::present(&address) {
            if !announced {
                tracing::info!(usb = %address, "waiting for the USB device");
                self.publish(|s| {
                    s.state = "waiting".into();
                    s.pid = None;
                    s.reason = Some(format!("USB device {address} is not plugged in"));
                });
                announced = true;
            }
            match requests.recv_timeout(USB_POLL) {
                Ok(request) => return Some(request),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Some(Request::Shutdown),
            }
        }
        if announced {
            tracing::info!(usb = %address, "the USB device is back");
        }
        None
    }

    /// Whether this is a USB device that is no longer plugged in.
    fn usb_device_gone(&self) -> bool {
        match &self.context.device.address {
            DeviceAddress::Usb(address) => !crate::usb::present(address),
            DeviceAddress::Pci(_) => false,
        }
    }

    /// Gives a USB device back: re-attaches the kernel driver ring3d detached from it.
    fn release_usb(&mut self) -> Result<String, String> {
        let name = &self.context.device.name;
        self.pty = None;
        match self.usb.take() {
            Some(opened) => match opened.give_back() {
                Ok(Some(kernel_driver)) => Ok(format!(
                    "{name}: stopped; the device is back with its kernel driver {kernel_driver}"
                )),
                Ok(None) => Ok(format!("{name}: stopped")),
                Err(e) => Err(format!(
                    "{name}: stopped, but giving the device back to its kernel driver failed: {e}"
                )),
            },
            None => Ok(format!("{name}: stopped")),
        }
    }

    /// Creates the ublk devices (first start) or recovers them (restart), hands them to
    /// the driver and starts them once its queues are ready.
    fn expose(&mut self, driver: &mut Driver, hello: &Hello, depth: u16) -> Result<(), String> {
        let Some(ublk) = self.context.ublk.clone() else {
            return Err("ublk is not set up (ring3d found no ublk device in the config)".into());
        };
        let first = self.exposed.is_empty();
        let depth = depth.min(hello.max_queue_depth.max(2)).min(4096);
        if first {
            for namespace in &hello.namespaces {
                let info = ublk
                    .add(&DeviceSpec {
                        id: None,
                        queues: hello.queues,
                        depth,
                        max_io_bytes: hello.max_io_bytes,
                        recovery: true,
                    })
                    .map_err(|e| {
                        format!(
                            "creating a ublk device for namespace {}: {e}",
                            namespace.nsid
                        )
                    })?;
                self.exposed.push(Exposed {
                    id: info.id,
                    namespace: *namespace,
                });
                ublk.set_params(info.id, &params(namespace, hello))
                    .map_err(|e| format!("setting up ublk device {}: {e}", info.id))?;
            }
        } else {
            let before: Vec<NamespaceInfo> = self.exposed.iter().map(|e| e.namespace).collect();
            if before != hello.namespaces {
                return Err(format!(
                    "the device's namespaces changed across the restart: {before:?} then {:?}",
                    hello.namespaces
                ));
            }
            for exposed in &self.exposed {
                ublk.start_recovery(exposed.id, UBLK_TIMEOUT)
                    .map_err(|e| format!("recovering ublk device {}: {e}", exposed.id))?;
            }
        }
        let mut devices = Vec::new();
        let mut cdevs: Vec<OwnedFd> = Vec::new();
        for exposed in &self.exposed {
            let info = ublk
                .info(exposed.id)
                .map_err(|e| format!("ublk device {}: {e}", exposed.id))?;
            devices.push(ServeDevice {
                id: exposed.id,
                nsid: exposed.namespace.nsid,
                queues: info.queues,
                depth: info.depth,
                max_io_bytes: info.max_io_bytes,
            });
            cdevs.push(
                ublk.open_char_device(exposed.id, Duration::from_secs(5))
                    .map_err(|e| format!("opening ublk device {}: {e}", exposed.id))?,
            );
        }
        let borrowed: Vec<_> = cdevs.iter().map(|fd| fd.as_fd()).collect();
        driver
            .channel
            .send(&ToDriver::Serve { devices }, &borrowed)
            .map_err(|e| failure("handing the ublk devices over", e, driver))?;
        // Only the driver may hold them: the kernel recovers a device once its server's
        // last file is closed.
        drop(borrowed);
        drop(cdevs);
        let mut ready = 0;
        let deadline = Instant::now() + START_TIMEOUT;
        while ready < self.exposed.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match driver.channel.recv::<ToHost>(Some(left)) {
                Ok((ToHost::Ready { .. }, _)) => ready += 1,
                Ok((ToHost::Failed { reason }, _)) => return Err(reason),
                Ok(_) => {}
                Err(e) => return Err(failure("waiting for the driver's queues", e, driver)),
            }
        }
        let pid = driver.pid() as i32;
        for exposed in &self.exposed {
            let done = if first {
                ublk.start(exposed.id, pid, UBLK_TIMEOUT)
            } else {
                ublk.end_recovery(exposed.id, pid, UBLK_TIMEOUT)
            };
            done.map_err(|e| {
                format!(
                    "{} ublk device {}: {e}",
                    if first {
                        "starting"
                    } else {
                        "ending the recovery of"
                    },
                    exposed.id
                )
            })?;
        }
        let paths: Vec<String> = self
            .exposed
            .iter()
            .map(|e| format!("/dev/ublkb{}", e.id))
            .collect();
        tracing::info!(devices = ?paths, recovered = !first, "exposed");
        self.publish(|s| s.exposed = paths);
        Ok(())
    }

    /// Watches a running driver until it dies, hangs, or a request comes.
    fn watch(&mut self, driver: &mut Driver, requests: &Receiver<Request>) -> Watched {
        let timeout = self.context.daemon.heartbeat_timeout;
        let mut last = Instant::now();
        let mut said: Option<String> = None;
        let mut looked_for_usb = Instant::now();
        loop {
            match requests.try_recv() {
                Ok(request) => return Watched::Asked(request),
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => return Watched::Asked(Request::Shutdown),
            }
            // An idle driver would notice an unplugged device only at its next transfer.
            if looked_for_usb.elapsed() >= USB_POLL {
                looked_for_usb = Instant::now();
                if self.usb_device_gone() {
                    let how = driver.kill();
                    return Watched::Died(format!(
                        "the USB device was unplugged (the driver {how})"
                    ));
                }
            }
            match driver
                .channel
                .recv::<ToHost>(Some(Duration::from_millis(100)))
            {
                Ok((ToHost::Heartbeat { io, net }, _)) => {
                    last = Instant::now();
                    let total = add_counters(&self.io_before, &io);
                    self.publish(|s| {
                        s.io = total;
                        s.net = net;
                    });
                }
                Ok((ToHost::Failed { reason }, _)) => said = Some(reason),
                Ok(_) => last = Instant::now(),
                Err(IpcError::Timeout(_)) => {}
                Err(IpcError::Closed) => {
                    let how = driver.kill();
                    return Watched::Died(match said {
                        Some(reason) => format!("{reason} (driver {how})"),
                        None => format!("driver process {how}"),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bad message from the driver");
                }
            }
            if last.elapsed() > timeout {
                let how = driver.kill();
                return Watched::Died(format!(
                    "driver hung: no heartbeat for {} ms (then {how})",
                    timeout.as_millis()
                ));
            }
        }
    }

    /// Stops and deletes the ublk devices (the kernel drains their I/O through the
    /// driver first), lets the driver exit, and gives the device back to its kernel
    /// driver.
    fn stop(&mut self, driver: Option<Driver>) -> Result<String, String> {
        self.set_state("stopping", driver.as_ref().map(Driver::pid));
        if let Some(ublk) = &self.context.ublk {
            for exposed in &self.exposed {
                if let Err(e) = ublk.stop(exposed.id) {
                    tracing::warn!(id = exposed.id, error = %e, "stopping the ublk device failed");
                }
            }
        }
        if self.tap.is_some() || self.pty.is_some() {
            // A NIC or a serial port has nothing to drain: frames in flight are lost as on any link.
            if let Some(driver) = &driver {
                // SAFETY: kill(2) on the driver process, which is our unreaped child.
                unsafe { libc::kill(driver.pid() as i32, libc::SIGTERM) };
            }
        }
        if let Some(mut driver) = driver {
            match driver.wait_exit(EXIT_TIMEOUT) {
                Some(how) => tracing::info!(how, "driver ended"),
                None => {
                    let how = driver.kill();
                    tracing::warn!(how, "driver did not exit after its devices stopped");
                }
            }
        }
        self.remove_exposed();
        // Closing the last file of the TAP removes the interface.
        self.tap = None;
        let name = &self.context.device.name;
        let Some(address) = self.context.device.address.pci() else {
            let result = self.release_usb();
            self.publish(|s| {
                s.state = "stopped".into();
                s.pid = None;
                s.exposed.clear();
            });
            return result;
        };
        let result = match self.context.sysfs.unbind_from_vfio(address) {
            Ok(outcome) => {
                tracing::info!(?outcome, "device given back");
                Ok(format!(
                    "{name}: stopped; the device is back with its kernel driver"
                ))
            }
            Err(e) => Err(format!(
                "{name}: stopped, but giving the device back failed: {e}"
            )),
        };
        self.publish(|s| {
            s.state = "stopped".into();
            s.pid = None;
            s.exposed.clear();
        });
        result
    }

    /// Why the exposed block devices cannot be taken away now: one is mounted or held
    /// by another block device (device mapper, RAID).
    fn in_use(&self) -> Option<String> {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for exposed in &self.exposed {
            let name = format!("ublkb{}", exposed.id);
            let block = std::path::Path::new("/sys/block").join(&name);
            let Ok(number) = std::fs::read_to_string(block.join("dev")) else {
                continue;
            };
            let number = number.trim();
            // mountinfo: ID PARENT MAJOR:MINOR ROOT MOUNT-POINT ...
            if let Some(point) = mounts.lines().find_map(|line| {
                let mut fields = line.split_whitespace();
                let device = fields.nth(2)?;
                let point = fields.nth(1)?;
                (device == number).then(|| point.to_string())
            }) {
                return Some(format!(
                    "{}: /dev/{name} is mounted on {point}: unmount it first",
                    self.context.device.name
                ));
            }
            let holders = std::fs::read_dir(block.join("holders"))
                .map(|entries| {
                    entries
                        .filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            if !holders.is_empty() {
                return Some(format!(
                    "{}: /dev/{name} is held by {}: release it first",
                    self.context.device.name,
                    holders.join(", ")
                ));
            }
        }
        None
    }

    fn remove_exposed(&mut self) {
        let Some(ublk) = self.context.ublk.clone() else {
            return;
        };
        for exposed in self.exposed.drain(..) {
            if let Err(e) = ublk.stop(exposed.id) {
                tracing::debug!(id = exposed.id, error = %e, "stopping the ublk device");
            }
            if let Err(e) = ublk.delete(exposed.id) {
                tracing::warn!(id = exposed.id, error = %e, "deleting the ublk device failed");
            }
        }
    }
}

/// What to report when the channel fails: the driver's own exit if it died.
fn failure(what: &str, error: IpcError, driver: &mut Driver) -> String {
    match error {
        IpcError::Closed => format!("{what}: the driver process {}", driver.kill()),
        other => format!("{what}: {other}"),
    }
}

/// `aa:bb:cc:dd:ee:ff` → bytes.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Counters of earlier driver processes plus the current one's.
fn add_counters(before: &IoCounters, now: &IoCounters) -> IoCounters {
    IoCounters {
        reads: before.reads + now.reads,
        writes: before.writes + now.writes,
        flushes: before.flushes + now.flushes,
        discards: before.discards + now.discards,
        read_bytes: before.read_bytes + now.read_bytes,
        written_bytes: before.written_bytes + now.written_bytes,
        errors: before.errors + now.errors,
    }
}

/// The ublk parameters for a namespace.
fn params(namespace: &NamespaceInfo, hello: &Hello) -> Params {
    let block = namespace.block_size;
    Params {
        size_bytes: namespace.blocks.saturating_mul(u64::from(block)),
        logical_block: block,
        physical_block: block,
        max_io_bytes: hello.max_io_bytes,
        volatile_cache: hello.volatile_cache,
        fua: false,
        discard: hello.discard.then_some(Discard {
            granularity: block,
            max_bytes: u32::MAX - (u32::MAX % block.max(1)),
        }),
        write_zeroes_max_bytes: if hello.write_zeroes {
            u32::try_from(u64::from(block) * u64::from(ring3_nvme::MAX_BLOCKS_PER_COMMAND))
                .unwrap_or(u32::MAX - (u32::MAX % block.max(1)))
        } else {
            0
        },
    }
}

/// Starts `program driver` with `channel` as its fd 3, dying with ring3d.
fn spawn_driver(program: &std::path::Path, channel: OwnedFd) -> std::io::Result<Child> {
    let raw = channel.as_raw_fd();
    let mut command = Command::new(program);
    command.arg("driver").stdin(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe calls (dup2, fcntl, prctl) on values computed before the fork.
    unsafe {
        command.pre_exec(move || {
            if raw == DRIVER_FD {
                if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, DRIVER_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // A driver must not outlive the daemon that supervises it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn();
    drop(channel);
    child
}
