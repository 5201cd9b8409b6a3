//! The NVMe driver process: each namespace served as a ublk block device.
//!
//! Queue thread `q` owns NVMe I/O queue pair `q` and ublk queue `q` of every served
//! device, so a request goes from the kernel's ublk ring to the NVMe submission ring and
//! back without a lock or a hand-off between threads. Each ublk tag has its own DMA
//! buffer, which is also the buffer the kernel copies the request's data into (writes)
//! or out of (reads): the data is copied once, by the kernel, and the device reaches it
//! by DMA through the IOMMU.
//!
//! While NVMe commands are in flight the thread polls both rings; when none are, it
//! sleeps in the ublk ring until the kernel hands it a request.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ring3::vfio::VfioBackend;
use ring3::DmaBuffer;
use ring3_nvme::{
    Controller, ControllerOptions, Error as NvmeError, IoCompletion, IoQueue, IoQueueOptions,
    Namespace,
};
use ring3_ublk::{Op, Queue, Request};

use super::{ipc_failed, Counters};
use crate::ipc::{Channel, Hello, NamespaceInfo, ServeDevice, Setup, ToDriver, ToHost};

/// How often a command failed by a controller reset is tried again before the request
/// fails with EIO.
const RESET_RETRIES: u8 = 3;

/// How long an idle queue thread sleeps in the ublk ring before looking around.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// How long a queue thread may go without a lap of its loop before the heartbeats stop
/// (an idle thread comes round every [`IDLE_WAIT`]).
const STUCK: Duration = Duration::from_millis(500);

/// How long a queue thread keeps polling after its last I/O before it sleeps.
const SPIN: Duration = Duration::from_micros(200);

/// The ublk sector: request offsets and lengths are in 512-byte units.
const SECTOR_SHIFT: u32 = 9;

pub(super) fn run(channel: &Channel, setup: &Setup, fds: Vec<OwnedFd>) -> Result<(), String> {
    let backend = super::sandboxed_device(setup, fds)?;
    let controller = Controller::new(
        backend,
        ControllerOptions {
            io_queues: setup.queues,
            ..ControllerOptions::default()
        },
    )
    .map_err(|e| format!("bringing the NVMe controller up: {e}"))?;
    let controller = Arc::new(controller);

    let namespaces: Vec<Namespace> = controller
        .namespaces()
        .iter()
        .filter(|ns| setup.namespaces.is_empty() || setup.namespaces.contains(&ns.id))
        .cloned()
        .collect();
    if let Some(missing) = setup
        .namespaces
        .iter()
        .find(|id| !namespaces.iter().any(|ns| ns.id == **id))
    {
        return Err(format!(
            "namespace {missing} is not active on the controller (active: {:?})",
            controller
                .namespaces()
                .iter()
                .map(|ns| ns.id)
                .collect::<Vec<_>>()
        ));
    }
    if namespaces.is_empty() {
        return Err("the controller has no active namespace to serve".into());
    }
    let info = controller.info();
    let queues = setup.queues.min(controller.max_io_queues()).max(1);
    let max_io_bytes = (setup.max_io_bytes as usize).min(controller.max_transfer_bytes());
    let max_queue_depth = controller
        .capabilities()
        .max_queue_entries()
        .min(u32::from(u16::MAX)) as u16;
    let hello = Hello {
        pid: std::process::id(),
        namespaces: namespaces
            .iter()
            .map(|ns| NamespaceInfo {
                nsid: ns.id,
                block_size: ns.block_size(),
                blocks: ns.blocks,
            })
            .collect(),
        queues,
        max_queue_depth,
        max_io_bytes: max_io_bytes as u32,
        volatile_cache: info.volatile_write_cache,
        discard: info.supports_deallocate(),
        write_zeroes: info.optional_commands & ONCS_WRITE_ZEROES != 0,
    };
    tracing::info!(
        namespaces = hello.namespaces.len(),
        queues,
        max_io_bytes,
        "controller up"
    );
    channel
        .send(&ToHost::Hello(hello.clone()), &[])
        .map_err(|e| ipc_failed("telling ring3d what the controller has", e))?;

    let (message, cdevs) = channel
        .recv::<ToDriver>(Some(super::HOST_TIMEOUT))
        .map_err(|e| ipc_failed("waiting for the devices to serve", e))?;
    let ToDriver::Serve { devices } = message else {
        return Err("ring3d sent something other than the devices to serve".into());
    };
    if cdevs.len() != devices.len() || devices.is_empty() {
        return Err(format!(
            "ring3d sent {} devices with {} character devices",
            devices.len(),
            cdevs.len()
        ));
    }
    let mut served = Vec::new();
    for (device, cdev) in devices.into_iter().zip(cdevs) {
        let namespace = namespaces
            .iter()
            .find(|ns| ns.id == device.nsid)
            .cloned()
            .ok_or_else(|| format!("ring3d asked for namespace {}, not served", device.nsid))?;
        if device.queues != queues || device.max_io_bytes as usize > max_io_bytes {
            return Err(format!(
                "ublk device {} has {} queues of {} bytes; this driver has {queues} of {max_io_bytes}",
                device.id, device.queues, device.max_io_bytes
            ));
        }
        served.push(Served {
            device,
            namespace,
            cdev: Arc::new(cdev),
        });
    }

    let counters = Arc::new(Counters::default());
    // One lap counter per queue thread: the heartbeat only goes out while every thread
    // still goes round its loop, so a thread stuck anywhere stops the heartbeats.
    let laps: Arc<Vec<AtomicU64>> = Arc::new((0..queues).map(|_| AtomicU64::new(0)).collect());
    let failed = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let mut threads = Vec::new();
    for queue_id in 0..queues {
        let controller = Arc::clone(&controller);
        let served = served.clone();
        let counters = Arc::clone(&counters);
        let laps = Arc::clone(&laps);
        let ready = ready_tx.clone();
        let failed = Arc::clone(&failed);
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name(format!("nvme-q{queue_id}"))
            .spawn(move || {
                let _entered = span.enter();
                let lap = &laps[usize::from(queue_id)];
                let result = serve_queue(&controller, queue_id, &served, &counters, lap, &ready);
                if let Err(reason) = &result {
                    failed.store(true, Ordering::Release);
                    // Before ready this reaches the main thread; after, the exit does.
                    let _ = ready.send(Err(reason.clone()));
                }
                result
            })
            .map_err(|e| format!("starting queue thread {queue_id}: {e}"))?;
        threads.push(thread);
    }
    drop(ready_tx);
    for _ in 0..queues {
        match ready_rx.recv_timeout(super::HOST_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return Err(reason),
            Err(_) => return Err("a queue thread did not get ready".into()),
        }
    }
    for device in &served {
        channel
            .send(
                &ToHost::Ready {
                    id: device.device.id,
                },
                &[],
            )
            .map_err(|e| ipc_failed("telling ring3d the queues are ready", e))?;
    }
    tracing::info!(devices = served.len(), "serving");

    super::beat_while_serving(
        channel,
        setup,
        super::Serving {
            laps: &laps,
            threads,
            failures: &ready_rx,
            failed: &failed,
            counters: &counters,
            stuck_after: STUCK,
        },
    )?;
    tracing::info!("every ublk device stopped; exiting");
    Ok(())
}

/// Optional NVM Command Support (ONCS) bit 3: Write Zeroes.
const ONCS_WRITE_ZEROES: u16 = 1 << 3;

#[derive(Clone)]
struct Served {
    device: ServeDevice,
    namespace: Namespace,
    cdev: Arc<OwnedFd>,
}

/// What a ublk request becomes on the NVMe side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planned {
    /// Read `blocks` at `lba`.
    Read {
        /// First logical block.
        lba: u64,
        /// How many.
        blocks: u32,
    },
    /// Write `blocks` at `lba`.
    Write {
        /// First logical block.
        lba: u64,
        /// How many.
        blocks: u32,
    },
    /// Flush the volatile write cache.
    Flush,
    /// Deallocate `blocks` at `lba`.
    Deallocate {
        /// First logical block.
        lba: u64,
        /// How many.
        blocks: u32,
    },
    /// Write zeroes to `blocks` at `lba`.
    WriteZeroes {
        /// First logical block.
        lba: u64,
        /// How many.
        blocks: u32,
    },
    /// Nothing to send: complete at once with this result (0 or a negative errno).
    Complete(i32),
}

/// Turns a ublk request (512-byte sectors) into an NVMe command on a namespace of
/// `block_shift`-sized blocks and `capacity` blocks, checking what the kernel sent:
/// alignment to the block size, the range within the namespace, and the length within
/// the tag's buffer of `max_io_bytes`.
pub fn plan_request(
    request: &Request,
    block_shift: u8,
    capacity: u64,
    max_io_bytes: u32,
    volatile_cache: bool,
) -> Planned {
    let invalid = Planned::Complete(-libc::EINVAL);
    let shift = u32::from(block_shift);
    if !(SECTOR_SHIFT..=16).contains(&shift) {
        return Planned::Complete(-libc::EIO);
    }
    let per_block = shift - SECTOR_SHIFT;
    let mask = (1u64 << per_block) - 1;
    let range = || -> Option<(u64, u32)> {
        if request.start_sector & mask != 0 || u64::from(request.sectors) & mask != 0 {
            return None;
        }
        let lba = request.start_sector >> per_block;
        let blocks = request.sectors >> per_block;
        if blocks == 0 || lba.checked_add(u64::from(blocks))? > capacity {
            return None;
        }
        Some((lba, blocks))
    };
    let bytes = u64::from(request.sectors) << SECTOR_SHIFT;
    match request.op {
        Op::Read | Op::Write => {
            if bytes > u64::from(max_io_bytes) {
                return invalid;
            }
            match (range(), request.op) {
                (Some((lba, blocks)), Op::Read) => Planned::Read { lba, blocks },
                (Some((lba, blocks)), _) => Planned::Write { lba, blocks },
                (None, _) => invalid,
            }
        }
        Op::Flush if volatile_cache => Planned::Flush,
        Op::Flush => Planned::Complete(0),
        Op::Discard => match range() {
            Some((lba, blocks)) => Planned::Deallocate { lba, blocks },
            None => invalid,
        },
        Op::WriteZeroes => match range() {
            Some((lba, blocks)) if blocks <= ring3_nvme::MAX_BLOCKS_PER_COMMAND => {
                Planned::WriteZeroes { lba, blocks }
            }
            _ => invalid,
        },
        Op::Other(_) => Planned::Complete(-libc::EOPNOTSUPP),
    }
}

/// One ublk device's queue on a queue thread.
struct DeviceQueue {
    queue: Queue,
    nsid: u32,
    block_shift: u8,
    capacity: u64,
    max_io_bytes: u32,
    /// Per tag: the buffer (absent while the device holds it), its address for the
    /// kernel, the request being served and how often it was retried.
    buffers: Vec<Option<DmaBuffer>>,
    addresses: Vec<*mut u8>,
    requests: Vec<Option<(Request, u8)>>,
    alive: bool,
}

fn serve_queue(
    controller: &Controller<VfioBackend>,
    queue_id: u16,
    served: &[Served],
    counters: &Counters,
    lap: &AtomicU64,
    ready: &mpsc::Sender<Result<(), String>>,
) -> Result<(), String> {
    let total_depth: usize = served.iter().map(|s| usize::from(s.device.depth)).sum();
    let max_entries = controller.capabilities().max_queue_entries() as usize;
    let entries = (total_depth + 1).clamp(2, max_entries.min(usize::from(u16::MAX)));
    let mut nvme = controller
        .io_queue(IoQueueOptions {
            entries: entries as u16,
            interrupts: false,
        })
        .map_err(|e| format!("creating NVMe I/O queue {queue_id}: {e}"))?;
    let volatile_cache = controller.info().volatile_write_cache;
    let mut devices = Vec::with_capacity(served.len());
    for s in served {
        let queue = Queue::new(
            Arc::clone(&s.cdev),
            queue_id,
            s.device.depth,
            s.device.max_io_bytes,
        )
        .map_err(|e| format!("ublk device {} queue {queue_id}: {e}", s.device.id))?;
        let depth = usize::from(s.device.depth);
        let mut device = DeviceQueue {
            queue,
            nsid: s.namespace.id,
            block_shift: s.namespace.block_shift,
            capacity: s.namespace.blocks,
            max_io_bytes: s.device.max_io_bytes,
            buffers: Vec::with_capacity(depth),
            addresses: Vec::with_capacity(depth),
            requests: vec![None; depth],
            alive: true,
        };
        for tag in 0..s.device.depth {
            let buffer = nvme
                .alloc_buffer(s.device.max_io_bytes as usize)
                .map_err(|e| format!("allocating request buffers: {e}"))?;
            let address = buffer.as_mut_ptr();
            // SAFETY: the buffer is max_io_bytes long and lives in `device.buffers` (or
            // in an NVMe command that hands it back) until the queue is dropped, which
            // happens before `device.buffers`: fields drop in declaration order.
            unsafe { device.queue.fetch(tag, address) }
                .map_err(|e| format!("ublk device {} queue {queue_id}: {e}", s.device.id))?;
            device.buffers.push(Some(buffer));
            device.addresses.push(address);
        }
        device
            .queue
            .submit()
            .map_err(|e| format!("ublk device {} queue {queue_id}: {e}", s.device.id))?;
        devices.push(device);
    }
    let _ = ready.send(Ok(()));

    let mut requests = Vec::new();
    let mut completions: Vec<IoCompletion> = Vec::new();
    // Requests the NVMe queue had no room for, in arrival order.
    let mut waiting: std::collections::VecDeque<(usize, u16)> = Default::default();
    let single = devices.len() == 1;
    let mut last_active = Instant::now();
    loop {
        lap.fetch_add(1, Ordering::Relaxed);
        let busy = nvme.in_flight() > 0 || !waiting.is_empty();
        let live = devices.iter().filter(|d| d.alive).count();
        if live == 0 && !busy {
            break;
        }
        if busy {
            last_active = Instant::now();
        }
        if !busy && !single && last_active.elapsed() > SPIN {
            // Several devices and nothing in flight: sleep until any of them has work.
            wait_for_any(&devices)?;
        }
        for (index, device) in devices.iter_mut().enumerate() {
            if !device.alive {
                continue;
            }
            // Just after a completion the next request tends to follow at once
            // (an application at queue depth 1): keep polling a moment before sleeping.
            let wait = (!busy && single && last_active.elapsed() > SPIN).then_some(IDLE_WAIT);
            device.alive = device
                .queue
                .poll(&mut requests, wait)
                .map_err(|e| format!("ublk queue {queue_id}: {e}"))?;
            for request in requests.drain(..) {
                let tag = request.tag;
                if usize::from(tag) >= device.requests.len() {
                    return Err(format!("the kernel handed out tag {tag}, beyond the depth"));
                }
                device.requests[usize::from(tag)] = Some((request, 0));
                waiting.push_back((index, tag));
            }
        }
        while let Some(&(index, tag)) = waiting.front() {
            if !nvme.has_room() {
                break;
            }
            waiting.pop_front();
            start(
                &mut nvme,
                &mut devices,
                index,
                tag,
                volatile_cache,
                counters,
            )?;
        }
        nvme.submit()
            .map_err(|e| format!("NVMe queue {queue_id}: {e}"))?;
        nvme.poll(&mut completions)
            .map_err(|e| format!("NVMe queue {queue_id}: {e}"))?;
        for completion in completions.drain(..) {
            let index = (completion.tag >> 16) as usize;
            let tag = (completion.tag & 0xffff) as u16;
            let Some(device) = devices.get_mut(index) else {
                return Err(format!("a completion for unknown device {index}"));
            };
            if let Some(buffer) = completion.buffer {
                if let Some(slot) = device.buffers.get_mut(usize::from(tag)) {
                    *slot = Some(buffer);
                }
            }
            match completion.result {
                Ok(()) => finish(device, tag, true, counters)?,
                Err(NvmeError::ControllerReset { reason }) => {
                    let retry = match device.requests.get_mut(usize::from(tag)) {
                        Some(Some((_, tries))) if *tries < RESET_RETRIES => {
                            *tries += 1;
                            true
                        }
                        _ => false,
                    };
                    tracing::warn!(tag, %reason, retry, "command failed by a controller reset");
                    if retry {
                        waiting.push_back((index, tag));
                    } else {
                        finish(device, tag, false, counters)?;
                    }
                }
                Err(error) => {
                    tracing::warn!(tag, %error, "I/O failed");
                    finish(device, tag, false, counters)?;
                }
            }
        }
        for device in devices.iter_mut().filter(|d| d.alive) {
            device
                .queue
                .submit()
                .map_err(|e| format!("ublk queue {queue_id}: {e}"))?;
        }
    }
    // Nothing is in flight on either side: the NVMe queue is deleted as it drops.
    drop(nvme);
    Ok(())
}

/// Sleeps until one of the devices' rings has requests (or [`IDLE_WAIT`] passes).
fn wait_for_any(devices: &[DeviceQueue]) -> Result<(), String> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds: Vec<PollFd<'_>> = devices
        .iter()
        .filter(|d| d.alive)
        .map(|d| PollFd::new(&d.queue, PollFlags::IN))
        .collect();
    let timeout = Timespec {
        tv_sec: 0,
        tv_nsec: IDLE_WAIT.as_nanos() as i64,
    };
    match poll(&mut fds, Some(&timeout)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(format!("waiting for requests: {e}")),
    }
}

/// Sends the request at (`index`, `tag`) to the NVMe queue, or completes it at once.
fn start(
    nvme: &mut IoQueue<VfioBackend>,
    devices: &mut [DeviceQueue],
    index: usize,
    tag: u16,
    volatile_cache: bool,
    counters: &Counters,
) -> Result<(), String> {
    let device = &mut devices[index];
    let Some((request, _)) = device.requests[usize::from(tag)] else {
        return Ok(());
    };
    let user_tag = ((index as u64) << 16) | u64::from(tag);
    let plan = plan_request(
        &request,
        device.block_shift,
        device.capacity,
        device.max_io_bytes,
        volatile_cache,
    );
    let nsid = device.nsid;
    let submitted = match plan {
        Planned::Read { lba, blocks } | Planned::Write { lba, blocks } => {
            let Some(buffer) = device.buffers[usize::from(tag)].take() else {
                return Err(format!("tag {tag}'s buffer is still with the device"));
            };
            let sent = if matches!(plan, Planned::Read { .. }) {
                nvme.read(nsid, lba, blocks, buffer, user_tag)
            } else {
                nvme.write(nsid, lba, blocks, buffer, user_tag)
            };
            match sent {
                Ok(()) => Ok(()),
                Err(rejected) => {
                    device.buffers[usize::from(tag)] = rejected.buffer;
                    Err(rejected.error)
                }
            }
        }
        Planned::Flush => nvme.flush(nsid, user_tag),
        Planned::Deallocate { lba, blocks } => nvme.deallocate(nsid, &[(lba, blocks)], user_tag),
        Planned::WriteZeroes { lba, blocks } => nvme.write_zeroes(nsid, lba, blocks, user_tag),
        Planned::Complete(result) => {
            return complete(device, tag, result, request.op, counters);
        }
    };
    match submitted {
        Ok(()) => Ok(()),
        Err(error) => {
            tracing::warn!(tag, %error, "could not send the command");
            finish(device, tag, false, counters)
        }
    }
}

/// Answers the kernel for `tag`: the request's full length on success, EIO on failure.
fn finish(device: &mut DeviceQueue, tag: u16, ok: bool, counters: &Counters) -> Result<(), String> {
    let Some(Some((request, _))) = device.requests.get(usize::from(tag)) else {
        return Err(format!("a completion for tag {tag}, which has no request"));
    };
    let op = request.op;
    let result = match (ok, op) {
        (false, _) => -libc::EIO,
        (true, Op::Read | Op::Write) => (request.sectors << SECTOR_SHIFT) as i32,
        (true, _) => 0,
    };
    complete(device, tag, result, op, counters)
}

fn complete(
    device: &mut DeviceQueue,
    tag: u16,
    result: i32,
    op: Op,
    counters: &Counters,
) -> Result<(), String> {
    let index = usize::from(tag);
    let bytes = device.requests[index]
        .take()
        .map_or(0, |(r, _)| u64::from(r.sectors) << SECTOR_SHIFT);
    if device.buffers[index].is_none() {
        return Err(format!(
            "tag {tag} completed while its buffer is with the device"
        ));
    }
    counters.count(op, bytes, result >= 0);
    let address = device.addresses[index];
    // SAFETY: the tag's buffer is back in `device.buffers` (checked above) and stays
    // there, max_io_bytes long, until the queue is dropped.
    unsafe { device.queue.complete(tag, result, address) }
        .map_err(|e| format!("completing tag {tag}: {e}"))
}

/// How much locked memory a driver needs for its request buffers and rings, with room.
pub fn memlock_estimate(queues: u16, depth: u16, max_io_bytes: u32, devices: usize) -> u64 {
    let buffers = u64::from(queues) * u64::from(depth) * u64::from(max_io_bytes) * devices as u64;
    buffers + (64 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(op: Op, start_sector: u64, sectors: u32) -> Request {
        Request {
            tag: 0,
            op,
            flags: 0,
            start_sector,
            sectors,
        }
    }

    #[test]
    fn sectors_become_blocks_of_the_namespace() {
        // 4 KiB blocks: 8 sectors each.
        assert_eq!(
            plan_request(&request(Op::Read, 16, 8), 12, 100, 1 << 20, true),
            Planned::Read { lba: 2, blocks: 1 }
        );
        assert_eq!(
            plan_request(&request(Op::Write, 7, 3), 9, 100, 1 << 20, true),
            Planned::Write { lba: 7, blocks: 3 }
        );
        assert_eq!(
            plan_request(&request(Op::Discard, 8, 800), 12, 1000, 4096, true),
            Planned::Deallocate {
                lba: 1,
                blocks: 100
            }
        );
        assert_eq!(
            plan_request(&request(Op::WriteZeroes, 0, 16), 12, 100, 4096, true),
            Planned::WriteZeroes { lba: 0, blocks: 2 }
        );
    }

    #[test]
    fn what_the_kernel_sends_is_checked() {
        let einval = Planned::Complete(-libc::EINVAL);
        // Not aligned to the 4 KiB block.
        assert_eq!(
            plan_request(&request(Op::Read, 4, 8), 12, 100, 1 << 20, true),
            einval
        );
        assert_eq!(
            plan_request(&request(Op::Read, 8, 4), 12, 100, 1 << 20, true),
            einval
        );
        // Past the end of the namespace.
        assert_eq!(
            plan_request(&request(Op::Write, 792, 16), 12, 100, 1 << 20, true),
            einval
        );
        assert_eq!(
            plan_request(
                &request(Op::Read, u64::MAX - 7, 8),
                12,
                u64::MAX >> 3,
                1 << 20,
                true
            ),
            einval
        );
        // Longer than the tag's buffer.
        assert_eq!(
            plan_request(&request(Op::Read, 0, 16), 9, 100, 4096, true),
            einval
        );
        // Empty.
        assert_eq!(
            plan_request(&request(Op::Discard, 0, 0), 9, 100, 4096, true),
            einval
        );
        assert_eq!(
            plan_request(&request(Op::Other(9), 0, 1), 9, 100, 4096, true),
            Planned::Complete(-libc::EOPNOTSUPP)
        );
    }

    #[test]
    fn flushes_reach_the_device_only_with_a_volatile_cache() {
        assert_eq!(
            plan_request(&request(Op::Flush, 0, 0), 9, 100, 4096, true),
            Planned::Flush
        );
        assert_eq!(
            plan_request(&request(Op::Flush, 0, 0), 9, 100, 4096, false),
            Planned::Complete(0)
        );
    }

    #[test]
    fn counters_add_up_by_kind() {
        let counters = Counters::default();
        counters.count(Op::Read, 4096, true);
        counters.count(Op::Write, 512, true);
        counters.count(Op::Write, 512, false);
        counters.count(Op::Flush, 0, true);
        let io = counters.snapshot();
        assert_eq!((io.reads, io.read_bytes), (1, 4096));
        assert_eq!((io.writes, io.written_bytes), (1, 512));
        assert_eq!((io.flushes, io.errors), (1, 1));
    }
}
