//! Lab tests of ring3d with USB devices (`cargo xtask test`): QEMU's usb-storage and
//! usb-serial on an xHCI controller, each driven by an unprivileged, restartable driver
//! process that holds nothing but the device's usbfs file, and used by ordinary
//! programs through /dev/ublkbN, a FAT file system served through FUSE, and a terminal.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

/// The lab's raw 64 MiB USB stick, its FAT one, and its serial adapters.
const RAW_STICK: &str = "46f4:0001:R3RAW";
const FAT_STICK: &str = "46f4:0001:R3FAT";
const ECHO_SERIAL: &str = "0403:6001:R3SERECHO";

/// The sysfs directory (`/sys/bus/usb/devices/1-2`) of the USB device with this serial.
fn usb_device_dir(serial: &str) -> Option<PathBuf> {
    fs::read_dir("/sys/bus/usb/devices")
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| fs::read_to_string(path.join("serial")).is_ok_and(|s| s.trim() == serial))
}

/// The kernel driver bound to interface 0 of the device with this serial.
fn interface_driver(serial: &str) -> Option<String> {
    let dir = usb_device_dir(serial)?;
    let name = dir.file_name()?.to_string_lossy().into_owned();
    let link = fs::read_link(dir.join(format!("{name}:1.0")).join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

fn usb_device(name: &str, address: &str, driver: &str, extra: &str) -> String {
    format!("[[device]]\nname = \"{name}\"\nusb = \"{address}\"\ndriver = \"{driver}\"\n{extra}\n")
}

/// The one exposed block device of a running USB storage device.
fn block_device(daemon: &mut Daemon, old: u32) -> (u32, String) {
    let (pid, exposed) = daemon.running_other_than(old);
    assert_eq!(exposed.len(), 1, "one block device: {exposed:?}");
    assert!(exposed[0].starts_with("/dev/ublkb"), "{exposed:?}");
    (pid, exposed[0].clone())
}

/// Pseudo-random bytes for block `index` of a pattern run with `seed`.
fn pattern(seed: u64, index: u64, len: usize) -> Vec<u8> {
    let mut state = seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", "3").expect("dropping the page cache");
}

/// Writes the whole device in chunks of many sizes, flushes, drops the cache and reads
/// it all back through a fresh file, comparing every byte.
fn pattern_round_trip(device: &str, seed: u64) -> u64 {
    let size = fs::read_to_string(format!(
        "/sys/class/block/{}/size",
        device.trim_start_matches("/dev/")
    ))
    .expect("the block device's size")
    .trim()
    .parse::<u64>()
    .expect("a number of sectors")
        * 512;
    // Sizes that do and do not line up with the driver's 128 KiB transfers.
    let sizes = [
        4096usize,
        512 * 3,
        65536,
        131072 + 512,
        1 << 20,
        512,
        300 * 1024,
    ];
    let mut chunks = Vec::new();
    let mut offset = 0u64;
    for (i, &len) in sizes.iter().cycle().enumerate() {
        if offset >= size {
            break;
        }
        let len = len.min((size - offset) as usize);
        chunks.push((i as u64, offset, len));
        offset += len as u64;
    }
    let file = OpenOptions::new()
        .write(true)
        .open(device)
        .expect("opening the block device for writing");
    for &(index, offset, len) in &chunks {
        file.write_all_at(&pattern(seed, index, len), offset)
            .unwrap_or_else(|e| panic!("writing {len} bytes at {offset}: {e}"));
    }
    file.sync_all().expect("fsync of the block device");
    drop(file);
    drop_caches();
    let file = File::open(device).expect("opening the block device for reading");
    for &(index, offset, len) in &chunks {
        let mut read = vec![0u8; len];
        file.read_exact_at(&mut read, offset)
            .unwrap_or_else(|e| panic!("reading {len} bytes at {offset}: {e}"));
        assert!(
            read == pattern(seed, index, len),
            "the {len} bytes at {offset} read back differ from those written"
        );
    }
    size
}

/// The USB stick under ring3d: ring3d detaches the kernel's usb-storage (force = true)
/// and gives it back on stop; the whole device written and read back with many transfer
/// sizes; fsync reaches the device as SYNCHRONIZE CACHE; the driver is sandboxed; a
/// SIGKILL during writes loses nothing.
#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_ring3d_usb_storage_pattern_sandbox_and_restart() {
    in_lab();
    // The kernel's driver takes the stick first, as on a desktop.
    assert!(sh("modprobe usb-storage").status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while interface_driver("R3RAW").as_deref() != Some("usb-storage") {
        assert!(
            Instant::now() < deadline,
            "usb-storage did not bind the stick"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let devices = usb_device("stick", RAW_STICK, "usb-storage", "force = true");
    let mut daemon = Daemon::launch("usb-storage", "", &devices, &[], None);
    let (pid, device) = block_device(&mut daemon, 0);
    assert_eq!(interface_driver("R3RAW").as_deref(), Some("usbfs"));

    let size = pattern_round_trip(&device, 1);
    assert_eq!(size, 64 << 20, "the whole 64 MiB stick");
    let status = daemon.status().expect("status");
    assert!(
        status["io"]["flushes"].as_u64().unwrap_or(0) >= 1,
        "fsync became a flush: {status}"
    );
    assert!(status["io"]["written_bytes"].as_u64().unwrap_or(0) >= size);

    // Nothing but the usbfs file, and no privileges.
    assert_eq!(
        proc_status_field(pid, "Uid")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["65534"; 4]
    );
    assert_eq!(proc_status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(proc_status_field(pid, "Seccomp"), "2");
    // Beyond standard input, output and error (ring3d's own): the files it holds.
    let fds: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the driver's files")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) > Some(2))
        .filter_map(|e| fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        fds.iter().any(|p| p.starts_with("/dev/bus/usb/")),
        "the driver holds the usbfs file: {fds:?}"
    );
    assert!(
        !fds.iter().any(|p| p.starts_with("/dev/")
            && !p.starts_with("/dev/bus/usb/")
            && !p.starts_with("/dev/ublkc")),
        "and no other device: {fds:?}"
    );
    // A driver killed during writes: fio's checksums still match.
    let fio = fio_verify_child(&device, 7);
    std::thread::sleep(Duration::from_secs(3));
    kill(pid, libc::SIGKILL);
    let (new_pid, again) = block_device(&mut daemon, pid);
    assert_eq!(again, device, "the same block device after the restart");
    assert_ne!(new_pid, pid);
    let output = fio.wait_with_output().expect("waiting for fio");
    eprintln!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(output.status.success(), "fio verify across the kill failed");
    let status = daemon.status().expect("status");
    assert_eq!(status["restarts"], 1, "{status}");

    daemon.stop();
    // The kernel's driver has the stick again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while interface_driver("R3RAW").as_deref() != Some("usb-storage") {
        assert!(
            Instant::now() < deadline,
            "usb-storage was not attached again: {:?}",
            interface_driver("R3RAW")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = sh("rmmod usb-storage");
}

fn fio_verify_child(device: &str, seed: u32) -> Child {
    Command::new("fio")
        .args([
            "--name=usb",
            &format!("--filename={device}"),
            "--ioengine=psync",
            "--direct=1",
            "--rw=randwrite",
            "--bs=4k",
            "--size=4M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
            &format!("--randseed={seed}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting fio")
}

/// The files the FAT test leaves for the host's check after the VM: `RING3/F<N>.BIN`.
const FAT_FILE_SIZES: [usize; 8] = [0, 1, 511, 512, 4096, 65537, 262144, (1 << 20) + 3];

fn fat_file(n: usize) -> Vec<u8> {
    (0..FAT_FILE_SIZES[n])
        .map(|i| ((i * 131 + n * 17) % 251) as u8)
        .collect()
}

/// `ring3 mount-fat` on the block device, in the background; waits for the mount.
fn mount_fat(device: &str, mountpoint: &Path) -> Child {
    let mut child = Command::new(bin("ring3"))
        .args(["mount-fat", device, &mountpoint.to_string_lossy()])
        .stdin(Stdio::null())
        .spawn()
        .expect("starting ring3 mount-fat");
    let deadline = Instant::now() + Duration::from_secs(60);
    let target = mountpoint.to_string_lossy().into_owned();
    loop {
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        if mounts
            .lines()
            .any(|line| line.split_whitespace().nth(1) == Some(target.as_str()))
        {
            return child;
        }
        if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
            let status = child.wait();
            panic!("{target} was not mounted (ring3 mount-fat: {status:?})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn unmount(mountpoint: &Path, mut child: Child) {
    let output = run("umount", &[&mountpoint.to_string_lossy()]);
    assert!(output.status.success(), "umount");
    let status = wait_child(&mut child, Duration::from_secs(60));
    assert!(status.success(), "ring3 mount-fat exited with {status}");
}

fn sha256(path: &Path) -> String {
    let output = run("sha256sum", &[&path.to_string_lossy()]);
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The whole storage stack in user mode: the FAT stick (made with mkfs.vfat on the host)
/// driven by ring3d's USB storage driver and served by `ring3 mount-fat` through FUSE.
/// Files copied in and out keep their checksums, directories, renames and deletes
/// work, and after unmount and remount everything is still there. The files stay on
/// the stick for the host's `fsck.vfat -n` and content check after the VM.
#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_ring3d_usb_fat_through_fuse_keeps_files() {
    in_lab();
    let devices = usb_device("fatstick", FAT_STICK, "usb-storage", "");
    let mut daemon = Daemon::launch("usb-fat", "", &devices, &[], None);
    let (_, device) = block_device(&mut daemon, 0);
    let dir = scratch("usb-fat-files");
    let mnt = dir.join("mnt");
    fs::create_dir_all(&mnt).expect("mountpoint");

    let fuse = mount_fat(&device, &mnt);
    let ring3_dir = mnt.join("RING3");
    let _ = fs::remove_dir_all(&ring3_dir);
    fs::create_dir(&ring3_dir).expect("mkdir on the FAT file system");
    // Copied in with cp from files made here, then compared byte for byte and by sum.
    let mut sums = Vec::new();
    for n in 0..FAT_FILE_SIZES.len() {
        let source = dir.join(format!("source{n}"));
        fs::write(&source, fat_file(n)).expect("writing a source file");
        let target = ring3_dir.join(format!("F{n}.BIN"));
        assert!(run(
            "cp",
            &[&source.to_string_lossy(), &target.to_string_lossy()]
        )
        .status
        .success());
        sums.push(sha256(&source));
    }
    // Directories, renames and deletes.
    let work = mnt.join("work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(work.join("sub")).expect("nested mkdir");
    fs::write(work.join("sub/a.txt"), b"first").expect("create");
    fs::rename(work.join("sub/a.txt"), work.join("b.txt")).expect("rename across dirs");
    assert!(!work.join("sub/a.txt").exists());
    assert_eq!(
        fs::read(work.join("b.txt")).expect("read renamed"),
        b"first"
    );
    fs::write(work.join("gone.txt"), vec![7u8; 10000]).expect("create");
    fs::remove_file(work.join("gone.txt")).expect("unlink");
    assert!(
        fs::remove_dir(&work).is_err(),
        "a non-empty directory stays"
    );
    fs::remove_dir(work.join("sub")).expect("rmdir of an empty directory");
    let names: Vec<String> = fs::read_dir(&work)
        .expect("readdir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["b.txt"]);
    fs::write(ring3_dir.join("DONE"), b"done\n").expect("the marker for the host's check");
    unmount(&mnt, fuse);

    // Remounted (with the page cache dropped): everything is there, copied out intact.
    drop_caches();
    let fuse = mount_fat(&device, &mnt);
    for (n, sum) in sums.iter().enumerate() {
        let file = ring3_dir.join(format!("F{n}.BIN"));
        let out = dir.join(format!("out{n}"));
        assert!(
            run("cp", &[&file.to_string_lossy(), &out.to_string_lossy()])
                .status
                .success()
        );
        assert_eq!(&sha256(&out), sum, "F{n}.BIN copied out");
        let mut data = Vec::new();
        File::open(&file)
            .and_then(|mut f| f.read_to_end(&mut data))
            .expect("reading back");
        assert!(data == fat_file(n), "F{n}.BIN content");
    }
    assert_eq!(fs::read(work.join("b.txt")).expect("still there"), b"first");
    unmount(&mnt, fuse);
    daemon.stop();
}

/// The serial adapter under ring3d: the terminal link exists, bytes written to it come
/// back through the host's echo, and an application's open terminal keeps working
/// across a driver kill.
#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_ring3d_usb_serial_terminal_survives_a_driver_kill() {
    in_lab();
    let devices = usb_device(
        "serial0",
        ECHO_SERIAL,
        "ftdi",
        "[device.serial]\nbaud = 115200",
    );
    let mut daemon = Daemon::launch("usb-serial", "", &devices, &[], None);
    let (pid, exposed) = daemon.running_other_than(0);
    let link = Path::new("/run/ring3/ttyUSB-R3SERECHO");
    assert!(
        exposed.iter().any(|e| Path::new(e) == link),
        "the stable link is shown: {exposed:?}"
    );
    assert!(run(
        "stty",
        &[
            "-F",
            &link.to_string_lossy(),
            "raw",
            "-echo",
            "min",
            "0",
            "time",
            "5",
            "115200",
        ]
    )
    .status
    .success());
    let mut terminal = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(link)
        .expect("opening the terminal");
    echo_round_trip(&mut terminal, 1, 32 << 10);

    kill(pid, libc::SIGKILL);
    let (new_pid, _) = daemon.running_other_than(pid);
    assert_ne!(new_pid, pid);
    // The same open terminal, a new driver behind it.
    echo_round_trip(&mut terminal, 2, 32 << 10);
    drop(terminal);
    daemon.stop();
    assert!(!link.exists(), "the link goes when ring3d stops");
}

/// Writes `len` pattern bytes to the terminal and reads the echo back, comparing.
fn echo_round_trip(terminal: &mut File, seed: u64, len: usize) {
    let data = pattern(seed, 0, len);
    let mut reader = terminal
        .try_clone()
        .expect("a second handle on the terminal");
    let expected = data.len();
    let reading = std::thread::spawn(move || {
        let mut got = Vec::with_capacity(expected);
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(120);
        while got.len() < expected && Instant::now() < deadline {
            match reader.read(&mut buf) {
                Ok(0) => std::thread::sleep(Duration::from_millis(10)),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("reading the terminal: {e}"),
            }
        }
        got
    });
    for chunk in data.chunks(1000) {
        terminal.write_all(chunk).expect("writing the terminal");
    }
    let got = reading.join().expect("the reader");
    assert_eq!(got.len(), data.len(), "every byte came back");
    assert!(got == data, "the echo matches what was written");
}

/// The hub port a USB device is plugged into (`.../1-0:1.0/usb1-port2`), and the hub
/// interface that port belongs to (`1-0:1.0`).
fn hub_port(serial: &str) -> (PathBuf, String) {
    let device = usb_device_dir(serial).expect("the device is plugged in");
    let port = fs::canonicalize(device.join("port")).expect("the device's port link");
    let hub = port
        .parent()
        .and_then(Path::file_name)
        .expect("the hub interface above the port")
        .to_string_lossy()
        .into_owned();
    (port, hub)
}

/// Unplugging the stick under ring3d: its state becomes `waiting` (no restart charged),
/// a read issued meanwhile waits instead of failing, and when the stick is plugged back
/// in a new driver serves the same /dev/ublkbN, which answers that read with the data
/// written before the unplug.
#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_ring3d_usb_unplugged_stick_waits_and_comes_back() {
    in_lab();
    let devices = usb_device("stick", RAW_STICK, "usb-storage", "");
    let mut daemon = Daemon::launch("usb-unplug", "", &devices, &[], None);
    let (pid, device) = block_device(&mut daemon, 0);
    let data = pattern(9, 0, 1 << 20);
    let file = OpenOptions::new()
        .write(true)
        .open(&device)
        .expect("opening the block device");
    file.write_all_at(&data, 0).expect("writing 1 MiB");
    file.sync_all().expect("fsync");
    drop(file);
    drop_caches();

    // Unplug: the hub port goes dark.
    let (port, hub) = hub_port("R3RAW");
    fs::write(port.join("disable"), "1").expect("disabling the port");
    let status = daemon.wait_for("waiting", Duration::from_secs(60));
    let reason = status["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("not plugged in"), "{status}");
    assert_eq!(status["restarts"], 0, "an unplug is not the driver's fault");
    assert!(status["pid"].is_null(), "{status}");

    // A read while the stick is away is held, not failed.
    let reader = {
        let device = device.clone();
        std::thread::spawn(move || {
            let file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&device)
                .expect("opening the block device");
            let mut buf = AlignedBlock([0u8; 4096]);
            file.read_exact_at(&mut buf.0, 8192)
                .map(|()| buf.0.to_vec())
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    assert!(!reader.is_finished(), "the read waits for the stick");

    // Plug it back in: enable the port and have the hub look at its ports again.
    fs::write(port.join("disable"), "0").expect("enabling the port");
    let output = sh(&format!(
        "echo {hub} > /sys/bus/usb/drivers/hub/unbind && echo {hub} > /sys/bus/usb/drivers/hub/bind"
    ));
    assert!(output.status.success(), "re-probing the hub");
    let (new_pid, again) = block_device(&mut daemon, pid);
    assert_ne!(new_pid, pid, "a new driver");
    assert_eq!(again, device, "the same block device");
    let read = reader
        .join()
        .expect("the reader")
        .expect("the held read succeeded");
    assert!(
        read == data[8192..8192 + 4096],
        "and read what was written before"
    );
    let status = daemon.status().expect("status");
    assert_eq!(status["restarts"], 0, "{status}");
    daemon.stop();
}

/// A block-aligned buffer for O_DIRECT.
#[repr(align(4096))]
struct AlignedBlock([u8; 4096]);
