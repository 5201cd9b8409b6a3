//! The driver against the edu model on the fake backend.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use ring3::fake::{FakeBackend, FakeDevice};
use ring3::{Backend, ErrorKind, IrqMode};

use crate::model::{fake_edu, EduModel, EDU_FAKE_DEVICE};
use crate::registers::{InterruptStatus, DMA_BUFFER_SIZE, DMA_USABLE_SIZE};
use crate::{wrapping_factorial, Completion, Direction, Edu, Error, Version};

fn edu(completion: Completion) -> Edu<FakeBackend<EduModel>> {
    Edu::new(fake_edu("edu-test"), completion).expect("driver starts on the model")
}

fn model(edu: &Edu<FakeBackend<EduModel>>) -> &Arc<EduModel> {
    edu.backend().model()
}

/// Bytes that differ from their neighbours and from the zero fill.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn identification_is_version_1_0() {
    let edu = edu(Completion::Poll);
    assert_eq!(
        edu.identification().unwrap(),
        Version { major: 1, minor: 0 }
    );
    assert_eq!(edu.identification().unwrap().to_string(), "1.0");
}

#[test]
fn identification_without_the_magic_byte_is_an_error() {
    let edu = edu(Completion::Poll);
    model(&edu).set_identification(0x0100_00ee);
    let error = edu.identification().unwrap_err();
    assert!(
        matches!(error, Error::BadIdentification { value: 0x0100_00ee }),
        "{error}"
    );
    assert_eq!(error.kind(), ErrorKind::Device);
}

#[test]
fn liveness_reads_back_the_inverse() {
    let mut edu = edu(Completion::Poll);
    for value in [0, 1, 0x1234_5678, u32::MAX] {
        edu.check_liveness(value).unwrap();
    }
}

#[test]
fn wrong_liveness_answer_is_an_error_naming_both_values() {
    let mut edu = edu(Completion::Poll);
    model(&edu).set_wrong_liveness(true);
    let error = edu.check_liveness(0x1234_5678).unwrap_err();
    match error {
        Error::LivenessMismatch {
            wrote,
            expected,
            read,
        } => {
            assert_eq!((wrote, expected), (0x1234_5678, 0xedcb_a987));
            assert_ne!(read, expected);
        }
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn wrapping_factorial_matches_u32_arithmetic() {
    assert_eq!(wrapping_factorial(0), 1);
    assert_eq!(wrapping_factorial(10), 3_628_800);
    assert_eq!(wrapping_factorial(12), 479_001_600);
    // 13! = 6227020800 wraps.
    assert_eq!(
        wrapping_factorial(13),
        (6_227_020_800u64 % (1 << 32)) as u32
    );
    let slow = |n: u32| (1..=n).fold(1u32, u32::wrapping_mul);
    for n in 0..100 {
        assert_eq!(wrapping_factorial(n), slow(n), "{n}!");
    }
    assert_eq!(wrapping_factorial(u32::MAX), 0);
}

#[test]
fn factorial_by_polling() {
    let mut edu = edu(Completion::Poll);
    assert_eq!(edu.completion(), Completion::Poll);
    for n in [0, 1, 5, 10, 12, 13, 20, 40] {
        assert_eq!(edu.factorial(n).unwrap(), wrapping_factorial(n), "{n}!");
    }
    assert_eq!(model(&edu).interrupt_status(), 0, "no interrupt requested");
}

#[test]
fn factorial_by_msi() {
    let mut edu = edu(Completion::Interrupt);
    assert_eq!(edu.irq_mode(), Some(IrqMode::Msi));
    for n in [0, 3, 10, 13] {
        assert_eq!(edu.factorial(n).unwrap(), wrapping_factorial(n), "{n}!");
        assert_eq!(model(&edu).interrupt_status(), 0, "acknowledged");
    }
    assert_eq!(model(&edu).interrupts_sent(), 4);
}

#[test]
fn factorial_falls_back_to_intx_without_msi() {
    let backend = fake_edu("edu-intx");
    backend.model().set_msi_capable(false);
    let mut edu = Edu::new(backend, Completion::Interrupt).unwrap();
    assert_eq!(edu.irq_mode(), Some(IrqMode::Intx));
    assert_eq!(edu.factorial(6).unwrap(), 720);
    assert_eq!(model(&edu).interrupt_status(), 0);
}

#[test]
fn a_lost_factorial_interrupt_is_an_error_and_the_next_one_works() {
    let mut edu = edu(Completion::Interrupt);
    edu.set_timeout(Duration::from_millis(200));
    model(&edu).drop_next_interrupt();
    let error = edu.factorial(5).unwrap_err();
    assert!(
        matches!(
            error,
            Error::LostInterrupt {
                operation: "factorial",
                interrupt_status: 1,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(error.kind(), ErrorKind::Device);
    assert_eq!(model(&edu).interrupts_dropped(), 1);
    assert_eq!(model(&edu).interrupt_status(), 0, "cleaned up");
    assert_eq!(edu.factorial(5).unwrap(), 120);
}

#[test]
fn a_factorial_that_never_ends_times_out_naming_the_status_register() {
    for completion in [Completion::Poll, Completion::Interrupt] {
        let mut edu = edu(completion);
        edu.set_timeout(Duration::from_millis(50));
        model(&edu).set_factorial_delay(Duration::from_millis(400));
        let started = Instant::now();
        let error = edu.factorial(4).unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(350));
        match &error {
            Error::Timeout {
                operation: "factorial",
                register: "status",
                offset: 0x20,
                last: 0x1 | 0x81,
                ..
            } => {}
            other => panic!("{completion:?}: unexpected error {other}"),
        }
        assert!(error.to_string().contains("status register (0x20)"));

        // The next factorial waits for the slow one instead of having its operand ignored.
        edu.set_timeout(Duration::from_secs(5));
        model(&edu).set_factorial_delay(Duration::from_millis(1));
        assert_eq!(edu.factorial(7).unwrap(), 5040, "{completion:?}");
        assert_eq!(model(&edu).ignored_writes(), 0, "{completion:?}");
    }
}

#[test]
fn spurious_interrupts_are_skipped() {
    let mut edu = edu(Completion::Interrupt);
    let model = Arc::clone(model(&edu));
    model.set_factorial_delay(Duration::from_millis(100));
    let noise = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        model.raise_spurious_interrupt();
    });
    assert_eq!(edu.factorial(8).unwrap(), 40320);
    noise.join().unwrap();
}

#[test]
fn interrupt_self_test_raises_and_acknowledges() {
    for completion in [Completion::Poll, Completion::Interrupt] {
        let mut edu = edu(completion);
        edu.raise_and_ack_interrupt().unwrap();
        edu.raise_and_ack_interrupt().unwrap();
        assert_eq!(model(&edu).interrupt_status(), 0, "{completion:?}");
        assert_eq!(model(&edu).interrupts_sent(), 2);
    }
}

#[test]
fn interrupt_self_test_reports_a_lost_interrupt() {
    let mut edu = edu(Completion::Interrupt);
    edu.set_timeout(Duration::from_millis(100));
    model(&edu).drop_next_interrupt();
    let error = edu.raise_and_ack_interrupt().unwrap_err();
    assert!(matches!(error, Error::LostInterrupt { .. }), "{error}");
    assert_eq!(model(&edu).interrupt_status(), 0);
    edu.raise_and_ack_interrupt().unwrap();
}

#[test]
fn startup_clears_interrupts_left_pending() {
    let backend = fake_edu("edu-stale");
    backend
        .bar(0)
        .unwrap()
        .write32(0x60, InterruptStatus::DMA.bits())
        .unwrap();
    assert_eq!(backend.model().interrupt_status(), 0x100);
    let mut edu = Edu::new(backend, Completion::Interrupt).unwrap();
    assert_eq!(model(&edu).interrupt_status(), 0);
    assert_eq!(edu.factorial(3).unwrap(), 6);
}

#[test]
fn dma_round_trips_at_several_sizes_and_offsets() {
    for completion in [Completion::Poll, Completion::Interrupt] {
        let mut edu = edu(completion);
        let cases = [
            (0, 1),
            (0, 100),
            (1, 7),
            (100, 1000),
            (4094, 1),
            (2047, 2048),
            (0, DMA_USABLE_SIZE),
        ];
        for (seed, &(offset, len)) in cases.iter().enumerate() {
            let data = pattern(len, seed as u8);
            edu.write_to_device(offset, &data).unwrap();
            assert_eq!(
                model(&edu).device_buffer()[offset..offset + len],
                data[..],
                "{completion:?}: device holds the data at {offset}+{len}"
            );
            assert_eq!(
                edu.read_from_device(offset, len).unwrap(),
                data,
                "{completion:?}: read back {offset}+{len}"
            );
            assert_eq!(model(&edu).interrupt_status(), 0, "{completion:?}");
        }
        assert_eq!(model(&edu).dmas_started(), 2 * cases.len() as u32);
        assert!(!model(&edu).aborted());
        assert!(edu.backend().dma_faults().is_empty());
    }
}

#[test]
fn reading_from_the_device_returns_its_data_not_the_host_buffer() {
    let mut edu = edu(Completion::Interrupt);
    edu.write_to_device(0, &pattern(64, 9)).unwrap();
    let fresh = pattern(64, 77);
    model(&edu).fill_device_buffer(0, &fresh);
    assert_eq!(edu.read_from_device(0, 64).unwrap(), fresh);
}

#[test]
fn dma_ranges_outside_the_device_buffer_are_refused_before_touching_it() {
    let mut edu = edu(Completion::Interrupt);
    let cases = [
        // Reaching the buffer's last byte: QEMU 7.2 aborts (its off-by-one).
        (4095, 1),
        (0, DMA_BUFFER_SIZE),
        (2048, 2048),
        // Past the end.
        (DMA_BUFFER_SIZE, 1),
        (4000, 200),
        (0, DMA_BUFFER_SIZE + 1),
        (usize::MAX, 2),
        (usize::MAX, 0),
    ];
    for (offset, len) in cases {
        let error = edu.read_from_device(offset, len).unwrap_err();
        assert!(matches!(error, Error::OutOfRange { .. }), "{error}");
        assert_eq!(error.kind(), ErrorKind::InvalidInput);
        if len <= 2 * DMA_BUFFER_SIZE {
            let error = edu.write_to_device(offset, &vec![0xaa; len]).unwrap_err();
            assert!(matches!(error, Error::OutOfRange { .. }), "{error}");
        }
        let error = edu
            .dma_raw(Direction::FromDevice, edu.dma_buffer_iova(), offset, len)
            .unwrap_err();
        assert!(matches!(error, Error::OutOfRange { .. }), "{error}");
    }
    assert_eq!(model(&edu).dmas_started(), 0);
    assert!(!model(&edu).aborted());
    // The device is still fine.
    edu.write_to_device(0, b"ok").unwrap();
}

#[test]
fn the_model_aborts_like_qemu_on_an_out_of_range_dma() {
    let backend = fake_edu("edu-abort");
    backend.set_bus_master(true).unwrap();
    let bar = backend.bar(0).unwrap();
    bar.write::<u64>(0x80, 0x10_0000).unwrap();
    bar.write::<u64>(0x88, 0x4_0f00).unwrap();
    bar.write::<u64>(0x90, 0x200).unwrap();
    bar.write::<u64>(0x98, 1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !backend.model().aborted() {
        assert!(Instant::now() < deadline, "model did not abort");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        bar.read32(0).unwrap(),
        u32::MAX,
        "a dead device reads all ones"
    );
    assert_eq!(bar.read::<u64>(0x98).unwrap(), u64::MAX);
    let error = Edu::new(backend, Completion::Poll)
        .unwrap()
        .identification()
        .unwrap_err();
    assert!(matches!(error, Error::BadIdentification { .. }), "{error}");
}

/// Runs one transfer on a bare model (no driver) and says whether it aborted, as QEMU 7.2
/// would have.
fn model_aborts_on(device_address: u64, count: u64, to_ram: bool) -> bool {
    let backend = fake_edu("edu-range");
    backend.model().set_dma_delay(Duration::ZERO);
    backend.set_bus_master(true).unwrap();
    let host = backend.dma_alloc(2 * DMA_BUFFER_SIZE).unwrap();
    let bar = backend.bar(0).unwrap();
    let (source, destination) = if to_ram {
        (device_address, host.iova())
    } else {
        (host.iova(), device_address)
    };
    bar.write::<u64>(0x80, source).unwrap();
    bar.write::<u64>(0x88, destination).unwrap();
    bar.write::<u64>(0x90, count).unwrap();
    bar.write::<u64>(0x98, if to_ram { 3 } else { 1 }).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if backend.model().aborted() {
            return true;
        }
        if bar.read::<u64>(0x98).unwrap() & 1 == 0 {
            return false;
        }
        assert!(
            Instant::now() < deadline,
            "transfer neither ran nor aborted"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn the_model_checks_ranges_like_qemu_7_2() {
    for to_ram in [false, true] {
        assert!(!model_aborts_on(0x4_0000, 1, to_ram));
        assert!(!model_aborts_on(0x4_0000, 4095, to_ram));
        assert!(!model_aborts_on(0x4_0ffe, 1, to_ram));
        // Off by one in QEMU 7.2: a transfer may not reach the last byte.
        assert!(model_aborts_on(0x4_0000, 4096, to_ram));
        assert!(model_aborts_on(0x4_0fff, 1, to_ram));
        assert!(model_aborts_on(0x4_0000, 0, to_ram), "empty transfer");
        assert!(
            model_aborts_on(0x3_ffff, 2, to_ram),
            "starts below the buffer"
        );
        assert!(model_aborts_on(0x4_0f00, u64::MAX, to_ram), "wraps around");
    }
}

#[test]
fn a_lost_dma_interrupt_is_an_error() {
    let mut edu = edu(Completion::Interrupt);
    edu.set_timeout(Duration::from_millis(200));
    model(&edu).drop_next_interrupt();
    let error = edu.write_to_device(0, b"data").unwrap_err();
    assert!(
        matches!(
            error,
            Error::LostInterrupt {
                operation: "DMA transfer",
                interrupt_status: 0x100,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(edu.read_from_device(0, 4).unwrap(), b"data");
}

#[test]
fn a_slow_dma_times_out_and_the_next_waits_for_it() {
    for completion in [Completion::Poll, Completion::Interrupt] {
        let mut edu = edu(completion);
        edu.set_timeout(Duration::from_millis(30));
        model(&edu).set_dma_delay(Duration::from_millis(300));
        let error = edu.write_to_device(0, &pattern(32, 1)).unwrap_err();
        match &error {
            Error::Timeout {
                operation: "DMA transfer",
                register: "DMA command",
                offset: 0x98,
                last,
                ..
            } => assert_eq!(last & 1, 1, "start bit still set"),
            other => panic!("{completion:?}: unexpected error {other}"),
        }
        // The next transfer must not reprogram the engine while it runs.
        edu.set_timeout(Duration::from_secs(5));
        model(&edu).set_dma_delay(Duration::from_millis(1));
        let data = pattern(16, 2);
        edu.write_to_device(64, &data).unwrap();
        assert_eq!(model(&edu).ignored_writes(), 0, "{completion:?}");
        assert_eq!(edu.read_from_device(64, 16).unwrap(), data);
        assert_eq!(
            model(&edu).device_buffer()[..32],
            pattern(32, 1)[..],
            "{completion:?}: the slow transfer finished with its own data"
        );
    }
}

#[test]
fn dma_from_an_unmapped_iova_faults_and_reaches_no_host_memory() {
    let mut edu = edu(Completion::Interrupt);
    let device_data = pattern(512, 5);
    edu.write_to_device(0, &device_data).unwrap();

    // A host buffer the device was never pointed at, and an IOVA nothing is mapped at.
    let bystander = edu.backend().dma_alloc(4096).unwrap();
    bystander.fill(0xaa);
    let unmapped = 0x0800_0000;
    assert!(unmapped >= bystander.iova() + 4096 || unmapped + 256 <= bystander.iova());

    edu.dma_raw(Direction::FromDevice, unmapped, 0, 256)
        .unwrap();
    assert_eq!(edu.backend().dma_faults(), vec![(unmapped, 256)]);
    assert!(
        bystander.to_vec().iter().all(|&b| b == 0xaa),
        "host memory untouched"
    );

    edu.dma_raw(Direction::ToDevice, unmapped + 0x1000, 0, 256)
        .unwrap();
    assert_eq!(edu.backend().dma_faults().len(), 2);
    let device_buffer = model(&edu).device_buffer();
    assert!(
        device_buffer[..256].iter().all(|&b| b == 0),
        "a faulting read gives zeros (as in QEMU), not host memory"
    );
    assert_eq!(
        device_buffer[256..512],
        device_data[256..],
        "outside the transfer"
    );
    assert_eq!(model(&edu).interrupt_status(), 0);
}

#[test]
fn dma_raw_refuses_iovas_above_the_dma_mask() {
    let mut edu = edu(Completion::Poll);
    for (iova, len) in [(1 << 28, 1), ((1 << 28) - 8, 16), (u64::MAX, 2)] {
        let error = edu
            .dma_raw(Direction::FromDevice, iova, 0, len)
            .unwrap_err();
        assert!(matches!(error, Error::AboveDmaMask { .. }), "{error}");
    }
    assert_eq!(model(&edu).dmas_started(), 0);
}

#[test]
fn the_dma_buffer_is_mapped_below_the_28_bit_mask() {
    let edu = edu(Completion::Poll);
    assert!(edu.dma_buffer_iova() + DMA_BUFFER_SIZE as u64 <= 1 << 28);
    assert_eq!(edu.backend().live_mappings(), 1);
}

#[test]
fn a_device_with_other_ids_is_refused_naming_them() {
    let device = FakeDevice {
        vendor_id: 0x8086,
        device_id: 0x10d3,
        ..EDU_FAKE_DEVICE
    };
    let backend = FakeBackend::new("0000:00:04.0", device, EduModel::new);
    let error = Edu::new(backend, Completion::Poll).unwrap_err();
    assert!(
        matches!(
            error,
            Error::WrongDevice {
                vendor_id: 0x8086,
                device_id: 0x10d3,
                ..
            }
        ),
        "{error}"
    );
    let message = error.to_string();
    assert!(message.contains("0000:00:04.0 is 8086:10d3"), "{message}");
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
}

#[test]
fn errors_keep_their_kind_as_ring3_errors() {
    let cases = [
        Error::WrongDevice {
            address: "x".into(),
            vendor_id: 1,
            device_id: 2,
        },
        Error::OutOfRange {
            offset: 1,
            len: 4096,
        },
        Error::AboveDmaMask {
            iova: 1 << 28,
            len: 1,
        },
        Error::BadIdentification { value: 0 },
        Error::LivenessMismatch {
            wrote: 1,
            expected: !1,
            read: 1,
        },
        Error::Timeout {
            operation: "factorial",
            register: "status",
            offset: 0x20,
            last: 1,
            timeout: Duration::from_secs(1),
        },
        Error::LostInterrupt {
            operation: "factorial",
            register: "status",
            last: 0,
            interrupt_status: 1,
            timeout: Duration::from_secs(1),
        },
        Error::Misbehaved {
            what: "x".into(),
            register: "status",
            value: 1,
        },
        Error::Core(ring3::Error::InvalidArgument { what: "x".into() }),
    ];
    for error in cases {
        let kind = error.kind();
        let core = ring3::Error::from(error);
        assert_eq!(core.kind(), kind, "{core}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any device range either round-trips or is refused without the device starting a DMA.
    #[test]
    fn any_range_round_trips_or_is_refused(offset in 0usize..5000, len in 0usize..5000, seed: u8) {
        let backend = fake_edu("edu-prop");
        backend.model().set_dma_delay(Duration::ZERO);
        let mut edu = Edu::new(backend, Completion::Poll).unwrap();
        let data = pattern(len, seed);
        let fits = offset + len <= DMA_USABLE_SIZE;
        match edu.write_to_device(offset, &data) {
            Ok(()) => {
                prop_assert!(fits);
                prop_assert_eq!(edu.read_from_device(offset, len).unwrap(), data);
            }
            Err(Error::OutOfRange { .. }) => {
                prop_assert!(!fits);
                prop_assert_eq!(model(&edu).dmas_started(), 0);
            }
            Err(other) => prop_assert!(false, "unexpected error {}", other),
        }
        prop_assert!(!model(&edu).aborted());
    }
}
