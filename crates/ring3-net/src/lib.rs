//! User-mode network drivers: virtio-net (virtio 1.x, modern PCI) and e1000e (Intel
//! 82574L), both behind one packet API.
//!
//! # The packet API
//!
//! A [`NetDevice`] has one or more queue pairs; each [`NetQueue`] belongs to one thread
//! and takes no lock. A queue owns a [`PacketPool`]: fixed-size packet buffers carved
//! from DMA memory allocated once, when the queue is created. Packets move without
//! copies: a received [`Packet`] is a handle to the buffer the device wrote; transmitting
//! hands the buffer to the device, and the queue takes it back into its pool once the
//! device is done with it. Receive and transmit work in batches, so one doorbell (or none)
//! serves many packets.
//!
//! ```ignore
//! let mut packets = Vec::with_capacity(64);
//! loop {
//!     queue.receive(&mut packets, 64)?;          // up to 64 packets, never blocks
//!     for packet in &packets {
//!         let frame = queue.data(packet);          // the bytes the device wrote
//!         // ...
//!     }
//!     queue.transmit(&mut packets)?;             // echo them back; sent ones leave the Vec
//!     for packet in packets.drain(..) {          // the ring was full: give them back
//!         queue.free(packet);
//!     }
//! }
//! ```
//!
//! Nothing the device writes is trusted: used-ring indices, descriptor IDs and lengths are
//! checked before a buffer is touched, and a device that breaks the rules gets an error
//! (and a reset), never a buffer overrun.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod e1000e;
mod error;
mod packet;
pub mod tap;
pub mod virtio;

pub use error::{Error, Result};
pub use packet::{Packet, PacketPool};

/// Packet counters of one queue, since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Frames received and handed to the caller.
    pub rx_packets: u64,
    /// Their bytes (Ethernet header and payload, no FCS).
    pub rx_bytes: u64,
    /// Frames the device could not deliver because no receive buffer was posted, as far
    /// as the device reports it, plus frames dropped by the driver (bad length).
    pub rx_drops: u64,
    /// Frames handed to the device for transmission.
    pub tx_packets: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames the caller offered that did not fit the ring (left with the caller).
    pub tx_busy: u64,
    /// Device errors seen on this queue (bad descriptors, error bits).
    pub errors: u64,
}

/// Link state and speed as the device reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkStatus {
    /// Whether the link is up.
    pub up: bool,
    /// Speed in Mbit/s, if the device says.
    pub speed_mbps: Option<u32>,
    /// Full duplex, if the device says.
    pub full_duplex: Option<bool>,
}

/// One queue pair (receive and transmit) of a NIC, for one thread.
pub trait NetQueue: Send {
    /// Moves up to `max` received frames into `out` (appended); returns how many. Never
    /// blocks. Receive buffers are re-posted to the device from the pool as they are
    /// taken.
    fn receive(&mut self, out: &mut Vec<Packet>, max: usize) -> Result<usize>;

    /// Hands packets from the front of `packets` to the device and removes them from the
    /// Vec; returns how many went. Packets that did not fit the ring stay in `packets`
    /// (retry later, or [`NetQueue::free`] them). Buffers of frames the device has sent are
    /// taken back into the pool.
    fn transmit(&mut self, packets: &mut Vec<Packet>) -> Result<usize>;

    /// A free buffer from the pool to build a frame in (`None`: all are in use).
    fn alloc(&mut self) -> Option<Packet>;

    /// Returns a packet's buffer to the pool.
    fn free(&mut self, packet: Packet);

    /// The frame's bytes.
    fn data(&self, packet: &Packet) -> &[u8];

    /// The whole buffer, to write a frame into; set its length with [`Packet::set_len`].
    fn data_mut(&mut self, packet: &mut Packet) -> &mut [u8];

    /// Counters since the queue was created.
    fn stats(&self) -> QueueStats;

    /// Waits up to `timeout` for a received frame (or a transmit completion) on the
    /// queue's interrupt, if it has one; without interrupts, returns at once. For callers
    /// that do not want to spin when idle.
    fn wait(&mut self, timeout: std::time::Duration) -> Result<()>;
}

/// A NIC driven by a ring3 driver.
pub trait NetDevice: Send {
    /// The queue type.
    type Queue: NetQueue;

    /// The MAC address (from the device, or as configured).
    fn mac(&self) -> [u8; 6];

    /// The link's state now.
    fn link(&self) -> Result<LinkStatus>;

    /// How many queue pairs are set up.
    fn queue_count(&self) -> usize;

    /// Takes queue pair `index` for a thread to own (each index once).
    fn take_queue(&mut self, index: usize) -> Result<Self::Queue>;

    /// The largest frame (Ethernet header and payload, no FCS) the device sends.
    fn max_frame(&self) -> usize;
}
