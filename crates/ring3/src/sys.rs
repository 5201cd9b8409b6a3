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

/// A memory mapping of whole pages, unmapped on drop: private anonymous memory (for DMA
/// buffers) or a shared mapping of a file range (for device regions).
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value and has no thread affinity.
unsafe impl Send for Mapping {}
// SAFETY: Mapping hands out only a raw pointer; users synchronise their own accesses.
unsafe impl Sync for Mapping {}

/// `len` rounded up to whole pages, at least one page.
fn whole_pages(len: usize) -> std::io::Result<usize> {
    len.max(1)
        .checked_next_multiple_of(page_size())
        .ok_or_else(|| std::io::Error::other(format!("a mapping of {len:#x} bytes is too large")))
}

impl Mapping {
    /// Zeroed, private anonymous memory of at least `size` bytes, populated up front.
    pub fn anonymous(size: usize) -> Result<Self> {
        let what = || format!("allocating {size:#x} bytes of DMA memory");
        let len = whole_pages(size).map_err(|e| Error::io(what(), e))?;
        // SAFETY: a fresh anonymous mapping chosen by the kernel aliases nothing.
        let ptr = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::POPULATE,
            )
        }
        .map_err(|e| Error::io(what(), e))?;
        Self::from_raw(ptr, len).map_err(|e| Error::io(what(), e))
    }

    /// `len` bytes (rounded up to whole pages) of `fd` at `offset`, shared, read/write.
    pub fn shared(fd: BorrowedFd<'_>, offset: u64, len: usize) -> std::io::Result<Self> {
        let len = whole_pages(len)?;
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
        Self::from_raw(ptr, len)
    }

    fn from_raw(ptr: *mut std::ffi::c_void, len: usize) -> std::io::Result<Self> {
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned a null pointer"))?;
        Ok(Mapping { ptr, len })
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

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping made by the constructor, and nothing uses
        // it after drop.
        if let Err(error) = unsafe { munmap(self.ptr.as_ptr().cast(), self.len) } {
            tracing::error!(%error, "munmap failed");
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
