//! Lab tests of `ring3 usb serial ADDR` inside the lab VM (`cargo xtask test`): QEMU's
//! FT232 model (`usb-serial`) driven by ring3's driver and exposed as a pty.
//!
//! - `0403:6001:R3SERFILE` writes what it transmits to a host file (path in
//!   `RING3_LAB_USB_SERIAL_OUT`, seen by the guest over 9p without caching);
//! - `0403:6001:R3SERECHO` is connected to an echo server on the host, so every byte it
//!   transmits comes back to it.
//!
//! QEMU's model ignores the rate (its chardevs are not serial lines), so the rates here
//! check that `stty` on the pty reaches the driver without disturbing the data; the unit
//! tests check what the chip is told.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::{Mode, OFlags};

const FILE_DEVICE: &str = "0403:6001:R3SERFILE";
const ECHO_DEVICE: &str = "0403:6001:R3SERECHO";
const ECHO_LINK: &str = "/run/ring3/ttyUSB-R3SERECHO";
const SERIAL_OUT_ENV: &str = "RING3_LAB_USB_SERIAL_OUT";
/// Starting the driver (claiming, first requests) under TCG.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest time without progress in a transfer.
const STALL_TIMEOUT: Duration = Duration::from_secs(20);

/// One test at a time: they share the devices and the output file.
static LAB: Mutex<()> = Mutex::new(());

fn in_lab() -> std::sync::MutexGuard<'static, ()> {
    assert_eq!(
        std::env::var("RING3_LAB").as_deref(),
        Ok("1"),
        "lab tests run inside the lab VM: use `cargo xtask test`"
    );
    LAB.lock().unwrap_or_else(|e| e.into_inner())
}

/// A command's output, echoed to the test's output.
fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
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

/// A measurement, written to stderr directly so that it shows in the lab log even when
/// the test passes (the harness captures only `eprintln!`).
fn note(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "lab_usb_serial: {text}");
}

fn stty(path: &Path, args: &[&str]) {
    let path = path.to_string_lossy();
    let mut all = vec!["-F", &path];
    all.extend_from_slice(args);
    let output = run("stty", &all);
    assert!(output.status.success(), "stty -F {path} {args:?} failed");
}

/// `ring3 usb serial` running as a child; stopped with SIGTERM on drop.
struct SerialPort {
    child: Child,
    pty: PathBuf,
}

impl SerialPort {
    fn start(device: &str, extra: &[&str]) -> SerialPort {
        let mut args = vec!["usb", "serial", device, "--force"];
        args.extend_from_slice(extra);
        eprintln!("$ ring3 {}", args.join(" "));
        let mut child = Command::new(env!("CARGO_BIN_EXE_ring3"))
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting ring3 usb serial");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = sender.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for line in lines.map_while(Result::ok) {
                eprintln!("ring3: {line}");
            }
        });
        let line = match receiver.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "ring3 usb serial printed no pty path within {START_TIMEOUT:?} ({status:?})"
                );
            }
        };
        let pty = PathBuf::from(line.trim());
        assert!(pty.starts_with("/dev/pts/"), "not a pty path: {line:?}");
        SerialPort { child, pty }
    }

    /// SIGTERM, then the exit status (within a timeout).
    fn stop(&mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for ring3") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("ring3 usb serial did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SerialPort {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.stop();
        }
    }
}

fn open_tty(path: &Path) -> OwnedFd {
    rustix::fs::open(
        path,
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

fn timespec(duration: Duration) -> Timespec {
    Timespec {
        tv_sec: duration.as_secs() as _,
        tv_nsec: duration.subsec_nanos() as _,
    }
}

fn write_all(fd: BorrowedFd<'_>, mut data: &[u8]) {
    while !data.is_empty() {
        let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::OUT)];
        let ready = rustix::event::poll(&mut fds, Some(&timespec(STALL_TIMEOUT))).unwrap();
        assert!(ready > 0, "the pty took nothing for {STALL_TIMEOUT:?}");
        let n = rustix::io::write(fd, data).expect("writing the pty");
        data = &data[n..];
    }
}

fn read_exactly(fd: BorrowedFd<'_>, len: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
        let ready = rustix::event::poll(&mut fds, Some(&timespec(STALL_TIMEOUT))).unwrap();
        assert!(
            ready > 0,
            "nothing came back for {STALL_TIMEOUT:?}: {filled} of {len} bytes"
        );
        filled += rustix::io::read(fd, &mut got[filled..]).expect("reading the pty");
    }
    got
}

/// Sends `data` through the pty and reads as much back, at the same time.
fn echo(fd: BorrowedFd<'_>, data: &[u8]) -> Vec<u8> {
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| write_all(fd, data));
        let got = read_exactly(fd, data.len());
        writer.join().expect("writer");
        got
    })
}

/// Pseudo-random bytes: every value, no runs, different per seed.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 8) as u8
        })
        .collect()
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn assert_same(got: &[u8], expected: &[u8], what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    if let Some(at) = first_difference(got, expected) {
        panic!(
            "{what}: first difference at byte {at}: {:02x?} instead of {:02x?}",
            &got[at..(at + 16).min(got.len())],
            &expected[at..(at + 16).min(expected.len())]
        );
    }
}

fn serial_out_file() -> PathBuf {
    PathBuf::from(
        std::env::var(SERIAL_OUT_ENV)
            .unwrap_or_else(|_| panic!("{SERIAL_OUT_ENV} is not set: the lab has no R3SERFILE")),
    )
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Writes `data` to the pty and waits until the device's output file grew by it.
fn send_to_file(tty: BorrowedFd<'_>, out: &Path, data: &[u8]) {
    let start = file_len(out);
    write_all(tty, data);
    let wanted = start + data.len() as u64;
    let mut last = (start, Instant::now());
    loop {
        let len = file_len(out);
        if len >= wanted {
            break;
        }
        if len != last.0 {
            last = (len, Instant::now());
        }
        assert!(
            last.1.elapsed() < STALL_TIMEOUT,
            "{} has {} of {} bytes, no progress for {STALL_TIMEOUT:?}",
            out.display(),
            len - start,
            data.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let contents = std::fs::read(out).expect("reading the device's output file");
    let start = start as usize;
    assert!(contents.len() >= start + data.len());
    assert_same(
        &contents[start..start + data.len()],
        data,
        "what the device transmitted",
    );
    assert_eq!(
        contents.len(),
        start + data.len(),
        "the device transmitted more than was written"
    );
}

#[test]
#[ignore = "lab: needs the lab VM's usb-serial devices (cargo xtask test)"]
fn lab_usb_serial_file_receives_what_is_written_at_each_rate() {
    let _lab = in_lab();
    let out = serial_out_file();
    let mut port = SerialPort::start(FILE_DEVICE, &["--baud", "115200"]);
    let tty = open_tty(&port.pty);
    for (i, baud) in ["9600", "115200", "3000000"].into_iter().enumerate() {
        stty(&port.pty, &[baud]);
        let data = pattern(16 * 1024, i as u32 + 1);
        let started = Instant::now();
        send_to_file(tty.as_fd(), &out, &data);
        note(&format!(
            "R3SERFILE at {baud} baud: {} bytes in {:?}",
            data.len(),
            started.elapsed()
        ));
    }
    // A large binary transfer, every byte value included.
    let data = pattern(256 * 1024, 99);
    let started = Instant::now();
    send_to_file(tty.as_fd(), &out, &data);
    note(&format!("R3SERFILE: 256 KiB in {:?}", started.elapsed()));
    drop(tty);
    let status = port.stop();
    assert!(status.success(), "ring3 usb serial: {status}");
}

#[test]
#[ignore = "lab: needs the lab VM's usb-serial devices (cargo xtask test)"]
fn lab_usb_serial_echo_comes_back_intact_at_each_rate() {
    let _lab = in_lab();
    // A rate the chip cannot make is refused before the device is touched.
    let output = run(
        env!("CARGO_BIN_EXE_ring3"),
        &["usb", "serial", ECHO_DEVICE, "--baud", "2500000"],
    );
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("closest rate it can make is"),
        "the refusal names the closest rate"
    );

    let mut port = SerialPort::start(ECHO_DEVICE, &[]);
    let link = Path::new(ECHO_LINK);
    assert_eq!(
        std::fs::read_link(link).expect("the default link exists while running"),
        port.pty
    );
    let tty = open_tty(link);
    for (i, baud) in ["9600", "115200", "3000000"].into_iter().enumerate() {
        // Through the link, as an application would.
        stty(link, &[baud]);
        let output = run("stty", &["-F", ECHO_LINK, "speed"]);
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), baud);
        // 1 MiB takes about 7 s at 115200 and up (QEMU's model ignores the rate and
        // holds 496 received bytes at most), 14 s at 9600 (smaller OUT transfers).
        let size = 1 << 20;
        let data = pattern(size, i as u32 + 7);
        let started = Instant::now();
        let got = echo(tty.as_fd(), &data);
        note(&format!(
            "R3SERECHO at {baud} baud: {size} bytes echoed in {:?}",
            started.elapsed()
        ));
        assert_same(&got, &data, &format!("echo at {baud} baud"));
    }
    // Nothing extra arrives.
    let mut fds = [PollFd::from_borrowed_fd(tty.as_fd(), PollFlags::IN)];
    let ready = rustix::event::poll(&mut fds, Some(&timespec(Duration::from_millis(500)))).unwrap();
    assert_eq!(ready, 0, "bytes came back that were never sent");

    // Closing the pty and opening it again works.
    drop(tty);
    std::thread::sleep(Duration::from_millis(300));
    let tty = open_tty(&port.pty);
    let data = pattern(4096, 1234);
    assert_same(&echo(tty.as_fd(), &data), &data, "echo after reopening");
    drop(tty);

    let status = port.stop();
    assert!(status.success(), "ring3 usb serial: {status}");
    assert!(
        std::fs::symlink_metadata(link).is_err(),
        "{ECHO_LINK} is still there after SIGTERM"
    );
}
