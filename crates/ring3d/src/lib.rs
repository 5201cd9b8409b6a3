//! `ring3d`, the ring3 driver host.
//!
//! It binds the devices named in its config file to vfio-pci, runs each driver in its own
//! unprivileged process, restarts it within a budget when it dies, and exposes what the
//! driver serves as a standard device: each NVMe namespace and USB stick as a ublk block
//! device (`/dev/ublkbN`) whose requests survive a driver crash (ublk user recovery), a
//! NIC as a TAP interface, a USB serial adapter as a terminal.
//!
//! - [`config`]: reading and checking the config, and finding its devices on the
//!   machine, without touching any of them. Nothing is bound until the whole config is
//!   valid.
//! - [`daemon`] and [`supervisor`]: binding, one supervisor thread per device (start,
//!   heartbeats, restarts, the restart budget, stop), SIGTERM.
//! - [`driver`]: the driver process (`ring3d driver`, started by the daemon): sandbox,
//!   device bring-up, one thread per queue between the ublk and NVMe rings.
//! - [`ipc`]: the channel between the two, which carries the VFIO and ublk files.
//! - [`sandbox`]: what a driver process gives up before it reads device data.
//! - [`control`]: the control socket behind `ring3 status`, `restart` and `stop`.
//!
//! ```
//! use ring3d::Config;
//!
//! let text = r#"
//! [[device]]
//! name = "fast0"
//! pci = "0000:03:00.0"
//! driver = "nvme"
//! [device.nvme]
//! queue_depth = 5000
//! "#;
//! let errors = Config::parse(text, "ring3d.toml").unwrap_err();
//! assert_eq!(
//!     errors.to_string(),
//!     r#"ring3d.toml:7:15: device "fast0": nvme: queue_depth 5000 is out of range (2 to 4096)"#
//! );
//! ```
//!
//! On a machine, [`Config::load`] reads the file and [`Config::resolve`] turns it into a
//! [`Plan`](config::Plan) against `ring3::pci::Sysfs::system()`; `ring3d --config FILE
//! --check` does both and prints the plan or every problem (exit status 1).
//!
//! # The config file
//!
//! TOML, by default at `/etc/ring3/ring3d.toml`; `ring3d.example.toml` beside this crate's
//! `Cargo.toml` shows every key.
//!
//! ```toml
//! [daemon]                                  # optional, as is every key in it
//! socket = "/run/ring3/ring3d.sock"         # control socket: an absolute path
//! socket_group = "ring3"                    # group allowed to use it (mode 0660);
//!                                           # none (the default): root only (0600)
//! driver_user = "ring3"                     # user the drivers run as; never root
//! restart_budget = { restarts = 5, window_s = 1800 }
//! heartbeat_ms = 1000                       # 10 to 60000
//! heartbeat_timeout_ms = 5000               # 20 to 600000, more than heartbeat_ms
//!
//! [[device]]                                # at least one
//! name = "fast0"                            # unique; letters, digits, _ - . (at most 32)
//! pci = "0000:03:00.0"                      # either the device's address ...
//! # match = "1b36:0010"                     # ... or its vendor:device IDs (4 hex digits
//! # index = 0                               #     each), and which of them in address
//!                                           #     order, from 0, if several match
//! driver = "nvme"                           # the known drivers: nvme, virtio-net,
//!                                           #   e1000e, usb-storage, ftdi
//! expose = "ublk"                           # nvme: ublk (the default)
//! [device.nvme]                             # the driver's options, all optional
//! queues = 4                                # I/O queue pairs, 1 to 1024 (default 4)
//! queue_depth = 128                         # entries per queue, 2 to 4096 (default 128)
//! namespaces = [1]                          # namespace IDs (default: all)
//! ```
//!
//! USB devices are named with `usb` instead: `usb = "VID:PID"`, `"VID:PID:SERIAL"` or a
//! port such as `"1-2.1"` (`ring3 usb list` shows them), with `driver = "usb-storage"`
//! (exposed as ublk) or `driver = "ftdi"` (exposed as a terminal, `/dev/pts/N`, linked
//! from `/run/ring3/ttyUSB-<serial>`; `[device.serial]` `baud` sets its first line
//! speed). `force = true` lets ring3d detach a kernel driver bound to the device; it is
//! attached again when ring3d lets the device go. A USB device is looked up each time
//! its driver starts: while it is unplugged its state is `waiting`, and its driver
//! starts again when it is back (without counting against the restart budget).
//!
//! `restart_budget`: a driver that dies more than `restarts` times (0 to 1000; default 5)
//! within `window_s` seconds (1 to 604800; default 1800) is left stopped. A driver is
//! deemed hung, and restarted, when it has not sent a heartbeat for
//! `heartbeat_timeout_ms`.
//!
//! # What is checked
//!
//! [`Config::parse`] reports every problem in the file, not just the first, each as
//! `FILE:LINE:COLUMN: what is wrong; what would be right`, in file order:
//! TOML syntax; unknown keys and sections; values of the wrong type; malformed `pci`
//! addresses and `match` IDs; devices with both or neither of `pci` and `match`, or an
//! `index` without `match`; missing names and drivers; duplicate names; the same address
//! (however written) or the same `match` and `index` twice; unknown drivers; exposures
//! that do not fit the driver; numbers out of range; a heartbeat timeout not longer than
//! the heartbeat; a `driver_user` of root; no devices at all.
//!
//! [`Config::resolve`] then checks the file against the machine: each `pci` address must
//! be a device, each `match` must find exactly one device (or as many as its `index`
//! needs), each device must be of the class its driver drives (an NVMe controller for
//! `nvme`), and no two entries may end on the same device. It only reads sysfs.
//!
//! Whether `driver_user` and `socket_group` exist on the machine is left to the daemon.
//!
//! [`sandbox`] is what a driver process gives up before it touches device data;
//! [`control`] is the socket `ring3 status`, `restart` and `stop` talk to.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod config;
pub mod control;
pub mod daemon;
pub mod driver;
pub mod error;
pub mod ipc;
pub mod sandbox;
pub mod supervisor;
pub mod usb;

pub use config::Config;
pub use error::{ConfigError, ConfigErrors, Location};
