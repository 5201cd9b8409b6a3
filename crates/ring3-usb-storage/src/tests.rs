//! The driver against the in-process device model: initialisation, reads and writes,
//! each fault the model can act out, and property tests of the wrappers and of random
//! I/O against a shadow copy of the disk.

use std::time::Duration;

use proptest::prelude::*;

use crate::bot::{
    CbwError, CommandBlockWrapper, CommandStatusWrapper, CswError, CswStatus, Direction,
    CBW_SIGNATURE, CSW_SIGNATURE,
};
use crate::fake::{FakeConfig, FakeMassStorage, Fault};
use crate::scsi::{opcode, Capacity, InquiryData, Sense, SenseKey};
use crate::{MassStorage, MassStorageOptions, StorageError};

fn open(config: FakeConfig) -> (FakeMassStorage, MassStorage<FakeMassStorage>) {
    let device = FakeMassStorage::new(config);
    let disk = MassStorage::new(device.clone(), device.endpoints(), 0).expect("the model opens");
    (device, disk)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed) ^ (index >> 9) as u8)
        .collect()
}

/// The disk still works: a write and a read back of a few blocks.
fn assert_works(device: &FakeMassStorage, disk: &MassStorage<FakeMassStorage>) {
    let data = pattern(0x77, 4 * 512);
    disk.write(10, &data).expect("write after recovery");
    let mut back = vec![0; data.len()];
    disk.read(10, &mut back).expect("read after recovery");
    assert_eq!(back, data);
    assert_eq!(device.pending_faults(), 0);
}

#[test]
fn initialisation_reads_inquiry_and_capacity() {
    let (device, disk) = open(FakeConfig::default());
    assert_eq!(disk.block_size(), 512);
    assert_eq!(disk.block_count(), 2048);
    assert_eq!(disk.capacity_bytes(), 1024 * 1024);
    assert_eq!(disk.inquiry().vendor, "RING3");
    assert_eq!(disk.inquiry().product, "FAKE DISK");
    assert_eq!(disk.inquiry().revision, "1.0");
    assert!(disk.inquiry().removable);
    assert_eq!(disk.max_transfer_bytes(), 128 * 1024);
    assert_eq!(
        device.stats().opcodes,
        [
            opcode::INQUIRY,
            opcode::TEST_UNIT_READY,
            opcode::READ_CAPACITY_10
        ]
    );
}

#[test]
fn unit_attention_and_becoming_ready_are_waited_out() {
    let (device, disk) = open(FakeConfig {
        unit_attention_at_start: true,
        not_ready_polls: 3,
        ..FakeConfig::default()
    });
    assert_eq!(disk.block_count(), 2048);
    let opcodes = device.stats().opcodes;
    let polls = opcodes
        .iter()
        .filter(|&&op| op == opcode::TEST_UNIT_READY)
        .count();
    // One UNIT ATTENTION, three NOT READY, then ready.
    assert_eq!(polls, 5);
}

#[test]
fn a_unit_that_never_becomes_ready_times_out() {
    let device = FakeMassStorage::new(FakeConfig {
        not_ready_polls: u32::MAX,
        ..FakeConfig::default()
    });
    let options = MassStorageOptions {
        ready_timeout: Duration::from_millis(200),
        ..MassStorageOptions::default()
    };
    let error = MassStorage::with_options(device.clone(), device.endpoints(), 0, options)
        .expect_err("never ready");
    assert!(matches!(error, StorageError::NotReady { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("NOT READY"), "{message}");
    assert!(message.contains("becoming ready"), "{message}");
}

#[test]
fn descriptor_sense_is_decoded() {
    let (device, disk) = open(FakeConfig {
        descriptor_sense: true,
        ..FakeConfig::default()
    });
    device.inject(Fault::CheckCondition(0x3, 0x11, 0x00));
    let error = disk.read(0, &mut [0; 512]).expect_err("medium error");
    let sense = error.sense().expect("sense");
    assert_eq!(
        (sense.key, sense.asc, sense.ascq),
        (SenseKey::MEDIUM_ERROR, 0x11, 0)
    );
    assert_eq!(sense.response_code, 0x72);
    assert!(
        error.to_string().contains("unrecovered read error"),
        "{error}"
    );
}

#[test]
fn large_media_use_read_capacity_16_and_16_byte_commands() {
    let blocks = (1u64 << 33) + 5;
    let (device, disk) = open(FakeConfig {
        block_count: blocks,
        ..FakeConfig::default()
    });
    assert_eq!(disk.block_count(), blocks);
    let data = pattern(3, 1024);
    let last = blocks - 2;
    disk.write(last, &data).expect("write past 2^32");
    let mut back = vec![0; 1024];
    disk.read(last, &mut back).expect("read past 2^32");
    assert_eq!(back, data);
    let opcodes = device.stats().opcodes;
    assert!(opcodes.contains(&opcode::SERVICE_ACTION_IN_16));
    assert!(opcodes.contains(&opcode::WRITE_16));
    assert!(opcodes.contains(&opcode::READ_16));
    // Low LBAs still use the 10-byte commands.
    disk.read(0, &mut back).expect("read at 0");
    assert_eq!(device.stats().opcodes.last(), Some(&opcode::READ_10));
}

#[test]
fn command_size_follows_lba_and_block_count() {
    use crate::device::rw_command;
    let (name, cdb) = rw_command(
        opcode::READ_10,
        opcode::READ_16,
        u64::from(u32::MAX),
        0xFFFF,
    );
    assert_eq!((name, cdb.len(), cdb[0]), ("READ(10)", 10, opcode::READ_10));
    assert_eq!(&cdb[2..6], &[0xFF; 4]);
    assert_eq!(&cdb[7..9], &[0xFF; 2]);
    let (name, cdb) = rw_command(opcode::WRITE_10, opcode::WRITE_16, 1 << 32, 1);
    assert_eq!(
        (name, cdb.len(), cdb[0]),
        ("WRITE(16)", 16, opcode::WRITE_16)
    );
    assert_eq!(&cdb[2..10], &(1u64 << 32).to_be_bytes());
    let (name, cdb) = rw_command(opcode::READ_10, opcode::READ_16, 5, 0x10000);
    assert_eq!(name, "READ(16)");
    assert_eq!(&cdb[10..14], &0x10000u32.to_be_bytes());
}

#[test]
fn the_largest_transfer_limit_is_used_in_one_command() {
    let (device, mut disk) = open(FakeConfig {
        block_count: 20_000,
        ..FakeConfig::default()
    });
    let limit = disk.set_max_transfer_bytes(usize::MAX);
    assert_eq!(limit, crate::MAX_TRANSFER_LIMIT);
    let data = pattern(9, 17_000 * 512);
    disk.write(0, &data).expect("write");
    let mut back = vec![0; data.len()];
    disk.read(0, &mut back).expect("read");
    assert!(back == data);
    assert_eq!(device.stats().largest_transfer, crate::MAX_TRANSFER_LIMIT);
}

#[test]
fn requests_are_split_at_max_transfer_bytes() {
    let (device, mut disk) = open(FakeConfig::default());
    assert_eq!(disk.set_max_transfer_bytes(3000), 2560);
    let data = pattern(1, 20 * 512);
    disk.write(100, &data).expect("write");
    let mut back = vec![0; data.len()];
    disk.read(100, &mut back).expect("read");
    assert_eq!(back, data);
    assert_eq!(device.stats().largest_transfer, 2560);
    assert_eq!(disk.set_max_transfer_bytes(1), 512);
}

#[test]
fn bad_requests_are_refused_before_reaching_the_device() {
    let (device, disk) = open(FakeConfig::default());
    let commands = device.stats().commands;
    let error = disk.read(0, &mut [0; 100]).expect_err("not whole blocks");
    assert!(
        matches!(error, StorageError::InvalidArgument { .. }),
        "{error}"
    );
    let error = disk.read(2047, &mut [0; 1024]).expect_err("past the end");
    assert!(matches!(error, StorageError::OutOfRange { .. }), "{error}");
    assert!(error.to_string().contains("2048 blocks"), "{error}");
    let error = disk
        .write(u64::MAX, &[0; 512])
        .expect_err("far past the end");
    assert!(matches!(error, StorageError::OutOfRange { .. }), "{error}");
    assert_eq!(error.kind(), ring3::ErrorKind::InvalidInput);
    assert_eq!(device.stats().commands, commands);
    // Empty requests are fine and send nothing.
    disk.read(2048, &mut []).expect("empty read at the end");
}

#[test]
fn device_refusal_names_the_sense() {
    let (device, disk) = open(FakeConfig {
        write_protected: true,
        ..FakeConfig::default()
    });
    let error = disk.write(0, &[1; 512]).expect_err("write protected");
    let message = error.to_string();
    assert!(message.contains("DATA PROTECT"), "{message}");
    assert!(message.contains("27h/00h"), "{message}");
    assert!(message.contains("write protected"), "{message}");
    assert!(message.starts_with("WRITE(10)"), "{message}");
    assert_eq!(device.stats().opcodes.last(), Some(&opcode::REQUEST_SENSE));
}

#[test]
fn synchronize_cache_reaches_the_device_or_is_not_needed() {
    let (device, disk) = open(FakeConfig::default());
    disk.synchronize_cache().expect("flush");
    assert_eq!(device.stats().flushes, 1);
    let (_, disk) = open(FakeConfig {
        no_synchronize_cache: true,
        ..FakeConfig::default()
    });
    disk.synchronize_cache()
        .expect("a device without the command has no cache");
}

#[test]
fn unit_attention_during_io_is_retried_once() {
    let (device, disk) = open(FakeConfig::default());
    device.raise_unit_attention();
    assert_works(&device, &disk);
}

#[test]
fn a_lun_the_device_does_not_have_is_refused() {
    let device = FakeMassStorage::new(FakeConfig {
        stall_get_max_lun: false,
        max_lun: 1,
        ..FakeConfig::default()
    });
    MassStorage::new(device.clone(), device.endpoints(), 1).expect("LUN 1 exists");
    let error = MassStorage::new(device.clone(), device.endpoints(), 2).expect_err("no LUN 2");
    assert!(
        matches!(error, StorageError::NoSuchLun { lun: 2, max_lun: 1 }),
        "{error}"
    );
}

#[test]
fn a_device_that_is_not_a_disk_is_refused() {
    let device = FakeMassStorage::new(FakeConfig {
        peripheral: 0x05,
        ..FakeConfig::default()
    });
    let error = MassStorage::new(device.clone(), device.endpoints(), 0).expect_err("a CD-ROM");
    assert!(
        matches!(error, StorageError::NotBlockDevice { device_type: 5, .. }),
        "{error}"
    );
}

#[test]
fn absurd_capacities_are_refused() {
    let cases: Vec<(FakeConfig, &str)> = vec![
        (
            FakeConfig {
                block_size: 0,
                ..FakeConfig::default()
            },
            "block size 0",
        ),
        (
            FakeConfig {
                block_size: 520,
                ..FakeConfig::default()
            },
            "block size 520",
        ),
        (
            FakeConfig {
                block_size: 1 << 20,
                ..FakeConfig::default()
            },
            "block size 1048576",
        ),
        (
            FakeConfig {
                read_capacity_10_override: Some(vec![0, 0, 0]),
                ..FakeConfig::default()
            },
            "3 bytes of READ CAPACITY(10)",
        ),
        (
            FakeConfig {
                read_capacity_10_override: Some(vec![0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 2, 0]),
                read_capacity_16_override: Some(vec![0xFF; 12]),
                ..FakeConfig::default()
            },
            "READ CAPACITY(16)",
        ),
        (
            FakeConfig {
                read_capacity_10_override: Some(vec![0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 2, 0]),
                read_capacity_16_override: Some(vec![
                    0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 2, 0,
                ]),
                ..FakeConfig::default()
            },
            "overflow",
        ),
    ];
    for (config, expected) in cases {
        let device = FakeMassStorage::new(config);
        let error = MassStorage::new(device.clone(), device.endpoints(), 0).expect_err(expected);
        assert!(matches!(error, StorageError::BadResponse { .. }), "{error}");
        assert!(
            error.to_string().contains(expected),
            "{error} lacks {expected}"
        );
    }
}

#[test]
fn a_stalled_data_stage_is_cleared_and_reports_the_sense() {
    let (device, disk) = open(FakeConfig::default());
    let before = device.stats();
    device.inject(Fault::StallData);
    let error = disk.read(0, &mut [0; 4096]).expect_err("stalled read");
    assert_eq!(
        error.sense().map(|sense| sense.key),
        Some(SenseKey::MEDIUM_ERROR),
        "{error}"
    );
    assert_eq!(
        device.stats().resets,
        before.resets,
        "a stall needs no reset"
    );
    assert!(device.stats().clear_halts > before.clear_halts);
    assert_works(&device, &disk);

    device.inject(Fault::StallData);
    let error = disk.write(0, &[0; 4096]).expect_err("stalled write");
    assert!(error.to_string().contains("write error"), "{error}");
    assert_works(&device, &disk);
}

#[test]
fn a_stalled_status_is_cleared_and_read_again() {
    let (device, disk) = open(FakeConfig::default());
    let before = device.stats();
    device.inject(Fault::StallCsw);
    let mut buf = vec![0; 1024];
    disk.read(0, &mut buf)
        .expect("a single CSW stall is recovered transparently");
    assert_eq!(device.stats().clear_halts, before.clear_halts + 1);
    assert_eq!(device.stats().resets, before.resets);

    device.inject(Fault::StallCswAlways);
    let error = disk.read(0, &mut buf).expect_err("the CSW never comes");
    assert!(
        matches!(error, StorageError::InvalidStatus { .. }),
        "{error}"
    );
    assert_eq!(device.stats().resets, before.resets + 1);
    assert_works(&device, &disk);
}

#[test]
fn invalid_status_wrappers_cause_reset_recovery() {
    for fault in [
        Fault::BadCswSignature,
        Fault::WrongCswTag,
        Fault::LongCsw,
        Fault::ReservedCswStatus,
        Fault::LyingResidue(1_000_000),
    ] {
        let (device, disk) = open(FakeConfig::default());
        let resets = device.stats().resets;
        device.inject(fault.clone());
        let error = disk.read(5, &mut [0; 1024]).expect_err("invalid CSW");
        assert!(
            matches!(error, StorageError::InvalidStatus { .. }),
            "{fault:?}: {error}"
        );
        assert!(error.to_string().contains("reset"), "{error}");
        assert_eq!(device.stats().resets, resets + 1, "{fault:?}");
        assert_works(&device, &disk);
    }
}

#[test]
fn phase_error_causes_reset_recovery() {
    let (device, disk) = open(FakeConfig::default());
    device.inject(Fault::PhaseError);
    let error = disk.write(0, &[1; 512]).expect_err("phase error");
    assert!(matches!(error, StorageError::PhaseError { .. }), "{error}");
    assert_eq!(device.stats().resets, 1);
    assert_works(&device, &disk);
}

#[test]
fn a_lying_residue_is_an_error() {
    let (device, disk) = open(FakeConfig::default());
    device.inject(Fault::LyingResidue(512));
    let error = disk
        .read(0, &mut [0; 1024])
        .expect_err("residue with all data");
    assert!(
        matches!(error, StorageError::ShortTransfer { residue: 512, .. }),
        "{error}"
    );
    assert_works(&device, &disk);
    device.inject(Fault::LyingResidue(512));
    let error = disk.write(0, &[0; 1024]).expect_err("residue on a write");
    assert!(
        matches!(error, StorageError::ShortTransfer { .. }),
        "{error}"
    );
    assert_works(&device, &disk);
}

#[test]
fn short_and_overlong_data_are_errors() {
    let (device, disk) = open(FakeConfig::default());
    device.inject(Fault::ShortData(700));
    let error = disk.read(0, &mut [0; 2048]).expect_err("short read");
    assert!(
        matches!(
            error,
            StorageError::ShortTransfer {
                expected: 2048,
                actual: 700,
                residue: 1348,
                ..
            }
        ),
        "{error}"
    );
    assert_works(&device, &disk);

    device.inject(Fault::ExtraData(100));
    let error = disk.read(0, &mut [0; 2048]).expect_err("overlong read");
    assert!(
        matches!(error, StorageError::InvalidStatus { .. }),
        "{error}"
    );
    assert_works(&device, &disk);

    // An overlong answer to a command whose buffer is not whole packets (INQUIRY-like):
    // the bounce buffer sees the extra bytes.
    device.inject(Fault::ExtraData(10));
    let mut sense = [0; 18];
    let error = disk
        .bulk_only()
        .execute(
            "REQUEST SENSE",
            0,
            &crate::scsi::request_sense(18),
            crate::bot::DataStage::In(&mut sense),
        )
        .expect_err("overlong");
    assert!(matches!(error, StorageError::BadResponse { .. }), "{error}");
    assert_works(&device, &disk);
}

#[test]
fn timeouts_reset_the_interface() {
    for fault in [Fault::TimeoutCbw, Fault::TimeoutData, Fault::TimeoutCsw] {
        let (device, disk) = open(FakeConfig::default());
        device.inject(fault.clone());
        let error = disk.read(0, &mut [0; 512]).expect_err("timeout");
        assert!(
            matches!(error, StorageError::Timeout { .. }),
            "{fault:?}: {error}"
        );
        assert_eq!(device.stats().resets, 1, "{fault:?}");
        assert_works(&device, &disk);
    }
    let (device, disk) = open(FakeConfig::default());
    device.inject(Fault::TimeoutData);
    let error = disk.write(0, &[0; 512]).expect_err("write timeout");
    assert!(error.to_string().contains("data-out"), "{error}");
    assert_works(&device, &disk);
}

#[test]
fn disconnection_is_reported_without_retrying() {
    let (device, disk) = open(FakeConfig::default());
    device.inject(Fault::Disconnect);
    let error = disk.read(0, &mut [0; 512]).expect_err("gone");
    assert!(error.is_disconnected(), "{error}");
    assert_eq!(device.stats().resets, 0);
    let error = disk.synchronize_cache().expect_err("still gone");
    assert!(error.is_disconnected(), "{error}");
    assert_eq!(error.kind(), ring3::ErrorKind::Device);
}

#[test]
fn check_condition_without_sense_says_so() {
    let (device, disk) = open(FakeConfig::default());
    // The command fails, then REQUEST SENSE's status is corrupt.
    device.inject(Fault::CheckCondition(0x4, 0x44, 0));
    device.inject(Fault::BadCswSignature);
    let error = disk.read(0, &mut [0; 512]).expect_err("no sense");
    assert!(
        matches!(error, StorageError::CommandFailedNoSense { .. }),
        "{error}"
    );
    assert_works(&device, &disk);
}

#[test]
fn an_invalid_cbw_is_refused_by_the_model_until_reset() {
    // The model's own CBW checking: a CBW of the wrong length stalls both endpoints,
    // and only Reset Recovery brings the device back.
    let (device, disk) = open(FakeConfig::default());
    use ring3_usb::UsbTransport;
    let endpoints = device.endpoints();
    let result = device.bulk_out(endpoints.bulk_out, &[0; 30], Duration::from_secs(1));
    assert_eq!(result, Err(ring3_usb::TransferError::Stall));
    device.clear_halt(endpoints.bulk_out).expect("clear halt");
    assert_eq!(
        device.bulk_out(endpoints.bulk_out, &[0; 31], Duration::from_secs(1)),
        Err(ring3_usb::TransferError::Stall),
        "still halted before the reset"
    );
    disk.bulk_only()
        .reset_recovery("test", "invalid CBW")
        .expect("reset");
    assert_works(&device, &disk);
    assert_eq!(device.stats().invalid_cbws, 1);
}

#[test]
fn sense_parsing() {
    let mut fixed = [0u8; 18];
    fixed[0] = 0xF0; // VALID bit with response code 70h
    fixed[2] = 0x05;
    fixed[7] = 10;
    fixed[12] = 0x21;
    let sense = Sense::parse(&fixed).expect("fixed");
    assert_eq!(
        (sense.key, sense.asc, sense.ascq),
        (SenseKey::ILLEGAL_REQUEST, 0x21, 0)
    );
    assert_eq!(
        sense.to_string(),
        "sense key ILLEGAL REQUEST (5h), ASC/ASCQ 21h/00h (logical block address out of range)"
    );
    // An additional length that leaves out ASC/ASCQ.
    fixed[7] = 2;
    assert_eq!(Sense::parse(&fixed).expect("short fixed").asc, 0);
    assert!(Sense::parse(&[0x70, 0]).is_err());
    assert!(Sense::parse(&[0x72, 2, 4]).is_err());
    assert!(Sense::parse(&[0x12; 18]).is_err());
    assert!(Sense::parse(&[]).is_err());
}

#[test]
fn inquiry_parsing() {
    assert!(InquiryData::parse(&[0; 4]).is_err());
    // Only as much as ADDITIONAL LENGTH covers.
    let mut data = [b'X'; 36];
    data[0] = 0;
    data[4] = 7; // ends at byte 12: half the vendor
    let inquiry = InquiryData::parse(&data).expect("short");
    assert_eq!(inquiry.vendor, "XXXX");
    assert_eq!(inquiry.product, "");
    data[4] = 31;
    data[8] = 0xFF;
    assert_eq!(InquiryData::parse(&data).expect("full").vendor, "?XXXXXXX");
}

#[test]
fn capacity_parsing() {
    assert!(Capacity::parse_10(&[0; 7]).is_err());
    let capacity = Capacity::parse_10(&[0, 0, 0x1F, 0xFF, 0, 0, 2, 0]).expect("10");
    assert_eq!(capacity.block_count(), Ok(0x2000));
    assert!(!capacity.needs_16());
    assert!(Capacity::parse_10(&[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 2, 0])
        .expect("10")
        .needs_16());
    assert!(Capacity::parse_16(&[0; 11]).is_err());
}

#[test]
fn cbw_encoding() {
    let cbw = CommandBlockWrapper::new(
        0x1234_5678,
        4096,
        Direction::In,
        3,
        &[0x28, 0, 0, 0, 0, 1, 0, 0, 8, 0],
    )
    .expect("cbw");
    let bytes = cbw.encode();
    assert_eq!(&bytes[0..4], b"USBC");
    assert_eq!(&bytes[4..8], &[0x78, 0x56, 0x34, 0x12]);
    assert_eq!(&bytes[8..12], &4096u32.to_le_bytes());
    assert_eq!(bytes[12], 0x80);
    assert_eq!(bytes[13], 3);
    assert_eq!(bytes[14], 10);
    assert_eq!(bytes[15], 0x28);
    assert_eq!(bytes[25..31], [0; 6]);
    assert_eq!(CommandBlockWrapper::parse(&bytes), Ok(cbw));
    assert_eq!(
        CommandBlockWrapper::new(0, 0, Direction::Out, 16, &[0]),
        Err(CbwError::Lun(16))
    );
    assert_eq!(
        CommandBlockWrapper::new(0, 0, Direction::Out, 0, &[0; 17]),
        Err(CbwError::CommandLength(17))
    );
    assert!(CommandBlockWrapper::new(0, 0, Direction::Out, 0, &[]).is_err());
}

#[test]
fn csw_checks() {
    let cbw = CommandBlockWrapper::new(7, 512, Direction::In, 0, &[0x28]).expect("cbw");
    let csw = CommandStatusWrapper {
        tag: 7,
        residue: 512,
        status: CswStatus::Failed,
    };
    let bytes = csw.encode();
    assert_eq!(&bytes[0..4], b"USBS");
    assert_eq!(CommandStatusWrapper::parse(&bytes), Ok(csw));
    assert_eq!(csw.check(&cbw), Ok(()));
    let too_much = CommandStatusWrapper {
        residue: 513,
        ..csw
    };
    assert!(matches!(
        too_much.check(&cbw),
        Err(CswError::Residue { .. })
    ));
    let other = CommandStatusWrapper { tag: 8, ..csw };
    assert!(matches!(other.check(&cbw), Err(CswError::Tag { .. })));
    assert_eq!(
        CommandStatusWrapper::parse(&bytes[..12]),
        Err(CswError::Length(12))
    );
}

proptest! {
    #[test]
    fn cbw_parse_never_panics_and_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
        if let Ok(cbw) = CommandBlockWrapper::parse(&bytes) {
            // Everything but the bytes of the command block past its length is kept.
            let encoded = cbw.encode();
            prop_assert_eq!(&encoded[..15], &bytes[..15]);
            prop_assert_eq!(CommandBlockWrapper::parse(&encoded), Ok(cbw));
        }
    }

    #[test]
    fn cbw_fields_round_trip(
        tag in any::<u32>(),
        length in any::<u32>(),
        input in any::<bool>(),
        lun in 0u8..=15,
        command in proptest::collection::vec(any::<u8>(), 1..=16),
    ) {
        let direction = if input { Direction::In } else { Direction::Out };
        let cbw = CommandBlockWrapper::new(tag, length, direction, lun, &command).expect("valid");
        let parsed = CommandBlockWrapper::parse(&cbw.encode()).expect("parses");
        prop_assert_eq!(parsed.command(), &command[..]);
        prop_assert_eq!(parsed, cbw);
    }

    #[test]
    fn csw_parse_never_panics_and_round_trips(mut bytes in proptest::collection::vec(any::<u8>(), 0..20), sign in any::<bool>()) {
        if sign && bytes.len() >= 4 {
            bytes[..4].copy_from_slice(&CSW_SIGNATURE.to_le_bytes());
        }
        if let Ok(csw) = CommandStatusWrapper::parse(&bytes) {
            prop_assert_eq!(bytes.len(), 13);
            prop_assert_eq!(&csw.encode()[..], &bytes[..]);
        }
    }

    #[test]
    fn device_data_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = Sense::parse(&bytes);
        let _ = InquiryData::parse(&bytes);
        if let Ok(capacity) = Capacity::parse_10(&bytes) {
            let _ = capacity.block_count();
        }
        if let Ok(capacity) = Capacity::parse_16(&bytes) {
            let _ = capacity.block_count();
        }
        let _ = CommandBlockWrapper::parse(&bytes);
        let _ = CBW_SIGNATURE;
    }

    #[test]
    fn random_io_matches_a_shadow_disk(
        max_blocks in 1usize..40,
        operations in proptest::collection::vec((any::<bool>(), 0u64..300, 1usize..80, any::<u8>()), 1..30),
    ) {
        const BLOCKS: u64 = 256;
        let (_device, mut disk) = open(FakeConfig { block_count: BLOCKS, ..FakeConfig::default() });
        disk.set_max_transfer_bytes(max_blocks * 512);
        let mut shadow = vec![0u8; BLOCKS as usize * 512];
        for (write, lba, blocks, seed) in operations {
            let len = blocks * 512;
            let inside = lba + blocks as u64 <= BLOCKS;
            let start = lba as usize * 512;
            if write {
                let data = pattern(seed, len);
                let result = disk.write(lba, &data);
                prop_assert_eq!(result.is_ok(), inside);
                if inside {
                    shadow[start..start + len].copy_from_slice(&data);
                }
            } else {
                let mut buf = vec![0; len];
                let result = disk.read(lba, &mut buf);
                prop_assert_eq!(result.is_ok(), inside);
                if inside {
                    prop_assert!(buf == shadow[start..start + len]);
                }
            }
        }
    }
}

/// Faults at random points of a random I/O sequence: every command either succeeds with
/// the right data or fails with an error, and the disk matches the shadow wherever the
/// driver said a write succeeded.
#[test]
fn random_faults_never_corrupt_acknowledged_data() {
    let faults = [
        Fault::StallData,
        Fault::StallCsw,
        Fault::StallCswAlways,
        Fault::BadCswSignature,
        Fault::WrongCswTag,
        Fault::LongCsw,
        Fault::ReservedCswStatus,
        Fault::PhaseError,
        Fault::LyingResidue(7),
        Fault::ShortData(100),
        Fault::ExtraData(3),
        Fault::TimeoutCbw,
        Fault::TimeoutData,
        Fault::TimeoutCsw,
        Fault::CheckCondition(0x4, 0x44, 0),
    ];
    let mut rng = XorShift(0x5eed);
    let (device, disk) = open(FakeConfig {
        block_count: 128,
        ..FakeConfig::default()
    });
    let mut shadow = vec![0u8; 128 * 512];
    for round in 0..400 {
        if rng.next() % 3 == 0 {
            device.inject(faults[(rng.next() as usize) % faults.len()].clone());
        }
        let lba = rng.next() % 120;
        let blocks = 1 + (rng.next() % 8) as usize;
        let start = lba as usize * 512;
        let len = blocks * 512;
        if rng.next() % 2 == 0 {
            let data = pattern(round as u8, len);
            if disk.write(lba, &data).is_ok() {
                shadow[start..start + len].copy_from_slice(&data);
            } else {
                // A failed write may have reached the medium or not: take the device's word.
                let mut actual = vec![0; len];
                let read_back = (0..20).any(|_| disk.read(lba, &mut actual).is_ok());
                assert!(read_back, "round {round}: the disk does not recover");
                shadow[start..start + len].copy_from_slice(&actual);
            }
        } else {
            let mut buf = vec![0; len];
            if disk.read(lba, &mut buf).is_ok() {
                assert!(buf == shadow[start..start + len], "round {round}");
            }
        }
    }
    while device.pending_faults() > 0 {
        let _ = disk.read(0, &mut [0; 512]);
    }
    let mut all = vec![0; shadow.len()];
    disk.read(0, &mut all).expect("final read");
    assert!(all == shadow);
}

/// A small deterministic generator (xorshift), so the fault test is reproducible.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn a_failed_reset_recovery_needs_a_restart() {
    let (device, disk) = open(FakeConfig::default());
    device.inject(Fault::PhaseError);
    let error = disk.read(0, &mut [0; 512]).expect_err("phase error");
    assert!(!error.needs_restart(), "a recovered phase error: {error}");
    device.configure(|config| config.stall_reset = true);
    device.inject(Fault::PhaseError);
    let error = disk
        .read(0, &mut [0; 512])
        .expect_err("phase error, reset refused");
    assert!(matches!(error, StorageError::ResetFailed { .. }), "{error}");
    assert!(error.needs_restart(), "{error}");
    assert!(
        error
            .to_string()
            .contains("Bulk-Only Mass Storage Reset failed"),
        "{error}"
    );
    device.inject(Fault::Disconnect);
    let error = disk.read(0, &mut [0; 512]).expect_err("gone");
    assert!(error.needs_restart(), "{error}");
}

#[test]
fn pass_through_commands_report_the_devices_sense() {
    let (_device, disk) = open(FakeConfig::default());
    let cdb = crate::scsi::rw_10(opcode::READ_10, 2048, 1);
    let mut buf = [0; 512];
    let error = disk
        .scsi_command("READ(10)", &cdb, crate::bot::DataStage::In(&mut buf))
        .expect_err("past the end");
    let sense = error.sense().expect("sense");
    assert_eq!((sense.key, sense.asc), (SenseKey::ILLEGAL_REQUEST, 0x21));
    assert!(
        error
            .to_string()
            .contains("logical block address out of range"),
        "{error}"
    );
    let cdb = crate::scsi::inquiry(36);
    let mut data = [0; 36];
    let len = disk
        .scsi_command("INQUIRY", &cdb, crate::bot::DataStage::In(&mut data))
        .expect("inquiry");
    assert_eq!(len, 36);
    assert_eq!(&data[8..13], b"RING3");
}

#[test]
fn padding_of_a_failed_command_past_the_commands_length_is_dropped() {
    // QEMU's usb-storage on a SuperSpeed port: 1024-byte packets, and a failed READ's
    // data stage padded to the host's whole transfer.
    let (device, disk) = open(FakeConfig {
        max_packet_size: 1024,
        pad_failed_data_in: true,
        ..FakeConfig::default()
    });
    let cdb = crate::scsi::rw_10(opcode::READ_10, 2048, 1);
    let mut buf = [0; 512];
    let error = disk
        .scsi_command("READ(10)", &cdb, crate::bot::DataStage::In(&mut buf))
        .expect_err("past the end");
    let sense = error
        .sense()
        .unwrap_or_else(|| panic!("no sense in {error}"));
    assert_eq!((sense.key, sense.asc), (SenseKey::ILLEGAL_REQUEST, 0x21));
    assert_eq!(device.stats().resets, 0, "no reset for padding");
    assert_works(&device, &disk);
    // Passed data past the command's length is not trusted.
    device.inject(Fault::ExtraData(100));
    let mut inquiry = [0; 36];
    let error = disk
        .scsi_command(
            "INQUIRY",
            &crate::scsi::inquiry(36),
            crate::bot::DataStage::In(&mut inquiry),
        )
        .expect_err("overlong");
    assert!(
        error
            .to_string()
            .contains("at least 136 bytes, 36 were expected"),
        "{error}"
    );
    assert_works(&device, &disk);
}
