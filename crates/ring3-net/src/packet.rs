//! Packet buffers: one DMA allocation per queue, cut into fixed-size buffers.

use ring3::{Backend, DmaBuffer};

use crate::error::{Error, Result};

/// One frame's buffer, owned by whoever holds this handle: the caller, or (inside a
/// queue) the device. Not `Clone`: a buffer has one owner at a time.
#[derive(Debug, PartialEq, Eq)]
pub struct Packet {
    index: u32,
    len: u32,
}

impl Packet {
    /// A handle to buffer `index` holding `len` bytes; only drivers make these.
    pub(crate) fn new(index: u32, len: u32) -> Packet {
        Packet { index, len }
    }

    /// Which buffer of its pool this is.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The frame's length in bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the frame is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the frame's length (checked against the buffer when it is transmitted).
    pub fn set_len(&mut self, len: usize) {
        self.len = u32::try_from(len).unwrap_or(u32::MAX);
    }
}

/// A queue's packet buffers: `count` buffers of `buffer_size` bytes in one DMA buffer,
/// and the list of the free ones. No locks: a pool belongs to one queue.
#[derive(Debug)]
pub struct PacketPool {
    memory: DmaBuffer,
    buffer_size: usize,
    count: u32,
    free: Vec<u32>,
    /// Which buffers are out of the pool (with the caller or the device), to catch a
    /// buffer freed twice.
    taken: Vec<bool>,
}

impl PacketPool {
    /// Allocates `count` buffers of `buffer_size` bytes (rounded up to 64) for `backend`'s
    /// device.
    pub fn new<B: Backend>(backend: &B, count: u32, buffer_size: usize) -> Result<PacketPool> {
        if count == 0 || buffer_size == 0 {
            return Err(Error::InvalidArgument(format!(
                "a packet pool needs buffers: {count} of {buffer_size} bytes"
            )));
        }
        let buffer_size = buffer_size.next_multiple_of(64);
        let bytes = (count as usize)
            .checked_mul(buffer_size)
            .ok_or_else(|| Error::InvalidArgument("the packet pool is too large".into()))?;
        let memory = backend.dma_alloc(bytes)?;
        Ok(PacketPool {
            memory,
            buffer_size,
            count,
            free: (0..count).rev().collect(),
            taken: vec![false; count as usize],
        })
    }

    /// Bytes per buffer.
    pub fn buffer_size(&self) -> usize {
        self.buffer_size
    }

    /// How many buffers the pool has in all.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// How many are free now.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// A free buffer, empty.
    pub fn alloc(&mut self) -> Option<Packet> {
        let index = self.free.pop()?;
        self.taken[index as usize] = true;
        Some(Packet::new(index, 0))
    }

    /// Takes a buffer back. A handle from another pool, or one already freed, is an
    /// error (and the buffer is not put on the free list twice).
    pub fn free(&mut self, packet: Packet) -> Result<()> {
        let index = packet.index;
        match self.taken.get_mut(index as usize) {
            Some(taken) if *taken => {
                *taken = false;
                self.free.push(index);
                Ok(())
            }
            _ => Err(Error::InvalidArgument(format!(
                "packet buffer {index} does not belong to this pool or is already free"
            ))),
        }
    }

    /// The device address of a buffer.
    pub fn iova(&self, packet: &Packet) -> u64 {
        self.iova_of(packet.index)
    }

    /// The device address of buffer `index` (`index` below [`PacketPool::count`]).
    pub fn iova_of(&self, index: u32) -> u64 {
        self.memory.iova() + u64::from(index) * self.buffer_size as u64
    }

    /// The buffer index for a device address, if it is the start of one of this pool's
    /// buffers (for checking what a device hands back).
    pub fn index_of(&self, iova: u64) -> Option<u32> {
        let offset = iova.checked_sub(self.memory.iova())?;
        let size = self.buffer_size as u64;
        if offset % size != 0 {
            return None;
        }
        u32::try_from(offset / size)
            .ok()
            .filter(|i| *i < self.count)
    }

    /// The frame's bytes (its length, at most the buffer).
    pub fn data(&self, packet: &Packet) -> &[u8] {
        let len = packet.len().min(self.buffer_size);
        &self.buffer(packet.index)[..len]
    }

    /// The whole buffer, to write a frame into.
    pub fn data_mut(&mut self, packet: &mut Packet) -> &mut [u8] {
        let index = packet.index;
        self.buffer_mut(index)
    }

    fn buffer(&self, index: u32) -> &[u8] {
        let index = (index as usize).min(self.count as usize - 1);
        // SAFETY: the pool's memory is `count * buffer_size` bytes, alive as long as
        // `self`; buffer `index` is within it. The buffer is with the caller (a Packet
        // handle only exists outside the device), so the device does not write it while
        // the slice lives, unless it breaks the protocol — and then the IOMMU still keeps
        // it inside this pool.
        unsafe {
            std::slice::from_raw_parts(
                self.memory.as_mut_ptr().add(index * self.buffer_size),
                self.buffer_size,
            )
        }
    }

    fn buffer_mut(&mut self, index: u32) -> &mut [u8] {
        let index = (index as usize).min(self.count as usize - 1);
        // SAFETY: as in `buffer`; `&mut self` makes this the only slice of the pool.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.memory.as_mut_ptr().add(index * self.buffer_size),
                self.buffer_size,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring3::fake::{DeviceModel, FakeBackend, FakeDevice};

    /// A device with no registers: only its DMA space matters here.
    struct Nothing;

    impl DeviceModel for Nothing {
        fn bar_len(&self, _: u8) -> Option<usize> {
            None
        }
        fn bar_read(&self, _: u8, _: u64, _: u8) -> u64 {
            0
        }
        fn bar_write(&self, _: u8, _: u64, _: u8, _: u64) {}
    }

    fn pool(count: u32, size: usize) -> PacketPool {
        let device = FakeDevice {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            class_code: 0x02_00_00,
        };
        let backend = FakeBackend::new("pool", device, |_| Nothing);
        PacketPool::new(&backend, count, size).unwrap()
    }

    #[test]
    fn buffers_are_handed_out_once_and_come_back() {
        let mut pool = pool(4, 2000);
        assert_eq!(pool.buffer_size(), 2048);
        let packets: Vec<Packet> = (0..4).map(|_| pool.alloc().unwrap()).collect();
        assert!(pool.alloc().is_none());
        let iovas: Vec<u64> = packets.iter().map(|p| pool.iova(p)).collect();
        for (p, iova) in packets.iter().zip(&iovas) {
            assert_eq!(pool.index_of(*iova), Some(p.index()));
        }
        assert_eq!(pool.index_of(iovas[0] + 1), None);
        assert_eq!(pool.index_of(iovas[0] + 4 * 2048), None);
        for p in packets {
            pool.free(p).unwrap();
        }
        assert_eq!(pool.free_count(), 4);
    }

    #[test]
    fn a_double_free_is_refused() {
        let mut pool = pool(2, 64);
        let p = pool.alloc().unwrap();
        let forged = Packet::new(p.index(), 0);
        pool.free(p).unwrap();
        assert!(pool.free(forged).is_err());
        assert!(pool.free(Packet::new(7, 0)).is_err());
        assert_eq!(pool.free_count(), 2);
    }

    #[test]
    fn frames_are_written_and_read_in_place() {
        let mut pool = pool(2, 128);
        let mut p = pool.alloc().unwrap();
        pool.data_mut(&mut p)[..5].copy_from_slice(b"hello");
        p.set_len(5);
        assert_eq!(pool.data(&p), b"hello");
        p.set_len(10_000);
        assert_eq!(pool.data(&p).len(), 128, "never past the buffer");
    }
}
