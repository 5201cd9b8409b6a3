//! The sandbox a driver process enters before it touches device data.
//!
//! Each driver runs in its own process, started as root so that it can receive its
//! VFIO and ublk file descriptors. Once it holds them it calls [`Sandbox::enter`], which,
//! in this order:
//!
//! 1. sets `RLIMIT_MEMLOCK` to [`Sandbox::memlock_bytes`] (soft and hard): the DMA memory
//!    the driver maps through VFIO is pinned and counted against it once the driver has
//!    lost `CAP_IPC_LOCK`;
//! 2. clears the ambient capabilities and empties the capability bounding set (while it
//!    still holds `CAP_SETPCAP`);
//! 3. drops the supplementary groups and switches real, effective and saved group and
//!    user IDs to the driver user (glibc applies these to every thread);
//! 4. empties the permitted, effective and inheritable capability sets;
//! 5. sets `PR_SET_NO_NEW_PRIVS` and installs the seccomp filters below on every thread
//!    (`SECCOMP_FILTER_FLAG_TSYNC`);
//! 6. checks that all of it holds (IDs, groups, all five capability sets, no-new-privs,
//!    seccomp mode) and fails if anything is left.
//!
//! Call it before the process starts threads: capability sets and the bounding set belong
//! to each thread. (Threads started earlier lose their permitted and effective
//! capabilities with the user switch, and get the seccomp filter through TSYNC, but keep
//! their bounding and inheritable sets.)
//!
//! # What the seccomp filter allows, and why
//!
//! Anything not listed fails with `EPERM`. The driver opens nothing itself: every file it
//! needs arrives as a descriptor, so path-based calls (`open`, `openat`, `stat` of a
//! path, `execve`), new sockets, process control and privilege changes are refused.
//!
//! | group | system calls | why |
//! |---|---|---|
//! | descriptors it was given | `read`, `write`, `readv`, `writev`, `pread64`, `pwrite64`, `lseek`, `close`, `fcntl`, `dup`, `dup3` (`dup2` on x86_64), `fstat` | I/O on the VFIO, ublk and control descriptors; std's `File` asks `fstat` for a size hint |
//! | control channel | `sendmsg`, `recvmsg`, `sendto`, `recvfrom` | messages and descriptors on the socket the daemon handed over (no `socket`, `connect`, `bind`) |
//! | waiting | `poll`/`ppoll`, `epoll_create1`, `epoll_ctl`, `epoll_wait`/`epoll_pwait`, `eventfd2`, `timerfd_create`/`settime`/`gettime` | waiting for interrupts (VFIO eventfds), messages and USB transfers (usbfs, timed with a timerfd) |
//! | VFIO | `ioctl`, except `TIOCSTI` and `TIOCLINUX` | the driver configures the device and its DMA mappings with ioctls on its VFIO descriptors; the two refused requests would let it type into a terminal it inherited |
//! | ublk data path | `io_uring_setup`, `io_uring_enter`, `io_uring_register` | ublk hands requests to the driver through io_uring |
//! | memory | `mmap`, `munmap`, `mprotect`, `mremap`, `madvise`, `brk`, `mlock`, `munlock` | the allocator, thread stacks, BAR mappings, pinning DMA buffers |
//! | threads | `clone` with `CLONE_THREAD` only, `clone3` (answered `ENOSYS`, see below), `set_robust_list`, `rseq`, `futex`, `sched_yield`, `sched_getaffinity`, `exit`, `exit_group` | std threads and their locks; a forked child could keep the device's descriptors open after the daemon has killed the driver, so `clone` without `CLONE_THREAD` is refused |
//! | signals | `rt_sigaction`, `rt_sigprocmask`, `rt_sigreturn`, `sigaltstack`, `restart_syscall`, `tgkill` to this process only | std's stack-overflow handler; `abort()` (and so a panic that aborts) raises `SIGABRT` with `tgkill` on itself. `kill`, and `tgkill` of another process, are refused |
//! | time | `clock_gettime`, `clock_getres`, `gettimeofday`, `clock_nanosleep`, `nanosleep` | timeouts and sleeps (usually served by the vDSO without a system call) |
//! | identity, read only | `getpid`, `gettid`, `getuid`, `geteuid`, `getgid`, `getegid`, `getresuid`, `getresgid`, `getgroups`, `capget`, `prlimit64` reading this process's limits only | std, and the check at the end of [`Sandbox::enter`] |
//! | `prctl` | `PR_SET_NAME`, `PR_GET_NAME`, `PR_GET_NO_NEW_PRIVS`, `PR_GET_SECCOMP`, `PR_CAPBSET_READ`, `PR_CAP_AMBIENT_IS_SET` | thread names, and the check at the end of [`Sandbox::enter`] |
//! | randomness | `getrandom` | std's `HashMap` seeds |
//!
//! `clone3` passes its flags in memory a filter cannot read, so a second, earlier filter
//! answers it with `ENOSYS`; glibc then falls back to `clone`, whose flags the main filter
//! checks. (The main filter allows `clone3` so that the earlier filter's answer is the one
//! the caller sees.)
//!
//! io_uring requests are not system calls, so seccomp does not see them: through a ring the
//! driver could still open what the driver user may open. That user's own file
//! permissions are the limit there; give it none beyond what a driver needs.
//!
//! # Checking a machine
//!
//! [`sandbox_check_main`] (`ring3d sandbox-check --user USER`) enters the sandbox in a
//! process of its own and prints a [`SandboxReport`] as JSON: the IDs, capabilities,
//! no-new-privs and seccomp mode the kernel reports, and the outcome of calls that must
//! still work (a thread, `mmap`, `mlock`, pipe I/O) and of calls that must be refused
//! (`openat`, `socket`, `execve`, `fork`, `kill`).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!(
    "the driver sandbox's seccomp allowlist covers x86_64 and aarch64 only; add this \
     architecture's system calls to crates/ring3d/src/sandbox.rs"
);

#[cfg(target_arch = "x86_64")]
const TARGET_ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const TARGET_ARCH: TargetArch = TargetArch::aarch64;

/// An unprivileged identity for a driver process, and the locked-memory limit it gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    /// The user ID the driver runs as; never 0.
    pub uid: u32,
    /// Its group ID (the user's primary group); never 0.
    pub gid: u32,
    /// `RLIMIT_MEMLOCK`, soft and hard, in bytes: how much DMA memory the driver may pin.
    pub memlock_bytes: u64,
}

/// Why a sandbox could not be set up or entered.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The user is root, or has root's group.
    #[error(
        "user {user:?} is root or in root's group (uid {uid}, gid {gid}); drivers must run as \
         an unprivileged user: create one (useradd --system --no-create-home ring3) and name \
         it as driver_user"
    )]
    Root {
        /// The user as named.
        user: String,
        /// Its user ID.
        uid: u32,
        /// Its group ID.
        gid: u32,
    },
    /// No such user on this machine.
    #[error(
        "there is no user {user:?} on this machine; create it (useradd --system \
         --no-create-home NAME) or name an existing unprivileged user"
    )]
    UnknownUser {
        /// The user as named.
        user: String,
    },
    /// The user database could not be read.
    #[error("looking up user {user:?} in the user database failed; check /etc/nsswitch.conf")]
    UserLookup {
        /// The user as named.
        user: String,
        /// What the lookup returned.
        #[source]
        source: io::Error,
    },
    /// `RLIMIT_MEMLOCK` could not be set.
    #[error(
        "setting RLIMIT_MEMLOCK to {wanted} bytes failed (hard limit now {hard} bytes); raising \
         it needs CAP_SYS_RESOURCE: run ring3d as root with that capability, raise the limit \
         it starts with (LimitMEMLOCK= in its systemd unit), or ask for less"
    )]
    Memlock {
        /// The limit asked for.
        wanted: u64,
        /// The hard limit in force.
        hard: u64,
        /// What `setrlimit` returned.
        #[source]
        source: io::Error,
    },
    /// A step of dropping privileges failed.
    #[error(
        "{step} failed; a driver process must start as root (with CAP_SETUID, CAP_SETGID and \
         CAP_SETPCAP) to enter its sandbox"
    )]
    Drop {
        /// The step, with its arguments.
        step: String,
        /// What the system call returned.
        #[source]
        source: io::Error,
    },
    /// The seccomp filter could not be built (a bug in the allowlist).
    #[error("building the seccomp filter failed; the allowlist in sandbox.rs is inconsistent")]
    Filter(#[source] seccompiler::BackendError),
    /// The seccomp filter could not be installed.
    #[error(
        "installing the seccomp filter failed; the kernel needs CONFIG_SECCOMP_FILTER, and no \
         other thread may have a conflicting filter"
    )]
    Seccomp(#[source] seccompiler::Error),
    /// After entering, something that should be gone is still there.
    #[error("the sandbox is incomplete after entering it: {0}; not running the driver")]
    Incomplete(String),
}

impl Sandbox {
    /// Looks up a user by name or numeric ID (`"ring3"`, `"nobody"`, `"65534"`); a numeric
    /// ID must have an entry in the user database, which gives its group. Refuses root
    /// (user or group 0) and unknown users.
    pub fn for_user(user: &str, memlock_bytes: u64) -> Result<Sandbox, SandboxError> {
        let entry = match user.parse::<u32>() {
            Ok(uid) => sys::user_by_id(uid),
            Err(_) => match CString::new(user) {
                Ok(name) => sys::user_by_name(&name),
                Err(_) => Ok(None),
            },
        };
        let entry = entry.map_err(|source| SandboxError::UserLookup {
            user: user.to_string(),
            source,
        })?;
        let Some(entry) = entry else {
            return Err(SandboxError::UnknownUser {
                user: user.to_string(),
            });
        };
        if entry.uid == 0 || entry.gid == 0 {
            return Err(SandboxError::Root {
                user: user.to_string(),
                uid: entry.uid,
                gid: entry.gid,
            });
        }
        Ok(Sandbox {
            uid: entry.uid,
            gid: entry.gid,
            memlock_bytes,
        })
    }

    /// Drops every privilege of this process and confines it to the system calls a driver
    /// needs (see the [module docs](self)). Called by the driver process itself, as root,
    /// after it has received its file descriptors and before it touches device data or
    /// starts threads. There is no way back.
    ///
    /// On error the process may be half-way: exit rather than run the driver.
    pub fn enter(&self) -> Result<(), SandboxError> {
        if self.uid == 0 || self.gid == 0 {
            return Err(SandboxError::Root {
                user: self.uid.to_string(),
                uid: self.uid,
                gid: self.gid,
            });
        }
        set_memlock(self.memlock_bytes)?;
        // rustix reads the auxiliary vector (page size, clock ticks) from
        // /proc/self/auxv the first time it needs it; afterwards that file is out of reach.
        let _ = rustix::param::page_size();

        // The bounding set can only be emptied while CAP_SETPCAP is still effective.
        step("clearing the ambient capabilities", sys::clear_ambient())?;
        let last_cap = sys::last_capability();
        for cap in 0..=last_cap {
            step(
                format!("dropping capability {cap} from the bounding set"),
                sys::drop_bounding(cap),
            )?;
        }
        step("dropping the supplementary groups", sys::clear_groups())?;
        step(
            format!("setresgid({0}, {0}, {0})", self.gid),
            sys::set_gids(self.gid),
        )?;
        step(
            format!("setresuid({0}, {0}, {0})", self.uid),
            sys::set_uids(self.uid),
        )?;
        // Leaving uid 0 cleared permitted and effective; inheritable stays unless cleared.
        step("clearing the capability sets", sys::clear_capabilities())?;
        step("setting PR_SET_NO_NEW_PRIVS", sys::set_no_new_privs())?;

        let (clone3_filter, main_filter) = filters(std::process::id())?;
        // The main filter does not allow `seccomp`, so it goes last.
        seccompiler::apply_filter_all_threads(&clone3_filter).map_err(SandboxError::Seccomp)?;
        seccompiler::apply_filter_all_threads(&main_filter).map_err(SandboxError::Seccomp)?;

        let problems = self.leftovers(last_cap);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SandboxError::Incomplete(problems.join("; ")))
        }
    }

    /// What is left of this thread's privileges, asked of the kernel through the calls
    /// the filter still allows.
    fn leftovers(&self, last_cap: u32) -> Vec<String> {
        let mut problems = Vec::new();
        let wanted_uids = [self.uid; 3];
        match sys::uids() {
            Ok(uids) if uids == wanted_uids => {}
            Ok(uids) => problems.push(format!("user IDs are {uids:?}, not {wanted_uids:?}")),
            Err(error) => problems.push(format!("getresuid failed: {error}")),
        }
        let wanted_gids = [self.gid; 3];
        match sys::gids() {
            Ok(gids) if gids == wanted_gids => {}
            Ok(gids) => problems.push(format!("group IDs are {gids:?}, not {wanted_gids:?}")),
            Err(error) => problems.push(format!("getresgid failed: {error}")),
        }
        match sys::group_count() {
            Ok(0) => {}
            Ok(count) => problems.push(format!("{count} supplementary groups are left")),
            Err(error) => problems.push(format!("getgroups failed: {error}")),
        }
        match sys::capabilities() {
            Ok(sets) if sets == sys::CapabilitySets::default() => {}
            Ok(sets) => problems.push(format!("capabilities left: {sets:?}")),
            Err(error) => problems.push(format!("capget failed: {error}")),
        }
        for cap in 0..=last_cap {
            match sys::in_bounding(cap) {
                Ok(false) => {}
                Ok(true) => problems.push(format!("capability {cap} is in the bounding set")),
                Err(error) => problems.push(format!("reading bounding capability {cap}: {error}")),
            }
            match sys::in_ambient(cap) {
                Ok(false) => {}
                Ok(true) => problems.push(format!("capability {cap} is in the ambient set")),
                Err(error) => problems.push(format!("reading ambient capability {cap}: {error}")),
            }
        }
        match sys::no_new_privs() {
            Ok(true) => {}
            Ok(false) => problems.push("no_new_privs is not set".to_string()),
            Err(error) => problems.push(format!("reading no_new_privs: {error}")),
        }
        match sys::seccomp_mode() {
            Ok(2) => {}
            Ok(mode) => problems.push(format!("seccomp mode is {mode}, not 2 (filter)")),
            Err(error) => problems.push(format!("reading the seccomp mode: {error}")),
        }
        problems
    }
}

fn step<T>(what: impl Into<String>, result: io::Result<T>) -> Result<T, SandboxError> {
    result.map_err(|source| SandboxError::Drop {
        step: what.into(),
        source,
    })
}

fn set_memlock(wanted: u64) -> Result<(), SandboxError> {
    sys::set_memlock(wanted).map_err(|source| SandboxError::Memlock {
        wanted,
        hard: sys::memlock().map_or(0, |(_, hard)| hard),
        source,
    })
}

/// The two filters [`Sandbox::enter`] installs: first the one answering `clone3` with
/// `ENOSYS`, then the allowlist. `own_pid` is the only process `tgkill` may signal.
fn filters(own_pid: u32) -> Result<(BpfProgram, BpfProgram), SandboxError> {
    let clone3: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, Vec::new())].into();
    let clone3 = SeccompFilter::new(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TARGET_ARCH,
    )
    .and_then(BpfProgram::try_from)
    .map_err(SandboxError::Filter)?;
    let main = SeccompFilter::new(
        allowlist(own_pid).map_err(SandboxError::Filter)?,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TARGET_ARCH,
    )
    .and_then(BpfProgram::try_from)
    .map_err(SandboxError::Filter)?;
    Ok((clone3, main))
}

/// The system calls a driver may make; an empty rule list allows every use of the call.
/// The groups are explained in the [module docs](self).
fn allowlist(own_pid: u32) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    use SeccompCmpArgLen::{Dword, Qword};
    use SeccompCmpOp::{Eq, MaskedEq, Ne};
    let condition = |arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(arg, len, op, value)
    };
    let any = Vec::new;

    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let unconditional = [
        // Descriptors the driver was given.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_lseek,
        libc::SYS_close,
        libc::SYS_fcntl,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_fstat,
        // The control channel to the daemon.
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        // Waiting for interrupts and messages.
        libc::SYS_ppoll,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        // usbfs drivers (nusb) time their transfers with a timerfd.
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        // The ublk data path.
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        // Memory.
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mprotect,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_mlock,
        libc::SYS_munlock,
        // Threads and their locks (clone is below).
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_exit,
        libc::SYS_exit_group,
        // Signals (tgkill is below).
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        // Time.
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_gettimeofday,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        // Identity, read only.
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_getresuid,
        libc::SYS_getresgid,
        libc::SYS_getgroups,
        libc::SYS_capget,
        // Randomness.
        libc::SYS_getrandom,
    ];
    for call in unconditional {
        rules.insert(call, any());
    }
    #[cfg(target_arch = "x86_64")]
    for call in [libc::SYS_dup2, libc::SYS_poll, libc::SYS_epoll_wait] {
        rules.insert(call, any());
    }

    // Threads only: a forked child could outlive the driver holding its descriptors.
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![condition(
            0,
            Qword,
            MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?])?],
    );
    // abort() signals its own process; nothing else may be signalled.
    rules.insert(
        libc::SYS_tgkill,
        vec![SeccompRule::new(vec![condition(
            0,
            Dword,
            Eq,
            u64::from(own_pid),
        )?])?],
    );
    // Reading this process's limits (getrlimit) but not changing them or another's.
    rules.insert(
        libc::SYS_prlimit64,
        vec![SeccompRule::new(vec![
            condition(0, Dword, Eq, 0)?,
            condition(2, Qword, Eq, 0)?,
        ])?],
    );
    // The VFIO ioctls, but not typing into an inherited terminal.
    rules.insert(
        libc::SYS_ioctl,
        vec![SeccompRule::new(vec![
            condition(1, Dword, Ne, libc::TIOCSTI)?,
            condition(1, Dword, Ne, libc::TIOCLINUX)?,
        ])?],
    );
    let mut prctl = Vec::new();
    for option in [
        libc::PR_SET_NAME,
        libc::PR_GET_NAME,
        libc::PR_GET_NO_NEW_PRIVS,
        libc::PR_GET_SECCOMP,
        libc::PR_CAPBSET_READ,
    ] {
        prctl.push(SeccompRule::new(vec![condition(
            0,
            Dword,
            Eq,
            option as u64,
        )?])?);
    }
    prctl.push(SeccompRule::new(vec![
        condition(0, Dword, Eq, libc::PR_CAP_AMBIENT as u64)?,
        condition(1, Qword, Eq, libc::PR_CAP_AMBIENT_IS_SET as u64)?,
    ])?);
    rules.insert(libc::SYS_prctl, prctl);
    Ok(rules)
}

/// How much `RLIMIT_MEMLOCK` [`sandbox_check_main`] asks for: below the usual default
/// hard limit (8 MiB), so that the check works without `CAP_SYS_RESOURCE`.
pub const CHECK_MEMLOCK_BYTES: u64 = 4 << 20;

/// What [`SelfCheck::run`] found: this process's privileges as the kernel reports them,
/// and what happened when it tried calls the sandbox must allow or refuse.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SandboxReport {
    /// Real, effective, saved and filesystem user IDs (`Uid:` of `/proc/self/status`).
    pub uids: Vec<u32>,
    /// Real, effective, saved and filesystem group IDs (`Gid:`).
    pub gids: Vec<u32>,
    /// Supplementary groups (`Groups:`).
    pub groups: Vec<u32>,
    /// Inheritable capabilities (`CapInh:`), as a bit mask.
    pub cap_inheritable: u64,
    /// Permitted capabilities (`CapPrm:`).
    pub cap_permitted: u64,
    /// Effective capabilities (`CapEff:`).
    pub cap_effective: u64,
    /// The capability bounding set (`CapBnd:`).
    pub cap_bounding: u64,
    /// Ambient capabilities (`CapAmb:`).
    pub cap_ambient: u64,
    /// `NoNewPrivs:` is 1.
    pub no_new_privs: bool,
    /// `Seccomp:`: 0 none, 1 strict, 2 filter.
    pub seccomp_mode: u32,
    /// `Seccomp_filters:`: how many filters are installed.
    pub seccomp_filters: u32,
    /// `RLIMIT_MEMLOCK` (soft, hard) in bytes, if it could be read.
    pub memlock: Option<(u64, u64)>,
    /// The calls tried, in order.
    pub probes: Vec<Probe>,
    /// Everything that differs from a complete sandbox; empty when all is well.
    pub problems: Vec<String>,
}

/// One call [`SelfCheck::run`] tried.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Probe {
    /// What was tried, e.g. `openat /etc/hostname`.
    pub name: String,
    /// What a sandboxed driver must see.
    pub expect: Expect,
    /// `None` if the call worked, otherwise its `errno`.
    pub errno: Option<i32>,
    /// The error as text, if it failed.
    pub error: Option<String>,
    /// Whether the outcome is the expected one.
    pub pass: bool,
}

/// What a probe must do inside the sandbox.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Expect {
    /// Work.
    Works,
    /// Fail with `EPERM`.
    Refused,
}

/// What [`SelfCheck::run`] needs that the sandbox will not let it open: prepared before
/// entering it.
#[derive(Debug)]
pub struct SelfCheck {
    status: File,
    pipe: (File, File),
}

impl SelfCheck {
    /// Opens `/proc/self/status` and creates a pipe, before the sandbox is entered.
    pub fn prepare() -> io::Result<SelfCheck> {
        Ok(SelfCheck {
            status: File::open("/proc/self/status")?,
            pipe: sys::pipe()?,
        })
    }

    /// Reads this process's privileges and tries the probes. With `expected`, the IDs
    /// must be its user and group; without, they need only not be root.
    pub fn run(self, expected: Option<&Sandbox>) -> SandboxReport {
        let status = read_status(&self.status);
        let field = |name: &str| -> Vec<u64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(|values| {
                    let radix = if name.starts_with("Cap") { 16 } else { 10 };
                    values
                        .split_whitespace()
                        .filter_map(|value| u64::from_str_radix(value, radix).ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        let ids = |name: &str| -> Vec<u32> {
            field(name)
                .into_iter()
                .filter_map(|id| u32::try_from(id).ok())
                .collect()
        };
        let first = |name: &str| field(name).first().copied();
        let mut report = SandboxReport {
            uids: ids("Uid"),
            gids: ids("Gid"),
            groups: ids("Groups"),
            cap_inheritable: first("CapInh").unwrap_or(u64::MAX),
            cap_permitted: first("CapPrm").unwrap_or(u64::MAX),
            cap_effective: first("CapEff").unwrap_or(u64::MAX),
            cap_bounding: first("CapBnd").unwrap_or(u64::MAX),
            cap_ambient: first("CapAmb").unwrap_or(u64::MAX),
            no_new_privs: first("NoNewPrivs") == Some(1),
            seccomp_mode: first("Seccomp").map_or(0, |mode| mode as u32),
            seccomp_filters: first("Seccomp_filters").map_or(0, |count| count as u32),
            memlock: sys::memlock().ok(),
            probes: probes(self.pipe),
            problems: Vec::new(),
        };
        report.problems = report.find_problems(expected);
        report
    }
}

fn read_status(status: &File) -> String {
    // pread from 0 makes the kernel produce the file afresh; `openat` is refused by now.
    let mut text = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match status.read_at(&mut buffer, text.len() as u64) {
            Ok(0) => break,
            Ok(read) => text.extend_from_slice(&buffer[..read]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

impl SandboxReport {
    fn find_problems(&self, expected: Option<&Sandbox>) -> Vec<String> {
        let mut problems = Vec::new();
        let ids_ok = |ids: &[u32], wanted: Option<u32>| {
            ids.len() == 4
                && ids
                    .iter()
                    .all(|&id| id != 0 && wanted.is_none_or(|wanted| id == wanted))
        };
        if !ids_ok(&self.uids, expected.map(|sandbox| sandbox.uid)) {
            problems.push(format!("user IDs are {:?}", self.uids));
        }
        if !ids_ok(&self.gids, expected.map(|sandbox| sandbox.gid)) {
            problems.push(format!("group IDs are {:?}", self.gids));
        }
        if !self.groups.is_empty() {
            problems.push(format!("supplementary groups left: {:?}", self.groups));
        }
        for (name, set) in [
            ("inheritable", self.cap_inheritable),
            ("permitted", self.cap_permitted),
            ("effective", self.cap_effective),
            ("bounding", self.cap_bounding),
            ("ambient", self.cap_ambient),
        ] {
            if set != 0 {
                problems.push(format!("{name} capabilities are {set:#x}, not 0"));
            }
        }
        if !self.no_new_privs {
            problems.push("no_new_privs is not set".to_string());
        }
        if self.seccomp_mode != 2 {
            problems.push(format!(
                "seccomp mode is {}, not 2 (filter)",
                self.seccomp_mode
            ));
        }
        if let (Some(sandbox), Some((soft, hard))) = (expected, self.memlock) {
            if soft != sandbox.memlock_bytes || hard != sandbox.memlock_bytes {
                problems.push(format!(
                    "RLIMIT_MEMLOCK is {soft}/{hard} bytes, not {}",
                    sandbox.memlock_bytes
                ));
            }
        }
        for probe in &self.probes {
            if !probe.pass {
                let outcome = probe.error.as_deref().unwrap_or("it worked");
                let wanted = match probe.expect {
                    Expect::Works => "should work",
                    Expect::Refused => "should fail with EPERM",
                };
                problems.push(format!("{} {wanted}: {outcome}", probe.name));
            }
        }
        problems
    }
}

fn probe(name: &str, expect: Expect, result: io::Result<()>) -> Probe {
    let errno = result
        .as_ref()
        .err()
        .map(|error| error.raw_os_error().unwrap_or(-1));
    let pass = match expect {
        Expect::Works => errno.is_none(),
        Expect::Refused => errno == Some(libc::EPERM),
    };
    Probe {
        name: name.to_string(),
        expect,
        errno,
        error: result.err().map(|error| error.to_string()),
        pass,
    }
}

fn probes(pipe: (File, File)) -> Vec<Probe> {
    vec![
        probe(
            "thread spawn",
            Expect::Works,
            std::thread::Builder::new()
                .name("sandbox-probe".to_string())
                .spawn(|| 6 * 7)
                .and_then(|thread| match thread.join() {
                    Ok(42) => Ok(()),
                    _ => Err(io::Error::other("the thread did not return its result")),
                }),
        ),
        probe(
            "mmap, mlock 64 KiB",
            Expect::Works,
            sys::map_and_lock(64 << 10),
        ),
        probe("pipe write and read", Expect::Works, pipe_round_trip(pipe)),
        probe(
            "openat /etc/hostname",
            Expect::Refused,
            File::open("/etc/hostname").map(drop),
        ),
        probe("socket AF_UNIX", Expect::Refused, sys::new_socket()),
        probe("execve /bin/true", Expect::Refused, sys::exec_true()),
        probe(
            "fork (spawn /bin/true)",
            Expect::Refused,
            std::process::Command::new("/bin/true")
                .spawn()
                .and_then(|mut child| child.wait())
                .map(drop),
        ),
        probe(
            "kill own process, signal 0",
            Expect::Refused,
            sys::kill_self_0(),
        ),
    ]
}

fn pipe_round_trip((reader, writer): (File, File)) -> io::Result<()> {
    use std::io::{Read, Write};
    (&writer).write_all(b"ring3")?;
    let mut echoed = [0u8; 5];
    (&reader).read_exact(&mut echoed)?;
    if &echoed == b"ring3" {
        Ok(())
    } else {
        Err(io::Error::other("the pipe returned other bytes"))
    }
}

/// `ring3d sandbox-check --user USER`: enters the sandbox for `user` in this process and
/// prints a [`SandboxReport`] as JSON on standard output. Exit status 0 when the sandbox is
/// complete, 1 when anything is left or refused wrongly (listed in `problems`), 2 when it
/// could not be entered at all (the reason on standard error). Must run as root, in a
/// process of its own, before it starts threads: the process cannot get its privileges
/// back.
pub fn sandbox_check_main(user: &str) -> ExitCode {
    let prepared = match SelfCheck::prepare() {
        Ok(prepared) => prepared,
        Err(error) => {
            eprintln!(
                "ring3d sandbox-check: preparing the check (/proc/self/status, a pipe): {error}"
            );
            return ExitCode::from(2);
        }
    };
    let sandbox = match Sandbox::for_user(user, CHECK_MEMLOCK_BYTES) {
        Ok(sandbox) => sandbox,
        Err(error) => {
            eprintln!("ring3d sandbox-check: {}", render_error(&error));
            return ExitCode::from(2);
        }
    };
    let entered = sandbox.enter();
    let report = prepared.run(Some(&sandbox));
    match serde_json::to_string_pretty(&report) {
        Ok(json) => println!("{json}"),
        Err(error) => eprintln!("ring3d sandbox-check: printing the report: {error}"),
    }
    if let Err(error) = entered {
        eprintln!("ring3d sandbox-check: {}", render_error(&error));
        return ExitCode::from(2);
    }
    if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        for problem in &report.problems {
            eprintln!("ring3d sandbox-check: {problem}");
        }
        ExitCode::from(1)
    }
}

fn render_error(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Looks a group up by name: `Ok(None)` if there is no such group.
pub(crate) fn group_id(name: &str) -> io::Result<Option<u32>> {
    match CString::new(name) {
        Ok(name) => sys::group_by_name(&name),
        Err(_) => Ok(None),
    }
}

/// Every system call of this module, each behind a safe function.
mod sys {
    use std::ffi::CStr;
    use std::fs::File;
    use std::io;
    use std::os::fd::{FromRawFd, OwnedFd};

    pub struct PasswdEntry {
        pub uid: u32,
        pub gid: u32,
    }

    /// Turns a `-1`-and-errno return into an error.
    fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
        if rc == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    /// Runs a `get*_r` lookup with a growing buffer. `call` gets the buffer and its length
    /// and returns the function's result code and whether an entry was found.
    fn reentrant_lookup(
        mut call: impl FnMut(&mut [libc::c_char]) -> (libc::c_int, bool),
    ) -> io::Result<bool> {
        let mut buffer = vec![0 as libc::c_char; 1024];
        loop {
            match call(&mut buffer) {
                (libc::ERANGE, _) if buffer.len() < 1 << 20 => {
                    let grown = buffer.len() * 2;
                    buffer.resize(grown, 0);
                }
                (0, found) => return Ok(found),
                // "Not found", as some NSS modules say it.
                (libc::ENOENT | libc::ESRCH, _) => return Ok(false),
                (code, _) => return Err(io::Error::from_raw_os_error(code)),
            }
        }
    }

    fn passwd_lookup(
        mut call: impl FnMut(
            *mut libc::passwd,
            &mut [libc::c_char],
            *mut *mut libc::passwd,
        ) -> libc::c_int,
    ) -> io::Result<Option<PasswdEntry>> {
        // SAFETY: `passwd` is integers and pointers, for which all zeroes are valid.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let found = reentrant_lookup(|buffer| {
            let mut result: *mut libc::passwd = std::ptr::null_mut();
            let code = call(&mut entry, buffer, &mut result);
            (code, !result.is_null())
        })?;
        Ok(found.then_some(PasswdEntry {
            uid: entry.pw_uid,
            gid: entry.pw_gid,
        }))
    }

    pub fn user_by_name(name: &CStr) -> io::Result<Option<PasswdEntry>> {
        passwd_lookup(|entry, buffer, result| {
            // SAFETY: `name` is NUL-terminated; `entry`, `buffer` (with its true length) and
            // `result` are valid for writes for the duration of the call.
            unsafe {
                libc::getpwnam_r(
                    name.as_ptr(),
                    entry,
                    buffer.as_mut_ptr(),
                    buffer.len(),
                    result,
                )
            }
        })
    }

    pub fn user_by_id(uid: u32) -> io::Result<Option<PasswdEntry>> {
        passwd_lookup(|entry, buffer, result| {
            // SAFETY: `entry`, `buffer` (with its true length) and `result` are valid for
            // writes for the duration of the call.
            unsafe { libc::getpwuid_r(uid, entry, buffer.as_mut_ptr(), buffer.len(), result) }
        })
    }

    pub fn group_by_name(name: &CStr) -> io::Result<Option<u32>> {
        // SAFETY: `group` is integers and pointers, for which all zeroes are valid.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let found = reentrant_lookup(|buffer| {
            let mut result: *mut libc::group = std::ptr::null_mut();
            // SAFETY: `name` is NUL-terminated; `entry`, `buffer` (with its true length) and
            // `result` are valid for writes for the duration of the call.
            let code = unsafe {
                libc::getgrnam_r(
                    name.as_ptr(),
                    &mut entry,
                    buffer.as_mut_ptr(),
                    buffer.len(),
                    &mut result,
                )
            };
            (code, !result.is_null())
        })?;
        Ok(found.then_some(entry.gr_gid))
    }

    pub fn memlock() -> io::Result<(u64, u64)> {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `limit` is valid for writes.
        check(unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) })?;
        Ok((limit.rlim_cur, limit.rlim_max))
    }

    pub fn set_memlock(bytes: u64) -> io::Result<()> {
        let limit = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: bytes,
        };
        // SAFETY: `limit` is a valid rlimit read by the call.
        check(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) }).map(drop)
    }

    fn prctl(option: libc::c_int, arg: libc::c_ulong, arg3: libc::c_ulong) -> io::Result<i32> {
        // SAFETY: the options used in this module take integer arguments only.
        check(unsafe { libc::prctl(option, arg, arg3, 0 as libc::c_ulong, 0 as libc::c_ulong) })
    }

    /// The highest capability number this kernel knows.
    pub fn last_capability() -> u32 {
        // PR_CAPBSET_READ fails with EINVAL past the last capability.
        (0..64u32)
            .take_while(|&cap| prctl(libc::PR_CAPBSET_READ, cap.into(), 0).is_ok())
            .last()
            .unwrap_or(0)
    }

    pub fn clear_ambient() -> io::Result<()> {
        prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
        )
        .map(drop)
    }

    pub fn drop_bounding(cap: u32) -> io::Result<()> {
        prctl(libc::PR_CAPBSET_DROP, cap.into(), 0).map(drop)
    }

    pub fn in_bounding(cap: u32) -> io::Result<bool> {
        prctl(libc::PR_CAPBSET_READ, cap.into(), 0).map(|set| set != 0)
    }

    pub fn in_ambient(cap: u32) -> io::Result<bool> {
        prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_IS_SET as libc::c_ulong,
            cap.into(),
        )
        .map(|set| set != 0)
    }

    pub fn set_no_new_privs() -> io::Result<()> {
        prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).map(drop)
    }

    pub fn no_new_privs() -> io::Result<bool> {
        prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0).map(|set| set != 0)
    }

    pub fn seccomp_mode() -> io::Result<i32> {
        prctl(libc::PR_GET_SECCOMP, 0, 0)
    }

    pub fn clear_groups() -> io::Result<()> {
        // SAFETY: a count of 0 means the list is not read.
        check(unsafe { libc::setgroups(0, std::ptr::null()) }).map(drop)
    }

    pub fn group_count() -> io::Result<i32> {
        // SAFETY: a size of 0 asks for the count only; the list is not written.
        check(unsafe { libc::getgroups(0, std::ptr::null_mut()) })
    }

    // glibc's setresgid and setresuid change every thread of the process, not just this one.
    pub fn set_gids(gid: u32) -> io::Result<()> {
        // SAFETY: plain integer arguments.
        check(unsafe { libc::setresgid(gid, gid, gid) }).map(drop)
    }

    pub fn set_uids(uid: u32) -> io::Result<()> {
        // SAFETY: plain integer arguments.
        check(unsafe { libc::setresuid(uid, uid, uid) }).map(drop)
    }

    pub fn uids() -> io::Result<[u32; 3]> {
        let mut ids = [0u32; 3];
        let [real, effective, saved] = &mut ids;
        // SAFETY: the three pointers are valid for writes.
        check(unsafe { libc::getresuid(real, effective, saved) })?;
        Ok(ids)
    }

    pub fn gids() -> io::Result<[u32; 3]> {
        let mut ids = [0u32; 3];
        let [real, effective, saved] = &mut ids;
        // SAFETY: the three pointers are valid for writes.
        check(unsafe { libc::getresgid(real, effective, saved) })?;
        Ok(ids)
    }

    /// `struct __user_cap_header_struct` of `<linux/capability.h>`.
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: libc::c_int,
    }

    /// `struct __user_cap_data_struct`; version 3 uses two, for capabilities 0-31 and 32-63.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }

    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

    /// This thread's capability sets, as 64-bit masks.
    #[derive(Debug, Default, PartialEq, Eq)]
    pub struct CapabilitySets {
        pub effective: u64,
        pub permitted: u64,
        pub inheritable: u64,
    }

    pub fn capabilities() -> io::Result<CapabilitySets> {
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        // SAFETY: a version 3 header with two data structs, both valid for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_capget,
                &mut header as *mut CapHeader,
                data.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let join = |low: u32, high: u32| u64::from(low) | (u64::from(high) << 32);
        Ok(CapabilitySets {
            effective: join(data[0].effective, data[1].effective),
            permitted: join(data[0].permitted, data[1].permitted),
            inheritable: join(data[0].inheritable, data[1].inheritable),
        })
    }

    pub fn clear_capabilities() -> io::Result<()> {
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData::default(); 2];
        // SAFETY: a version 3 header with two data structs, both valid for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_capset,
                &mut header as *mut CapHeader,
                data.as_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn pipe() -> io::Result<(File, File)> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` has room for the two descriptors.
        check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (reader, writer) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((File::from(reader), File::from(writer)))
    }

    /// Maps `bytes` of anonymous memory, writes and locks it, then unlocks and unmaps it.
    pub fn map_and_lock(bytes: usize) -> io::Result<()> {
        // SAFETY: a new anonymous private mapping; no existing memory is affected.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the mapping is `bytes` long, writable and ours alone.
        unsafe { std::ptr::write_bytes(address.cast::<u8>(), 0x5a, bytes) };
        // SAFETY: the range is the mapping just made.
        let locked = check(unsafe { libc::mlock(address, bytes) });
        if locked.is_ok() {
            // SAFETY: as above.
            unsafe { libc::munlock(address, bytes) };
        }
        // SAFETY: the mapping is unmapped once, and nothing refers to it any more.
        let unmapped = check(unsafe { libc::munmap(address, bytes) });
        locked.and(unmapped).map(drop)
    }

    pub fn new_socket() -> io::Result<()> {
        // SAFETY: plain integer arguments.
        let fd = check(unsafe {
            libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: the socket was just created and is owned here.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(())
    }

    /// Tries to replace this process with `/bin/true`; returns only if that failed.
    pub fn exec_true() -> io::Result<()> {
        let path = c"/bin/true";
        let argv = [path.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: NUL-terminated path and NULL-terminated argument and environment lists.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        Err(io::Error::last_os_error())
    }

    pub fn kill_self_0() -> io::Result<()> {
        // SAFETY: signal 0 only checks whether the process may be signalled.
        check(unsafe { libc::kill(libc::getpid(), 0) }).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_refused_by_name_and_by_id() {
        for user in ["root", "0"] {
            let error = Sandbox::for_user(user, 1 << 20).expect_err("root must be refused");
            assert!(
                matches!(error, SandboxError::Root { uid: 0, .. }),
                "{error:?}"
            );
            assert!(error.to_string().contains("unprivileged user"), "{error}");
        }
    }

    #[test]
    fn unknown_users_are_refused() {
        for user in ["no-such-ring3-user", "4000000000", "bad\0name", ""] {
            let error = Sandbox::for_user(user, 1 << 20).expect_err("unknown user");
            assert!(
                matches!(error, SandboxError::UnknownUser { .. }),
                "{user:?}: {error:?}"
            );
            assert!(error.to_string().contains("useradd"), "{error}");
        }
    }

    #[test]
    fn nobody_is_found_by_name_and_by_id() {
        let Ok(by_name) = Sandbox::for_user("nobody", 1 << 20) else {
            eprintln!("skipped: this machine has no user nobody");
            return;
        };
        let by_id = Sandbox::for_user(&by_name.uid.to_string(), 1 << 20).expect("same user");
        assert_eq!(by_name, by_id);
        assert_ne!(by_name.uid, 0);
        assert_eq!(by_name.memlock_bytes, 1 << 20);
    }

    #[test]
    fn entering_as_root_is_refused_before_anything_changes() {
        let sandbox = Sandbox {
            uid: 0,
            gid: 0,
            memlock_bytes: 1 << 20,
        };
        assert!(matches!(sandbox.enter(), Err(SandboxError::Root { .. })));
    }

    #[test]
    fn the_filters_compile() {
        let (clone3, main) = filters(std::process::id()).expect("the allowlist is consistent");
        assert!(!clone3.is_empty());
        assert!(main.len() > 60, "{} instructions", main.len());
    }

    #[test]
    fn refused_calls_are_not_in_the_allowlist() {
        let rules = allowlist(1).expect("consistent");
        for call in [
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_kill,
            libc::SYS_setuid,
            libc::SYS_setresuid,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_reboot,
            libc::SYS_seccomp,
            libc::SYS_capset,
        ] {
            assert!(!rules.contains_key(&call), "system call {call} is allowed");
        }
        #[cfg(target_arch = "x86_64")]
        for call in [libc::SYS_open, libc::SYS_fork, libc::SYS_vfork] {
            assert!(!rules.contains_key(&call), "system call {call} is allowed");
        }
    }

    #[test]
    fn a_report_of_an_unconfined_process_lists_its_problems() {
        // Running the probes outside the sandbox would execve /bin/true over the test
        // process, so judge a report built here.
        let report = SandboxReport {
            uids: vec![0; 4],
            gids: vec![0; 4],
            groups: vec![],
            cap_inheritable: 0,
            cap_permitted: 1,
            cap_effective: 1,
            cap_bounding: 1,
            cap_ambient: 0,
            no_new_privs: false,
            seccomp_mode: 0,
            seccomp_filters: 0,
            memlock: None,
            probes: vec![probe("openat /etc/hostname", Expect::Refused, Ok(()))],
            problems: vec![],
        };
        let problems = report.find_problems(None).join("\n");
        for expected in [
            "user IDs are [0, 0, 0, 0]",
            "permitted capabilities are 0x1",
            "no_new_privs is not set",
            "seccomp mode is 0",
            "openat /etc/hostname should fail with EPERM: it worked",
        ] {
            assert!(
                problems.contains(expected),
                "{expected:?} missing from:\n{problems}"
            );
        }
    }

    #[test]
    fn status_is_read_again_from_the_descriptor() {
        let prepared = SelfCheck::prepare().expect("/proc/self/status and a pipe");
        let first = read_status(&prepared.status);
        let second = read_status(&prepared.status);
        assert!(
            first.contains("\nUid:") && second.contains("\nCapEff:"),
            "{second}"
        );
        assert!(pipe_round_trip(prepared.pipe).is_ok());
    }
}
