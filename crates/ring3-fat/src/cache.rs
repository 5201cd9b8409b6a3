//! The device under the file system and the block cache in front of it.
//!
//! fatfs reads and writes a few bytes at a time at arbitrary offsets (a FAT entry, a
//! directory entry). Block devices want whole, aligned blocks — with `O_DIRECT` they refuse
//! anything else — so every access goes through [`BlockCache`], which only ever moves whole
//! [`CHUNK_SIZE`] chunks (aligned to 4096 bytes in memory and on the device) and keeps
//! written chunks until [`BlockCache::write_back`] or [`BlockCache::sync`].
//!
//! Why not `fscommon::BufStream`: it holds one buffer, reads and writes the device at whatever
//! offset fatfs asks for (unaligned), and flushes on every seek, which for FAT updates means
//! a device write for every few bytes changed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

/// Bytes the cache reads and writes at a time; a multiple of every logical block size.
pub const CHUNK_SIZE: usize = 64 * 1024;
/// Alignment of chunk buffers in memory (what `O_DIRECT` needs on any block size ≤ 4 KiB).
const MEMORY_ALIGNMENT: usize = 4096;
/// Chunks kept by default: 32 MiB.
pub const DEFAULT_CACHE_CHUNKS: usize = 512;

/// What the file system is stored on: a block device, an image file, or memory.
///
/// Offsets and lengths passed by [`BlockCache`] are multiples of [`CHUNK_SIZE`], except for a
/// final chunk cut short by the end of the device.
pub trait BlockDevice {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes everything written so far durable (fsync; for a USB stick, SYNCHRONIZE CACHE).
    fn sync(&mut self) -> io::Result<()>;
}

/// A block device node (`/dev/ublkb0`, `/dev/sdb`) or an image file.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    size: u64,
    path: PathBuf,
}

impl FileDevice {
    /// Opens `path` read-write (or read-only), optionally with `O_DIRECT` so the kernel's page
    /// cache is bypassed and only this process caches the device.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> io::Result<Self> {
        let mut options = OpenOptions::new();
        options.read(true).write(!read_only);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let mut file = options.open(path)?;
        let metadata = file.metadata()?;
        let file_type = metadata.file_type();
        if !file_type.is_file() && !file_type.is_block_device() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a block device or a regular file",
            ));
        }
        // Seeking to the end gives the size of block devices too (metadata says 0 for them).
        let size = file.seek(SeekFrom::End(0))?;
        Ok(Self {
            file,
            size,
            path: path.to_path_buf(),
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_all()
    }
}

/// A device in memory that, like a block device opened with `O_DIRECT`, refuses I/O that is
/// not aligned to its sector size. The bytes are shared, so a test can look at the image
/// while or after a [`crate::FatFs`] uses it.
#[derive(Debug, Clone)]
pub struct MemDevice {
    bytes: Arc<Mutex<Vec<u8>>>,
    sector_size: usize,
    /// Number of `sync` calls, to check that flushing reaches the device.
    syncs: Arc<Mutex<u64>>,
}

impl MemDevice {
    /// A device holding `bytes` with 512-byte sectors.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self {
            bytes: Arc::new(Mutex::new(bytes)),
            sector_size: 512,
            syncs: Arc::new(Mutex::new(0)),
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        lock(&self.bytes).clone()
    }

    /// How many times `sync` was called.
    pub fn sync_count(&self) -> u64 {
        *lock(&self.syncs)
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        let size = lock(&self.bytes).len() as u64;
        let sector = self.sector_size as u64;
        if offset % sector != 0 || len as u64 % sector != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if offset + len as u64 > size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "access beyond the end of the device",
            ));
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        lock(&self.bytes).len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let bytes = lock(&self.bytes);
        let start = offset as usize;
        buf.copy_from_slice(&bytes[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let mut bytes = lock(&self.bytes);
        let start = offset as usize;
        bytes[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        *lock(&self.syncs) += 1;
        Ok(())
    }
}

/// A buffer whose usable part starts at a [`MEMORY_ALIGNMENT`] boundary.
struct AlignedBuffer {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuffer {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + MEMORY_ALIGNMENT];
        let start = storage.as_ptr().align_offset(MEMORY_ALIGNMENT);
        Self {
            storage,
            start,
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

struct Chunk {
    buffer: AlignedBuffer,
    dirty: bool,
    last_used: u64,
}

/// A write-back cache of whole chunks of a [`BlockDevice`], least recently used out first.
pub struct BlockCache<D: BlockDevice> {
    device: D,
    size: u64,
    chunks: HashMap<u64, Chunk>,
    capacity: usize,
    clock: u64,
}

impl<D: BlockDevice> BlockCache<D> {
    /// A cache of up to `capacity` chunks (at least 2) of `device`.
    pub fn new(device: D, capacity: usize) -> Self {
        let size = device.size();
        Self {
            device,
            size,
            chunks: HashMap::new(),
            capacity: capacity.max(2),
            clock: 0,
        }
    }

    /// Size of the device in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn chunk_len(&self, index: u64) -> usize {
        let start = index * CHUNK_SIZE as u64;
        (self.size - start).min(CHUNK_SIZE as u64) as usize
    }

    /// The chunk `index`, read from the device unless `overwrite` says the caller is about to
    /// replace all of it.
    fn chunk(&mut self, index: u64, overwrite: bool) -> io::Result<&mut Chunk> {
        self.clock += 1;
        let clock = self.clock;
        if !self.chunks.contains_key(&index) {
            if self.chunks.len() >= self.capacity {
                self.evict()?;
            }
            let len = self.chunk_len(index);
            let mut buffer = AlignedBuffer::new(len);
            if !overwrite {
                self.device
                    .read_at(index * CHUNK_SIZE as u64, buffer.bytes_mut())?;
            }
            self.chunks.insert(
                index,
                Chunk {
                    buffer,
                    dirty: false,
                    last_used: clock,
                },
            );
        }
        let chunk = self
            .chunks
            .get_mut(&index)
            .ok_or_else(|| io::Error::other("cache chunk vanished"))?;
        chunk.last_used = clock;
        Ok(chunk)
    }

    fn evict(&mut self) -> io::Result<()> {
        let oldest = self
            .chunks
            .iter()
            .min_by_key(|(_, chunk)| chunk.last_used)
            .map(|(index, _)| *index);
        if let Some(index) = oldest {
            if let Some(chunk) = self.chunks.get_mut(&index) {
                if chunk.dirty {
                    self.device
                        .write_at(index * CHUNK_SIZE as u64, chunk.buffer.bytes())?;
                    chunk.dirty = false;
                }
            }
            self.chunks.remove(&index);
        }
        Ok(())
    }

    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the device.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let position = offset + done as u64;
            if position >= self.size {
                break;
            }
            let index = position / CHUNK_SIZE as u64;
            let within = (position % CHUNK_SIZE as u64) as usize;
            let chunk = self.chunk(index, false)?;
            let available = &chunk.buffer.bytes()[within..];
            let count = available.len().min(buf.len() - done);
            buf[done..done + count].copy_from_slice(&available[..count]);
            done += count;
        }
        Ok(done)
    }

    /// Writes all of `data` at `offset` into the cache. Fails if it would go past the end of
    /// the device.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write beyond the end of the device",
            ));
        }
        let mut done = 0;
        while done < data.len() {
            let position = offset + done as u64;
            let index = position / CHUNK_SIZE as u64;
            let within = (position % CHUNK_SIZE as u64) as usize;
            let count = (self.chunk_len(index) - within).min(data.len() - done);
            let whole = within == 0 && count == self.chunk_len(index);
            let chunk = self.chunk(index, whole)?;
            chunk.buffer.bytes_mut()[within..within + count]
                .copy_from_slice(&data[done..done + count]);
            chunk.dirty = true;
            done += count;
        }
        Ok(())
    }

    /// Writes every changed chunk to the device, in device order.
    pub fn write_back(&mut self) -> io::Result<()> {
        let mut dirty: Vec<u64> = self
            .chunks
            .iter()
            .filter(|(_, chunk)| chunk.dirty)
            .map(|(index, _)| *index)
            .collect();
        dirty.sort_unstable();
        for index in dirty {
            if let Some(chunk) = self.chunks.get_mut(&index) {
                self.device
                    .write_at(index * CHUNK_SIZE as u64, chunk.buffer.bytes())?;
                chunk.dirty = false;
            }
        }
        Ok(())
    }

    /// [`write_back`](Self::write_back), then makes it durable on the device.
    pub fn sync(&mut self) -> io::Result<()> {
        self.write_back()?;
        self.device.sync()
    }

    /// Whether any written data has not reached the device yet.
    pub fn is_dirty(&self) -> bool {
        self.chunks.values().any(|chunk| chunk.dirty)
    }
}

/// The `Read + Write + Seek` stream fatfs works on: a window (`base`, `len`) of the device
/// seen through the shared cache. The window is the whole device or one MBR partition.
///
/// `flush` does not write anything: fatfs flushes after every file operation, and the
/// volume decides when data goes to the device ([`crate::FatFs::sync`]).
pub(crate) struct CachedDisk<D: BlockDevice> {
    cache: Rc<RefCell<BlockCache<D>>>,
    base: u64,
    len: u64,
    position: u64,
}

impl<D: BlockDevice> CachedDisk<D> {
    pub(crate) fn new(cache: Rc<RefCell<BlockCache<D>>>, base: u64, len: u64) -> Self {
        Self {
            cache,
            base,
            len,
            position: 0,
        }
    }
}

impl<D: BlockDevice> Read for CachedDisk<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.position);
        let count = (buf.len() as u64).min(left) as usize;
        let read = self
            .cache
            .borrow_mut()
            .read(self.base + self.position, &mut buf[..count])?;
        self.position += read as u64;
        Ok(read)
    }
}

impl<D: BlockDevice> Write for CachedDisk<D> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.position + buf.len() as u64 > self.len {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write beyond the end of the volume",
            ));
        }
        self.cache
            .borrow_mut()
            .write(self.base + self.position, buf)?;
        self.position += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<D: BlockDevice> Seek for CachedDisk<D> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(offset) => Some(offset),
            SeekFrom::Current(delta) => self.position.checked_add_signed(delta),
            SeekFrom::End(delta) => self.len.checked_add_signed(delta),
        };
        match target {
            Some(position) => {
                self.position = position;
                Ok(position)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the volume",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_device_only_sees_whole_aligned_chunks() {
        let device = MemDevice::new(vec![0; 3 * CHUNK_SIZE + 512]);
        let mut cache = BlockCache::new(device.clone(), 2);
        cache
            .write(CHUNK_SIZE as u64 - 3, b"abcdef")
            .expect("write");
        cache
            .write(3 * CHUNK_SIZE as u64 + 500, b"end")
            .expect("write");
        cache.sync().expect("sync");
        let bytes = device.contents();
        assert_eq!(&bytes[CHUNK_SIZE - 3..CHUNK_SIZE + 3], b"abcdef");
        assert_eq!(&bytes[3 * CHUNK_SIZE + 500..3 * CHUNK_SIZE + 503], b"end");
        assert_eq!(device.sync_count(), 1);
        assert!(cache.write(3 * CHUNK_SIZE as u64 + 510, b"xyz").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn behaves_like_a_byte_array(
            ops in proptest::collection::vec((0u64..300_000, 0usize..100_000, any::<u8>(), any::<bool>()), 1..30),
            capacity in 2usize..6,
        ) {
            let size = 300_000usize / 512 * 512;
            let device = MemDevice::new(vec![0; size]);
            let mut model = vec![0u8; size];
            let mut cache = BlockCache::new(device.clone(), capacity);
            for (offset, len, byte, sync) in ops {
                let data = vec![byte; len];
                let offset = offset.min(size as u64) as usize;
                let end = (offset + data.len()).min(size);
                let data = &data[..end - offset];
                cache.write(offset as u64, data).expect("write");
                model[offset..end].copy_from_slice(data);
                let mut back = vec![0u8; data.len()];
                prop_assert_eq!(cache.read(offset as u64, &mut back).expect("read"), data.len());
                prop_assert_eq!(&back[..], data);
                if sync {
                    cache.sync().expect("sync");
                    prop_assert_eq!(&device.contents()[..], &model[..]);
                }
            }
            cache.sync().expect("sync");
            prop_assert_eq!(device.contents(), model);
        }
    }
}
