//! A FAT file system (FAT12, FAT16, FAT32 with long names) served from user mode through
//! FUSE, so that with a USB stick driven by ring3 nothing device- or file-system-specific
//! runs in the kernel: the kernel only forwards file operations to this process.
//!
//! ```no_run
//! use std::path::Path;
//! use ring3_fat::{mount, MountOptions};
//!
//! // Blocks until the mount point is unmounted (`umount /mnt/stick`, `fusermount3 -u
//! // /mnt/stick`, or SIGINT/SIGTERM), then writes everything back and syncs the device.
//! mount(Path::new("/dev/ublkb0"), Path::new("/mnt/stick"), &MountOptions::default(), |mounted| {
//!     println!("{} mounted on {}", mounted.fat_name(), mounted.mountpoint.display());
//! })?;
//! # Ok::<(), ring3_fat::Error>(())
//! ```
//!
//! Layers, bottom up:
//! - [`cache`]: the device ([`BlockDevice`]: a block device node, an image file, or memory)
//!   behind a write-back cache that only moves whole aligned 64 KiB chunks.
//! - [`FatFs`]: the file operations on inode numbers (lookup, read, write, create, rename,
//!   …) over the `fatfs` crate, returning errno values. FAT has no inode numbers, so an
//!   [`InodeTable`] maps them to paths. Tests use it directly, without FUSE.
//! - `fuse` (private): the `fuser` adapter. `fatfs` is not thread-safe, so one thread owns
//!   the volume and runs the operations one at a time in arrival order.
//!
//! Data reaches the device when a file is closed (FUSE flush), on fsync, and at unmount,
//! which also marks the volume clean.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod cache;
mod error;
mod fuse;
pub mod inodes;
mod time;
mod volume;

pub use cache::{BlockCache, BlockDevice, FileDevice, MemDevice};
pub use error::{Errno, Error, Result};
pub use fuse::{mount, MountOptions, Mounted};
pub use inodes::{Ino, InodeTable, ROOT_INO};
pub use volume::{
    check_name, Attr, FatFs, FatType, Kind, Listing, OpResult, Placement, SpaceStats, VolumeOptions,
};
