//! Every VFIO ioctl, as a short typed wrapper (Linux `include/uapi/linux/vfio.h`).
//!
//! This is the only place in the VFIO layer that hands raw pointers to the kernel. Each
//! wrapper builds the kernel structure from `vfio-bindings`, makes one call and returns the
//! kernel's answer or the OS error; the layer above turns OS errors into messages that say
//! what to do. All VFIO ioctls are `_IO(VFIO_TYPE, VFIO_BASE + n)`: the kernel learns the
//! structure's size from its leading `argsz` field, not from the request number.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use vfio_bindings::bindings::vfio as sys;

/// `_IO(VFIO_TYPE, VFIO_BASE + n)`: no direction or size bits, type in bits 8..16.
const fn vfio_io(n: u32) -> u32 {
    ((sys::VFIO_TYPE as u32) << 8) | (sys::VFIO_BASE + n)
}

const GET_API_VERSION: u32 = vfio_io(0);
const CHECK_EXTENSION: u32 = vfio_io(1);
const SET_IOMMU: u32 = vfio_io(2);
const GROUP_GET_STATUS: u32 = vfio_io(3);
const GROUP_SET_CONTAINER: u32 = vfio_io(4);
const GROUP_GET_DEVICE_FD: u32 = vfio_io(6);
const DEVICE_GET_INFO: u32 = vfio_io(7);
const DEVICE_GET_REGION_INFO: u32 = vfio_io(8);
const DEVICE_GET_IRQ_INFO: u32 = vfio_io(9);
const DEVICE_SET_IRQS: u32 = vfio_io(10);
const DEVICE_RESET: u32 = vfio_io(11);
// The container's type1 IOMMU ioctls share numbers with device ioctls; the fd tells them apart.
const IOMMU_GET_INFO: u32 = vfio_io(12);
const IOMMU_MAP_DMA: u32 = vfio_io(13);
const IOMMU_UNMAP_DMA: u32 = vfio_io(14);

// The numbers above are the kernel ABI: pin two of them to the values in linux/vfio.h.
const _: () = assert!(GET_API_VERSION == 0x3b64);
const _: () = assert!(IOMMU_UNMAP_DMA == 0x3b72);

/// `size_of::<T>()` as the `argsz` the kernel expects.
const fn argsz<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

/// One ioctl; a negative return becomes the thread's errno.
///
/// # Safety
/// `arg` must be what the kernel expects for `request` on `fd`: a pointer to a live,
/// correctly sized (as stated in its `argsz`) and writable structure, or a plain integer.
unsafe fn raw_ioctl(fd: BorrowedFd<'_>, request: u32, arg: libc::c_ulong) -> io::Result<i32> {
    // SAFETY: the caller guarantees `arg` matches `request`; `fd` is open for the call.
    // The request type is c_ulong on glibc and c_int on musl, hence `as _`.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// An ioctl whose argument is a pointer to `value`.
///
/// # Safety
/// `T` must be the structure the kernel reads and writes for `request`, with its `argsz`
/// no larger than the memory `value` points to.
unsafe fn ioctl_with_mut<T>(fd: BorrowedFd<'_>, request: u32, value: &mut T) -> io::Result<i32> {
    // SAFETY: forwarded from the caller; `value` is live and writable for the call.
    unsafe { raw_ioctl(fd, request, value as *mut T as libc::c_ulong) }
}

/// `VFIO_GET_API_VERSION` on a container.
pub fn get_api_version(container: BorrowedFd<'_>) -> io::Result<i32> {
    // SAFETY: this request takes no argument.
    unsafe { raw_ioctl(container, GET_API_VERSION, 0) }
}

/// `VFIO_CHECK_EXTENSION` on a container: whether the kernel supports `extension`.
pub fn check_extension(container: BorrowedFd<'_>, extension: u32) -> io::Result<bool> {
    // SAFETY: this request takes the extension number by value, not a pointer.
    let ret = unsafe { raw_ioctl(container, CHECK_EXTENSION, extension.into()) }?;
    Ok(ret > 0)
}

/// `VFIO_SET_IOMMU` on a container that has at least one group attached.
pub fn set_iommu(container: BorrowedFd<'_>, iommu_type: u32) -> io::Result<()> {
    // SAFETY: this request takes the IOMMU type by value, not a pointer.
    unsafe { raw_ioctl(container, SET_IOMMU, iommu_type.into()) }.map(drop)
}

/// `VFIO_IOMMU_GET_INFO` on a container with its IOMMU set: the fixed part and, when the
/// kernel has capabilities to report, the whole reply (fixed part plus capability chain).
///
/// The reply's `cap_offset` and each capability's `next` are offsets into the returned bytes.
pub fn iommu_get_info(
    container: BorrowedFd<'_>,
) -> io::Result<(sys::vfio_iommu_type1_info, Vec<u8>)> {
    let mut info = sys::vfio_iommu_type1_info {
        argsz: argsz::<sys::vfio_iommu_type1_info>(),
        ..Default::default()
    };
    // SAFETY: `info` is the type1 info structure and its argsz is its own size.
    unsafe { ioctl_with_mut(container, IOMMU_GET_INFO, &mut info) }?;
    if info.flags & sys::VFIO_IOMMU_INFO_CAPS == 0
        || info.argsz <= argsz::<sys::vfio_iommu_type1_info>()
    {
        return Ok((info, Vec::new()));
    }
    // The capabilities did not fit: the kernel wrote the size it needs into argsz. Ask again
    // with a buffer that big, 8-byte aligned like the structure (u64 words).
    let needed = info.argsz as usize;
    let mut words = vec![0u64; needed.div_ceil(8)];
    let header = sys::vfio_iommu_type1_info {
        argsz: info.argsz,
        ..Default::default()
    };
    // SAFETY: the buffer is bigger than the fixed structure (argsz > its size, checked
    // above) and 8-byte aligned, as the structure needs.
    unsafe {
        words
            .as_mut_ptr()
            .cast::<sys::vfio_iommu_type1_info>()
            .write(header)
    };
    // SAFETY: `words` holds `needed` = argsz writable bytes, starting with the info structure.
    unsafe {
        raw_ioctl(
            container,
            IOMMU_GET_INFO,
            words.as_mut_ptr() as libc::c_ulong,
        )
    }?;
    // SAFETY: as above: the buffer starts with an initialised, aligned info structure.
    let full = unsafe { words.as_ptr().cast::<sys::vfio_iommu_type1_info>().read() };
    let bytes: Vec<u8> = words
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .take(needed)
        .collect();
    Ok((full, bytes))
}

/// `VFIO_IOMMU_MAP_DMA`: lets the device reach `size` bytes at `vaddr` through `iova`.
///
/// # Safety
/// `vaddr..vaddr+size` must be memory this process owns and keeps allocated until the
/// range is unmapped with [`unmap_dma`]: the device may read and write it until then.
pub unsafe fn map_dma(
    container: BorrowedFd<'_>,
    vaddr: u64,
    size: u64,
    iova: u64,
) -> io::Result<()> {
    let mut map = sys::vfio_iommu_type1_dma_map {
        argsz: argsz::<sys::vfio_iommu_type1_dma_map>(),
        flags: sys::VFIO_DMA_MAP_FLAG_READ | sys::VFIO_DMA_MAP_FLAG_WRITE,
        vaddr,
        iova,
        size,
    };
    // SAFETY: `map` is the map structure with its own size as argsz; the kernel pins the
    // pages itself, and the caller keeps them allocated while they are mapped.
    unsafe { ioctl_with_mut(container, IOMMU_MAP_DMA, &mut map) }.map(drop)
}

/// `VFIO_IOMMU_UNMAP_DMA`: returns how many bytes the kernel unmapped.
pub fn unmap_dma(container: BorrowedFd<'_>, iova: u64, size: u64) -> io::Result<u64> {
    let mut unmap = sys::vfio_iommu_type1_dma_unmap {
        argsz: argsz::<sys::vfio_iommu_type1_dma_unmap>(),
        flags: 0,
        iova,
        size,
        ..Default::default()
    };
    // SAFETY: `unmap` is the unmap structure without a dirty bitmap (flags 0), so the
    // kernel reads and writes only its fixed part, whose size is argsz.
    unsafe { ioctl_with_mut(container, IOMMU_UNMAP_DMA, &mut unmap) }?;
    Ok(unmap.size)
}

/// `VFIO_GROUP_GET_STATUS`: the group's `VFIO_GROUP_FLAGS_*`.
pub fn group_get_status(group: BorrowedFd<'_>) -> io::Result<u32> {
    let mut status = sys::vfio_group_status {
        argsz: argsz::<sys::vfio_group_status>(),
        flags: 0,
    };
    // SAFETY: `status` is the group status structure with its own size as argsz.
    unsafe { ioctl_with_mut(group, GROUP_GET_STATUS, &mut status) }?;
    Ok(status.flags)
}

/// `VFIO_GROUP_SET_CONTAINER`: attaches the group to the container.
pub fn group_set_container(group: BorrowedFd<'_>, container: BorrowedFd<'_>) -> io::Result<()> {
    let mut container_fd: i32 = container.as_raw_fd();
    // SAFETY: this request reads one int (the container's fd) through the pointer.
    unsafe { ioctl_with_mut(group, GROUP_SET_CONTAINER, &mut container_fd) }.map(drop)
}

/// `VFIO_GROUP_GET_DEVICE_FD`: a new fd for the device named `name` (its PCI address).
pub fn group_get_device_fd(group: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: this request reads a NUL-terminated string, which `name` is.
    let fd = unsafe { raw_ioctl(group, GROUP_GET_DEVICE_FD, name.as_ptr() as libc::c_ulong) }?;
    // SAFETY: on success the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `VFIO_DEVICE_GET_INFO`.
pub fn device_get_info(device: BorrowedFd<'_>) -> io::Result<sys::vfio_device_info> {
    let mut info = sys::vfio_device_info {
        argsz: argsz::<sys::vfio_device_info>(),
        ..Default::default()
    };
    // SAFETY: `info` is the device info structure with its own size as argsz; capabilities
    // that do not fit are not written (the kernel only raises argsz).
    unsafe { ioctl_with_mut(device, DEVICE_GET_INFO, &mut info) }?;
    Ok(info)
}

/// `VFIO_DEVICE_GET_REGION_INFO` for region `index` (fixed part only).
pub fn device_get_region_info(
    device: BorrowedFd<'_>,
    index: u32,
) -> io::Result<sys::vfio_region_info> {
    let mut info = sys::vfio_region_info {
        argsz: argsz::<sys::vfio_region_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: `info` is the region info structure with its own size as argsz; capabilities
    // that do not fit are not written (the kernel only raises argsz).
    unsafe { ioctl_with_mut(device, DEVICE_GET_REGION_INFO, &mut info) }?;
    Ok(info)
}

/// `VFIO_DEVICE_GET_IRQ_INFO` for interrupt index `index`.
pub fn device_get_irq_info(device: BorrowedFd<'_>, index: u32) -> io::Result<sys::vfio_irq_info> {
    let mut info = sys::vfio_irq_info {
        argsz: argsz::<sys::vfio_irq_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: `info` is the IRQ info structure with its own size as argsz.
    unsafe { ioctl_with_mut(device, DEVICE_GET_IRQ_INFO, &mut info) }?;
    Ok(info)
}

/// `VFIO_DEVICE_SET_IRQS` with eventfds (or -1 to detach a vector) as data, or no data.
///
/// `flags` is one `VFIO_IRQ_SET_DATA_*` and one `VFIO_IRQ_SET_ACTION_*`. With
/// `VFIO_IRQ_SET_DATA_EVENTFD`, `eventfds` holds one fd per vector `start..start+count`;
/// otherwise it must be empty. The kernel checks that every fd is an eventfd.
pub fn device_set_irqs(
    device: BorrowedFd<'_>,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    eventfds: &[i32],
) -> io::Result<()> {
    let mut words = irq_set_words(flags, index, start, count, eventfds)?;
    // SAFETY: `words` holds a vfio_irq_set header followed by exactly the data its flags and
    // count announce, and its argsz is the buffer's length (built by irq_set_words).
    unsafe { raw_ioctl(device, DEVICE_SET_IRQS, words.as_mut_ptr() as libc::c_ulong) }.map(drop)
}

/// The `vfio_irq_set` argument as 32-bit words: header, then one fd per vector.
///
/// Kept separate from the ioctl so its layout can be tested.
pub(super) fn irq_set_words(
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    eventfds: &[i32],
) -> io::Result<Vec<u32>> {
    // Only the two data kinds ring3 uses are built here: fds, or nothing (DATA_BOOL is not).
    let expected = match flags & sys::VFIO_IRQ_SET_DATA_TYPE_MASK {
        sys::VFIO_IRQ_SET_DATA_EVENTFD => count as usize,
        sys::VFIO_IRQ_SET_DATA_NONE => 0,
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unsupported VFIO_IRQ_SET data type {other:#x}"),
            ))
        }
    };
    if eventfds.len() != expected {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} eventfds given for {count} vectors", eventfds.len()),
        ));
    }
    let header_words = std::mem::size_of::<sys::vfio_irq_set>() / 4;
    let total_bytes = std::mem::size_of::<sys::vfio_irq_set>() + 4 * eventfds.len();
    let mut words = Vec::with_capacity(header_words + eventfds.len());
    // Field order of struct vfio_irq_set: argsz, flags, index, start, count, data[].
    words.extend([total_bytes as u32, flags, index, start, count]);
    debug_assert_eq!(words.len(), header_words);
    words.extend(eventfds.iter().map(|&fd| fd as u32));
    Ok(words)
}

/// `VFIO_DEVICE_RESET`.
pub fn device_reset(device: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: this request takes no argument.
    unsafe { raw_ioctl(device, DEVICE_RESET, 0) }.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_set_layout_matches_the_kernel_structure() {
        let flags = sys::VFIO_IRQ_SET_DATA_EVENTFD | sys::VFIO_IRQ_SET_ACTION_TRIGGER;
        let words = irq_set_words(flags, sys::VFIO_PCI_MSIX_IRQ_INDEX, 0, 2, &[7, -1]).unwrap();
        assert_eq!(words, [28, flags, 2, 0, 2, 7, u32::MAX]);
        assert_eq!(std::mem::offset_of!(sys::vfio_irq_set, data), 20);
    }

    #[test]
    fn irq_set_refuses_data_that_does_not_match_the_flags() {
        let trigger = sys::VFIO_IRQ_SET_DATA_EVENTFD | sys::VFIO_IRQ_SET_ACTION_TRIGGER;
        assert!(irq_set_words(trigger, 1, 0, 2, &[3]).is_err());
        let disable = sys::VFIO_IRQ_SET_DATA_NONE | sys::VFIO_IRQ_SET_ACTION_TRIGGER;
        assert!(irq_set_words(disable, 1, 0, 0, &[3]).is_err());
        assert_eq!(
            irq_set_words(disable, 1, 0, 0, &[]).unwrap(),
            [20, disable, 1, 0, 0]
        );
    }
}
