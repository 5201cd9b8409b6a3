//! The virtio PCI transport (virtio 1.2 §4.1): the vendor capabilities that locate the
//! configuration structures, and the common configuration register block.

use ring3::mmio::{ReadOnly, ReadWrite, RegisterBlock};
use ring3::{Backend, Bar};

use crate::error::{Error, Result};

/// PCI capability ID of a vendor-specific capability, which virtio uses (§4.1.4).
pub const VENDOR_CAPABILITY: u8 = 0x09;

/// `cfg_type` of a virtio PCI capability (§4.1.4).
pub mod cfg_type {
    /// Common configuration.
    pub const COMMON: u8 = 1;
    /// Notifications.
    pub const NOTIFY: u8 = 2;
    /// ISR status.
    pub const ISR: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE: u8 = 4;
    /// PCI configuration access (not used: the driver maps the BARs).
    pub const PCI: u8 = 5;
}

/// Offsets inside `struct virtio_pci_cap` (§4.1.4).
pub mod cap {
    /// Capability ID (0x09).
    pub const VNDR: u16 = 0;
    /// Next capability pointer.
    pub const NEXT: u16 = 1;
    /// Length of this capability.
    pub const LEN: u16 = 2;
    /// Which structure.
    pub const CFG_TYPE: u16 = 3;
    /// Which BAR.
    pub const BAR: u16 = 4;
    /// Offset in the BAR (le32).
    pub const OFFSET: u16 = 8;
    /// Length in the BAR (le32).
    pub const LENGTH: u16 = 12;
    /// `notify_off_multiplier` (le32), only in the notify capability.
    pub const NOTIFY_OFF_MULTIPLIER: u16 = 16;
    /// Size of the generic capability.
    pub const SIZE: u8 = 16;
    /// Size of the notify capability.
    pub const NOTIFY_SIZE: u8 = 20;
}

/// `device_status` bits (§2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 128;
}

/// "No MSI-X vector" in `config_msix_vector` and `queue_msix_vector` (§4.1.5.1.2).
pub const NO_VECTOR: u16 = 0xffff;

/// `struct virtio_pci_common_cfg` (§4.1.4.3). The 64-bit queue addresses are two 32-bit
/// halves, written low then high, which every device must accept (§4.1.3.1).
#[repr(C)]
#[derive(bytemuck::Zeroable)]
pub struct CommonConfig {
    pub device_feature_select: ReadWrite<u32>,
    pub device_feature: ReadOnly<u32>,
    pub driver_feature_select: ReadWrite<u32>,
    pub driver_feature: ReadWrite<u32>,
    pub config_msix_vector: ReadWrite<u16>,
    pub num_queues: ReadOnly<u16>,
    pub device_status: ReadWrite<u8>,
    pub config_generation: ReadOnly<u8>,
    pub queue_select: ReadWrite<u16>,
    pub queue_size: ReadWrite<u16>,
    pub queue_msix_vector: ReadWrite<u16>,
    pub queue_enable: ReadWrite<u16>,
    pub queue_notify_off: ReadOnly<u16>,
    pub queue_desc_lo: ReadWrite<u32>,
    pub queue_desc_hi: ReadWrite<u32>,
    pub queue_driver_lo: ReadWrite<u32>,
    pub queue_driver_hi: ReadWrite<u32>,
    pub queue_device_lo: ReadWrite<u32>,
    pub queue_device_hi: ReadWrite<u32>,
}
// SAFETY: repr(C) of register fields only.
unsafe impl RegisterBlock for CommonConfig {}
const _: () = {
    assert!(std::mem::offset_of!(CommonConfig, config_msix_vector) == 0x10);
    assert!(std::mem::offset_of!(CommonConfig, device_status) == 0x14);
    assert!(std::mem::offset_of!(CommonConfig, queue_select) == 0x16);
    assert!(std::mem::offset_of!(CommonConfig, queue_notify_off) == 0x1e);
    assert!(std::mem::offset_of!(CommonConfig, queue_desc_lo) == 0x20);
    assert!(std::mem::offset_of!(CommonConfig, queue_driver_lo) == 0x28);
    assert!(std::mem::offset_of!(CommonConfig, queue_device_lo) == 0x30);
    assert!(std::mem::size_of::<CommonConfig>() == 0x38);
};

/// Offsets in `struct virtio_net_config` (§5.1.4).
pub mod net_config {
    /// The MAC address (6 bytes), if VIRTIO_NET_F_MAC.
    pub const MAC: usize = 0;
    /// Link status (le16), if VIRTIO_NET_F_STATUS.
    pub const STATUS: usize = 6;
    /// Maximum queue pairs (le16), if VIRTIO_NET_F_MQ.
    pub const MAX_VIRTQUEUE_PAIRS: usize = 8;
    /// Speed in Mbit/s (le32), if VIRTIO_NET_F_SPEED_DUPLEX.
    pub const SPEED: usize = 12;
    /// Duplex (u8), if VIRTIO_NET_F_SPEED_DUPLEX.
    pub const DUPLEX: usize = 16;
    /// Bytes the driver reads.
    pub const SIZE: usize = 17;
    /// `status` bit: the link is up.
    pub const S_LINK_UP: u16 = 1;
}

/// One structure a capability points at: BAR, offset and length, checked against the BAR.
#[derive(Debug, Clone)]
pub struct Region {
    pub bar: Bar,
    pub offset: usize,
    pub length: usize,
}

/// The configuration structures of a virtio PCI device.
#[derive(Debug, Clone)]
pub struct Transport {
    pub common: Region,
    pub notify: Region,
    pub notify_off_multiplier: u32,
    /// Located and checked, but never read: the driver uses MSI-X or polls, not INTx.
    #[allow(dead_code)]
    pub isr: Region,
    pub device: Region,
}

/// A vendor capability as read from configuration space, before its BAR is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioCapability {
    pub cfg_type: u8,
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
    pub notify_off_multiplier: u32,
}

/// Walks the capability list (PCI 3.0 §6.7) and returns every virtio vendor capability,
/// in list order. A list that loops or points into the header is an error.
pub fn read_capabilities<B: Backend>(backend: &B) -> Result<Vec<VirtioCapability>> {
    let address = backend.address();
    let misbehaved = |what: String| Error::Misbehaved {
        address: address.to_string(),
        what,
    };
    let mut found = Vec::new();
    let Some(mut pointer) = backend.find_capability(VENDOR_CAPABILITY)? else {
        return Ok(found);
    };
    // 48 capabilities fit in the 192 bytes after the header; more means a loop.
    for _ in 0..48 {
        if pointer == 0 {
            return Ok(found);
        }
        if !(0x40..=0xfc).contains(&pointer) {
            return Err(misbehaved(format!(
                "capability pointer {pointer:#x} is outside 0x40..0x100"
            )));
        }
        let mut header = [0u8; 4];
        backend.config_read(pointer, &mut header)?;
        let next = u16::from(header[cap::NEXT as usize] & !3);
        if header[cap::VNDR as usize] == VENDOR_CAPABILITY {
            let cap_len = header[cap::LEN as usize];
            if cap_len < cap::SIZE || pointer + u16::from(cap::SIZE) > 0x100 {
                return Err(misbehaved(format!(
                    "virtio capability at {pointer:#x} is {cap_len} bytes long"
                )));
            }
            let cfg_type = header[cap::CFG_TYPE as usize];
            let mut bar = [0u8; 1];
            backend.config_read(pointer + cap::BAR, &mut bar)?;
            let mut notify_off_multiplier = 0;
            if cfg_type == cfg_type::NOTIFY {
                if cap_len < cap::NOTIFY_SIZE || pointer + u16::from(cap::NOTIFY_SIZE) > 0x100 {
                    return Err(misbehaved(format!(
                        "virtio notify capability at {pointer:#x} is {cap_len} bytes long"
                    )));
                }
                notify_off_multiplier =
                    backend.config_read_u32(pointer + cap::NOTIFY_OFF_MULTIPLIER)?;
            }
            found.push(VirtioCapability {
                cfg_type,
                bar: bar[0],
                offset: backend.config_read_u32(pointer + cap::OFFSET)?,
                length: backend.config_read_u32(pointer + cap::LENGTH)?,
                notify_off_multiplier,
            });
        }
        pointer = next;
    }
    Err(misbehaved(
        "the capability list does not end (a loop?)".to_string(),
    ))
}

impl Transport {
    /// Finds the common, notify, ISR and device structures (the first usable capability of
    /// each type, §4.1.4.1), maps their BARs and checks each lies inside its BAR.
    pub fn probe<B: Backend>(backend: &B) -> Result<Transport> {
        let capabilities = read_capabilities(backend)?;
        let unsupported = |what: String| Error::Unsupported {
            address: backend.address().to_string(),
            what,
        };
        let region = |wanted: u8, name: &str, min_length: usize| -> Result<(Region, u32)> {
            let cap = capabilities
                .iter()
                // BARs 0–5 only; a driver ignores capabilities naming reserved BARs (§4.1.4).
                .find(|c| c.cfg_type == wanted && c.bar <= 5)
                .ok_or_else(|| unsupported(format!("no virtio {name} capability")))?;
            let bar = backend.bar(cap.bar)?;
            let offset = cap.offset as usize;
            let length = cap.length as usize;
            let end = offset.checked_add(length);
            if length < min_length || end.is_none_or(|end| end > bar.len()) {
                return Err(Error::Misbehaved {
                    address: backend.address().to_string(),
                    what: format!(
                        "virtio {name} structure at BAR{} {offset:#x}+{length:#x} does not fit \
                         the BAR ({:#x} bytes) or is shorter than {min_length:#x}",
                        cap.bar,
                        bar.len()
                    ),
                });
            }
            Ok((
                Region {
                    bar,
                    offset,
                    length,
                },
                cap.notify_off_multiplier,
            ))
        };
        let (common, _) = region(
            cfg_type::COMMON,
            "common configuration",
            std::mem::size_of::<CommonConfig>(),
        )?;
        let (notify, notify_off_multiplier) = region(cfg_type::NOTIFY, "notification", 2)?;
        let (isr, _) = region(cfg_type::ISR, "ISR", 1)?;
        let (device, _) = region(cfg_type::DEVICE, "device configuration", 6)?;
        Ok(Transport {
            common,
            notify,
            notify_off_multiplier,
            isr,
            device,
        })
    }

    /// The offset in the notify BAR of the queue with `queue_notify_off` (§4.1.4.4), checked
    /// to lie inside the notification structure.
    pub fn notify_offset(&self, queue_notify_off: u16) -> Option<usize> {
        let within = u64::from(queue_notify_off) * u64::from(self.notify_off_multiplier);
        let within = usize::try_from(within).ok()?;
        (within.checked_add(2)? <= self.notify.length).then_some(self.notify.offset + within)
    }
}
