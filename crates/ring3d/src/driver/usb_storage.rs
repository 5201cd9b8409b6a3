//! The USB mass storage driver process: the device's first logical unit served as one
//! ublk block device.
//!
//! The Bulk-Only Transport carries one command at a time, so one thread serves the
//! one ublk queue: it takes the kernel's requests in order, turns each into SCSI
//! READ/WRITE/SYNCHRONIZE CACHE commands (split to the device's transfer limit) and
//! answers the kernel. Each ublk tag has its own buffer, which is also where the kernel
//! copies the request's data: the only copies are the kernel's and usbfs's.
//!
//! A device that is unplugged fails the transfer in flight with "disconnected": the
//! driver then exits without answering the request it was serving, so that the kernel
//! hands it to the next driver once the device is back (ublk user recovery).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use ring3_ublk::{Op, Queue, Request};
use ring3_usb::ClaimedInterface;
use ring3_usb_storage::{MassStorage, StorageError};

use super::{ipc_failed, plan_request, Counters, Planned};
use crate::ipc::{Channel, Hello, NamespaceInfo, Setup, ToDriver, ToHost};

/// How long the thread sleeps in the ublk ring before going round its loop.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// How long one request may keep the thread from its loop before the heartbeats stop: a
/// command's timeouts plus a reset recovery, with room.
const STUCK: Duration = Duration::from_secs(40);

/// The ublk sector: request offsets and lengths are in 512-byte units.
const SECTOR_SHIFT: u32 = 9;

/// USB mass storage interfaces: class 08h, SCSI transparent command set (06h),
/// Bulk-Only Transport (50h).
const CLASS_MASS_STORAGE: u8 = 0x08;
const SUBCLASS_SCSI: u8 = 0x06;
const PROTOCOL_BULK_ONLY: u8 = 0x50;

pub(super) fn run(channel: &Channel, setup: &Setup, fds: Vec<OwnedFd>) -> Result<(), String> {
    let device = super::sandboxed_usb_device(setup, fds)?;
    let interface = device
        .find_interface(CLASS_MASS_STORAGE, SUBCLASS_SCSI, PROTOCOL_BULK_ONLY)
        .map_err(|e| format!("finding the mass storage interface: {e}"))?;
    // ring3d has detached any kernel driver it was allowed to; never force here.
    let claimed = device
        .claim(interface, false)
        .map_err(|e| format!("claiming interface {interface}: {e}"))?;
    let endpoints = claimed
        .bulk_endpoints()
        .map_err(|e| format!("interface {interface}: {e}"))?;
    let mut storage = MassStorage::new(claimed, endpoints, 0)
        .map_err(|e| format!("bringing the mass storage device up: {e}"))?;

    let block_size = storage.block_size();
    let blocks = storage.block_count();
    let block_shift = block_size.trailing_zeros();
    if !block_size.is_power_of_two() || !(SECTOR_SHIFT..=16).contains(&block_shift) {
        return Err(format!(
            "the device's block size {block_size} is not a power of two from 512 to 65536"
        ));
    }
    let max_io_bytes = (setup.max_io_bytes as usize)
        .min(storage.max_transfer_bytes())
        .max(block_size as usize);
    // Whole blocks only.
    let max_io_bytes = (max_io_bytes / block_size as usize * block_size as usize) as u32;
    let hello = Hello {
        pid: std::process::id(),
        namespaces: vec![NamespaceInfo {
            nsid: 1,
            block_size,
            blocks,
        }],
        queues: 1,
        max_queue_depth: setup.queue_depth.max(1),
        max_io_bytes,
        // A USB stick says nothing reliable about its cache: every flush becomes
        // SYNCHRONIZE CACHE.
        volatile_cache: true,
        discard: false,
        write_zeroes: false,
    };
    tracing::info!(
        vendor = %storage.inquiry().vendor,
        product = %storage.inquiry().product,
        block_size,
        blocks,
        max_io_bytes,
        "mass storage device up"
    );
    channel
        .send(&ToHost::Hello(hello), &[])
        .map_err(|e| ipc_failed("telling ring3d what the device has", e))?;

    let (message, mut cdevs) = channel
        .recv::<ToDriver>(Some(super::HOST_TIMEOUT))
        .map_err(|e| ipc_failed("waiting for the device to serve", e))?;
    let ToDriver::Serve { devices } = message else {
        return Err("ring3d sent something other than the device to serve".into());
    };
    let (Some(served), Some(cdev), 1, 1) = (
        devices.first().cloned(),
        cdevs.pop(),
        devices.len(),
        cdevs.len() + 1,
    ) else {
        return Err(format!(
            "ring3d sent {} devices with {} character devices; a mass storage driver serves one",
            devices.len(),
            cdevs.len()
        ));
    };
    if served.queues != 1 || served.max_io_bytes > max_io_bytes || served.depth == 0 {
        return Err(format!(
            "ublk device {} has {} queues of {} bytes; this driver has 1 of {max_io_bytes}",
            served.id, served.queues, served.max_io_bytes
        ));
    }

    let counters = Arc::new(Counters::default());
    let laps: Arc<Vec<AtomicU64>> = Arc::new(vec![AtomicU64::new(0)]);
    let failed = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let thread = {
        let counters = Arc::clone(&counters);
        let laps = Arc::clone(&laps);
        let failed = Arc::clone(&failed);
        let span = tracing::Span::current();
        let cdev = Arc::new(cdev);
        let geometry = Geometry {
            block_shift: block_shift as u8,
            blocks,
            max_io_bytes: served.max_io_bytes,
            depth: served.depth,
        };
        std::thread::Builder::new()
            .name("usb-storage".into())
            .spawn(move || {
                let _entered = span.enter();
                let result = serve(&mut storage, cdev, geometry, &counters, &laps[0], &ready_tx);
                if let Err(reason) = &result {
                    failed.store(true, Ordering::Release);
                    let _ = ready_tx.send(Err(reason.clone()));
                }
                result
            })
            .map_err(|e| format!("starting the serving thread: {e}"))?
    };
    match ready_rx.recv_timeout(super::HOST_TIMEOUT) {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => return Err(reason),
        Err(_) => return Err("the serving thread did not get ready".into()),
    }
    channel
        .send(&ToHost::Ready { id: served.id }, &[])
        .map_err(|e| ipc_failed("telling ring3d the queue is ready", e))?;
    tracing::info!(id = served.id, "serving");
    super::beat_while_serving(
        channel,
        setup,
        super::Serving {
            laps: &laps,
            threads: vec![thread],
            failures: &ready_rx,
            failed: &failed,
            counters: &counters,
            stuck_after: STUCK,
        },
    )?;
    tracing::info!("the ublk device stopped; exiting");
    Ok(())
}

/// The served device's shape.
#[derive(Clone, Copy)]
struct Geometry {
    block_shift: u8,
    blocks: u64,
    max_io_bytes: u32,
    depth: u16,
}

/// Serves the ublk queue until the kernel stops the device.
fn serve(
    storage: &mut MassStorage<ClaimedInterface>,
    cdev: Arc<OwnedFd>,
    geometry: Geometry,
    counters: &Counters,
    lap: &AtomicU64,
    ready: &mpsc::Sender<Result<(), String>>,
) -> Result<(), String> {
    let mut queue = Queue::new(cdev, 0, geometry.depth, geometry.max_io_bytes)
        .map_err(|e| format!("ublk queue: {e}"))?;
    let size = geometry.max_io_bytes as usize;
    // One buffer per tag; the kernel copies request data in and out of it.
    let mut buffers: Vec<Vec<u8>> = (0..geometry.depth).map(|_| vec![0u8; size]).collect();
    let addresses: Vec<*mut u8> = buffers.iter_mut().map(|b| b.as_mut_ptr()).collect();
    for (tag, &address) in (0..geometry.depth).zip(&addresses) {
        // SAFETY: the buffer is max_io_bytes long and lives in `buffers`, never resized,
        // until after the queue is dropped at the end of this function.
        unsafe { queue.fetch(tag, address) }.map_err(|e| format!("ublk queue: {e}"))?;
    }
    queue.submit().map_err(|e| format!("ublk queue: {e}"))?;
    let _ = ready.send(Ok(()));

    let mut requests: Vec<Request> = Vec::new();
    loop {
        lap.fetch_add(1, Ordering::Relaxed);
        let alive = queue
            .poll(&mut requests, Some(IDLE_WAIT))
            .map_err(|e| format!("ublk queue: {e}"))?;
        for request in requests.drain(..) {
            let tag = usize::from(request.tag);
            let Some(buffer) = buffers.get_mut(tag) else {
                return Err(format!("the kernel handed out tag {tag}, beyond the depth"));
            };
            lap.fetch_add(1, Ordering::Relaxed);
            let result = execute(storage, &request, geometry, buffer)?;
            let bytes = u64::from(request.sectors) << SECTOR_SHIFT;
            counters.count(request.op, bytes, result >= 0);
            // SAFETY: as for fetch: the tag's buffer stays in `buffers` until the queue
            // is dropped.
            unsafe { queue.complete(request.tag, result, addresses[tag]) }
                .map_err(|e| format!("completing tag {tag}: {e}"))?;
        }
        queue.submit().map_err(|e| format!("ublk queue: {e}"))?;
        if !alive {
            break;
        }
    }
    drop(queue);
    drop(buffers);
    Ok(())
}

/// Runs one request on the device: its result for the kernel (bytes or a negative
/// errno), or an error that ends the driver (the device is gone or beyond recovery),
/// leaving the request unanswered for the next driver.
fn execute(
    storage: &mut MassStorage<ClaimedInterface>,
    request: &Request,
    geometry: Geometry,
    buffer: &mut [u8],
) -> Result<i32, String> {
    let plan = plan_request(
        request,
        geometry.block_shift,
        geometry.blocks,
        geometry.max_io_bytes,
        true,
    );
    let bytes = (request.sectors << SECTOR_SHIFT) as usize;
    let done = match plan {
        Planned::Read { lba, .. } => buffer.get_mut(..bytes).map(|data| storage.read(lba, data)),
        Planned::Write { lba, .. } => buffer.get(..bytes).map(|data| storage.write(lba, data)),
        Planned::Flush => Some(storage.synchronize_cache()),
        Planned::Complete(result) => return Ok(result),
        Planned::Deallocate { .. } | Planned::WriteZeroes { .. } => return Ok(-libc::EOPNOTSUPP),
    };
    match done {
        None => Ok(-libc::EINVAL),
        Some(Ok(())) => Ok(match request.op {
            Op::Read | Op::Write => bytes as i32,
            _ => 0,
        }),
        Some(Err(error)) if fatal(&error) => Err(format!(
            "{} of {} sectors at sector {}: {error}",
            op_name(request.op),
            request.sectors,
            request.start_sector
        )),
        Some(Err(error)) => {
            tracing::warn!(
                op = op_name(request.op),
                sector = request.start_sector,
                sectors = request.sectors,
                %error,
                "I/O failed"
            );
            Ok(-libc::EIO)
        }
    }
}

/// Whether an error means the device is gone or no longer answers, so that only a new
/// driver (after ring3d has found the device again) can go on.
fn fatal(error: &StorageError) -> bool {
    error.is_disconnected() || error.needs_restart()
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Read => "read",
        Op::Write => "write",
        Op::Flush => "flush",
        Op::Discard => "discard",
        Op::WriteZeroes => "write zeroes",
        Op::Other(_) => "request",
    }
}
