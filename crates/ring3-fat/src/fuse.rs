//! The FUSE side: mounting, the `fuser::Filesystem` adapter, signals, unmounting.
//!
//! `fatfs` volumes are not thread-safe (nor `Send`), so the volume lives on its own thread
//! and the adapter hands it each request, with the reply, as a job; jobs run one at a time in
//! the order the kernel sent them.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime};

use fuser::{
    Config, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyStatfs, ReplyWrite, Request, Session,
    SessionACL, TimeOrNow, WriteFlags,
};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::cache::{FileDevice, DEFAULT_CACHE_CHUNKS};
use crate::error::{Errno, Error, Result};
use crate::volume::{Attr, FatFs, FatType, Kind, Placement, VolumeOptions};

/// How long the kernel may cache names and attributes. This process is the only writer.
const TTL: Duration = Duration::from_secs(1);
/// How long unmounting waits for the volume to be written back before giving up.
const WRITE_BACK_TIMEOUT: Duration = Duration::from_secs(120);

/// Options of [`mount`].
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Mount read-only; the device is opened read-only and never written.
    pub read_only: bool,
    /// Owner shown for every file (FAT has none); default: the calling user.
    pub uid: Option<u32>,
    /// Group shown for every file; default: the calling user's group.
    pub gid: Option<u32>,
    /// Permission bits cleared from 0777 (directories) and 0666 (files).
    pub umask: u32,
    /// Let other users than the one mounting use the mount (`allow_other`; as a user this
    /// needs `user_allow_other` in /etc/fuse.conf).
    pub allow_other: bool,
    /// Open the device with `O_DIRECT`, so only this process caches it.
    pub direct: bool,
    /// Chunks of 64 KiB the block cache keeps.
    pub cache_chunks: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            uid: None,
            gid: None,
            umask: 0o022,
            allow_other: false,
            direct: false,
            cache_chunks: DEFAULT_CACHE_CHUNKS,
        }
    }
}

/// What was mounted, passed to [`mount`]'s callback once the mount is up.
#[derive(Debug, Clone)]
pub struct Mounted {
    pub device: PathBuf,
    pub mountpoint: PathBuf,
    pub fat_type: FatType,
    pub label: String,
    pub placement: Placement,
    pub read_only: bool,
}

impl Mounted {
    /// "FAT12", "FAT16" or "FAT32".
    pub fn fat_name(&self) -> &'static str {
        match self.fat_type {
            FatType::Fat12 => "FAT12",
            FatType::Fat16 => "FAT16",
            FatType::Fat32 => "FAT32",
        }
    }
}

type Volume = FatFs<FileDevice>;
type Job = Box<dyn FnOnce(&mut Volume) + Send>;

/// How attributes are presented.
#[derive(Debug, Clone, Copy)]
struct Presentation {
    uid: u32,
    gid: u32,
    umask: u32,
    read_only: bool,
    block_size: u32,
}

impl Presentation {
    fn file_attr(&self, attr: &Attr) -> FileAttr {
        let (kind, mut perm, nlink) = match attr.kind {
            Kind::File => (FileType::RegularFile, 0o666, 1),
            Kind::Directory => (FileType::Directory, 0o777, 2),
        };
        perm &= !self.umask;
        if self.read_only || (attr.read_only && attr.kind == Kind::File) {
            perm &= !0o222;
        }
        FileAttr {
            ino: INodeNo(attr.ino),
            size: attr.size,
            blocks: attr.size.div_ceil(512),
            atime: attr.accessed,
            mtime: attr.modified,
            ctime: attr.modified,
            crtime: attr.created,
            kind,
            perm: perm as u16,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: self.block_size,
            flags: 0,
        }
    }
}

struct FatFuse {
    jobs: Mutex<mpsc::Sender<Job>>,
    presentation: Presentation,
}

impl FatFuse {
    /// Queues `job` for the volume thread. If that thread is gone the job, and the reply in
    /// it, is dropped, and fuser answers EIO.
    fn submit(&self, job: impl FnOnce(&mut Volume) + Send + 'static) {
        let sender = self
            .jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if sender.send(Box::new(job)).is_err() {
            tracing::error!("the FAT volume thread is gone");
        }
    }

    /// Runs `job` on the volume thread and waits for it.
    fn run_and_wait(
        &self,
        job: impl FnOnce(&mut Volume) -> std::result::Result<(), Errno> + Send + 'static,
    ) {
        let (done, wait) = mpsc::channel();
        self.submit(move |volume| {
            let _ = done.send(job(volume));
        });
        match wait.recv_timeout(WRITE_BACK_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(errno)) => tracing::error!("writing the volume back failed: {errno}"),
            Err(_) => tracing::error!("writing the volume back did not finish"),
        }
    }
}

fn name_str(name: &OsStr) -> std::result::Result<String, Errno> {
    name.to_str().map(str::to_owned).ok_or(Errno::EINVAL)
}

fn errno(errno: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(errno.0)
}

fn time_of(time: TimeOrNow) -> SystemTime {
    match time {
        TimeOrNow::SpecificTime(time) => time,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl Filesystem for FatFuse {
    fn init(&mut self, _req: &Request, _config: &mut KernelConfig) -> io::Result<()> {
        Ok(())
    }

    fn destroy(&mut self) {
        self.run_and_wait(|volume| volume.sync());
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Ok(name) = name_str(name) else {
            return reply.error(fuser::Errno::ENOENT);
        };
        let presentation = self.presentation;
        self.submit(move |volume| match volume.lookup(parent.0, &name) {
            Ok(attr) => reply.entry(&TTL, &presentation.file_attr(&attr), Generation(0)),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let presentation = self.presentation;
        self.submit(move |volume| match volume.getattr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &presentation.file_attr(&attr)),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // FAT has no owners or modes: chmod and chown succeed without effect, as on vfat with
        // `quiet`, so that `cp -p` and the like work.
        let presentation = self.presentation;
        self.submit(move |volume| {
            let result = (|| {
                if let Some(size) = size {
                    volume.set_size(ino.0, size)?;
                }
                if atime.is_some() || mtime.is_some() {
                    volume.set_times(ino.0, atime.map(time_of), mtime.map(time_of))?;
                }
                volume.getattr(ino.0)
            })();
            match result {
                Ok(attr) => reply.attr(&TTL, &presentation.file_attr(&attr)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let name = match name_str(name) {
            Ok(name) => name,
            Err(e) => return reply.error(errno(e)),
        };
        let presentation = self.presentation;
        self.submit(move |volume| match volume.mkdir(parent.0, &name) {
            Ok(attr) => reply.entry(&TTL, &presentation.file_attr(&attr), Generation(0)),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Ok(name) = name_str(name) else {
            return reply.error(fuser::Errno::ENOENT);
        };
        self.submit(move |volume| match volume.unlink(parent.0, &name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Ok(name) = name_str(name) else {
            return reply.error(fuser::Errno::ENOENT);
        };
        self.submit(move |volume| match volume.rmdir(parent.0, &name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, newname) = match (name_str(name), name_str(newname)) {
            (Ok(name), Ok(newname)) => (name, newname),
            _ => return reply.error(fuser::Errno::EINVAL),
        };
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return reply.error(fuser::Errno::EINVAL);
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        self.submit(move |volume| {
            if no_replace && volume.lookup(newparent.0, &newname).is_ok() {
                let same = volume.lookup(parent.0, &name).map(|a| a.ino)
                    == volume.lookup(newparent.0, &newname).map(|a| a.ino);
                if !same {
                    return reply.error(fuser::Errno::EEXIST);
                }
            }
            match volume.rename(parent.0, &name, newparent.0, &newname) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writes = (flags.0 & libc::O_ACCMODE) != libc::O_RDONLY;
        if writes && self.presentation.read_only {
            return reply.error(fuser::Errno::EROFS);
        }
        self.submit(move |volume| match volume.getattr(ino.0) {
            Ok(attr) if attr.kind == Kind::Directory && writes => reply.error(fuser::Errno::EISDIR),
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.submit(move |volume| match volume.read(ino.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        self.submit(move |volume| match volume.write(ino.0, offset, &data) {
            Ok(written) => reply.written(written as u32),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.submit(move |volume| match volume.sync() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.submit(move |volume| match volume.sync() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.submit(move |volume| match volume.readdir(ino.0) {
            Ok(listing) => {
                // The offset of an entry is its index + 1: where the next call resumes.
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                for (index, entry) in listing.iter().enumerate().skip(start) {
                    let kind = match entry.kind {
                        Kind::File => FileType::RegularFile,
                        Kind::Directory => FileType::Directory,
                    };
                    if reply.add(INodeNo(entry.ino), index as u64 + 1, kind, &entry.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(e)),
        });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.submit(move |volume| match volume.sync() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        });
    }

    // FAT has no extended attributes. ENOSYS (rather than fuser's default, which logs a
    // warning each time) makes the kernel stop asking.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.submit(move |volume| match volume.statfs() {
            Ok(stats) => reply.statfs(
                u64::from(stats.total_clusters),
                u64::from(stats.free_clusters),
                u64::from(stats.free_clusters),
                0,
                0,
                stats.cluster_size,
                255,
                stats.cluster_size,
            ),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let name = match name_str(name) {
            Ok(name) => name,
            Err(e) => return reply.error(errno(e)),
        };
        let presentation = self.presentation;
        self.submit(move |volume| match volume.create(parent.0, &name) {
            Ok(attr) => reply.created(
                &TTL,
                &presentation.file_attr(&attr),
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(errno(e)),
        });
    }
}

use fuser::{ReplyOpen, ReplyXattr};

/// What the volume thread reports once it has opened (or failed to open) the device.
type Opened = std::result::Result<(Mounted, u32), Error>;

fn open_device(device: &Path, options: &MountOptions) -> Result<Volume> {
    let file =
        FileDevice::open(device, options.read_only, options.direct).map_err(
            |source| match source.kind() {
                io::ErrorKind::NotFound => Error::DeviceMissing(device.to_path_buf()),
                io::ErrorKind::PermissionDenied => Error::DevicePermission(device.to_path_buf()),
                _ => Error::OpenDevice {
                    path: device.to_path_buf(),
                    source,
                },
            },
        )?;
    let volume_options = VolumeOptions {
        read_only: options.read_only,
        cache_chunks: options.cache_chunks,
    };
    FatFs::open(file, volume_options).map_err(|detail| Error::NotFat {
        path: device.to_path_buf(),
        detail,
    })
}

/// The volume thread: opens the volume, reports, runs jobs until the adapter is gone, then
/// unmounts the volume (FSInfo, clean flag) and syncs the device.
fn volume_thread(
    device: PathBuf,
    mountpoint: PathBuf,
    options: MountOptions,
    opened: mpsc::Sender<Opened>,
    jobs: mpsc::Receiver<Job>,
) -> io::Result<()> {
    let mut volume = match open_device(&device, &options) {
        Ok(volume) => volume,
        Err(error) => {
            let _ = opened.send(Err(error));
            return Ok(());
        }
    };
    let block_size = volume.statfs().map(|s| s.cluster_size).unwrap_or(4096);
    let mounted = Mounted {
        device,
        mountpoint,
        fat_type: volume.fat_type(),
        label: volume.label(),
        placement: volume.placement(),
        read_only: options.read_only,
    };
    let _ = opened.send(Ok((mounted, block_size)));
    for job in jobs {
        if panic::catch_unwind(AssertUnwindSafe(|| job(&mut volume))).is_err() {
            tracing::error!("a file operation panicked; it was answered with EIO");
        }
    }
    volume.close()
}

/// Lazily detaches the mount: it disappears from the tree now and goes away for good once
/// the last process using it leaves.
fn detach(mountpoint: &Path) -> io::Result<()> {
    let path = CString::new(mountpoint.as_os_str().as_bytes())?;
    // SAFETY: `path` is a NUL-terminated string that lives until the call returns.
    let result = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Serves the FAT file system on `device` at `mountpoint` until it is unmounted (`umount`,
/// `fusermount3 -u`) or the process gets SIGINT, SIGTERM or SIGHUP; then writes everything
/// back, marks the volume clean and syncs the device. `on_mounted` runs once the mount is up.
pub fn mount(
    device: &Path,
    mountpoint: &Path,
    options: &MountOptions,
    on_mounted: impl FnOnce(&Mounted),
) -> Result<()> {
    let mountpoint = match mountpoint.canonicalize() {
        Ok(path) if path.is_dir() => path,
        _ => return Err(Error::MountpointNotDirectory(mountpoint.to_path_buf())),
    };
    if !Path::new("/dev/fuse").exists() {
        return Err(Error::FuseMissing);
    }

    let (job_sender, job_receiver) = mpsc::channel::<Job>();
    let (opened_sender, opened_receiver) = mpsc::channel();
    let volume = {
        let device = device.to_path_buf();
        let shown_mountpoint = mountpoint.clone();
        let options = options.clone();
        thread::Builder::new()
            .name("ring3-fat-volume".into())
            .spawn(move || {
                volume_thread(
                    device,
                    shown_mountpoint,
                    options,
                    opened_sender,
                    job_receiver,
                )
            })
            .map_err(|source| Error::Session {
                mountpoint: mountpoint.clone(),
                source,
            })?
    };
    let (mounted, block_size) = match opened_receiver.recv() {
        Ok(Ok(opened)) => opened,
        Ok(Err(error)) => {
            let _ = volume.join();
            return Err(error);
        }
        Err(_) => {
            let _ = volume.join();
            return Err(Error::VolumeThread);
        }
    };

    let presentation = Presentation {
        // SAFETY: getuid and getgid cannot fail and touch no memory.
        uid: options.uid.unwrap_or_else(|| unsafe { libc::getuid() }),
        // SAFETY: as above.
        gid: options.gid.unwrap_or_else(|| unsafe { libc::getgid() }),
        umask: options.umask & 0o777,
        read_only: options.read_only,
        block_size,
    };
    let adapter = FatFuse {
        jobs: Mutex::new(job_sender),
        presentation,
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(device.display().to_string()),
        MountOption::Subtype("ring3-fat".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
        if options.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    config.acl = if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(1);

    let session = Session::new(adapter, &mountpoint, &config);
    let mut session = match session {
        Ok(session) => session,
        Err(source) => {
            // The adapter (and with it the job queue) is gone; the volume thread closes.
            let _ = volume.join();
            if source.kind() == io::ErrorKind::NotFound && !Path::new("/dev/fuse").exists() {
                return Err(Error::FuseMissing);
            }
            return Err(Error::Mount {
                device: device.to_path_buf(),
                mountpoint,
                source,
            });
        }
    };

    let mut unmounter = session.unmount_callable();
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(|source| Error::Session {
        mountpoint: mountpoint.clone(),
        source,
    })?;
    let signal_handle = signals.handle();
    let signal_thread = {
        let target = mountpoint.clone();
        thread::Builder::new()
            .name("ring3-fat-signals".into())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    tracing::info!("signal {signal}: unmounting {}", target.display());
                    if let Err(error) = unmounter.unmount() {
                        eprintln!(
                            "unmounting {} failed ({error}); detaching it lazily: it goes away \
                             when the last process using it leaves",
                            target.display()
                        );
                        if let Err(error) = detach(&target) {
                            eprintln!("detaching {} failed: {error}", target.display());
                        }
                    }
                }
            })
            .map_err(|source| Error::Session {
                mountpoint: mountpoint.clone(),
                source,
            })?
    };

    on_mounted(&mounted);
    let served = session.run();
    signal_handle.close();
    let _ = signal_thread.join();

    let closed = volume.join().map_err(|_| Error::VolumeThread)?;
    served.map_err(|source| Error::Session {
        mountpoint: mountpoint.clone(),
        source,
    })?;
    closed.map_err(|source| Error::WriteBack {
        path: device.to_path_buf(),
        source,
    })
}
