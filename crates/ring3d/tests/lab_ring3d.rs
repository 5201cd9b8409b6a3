//! Lab tests of ring3d: the NVMe controller driven by an unprivileged, restartable
//! driver process and used by ordinary programs through /dev/ublkbN (`cargo xtask test`).
//!
//! Each test starts its own ring3d with its own config and control socket, and stops it
//! with SIGTERM, which must give the controller back.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ring3::pci::Sysfs;

mod common;
use common::*;

const NVME_CLASS: u32 = 0x01_08_02;

fn nvme_address() -> String {
    in_lab();
    Sysfs::system()
        .devices()
        .expect("listing PCI devices")
        .into_iter()
        .find(|d| d.class_code == NVME_CLASS)
        .expect("the lab VM has an NVMe controller")
        .address
        .to_string()
}

/// ring3d on the lab's NVMe controller, with `device` appended to its `[[device]]`.
fn start_nvme(name: &str, extra_daemon: &str, device: &str, env: &[(&str, &str)]) -> Daemon {
    let address = nvme_address();
    let devices =
        format!("[[device]]\nname = \"nvme0\"\npci = \"{address}\"\ndriver = \"nvme\"\n{device}");
    Daemon::launch(name, extra_daemon, &devices, env, Some(address))
}

const SMALL: &str = "[device.nvme]\nqueues = 2\nqueue_depth = 32\n";

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_ring3d_bad_configs_are_refused_and_touch_no_device() {
    let address = nvme_address();
    let before = driver_of(&address);
    let dir = scratch("bad-configs");
    let cases: [(&str, String, &str); 6] = [
        (
            "unknown key",
            format!("[[device]]\nname = \"a\"\npci = \"{address}\"\ndriver = \"nvme\"\nspeed = 3\n"),
            "bad.toml:5:1: ",
        ),
        (
            "malformed address",
            "[[device]]\nname = \"a\"\npci = \"00:03\"\ndriver = \"nvme\"\n".into(),
            "bad.toml:3:7: ",
        ),
        (
            "queue depth out of range",
            format!(
                "[[device]]\nname = \"a\"\npci = \"{address}\"\ndriver = \"nvme\"\n[device.nvme]\nqueue_depth = 5000\n"
            ),
            "queue_depth 5000 is out of range (2 to 4096)",
        ),
        (
            "driver as root",
            format!(
                "[daemon]\ndriver_user = \"root\"\n[[device]]\nname = \"a\"\npci = \"{address}\"\ndriver = \"nvme\"\n"
            ),
            "bad.toml:2:15: ",
        ),
        (
            "no such device",
            "[[device]]\nname = \"a\"\npci = \"0000:00:1f.7\"\ndriver = \"nvme\"\n".into(),
            "0000:00:1f.7",
        ),
        (
            "not an NVMe controller",
            "[[device]]\nname = \"a\"\nmatch = \"1234:11e8\"\ndriver = \"nvme\"\n".into(),
            "bad.toml:3:",
        ),
    ];
    for (what, text, expected) in cases {
        let path = dir.join("bad.toml");
        fs::write(&path, &text).expect("writing the config");
        let output = Command::new(bin("ring3d"))
            .current_dir(&dir)
            .args(["--config", "bad.toml"])
            .output()
            .expect("running ring3d");
        let stderr = String::from_utf8_lossy(&output.stderr);
        eprintln!("{what}:\n{stderr}");
        assert_eq!(output.status.code(), Some(1), "{what}: ring3d refused");
        assert!(
            stderr.contains(expected),
            "{what}: {expected:?} in {stderr}"
        );
        assert!(stderr.contains("nothing was changed"), "{what}: {stderr}");
        assert_eq!(
            driver_of(&address),
            before,
            "{what}: the controller was not touched"
        );
    }
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_ring3d_ext4_on_ublk_keeps_files_across_a_remount() {
    let mut daemon = start_nvme("ext4", "", SMALL, &[]);
    let (pid, exposed) = daemon.running();
    assert_eq!(
        exposed.len(),
        2,
        "one ublk device per namespace: {exposed:?}"
    );
    for (n, device) in exposed.iter().enumerate() {
        let mount = scratch(&format!("mnt-{}", device.replace('/', "_")));
        assert!(run("mkfs.ext4", &["-q", "-F", device]).status.success());
        assert!(run("mount", &[device, &mount.to_string_lossy()])
            .status
            .success());
        let mut sums = Vec::new();
        for (i, size) in [1usize, 4096, 100_000, 3 << 20].into_iter().enumerate() {
            let data: Vec<u8> = (0..size)
                .map(|j| (j * 31 + i * 7 + j / 4096) as u8)
                .collect();
            let path = mount.join(format!("file{i}"));
            let mut file = fs::File::create(&path).expect("creating a file");
            file.write_all(&data).expect("writing a file");
            file.sync_all().expect("syncing a file");
            sums.push((path, data));
        }
        // cp works as on any disk.
        assert!(run(
            "cp",
            &[
                &mount.join("file3").to_string_lossy(),
                &mount.join("copy").to_string_lossy()
            ]
        )
        .status
        .success());
        assert!(run("umount", &[&mount.to_string_lossy()]).status.success());
        assert!(run("mount", &[device, &mount.to_string_lossy()])
            .status
            .success());
        for (path, data) in &sums {
            assert_eq!(
                &fs::read(path).expect("reading back"),
                data,
                "{}",
                path.display()
            );
        }
        assert_eq!(fs::read(mount.join("copy")).expect("the copy"), sums[3].1);
        if n == 0 {
            // `ring3 restart` while the file system is mounted: a new driver process,
            // the same block device, the files still there.
            assert!(ring3(&daemon.socket, &["restart", "nvme0"])
                .status
                .success());
            let (pid, again) = daemon.running_other_than(pid);
            // `ring3 stop` refuses to pull a mounted block device away.
            let refused = ring3(&daemon.socket, &["stop", "nvme0"]);
            assert!(!refused.status.success());
            assert!(String::from_utf8_lossy(&refused.stderr).contains("is mounted on"));
            assert_eq!(
                daemon.status().expect("status")["pid"].as_u64(),
                Some(u64::from(pid))
            );
            assert_eq!(again, exposed, "the same block devices after a restart");
            assert!(run("sh", &["-c", "echo 3 > /proc/sys/vm/drop_caches"])
                .status
                .success());
            for (path, data) in &sums {
                assert_eq!(&fs::read(path).expect("reading after the restart"), data);
            }
        }
        assert!(run("umount", &[&mount.to_string_lossy()]).status.success());
        assert!(
            run("fsck.ext4", &["-n", "-f", device]).status.success(),
            "fsck is clean"
        );
    }
    // Discards reach the namespace: deallocated blocks read back as zeroes.
    let device = &exposed[1];
    assert!(run("blkdiscard", &[device]).status.success());
    let head = Command::new("dd")
        .args([
            &format!("if={device}"),
            "bs=1M",
            "count=4",
            "iflag=direct",
            "status=none",
        ])
        .output()
        .expect("running dd");
    assert_eq!(head.stdout.len(), 4 << 20);
    assert!(
        head.stdout.iter().all(|&b| b == 0),
        "discarded blocks read as zeroes"
    );
    let status = daemon.status().expect("status");
    assert!(status["io"]["writes"].as_u64().unwrap_or(0) > 0, "{status}");
    assert_eq!(status["io"]["errors"], 0, "{status}");
    daemon.stop();
}

fn fio_verify(device: &str, seed: u32) -> Output {
    run(
        "fio",
        &[
            "--name=chaos",
            &format!("--filename={device}"),
            "--ioengine=libaio",
            "--direct=1",
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=8",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            &format!("--randseed={seed}"),
            "--output-format=json",
        ],
    )
}

fn fio_errors(output: &Output) -> (u64, u64) {
    let value: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("fio printed JSON");
    let job = &value["jobs"][0];
    (
        job["error"].as_u64().unwrap_or(u64::MAX),
        job["write"]["total_ios"].as_u64().unwrap_or(0),
    )
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_ring3d_fio_verify_survives_twenty_driver_kills_and_a_hang() {
    let mut daemon = start_nvme(
        "chaos",
        "heartbeat_ms = 100\nheartbeat_timeout_ms = 2000\nrestart_budget = { restarts = 1000, window_s = 3600 }\n",
        SMALL,
        &[],
    );
    let (_, exposed) = daemon.running();
    let device = exposed[0].clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fio = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut runs = Vec::new();
            let mut seed = 1;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let output = fio_verify(&device, seed);
                runs.push((output.status.success(), fio_errors(&output)));
                seed += 1;
            }
            runs
        })
    };
    let mut rng_state = 0x2545_f491_u64;
    let mut kills = 0;
    let mut last_pid = 0;
    while kills < 20 {
        let (pid, _) = daemon.running_other_than(last_pid);
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        std::thread::sleep(Duration::from_millis(200 + rng_state % 1300));
        kill(pid, libc::SIGKILL);
        last_pid = pid;
        kills += 1;
    }
    // A hung driver: stopped, so it neither exits nor sends heartbeats.
    let (pid, _) = daemon.running_other_than(last_pid);
    kill(pid, libc::SIGSTOP);
    daemon.running_other_than(pid);
    let status = daemon.status().expect("status");
    assert!(
        status["reason"]
            .as_str()
            .unwrap_or("")
            .contains("no heartbeat"),
        "the hang is the reason: {status}"
    );
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Release);
    let runs = fio.join().expect("the fio thread");
    assert!(!runs.is_empty());
    for (i, (ok, (error, ios))) in runs.iter().enumerate() {
        assert!(ok, "fio run {i} failed");
        assert_eq!(*error, 0, "fio run {i} reported an error");
        assert!(*ios > 0, "fio run {i} did I/O");
    }
    let status = daemon.status().expect("status");
    assert!(
        status["restarts"].as_u64().unwrap_or(0) >= 21,
        "ring3 status counts the restarts: {status}"
    );
    daemon.stop();
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_ring3d_driver_runs_unprivileged_in_a_seccomp_sandbox() {
    let mut daemon = start_nvme("sandbox", "", SMALL, &[]);
    let (pid, _) = daemon.running();
    let ids = |field: &str| -> Vec<String> {
        proc_status_field(pid, field)
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    assert_eq!(ids("Uid"), ["65534"; 4], "the driver runs as nobody");
    assert_eq!(ids("Gid"), ["65534"; 4]);
    assert_eq!(proc_status_field(pid, "Groups"), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(proc_status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(proc_status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(
        proc_status_field(pid, "Seccomp"),
        "2",
        "a seccomp filter is on"
    );
    // The same sandbox, entered by the check command, refuses what a driver never needs.
    let output = run(&bin("ring3d"), &["sandbox-check", "--user", "nobody"]);
    assert!(output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    eprintln!("{report:#}");
    let text = report.to_string();
    assert!(
        text.contains("EPERM") || text.contains("Operation not permitted"),
        "{text}"
    );
    daemon.stop();
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_ring3d_gives_up_on_a_driver_that_crashes_on_start() {
    let mut daemon = start_nvme(
        "budget",
        "restart_budget = { restarts = 2, window_s = 600 }\n",
        SMALL,
        &[("RING3_DRIVER_FAULT", "abort-on-start")],
    );
    let status = daemon.wait_for("failed", Duration::from_secs(120));
    assert_eq!(status["restarts"], 2, "{status}");
    let reason = status["reason"].as_str().expect("a reason");
    assert!(reason.contains("gave up after 2 restarts"), "{reason}");
    assert!(reason.contains("SIGABRT"), "the crash is named: {reason}");
    // ring3 status prints it for people too.
    let table = ring3(&daemon.socket, &["status"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("gave up"));
    // ring3 stop gives the device back.
    let stopped = ring3(&daemon.socket, &["stop", "nvme0"]);
    assert!(stopped.status.success());
    assert_ne!(
        driver_of(daemon.address.as_deref().unwrap_or_default()).as_deref(),
        Some("vfio-pci")
    );
    daemon.stop();
}

/// The PCI addresses of the lab's e1000e NICs (8086:10d3), in address order.
fn e1000e_addresses() -> Vec<String> {
    Sysfs::system()
        .devices()
        .expect("listing PCI devices")
        .into_iter()
        .filter(|d| d.vendor_id == 0x8086 && d.device_id == 0x10d3)
        .map(|d| d.address.to_string())
        .collect()
}

/// A NIC under ring3d behind a TAP interface, talking to the kernel's e1000e driver on
/// the other NIC of the hub (in its own network namespace, so the traffic crosses the
/// emulated wire): ping, then a TCP transfer, then the same after the driver is killed.
#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_ring3d_nic_behind_a_tap_survives_a_driver_kill() {
    in_lab();
    let nics = e1000e_addresses();
    assert!(nics.len() >= 2, "the lab VM has two e1000e NICs: {nics:?}");
    let (ours, peer) = (&nics[0], &nics[1]);
    let devices = format!("[[device]]\nname = \"lan0\"\npci = \"{ours}\"\ndriver = \"e1000e\"\n");
    let mut daemon = Daemon::launch(
        "nic",
        "heartbeat_ms = 200\nheartbeat_timeout_ms = 3000\n",
        &devices,
        &[],
        Some(ours.clone()),
    );
    let (pid, exposed) = daemon.running();
    assert_eq!(exposed.len(), 1, "one TAP interface: {exposed:?}");
    let tap = exposed[0].clone();
    assert!(
        Path::new(&format!("/sys/class/net/{tap}")).exists(),
        "{tap} exists"
    );

    // The peer: the kernel's own driver on the other NIC, in a namespace.
    assert!(sh("modprobe e1000e").status.success());
    let peer_if = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let dir = format!("/sys/bus/pci/devices/{peer}/net");
            if let Some(name) = fs::read_dir(&dir)
                .ok()
                .and_then(|mut entries| entries.next())
                .and_then(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
            {
                break name;
            }
            assert!(Instant::now() < deadline, "the kernel's e1000e took {peer}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let setup = format!(
        "ip netns del r3peer 2>/dev/null; ip netns add r3peer && \
         ip link set {peer_if} netns r3peer && \
         ip -n r3peer addr add 10.44.0.2/24 dev {peer_if} && \
         ip -n r3peer link set {peer_if} up && ip -n r3peer link set lo up && \
         ip addr add 10.44.0.1/24 dev {tap} && ip link set {tap} up"
    );
    assert!(sh(&setup).status.success(), "network setup");
    let ping = || sh("ping -c 3 -W 5 -i 0.3 10.44.0.2");
    // The first ping may wait for the peer's link to come up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ping().status.success() {
        assert!(Instant::now() < deadline, "ping through the TAP bridge");
    }
    tcp_transfer_checked();

    // A killed driver: the interface and its address stay, traffic resumes.
    kill(pid, libc::SIGKILL);
    let (new_pid, again) = daemon.running_other_than(pid);
    assert_ne!(new_pid, pid);
    assert_eq!(again, exposed, "the same interface after the restart");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ping().status.success() {
        assert!(Instant::now() < deadline, "ping after the driver restart");
    }
    tcp_transfer_checked();
    let status = daemon.status().expect("status");
    assert_eq!(status["restarts"], 1, "{status}");
    let net = &status["net"][0];
    assert!(net["rx_packets"].as_u64().unwrap_or(0) > 0, "{status}");
    assert!(net["tx_packets"].as_u64().unwrap_or(0) > 0, "{status}");
    // `ring3 net ADDR stats` shows the same counters per queue.
    let stats = ring3(&daemon.socket, &["net", ours, "stats", "--json"]);
    assert!(stats.status.success());
    let queues: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("JSON");
    assert!(
        queues[0]["rx_packets"].as_u64().unwrap_or(0) > 0,
        "{queues}"
    );
    daemon.stop();
    assert!(
        !Path::new(&format!("/sys/class/net/{tap}")).exists(),
        "{tap} removed"
    );
    let _ = sh("ip netns del r3peer");
}

/// 4 MiB over TCP from the peer's namespace to this side, every byte compared.
fn tcp_transfer_checked() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let listener = std::net::TcpListener::bind("10.44.0.1:0").expect("listening on the TAP");
    let port = listener.local_addr().expect("the port").port();
    let size = 4 << 20;
    let byte = |i: usize| (i * 7 + i / 251) as u8;
    // The sender: a thread that joins the peer's network namespace.
    let sender = std::thread::spawn(move || {
        use std::io::Write;
        let ns = fs::File::open("/run/netns/r3peer").expect("the peer's namespace");
        // SAFETY: setns(2) on an open namespace file, for this thread only.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "joining the peer's namespace");
        let mut stream =
            std::net::TcpStream::connect(("10.44.0.1", port)).expect("connecting across");
        let data: Vec<u8> = (0..size).map(byte).collect();
        stream.write_all(&data).expect("sending");
    });
    let (mut stream, _) = listener.accept().expect("the peer connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("a timeout");
    let mut data = Vec::new();
    stream.read_to_end(&mut data).expect("reading the transfer");
    sender.join().expect("the sender");
    assert_eq!(data.len(), size, "every byte arrived");
    assert!(
        data.iter().enumerate().all(|(i, &b)| b == byte(i)),
        "and intact"
    );
}
