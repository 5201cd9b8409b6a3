//! The e1000e driver: Intel 82574L (8086:10d3), as QEMU emulates it with `-device e1000e`.
//!
//! [`E1000e::new`] resets the controller and brings it up following the datasheet's
//! initialization chapter (Intel 82574 GbE Controller Family datasheet, 4.6), one step
//! per section: interrupts off, global reset, general configuration, the MAC address,
//! statistics, receive and transmit setup, then MSI-X or polling. The device then has one
//! queue pair, taken with [`NetDevice::take_queue`] as an [`E1000eQueue`].
//!
//! Receive uses legacy descriptors: the device writes length, status and errors back in
//! place and leaves the buffer address alone, the format every 8254x-family device and
//! model supports, and all this driver needs (one 2048-byte buffer per frame, no
//! checksum offload, no RSS or header split). Transmit uses legacy descriptors with
//! EOP | IFCS | RS, one per frame.
//!
//! ```no_run
//! use ring3::vfio::VfioBackend;
//! use ring3_net::e1000e::{E1000e, E1000eOptions};
//! use ring3_net::{NetDevice, NetQueue};
//!
//! # fn main() -> ring3_net::Result<()> {
//! let backend = VfioBackend::open("0000:00:05.0")?;
//! let mut nic = E1000e::new(backend, E1000eOptions::default())?;
//! let mut queue = nic.take_queue(0)?;
//! let mut frames = Vec::new();
//! queue.receive(&mut frames, 32)?;
//! # Ok(()) }
//! ```

pub mod regs;
pub mod ring;

#[cfg(test)]
pub(crate) mod model;
#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring3::mmio::Registers;
use ring3::{Backend, Bar, Interrupt, IrqMode};

use crate::error::{Error, Result};
use crate::packet::{Packet, PacketPool};
use crate::{LinkStatus, NetDevice, NetQueue, QueueStats};

use regs::{
    Ctrl, CtrlExt, GeneralRegisters, Interrupts, Rctl, ReceiveFilter, ReceiveRing, Statistics,
    Status, Tctl, TransmitRing,
};
use ring::{rx, tx, DescriptorRing};

/// Bytes of a packet buffer: RCTL.BSIZE 00 with BSEX clear (2048).
pub const BUFFER_SIZE: usize = 2048;
/// The largest frame sent or received without FCS: long packets (RCTL.LPE) stay off.
pub const MAX_FRAME: usize = 1514;
/// The smallest frame accepted: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// How long CTRL.RST may take to clear. The datasheet asks for a wait of at least 1 ms
/// after setting it (4.6.2); QEMU clears it at once.
pub const RESET_TIMEOUT: Duration = Duration::from_millis(500);
/// How long one NVM word read through EERD may take.
pub const EERD_TIMEOUT: Duration = Duration::from_millis(100);
/// The MSI-X vector the queue pair's causes use.
pub const QUEUE_VECTOR: u32 = 0;

/// How the driver sets the controller up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E1000eOptions {
    /// Receive descriptors (a multiple of 8, 8–4096).
    pub rx_ring: u16,
    /// Transmit descriptors (a multiple of 8, 8–4096).
    pub tx_ring: u16,
    /// MSI-X (RX and TX of the queue pair on vector 0, [`NetQueue::wait`] sleeps on it)
    /// rather than polling.
    pub interrupts: bool,
}

impl Default for E1000eOptions {
    fn default() -> Self {
        E1000eOptions {
            rx_ring: 256,
            tx_ring: 256,
            interrupts: false,
        }
    }
}

const MAX_RING: u16 = 4096;

fn general(bar: &Bar) -> Result<Registers<'_, GeneralRegisters>> {
    Ok(bar.registers::<GeneralRegisters>(0)?)
}

fn rx_ring(bar: &Bar) -> Result<Registers<'_, ReceiveRing>> {
    Ok(bar.registers::<ReceiveRing>(regs::RECEIVE_RING)?)
}

fn tx_ring(bar: &Bar) -> Result<Registers<'_, TransmitRing>> {
    Ok(bar.registers::<TransmitRing>(regs::TRANSMIT_RING)?)
}

fn statistics(bar: &Bar) -> Result<Registers<'_, Statistics>> {
    Ok(bar.registers::<Statistics>(regs::STATISTICS)?)
}

fn filter(bar: &Bar) -> Result<Registers<'_, ReceiveFilter>> {
    Ok(bar.registers::<ReceiveFilter>(regs::RECEIVE_FILTER)?)
}

/// An 82574L, reset and running, with its one queue pair until it is taken.
pub struct E1000e<B: Backend> {
    backend: Arc<B>,
    bar: Bar,
    mac: [u8; 6],
    queue: Option<E1000eQueue<B>>,
    queue_taken: bool,
}

impl<B: Backend> std::fmt::Debug for E1000e<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E1000e")
            .field("address", &self.backend.address())
            .field("mac", &format_mac(self.mac))
            .field("queue_taken", &self.queue_taken)
            .finish()
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl<B: Backend> E1000e<B> {
    /// Resets the controller behind `backend` and brings it up with `options`.
    pub fn new(backend: B, options: E1000eOptions) -> Result<Self> {
        let backend = Arc::new(backend);
        let address = backend.address().to_string();
        for (name, entries) in [("rx_ring", options.rx_ring), ("tx_ring", options.tx_ring)] {
            if !(8..=MAX_RING).contains(&entries) || entries % 8 != 0 {
                return Err(Error::InvalidArgument(format!(
                    "{name} must be a multiple of 8 from 8 to {MAX_RING}: {entries}"
                )));
            }
        }
        let (vendor, device) = backend.ids()?;
        if (vendor, device) != (regs::VENDOR_INTEL, regs::DEVICE_82574L) {
            return Err(Error::Unsupported {
                address,
                what: format!("{vendor:04x}:{device:04x} is not an 82574L (8086:10d3)"),
            });
        }
        let bar = backend.bar(regs::REGISTER_BAR)?;
        if bar.len() < regs::MIN_BAR0_SIZE {
            return Err(Error::Unsupported {
                address,
                what: format!(
                    "BAR0 has {:#x} bytes, the registers need {:#x}",
                    bar.len(),
                    regs::MIN_BAR0_SIZE
                ),
            });
        }
        // The 82574 is a 64-bit DMA master (datasheet, "Product Features").
        backend.set_dma_mask(64);
        backend.set_bus_master(false)?;
        let general_regs = general(&bar)?;

        // 4.6.1 Interrupts during initialization: mask every cause before the reset.
        general_regs.field(|r| &r.imc).write(u32::MAX);

        // 4.6.2 Global reset and general configuration: CTRL.RST resets everything but
        // the PCI configuration; it clears itself when the reset is done.
        general_regs
            .field(|r| &r.ctrl)
            .modify(|ctrl| ctrl | Ctrl::RST.bits());
        wait_reset_done(&bar, &address, RESET_TIMEOUT)?;

        // 4.6.1 again: the reset left the mask at its default; mask everything and clear
        // causes that may be pending.
        general_regs.field(|r| &r.imc).write(u32::MAX);
        let _ = general_regs.field(|r| &r.icr).read();

        // 4.6.2 General configuration: link up (SLU) with the speed the PHY auto-
        // negotiated (ASDE); no forced speed or duplex, no VLAN mode, no flow control.
        general_regs.field(|r| &r.ctrl).modify(|ctrl| {
            let ctrl = Ctrl::from_bits_retain(ctrl);
            let cleared = Ctrl::FRCSPD
                | Ctrl::FRCDPLX
                | Ctrl::PHY_RST
                | Ctrl::VME
                | Ctrl::RFCE
                | Ctrl::TFCE
                | Ctrl::RST;
            ((ctrl - cleared) | Ctrl::SLU | Ctrl::ASDE).bits()
        });
        // Tell firmware (if any) that a driver owns the device.
        general_regs
            .field(|r| &r.ctrl_ext)
            .modify(|ext| ext | CtrlExt::DRV_LOAD.bits());

        // 10.2.7 Receive address: RAL0/RAH0 hold the MAC loaded from the NVM at reset;
        // if they are not valid, read the NVM's first three words through EERD.
        let mac = read_mac(&bar, &address)?;

        // 4.6.4 Initialization of statistics: the counters clear on read.
        clear_statistics(&bar)?;

        // 4.6.5 (multicast table): no multicast addresses.
        let filter_regs = filter(&bar)?;
        for index in 0..regs::MULTICAST_TABLE_ENTRIES {
            filter_regs.field(|r| &r.mta[index]).write(0);
        }

        backend.set_bus_master(true)?;
        let queue_count = u32::from(options.rx_ring) + u32::from(options.tx_ring);
        let pool = PacketPool::new(&*backend, queue_count * 2, BUFFER_SIZE)?;
        if pool.buffer_size() != BUFFER_SIZE {
            return Err(Error::InvalidArgument(format!(
                "packet buffers of {} bytes do not match RCTL.BSIZE ({BUFFER_SIZE})",
                pool.buffer_size()
            )));
        }
        let rx = DescriptorRing::new(&*backend, options.rx_ring)?;
        let tx = DescriptorRing::new(&*backend, options.tx_ring)?;

        // 7.4 Interrupts: with MSI-X, the receive and transmit queue causes go to
        // vector 0 through IVAR (10.2.4.9), and so does "other" (link changes), which
        // stays masked. EIAC clears the queue causes when their message is sent, so each
        // new write-back raises a new message.
        let interrupt = if options.interrupts {
            let mut vectors = backend.enable_interrupts(IrqMode::MsiX, 1)?;
            let interrupt = vectors.pop().ok_or_else(|| Error::Unsupported {
                address: address.clone(),
                what: "no MSI-X vector was enabled".into(),
            })?;
            let ivar = regs::ivar::entry(regs::ivar::RXQ0_SHIFT, QUEUE_VECTOR)
                | regs::ivar::entry(regs::ivar::TXQ0_SHIFT, QUEUE_VECTOR)
                | regs::ivar::entry(regs::ivar::OTHER_SHIFT, QUEUE_VECTOR);
            general_regs.field(|r| &r.ivar).write(ivar);
            general_regs
                .field(|r| &r.eiac)
                .write((Interrupts::RXQ0 | Interrupts::TXQ0).bits());
            Some(interrupt)
        } else {
            None
        };

        let mut queue = E1000eQueue {
            backend: backend.clone(),
            bar: bar.clone(),
            address: address.clone(),
            pool,
            rx,
            tx,
            interrupt,
            stats: QueueStats::default(),
            missed: Cell::new(0),
            failure: None,
        };
        queue.init_receive()?;
        queue.init_transmit()?;
        if queue.interrupt.is_some() {
            queue.arm_interrupts()?;
        }
        tracing::debug!(address, mac = format_mac(mac), "e1000e up");
        Ok(E1000e {
            backend,
            bar,
            mac,
            queue: Some(queue),
            queue_taken: false,
        })
    }

    /// The backend (for its address, or the tests' model).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Waits up to `timeout` for the link to come up; returns its status either way.
    pub fn wait_for_link(&self, timeout: Duration) -> Result<LinkStatus> {
        let start = Instant::now();
        loop {
            let link = self.link()?;
            if link.up || start.elapsed() >= timeout {
                return Ok(link);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Polls CTRL until RST clears.
fn wait_reset_done(bar: &Bar, address: &str, timeout: Duration) -> Result<()> {
    let ctrl = general(bar)?.field(|r| &r.ctrl);
    // The datasheet asks software to wait before it touches the device again.
    std::thread::sleep(Duration::from_millis(1));
    let start = Instant::now();
    loop {
        let value = ctrl.read();
        if value & Ctrl::RST.bits() == 0 {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(Error::Timeout {
                address: address.to_string(),
                what: format!("CTRL.RST to clear (CTRL {value:#010x})"),
                waited: timeout,
            });
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn read_mac(bar: &Bar, address: &str) -> Result<[u8; 6]> {
    let filter_regs = filter(bar)?;
    let low = filter_regs.field(|r| &r.ral0).read();
    let high = filter_regs.field(|r| &r.rah0).read();
    if high & regs::RAH_AV != 0 {
        let [a, b, c, d] = low.to_le_bytes();
        let [e, f, _, _] = high.to_le_bytes();
        return Ok([a, b, c, d, e, f]);
    }
    // NVM words 0–2 hold the MAC (little-endian byte pairs).
    let mut mac = [0u8; 6];
    for word in 0..3u32 {
        let value = read_nvm_word(bar, address, word)?;
        mac[word as usize * 2..word as usize * 2 + 2].copy_from_slice(&value.to_le_bytes());
    }
    let [a, b, c, d, e, f] = mac;
    filter_regs
        .field(|r| &r.ral0)
        .write(u32::from_le_bytes([a, b, c, d]));
    filter_regs
        .field(|r| &r.rah0)
        .write(u32::from_le_bytes([e, f, 0, 0]) | regs::RAH_AV);
    Ok(mac)
}

/// Reads NVM word `word` through EERD (10.2.2.6).
fn read_nvm_word(bar: &Bar, address: &str, word: u32) -> Result<u16> {
    let eerd = general(bar)?.field(|r| &r.eerd);
    eerd.write((word << regs::eerd::ADDR_SHIFT) | regs::eerd::START);
    let start = Instant::now();
    loop {
        let value = eerd.read();
        if value & regs::eerd::DONE != 0 {
            return Ok((value >> regs::eerd::DATA_SHIFT) as u16);
        }
        if start.elapsed() >= EERD_TIMEOUT {
            return Err(Error::Timeout {
                address: address.to_string(),
                what: format!("EERD.DONE reading NVM word {word} (EERD {value:#010x})"),
                waited: EERD_TIMEOUT,
            });
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn clear_statistics(bar: &Bar) -> Result<()> {
    // The whole block 0x4000..0x4100 is counters that clear on read.
    for offset in (regs::STATISTICS..regs::STATISTICS + 0x100).step_by(4) {
        let _ = bar.read32(offset)?;
    }
    Ok(())
}

impl<B: Backend> NetDevice for E1000e<B> {
    type Queue = E1000eQueue<B>;

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn link(&self) -> Result<LinkStatus> {
        let status = Status::from_bits_retain(general(&self.bar)?.field(|r| &r.status).read());
        let up = status.contains(Status::LU);
        Ok(LinkStatus {
            up,
            speed_mbps: up.then(|| status.speed_mbps()),
            full_duplex: up.then(|| status.contains(Status::FD)),
        })
    }

    fn queue_count(&self) -> usize {
        1
    }

    fn take_queue(&mut self, index: usize) -> Result<E1000eQueue<B>> {
        if index != 0 {
            return Err(Error::InvalidArgument(format!(
                "the e1000e has one queue pair, not {}",
                index + 1
            )));
        }
        self.queue_taken = true;
        self.queue
            .take()
            .ok_or_else(|| Error::InvalidArgument("queue pair 0 was already taken".into()))
    }

    fn max_frame(&self) -> usize {
        MAX_FRAME
    }
}

/// The 82574L's queue pair: receive queue 0 and transmit queue 0, with their buffers.
pub struct E1000eQueue<B: Backend> {
    backend: Arc<B>,
    bar: Bar,
    address: String,
    pool: PacketPool,
    rx: DescriptorRing,
    tx: DescriptorRing,
    interrupt: Option<Interrupt>,
    stats: QueueStats,
    /// Frames the device missed (MPC), summed over reads (the register clears on read).
    missed: Cell<u64>,
    /// Set when the device broke the rules: the queue refuses work from then on.
    failure: Option<String>,
}

impl<B: Backend> std::fmt::Debug for E1000eQueue<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E1000eQueue")
            .field("address", &self.address)
            .field("rx_in_flight", &self.rx.in_flight())
            .field("tx_in_flight", &self.tx.in_flight())
            .field("failure", &self.failure)
            .finish()
    }
}

impl<B: Backend> E1000eQueue<B> {
    /// 4.6.5 Receive initialization.
    fn init_receive(&mut self) -> Result<()> {
        let ring = rx_ring(&self.bar)?;
        let filter_regs = filter(&self.bar)?;
        // Legacy descriptors: RFCTL.EXTEN clear (see the module docs for why).
        filter_regs.field(|r| &r.rfctl).write(0);
        // Descriptor ring base and length, head and tail at 0 (the ring is empty).
        ring.field(|r| &r.rdbal).write(self.rx.iova() as u32);
        ring.field(|r| &r.rdbah)
            .write((self.rx.iova() >> 32) as u32);
        ring.field(|r| &r.rdlen).write(self.rx.byte_len());
        ring.field(|r| &r.rdh).write(0);
        ring.field(|r| &r.rdt).write(0);
        // No receive interrupt delay: write-backs are reported at once.
        ring.field(|r| &r.rdtr).write(0);
        ring.field(|r| &r.radv).write(0);
        // RCTL: receiver on, broadcasts accepted, CRC stripped, 2048-byte buffers
        // (BSIZE 00, BSEX clear), legacy descriptor type, no long packets, no
        // promiscuous modes. Written once the ring is programmed and before buffers are
        // posted, so the tail write below is what starts reception.
        let rctl = Rctl::EN | Rctl::BAM | Rctl::SECRC;
        self.general()?.field(|r| &r.rctl).write(rctl.bits());
        // Post every buffer the ring holds; one tail write.
        self.refill_receive()?;
        Ok(())
    }

    /// 4.6.6 Transmit initialization.
    fn init_transmit(&mut self) -> Result<()> {
        let ring = tx_ring(&self.bar)?;
        ring.field(|r| &r.tdbal).write(self.tx.iova() as u32);
        ring.field(|r| &r.tdbah)
            .write((self.tx.iova() >> 32) as u32);
        ring.field(|r| &r.tdlen).write(self.tx.byte_len());
        ring.field(|r| &r.tdh).write(0);
        ring.field(|r| &r.tdt).write(0);
        ring.field(|r| &r.tidv).write(0);
        ring.field(|r| &r.tadv).write(0);
        let general_regs = self.general()?;
        general_regs.field(|r| &r.tipg).write(regs::TIPG_COPPER);
        // TCTL: transmitter on, short packets padded, the recommended collision
        // threshold and the full-duplex collision distance, retransmit on late collision.
        let tctl = (Tctl::EN | Tctl::PSP | Tctl::RTLC)
            .with_collision(regs::TCTL_CT, regs::TCTL_COLD_FULL_DUPLEX);
        general_regs.field(|r| &r.tctl).write(tctl.bits());
        Ok(())
    }

    fn general(&self) -> Result<Registers<'_, GeneralRegisters>> {
        general(&self.bar)
    }

    /// Unmasks the queue causes (the device may mask them itself after a message) and
    /// clears those already reported.
    fn arm_interrupts(&self) -> Result<()> {
        let causes = (Interrupts::RXQ0 | Interrupts::TXQ0).bits();
        let general_regs = self.general()?;
        general_regs.field(|r| &r.icr).write(causes);
        general_regs.field(|r| &r.ims).write(causes);
        Ok(())
    }

    fn misbehaved(&mut self, what: String) -> Error {
        tracing::warn!(address = self.address, what, "e1000e misbehaved");
        self.stats.errors += 1;
        self.failure = Some(what.clone());
        Error::Misbehaved {
            address: self.address.clone(),
            what,
        }
    }

    fn check_healthy(&self) -> Result<()> {
        match &self.failure {
            Some(what) => Err(Error::Misbehaved {
                address: self.address.clone(),
                what: format!("{what} (the queue needs a reset)"),
            }),
            None => Ok(()),
        }
    }

    /// Posts free pool buffers into the receive ring until it is full, then moves the
    /// tail once.
    fn refill_receive(&mut self) -> Result<()> {
        let mut posted = 0;
        while self.rx.free_slots() > 0 {
            let Some(packet) = self.pool.alloc() else {
                break;
            };
            let address = self.pool.iova(&packet);
            self.rx.post(packet.index(), address, 0)?;
            posted += 1;
        }
        if posted > 0 {
            // The descriptors must be in memory before the device reads the tail.
            fence(Ordering::SeqCst);
            rx_ring(&self.bar)?
                .field(|r| &r.rdt)
                .write(u32::from(self.rx.tail()));
        }
        Ok(())
    }

    /// Takes transmitted buffers back into the pool.
    fn reclaim_transmit(&mut self) -> Result<()> {
        while self.tx.peek_done()?.is_some() {
            let slot = self.tx.next_to_clean();
            match self.tx.complete()? {
                Some(index) => self.free_index(index),
                None => {
                    return Err(self
                        .misbehaved(format!("transmit slot {slot} completed but held no buffer")))
                }
            }
        }
        if let Some(slot) = self.tx.unposted_slot_done()? {
            return Err(self.misbehaved(format!(
                "DD set in transmit slot {slot}, which was never posted"
            )));
        }
        Ok(())
    }

    fn free_index(&mut self, index: u32) {
        if self.pool.free(Packet::new(index, 0)).is_err() {
            self.stats.errors += 1;
        }
    }

    /// Reads the head registers and checks they lie in their rings.
    fn check_heads(&mut self) -> Result<()> {
        let rdh = rx_ring(&self.bar)?.field(|r| &r.rdh).read();
        if !self.rx.head_in_ring(rdh) {
            return Err(self.misbehaved(format!(
                "RDH {rdh} outside the {}-entry receive ring",
                self.rx.entries()
            )));
        }
        let tdh = tx_ring(&self.bar)?.field(|r| &r.tdh).read();
        if !self.tx.head_in_ring(tdh) {
            return Err(self.misbehaved(format!(
                "TDH {tdh} outside the {}-entry transmit ring",
                self.tx.entries()
            )));
        }
        Ok(())
    }

    /// Whether a receive or a transmit completion is waiting.
    fn work_pending(&self) -> Result<bool> {
        Ok(self.rx.peek_done()?.is_some() || self.tx.peek_done()?.is_some())
    }

    /// Frames the device missed for lack of buffers (MPC), read now.
    fn missed_frames(&self) -> u64 {
        if let Ok(stats) = statistics(&self.bar) {
            let mpc = stats.field(|r| &r.mpc).read();
            self.missed.set(self.missed.get() + u64::from(mpc));
        }
        self.missed.get()
    }

    /// Buffers in the pool now (for tests and diagnostics).
    pub fn free_buffers(&self) -> usize {
        self.pool.free_count()
    }

    /// The device's address.
    pub fn address(&self) -> &str {
        &self.address
    }
}

impl<B: Backend> NetQueue for E1000eQueue<B> {
    fn receive(&mut self, out: &mut Vec<Packet>, max: usize) -> Result<usize> {
        self.check_healthy()?;
        let mut delivered = 0;
        while delivered < max {
            let Some(word) = self.rx.peek_done()? else {
                break;
            };
            let slot = self.rx.next_to_clean();
            let completion = rx::Completion::decode(word);
            let length = usize::from(completion.length);
            if length > self.pool.buffer_size() {
                return Err(self.misbehaved(format!(
                    "receive slot {slot}: length {length} beyond the {}-byte buffer",
                    self.pool.buffer_size()
                )));
            }
            if completion.status & rx::STATUS_EOP == 0 {
                // With long packets off, every frame fits one 2048-byte buffer.
                return Err(self.misbehaved(format!(
                    "receive slot {slot}: frame of {length} bytes without EOP"
                )));
            }
            let Some(index) = self.rx.complete()? else {
                return Err(
                    self.misbehaved(format!("receive slot {slot} completed but held no buffer"))
                );
            };
            if completion.errors & rx::FRAME_ERRORS != 0 {
                self.stats.errors += 1;
                self.stats.rx_drops += 1;
                self.free_index(index);
                continue;
            }
            if length < MIN_FRAME {
                self.stats.rx_drops += 1;
                self.free_index(index);
                continue;
            }
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += length as u64;
            out.push(Packet::new(index, length as u32));
            delivered += 1;
        }
        // Before the refill writes over it: the device may not have touched the first
        // slot past the tail.
        if let Some(slot) = self.rx.unposted_slot_done()? {
            return Err(self.misbehaved(format!(
                "DD set in receive slot {slot}, which was never posted"
            )));
        }
        self.refill_receive()?;
        Ok(delivered)
    }

    fn transmit(&mut self, packets: &mut Vec<Packet>) -> Result<usize> {
        self.check_healthy()?;
        self.reclaim_transmit()?;
        if packets.is_empty() {
            return Ok(0);
        }
        if self.tx.free_slots() == 0 {
            // The ring is full: a chance to check the device's head is sane.
            self.check_heads()?;
        }
        let fits = packets.len().min(usize::from(self.tx.free_slots()));
        // Check the whole batch first, so an error leaves the ring untouched.
        for packet in &packets[..fits] {
            if packet.index() >= self.pool.count() {
                return Err(Error::InvalidArgument(format!(
                    "packet buffer {} is not from this queue's pool",
                    packet.index()
                )));
            }
            if !(MIN_FRAME..=MAX_FRAME).contains(&packet.len()) {
                return Err(Error::InvalidArgument(format!(
                    "a frame of {} bytes (the e1000e sends {MIN_FRAME} to {MAX_FRAME})",
                    packet.len()
                )));
            }
        }
        let command = tx::CMD_EOP | tx::CMD_IFCS | tx::CMD_RS;
        for packet in packets.drain(..fits) {
            let address = self.pool.iova(&packet);
            self.tx.post(
                packet.index(),
                address,
                tx::encode(packet.len() as u16, command),
            )?;
            self.stats.tx_packets += 1;
            self.stats.tx_bytes += packet.len() as u64;
        }
        if fits > 0 {
            // The descriptors must be in memory before the device reads the tail.
            fence(Ordering::SeqCst);
            tx_ring(&self.bar)?
                .field(|r| &r.tdt)
                .write(u32::from(self.tx.tail()));
        }
        self.stats.tx_busy += packets.len() as u64;
        Ok(fits)
    }

    fn alloc(&mut self) -> Option<Packet> {
        if self.pool.free_count() == 0 {
            // Transmitted frames may be waiting to come back.
            let _ = self.reclaim_transmit();
        }
        self.pool.alloc()
    }

    fn free(&mut self, packet: Packet) {
        if self.pool.free(packet).is_err() {
            self.stats.errors += 1;
        }
    }

    fn data(&self, packet: &Packet) -> &[u8] {
        self.pool.data(packet)
    }

    fn data_mut(&mut self, packet: &mut Packet) -> &mut [u8] {
        self.pool.data_mut(packet)
    }

    fn stats(&self) -> QueueStats {
        let mut stats = self.stats;
        stats.rx_drops += self.missed_frames();
        stats
    }

    fn wait(&mut self, timeout: Duration) -> Result<()> {
        self.check_healthy()?;
        self.check_heads()?;
        let Some(interrupt) = self.interrupt.clone() else {
            return Ok(());
        };
        // Clear and unmask first, then look: a completion after the look raises a new
        // message, which the eventfd keeps until the wait.
        self.arm_interrupts()?;
        if self.work_pending()? {
            let _ = interrupt.poll()?;
            return Ok(());
        }
        match interrupt.wait(timeout) {
            Ok(_) | Err(ring3::Error::Timeout { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

impl<B: Backend> Drop for E1000eQueue<B> {
    fn drop(&mut self) {
        // Stop the device before the rings and buffers are freed: receiver and
        // transmitter off, interrupts masked, then a global reset, which ends all DMA.
        if let Ok(general_regs) = general(&self.bar) {
            general_regs.field(|r| &r.imc).write(u32::MAX);
            general_regs.field(|r| &r.rctl).write(0);
            general_regs.field(|r| &r.tctl).write(0);
            general_regs
                .field(|r| &r.ctrl)
                .modify(|ctrl| ctrl | Ctrl::RST.bits());
            let _ = wait_reset_done(&self.bar, &self.address, RESET_TIMEOUT);
        }
        if self.interrupt.is_some() {
            let _ = self.backend.disable_interrupts(IrqMode::MsiX);
        }
    }
}
