//! The I/O path against the NVMe model: queues, PRPs, commands, ownership, recovery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ring3::fake::FakeBackend;
use ring3::DmaBuffer;

use crate::completion::Status as CompletionStatus;
use crate::model::{fake_nvme, NvmeModel};
use crate::{Controller, ControllerOptions, Error, IoCompletion, IoQueue, IoQueueOptions};

type Fake = FakeBackend<NvmeModel>;

fn controller_with(options: ControllerOptions) -> Controller<Fake> {
    Controller::new(fake_nvme("nvme-io"), options).expect("controller comes up on the model")
}

/// A controller that uses the model's shadow doorbells.
fn shadow_controller() -> Controller<Fake> {
    controller_with(ControllerOptions {
        command_timeout: Duration::from_millis(300),
        shadow_doorbells: true,
        ..ControllerOptions::default()
    })
}

fn controller() -> Controller<Fake> {
    controller_with(ControllerOptions {
        command_timeout: Duration::from_millis(300),
        ..ControllerOptions::default()
    })
}

fn model(nvme: &Controller<Fake>) -> &Arc<NvmeModel> {
    nvme.backend().model()
}

fn queue(nvme: &Controller<Fake>) -> IoQueue<Fake> {
    nvme.io_queue(IoQueueOptions::default()).expect("I/O queue")
}

/// Bytes that differ per position and per seed.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(0x9e37_79b9) ^ seed.wrapping_mul(0x85eb_ca6b)) as u8 | 1)
        .collect()
}

fn filled(queue: &IoQueue<Fake>, data: &[u8]) -> DmaBuffer {
    let buffer = queue.alloc_buffer(data.len()).unwrap();
    buffer.write(0, data).unwrap();
    buffer
}

fn read_back(queue: &mut IoQueue<Fake>, nsid: u32, lba: u64, blocks: u32, len: usize) -> Vec<u8> {
    let buffer = queue.alloc_buffer(len).unwrap();
    let buffer = queue.read_sync(nsid, lba, blocks, buffer).unwrap();
    let mut data = vec![0; len];
    buffer.read(0, &mut data).unwrap();
    data
}

#[test]
fn bring_up_asks_for_queues_and_finds_the_namespaces() {
    let nvme = controller();
    assert!(nvme.max_io_queues() >= 1);
    let ids: Vec<u32> = nvme.namespaces().iter().map(|ns| ns.id).collect();
    assert_eq!(ids, vec![1, 2]);
    assert_eq!(nvme.namespace(1).unwrap().block_size(), 512);
    assert_eq!(nvme.namespace(2).unwrap().block_size(), 4096);
    let error = nvme.namespace(3).unwrap_err();
    assert!(
        matches!(error, Error::NoSuchNamespace { nsid: 3, .. }),
        "{error}"
    );
    assert_eq!(
        nvme.max_transfer_bytes(),
        128 * 4096,
        "MDTS 7 of 4 KiB pages"
    );
}

#[test]
fn writes_read_back_at_every_size_up_to_the_transfer_limit() {
    let nvme = controller();
    let mut queue = queue(&nvme);
    for nsid in [1, 2] {
        let block = nvme.namespace(nsid).unwrap().block_size() as usize;
        let max_blocks = nvme.max_transfer_bytes() / block;
        // One block; page-sized; just under, at and just over two pages (the PRP list
        // boundary); a list of many entries; the limit.
        for blocks in [
            1,
            4096 / block,
            8192 / block - 1,
            8192 / block,
            8192 / block + 1,
            37,
            max_blocks,
        ] {
            let blocks = blocks.max(1);
            let len = blocks * block;
            let lba = 3 + blocks as u64 * 2;
            let data = pattern(len, (nsid as u64) << 32 | blocks as u64);
            let buffer = filled(&queue, &data);
            queue.write_sync(nsid, lba, blocks as u32, buffer).unwrap();
            assert_eq!(
                model(&nvme).namespace_read(nsid, lba, blocks as u64),
                data,
                "ns {nsid}, {blocks} blocks on the medium"
            );
            assert_eq!(
                read_back(&mut queue, nsid, lba, blocks as u32, len),
                data,
                "ns {nsid}, {blocks} blocks read back"
            );
        }
    }
}

#[test]
fn transfers_beyond_the_buffer_or_the_limit_are_refused_with_the_buffer_back() {
    let nvme = controller();
    let mut queue = queue(&nvme);
    let posted = model(&nvme).completions_posted();
    let buffer = queue.alloc_buffer(4096).unwrap();
    let iova = buffer.iova();
    let rejected = queue.read(1, 0, 9, buffer, 7).unwrap_err();
    assert!(
        rejected
            .error
            .to_string()
            .contains("the buffer holds 4096 bytes"),
        "{}",
        rejected.error
    );
    assert_eq!(rejected.buffer.as_ref().map(DmaBuffer::iova), Some(iova));
    let big = queue.alloc_buffer(nvme.max_transfer_bytes() * 2).unwrap();
    let blocks = (nvme.max_transfer_bytes() / 512 + 1) as u32;
    assert!(queue.read(1, 0, blocks, big, 0).is_err());
    assert!(matches!(
        queue
            .read(9, 0, 1, rejected.buffer.unwrap(), 0)
            .unwrap_err()
            .error,
        Error::NoSuchNamespace { .. }
    ));
    queue.submit().unwrap();
    assert_eq!(
        model(&nvme).completions_posted(),
        posted,
        "nothing reached the device"
    );
}

#[test]
fn many_commands_wrap_the_rings_and_flip_the_phase() {
    let nvme = controller();
    let mut queue = nvme
        .io_queue(IoQueueOptions {
            entries: 4,
            interrupts: false,
        })
        .unwrap();
    assert_eq!(queue.depth(), 3);
    let mut out = Vec::new();
    let mut buffers: Vec<DmaBuffer> = (0..3).map(|_| queue.alloc_buffer(512).unwrap()).collect();
    for round in 0..20u64 {
        for (i, buffer) in buffers.drain(..).enumerate() {
            let lba = round * 3 + i as u64;
            buffer.write(0, &pattern(512, lba)).unwrap();
            queue.write(1, lba, 1, buffer, lba).unwrap();
        }
        assert!(!queue.has_room(), "3 of 4 slots is full");
        queue.drain(&mut out).unwrap();
        for completion in out.drain(..) {
            completion.result.unwrap();
            buffers.push(completion.buffer.unwrap());
        }
    }
    for lba in 0..60 {
        assert_eq!(
            model(&nvme).namespace_read(1, lba, 1),
            pattern(512, lba),
            "LBA {lba}"
        );
    }
    let stats = queue.stats();
    assert_eq!(
        (stats.submitted, stats.completed, stats.failed),
        (60, 60, 0)
    );
    assert!(
        stats.sq_doorbells <= 20,
        "one doorbell per batch, not per command: {stats:?}"
    );
}

#[test]
fn out_of_order_completions_return_each_buffer_to_its_command() {
    let nvme = controller();
    let mut queue = queue(&nvme);
    for lba in 0..16u64 {
        let data = pattern(4096, lba);
        queue.write_sync(2, lba, 1, filled(&queue, &data)).unwrap();
    }
    model(&nvme).set_reorder_completions(true);
    for tag in 0..16u64 {
        let buffer = queue.alloc_buffer(4096).unwrap();
        queue.read(2, 15 - tag, 1, buffer, tag).unwrap();
    }
    let mut out = Vec::new();
    queue.drain(&mut out).unwrap();
    let tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
    assert_eq!(tags.len(), 16);
    assert_ne!(
        tags,
        (0..16).collect::<Vec<_>>(),
        "the model answered out of order"
    );
    for completion in out {
        completion.result.unwrap();
        let mut data = vec![0; 4096];
        completion.buffer.unwrap().read(0, &mut data).unwrap();
        assert_eq!(
            data,
            pattern(4096, 15 - completion.tag),
            "tag {}",
            completion.tag
        );
    }
}

#[test]
fn the_device_error_for_an_lba_out_of_range_is_decoded() {
    let nvme = controller();
    let mut queue = queue(&nvme);
    let blocks = nvme.namespace(1).unwrap().blocks;
    let buffer = queue.alloc_buffer(4096).unwrap();
    let error = queue.read_sync(1, blocks - 1, 2, buffer).unwrap_err();
    let text = error.to_string();
    assert!(text.contains("LBA out of range"), "{text}");
    assert!(text.contains(&format!("LBA {}", blocks - 1)), "{text}");
    assert!(text.starts_with("read of namespace 1"), "{text}");
    assert_eq!(error.kind(), ring3::ErrorKind::InvalidInput);
    // The queue carries on.
    assert_eq!(read_back(&mut queue, 1, 0, 1, 512).len(), 512);
}

#[test]
fn a_bogus_status_is_an_error_of_that_command_only() {
    let nvme = controller();
    let mut queue = queue(&nvme);
    model(&nvme).set_bogus_status(CompletionStatus::generic(0x06));
    let error = queue
        .write_sync(1, 0, 1, filled(&queue, &[7; 512]))
        .unwrap_err();
    assert!(error.to_string().contains("internal error"), "{error}");
    assert_eq!(nvme.resets(), 0);
    queue
        .write_sync(1, 0, 1, filled(&queue, &[7; 512]))
        .unwrap();
}

fn failed_with_reset(out: &[IoCompletion], expected: &str) {
    assert!(!out.is_empty());
    for completion in out {
        match &completion.result {
            Err(Error::ControllerReset { reason }) => {
                assert!(reason.contains(expected), "{reason}")
            }
            other => panic!("expected a reset, got {other:?}"),
        }
        assert!(
            completion.buffer.is_some(),
            "the buffer comes back after a reset"
        );
    }
}

#[test]
fn a_bogus_command_id_resets_the_controller_and_the_queue_recovers() {
    let nvme = controller();
    let mut queue = queue(&nvme);
    model(&nvme).set_bogus_command_id(999);
    for tag in 0..3 {
        queue
            .read(1, tag, 1, queue.alloc_buffer(512).unwrap(), tag)
            .unwrap();
    }
    let mut out = Vec::new();
    queue.drain(&mut out).unwrap();
    assert_eq!(out.len(), 3);
    failed_with_reset(&out, "command ID 999");
    assert_eq!(nvme.resets(), 1);
    // Re-created on the controller: I/O works again.
    queue
        .write_sync(1, 5, 1, filled(&queue, &[9; 512]))
        .unwrap();
    assert_eq!(read_back(&mut queue, 1, 5, 1, 512), vec![9; 512]);
}

/// One read against a model that `misbehave` set up: the read fails with a reset whose
/// reason contains `expected`, and the queue works again afterwards.
fn one_read_resets_and_recovers(misbehave: impl FnOnce(&NvmeModel), expected: &str) {
    let nvme = controller();
    let mut queue = queue(&nvme);
    misbehave(model(&nvme));
    let mut out = Vec::new();
    queue
        .read(1, 0, 1, queue.alloc_buffer(512).unwrap(), 1)
        .unwrap();
    queue.drain(&mut out).unwrap();
    failed_with_reset(&out, expected);
    assert_eq!(nvme.resets(), 1);
    queue
        .write_sync(1, 0, 1, filled(&queue, &[1; 512]))
        .unwrap();
}

#[test]
fn a_bogus_sq_head_resets_the_controller() {
    one_read_resets_and_recovers(|model| model.set_bogus_sq_head(200), "SQ head 200");
}

#[test]
fn a_fatal_controller_status_resets_with_a_clear_error() {
    one_read_resets_and_recovers(|model| model.set_fatal_after(0), "CSTS.CFS");
}

#[test]
fn a_command_that_never_completes_times_out_and_resets() {
    let nvme = controller();
    let mut queue = queue(&nvme);
    model(&nvme).set_hold_completions(true);
    queue.write(1, 0, 1, filled(&queue, &[3; 512]), 42).unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    queue.wait(&mut out).unwrap();
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].tag, 42);
    failed_with_reset(&out, "did not complete within");
    assert_eq!(nvme.resets(), 1);
    model(&nvme).set_hold_completions(false);
    queue
        .write_sync(1, 0, 1, filled(&queue, &[4; 512]))
        .unwrap();
}

#[test]
fn a_reset_by_one_queue_is_seen_by_the_others() {
    let nvme = controller();
    let mut first = queue(&nvme);
    let mut second = queue(&nvme);
    model(&nvme).set_hold_completions(true);
    second
        .read(1, 0, 1, second.alloc_buffer(512).unwrap(), 5)
        .unwrap();
    second.submit().unwrap();
    first.write(1, 0, 1, filled(&first, &[1; 512]), 1).unwrap();
    let mut out = Vec::new();
    first.wait(&mut out).unwrap();
    failed_with_reset(&out, "did not complete");
    model(&nvme).set_hold_completions(false);
    out.clear();
    second.poll(&mut out).unwrap();
    assert_eq!(out.len(), 1, "the other queue's command failed too");
    failed_with_reset(&out, "did not complete");
    second
        .write_sync(1, 1, 1, filled(&second, &[2; 512]))
        .unwrap();
    first
        .write_sync(1, 2, 1, filled(&first, &[2; 512]))
        .unwrap();
}

#[test]
fn dropping_a_queue_with_io_in_flight_deletes_it_first() {
    let nvme = controller();
    let before = nvme.backend().live_mappings();
    let mut queue = queue(&nvme);
    let id = queue.id();
    for tag in 0..4 {
        queue
            .write(1, tag, 1, filled(&queue, &[tag as u8 + 1; 512]), tag)
            .unwrap();
    }
    queue.submit().unwrap();
    assert!(model(&nvme).queue_exists(id));
    drop(queue);
    assert!(
        !model(&nvme).queue_exists(id),
        "SQ and CQ deleted on the controller"
    );
    assert_eq!(
        nvme.backend().live_mappings(),
        before,
        "rings, lists and buffers unmapped"
    );
    assert!(nvme.backend().dma_faults().is_empty());
    // The queue ID is free again.
    let again = self::queue(&nvme);
    assert_eq!(again.id(), id);
}

#[test]
fn dropping_a_queue_whose_commands_never_complete_is_safe() {
    let nvme = controller();
    let mut queue = queue(&nvme);
    model(&nvme).set_hold_completions(true);
    for tag in 0..4 {
        queue
            .write(1, tag, 1, filled(&queue, &[5; 512]), tag)
            .unwrap();
    }
    queue.submit().unwrap();
    drop(queue);
    assert!(nvme.backend().dma_faults().is_empty());
    model(&nvme).set_hold_completions(false);
    // The controller still works for a new queue.
    let mut queue = self::queue(&nvme);
    queue
        .write_sync(1, 0, 1, filled(&queue, &[6; 512]))
        .unwrap();
}

#[test]
fn trim_reads_back_zeroes_and_write_zeroes_zeroes() {
    let nvme = controller();
    let mut queue = queue(&nvme);
    for lba in 0..32 {
        queue
            .write_sync(1, lba, 1, filled(&queue, &[0xee; 512]))
            .unwrap();
    }
    queue.deallocate(1, &[(2, 3), (10, 4)], 0).unwrap();
    queue.run_one().unwrap();
    queue.write_zeroes(1, 20, 2, 0).unwrap();
    queue.run_one().unwrap();
    queue.flush(1, 0).unwrap();
    queue.run_one().unwrap();
    for lba in 0..32u64 {
        let zero = (2..5).contains(&lba) || (10..14).contains(&lba) || (20..22).contains(&lba);
        let expected = if zero { vec![0; 512] } else { vec![0xee; 512] };
        assert_eq!(read_back(&mut queue, 1, lba, 1, 512), expected, "LBA {lba}");
    }
    assert!(model(&nvme).flushes() >= 1);
    assert!(queue.deallocate(1, &[], 0).is_err());
}

#[test]
fn interrupts_complete_commands_per_queue_vector() {
    let nvme = controller();
    let mut queue = nvme
        .io_queue(IoQueueOptions {
            entries: 16,
            interrupts: true,
        })
        .unwrap();
    let vector = queue.interrupt_vector().unwrap();
    assert!(vector >= 1, "vector 0 is the admin queue's");
    let data = pattern(4096, 77);
    queue.write_sync(2, 9, 1, filled(&queue, &data)).unwrap();
    assert_eq!(read_back(&mut queue, 2, 9, 1, 4096), data);
    assert!(model(&nvme).interrupts_raised(u32::from(vector)) >= 2);
    let second = nvme
        .io_queue(IoQueueOptions {
            entries: 16,
            interrupts: true,
        })
        .unwrap();
    assert_ne!(second.interrupt_vector(), Some(vector));
}

#[test]
fn queues_on_several_threads_work_at_once() {
    let nvme = controller();
    let queues = 4.min(nvme.max_io_queues());
    std::thread::scope(|scope| {
        for q in 0..queues {
            let nvme = &nvme;
            scope.spawn(move || {
                let mut queue = self::queue(nvme);
                let base = u64::from(q) * 1000;
                let mut out = Vec::new();
                for i in 0..32u64 {
                    let lba = base + i * 8;
                    queue
                        .write(1, lba, 8, filled(&queue, &pattern(4096, lba)), lba)
                        .unwrap();
                }
                queue.drain(&mut out).unwrap();
                assert!(out.iter().all(|c| c.result.is_ok()));
                for i in 0..32u64 {
                    let lba = base + i * 8;
                    assert_eq!(read_back(&mut queue, 1, lba, 8, 4096), pattern(4096, lba));
                }
            });
        }
    });
}

#[test]
fn queue_limits_are_enforced() {
    let nvme = controller();
    let mqes = nvme.capabilities().max_queue_entries();
    let too_many = u16::try_from(mqes + 1).unwrap_or(u16::MAX);
    let error = nvme
        .io_queue(IoQueueOptions {
            entries: too_many,
            interrupts: false,
        })
        .unwrap_err();
    assert!(error.to_string().contains("CAP.MQES"), "{error}");
    let all: Vec<_> = (0..nvme.max_io_queues()).map(|_| queue(&nvme)).collect();
    let error = nvme.io_queue(IoQueueOptions::default()).unwrap_err();
    assert!(matches!(error, Error::NoQueueLeft { .. }), "{error}");
    drop(all);
    queue(&nvme);
}

#[test]
fn smart_and_error_logs_are_read() {
    let nvme = controller();
    let mut queue = queue(&nvme);
    queue
        .write_sync(1, 0, 8, filled(&queue, &[1; 4096]))
        .unwrap();
    let _ = queue.read_sync(1, u64::MAX / 1024, 1, queue.alloc_buffer(512).unwrap());
    let smart = nvme.smart_log().unwrap();
    assert!(smart.host_writes >= 1, "{smart:?}");
    assert!(smart.temperature_celsius() > -273);
    let errors = nvme.error_log().unwrap();
    assert!(!errors.is_empty(), "the failed read is logged");
    assert_eq!(errors[0].status.code, 0x80);
}

// --- shadow doorbells (Doorbell Buffer Config) ---

/// How many Doorbell Buffer Config commands the model fetched.
fn doorbell_buffer_configs_seen(nvme: &Controller<Fake>) -> usize {
    model(nvme)
        .commands()
        .iter()
        .filter(|c| c.opcode() == crate::command::admin::DOORBELL_BUFFER_CONFIG)
        .count()
}

#[test]
fn shadow_doorbells_are_configured_at_bring_up_and_io_verifies() {
    let nvme = shadow_controller();
    assert_eq!(doorbell_buffer_configs_seen(&nvme), 1);
    assert!(model(&nvme).shadow_doorbell_pages().is_some());
    assert!(nvme.with_admin_queue(|q| q.uses_shadow_doorbells()));
    // A register read lets the model look at every shadow: nothing may be pending.
    let fetched = model(&nvme).commands().len();
    nvme.status().unwrap();
    assert_eq!(
        model(&nvme).commands().len(),
        fetched,
        "no stray admin commands"
    );

    let mut queue = queue(&nvme);
    assert!(queue.uses_shadow_doorbells());
    for nsid in [1, 2] {
        let block = nvme.namespace(nsid).unwrap().block_size() as usize;
        for blocks in [1, 8192 / block + 1, 37] {
            let len = blocks * block;
            let lba = 11 + blocks as u64;
            let data = pattern(len, (nsid as u64) << 40 | blocks as u64);
            queue
                .write_sync(nsid, lba, blocks as u32, filled(&queue, &data))
                .unwrap();
            assert_eq!(model(&nvme).namespace_read(nsid, lba, blocks as u64), data);
            assert_eq!(
                read_back(&mut queue, nsid, lba, blocks as u32, len),
                data,
                "ns {nsid}, {blocks} blocks"
            );
        }
    }
    // A batch wraps the ring a few times with shadows too.
    let mut out = Vec::new();
    for round in 0..4u64 {
        for i in 0..100u64 {
            let lba = 1000 + round * 100 + i;
            let buffer = filled(&queue, &pattern(512, lba));
            queue.write(1, lba, 1, buffer, lba).unwrap();
        }
        queue.drain(&mut out).unwrap();
    }
    assert_eq!(out.len(), 400);
    for completion in out {
        completion.result.unwrap();
        assert_eq!(
            model(&nvme).namespace_read(1, completion.tag, 1),
            pattern(512, completion.tag)
        );
    }
    assert_eq!(
        queue.stats().kicks,
        0,
        "the model reads every shadow update"
    );
}

#[test]
fn without_shadow_doorbells_offered_none_are_configured() {
    let backend = fake_nvme("nvme-io");
    backend.model().set_shadow_doorbells(false);
    let nvme = Controller::new(
        backend,
        ControllerOptions {
            command_timeout: Duration::from_millis(300),
            ..ControllerOptions::default()
        },
    )
    .unwrap();
    assert_eq!(doorbell_buffer_configs_seen(&nvme), 0);
    let mut queue = queue(&nvme);
    assert!(!queue.uses_shadow_doorbells());
    queue
        .write_sync(1, 0, 1, filled(&queue, &[5; 512]))
        .unwrap();
    assert_eq!(read_back(&mut queue, 1, 0, 1, 512), vec![5; 512]);
    let (sq, cq) = model(&nvme).mmio_doorbell_writes(queue.id());
    // Every submission by MMIO; completion heads of a polled queue only once its larger
    // completion ring's slack is used up, which two commands do not reach.
    assert_eq!((sq, cq), (2, 0));
    for lba in 0..300 {
        queue
            .write_sync(1, lba, 1, filled(&queue, &[6; 512]))
            .unwrap();
    }
    let (sq, cq) = model(&nvme).mmio_doorbell_writes(queue.id());
    assert_eq!(sq, 302);
    assert!(
        (1..=4).contains(&cq),
        "{cq} completion doorbells for 302 completions (slack 256)"
    );
}

#[test]
fn commands_submitted_while_the_device_is_busy_skip_most_mmio_doorbells() {
    let nvme = shadow_controller();
    let mut queue = queue(&nvme);
    queue
        .write_sync(1, 0, 1, filled(&queue, &[1; 512]))
        .unwrap();
    let id = queue.id();
    let (sq_before, _) = model(&nvme).mmio_doorbell_writes(id);

    // The device is busy elsewhere: it neither fetches nor moves its event index, so after
    // the first doorbell the driver only updates the shadow.
    model(&nvme).set_ignore_doorbells(true);
    const COMMANDS: u64 = 16;
    for lba in 0..COMMANDS {
        let buffer = filled(&queue, &pattern(512, 100 + lba));
        queue.write(1, 100 + lba, 1, buffer, lba).unwrap();
        queue.submit().unwrap();
    }
    let (sq_busy, _) = model(&nvme).mmio_doorbell_writes(id);
    assert!(
        sq_busy - sq_before < COMMANDS,
        "{} MMIO SQ doorbells for {COMMANDS} commands",
        sq_busy - sq_before
    );
    assert_eq!(sq_busy - sq_before, 1, "only the first one");
    assert_eq!(model(&nvme).reads_and_writes().1, 1, "nothing fetched yet");

    // The device gets to the queue: it finds every command through the shadow tail.
    model(&nvme).set_ignore_doorbells(false);
    model(&nvme).process_shadow_doorbells();
    let mut out = Vec::new();
    queue.drain(&mut out).unwrap();
    assert_eq!(out.len(), COMMANDS as usize);
    for completion in out {
        completion.result.unwrap();
        let lba = 100 + completion.tag;
        assert_eq!(model(&nvme).namespace_read(1, lba, 1), pattern(512, lba));
    }
    assert_eq!(
        model(&nvme).mmio_doorbell_writes(id).0,
        sq_busy,
        "no MMIO SQ doorbell was needed to finish them"
    );
    assert_eq!(queue.stats().kicks, 0);
}

#[test]
fn a_device_that_ignores_the_shadows_is_kicked_by_mmio() {
    let nvme = shadow_controller();
    model(&nvme).set_ignore_shadow(true);
    let mut queue = queue(&nvme);
    let started = Instant::now();
    let mut out = Vec::new();
    for lba in 0..8u64 {
        let data = pattern(4096, lba);
        queue.write(2, lba, 1, filled(&queue, &data), lba).unwrap();
        // Poll until it completes: only the kick after a run of empty polls gets an
        // update the device missed to it.
        while out.is_empty() {
            queue.poll(&mut out).unwrap();
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "write {lba} never completed"
            );
        }
        out.pop().unwrap().result.unwrap();
        assert_eq!(model(&nvme).namespace_read(2, lba, 1), data);
    }
    // The synchronous calls get there too, well within the command timeout.
    for lba in 8..12u64 {
        let data = pattern(4096, lba);
        queue.write_sync(2, lba, 1, filled(&queue, &data)).unwrap();
        assert_eq!(read_back(&mut queue, 2, lba, 1, 4096), data);
    }
    let stats = queue.stats();
    assert!(stats.kicks > 0, "{stats:?}");
    assert_eq!((stats.failed, stats.resets), (0, 0), "{stats:?}");
    assert_eq!(nvme.resets(), 0);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn after_a_reset_shadow_doorbells_are_configured_again() {
    let nvme = shadow_controller();
    let mut queue = queue(&nvme);
    let first_pages = model(&nvme).shadow_doorbell_pages();
    assert!(first_pages.is_some());
    model(&nvme).set_bogus_command_id(999);
    for tag in 0..3 {
        queue
            .read(1, tag, 1, queue.alloc_buffer(512).unwrap(), tag)
            .unwrap();
    }
    let mut out = Vec::new();
    queue.drain(&mut out).unwrap();
    failed_with_reset(&out, "command ID 999");
    assert_eq!(nvme.resets(), 1);
    assert_eq!(doorbell_buffer_configs_seen(&nvme), 2, "configured again");
    assert_eq!(model(&nvme).doorbell_buffer_configs(), 2);
    assert_eq!(model(&nvme).shadow_doorbell_pages(), first_pages);

    // A register read lets the model look at the shadows, the admin queue's included:
    // they must say what the doorbells said.
    let fetched = model(&nvme).commands().len();
    nvme.status().unwrap();
    assert_eq!(
        model(&nvme).commands().len(),
        fetched,
        "no stray admin commands"
    );

    let (sq_before, _) = model(&nvme).mmio_doorbell_writes(queue.id());
    for lba in 20..28u64 {
        let data = pattern(512, lba);
        queue.write_sync(1, lba, 1, filled(&queue, &data)).unwrap();
        assert_eq!(read_back(&mut queue, 1, lba, 1, 512), data);
    }
    assert!(queue.uses_shadow_doorbells());
    assert!(model(&nvme).mmio_doorbell_writes(queue.id()).0 > sq_before);
    assert_eq!(nvme.resets(), 1);
    nvme.identify_controller().unwrap();

    // A reset nobody recovers from at once: the admin queue's shadows are all the model
    // has to go on until the next admin command.
    nvme.reset("test").unwrap();
    assert_eq!(model(&nvme).doorbell_buffer_configs(), 3);
    let fetched = model(&nvme).commands().len();
    nvme.status().unwrap();
    assert_eq!(
        model(&nvme).commands().len(),
        fetched,
        "no stray admin commands"
    );
    nvme.identify_controller().unwrap();
    queue
        .write_sync(1, 30, 1, filled(&queue, &[3; 512]))
        .unwrap();
    assert_eq!(read_back(&mut queue, 1, 30, 1, 512), vec![3; 512]);
}
