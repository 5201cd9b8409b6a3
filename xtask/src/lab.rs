//! The lab: a throwaway QEMU VM for exercising user-mode drivers.
//!
//! The VM always runs under TCG (no KVM needed), with a q35 machine, an
//! emulated Intel IOMMU and a chosen set of emulated PCI devices. The guest
//! kernel is Debian's stock kernel, downloaded once with apt and cached under
//! `target/lab/kernel/<version>/`; a tiny busybox initramfs mounts the host's
//! whole file system read-only over virtio-9p as the guest's root, so host
//! binaries (test executables, the CLI, shells) run in the guest unchanged
//! and at the same paths. `/tmp`, `/run` and `/var/tmp` are fresh tmpfs in
//! the guest.
//!
//! Each run gets a directory `target/lab/runs/<pid>-<n>/` holding the script
//! the guest's init runs (its path goes on the kernel command line as
//! `ring3.run=`). The script loads the requested modules (resolved on the
//! host, loaded with busybox's `insmod`, as kmod is slow to start under
//! TCG), sets up the environment and runs the job; the init then reports the
//! exit status on the serial console with a marker line carrying a per-run
//! nonce, which the host strips from the output it forwards.
//!
//! Entry points for other xtask subcommands:
//! - [`prepare`] makes sure the host tools, the kernel and the initramfs exist;
//! - [`run_in_lab`] / [`run_in_lab_with_output`] run one command in a fresh VM
//!   and return its exit status;
//! - [`shell`] starts an interactive guest shell.

pub(crate) mod host;
mod initramfs;
mod kernel;
mod modules;
mod progress;
pub mod usb;
mod vm;

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};

use self::progress::Progress;

/// Default for `--timeout`, in seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = 600;

/// Exit status of `cargo xtask` when a lab command timed out (as `timeout(1)`).
pub const EXIT_TIMEOUT: u8 = 124;

/// Exit status of `cargo xtask` when the lab itself failed (QEMU could not
/// start, the guest panicked, a host package is missing, ...), as opposed to
/// the guest command failing.
pub const EXIT_LAB_FAILURE: u8 = 125;

/// An emulated device set that can be attached to the lab VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum LabDevice {
    /// QEMU's educational PCI device (vendor 0x1234, device 0x11e8).
    Edu,
    /// An NVMe controller (8 I/O queue pairs) with the namespaces of
    /// [`LabOptions::nvme_namespaces`], by default two of 256 MiB: nsid 1
    /// with 512-byte blocks and nsid 2 with 4096-byte blocks, each backed by
    /// a fresh, sparse raw image.
    Nvme,
    /// A modern-only virtio-net PCI device (IOMMU platform), on a hub shared
    /// only with the lab's other NICs.
    VirtioNet,
    /// An Intel 82574 (e1000e) NIC, on a hub shared only with the lab's other
    /// NICs.
    E1000e,
    /// A qemu-xhci USB host controller with two FT232 serial adapters and two mass
    /// storage devices (see [`usb`]; at most one per VM).
    Usb,
}

impl LabDevice {
    /// The name used on the command line (`--device NAME`).
    pub fn name(self) -> &'static str {
        match self {
            LabDevice::Edu => "edu",
            LabDevice::Nvme => "nvme",
            LabDevice::VirtioNet => "virtio-net",
            LabDevice::E1000e => "e1000e",
            LabDevice::Usb => "usb",
        }
    }
}

impl fmt::Display for LabDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// I/O queue pairs each emulated NVMe controller offers (`max_ioqpairs`).
pub const NVME_MAX_IO_QUEUE_PAIRS: u32 = 8;

/// Default size of each emulated NVMe namespace.
pub const DEFAULT_NVME_NAMESPACE_BYTES: u64 = 256 << 20;

/// One namespace of the lab's emulated NVMe controllers; namespace IDs are
/// assigned from 1 in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NvmeNamespace {
    /// Capacity in bytes (the backing image is sparse); a multiple of
    /// `block_size`.
    pub bytes: u64,
    /// Logical (and physical) block size in bytes: a power of two from 512.
    pub block_size: u32,
}

impl NvmeNamespace {
    /// The lab's default layout: nsid 1 with 512-byte blocks, nsid 2 with
    /// 4096-byte blocks, 256 MiB each.
    pub fn default_layout() -> Vec<NvmeNamespace> {
        [512, 4096]
            .into_iter()
            .map(|block_size| NvmeNamespace {
                bytes: DEFAULT_NVME_NAMESPACE_BYTES,
                block_size,
            })
            .collect()
    }
}

/// Everything that shapes one lab VM run.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Emulated devices to attach, in order; repeating one attaches several.
    pub devices: Vec<LabDevice>,
    /// Raw arguments appended to the QEMU command line.
    pub qemu_args: Vec<String>,
    /// Load `vfio-pci` and `vfio_iommu_type1` in the guest before the command.
    pub load_vfio: bool,
    /// Further guest kernel modules to load before the command, each
    /// `NAME [PARAM=VALUE...]` (parameters apply to that module, not to its
    /// dependencies), e.g. `nvme poll_queues=2`.
    pub extra_modules: Vec<String>,
    /// The namespaces of every [`LabDevice::Nvme`] controller, nsid 1 first.
    pub nvme_namespaces: Vec<NvmeNamespace>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Number of guest CPUs.
    pub cpus: u32,
    /// Kill the VM and fail after this long (counted from QEMU's start);
    /// `None` waits forever.
    pub timeout: Option<Duration>,
    /// Extra environment variables for the guest command. `RING3_LAB=1`,
    /// `HOME=/tmp`, `PATH` and the host's `RUST_LOG` / `RUST_BACKTRACE` are
    /// always set.
    pub env: Vec<(String, String)>,
    /// Guest working directory; `None` means the host's current directory.
    pub workdir: Option<PathBuf>,
    /// Print the QEMU command line before booting.
    pub verbose: bool,
    /// After the VM exits, run `fsck.vfat -n` on the [`LabDevice::Usb`] FAT image and
    /// check the files the FUSE lab test left on it; fail the run if either fails.
    pub check_usb_fat: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            devices: vec![LabDevice::Edu],
            qemu_args: Vec::new(),
            load_vfio: true,
            extra_modules: Vec::new(),
            nvme_namespaces: NvmeNamespace::default_layout(),
            memory_mib: 1024,
            cpus: 2,
            timeout: Some(Duration::from_secs(DEFAULT_TIMEOUT_SECS)),
            env: Vec::new(),
            workdir: None,
            verbose: false,
            check_usb_fat: false,
        }
    }
}

/// Paths of the prepared lab assets.
#[derive(Debug, Clone)]
pub struct LabAssets {
    /// Guest kernel version (ABI name), e.g. `6.12.117+deb12-amd64`.
    pub kernel_version: String,
    /// Unpacked kernel package: `boot/`, `lib/modules/<version>/`.
    pub kernel_tree: PathBuf,
    /// `<kernel_tree>/boot/vmlinuz-<version>`.
    pub vmlinuz: PathBuf,
    /// The cached busybox initramfs.
    pub initramfs: PathBuf,
    /// The lab directory (canonical), see [`lab_dir`].
    pub lab_dir: PathBuf,
    /// Host tools the VM runs need.
    tools: host::Tools,
}

/// The lab timed out; `cargo xtask` exits with [`EXIT_TIMEOUT`] for it.
#[derive(Debug, Clone, Copy)]
pub struct LabTimeout {
    /// The timeout that expired.
    pub after: Duration,
}

impl fmt::Display for LabTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "lab command timed out after {} s (raise with --timeout SECS or RING3_LAB_TIMEOUT; 0 disables it)",
            self.after.as_secs()
        )
    }
}

impl std::error::Error for LabTimeout {}

/// The exit status `cargo xtask` should use for a failed lab operation.
pub fn exit_status_for_error(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<LabTimeout>().is_some() {
        EXIT_TIMEOUT
    } else {
        EXIT_LAB_FAILURE
    }
}

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` if set, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                std::env::current_dir()
                    .map(|cwd| cwd.join(&dir))
                    .unwrap_or(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// Where the lab keeps its caches and per-run files: `<target>/lab`.
pub fn lab_dir() -> PathBuf {
    target_dir().join("lab")
}

/// Makes sure the host packages, the guest kernel and the initramfs are in
/// place (installing or downloading what is missing) and returns their paths.
pub fn prepare() -> Result<LabAssets> {
    let progress = Progress::new();
    let result = prepare_with(&progress);
    progress.finish();
    result
}

fn prepare_with(progress: &Progress) -> Result<LabAssets> {
    let lab_dir = lab_dir();
    std::fs::create_dir_all(&lab_dir)
        .with_context(|| format!("could not create the lab directory {}", lab_dir.display()))?;
    let lab_dir = lab_dir
        .canonicalize()
        .with_context(|| format!("could not resolve {}", lab_dir.display()))?;
    check_visible_in_guest(&lab_dir)?;
    let _lock = host::lock_dir(&lab_dir, progress)?;

    let tools = host::ensure_tools(progress)?;
    let kernel = kernel::ensure_kernel(&lab_dir, &tools, progress)?;
    let initramfs = initramfs::ensure_initramfs(&lab_dir, &tools, &kernel, progress)?;
    Ok(LabAssets {
        vmlinuz: kernel.vmlinuz(),
        kernel_version: kernel.version,
        kernel_tree: kernel.tree,
        initramfs,
        lab_dir,
        tools,
    })
}

/// The guest sees the host's `/`, except for these, which it replaces.
/// (`/tmp`, `/run` and `/var/tmp` are tmpfs in the guest too, but the workspace and target
/// directories under them are bind-mounted back in from the host.)
const GUEST_PRIVATE_DIRS: [&str; 3] = ["/proc", "/sys", "/dev"];

fn check_visible_in_guest(path: &Path) -> Result<()> {
    if let Some(dir) = GUEST_PRIVATE_DIRS
        .iter()
        .find(|dir| path.starts_with(Path::new(dir)))
    {
        bail!(
            "the lab directory {} is under {dir}, which the guest does not share with the host; \
             point CARGO_TARGET_DIR somewhere else (e.g. inside the workspace)",
            path.display()
        );
    }
    Ok(())
}

/// Runs `command` (program and arguments, quoted for `sh -c`) in a fresh
/// lab VM, streaming the guest's console output to stdout, and returns the
/// command's exit status.
pub fn run_in_lab(opts: &LabOptions, command: &[String]) -> Result<i32> {
    run_in_lab_with_output(opts, command, Box::new(io::stdout()))
}

/// Like [`run_in_lab`], but streams the guest's console output (with the
/// serial line's `\r\n` turned into `\n`) to `output` instead of stdout.
pub fn run_in_lab_with_output(
    opts: &LabOptions,
    command: &[String],
    output: Box<dyn Write + Send>,
) -> Result<i32> {
    if command.is_empty() {
        bail!("no command to run in the lab; usage: cargo xtask lab run -- COMMAND [ARGS...]");
    }
    let assets = prepare()?;
    vm::run(
        &assets,
        opts,
        &vm::Job::Command(shell_join(command)),
        output,
    )
}

/// Starts an interactive shell in a fresh lab VM on this terminal and returns
/// the shell's exit status once it exits (which powers the VM off).
pub fn shell(opts: &LabOptions) -> Result<i32> {
    let assets = prepare()?;
    vm::run(&assets, opts, &vm::Job::Shell, Box::new(io::stdout()))
}

/// Quotes one word for a POSIX shell.
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%^".contains(&b));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Quotes each word for a POSIX shell and joins them with spaces.
pub fn shell_join<S: AsRef<str>>(words: &[S]) -> String {
    words
        .iter()
        .map(|w| shell_quote(w.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

/// VM options shared by the lab subcommands; other xtask subcommands can
/// `#[command(flatten)]` this and call [`LabArgs::options`].
#[derive(Debug, Clone, Args)]
pub struct LabArgs {
    /// Attach an emulated device (repeatable; repeat a name for several of
    /// that kind). Default: edu.
    #[arg(long = "device", value_enum, value_name = "DEVICE")]
    pub devices: Vec<LabDevice>,

    /// Append a raw argument to the QEMU command line (repeatable), e.g.
    /// `--qemu-arg=-device --qemu-arg=pci-testdev`.
    #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub qemu_args: Vec<String>,

    /// Do not load vfio-pci and vfio_iommu_type1 in the guest.
    #[arg(long)]
    pub no_vfio: bool,

    /// Load this guest kernel module before the command (repeatable);
    /// parameters may follow the name, e.g. `--module 'nvme poll_queues=2'`.
    #[arg(long = "module", value_name = "NAME [PARAM=VALUE...]")]
    pub modules: Vec<String>,

    /// Set VAR=VALUE in the guest command's environment (repeatable).
    #[arg(long = "env", value_name = "VAR=VALUE", value_parser = parse_env_assignment)]
    pub env: Vec<(String, String)>,

    /// Print the QEMU command line before booting.
    #[arg(short, long)]
    pub verbose: bool,

    /// After the run, check the usb device's FAT image: `fsck.vfat -n`, and the files of
    /// the FUSE lab test if it left `RING3/DONE` (as `cargo xtask test` does).
    #[arg(long)]
    pub check_usb_fat: bool,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(128..))]
    pub memory: u32,

    /// Number of guest CPUs.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cpus: u32,
}

impl LabArgs {
    /// The [`LabOptions`] these arguments describe, with the given timeout.
    pub fn options(&self, timeout: Option<Duration>) -> LabOptions {
        LabOptions {
            devices: if self.devices.is_empty() {
                vec![LabDevice::Edu]
            } else {
                self.devices.clone()
            },
            qemu_args: self.qemu_args.clone(),
            load_vfio: !self.no_vfio,
            extra_modules: self.modules.clone(),
            nvme_namespaces: NvmeNamespace::default_layout(),
            memory_mib: self.memory,
            cpus: self.cpus,
            timeout,
            env: self.env.clone(),
            workdir: None,
            verbose: self.verbose,
            check_usb_fat: self.check_usb_fat,
        }
    }
}

/// The `--timeout` option; `lab run` and other batch subcommands flatten it.
#[derive(Debug, Clone, Args)]
pub struct TimeoutArg {
    /// Kill the VM and fail after this many seconds, boot included
    /// (0 = never).
    #[arg(long = "timeout", value_name = "SECS", env = "RING3_LAB_TIMEOUT",
          default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub secs: u64,
}

impl TimeoutArg {
    /// The timeout as a duration, `None` for "never".
    pub fn duration(&self) -> Option<Duration> {
        (self.secs > 0).then(|| Duration::from_secs(self.secs))
    }
}

fn parse_env_assignment(s: &str) -> std::result::Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected VAR=VALUE, got `{s}`"))?;
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("`{name}` is not a valid environment variable name"));
    }
    Ok((name.to_string(), value.to_string()))
}

/// `cargo xtask lab ...`
#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Run a command in a fresh VM and exit with its exit status.
    ///
    /// The command runs as root in the guest, in the current directory, via
    /// `sh -c`, with stdin from /dev/null. Exit status 124 means the timeout
    /// expired, 125 that the lab itself failed.
    Run {
        #[command(flatten)]
        lab: LabArgs,
        #[command(flatten)]
        timeout: TimeoutArg,
        /// The command and its arguments (put them after `--`).
        #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Start an interactive shell in a fresh VM (`exit` powers it off;
    /// Ctrl-A x kills it).
    ///
    /// Exits with the shell's exit status. With input from a pipe
    /// (`echo 'lspci; exit' | cargo xtask lab shell`) the lines are typed in
    /// once the shell is up, followed by `exit`.
    Shell {
        #[command(flatten)]
        lab: LabArgs,
    },
    /// Install missing host packages, download the guest kernel and build
    /// the initramfs, then print the cached paths.
    Prepare,
}

impl LabCommand {
    /// Runs the subcommand and returns the exit status for the process.
    pub fn run(self) -> Result<i32> {
        match self {
            LabCommand::Run {
                lab,
                timeout,
                command,
            } => run_in_lab(&lab.options(timeout.duration()), &command),
            LabCommand::Shell { lab } => shell(&lab.options(None)),
            LabCommand::Prepare => {
                let assets = prepare()?;
                println!("kernel version: {}", assets.kernel_version);
                println!("kernel tree:    {}", assets.kernel_tree.display());
                println!("vmlinuz:        {}", assets.vmlinuz.display());
                println!("initramfs:      {}", assets.initramfs.display());
                println!("qemu:           {}", assets.tools.qemu.display());
                Ok(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("ls"), "ls");
        assert_eq!(shell_quote("/a/b-c.d"), "/a/b-c.d");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        assert_eq!(
            shell_join(&["sh", "-c", "echo hi; exit 3"]),
            "sh -c 'echo hi; exit 3'"
        );
    }

    #[test]
    fn env_assignments() {
        assert_eq!(
            parse_env_assignment("A_1=x=y"),
            Ok(("A_1".to_string(), "x=y".to_string()))
        );
        assert!(parse_env_assignment("novalue").is_err());
        assert!(parse_env_assignment("1A=x").is_err());
        assert!(parse_env_assignment("=x").is_err());
    }

    #[test]
    fn guest_private_dirs() {
        assert!(check_visible_in_guest(Path::new("/proc/x/target/lab")).is_err());
        assert!(check_visible_in_guest(Path::new("/tmp/x/target/lab")).is_ok());
        assert!(check_visible_in_guest(Path::new("/tmpfoo/lab")).is_ok());
        assert!(check_visible_in_guest(Path::new("/home/u/ring3/target/lab")).is_ok());
    }
}
