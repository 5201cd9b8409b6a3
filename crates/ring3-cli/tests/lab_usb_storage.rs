//! Lab tests of the USB mass-storage driver against QEMU's usb-storage device `R3RAW`
//! (a fresh 64 MiB image per run, on the lab's qemu-xhci controller, with no kernel
//! driver bound), inside the lab VM (`cargo xtask test`).

use std::process::{Command, Output};
use std::time::Instant;

use ring3_usb::{ClaimedInterface, UsbAddress, UsbDevice};
use ring3_usb_storage::bot::DataStage;
use ring3_usb_storage::{scsi, MassStorage, SenseKey, StorageError};

/// The raw lab disk, by VID:PID:SERIAL.
const RAW_DISK: &str = "46f4:0001:R3RAW";
const RAW_DISK_BYTES: u64 = 64 << 20;

fn in_lab() {
    assert_eq!(
        std::env::var("RING3_LAB").as_deref(),
        Ok("1"),
        "lab tests run inside the lab VM: use `cargo xtask test`"
    );
}

fn ring3(args: &[&str]) -> Output {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_ring3"))
        .args(args)
        .output()
        .expect("running ring3");
    eprintln!(
        "$ ring3 {}  ({:.1} s)\n{}{}",
        args.join(" "),
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn json(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "ring3 failed");
    serde_json::from_slice(&output.stdout).expect("ring3 printed JSON")
}

/// The raw disk through the library, its mass-storage interface claimed.
fn open_raw() -> MassStorage<ClaimedInterface> {
    in_lab();
    let address: UsbAddress = RAW_DISK.parse().expect("address");
    let device = UsbDevice::open(&address).expect("the lab VM has the R3RAW usb-storage device");
    let interface = device
        .find_interface(0x08, 0x06, 0x50)
        .expect("a Bulk-Only mass-storage interface");
    let claimed = device
        .claim(interface, false)
        .expect("claiming the interface");
    let endpoints = claimed.bulk_endpoints().expect("bulk endpoints");
    MassStorage::new(claimed, endpoints, 0).expect("bringing the disk up")
}

/// Bytes that differ between blocks and seeds.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_usb_storage_info_shows_the_capacity() {
    in_lab();
    let info = json(&ring3(&["usb", "storage", RAW_DISK, "info", "--json"]));
    assert_eq!(info["block_size"], 512, "{info}");
    assert_eq!(info["block_count"], RAW_DISK_BYTES / 512, "{info}");
    assert_eq!(info["bytes"], RAW_DISK_BYTES, "{info}");
    assert_eq!(info["device_type"], 0, "{info}");
    assert_eq!(info["max_transfer_bytes"], 128 * 1024, "{info}");
    let text = ring3(&["usb", "storage", RAW_DISK, "info"]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("QEMU"), "{text}");
    assert!(
        text.contains("131072 blocks of 512 bytes = 67108864 bytes (64.0 MiB)"),
        "{text}"
    );
}

/// The whole device written with a pattern by transfers of 1 block to 1 MiB (cycling, so
/// the last one is a tail that fits no size), flushed, read back with the sizes in another
/// order and compared, through `ring3 usb storage verify`; then once more through the
/// library with a 1 MiB transfer limit, so that large requests go out as single commands.
#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_usb_storage_pattern_over_the_whole_device_reads_back() {
    in_lab();
    let result = json(&ring3(&[
        "usb", "storage", RAW_DISK, "verify", "--seed", "4242", "--json",
    ]));
    assert_eq!(result["verified"], true, "{result}");
    assert_eq!(result["bytes"], RAW_DISK_BYTES, "{result}");
    assert!(result["writes"].as_u64() > Some(100), "{result}");

    // A range with a transfer limit of 1 MiB and sizes up to 1 MiB, 3 blocks short of
    // the end so that the last transfer is a tail of the cycle.
    let result = json(&ring3(&[
        "usb",
        "storage",
        RAW_DISK,
        "--max-transfer",
        "1m",
        "verify",
        "--lba",
        "100000",
        "--count",
        "31069",
        "--sizes",
        "2048,1,8,255,256,1000",
        "--seed",
        "7",
        "--json",
    ]));
    assert_eq!(result["verified"], true, "{result}");

    // The first verify's pattern is still there outside the second one's range.
    let untouched = ring3(&[
        "usb",
        "storage",
        RAW_DISK,
        "read",
        "--lba",
        "99990",
        "--count",
        "10",
        "--expect-pattern",
        "4242",
    ]);
    assert!(untouched.status.success());
    let end = ring3(&[
        "usb",
        "storage",
        RAW_DISK,
        "read",
        "--lba",
        "131069",
        "--count",
        "3",
        "--expect-pattern",
        "4242",
    ]);
    assert!(end.status.success());
    let changed = ring3(&[
        "usb",
        "storage",
        RAW_DISK,
        "read",
        "--lba",
        "100000",
        "--count",
        "1",
        "--expect-pattern",
        "4242",
    ]);
    assert!(
        !changed.status.success(),
        "the second pattern replaced the first"
    );
}

/// Writes through the library with many sizes (and a 1 MiB transfer limit), flushes,
/// reads back through a second open of the device.
#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_usb_storage_library_write_flush_read_back() {
    let mut disk = open_raw();
    assert_eq!(disk.set_max_transfer_bytes(1 << 20), 1 << 20);
    let block = disk.block_size() as usize;
    let sizes = [1usize, 2, 3, 7, 64, 255, 256, 257, 1024, 2048];
    let mut plan = Vec::new();
    let mut lba = 20_000u64;
    for (i, &blocks) in sizes.iter().enumerate() {
        plan.push((lba, blocks, pattern(blocks * block, lba ^ i as u64)));
        lba += blocks as u64 + 3;
    }
    let started = Instant::now();
    for (lba, _, data) in &plan {
        disk.write(*lba, data).expect("write");
    }
    disk.synchronize_cache().expect("SYNCHRONIZE CACHE");
    eprintln!(
        "wrote and flushed in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    drop(disk);

    let disk = open_raw();
    for (lba, blocks, data) in &plan {
        let mut back = vec![0; blocks * block];
        disk.read(*lba, &mut back).expect("read");
        assert!(back == *data, "{blocks} blocks at LBA {lba} differ");
    }
    // Between the regions, what the writes did not touch.
    let mut gap = vec![0; 3 * block];
    let (lba, blocks, _) = &plan[0];
    disk.read(lba + *blocks as u64, &mut gap)
        .expect("read the gap");
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_usb_storage_out_of_range_is_refused_clearly() {
    let disk = open_raw();
    let last = disk.block_count() - 1;
    let error = disk.read(last, &mut [0; 1024]).expect_err("past the end");
    assert!(matches!(error, StorageError::OutOfRange { .. }), "{error}");
    assert!(error.to_string().contains("131072 blocks"), "{error}");

    // The device's own refusal of a READ(10) past the end, with its sense.
    let cdb = scsi::rw_10(scsi::opcode::READ_10, last as u32 + 1, 1);
    let mut buf = [0; 512];
    let error = disk
        .scsi_command("READ(10)", &cdb, DataStage::In(&mut buf))
        .expect_err("QEMU refuses it");
    let sense = error
        .sense()
        .unwrap_or_else(|| panic!("no sense data in: {error}"));
    assert_eq!(sense.key, SenseKey::ILLEGAL_REQUEST, "{error}");
    assert_eq!(sense.asc, 0x21, "{error}");
    eprintln!("{error}");
    // The device carries on.
    disk.read(last, &mut buf).expect("the last block reads");
    drop(disk);

    let cli = ring3(&["usb", "storage", RAW_DISK, "read", "--lba", "131072"]);
    assert!(!cli.status.success());
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(stderr.contains("outside the device"), "{stderr}");
    let cli = ring3(&[
        "usb",
        "storage",
        RAW_DISK,
        "write",
        "--lba",
        "131000",
        "--count",
        "100",
        "--pattern",
        "1",
    ]);
    assert!(!cli.status.success());
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_usb_storage_cli_write_read_round_trip() {
    in_lab();
    let wrote = ring3(&[
        "usb",
        "storage",
        RAW_DISK,
        "write",
        "--lba",
        "5000",
        "--count",
        "300",
        "--pattern",
        "99",
    ]);
    assert!(wrote.status.success());
    let read = ring3(&[
        "usb",
        "storage",
        RAW_DISK,
        "read",
        "--lba",
        "5100",
        "--count",
        "50",
        "--expect-pattern",
        "99",
    ]);
    assert!(read.status.success());
    let dir = std::env::temp_dir().join(format!("ring3-usb-storage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("blocks.bin");
    let read = ring3(&[
        "usb",
        "storage",
        RAW_DISK,
        "read",
        "--lba",
        "5299",
        "--count",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(read.status.success());
    assert_eq!(std::fs::read(&out).unwrap().len(), 1024);
    let hex = ring3(&["usb", "storage", RAW_DISK, "read", "--lba", "5000"]);
    assert!(hex.status.success());
    assert!(String::from_utf8_lossy(&hex.stdout).starts_with("00271000  "));
    std::fs::remove_dir_all(&dir).ok();
}
