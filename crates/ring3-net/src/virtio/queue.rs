//! Split virtqueues (virtio 1.2 §2.7): a descriptor table, the driver's available ring
//! and the device's used ring, in one DMA buffer.
//!
//! The queue remembers which descriptors are in flight and what each one carries (a
//! token), in driver memory the device cannot reach. What the device writes (the used
//! index, and the ID and length of each used element) is checked against that record
//! before anything is handed back.

use std::sync::atomic::{fence, Ordering};

use ring3::{Backend, DmaBuffer};

use crate::error::Result;

/// Descriptor flag: the chain continues in `next` (§2.7.5).
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (otherwise it reads it).
pub const DESC_F_WRITE: u16 = 2;
/// Available-ring flag: the driver does not want interrupts (§2.7.7).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used-ring flag: the device does not want notifications (§2.7.10).
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Largest split queue (§2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;

const DESCRIPTOR_SIZE: usize = 16;
const USED_ELEMENT_SIZE: usize = 8;

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy)]
pub struct BufferSpec {
    /// Device address.
    pub iova: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it.
    pub device_writes: bool,
}

/// A used element that passed the checks.
#[derive(Debug)]
pub struct Used<T> {
    /// What the chain carried.
    pub token: T,
    /// Bytes the device says it wrote.
    pub len: u32,
}

/// A split virtqueue of `size` entries (a power of two).
#[derive(Debug)]
pub struct SplitQueue<T> {
    /// The queue's index on its device, for messages.
    index: u16,
    size: u16,
    memory: DmaBuffer,
    avail_offset: usize,
    used_offset: usize,
    /// Free descriptor IDs.
    free: Vec<u16>,
    /// Per head descriptor: what it carries, while in flight.
    tokens: Vec<Option<T>>,
    /// Per descriptor: the next one of its chain, as the driver wrote it (the device could
    /// overwrite the table; this copy it cannot).
    chain_next: Vec<Option<u16>>,
    /// Chains in flight.
    in_flight: u16,
    /// The available index the driver has written so far (wrapping).
    avail_idx: u16,
    /// The available index last made visible to the device.
    published_idx: u16,
    /// The used index up to which elements were taken (wrapping).
    last_used: u16,
}

impl<T> SplitQueue<T> {
    /// Allocates and zeroes the rings for queue `index` of `size` entries.
    pub fn new<B: Backend>(backend: &B, index: u16, size: u16) -> Result<SplitQueue<T>> {
        let entries = usize::from(size);
        // §2.7: descriptor table 16-byte aligned, available ring 2, used ring 4.
        let avail_offset = DESCRIPTOR_SIZE * entries;
        let avail_len = 6 + 2 * entries;
        let used_offset = (avail_offset + avail_len).next_multiple_of(64);
        let used_len = 6 + USED_ELEMENT_SIZE * entries;
        let memory = backend.dma_alloc(used_offset + used_len)?;
        memory.fill(0);
        Ok(SplitQueue {
            index,
            size,
            memory,
            avail_offset,
            used_offset,
            free: (0..size).rev().collect(),
            tokens: (0..size).map(|_| None).collect(),
            chain_next: vec![None; entries],
            in_flight: 0,
            avail_idx: 0,
            published_idx: 0,
            last_used: 0,
        })
    }

    /// Entries in the queue.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The queue's index on its device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Device address of the descriptor table.
    pub fn desc_iova(&self) -> u64 {
        self.memory.iova()
    }

    /// Device address of the available ring ("driver area").
    pub fn avail_iova(&self) -> u64 {
        self.memory.iova() + self.avail_offset as u64
    }

    /// Device address of the used ring ("device area").
    pub fn used_iova(&self) -> u64 {
        self.memory.iova() + self.used_offset as u64
    }

    /// Descriptors not in flight.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Tells the device whether to interrupt when it uses buffers (a hint, §2.7.7).
    pub fn set_interrupts(&mut self, wanted: bool) -> Result<()> {
        let flags = if wanted { 0 } else { AVAIL_F_NO_INTERRUPT };
        self.memory.write_volatile(self.avail_offset, flags)?;
        Ok(())
    }

    /// Writes a chain of `buffers` and puts its head in the next available slot; the device
    /// sees it after [`SplitQueue::publish`]. The token comes back as the error (and nothing
    /// is written) if there are not enough free descriptors; otherwise `token` comes back from [`SplitQueue::pop_used`].
    pub fn push(&mut self, buffers: &[BufferSpec], token: T) -> Result<u16, T> {
        if buffers.is_empty() || buffers.len() > self.free.len() {
            return Err(token);
        }
        let start = self.free.len() - buffers.len();
        let ids: Vec<u16> = self.free.drain(start..).rev().collect();
        for (i, (buffer, &id)) in buffers.iter().zip(&ids).enumerate() {
            let next = ids.get(i + 1).copied();
            let mut flags = 0;
            if buffer.device_writes {
                flags |= DESC_F_WRITE;
            }
            if next.is_some() {
                flags |= DESC_F_NEXT;
            }
            let at = usize::from(id) * DESCRIPTOR_SIZE;
            // In bounds: id < size and the table is size * 16 bytes.
            let _ = self.memory.write_volatile(at, buffer.iova);
            let _ = self.memory.write_volatile(at + 8, buffer.len);
            let _ = self.memory.write_volatile(at + 12, flags);
            let _ = self.memory.write_volatile(at + 14, next.unwrap_or(0));
            self.chain_next[usize::from(id)] = next;
        }
        let head = ids[0];
        self.tokens[usize::from(head)] = Some(token);
        let slot = usize::from(self.avail_idx % self.size);
        let _ = self
            .memory
            .write_volatile(self.avail_offset + 4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.in_flight += 1;
        Ok(head)
    }

    /// Makes the chains pushed since the last call visible to the device; returns whether
    /// the device wants a notification (it has not set `VIRTQ_USED_F_NO_NOTIFY`). False
    /// when there was nothing new.
    pub fn publish(&mut self) -> bool {
        if self.avail_idx == self.published_idx {
            return false;
        }
        // The descriptors and ring slots must be visible before the index that covers
        // them (§2.7.13.3.1).
        fence(Ordering::Release);
        let _ = self
            .memory
            .write_volatile(self.avail_offset + 2, self.avail_idx);
        self.published_idx = self.avail_idx;
        // The index store must be visible before we read the device's flags, or we could
        // miss a notification the device wants (§2.7.13.4); the caller's notify write is
        // ordered after this too.
        fence(Ordering::SeqCst);
        let flags: u16 = self.memory.read_volatile(self.used_offset).unwrap_or(0);
        flags & USED_F_NO_NOTIFY == 0
    }

    /// How many used elements the device has published and the driver not yet taken.
    /// A used index that ran ahead of what is in flight is the device's error.
    pub fn used_pending(&self) -> Result<u16, String> {
        let used_idx: u16 = self
            .memory
            .read_volatile(self.used_offset + 2)
            .map_err(|e| e.to_string())?;
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending > self.in_flight {
            return Err(format!(
                "queue {}: used index {used_idx} is {pending} past the last one taken \
                 ({}), but only {} buffers are in flight",
                self.index, self.last_used, self.in_flight
            ));
        }
        Ok(pending)
    }

    /// Takes the next used element (the caller checked [`SplitQueue::used_pending`]); its
    /// ID must be the head of a chain in flight.
    pub fn pop_used(&mut self) -> Result<Used<T>, String> {
        // The element must be read after the used index that covers it.
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        let at = self.used_offset + 4 + USED_ELEMENT_SIZE * slot;
        let id: u32 = self.memory.read_volatile(at).map_err(|e| e.to_string())?;
        let len: u32 = self
            .memory
            .read_volatile(at + 4)
            .map_err(|e| e.to_string())?;
        let token = usize::try_from(id)
            .ok()
            .and_then(|i| self.tokens.get_mut(i))
            .and_then(Option::take)
            .ok_or_else(|| {
                format!(
                    "queue {}: used element {} names descriptor {id}, which is not the head \
                     of a buffer in flight (queue size {})",
                    self.index, self.last_used, self.size
                )
            })?;
        // Free the chain by the driver's own record of it.
        let mut next = u16::try_from(id).ok();
        while let Some(descriptor) = next {
            self.free.push(descriptor);
            next = self.chain_next[usize::from(descriptor)].take();
        }
        self.last_used = self.last_used.wrapping_add(1);
        self.in_flight -= 1;
        Ok(Used { token, len })
    }
}
