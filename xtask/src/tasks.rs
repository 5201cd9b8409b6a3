//! `cargo xtask test` and `cargo xtask demo`: the README's two commands.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab::{self, LabDevice, LabOptions};

/// The lab VM the tests run in: an edu device (0000:00:01.0), a virtio-net device
/// (0000:00:02.0) and an NVMe controller (0000:00:03.0; namespace 1 with 512-byte blocks,
/// namespace 2 with 4096-byte blocks, no driver bound), each alone in its IOMMU group, and
/// an e1000 and a virtio-net behind one PCIe-to-PCI bridge, so that they share an IOMMU
/// group (for the group-safety test), and a qemu-xhci USB controller with two FT232 serial
/// adapters (serial strings `R3SERFILE`, `R3SERECHO`) and two mass storage devices (`R3RAW`,
/// `R3FAT`), see [`lab::usb`]; xhci_pci is loaded but no USB class driver. Tests find
/// devices by their IDs or class (USB ones by VID:PID:serial), not by these addresses.
/// After the run, the FAT image is checked with `fsck.vfat -n` and for the FUSE test's files.
pub fn test_lab_options(timeout: Option<Duration>) -> LabOptions {
    let mut qemu_args = Vec::new();
    for arg in [
        "-device",
        "pcie-pci-bridge,id=ring3br0",
        "-netdev",
        "hubport,id=ring3grp0,hubid=7",
        "-netdev",
        "hubport,id=ring3grp1,hubid=7",
        "-device",
        "e1000,netdev=ring3grp0,bus=ring3br0,addr=1,romfile=",
        "-device",
        "virtio-net-pci,netdev=ring3grp1,bus=ring3br0,addr=2,disable-legacy=on,romfile=",
    ] {
        qemu_args.push(arg.to_string());
    }
    LabOptions {
        devices: vec![
            LabDevice::Edu,
            LabDevice::VirtioNet,
            LabDevice::Nvme,
            LabDevice::VirtioNet,
            LabDevice::E1000e,
            LabDevice::E1000e,
            LabDevice::Usb,
        ],
        qemu_args,
        timeout,
        extra_modules: vec![
            "ublk_drv".into(),
            "ext4".into(),
            "tun".into(),
            "xhci_pci".into(),
            "fuse".into(),
        ],
        check_usb_fat: true,
        ..LabOptions::default()
    }
}

/// Options of `cargo xtask test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Skip the format and clippy checks.
    #[arg(long)]
    pub no_lint: bool,
    /// Run only the host's tests, not the lab tests in the VM.
    #[arg(long, conflicts_with = "lab_only")]
    pub no_lab: bool,
    /// Run only the lab tests in the VM.
    #[arg(long)]
    pub lab_only: bool,
    /// Only lab tests whose name contains this (passed to the test binaries as a filter).
    #[arg(long, default_value = "lab_")]
    pub lab_filter: String,
    /// Fail the lab run after this many seconds.
    #[arg(long, default_value_t = 1200)]
    pub timeout: u64,
}

/// Announces a step of a task.
pub(crate) fn step(name: &str) {
    println!("\n==> {name}");
}

/// `cargo` (the one running this xtask), in the workspace root.
pub(crate) fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(lab::workspace_root());
    command
}

/// Runs `command` with inherited output; fails unless it succeeds.
pub(crate) fn run_checked(mut command: Command, what: &str) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("could not start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Runs every test: format check, clippy, the host's unit tests, then the lab tests in one VM.
pub fn test(args: TestArgs) -> Result<i32> {
    let started = Instant::now();
    lab::host::ensure_build_packages()?;
    if !args.lab_only {
        if !args.no_lint {
            step("cargo fmt --check");
            let mut fmt = cargo();
            fmt.args(["fmt", "--all", "--", "--check"]);
            run_checked(fmt, "cargo fmt --check (run `cargo fmt --all` to fix)")?;
            step("cargo clippy -D warnings");
            let mut clippy = cargo();
            clippy.args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--all-features",
                "--",
                "-D",
                "warnings",
            ]);
            run_checked(clippy, "cargo clippy")?;
        }
        step("unit tests (host)");
        let mut unit = cargo();
        unit.args(["test", "--workspace", "--all-features"]);
        run_checked(unit, "the unit tests")?;
    }
    if !args.no_lab {
        step("lab tests (QEMU VM, TCG, intel-iommu)");
        let status = lab_tests(&args.lab_filter, Duration::from_secs(args.timeout))?;
        if status != 0 {
            bail!("the lab tests failed (exit status {status}); their output is above");
        }
    }
    println!(
        "\nall tests passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(0)
}

/// Test executables of the workspace that contain ignored tests matching `filter`.
fn lab_test_binaries(filter: &str) -> Result<Vec<PathBuf>> {
    let output = cargo()
        .args([
            "test",
            "--workspace",
            "--all-features",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("could not start cargo test --no-run")?;
    if !output.status.success() {
        bail!("building the test binaries failed");
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(executable) = message.get("executable").and_then(|e| e.as_str()) else {
            continue;
        };
        let listing = Command::new(executable)
            .args(["--list", "--ignored", filter])
            .output()
            .with_context(|| format!("could not list the tests of {executable}"))?;
        let has_lab_tests = String::from_utf8_lossy(&listing.stdout)
            .lines()
            .any(|l| l.ends_with(": test"));
        if has_lab_tests {
            binaries.push(PathBuf::from(executable));
        }
    }
    Ok(binaries)
}

fn lab_tests(filter: &str, timeout: Duration) -> Result<i32> {
    let binaries = lab_test_binaries(filter)?;
    if binaries.is_empty() {
        bail!("no lab tests match {filter:?}");
    }
    // One VM for all of them: each binary runs its ignored tests one at a time, since they
    // share the devices.
    let mut script = String::from("status=0\n");
    for binary in &binaries {
        script.push_str(&format!(
            "{} --ignored --test-threads=1 --color never {} || status=1\n",
            lab::shell_quote(&binary.to_string_lossy()),
            lab::shell_quote(filter)
        ));
    }
    script.push_str("exit $status\n");
    let options = test_lab_options(Some(timeout));
    lab::run_in_lab(&options, &["sh".into(), "-c".into(), script])
}

/// Boots the lab and runs the edu driver through VFIO, printing each step.
pub fn demo() -> Result<i32> {
    lab::host::ensure_build_packages()?;
    step("building ring3");
    let mut build = cargo();
    build.args(["build", "--package", "ring3-cli"]);
    run_checked(build, "cargo build")?;
    let ring3 = lab::target_dir().join("debug").join("ring3");
    let ring3 = lab::shell_quote(&ring3.to_string_lossy());
    step("booting the lab VM and running the edu driver in it");
    let script = format!(
        r#"set -e
ring3() {{ echo; echo "\$ ring3 $*"; {ring3} "$@"; }}
ring3 list
edu=$({ring3} list | awk '$2 == "1234:11e8" {{ print $1; exit }}')
[ -n "$edu" ] || {{ echo "no edu device in the lab VM"; exit 1; }}
ring3 bind "$edu"
ring3 edu "$edu" --irq
ring3 edu "$edu" --poll
ring3 unbind "$edu"
"#
    );
    let options = LabOptions {
        devices: vec![LabDevice::Edu],
        ..LabOptions::default()
    };
    lab::run_in_lab(&options, &["sh".into(), "-c".into(), script])
}
