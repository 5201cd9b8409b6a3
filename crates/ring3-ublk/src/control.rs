//! Control commands on `/dev/ublk-control`: adding, configuring, starting, stopping,
//! recovering and deleting devices. They need `CAP_SYS_ADMIN`, so in ring3 only the root
//! daemon issues them, on behalf of a server process whose pid it passes.
//!
//! Each command is an `IORING_OP_URING_CMD` with a [`ublksrv_ctrl_cmd`] in the 80-byte
//! command area of a 128-byte SQE. ublk_drv runs control commands from io_uring's worker
//! threads, and some of them sleep there: START_DEV and END_USER_RECOVERY until every
//! queue has fetched all its tags, DEL_DEV until the last `/dev/ublkcN` descriptor is
//! closed. So every command waits for its completion with a timeout, and on timeout is
//! cancelled with `IORING_OP_ASYNC_CANCEL`, which interrupts the worker's sleep.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use rustix::fs::{Mode, OFlags};

use crate::device::{DeviceInfo, DeviceSpec, Params};
use crate::error::{Error, Result};
use crate::sys::{self, ublk_params, ublksrv_ctrl_cmd, ublksrv_ctrl_dev_info};

/// The control node ublk_drv creates when it is loaded.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// How long commands that do not wait for a server may take (they only sleep on
/// ublk_drv's locks, or DEL_DEV on the char device being closed).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a cancelled command gets to report its end.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// How often START_USER_RECOVERY is retried while the old server is still going away,
/// and the char node is looked for.
const RETRY_INTERVAL: Duration = Duration::from_millis(50);

/// A user_data no command uses: the cancellation request's own completion.
const CANCEL_USER_DATA: u64 = u64::MAX;

/// Hints for [`Error::CommandTimeout`].
const HINT_QUEUES: &str = "every queue of the server must have fetched all its tags \
     (Queue::fetch for each tag, then Queue::submit or Queue::poll), from the process whose pid was given";
const HINT_LOCKED: &str = "ublk_drv is busy with this device; for DEL_DEV, every copy of \
     /dev/ublkcN must be closed first (the device is deleted when the last one closes)";

/// The control node and the io_uring its commands go through.
///
/// `Control` is `Send + Sync`; commands from several threads run one at a time.
#[derive(Debug)]
pub struct Control {
    device: OwnedFd,
    ring: Mutex<ControlRing>,
}

struct ControlRing {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    next_user_data: u64,
}

impl std::fmt::Debug for ControlRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlRing")
            .field("next_user_data", &self.next_user_data)
            .finish_non_exhaustive()
    }
}

/// The ioctl-encoded command codes this crate sends, with their names for errors.
#[derive(Debug, Clone, Copy)]
struct Command {
    name: &'static str,
    op: u32,
    hint: &'static str,
}

const ADD_DEV: Command = Command {
    name: "ADD_DEV",
    op: sys::UBLK_U_CMD_ADD_DEV,
    hint: HINT_LOCKED,
};
const SET_PARAMS: Command = Command {
    name: "SET_PARAMS",
    op: sys::UBLK_U_CMD_SET_PARAMS,
    hint: HINT_LOCKED,
};
const START_DEV: Command = Command {
    name: "START_DEV",
    op: sys::UBLK_U_CMD_START_DEV,
    hint: HINT_QUEUES,
};
const STOP_DEV: Command = Command {
    name: "STOP_DEV",
    op: sys::UBLK_U_CMD_STOP_DEV,
    hint: "the server must keep serving its queues until the device has stopped",
};
const DEL_DEV: Command = Command {
    name: "DEL_DEV",
    op: sys::UBLK_U_CMD_DEL_DEV,
    hint: HINT_LOCKED,
};
const GET_DEV_INFO: Command = Command {
    name: "GET_DEV_INFO",
    op: sys::UBLK_U_CMD_GET_DEV_INFO,
    hint: HINT_LOCKED,
};
const START_USER_RECOVERY: Command = Command {
    name: "START_USER_RECOVERY",
    op: sys::UBLK_U_CMD_START_USER_RECOVERY,
    hint: HINT_LOCKED,
};
const END_USER_RECOVERY: Command = Command {
    name: "END_USER_RECOVERY",
    op: sys::UBLK_U_CMD_END_USER_RECOVERY,
    hint: HINT_QUEUES,
};

impl Control {
    /// Opens `/dev/ublk-control` and sets up the ring for its commands. Needs root.
    pub fn open() -> Result<Control> {
        let device = rustix::fs::open(CONTROL_PATH, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
            .map_err(|errno| Error::from_open(PathBuf::from(CONTROL_PATH), errno.into()))?;
        // IoUring<Entry128> sets IORING_SETUP_SQE128, which ublk_drv requires for control
        // commands; commands run one at a time, so a few entries are plenty (the cancel
        // request takes a second one).
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(4)
            .map_err(|source| Error::Ring {
                operation: "setup (control ring)",
                source,
            })?;
        Ok(Control {
            device,
            ring: Mutex::new(ControlRing {
                ring,
                next_user_data: 0,
            }),
        })
    }

    /// Adds a device (ADD_DEV). It is dead until [`Control::set_params`] and
    /// [`Control::start`]; the returned info says what the kernel granted.
    pub fn add(&self, spec: &DeviceSpec) -> Result<DeviceInfo> {
        let info = spec.to_dev_info(rustix::param::page_size())?;
        let id = info.dev_id;
        let info = self.command_with(ADD_DEV, id, 0, Box::new(info), COMMAND_TIMEOUT)?;
        Ok(DeviceInfo::from_raw(&info))
    }

    /// Sets the block-layer limits of a device that has not been started (SET_PARAMS).
    pub fn set_params(&self, id: u32, params: &Params) -> Result<()> {
        let raw: ublk_params = params.to_raw(rustix::param::page_size())?;
        self.command_with(SET_PARAMS, id, 0, Box::new(raw), COMMAND_TIMEOUT)?;
        Ok(())
    }

    /// Starts a device (START_DEV) for the server process `server_pid`: the block device
    /// `/dev/ublkbN` appears.
    ///
    /// ublk_drv completes the command only once every queue has fetched all its tags, so
    /// the server's queues must be running (in another thread or process) while this
    /// waits; after `timeout` the command is cancelled and [`Error::CommandTimeout`]
    /// returned. `server_pid` is the process (thread-group) ID of the server.
    pub fn start(&self, id: u32, server_pid: i32, timeout: Duration) -> Result<()> {
        let pid = checked_pid(server_pid)?;
        self.command(START_DEV, id, pid, timeout)
    }

    /// Stops a device (STOP_DEV): the block device goes away and, once the requests in
    /// flight have been completed, the server's queues are aborted
    /// ([`Queue::poll`](crate::Queue::poll) returns `Ok(false)`). The server must keep
    /// serving until then.
    pub fn stop(&self, id: u32) -> Result<()> {
        self.command(STOP_DEV, id, 0, COMMAND_TIMEOUT)
    }

    /// Deletes a stopped device (DEL_DEV). ublk_drv finishes only once every descriptor
    /// of `/dev/ublkcN` is closed: drop the queues and the char device first.
    pub fn delete(&self, id: u32) -> Result<()> {
        self.command(DEL_DEV, id, 0, COMMAND_TIMEOUT)
    }

    /// Reads a device's description and state (GET_DEV_INFO).
    pub fn info(&self, id: u32) -> Result<DeviceInfo> {
        let info = self.command_with(
            GET_DEV_INFO,
            id,
            0,
            Box::new(ublksrv_ctrl_dev_info::default()),
            COMMAND_TIMEOUT,
        )?;
        Ok(DeviceInfo::from_raw(&info))
    }

    /// Prepares a device whose server died for a new server (START_USER_RECOVERY); the
    /// device must have been added with [`DeviceSpec::recovery`].
    ///
    /// ublk_drv refuses (EBUSY) until the old server is completely gone: every copy of
    /// its `/dev/ublkcN` descriptor closed and the device quiesced. This retries until
    /// `timeout`, then fails with [`Error::RecoveryBusy`].
    pub fn start_recovery(&self, id: u32, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.command(START_USER_RECOVERY, id, 0, COMMAND_TIMEOUT) {
                Err(Error::Command { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) =>
                {
                    if Instant::now() >= deadline {
                        let state = match self.info(id) {
                            Ok(info) => info.state.to_string(),
                            Err(error) => format!("unknown: {error}"),
                        };
                        return Err(Error::RecoveryBusy { id, timeout, state });
                    }
                    thread::sleep(RETRY_INTERVAL);
                }
                other => return other,
            }
        }
    }

    /// Hands a recovering device to the new server process `server_pid`
    /// (END_USER_RECOVERY); waits like [`Control::start`] until its queues have fetched
    /// all their tags, then the requests queued meanwhile go to it.
    pub fn end_recovery(&self, id: u32, server_pid: i32, timeout: Duration) -> Result<()> {
        let pid = checked_pid(server_pid)?;
        self.command(END_USER_RECOVERY, id, pid, timeout)
    }

    /// Opens the device's char node `/dev/ublkcN` (read-write, close-on-exec), waiting up
    /// to `timeout` for it to appear after [`Control::add`].
    ///
    /// ublk_drv allows one open descriptor at a time (EBUSY otherwise), and recovery needs
    /// every copy closed: hand the descriptor to the server and close it here.
    pub fn open_char_device(&self, id: u32, timeout: Duration) -> Result<OwnedFd> {
        let path = PathBuf::from(format!("/dev/ublkc{id}"));
        let deadline = Instant::now() + timeout;
        loop {
            match rustix::fs::open(&path, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()) {
                Ok(fd) => return Ok(fd),
                Err(rustix::io::Errno::NOENT) if Instant::now() < deadline => {
                    thread::sleep(RETRY_INTERVAL)
                }
                Err(rustix::io::Errno::NOENT) => {
                    return Err(Error::CharDeviceTimeout { path, timeout })
                }
                Err(errno) => return Err(Error::from_open(path, errno.into())),
            }
        }
    }

    /// Runs a command without a payload.
    fn command(&self, command: Command, id: u32, data: u64, timeout: Duration) -> Result<()> {
        let mut ring = self.lock();
        let header = ublksrv_ctrl_cmd {
            dev_id: id,
            queue_id: u16::MAX,
            data: [data],
            ..Default::default()
        };
        match ring.run(self.device.as_raw_fd(), command, &header, timeout)? {
            Completion::Done(0..) => Ok(()),
            Completion::Done(errno) => Err(Error::from_command(command.name, id, -errno)),
            Completion::Cancelled | Completion::Abandoned => {
                Err(command_timeout(command, id, timeout))
            }
        }
    }

    /// Runs a command that reads or writes `payload`, and returns the payload.
    fn command_with<T>(
        &self,
        command: Command,
        id: u32,
        data: u64,
        mut payload: Box<T>,
        timeout: Duration,
    ) -> Result<Box<T>> {
        let mut ring = self.lock();
        let header = ublksrv_ctrl_cmd {
            dev_id: id,
            queue_id: u16::MAX,
            len: size_of::<T>() as u16,
            addr: std::ptr::from_mut::<T>(&mut *payload) as u64,
            data: [data],
            ..Default::default()
        };
        match ring.run(self.device.as_raw_fd(), command, &header, timeout)? {
            Completion::Done(0..) => Ok(payload),
            Completion::Done(errno) => Err(Error::from_command(command.name, id, -errno)),
            Completion::Cancelled => Err(command_timeout(command, id, timeout)),
            Completion::Abandoned => {
                // The kernel still holds the payload's address and may write it at any
                // time: it must never be freed.
                Box::leak(payload);
                Err(command_timeout(command, id, timeout))
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, ControlRing> {
        // A panic while holding the lock leaves at worst a stale completion in the ring,
        // which the next command skips by its user_data.
        self.ring
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn checked_pid(pid: i32) -> Result<u64> {
    if pid <= 0 {
        return Err(Error::InvalidSpec {
            what: "server pid",
            value: pid as u64,
            rule: "a positive process ID",
        });
    }
    Ok(pid as u64)
}

fn command_timeout(command: Command, id: u32, timeout: Duration) -> Error {
    Error::CommandTimeout {
        command: command.name,
        id,
        timeout,
        hint: command.hint,
    }
}

/// How a control command ended.
enum Completion {
    /// The kernel completed it with this result (negative errno on failure).
    Done(i32),
    /// It timed out and was cancelled: the kernel is done with its payload.
    Cancelled,
    /// It timed out, was cancelled, and did not report back: the kernel may still use
    /// its payload.
    Abandoned,
}

impl ControlRing {
    /// Submits one command and waits for it; on timeout cancels it and waits for the
    /// cancellation to take. A command that completes despite the cancellation counts
    /// as done.
    fn run(
        &mut self,
        device: i32,
        command: Command,
        header: &ublksrv_ctrl_cmd,
        timeout: Duration,
    ) -> Result<Completion> {
        let user_data = self.next_user_data;
        self.next_user_data = (self.next_user_data + 1) % CANCEL_USER_DATA;
        let entry = opcode::UringCmd80::new(types::Fd(device), command.op)
            .cmd(sys::ctrl_cmd_bytes(header))
            .build()
            .user_data(user_data);
        self.push(&entry)?;
        if let Some(result) = self.wait_for(user_data, timeout)? {
            // A cancelled START/END waits with -EINTR; anything else is the answer.
            return Ok(Completion::Done(result));
        }
        let cancel = opcode::AsyncCancel::new(user_data)
            .build()
            .user_data(CANCEL_USER_DATA)
            .into();
        self.push(&cancel)?;
        Ok(match self.wait_for(user_data, CANCEL_GRACE)? {
            Some(result @ 0..) => Completion::Done(result),
            Some(_) => Completion::Cancelled,
            None => Completion::Abandoned,
        })
    }

    fn push(&mut self, entry: &squeue::Entry128) -> Result<()> {
        // SAFETY: the command's payload (if any) is a Box the caller keeps alive until the
        // command completes, or leaks if it never reports back; the header is copied into
        // the SQE.
        if unsafe { self.ring.submission().push(entry) }.is_err() {
            // Only leftovers of abandoned commands can fill the queue: flush them.
            self.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(entry) }.map_err(|_| Error::Ring {
                operation: "push (control ring full)",
                source: io::Error::from_raw_os_error(libc::EBUSY),
            })?;
        }
        self.submit()
    }

    fn submit(&mut self) -> Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(error) if error.raw_os_error() == Some(libc::EINTR) => continue,
                Err(source) => {
                    return Err(Error::Ring {
                        operation: "submit (control ring)",
                        source,
                    })
                }
            }
        }
    }

    /// Waits up to `timeout` for the completion with `user_data`, skipping the others
    /// (cancellations, and commands abandoned earlier that completed late).
    fn wait_for(&mut self, user_data: u64, timeout: Duration) -> Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            for entry in self.ring.completion() {
                if entry.user_data() == user_data {
                    return Ok(Some(entry.result()));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let timespec = types::Timespec::from(left);
            let args = types::SubmitArgs::new().timespec(&timespec);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(source) => {
                    return Err(Error::Ring {
                        operation: "wait (control ring)",
                        source,
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_is_shareable_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Control>();
    }

    #[test]
    fn pids_must_be_positive() {
        assert!(matches!(checked_pid(0), Err(Error::InvalidSpec { .. })));
        assert!(matches!(checked_pid(-1), Err(Error::InvalidSpec { .. })));
        assert_eq!(checked_pid(4242).unwrap(), 4242);
    }

    #[test]
    fn timeouts_name_the_command_and_what_to_check() {
        let error = command_timeout(START_DEV, 2, Duration::from_secs(3));
        let text = error.to_string();
        assert!(
            text.contains("START_DEV") && text.contains("device 2"),
            "{text}"
        );
        assert!(text.contains("fetched all its tags"), "{text}");
    }
}
