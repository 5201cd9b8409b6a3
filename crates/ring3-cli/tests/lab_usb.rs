//! Lab tests of the USB core (`ring3-usb`, `ring3 usb list|claim`) against the lab's
//! qemu-xhci devices: two FT232 serials (`0403:6001`, serials R3SERFILE and R3SERECHO)
//! and two mass storage devices (`46f4:0001`, R3RAW and R3FAT), none with a kernel
//! driver bound. Inside the lab VM only (`cargo xtask test`).
//!
//! Every test leaves the system as it found it: kernel modules it loads are unloaded,
//! devices it unplugs are plugged in again.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ring3_usb::sysfs::Sysfs;
use ring3_usb::{
    BulkEndpoints, ClaimedInterface, ControlRequest, Recipient, RequestType, TransferError,
    UsbAddress, UsbDevice, UsbTransport,
};

const RAW_DISK: &str = "46f4:0001:R3RAW";
const ECHO_SERIAL: &str = "0403:6001:R3SERECHO";
const FILE_SERIAL: &str = "0403:6001:R3SERFILE";
const LAB_DEVICES: [(&str, &str, &str); 4] = [
    ("0403", "6001", "R3SERFILE"),
    ("0403", "6001", "R3SERECHO"),
    ("46f4", "0001", "R3RAW"),
    ("46f4", "0001", "R3FAT"),
];
const TIMEOUT: Duration = Duration::from_secs(5);

fn in_lab() {
    assert_eq!(
        std::env::var("RING3_LAB").as_deref(),
        Ok("1"),
        "lab tests run inside the lab VM: use `cargo xtask test`"
    );
    // The tests may start while the kernel is still enumerating the bus.
    wait_until("the lab's USB devices", Duration::from_secs(30), || {
        LAB_DEVICES.iter().all(|(vendor, product, serial)| {
            ring3_usb::find(&address(&format!("{vendor}:{product}:{serial}"))).is_ok()
        })
    });
}

/// Runs `ring3 args...`, killed if it takes longer than a minute (a claim that
/// unexpectedly succeeds would hold on for ever).
fn ring3(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ring3"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ring3");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("waiting for ring3").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("ring3's output");
    eprintln!(
        "$ ring3 {} -> {}\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn sh(script: &str) {
    let output = Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("running sh");
    assert!(
        output.status.success(),
        "`{script}` failed: {}",
        text(&output.stderr)
    );
}

fn address(text: &str) -> UsbAddress {
    text.parse().expect("a valid address")
}

/// Waits up to `limit` for `done`, polling.
fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// The kernel driver of interface 0 of the device `address` names, from sysfs.
fn driver_of(address_text: &str) -> Option<String> {
    let device = ring3_usb::find(&address(address_text)).expect("finding the device");
    device.interface(0).and_then(|i| i.driver.clone())
}

/// `ring3 usb claim ...` in the background, once it said it holds the interface.
struct Claim {
    child: Child,
    stdout: BufReader<ChildStdout>,
    first_line: String,
}

impl Claim {
    fn start(args: &[&str]) -> Claim {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ring3"))
            .arg("usb")
            .arg("claim")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting ring3 usb claim");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut first_line = String::new();
        stdout
            .read_line(&mut first_line)
            .expect("reading ring3 usb claim");
        eprintln!("$ ring3 usb claim {}\n{first_line}", args.join(" "));
        Claim {
            child,
            stdout,
            first_line,
        }
    }

    /// SIGTERM, then its exit status and the rest of its output.
    fn stop(mut self) -> (bool, String, String) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).expect("stdout");
        let mut errors = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            stderr.read_to_string(&mut errors).expect("stderr");
        }
        let status = self.child.wait().expect("waiting for ring3");
        eprintln!("{rest}{errors}-> {status}");
        (status.success(), rest, errors)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A kernel module loaded for one test and unloaded when it ends, even by a panic.
struct Module(&'static str);

impl Module {
    fn load(name: &'static str) -> Module {
        sh(&format!("modprobe {name}"));
        Module(name)
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        let status = Command::new("rmmod").arg(self.0).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("warning: rmmod {} failed", self.0);
        }
    }
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_usb_core_list_shows_the_lab_devices_without_drivers() {
    in_lab();
    let output = ring3(&["usb", "list", "--json"]);
    assert!(output.status.success());
    let devices: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("ring3 usb list --json prints JSON");
    let devices = devices.as_array().expect("a JSON array");
    for (vendor, product, serial) in LAB_DEVICES {
        let device = devices
            .iter()
            .find(|d| d["serial"] == serial)
            .unwrap_or_else(|| panic!("{serial} is not listed"));
        assert_eq!(device["vendor_id"], vendor, "{device}");
        assert_eq!(device["product_id"], product, "{device}");
        assert_eq!(device["configuration"], 1, "{device}");
        let interfaces = device["interfaces"].as_array().expect("interfaces");
        assert_eq!(interfaces.len(), 1, "{device}");
        assert_eq!(interfaces[0]["number"], 0);
        assert!(interfaces[0]["driver"].is_null(), "{device}");
        let endpoints = interfaces[0]["endpoints"].as_array().expect("endpoints");
        assert_eq!(endpoints.len(), 2, "{device}");
        assert!(endpoints.iter().all(|e| e["transfer_type"] == "bulk"));
        let class = if vendor == "46f4" { 8 } else { 0xff };
        assert_eq!(interfaces[0]["class"], class, "{device}");
    }

    let output = ring3(&["usb", "list"]);
    assert!(output.status.success());
    let table = text(&output.stdout);
    for (vendor, product, serial) in LAB_DEVICES {
        let line = table
            .lines()
            .find(|l| l.contains(&format!("{vendor}:{product}:{serial}")))
            .unwrap_or_else(|| panic!("no line for {serial} in\n{table}"));
        assert!(line.contains("QEMU"), "{line}");
    }
    let interfaces = table.lines().filter(|l| l.contains("interface 0")).count();
    assert!(interfaces >= 4, "{table}");
    assert!(
        table
            .lines()
            .filter(|l| l.contains("interface 0"))
            .all(|l| l.contains("driver -")),
        "{table}"
    );

    // The library agrees, and each device is found by its port path too.
    for (vendor, product, serial) in LAB_DEVICES {
        let found = ring3_usb::find(&address(&format!("{vendor}:{product}:{serial}"))).unwrap();
        let by_port = ring3_usb::find(&UsbAddress::Port(found.port_path.clone())).unwrap();
        assert_eq!(by_port.serial.as_deref(), Some(serial));
        assert!(
            found.usbfs_path().exists(),
            "{}",
            found.usbfs_path().display()
        );
    }
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_usb_core_claim_holds_the_interface_until_sigterm() {
    in_lab();
    let claim = Claim::start(&[RAW_DISK]);
    assert!(
        claim.first_line.starts_with("claimed interface 0 of "),
        "{}",
        claim.first_line
    );
    assert!(claim.first_line.contains("R3RAW"), "{}", claim.first_line);
    assert_eq!(driver_of(RAW_DISK).as_deref(), Some("usbfs"));

    // A second claim, by command or by the library, is refused: another process has it.
    let second = ring3(&["usb", "claim", RAW_DISK, "--force"]);
    assert!(!second.status.success());
    assert!(
        text(&second.stderr).contains("claimed by another process"),
        "{}",
        text(&second.stderr)
    );
    let device = UsbDevice::open(&address(RAW_DISK)).unwrap();
    assert_eq!(device.kernel_driver(0).unwrap().as_deref(), Some("usbfs"));
    let error = device.claim(0, false).unwrap_err();
    assert!(
        matches!(error, ring3_usb::UsbError::Busy { interface: 0 }),
        "{error}"
    );

    let (success, rest, _) = claim.stop();
    assert!(success);
    assert!(rest.contains("released interface 0"), "{rest}");
    assert_eq!(driver_of(RAW_DISK), None);
    // Free again: the library claims it, and dropping gives it back.
    let claimed = device.claim(0, false).unwrap();
    assert_eq!(claimed.detached_driver(), None);
    drop(claimed);
    assert_eq!(device.kernel_driver(0).unwrap(), None);
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_usb_core_a_kernel_driver_is_detached_only_with_force_and_comes_back() {
    in_lab();
    let module = Module::load("usb-storage");
    wait_until("usb-storage to bind R3RAW", Duration::from_secs(30), || {
        driver_of(RAW_DISK).as_deref() == Some("usb-storage")
    });

    let refused = ring3(&["usb", "claim", RAW_DISK]);
    assert!(!refused.status.success());
    let message = text(&refused.stderr);
    assert!(
        message.contains("bound to the kernel driver usb-storage"),
        "{message}"
    );
    assert!(message.contains("--force"), "{message}");
    assert_eq!(driver_of(RAW_DISK).as_deref(), Some("usb-storage"));

    let claim = Claim::start(&[RAW_DISK, "--force"]);
    assert!(
        claim
            .first_line
            .contains("detached from the kernel driver usb-storage"),
        "{}",
        claim.first_line
    );
    assert_eq!(driver_of(RAW_DISK).as_deref(), Some("usbfs"));
    let (success, rest, errors) = claim.stop();
    assert!(success, "{errors}");
    assert!(
        rest.contains("usb-storage is bound to interface 0 again"),
        "{rest}{errors}"
    );
    assert_eq!(driver_of(RAW_DISK).as_deref(), Some("usb-storage"));

    // The library the same way: refused without force, detached and re-attached with it.
    let device = UsbDevice::open(&address(RAW_DISK)).unwrap();
    let error = device.claim(0, false).unwrap_err().to_string();
    assert!(error.contains("usb-storage"), "{error}");
    let claimed = device.claim(0, true).unwrap();
    assert_eq!(claimed.detached_driver(), Some("usb-storage"));
    drop(claimed);
    wait_until("usb-storage to bind R3RAW again", TIMEOUT, || {
        driver_of(RAW_DISK).as_deref() == Some("usb-storage")
    });

    drop(module);
    wait_until("usb-storage to be gone", Duration::from_secs(30), || {
        driver_of(RAW_DISK).is_none()
    });
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_usb_core_wrong_addresses_are_clear_errors() {
    in_lab();
    let missing = ring3(&["usb", "claim", "46f4:0001:NOSUCH"]);
    assert!(!missing.status.success());
    let message = text(&missing.stderr);
    assert!(
        message.contains("no USB device matches 46f4:0001:NOSUCH"),
        "{message}"
    );
    assert!(message.contains("ring3 usb list"), "{message}");

    let ambiguous = ring3(&["usb", "claim", "46f4:0001"]);
    assert!(!ambiguous.status.success());
    let message = text(&ambiguous.stderr);
    assert!(
        message.contains("2 USB devices match 46f4:0001"),
        "{message}"
    );
    assert!(message.contains("46f4:0001:R3RAW"), "{message}");
    assert!(message.contains("46f4:0001:R3FAT"), "{message}");
    assert!(message.contains(":SERIAL"), "{message}");

    let no_port = ring3(&["usb", "claim", "9-9.9"]);
    assert!(text(&no_port.stderr).contains("no USB device matches 9-9.9"));

    let malformed = ring3(&["usb", "claim", "46f4-0001"]);
    assert_eq!(malformed.status.code(), Some(2));
    assert!(text(&malformed.stderr).contains("invalid USB address"));

    let interface = ring3(&["usb", "claim", RAW_DISK, "--interface", "3"]);
    assert!(text(&interface.stderr).contains("no interface 3 (it has 0)"));
}

// Bulk-Only Transport (USB Mass Storage Class BOT 1.0 §5) by hand, to exercise the
// transport with real transfers of every size without the storage driver.

const CBW_LEN: usize = 31;
const CSW_LEN: usize = 13;
const BLOCK: usize = 512;

fn cbw(tag: u32, data_len: u32, device_to_host: bool, cdb: &[u8]) -> [u8; CBW_LEN] {
    let mut block = [0u8; CBW_LEN];
    block[0..4].copy_from_slice(b"USBC");
    block[4..8].copy_from_slice(&tag.to_le_bytes());
    block[8..12].copy_from_slice(&data_len.to_le_bytes());
    block[12] = if device_to_host { 0x80 } else { 0 };
    block[14] = cdb.len() as u8;
    block[15..15 + cdb.len()].copy_from_slice(cdb);
    block
}

/// Reads a CSW; returns its status (0 passed).
fn csw(transport: &ClaimedInterface, endpoints: &BulkEndpoints, tag: u32) -> u8 {
    let mut reply = [0u8; CSW_LEN];
    let got = transport
        .bulk_in(endpoints.bulk_in, &mut reply, TIMEOUT)
        .expect("reading the CSW");
    assert_eq!(got, CSW_LEN);
    assert_eq!(&reply[0..4], b"USBS");
    assert_eq!(u32::from_le_bytes(reply[4..8].try_into().unwrap()), tag);
    reply[12]
}

fn rw10(opcode: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = opcode;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn claim_raw() -> (UsbDevice, ClaimedInterface, BulkEndpoints) {
    in_lab();
    let device = UsbDevice::open(&address(RAW_DISK)).expect("opening R3RAW");
    assert!(device.usbfs_path().is_some());
    assert!(device.is_connected());
    let interface = device
        .find_interface(0x08, 0x06, 0x50)
        .expect("BOT interface");
    let claimed = device.claim(interface, false).expect("claiming R3RAW");
    let endpoints = claimed.bulk_endpoints().expect("bulk endpoints");
    (device, claimed, endpoints)
}

/// INQUIRY with `buf` as the data stage; returns what bulk_in returned.
fn inquiry(
    claimed: &ClaimedInterface,
    endpoints: &BulkEndpoints,
    tag: u32,
    buf: &mut [u8],
) -> Result<usize, TransferError> {
    let cdb = [0x12, 0, 0, 0, 36, 0];
    claimed
        .bulk_out(endpoints.bulk_out, &cbw(tag, 36, true, &cdb), TIMEOUT)
        .expect("sending the CBW");
    claimed.bulk_in(endpoints.bulk_in, buf, TIMEOUT)
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_usb_core_bulk_and_control_transfers_of_every_size() {
    let (device, claimed, endpoints) = claim_raw();
    eprintln!("{endpoints:?}");
    assert_eq!(endpoints.bulk_in & 0x80, 0x80);
    assert_eq!(endpoints.bulk_out & 0x80, 0);
    assert!(endpoints.max_packet_in >= 64);
    assert_eq!(
        claimed.max_packet_size(endpoints.bulk_in),
        Some(endpoints.max_packet_in)
    );
    assert_eq!(claimed.max_packet_size(0x8f), None);
    assert_eq!(device.device_descriptor().vendor_id, 0x46f4);

    // Control: GET_DESCRIPTOR(DEVICE) gives back what the kernel cached; GET_STATUS.
    let descriptor = claimed
        .control_in(
            ControlRequest {
                request_type: RequestType::Standard,
                recipient: Recipient::Device,
                request: 6,
                value: 0x0100,
                index: 0,
            },
            18,
            TIMEOUT,
        )
        .expect("GET_DESCRIPTOR");
    assert_eq!(descriptor.len(), 18);
    assert_eq!(
        descriptor.as_slice(),
        device.device_descriptor().to_bytes().as_slice()
    );
    // Class request Get Max LUN (BOT §3.2): one byte, 0 for a single LUN.
    let max_lun = claimed
        .control_in(
            ControlRequest {
                request_type: RequestType::Class,
                recipient: Recipient::Interface,
                request: 0xfe,
                value: 0,
                index: u16::from(endpoints.interface),
            },
            1,
            TIMEOUT,
        )
        .expect("Get Max LUN");
    assert_eq!(max_lun, [0]);

    // A bulk IN without a command stalls (QEMU's usb-storage does so in its CBW state);
    // clearing the halt makes the endpoint usable again.
    let mut idle = [0u8; 64];
    assert_eq!(
        claimed.bulk_in(endpoints.bulk_in, &mut idle, TIMEOUT),
        Err(TransferError::Stall)
    );
    claimed
        .clear_halt(endpoints.bulk_in)
        .expect("clearing the halt");

    // INQUIRY into a 13-byte buffer: the request is a whole packet, the device sends
    // 36 bytes, which do not fit: Fault, and nothing past the buffer is written.
    let mut guarded = [0xeeu8; 64];
    let overflow = inquiry(&claimed, &endpoints, 1, &mut guarded[..13]);
    assert_eq!(overflow, Err(TransferError::Fault));
    assert!(guarded[13..].iter().all(|&b| b == 0xee));
    assert_eq!(csw(&claimed, &endpoints, 1), 0);
    // Into an odd-sized buffer that fits: 36 bytes, vendor "QEMU".
    let mut reply = [0u8; 37];
    assert_eq!(inquiry(&claimed, &endpoints, 2, &mut reply), Ok(36));
    assert_eq!(&reply[8..12], b"QEMU");
    assert_eq!(csw(&claimed, &endpoints, 2), 0);

    // TEST UNIT READY until the unit attention of a fresh device is gone.
    let mut tag = 10;
    let mut ready = false;
    for _ in 0..5 {
        tag += 1;
        claimed
            .bulk_out(endpoints.bulk_out, &cbw(tag, 0, false, &[0; 6]), TIMEOUT)
            .unwrap();
        if csw(&claimed, &endpoints, tag) == 0 {
            ready = true;
            break;
        }
        tag += 1;
        // REQUEST SENSE clears it.
        let sense_cdb = [0x03, 0, 0, 0, 18, 0];
        claimed
            .bulk_out(endpoints.bulk_out, &cbw(tag, 18, true, &sense_cdb), TIMEOUT)
            .unwrap();
        let mut sense = [0u8; 18];
        claimed
            .bulk_in(endpoints.bulk_in, &mut sense, TIMEOUT)
            .unwrap();
        csw(&claimed, &endpoints, tag);
    }
    assert!(ready, "the disk never became ready");

    // Writes and reads of 1 block to 1 MiB, each compared.
    for (round, blocks) in [1usize, 7, 8, 64, 255, 2048].into_iter().enumerate() {
        let len = blocks * BLOCK;
        let lba = 4096 + 4096 * round as u32;
        let data = pattern(len, round as u8);
        tag += 1;
        let write = rw10(0x2a, lba, blocks as u16);
        claimed
            .bulk_out(
                endpoints.bulk_out,
                &cbw(tag, len as u32, false, &write),
                TIMEOUT,
            )
            .unwrap();
        let started = Instant::now();
        assert_eq!(
            claimed.bulk_out(endpoints.bulk_out, &data, TIMEOUT * 4),
            Ok(len)
        );
        let write_time = started.elapsed();
        assert_eq!(csw(&claimed, &endpoints, tag), 0);

        tag += 1;
        let read = rw10(0x28, lba, blocks as u16);
        claimed
            .bulk_out(
                endpoints.bulk_out,
                &cbw(tag, len as u32, true, &read),
                TIMEOUT,
            )
            .unwrap();
        let mut back = vec![0u8; len];
        let started = Instant::now();
        assert_eq!(
            claimed.bulk_in(endpoints.bulk_in, &mut back, TIMEOUT * 4),
            Ok(len)
        );
        let read_time = started.elapsed();
        assert_eq!(csw(&claimed, &endpoints, tag), 0);
        assert!(back == data, "{len} bytes at LBA {lba} came back different");
        eprintln!(
            "{len:>8} bytes: write {:>7.1} MB/s, read {:>7.1} MB/s",
            len as f64 / write_time.as_secs_f64() / 1e6,
            len as f64 / read_time.as_secs_f64() / 1e6
        );
    }

    // Clearing a halt on endpoints that are not halted is harmless.
    claimed.clear_halt(endpoints.bulk_in).unwrap();
    claimed.clear_halt(endpoints.bulk_out).unwrap();
    // A wrong endpoint or direction is an error, not a panic.
    assert!(matches!(
        claimed.bulk_in(endpoints.bulk_out, &mut [0; 64], TIMEOUT),
        Err(TransferError::Other(_))
    ));
    assert!(matches!(
        claimed.bulk_out(0x0f, &[0; 4], TIMEOUT),
        Err(TransferError::Other(_))
    ));
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_usb_core_in_and_out_run_on_two_threads() {
    in_lab();
    // The echo serial sends back every byte it transmits: one thread writes while
    // another reads, through one shared ClaimedInterface.
    let device = UsbDevice::open(&address(ECHO_SERIAL)).expect("opening R3SERECHO");
    let claimed = Arc::new(device.claim(0, false).expect("claiming R3SERECHO"));
    let endpoints = claimed.bulk_endpoints().unwrap();
    let packet = endpoints.max_packet_in;
    assert!(packet > 2);

    // Drain what may be queued.
    let mut scratch = vec![0u8; 4096];
    while matches!(
        claimed.bulk_in(endpoints.bulk_in, &mut scratch, Duration::from_millis(200)),
        Ok(n) if n > 2
    ) {}

    const TOTAL: usize = 32 * 1024;
    let data = pattern(TOTAL, 7);
    let reader = {
        let claimed = Arc::clone(&claimed);
        thread::spawn(move || {
            let mut received = Vec::with_capacity(TOTAL);
            let mut buf = vec![0u8; 16 * packet];
            let deadline = Instant::now() + Duration::from_secs(60);
            while received.len() < TOTAL && Instant::now() < deadline {
                match claimed.bulk_in(endpoints.bulk_in, &mut buf, Duration::from_millis(500)) {
                    Ok(n) => {
                        // FT232: every packet starts with two modem/line status bytes.
                        for chunk in buf[..n].chunks(packet) {
                            received.extend_from_slice(chunk.get(2..).unwrap_or_default());
                        }
                    }
                    Err(TransferError::Timeout) => continue,
                    Err(error) => panic!("reading: {error}"),
                }
            }
            received
        })
    };
    let started = Instant::now();
    for chunk in data.chunks(1000) {
        assert_eq!(
            claimed.bulk_out(endpoints.bulk_out, chunk, TIMEOUT),
            Ok(chunk.len())
        );
    }
    let received = reader.join().expect("the reader thread");
    eprintln!(
        "{TOTAL} bytes out and back in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(received.len(), TOTAL, "bytes lost or added");
    assert!(received == data, "the bytes came back different");
}

/// GET_STATUS (USB 2.0 §9.4.5) of the device: two bytes, asks nothing of the function.
const GET_STATUS: ControlRequest = ControlRequest {
    request_type: RequestType::Standard,
    recipient: Recipient::Device,
    request: 0,
    value: 0,
    index: 0,
};

/// Plugs a device unplugged by disabling its hub port in again when dropped (also when
/// the test fails). Enabling the port alone does not bring it back in QEMU (the port
/// never lost power, so no new connection is reported), and rebinding the hub driver of
/// a USB 2 root hub fails to assign device slots: the xHCI controller is unbound from
/// its driver and bound again, which enumerates every device on it afresh.
struct Replug {
    port: PathBuf,
    controller: String,
    driver: String,
}

impl Replug {
    /// For the device whose sysfs directory is `device`.
    fn new(device: &Path) -> Replug {
        let port = std::fs::canonicalize(device.join("port")).expect("the device's port link");
        let controller_dir = port
            .ancestors()
            .find(|dir| dir.join("vendor").exists() && dir.join("class").exists())
            .expect("the PCI controller above the port")
            .to_owned();
        let name = |path: &Path| {
            path.file_name()
                .expect("a name")
                .to_string_lossy()
                .into_owned()
        };
        let driver = std::fs::read_link(controller_dir.join("driver")).expect("xHCI driver");
        Replug {
            port,
            controller: name(&controller_dir),
            driver: name(&driver),
        }
    }
}

impl Drop for Replug {
    fn drop(&mut self) {
        let _ = std::fs::write(self.port.join("disable"), "0");
        let driver = Path::new("/sys/bus/pci/drivers").join(&self.driver);
        let _ = std::fs::write(driver.join("unbind"), &self.controller);
        let _ = std::fs::write(driver.join("bind"), &self.controller);
        // Whatever happened, the next test finds the devices where they were.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && !LAB_DEVICES.iter().all(|(vendor, product, serial)| {
                ring3_usb::find(&address(&format!("{vendor}:{product}:{serial}"))).is_ok()
            })
        {
            thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_usb_core_a_device_unplugged_mid_transfer_is_disconnected_and_comes_back() {
    in_lab();
    let device = UsbDevice::open(&address(FILE_SERIAL)).expect("opening R3SERFILE");
    let claimed = device.claim(0, false).expect("claiming R3SERFILE");
    let endpoints = claimed.bulk_endpoints().unwrap();
    let summary = ring3_usb::find(&address(FILE_SERIAL)).unwrap();
    let sysfs = Sysfs::system();
    // Nothing ever comes in from this adapter (its output goes to a file): a bulk IN
    // times out, and is cancelled in time.
    let started = Instant::now();
    let mut buf = [0u8; 64];
    assert_eq!(
        claimed.bulk_in(endpoints.bulk_in, &mut buf, Duration::from_millis(300)),
        Err(TransferError::Timeout)
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    // (Nothing is written to it: what it transmits belongs to the serial tests.)
    assert_eq!(
        claimed.control_in(GET_STATUS, 2, TIMEOUT).map(|s| s.len()),
        Ok(2)
    );
    let replug = Replug::new(&sysfs.device_dir(&summary.port_path));

    // A bulk IN is in flight (the device has nothing to send) when the port goes dark.
    let claimed = Arc::new(claimed);
    let pending = {
        let claimed = Arc::clone(&claimed);
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            let started = Instant::now();
            let result = claimed.bulk_in(endpoints.bulk_in, &mut buf, Duration::from_secs(20));
            (result, started.elapsed())
        })
    };
    thread::sleep(Duration::from_millis(500));
    // Unplug: disabling the hub port disconnects the device behind it.
    std::fs::write(replug.port.join("disable"), "1").expect("disabling the port");
    let (result, took) = pending.join().unwrap();
    assert_eq!(result, Err(TransferError::Disconnected));
    assert!(took < Duration::from_secs(15), "took {took:?}");

    assert!(!device.is_connected());
    assert_eq!(
        claimed.bulk_out(endpoints.bulk_out, &[0; 31], TIMEOUT),
        Err(TransferError::Disconnected)
    );
    let mut buf = [0u8; 64];
    assert_eq!(
        claimed.bulk_in(endpoints.bulk_in, &mut buf, TIMEOUT),
        Err(TransferError::Disconnected)
    );
    assert_eq!(
        claimed.control_in(GET_STATUS, 2, TIMEOUT),
        Err(TransferError::Disconnected)
    );
    assert!(matches!(
        device.claim(0, false),
        Err(ring3_usb::UsbError::Disconnected)
    ));
    assert!(ring3_usb::find(&address(FILE_SERIAL)).is_err());
    // Letting go of a gone device neither hangs nor panics.
    drop(claimed);
    drop(device);

    drop(replug);
    for (vendor, product, serial) in LAB_DEVICES {
        assert!(
            ring3_usb::find(&address(&format!("{vendor}:{product}:{serial}"))).is_ok(),
            "{serial} did not come back"
        );
    }
    let device = UsbDevice::open(&address(FILE_SERIAL)).expect("R3SERFILE is back");
    let claimed = device.claim(0, false).expect("claiming R3SERFILE again");
    assert_eq!(
        claimed.control_in(GET_STATUS, 2, TIMEOUT).map(|s| s.len()),
        Ok(2)
    );
    assert!(device.is_connected());
}
