//! What every bench needs from the host: its tools (fio, a release build of the ring3
//! binaries the guest runs) and the facts about it that go into a report.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use super::capture::{Block, CaptureSink, Captured, OnBlock};
use super::hostload::{self, HostLoad};
use super::report::{utc_timestamp, Environment};
use super::workload::SMALL_BLOCK;
use crate::lab::{self, host::find_program, LabDevice, LabOptions, NvmeNamespace};
use crate::tasks;

const MIB: u64 = 1 << 20;

/// The lab VM's options every bench shares.
#[derive(Debug, Clone, clap::Args)]
pub struct VmArgs {
    /// MiB at the start of the namespace that every workload uses, filled with data
    /// before the first read [default: the whole namespace, or 256 with --quick].
    #[arg(long, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub region: Option<u64>,

    /// Size of the emulated NVMe namespace in MiB (a sparse image on the host).
    #[arg(long, value_name = "MIB", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(16..=65536))]
    pub namespace: u64,

    #[command(flatten)]
    pub guest: GuestArgs,
}

/// The lab VM's size, time limit and verbosity, as the NVMe, ublk and USB benches take
/// them.
#[derive(Debug, Clone, clap::Args)]
pub struct GuestArgs {
    /// Guest CPUs. Under TCG each one is a host thread and QEMU's device emulation needs
    /// another, so more than the host's cores only adds contention; every driver measured
    /// shares the same VM either way.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cpus: u32,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(256..))]
    pub memory: u32,

    /// Kill the VM after this many seconds [default: twice the expected run, plus 5
    /// minutes].
    #[arg(long, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: Option<u64>,

    /// Print the QEMU command line before booting.
    #[arg(short, long)]
    pub verbose: bool,
}

impl GuestArgs {
    /// The lab VM's options from these, its workspace as the working directory; the
    /// bench adds its devices and modules.
    pub fn lab_options(&self, timeout: Duration) -> LabOptions {
        LabOptions {
            memory_mib: self.memory,
            cpus: self.cpus,
            timeout: Some(timeout),
            workdir: Some(lab::workspace_root()),
            verbose: self.verbose,
            ..LabOptions::default()
        }
    }
}

impl VmArgs {
    /// The namespace's and the measured region's sizes in bytes: the region defaults to
    /// the whole namespace, or to 256 MiB of it with `--quick`, and must fit in it.
    pub fn namespace_and_region(&self, quick: bool) -> Result<(u64, u64)> {
        let namespace_bytes = self.namespace * MIB;
        let region_bytes = match self.region {
            Some(mib) => mib * MIB,
            None if quick => namespace_bytes.min(256 * MIB),
            None => namespace_bytes,
        };
        if region_bytes > namespace_bytes {
            bail!(
                "--region {} MiB is larger than the namespace ({} MiB); raise --namespace",
                region_bytes / MIB,
                self.namespace
            );
        }
        Ok((namespace_bytes, region_bytes))
    }

    /// The lab VM: one NVMe controller with one namespace of 4 KiB blocks, vfio-pci and
    /// `modules` loaded, the workspace as the working directory.
    pub fn lab_options(
        &self,
        namespace_bytes: u64,
        modules: Vec<String>,
        timeout: Duration,
    ) -> LabOptions {
        LabOptions {
            devices: vec![LabDevice::Nvme],
            nvme_namespaces: vec![NvmeNamespace {
                bytes: namespace_bytes,
                block_size: SMALL_BLOCK,
            }],
            load_vfio: true,
            extra_modules: modules,
            ..self.guest.lab_options(timeout)
        }
    }
}

/// What a guest script sent back, and how the host fared meanwhile.
pub struct GuestRun {
    pub blocks: Vec<Block>,
    /// The script's exit status, or why the lab failed.
    pub status: Result<i32>,
    pub host_load: Option<HostLoad>,
    /// When the VM started, `YYYY-MM-DD HH:MM UTC`.
    pub date: String,
}

/// Runs `script` with `sh -c` in the lab, showing its output and calling `on_block` for
/// each result block as it arrives.
pub fn run_script(options: &LabOptions, script: String, on_block: OnBlock) -> GuestRun {
    let captured = Captured::default();
    let sink = CaptureSink::new(Box::new(io::stdout()), captured.clone(), on_block);
    let started = Instant::now();
    let date = utc_timestamp(SystemTime::now());
    let command = ["sh".to_string(), "-c".to_string(), script];
    let cpu_before = hostload::snapshot();
    let status = lab::run_in_lab_with_output(options, &command, Box::new(sink));
    let host_load = cpu_before
        .zip(hostload::snapshot())
        .and_then(|(before, after)| hostload::between(&before, &after));
    eprintln!(
        "bench: the VM ran for {:.0} s",
        started.elapsed().as_secs_f64()
    );
    GuestRun {
        blocks: captured.blocks(),
        status,
        host_load,
        date,
    }
}

/// Other processes' (or the hypervisor's) share of the host's CPU time above which a
/// report warns that the numbers are disturbed.
const BUSY_HOST_PERCENT: f64 = 5.0;

/// fio runs in the guest from the host's file system, so the host needs it, with io_uring.
pub fn check_fio() -> Result<()> {
    let Some(fio) = find_program("fio") else {
        bail!(
            "the bench runs fio inside the lab guest, which uses the host's programs, but fio \
             is not installed; install it with:\n    sudo apt-get install -y fio"
        );
    };
    let io_uring = Command::new(&fio)
        .arg("--enghelp=io_uring")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("could not run {}", fio.display()))?;
    if !io_uring.success() {
        bail!(
            "{} has no io_uring engine; install a fio built with it (Debian's fio package is)",
            fio.display()
        );
    }
    Ok(())
}

/// `cargo build --release` of `packages`; returns target/release. `hint` ends the error
/// message when the build fails.
pub fn build_release(packages: &[&str], hint: &str) -> Result<PathBuf> {
    tasks::step(&format!("building {} (release)", packages.join(" and ")));
    let mut build = tasks::cargo();
    build.args(["build", "--release"]);
    for package in packages {
        build.args(["--package", package]);
    }
    tasks::run_checked(build, &format!("building {} ({hint})", packages.join(", ")))?;
    Ok(lab::target_dir().join("release"))
}

/// The guest sees the host's files except under its own `/tmp`, `/run` and `/var/tmp`
/// (the workspace and target directories excepted).
pub fn check_visible_to_guest(binary: &Path) -> Result<()> {
    let shared = [lab::workspace_root(), lab::target_dir()];
    let private = ["/tmp", "/run", "/var/tmp"]
        .iter()
        .any(|dir| binary.starts_with(dir));
    if private && !shared.iter().any(|dir| binary.starts_with(dir)) {
        bail!(
            "{} is under /tmp, /run or /var/tmp, which the lab guest does not share with the \
             host; copy it into the workspace",
            binary.display()
        );
    }
    Ok(())
}

/// The path the guest runs `binary` by: canonical, visible to the guest and UTF-8 (it goes
/// into a shell script).
pub fn guest_binary(binary: &Path) -> Result<String> {
    let binary = binary
        .canonicalize()
        .with_context(|| format!("no binary at {}", binary.display()))?;
    check_visible_to_guest(&binary)?;
    binary
        .to_str()
        .map(str::to_string)
        .with_context(|| format!("the path {} is not UTF-8", binary.display()))
}

/// Fails, naming the bench, unless every `(binary, args)` runs (see [`command_available`]).
pub fn check_commands(bench: &str, commands: &[(&Path, &[&str])]) -> Result<()> {
    for (binary, args) in commands {
        command_available(binary, args).map_err(|why| {
            anyhow::anyhow!("this build of ring3 cannot run the {bench} bench: {why}")
        })?;
    }
    Ok(())
}

/// Whether `binary --help`-style `args` succeed; the error says what the binary printed.
pub fn command_available(binary: &Path, args: &[&str]) -> std::result::Result<(), String> {
    let output = Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("could not run {}: {err}", binary.display()))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let first = stderr
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message");
    Err(format!(
        "`{} {}` failed ({}): {}",
        binary.display(),
        args.join(" "),
        output.status,
        first.trim()
    ))
}

/// The host's side of a report's environment; `date` is when the VM started.
pub fn environment(
    date: String,
    host_load: Option<HostLoad>,
    guest: Vec<(String, String)>,
) -> Environment {
    Environment {
        date,
        commit: git_commit(),
        host_cpu: host_cpu_model(),
        host_cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        host_kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_string()),
        qemu: first_line_of("qemu-system-x86_64", &["--version"]),
        host_load,
        guest,
    }
}

/// A note for the report when the host was busy enough to disturb the numbers.
pub fn busy_host_note(load: Option<HostLoad>) -> Option<String> {
    let load = load?;
    (load.others_percent > BUSY_HOST_PERCENT || load.steal_percent > BUSY_HOST_PERCENT).then(|| {
        format!(
            "While the VM ran, other processes used {:.0}% of the host's CPU time and the \
                 hypervisor under the host took {:.0}%. Under TCG that slows whichever driver \
                 is running at the time; rerun on an idle host before trusting a ratio.",
            load.others_percent, load.steal_percent
        )
    })
}

fn first_line_of(program: &str, args: &[&str]) -> Option<String> {
    let path = find_program(program)?;
    let output = Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output.status.success().then_some(())?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
}

/// The workspace's commit, `-dirty` when the tree has changes.
fn git_commit() -> Option<String> {
    let root = lab::workspace_root();
    let root = root.to_str()?;
    let commit = first_line_of("git", &["-C", root, "rev-parse", "--short=12", "HEAD"])?;
    let dirty = first_line_of("git", &["-C", root, "status", "--porcelain"]).is_some();
    Some(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}

fn host_cpu_model() -> Option<String> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "model name").then(|| value.trim().to_string())
        })
        .filter(|model| !model.is_empty())
}

/// The directory a bench writes its results into: `--output`, or bench/results in the
/// workspace.
pub fn output_dir(output: Option<&Path>) -> PathBuf {
    match output {
        Some(dir) => dir.to_path_buf(),
        None => lab::workspace_root().join("bench").join("results"),
    }
}

/// Writes each `(file name, text)` of a report into `dir`.
pub fn write_files<'a>(
    dir: &Path,
    files: impl IntoIterator<Item = (&'a str, String)>,
) -> Result<()> {
    for (name, text) in files {
        let path = dir.join(name);
        fs::write(&path, text).with_context(|| format!("could not write {}", path.display()))?;
    }
    Ok(())
}

/// After a bench's results on the terminal: its notes, then the files it wrote into `dir`.
pub fn print_notes_and_files(notes: &[String], dir: &Path, files: &[&str]) {
    for note in notes {
        println!("note: {note}");
    }
    let paths: Vec<String> = files
        .iter()
        .map(|name| dir.join(name).display().to_string())
        .collect();
    let written = match paths.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    };
    println!("\nwrote {written}");
}

/// A bench's exit status: 0 when the guest script ended with 0 and every part was
/// measured, 1 (said on stderr) when not.
pub fn exit_status(script_status: i32, complete: bool) -> i32 {
    if script_status != 0 || !complete {
        eprintln!("bench: some parts were not measured; see the notes above");
        return 1;
    }
    0
}

/// Creates the directory a bench writes its results into.
pub(crate) fn create_output_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)
        .with_context(|| format!("could not create the output directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_visibility() {
        assert!(check_visible_to_guest(Path::new("/tmp/elsewhere/ring3")).is_err());
        assert!(check_visible_to_guest(Path::new("/usr/local/bin/ring3")).is_ok());
        assert!(check_visible_to_guest(&lab::target_dir().join("release/ring3")).is_ok());
    }

    #[test]
    fn only_a_busy_host_gets_a_note() {
        let quiet = HostLoad {
            others_percent: 1.0,
            steal_percent: 0.0,
        };
        assert_eq!(busy_host_note(Some(quiet)), None);
        assert_eq!(busy_host_note(None), None);
        let busy = HostLoad {
            others_percent: 30.0,
            ..quiet
        };
        let note = busy_host_note(Some(busy)).expect("a note");
        assert!(note.contains("30%"), "{note}");
    }
}
