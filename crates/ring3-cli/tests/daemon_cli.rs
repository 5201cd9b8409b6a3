//! `ring3 status`, `restart` and `stop` against a control socket served by a fake daemon.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use ring3d::control::{ControlServer, DeviceStatus, Handler, IoCounters, Request, Response};

/// Drives `fast0` (running) and `slow1` (failed).
struct FakeDaemon;

impl Handler for FakeDaemon {
    fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => Response::Status {
                devices: vec![
                    DeviceStatus {
                        name: "fast0".into(),
                        pci: "0000:03:00.0".into(),
                        driver: "nvme".into(),
                        expose: "ublk".into(),
                        state: "running".into(),
                        pid: Some(4242),
                        restarts: 0,
                        since_s: 12,
                        reason: None,
                        exposed: vec!["/dev/ublkb0".into()],
                        io: IoCounters {
                            reads: 100,
                            writes: 20,
                            ..IoCounters::default()
                        },
                        net: Vec::new(),
                    },
                    DeviceStatus {
                        name: "slow1".into(),
                        pci: "0000:04:00.0".into(),
                        driver: "nvme".into(),
                        expose: "ublk".into(),
                        state: "failed".into(),
                        pid: None,
                        restarts: 5,
                        since_s: 3,
                        reason: Some("restart budget spent: 5 restarts in 1800 s".into()),
                        exposed: vec![],
                        io: IoCounters::default(),
                        net: Vec::new(),
                    },
                ],
            },
            Request::Restart { device } if device == "fast0" => Response::Done {
                message: "fast0: restarted".into(),
            },
            Request::Restart { device } | Request::Stop { device } => Response::Error {
                message: format!("no device {device:?}; ring3 status lists the devices"),
            },
        }
    }
}

fn ring3(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ring3"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .expect("running ring3")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn status_restart_and_stop_talk_to_the_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("ring3d.sock");
    let server = ControlServer::start(&socket, None, Arc::new(FakeDaemon)).expect("listening");

    let output = ring3(&socket, &["status"]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(lines[0].starts_with("NAME "), "{stdout}");
    assert!(lines[0].ends_with("ERRORS"), "{stdout}");
    let fast0: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        fast0,
        [
            "fast0",
            "0000:03:00.0",
            "nvme",
            "running",
            "4242",
            "0",
            "/dev/ublkb0",
            "100",
            "20",
            "0"
        ]
    );
    assert!(lines[2].starts_with("slow1 "), "{stdout}");
    assert_eq!(
        lines[3],
        "  reason: restart budget spent: 5 restarts in 1800 s"
    );

    let output = ring3(&socket, &["status", "--json"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let devices: Vec<DeviceStatus> =
        serde_json::from_slice(&output.stdout).expect("a JSON array of devices");
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[1].state, "failed");

    let output = ring3(&socket, &["restart", "fast0"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "fast0: restarted\n");

    let output = ring3(&socket, &["stop", "fast9"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        text(&output.stderr),
        "error: ring3d: no device \"fast9\"; ring3 status lists the devices\n"
    );

    server.shutdown();
    let output = ring3(&socket, &["status"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("is ring3d running?"), "{stderr}");
}
