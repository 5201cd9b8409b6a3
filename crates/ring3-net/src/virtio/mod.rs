//! The virtio-net driver: virtio 1.x over modern PCI, split virtqueues, no offloads.
//!
//! [`VirtioNet::new`] brings the device up as virtio 1.2 §3.1.1 lists the steps, with
//! each step's section in a comment; each queue pair then belongs to one thread as a
//! [`VirtioQueue`].
//!
//! Every frame travels behind a 12-byte `struct virtio_net_hdr` (§5.1.6) in the same
//! buffer, so one descriptor carries one packet: the first [`NET_HEADER_SIZE`] bytes of
//! each pool buffer are the header, and [`NetQueue::data`] shows only the frame after it.
//! The driver negotiates no offloads, so the header it sends is all zeroes and the one it
//! receives is ignored.
//!
//! ```no_run
//! use ring3::vfio::VfioBackend;
//! use ring3_net::virtio::{VirtioNet, VirtioOptions};
//! use ring3_net::{NetDevice, NetQueue};
//!
//! let backend = VfioBackend::open("0000:00:03.0")?;
//! let mut nic = VirtioNet::new(backend, VirtioOptions::default())?;
//! let mut queue = nic.take_queue(0)?;
//! let mut frames = Vec::new();
//! queue.receive(&mut frames, 32)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use ring3::mmio::Registers;
use ring3::{Backend, Bar, DmaBuffer, Interrupt, IrqMode};

use crate::error::{Error, Result};
use crate::packet::{Packet, PacketPool};
use crate::{LinkStatus, NetDevice, NetQueue, QueueStats};

pub mod model;
mod pci;
mod queue;
#[cfg(test)]
mod tests;

use pci::{net_config, status, CommonConfig, Transport, NO_VECTOR};
use queue::{BufferSpec, SplitQueue, MAX_QUEUE_SIZE};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_VENDOR_ID: u16 = 0x1af4;
/// PCI device ID of a modern (virtio 1.x only) network device: 0x1040 + device ID 1.
pub const VIRTIO_NET_DEVICE_ID: u16 = 0x1041;

/// Bytes of `struct virtio_net_hdr` in front of every frame (§5.1.6, with VERSION_1).
pub const NET_HEADER_SIZE: usize = 12;
/// The largest frame the driver sends or expects: 1500 bytes of payload and the Ethernet
/// header.
pub const MAX_FRAME: usize = 1514;
/// Bytes per packet buffer: header and frame, with room for a VLAN tag, rounded up.
const BUFFER_SIZE: usize = 2048;
/// Smallest frame handed out: an Ethernet header.
const MIN_FRAME: usize = 14;
/// How long the device may take to finish a reset or answer a control command.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(2);

/// Feature bits (§6 for the reserved ones, §5.1.3 for the network ones).
pub mod features {
    /// The device checksums partial packets (not negotiated).
    pub const NET_F_CSUM: u64 = 1 << 0;
    /// The device reports its MTU (not negotiated).
    pub const NET_F_MTU: u64 = 1 << 3;
    /// The device has a MAC address in its configuration.
    pub const NET_F_MAC: u64 = 1 << 5;
    /// Receive buffers may be merged (not negotiated: each buffer holds a whole frame).
    pub const NET_F_MRG_RXBUF: u64 = 1 << 15;
    /// The configuration has a link status field.
    pub const NET_F_STATUS: u64 = 1 << 16;
    /// There is a control queue.
    pub const NET_F_CTRL_VQ: u64 = 1 << 17;
    /// Several queue pairs, set through the control queue.
    pub const NET_F_MQ: u64 = 1 << 22;
    /// The configuration has speed and duplex.
    pub const NET_F_SPEED_DUPLEX: u64 = 1 << 63;
    /// Used-ring event index notification suppression (not negotiated).
    pub const F_RING_EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.x: required, the driver is modern only.
    pub const F_VERSION_1: u64 = 1 << 32;
    /// The device's DMA goes through the platform's IOMMU; must be accepted if offered.
    pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
    /// Packed virtqueues (not negotiated: the driver uses split ones).
    pub const F_RING_PACKED: u64 = 1 << 34;
}

/// Control queue class and command: set the number of queue pairs (§5.1.6.5.5).
const CTRL_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
/// Control command acknowledgement: success.
const CTRL_OK: u8 = 0;

/// How to set the device up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioOptions {
    /// Queue pairs wanted; the device may offer fewer (see [`NetDevice::queue_count`]).
    pub queue_pairs: u16,
    /// Entries per virtqueue, a power of two; lowered to the device's maximum.
    pub queue_size: u16,
    /// One MSI-X vector per queue pair, for [`NetQueue::wait`]; otherwise the queues are
    /// polled and the device is asked not to interrupt.
    pub interrupts: bool,
    /// A MAC address to report instead of the device's (or of a generated one).
    pub mac: Option<[u8; 6]>,
}

impl Default for VirtioOptions {
    fn default() -> Self {
        VirtioOptions {
            queue_pairs: 1,
            queue_size: 256,
            interrupts: false,
            mac: None,
        }
    }
}

/// The device and its transport, shared by the driver and its queues: the device is reset
/// when the last of them goes, before their DMA memory is freed.
struct Device<B: Backend> {
    backend: B,
    transport: Transport,
    negotiated: u64,
}

impl<B: Backend> Device<B> {
    fn common(&self) -> Result<Registers<'_, CommonConfig>> {
        Ok(self
            .transport
            .common
            .bar
            .registers::<CommonConfig>(self.transport.common.offset)?)
    }

    fn address(&self) -> &str {
        self.backend.address()
    }

    fn set_status(&self, bits: u8) -> Result<()> {
        let common = self.common()?;
        let field = common.field(|c| &c.device_status);
        field.write(field.read() | bits);
        Ok(())
    }

    /// Writes 0 to `device_status` and waits for it to read back 0 (§4.1.4.3.2).
    fn reset(&self) -> Result<()> {
        let common = self.common()?;
        let field = common.field(|c| &c.device_status);
        field.write(0);
        let start = Instant::now();
        loop {
            let value = field.read();
            if value == 0 {
                return Ok(());
            }
            if start.elapsed() > DEVICE_TIMEOUT {
                return Err(Error::Timeout {
                    address: self.address().to_string(),
                    what: format!("device_status to read 0 after a reset (it reads {value:#x})"),
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Reads the device configuration consistently: again while `config_generation`
    /// changes under the read (§2.5.1). Bytes past the structure's end read as zero.
    fn read_config(&self) -> Result<[u8; net_config::SIZE]> {
        let common = self.common()?;
        let generation = common.field(|c| &c.config_generation);
        let region = &self.transport.device;
        let mut bytes = [0u8; net_config::SIZE];
        for _ in 0..100 {
            let before = generation.read();
            for (i, byte) in bytes.iter_mut().enumerate().take(region.length) {
                *byte = region.bar.read::<u8>(region.offset + i)?;
            }
            if generation.read() == before {
                return Ok(bytes);
            }
        }
        Err(Error::Misbehaved {
            address: self.address().to_string(),
            what: "config_generation changes on every read of the configuration".into(),
        })
    }

    fn notify(&self, offset: usize, queue_index: u16) -> Result<()> {
        self.transport
            .notify
            .bar
            .write::<u16>(offset, queue_index)?;
        Ok(())
    }
}

impl<B: Backend> Drop for Device<B> {
    fn drop(&mut self) {
        // Before features were agreed the device cannot have queues running (and if its
        // reset is what failed, a second one would only wait as long again).
        if self.negotiated == 0 {
            return;
        }
        // Stop all DMA before the queues' memory goes.
        if let Err(error) = self.reset() {
            tracing::warn!(address = self.address(), %error, "virtio-net reset failed");
        }
        let _ = self.backend.set_bus_master(false);
    }
}

/// A virtio-net device driven from user space.
pub struct VirtioNet<B: Backend> {
    device: Arc<Device<B>>,
    mac: [u8; 6],
    queues: Vec<Option<VirtioQueue<B>>>,
    /// The control queue and its command buffer, if VIRTIO_NET_F_CTRL_VQ was negotiated.
    control: Option<(SplitQueue<()>, DmaBuffer, usize)>,
}

impl<B: Backend> std::fmt::Debug for VirtioNet<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNet")
            .field("address", &self.device.address())
            .field("features", &format_args!("{:#x}", self.device.negotiated))
            .field("queue_pairs", &self.queues.len())
            .finish()
    }
}

impl<B: Backend> VirtioNet<B> {
    /// Resets the device, negotiates features and sets up the queues.
    pub fn new(backend: B, options: VirtioOptions) -> Result<VirtioNet<B>> {
        if options.queue_pairs == 0
            || !options.queue_size.is_power_of_two()
            || options.queue_size < 2
            || options.queue_size > MAX_QUEUE_SIZE
        {
            return Err(Error::InvalidArgument(format!(
                "virtio-net needs at least one queue pair and a power-of-two queue size \
                 from 2 to {MAX_QUEUE_SIZE}: got {} pairs of {}",
                options.queue_pairs, options.queue_size
            )));
        }
        let ids = backend.ids()?;
        if ids != (VIRTIO_VENDOR_ID, VIRTIO_NET_DEVICE_ID) {
            return Err(Error::Unsupported {
                address: backend.address().to_string(),
                what: format!(
                    "{:04x}:{:04x} is not a modern virtio-net device ({VIRTIO_VENDOR_ID:04x}:\
                     {VIRTIO_NET_DEVICE_ID:04x})",
                    ids.0, ids.1
                ),
            });
        }
        let transport = Transport::probe(&backend)?;
        let mut device = Device {
            backend,
            transport,
            negotiated: 0,
        };

        // §3.1.1 step 1: reset the device.
        device.reset()?;
        // Steps 2 and 3: we have seen it and know how to drive it.
        device.set_status(status::ACKNOWLEDGE)?;
        device.set_status(status::DRIVER)?;
        // Steps 4 to 6: negotiate features, FEATURES_OK, and check the device kept it.
        device.negotiated = match negotiate(&device, options.queue_pairs) {
            Ok(negotiated) => negotiated,
            Err(error) => {
                // Leave the device as we found it, for the next driver.
                let _ = device.reset();
                return Err(error);
            }
        };
        let device = Arc::new(device);
        // From here on, dropping `device` resets it.

        // Step 7: device-specific setup (§5.1.5): the queues.
        device.backend.set_bus_master(true)?;
        let config = device.read_config()?;
        let max_pairs = if device.negotiated & features::NET_F_MQ != 0 {
            u16::from_le_bytes([
                config[net_config::MAX_VIRTQUEUE_PAIRS],
                config[net_config::MAX_VIRTQUEUE_PAIRS + 1],
            ])
        } else {
            1
        };
        // §5.1.4.1: between 1 and 0x8000.
        if !(1..=0x8000).contains(&max_pairs) {
            return Err(Error::Misbehaved {
                address: device.address().to_string(),
                what: format!("max_virtqueue_pairs is {max_pairs}"),
            });
        }
        let pairs = options.queue_pairs.min(max_pairs);
        let common = device.common()?;
        let num_queues = common.field(|c| &c.num_queues).read();
        let has_control = device.negotiated & features::NET_F_CTRL_VQ != 0;
        let needed = 2 * u32::from(max_pairs) + u32::from(has_control);
        if u32::from(num_queues) < needed {
            return Err(Error::Misbehaved {
                address: device.address().to_string(),
                what: format!("num_queues is {num_queues}, but the features need {needed}"),
            });
        }
        // No interrupt for configuration changes: link() reads the status when asked.
        common.field(|c| &c.config_msix_vector).write(NO_VECTOR);

        let interrupts = if options.interrupts {
            let offered = device.backend.interrupt_count(IrqMode::MsiX)?;
            if offered < u32::from(pairs) {
                return Err(Error::Unsupported {
                    address: device.address().to_string(),
                    what: format!("{pairs} MSI-X vectors (it offers {offered})"),
                });
            }
            device
                .backend
                .enable_interrupts(IrqMode::MsiX, u32::from(pairs))?
        } else {
            Vec::new()
        };

        let mut queues = Vec::with_capacity(usize::from(pairs));
        for pair in 0..pairs {
            let interrupt = interrupts.get(usize::from(pair)).cloned();
            let vector = if interrupt.is_some() { pair } else { NO_VECTOR };
            let (rx, rx_notify) = setup_queue(&device, 2 * pair, options.queue_size, vector)?;
            let (tx, tx_notify) = setup_queue(&device, 2 * pair + 1, options.queue_size, vector)?;
            // Enough buffers to fill both rings and leave as many for the caller to hold.
            let count = 2 * u32::from(rx.size()) + u32::from(tx.size());
            let pool = PacketPool::new(&device.backend, count, BUFFER_SIZE)?;
            queues.push(Some(VirtioQueue {
                device: device.clone(),
                pair,
                rx,
                tx,
                rx_notify,
                tx_notify,
                notify_bar: device.transport.notify.bar.clone(),
                pool,
                interrupt,
                stats: QueueStats::default(),
                broken: None,
            }));
        }
        let control = if has_control {
            let (queue, notify) = setup_queue(&device, 2 * max_pairs, 16, NO_VECTOR)?;
            let buffer = device.backend.dma_alloc(64)?;
            Some((queue, buffer, notify))
        } else {
            None
        };

        // Step 8: DRIVER_OK; the device is live.
        device.set_status(status::DRIVER_OK)?;
        let device_status = common.field(|c| &c.device_status).read();
        if device_status & status::DEVICE_NEEDS_RESET != 0 {
            return Err(Error::Misbehaved {
                address: device.address().to_string(),
                what: format!("device_status {device_status:#x} after DRIVER_OK"),
            });
        }

        let mac = match options.mac {
            Some(mac) => mac,
            None if device.negotiated & features::NET_F_MAC != 0 => {
                let mut mac = [0; 6];
                mac.copy_from_slice(&config[net_config::MAC..net_config::MAC + 6]);
                mac
            }
            None => generated_mac(device.address()),
        };
        let mut nic = VirtioNet {
            device,
            mac,
            queues,
            control,
        };
        // §5.1.6.5.5: the device starts with one pair; ask for the rest.
        if pairs > 1 {
            nic.control_command(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, &pairs.to_le_bytes())?;
        }
        for queue in nic.queues.iter_mut().flatten() {
            queue.refill_rx()?;
        }
        tracing::debug!(
            address = nic.device.address(),
            features = format_args!("{:#x}", nic.device.negotiated),
            pairs,
            "virtio-net up"
        );
        Ok(nic)
    }

    /// The feature bits both sides agreed on.
    pub fn negotiated_features(&self) -> u64 {
        self.device.negotiated
    }

    /// Sends a command on the control queue and waits for the device's acknowledgement.
    fn control_command(&mut self, class: u8, command: u8, data: &[u8]) -> Result<()> {
        let address = self.device.address().to_string();
        let Some((queue, buffer, notify)) = self.control.as_mut() else {
            return Err(Error::Unsupported {
                address,
                what: "a control queue".into(),
            });
        };
        // Layout: class, command, data (device reads); the ack byte at 32 (device writes).
        const ACK: usize = 32;
        if data.len() > ACK - 2 {
            return Err(Error::InvalidArgument(format!(
                "control command data of {} bytes",
                data.len()
            )));
        }
        buffer.write(0, &[class, command])?;
        buffer.write(2, data)?;
        buffer.write(ACK, &[0xff])?;
        let chain = [
            BufferSpec {
                iova: buffer.iova(),
                len: 2 + data.len() as u32,
                device_writes: false,
            },
            BufferSpec {
                iova: buffer.iova() + ACK as u64,
                len: 1,
                device_writes: true,
            },
        ];
        if queue.push(&chain, ()).is_err() {
            return Err(Error::Misbehaved {
                address,
                what: "the control queue is full: an earlier command never completed".into(),
            });
        }
        if queue.publish() {
            self.device.notify(*notify, queue.index())?;
        }
        let start = Instant::now();
        loop {
            let pending = queue.used_pending().map_err(|what| Error::Misbehaved {
                address: address.clone(),
                what,
            })?;
            if pending > 0 {
                queue.pop_used().map_err(|what| Error::Misbehaved {
                    address: address.clone(),
                    what,
                })?;
                break;
            }
            if start.elapsed() > DEVICE_TIMEOUT {
                return Err(Error::Timeout {
                    address,
                    what: format!("control command {class}.{command}"),
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        let mut ack = [0u8];
        buffer.read(ACK, &mut ack)?;
        if ack[0] != CTRL_OK {
            return Err(Error::Unsupported {
                address,
                what: format!(
                    "control command {class}.{command} ({data:02x?}): the device answered {}",
                    ack[0]
                ),
            });
        }
        Ok(())
    }
}

/// §3.1.1 steps 4–6: reads the device's features, writes the subset the driver uses, sets
/// FEATURES_OK and checks that the device kept it.
fn negotiate<B: Backend>(device: &Device<B>, queue_pairs: u16) -> Result<u64> {
    let common = device.common()?;
    let select = common.field(|c| &c.device_feature_select);
    let feature = common.field(|c| &c.device_feature);
    select.write(0);
    let low = feature.read();
    select.write(1);
    let high = feature.read();
    let offered = u64::from(low) | (u64::from(high) << 32);
    let unsupported = |what: String| Error::Unsupported {
        address: device.address().to_string(),
        what,
    };
    if offered & features::F_VERSION_1 == 0 {
        return Err(unsupported(format!(
            "VIRTIO_F_VERSION_1 (the device offers features {offered:#x})"
        )));
    }
    let mut wanted = features::F_VERSION_1
        // Offered means the device's DMA is translated by the IOMMU, as VFIO sets it up;
        // refusing it would make the device fail FEATURES_OK (§6.1).
        | features::F_ACCESS_PLATFORM
        | features::NET_F_MAC
        | features::NET_F_STATUS
        | features::NET_F_SPEED_DUPLEX;
    let multiqueue = features::NET_F_MQ | features::NET_F_CTRL_VQ;
    if queue_pairs > 1 && offered & multiqueue == multiqueue {
        wanted |= multiqueue;
    }
    let accepted = offered & wanted;
    let driver_select = common.field(|c| &c.driver_feature_select);
    let driver_feature = common.field(|c| &c.driver_feature);
    driver_select.write(0);
    driver_feature.write(accepted as u32);
    driver_select.write(1);
    driver_feature.write((accepted >> 32) as u32);
    device.set_status(status::FEATURES_OK)?;
    let device_status = common.field(|c| &c.device_status).read();
    if device_status & status::FEATURES_OK == 0 {
        device.set_status(status::FAILED)?;
        return Err(unsupported(format!(
            "features {accepted:#x} (of {offered:#x} offered): the device cleared FEATURES_OK"
        )));
    }
    Ok(accepted)
}

/// §4.1.5.1.3: sets up virtqueue `index` with at most `wanted` entries and returns it with
/// its notification offset in the notify BAR.
fn setup_queue<B: Backend, T>(
    device: &Device<B>,
    index: u16,
    wanted: u16,
    vector: u16,
) -> Result<(SplitQueue<T>, usize)> {
    let common = device.common()?;
    let misbehaved = |what: String| Error::Misbehaved {
        address: device.address().to_string(),
        what,
    };
    common.field(|c| &c.queue_select).write(index);
    let max = common.field(|c| &c.queue_size).read();
    if max == 0 {
        return Err(misbehaved(format!(
            "queue {index} is not available (size 0)"
        )));
    }
    // A power of two keeps ring slots in step with the wrapping 16-bit indices.
    let size = wanted.min(max.min(MAX_QUEUE_SIZE));
    let size = 1u16 << (15 - size.leading_zeros().min(15));
    if common.field(|c| &c.queue_enable).read() != 0 {
        return Err(misbehaved(format!(
            "queue {index} is enabled after a reset"
        )));
    }
    let queue: SplitQueue<T> = SplitQueue::new(&device.backend, index, size)?;
    common.field(|c| &c.queue_size).write(size);
    let vector_field = common.field(|c| &c.queue_msix_vector);
    vector_field.write(vector);
    if vector != NO_VECTOR && vector_field.read() != vector {
        return Err(Error::Unsupported {
            address: device.address().to_string(),
            what: format!("MSI-X vector {vector} for queue {index}: the device has no room"),
        });
    }
    let write64 = |lo: ring3::mmio::Field<'_, ring3::mmio::ReadWrite<u32>>,
                   hi: ring3::mmio::Field<'_, ring3::mmio::ReadWrite<u32>>,
                   value: u64| {
        lo.write(value as u32);
        hi.write((value >> 32) as u32);
    };
    write64(
        common.field(|c| &c.queue_desc_lo),
        common.field(|c| &c.queue_desc_hi),
        queue.desc_iova(),
    );
    write64(
        common.field(|c| &c.queue_driver_lo),
        common.field(|c| &c.queue_driver_hi),
        queue.avail_iova(),
    );
    write64(
        common.field(|c| &c.queue_device_lo),
        common.field(|c| &c.queue_device_hi),
        queue.used_iova(),
    );
    let notify_off = common.field(|c| &c.queue_notify_off).read();
    let notify = device.transport.notify_offset(notify_off).ok_or_else(|| {
        misbehaved(format!(
            "queue {index}'s notify offset {notify_off} × {} is outside the notification \
             structure ({:#x} bytes)",
            device.transport.notify_off_multiplier, device.transport.notify.length
        ))
    })?;
    common.field(|c| &c.queue_enable).write(1);
    let mut queue = queue;
    queue.set_interrupts(vector != NO_VECTOR)?;
    Ok((queue, notify))
}

/// A locally administered unicast address (bit 1 of the first byte set, bit 0 clear) for
/// a device without one, different per device and per run.
fn generated_mac(address: &str) -> [u8; 6] {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write(address.as_bytes());
    hasher.write_u32(std::process::id());
    let bytes = hasher.finish().to_le_bytes();
    [
        (bytes[0] & 0xfc) | 0x02,
        bytes[1],
        bytes[2],
        bytes[3],
        bytes[4],
        bytes[5],
    ]
}

impl<B: Backend> NetDevice for VirtioNet<B> {
    type Queue = VirtioQueue<B>;

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn link(&self) -> Result<LinkStatus> {
        let common = self.device.common()?;
        let device_status = common.field(|c| &c.device_status).read();
        if device_status & status::DEVICE_NEEDS_RESET != 0 {
            return Err(Error::Misbehaved {
                address: self.device.address().to_string(),
                what: format!("device_status {device_status:#x}: the device needs a reset"),
            });
        }
        let config = self.device.read_config()?;
        let negotiated = self.device.negotiated;
        let up = if negotiated & features::NET_F_STATUS != 0 {
            let status =
                u16::from_le_bytes([config[net_config::STATUS], config[net_config::STATUS + 1]]);
            status & net_config::S_LINK_UP != 0
        } else {
            // §5.1.4.2: without the status field, the link is assumed up.
            true
        };
        let (speed_mbps, full_duplex) = if negotiated & features::NET_F_SPEED_DUPLEX != 0 {
            let mut speed = [0; 4];
            speed.copy_from_slice(&config[net_config::SPEED..net_config::SPEED + 4]);
            let speed = u32::from_le_bytes(speed);
            let speed = (speed != 0 && speed != u32::MAX).then_some(speed);
            let duplex = match config[net_config::DUPLEX] {
                0 => Some(false),
                1 => Some(true),
                _ => None,
            };
            (speed, duplex)
        } else {
            (None, None)
        };
        Ok(LinkStatus {
            up,
            speed_mbps,
            full_duplex,
        })
    }

    fn queue_count(&self) -> usize {
        self.queues.len()
    }

    fn take_queue(&mut self, index: usize) -> Result<VirtioQueue<B>> {
        let count = self.queues.len();
        self.queues
            .get_mut(index)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("queue pair {index} of {count} does not exist"))
            })?
            .take()
            .ok_or_else(|| Error::InvalidArgument(format!("queue pair {index} is taken")))
    }

    fn max_frame(&self) -> usize {
        MAX_FRAME
    }
}

/// One receive and transmit virtqueue pair, for one thread.
pub struct VirtioQueue<B: Backend> {
    /// First, so that if this is the device's last user the device is reset before the
    /// rings and buffers below are freed.
    device: Arc<Device<B>>,
    pair: u16,
    rx: SplitQueue<Packet>,
    tx: SplitQueue<Packet>,
    rx_notify: usize,
    tx_notify: usize,
    notify_bar: Bar,
    pool: PacketPool,
    interrupt: Option<Interrupt>,
    stats: QueueStats,
    /// Why the queue stopped, once the device broke the rules.
    broken: Option<String>,
}

impl<B: Backend> std::fmt::Debug for VirtioQueue<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioQueue")
            .field("address", &self.device.address())
            .field("pair", &self.pair)
            .field("size", &self.rx.size())
            .field("broken", &self.broken)
            .finish()
    }
}

impl<B: Backend> VirtioQueue<B> {
    /// Which pair this is.
    pub fn pair(&self) -> u16 {
        self.pair
    }

    /// Entries per ring.
    pub fn ring_size(&self) -> u16 {
        self.rx.size()
    }

    /// Records the device's error and stops the queue.
    fn fail(&mut self, what: String) -> Error {
        self.stats.errors += 1;
        tracing::error!(address = self.device.address(), pair = self.pair, %what, "virtio-net queue stopped");
        self.broken = Some(what.clone());
        Error::Misbehaved {
            address: self.device.address().to_string(),
            what,
        }
    }

    fn check_broken(&self) -> Result<()> {
        match &self.broken {
            Some(what) => Err(Error::Misbehaved {
                address: self.device.address().to_string(),
                what: format!("(earlier) {what}"),
            }),
            None => Ok(()),
        }
    }

    fn notify(&self, offset: usize, queue_index: u16) -> Result<()> {
        self.notify_bar.write::<u16>(offset, queue_index)?;
        Ok(())
    }

    /// Takes the buffers of sent frames back into the pool.
    fn reclaim_tx(&mut self) -> Result<()> {
        let pending = self.tx.used_pending().map_err(|what| self.fail(what))?;
        for _ in 0..pending {
            // The length of a transmit buffer is what the device wrote: nothing; ignored.
            let used = self.tx.pop_used().map_err(|what| self.fail(what))?;
            self.pool.free(used.token)?;
        }
        Ok(())
    }

    /// Posts free pool buffers to the receive ring, one notification for all.
    fn refill_rx(&mut self) -> Result<()> {
        if self.pool.free_count() < self.rx.free_descriptors() {
            self.reclaim_tx()?;
        }
        let len = self.pool.buffer_size() as u32;
        while self.rx.free_descriptors() > 0 {
            let Some(packet) = self.pool.alloc() else {
                break;
            };
            let buffer = BufferSpec {
                iova: self.pool.iova(&packet),
                len,
                device_writes: true,
            };
            if let Err(packet) = self.rx.push(&[buffer], packet) {
                self.pool.free(packet)?;
                break;
            }
        }
        if self.rx.publish() {
            self.notify(self.rx_notify, self.rx.index())?;
        }
        Ok(())
    }
}

impl<B: Backend> NetQueue for VirtioQueue<B> {
    fn receive(&mut self, out: &mut Vec<Packet>, max: usize) -> Result<usize> {
        self.check_broken()?;
        let pending = self.rx.used_pending().map_err(|what| self.fail(what))?;
        let mut received = 0;
        for _ in 0..usize::from(pending).min(max) {
            let used = self.rx.pop_used().map_err(|what| self.fail(what))?;
            let mut packet = used.token;
            let len = used.len as usize;
            if len < NET_HEADER_SIZE || len > self.pool.buffer_size() {
                self.pool.free(packet)?;
                return Err(self.fail(format!(
                    "queue {}: received length {len} is outside {NET_HEADER_SIZE}..={}",
                    self.rx.index(),
                    self.pool.buffer_size()
                )));
            }
            let frame = len - NET_HEADER_SIZE;
            if frame < MIN_FRAME {
                self.stats.rx_drops += 1;
                self.pool.free(packet)?;
                continue;
            }
            packet.set_len(frame);
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += frame as u64;
            out.push(packet);
            received += 1;
        }
        self.refill_rx()?;
        Ok(received)
    }

    fn transmit(&mut self, packets: &mut Vec<Packet>) -> Result<usize> {
        self.check_broken()?;
        self.reclaim_tx()?;
        if let Some(bad) = packets
            .iter()
            .find(|p| p.len() < MIN_FRAME || p.len() > MAX_FRAME)
        {
            return Err(Error::InvalidArgument(format!(
                "a frame of {} bytes (buffer {}): frames are {MIN_FRAME} to {MAX_FRAME} bytes",
                bad.len(),
                bad.index()
            )));
        }
        let count = packets.len().min(self.tx.free_descriptors());
        self.stats.tx_busy += (packets.len() - count) as u64;
        for mut packet in packets.drain(..count) {
            // The header: no checksum or segmentation offload asked for (§5.1.6.2).
            self.pool.data_mut(&mut packet)[..NET_HEADER_SIZE].fill(0);
            let buffer = BufferSpec {
                iova: self.pool.iova(&packet),
                len: (NET_HEADER_SIZE + packet.len()) as u32,
                device_writes: false,
            };
            let len = packet.len() as u64;
            if let Err(packet) = self.tx.push(&[buffer], packet) {
                // Cannot happen: there was a free descriptor for each.
                self.pool.free(packet)?;
                continue;
            }
            self.stats.tx_packets += 1;
            self.stats.tx_bytes += len;
        }
        if self.tx.publish() {
            self.notify(self.tx_notify, self.tx.index())?;
        }
        Ok(count)
    }

    fn alloc(&mut self) -> Option<Packet> {
        if self.pool.free_count() == 0 && self.broken.is_none() {
            // A device error here is reported by the next receive or transmit.
            let _ = self.reclaim_tx();
        }
        self.pool.alloc()
    }

    fn free(&mut self, packet: Packet) {
        if let Err(error) = self.pool.free(packet) {
            tracing::warn!(%error, "virtio-net: freeing a packet");
        }
    }

    fn data(&self, packet: &Packet) -> &[u8] {
        let with_header = packet.len().saturating_add(NET_HEADER_SIZE);
        let whole = Packet::new(
            packet.index(),
            u32::try_from(with_header).unwrap_or(u32::MAX),
        );
        &self.pool.data(&whole)[NET_HEADER_SIZE..]
    }

    fn data_mut(&mut self, packet: &mut Packet) -> &mut [u8] {
        &mut self.pool.data_mut(packet)[NET_HEADER_SIZE..]
    }

    fn stats(&self) -> QueueStats {
        self.stats
    }

    fn wait(&mut self, timeout: Duration) -> Result<()> {
        let Some(interrupt) = &self.interrupt else {
            return Ok(());
        };
        let rx = self.rx.used_pending().unwrap_or(1);
        let tx = self.tx.used_pending().unwrap_or(1);
        if rx > 0 || tx > 0 {
            return Ok(());
        }
        match interrupt.wait(timeout) {
            Ok(_) | Err(ring3::Error::Timeout { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}
