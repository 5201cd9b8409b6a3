//! DMA memory: buffers that map themselves into the device's IOMMU and unmap on drop.
//!
//! A [`DmaSpace`] belongs to one device. It allocates page-aligned host memory, picks an
//! IOVA for it below the device's DMA mask with an [`IovaAllocator`], and asks its
//! [`DmaMapper`] (VFIO's type1 IOMMU, or the fake backend's table) to map it. The
//! resulting [`DmaBuffer`] is accessed only by copies and volatile loads/stores, never
//! through a Rust reference, because the device may write it at any time. Dropping it
//! unmaps first, then frees: memory is never released while the device can still reach it.

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{Error, Result};
use crate::mmio::RegisterValue;
use crate::sys;

/// Maps host memory at an IOVA for a device, and unmaps it.
pub trait DmaMapper: Send + Sync {
    /// Makes `len` bytes at `vaddr` reachable by the device at `iova`, read and write.
    ///
    /// # Safety
    /// `vaddr..vaddr+len` must be memory owned by the caller that stays allocated until
    /// [`DmaMapper::unmap`] has returned `Ok` for the same range.
    unsafe fn map(&self, vaddr: NonNull<u8>, len: usize, iova: u64) -> Result<()>;

    /// Removes a mapping made by [`DmaMapper::map`]; after `Ok` the device cannot reach it.
    fn unmap(&self, iova: u64, len: usize) -> Result<()>;
}

/// Hands out IOVA ranges within `[start, end]`, first fit, merging freed neighbours.
///
/// Written by hand: IOVA ranges need alignment, a ceiling from the DMA mask and holes
/// for reserved windows, which general-purpose range allocators do not combine.
#[derive(Debug)]
pub struct IovaAllocator {
    /// Free ranges: start -> length.
    free: BTreeMap<u64, u64>,
    mask_bits: u8,
}

impl IovaAllocator {
    /// An allocator over `ranges` (inclusive start, exclusive end), clipped to `mask_bits`.
    pub fn new(ranges: &[(u64, u64)], mask_bits: u8) -> Self {
        let ceiling = if mask_bits >= 64 {
            u64::MAX
        } else {
            1u64 << mask_bits
        };
        let mut free = BTreeMap::new();
        for &(start, end) in ranges {
            let end = end.min(ceiling);
            if start < end {
                free.insert(start, end - start);
            }
        }
        IovaAllocator { free, mask_bits }
    }

    /// An allocator for a device with a `mask_bits`-bit DMA mask, skipping the first 64 KiB
    /// (so a zero or small bogus address from a device never hits a buffer) and x86's MSI
    /// window at 0xfee00000..0xfef00000.
    pub fn for_mask(mask_bits: u8) -> Self {
        Self::new(
            &[(0x1_0000, 0xfee0_0000), (0xfef0_0000, u64::MAX)],
            mask_bits,
        )
    }

    /// Allocates `size` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, size: u64, align: u64) -> Result<u64> {
        if size == 0 || !align.is_power_of_two() {
            return Err(Error::InvalidArgument {
                what: format!("IOVA allocation of {size:#x} bytes aligned to {align:#x}"),
            });
        }
        let found = self.free.iter().find_map(|(&start, &len)| {
            let aligned = start.checked_add(align - 1)? & !(align - 1);
            let end = aligned.checked_add(size)?;
            (end <= start + len).then_some((start, len, aligned))
        });
        let Some((start, len, aligned)) = found else {
            return Err(Error::IovaExhausted {
                size,
                mask_bits: self.mask_bits,
            });
        };
        self.free.remove(&start);
        if aligned > start {
            self.free.insert(start, aligned - start);
        }
        let tail = start + len - (aligned + size);
        if tail > 0 {
            self.free.insert(aligned + size, tail);
        }
        Ok(aligned)
    }

    /// Returns a range given by [`IovaAllocator::alloc`].
    pub fn free(&mut self, iova: u64, size: u64) {
        let mut start = iova;
        let mut len = size;
        if let Some((&prev, &prev_len)) = self.free.range(..iova).next_back() {
            debug_assert!(prev + prev_len <= iova, "double free of IOVA {iova:#x}");
            if prev + prev_len == iova {
                self.free.remove(&prev);
                start = prev;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.free.get(&(iova + size)) {
            self.free.remove(&(iova + size));
            len += next_len;
        }
        self.free.insert(start, len);
    }

    /// Total free bytes.
    pub fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }
}

/// A device's DMA address space: allocates [`DmaBuffer`]s mapped for that device.
pub struct DmaSpace {
    mapper: Arc<dyn DmaMapper>,
    iova: Mutex<IovaAllocator>,
}

impl DmaSpace {
    /// A space whose IOVAs come from `allocator` and are mapped by `mapper`.
    pub fn new(mapper: Arc<dyn DmaMapper>, allocator: IovaAllocator) -> Arc<Self> {
        Arc::new(DmaSpace {
            mapper,
            iova: Mutex::new(allocator),
        })
    }

    /// Restricts future allocations to the device's DMA mask.
    pub fn set_mask(&self, mask_bits: u8) {
        let mut iova = self.iova.lock().unwrap_or_else(PoisonError::into_inner);
        let ceiling = if mask_bits >= 64 {
            u64::MAX
        } else {
            1u64 << mask_bits
        };
        // Drop free space above the ceiling; buffers already handed out stay valid.
        let ranges: Vec<(u64, u64)> = iova
            .free
            .iter()
            .map(|(&start, &len)| (start, start.saturating_add(len).min(ceiling)))
            .collect();
        *iova = IovaAllocator::new(&ranges, mask_bits);
    }

    /// A zeroed buffer of at least `size` bytes (rounded up to whole pages), mapped for the device.
    pub fn alloc(self: &Arc<Self>, size: usize) -> Result<DmaBuffer> {
        let memory = sys::Mapping::anonymous(size)?;
        let len = memory.len();
        let iova = self
            .iova
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .alloc(len as u64, sys::page_size() as u64)?;
        // SAFETY: `memory` is owned by the DmaBuffer built below, which unmaps before freeing it.
        if let Err(e) = unsafe { self.mapper.map(memory.ptr(), len, iova) } {
            self.free_iova(iova, len);
            return Err(e);
        }
        Ok(DmaBuffer {
            memory: Some(memory),
            iova,
            size,
            space: Arc::clone(self),
        })
    }

    fn free_iova(&self, iova: u64, len: usize) {
        self.iova
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .free(iova, len as u64);
    }
}

/// Memory a device can reach by DMA at [`DmaBuffer::iova`].
///
/// All access goes through copies or volatile loads and stores, because the device may
/// change the memory at any moment. Dropping the buffer unmaps it from the IOMMU and only
/// then frees it; if unmapping fails, the memory is leaked rather than reused.
pub struct DmaBuffer {
    memory: Option<sys::Mapping>,
    iova: u64,
    size: usize,
    space: Arc<DmaSpace>,
}

impl std::fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBuffer")
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("len", &self.size)
            .finish()
    }
}

impl DmaBuffer {
    /// Address the device uses for the first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// The buffer's first byte in this process, for handing the memory to the kernel
    /// (such as a ublk request buffer, which the kernel copies block data into and out
    /// of). Whoever writes through it must not race the device's DMA.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.base().as_ptr()
    }

    /// Requested length in bytes.
    pub fn len(&self) -> usize {
        self.size
    }

    /// Whether the buffer has no bytes.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    fn base(&self) -> NonNull<u8> {
        match &self.memory {
            Some(memory) => memory.ptr(),
            // Only Drop takes the memory out.
            None => NonNull::dangling(),
        }
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        if offset.checked_add(len).is_some_and(|end| end <= self.size) {
            Ok(())
        } else {
            Err(Error::OutOfBounds {
                region: format!("DMA buffer at IOVA {:#x}", self.iova),
                offset: offset as u64,
                size: len as u64,
                len: self.size as u64,
            })
        }
    }

    /// Copies `data` into the buffer at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check(offset, data.len())?;
        // SAFETY: the range is inside our live allocation (checked); a copy never creates a
        // reference to device-visible memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.base().as_ptr().add(offset),
                data.len(),
            )
        };
        Ok(())
    }

    /// Copies bytes at `offset` out of the buffer into `out`.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check(offset, out.len())?;
        // SAFETY: as in `write`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base().as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }

    /// Gives the memory up for ever, still mapped at its IOVA: for memory a device may
    /// still write after its driver could not stop it. The buffer is empty afterwards.
    pub fn leak(&mut self) {
        if let Some(memory) = self.memory.take() {
            tracing::warn!(
                iova = self.iova,
                len = self.size,
                "leaking a DMA buffer the device may still use"
            );
            std::mem::forget(memory);
        }
        self.size = 0;
    }

    /// Sets every byte to `value`.
    pub fn fill(&self, value: u8) {
        // SAFETY: the whole requested length is inside our live allocation.
        unsafe { std::ptr::write_bytes(self.base().as_ptr(), value, self.size) };
    }

    /// A volatile load of a naturally aligned integer at `offset` (for fields the device updates).
    pub fn read_volatile<T: RegisterValue>(&self, offset: usize) -> Result<T> {
        self.check_aligned::<T>(offset)?;
        // SAFETY: in bounds and aligned (checked); a volatile load, no reference formed.
        Ok(unsafe { self.base().as_ptr().add(offset).cast::<T>().read_volatile() })
    }

    /// A volatile store of a naturally aligned integer at `offset`.
    pub fn write_volatile<T: RegisterValue>(&self, offset: usize, value: T) -> Result<()> {
        self.check_aligned::<T>(offset)?;
        // SAFETY: as in read_volatile.
        unsafe {
            self.base()
                .as_ptr()
                .add(offset)
                .cast::<T>()
                .write_volatile(value)
        };
        Ok(())
    }

    fn check_aligned<T: RegisterValue>(&self, offset: usize) -> Result<()> {
        self.check(offset, T::SIZE as usize)?;
        if offset % T::SIZE as usize != 0 {
            return Err(Error::OutOfBounds {
                region: format!("DMA buffer at IOVA {:#x} (misaligned)", self.iova),
                offset: offset as u64,
                size: T::SIZE as u64,
                len: self.size as u64,
            });
        }
        Ok(())
    }

    /// Copies the whole buffer out.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0; self.size];
        // The range is the whole buffer, so this cannot fail.
        let _ = self.read(0, &mut out);
        out
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        let Some(memory) = self.memory.take() else {
            return;
        };
        let len = memory.len();
        match self.space.mapper.unmap(self.iova, len) {
            Ok(()) => {
                self.space.free_iova(self.iova, len);
                drop(memory);
            }
            Err(error) => {
                // The device may still reach the memory: keep it allocated for ever.
                tracing::error!(iova = self.iova, %error, "DMA unmap failed; leaking the buffer");
                std::mem::forget(memory);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn allocations_are_aligned_and_under_the_mask() {
        let mut a = IovaAllocator::for_mask(28);
        let x = a.alloc(0x1000, 0x1000).unwrap();
        let y = a.alloc(0x3000, 0x10000).unwrap();
        assert_eq!(x, 0x1_0000);
        assert_eq!(y % 0x10000, 0);
        assert!(y >= x + 0x1000);
        assert!(y + 0x3000 <= 1 << 28);
    }

    #[test]
    fn exhaustion_is_an_error_and_freed_space_is_reused() {
        let mut a = IovaAllocator::new(&[(0x1000, 0x5000)], 64);
        let blocks: Vec<u64> = (0..4).map(|_| a.alloc(0x1000, 0x1000).unwrap()).collect();
        assert!(matches!(
            a.alloc(0x1000, 0x1000),
            Err(Error::IovaExhausted { .. })
        ));
        a.free(blocks[1], 0x1000);
        a.free(blocks[2], 0x1000);
        // The two freed neighbours merged: a two-page block fits where they were.
        assert_eq!(a.alloc(0x2000, 0x1000).unwrap(), blocks[1]);
        assert_eq!(a.free_bytes(), 0);
    }

    #[test]
    fn the_msi_window_is_never_handed_out() {
        let mut a = IovaAllocator::for_mask(32);
        let mut last = 0;
        while let Ok(iova) = a.alloc(0x100_0000, 0x100_0000) {
            assert!(
                iova + 0x100_0000 <= 0xfee0_0000 || iova >= 0xfef0_0000,
                "{iova:#x}"
            );
            last = iova;
        }
        assert!(last > 0);
    }

    #[test]
    fn bad_requests_are_refused() {
        let mut a = IovaAllocator::for_mask(32);
        assert!(a.alloc(0, 0x1000).is_err());
        assert!(a.alloc(0x1000, 0x3000).is_err());
    }

    proptest! {
        #[test]
        fn live_allocations_never_overlap(ops in proptest::collection::vec((1u64..6, any::<bool>()), 1..60)) {
            let mut a = IovaAllocator::new(&[(0x1000, 0x40_0000)], 64);
            let total = a.free_bytes();
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (pages, free_one) in ops {
                if free_one && !live.is_empty() {
                    let (iova, size) = live.remove(0);
                    a.free(iova, size);
                } else if let Ok(iova) = a.alloc(pages * 0x1000, 0x1000) {
                    prop_assert_eq!(iova % 0x1000, 0);
                    for &(other, size) in &live {
                        prop_assert!(iova + pages * 0x1000 <= other || other + size <= iova);
                    }
                    live.push((iova, pages * 0x1000));
                }
            }
            for (iova, size) in live.drain(..) {
                a.free(iova, size);
            }
            prop_assert_eq!(a.free_bytes(), total);
        }
    }
}
