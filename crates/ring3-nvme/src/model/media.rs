//! A namespace's media: logical blocks kept sparsely in memory, so a large namespace costs
//! only what was written. Blocks never written, or deallocated, read as zeroes.

use std::collections::HashMap;

/// The smallest unit of storage: 4 KiB, or one block if blocks are larger.
const MIN_CHUNK: u64 = 4096;

#[derive(Debug)]
pub(super) struct Namespace {
    blocks: u64,
    block_size: u32,
    chunk_size: u64,
    chunks: HashMap<u64, Box<[u8]>>,
}

impl Namespace {
    /// An empty namespace of `blocks` blocks of `block_size` bytes.
    ///
    /// # Panics
    /// If `block_size` is not a power of two from 512 to 65536, or the namespace is empty
    /// or larger than 64 bits of bytes (test set-up mistakes, never device input).
    pub fn new(blocks: u64, block_size: u32) -> Self {
        assert!(
            block_size.is_power_of_two() && (512..=65536).contains(&block_size),
            "block size {block_size} is not a power of two from 512 to 65536"
        );
        assert!(
            blocks > 0 && blocks.checked_mul(u64::from(block_size)).is_some(),
            "a namespace of {blocks} blocks of {block_size} bytes"
        );
        Namespace {
            blocks,
            block_size,
            chunk_size: MIN_CHUNK.max(u64::from(block_size)),
            chunks: HashMap::new(),
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// log2 of the block size (LBADS).
    pub fn block_shift(&self) -> u8 {
        self.block_size.trailing_zeros() as u8
    }

    /// Whether `count` blocks from `lba` lie inside the namespace.
    pub fn contains(&self, lba: u64, count: u64) -> bool {
        lba.checked_add(count).is_some_and(|end| end <= self.blocks)
    }

    /// Blocks that hold data (NUSE), counted in whole storage chunks.
    pub fn blocks_in_use(&self) -> u64 {
        let per_chunk = self.chunk_size / u64::from(self.block_size);
        (self.chunks.len() as u64)
            .saturating_mul(per_chunk)
            .min(self.blocks)
    }

    /// Splits `offset..offset + len` into (chunk index, offset in chunk, length) pieces.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> {
        let chunk = self.chunk_size;
        let end = offset.saturating_add(len);
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let inside = at % chunk;
            let take = (chunk - inside).min(end - at);
            let piece = (at / chunk, inside as usize, take as usize);
            at += take;
            Some(piece)
        })
    }

    /// Reads bytes from byte `offset` (the caller checked the range).
    pub fn read(&self, offset: u64, out: &mut [u8]) {
        let mut at = 0;
        for (index, inside, len) in self.pieces(offset, out.len() as u64) {
            let target = &mut out[at..at + len];
            match self.chunks.get(&index) {
                Some(chunk) => target.copy_from_slice(&chunk[inside..inside + len]),
                None => target.fill(0),
            }
            at += len;
        }
    }

    /// Writes bytes at byte `offset` (the caller checked the range).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let chunk_size = self.chunk_size as usize;
        let mut at = 0;
        for (index, inside, len) in self.pieces(offset, data.len() as u64) {
            let chunk = self
                .chunks
                .entry(index)
                .or_insert_with(|| vec![0; chunk_size].into_boxed_slice());
            chunk[inside..inside + len].copy_from_slice(&data[at..at + len]);
            at += len;
        }
    }

    /// Zeroes (deallocates) `len` bytes from byte `offset` (the caller checked the range).
    pub fn zero(&mut self, offset: u64, len: u64) {
        let chunk = self.chunk_size;
        let end = offset.saturating_add(len);
        // Chunks wholly inside the range are dropped without visiting every index, so
        // deallocating a whole large namespace is quick.
        let first_whole = offset.div_ceil(chunk);
        let end_whole = end / chunk;
        if first_whole < end_whole {
            self.chunks
                .retain(|index, _| !(first_whole..end_whole).contains(index));
        }
        let edges = [
            (offset, (first_whole * chunk).min(end)),
            ((end_whole * chunk).max(offset), end),
        ];
        for (from, to) in edges {
            if from >= to {
                continue;
            }
            for (index, inside, len) in self.pieces(from, to - from) {
                if let Some(data) = self.chunks.get_mut(&index) {
                    data[inside..inside + len].fill(0);
                    if data.iter().all(|&b| b == 0) {
                        self.chunks.remove(&index);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_survives_and_zeroing_frees_whole_chunks() {
        let mut namespace = Namespace::new(1 << 30, 512);
        namespace.write(4000, &[7; 200]);
        let mut out = [1u8; 300];
        namespace.read(3950, &mut out);
        assert!(out[..50].iter().all(|&b| b == 0));
        assert!(out[50..250].iter().all(|&b| b == 7));
        assert!(out[250..].iter().all(|&b| b == 0));
        assert_eq!(namespace.blocks_in_use(), 16, "two 4 KiB chunks");

        namespace.zero(4050, 100);
        namespace.read(3950, &mut out);
        assert!(out[100..200].iter().all(|&b| b == 0));
        assert_eq!(out[99], 7);
        namespace.zero(0, (1 << 30) * 512);
        assert_eq!(namespace.blocks_in_use(), 0);
    }
}
