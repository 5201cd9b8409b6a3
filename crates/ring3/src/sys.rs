//! Small typed wrappers over the system calls the rest of the crate needs.
//!
//! Everything that calls into the OS with raw pointers lives here or in `vfio::ioctl`,
//! each call with a `SAFETY` note. Plain calls go through `rustix`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::time::Duration;

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};
use rustix::mm::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};

use crate::error::{Error, Result};

/// The system's page size.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// Page-aligned, zeroed, private anonymous memory, unmapped on drop.
#[derive(Debug)]
pub struct AnonMemory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; it has no thread affinity.
unsafe impl Send for AnonMemory {}
// SAFETY: AnonMemory hands out only a raw pointer; users synchronise their own accesses.
unsafe impl Sync for AnonMemory {}

impl AnonMemory {
    /// Maps at least `size` bytes (rounded up to whole pages, at least one page).
    pub fn new(size: usize) -> Result<Self> {
        let page = page_size();
        let len =
            size.max(1)
                .checked_next_multiple_of(page)
                .ok_or_else(|| Error::InvalidArgument {
                    what: format!("memory size {size:#x} is too large"),
                })?;
        // SAFETY: a fresh anonymous mapping chosen by the kernel aliases nothing.
        let ptr = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::POPULATE,
            )
        }
        .map_err(|e| Error::io(format!("allocating {len:#x} bytes of DMA memory"), e))?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| Error::InvalidArgument {
            what: "mmap returned a null pointer".into(),
        })?;
        Ok(AnonMemory { ptr, len })
    }

    /// Start of the memory.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length in bytes (whole pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: at least one page is mapped).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AnonMemory {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping made in `new`, and nothing uses it after drop.
        if let Err(error) = unsafe { munmap(self.ptr.as_ptr().cast(), self.len) } {
            tracing::error!(%error, "munmap of DMA memory failed");
        }
    }
}

/// A shared, readable and writable mapping of part of a file (a VFIO device region),
/// unmapped on drop.
///
/// The kernel keeps the file open while the mapping exists, so the mapping stays valid
/// even after the fd it was made from is closed.
#[derive(Debug)]
pub struct SharedMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value and has no thread affinity.
unsafe impl Send for SharedMapping {}
// SAFETY: SharedMapping hands out only a raw pointer; users synchronise their own accesses.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Maps `len` bytes (rounded up to whole pages) of `fd` at `offset`, shared, read/write.
    pub fn new(fd: BorrowedFd<'_>, offset: u64, len: usize) -> std::io::Result<Self> {
        let len = len
            .max(1)
            .checked_next_multiple_of(page_size())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: the kernel chooses a fresh address, so the mapping aliases no Rust memory.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                offset,
            )
        }?;
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned a null pointer"))?;
        Ok(SharedMapping { ptr, len })
    }

    /// Start of the mapping.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length in bytes (whole pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: at least one page is mapped).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping made in `new`, and nothing uses it after drop.
        if let Err(error) = unsafe { munmap(self.ptr.as_ptr().cast(), self.len) } {
            tracing::error!(%error, "munmap of a device region failed");
        }
    }
}

/// A non-blocking, close-on-exec eventfd.
pub fn new_eventfd() -> Result<OwnedFd> {
    eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
        .map_err(|e| Error::io("creating an eventfd", e))
}

/// Reads and resets an eventfd's counter; `None` if it was zero.
pub fn eventfd_take(fd: BorrowedFd<'_>) -> Result<Option<u64>> {
    let mut buf = [0u8; 8];
    match rustix::io::read(fd, &mut buf) {
        Ok(8) => Ok(Some(u64::from_ne_bytes(buf))),
        Ok(n) => Err(Error::io(
            "reading an eventfd",
            std::io::Error::other(format!("short read of {n} bytes")),
        )),
        Err(rustix::io::Errno::AGAIN) => Ok(None),
        Err(e) => Err(Error::io("reading an eventfd", e)),
    }
}

/// Adds one to an eventfd's counter.
pub fn eventfd_signal(fd: BorrowedFd<'_>) -> Result<()> {
    rustix::io::write(fd, &1u64.to_ne_bytes())
        .map(|_| ())
        .map_err(|e| Error::io("signalling an eventfd", e))
}

/// Waits until `fd` is readable or `timeout` passes; true if readable.
pub fn wait_readable(fd: impl AsFd, timeout: Duration) -> Result<bool> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let timespec =
            rustix::time::Timespec::try_from(left).map_err(|_| Error::InvalidArgument {
                what: format!("timeout {timeout:?} is too long"),
            })?;
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut fds, Some(&timespec)) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(Error::io("waiting on an eventfd", e)),
        }
    }
}
