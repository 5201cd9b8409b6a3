//! Host side: required programs, Debian packages, apt, locking.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};

use super::progress::Progress;

/// Host programs the lab uses, resolved to absolute paths.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    pub(crate) qemu: PathBuf,
    pub(crate) busybox: PathBuf,
    pub(crate) cpio: PathBuf,
    pub(crate) gzip: PathBuf,
    pub(crate) xz: PathBuf,
    pub(crate) find: PathBuf,
    pub(crate) depmod: PathBuf,
    pub(crate) modprobe: PathBuf,
    pub(crate) apt_get: PathBuf,
    pub(crate) apt_cache: PathBuf,
    pub(crate) dpkg_deb: PathBuf,
}

/// A program and the Debian package that provides it.
struct Requirement {
    program: &'static str,
    package: &'static str,
}

const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        program: "qemu-system-x86_64",
        package: "qemu-system-x86",
    },
    Requirement {
        program: "cpio",
        package: "cpio",
    },
    Requirement {
        program: "depmod",
        package: "kmod",
    },
    Requirement {
        program: "modprobe",
        package: "kmod",
    },
    Requirement {
        program: "xz",
        package: "xz-utils",
    },
    Requirement {
        program: "gzip",
        package: "gzip",
    },
    Requirement {
        program: "find",
        package: "findutils",
    },
    // Used inside the guest by the lab tests (interfaces up and down).
    Requirement {
        program: "ip",
        package: "iproute2",
    },
];

/// The statically linked busybox goes into the initramfs as is.
const BUSYBOX_PACKAGE: &str = "busybox-static";
const BUSYBOX_PATH: &str = "/bin/busybox";

/// Directories searched after `$PATH` (non-root users often lack the sbins).
const EXTRA_BIN_DIRS: [&str; 5] = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Looks `name` up in `$PATH`, then in the usual bin and sbin directories.
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_BIN_DIRS.iter().map(PathBuf::from))
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn require(name: &str) -> Result<PathBuf> {
    find_program(name).with_context(|| format!("`{name}` is still not installed"))
}

/// Runs a command to completion, capturing its output; fails with the
/// command's stderr when it exits non-zero.
pub(crate) fn run_captured(cmd: &mut Command, what: &str) -> Result<Output> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// Runs a command with its output going straight to the terminal.
fn run_streamed(cmd: &mut Command, what: &str, progress: &Progress) -> Result<()> {
    let status = progress
        .suspend(|| cmd.stdin(Stdio::null()).status())
        .with_context(|| format!("could not start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn apt_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    if is_root() {
        // As root, apt drops to the `_apt` user for downloads and warns when
        // that user cannot write the target directory; downloading as root
        // is what we want anyway.
        cmd.args(["-o", "APT::Sandbox::User=root"]);
    }
    cmd
}

pub(crate) fn apt_get(tools: &Tools) -> Command {
    apt_command(&tools.apt_get)
}

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// Runs `apt-get update` (as root only, at most once per process). Returns
/// whether it ran.
pub(crate) fn apt_update_once(apt_get: &Path, progress: &Progress) -> Result<bool> {
    if !is_root() || APT_UPDATED.swap(true, Ordering::SeqCst) {
        return Ok(false);
    }
    progress.println("lab: running apt-get update");
    run_streamed(
        apt_command(apt_get).arg("update"),
        "apt-get update",
        progress,
    )?;
    Ok(true)
}

fn busybox_static_installed() -> bool {
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", BUSYBOX_PACKAGE])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && o.stdout.starts_with(b"install ok installed"))
        .unwrap_or(false);
    installed && is_executable(Path::new(BUSYBOX_PATH))
}

/// Checks for the host programs the lab needs and installs the missing
/// Debian packages when running as root.
pub(crate) fn ensure_tools(progress: &Progress) -> Result<Tools> {
    progress.status("checking host tools");
    for apt_tool in ["apt-get", "apt-cache", "dpkg-deb", "dpkg-query"] {
        if find_program(apt_tool).is_none() {
            bail!(
                "the lab needs a Debian-based host, but `{apt_tool}` was not found: it installs \
                 QEMU and busybox and downloads the guest kernel with apt"
            );
        }
    }
    let apt_get_path = require("apt-get")?;

    let mut missing: Vec<&str> = Vec::new();
    for req in REQUIREMENTS {
        if find_program(req.program).is_none() && !missing.contains(&req.package) {
            missing.push(req.package);
        }
    }
    if !busybox_static_installed() {
        missing.push(BUSYBOX_PACKAGE);
    }
    if !missing.is_empty() {
        let list = missing.join(" ");
        if !is_root() {
            bail!(
                "the lab needs these host packages: {list}\ninstall them with:\n    \
                 sudo apt-get install -y {list}"
            );
        }
        apt_update_once(&apt_get_path, progress)?;
        progress.println(format!("lab: installing {list}"));
        run_streamed(
            apt_command(&apt_get_path)
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing),
            &format!("apt-get install {list}"),
            progress,
        )?;
        if !busybox_static_installed() {
            bail!("{BUSYBOX_PACKAGE} is still not installed ({BUSYBOX_PATH} is missing)");
        }
    }

    Ok(Tools {
        qemu: require("qemu-system-x86_64")?,
        busybox: PathBuf::from(BUSYBOX_PATH),
        cpio: require("cpio")?,
        gzip: require("gzip")?,
        xz: require("xz")?,
        find: require("find")?,
        depmod: require("depmod")?,
        modprobe: require("modprobe")?,
        apt_get: apt_get_path,
        apt_cache: require("apt-cache")?,
        dpkg_deb: require("dpkg-deb")?,
    })
}

/// An exclusive lock on `<dir>/.lock`, held until dropped.
pub(crate) struct DirLock {
    _file: File,
}

/// Takes the lab directory's lock so concurrent preparations do not race.
pub(crate) fn lock_dir(dir: &Path, progress: &Progress) -> Result<DirLock> {
    let path = dir.join(".lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("could not open the lock file {}", path.display()))?;
    let flock = |flags| {
        // SAFETY: the descriptor is valid for the lifetime of `file`; flock
        // has no memory-safety preconditions.
        unsafe { libc::flock(file.as_raw_fd(), flags) }
    };
    if flock(libc::LOCK_EX | libc::LOCK_NB) != 0 {
        progress.step("waiting for another lab preparation to finish");
        if flock(libc::LOCK_EX) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("could not lock {}", path.display()));
        }
    }
    Ok(DirLock { _file: file })
}

/// Whether process `pid` still exists.
pub(crate) fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for the process's existence.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Debian packages the workspace needs on the host beyond Rust: libclang for the bindings
/// of the ublk crate (bindgen), and the programs the lab tests run in the guest (which
/// sees the host's file system): fio, mkfs.ext4 and ping; mkfs.vfat and fsck.vfat for the
/// lab's USB FAT image (run on the host) and fusermount3 for the FUSE test in the guest.
const BUILD_PACKAGES: &[(&str, &str)] = &[
    ("libclang-dev", ""),
    ("fio", "fio"),
    ("e2fsprogs", "mkfs.ext4"),
    ("iputils-ping", "ping"),
    ("dosfstools", "mkfs.vfat"),
    ("fuse3", "fusermount3"),
];

fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && o.stdout.starts_with(b"install ok installed"))
        .unwrap_or(false)
}

/// Installs the missing [`BUILD_PACKAGES`] when running as root; otherwise says which
/// `apt-get install` to run.
pub fn ensure_build_packages() -> Result<()> {
    let missing: Vec<&str> = BUILD_PACKAGES
        .iter()
        .filter(|(package, program)| {
            let have_program = !program.is_empty() && find_program(program).is_some();
            !have_program && !package_installed(package)
        })
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!(
            "building and testing ring3 needs these host packages: {list}\ninstall them with:\n    \
             sudo apt-get install -y {list}"
        );
    }
    let apt_get = require("apt-get")?;
    let progress = Progress::new();
    apt_update_once(&apt_get, &progress)?;
    progress.println(format!("installing {list}"));
    run_streamed(
        apt_command(&apt_get)
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
        &format!("apt-get install {list}"),
        &progress,
    )
}
