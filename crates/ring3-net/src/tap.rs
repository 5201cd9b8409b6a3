//! A ring3 NIC as a Linux network interface: a TAP device, and the loop that forwards
//! frames between it and one [`NetQueue`].
//!
//! Two processes share the work. The privileged side (the `ring3` command, or ring3d,
//! both with `CAP_NET_ADMIN`) creates the interface with [`Tap::create`], names it with
//! [`interface_name`], sets its MAC address, MTU and state, and hands the file
//! descriptor on. The driver side, which opens no files and has no capabilities, wraps
//! the descriptor with [`Tap::from_fd`] and runs [`run_bridge`] on a queue of its NIC:
//!
//! ```ignore
//! let tap = Tap::from_fd(fd, name)?;
//! let stats = BridgeStats::default();
//! let stop = AtomicBool::new(false);
//! run_bridge(&mut queue, &tap, &stop, &stats, &BridgeOptions::default())?;
//! ```
//!
//! The interface is not persistent: it disappears when the last descriptor of it is
//! closed, so a driver that dies takes its interface with it (and a restarted driver gets
//! a new one from its host).
//!
//! The TAP ioctls are made by hand here. The crates for it that we looked at (`tun`,
//! `tun-tap`) open `/dev/net/tun` themselves and configure the interface through their own
//! calls; none takes a descriptor handed over by another process and leaves out the
//! privileged part, which is what a sandboxed driver needs. The calls are few and short.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::{NetQueue, Packet, QueueStats};

/// The longest interface name Linux takes, without the terminating NUL (`IFNAMSIZ - 1`).
pub const MAX_INTERFACE_NAME: usize = libc::IFNAMSIZ - 1;

/// What went wrong with a TAP interface or its bridge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on the TAP device or its interface failed.
    #[error("{what} (TAP interface {interface})")]
    Io {
        /// What was being done, e.g. "setting the MTU to 1500".
        what: String,
        /// The interface.
        interface: String,
        /// The OS error; `PermissionDenied` means the caller lacks `CAP_NET_ADMIN`.
        #[source]
        source: io::Error,
    },
    /// The name is not one Linux accepts for an interface.
    #[error(
        "`{0}` is not a valid interface name: it needs 1 to 15 bytes, none of them '/', ':' \
         or white space, and may not be \".\" or \"..\""
    )]
    InvalidName(String),
    /// The queue of the NIC failed; the bridge stopped.
    #[error(transparent)]
    Queue(#[from] crate::Error),
}

impl Error {
    /// Whether starting over (a new interface, a reset NIC) can help: true for a failed
    /// queue or an unexpected OS error, false for a bad name or missing permission.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Io { source, .. } => source.kind() != io::ErrorKind::PermissionDenied,
            Error::InvalidName(_) => false,
            Error::Queue(_) => true,
        }
    }
}

/// The result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The interface name for the NIC at PCI address `pci`: `r3-BB-DD.F`, with the domain
/// (leading zeroes dropped) after `r3-` when it is not 0000, e.g. `0000:00:05.0` →
/// `r3-00-05.0` and `0001:3a:00.1` → `r3-1-3a-00.1`. The result always satisfies the
/// kernel's rules for names (see [`check_interface_name`]); an address too long to fit
/// keeps its last characters, which tell devices apart best.
pub fn interface_name(pci: &str) -> String {
    let pci = pci.trim().to_ascii_lowercase();
    let parts: Vec<&str> = pci.split(':').collect();
    let (domain, rest) = match parts.as_slice() {
        [domain, bus, slot] => (domain.trim_start_matches('0'), format!("{bus}-{slot}")),
        [bus, slot] => ("", format!("{bus}-{slot}")),
        _ => ("", pci.clone()),
    };
    let mut name = if domain.is_empty() {
        format!("r3-{rest}")
    } else {
        format!("r3-{domain}-{rest}")
    };
    if name.len() > MAX_INTERFACE_NAME && !domain.is_empty() {
        name = format!("r3{domain}-{rest}");
    }
    let mut name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '/' && c != ':' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.len() > MAX_INTERFACE_NAME {
        // ASCII only by now, so any byte offset is a character boundary.
        name = format!("r3{}", &name[name.len() - (MAX_INTERFACE_NAME - 2)..]);
    }
    name
}

/// Checks `name` against the kernel's rules for interface names (`dev_valid_name` in
/// net/core/dev.c): 1 to 15 bytes, not "." or "..", no '/', ':' or white space.
pub fn check_interface_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= MAX_INTERFACE_NAME
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace() || b == 0x0b);
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_owned()))
    }
}

/// An `ifreq` with `name` in it (checked by the caller) and the rest zeroed.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name array and a union of integers, addresses and
    // a pointer); all zeroes is a valid value of each.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request
}

/// The name the kernel wrote into an `ifreq`.
fn ifreq_name(request: &libc::ifreq) -> String {
    let bytes: Vec<u8> = request
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `ioctl(fd, request, argument)` for the requests of this module, which all take a
/// pointer to an `ifreq` or an integer.
///
/// # Safety
///
/// `argument` must be what `request` expects: a pointer to a live `ifreq` for the
/// `SIOC*IF*` requests and `TUNSETIFF`, an integer for `TUNSETOWNER`.
unsafe fn ioctl(fd: BorrowedFd<'_>, request: libc::Ioctl, argument: usize) -> io::Result<()> {
    // SAFETY: the caller vouches for the argument; `fd` is open for the call's duration.
    let result = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, argument) };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A TAP interface: Ethernet frames without a packet-information header, read and
/// written without blocking. Dropping the last descriptor removes the interface.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Creates TAP interface `name` (needs `CAP_NET_ADMIN`). With `owner_uid`, that user
    /// may also use it, for handing the descriptor to a driver that runs as that user.
    /// The interface is down until [`Tap::set_up`].
    pub fn create(name: &str, owner_uid: Option<u32>) -> Result<Tap> {
        check_interface_name(name)?;
        let error = |what: &str, source: io::Error| Error::Io {
            what: what.to_owned(),
            interface: name.to_owned(),
            source,
        };
        let fd = rustix::fs::open(
            "/dev/net/tun",
            OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            error(
                "opening /dev/net/tun (is the tun module loaded? `modprobe tun`)",
                e.into(),
            )
        })?;
        let mut request = ifreq(name);
        request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF takes a pointer to an ifreq; `request` lives across the call.
        unsafe {
            ioctl(
                fd.as_fd(),
                libc::TUNSETIFF,
                std::ptr::from_mut(&mut request) as usize,
            )
        }
        .map_err(|e| {
            error(
                "creating the interface (needs CAP_NET_ADMIN; is the name already taken?)",
                e,
            )
        })?;
        let name = ifreq_name(&request);
        if let Some(uid) = owner_uid {
            // SAFETY: TUNSETOWNER takes the user ID as an integer argument.
            unsafe { ioctl(fd.as_fd(), libc::TUNSETOWNER, uid as usize) }.map_err(|e| {
                Error::Io {
                    what: format!("giving the interface to user {uid}"),
                    interface: name.clone(),
                    source: e,
                }
            })?;
        }
        Ok(Tap { fd, name })
    }

    /// Wraps a TAP descriptor made by [`Tap::create`] in another process (passed over a
    /// Unix socket) for interface `name`. Makes it non-blocking if it is not; opens
    /// nothing and needs no privilege.
    pub fn from_fd(fd: OwnedFd, name: &str) -> Result<Tap> {
        let error = |source: Errno| Error::Io {
            what: "making the TAP descriptor non-blocking".to_owned(),
            interface: name.to_owned(),
            source: source.into(),
        };
        let flags = rustix::fs::fcntl_getfl(&fd).map_err(error)?;
        if !flags.contains(OFlags::NONBLOCK) {
            rustix::fs::fcntl_setfl(&fd, flags | OFlags::NONBLOCK).map_err(error)?;
        }
        Ok(Tap {
            fd,
            name: name.to_owned(),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Gives up the descriptor (to hand it to a driver process).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Sets the interface's MAC address, normally the NIC's (needs `CAP_NET_ADMIN`).
    pub fn set_mac(&self, mac: [u8; 6]) -> Result<()> {
        let mut request = ifreq(&self.name);
        let mut address = libc::sockaddr {
            sa_family: libc::ARPHRD_ETHER,
            sa_data: [0; 14],
        };
        for (slot, byte) in address.sa_data.iter_mut().zip(mac) {
            *slot = byte as libc::c_char;
        }
        request.ifr_ifru.ifru_hwaddr = address;
        self.interface_ioctl(libc::SIOCSIFHWADDR, &mut request, || {
            format!("setting the MAC address to {}", format_mac(mac))
        })
    }

    /// Sets the MTU: the largest IP packet, so the NIC's largest frame less the 14-byte
    /// Ethernet header (needs `CAP_NET_ADMIN`).
    pub fn set_mtu(&self, mtu: u32) -> Result<()> {
        let mut request = ifreq(&self.name);
        request.ifr_ifru.ifru_mtu = libc::c_int::try_from(mtu).unwrap_or(libc::c_int::MAX);
        self.interface_ioctl(libc::SIOCSIFMTU, &mut request, || {
            format!("setting the MTU to {mtu}")
        })
    }

    /// Brings the interface up or down (needs `CAP_NET_ADMIN`).
    pub fn set_up(&self, up: bool) -> Result<()> {
        let mut request = ifreq(&self.name);
        self.interface_ioctl(libc::SIOCGIFFLAGS, &mut request, || {
            "reading the interface flags".to_owned()
        })?;
        // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
        let flags = unsafe { request.ifr_ifru.ifru_flags };
        let up_flag = libc::IFF_UP as libc::c_short;
        request.ifr_ifru.ifru_flags = if up {
            flags | up_flag
        } else {
            flags & !up_flag
        };
        self.interface_ioctl(libc::SIOCSIFFLAGS, &mut request, || {
            format!("bringing the interface {}", if up { "up" } else { "down" })
        })
    }

    /// One of the `SIOC*IF*` requests on `request`, through an `AF_INET` datagram socket
    /// (the interface ioctls go to a socket, not to the TAP descriptor).
    fn interface_ioctl(
        &self,
        command: libc::Ioctl,
        request: &mut libc::ifreq,
        what: impl Fn() -> String,
    ) -> Result<()> {
        let error = |source: io::Error| Error::Io {
            what: what(),
            interface: self.name.clone(),
            source,
        };
        let socket = rustix::net::socket(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::DGRAM,
            None,
        )
        .map_err(|e| error(e.into()))?;
        // SAFETY: every command passed here (SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFMTU,
        // SIOCSIFHWADDR) takes a pointer to an ifreq; `request` lives across the call.
        unsafe {
            ioctl(
                socket.as_fd(),
                command,
                std::ptr::from_mut(request) as usize,
            )
        }
        .map_err(error)
    }

    /// Reads one frame into `buffer` if one is waiting: `Ok(None)` if none is. A frame
    /// longer than `buffer` is cut short (the interface's MTU should prevent that).
    pub fn read_frame(&self, buffer: &mut [u8]) -> Result<Option<usize>> {
        match rustix::io::read(&self.fd, buffer) {
            Ok(len) => Ok(Some(len)),
            Err(Errno::AGAIN) => Ok(None),
            Err(Errno::INTR) => Ok(None),
            Err(e) => Err(self.io_error("reading a frame", e)),
        }
    }

    /// Writes one frame to the interface (the kernel receives it): `Ok(true)` if it was
    /// taken, `Ok(false)` if the interface could not take it now (full, down, or a frame
    /// the kernel refuses, such as one shorter than an Ethernet header) — the frame is
    /// dropped either way.
    pub fn write_frame(&self, frame: &[u8]) -> Result<bool> {
        match rustix::io::write(&self.fd, frame) {
            Ok(_) => Ok(true),
            Err(Errno::AGAIN | Errno::INTR | Errno::NOBUFS) => Ok(false),
            // EIO: the interface is down; EINVAL: a runt or malformed frame.
            Err(Errno::IO | Errno::INVAL | Errno::MSGSIZE) => Ok(false),
            Err(e) => Err(self.io_error("writing a frame", e)),
        }
    }

    /// Waits up to `timeout` for a frame to read; true if one is waiting.
    pub fn wait_readable(&self, timeout: Duration) -> Result<bool> {
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        let timeout = rustix::time::Timespec {
            tv_sec: timeout.as_secs() as _,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) => Ok(fds[0].revents().contains(PollFlags::IN)),
            Err(Errno::INTR) => Ok(false),
            Err(e) => Err(self.io_error("waiting for a frame", e)),
        }
    }

    fn io_error(&self, what: &str, errno: Errno) -> Error {
        Error::Io {
            what: what.to_owned(),
            interface: self.name.clone(),
            source: errno.into(),
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

/// How [`run_bridge`] batches and when it sleeps.
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    /// Frames moved per batch, each way.
    pub batch: usize,
    /// How long the loop keeps polling after the last frame moved before it sleeps:
    /// while traffic flows it never sleeps, so latency stays low.
    pub spin: Duration,
    /// How long one sleep lasts, on the TAP and then on the queue's interrupt; the
    /// longest an idle bridge takes to notice a frame or the stop flag (twice this).
    pub idle_wait: Duration,
    /// The largest frame the NIC sends ([`crate::NetDevice::max_frame`]); longer frames
    /// from the TAP are dropped and counted.
    pub max_frame: usize,
}

impl Default for BridgeOptions {
    fn default() -> BridgeOptions {
        BridgeOptions {
            batch: 32,
            spin: Duration::from_micros(200),
            idle_wait: Duration::from_millis(1),
            max_frame: 1514,
        }
    }
}

/// Counters of a running bridge, updated by [`run_bridge`] and readable from other
/// threads at any time (for a stats printer, or a host asking the driver).
#[derive(Debug, Default)]
pub struct BridgeStats {
    to_device_frames: AtomicU64,
    to_device_bytes: AtomicU64,
    to_tap_frames: AtomicU64,
    to_tap_bytes: AtomicU64,
    drops_tap_full: AtomicU64,
    drops_pool_empty: AtomicU64,
    drops_oversize: AtomicU64,
    queue: Mutex<QueueStats>,
}

/// A copy of a bridge's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BridgeCounters {
    /// Frames read from the TAP and handed to the NIC.
    pub to_device_frames: u64,
    /// Their bytes.
    pub to_device_bytes: u64,
    /// Frames the NIC received and the TAP took.
    pub to_tap_frames: u64,
    /// Their bytes.
    pub to_tap_bytes: u64,
    /// Received frames the TAP did not take (full, down, or refused).
    pub drops_tap_full: u64,
    /// Frames from the TAP dropped because every packet buffer was in use.
    pub drops_pool_empty: u64,
    /// Frames from the TAP longer than the NIC sends, dropped.
    pub drops_oversize: u64,
    /// The queue's own counters, as of the last few hundred milliseconds.
    pub queue: QueueStats,
}

impl BridgeCounters {
    /// Frames lost on the way from the NIC to the TAP: the NIC's receive drops and the
    /// TAP's refusals.
    pub fn rx_drops(&self) -> u64 {
        self.queue.rx_drops + self.drops_tap_full
    }

    /// Frames lost on the way from the TAP to the NIC.
    pub fn tx_drops(&self) -> u64 {
        self.drops_pool_empty + self.drops_oversize
    }
}

impl BridgeStats {
    /// The counters now.
    pub fn snapshot(&self) -> BridgeCounters {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        BridgeCounters {
            to_device_frames: load(&self.to_device_frames),
            to_device_bytes: load(&self.to_device_bytes),
            to_tap_frames: load(&self.to_tap_frames),
            to_tap_bytes: load(&self.to_tap_bytes),
            drops_tap_full: load(&self.drops_tap_full),
            drops_pool_empty: load(&self.drops_pool_empty),
            drops_oversize: load(&self.drops_oversize),
            queue: *self
                .queue
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        }
    }

    fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    fn publish_queue(&self, stats: QueueStats) {
        *self
            .queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = stats;
    }
}

/// How often the queue's counters are copied into [`BridgeStats`].
const PUBLISH_INTERVAL: Duration = Duration::from_millis(250);

/// Forwards frames between `tap` and `queue` until `stop` is set (checked every round,
/// so within about `2 * options.idle_wait` when idle) or the queue fails.
///
/// Frames the NIC receives are written to the TAP and their buffers freed; frames read
/// from the TAP are copied into the queue's packet buffers and transmitted in batches
/// (frames the ring cannot take yet wait for the next round, and no more are read
/// meanwhile, so the TAP's own queue absorbs bursts). While frames move the loop never
/// sleeps; `options.spin` after the last one it sleeps in poll(2) on the TAP and then in
/// [`NetQueue::wait`], alternately, until something arrives.
///
/// The caller should set the TAP's MTU to `max_frame - 14` of the NIC, so that the kernel
/// never hands over a frame the NIC cannot send; longer ones are dropped and counted.
pub fn run_bridge<Q: NetQueue>(
    queue: &mut Q,
    tap: &Tap,
    stop: &AtomicBool,
    stats: &BridgeStats,
    options: &BridgeOptions,
) -> Result<()> {
    let mut received: Vec<Packet> = Vec::with_capacity(options.batch);
    let mut outgoing: Vec<Packet> = Vec::with_capacity(options.batch);
    let mut last_frame = Instant::now();
    let mut last_publish = Instant::now();
    let result = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        match bridge_round(queue, tap, stats, options, &mut received, &mut outgoing) {
            Ok(0) => {}
            Ok(_) => last_frame = Instant::now(),
            Err(e) => break Err(e),
        }
        if last_publish.elapsed() >= PUBLISH_INTERVAL {
            stats.publish_queue(queue.stats());
            last_publish = Instant::now();
        }
        if last_frame.elapsed() < options.spin {
            continue;
        }
        // Idle. Frames waiting for room in the transmit ring need completions, which
        // the queue's wait reports; otherwise sleep on the TAP first.
        if outgoing.is_empty() {
            match tap.wait_readable(options.idle_wait) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => break Err(e),
            }
        }
        if let Err(e) = queue.wait(options.idle_wait) {
            break Err(e.into());
        }
    };
    for packet in received.drain(..).chain(outgoing.drain(..)) {
        queue.free(packet);
    }
    stats.publish_queue(queue.stats());
    result
}

/// One round each way; returns how many frames moved.
fn bridge_round<Q: NetQueue>(
    queue: &mut Q,
    tap: &Tap,
    stats: &BridgeStats,
    options: &BridgeOptions,
    received: &mut Vec<Packet>,
    outgoing: &mut Vec<Packet>,
) -> Result<usize> {
    let batch = options.batch.max(1);
    let mut moved = 0;

    // NIC → TAP.
    queue.receive(received, batch)?;
    let mut frames = 0;
    let mut bytes = 0;
    let mut refused = 0;
    let mut failure = None;
    for packet in received.drain(..) {
        if failure.is_none() {
            let frame = queue.data(&packet);
            match tap.write_frame(frame) {
                Ok(true) => {
                    frames += 1;
                    bytes += frame.len() as u64;
                }
                Ok(false) => refused += 1,
                Err(e) => failure = Some(e),
            }
        }
        queue.free(packet);
    }
    BridgeStats::add(&stats.to_tap_frames, frames);
    BridgeStats::add(&stats.to_tap_bytes, bytes);
    BridgeStats::add(&stats.drops_tap_full, refused);
    if let Some(e) = failure {
        return Err(e);
    }
    moved += (frames + refused) as usize;

    // TAP → NIC: first what the ring could not take last time, then new frames.
    if !outgoing.is_empty() {
        queue.transmit(outgoing)?;
        if !outgoing.is_empty() {
            return Ok(moved);
        }
    }
    let mut frames = 0;
    let mut bytes = 0;
    while outgoing.len() < batch {
        let mut packet = match queue.alloc() {
            Some(packet) => packet,
            None => {
                // Sending reaps the buffers of frames the NIC has sent.
                let mut nothing = Vec::new();
                queue.transmit(&mut nothing)?;
                match queue.alloc() {
                    Some(packet) => packet,
                    None => {
                        if outgoing.is_empty() && discard_frame(tap)? {
                            BridgeStats::add(&stats.drops_pool_empty, 1);
                            moved += 1;
                        }
                        break;
                    }
                }
            }
        };
        let buffer = queue.data_mut(&mut packet);
        match tap.read_frame(buffer) {
            Ok(Some(len)) if len > options.max_frame.min(buffer.len()) || len == 0 => {
                // A zero-length read is not a frame; a long one cannot be sent whole.
                queue.free(packet);
                BridgeStats::add(&stats.drops_oversize, 1);
                moved += 1;
            }
            Ok(Some(len)) => {
                packet.set_len(len);
                outgoing.push(packet);
                frames += 1;
                bytes += len as u64;
            }
            Ok(None) => {
                queue.free(packet);
                break;
            }
            Err(e) => {
                queue.free(packet);
                return Err(e);
            }
        }
    }
    if !outgoing.is_empty() {
        queue.transmit(outgoing)?;
    }
    BridgeStats::add(&stats.to_device_frames, frames);
    BridgeStats::add(&stats.to_device_bytes, bytes);
    Ok(moved + frames as usize)
}

/// Reads and drops one frame from the TAP, when there is no buffer for it; true if there
/// was one.
fn discard_frame(tap: &Tap) -> Result<bool> {
    let mut scratch = [0u8; 65536];
    Ok(tap.read_frame(&mut scratch)?.is_some())
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use super::*;

    #[test]
    fn interface_names_follow_the_pci_address_and_the_kernel_rules() {
        assert_eq!(interface_name("0000:00:05.0"), "r3-00-05.0");
        assert_eq!(interface_name("00:05.0"), "r3-00-05.0");
        assert_eq!(interface_name("0000:3A:1f.7"), "r3-3a-1f.7");
        assert_eq!(interface_name("0001:3a:00.1"), "r3-1-3a-00.1");
        assert_eq!(interface_name("abcd:3a:00.1"), "r3-abcd-3a-00.1");
        // VMD domains have five digits: the dash after "r3" goes.
        assert_eq!(interface_name("10000:e1:00.0"), "r310000-e1-00.0");
        // Longer still: the end is kept.
        assert_eq!(interface_name("123456789:e1:00.0"), "r356789-e1-00.0");
        // Not an address at all: still a valid name.
        assert_eq!(interface_name("a b/c"), "r3-a-b-c");
        for pci in [
            "0000:00:05.0",
            "ffff:ff:1f.7",
            "10000:e1:00.0",
            "123456789:e1:00.0",
            "a b/c:d:e:f",
            "",
            "ü:ä:ö.0",
        ] {
            let name = interface_name(pci);
            check_interface_name(&name).unwrap_or_else(|e| panic!("{pci:?}: {e}"));
            assert!(name.starts_with("r3"), "{name}");
        }
    }

    #[test]
    fn names_the_kernel_refuses_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "sixteen-bytes-xx",
        ] {
            assert!(check_interface_name(bad).is_err(), "{bad:?}");
        }
        for good in ["r3test0", "fifteen-bytes-x", "...", "a.b"] {
            check_interface_name(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
    }

    /// A NIC whose wire is a loopback: every transmitted frame comes back as received,
    /// in the same buffer, once the bridge asks for received frames. The "ring" holds
    /// `ring` frames; more stay with the caller.
    struct LoopbackQueue {
        buffers: Vec<Vec<u8>>,
        free: Vec<u32>,
        on_the_wire: VecDeque<Packet>,
        ring: usize,
        stats: QueueStats,
    }

    impl LoopbackQueue {
        fn new(buffers: u32, buffer_size: usize, ring: usize) -> LoopbackQueue {
            LoopbackQueue {
                buffers: vec![vec![0; buffer_size]; buffers as usize],
                free: (0..buffers).rev().collect(),
                on_the_wire: VecDeque::new(),
                ring,
                stats: QueueStats::default(),
            }
        }
    }

    impl NetQueue for LoopbackQueue {
        fn receive(&mut self, out: &mut Vec<Packet>, max: usize) -> crate::Result<usize> {
            let count = max.min(self.on_the_wire.len());
            for packet in self.on_the_wire.drain(..count) {
                self.stats.rx_packets += 1;
                self.stats.rx_bytes += packet.len() as u64;
                out.push(packet);
            }
            Ok(count)
        }

        fn transmit(&mut self, packets: &mut Vec<Packet>) -> crate::Result<usize> {
            let room = self.ring.saturating_sub(self.on_the_wire.len());
            let count = room.min(packets.len());
            for packet in packets.drain(..count) {
                assert!(
                    packet.len() <= self.buffers[0].len(),
                    "frame past its buffer"
                );
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += packet.len() as u64;
                self.on_the_wire.push_back(packet);
            }
            self.stats.tx_busy += packets.len() as u64;
            Ok(count)
        }

        fn alloc(&mut self) -> Option<Packet> {
            self.free.pop().map(|index| Packet::new(index, 0))
        }

        fn free(&mut self, packet: Packet) {
            assert!(!self.free.contains(&packet.index()), "freed twice");
            self.free.push(packet.index());
        }

        fn data(&self, packet: &Packet) -> &[u8] {
            &self.buffers[packet.index() as usize][..packet.len()]
        }

        fn data_mut(&mut self, packet: &mut Packet) -> &mut [u8] {
            &mut self.buffers[packet.index() as usize]
        }

        fn stats(&self) -> QueueStats {
            self.stats
        }

        fn wait(&mut self, _timeout: Duration) -> crate::Result<()> {
            Ok(())
        }
    }

    /// A frame of `len` bytes, numbered `n`: broadcast, from a local MAC, ethertype 0x88b5
    /// (local experimental), payload counting from `n`.
    fn frame(n: u8, len: usize) -> Vec<u8> {
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&[0x02, 0x72, 0x33, 0, 0, n]);
        frame.extend_from_slice(&[0x88, 0xb5]);
        frame.extend((0..len.saturating_sub(14)).map(|i| n.wrapping_add(i as u8)));
        frame
    }

    /// Runs the bridge on its own thread until the returned closure is called, which
    /// stops it and gives back the queue and the result.
    fn start_bridge(
        mut queue: LoopbackQueue,
        tap: Arc<Tap>,
        options: BridgeOptions,
    ) -> (
        Arc<BridgeStats>,
        impl FnOnce() -> (LoopbackQueue, Result<()>, Duration),
    ) {
        let stats = Arc::new(BridgeStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stats, stop) = (stats.clone(), stop.clone());
            std::thread::spawn(move || {
                let result = run_bridge(&mut queue, &tap, &stop, &stats, &options);
                (queue, result, thread_cpu())
            })
        };
        let finish = move || {
            stop.store(true, Ordering::Relaxed);
            thread.join().expect("the bridge thread panicked")
        };
        (stats, finish)
    }

    /// A "TAP" made of a datagram socket pair, which keeps frame boundaries the same way:
    /// the bridge gets one end, the test plays the kernel on the other.
    fn socket_tap() -> (Arc<Tap>, Tap) {
        let (bridge_end, kernel_end) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .expect("socketpair");
        (
            Arc::new(Tap::from_fd(bridge_end, "pair0").expect("bridge end")),
            Tap::from_fd(kernel_end, "pair1").expect("kernel end"),
        )
    }

    /// Reads frames from `tap` until `count` came or two seconds passed.
    fn read_frames(tap: &Tap, count: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut frames = Vec::new();
        let mut buffer = vec![0; 65536];
        while frames.len() < count && Instant::now() < deadline {
            match tap.read_frame(&mut buffer).expect("reading") {
                Some(len) => frames.push(buffer[..len].to_vec()),
                None => {
                    tap.wait_readable(Duration::from_millis(20)).expect("poll");
                }
            }
        }
        frames
    }

    #[test]
    fn frames_go_round_the_loop_in_order_through_a_small_ring_and_pool() {
        let (bridge_end, kernel) = socket_tap();
        let options = BridgeOptions {
            batch: 4,
            ..BridgeOptions::default()
        };
        let (stats, finish) = start_bridge(LoopbackQueue::new(8, 2048, 3), bridge_end, options);
        let sent: Vec<Vec<u8>> = (0..100u8)
            .map(|n| frame(n, 60 + usize::from(n) * 14))
            .collect();
        for frame in &sent {
            assert!(kernel.write_frame(frame).expect("writing"), "socket full");
        }
        let came_back = read_frames(&kernel, sent.len());
        let (queue, result, _) = finish();
        result.expect("the bridge ran without errors");
        assert_eq!(came_back.len(), sent.len());
        assert!(came_back == sent, "frames changed or reordered");
        let counters = stats.snapshot();
        assert_eq!(counters.to_device_frames, 100);
        assert_eq!(counters.to_tap_frames, 100);
        let bytes: u64 = sent.iter().map(|f| f.len() as u64).sum();
        assert_eq!(counters.to_device_bytes, bytes);
        assert_eq!(counters.to_tap_bytes, bytes);
        assert_eq!(counters.tx_drops() + counters.rx_drops(), 0);
        assert_eq!(counters.queue.tx_packets, 100, "queue stats are published");
        assert_eq!(queue.free.len(), 8, "every buffer is back in the pool");
    }

    #[test]
    fn oversize_frames_and_frames_without_a_buffer_are_dropped_and_counted() {
        let (bridge_end, kernel) = socket_tap();
        let mut queue = LoopbackQueue::new(2, 256, 8);
        // Every buffer in use, as if the NIC held them all.
        let held: Vec<Packet> = (0..2).filter_map(|_| queue.alloc()).collect();
        let options = BridgeOptions {
            max_frame: 100,
            ..BridgeOptions::default()
        };
        let (stats, finish) = start_bridge(queue, bridge_end, options);
        kernel.write_frame(&frame(1, 60)).expect("writing");
        let deadline = Instant::now() + Duration::from_secs(2);
        while stats.snapshot().drops_pool_empty < 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (mut queue, result, _) = finish();
        result.expect("the bridge ran");
        assert_eq!(stats.snapshot().drops_pool_empty, 1);
        for packet in held {
            queue.free(packet);
        }

        let (bridge_end, kernel) = socket_tap();
        let options = BridgeOptions {
            max_frame: 100,
            ..BridgeOptions::default()
        };
        let (stats, finish) = start_bridge(queue, bridge_end, options);
        kernel.write_frame(&frame(2, 101)).expect("writing");
        kernel.write_frame(&frame(3, 100)).expect("writing");
        let came_back = read_frames(&kernel, 1);
        let (_, result, _) = finish();
        result.expect("the bridge ran");
        assert_eq!(came_back, vec![frame(3, 100)]);
        let counters = stats.snapshot();
        assert_eq!(counters.drops_oversize, 1);
        assert_eq!(counters.tx_drops(), 1);
    }

    #[test]
    fn an_idle_bridge_sleeps_and_stops_when_told() {
        let (bridge_end, _kernel) = socket_tap();
        let (_, finish) = start_bridge(
            LoopbackQueue::new(4, 2048, 4),
            bridge_end,
            BridgeOptions::default(),
        );
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let (_, result, cpu) = finish();
        result.expect("the bridge ran");
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "slow to stop"
        );
        // Spinning would be 500 ms; a thousand sleeps a second cost a few.
        assert!(
            cpu < Duration::from_millis(100),
            "spun while idle: {cpu:?} CPU"
        );
    }

    /// A raw packet socket on interface `name`, which sends frames out of it and sees the
    /// frames it receives (not the ones it sends).
    fn packet_socket(name: &str) -> OwnedFd {
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) takes no pointers.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
        assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just opened and nothing else owns it.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let c_name = std::ffi::CString::new(name).expect("a name without NUL");
        // SAFETY: `c_name` is a NUL-terminated string alive across the call.
        let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        assert_ne!(index, 0, "no interface {name}");
        // SAFETY: sockaddr_ll is plain old data; zeroes are valid.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = index as i32;
        // SAFETY: `address` is a sockaddr_ll of the size given, alive across the call.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&address).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(bound, 0, "bind: {}", io::Error::last_os_error());
        // PACKET_IGNORE_OUTGOING (Linux 4.20), so the socket does not see its own frames.
        let one: libc::c_int = 1;
        // SAFETY: the option value is a c_int of the size given, alive across the call.
        let set = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                23,
                std::ptr::from_ref(&one).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(
            set,
            0,
            "PACKET_IGNORE_OUTGOING: {}",
            io::Error::last_os_error()
        );
        fd
    }

    /// The frame the kernel receives on a TAP is the one the NIC received, and the frame
    /// the kernel sends out of it reaches the NIC: frames sent out of a real TAP
    /// interface (through a packet socket) go through the bridge to the loopback NIC,
    /// come back, and arrive at the interface byte for byte. Needs root (it runs in a
    /// network namespace of its own, so the host's interfaces are not touched); skipped
    /// otherwise.
    #[test]
    fn a_real_tap_carries_frames_both_ways_in_a_private_network_namespace() {
        let test = std::thread::spawn(|| {
            if !rustix::process::geteuid().is_root() {
                eprintln!("skipped: creating a TAP interface needs root");
                return;
            }
            // SAFETY: unshare(2) takes no pointers; CLONE_NEWNET moves only this thread
            // (and the threads it starts) into a new network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let error = io::Error::last_os_error();
                eprintln!("skipped: no network namespace of its own: {error}");
                return;
            }
            let tap = match Tap::create("r3test0", None) {
                Ok(tap) => tap,
                Err(e) => {
                    eprintln!("skipped: {e}: {:?}", std::error::Error::source(&e));
                    return;
                }
            };
            assert_eq!(tap.name(), "r3test0");
            tap.set_mac([0x02, 0x72, 0x33, 0, 0, 0xfe]).expect("MAC");
            tap.set_mtu(1500).expect("MTU");
            tap.set_up(true).expect("up");
            let socket = packet_socket("r3test0");
            let (stats, finish) = start_bridge(
                LoopbackQueue::new(16, 2048, 8),
                Arc::new(tap),
                BridgeOptions::default(),
            );
            let sent: Vec<Vec<u8>> = (0..20u8)
                .map(|n| frame(n, 60 + usize::from(n) * 70))
                .collect();
            let mut came_back = Vec::new();
            let mut buffer = vec![0u8; 65536];
            for frame in &sent {
                rustix::net::send(&socket, frame, rustix::net::SendFlags::empty())
                    .expect("sending out of r3test0");
                let deadline = Instant::now() + Duration::from_secs(2);
                while Instant::now() < deadline {
                    let mut fds = [PollFd::new(&socket, PollFlags::IN)];
                    let wait = rustix::time::Timespec {
                        tv_sec: 0,
                        tv_nsec: 50_000_000,
                    };
                    rustix::event::poll(&mut fds, Some(&wait)).expect("poll");
                    if !fds[0].revents().contains(PollFlags::IN) {
                        continue;
                    }
                    let len =
                        rustix::net::recv(&socket, &mut buffer, rustix::net::RecvFlags::empty())
                            .expect("receiving on r3test0")
                            .0;
                    // Only ours: IPv6 on the new interface sends frames of its own.
                    if buffer[12..14] == [0x88, 0xb5] {
                        came_back.push(buffer[..len].to_vec());
                        break;
                    }
                }
            }
            let (_, result, _) = finish();
            result.expect("the bridge ran");
            assert_eq!(came_back.len(), sent.len(), "frames lost");
            assert!(came_back == sent, "frames changed");
            let counters = stats.snapshot();
            assert!(counters.to_device_frames >= 20, "{counters:?}");
            assert!(counters.to_tap_frames >= 20, "{counters:?}");
        });
        if let Err(panic) = test.join() {
            std::panic::resume_unwind(panic);
        }
    }

    /// CPU time of the calling thread.
    fn thread_cpu() -> Duration {
        let time = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        Duration::new(time.tv_sec as u64, time.tv_nsec as u32)
    }
}
