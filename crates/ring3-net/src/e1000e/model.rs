//! A fake 82574L for the unit tests: the registers the driver uses, legacy receive and
//! transmit descriptor processing by DMA through the fake IOMMU, transmit looped back to
//! receive, MSI-X through IVAR, and switches that make it misbehave.

use std::mem::offset_of;
use std::sync::{Mutex, MutexGuard, PoisonError};

use ring3::fake::{DeviceContext, DeviceModel, FakeBackend, FakeDevice};
use ring3::IrqMode;

use super::regs::{
    self, Ctrl, GeneralRegisters, Interrupts, Rctl, ReceiveFilter, ReceiveRing, Status, Tctl,
    TransmitRing,
};
use super::ring::{rx, tx, DESCRIPTOR_SIZE};

const BAR0_SIZE: usize = 0x20000;

pub(crate) const CTRL: usize = offset_of!(GeneralRegisters, ctrl);
pub(crate) const STATUS: usize = offset_of!(GeneralRegisters, status);
pub(crate) const EERD: usize = offset_of!(GeneralRegisters, eerd);
pub(crate) const ICR: usize = offset_of!(GeneralRegisters, icr);
pub(crate) const IMS: usize = offset_of!(GeneralRegisters, ims);
pub(crate) const IMC: usize = offset_of!(GeneralRegisters, imc);
pub(crate) const EIAC: usize = offset_of!(GeneralRegisters, eiac);
pub(crate) const IVAR: usize = offset_of!(GeneralRegisters, ivar);
pub(crate) const RCTL: usize = offset_of!(GeneralRegisters, rctl);
pub(crate) const TCTL: usize = offset_of!(GeneralRegisters, tctl);
pub(crate) const RDBAL: usize = regs::RECEIVE_RING + offset_of!(ReceiveRing, rdbal);
pub(crate) const RDBAH: usize = regs::RECEIVE_RING + offset_of!(ReceiveRing, rdbah);
pub(crate) const RDLEN: usize = regs::RECEIVE_RING + offset_of!(ReceiveRing, rdlen);
pub(crate) const RDH: usize = regs::RECEIVE_RING + offset_of!(ReceiveRing, rdh);
pub(crate) const RDT: usize = regs::RECEIVE_RING + offset_of!(ReceiveRing, rdt);
pub(crate) const TDBAL: usize = regs::TRANSMIT_RING + offset_of!(TransmitRing, tdbal);
pub(crate) const TDBAH: usize = regs::TRANSMIT_RING + offset_of!(TransmitRing, tdbah);
pub(crate) const TDLEN: usize = regs::TRANSMIT_RING + offset_of!(TransmitRing, tdlen);
pub(crate) const TDH: usize = regs::TRANSMIT_RING + offset_of!(TransmitRing, tdh);
pub(crate) const TDT: usize = regs::TRANSMIT_RING + offset_of!(TransmitRing, tdt);
pub(crate) const MPC: usize = regs::STATISTICS + 0x10;
pub(crate) const RAL0: usize = regs::RECEIVE_FILTER + offset_of!(ReceiveFilter, ral0);
pub(crate) const RAH0: usize = regs::RECEIVE_FILTER + offset_of!(ReceiveFilter, rah0);

/// Ways the model breaks the rules, for the tests of the driver's checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mischief {
    /// Behaves.
    #[default]
    None,
    /// Writes this length back in receive descriptors.
    RxLength(u16),
    /// Leaves EOP out of receive write-backs.
    RxNoEop,
    /// Sets these error bits in receive write-backs.
    RxErrors(u8),
    /// Also sets DD in the receive slot at the tail, which was never posted.
    RxDoneUnposted,
    /// Reports a receive head beyond the ring.
    HeadOutOfRange,
}

/// The model's state, open to the tests.
pub struct State {
    regs: Vec<u32>,
    /// The MAC in the NVM.
    pub mac: [u8; 6],
    /// Leave RAL0/RAH0 invalid after reset, so the driver must read the NVM.
    pub mac_only_in_nvm: bool,
    /// CTRL.RST never clears.
    pub stuck_in_reset: bool,
    /// Send transmitted frames to the receive ring.
    pub loopback: bool,
    /// Misbehaviour switch.
    pub mischief: Mischief,
    /// Register writes, in order: (offset, value).
    pub writes: Vec<(usize, u32)>,
    /// Frames transmitted.
    pub sent: Vec<Vec<u8>>,
    /// MSI-X messages sent, by vector.
    pub messages: Vec<u32>,
}

impl State {
    /// A register's value.
    pub fn reg(&self, offset: usize) -> u32 {
        self.regs[offset / 4]
    }

    fn set(&mut self, offset: usize, value: u32) {
        self.regs[offset / 4] = value;
    }

    /// How many writes went to `offset`.
    pub fn writes_to(&self, offset: usize) -> usize {
        self.writes.iter().filter(|(o, _)| *o == offset).count()
    }

    fn power_on(&mut self) {
        self.regs.iter_mut().for_each(|r| *r = 0);
        let status = Status::FD | Status::LU | Status::SPEED_1 | Status::GIO_MASTER_ENABLE;
        self.set(STATUS, status.bits());
        self.set(CTRL, Ctrl::FD.bits());
        if !self.mac_only_in_nvm {
            let [a, b, c, d, e, f] = self.mac;
            self.set(RAL0, u32::from_le_bytes([a, b, c, d]));
            self.set(RAH0, u32::from_le_bytes([e, f, 0, 0]) | regs::RAH_AV);
        }
    }

    fn ring(&self, base_low: usize, base_high: usize, len: usize) -> (u64, u32) {
        let base = u64::from(self.reg(base_low)) | (u64::from(self.reg(base_high)) << 32);
        (base, self.reg(len) / DESCRIPTOR_SIZE as u32)
    }
}

/// The fake 82574L.
pub struct E1000eModel {
    ctx: DeviceContext,
    state: Mutex<State>,
}

/// The MAC the model's NVM holds.
pub const MODEL_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

impl E1000eModel {
    fn new(ctx: DeviceContext) -> Self {
        let mut state = State {
            regs: vec![0; BAR0_SIZE / 4],
            mac: MODEL_MAC,
            mac_only_in_nvm: false,
            stuck_in_reset: false,
            loopback: true,
            mischief: Mischief::None,
            writes: Vec::new(),
            sent: Vec::new(),
            messages: Vec::new(),
        };
        state.power_on();
        E1000eModel {
            ctx,
            state: Mutex::new(state),
        }
    }

    /// The state, locked.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A frame arrives from the wire.
    pub fn inject(&self, frame: &[u8]) {
        let mut state = self.state();
        self.receive(&mut state, frame);
    }

    fn receive(&self, state: &mut State, frame: &[u8]) {
        let rctl = Rctl::from_bits_retain(state.reg(RCTL));
        if !rctl.contains(Rctl::EN) {
            return;
        }
        let (base, entries) = state.ring(RDBAL, RDBAH, RDLEN);
        let head = state.reg(RDH);
        let tail = state.reg(RDT);
        if entries == 0 || head == tail || frame.len() > 2048 {
            // No descriptor: the frame is missed.
            let missed = state.reg(MPC) + 1;
            state.set(MPC, missed);
            self.cause(state, Interrupts::RXO);
            return;
        }
        let descriptor = base + u64::from(head) * DESCRIPTOR_SIZE as u64;
        let mut address = [0u8; 8];
        if self.ctx.dma_read(descriptor, &mut address).is_err() {
            return;
        }
        if self
            .ctx
            .dma_write(u64::from_le_bytes(address), frame)
            .is_err()
        {
            return;
        }
        let mut completion = rx::Completion {
            length: frame.len() as u16,
            status: rx::STATUS_DD | rx::STATUS_EOP,
            errors: 0,
        };
        match state.mischief {
            Mischief::RxLength(length) => completion.length = length,
            Mischief::RxNoEop => completion.status &= !rx::STATUS_EOP,
            Mischief::RxErrors(errors) => completion.errors = errors,
            _ => {}
        }
        let _ = self
            .ctx
            .dma_write(descriptor + 8, &completion.encode().to_le_bytes());
        let head = (head + 1) % entries;
        state.set(RDH, head);
        if state.mischief == Mischief::RxDoneUnposted {
            let unposted = base + u64::from(state.reg(RDT)) * DESCRIPTOR_SIZE as u64;
            let _ = self
                .ctx
                .dma_write(unposted + 8, &completion.encode().to_le_bytes());
        }
        let cause = if self.ctx.irq_mode() == Some(IrqMode::MsiX) {
            Interrupts::RXQ0
        } else {
            Interrupts::RXT0
        };
        self.cause(state, cause);
    }

    fn transmit(&self, state: &mut State) {
        if !Tctl::from_bits_retain(state.reg(TCTL)).contains(Tctl::EN) {
            return;
        }
        let (base, entries) = state.ring(TDBAL, TDBAH, TDLEN);
        while entries > 0 && state.reg(TDH) != state.reg(TDT) && state.reg(TDT) < entries {
            let head = state.reg(TDH);
            let descriptor = base + u64::from(head) * DESCRIPTOR_SIZE as u64;
            let mut raw = [0u8; 16];
            if self.ctx.dma_read(descriptor, &mut raw).is_err() {
                return;
            }
            let (address, word) = raw.split_at(8);
            let address = u64::from_le_bytes(address.try_into().unwrap_or_default());
            let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
            let (length, command, _) = tx::decode(word);
            let mut frame = vec![0u8; usize::from(length)];
            if self.ctx.dma_read(address, &mut frame).is_err() {
                return;
            }
            if command & tx::CMD_RS != 0 {
                let _ = self.ctx.dma_write(descriptor + 12, &[tx::STATUS_DD]);
            }
            state.set(TDH, (head + 1) % entries);
            if state.loopback {
                self.receive(state, &frame);
            }
            state.sent.push(frame);
            let cause = if self.ctx.irq_mode() == Some(IrqMode::MsiX) {
                Interrupts::TXQ0
            } else {
                Interrupts::TXDW
            };
            self.cause(state, cause);
        }
    }

    /// Sets interrupt causes and sends the MSI-X messages IVAR routes them to.
    fn cause(&self, state: &mut State, causes: Interrupts) {
        let icr = state.reg(ICR) | causes.bits();
        state.set(ICR, icr);
        if self.ctx.irq_mode() != Some(IrqMode::MsiX) {
            return;
        }
        let pending = Interrupts::from_bits_retain(icr & state.reg(IMS));
        let ivar = state.reg(IVAR);
        for (cause, shift) in [
            (Interrupts::RXQ0, regs::ivar::RXQ0_SHIFT),
            (Interrupts::TXQ0, regs::ivar::TXQ0_SHIFT),
        ] {
            if pending.contains(cause) {
                if let Some(vector) = regs::ivar::vector(ivar, shift) {
                    if self.ctx.raise_irq(vector) {
                        state.messages.push(vector);
                    }
                }
                if state.reg(EIAC) & cause.bits() != 0 {
                    let icr = state.reg(ICR) & !cause.bits();
                    state.set(ICR, icr);
                }
            }
        }
    }
}

impl DeviceModel for E1000eModel {
    fn bar_len(&self, index: u8) -> Option<usize> {
        (index == 0).then_some(BAR0_SIZE)
    }

    fn bar_read(&self, _bar: u8, offset: u64, _size: u8) -> u64 {
        let offset = offset as usize;
        let mut state = self.state();
        let value = state.reg(offset);
        match offset {
            ICR => state.set(ICR, 0),
            RDH if state.mischief == Mischief::HeadOutOfRange => {
                let (_, entries) = state.ring(RDBAL, RDBAH, RDLEN);
                return u64::from(entries + 3);
            }
            // The statistics clear on read.
            o if (regs::STATISTICS..regs::STATISTICS + 0x100).contains(&o) => state.set(o, 0),
            _ => {}
        }
        u64::from(value)
    }

    fn bar_write(&self, _bar: u8, offset: u64, _size: u8, value: u64) {
        let offset = offset as usize;
        let value = value as u32;
        let mut state = self.state();
        state.writes.push((offset, value));
        match offset {
            CTRL if value & Ctrl::RST.bits() != 0 => {
                if state.stuck_in_reset {
                    state.set(CTRL, value);
                } else {
                    state.power_on();
                }
            }
            EERD => {
                let word = (value >> regs::eerd::ADDR_SHIFT) & 0x3fff;
                let data = match word {
                    0..=2 => {
                        let i = word as usize * 2;
                        u16::from_le_bytes([state.mac[i], state.mac[i + 1]])
                    }
                    _ => 0xffff,
                };
                let done = if value & regs::eerd::START != 0 {
                    regs::eerd::DONE | (u32::from(data) << regs::eerd::DATA_SHIFT)
                } else {
                    0
                };
                state.set(EERD, value | done);
            }
            ICR => {
                let icr = state.reg(ICR) & !value;
                state.set(ICR, icr);
            }
            IMS => {
                let ims = state.reg(IMS) | value;
                state.set(IMS, ims);
                self.cause(&mut state, Interrupts::empty());
            }
            IMC => {
                let ims = state.reg(IMS) & !value;
                state.set(IMS, ims);
            }
            RDT => state.set(RDT, value),
            TDT => {
                state.set(TDT, value);
                self.transmit(&mut state);
            }
            _ => state.set(offset, value),
        }
    }

    fn interrupt_count(&self, mode: IrqMode) -> u32 {
        if mode == IrqMode::MsiX {
            regs::MSIX_VECTORS
        } else {
            0
        }
    }

    fn reset(&self) {
        self.state().power_on();
    }
}

/// Register offsets for the tests.
pub mod offsets {
    pub(crate) use super::{
        CTRL, EIAC, ICR, IMC, IMS, IVAR, RAH0, RAL0, RCTL, RDH, RDLEN, RDT, TCTL, TDLEN, TDT,
    };
    /// TIPG.
    pub const TIPG: usize = 0x0410;
    /// RFCTL.
    pub const RFCTL: usize = 0x5008;
    /// The first MTA entry.
    pub const MTA: usize = 0x5200;
}

/// A fake backend with the model, built with `setup` applied to its state first.
pub fn backend(setup: impl FnOnce(&mut State)) -> FakeBackend<E1000eModel> {
    let device = FakeDevice {
        vendor_id: regs::VENDOR_INTEL,
        device_id: regs::DEVICE_82574L,
        class_code: 0x02_00_00,
    };
    let backend = FakeBackend::new("e1000e-model", device, E1000eModel::new);
    {
        let mut state = backend.model().state();
        setup(&mut state);
        state.power_on();
    }
    backend
}
