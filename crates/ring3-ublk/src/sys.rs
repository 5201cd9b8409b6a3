//! The kernel's ublk ABI (`include/uapi/linux/ublk_cmd.h`) and the arithmetic around it.
//!
//! The structs and constants come from `libublk::sys`, the bindings libublk generates from
//! the kernel header, so this crate never restates the layout by hand. Only the ABI is
//! taken from libublk: its `UblkDev`/`UblkQueue` cannot be built without a `UblkCtrl`,
//! which opens `/dev/ublk-control` and so needs `CAP_SYS_ADMIN`, and its
//! `start_dev`/`end_user_recover` always send the caller's own pid. ring3 splits the
//! interface by privilege instead: the root daemon issues the control commands for a
//! server running in another, unprivileged process (see [`crate::control`]), and that
//! process runs only the data path on a `/dev/ublkcN` descriptor it was handed (see
//! [`crate::queue`]). Both sides are therefore implemented here on the `io-uring` crate.

use std::mem::size_of;

pub use libublk::sys::{
    ublk_param_basic, ublk_param_discard, ublk_params, ublksrv_ctrl_cmd, ublksrv_ctrl_dev_info,
    ublksrv_io_cmd, ublksrv_io_desc, UBLKSRV_CMD_BUF_OFFSET, UBLK_ATTR_FUA,
    UBLK_ATTR_VOLATILE_CACHE, UBLK_F_CMD_IOCTL_ENCODE, UBLK_F_USER_RECOVERY,
    UBLK_F_USER_RECOVERY_REISSUE, UBLK_IO_BUF_BITS, UBLK_IO_F_FUA, UBLK_IO_OP_DISCARD,
    UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE_ZEROES,
    UBLK_IO_OP_ZONE_APPEND, UBLK_IO_RES_ABORT, UBLK_IO_RES_OK, UBLK_MAX_NR_QUEUES,
    UBLK_MAX_QUEUE_DEPTH, UBLK_PARAM_TYPE_BASIC, UBLK_PARAM_TYPE_DISCARD, UBLK_S_DEV_DEAD,
    UBLK_S_DEV_FAIL_IO, UBLK_S_DEV_LIVE, UBLK_S_DEV_QUIESCED, UBLK_U_CMD_ADD_DEV,
    UBLK_U_CMD_DEL_DEV, UBLK_U_CMD_END_USER_RECOVERY, UBLK_U_CMD_GET_DEV_INFO,
    UBLK_U_CMD_SET_PARAMS, UBLK_U_CMD_START_DEV, UBLK_U_CMD_START_USER_RECOVERY,
    UBLK_U_CMD_STOP_DEV, UBLK_U_IO_COMMIT_AND_FETCH_REQ, UBLK_U_IO_FETCH_REQ,
};

/// Bytes in a sector, the unit of every position and length the kernel hands over.
pub const SECTOR_BYTES: u64 = 512;

/// Size of a control command payload: it goes into the 80-byte command area of a
/// 128-byte SQE (`IORING_SETUP_SQE128`).
pub const CTRL_CMD_BYTES: usize = 80;

/// Size of an I/O command payload: it fits the 16-byte command area of a normal SQE.
pub const IO_CMD_BYTES: usize = 16;

const _: () = assert!(size_of::<ublksrv_ctrl_cmd>() == 32);
const _: () = assert!(size_of::<ublksrv_ctrl_cmd>() <= CTRL_CMD_BYTES);
const _: () = assert!(size_of::<ublksrv_ctrl_dev_info>() == 64);
const _: () = assert!(size_of::<ublksrv_io_desc>() == 24);
const _: () = assert!(size_of::<ublksrv_io_cmd>() == IO_CMD_BYTES);
const _: () = assert!(size_of::<ublk_param_basic>() == 32);
const _: () = assert!(size_of::<ublk_param_discard>() == 20);

/// Bytes of the mapping that holds the I/O descriptors of one queue of `depth` tags.
///
/// The kernel insists on exactly this length (`ublk_queue_cmd_buf_size`).
pub fn descriptor_area_bytes(depth: u16, page_size: usize) -> usize {
    (usize::from(depth) * size_of::<ublksrv_io_desc>()).next_multiple_of(page_size)
}

/// Offset in `/dev/ublkcN` of the descriptor area of `queue_id`.
///
/// The areas are spaced for the largest possible depth, not the device's depth: the
/// kernel (`ublk_ch_mmap`) finds the queue by dividing the offset by the size of a
/// [`UBLK_MAX_QUEUE_DEPTH`]-deep area.
pub fn descriptor_area_offset(queue_id: u16, page_size: usize) -> u64 {
    let stride = (UBLK_MAX_QUEUE_DEPTH as usize * size_of::<ublksrv_io_desc>())
        .next_multiple_of(page_size) as u64;
    u64::from(UBLKSRV_CMD_BUF_OFFSET) + u64::from(queue_id) * stride
}

/// The bytes of a control command, ready for the SQE's command area.
pub fn ctrl_cmd_bytes(cmd: &ublksrv_ctrl_cmd) -> [u8; CTRL_CMD_BYTES] {
    let mut bytes = [0u8; CTRL_CMD_BYTES];
    bytes[0..4].copy_from_slice(&cmd.dev_id.to_ne_bytes());
    bytes[4..6].copy_from_slice(&cmd.queue_id.to_ne_bytes());
    bytes[6..8].copy_from_slice(&cmd.len.to_ne_bytes());
    bytes[8..16].copy_from_slice(&cmd.addr.to_ne_bytes());
    bytes[16..24].copy_from_slice(&cmd.data[0].to_ne_bytes());
    bytes[24..26].copy_from_slice(&cmd.dev_path_len.to_ne_bytes());
    bytes
}

/// The bytes of an I/O command, ready for the SQE's command area.
pub fn io_cmd_bytes(cmd: &ublksrv_io_cmd) -> [u8; IO_CMD_BYTES] {
    let mut bytes = [0u8; IO_CMD_BYTES];
    bytes[0..2].copy_from_slice(&cmd.q_id.to_ne_bytes());
    bytes[2..4].copy_from_slice(&cmd.tag.to_ne_bytes());
    bytes[4..8].copy_from_slice(&cmd.result.to_ne_bytes());
    bytes[8..16].copy_from_slice(&cmd.addr.to_ne_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_areas_are_spaced_for_the_maximum_depth() {
        // 4096 descriptors of 24 bytes: 96 KiB, already page aligned.
        assert_eq!(descriptor_area_offset(0, 4096), 0);
        assert_eq!(descriptor_area_offset(1, 4096), 96 << 10);
        assert_eq!(descriptor_area_offset(3, 4096), 3 * (96 << 10));
        // With 64 KiB pages the stride rounds up to 128 KiB.
        assert_eq!(descriptor_area_offset(2, 65536), 2 * (128 << 10));
    }

    #[test]
    fn descriptor_area_is_rounded_to_pages() {
        assert_eq!(descriptor_area_bytes(1, 4096), 4096);
        assert_eq!(descriptor_area_bytes(128, 4096), 4096);
        assert_eq!(descriptor_area_bytes(171, 4096), 8192);
        assert_eq!(descriptor_area_bytes(4096, 4096), 96 << 10);
    }

    #[test]
    fn control_command_bytes_follow_the_struct_layout() {
        let cmd = ublksrv_ctrl_cmd {
            dev_id: 7,
            queue_id: u16::MAX,
            len: 64,
            addr: 0x1122_3344_5566_7788,
            data: [4242],
            dev_path_len: 0,
            ..Default::default()
        };
        let bytes = ctrl_cmd_bytes(&cmd);
        // SAFETY: ublksrv_ctrl_cmd is plain old data of 32 bytes, all bit patterns valid.
        let raw: [u8; 32] = unsafe { std::mem::transmute(cmd) };
        assert_eq!(&bytes[..32], &raw);
        assert!(bytes[32..].iter().all(|&b| b == 0));
    }

    #[test]
    fn io_command_bytes_follow_the_struct_layout() {
        let cmd = ublksrv_io_cmd {
            q_id: 3,
            tag: 17,
            result: -5,
            addr: 0xdead_beef_0000,
        };
        let bytes = io_cmd_bytes(&cmd);
        // SAFETY: ublksrv_io_cmd is plain old data of 16 bytes, all bit patterns valid.
        let raw: [u8; 16] = unsafe { std::mem::transmute(cmd) };
        assert_eq!(bytes, raw);
    }
}
