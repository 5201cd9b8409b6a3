//! The Linux ublk interface (userspace block devices, `ublk_drv`), split by privilege.
//!
//! A ublk device is a block device `/dev/ublkbN` whose requests are served by a user
//! process, the *server*, through the char device `/dev/ublkcN`. ring3's NVMe driver
//! serves namespaces this way without any privilege, while the commands that create and
//! start devices need `CAP_SYS_ADMIN`. This crate keeps the two apart:
//!
//! - [`Control`] (root only, in ring3d): the commands on `/dev/ublk-control` — add a
//!   device, set its limits, start it for a server process given by pid, stop, delete,
//!   and the two halves of recovery after a server died.
//! - [`Queue`] (no privileges, in the driver): one hardware queue's data path on a
//!   `/dev/ublkcN` descriptor the root side opened ([`Control::open_char_device`]) and
//!   passed over.
//!
//! A device's life, with the server's part in the middle:
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use ring3_ublk::{Control, DeviceSpec, Params};
//!
//! # fn main() -> ring3_ublk::Result<()> {
//! let control = Control::open()?;
//! let spec = DeviceSpec { id: None, queues: 1, depth: 64, max_io_bytes: 512 << 10, recovery: true };
//! let info = control.add(&spec)?;
//! control.set_params(info.id, &Params {
//!     size_bytes: 1 << 30,
//!     logical_block: 512,
//!     physical_block: 4096,
//!     max_io_bytes: info.max_io_bytes,
//!     volatile_cache: false,
//!     fua: false,
//!     discard: None,
//!     write_zeroes_max_bytes: 0,
//! })?;
//! let cdev = Arc::new(control.open_char_device(info.id, Duration::from_secs(5))?);
//! // Hand `cdev` to the server; it creates a Queue per queue on its own threads, fetches
//! // every tag and polls ([`Queue`] has a full example). Meanwhile:
//! # let server_pid = 1;
//! control.start(info.id, server_pid, Duration::from_secs(10))?;
//! println!("serving {}", info.block_device().display());
//! // ... later
//! control.stop(info.id)?; // the queues see Ok(false) from poll and are dropped
//! drop(cdev);
//! control.delete(info.id)?;
//! # Ok(()) }
//! ```
//!
//! Concepts:
//!
//! - **Tags**: each queue has `depth` tags, one request in flight each. The server gives
//!   every tag a buffer of `max_io_bytes` with [`Queue::fetch`]; ublk_drv copies WRITE data
//!   into it before handing the request over, and READ data out of it when the server
//!   answers with [`Queue::complete`].
//! - **Starting waits for the server**: START_DEV (and END_USER_RECOVERY) complete only
//!   once every queue has fetched all its tags, so [`Control::start`] runs while the
//!   server's queues are already polling, and takes a timeout.
//! - **Recovery**: with [`DeviceSpec::recovery`], a server's death quiesces the device
//!   instead of failing I/O. [`Control::start_recovery`] (once every descriptor of the old
//!   server's `/dev/ublkcN` is closed), a new server's queues, then
//!   [`Control::end_recovery`] resume it; requests the dead server held are re-issued.
//! - **Trust**: the descriptors ublk_drv writes are checked ([`queue::decode_descriptor`])
//!   before a request is handed out.
//!
//! The kernel ABI comes from libublk's bindings ([`sys`] says why only those).
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod control;
pub mod device;
pub mod error;
pub mod queue;
pub mod sys;

pub use control::Control;
pub use device::{DeviceInfo, DeviceSpec, DeviceState, Discard, Params};
pub use error::{Error, ErrorKind, Result};
pub use queue::{Op, Queue, Request};
