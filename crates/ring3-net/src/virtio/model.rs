//! A model of a modern virtio-net PCI device for [`ring3::fake::FakeBackend`], so the
//! driver is tested without QEMU.
//!
//! - **Configuration space**: a capability list with an MSI-X capability, a PCI
//!   configuration access capability (which drivers skip), then the common, notify, ISR
//!   and device capabilities (§4.1.4), all in BAR 4 (see the `*_OFFSET` constants).
//! - **Common configuration** (§4.1.4.3): feature selection, `device_status` with reset and
//!   the FEATURES_OK check, queue selection, size, MSI-X vector, addresses and enable.
//! - **Queues**: a notify write makes the model walk the queue's new available entries by
//!   DMA. A transmitted frame (after its 12-byte header, which must be all zero) is logged
//!   and, with loopback on, queued for the receive queue of the same pair; queued frames go
//!   into posted receive buffers, behind a header with `num_buffers` 1. The control queue
//!   answers `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`. Each used element is followed by the queue's
//!   MSI-X vector unless the driver set `VIRTQ_AVAIL_F_NO_INTERRUPT`.
//!
//! Everything happens synchronously inside the register write that starts it. Nothing the
//! driver writes makes the model panic: protocol errors are logged for tests to check.
//! Knobs make it misbehave: a reset that never finishes, FEATURES_OK refused, and the next
//! used element written with a bogus used index, descriptor ID or length.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};

use ring3::fake::{DeviceContext, DeviceModel, FakeBackend, FakeDevice};
use ring3::IrqMode;

use super::pci::{cap, cfg_type, net_config, status, NO_VECTOR, VENDOR_CAPABILITY};
use super::queue::{AVAIL_F_NO_INTERRUPT, DESC_F_NEXT, DESC_F_WRITE, USED_F_NO_NOTIFY};
use super::{features, NET_HEADER_SIZE, VIRTIO_NET_DEVICE_ID, VIRTIO_VENDOR_ID};

/// The BAR holding every structure.
pub const BAR: u8 = 4;
/// Size of that BAR.
pub const BAR_LEN: usize = 0x4000;
/// Common configuration offset in the BAR.
pub const COMMON_OFFSET: u64 = 0x0000;
/// ISR status offset.
pub const ISR_OFFSET: u64 = 0x1000;
/// Device configuration offset.
pub const DEVICE_OFFSET: u64 = 0x2000;
/// Notification structure offset.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// `notify_off_multiplier`; queue `n`'s `queue_notify_off` is `n`.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// Where the common capability sits in configuration space (tests corrupt it).
pub const COMMON_CAPABILITY: u16 = 0x64;
/// Where the notify capability sits.
pub const NOTIFY_CAPABILITY: u16 = 0x74;

/// The MAC address the model reports.
pub const MODEL_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// What the model offers by default: what QEMU's virtio-net offers with
/// `iommu_platform=on` that matters here, plus offloads the driver must turn down.
pub const DEFAULT_FEATURES: u64 = features::F_VERSION_1
    | features::F_ACCESS_PLATFORM
    | features::F_RING_EVENT_IDX
    | features::NET_F_MAC
    | features::NET_F_STATUS
    | features::NET_F_CSUM
    | features::NET_F_MRG_RXBUF
    | features::NET_F_CTRL_VQ
    | features::NET_F_MQ
    | features::NET_F_SPEED_DUPLEX;

/// A one-time misbehaviour, applied to the next used element the model writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    /// Moves the used index this far past the one element written.
    UsedIndexJump(u16),
    /// Writes this descriptor ID instead of the real one.
    Id(u32),
    /// Writes this length instead of the real one.
    Length(u32),
}

/// Settings and misbehaviours.
#[derive(Debug, Clone)]
pub struct Knobs {
    /// Features offered.
    pub features: u64,
    /// Largest queue size.
    pub max_queue_size: u16,
    /// `max_virtqueue_pairs`.
    pub max_pairs: u16,
    /// MSI-X vectors.
    pub msix_vectors: u32,
    /// Transmitted frames come back on the same pair's receive queue.
    pub loopback: bool,
    /// The link status bit.
    pub link_up: bool,
    /// `device_status` never reads 0 after a reset.
    pub never_reset: bool,
    /// FEATURES_OK is never kept.
    pub refuse_features: bool,
    /// The device sets `VIRTQ_USED_F_NO_NOTIFY` on every queue.
    pub no_notify: bool,
    /// Applied to the next used element of a receive or transmit queue.
    pub corruption: Option<Corruption>,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            features: DEFAULT_FEATURES,
            max_queue_size: 256,
            max_pairs: 4,
            msix_vectors: 9,
            loopback: true,
            link_up: true,
            never_reset: false,
            refuse_features: false,
            no_notify: false,
            corruption: None,
        }
    }
}

/// A descriptor as the device reads it: address, length, flags.
type Descriptor = (u64, u32, u16);

#[derive(Debug, Clone, Default)]
struct QueueState {
    size: u16,
    msix_vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
    last_avail: u16,
    used_idx: u16,
}

#[derive(Debug, Default)]
struct State {
    knobs: Knobs,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_msix_vector: u16,
    queue_select: u16,
    queues: Vec<QueueState>,
    pairs_active: u16,
    /// Frames waiting for a receive buffer, per pair.
    waiting: Vec<VecDeque<Vec<u8>>>,
    /// Frames the driver sent: (pair, frame).
    sent: Vec<(u16, Vec<u8>)>,
    /// Protocol errors the driver made.
    errors: Vec<String>,
    /// Notifications per queue.
    notifications: Vec<u64>,
    /// Control commands seen: (class, command, data).
    control: Vec<(u8, u8, Vec<u8>)>,
    resets: u32,
}

/// The virtio-net device model.
pub struct VirtioNetModel {
    ctx: DeviceContext,
    state: Mutex<State>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A fake backend with a virtio-net model behind it, with its capability list in place.
pub fn fake_virtio_net(name: &str, knobs: Knobs) -> FakeBackend<VirtioNetModel> {
    let device = FakeDevice {
        vendor_id: VIRTIO_VENDOR_ID,
        device_id: VIRTIO_NET_DEVICE_ID,
        class_code: 0x02_00_00,
    };
    let backend = FakeBackend::new(name, device, |ctx| VirtioNetModel::new(ctx, knobs));
    // Status: capabilities list present; capabilities pointer.
    backend.set_config(0x06, &(1u16 << 4).to_le_bytes());
    backend.set_config(0x34, &[0x40]);
    // MSI-X (not virtio's, to be skipped), then a PCI configuration access capability.
    backend.set_config(0x40, &[0x11, 0x50, 0x0b, 0x00]);
    let virtio_cap = |at: u16, next: u8, kind: u8, offset: u64, length: u32, len: u8| {
        let mut bytes = vec![0u8; usize::from(len)];
        bytes[cap::VNDR as usize] = VENDOR_CAPABILITY;
        bytes[cap::NEXT as usize] = next;
        bytes[cap::LEN as usize] = len;
        bytes[cap::CFG_TYPE as usize] = kind;
        bytes[cap::BAR as usize] = if kind == cfg_type::PCI { 0 } else { BAR };
        bytes[8..12].copy_from_slice(&(offset as u32).to_le_bytes());
        bytes[12..16].copy_from_slice(&length.to_le_bytes());
        if kind == cfg_type::NOTIFY {
            bytes[16..20].copy_from_slice(&NOTIFY_MULTIPLIER.to_le_bytes());
        }
        backend.set_config(at, &bytes);
    };
    virtio_cap(0x50, COMMON_CAPABILITY as u8, cfg_type::PCI, 0, 0, 20);
    virtio_cap(
        COMMON_CAPABILITY,
        NOTIFY_CAPABILITY as u8,
        cfg_type::COMMON,
        COMMON_OFFSET,
        0x38,
        cap::SIZE,
    );
    virtio_cap(
        NOTIFY_CAPABILITY,
        0x88,
        cfg_type::NOTIFY,
        NOTIFY_OFFSET,
        0x1000,
        cap::NOTIFY_SIZE,
    );
    virtio_cap(0x88, 0x98, cfg_type::ISR, ISR_OFFSET, 4, cap::SIZE);
    virtio_cap(0x98, 0, cfg_type::DEVICE, DEVICE_OFFSET, 0x20, cap::SIZE);
    backend
}

impl VirtioNetModel {
    fn new(ctx: DeviceContext, knobs: Knobs) -> VirtioNetModel {
        let model = VirtioNetModel {
            ctx,
            state: Mutex::new(State {
                knobs,
                ..State::default()
            }),
        };
        reset(&mut lock(&model.state));
        model
    }

    /// Changes the knobs.
    pub fn knobs(&self, change: impl FnOnce(&mut Knobs)) {
        change(&mut lock(&self.state).knobs);
    }

    /// Frames the driver sent so far: (pair, frame without the header).
    pub fn sent(&self) -> Vec<(u16, Vec<u8>)> {
        lock(&self.state).sent.clone()
    }

    /// Protocol errors the driver made so far.
    pub fn errors(&self) -> Vec<String> {
        lock(&self.state).errors.clone()
    }

    /// The features the driver wrote.
    pub fn driver_features(&self) -> u64 {
        lock(&self.state).driver_features
    }

    /// `device_status`.
    pub fn status(&self) -> u8 {
        lock(&self.state).status
    }

    /// Queue pairs the driver turned on (1 until a `VQ_PAIRS_SET`).
    pub fn pairs_active(&self) -> u16 {
        lock(&self.state).pairs_active
    }

    /// Notifications the driver sent for queue `index`.
    pub fn notifications(&self, index: u16) -> u64 {
        lock(&self.state)
            .notifications
            .get(usize::from(index))
            .copied()
            .unwrap_or(0)
    }

    /// Size and MSI-X vector the driver gave queue `index`.
    pub fn queue_setup(&self, index: u16) -> Option<(u16, u16, bool)> {
        let state = lock(&self.state);
        let queue = state.queues.get(usize::from(index))?;
        Some((queue.size, queue.msix_vector, queue.enabled))
    }

    /// Resets so far (writes of 0 to `device_status`).
    pub fn resets(&self) -> u32 {
        lock(&self.state).resets
    }

    /// A frame arrives from the wire for `pair`: delivered into a posted buffer now, or
    /// when the driver posts one.
    pub fn inject(&self, pair: u16, frame: &[u8]) {
        let mut state = lock(&self.state);
        if let Some(waiting) = state.waiting.get_mut(usize::from(pair)) {
            waiting.push_back(frame.to_vec());
        }
        self.deliver(&mut state, pair);
    }

    fn queue_count(knobs: &Knobs) -> usize {
        let control = knobs.features & features::NET_F_CTRL_VQ != 0;
        2 * usize::from(knobs.max_pairs) + usize::from(control)
    }

    fn common_read(&self, state: &State, offset: u64) -> u64 {
        let queue = state.queues.get(usize::from(state.queue_select));
        let q = |f: fn(&QueueState) -> u64| queue.map_or(0, f);
        match offset {
            0x00 => u64::from(state.device_feature_select),
            0x04 => match state.device_feature_select {
                0 => state.knobs.features & 0xffff_ffff,
                1 => state.knobs.features >> 32,
                _ => 0,
            },
            0x08 => u64::from(state.driver_feature_select),
            0x0c => match state.driver_feature_select {
                0 => state.driver_features & 0xffff_ffff,
                1 => state.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(state.config_msix_vector),
            0x12 => Self::queue_count(&state.knobs) as u64,
            0x14 => u64::from(state.status),
            0x15 => 0,
            0x16 => u64::from(state.queue_select),
            0x18 => q(|q| u64::from(q.size)),
            0x1a => queue.map_or(u64::from(NO_VECTOR), |q| u64::from(q.msix_vector)),
            0x1c => q(|q| u64::from(q.enabled)),
            0x1e => u64::from(state.queue_select),
            0x20 => q(|q| q.desc & 0xffff_ffff),
            0x24 => q(|q| q.desc >> 32),
            0x28 => q(|q| q.driver & 0xffff_ffff),
            0x2c => q(|q| q.driver >> 32),
            0x30 => q(|q| q.device & 0xffff_ffff),
            0x34 => q(|q| q.device >> 32),
            _ => 0,
        }
    }

    fn common_write(&self, state: &mut State, offset: u64, value: u64) {
        let select = usize::from(state.queue_select);
        let set_half = |old: u64, high: bool, value: u64| {
            if high {
                (old & 0xffff_ffff) | (value << 32)
            } else {
                (old & !0xffff_ffff) | (value & 0xffff_ffff)
            }
        };
        match offset {
            0x00 => state.device_feature_select = value as u32,
            0x08 => state.driver_feature_select = value as u32,
            0x0c => match state.driver_feature_select {
                0 => state.driver_features = set_half(state.driver_features, false, value),
                1 => state.driver_features = set_half(state.driver_features, true, value),
                _ => {}
            },
            0x10 => state.config_msix_vector = value as u16,
            0x14 => self.write_status(state, value as u8),
            0x16 => state.queue_select = value as u16,
            _ => {
                let max_size = state.knobs.max_queue_size;
                let vectors = state.knobs.msix_vectors;
                let Some(queue) = state.queues.get_mut(select) else {
                    state
                        .errors
                        .push(format!("write {offset:#x} to absent queue {select}"));
                    return;
                };
                match offset {
                    0x18 => {
                        let size = value as u16;
                        if size == 0 || size > max_size || !size.is_power_of_two() {
                            state.errors.push(format!("queue {select}: size {size}"));
                        } else {
                            queue.size = size;
                        }
                    }
                    0x1a => {
                        let vector = value as u16;
                        queue.msix_vector = if vector == NO_VECTOR || u32::from(vector) < vectors {
                            vector
                        } else {
                            NO_VECTOR
                        };
                    }
                    0x1c => queue.enabled = value != 0,
                    0x20 => queue.desc = set_half(queue.desc, false, value),
                    0x24 => queue.desc = set_half(queue.desc, true, value),
                    0x28 => queue.driver = set_half(queue.driver, false, value),
                    0x2c => queue.driver = set_half(queue.driver, true, value),
                    0x30 => queue.device = set_half(queue.device, false, value),
                    0x34 => queue.device = set_half(queue.device, true, value),
                    _ => state
                        .errors
                        .push(format!("write to common offset {offset:#x}")),
                }
            }
        }
    }

    fn write_status(&self, state: &mut State, value: u8) {
        if value == 0 {
            state.resets += 1;
            if !state.knobs.never_reset {
                reset(state);
            }
            return;
        }
        let mut value = value;
        if value & status::FEATURES_OK != 0 && state.status & status::FEATURES_OK == 0 {
            let offered = state.knobs.features;
            let asked = state.driver_features;
            let keep = !state.knobs.refuse_features
                && asked & !offered == 0
                && asked & features::F_VERSION_1 != 0
                // A device behind an IOMMU refuses a driver that bypasses it (§6.1).
                && (offered & features::F_ACCESS_PLATFORM == 0
                    || asked & features::F_ACCESS_PLATFORM != 0);
            if !keep {
                value &= !status::FEATURES_OK;
            }
        }
        if value & status::DRIVER_OK != 0 && state.status & status::DRIVER_OK == 0 {
            // Used ring flags as the knobs say.
            let flags = if state.knobs.no_notify {
                USED_F_NO_NOTIFY
            } else {
                0
            };
            for i in 0..state.queues.len() {
                let queue = &state.queues[i];
                if queue.enabled {
                    let _ = self.ctx.dma_write(queue.device, &flags.to_le_bytes());
                }
            }
        }
        state.status = value;
    }

    fn notify(&self, state: &mut State, offset: u64, value: u64) {
        let index = offset / u64::from(NOTIFY_MULTIPLIER);
        if offset % u64::from(NOTIFY_MULTIPLIER) != 0 || value != index {
            state
                .errors
                .push(format!("notify write {value} at notify offset {offset:#x}"));
            return;
        }
        let Ok(index) = u16::try_from(index) else {
            return;
        };
        if let Some(count) = state.notifications.get_mut(usize::from(index)) {
            *count += 1;
        }
        if state.status & status::DRIVER_OK == 0 {
            state
                .errors
                .push(format!("notify of queue {index} before DRIVER_OK"));
            return;
        }
        let pairs = state.knobs.max_pairs;
        if index >= 2 * pairs {
            self.control(state, index);
        } else if index % 2 == 1 {
            self.transmit(state, index);
            if state.knobs.loopback {
                self.deliver(state, index / 2);
            }
        } else {
            self.deliver(state, index / 2);
        }
    }

    /// Reads the next available chain of queue `index`: its head and its descriptors
    /// (address, length, flags). `None` if nothing is available or the queue is bad.
    fn next_chain(&self, state: &mut State, index: u16) -> Option<(u16, Vec<Descriptor>)> {
        let queue = state.queues.get(usize::from(index))?.clone();
        if !queue.enabled || queue.size == 0 {
            return None;
        }
        let mut word = [0u8; 2];
        self.ctx.dma_read(queue.driver + 2, &mut word).ok()?;
        let avail_idx = u16::from_le_bytes(word);
        if avail_idx == queue.last_avail {
            return None;
        }
        let slot = u64::from(queue.last_avail % queue.size);
        self.ctx
            .dma_read(queue.driver + 4 + 2 * slot, &mut word)
            .ok()?;
        let head = u16::from_le_bytes(word);
        let mut chain = Vec::new();
        let mut id = head;
        loop {
            if id >= queue.size || chain.len() >= usize::from(queue.size) {
                state
                    .errors
                    .push(format!("queue {index}: bad chain at descriptor {id}"));
                return None;
            }
            let mut desc = [0u8; 16];
            self.ctx
                .dma_read(queue.desc + 16 * u64::from(id), &mut desc)
                .ok()?;
            let addr = u64::from_le_bytes(desc[0..8].try_into().ok()?);
            let len = u32::from_le_bytes(desc[8..12].try_into().ok()?);
            let flags = u16::from_le_bytes(desc[12..14].try_into().ok()?);
            let next = u16::from_le_bytes(desc[14..16].try_into().ok()?);
            chain.push((addr, len, flags));
            if flags & DESC_F_NEXT == 0 {
                break;
            }
            id = next;
        }
        state.queues[usize::from(index)].last_avail = queue.last_avail.wrapping_add(1);
        Some((head, chain))
    }

    fn write_used(&self, state: &mut State, index: u16, id: u16, len: u32, data_queue: bool) {
        let corruption = if data_queue {
            state.knobs.corruption.take()
        } else {
            None
        };
        let Some(queue) = state.queues.get_mut(usize::from(index)) else {
            return;
        };
        let mut id = u32::from(id);
        let mut len = len;
        let mut jump = 0;
        match corruption {
            Some(Corruption::Id(bad)) => id = bad,
            Some(Corruption::Length(bad)) => len = bad,
            Some(Corruption::UsedIndexJump(n)) => jump = n,
            None => {}
        }
        let slot = u64::from(queue.used_idx % queue.size);
        let mut element = [0u8; 8];
        element[..4].copy_from_slice(&id.to_le_bytes());
        element[4..].copy_from_slice(&len.to_le_bytes());
        let _ = self.ctx.dma_write(queue.device + 4 + 8 * slot, &element);
        queue.used_idx = queue.used_idx.wrapping_add(1);
        let published = queue.used_idx.wrapping_add(jump);
        let _ = self
            .ctx
            .dma_write(queue.device + 2, &published.to_le_bytes());
    }

    fn interrupt(&self, state: &State, index: u16) {
        let Some(queue) = state.queues.get(usize::from(index)) else {
            return;
        };
        let mut flags = [0u8; 2];
        if self.ctx.dma_read(queue.driver, &mut flags).is_err() {
            return;
        }
        let suppressed = u16::from_le_bytes(flags) & AVAIL_F_NO_INTERRUPT != 0;
        if queue.msix_vector != NO_VECTOR
            && !suppressed
            && self.ctx.irq_mode() == Some(IrqMode::MsiX)
        {
            self.ctx.raise_irq(u32::from(queue.msix_vector));
        }
    }

    fn transmit(&self, state: &mut State, index: u16) {
        let pair = index / 2;
        let mut any = false;
        while let Some((head, chain)) = self.next_chain(state, index) {
            any = true;
            let mut bytes = Vec::new();
            for &(addr, len, flags) in &chain {
                if flags & DESC_F_WRITE != 0 {
                    state
                        .errors
                        .push(format!("queue {index}: device-writable TX buffer"));
                    continue;
                }
                let mut part = vec![0u8; len as usize];
                if self.ctx.dma_read(addr, &mut part).is_err() {
                    state
                        .errors
                        .push(format!("queue {index}: TX buffer {addr:#x} unmapped"));
                }
                bytes.extend_from_slice(&part);
            }
            if bytes.len() < NET_HEADER_SIZE || bytes[..NET_HEADER_SIZE].iter().any(|&b| b != 0) {
                state
                    .errors
                    .push(format!("queue {index}: bad TX header {bytes:02x?}"));
            } else {
                let frame = bytes[NET_HEADER_SIZE..].to_vec();
                if state.knobs.loopback {
                    if let Some(waiting) = state.waiting.get_mut(usize::from(pair)) {
                        waiting.push_back(frame.clone());
                    }
                }
                state.sent.push((pair, frame));
            }
            self.write_used(state, index, head, 0, true);
        }
        if any {
            self.interrupt(state, index);
        }
    }

    fn deliver(&self, state: &mut State, pair: u16) {
        let index = 2 * pair;
        if state.status & status::DRIVER_OK == 0 {
            return;
        }
        let mut any = false;
        while state
            .waiting
            .get(usize::from(pair))
            .is_some_and(|w| !w.is_empty())
        {
            let Some((head, chain)) = self.next_chain(state, index) else {
                break;
            };
            any = true;
            let frame = state.waiting[usize::from(pair)]
                .pop_front()
                .unwrap_or_default();
            let &[(addr, len, flags)] = chain.as_slice() else {
                state
                    .errors
                    .push(format!("queue {index}: RX chain of {}", chain.len()));
                self.write_used(state, index, head, 0, true);
                continue;
            };
            let total = NET_HEADER_SIZE + frame.len();
            if flags & DESC_F_WRITE == 0 || (len as usize) < total {
                state.errors.push(format!(
                    "queue {index}: RX buffer of {len} bytes, flags {flags}"
                ));
                self.write_used(state, index, head, 0, true);
                continue;
            }
            let mut bytes = vec![0u8; NET_HEADER_SIZE];
            // num_buffers: 1 (§5.1.6.4).
            bytes[10] = 1;
            bytes.extend_from_slice(&frame);
            if self.ctx.dma_write(addr, &bytes).is_err() {
                state
                    .errors
                    .push(format!("queue {index}: RX buffer {addr:#x} unmapped"));
            }
            self.write_used(state, index, head, total as u32, true);
        }
        if any {
            self.interrupt(state, index);
        }
    }

    fn control(&self, state: &mut State, index: u16) {
        while let Some((head, chain)) = self.next_chain(state, index) {
            let mut command = Vec::new();
            let mut ack_at = None;
            for &(addr, len, flags) in &chain {
                if flags & DESC_F_WRITE != 0 {
                    ack_at = Some(addr);
                } else {
                    let mut part = vec![0u8; len as usize];
                    let _ = self.ctx.dma_read(addr, &mut part);
                    command.extend_from_slice(&part);
                }
            }
            let mut ack = 1u8;
            if let [class, cmd, data @ ..] = command.as_slice() {
                state.control.push((*class, *cmd, data.to_vec()));
                if (*class, *cmd) == (4, 0) && data.len() == 2 {
                    let pairs = u16::from_le_bytes([data[0], data[1]]);
                    if (1..=state.knobs.max_pairs).contains(&pairs) {
                        state.pairs_active = pairs;
                        ack = 0;
                    }
                }
            }
            match ack_at {
                Some(addr) => {
                    let _ = self.ctx.dma_write(addr, &[ack]);
                }
                None => state
                    .errors
                    .push("control command without an ack buffer".into()),
            }
            self.write_used(state, index, head, 1, false);
        }
    }

    fn device_config(&self, state: &State) -> [u8; 0x20] {
        let mut bytes = [0u8; 0x20];
        bytes[net_config::MAC..net_config::MAC + 6].copy_from_slice(&MODEL_MAC);
        let link = u16::from(state.knobs.link_up) * net_config::S_LINK_UP;
        bytes[net_config::STATUS..net_config::STATUS + 2].copy_from_slice(&link.to_le_bytes());
        bytes[net_config::MAX_VIRTQUEUE_PAIRS..net_config::MAX_VIRTQUEUE_PAIRS + 2]
            .copy_from_slice(&state.knobs.max_pairs.to_le_bytes());
        bytes[net_config::SPEED..net_config::SPEED + 4].copy_from_slice(&10_000u32.to_le_bytes());
        bytes[net_config::DUPLEX] = 1;
        bytes
    }
}

fn reset(state: &mut State) {
    let queues = VirtioNetModel::queue_count(&state.knobs);
    state.device_feature_select = 0;
    state.driver_feature_select = 0;
    state.driver_features = 0;
    state.status = 0;
    state.config_msix_vector = NO_VECTOR;
    state.queue_select = 0;
    let max = state.knobs.max_queue_size;
    state.queues = (0..queues)
        .map(|_| QueueState {
            size: max,
            msix_vector: NO_VECTOR,
            ..QueueState::default()
        })
        .collect();
    state.notifications = vec![0; queues];
    state.pairs_active = 1;
    state.waiting = vec![VecDeque::new(); usize::from(state.knobs.max_pairs)];
}

impl DeviceModel for VirtioNetModel {
    fn bar_len(&self, index: u8) -> Option<usize> {
        (index == BAR).then_some(BAR_LEN)
    }

    fn bar_read(&self, bar: u8, offset: u64, size: u8) -> u64 {
        let state = lock(&self.state);
        if bar != BAR {
            return 0;
        }
        match offset {
            o if o < ISR_OFFSET => self.common_read(&state, o - COMMON_OFFSET),
            o if o < DEVICE_OFFSET => 0,
            o if o < NOTIFY_OFFSET => {
                let config = self.device_config(&state);
                let start = (o - DEVICE_OFFSET) as usize;
                let mut value = 0u64;
                for i in 0..usize::from(size) {
                    let byte = config.get(start + i).copied().unwrap_or(0);
                    value |= u64::from(byte) << (8 * i);
                }
                value
            }
            _ => 0,
        }
    }

    fn bar_write(&self, bar: u8, offset: u64, _size: u8, value: u64) {
        let mut state = lock(&self.state);
        if bar != BAR {
            return;
        }
        match offset {
            o if o < ISR_OFFSET => self.common_write(&mut state, o - COMMON_OFFSET, value),
            o if o >= NOTIFY_OFFSET => self.notify(&mut state, o - NOTIFY_OFFSET, value),
            o => state
                .errors
                .push(format!("write {value:#x} at BAR offset {o:#x}")),
        }
    }

    fn interrupt_count(&self, mode: IrqMode) -> u32 {
        match mode {
            IrqMode::MsiX => lock(&self.state).knobs.msix_vectors,
            _ => 0,
        }
    }

    fn reset(&self) {
        reset(&mut lock(&self.state));
    }
}
