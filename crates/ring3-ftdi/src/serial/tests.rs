//! Tests of the termios mapping, the link helper, and the bridge over a real pty with
//! the fake FT232.

use super::*;
use crate::fake::FakeFt232;
use crate::Endpoints;
use rustix::fs::{Mode, OFlags};
use std::sync::Arc;
use std::time::Instant;

const WAIT: Duration = Duration::from_secs(10);

fn pty_termios(pty: &Pty) -> Termios {
    rustix::termios::tcgetattr(pty.master()).unwrap()
}

#[test]
fn termios_maps_to_chip_settings() {
    let pty = Pty::open().unwrap();
    let mut termios = pty_termios(&pty);
    termios.set_speed(115_200).unwrap();
    termios
        .control_modes
        .remove(ControlModes::CSIZE | ControlModes::PARENB);
    termios.control_modes.insert(ControlModes::CS8);
    termios
        .input_modes
        .remove(InputModes::IXON | InputModes::IXOFF);
    let settings = settings_from_termios(&termios).unwrap();
    assert_eq!(settings.line.baud, 115_200);
    assert_eq!(settings.line.data_bits, DataBits::Eight);
    assert_eq!(settings.line.parity, Parity::None);
    assert_eq!(settings.line.stop_bits, StopBits::One);
    assert_eq!(settings.flow, FlowControl::None);

    let mut seven_odd = termios.clone();
    seven_odd.control_modes.remove(ControlModes::CSIZE);
    seven_odd.control_modes.insert(
        ControlModes::CS7 | ControlModes::PARENB | ControlModes::PARODD | ControlModes::CSTOPB,
    );
    let settings = settings_from_termios(&seven_odd).unwrap();
    assert_eq!(settings.line.data_bits, DataBits::Seven);
    assert_eq!(settings.line.parity, Parity::Odd);
    assert_eq!(settings.line.stop_bits, StopBits::Two);

    let parities = [
        (ControlModes::PARENB, Parity::Even),
        (ControlModes::PARENB | ControlModes::CMSPAR, Parity::Space),
        (
            ControlModes::PARENB | ControlModes::CMSPAR | ControlModes::PARODD,
            Parity::Mark,
        ),
        (ControlModes::CMSPAR | ControlModes::PARODD, Parity::None),
    ];
    for (bits, parity) in parities {
        let mut t = termios.clone();
        t.control_modes.insert(bits);
        assert_eq!(
            settings_from_termios(&t).unwrap().line.parity,
            parity,
            "{bits:?}"
        );
    }

    let mut flow = termios.clone();
    flow.control_modes
        .insert(ControlModes::CRTSCTS | ControlModes::HUPCL);
    let settings = settings_from_termios(&flow).unwrap();
    assert_eq!(settings.flow, FlowControl::RtsCts);
    assert!(settings.hang_up_on_close);

    let mut xon = termios.clone();
    xon.input_modes.insert(InputModes::IXON);
    xon.special_codes[SpecialCodeIndex::VSTART] = 0x01;
    xon.special_codes[SpecialCodeIndex::VSTOP] = 0x02;
    assert_eq!(
        settings_from_termios(&xon).unwrap().flow,
        FlowControl::XonXoff { xon: 1, xoff: 2 }
    );

    for (size, bits) in [(ControlModes::CS5, 5), (ControlModes::CS6, 6)] {
        let mut t = termios.clone();
        t.control_modes.remove(ControlModes::CSIZE);
        t.control_modes.insert(size);
        assert!(matches!(
            settings_from_termios(&t),
            Err(FtdiError::UnsupportedDataBits(b)) if b == bits
        ));
    }
}

#[test]
fn link_paths_are_sanitised() {
    assert_eq!(
        default_link_path("R3SERECHO"),
        Path::new("/run/ring3/ttyUSB-R3SERECHO")
    );
    assert_eq!(
        default_link_path("../a b/c"),
        Path::new("/run/ring3/ttyUSB-_.._a_b_c")
    );
    assert_eq!(default_link_path(""), Path::new("/run/ring3/ttyUSB-_"));
}

#[test]
fn link_replaces_stale_links_and_removes_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/ttyUSB-X");
    let first = link(&path, Path::new("/dev/pts/1000")).unwrap();
    assert_eq!(
        std::fs::read_link(&path).unwrap(),
        Path::new("/dev/pts/1000")
    );
    // A stale link (its process died without removing it) is replaced.
    std::mem::forget(first);
    let second = link(&path, Path::new("/dev/pts/1001")).unwrap();
    assert_eq!(
        std::fs::read_link(&path).unwrap(),
        Path::new("/dev/pts/1001")
    );
    assert_eq!(second.path(), path);
    drop(second);
    assert!(std::fs::symlink_metadata(&path).is_err());
    // A link taken over by someone else stays.
    let third = link(&path, Path::new("/dev/pts/1002")).unwrap();
    std::os::unix::fs::symlink("/dev/pts/1003", dir.path().join("other")).unwrap();
    std::fs::rename(dir.path().join("other"), &path).unwrap();
    drop(third);
    assert_eq!(
        std::fs::read_link(&path).unwrap(),
        Path::new("/dev/pts/1003")
    );
    // Anything else is not replaced.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        link(&file, Path::new("/dev/pts/1")),
        Err(SerialError::LinkOccupied(_))
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

/// A bridge running on its own thread; stopped and joined on drop.
struct Running {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<BridgeStats, SerialError>>>,
}

impl Running {
    fn start(fake: &Arc<FakeFt232>, pty: &Pty) -> Running {
        let port = Ft232::new(fake.clone(), Endpoints::default()).unwrap();
        // The bridge gets the master the way ring3d hands it over: a separate fd.
        let master = pty.master().try_clone_to_owned().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::spawn(move || run_bridge(&port, master.as_fd(), &thread_stop));
        Running {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Result<BridgeStats, SerialError> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().unwrap();
        thread.join().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn open_slave(pty: &Pty) -> OwnedFd {
    rustix::fs::open(
        pty.slave_path(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap()
}

/// Reads exactly `len` bytes from `fd`, failing after `WAIT` without progress.
fn read_exactly(fd: BorrowedFd<'_>, len: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
        let ready = rustix::event::poll(&mut fds, Some(&timespec(WAIT))).unwrap();
        assert!(
            ready > 0,
            "no data after {WAIT:?}; {filled} of {len} bytes came"
        );
        filled += rustix::io::read(fd, &mut got[filled..]).unwrap();
    }
    got
}

fn write_all(fd: BorrowedFd<'_>, mut data: &[u8]) {
    while !data.is_empty() {
        let n = rustix::io::write(fd, data).unwrap();
        data = &data[n..];
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

#[test]
fn bridge_loops_binary_data_through_the_pty() {
    let fake = Arc::new(FakeFt232::loopback());
    let pty = Pty::open().unwrap();
    let bridge = Running::start(&fake, &pty);
    let slave = open_slave(&pty);
    // Every byte value, including the ones a cooked terminal would interpret.
    let data = pattern(256 * 1024, 7);
    let got = std::thread::scope(|scope| {
        let writer = scope.spawn(|| write_all(slave.as_fd(), &data));
        let got = read_exactly(slave.as_fd(), data.len());
        writer.join().unwrap();
        got
    });
    assert!(got == data, "the data came back changed");
    let stats = bridge.finish().unwrap();
    assert_eq!(stats.to_device, data.len() as u64);
    assert_eq!(stats.from_device, data.len() as u64);
    assert_eq!(stats.device.bytes_read, data.len() as u64);
    assert_eq!(stats.device.short_packets, 0);
}

#[test]
fn bridge_mirrors_terminal_settings_to_the_chip() {
    let fake = Arc::new(FakeFt232::new());
    let pty = Pty::open().unwrap();
    set_baud(pty.master(), 57_600).unwrap();
    let bridge = Running::start(&fake, &pty);
    fake.wait_for_settings(WAIT, |s| s.baud == Some(57_554))
        .unwrap();

    let slave = open_slave(&pty);
    let mut termios = rustix::termios::tcgetattr(&slave).unwrap();
    termios.set_speed(3_000_000).unwrap();
    termios
        .control_modes
        .insert(ControlModes::CSTOPB | ControlModes::CRTSCTS);
    rustix::termios::tcsetattr(&slave, OptionalActions::Drain, &termios).unwrap();
    let settings = fake
        .wait_for_settings(WAIT, |s| s.baud == Some(3_000_000) && s.flow == 1)
        .unwrap();
    assert_eq!(settings.stop_bits, Some(2));

    // Data written after a change goes out after it.
    termios.set_speed(9600).unwrap();
    termios.control_modes.remove(ControlModes::CRTSCTS);
    termios
        .input_modes
        .insert(InputModes::IXON | InputModes::IXOFF);
    rustix::termios::tcsetattr(&slave, OptionalActions::Drain, &termios).unwrap();
    write_all(slave.as_fd(), b"after");
    let deadline = Instant::now() + WAIT;
    while fake.sent_len() < 5 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let settings = fake.settings();
    assert_eq!(settings.baud, Some(9600));
    assert_eq!(settings.flow, 4);
    assert_eq!(settings.xon_xoff, Some((0x11, 0x13)));
    assert_eq!(fake.take_sent(), b"after");

    // A rate the chip cannot make is refused; the chip keeps 9600.
    termios.set_speed(2_500_000).unwrap();
    rustix::termios::tcsetattr(&slave, OptionalActions::Now, &termios).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fake.settings().baud, Some(9600));

    // B0 hangs up: DTR and RTS drop; a rate brings them back.
    termios.set_speed(0).unwrap();
    rustix::termios::tcsetattr(&slave, OptionalActions::Now, &termios).unwrap();
    fake.wait_for_settings(WAIT, |s| !s.dtr && !s.rts).unwrap();
    termios.set_speed(115_200).unwrap();
    rustix::termios::tcsetattr(&slave, OptionalActions::Now, &termios).unwrap();
    let settings = fake
        .wait_for_settings(WAIT, |s| s.dtr && s.rts && s.baud == Some(115_385))
        .unwrap();
    assert_eq!(settings.stop_bits, Some(2));

    // HUPCL: closing the last slave fd drops DTR; opening it raises it again.
    termios.control_modes.insert(ControlModes::HUPCL);
    rustix::termios::tcsetattr(&slave, OptionalActions::Now, &termios).unwrap();
    drop(slave);
    fake.wait_for_settings(WAIT, |s| !s.dtr).unwrap();
    let slave = open_slave(&pty);
    fake.wait_for_settings(WAIT, |s| s.dtr).unwrap();
    drop(slave);

    let stats = bridge.finish().unwrap();
    assert!(stats.settings_applied >= 4, "{stats:?}");
    assert_eq!(stats.settings_refused, 1, "{stats:?}");
}

#[test]
fn bridge_survives_the_slave_closing_and_serves_the_next_opener() {
    let fake = Arc::new(FakeFt232::loopback());
    let pty = Pty::open().unwrap();
    let bridge = Running::start(&fake, &pty);
    for round in 0..3u32 {
        let slave = open_slave(&pty);
        let data = pattern(10_000, round + 1);
        write_all(slave.as_fd(), &data);
        assert!(read_exactly(slave.as_fd(), data.len()) == data);
        drop(slave);
        std::thread::sleep(Duration::from_millis(200));
    }
    // Data that arrives while no one has the slave open waits in the pty.
    fake.receive(b"while closed");
    std::thread::sleep(Duration::from_millis(300));
    let slave = open_slave(&pty);
    assert_eq!(read_exactly(slave.as_fd(), 12), b"while closed");
    bridge.finish().unwrap();
}

#[test]
fn bridge_ends_with_an_error_when_the_device_disconnects() {
    let fake = Arc::new(FakeFt232::loopback());
    let pty = Pty::open().unwrap();
    let bridge = Running::start(&fake, &pty);
    std::thread::sleep(Duration::from_millis(100));
    fake.disconnect();
    let thread = { bridge }.thread.take();
    match thread.unwrap().join().unwrap() {
        Err(SerialError::Device(error)) => assert!(error.is_disconnected()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn pty_is_raw_and_named() {
    let pty = Pty::open().unwrap();
    assert!(pty.slave_path().starts_with("/dev/pts"));
    let termios = pty_termios(&pty);
    assert!(!termios
        .local_modes
        .intersects(rustix::termios::LocalModes::ECHO | rustix::termios::LocalModes::ICANON));
    let path = pty.slave_path().to_path_buf();
    let again = Pty::from_master(pty.into_master()).unwrap();
    assert_eq!(again.slave_path(), path);
}
