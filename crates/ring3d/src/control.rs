//! The control socket: how `ring3 status`, `ring3 restart` and `ring3 stop` talk to the
//! daemon.
//!
//! A Unix stream socket (by default [`DaemonConfig::DEFAULT_SOCKET`]) carrying one JSON
//! [`Request`] per line, each answered by one JSON [`Response`] line, as many as the client
//! likes on one connection:
//!
//! ```text
//! → {"command":"status"}
//! ← {"result":"status","devices":[{"name":"fast0","pci":"0000:03:00.0",…}]}
//! → {"command":"restart","device":"fast0"}
//! ← {"result":"done","message":"fast0 restarted"}
//! → {"command":"stop","device":"fast9"}
//! ← {"result":"error","message":"no device fast9; ring3 status lists them"}
//! ```
//!
//! A line that is not a request gets an `error` response; the connection stays open.
//! The socket is owned by the daemon's user (root) and, with a `socket_group`, by that
//! group with mode 0660; without one, mode 0600.
//!
//! [`ControlServer::start`] serves it, calling a [`Handler`] for each request;
//! [`request`] is the client.
//!
//! [`DaemonConfig::DEFAULT_SOCKET`]: crate::config::DaemonConfig::DEFAULT_SOCKET

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The longest request line the server reads; longer ones are answered with an error and
/// the connection is closed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A request to the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// Every device with its state.
    Status,
    /// Restart a device's driver (also one that was stopped or gave up).
    Restart {
        /// The device's name in the config.
        device: String,
    },
    /// Stop a device's driver and leave it stopped.
    Stop {
        /// The device's name in the config.
        device: String,
    },
}

/// The daemon's answer to one [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// The answer to [`Request::Status`].
    Status {
        /// The devices in config order.
        devices: Vec<DeviceStatus>,
    },
    /// The request was carried out.
    Done {
        /// What was done, for people.
        message: String,
    },
    /// The request failed, or was not understood.
    Error {
        /// What went wrong and what to do.
        message: String,
    },
}

/// One device as `ring3 status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// The device's name in the config.
    pub name: String,
    /// Its PCI address.
    pub pci: String,
    /// The driver (`nvme`).
    pub driver: String,
    /// How it is exposed (`ublk`).
    pub expose: String,
    /// `starting`, `running`, `restarting`, `failed` or `stopped`.
    pub state: String,
    /// The driver process, while there is one.
    pub pid: Option<u32>,
    /// How often the driver has been restarted.
    pub restarts: u32,
    /// Seconds in this state.
    pub since_s: u64,
    /// Why the driver last failed, if it has.
    pub reason: Option<String>,
    /// What the system sees, e.g. `["/dev/ublkb0"]`.
    pub exposed: Vec<String>,
    /// I/O through the device since the daemon started.
    pub io: IoCounters,
    /// Per queue, for network drivers: packets, bytes, drops and errors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetQueueCounters>,
}

/// One queue of a network driver, as `ring3 net ADDR stats` shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetQueueCounters {
    /// Queue pair number.
    pub queue: u16,
    /// Frames received.
    pub rx_packets: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames lost on the way in (no buffer, or bad).
    pub rx_drops: u64,
    /// Frames sent.
    pub tx_packets: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames lost on the way out (ring or interface full).
    pub tx_drops: u64,
    /// Device errors.
    pub errors: u64,
}

/// Counts of I/O requests served by a driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoCounters {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Discards (trims).
    pub discards: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub written_bytes: u64,
    /// Requests that failed.
    pub errors: u64,
}

/// What the daemon does with each request; called on the connection's own thread.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(&self, request: Request) -> Response;
}

/// What went wrong with the control socket, on either side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket's directory could not be created.
    #[error("cannot create the control socket's directory {path}")]
    CreateDirectory {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Something other than a socket is in the way.
    #[error("{path} exists and is not a socket; remove it or choose another socket path")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Another daemon answers on the socket.
    #[error(
        "another ring3d is already serving {path}; stop it first (or give this one another \
         socket)"
    )]
    AlreadyServed {
        /// The socket.
        path: PathBuf,
    },
    /// The socket's group does not exist.
    #[error("there is no group {group:?} on this machine for the control socket; create it (groupadd --system {group}) or change socket_group")]
    UnknownGroup {
        /// The group as named.
        group: String,
    },
    /// The group database could not be read.
    #[error("looking up group {group:?} failed; check /etc/nsswitch.conf")]
    GroupLookup {
        /// The group as named.
        group: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating, binding or setting up the socket failed.
    #[error("cannot set up the control socket {path}: {what}")]
    Setup {
        /// The socket.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Client: nothing answers on the socket.
    #[error("no ring3d answers on {path}: is ring3d running? (or pass --socket PATH)")]
    NotRunning {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Client: not allowed to use the socket.
    #[error(
        "not allowed to use {path}: run as root or as a member of the socket's group \
         (socket_group in ring3d's config)"
    )]
    PermissionDenied {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Client: the daemon did not answer in time.
    #[error("ring3d did not answer on {path} within {timeout:?}; it may be stuck (check its log)")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// How long the client waited.
        timeout: Duration,
    },
    /// Client: the connection failed in another way.
    #[error("talking to ring3d on {path} failed")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Client: the answer was not a response.
    #[error(
        "ring3d on {path} sent an answer this ring3 does not understand ({detail}); are ring3 \
         and ring3d the same version?"
    )]
    BadResponse {
        /// The socket.
        path: PathBuf,
        /// What was wrong with it.
        detail: String,
    },
}

/// Shared between the server, its accept thread and its connection threads.
struct Shared {
    stopping: AtomicBool,
    /// Open connections, so that shutdown can end them.
    connections: Mutex<HashMap<u64, UnixStream>>,
    next_connection: AtomicU64,
}

/// A listening control socket; [`shutdown`](ControlServer::shutdown) (or dropping it)
/// stops it and removes the socket file.
pub struct ControlServer {
    path: PathBuf,
    /// The socket file's device and inode, to remove only our own.
    identity: (u64, u64),
    listener: UnixListener,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ControlServer {
    /// Creates the socket's directory (mode 0755) if missing, replaces a stale socket
    /// (refusing if another daemon answers on it), binds, gives the socket to `group`
    /// (mode 0660) or to no group (mode 0600), and serves each connection on its own
    /// thread, calling `handler` for each request line. Returns once listening.
    pub fn start(
        path: &Path,
        group: Option<&str>,
        handler: Arc<dyn Handler>,
    ) -> Result<ControlServer, ControlError> {
        let setup = |what: &'static str| {
            move |source| ControlError::Setup {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        // Check the group first: a typo in the config should not leave a socket behind.
        let gid = match group {
            None => None,
            Some(group) => match crate::sandbox::group_id(group) {
                Ok(Some(gid)) => Some(gid),
                Ok(None) => {
                    return Err(ControlError::UnknownGroup {
                        group: group.to_string(),
                    })
                }
                Err(source) => {
                    return Err(ControlError::GroupLookup {
                        group: group.to_string(),
                        source,
                    })
                }
            },
        };
        if let Some(directory) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(directory)
                .map_err(|source| ControlError::CreateDirectory {
                    path: directory.to_path_buf(),
                    source,
                })?;
        }
        remove_stale(path)?;

        // Bind under a temporary name and rename into place once owner and mode are
        // right, so that nobody can connect in between whatever the umask is.
        let file_name = path.file_name().unwrap_or_default().to_string_lossy();
        let temporary = path.with_file_name(format!(".{file_name}.{}", std::process::id()));
        let _ = fs::remove_file(&temporary);
        let listener = UnixListener::bind(&temporary).map_err(setup("bind"))?;
        let prepared = std::os::unix::fs::chown(&temporary, None, gid)
            .map_err(setup("chown"))
            .and_then(|()| {
                let mode = if gid.is_some() { 0o660 } else { 0o600 };
                fs::set_permissions(&temporary, fs::Permissions::from_mode(mode))
                    .map_err(setup("chmod"))
            })
            .and_then(|()| fs::rename(&temporary, path).map_err(setup("rename into place")));
        if let Err(error) = prepared {
            let _ = fs::remove_file(&temporary);
            return Err(error);
        }
        let metadata = fs::symlink_metadata(path).map_err(setup("stat"))?;

        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(0),
        });
        let accepting = listener.try_clone().map_err(setup("dup"))?;
        let acceptor = std::thread::Builder::new()
            .name("control-accept".to_string())
            .spawn({
                let shared = Arc::clone(&shared);
                move || accept_loop(&accepting, &shared, &handler)
            })
            .map_err(setup("starting its thread"))?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            identity: (metadata.dev(), metadata.ino()),
            listener,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, ends open connections and removes the socket file.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket wakes the thread blocked in accept(2).
        // SAFETY: the descriptor is the listener's, open for as long as `self` is.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let connections = self
            .shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for stream in connections.values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        drop(connections);
        // Only our own socket: another daemon may have replaced it since.
        if fs::symlink_metadata(&self.path)
            .is_ok_and(|metadata| (metadata.dev(), metadata.ino()) == self.identity)
        {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Makes way for a new socket at `path`: nothing there, or a socket nobody answers on.
fn remove_stale(path: &Path) -> Result<(), ControlError> {
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ControlError::Setup {
                path: path.to_path_buf(),
                what: "stat",
                source,
            })
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(ControlError::AlreadyServed {
            path: path.to_path_buf(),
        });
    }
    fs::remove_file(path).map_err(|source| ControlError::Setup {
        path: path.to_path_buf(),
        what: "removing the stale socket",
        source,
    })
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>, handler: &Arc<dyn Handler>) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                // Out of descriptors or memory: wait instead of spinning.
                eprintln!("ring3d: control socket: accepting a connection failed: {error}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            shared
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, clone);
        }
        let spawned = std::thread::Builder::new()
            .name("control-conn".to_string())
            .spawn({
                let shared = Arc::clone(shared);
                let handler = Arc::clone(handler);
                move || {
                    serve(stream, handler.as_ref());
                    shared
                        .connections
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&id);
                }
            });
        if spawned.is_err() {
            // The stream was moved into the closure and dropped with it: the client sees
            // the connection close.
            shared
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        }
    }
}

/// Answers the requests of one connection until the client closes it.
fn serve(stream: UnixStream, handler: &dyn Handler) {
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let mut writer = io::BufWriter::new(writer);
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line);
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let too_long = line.len() > MAX_REQUEST_BYTES && !line.ends_with(b"\n");
        let response = if too_long {
            Response::Error {
                message: format!(
                    "request longer than {MAX_REQUEST_BYTES} bytes; send one JSON object per \
                     line"
                ),
            }
        } else {
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            match serde_json::from_str::<Request>(text) {
                Ok(request) => handler.handle(request),
                Err(error) => Response::Error {
                    message: format!(
                        "malformed request ({error}); send one JSON object per line, such as \
                         {{\"command\":\"status\"}} or {{\"command\":\"restart\",\"device\":\"NAME\"}}"
                    ),
                },
            }
        };
        if send(&mut writer, &response).is_err() || too_long {
            return;
        }
    }
}

fn send(writer: &mut impl Write, message: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *writer, message)?;
    writer.write_all(b"\n")?;
    writer.flush()
}

/// Sends one request to the daemon at `path` and waits at most `timeout` (per read and
/// write) for its response.
pub fn request(
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Response, ControlError> {
    let io_error = |source: io::Error| {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            ControlError::Timeout {
                path: path.to_path_buf(),
                timeout,
            }
        } else {
            ControlError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
        io::ErrorKind::PermissionDenied => ControlError::PermissionDenied {
            path: path.to_path_buf(),
            source,
        },
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ControlError::NotRunning {
            path: path.to_path_buf(),
            source,
        },
        _ => ControlError::Io {
            path: path.to_path_buf(),
            source,
        },
    })?;
    // A zero timeout would mean "none" to the socket; make it the shortest there is.
    let timeout_or_minimum = timeout.max(Duration::from_millis(1));
    stream
        .set_read_timeout(Some(timeout_or_minimum))
        .and_then(|()| stream.set_write_timeout(Some(timeout_or_minimum)))
        .map_err(io_error)?;
    send(&mut &stream, request).map_err(io_error)?;
    let mut line = String::new();
    BufReader::new(&stream)
        .take(64 << 20)
        .read_line(&mut line)
        .map_err(io_error)?;
    if line.is_empty() {
        return Err(ControlError::BadResponse {
            path: path.to_path_buf(),
            detail: "it closed the connection without answering".to_string(),
        });
    }
    serde_json::from_str(line.trim_end()).map_err(|error| ControlError::BadResponse {
        path: path.to_path_buf(),
        detail: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Knows one device, `fast0`.
    struct FakeDaemon;

    pub(super) fn sample_device() -> DeviceStatus {
        DeviceStatus {
            name: "fast0".to_string(),
            pci: "0000:03:00.0".to_string(),
            driver: "nvme".to_string(),
            expose: "ublk".to_string(),
            state: "running".to_string(),
            pid: Some(4242),
            restarts: 1,
            since_s: 30,
            reason: None,
            exposed: vec!["/dev/ublkb0".to_string()],
            io: IoCounters {
                reads: 10,
                writes: 5,
                ..IoCounters::default()
            },
            net: Vec::new(),
        }
    }

    impl Handler for FakeDaemon {
        fn handle(&self, request: Request) -> Response {
            match request {
                Request::Status => Response::Status {
                    devices: vec![sample_device()],
                },
                Request::Restart { device } | Request::Stop { device } if device == "fast0" => {
                    Response::Done {
                        message: format!("{device} restarted"),
                    }
                }
                Request::Restart { device } | Request::Stop { device } => Response::Error {
                    message: format!("no device {device}; ring3 status lists them"),
                },
            }
        }
    }

    fn start(path: &Path, group: Option<&str>) -> ControlServer {
        ControlServer::start(path, group, Arc::new(FakeDaemon)).expect("the server starts")
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[test]
    fn requests_and_responses_are_one_json_line_each() {
        assert_eq!(
            serde_json::to_string(&Request::Restart {
                device: "fast0".into()
            })
            .expect("serializable"),
            r#"{"command":"restart","device":"fast0"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Done {
                message: "ok".into()
            })
            .expect("serializable"),
            r#"{"result":"done","message":"ok"}"#
        );
    }

    #[test]
    fn status_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run/ring3/ring3d.sock");
        let server = start(&path, None);
        let response = request(&path, &Request::Status, TIMEOUT).expect("an answer");
        assert_eq!(
            response,
            Response::Status {
                devices: vec![sample_device()]
            }
        );
        let directory = fs::metadata(path.parent().expect("a parent")).expect("created");
        assert_eq!(directory.permissions().mode() & 0o777, 0o755);
        server.shutdown();
        assert!(!path.exists(), "the socket is removed on shutdown");
    }

    #[test]
    fn errors_from_the_handler_reach_the_client() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ring3d.sock");
        let _server = start(&path, None);
        let response = request(
            &path,
            &Request::Stop {
                device: "fast9".into(),
            },
            TIMEOUT,
        )
        .expect("an answer");
        assert_eq!(
            response,
            Response::Error {
                message: "no device fast9; ring3 status lists them".into()
            }
        );
    }

    #[test]
    fn the_socket_is_0600_without_a_group_and_0660_with_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("private.sock");
        let _private = start(&path, None);
        let metadata = fs::metadata(&path).expect("the socket");
        assert!(metadata.file_type().is_socket());
        assert_eq!(metadata.permissions().mode() & 0o777, 0o600);

        // Any group this machine has will do; the chown needs root unless it is ours.
        let Some((group, gid)) = ["nogroup", "nobody", "daemon", "users"]
            .into_iter()
            .find_map(|name| Some((name, crate::sandbox::group_id(name).ok()??)))
        else {
            eprintln!("skipped the group half: no common group on this machine");
            return;
        };
        let path = dir.path().join("shared.sock");
        match ControlServer::start(&path, Some(group), Arc::new(FakeDaemon)) {
            Ok(_shared) => {
                let metadata = fs::metadata(&path).expect("the socket");
                assert_eq!(metadata.permissions().mode() & 0o777, 0o660);
                assert_eq!(metadata.gid(), gid);
            }
            Err(ControlError::Setup { what: "chown", .. }) => {
                eprintln!("skipped the group half: changing a socket's group needs root");
            }
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn an_unknown_group_is_refused_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ring3d.sock");
        let error = ControlServer::start(&path, Some("no-such-ring3-group"), Arc::new(FakeDaemon))
            .expect_err("unknown group");
        assert!(
            matches!(error, ControlError::UnknownGroup { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("groupadd"), "{error}");
        assert_eq!(fs::read_dir(dir.path()).expect("readable").count(), 0);
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ring3d.sock");
        // A socket file nobody listens on, as a daemon that was killed leaves behind.
        drop(UnixListener::bind(&path).expect("bind"));
        assert!(path.exists());
        let _server = start(&path, None);
        assert!(matches!(
            request(&path, &Request::Status, TIMEOUT),
            Ok(Response::Status { .. })
        ));
    }

    #[test]
    fn a_second_server_is_refused_while_the_first_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ring3d.sock");
        let first = start(&path, None);
        let error = ControlServer::start(&path, None, Arc::new(FakeDaemon)).expect_err("refused");
        assert!(
            matches!(error, ControlError::AlreadyServed { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("already serving"), "{error}");
        // The refused server left the first one's socket alone.
        assert!(matches!(
            request(&path, &Request::Status, TIMEOUT),
            Ok(Response::Status { .. })
        ));
        first.shutdown();
    }

    #[test]
    fn something_else_at_the_path_is_not_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ring3d.sock");
        fs::write(&path, "not a socket").expect("write");
        let error = ControlServer::start(&path, None, Arc::new(FakeDaemon)).expect_err("refused");
        assert!(
            matches!(error, ControlError::NotASocket { .. }),
            "{error:?}"
        );
        assert_eq!(
            fs::read_to_string(&path).expect("still there"),
            "not a socket"
        );
    }

    #[test]
    fn a_malformed_line_gets_an_error_and_the_connection_stays_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ring3d.sock");
        let _server = start(&path, None);
        let stream = UnixStream::connect(&path).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut lines = BufReader::new(&stream).lines();
        for bad in [
            "this is not json",
            r#"{"command":"reboot"}"#,
            r#"{"command":"stop"}"#,
        ] {
            (&stream)
                .write_all(format!("{bad}\n").as_bytes())
                .expect("send");
            let answer = lines.next().expect("a line").expect("readable");
            let response: Response = serde_json::from_str(&answer).expect("a response");
            match response {
                Response::Error { message } => {
                    assert!(message.starts_with("malformed request"), "{message}")
                }
                other => panic!("{bad:?} answered with {other:?}"),
            }
        }
        (&stream)
            .write_all(b"{\"command\":\"status\"}\n")
            .expect("send");
        let answer = lines.next().expect("a line").expect("readable");
        assert!(answer.starts_with(r#"{"result":"status""#), "{answer}");
    }

    #[test]
    fn the_client_says_what_to_do_when_no_daemon_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ring3d.sock");
        let error = request(&path, &Request::Status, TIMEOUT).expect_err("nothing there");
        assert!(
            matches!(error, ControlError::NotRunning { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("is ring3d running?"), "{error}");
        // A stale socket file: refused connection, same advice.
        drop(UnixListener::bind(&path).expect("bind"));
        let error = request(&path, &Request::Status, TIMEOUT).expect_err("nobody listens");
        assert!(
            matches!(error, ControlError::NotRunning { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn a_daemon_that_does_not_answer_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ring3d.sock");
        let _listener = UnixListener::bind(&path).expect("bind");
        let error =
            request(&path, &Request::Status, Duration::from_millis(50)).expect_err("no answer");
        assert!(matches!(error, ControlError::Timeout { .. }), "{error:?}");
    }

    #[test]
    fn shutdown_ends_open_connections() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ring3d.sock");
        let server = start(&path, None);
        let stream = UnixStream::connect(&path).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        // Let the server register the connection.
        (&stream)
            .write_all(b"{\"command\":\"status\"}\n")
            .expect("send");
        let mut lines = BufReader::new(&stream).lines();
        assert!(lines.next().is_some());
        server.shutdown();
        assert!(matches!(lines.next(), None | Some(Err(_))));
    }
}
