//! Descriptor rings: 16-byte legacy descriptors in one DMA buffer, and which packet
//! buffer the device holds in each slot.
//!
//! A ring of `entries` slots is shared with the device through a head (the device's next
//! slot) and a tail (one past software's last posted slot); head == tail means the device
//! owns nothing, so at most `entries - 1` slots are posted at a time (82574 datasheet
//! 7.1.8, "Receive Descriptor Queue Structure", and its transmit counterpart). Software tracks its side alone: the
//! oldest slot the device owns (`next_to_clean`) and how many it owns (`in_flight`);
//! completions are found by the DD bit the device writes into each descriptor, so the
//! head register is never needed on the data path.
//!
//! Descriptors are read and written with volatile accesses only; nothing the device
//! writes is kept as a Rust reference.

use std::sync::atomic::{fence, Ordering};

use ring3::{Backend, DmaBuffer};

use crate::error::{Error, Result};

/// Bytes per descriptor (legacy and extended formats alike).
pub const DESCRIPTOR_SIZE: usize = 16;

/// The descriptor's second quadword: status (bits 39:32) bit 0, "descriptor done", in
/// both the legacy receive and the legacy transmit format.
pub const DD: u64 = 1 << 32;

/// Legacy receive descriptor, second quadword (7.1.4): length 15:0, checksum 31:16,
/// status 39:32, errors 47:40, special 63:48.
pub mod rx {
    /// Status: descriptor done.
    pub const STATUS_DD: u8 = 1 << 0;
    /// Status: end of packet.
    pub const STATUS_EOP: u8 = 1 << 1;
    /// Errors: CRC or alignment error.
    pub const ERROR_CE: u8 = 1 << 0;
    /// Errors: symbol error.
    pub const ERROR_SE: u8 = 1 << 1;
    /// Errors: sequence error.
    pub const ERROR_SEQ: u8 = 1 << 2;
    /// Errors: carrier extension error.
    pub const ERROR_CXE: u8 = 1 << 4;
    /// Errors: RX data error.
    pub const ERROR_RXE: u8 = 1 << 7;
    /// The error bits that mean the frame itself is bad (the TCP/IP checksum bits only
    /// report offload results, which this driver does not use).
    pub const FRAME_ERRORS: u8 = ERROR_CE | ERROR_SE | ERROR_SEQ | ERROR_CXE | ERROR_RXE;

    /// A written-back legacy receive descriptor's second quadword, decoded.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Completion {
        /// Bytes the device wrote into the buffer.
        pub length: u16,
        /// Status bits.
        pub status: u8,
        /// Error bits.
        pub errors: u8,
    }

    impl Completion {
        /// Decodes the second quadword.
        pub fn decode(word: u64) -> Completion {
            Completion {
                length: word as u16,
                status: (word >> 32) as u8,
                errors: (word >> 40) as u8,
            }
        }

        /// Encodes it (for the device model).
        pub fn encode(self) -> u64 {
            u64::from(self.length) | (u64::from(self.status) << 32) | (u64::from(self.errors) << 40)
        }
    }
}

/// Legacy transmit descriptor, second quadword (7.2.10.1): length 15:0, CSO 23:16,
/// command 31:24, status 39:32, CSS 47:40, special 63:48.
pub mod tx {
    /// Command: end of packet.
    pub const CMD_EOP: u8 = 1 << 0;
    /// Command: insert the FCS.
    pub const CMD_IFCS: u8 = 1 << 1;
    /// Command: insert a checksum.
    pub const CMD_IC: u8 = 1 << 2;
    /// Command: report status (write DD back when done).
    pub const CMD_RS: u8 = 1 << 3;
    /// Command: extended descriptor (clear: legacy).
    pub const CMD_DEXT: u8 = 1 << 5;
    /// Command: insert a VLAN tag.
    pub const CMD_VLE: u8 = 1 << 6;
    /// Status: descriptor done.
    pub const STATUS_DD: u8 = 1 << 0;

    /// The second quadword of a legacy descriptor sending `length` bytes with `command`.
    pub fn encode(length: u16, command: u8) -> u64 {
        u64::from(length) | (u64::from(command) << 24)
    }

    /// Length and command of a second quadword (for the device model).
    pub fn decode(word: u64) -> (u16, u8, u8) {
        (word as u16, (word >> 24) as u8, (word >> 32) as u8)
    }
}

/// One descriptor ring and the buffers posted in it.
#[derive(Debug)]
pub struct DescriptorRing {
    memory: DmaBuffer,
    entries: u16,
    /// The pool buffer each slot holds while the device owns it.
    slots: Vec<Option<u32>>,
    /// The oldest slot the device owns: the next to complete.
    next_to_clean: u16,
    /// How many slots the device owns, from `next_to_clean` on.
    in_flight: u16,
}

impl DescriptorRing {
    /// A zeroed ring of `entries` descriptors for `backend`'s device.
    pub fn new<B: Backend>(backend: &B, entries: u16) -> Result<DescriptorRing> {
        if entries < 8 || entries % 8 != 0 {
            return Err(Error::InvalidArgument(format!(
                "a descriptor ring needs a multiple of 8 entries (128 bytes), at least 8: {entries}"
            )));
        }
        let memory = backend.dma_alloc(usize::from(entries) * DESCRIPTOR_SIZE)?;
        Ok(DescriptorRing {
            memory,
            entries,
            slots: vec![None; usize::from(entries)],
            next_to_clean: 0,
            in_flight: 0,
        })
    }

    /// The ring's device address.
    pub fn iova(&self) -> u64 {
        self.memory.iova()
    }

    /// The ring's length in bytes, for RDLEN/TDLEN.
    pub fn byte_len(&self) -> u32 {
        u32::from(self.entries) * DESCRIPTOR_SIZE as u32
    }

    /// Slots in the ring.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// Slots the device owns now.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// Slots software may still post (one always stays empty).
    pub fn free_slots(&self) -> u16 {
        self.entries - 1 - self.in_flight
    }

    /// One past the last posted slot: the value for the tail register.
    pub fn tail(&self) -> u16 {
        ((u32::from(self.next_to_clean) + u32::from(self.in_flight)) % u32::from(self.entries))
            as u16
    }

    /// The oldest slot the device owns.
    pub fn next_to_clean(&self) -> u16 {
        self.next_to_clean
    }

    fn offset(&self, slot: u16) -> usize {
        usize::from(slot) * DESCRIPTOR_SIZE
    }

    /// Writes the descriptor at the tail (buffer address `address`, second quadword
    /// `word`) and gives the slot, holding pool buffer `buffer`, to the device. The
    /// device sees it once the tail register moves past it. The caller checked
    /// [`DescriptorRing::free_slots`].
    pub fn post(&mut self, buffer: u32, address: u64, word: u64) -> Result<()> {
        if self.free_slots() == 0 {
            return Err(Error::InvalidArgument("descriptor ring is full".into()));
        }
        let slot = self.tail();
        let offset = self.offset(slot);
        self.memory.write_volatile(offset, address)?;
        self.memory.write_volatile(offset + 8, word)?;
        self.slots[usize::from(slot)] = Some(buffer);
        self.in_flight += 1;
        Ok(())
    }

    /// The second quadword of the oldest slot the device owns, if the device has marked
    /// it done. The read of the rest of the descriptor and of the buffer is ordered after
    /// the DD bit.
    pub fn peek_done(&self) -> Result<Option<u64>> {
        if self.in_flight == 0 {
            return Ok(None);
        }
        let word: u64 = self
            .memory
            .read_volatile(self.offset(self.next_to_clean) + 8)?;
        if word & DD == 0 {
            return Ok(None);
        }
        // The device writes the buffer and the descriptor before it sets DD; reads of
        // either must not be satisfied from before the DD read.
        fence(Ordering::Acquire);
        Ok(Some(word))
    }

    /// Takes the oldest slot back from the device after [`DescriptorRing::peek_done`]
    /// said it is done: clears its status (so a stale DD cannot be seen again) and
    /// returns the pool buffer it held.
    pub fn complete(&mut self) -> Result<Option<u32>> {
        if self.in_flight == 0 {
            return Ok(None);
        }
        let slot = self.next_to_clean;
        self.memory.write_volatile(self.offset(slot) + 8, 0u64)?;
        let buffer = self.slots[usize::from(slot)].take();
        self.next_to_clean = (slot + 1) % self.entries;
        self.in_flight -= 1;
        Ok(buffer)
    }

    /// Whether the device has set DD in the first slot it does not own (the tail), which
    /// it may never write: a sign it runs past the tail.
    pub fn unposted_slot_done(&self) -> Result<Option<u16>> {
        let slot = self.tail();
        let word: u64 = self.memory.read_volatile(self.offset(slot) + 8)?;
        Ok((word & DD != 0).then_some(slot))
    }

    /// Whether a head value read from the device lies inside the ring.
    pub fn head_in_ring(&self, head: u32) -> bool {
        head < u32::from(self.entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn receive_descriptor_words_round_trip() {
        let completion = rx::Completion {
            length: 1514,
            status: rx::STATUS_DD | rx::STATUS_EOP,
            errors: rx::ERROR_CE,
        };
        let word = completion.encode();
        assert_ne!(word & DD, 0);
        assert_eq!(rx::Completion::decode(word), completion);
    }

    #[test]
    fn transmit_descriptor_words_carry_length_and_command() {
        let word = tx::encode(60, tx::CMD_EOP | tx::CMD_IFCS | tx::CMD_RS);
        assert_eq!(word, 60 | (0x0b << 24));
        assert_eq!(tx::decode(word), (60, 0x0b, 0));
    }

    proptest! {
        #[test]
        fn any_second_quadword_decodes_without_panicking(word in any::<u64>()) {
            let completion = rx::Completion::decode(word);
            prop_assert_eq!(completion.status & rx::STATUS_DD != 0, word & DD != 0);
            prop_assert_eq!(u64::from(completion.length), word & 0xffff);
        }
    }
}
