//! The driver against the NVMe model on the fake backend.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ring3::fake::{FakeBackend, FakeDevice};
use ring3::{Backend, ErrorKind};

use crate::command::{admin, cns, SubmissionEntry};
use crate::completion::{CompletionEntry, Status as CompletionStatus, COMPLETION_ENTRY_SIZE};
use crate::model::{fake_nvme, NvmeModel, MODEL_NUMBER, NVME_FAKE_DEVICE};
use crate::registers::Status;
use crate::{Controller, ControllerOptions, Error, QueuePair};

type FakeController = Controller<FakeBackend<NvmeModel>>;

fn controller_with(options: ControllerOptions) -> FakeController {
    Controller::new(fake_nvme("nvme-test"), options).expect("controller comes up on the model")
}

fn controller() -> FakeController {
    controller_with(ControllerOptions::default())
}

fn model(nvme: &FakeController) -> &Arc<NvmeModel> {
    nvme.backend().model()
}

#[test]
fn bring_up_programs_the_admin_queue_and_configuration() {
    let nvme = controller();
    let cc = model(&nvme).configuration();
    assert!(cc.enabled());
    assert_eq!(cc.command_set(), 0, "NVM command set");
    assert_eq!(
        u32::from(cc.page_shift()),
        ring3::sys::page_size().trailing_zeros()
    );
    assert_eq!((cc.io_sq_entry_shift(), cc.io_cq_entry_shift()), (6, 4));
    assert_eq!(cc.arbitration(), 0, "round robin");
    let (aqa, asq, acq) = model(&nvme).admin_queue_registers();
    assert_eq!(aqa, 31 | 31 << 16);
    assert_eq!(asq, nvme.with_admin_queue(|q| q.sq_iova()));
    assert_eq!(acq, nvme.with_admin_queue(|q| q.cq_iova()));
    assert!(nvme.status().unwrap().contains(Status::RDY));
    assert_eq!(nvme.version().to_string(), "2.0.0");
}

#[test]
fn identify_controller_sends_cns_1_and_decodes_the_answer() {
    let nvme = controller();
    let info = nvme.identify_controller().unwrap();
    assert_eq!(info.model, MODEL_NUMBER);
    assert_eq!(info.serial, "RING3FAKE0001");
    assert_eq!(info.firmware, "1.0");
    assert_eq!(info.vendor_id, 0x1b36);
    assert_eq!(info.max_transfer_bytes, Some(128 * 4096));
    assert_eq!(info.namespace_count, 2);

    // Bring-up: Set Features (queues), Identify Controller, the active namespace list and
    // each namespace (no Doorbell Buffer Config: shadow doorbells are opt-in); then the
    // Identify asked for here.
    let commands = model(&nvme).commands();
    let opcodes: Vec<u8> = commands.iter().map(|c| c.opcode()).collect();
    assert_eq!(opcodes, [admin::SET_FEATURES, 6, 6, 6, 6, 6]);
    let identifies: Vec<_> = commands.iter().filter(|c| c.opcode() == 6).collect();
    let cns_values: Vec<u32> = identifies.iter().map(|c| c.dword(10)).collect();
    assert_eq!(cns_values, [1, 2, 0, 0, 1]);
    let identify = commands[5];
    assert_eq!(identify.opcode(), admin::IDENTIFY);
    assert_eq!(identify.dword(10), u32::from(cns::CONTROLLER));
    assert_eq!(identify.namespace_id(), 0);
    assert_eq!(identify.prp1() % 4096, 0, "PRP1 is page-aligned");
    assert_eq!(identify.prp2(), 0);
    assert_eq!(nvme.with_admin_queue(|q| q.in_flight()), 0);
}

#[test]
fn never_ready_times_out_naming_csts() {
    let backend = fake_nvme("nvme-test");
    backend.model().set_never_ready(true);
    let started = Instant::now();
    let error = Controller::new(backend, ControllerOptions::default()).unwrap_err();
    assert!(
        matches!(
            error,
            Error::Timeout {
                register: "CSTS",
                last: 0,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("CSTS"), "{error}");
    assert_eq!(error.kind(), ErrorKind::Device);
    // CAP.TO = 1: 500 ms, not the default command timeout.
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn fatal_status_on_enable_is_an_error() {
    let backend = fake_nvme("nvme-test");
    backend.model().set_fatal_on_enable(true);
    let error = Controller::new(backend, ControllerOptions::default()).unwrap_err();
    assert!(
        matches!(error, Error::ControllerFatal { csts, .. } if csts & 2 != 0),
        "{error}"
    );
    assert!(error.to_string().contains("CSTS.CFS"), "{error}");
}

#[test]
fn a_device_that_is_not_nvme_is_refused() {
    let device = FakeDevice {
        class_code: 0x01_06_01,
        ..NVME_FAKE_DEVICE
    };
    let backend = FakeBackend::new("sata", device, NvmeModel::new);
    let error = Controller::new(backend, ControllerOptions::default()).unwrap_err();
    assert!(
        matches!(
            error,
            Error::NotNvme {
                class_code: 0x01_06_01,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
}

#[test]
fn bogus_command_id_is_an_error_and_breaks_the_queue() {
    let nvme = controller();
    model(&nvme).set_bogus_command_id(77);
    let error = nvme.identify_controller().unwrap_err();
    assert!(
        matches!(error, Error::Misbehaved { value: 77, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("command ID 77"), "{error}");
    assert!(error.restart_may_help());
    // The rings could not be trusted any more: the controller was reset and works again.
    assert_eq!(nvme.resets(), 1);
    assert!(!nvme.with_admin_queue(|q| q.is_broken()));
    assert_eq!(nvme.identify_controller().unwrap().model, MODEL_NUMBER);
}

#[test]
fn sq_head_outside_the_queue_is_an_error() {
    let nvme = controller();
    model(&nvme).set_bogus_sq_head(40);
    let error = nvme.identify_controller().unwrap_err();
    assert!(
        matches!(error, Error::Misbehaved { value: 40, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("SQ head 40"), "{error}");
}

#[test]
fn sq_head_past_the_tail_is_an_error() {
    let nvme = controller();
    // After bring-up's five commands and this one the tail is 6: head 20 is inside the
    // ring of 32 but was never submitted.
    model(&nvme).set_bogus_sq_head(20);
    let error = nvme.identify_controller().unwrap_err();
    assert!(
        matches!(error, Error::Misbehaved { value: 20, .. }),
        "{error}"
    );
}

#[test]
fn unknown_opcode_fails_with_a_readable_status() {
    let nvme = controller();
    let error = nvme.admin_command(SubmissionEntry::new(0x7f)).unwrap_err();
    match &error {
        Error::CommandFailed {
            opcode: 0x7f,
            status,
        } => {
            assert_eq!(*status, CompletionStatus::generic(0x01));
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(
        error.to_string().contains("invalid command opcode"),
        "{error}"
    );
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
    // The queue is still fine.
    nvme.identify_controller().unwrap();
}

#[test]
fn identify_data_the_driver_cannot_use_is_an_error() {
    let nvme = controller();
    model(&nvme).set_sqes(0x55);
    let error = nvme.identify_controller().unwrap_err();
    assert!(error.to_string().contains("SQES"), "{error}");
    model(&nvme).set_sqes(0x66);
    model(&nvme).set_namespace_count(u32::MAX);
    assert!(nvme.identify_controller().is_err());
}

#[test]
fn a_command_that_never_completes_times_out() {
    let nvme = controller_with(ControllerOptions {
        command_timeout: Duration::from_millis(50),
        ..ControllerOptions::default()
    });
    model(&nvme).set_ignore_doorbells(true);
    let error = nvme.identify_controller().unwrap_err();
    assert!(
        matches!(
            error,
            Error::CommandTimeout {
                queue_id: 0,
                opcode: admin::IDENTIFY,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn admin_queue_wraps_over_several_laps_with_phase_flips() {
    let nvme = controller_with(ControllerOptions {
        admin_queue_entries: 4,
        ..ControllerOptions::default()
    });
    // Bring-up used five slots already; go on from a fresh lap.
    let laps_before = nvme.with_admin_queue(|q| q.completion_laps());
    let posted_before = model(&nvme).completions_posted();
    for _ in 0..3 {
        nvme.identify_controller().unwrap();
    }
    let laps_before = laps_before + 1;
    assert_eq!(nvme.with_admin_queue(|q| q.completion_laps()), laps_before);
    let laps = 5;
    for i in 0..4 * laps {
        if i % 3 == 2 {
            // Failures consume slots like successes.
            assert!(nvme.admin_command(SubmissionEntry::new(0x7f)).is_err());
        } else {
            assert_eq!(nvme.identify_controller().unwrap().model, MODEL_NUMBER);
        }
    }
    let laps = laps_before + laps;
    assert_eq!(nvme.with_admin_queue(|q| q.completion_laps()), laps);
    assert!(
        !nvme.with_admin_queue(|q| q.phase()),
        "an odd number of flips: expecting 0"
    );
    assert_eq!(model(&nvme).phase_flips(), laps);
    assert_eq!(model(&nvme).completions_posted(), posted_before + 3 + 4 * 5);
    for _ in 0..4 {
        nvme.identify_controller().unwrap();
    }
    assert_eq!(nvme.with_admin_queue(|q| q.completion_laps()), laps + 1);
    assert!(
        nvme.with_admin_queue(|q| q.phase()),
        "one more flip: back to 1"
    );
}

#[test]
fn dropping_the_controller_disables_it_and_frees_its_memory() {
    let backend = fake_nvme("nvme-test");
    let model = Arc::clone(backend.model());
    let nvme = Controller::new(backend, ControllerOptions::default()).unwrap();
    nvme.identify_controller().unwrap();
    drop(nvme);
    assert!(!model.configuration().enabled());
}

/// A queue pair on a model that was never enabled, so nothing answers but the test.
fn lone_queue(entries: u16) -> (FakeBackend<NvmeModel>, QueuePair) {
    let backend = fake_nvme("nvme-queue");
    backend.set_bus_master(true).unwrap();
    let sq = backend.dma_alloc(usize::from(entries) * 64).unwrap();
    let cq = backend.dma_alloc(usize::from(entries) * 16).unwrap();
    let bar = backend.bar(0).unwrap();
    let queue = QueuePair::new(1, entries, sq, cq, bar, 0).unwrap();
    (backend, queue)
}

/// Posts a completion into `queue`'s CQ slot as the device would.
fn post(backend: &FakeBackend<NvmeModel>, queue: &QueuePair, slot: u16, entry: CompletionEntry) {
    let iova = queue.cq_iova() + u64::from(slot) * COMPLETION_ENTRY_SIZE as u64;
    backend.model().dma_write(iova, &entry.to_bytes()).unwrap();
}

fn completion(command_id: u16, sq_head: u16) -> CompletionEntry {
    CompletionEntry {
        result: 0,
        dword1: 0,
        sq_head,
        sq_id: 1,
        command_id,
        phase: true,
        status: CompletionStatus::SUCCESS,
    }
}

#[test]
fn a_full_submission_queue_is_refused() {
    let (_backend, mut queue) = lone_queue(4);
    for expected in 0..3 {
        assert_eq!(queue.submit(SubmissionEntry::new(0x02)).unwrap(), expected);
    }
    let error = queue.submit(SubmissionEntry::new(0x02)).unwrap_err();
    assert!(
        matches!(
            error,
            Error::QueueFull {
                queue_id: 1,
                entries: 4
            }
        ),
        "{error}"
    );
    assert_eq!(error.kind(), ErrorKind::Busy);
}

#[test]
fn sq_head_moving_backwards_is_an_error() {
    let (backend, mut queue) = lone_queue(8);
    queue.submit(SubmissionEntry::new(0x02)).unwrap();
    queue.submit(SubmissionEntry::new(0x02)).unwrap();
    assert_eq!(queue.poll().unwrap(), None, "nothing posted yet");
    post(&backend, &queue, 0, completion(0, 2));
    assert_eq!(queue.poll().unwrap().map(|c| c.command_id), Some(0));
    post(&backend, &queue, 1, completion(1, 1));
    let error = queue.poll().unwrap_err();
    assert!(error.to_string().contains("SQ head 1"), "{error}");
    assert!(queue.is_broken());
}

#[test]
fn completions_for_another_queue_or_a_finished_command_are_errors() {
    let (backend, mut queue) = lone_queue(8);
    queue.submit(SubmissionEntry::new(0x02)).unwrap();
    post(
        &backend,
        &queue,
        0,
        CompletionEntry {
            sq_id: 3,
            ..completion(0, 1)
        },
    );
    assert!(queue
        .poll()
        .unwrap_err()
        .to_string()
        .contains("submission queue 3"));

    let (backend, mut queue) = lone_queue(8);
    queue.submit(SubmissionEntry::new(0x02)).unwrap();
    post(&backend, &queue, 0, completion(0, 1));
    queue.poll().unwrap();
    // The same command completed twice.
    post(&backend, &queue, 1, completion(0, 1));
    assert!(matches!(
        queue.poll(),
        Err(Error::Misbehaved { value: 0, .. })
    ));
}

#[test]
fn a_stale_phase_is_not_a_completion() {
    let (backend, mut queue) = lone_queue(4);
    queue.submit(SubmissionEntry::new(0x02)).unwrap();
    post(
        &backend,
        &queue,
        0,
        CompletionEntry {
            phase: false,
            ..completion(0, 1)
        },
    );
    assert_eq!(queue.poll().unwrap(), None);
    post(&backend, &queue, 0, completion(0, 1));
    assert!(queue.poll().unwrap().is_some());
}
