//! The data path of one hardware queue on `/dev/ublkcN`; needs no privileges.
//!
//! A queue has `depth` tags. For each tag the server gives ublk_drv a buffer with a FETCH
//! command; when the block layer sends a request to that tag, ublk_drv writes the tag's
//! I/O descriptor (in an array the server maps read-only from the char device), copies a
//! WRITE's data into the buffer and completes the command. The server does the I/O and
//! answers with COMMIT_AND_FETCH, which carries the result, lets ublk_drv copy a READ's
//! data out of the buffer, and at once gives the tag back for the next request.
//!
//! So a tag is, in turn: *idle* (no command, before the first fetch or after an abort),
//! *with the kernel* (a command is queued or waiting for a request) and *with the
//! server* (a request was handed out by [`Queue::poll`] and awaits
//! [`Queue::complete`]). [`Queue`] tracks this and refuses calls that do not fit.
//!
//! ublk_drv accepts a queue's commands only from the thread that sent its first FETCH,
//! and copies data into and out of the buffers in that thread's context (while it is
//! in [`Queue::submit`] or [`Queue::poll`]). So a `Queue` is `Send` (create it anywhere)
//! but not `Sync`, and once it has submitted, every submission must come from the same
//! thread ([`Error::WrongThread`] otherwise).

use std::cell::Cell;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::thread::{self, ThreadId};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use rustix::mm::{MapFlags, ProtFlags};

use crate::device::MAX_IO_BYTES;
use crate::error::{Error, Result};
use crate::sys::{self, ublksrv_io_cmd, ublksrv_io_desc};

/// What a request asks for (`UBLK_IO_OP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read `sectors` from `start_sector` into the tag's buffer.
    Read,
    /// Write the tag's buffer (already filled by the kernel) to `start_sector`.
    Write,
    /// Make earlier writes durable; no data.
    Flush,
    /// Discard the range; no data.
    Discard,
    /// Zero the range; no data.
    WriteZeroes,
    /// An operation this crate does not know (zoned commands, ...): answer `-EOPNOTSUPP`.
    Other(u8),
}

impl Op {
    /// Decodes the low byte of `ublksrv_io_desc::op_flags`.
    pub fn from_raw(op: u8) -> Op {
        match u32::from(op) {
            sys::UBLK_IO_OP_READ => Op::Read,
            sys::UBLK_IO_OP_WRITE => Op::Write,
            sys::UBLK_IO_OP_FLUSH => Op::Flush,
            sys::UBLK_IO_OP_DISCARD => Op::Discard,
            sys::UBLK_IO_OP_WRITE_ZEROES => Op::WriteZeroes,
            _ => Op::Other(op),
        }
    }

    /// Whether the request moves data through the tag's buffer.
    pub fn has_data(self) -> bool {
        matches!(self, Op::Read | Op::Write)
    }
}

/// A request ublk_drv handed to the server, checked against the queue's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The tag it arrived on; answer with [`Queue::complete`] for this tag.
    pub tag: u16,
    /// What to do.
    pub op: Op,
    /// `UBLK_IO_F_*` flags (FUA, NOUNMAP, ...): `op_flags >> 8`.
    pub flags: u32,
    /// First 512-byte sector.
    pub start_sector: u64,
    /// Length in 512-byte sectors. For [`Op::Read`] and [`Op::Write`] it fits the tag's
    /// buffer (`sectors * 512 <= max_io_bytes`).
    pub sectors: u32,
}

impl Request {
    /// Byte offset on the device. For the ops with a range (read, write, discard,
    /// write-zeroes) it is checked not to overflow together with [`Request::len_bytes`];
    /// a flush has no range (its sector is -1, and this saturates).
    pub fn offset_bytes(&self) -> u64 {
        self.start_sector.saturating_mul(sys::SECTOR_BYTES)
    }

    /// Length in bytes.
    pub fn len_bytes(&self) -> u64 {
        u64::from(self.sectors) * sys::SECTOR_BYTES
    }
}

/// Checks an I/O descriptor the kernel wrote and turns it into a [`Request`]; on failure
/// says what was wrong and the offending value.
pub fn decode_descriptor(
    tag: u16,
    desc: &ublksrv_io_desc,
    max_io_bytes: u32,
) -> std::result::Result<Request, (&'static str, u64)> {
    let op = Op::from_raw((desc.op_flags & 0xff) as u8);
    let request = Request {
        tag,
        op,
        flags: desc.op_flags >> 8,
        start_sector: desc.start_sector,
        sectors: desc.nr_sectors,
    };
    // A flush has no range: the block layer leaves its sector at -1.
    let ranged = matches!(op, Op::Read | Op::Write | Op::Discard | Op::WriteZeroes);
    if ranged
        && desc
            .start_sector
            .checked_add(desc.nr_sectors.into())
            .and_then(|end| end.checked_mul(sys::SECTOR_BYTES))
            .is_none()
    {
        return Err(("sector range", desc.start_sector));
    }
    match op {
        Op::Read | Op::Write | Op::Discard | Op::WriteZeroes if desc.nr_sectors == 0 => {
            Err(("sector count (zero)", 0))
        }
        Op::Read | Op::Write if request.len_bytes() > u64::from(max_io_bytes) => Err((
            "sector count (larger than the buffer)",
            desc.nr_sectors.into(),
        )),
        _ => Ok(request),
    }
}

/// Marks user_data as a tag's I/O command, so a stray value is recognised.
const USER_DATA_TAG: u64 = 1 << 32;

/// Where a tag is; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagState {
    Idle,
    WithKernel,
    WithServer,
}

impl TagState {
    fn describe(self) -> &'static str {
        match self {
            TagState::Idle => "idle (not fetched, or aborted)",
            TagState::WithKernel => "with the kernel (waiting for a request)",
            TagState::WithServer => "with the server (a request awaits completion)",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Tag {
    state: TagState,
    buffer: u64,
}

/// The read-only mapping of a queue's I/O descriptors.
#[derive(Debug)]
struct Descriptors {
    base: NonNull<ublksrv_io_desc>,
    len: usize,
    depth: u16,
}

// SAFETY: the mapping is plain shared memory owned by this value; moving it to another
// thread changes nothing about who may access it.
unsafe impl Send for Descriptors {}

impl Descriptors {
    fn map(cdev: &OwnedFd, queue_id: u16, depth: u16) -> Result<Descriptors> {
        let page_size = rustix::param::page_size();
        let len = sys::descriptor_area_bytes(depth, page_size);
        let offset = sys::descriptor_area_offset(queue_id, page_size);
        // SAFETY: a fresh shared read-only mapping at an address the kernel picks; it
        // aliases no Rust memory.
        let base = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED,
                cdev,
                offset,
            )
        }
        .map_err(|errno| Error::Map {
            queue_id,
            source: errno.into(),
        })?;
        Ok(Descriptors {
            base: NonNull::new(base.cast()).ok_or(Error::Map {
                queue_id,
                source: io::Error::from_raw_os_error(libc::EFAULT),
            })?,
            len,
            depth,
        })
    }

    /// A copy of the descriptor of `tag`.
    fn read(&self, tag: u16) -> ublksrv_io_desc {
        assert!(tag < self.depth);
        // SAFETY: tag < depth, so the element lies in the mapping (len covers depth
        // descriptors); the kernel writes it, so it is read by value with a volatile read
        // and never referenced. The kernel wrote it before posting the completion that
        // the caller has just read with acquire ordering (io-uring's CQ tail load).
        unsafe { self.base.as_ptr().add(tag.into()).read_volatile() }
    }
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: base and len are the mapping made in `map`, unmapped only here. The
        // pages belong to the kernel; unmapping only drops this process's view.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// One hardware queue of a ublk device, served by one thread.
///
/// # Dropping
///
/// Dropping a `Queue` closes its io_uring, which makes ublk_drv cancel the queue's
/// outstanding commands (and, if the device is live, quiesce or fail it: that is how a
/// server's death looks to the kernel), unmaps the descriptors (kernel pages; only this
/// process's view goes) and drops its reference to the char device. It frees nothing
/// the kernel writes to: the tag buffers belong to the caller, who frees them after the
/// queue (the contract of [`Queue::fetch`]).
///
/// # Example
///
/// ```no_run
/// # use std::sync::Arc;
/// # use std::time::Duration;
/// # fn serve(cdev: Arc<std::os::fd::OwnedFd>) -> ring3_ublk::Result<()> {
/// use ring3_ublk::{Op, Queue};
///
/// let (depth, max_io_bytes) = (64u16, 128 << 10);
/// let mut buffers = vec![0u8; usize::from(depth) * max_io_bytes as usize];
/// let mut queue = Queue::new(cdev, 0, depth, max_io_bytes)?;
/// for tag in 0..depth {
///     let buffer = buffers[usize::from(tag) * max_io_bytes as usize..].as_mut_ptr();
///     // SAFETY: each tag gets its own max_io_bytes of `buffers`, which outlives `queue`.
///     unsafe { queue.fetch(tag, buffer)? };
/// }
/// let mut requests = Vec::with_capacity(depth.into());
/// while queue.poll(&mut requests, Some(Duration::from_millis(100)))? {
///     for request in &requests {
///         let buffer = buffers[usize::from(request.tag) * max_io_bytes as usize..].as_mut_ptr();
///         let result = match request.op {
///             Op::Read | Op::Write => request.len_bytes() as i32, // do the I/O here
///             Op::Flush | Op::Discard | Op::WriteZeroes => 0,
///             Op::Other(_) => -libc::EOPNOTSUPP,
///         };
///         // SAFETY: as for fetch.
///         unsafe { queue.complete(request.tag, result, buffer)? };
///     }
/// }
/// drop(queue);
/// drop(buffers); // only now
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Queue {
    // Field order is drop order: the ring (and with it the commands) goes first.
    ring: QueueRing,
    descriptors: Descriptors,
    cdev: Arc<OwnedFd>,
    queue_id: u16,
    max_io_bytes: u32,
    tags: Box<[Tag]>,
    in_flight: usize,
    rejected: u64,
    aborted: bool,
    owner: Option<ThreadId>,
    _not_sync: PhantomData<Cell<()>>,
}

struct QueueRing(IoUring<squeue::Entry, cqueue::Entry>);

impl std::fmt::Debug for QueueRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueRing")
    }
}

impl Queue {
    /// Sets up queue `queue_id` of the device whose char device `/dev/ublkcN` is `cdev`:
    /// maps its I/O descriptors and creates its io_uring. `depth` and `max_io_bytes` are
    /// the device's ([`DeviceInfo`](crate::DeviceInfo)); all queues of a device must be
    /// set up by the same process.
    pub fn new(cdev: Arc<OwnedFd>, queue_id: u16, depth: u16, max_io_bytes: u32) -> Result<Queue> {
        if depth == 0 || u32::from(depth) > sys::UBLK_MAX_QUEUE_DEPTH {
            return Err(Error::InvalidSpec {
                what: "queue depth",
                value: depth.into(),
                rule: "1 to 4096, as the device was added with",
            });
        }
        if max_io_bytes == 0 || max_io_bytes > MAX_IO_BYTES {
            return Err(Error::InvalidSpec {
                what: "max_io_bytes",
                value: max_io_bytes.into(),
                rule: "the device's max_io_bytes, at most 32 MiB",
            });
        }
        let descriptors = Descriptors::map(&cdev, queue_id, depth)?;
        // One command per tag at most is queued or outstanding, so `depth` submission
        // entries never overflow (and the default completion queue is twice that). Normal
        // 64-byte SQEs do: the 16-byte ublksrv_io_cmd fits their command area.
        // Cooperative task running with the flag: the kernel queues request hand-overs
        // as task work and says so in the ring, so a busy thread only needs a system
        // call when there is something to send or to collect.
        let ring = IoUring::<squeue::Entry, cqueue::Entry>::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(depth.into())
            .map_err(|source| Error::Ring {
                operation: "setup (queue ring)",
                source,
            })?;
        Ok(Queue {
            ring: QueueRing(ring),
            descriptors,
            cdev,
            queue_id,
            max_io_bytes,
            tags: vec![
                Tag {
                    state: TagState::Idle,
                    buffer: 0,
                };
                depth.into()
            ]
            .into_boxed_slice(),
            in_flight: 0,
            rejected: 0,
            aborted: false,
            owner: None,
            _not_sync: PhantomData,
        })
    }

    /// Queues a FETCH for `tag`, giving ublk_drv `buffer` for its requests; it is sent by
    /// the next [`Queue::submit`] or [`Queue::poll`]. Every tag must be fetched once before
    /// the device can start.
    ///
    /// # Safety
    ///
    /// `buffer` must be valid for reads and writes of the device's `max_io_bytes` and
    /// stay so until the queue is dropped. From now on the kernel writes to it (in this
    /// thread's [`Queue::submit`]/[`Queue::poll`]) whenever a request arrives for the tag,
    /// so the caller must not hold references into it across those calls.
    pub unsafe fn fetch(&mut self, tag: u16, buffer: *mut u8) -> Result<()> {
        self.queue_command(
            tag,
            "fetch",
            TagState::Idle,
            sys::UBLK_U_IO_FETCH_REQ,
            -1,
            buffer,
        )
    }

    /// Queues a COMMIT_AND_FETCH for `tag`: `result` answers the request handed out on it
    /// (bytes transferred, or a negative errno), and `buffer` is given back for the tag's
    /// next request. A READ's data must be in the buffer. Sent by the next
    /// [`Queue::submit`] or [`Queue::poll`].
    ///
    /// # Safety
    ///
    /// As for [`Queue::fetch`].
    pub unsafe fn complete(&mut self, tag: u16, result: i32, buffer: *mut u8) -> Result<()> {
        self.queue_command(
            tag,
            "complete",
            TagState::WithServer,
            sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ,
            result,
            buffer,
        )?;
        self.in_flight -= 1;
        Ok(())
    }

    fn queue_command(
        &mut self,
        tag: u16,
        operation: &'static str,
        expected: TagState,
        op: u32,
        result: i32,
        buffer: *mut u8,
    ) -> Result<()> {
        let depth = self.tags.len();
        let Some(entry) = self.tags.get_mut(usize::from(tag)) else {
            return Err(Error::TagOutOfRange {
                queue_id: self.queue_id,
                tag,
                depth: depth as u16,
            });
        };
        if entry.state != expected {
            return Err(Error::TagState {
                queue_id: self.queue_id,
                tag,
                operation,
                state: entry.state.describe(),
            });
        }
        if buffer.is_null() {
            return Err(Error::InvalidSpec {
                what: "buffer address",
                value: 0,
                rule: "a buffer of max_io_bytes",
            });
        }
        entry.state = TagState::WithKernel;
        entry.buffer = buffer as u64;
        let sqe = io_command(
            self.cdev.as_raw_fd(),
            op,
            self.queue_id,
            tag,
            result,
            entry.buffer,
        );
        push(&mut self.ring.0, &sqe)
    }

    /// Sends the queued commands to ublk_drv.
    pub fn submit(&mut self) -> Result<()> {
        self.check_thread()?;
        self.enter(None)
    }

    /// Sends the queued commands, then collects the requests ublk_drv handed over into
    /// `out` (cleared first; with a capacity of at least `depth` this never allocates).
    /// `wait`: `None` returns at once, `Some(t)` blocks up to `t` for at least one
    /// completion.
    ///
    /// Returns `Ok(false)` once ublk_drv has aborted the queue (the device is stopping or
    /// being deleted): serving is over, drop the queue. A descriptor that fails the checks
    /// of [`decode_descriptor`] is not handed out but answered with `-EIO` (see
    /// [`Queue::rejected`]).
    ///
    /// On `Err`, requests already in `out` are still the caller's to complete.
    pub fn poll(&mut self, out: &mut Vec<Request>, wait: Option<Duration>) -> Result<bool> {
        out.clear();
        out.reserve(self.tags.len());
        self.check_thread()?;
        let wait = wait.filter(|_| self.ring.0.completion().is_empty());
        self.enter(wait)?;

        let (_, mut sq, cq) = self.ring.0.split();
        for cqe in cq {
            let user_data = cqe.user_data();
            let tag = (user_data & 0xffff) as u16;
            let Some(entry) = self
                .tags
                .get_mut(usize::from(tag))
                .filter(|_| user_data & !0xffff == USER_DATA_TAG)
            else {
                return Err(Error::Misbehaved {
                    queue_id: self.queue_id,
                    what: "completion user_data",
                    value: user_data,
                });
            };
            if entry.state != TagState::WithKernel {
                return Err(Error::Misbehaved {
                    queue_id: self.queue_id,
                    what: "completion for a tag without a command",
                    value: tag.into(),
                });
            }
            match cqe.result() {
                result if result == sys::UBLK_IO_RES_OK as i32 => {
                    let desc = self.descriptors.read(tag);
                    match decode_descriptor(tag, &desc, self.max_io_bytes) {
                        Ok(request) => {
                            entry.state = TagState::WithServer;
                            self.in_flight += 1;
                            out.push(request);
                        }
                        Err(_) => {
                            // Fail it rather than hand over a request that would overrun
                            // the buffer; the tag goes straight back to the kernel.
                            self.rejected += 1;
                            let sqe = io_command(
                                self.cdev.as_raw_fd(),
                                sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ,
                                self.queue_id,
                                tag,
                                -libc::EIO,
                                entry.buffer,
                            );
                            // SAFETY: the buffer is the one the caller gave for this tag
                            // under the contract of `fetch`/`complete`.
                            if unsafe { sq.push(&sqe) }.is_err() {
                                unreachable!("one command per tag fits the submission queue");
                            }
                        }
                    }
                }
                sys::UBLK_IO_RES_ABORT => {
                    entry.state = TagState::Idle;
                    self.aborted = true;
                }
                errno @ ..0 => {
                    entry.state = TagState::Idle;
                    return Err(Error::IoCommand {
                        queue_id: self.queue_id,
                        tag,
                        source: io::Error::from_raw_os_error(-errno),
                    });
                }
                other => {
                    entry.state = TagState::Idle;
                    return Err(Error::Misbehaved {
                        queue_id: self.queue_id,
                        what: "I/O command result",
                        value: other as u64,
                    });
                }
            }
        }
        Ok(!self.aborted)
    }

    /// Requests handed out by [`Queue::poll`] and not yet answered with
    /// [`Queue::complete`].
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Requests whose descriptor failed the checks and were answered with `-EIO` without
    /// being handed out.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// The queue's ID.
    pub fn queue_id(&self) -> u16 {
        self.queue_id
    }

    fn check_thread(&mut self) -> Result<()> {
        let current = thread::current().id();
        match self.owner {
            None => {
                self.owner = Some(current);
                Ok(())
            }
            Some(owner) if owner == current => Ok(()),
            Some(_) => Err(Error::WrongThread {
                queue_id: self.queue_id,
            }),
        }
    }

    /// Submits, and waits up to `wait` for a completion.
    fn enter(&mut self, wait: Option<Duration>) -> Result<()> {
        if wait.is_none() {
            let mut sq = self.ring.0.submission();
            sq.sync();
            if sq.is_empty() && !sq.taskrun() && !sq.cq_overflow() {
                // Nothing to send and no task work pending: the completion queue is
                // already all there is to read.
                return Ok(());
            }
        }
        let submitter = self.ring.0.submitter();
        let outcome = match wait {
            Some(wait) => {
                let timespec = types::Timespec::from(wait);
                let args = types::SubmitArgs::new().timespec(&timespec);
                submitter.submit_with_args(1, &args)
            }
            None => submitter.submit(),
        };
        match outcome {
            Ok(_) => Ok(()),
            // Timed out, interrupted, or the completion queue is busy: whatever was not
            // submitted stays queued for the next call.
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(source) => Err(Error::Ring {
                operation: "submit (queue ring)",
                source,
            }),
        }
    }
}

fn io_command(
    device: i32,
    op: u32,
    queue_id: u16,
    tag: u16,
    result: i32,
    buffer: u64,
) -> squeue::Entry {
    let cmd = ublksrv_io_cmd {
        q_id: queue_id,
        tag,
        result,
        addr: buffer,
    };
    opcode::UringCmd16::new(types::Fd(device), op)
        .cmd(sys::io_cmd_bytes(&cmd))
        .build()
        .user_data(USER_DATA_TAG | u64::from(tag))
}

fn push(ring: &mut IoUring<squeue::Entry, cqueue::Entry>, sqe: &squeue::Entry) -> Result<()> {
    // SAFETY: the command carries its payload inline; the buffer it names is under the
    // contract of `fetch`/`complete`.
    if unsafe { ring.submission().push(sqe) }.is_ok() {
        return Ok(());
    }
    Err(Error::Ring {
        operation: "push (queue ring full)",
        source: io::Error::from_raw_os_error(libc::EBUSY),
    })
}

/// The queue's io_uring: readable when the kernel has posted requests, so one thread can
/// sleep on several queues with `poll(2)` and then [`Queue::poll`] each without waiting.
impl std::os::fd::AsFd for Queue {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsRawFd;
        // SAFETY: the ring's file descriptor is open for as long as `self.ring` lives,
        // which the returned borrow cannot outlive.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.ring.0.as_raw_fd()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(op: u32, flags: u32, start_sector: u64, nr_sectors: u32) -> ublksrv_io_desc {
        ublksrv_io_desc {
            op_flags: op | flags << 8,
            nr_sectors,
            start_sector,
            addr: 0,
        }
    }

    #[test]
    fn descriptors_decode_op_flags_and_range() {
        let request = decode_descriptor(
            7,
            &desc(sys::UBLK_IO_OP_WRITE, sys::UBLK_IO_F_FUA >> 8, 2048, 8),
            4096,
        )
        .unwrap();
        assert_eq!(
            request,
            Request {
                tag: 7,
                op: Op::Write,
                flags: sys::UBLK_IO_F_FUA >> 8,
                start_sector: 2048,
                sectors: 8,
            }
        );
        assert_eq!(request.offset_bytes(), 2048 * 512);
        assert_eq!(request.len_bytes(), 4096);
        for (raw, op) in [
            (sys::UBLK_IO_OP_READ, Op::Read),
            (sys::UBLK_IO_OP_FLUSH, Op::Flush),
            (sys::UBLK_IO_OP_DISCARD, Op::Discard),
            (sys::UBLK_IO_OP_WRITE_ZEROES, Op::WriteZeroes),
            (sys::UBLK_IO_OP_ZONE_APPEND, Op::Other(13)),
        ] {
            let sectors = if op == Op::Flush { 0 } else { 1 };
            assert_eq!(
                decode_descriptor(0, &desc(raw, 0, 0, sectors), 4096)
                    .unwrap()
                    .op,
                op
            );
        }
    }

    #[test]
    fn data_requests_must_fit_the_buffer() {
        assert!(decode_descriptor(0, &desc(sys::UBLK_IO_OP_READ, 0, 0, 8), 4096).is_ok());
        for op in [sys::UBLK_IO_OP_READ, sys::UBLK_IO_OP_WRITE] {
            let error = decode_descriptor(0, &desc(op, 0, 0, 9), 4096).unwrap_err();
            assert_eq!(error.1, 9);
            assert!(decode_descriptor(0, &desc(op, 0, 0, 0), 4096).is_err());
        }
        // Discards carry no data, so they may be larger than the buffer.
        assert!(decode_descriptor(0, &desc(sys::UBLK_IO_OP_DISCARD, 0, 0, 1 << 20), 4096).is_ok());
        assert!(decode_descriptor(0, &desc(sys::UBLK_IO_OP_DISCARD, 0, 0, 0), 4096).is_err());
    }

    #[test]
    fn ranges_must_not_wrap() {
        assert!(decode_descriptor(0, &desc(sys::UBLK_IO_OP_READ, 0, u64::MAX, 1), 4096).is_err());
        assert!(
            decode_descriptor(0, &desc(sys::UBLK_IO_OP_READ, 0, u64::MAX / 512, 1), 4096).is_err()
        );
        assert!(
            decode_descriptor(0, &desc(sys::UBLK_IO_OP_DISCARD, 0, u64::MAX - 1, 2), 4096).is_err()
        );
        // Flushes carry no range, and the kernel sends sector -1 with them.
        assert!(decode_descriptor(0, &desc(sys::UBLK_IO_OP_FLUSH, 0, u64::MAX, 0), 4096).is_ok());
    }

    #[test]
    fn io_commands_carry_tag_and_buffer() {
        let sqe = io_command(5, sys::UBLK_U_IO_FETCH_REQ, 1, 9, -1, 0x1000);
        assert_eq!(sqe.get_user_data(), USER_DATA_TAG | 9);
    }

    #[test]
    fn queue_is_send_but_not_sync() {
        fn assert_send<T: Send>() {}
        assert_send::<Queue>();
        // Not Sync: enforced by PhantomData<Cell<()>>; `static_assertions` would say
        // `assert_not_impl_any!(Queue: Sync)`.
    }
}
