//! [`FatFs`]: the file operations on inode numbers, over fatfs, without FUSE.
//!
//! fatfs addresses files by path and gives out handles that borrow the volume, so nothing is
//! kept open between operations: each one walks from the root to the path the
//! [`InodeTable`] holds for the inode. Directory walks are bounded so that a corrupt (cyclic)
//! directory cannot hang the server.

use std::cell::RefCell;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fatfs::{FileAttributes, FsOptions};

use crate::cache::{BlockCache, BlockDevice, CachedDisk, DEFAULT_CACHE_CHUNKS};
use crate::error::Errno;
use crate::inodes::{FatPath, Ino, InodeTable, ROOT_INO};
use crate::time::{from_fat, from_fat_date, to_fat, UTC_CLOCK};

type Disk<D> = CachedDisk<D>;
type Dir<'a, D> = fatfs::Dir<'a, Disk<D>>;
type DirEntry<'a, D> = fatfs::DirEntry<'a, Disk<D>>;

/// At most this many entries are read from one directory (the FAT limit is 65536 slots).
const MAX_DIR_ENTRIES: usize = 65_536;
/// Largest FAT file.
const MAX_FILE_SIZE: u64 = u32::MAX as u64;
/// Longest name, in UTF-16 units.
const MAX_NAME_UNITS: usize = 255;

/// Result of a file operation.
pub type OpResult<T> = std::result::Result<T, Errno>;

/// File or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Directory,
}

/// What `stat` shows of a file or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    /// Bytes (files) or bytes allocated to the directory's first cluster (directories).
    pub size: u64,
    pub modified: SystemTime,
    pub accessed: SystemTime,
    pub created: SystemTime,
    /// The FAT read-only attribute is set.
    pub read_only: bool,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub ino: Ino,
    pub kind: Kind,
    pub name: String,
}

/// Space on the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceStats {
    pub cluster_size: u32,
    pub total_clusters: u32,
    pub free_clusters: u32,
}

/// The FAT variant of a volume.
pub use fatfs::FatType;

/// How to open a volume.
#[derive(Debug, Clone, Copy)]
pub struct VolumeOptions {
    /// Refuse every change (EROFS) and never write the device.
    pub read_only: bool,
    /// Chunks of [`crate::cache::CHUNK_SIZE`] bytes the block cache keeps.
    pub cache_chunks: usize,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            cache_chunks: DEFAULT_CACHE_CHUNKS,
        }
    }
}

/// Where on the device the volume lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// MBR partition number (1–4), or `None` for a volume covering the whole device.
    pub partition: Option<u8>,
    pub offset: u64,
    pub length: u64,
}

/// A FAT volume and the inode numbers given out for it.
pub struct FatFs<D: BlockDevice> {
    fs: fatfs::FileSystem<Disk<D>>,
    cache: Rc<RefCell<BlockCache<D>>>,
    inodes: InodeTable,
    read_only: bool,
    placement: Placement,
    geometry: Geometry,
}

/// Where clusters lie, from the boot sector (which fatfs has validated).
#[derive(Debug, Clone, Copy)]
struct Geometry {
    /// Device offset of the volume.
    volume_offset: u64,
    /// Offset of cluster 2 within the volume.
    data_offset: u64,
    cluster_size: u64,
}

impl Geometry {
    fn read<D: BlockDevice>(
        cache: &RefCell<BlockCache<D>>,
        placement: Placement,
    ) -> io::Result<Self> {
        let mut boot = [0u8; 64];
        cache.borrow_mut().read(placement.offset, &mut boot)?;
        let u16_at = |i: usize| u64::from(u16::from_le_bytes([boot[i], boot[i + 1]]));
        let u32_at = |i: usize| {
            u64::from(u32::from_le_bytes([
                boot[i],
                boot[i + 1],
                boot[i + 2],
                boot[i + 3],
            ]))
        };
        let bytes_per_sector = u16_at(11);
        let sectors_per_cluster = u64::from(boot[13]);
        let reserved_sectors = u16_at(14);
        let fats = u64::from(boot[16]);
        let root_entries = u16_at(17);
        let fat_sectors = match u16_at(22) {
            0 => u32_at(36),
            sectors => sectors,
        };
        let root_dir_sectors = (root_entries * 32).div_ceil(bytes_per_sector.max(1));
        Ok(Self {
            volume_offset: placement.offset,
            data_offset: (reserved_sectors + fats * fat_sectors + root_dir_sectors)
                * bytes_per_sector,
            cluster_size: bytes_per_sector * sectors_per_cluster,
        })
    }

    /// fatfs 0.3.6 writes a new directory's `.` and `..` each with a long-name entry in
    /// front, so `.` is not in the first slot where FAT (and fsck) expect it; and on FAT32
    /// it makes `..` of a directory in the root point at the root's cluster instead of 0.
    /// Rewrites the first four slots as `.`, `..`, and two free slots.
    fn repair_dot_entries<D: BlockDevice>(
        &self,
        cache: &RefCell<BlockCache<D>>,
        cluster: u32,
        parent_is_root: bool,
    ) -> OpResult<()> {
        if cluster < 2 {
            return Err(Errno::EIO);
        }
        let offset =
            self.volume_offset + self.data_offset + u64::from(cluster - 2) * self.cluster_size;
        let mut slots = [0u8; 128];
        let mut cache = cache.borrow_mut();
        cache.read(offset, &mut slots).map_err(Errno::from)?;
        let (dot, dotdot) = (&slots[32..64], &slots[96..128]);
        if &dot[..11] != b".          " || &dotdot[..11] != b"..         " {
            // Not the layout described above; leave it.
            return Ok(());
        }
        let mut repaired = [0u8; 128];
        repaired[..32].copy_from_slice(dot);
        repaired[32..64].copy_from_slice(dotdot);
        if parent_is_root {
            repaired[32 + 20..32 + 22].fill(0);
            repaired[32 + 26..32 + 28].fill(0);
        }
        cache.write(offset, &repaired).map_err(Errno::from)
    }
}

/// First cluster of an entry. fatfs 0.3.6 keeps it private; its `Debug` output of an entry
/// lists the raw fields (the version is pinned in Cargo.toml).
fn first_cluster<D: BlockDevice>(entry: &DirEntry<'_, D>) -> Option<u32> {
    let text = format!("{entry:?}");
    let field = |name: &str| -> Option<u32> {
        let start = text.find(&format!("{name}: "))? + name.len() + 2;
        let digits: String = text[start..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    Some((field("first_cluster_hi")? << 16) | field("first_cluster_lo")?)
}

/// Creates directory `name` in the directory at `parent` with proper `.` and `..` entries.
fn create_directory<D: BlockDevice>(
    fs: &fatfs::FileSystem<Disk<D>>,
    cache: &RefCell<BlockCache<D>>,
    geometry: &Geometry,
    parent: &[String],
    name: &str,
) -> OpResult<()> {
    drop(
        open_dir(fs, parent)?
            .create_dir(name)
            .map_err(Errno::from)?,
    );
    let dir = open_dir(fs, parent)?;
    let entry = find(&dir, name)?.ok_or(Errno::EIO)?;
    let cluster = first_cluster(&entry).ok_or(Errno::EIO)?;
    geometry.repair_dot_entries(cache, cluster, parent.is_empty())
}

/// MBR partition types that hold FAT.
const FAT_PARTITION_TYPES: [u8; 7] = [0x01, 0x04, 0x06, 0x0b, 0x0c, 0x0e, 0xef];

/// The FAT partitions listed in an MBR, if `sector` is one.
fn mbr_fat_partitions(sector: &[u8; 512], device_size: u64) -> Vec<Placement> {
    if sector[510..512] != [0x55, 0xaa] {
        return Vec::new();
    }
    (0..4)
        .filter_map(|i| {
            let entry = &sector[446 + 16 * i..446 + 16 * (i + 1)];
            let kind = entry[4];
            let start = u64::from(u32::from_le_bytes([
                entry[8], entry[9], entry[10], entry[11],
            ]));
            let count = u64::from(u32::from_le_bytes([
                entry[12], entry[13], entry[14], entry[15],
            ]));
            let offset = start * 512;
            let length = count * 512;
            let fits = count > 0
                && offset
                    .checked_add(length)
                    .is_some_and(|end| end <= device_size);
            (FAT_PARTITION_TYPES.contains(&kind) && fits).then_some(Placement {
                partition: Some(i as u8 + 1),
                offset,
                length,
            })
        })
        .collect()
}

fn try_open<D: BlockDevice>(
    cache: &Rc<RefCell<BlockCache<D>>>,
    placement: Placement,
) -> std::result::Result<fatfs::FileSystem<Disk<D>>, String> {
    let disk = CachedDisk::new(cache.clone(), placement.offset, placement.length);
    let options = FsOptions::new().time_provider(&UTC_CLOCK);
    // fatfs checks the boot sector, but a hostile one should not be able to take the
    // process down either.
    match panic::catch_unwind(AssertUnwindSafe(|| fatfs::FileSystem::new(disk, options))) {
        Ok(Ok(fs)) => Ok(fs),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("the boot sector is not usable".into()),
    }
}

impl<D: BlockDevice> FatFs<D> {
    /// Opens the FAT volume on `device`: covering the whole device, or else in the first FAT
    /// partition of an MBR. The error says why it is not FAT.
    pub fn open(device: D, options: VolumeOptions) -> std::result::Result<Self, String> {
        let cache = Rc::new(RefCell::new(BlockCache::new(device, options.cache_chunks)));
        let size = cache.borrow().size();
        if size < 512 {
            return Err(format!("it is only {size} bytes long"));
        }
        let whole = Placement {
            partition: None,
            offset: 0,
            length: size,
        };
        let whole_error = match try_open(&cache, whole) {
            Ok(fs) => return Self::with(fs, cache, options, whole),
            Err(error) => error,
        };
        let mut sector = [0u8; 512];
        cache
            .borrow_mut()
            .read(0, &mut sector)
            .map_err(|error| format!("reading its first sector failed: {error}"))?;
        for placement in mbr_fat_partitions(&sector, size) {
            if let Ok(fs) = try_open(&cache, placement) {
                return Self::with(fs, cache, options, placement);
            }
        }
        Err(format!(
            "no FAT boot sector: {whole_error}; and no FAT partition in a partition table"
        ))
    }

    fn with(
        fs: fatfs::FileSystem<Disk<D>>,
        cache: Rc<RefCell<BlockCache<D>>>,
        options: VolumeOptions,
        placement: Placement,
    ) -> std::result::Result<Self, String> {
        let geometry = Geometry::read(&cache, placement)
            .map_err(|error| format!("reading the boot sector failed: {error}"))?;
        Ok(Self {
            fs,
            cache,
            inodes: InodeTable::new(),
            read_only: options.read_only,
            placement,
            geometry,
        })
    }

    /// FAT12, FAT16 or FAT32.
    pub fn fat_type(&self) -> FatType {
        self.fs.fat_type()
    }

    /// Where the volume lies on the device.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// The volume label from the boot sector.
    pub fn label(&self) -> String {
        self.fs.volume_label().trim_end().to_string()
    }

    /// The inode table (for checks in tests).
    pub fn inodes(&self) -> &InodeTable {
        &self.inodes
    }

    fn writable(&self) -> OpResult<()> {
        if self.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    fn path_of(&self, ino: Ino) -> OpResult<FatPath> {
        self.inodes.path(ino).cloned().ok_or(Errno::ENOENT)
    }

    fn root_attr(&self) -> Attr {
        let epoch = UNIX_EPOCH + Duration::from_secs(315_532_800); // 1980-01-01, FAT's epoch
        Attr {
            ino: ROOT_INO,
            kind: Kind::Directory,
            size: u64::from(self.fs.cluster_size()),
            modified: epoch,
            accessed: epoch,
            created: epoch,
            read_only: false,
        }
    }

    fn attr_of(&self, ino: Ino, entry: &DirEntry<'_, D>) -> Attr {
        let kind = if entry.is_dir() {
            Kind::Directory
        } else {
            Kind::File
        };
        Attr {
            ino,
            kind,
            size: match kind {
                Kind::File => entry.len(),
                Kind::Directory => u64::from(self.fs.cluster_size()),
            },
            modified: from_fat(entry.modified()),
            accessed: from_fat_date(entry.accessed()),
            created: from_fat(entry.created()),
            read_only: entry.attributes().contains(FileAttributes::READ_ONLY),
        }
    }

    /// The attributes of the entry at `path` (not the root).
    fn stat_path(&mut self, path: &[String]) -> OpResult<Attr> {
        let (parent, name) = split_last(path)?;
        let dir = open_dir(&self.fs, parent)?;
        let entry = find(&dir, name)?.ok_or(Errno::ENOENT)?;
        let mut stored = parent.to_vec();
        stored.push(entry.file_name());
        let ino = self.inodes.ino_for(&stored);
        Ok(self.attr_of(ino, &entry))
    }

    /// Looks `name` up in directory `parent` (without regard to case, like FAT).
    pub fn lookup(&mut self, parent: Ino, name: &str) -> OpResult<Attr> {
        if name.encode_utf16().count() > MAX_NAME_UNITS {
            return Err(Errno::ENAMETOOLONG);
        }
        let parent_path = self.path_of(parent)?;
        match name {
            "." => return self.getattr(parent),
            ".." => {
                let up = &parent_path[..parent_path.len().saturating_sub(1)];
                let ino = self.inodes.ino_for(up);
                return self.getattr(ino);
            }
            _ => {}
        }
        let mut path = parent_path;
        path.push(name.to_string());
        self.stat_path(&path)
    }

    /// The attributes of `ino`.
    pub fn getattr(&mut self, ino: Ino) -> OpResult<Attr> {
        let path = self.path_of(ino)?;
        if path.is_empty() {
            return Ok(self.root_attr());
        }
        let result = self.stat_path(&path);
        if result == Err(Errno::ENOENT) {
            self.inodes.remove(&path);
        }
        result
    }

    /// The entries of directory `ino`, `.` and `..` first.
    pub fn readdir(&mut self, ino: Ino) -> OpResult<Vec<Listing>> {
        let path = self.path_of(ino)?;
        let names: Vec<(String, Kind)> = {
            let dir = open_dir(&self.fs, &path)?;
            entries(&dir)?
                .iter()
                .map(|entry| {
                    let kind = if entry.is_dir() {
                        Kind::Directory
                    } else {
                        Kind::File
                    };
                    (entry.file_name(), kind)
                })
                .collect()
        };
        let up = &path[..path.len().saturating_sub(1)];
        let parent_ino = self.inodes.ino_for(up);
        let mut listing = vec![
            Listing {
                ino,
                kind: Kind::Directory,
                name: ".".into(),
            },
            Listing {
                ino: parent_ino,
                kind: Kind::Directory,
                name: "..".into(),
            },
        ];
        for (name, kind) in names {
            let mut child = path.clone();
            child.push(name.clone());
            let ino = self.inodes.ino_for(&child);
            listing.push(Listing { ino, kind, name });
        }
        Ok(listing)
    }

    /// Up to `size` bytes of file `ino` from `offset` (fewer at the end of the file).
    pub fn read(&mut self, ino: Ino, offset: u64, size: u32) -> OpResult<Vec<u8>> {
        let path = self.path_of(ino)?;
        let root = self.fs.root_dir();
        let mut file = root.open_file(&join(&path)).map_err(Errno::from)?;
        let length = file.seek(SeekFrom::End(0)).map_err(Errno::from)?;
        if offset >= length {
            return Ok(Vec::new());
        }
        let count = (length - offset).min(u64::from(size)) as usize;
        file.seek(SeekFrom::Start(offset)).map_err(Errno::from)?;
        let mut data = vec![0u8; count];
        let mut done = 0;
        while done < count {
            match file.read(&mut data[done..]).map_err(Errno::from)? {
                0 => break,
                read => done += read,
            }
        }
        data.truncate(done);
        Ok(data)
    }

    /// Writes `data` into file `ino` at `offset`, extending it; a gap between the old end and
    /// `offset` reads as zeros.
    pub fn write(&mut self, ino: Ino, offset: u64, data: &[u8]) -> OpResult<usize> {
        self.writable()?;
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if end > MAX_FILE_SIZE {
            return Err(Errno::EFBIG);
        }
        let path = self.path_of(ino)?;
        let root = self.fs.root_dir();
        let mut file = root.open_file(&join(&path)).map_err(Errno::from)?;
        let length = file.seek(SeekFrom::End(0)).map_err(Errno::from)?;
        if offset > length {
            write_zeros(&mut file, offset - length)?;
        }
        file.seek(SeekFrom::Start(offset)).map_err(Errno::from)?;
        let written = file.write_all(data);
        // Record the new size even after a partial write (no space left).
        let flushed = file.flush();
        written.map_err(Errno::from)?;
        flushed.map_err(Errno::from)?;
        Ok(data.len())
    }

    /// Creates an empty file `name` in `parent`; EEXIST if the name is taken.
    pub fn create(&mut self, parent: Ino, name: &str) -> OpResult<Attr> {
        self.make(parent, name, Kind::File)
    }

    /// Creates directory `name` in `parent`; EEXIST if the name is taken.
    pub fn mkdir(&mut self, parent: Ino, name: &str) -> OpResult<Attr> {
        self.make(parent, name, Kind::Directory)
    }

    fn make(&mut self, parent: Ino, name: &str, kind: Kind) -> OpResult<Attr> {
        self.writable()?;
        check_name(name)?;
        let mut path = self.path_of(parent)?;
        {
            let dir = open_dir(&self.fs, &path)?;
            if find(&dir, name)?.is_some() {
                return Err(Errno::EEXIST);
            }
            if kind == Kind::File {
                drop(dir.create_file(name).map_err(Errno::from)?);
            }
        }
        if kind == Kind::Directory {
            create_directory(&self.fs, &self.cache, &self.geometry, &path, name)?;
        }
        path.push(name.to_string());
        self.stat_path(&path)
    }

    /// Removes file `name` from `parent`.
    pub fn unlink(&mut self, parent: Ino, name: &str) -> OpResult<()> {
        self.remove(parent, name, Kind::File)
    }

    /// Removes the empty directory `name` from `parent`.
    pub fn rmdir(&mut self, parent: Ino, name: &str) -> OpResult<()> {
        self.remove(parent, name, Kind::Directory)
    }

    fn remove(&mut self, parent: Ino, name: &str, kind: Kind) -> OpResult<()> {
        self.writable()?;
        let mut path = self.path_of(parent)?;
        {
            let dir = open_dir(&self.fs, &path)?;
            let entry = find(&dir, name)?.ok_or(Errno::ENOENT)?;
            match (kind, entry.is_dir()) {
                (Kind::File, true) => return Err(Errno::EISDIR),
                (Kind::Directory, false) => return Err(Errno::ENOTDIR),
                (Kind::Directory, true) if !entries(&entry.to_dir())?.is_empty() => {
                    return Err(Errno::ENOTEMPTY)
                }
                _ => {}
            }
            let stored = entry.file_name();
            dir.remove(&stored).map_err(Errno::from)?;
            path.push(stored);
        }
        self.inodes.remove(&path);
        Ok(())
    }

    /// Renames `name` in `parent` to `new_name` in `new_parent`, replacing a file there (or an
    /// empty directory, when moving a directory).
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &str,
        new_parent: Ino,
        new_name: &str,
    ) -> OpResult<()> {
        self.writable()?;
        check_name(new_name)?;
        let from_dir_path = self.path_of(parent)?;
        let to_dir_path = self.path_of(new_parent)?;
        let same_dir = fold(&from_dir_path) == fold(&to_dir_path);
        let mut from = from_dir_path.clone();
        let mut to = to_dir_path.clone();
        to.push(new_name.to_string());
        let mut replaced = None;
        let moves_directory;
        {
            let from_dir = open_dir(&self.fs, &from_dir_path)?;
            let source = find(&from_dir, name)?.ok_or(Errno::ENOENT)?;
            let source_name = source.file_name();
            from.push(source_name.clone());
            moves_directory = source.is_dir();
            if moves_directory && fold(&to).starts_with(&fold(&from)) && !same_dir {
                // Into itself or below itself.
                return Err(Errno::EINVAL);
            }
            let to_dir = open_dir(&self.fs, &to_dir_path)?;
            if let Some(target) = find(&to_dir, new_name)? {
                let same_entry = same_dir && target.short_file_name() == source.short_file_name();
                if same_entry {
                    if source_name == new_name {
                        return Ok(());
                    }
                    // Only the case changes; fatfs sees the new name as taken by the entry itself.
                    let temporary = free_name(&from_dir, &source_name)?;
                    from_dir
                        .rename(&source_name, &from_dir, &temporary)
                        .map_err(Errno::from)?;
                    from_dir
                        .rename(&temporary, &from_dir, new_name)
                        .map_err(Errno::from)?;
                    drop((from_dir, to_dir));
                    self.inodes.rename(&from, &to);
                    return Ok(());
                }
                match (moves_directory, target.is_dir()) {
                    (true, false) => return Err(Errno::ENOTDIR),
                    (false, true) => return Err(Errno::EISDIR),
                    (true, true) if !entries(&target.to_dir())?.is_empty() => {
                        return Err(Errno::ENOTEMPTY)
                    }
                    _ => {}
                }
                let target_name = target.file_name();
                to_dir.remove(&target_name).map_err(Errno::from)?;
                let mut target_path = to_dir_path.clone();
                target_path.push(target_name);
                replaced = Some(target_path);
            }
            if !moves_directory || same_dir {
                from_dir
                    .rename(&source_name, &to_dir, new_name)
                    .map_err(Errno::from)?;
            }
        }
        if let Some(target_path) = replaced {
            self.inodes.remove(&target_path);
        }
        if moves_directory && !same_dir {
            // fatfs would move the entry but leave the directory's `..` pointing at the old
            // parent, which fsck rejects; rebuild the directory under its new parent instead
            // (files move as entries, no data is copied).
            move_directory(&self.fs, &self.cache, &self.geometry, &from, &to)?;
        }
        self.inodes.rename(&from, &to);
        Ok(())
    }

    /// Truncates or extends (with zeros) file `ino` to `size` bytes.
    pub fn set_size(&mut self, ino: Ino, size: u64) -> OpResult<Attr> {
        self.writable()?;
        if size > MAX_FILE_SIZE {
            return Err(Errno::EFBIG);
        }
        let path = self.path_of(ino)?;
        if path.is_empty() {
            return Err(Errno::EISDIR);
        }
        {
            let root = self.fs.root_dir();
            let mut file = root.open_file(&join(&path)).map_err(Errno::from)?;
            let length = file.seek(SeekFrom::End(0)).map_err(Errno::from)?;
            if size < length {
                file.seek(SeekFrom::Start(size)).map_err(Errno::from)?;
                file.truncate().map_err(Errno::from)?;
            } else if size > length {
                write_zeros(&mut file, size - length)?;
            }
            file.flush().map_err(Errno::from)?;
        }
        self.getattr(ino)
    }

    /// Sets the modification and access times of file `ino` (2 s and 1 day resolution).
    /// Directories keep theirs: fatfs cannot change them.
    pub fn set_times(
        &mut self,
        ino: Ino,
        accessed: Option<SystemTime>,
        modified: Option<SystemTime>,
    ) -> OpResult<Attr> {
        self.writable()?;
        let attr = self.getattr(ino)?;
        if attr.kind == Kind::File && (accessed.is_some() || modified.is_some()) {
            let path = self.path_of(ino)?;
            let root = self.fs.root_dir();
            let mut file = root.open_file(&join(&path)).map_err(Errno::from)?;
            // The setters are deprecated in favour of a time provider, which cannot set a
            // given time on one file; they do what utimensat needs.
            #[allow(deprecated)]
            {
                if let Some(time) = accessed {
                    file.set_accessed(to_fat(time).date);
                }
                if let Some(time) = modified {
                    file.set_modified(to_fat(time));
                }
            }
            file.flush().map_err(Errno::from)?;
        }
        self.getattr(ino)
    }

    /// Cluster size and counts.
    pub fn statfs(&self) -> OpResult<SpaceStats> {
        let stats = self.fs.stats().map_err(Errno::from)?;
        Ok(SpaceStats {
            cluster_size: stats.cluster_size(),
            total_clusters: stats.total_clusters(),
            free_clusters: stats.free_clusters(),
        })
    }

    /// Writes everything changed to the device and makes it durable there.
    pub fn sync(&mut self) -> OpResult<()> {
        if self.read_only {
            return Ok(());
        }
        self.cache.borrow_mut().sync().map_err(Errno::from)
    }

    /// Unmounts: updates the FAT32 FSInfo sector and the clean flag, writes everything back
    /// and syncs the device.
    pub fn close(self) -> io::Result<()> {
        let FatFs {
            fs,
            cache,
            read_only,
            ..
        } = self;
        fs.unmount()?;
        if read_only {
            return Ok(());
        }
        let result = cache.borrow_mut().sync();
        result
    }
}

fn split_last(path: &[String]) -> OpResult<(&[String], &str)> {
    match path.split_last() {
        Some((name, parent)) => Ok((parent, name.as_str())),
        None => Err(Errno::EINVAL),
    }
}

fn join(path: &[String]) -> String {
    path.join("/")
}

/// Upper-cased names, for comparing paths as FAT does.
fn fold(path: &[String]) -> Vec<String> {
    path.iter().map(|name| name.to_uppercase()).collect()
}

fn open_dir<'a, D: BlockDevice>(
    fs: &'a fatfs::FileSystem<Disk<D>>,
    path: &[String],
) -> OpResult<Dir<'a, D>> {
    let root = fs.root_dir();
    if path.is_empty() {
        return Ok(root);
    }
    root.open_dir(&join(path)).map_err(Errno::from)
}

/// The entries of `dir` other than `.` and `..`, at most [`MAX_DIR_ENTRIES`]. Entries whose
/// names the kernel could not take (empty, or with `/` or NUL, from a corrupt volume) are
/// left out.
fn entries<'a, D: BlockDevice>(dir: &Dir<'a, D>) -> OpResult<Vec<DirEntry<'a, D>>> {
    let mut list = Vec::new();
    for (count, entry) in dir.iter().enumerate() {
        if count >= MAX_DIR_ENTRIES {
            tracing::warn!("a directory has more than {MAX_DIR_ENTRIES} entries: corrupt volume");
            return Err(Errno::EIO);
        }
        let entry = entry.map_err(Errno::from)?;
        let name = entry.file_name();
        if name == "." || name == ".." {
            continue;
        }
        if name.is_empty() || name.contains('/') || name.contains('\0') {
            tracing::warn!("skipping a directory entry with an unusable name {name:?}");
            continue;
        }
        list.push(entry);
    }
    Ok(list)
}

/// The entry called `name` (long or short name, any case), like fatfs's own lookup.
fn find<'a, D: BlockDevice>(dir: &Dir<'a, D>, name: &str) -> OpResult<Option<DirEntry<'a, D>>> {
    let wanted = name.to_uppercase();
    Ok(entries(dir)?.into_iter().find(|entry| {
        entry.file_name().to_uppercase() == wanted
            || entry.short_file_name().to_uppercase() == wanted
    }))
}

/// A name not used in `dir`, for a two-step rename.
fn free_name<D: BlockDevice>(dir: &Dir<'_, D>, base: &str) -> OpResult<String> {
    for attempt in 0..1000 {
        let candidate = format!(".ring3-rename-{attempt}");
        if candidate != base && find(dir, &candidate)?.is_none() {
            return Ok(candidate);
        }
    }
    Err(Errno::EEXIST)
}

/// Moves directory `from` to `to` (a free name in another directory): creates `to`, moves
/// each entry into it (subdirectories the same way), removes `from`.
fn move_directory<D: BlockDevice>(
    fs: &fatfs::FileSystem<Disk<D>>,
    cache: &RefCell<BlockCache<D>>,
    geometry: &Geometry,
    from: &[String],
    to: &[String],
) -> OpResult<()> {
    let (to_parent, to_name) = split_last(to)?;
    create_directory(fs, cache, geometry, to_parent, to_name)?;
    let children: Vec<(String, bool)> = entries(&open_dir(fs, from)?)?
        .iter()
        .map(|entry| (entry.file_name(), entry.is_dir()))
        .collect();
    for (name, is_dir) in children {
        if is_dir {
            let mut child_from = from.to_vec();
            child_from.push(name.clone());
            let mut child_to = to.to_vec();
            child_to.push(name);
            move_directory(fs, cache, geometry, &child_from, &child_to)?;
        } else {
            let source = open_dir(fs, from)?;
            let target = open_dir(fs, to)?;
            source.rename(&name, &target, &name).map_err(Errno::from)?;
        }
    }
    let (from_parent, from_name) = split_last(from)?;
    open_dir(fs, from_parent)?
        .remove(from_name)
        .map_err(Errno::from)
}

fn write_zeros<W: Write + Seek>(file: &mut W, count: u64) -> OpResult<()> {
    file.seek(SeekFrom::End(0)).map_err(Errno::from)?;
    let zeros = [0u8; 4096];
    let mut left = count;
    while left > 0 {
        let now = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..now]).map_err(Errno::from)?;
        left -= now as u64;
    }
    Ok(())
}

/// Whether `name` can be stored as a FAT long name.
pub fn check_name(name: &str) -> OpResult<()> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(Errno::EINVAL);
    }
    if name.encode_utf16().count() > MAX_NAME_UNITS {
        return Err(Errno::ENAMETOOLONG);
    }
    let allowed = |c: char| {
        c.is_ascii_alphanumeric()
            || ('\u{80}'..='\u{FFFF}').contains(&c)
            || "$%'-_@~`!(){}. +,;=[]^#&".contains(c)
    };
    if !name.chars().all(allowed) {
        return Err(Errno::EINVAL);
    }
    // Windows and Linux's vfat drop trailing dots and spaces; a name ending in one would
    // not be found again under the same name there.
    if name.ends_with('.') || name.ends_with(' ') {
        return Err(Errno::EINVAL);
    }
    Ok(())
}
