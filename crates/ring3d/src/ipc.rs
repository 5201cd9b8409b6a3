//! The channel between `ring3d` and one driver process.
//!
//! A `SOCK_SEQPACKET` socket pair: each message is one datagram holding one JSON value,
//! and file descriptors (the VFIO files, ublk character devices) travel with the message
//! that needs them as `SCM_RIGHTS`. The driver's end is its file descriptor 3.
//!
//! The conversation, from the host's side:
//!
//! 1. host → driver: [`ToDriver::Setup`] with the VFIO container, group and device files;
//!    the driver enters its sandbox and brings the device up;
//! 2. driver → host: [`ToHost::Hello`] with what it found (namespaces, queues, limits);
//! 3. host → driver: [`ToDriver::Serve`] with one ublk character device per namespace;
//! 4. driver → host: [`ToHost::Ready`] per device once every queue waits for requests;
//!    the host then starts the device (or ends its recovery);
//! 5. driver → host: [`ToHost::Heartbeat`] every heartbeat period, with I/O counters,
//!    until the device is stopped; [`ToHost::Failed`] before giving up.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{
    recvmsg, sendmsg, socketpair, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage,
    RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

pub use crate::control::{IoCounters, NetQueueCounters};

/// The driver process's file descriptor for its end of the channel.
pub const DRIVER_FD: i32 = 3;

/// The largest message either side sends.
const MAX_MESSAGE: usize = 64 * 1024;

/// The most file descriptors one message carries.
const MAX_FDS: usize = 16;

/// What the host tells a driver.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "message", rename_all = "kebab-case")]
pub enum ToDriver {
    /// Sent first, with the VFIO container, group and device files (in that order).
    Setup(Setup),
    /// The ublk devices to serve, with their character devices (in the same order).
    Serve {
        /// One per exposed namespace.
        devices: Vec<ServeDevice>,
    },
    /// The TAP interface to bridge a NIC to, with its file.
    ServeTap {
        /// The interface's name.
        interface: String,
    },
    /// The pseudo-terminal to bridge a serial port to, with its master file.
    ServePty {
        /// The terminal applications open (`/dev/pts/N`).
        path: String,
    },
}

/// Everything a driver process needs to know to start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Setup {
    /// The driver to run: `nvme`, `virtio-net` or `e1000e`.
    #[serde(default = "nvme")]
    pub driver: String,
    /// The device's name in the config, for log lines.
    pub name: String,
    /// The device's PCI address.
    pub pci: String,
    /// Its IOMMU group.
    pub group: u32,
    /// The user and group the driver runs as once sandboxed.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// The locked-memory limit for the driver's DMA memory, in bytes.
    pub memlock_bytes: u64,
    /// How often to send a heartbeat.
    pub heartbeat_ms: u64,
    /// I/O queue pairs to use (the controller may grant fewer).
    pub queues: u16,
    /// Requests in flight per queue and device (NVMe), or descriptors per ring (NICs).
    pub queue_depth: u16,
    /// The largest request, in bytes.
    pub max_io_bytes: u32,
    /// Namespaces to serve; empty: all.
    pub namespaces: Vec<u32>,
}

fn nvme() -> String {
    "nvme".into()
}

/// One ublk device for the driver to serve.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServeDevice {
    /// The ublk device ID (`/dev/ublkb<id>`).
    pub id: u32,
    /// The NVMe namespace behind it.
    pub nsid: u32,
    /// ublk queues (one thread each in the driver).
    pub queues: u16,
    /// Requests per queue.
    pub depth: u16,
    /// The largest request, in bytes.
    pub max_io_bytes: u32,
}

/// What a driver tells the host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "message", rename_all = "kebab-case")]
pub enum ToHost {
    /// The device is up and sandboxed; what it offers.
    Hello(Hello),
    /// A NIC is up and sandboxed.
    NetHello {
        /// The driver's process ID.
        pid: u32,
        /// The NIC's MAC address, `aa:bb:cc:dd:ee:ff`.
        mac: String,
        /// Queue pairs.
        queues: u16,
        /// Whether the link is up.
        link_up: bool,
    },
    /// A serial port is up and sandboxed.
    SerialHello {
        /// The driver's process ID.
        pid: u32,
    },
    /// Every queue of ublk device `id` waits for requests.
    Ready {
        /// The ublk device ID.
        id: u32,
    },
    /// Still alive, with the I/O done so far by this process.
    Heartbeat {
        /// Counters since the process started.
        io: IoCounters,
        /// Per queue, for network drivers.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        net: Vec<NetQueueCounters>,
    },
    /// The driver gives up, and why; it exits next.
    Failed {
        /// What went wrong, for `ring3 status`.
        reason: String,
    },
}

/// What a driver found on its device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    /// The driver's process ID.
    pub pid: u32,
    /// The namespaces it will serve.
    pub namespaces: Vec<NamespaceInfo>,
    /// I/O queue pairs it has.
    pub queues: u16,
    /// Entries per queue the device allows.
    pub max_queue_depth: u16,
    /// The largest request it takes, in bytes.
    pub max_io_bytes: u32,
    /// Whether the device has a volatile write cache (so flushes matter).
    pub volatile_cache: bool,
    /// Whether it can discard (deallocate) blocks.
    pub discard: bool,
    /// Whether it can write zeroes without data.
    pub write_zeroes: bool,
}

/// One namespace as a driver reports it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Namespace ID.
    pub nsid: u32,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Size in logical blocks.
    pub blocks: u64,
}

/// Why a message could not be exchanged.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    /// The other side closed its end (the driver exited, or the host did).
    #[error("the other side closed the channel")]
    Closed,
    /// Nothing arrived in time.
    #[error("no message within {0:?}")]
    Timeout(Duration),
    /// A message that is not what the protocol allows.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The socket failed.
    #[error("channel I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// One end of the channel.
#[derive(Debug)]
pub struct Channel {
    socket: OwnedFd,
}

impl Channel {
    /// A connected pair: (host end, driver end). Both are close-on-exec; the host makes
    /// the driver's end the child's fd 3 when spawning it.
    pub fn pair() -> Result<(Channel, OwnedFd), IpcError> {
        let (host, driver) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(std::io::Error::from)?;
        Ok((Channel { socket: host }, driver))
    }

    /// Wraps an inherited end (the driver's fd 3).
    pub fn from_fd(socket: OwnedFd) -> Channel {
        Channel { socket }
    }

    /// The socket, for polling alongside other files.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Sends `message` with `fds` attached.
    pub fn send<M: Serialize>(&self, message: &M, fds: &[BorrowedFd<'_>]) -> Result<(), IpcError> {
        let bytes = serde_json::to_vec(message).map_err(|e| IpcError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
            return Err(IpcError::Malformed(format!(
                "a message of {} bytes and {} files is too large",
                bytes.len(),
                fds.len()
            )));
        }
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(IpcError::Malformed("too many files for one message".into()));
        }
        loop {
            match sendmsg(
                &self.socket,
                &[IoSlice::new(&bytes)],
                &mut control,
                SendFlags::NOSIGNAL,
            ) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::PIPE) | Err(rustix::io::Errno::CONNRESET) => {
                    return Err(IpcError::Closed)
                }
                Err(e) => return Err(IpcError::Io(e.into())),
            }
        }
    }

    /// Waits up to `timeout` (forever with `None`) for a message.
    pub fn recv<M: for<'de> Deserialize<'de>>(
        &self,
        timeout: Option<Duration>,
    ) -> Result<(M, Vec<OwnedFd>), IpcError> {
        if let Some(limit) = timeout {
            if !self.wait_readable(limit)? {
                return Err(IpcError::Timeout(limit));
            }
        }
        let mut buffer = vec![0u8; MAX_MESSAGE];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = loop {
            match recvmsg(
                &self.socket,
                &mut [IoSliceMut::new(&mut buffer)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(received) => break received,
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::CONNRESET) => return Err(IpcError::Closed),
                Err(e) => return Err(IpcError::Io(e.into())),
            }
        };
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = message {
                fds.extend(rights);
            }
        }
        if received.bytes == 0 {
            return Err(IpcError::Closed);
        }
        let bytes = buffer.get(..received.bytes).unwrap_or(&buffer);
        let message = serde_json::from_slice(bytes)
            .map_err(|e| IpcError::Malformed(format!("{e}: {}", String::from_utf8_lossy(bytes))))?;
        Ok((message, fds))
    }

    /// Whether a message (or the end of the channel) is waiting, after up to `timeout`.
    pub fn wait_readable(&self, timeout: Duration) -> Result<bool, IpcError> {
        let timeout = Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        let mut fds = [PollFd::new(&self.socket, PollFlags::IN)];
        loop {
            match poll(&mut fds, Some(&timeout)) {
                Ok(ready) => return Ok(ready > 0),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(IpcError::Io(e.into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn messages_and_files_cross_the_channel() {
        let (host, driver) = Channel::pair().unwrap();
        let driver = Channel::from_fd(driver);
        let (mut reader, mut writer) = std::io::pipe().unwrap();
        let serve = ToDriver::Serve {
            devices: vec![ServeDevice {
                id: 3,
                nsid: 2,
                queues: 2,
                depth: 64,
                max_io_bytes: 131072,
            }],
        };
        host.send(&serve, &[writer.as_fd()]).unwrap();
        let (got, fds): (ToDriver, _) = driver.recv(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(got, serve);
        assert_eq!(fds.len(), 1);
        // The received file is the pipe's write end: what goes in comes out of the reader.
        let mut passed = std::fs::File::from(fds.into_iter().next().unwrap());
        passed.write_all(b"through").unwrap();
        drop(passed);
        writer.flush().unwrap();
        drop(writer);
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        assert_eq!(text, "through");
    }

    #[test]
    fn a_closed_end_and_silence_are_told_apart() {
        let (host, driver) = Channel::pair().unwrap();
        let err = host
            .recv::<ToHost>(Some(Duration::from_millis(20)))
            .unwrap_err();
        assert!(matches!(err, IpcError::Timeout(_)), "{err}");
        drop(driver);
        let err = host
            .recv::<ToHost>(Some(Duration::from_millis(500)))
            .unwrap_err();
        assert!(matches!(err, IpcError::Closed), "{err}");
    }

    #[test]
    fn garbage_is_reported_not_trusted() {
        let (host, driver) = Channel::pair().unwrap();
        let driver = Channel::from_fd(driver);
        driver
            .send(&serde_json::json!({"message": "hello", "pid": "x"}), &[])
            .unwrap();
        let err = host
            .recv::<ToHost>(Some(Duration::from_secs(1)))
            .unwrap_err();
        assert!(matches!(err, IpcError::Malformed(_)), "{err}");
    }
}
