//! Lab tests of ring3-ublk against the guest kernel's ublk_drv, through the example server
//! `ublk_ramdisk`, inside the lab VM (`cargo xtask test`; they need root and ublk_drv).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

fn in_lab() {
    assert_eq!(
        std::env::var("RING3_LAB").as_deref(),
        Ok("1"),
        "lab tests run inside the lab VM: use `cargo xtask test`"
    );
}

/// target/<profile>/examples/ublk_ramdisk, next to this test's target/<profile>/deps/.
fn ramdisk_binary() -> PathBuf {
    let test = std::env::current_exe().expect("the test binary's path");
    let profile_dir = test
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lies in target/<profile>/deps");
    let binary = profile_dir.join("examples/ublk_ramdisk");
    assert!(
        binary.exists(),
        "{} is missing: `cargo build -p ring3-ublk --examples` first",
        binary.display()
    );
    binary
}

/// A running ublk_ramdisk, stopped by closing its stdin.
struct Server {
    child: Child,
    stdin: Option<ChildStdin>,
    id: u32,
    block: PathBuf,
}

impl Server {
    fn spawn(args: &[&str]) -> Server {
        eprintln!("$ ublk_ramdisk {}", args.join(" "));
        let mut child = Command::new(ramdisk_binary())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting ublk_ramdisk");
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("reading the server's first line");
        assert!(
            !line.is_empty(),
            "ublk_ramdisk exited before the device went live: {:?}",
            child.wait()
        );
        eprintln!("{}", line.trim_end());
        let mut id = None;
        let mut block = None;
        for field in line.split_whitespace() {
            match field.split_once('=') {
                Some(("id", value)) => id = value.parse().ok(),
                Some(("block", value)) => block = Some(PathBuf::from(value)),
                _ => {}
            }
        }
        Server {
            child,
            stdin,
            id: id.expect("the server prints id=N"),
            block: block.expect("the server prints block=PATH"),
        }
    }

    /// Closes stdin: the server stops and deletes the device, and must exit cleanly.
    fn stop(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().expect("waiting for ublk_ramdisk");
        assert!(status.success(), "ublk_ramdisk failed: {status}");
        assert!(
            !Path::new(&format!("/dev/ublkc{}", self.id)).exists(),
            "the device was not deleted"
        );
    }

    /// SIGKILL, as a crash would.
    fn kill(mut self) {
        self.child.kill().expect("killing ublk_ramdisk");
        self.child.wait().expect("reaping ublk_ramdisk");
    }
}

fn run(program: &str, args: &[&str]) {
    eprintln!("$ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|error| panic!("running {program}: {error}"));
    assert!(status.success(), "{program} {args:?} failed: {status}");
}

/// `len` bytes that differ from block to block and from run to run of `seed`.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 9) as u8 ^ seed)
        .collect()
}

fn read_device(block: &Path, offset: u64, len: usize) -> Vec<u8> {
    let path = format!("/tmp/ublk-read-{}-{offset}", std::process::id());
    run(
        "dd",
        &[
            &format!("if={}", block.display()),
            &format!("of={path}"),
            "bs=4096",
            &format!("skip={}", offset / 4096),
            &format!("count={}", len / 4096),
            "iflag=direct",
            "status=none",
        ],
    );
    let data = std::fs::read(&path).expect("reading what dd read");
    std::fs::remove_file(&path).ok();
    data
}

fn dd_write_args(block: &Path, source: &str, offset: u64) -> Vec<String> {
    vec![
        format!("if={source}"),
        format!("of={}", block.display()),
        "bs=4096".into(),
        format!("seek={}", offset / 4096),
        "oflag=direct".into(),
        "conv=notrunc".into(),
        "status=none".into(),
    ]
}

fn write_device(block: &Path, offset: u64, data: &[u8], cpu: Option<u32>) {
    let source = format!("/tmp/ublk-write-{}-{offset}", std::process::id());
    std::fs::write(&source, data).expect("writing the pattern file");
    let args = dd_write_args(block, &source, offset);
    match cpu {
        // Pinned, so that the request goes to that CPU's hardware queue.
        Some(cpu) => {
            let mut pinned = vec!["-c".to_string(), cpu.to_string(), "dd".to_string()];
            pinned.extend(args);
            run(
                "taskset",
                &pinned.iter().map(String::as_str).collect::<Vec<_>>(),
            );
        }
        None => run("dd", &args.iter().map(String::as_str).collect::<Vec<_>>()),
    }
    std::fs::remove_file(&source).ok();
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_ublk_ramdisk_two_queues_read_write_discard_flush() {
    in_lab();
    let server = Server::spawn(&["--size-mib", "16", "--queues", "2", "--depth", "32"]);
    let block = server.block.clone();

    // One half through each CPU, hence through each hardware queue.
    let first = pattern(1, 512 << 10);
    let second = pattern(2, 512 << 10);
    write_device(&block, 0, &first, Some(0));
    write_device(&block, 4 << 20, &second, Some(1));
    assert!(
        read_device(&block, 0, first.len()) == first,
        "first half differs"
    );
    assert!(
        read_device(&block, 4 << 20, second.len()) == second,
        "second half differs"
    );

    // A flush (fsync of the block device), a discard, and write-zeroes.
    run("sync", &[&block.display().to_string()]);
    run(
        "blkdiscard",
        &["-o", "0", "-l", "65536", &block.display().to_string()],
    );
    assert!(
        read_device(&block, 0, 65536).iter().all(|&b| b == 0),
        "a discarded range of the RAM disk reads back as zeros"
    );
    run(
        "blkdiscard",
        &[
            "-z",
            "-o",
            "4194304",
            "-l",
            "65536",
            &block.display().to_string(),
        ],
    );
    let after = read_device(&block, 4 << 20, 128 << 10);
    assert!(after[..65536].iter().all(|&b| b == 0), "write-zeroes");
    assert!(
        after[65536..] == second[65536..128 << 10],
        "beyond the zeroed range"
    );

    server.stop();
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_ublk_recovery_reissues_io_issued_while_no_server_runs() {
    in_lab();
    let backing = format!("/tmp/ublk-recovery-{}", std::process::id());
    std::fs::remove_file(&backing).ok();
    let server = Server::spawn(&[
        "--size-mib",
        "8",
        "--queues",
        "1",
        "--depth",
        "16",
        "--backing",
        &backing,
        "--recovery",
    ]);
    let (id, block) = (server.id, server.block.clone());
    let before = pattern(3, 256 << 10);
    write_device(&block, 0, &before, None);

    server.kill();

    // A write while no server runs: it must wait, not fail.
    let during = pattern(4, 256 << 10);
    let source = format!("/tmp/ublk-during-{}", std::process::id());
    std::fs::write(&source, &during).expect("writing the pattern file");
    let mut writer = Command::new("dd")
        .args(dd_write_args(&block, &source, 1 << 20))
        .spawn()
        .expect("starting dd");
    thread::sleep(Duration::from_secs(2));
    assert!(
        writer.try_wait().expect("polling dd").is_none(),
        "the write finished with no server running"
    );

    let server = Server::spawn(&["--recover", &id.to_string(), "--backing", &backing]);
    assert_eq!(server.id, id);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = writer.try_wait().expect("polling dd") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the queued write never completed"
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "the write issued during recovery failed: {status}"
    );

    assert!(
        read_device(&block, 0, before.len()) == before,
        "data from before the crash"
    );
    assert!(
        read_device(&block, 1 << 20, during.len()) == during,
        "data written while no server ran"
    );
    server.stop();
    std::fs::remove_file(&source).ok();
    std::fs::remove_file(&backing).ok();
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_ublk_start_without_queues_times_out_and_is_cancelled() {
    use ring3_ublk::{Control, DeviceSpec, DeviceState, Error, Params};

    in_lab();
    let control = Control::open().expect("opening /dev/ublk-control");
    assert!(
        matches!(control.info(4000), Err(Error::NoSuchDevice { id: 4000 })),
        "an unknown device ID"
    );
    let info = control
        .add(&DeviceSpec {
            id: None,
            queues: 1,
            depth: 4,
            max_io_bytes: 64 << 10,
            recovery: false,
        })
        .expect("adding a device");
    control
        .set_params(
            info.id,
            &Params {
                size_bytes: 1 << 20,
                logical_block: 512,
                physical_block: 512,
                max_io_bytes: info.max_io_bytes,
                volatile_cache: false,
                fua: false,
                discard: None,
                write_zeroes_max_bytes: 0,
            },
        )
        .expect("setting the parameters");
    let cdev = control
        .open_char_device(info.id, Duration::from_secs(10))
        .expect("opening the char device");

    // No queue fetches, so START_DEV waits until it is cancelled.
    let started = Instant::now();
    let error = control
        .start(info.id, std::process::id() as i32, Duration::from_secs(2))
        .expect_err("START_DEV without queues");
    eprintln!("{error}");
    assert!(matches!(error, Error::CommandTimeout { .. }), "{error:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the cancel was not prompt"
    );
    assert_eq!(
        control.info(info.id).expect("GET_DEV_INFO").state,
        DeviceState::Dead
    );

    // DEL_DEV waits for the last reference: a START_DEV stuck in the kernel would hold one.
    drop(cdev);
    control.delete(info.id).expect("deleting the device");
    assert!(matches!(
        control.info(info.id),
        Err(Error::NoSuchDevice { .. })
    ));
}
