//! What the lab tests of ring3d share: finding binaries, running commands, and a
//! ring3d on a config of its own.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn in_lab() {
    assert_eq!(
        std::env::var("RING3_LAB").as_deref(),
        Ok("1"),
        "lab tests run inside the lab VM: use `cargo xtask test`"
    );
}

/// A binary of the workspace, beside this test's own directory (`target/<profile>/`).
pub fn bin(name: &str) -> String {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    dir.join(name).to_string_lossy().into_owned()
}

pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(format!("/tmp/ring3d-lab-{name}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("creating a scratch directory");
    dir
}

pub fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    eprintln!(
        "$ {program} {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

pub fn ring3(socket: &Path, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    let socket = socket.to_string_lossy().into_owned();
    all.extend(["--socket", &socket]);
    run(&bin("ring3"), &all)
}

/// A ring3d running on a config; SIGTERM and a check that it stopped cleanly on drop.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub address: Option<String>,
}

impl Daemon {
    /// Starts ring3d on a config of `[daemon]` extras and `[[device]]` sections. On stop,
    /// the PCI device at `pci`, if given, must have left vfio-pci.
    pub fn launch(
        name: &str,
        extra_daemon: &str,
        devices: &str,
        env: &[(&str, &str)],
        pci: Option<String>,
    ) -> Daemon {
        let dir = scratch(name);
        let socket = dir.join("ring3d.sock");
        let config = format!(
            "[daemon]\nsocket = \"{}\"\ndriver_user = \"nobody\"\n{extra_daemon}\n{devices}\n",
            socket.display()
        );
        let path = dir.join("ring3d.toml");
        fs::write(&path, config).expect("writing the config");
        let mut command = Command::new(bin("ring3d"));
        command
            .args(["--config", &path.to_string_lossy()])
            .stdin(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("starting ring3d");
        Daemon {
            child: Some(child),
            socket,
            address: pci,
        }
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        let output = ring3(&self.socket, &["status", "--json"]);
        if !output.status.success() {
            return None;
        }
        let value: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        value.as_array()?.first().cloned()
    }

    /// Waits until the device's state is `state` and returns its status.
    pub fn wait_for(&mut self, state: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("ring3d exited ({status}) while waiting for {state}");
                }
            }
            if let Some(status) = self.status() {
                if status["state"] == state {
                    return status;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the device did not become {state} within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn running(&mut self) -> (u32, Vec<String>) {
        self.running_other_than(0)
    }

    /// Waits for a running driver whose pid is not `old`.
    pub fn running_other_than(&mut self, old: u32) -> (u32, Vec<String>) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            let status = self.wait_for("running", Duration::from_secs(120));
            if status["pid"].as_u64() != Some(u64::from(old)) {
                break status;
            }
            assert!(Instant::now() < deadline, "driver {old} was not replaced");
            std::thread::sleep(Duration::from_millis(200));
        };
        let pid = status["pid"].as_u64().expect("a running driver has a pid") as u32;
        let exposed = status["exposed"]
            .as_array()
            .expect("exposed devices")
            .iter()
            .map(|v| v.as_str().expect("a path").to_string())
            .collect::<Vec<_>>();
        for exposed in &exposed {
            // Block devices are paths; network interfaces are names.
            let path = if exposed.starts_with('/') {
                PathBuf::from(exposed)
            } else {
                Path::new("/sys/class/net").join(exposed)
            };
            wait_for_path(&path);
        }
        (pid, exposed)
    }

    /// SIGTERM, then checks ring3d exits 0 and the device left vfio-pci.
    pub fn stop(mut self) {
        let mut child = self.child.take().expect("ring3d still running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = wait_child(&mut child, Duration::from_secs(120));
        assert!(
            status.success(),
            "ring3d exited with {status} after SIGTERM"
        );
        if let Some(address) = &self.address {
            assert_ne!(
                driver_of(address).as_deref(),
                Some("vfio-pci"),
                "ring3d gave the controller back"
            );
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = wait_child(&mut child, Duration::from_secs(60));
        }
    }
}

pub fn wait_child(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for ring3d") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ring3d did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn wait_for_path(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a pid read from ring3 status.
    let rc = unsafe { libc::kill(pid as i32, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal})");
}

pub fn proc_status_field(pid: u32, field: &str) -> String {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc/PID/status");
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

pub fn sh(script: &str) -> Output {
    run("sh", &["-c", script])
}

pub fn driver_of(address: &str) -> Option<String> {
    let link = PathBuf::from(format!("/sys/bus/pci/devices/{address}/driver"));
    fs::read_link(link)
        .ok()
        .and_then(|target| target.file_name().map(|n| n.to_string_lossy().into_owned()))
}
