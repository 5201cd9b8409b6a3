//! The `ring3d` binary: exit statuses and what it prints.

use std::path::Path;
use std::process::{Command, Output};

fn ring3d(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ring3d"))
        .args(args)
        .output()
        .expect("running ring3d")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/ring3d.example.toml");

#[test]
fn check_without_resolving_accepts_the_example() {
    let output = ring3d(&["--config", EXAMPLE, "--check", "--no-resolve"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("valid (5 devices"), "{stdout}");
    assert!(
        stdout.contains("stick: usb 46f4:0001:R3RAW -> usb-storage exposed as ublk"),
        "{stdout}"
    );
    assert!(
        stdout.contains("console: usb 0403:6001 -> ftdi (115200 baud) exposed as pty"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "lan0: match 1af4:1041 -> virtio-net (queues 1, ring size 256) exposed as tap"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("fast0: pci 0000:03:00.0 -> nvme (queues 4, queue depth 128, namespaces 1) exposed as ublk"), "{stdout}");
    assert!(
        stdout.contains("scratch: match 1b36:0010 index 1 -> nvme"),
        "{stdout}"
    );
}

#[test]
fn check_lists_every_problem_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[device]]\nname = \"a\"\npci = \"0000:03:00\"\ndriver = \"nvme\"\n\
         [device.nvme]\nqueue_depth = 5000\n",
    )
    .unwrap();
    let output = ring3d(&["--config", path.to_str().unwrap(), "--check"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    let shown = path.display();
    assert!(
        stderr.contains(&format!(
            "{shown}:3:7: device \"a\": pci \"0000:03:00\" is not a PCI address"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{shown}:6:15: device \"a\": nvme: queue_depth 5000 is out of range (2 to 4096)"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("2 problems in the config; nothing was changed"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}

#[test]
fn check_resolves_against_a_sysfs_tree() {
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("bus/pci/devices/0000:03:00.0");
    std::fs::create_dir_all(&device).unwrap();
    for (file, value) in [
        ("vendor", "0x1b36"),
        ("device", "0x0010"),
        ("class", "0x010802"),
    ] {
        std::fs::write(device.join(file), format!("{value}\n")).unwrap();
    }
    let config = dir.path().join("ring3d.toml");
    std::fs::write(
        &config,
        "[[device]]\nname = \"n\"\nmatch = \"1b36:0010\"\ndriver = \"nvme\"\n",
    )
    .unwrap();
    let sysfs = dir.path().to_str().unwrap();
    let output = ring3d(&["-c", config.to_str().unwrap(), "--check", "--sysfs", sysfs]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("valid; 1 device:"), "{stdout}");
    assert!(
        stdout.contains("n: 0000:03:00.0 (1b36:0010, kernel driver none) -> nvme"),
        "{stdout}"
    );

    // The example's fast0 is here, but its scratch wants a second 1b36:0010.
    let output = ring3d(&["-c", EXAMPLE, "--check", "--sysfs", sysfs]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains(":28:9: device \"scratch\": index 1 is out of range: match 1b36:0010 fits 1 device (0000:03:00.0)"), "{stderr}");
    assert!(
        stderr.contains(":34:9: device \"lan0\": no PCI device matches 1af4:1041"),
        "{stderr}"
    );
    assert!(!stderr.contains("fast0"), "{stderr}");
    assert!(stderr.contains("2 problems in the config"), "{stderr}");
}

#[test]
fn missing_file_exits_1() {
    let output = ring3d(&["--config", "/nonexistent/ring3d.toml", "--check"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("/nonexistent/ring3d.toml: cannot read the config file"));
}

#[test]
fn the_daemon_refuses_to_start_when_its_devices_are_not_there() {
    let empty = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(empty.path().join("bus/pci/devices")).unwrap();
    let sysfs = empty.path().to_string_lossy().into_owned();
    let output = ring3d(&["--config", EXAMPLE, "--sysfs", &sysfs]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("0000:03:00.0"), "{stderr}");
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    assert!(output.stdout.is_empty());
}

#[test]
fn help_describes_every_option() {
    let output = ring3d(&["--help"]);
    assert_eq!(output.status.code(), Some(0));
    let help = text(&output.stdout);
    for option in [
        "--config <FILE>",
        "--check",
        "--no-resolve",
        "--sysfs <DIR>",
        "Exit status",
    ] {
        assert!(help.contains(option), "{option} not in:\n{help}");
    }
    assert!(Path::new(EXAMPLE).exists());
}
