//! The FT232 as a pseudo-terminal: [`Pty`], the [`link`] helper and [`run_bridge`].
//!
//! Applications open the pty's slave side (`/dev/pts/N`, or a stable symlink to it such
//! as `/run/ring3/ttyUSB-<serial>`) like any serial port. The bridge copies bytes from
//! the master side to the chip's bulk OUT endpoint and from its bulk IN endpoint back
//! to the master, and mirrors the terminal settings applications make on the slave to
//! the chip: on Linux, `tcgetattr` on the master returns the slave's settings, so the
//! bridge reads them before every block of data it sends and ten times a second.
//!
//! A Linux pty always reports 8 data bits and no parity (its driver forces `CS8` and
//! clears `PARENB`), so through a pty only the rate, stop bits, flow control and
//! `HUPCL` reach the chip; [`settings_from_termios`] maps all of them anyway.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ring3_usb::{TransferError, UsbTransport};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::termios::{ControlModes, InputModes, OptionalActions, SpecialCodeIndex, Termios};

use crate::protocol::{DataBits, FlowControl, LineSettings, Parity, StopBits};
use crate::{Ft232, Ft232Stats, FtdiError};

/// Why the pty, the link or the bridge failed.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// A pseudo-terminal operation failed.
    #[error("{what} failed: {source}")]
    Pty {
        /// The operation (`openpt`, `tcsetattr on the pty master`, ...).
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The symlink could not be created.
    #[error("cannot create the link {path}: {source} (run as root, or pass another --link path)")]
    Link {
        /// The link's path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Something other than a symlink is where the link should go.
    #[error("{0} exists and is not a symbolic link; not replacing it")]
    LinkOccupied(PathBuf),
    /// The device failed (disconnected, or failed too many times in a row).
    #[error(transparent)]
    Device(#[from] FtdiError),
    /// A bridge thread panicked.
    #[error("a thread of the serial bridge panicked")]
    Panicked,
}

impl SerialError {
    fn pty(what: &'static str, errno: Errno) -> Self {
        SerialError::Pty {
            what,
            source: errno.into(),
        }
    }
}

/// A pseudo-terminal whose master side this process holds.
#[derive(Debug)]
pub struct Pty {
    master: OwnedFd,
    slave_path: PathBuf,
}

impl Pty {
    /// Opens a new pty (`posix_openpt`, `grantpt`, `unlockpt`) and puts it in raw mode
    /// (no echo, no line editing, no character translation), so that binary data
    /// passes unchanged.
    pub fn open() -> Result<Pty, SerialError> {
        use rustix::pty::{grantpt, openpt, unlockpt, OpenptFlags};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .map_err(|e| SerialError::pty("opening /dev/ptmx", e))?;
        grantpt(&master).map_err(|e| SerialError::pty("grantpt", e))?;
        unlockpt(&master).map_err(|e| SerialError::pty("unlockpt", e))?;
        make_raw(master.as_fd())?;
        Pty::from_master(master)
    }

    /// Wraps a master fd opened elsewhere (another process may have handed it over).
    pub fn from_master(master: OwnedFd) -> Result<Pty, SerialError> {
        let slave_path = slave_path(master.as_fd())?;
        Ok(Pty { master, slave_path })
    }

    /// The master side.
    pub fn master(&self) -> BorrowedFd<'_> {
        self.master.as_fd()
    }

    /// The slave side's path, `/dev/pts/N`.
    pub fn slave_path(&self) -> &Path {
        &self.slave_path
    }

    /// Gives up the master fd (the pty lives as long as some process holds it).
    pub fn into_master(self) -> OwnedFd {
        self.master
    }
}

/// The path of the slave side of the pty whose master is `master`.
pub fn slave_path(master: BorrowedFd<'_>) -> Result<PathBuf, SerialError> {
    let name =
        rustix::pty::ptsname(master, Vec::new()).map_err(|e| SerialError::pty("ptsname", e))?;
    Ok(PathBuf::from(
        <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(name.into_bytes()),
    ))
}

/// Puts the pty in raw mode (`cfmakeraw`), keeping its rate.
pub fn make_raw(master: BorrowedFd<'_>) -> Result<(), SerialError> {
    let mut termios = rustix::termios::tcgetattr(master)
        .map_err(|e| SerialError::pty("tcgetattr on the pty", e))?;
    termios.make_raw();
    rustix::termios::tcsetattr(master, OptionalActions::Now, &termios)
        .map_err(|e| SerialError::pty("tcsetattr on the pty", e))
}

/// Sets the pty's rate, which the bridge then applies to the chip (as if an
/// application had run `stty -F /dev/pts/N <baud>`).
pub fn set_baud(master: BorrowedFd<'_>, baud: u32) -> Result<(), SerialError> {
    let mut termios = rustix::termios::tcgetattr(master)
        .map_err(|e| SerialError::pty("tcgetattr on the pty", e))?;
    termios
        .set_speed(baud)
        .map_err(|e| SerialError::pty("setting the pty's rate", e))?;
    rustix::termios::tcsetattr(master, OptionalActions::Now, &termios)
        .map_err(|e| SerialError::pty("tcsetattr on the pty", e))
}

/// Where ring3 puts the stable names of its serial ports.
pub const LINK_DIR: &str = "/run/ring3";

/// `/run/ring3/ttyUSB-<serial>`, with characters other than letters, digits, `.`, `_`
/// and `-` in the serial number replaced by `_` (a device chooses its serial string).
pub fn default_link_path(serial: &str) -> PathBuf {
    let mut name: String = serial
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with('.') {
        name.insert(0, '_');
    }
    Path::new(LINK_DIR).join(format!("ttyUSB-{name}"))
}

/// A symlink that is removed when dropped, if it still points where it was made to.
#[derive(Debug)]
pub struct Link {
    path: PathBuf,
    target: PathBuf,
}

impl Link {
    /// The link's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Another instance may have taken the name over since; leave its link alone.
        if std::fs::read_link(&self.path).is_ok_and(|target| target == self.target) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Makes `path` a symlink to `target`, creating its directory and atomically replacing
/// a stale link (a symlink left by a process that died); refuses to replace anything
/// that is not a symlink.
pub fn link(path: &Path, target: &Path) -> Result<Link, SerialError> {
    let link_error = |source| SerialError::Link {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(link_error)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if !metadata.file_type().is_symlink() => {
            return Err(SerialError::LinkOccupied(path.to_path_buf()))
        }
        _ => {}
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| link_error(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(file_name);
    temporary_name.push(format!(".{}.tmp", std::process::id()));
    let temporary = path.with_file_name(temporary_name);
    let _ = std::fs::remove_file(&temporary);
    std::os::unix::fs::symlink(target, &temporary).map_err(link_error)?;
    if let Err(error) = std::fs::rename(&temporary, path) {
        let _ = std::fs::remove_file(&temporary);
        return Err(link_error(error));
    }
    Ok(Link {
        path: path.to_path_buf(),
        target: target.to_path_buf(),
    })
}

/// What the terminal settings of the pty ask of the chip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSettings {
    /// Rate and framing. A rate of 0 (`B0`) means "hang up": drop DTR and RTS.
    pub line: LineSettings,
    /// Handshake.
    pub flow: FlowControl,
    /// `HUPCL`: drop DTR and RTS when the last process closes the terminal.
    pub hang_up_on_close: bool,
}

/// Maps terminal settings to the chip's: rate, `CSIZE` (`CS7`/`CS8`; the chip has no 5
/// or 6 data bits, which are refused), `PARENB`/`PARODD`/`CMSPAR`, `CSTOPB`,
/// `CRTSCTS`, `IXON`/`IXOFF` with `VSTART`/`VSTOP`, `HUPCL`.
pub fn settings_from_termios(termios: &Termios) -> Result<PortSettings, FtdiError> {
    let control = termios.control_modes;
    let data_bits = match control & ControlModes::CSIZE {
        size if size == ControlModes::CS8 => DataBits::Eight,
        size if size == ControlModes::CS7 => DataBits::Seven,
        size if size == ControlModes::CS6 => return Err(FtdiError::UnsupportedDataBits(6)),
        _ => return Err(FtdiError::UnsupportedDataBits(5)),
    };
    let parity = if !control.contains(ControlModes::PARENB) {
        Parity::None
    } else {
        match (
            control.contains(ControlModes::CMSPAR),
            control.contains(ControlModes::PARODD),
        ) {
            (false, false) => Parity::Even,
            (false, true) => Parity::Odd,
            (true, true) => Parity::Mark,
            (true, false) => Parity::Space,
        }
    };
    let stop_bits = if control.contains(ControlModes::CSTOPB) {
        StopBits::Two
    } else {
        StopBits::One
    };
    let input = termios.input_modes;
    let flow = if control.contains(ControlModes::CRTSCTS) {
        FlowControl::RtsCts
    } else if input.intersects(InputModes::IXON | InputModes::IXOFF) {
        FlowControl::XonXoff {
            xon: termios.special_codes[SpecialCodeIndex::VSTART],
            xoff: termios.special_codes[SpecialCodeIndex::VSTOP],
        }
    } else {
        FlowControl::None
    };
    Ok(PortSettings {
        line: LineSettings {
            baud: termios.output_speed(),
            data_bits,
            parity,
            stop_bits,
        },
        flow,
        hang_up_on_close: control.contains(ControlModes::HUPCL),
    })
}

/// Counters of one [`run_bridge`] call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BridgeStats {
    /// Bytes moved from the pty to the chip.
    pub to_device: u64,
    /// Bytes moved from the chip to the pty.
    pub from_device: u64,
    /// Terminal setting changes applied to the chip.
    pub settings_applied: u64,
    /// Terminal setting changes the chip could not follow (rates off by more than 3 %,
    /// 5 or 6 data bits, failed requests); the chip kept its previous setting.
    pub settings_refused: u64,
    /// Failed USB transfers that were retried.
    pub transfer_errors: u64,
    /// The chip's counters (line errors, status) at the end.
    pub device: Ft232Stats,
}

#[derive(Default)]
struct Counters {
    to_device: AtomicU64,
    from_device: AtomicU64,
    settings_applied: AtomicU64,
    settings_refused: AtomicU64,
    transfer_errors: AtomicU64,
}

/// How often an idle bridge looks at the terminal settings and the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long to wait before looking again when no process has the slave side open
/// (the master then polls as hung up at once, so waiting in poll would spin).
const HUNG_UP_WAIT: Duration = Duration::from_millis(50);
/// After this many failed transfers in a row the device is given up on.
const MAX_CONSECUTIVE_ERRORS: u32 = 50;
/// Largest block taken from the pty at once.
const MAX_OUT_CHUNK: usize = 16 * 1024;
/// Bytes read from the chip at once.
const IN_CHUNK: usize = 16 * 1024;

/// Moves data between the pty whose master is `master` and the chip until `stop` is
/// set (checked at least every 100 ms), then returns the counters. Returns an error if
/// the device disconnects or fails 50 times in a row.
///
/// - pty → chip: blocks of what applications wrote, sent on bulk OUT; the block size
///   follows the rate (about a quarter second of transmission) so that each transfer
///   completes well within its timeout; a transfer that times out (flow control holding
///   the chip) is retried, never dropped.
/// - chip → pty: what [`Ft232::read`] returns, written to the master; when the pty's
///   buffer is full (no one reads the slave) the bridge waits, and stops reading the
///   chip, whose own buffer then fills (with RTS/CTS the chip holds off the sender).
/// - settings: before every block and every 100 ms, the slave's terminal settings are
///   read and changes applied ([`settings_from_termios`]); with `HUPCL`, DTR and RTS
///   drop while no process has the slave open and rise when one opens it.
///
/// The pty's settings win: the bridge starts by applying them to the chip (set the
/// initial rate with [`set_baud`] on the pty, not on the chip), and a pty kept across
/// driver restarts keeps what applications set.
///
/// The master fd may come from another process; it is switched to non-blocking mode
/// (which affects every holder of the same open file description). While no process has
/// the slave open, reading the master fails (`EIO`) and polling it reports a hang-up;
/// the bridge waits in 50 ms steps until a process opens the slave again.
pub fn run_bridge<T: UsbTransport>(
    port: &Ft232<T>,
    master: BorrowedFd<'_>,
    stop: &AtomicBool,
) -> Result<BridgeStats, SerialError> {
    use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
    let flags =
        fcntl_getfl(master).map_err(|e| SerialError::pty("fcntl(F_GETFL) on the pty", e))?;
    fcntl_setfl(master, flags | OFlags::NONBLOCK)
        .map_err(|e| SerialError::pty("fcntl(F_SETFL) on the pty", e))?;

    let counters = Counters::default();
    // Set by either direction when it fails, so the other one stops too.
    let failed = AtomicBool::new(false);
    let running = || !stop.load(Ordering::Relaxed) && !failed.load(Ordering::Relaxed);

    let (to_device, from_device) = std::thread::scope(|scope| {
        let to_device = std::thread::Builder::new()
            .name("ftdi-to-device".into())
            .spawn_scoped(scope, || {
                let result = pty_to_device(port, master, &counters, &running);
                if result.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                result
            });
        let from_device = std::thread::Builder::new()
            .name("ftdi-from-device".into())
            .spawn_scoped(scope, || {
                let result = device_to_pty(port, master, &counters, &running);
                if result.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                result
            });
        let join =
            |handle: io::Result<std::thread::ScopedJoinHandle<'_, Result<(), SerialError>>>| {
                match handle {
                    Ok(handle) => handle.join().unwrap_or(Err(SerialError::Panicked)),
                    Err(source) => {
                        failed.store(true, Ordering::Relaxed);
                        Err(SerialError::Pty {
                            what: "starting a bridge thread",
                            source,
                        })
                    }
                }
            };
        (join(to_device), join(from_device))
    });
    to_device?;
    from_device?;
    Ok(BridgeStats {
        to_device: counters.to_device.load(Ordering::Relaxed),
        from_device: counters.from_device.load(Ordering::Relaxed),
        settings_applied: counters.settings_applied.load(Ordering::Relaxed),
        settings_refused: counters.settings_refused.load(Ordering::Relaxed),
        transfer_errors: counters.transfer_errors.load(Ordering::Relaxed),
        device: port.stats(),
    })
}

fn timespec(duration: Duration) -> Timespec {
    Timespec {
        tv_sec: duration.as_secs() as _,
        tv_nsec: duration.subsec_nanos() as _,
    }
}

/// Waits up to `timeout` for `events` on the master; returns what poll reported.
fn poll_master(master: BorrowedFd<'_>, events: PollFlags, timeout: Duration) -> PollFlags {
    let mut fds = [PollFd::from_borrowed_fd(master, events)];
    match rustix::event::poll(&mut fds, Some(&timespec(timeout))) {
        Ok(_) => fds[0].revents(),
        // EINTR and the like: report nothing; the caller loops.
        Err(_) => PollFlags::empty(),
    }
}

/// The settings the chip was last given, to apply only changes.
struct Mirror {
    /// The terminal settings last seen (raw, to notice any change), or None at first.
    seen: Option<(u32, ControlModes, InputModes, u8, u8)>,
    /// The settings last applied to the chip.
    applied: Option<PortSettings>,
    /// DTR/RTS as last set.
    lines_up: Option<bool>,
}

impl Mirror {
    /// Reads the slave's settings and applies what changed. `slave_open` is false while
    /// the master reports a hang-up. Only a disconnected device is an error.
    fn sync<T: UsbTransport>(
        &mut self,
        port: &Ft232<T>,
        master: BorrowedFd<'_>,
        slave_open: bool,
        counters: &Counters,
    ) -> Result<(), SerialError> {
        let termios = rustix::termios::tcgetattr(master)
            .map_err(|e| SerialError::pty("tcgetattr on the pty master", e))?;
        let key = (
            termios.output_speed(),
            termios.control_modes,
            termios.input_modes & (InputModes::IXON | InputModes::IXOFF),
            termios.special_codes[SpecialCodeIndex::VSTART],
            termios.special_codes[SpecialCodeIndex::VSTOP],
        );
        if self.seen != Some(key) {
            self.seen = Some(key);
            match settings_from_termios(&termios) {
                Ok(wanted) => self.apply(port, wanted, counters)?,
                Err(error) => {
                    counters.settings_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("terminal settings not applied to the FT232: {error}");
                }
            }
        }
        let hang_up_on_close = self.applied.is_some_and(|s| s.hang_up_on_close);
        let hung_up = self.applied.is_some_and(|s| s.line.baud == 0);
        let lines_up = !hung_up && (slave_open || !hang_up_on_close);
        if self.lines_up != Some(lines_up) {
            match port.set_modem_lines(lines_up, lines_up) {
                Ok(()) => self.lines_up = Some(lines_up),
                Err(error) if error.is_disconnected() => return Err(error.into()),
                Err(error) => {
                    counters.transfer_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("setting DTR/RTS: {error}");
                }
            }
        }
        Ok(())
    }

    fn apply<T: UsbTransport>(
        &mut self,
        port: &Ft232<T>,
        wanted: PortSettings,
        counters: &Counters,
    ) -> Result<(), SerialError> {
        let previous = self.applied;
        let mut result = Ok(());
        // B0 only hangs up; the chip keeps its rate.
        if wanted.line.baud != 0 && previous.map(|p| p.line) != Some(wanted.line) {
            result = port.set_line(&wanted.line).map(|actual| {
                tracing::debug!(
                    "FT232 line: {} baud (actual {actual}), {:?} {:?} {:?}",
                    wanted.line.baud,
                    wanted.line.data_bits,
                    wanted.line.parity,
                    wanted.line.stop_bits
                );
            });
        }
        if result.is_ok() && previous.map(|p| p.flow) != Some(wanted.flow) {
            result = port.set_flow_control(wanted.flow);
        }
        match result {
            Ok(()) => {
                counters.settings_applied.fetch_add(1, Ordering::Relaxed);
                self.applied = Some(PortSettings {
                    line: if wanted.line.baud == 0 {
                        LineSettings {
                            baud: 0,
                            ..previous.map_or(wanted.line, |p| p.line)
                        }
                    } else {
                        wanted.line
                    },
                    ..wanted
                });
                Ok(())
            }
            Err(error) if error.is_disconnected() => Err(error.into()),
            Err(error) => {
                counters.settings_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("terminal settings not applied to the FT232: {error}");
                Ok(())
            }
        }
    }

    /// Block size and transfer timeout for the current rate.
    fn out_chunk(&self, max_packet: usize) -> (usize, Duration) {
        let baud = self
            .applied
            .map(|s| s.line.baud)
            .filter(|&b| b != 0)
            .unwrap_or(9600);
        // About 10 bits a character on the line; a quarter second's worth.
        let bytes_per_second = (baud / 10).max(1) as usize;
        let max_packet = max_packet.max(1);
        let chunk =
            (bytes_per_second / 4).clamp(max_packet, MAX_OUT_CHUNK) / max_packet * max_packet;
        let chunk = chunk.max(max_packet);
        let transmit = Duration::from_secs_f64(chunk as f64 / bytes_per_second as f64);
        (chunk, Duration::from_secs(2) + transmit * 2)
    }
}

/// Counts a failed transfer; gives up on a disconnected device or after too many in a
/// row.
fn transfer_failed(
    error: FtdiError,
    consecutive: &mut u32,
    counters: &Counters,
) -> Result<(), SerialError> {
    counters.transfer_errors.fetch_add(1, Ordering::Relaxed);
    *consecutive += 1;
    if error.is_disconnected() || *consecutive >= MAX_CONSECUTIVE_ERRORS {
        return Err(error.into());
    }
    let timed_out = matches!(
        error,
        FtdiError::Bulk {
            source: TransferError::Timeout,
            ..
        }
    );
    if !timed_out {
        tracing::warn!("{error}; retrying");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn pty_to_device<T: UsbTransport>(
    port: &Ft232<T>,
    master: BorrowedFd<'_>,
    counters: &Counters,
    running: &dyn Fn() -> bool,
) -> Result<(), SerialError> {
    let mut mirror = Mirror {
        seen: None,
        applied: None,
        lines_up: None,
    };
    let mut slave_open = true;
    mirror.sync(port, master, slave_open, counters)?;
    let mut buf = vec![0u8; MAX_OUT_CHUNK];
    while running() {
        let revents = poll_master(master, PollFlags::IN, POLL_INTERVAL);
        let hung_up = revents.contains(PollFlags::HUP) && !revents.contains(PollFlags::IN);
        slave_open = !hung_up;
        mirror.sync(port, master, slave_open, counters)?;
        if hung_up {
            std::thread::sleep(HUNG_UP_WAIT);
            continue;
        }
        if !revents.contains(PollFlags::IN) {
            continue;
        }
        let (chunk, timeout) = mirror.out_chunk(port.max_packet_out());
        let n = match rustix::io::read(master, &mut buf[..chunk]) {
            Ok(0) => continue,
            Ok(n) => n,
            Err(Errno::AGAIN | Errno::INTR) => continue,
            Err(Errno::IO) => {
                // The last process closed the slave between poll and read.
                std::thread::sleep(HUNG_UP_WAIT);
                continue;
            }
            Err(e) => return Err(SerialError::pty("reading the pty master", e)),
        };
        let mut sent = 0;
        let mut consecutive_errors = 0;
        while sent < n {
            if !running() {
                return Ok(());
            }
            match port.write(&buf[sent..n], timeout) {
                Ok(accepted) => {
                    sent += accepted;
                    consecutive_errors = 0;
                    counters
                        .to_device
                        .fetch_add(accepted as u64, Ordering::Relaxed);
                }
                Err(error) => transfer_failed(error, &mut consecutive_errors, counters)?,
            }
        }
    }
    Ok(())
}

fn device_to_pty<T: UsbTransport>(
    port: &Ft232<T>,
    master: BorrowedFd<'_>,
    counters: &Counters,
    running: &dyn Fn() -> bool,
) -> Result<(), SerialError> {
    let mut buf = vec![0u8; IN_CHUNK];
    let mut consecutive_errors = 0;
    while running() {
        let n = match port.read(&mut buf, POLL_INTERVAL) {
            Ok(n) => {
                consecutive_errors = 0;
                n
            }
            Err(error) => {
                transfer_failed(error, &mut consecutive_errors, counters)?;
                continue;
            }
        };
        let mut written = 0;
        while written < n {
            if !running() {
                return Ok(());
            }
            match rustix::io::write(master, &buf[written..n]) {
                Ok(k) => {
                    written += k;
                    counters.from_device.fetch_add(k as u64, Ordering::Relaxed);
                }
                Err(Errno::AGAIN) => {
                    // The pty's buffer is full: wait for a reader (backpressure).
                    let revents = poll_master(master, PollFlags::OUT, POLL_INTERVAL);
                    if !revents.contains(PollFlags::OUT) && revents.contains(PollFlags::HUP) {
                        std::thread::sleep(HUNG_UP_WAIT);
                    }
                }
                Err(Errno::INTR) => {}
                Err(Errno::IO) => std::thread::sleep(HUNG_UP_WAIT),
                Err(e) => return Err(SerialError::pty("writing the pty master", e)),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
