//! What a ublk device looks like: the shape asked for at ADD_DEV ([`DeviceSpec`]), what
//! the kernel reports back ([`DeviceInfo`]) and the block-layer limits set before START_DEV
//! ([`Params`]), with their encoding into the kernel's structs.

use std::mem::size_of;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::sys::{self, ublk_param_basic, ublk_param_discard, ublk_params, ublksrv_ctrl_dev_info};

/// Largest I/O buffer per tag this crate accepts: the kernel's user-copy offset encoding
/// (`UBLK_IO_BUF_BITS`) caps a request at 32 MiB.
pub const MAX_IO_BYTES: u32 = 1 << sys::UBLK_IO_BUF_BITS;

/// The shape of a new device, for [`Control::add`](crate::Control::add).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The device number N of `/dev/ublkbN`, or `None` to let the kernel pick a free one.
    pub id: Option<u32>,
    /// Hardware queues: one serving thread each. The kernel caps this at the number of
    /// CPUs; [`DeviceInfo::queues`] says what was granted.
    pub queues: u16,
    /// Tags (requests in flight) per queue, 1 to 4096.
    pub depth: u16,
    /// Largest request in bytes, and so the size of each tag's buffer: a non-zero
    /// multiple of the page size, at most [`MAX_IO_BYTES`].
    pub max_io_bytes: u32,
    /// Survive the server's death: requests stay queued while no server runs and the
    /// ones the dead server held are re-issued to the next one
    /// (`UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`).
    pub recovery: bool,
}

impl DeviceSpec {
    /// The ADD_DEV payload, after checking what the kernel would reject.
    pub(crate) fn to_dev_info(self, page_size: usize) -> Result<ublksrv_ctrl_dev_info> {
        if self.queues == 0 || u32::from(self.queues) > sys::UBLK_MAX_NR_QUEUES {
            return Err(Error::InvalidSpec {
                what: "queue count",
                value: self.queues.into(),
                rule: "1 to 4096",
            });
        }
        if self.depth == 0 || u32::from(self.depth) > sys::UBLK_MAX_QUEUE_DEPTH {
            return Err(Error::InvalidSpec {
                what: "queue depth",
                value: self.depth.into(),
                rule: "1 to 4096",
            });
        }
        if self.max_io_bytes == 0
            || self.max_io_bytes > MAX_IO_BYTES
            || self.max_io_bytes as usize % page_size != 0
        {
            return Err(Error::InvalidSpec {
                what: "max_io_bytes",
                value: self.max_io_bytes.into(),
                rule: "a non-zero multiple of the page size, at most 32 MiB",
            });
        }
        let mut flags = u64::from(sys::UBLK_F_CMD_IOCTL_ENCODE);
        if self.recovery {
            flags |= u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE);
        }
        Ok(ublksrv_ctrl_dev_info {
            nr_hw_queues: self.queues,
            queue_depth: self.depth,
            max_io_buf_bytes: self.max_io_bytes,
            // The kernel insists that this matches the command header's dev_id.
            dev_id: self.id.unwrap_or(u32::MAX),
            ublksrv_pid: -1,
            flags,
            ..Default::default()
        })
    }
}

/// The state of a device as ublk_drv reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Added but not started, or stopped: no block device.
    Dead,
    /// Started: the block device exists and requests go to the server.
    Live,
    /// The server died and recovery is on: requests wait for the next server.
    Quiesced,
    /// The server died and requests fail until recovery ends.
    FailIo,
    /// A state this crate does not know.
    Other(u16),
}

impl DeviceState {
    /// Decodes `ublksrv_ctrl_dev_info::state`.
    pub fn from_raw(state: u16) -> DeviceState {
        match u32::from(state) {
            sys::UBLK_S_DEV_DEAD => DeviceState::Dead,
            sys::UBLK_S_DEV_LIVE => DeviceState::Live,
            sys::UBLK_S_DEV_QUIESCED => DeviceState::Quiesced,
            sys::UBLK_S_DEV_FAIL_IO => DeviceState::FailIo,
            _ => DeviceState::Other(state),
        }
    }
}

impl std::fmt::Display for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceState::Dead => f.write_str("dead"),
            DeviceState::Live => f.write_str("live"),
            DeviceState::Quiesced => f.write_str("quiesced"),
            DeviceState::FailIo => f.write_str("fail-io"),
            DeviceState::Other(state) => write!(f, "unknown ({state})"),
        }
    }
}

/// A device as ublk_drv describes it (ADD_DEV and GET_DEV_INFO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device number N of `/dev/ublkbN` and `/dev/ublkcN`.
    pub id: u32,
    /// Hardware queues granted.
    pub queues: u16,
    /// Tags per queue.
    pub depth: u16,
    /// Largest request in bytes (the kernel rounds the asked size down to whole pages):
    /// each tag's buffer must be at least this long.
    pub max_io_bytes: u32,
    /// Where the device is in its life.
    pub state: DeviceState,
    /// `UBLK_F_*` flags in force, including the ones the kernel added.
    pub flags: u64,
    /// The pid of the server process given at START_DEV or END_USER_RECOVERY, or -1.
    pub server_pid: i32,
}

impl DeviceInfo {
    pub(crate) fn from_raw(info: &ublksrv_ctrl_dev_info) -> DeviceInfo {
        DeviceInfo {
            id: info.dev_id,
            queues: info.nr_hw_queues,
            depth: info.queue_depth,
            max_io_bytes: info.max_io_buf_bytes,
            state: DeviceState::from_raw(info.state),
            flags: info.flags,
            server_pid: info.ublksrv_pid,
        }
    }

    /// The block device, `/dev/ublkbN`; it exists while the device is started.
    pub fn block_device(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkb{}", self.id))
    }

    /// The char device the server's queues run on, `/dev/ublkcN`.
    pub fn char_device(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkc{}", self.id))
    }
}

/// Discard support, for [`Params::discard`]. One range per discard request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discard {
    /// The smallest unit the server can discard, in bytes: a multiple of the logical block.
    pub granularity: u32,
    /// Largest discard request in bytes: a multiple of 512.
    pub max_bytes: u32,
}

/// Block-layer limits of a device, for [`Control::set_params`](crate::Control::set_params).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Capacity in bytes: a multiple of `logical_block`.
    pub size_bytes: u64,
    /// Logical block size: a power of two from 512 to the page size.
    pub logical_block: u32,
    /// Physical block size: a power of two, at least `logical_block`.
    pub physical_block: u32,
    /// Largest request in bytes: a non-zero multiple of `logical_block`, at most the
    /// device's [`DeviceInfo::max_io_bytes`].
    pub max_io_bytes: u32,
    /// The server caches writes: the block layer sends flushes.
    pub volatile_cache: bool,
    /// The server honours FUA writes (only meaningful with `volatile_cache`).
    pub fua: bool,
    /// Discard support, or `None`.
    pub discard: Option<Discard>,
    /// Largest write-zeroes request in bytes (a multiple of 512), or 0 for none.
    pub write_zeroes_max_bytes: u32,
}

fn block_shift(what: &'static str, bytes: u32, page_size: usize) -> Result<u8> {
    if !bytes.is_power_of_two() || bytes < 512 || bytes as usize > page_size {
        return Err(Error::InvalidSpec {
            what,
            value: bytes.into(),
            rule: "a power of two from 512 to the page size",
        });
    }
    Ok(bytes.trailing_zeros() as u8)
}

fn sectors(what: &'static str, bytes: u32) -> Result<u32> {
    if u64::from(bytes) % sys::SECTOR_BYTES != 0 {
        return Err(Error::InvalidSpec {
            what,
            value: bytes.into(),
            rule: "a multiple of 512",
        });
    }
    Ok(bytes / sys::SECTOR_BYTES as u32)
}

impl Params {
    /// The SET_PARAMS payload, after checking what the kernel would reject
    /// (`ublk_validate_params`) or what would make a nonsense disk.
    pub fn to_raw(&self, page_size: usize) -> Result<ublk_params> {
        let logical_shift = block_shift("logical block size", self.logical_block, page_size)?;
        if !self.physical_block.is_power_of_two() || self.physical_block < self.logical_block {
            return Err(Error::InvalidSpec {
                what: "physical block size",
                value: self.physical_block.into(),
                rule: "a power of two, at least the logical block size",
            });
        }
        let physical_shift = self.physical_block.trailing_zeros() as u8;
        if self.size_bytes == 0 || self.size_bytes % u64::from(self.logical_block) != 0 {
            return Err(Error::InvalidSpec {
                what: "device size",
                value: self.size_bytes,
                rule: "a non-zero multiple of the logical block size",
            });
        }
        if self.max_io_bytes == 0
            || self.max_io_bytes > MAX_IO_BYTES
            || self.max_io_bytes % self.logical_block != 0
        {
            return Err(Error::InvalidSpec {
                what: "max_io_bytes",
                value: self.max_io_bytes.into(),
                rule: "a non-zero multiple of the logical block size, at most 32 MiB",
            });
        }
        let mut attrs = 0;
        if self.volatile_cache {
            attrs |= sys::UBLK_ATTR_VOLATILE_CACHE;
        }
        if self.fua {
            attrs |= sys::UBLK_ATTR_FUA;
        }
        let mut params = ublk_params {
            len: size_of::<ublk_params>() as u32,
            types: sys::UBLK_PARAM_TYPE_BASIC,
            basic: ublk_param_basic {
                attrs,
                logical_bs_shift: logical_shift,
                physical_bs_shift: physical_shift,
                io_opt_shift: physical_shift,
                io_min_shift: physical_shift,
                max_sectors: self.max_io_bytes / sys::SECTOR_BYTES as u32,
                chunk_sectors: 0,
                dev_sectors: self.size_bytes / sys::SECTOR_BYTES,
                virt_boundary_mask: 0,
            },
            ..Default::default()
        };
        let write_zeroes_sectors = sectors("write_zeroes_max_bytes", self.write_zeroes_max_bytes)?;
        // Write-zeroes lives in the discard parameters, so they are sent for either.
        if self.discard.is_some() || write_zeroes_sectors != 0 {
            let (granularity, max_discard_sectors) = match self.discard {
                Some(discard) => {
                    if discard.granularity == 0 || discard.granularity % self.logical_block != 0 {
                        return Err(Error::InvalidSpec {
                            what: "discard granularity",
                            value: discard.granularity.into(),
                            rule: "a non-zero multiple of the logical block size",
                        });
                    }
                    (
                        discard.granularity,
                        sectors("discard max_bytes", discard.max_bytes)?,
                    )
                }
                // The kernel wants a granularity even when discard is off.
                None => (self.logical_block, 0),
            };
            params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
            params.discard = ublk_param_discard {
                discard_alignment: 0,
                discard_granularity: granularity,
                max_discard_sectors,
                max_write_zeroes_sectors: write_zeroes_sectors,
                // ublk_drv supports single-range discards only.
                max_discard_segments: 1,
                reserved0: 0,
            };
        }
        Ok(params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    fn spec() -> DeviceSpec {
        DeviceSpec {
            id: None,
            queues: 2,
            depth: 64,
            max_io_bytes: 512 << 10,
            recovery: false,
        }
    }

    fn params() -> Params {
        Params {
            size_bytes: 64 << 20,
            logical_block: 512,
            physical_block: 4096,
            max_io_bytes: 512 << 10,
            volatile_cache: true,
            fua: true,
            discard: Some(Discard {
                granularity: 4096,
                max_bytes: 1 << 30 >> 1,
            }),
            write_zeroes_max_bytes: 1 << 20,
        }
    }

    #[test]
    fn spec_encodes_into_dev_info() {
        let info = spec().to_dev_info(PAGE).unwrap();
        assert_eq!(info.nr_hw_queues, 2);
        assert_eq!(info.queue_depth, 64);
        assert_eq!(info.max_io_buf_bytes, 512 << 10);
        assert_eq!(info.dev_id, u32::MAX, "None lets the kernel pick");
        assert_eq!(info.flags, u64::from(sys::UBLK_F_CMD_IOCTL_ENCODE));

        let info = DeviceSpec {
            id: Some(5),
            recovery: true,
            ..spec()
        }
        .to_dev_info(PAGE)
        .unwrap();
        assert_eq!(info.dev_id, 5);
        assert_eq!(
            info.flags,
            u64::from(
                sys::UBLK_F_CMD_IOCTL_ENCODE
                    | sys::UBLK_F_USER_RECOVERY
                    | sys::UBLK_F_USER_RECOVERY_REISSUE
            )
        );
    }

    #[test]
    fn spec_rejects_what_the_kernel_would() {
        for bad in [
            DeviceSpec {
                queues: 0,
                ..spec()
            },
            DeviceSpec { depth: 0, ..spec() },
            DeviceSpec {
                depth: 4097,
                ..spec()
            },
            DeviceSpec {
                max_io_bytes: 0,
                ..spec()
            },
            DeviceSpec {
                max_io_bytes: 6000,
                ..spec()
            },
            DeviceSpec {
                max_io_bytes: 64 << 20,
                ..spec()
            },
        ] {
            let error = bad.to_dev_info(PAGE).unwrap_err();
            assert!(
                matches!(error, Error::InvalidSpec { .. }),
                "{bad:?}: {error}"
            );
        }
    }

    #[test]
    fn params_encode_shifts_sectors_and_attrs() {
        let raw = params().to_raw(PAGE).unwrap();
        assert_eq!(raw.len as usize, size_of::<ublk_params>());
        assert_eq!(
            raw.types,
            sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD
        );
        assert_eq!(
            raw.basic.attrs,
            sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA
        );
        assert_eq!(raw.basic.logical_bs_shift, 9);
        assert_eq!(raw.basic.physical_bs_shift, 12);
        assert_eq!(raw.basic.io_min_shift, 12);
        assert_eq!(raw.basic.io_opt_shift, 12);
        assert_eq!(raw.basic.max_sectors, 1024);
        assert_eq!(raw.basic.dev_sectors, (64 << 20) / 512);
        assert_eq!(raw.discard.discard_granularity, 4096);
        assert_eq!(raw.discard.max_discard_sectors, (1 << 29) / 512);
        assert_eq!(raw.discard.max_write_zeroes_sectors, 2048);
        assert_eq!(raw.discard.max_discard_segments, 1);
    }

    #[test]
    fn params_without_cache_or_discard_send_basic_only() {
        let raw = Params {
            logical_block: 4096,
            volatile_cache: false,
            fua: false,
            discard: None,
            write_zeroes_max_bytes: 0,
            ..params()
        }
        .to_raw(PAGE)
        .unwrap();
        assert_eq!(raw.types, sys::UBLK_PARAM_TYPE_BASIC);
        assert_eq!(raw.basic.attrs, 0);
        assert_eq!(raw.basic.logical_bs_shift, 12);
        assert_eq!(raw.discard.max_discard_segments, 0);
    }

    #[test]
    fn write_zeroes_alone_still_sends_a_granularity() {
        let raw = Params {
            discard: None,
            ..params()
        }
        .to_raw(PAGE)
        .unwrap();
        assert_eq!(
            raw.types,
            sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD
        );
        assert_eq!(raw.discard.max_discard_sectors, 0);
        assert_eq!(raw.discard.discard_granularity, 512);
        assert_eq!(raw.discard.max_write_zeroes_sectors, 2048);
    }

    #[test]
    fn params_reject_nonsense() {
        let discard = |granularity, max_bytes| {
            Some(Discard {
                granularity,
                max_bytes,
            })
        };
        for bad in [
            Params {
                logical_block: 256,
                ..params()
            },
            Params {
                logical_block: 1000,
                ..params()
            },
            Params {
                logical_block: 8192,
                physical_block: 8192,
                ..params()
            },
            Params {
                physical_block: 256,
                ..params()
            },
            Params {
                physical_block: 3000,
                ..params()
            },
            Params {
                size_bytes: 0,
                ..params()
            },
            Params {
                size_bytes: 1000,
                ..params()
            },
            Params {
                max_io_bytes: 0,
                ..params()
            },
            Params {
                max_io_bytes: 1000,
                ..params()
            },
            Params {
                discard: discard(0, 4096),
                ..params()
            },
            Params {
                discard: discard(4096, 1000),
                ..params()
            },
            Params {
                write_zeroes_max_bytes: 100,
                ..params()
            },
        ] {
            let error = bad.to_raw(PAGE).unwrap_err();
            assert!(
                matches!(error, Error::InvalidSpec { .. }),
                "{bad:?}: {error}"
            );
        }
    }

    #[test]
    fn device_info_decodes_and_names_its_nodes() {
        let raw = ublksrv_ctrl_dev_info {
            nr_hw_queues: 2,
            queue_depth: 128,
            state: sys::UBLK_S_DEV_QUIESCED as u16,
            max_io_buf_bytes: 1 << 20,
            dev_id: 3,
            ublksrv_pid: 1234,
            flags: 0x58,
            ..Default::default()
        };
        let info = DeviceInfo::from_raw(&raw);
        assert_eq!(
            info,
            DeviceInfo {
                id: 3,
                queues: 2,
                depth: 128,
                max_io_bytes: 1 << 20,
                state: DeviceState::Quiesced,
                flags: 0x58,
                server_pid: 1234,
            }
        );
        assert_eq!(info.block_device(), PathBuf::from("/dev/ublkb3"));
        assert_eq!(info.char_device(), PathBuf::from("/dev/ublkc3"));
    }

    #[test]
    fn states_decode() {
        assert_eq!(DeviceState::from_raw(0), DeviceState::Dead);
        assert_eq!(DeviceState::from_raw(1), DeviceState::Live);
        assert_eq!(DeviceState::from_raw(2), DeviceState::Quiesced);
        assert_eq!(DeviceState::from_raw(3), DeviceState::FailIo);
        assert_eq!(DeviceState::from_raw(9), DeviceState::Other(9));
    }
}
