//! The 82574 register map (Intel 82574 GbE Controller Family datasheet, section 10.2,
//! "Device Registers"), as far as this driver uses it, in BAR0 (memory, 128 KiB).
//!
//! The registers are grouped in blocks by where they sit: [`GeneralRegisters`] (control,
//! status, NVM access, interrupts, receive and transmit control), [`ReceiveRing`] at
//! 0x2800, [`TransmitRing`] at 0x3800, [`Statistics`] at 0x4000 and [`ReceiveFilter`]
//! at 0x5000. Offsets are checked against the datasheet by `const` assertions.

use std::mem::{offset_of, size_of};

use ring3::mmio::{ReadOnly, ReadWrite, RegisterBlock, WriteOnly};

/// PCI vendor ID of Intel.
pub const VENDOR_INTEL: u16 = 0x8086;
/// PCI device ID of the 82574L.
pub const DEVICE_82574L: u16 = 0x10d3;
/// The BAR holding the registers.
pub const REGISTER_BAR: u8 = 0;
/// The smallest BAR0 holding every register this driver touches.
pub const MIN_BAR0_SIZE: usize = 0x5408;

/// Where [`ReceiveRing`] starts (queue 0).
pub const RECEIVE_RING: usize = 0x2800;
/// Where [`TransmitRing`] starts (queue 0).
pub const TRANSMIT_RING: usize = 0x3800;
/// Where [`Statistics`] starts.
pub const STATISTICS: usize = 0x4000;
/// Where [`ReceiveFilter`] starts.
pub const RECEIVE_FILTER: usize = 0x5000;

/// Control, status, NVM, interrupt and RX/TX control registers (10.2.2, 10.2.4, 10.2.5,
/// 10.2.6).
#[repr(C)]
#[derive(bytemuck::Zeroable)]
pub struct GeneralRegisters {
    /// 0x0000 CTRL: device control ([`Ctrl`]).
    pub ctrl: ReadWrite<u32>,
    _reserved_0004: u32,
    /// 0x0008 STATUS: device status ([`Status`]).
    pub status: ReadOnly<u32>,
    _reserved_000c: u32,
    /// 0x0010 EEC: EEPROM/flash control.
    pub eec: ReadWrite<u32>,
    /// 0x0014 EERD: EEPROM read ([`Eerd`]).
    pub eerd: ReadWrite<u32>,
    /// 0x0018 CTRL_EXT: extended device control ([`CtrlExt`]).
    pub ctrl_ext: ReadWrite<u32>,
    _reserved_001c: [u32; (0xc0 - 0x1c) / 4],
    /// 0x00c0 ICR: interrupt cause read ([`Interrupts`]); reading may clear it, writing
    /// 1s clears those causes.
    pub icr: ReadWrite<u32>,
    /// 0x00c4 ITR: interrupt throttling.
    pub itr: ReadWrite<u32>,
    /// 0x00c8 ICS: interrupt cause set.
    pub ics: WriteOnly<u32>,
    _reserved_00cc: u32,
    /// 0x00d0 IMS: interrupt mask set (writing 1s enables causes; reads the mask).
    pub ims: ReadWrite<u32>,
    _reserved_00d4: u32,
    /// 0x00d8 IMC: interrupt mask clear (writing 1s disables causes).
    pub imc: WriteOnly<u32>,
    /// 0x00dc EIAC: causes cleared automatically when their MSI-X message is sent.
    pub eiac: ReadWrite<u32>,
    /// 0x00e0 IAM: interrupt acknowledge auto-mask.
    pub iam: ReadWrite<u32>,
    /// 0x00e4 IVAR: which MSI-X vector each cause uses ([`ivar`]).
    pub ivar: ReadWrite<u32>,
    _reserved_00e8: [u32; (0x100 - 0xe8) / 4],
    /// 0x0100 RCTL: receive control ([`Rctl`]).
    pub rctl: ReadWrite<u32>,
    _reserved_0104: [u32; (0x400 - 0x104) / 4],
    /// 0x0400 TCTL: transmit control ([`Tctl`]).
    pub tctl: ReadWrite<u32>,
    _reserved_0404: [u32; 3],
    /// 0x0410 TIPG: transmit inter-packet gap.
    pub tipg: ReadWrite<u32>,
}

// SAFETY: repr(C), made only of register fields and integer padding.
unsafe impl RegisterBlock for GeneralRegisters {}

const _: () = assert!(offset_of!(GeneralRegisters, ctrl) == 0x0000);
const _: () = assert!(offset_of!(GeneralRegisters, status) == 0x0008);
const _: () = assert!(offset_of!(GeneralRegisters, eec) == 0x0010);
const _: () = assert!(offset_of!(GeneralRegisters, eerd) == 0x0014);
const _: () = assert!(offset_of!(GeneralRegisters, ctrl_ext) == 0x0018);
const _: () = assert!(offset_of!(GeneralRegisters, icr) == 0x00c0);
const _: () = assert!(offset_of!(GeneralRegisters, itr) == 0x00c4);
const _: () = assert!(offset_of!(GeneralRegisters, ics) == 0x00c8);
const _: () = assert!(offset_of!(GeneralRegisters, ims) == 0x00d0);
const _: () = assert!(offset_of!(GeneralRegisters, imc) == 0x00d8);
const _: () = assert!(offset_of!(GeneralRegisters, eiac) == 0x00dc);
const _: () = assert!(offset_of!(GeneralRegisters, iam) == 0x00e0);
const _: () = assert!(offset_of!(GeneralRegisters, ivar) == 0x00e4);
const _: () = assert!(offset_of!(GeneralRegisters, rctl) == 0x0100);
const _: () = assert!(offset_of!(GeneralRegisters, tctl) == 0x0400);
const _: () = assert!(offset_of!(GeneralRegisters, tipg) == 0x0410);
const _: () = assert!(size_of::<GeneralRegisters>() == 0x0414);

/// Receive queue 0's ring registers (10.2.5), at [`RECEIVE_RING`].
#[repr(C)]
#[derive(bytemuck::Zeroable)]
pub struct ReceiveRing {
    /// +0x00 RDBAL: ring base address, low 32 bits (16-byte aligned).
    pub rdbal: ReadWrite<u32>,
    /// +0x04 RDBAH: ring base address, high 32 bits.
    pub rdbah: ReadWrite<u32>,
    /// +0x08 RDLEN: ring length in bytes (a multiple of 128).
    pub rdlen: ReadWrite<u32>,
    _reserved_0c: u32,
    /// +0x10 RDH: head, the next descriptor the device fills.
    pub rdh: ReadWrite<u32>,
    _reserved_14: u32,
    /// +0x18 RDT: tail, one past the last descriptor software has posted.
    pub rdt: ReadWrite<u32>,
    _reserved_1c: u32,
    /// +0x20 RDTR: receive interrupt delay timer.
    pub rdtr: ReadWrite<u32>,
    _reserved_24: u32,
    /// +0x28 RXDCTL: descriptor prefetch and write-back thresholds.
    pub rxdctl: ReadWrite<u32>,
    /// +0x2c RADV: receive interrupt absolute delay.
    pub radv: ReadWrite<u32>,
}

// SAFETY: repr(C), made only of register fields and integer padding.
unsafe impl RegisterBlock for ReceiveRing {}

const _: () = assert!(RECEIVE_RING + offset_of!(ReceiveRing, rdbal) == 0x2800);
const _: () = assert!(RECEIVE_RING + offset_of!(ReceiveRing, rdbah) == 0x2804);
const _: () = assert!(RECEIVE_RING + offset_of!(ReceiveRing, rdlen) == 0x2808);
const _: () = assert!(RECEIVE_RING + offset_of!(ReceiveRing, rdh) == 0x2810);
const _: () = assert!(RECEIVE_RING + offset_of!(ReceiveRing, rdt) == 0x2818);
const _: () = assert!(RECEIVE_RING + offset_of!(ReceiveRing, rdtr) == 0x2820);
const _: () = assert!(RECEIVE_RING + offset_of!(ReceiveRing, rxdctl) == 0x2828);
const _: () = assert!(RECEIVE_RING + offset_of!(ReceiveRing, radv) == 0x282c);
const _: () = assert!(size_of::<ReceiveRing>() == 0x30);

/// Transmit queue 0's ring registers (10.2.6), at [`TRANSMIT_RING`].
#[repr(C)]
#[derive(bytemuck::Zeroable)]
pub struct TransmitRing {
    /// +0x00 TDBAL: ring base address, low 32 bits (16-byte aligned).
    pub tdbal: ReadWrite<u32>,
    /// +0x04 TDBAH: ring base address, high 32 bits.
    pub tdbah: ReadWrite<u32>,
    /// +0x08 TDLEN: ring length in bytes (a multiple of 128).
    pub tdlen: ReadWrite<u32>,
    _reserved_0c: u32,
    /// +0x10 TDH: head, the next descriptor the device sends.
    pub tdh: ReadWrite<u32>,
    _reserved_14: u32,
    /// +0x18 TDT: tail, one past the last descriptor software has queued.
    pub tdt: ReadWrite<u32>,
    _reserved_1c: u32,
    /// +0x20 TIDV: transmit interrupt delay.
    pub tidv: ReadWrite<u32>,
    _reserved_24: u32,
    /// +0x28 TXDCTL: descriptor prefetch and write-back thresholds.
    pub txdctl: ReadWrite<u32>,
    /// +0x2c TADV: transmit absolute interrupt delay.
    pub tadv: ReadWrite<u32>,
}

// SAFETY: repr(C), made only of register fields and integer padding.
unsafe impl RegisterBlock for TransmitRing {}

const _: () = assert!(TRANSMIT_RING + offset_of!(TransmitRing, tdbal) == 0x3800);
const _: () = assert!(TRANSMIT_RING + offset_of!(TransmitRing, tdlen) == 0x3808);
const _: () = assert!(TRANSMIT_RING + offset_of!(TransmitRing, tdh) == 0x3810);
const _: () = assert!(TRANSMIT_RING + offset_of!(TransmitRing, tdt) == 0x3818);
const _: () = assert!(TRANSMIT_RING + offset_of!(TransmitRing, txdctl) == 0x3828);
const _: () = assert!(size_of::<TransmitRing>() == 0x30);

/// Statistics registers (10.2.8), at [`STATISTICS`]. All clear when read.
#[repr(C)]
#[derive(bytemuck::Zeroable)]
pub struct Statistics {
    /// +0x00 CRCERRS: frames received with a bad CRC.
    pub crcerrs: ReadOnly<u32>,
    /// +0x04 ALGNERRC: alignment errors.
    pub algnerrc: ReadOnly<u32>,
    /// +0x08 SYMERRS: symbol errors.
    pub symerrs: ReadOnly<u32>,
    /// +0x0c RXERRC: receive errors.
    pub rxerrc: ReadOnly<u32>,
    /// +0x10 MPC: missed packets (no room in the receive FIFO or ring).
    pub mpc: ReadOnly<u32>,
    _reserved_14: [u32; (0x74 - 0x14) / 4],
    /// +0x74 GPRC: good packets received.
    pub gprc: ReadOnly<u32>,
    _reserved_78: [u32; 2],
    /// +0x80 GPTC: good packets transmitted.
    pub gptc: ReadOnly<u32>,
    _reserved_84: [u32; (0xa0 - 0x84) / 4],
    /// +0xa0 RNBC: frames received while no descriptor was free.
    pub rnbc: ReadOnly<u32>,
}

// SAFETY: repr(C), made only of register fields and integer padding.
unsafe impl RegisterBlock for Statistics {}

const _: () = assert!(STATISTICS + offset_of!(Statistics, mpc) == 0x4010);
const _: () = assert!(STATISTICS + offset_of!(Statistics, gprc) == 0x4074);
const _: () = assert!(STATISTICS + offset_of!(Statistics, gptc) == 0x4080);
const _: () = assert!(STATISTICS + offset_of!(Statistics, rnbc) == 0x40a0);

/// Receive filtering: checksum and filter control, the multicast table and the first
/// receive address (10.2.5, 10.2.7), at [`RECEIVE_FILTER`].
#[repr(C)]
#[derive(bytemuck::Zeroable)]
pub struct ReceiveFilter {
    /// +0x000 RXCSUM: receive checksum offload control.
    pub rxcsum: ReadWrite<u32>,
    _reserved_004: u32,
    /// +0x008 RFCTL: receive filter control; EXTEN (bit 15) selects extended receive
    /// descriptors, which this driver leaves clear.
    pub rfctl: ReadWrite<u32>,
    _reserved_00c: [u32; (0x200 - 0x00c) / 4],
    /// +0x200 MTA\[0..128\]: the multicast table array.
    pub mta: [ReadWrite<u32>; MULTICAST_TABLE_ENTRIES],
    /// +0x400 RAL0: receive address 0, low 32 bits (bytes 0–3 of the MAC).
    pub ral0: ReadWrite<u32>,
    /// +0x404 RAH0: receive address 0, bytes 4–5 of the MAC, and AV (bit 31).
    pub rah0: ReadWrite<u32>,
}

// SAFETY: repr(C), made only of register fields and integer padding.
unsafe impl RegisterBlock for ReceiveFilter {}

/// Entries of the multicast table array.
pub const MULTICAST_TABLE_ENTRIES: usize = 128;

const _: () = assert!(RECEIVE_FILTER + offset_of!(ReceiveFilter, rxcsum) == 0x5000);
const _: () = assert!(RECEIVE_FILTER + offset_of!(ReceiveFilter, rfctl) == 0x5008);
const _: () = assert!(RECEIVE_FILTER + offset_of!(ReceiveFilter, mta) == 0x5200);
const _: () = assert!(RECEIVE_FILTER + offset_of!(ReceiveFilter, ral0) == 0x5400);
const _: () = assert!(RECEIVE_FILTER + offset_of!(ReceiveFilter, rah0) == 0x5404);
const _: () = assert!(RECEIVE_FILTER + size_of::<ReceiveFilter>() == MIN_BAR0_SIZE);

bitflags::bitflags! {
    /// CTRL bits (10.2.2.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Ctrl: u32 {
        /// Full duplex.
        const FD = 1 << 0;
        /// Stop issuing new master (DMA) requests.
        const GIO_MASTER_DISABLE = 1 << 2;
        /// Auto-speed detection.
        const ASDE = 1 << 5;
        /// Set link up.
        const SLU = 1 << 6;
        /// Force speed.
        const FRCSPD = 1 << 11;
        /// Force duplex.
        const FRCDPLX = 1 << 12;
        /// Global device reset; self-clearing.
        const RST = 1 << 26;
        /// Receive flow control enable.
        const RFCE = 1 << 27;
        /// Transmit flow control enable.
        const TFCE = 1 << 28;
        /// VLAN mode enable.
        const VME = 1 << 30;
        /// PHY reset.
        const PHY_RST = 1 << 31;
    }
}

bitflags::bitflags! {
    /// STATUS bits (10.2.2.2).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Status: u32 {
        /// Full duplex.
        const FD = 1 << 0;
        /// Link up.
        const LU = 1 << 1;
        /// Transmission paused.
        const TXOFF = 1 << 4;
        /// Speed, bit 0 (bits 7:6: 00 10, 01 100, 1x 1000 Mb/s).
        const SPEED_0 = 1 << 6;
        /// Speed, bit 1.
        const SPEED_1 = 1 << 7;
        /// Master requests are enabled (clears after CTRL.GIO_MASTER_DISABLE).
        const GIO_MASTER_ENABLE = 1 << 19;
    }
}

impl Status {
    /// The link speed in Mb/s the speed bits give.
    pub fn speed_mbps(self) -> u32 {
        match (
            self.contains(Status::SPEED_1),
            self.contains(Status::SPEED_0),
        ) {
            (false, false) => 10,
            (false, true) => 100,
            (true, _) => 1000,
        }
    }
}

bitflags::bitflags! {
    /// CTRL_EXT bits (10.2.2.5).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct CtrlExt: u32 {
        /// Extended interrupt auto-mask enable (IAM applies on MSI-X).
        const EIAME = 1 << 24;
        /// Interrupt acknowledge auto-mask enable.
        const IAME = 1 << 27;
        /// Driver loaded: tells firmware a driver owns the device.
        const DRV_LOAD = 1 << 28;
        /// MSI-X pending bits clear when their ICR causes are cleared.
        const PBA_CLR = 1 << 31;
    }
}

bitflags::bitflags! {
    /// Interrupt causes, as in ICR, ICS, IMS, IMC and EIAC (10.2.4.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Interrupts: u32 {
        /// A transmit descriptor was written back.
        const TXDW = 1 << 0;
        /// The transmit queue is empty.
        const TXQE = 1 << 1;
        /// Link status changed.
        const LSC = 1 << 2;
        /// Free receive descriptors fell below the threshold.
        const RXDMT0 = 1 << 4;
        /// Receiver overrun (a frame was dropped for lack of descriptors or FIFO).
        const RXO = 1 << 6;
        /// Receive timer: a frame was written back.
        const RXT0 = 1 << 7;
        /// Receive queue 0 (MSI-X).
        const RXQ0 = 1 << 20;
        /// Receive queue 1 (MSI-X).
        const RXQ1 = 1 << 21;
        /// Transmit queue 0 (MSI-X).
        const TXQ0 = 1 << 22;
        /// Transmit queue 1 (MSI-X).
        const TXQ1 = 1 << 23;
        /// Any other cause (MSI-X).
        const OTHER = 1 << 24;
    }
}

bitflags::bitflags! {
    /// RCTL bits (10.2.5.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Rctl: u32 {
        /// Receiver enable.
        const EN = 1 << 1;
        /// Store bad packets.
        const SBP = 1 << 2;
        /// Unicast promiscuous.
        const UPE = 1 << 3;
        /// Multicast promiscuous.
        const MPE = 1 << 4;
        /// Long packets (jumbo frames) enable.
        const LPE = 1 << 5;
        /// Descriptor type, bit 0 (00: legacy/extended, 01: packet split).
        const DTYP_0 = 1 << 10;
        /// Broadcast accept mode.
        const BAM = 1 << 15;
        /// Buffer size, bit 0 (with BSEX clear: 00 2048, 01 1024, 10 512, 11 256 bytes).
        const BSIZE_0 = 1 << 16;
        /// Buffer size, bit 1.
        const BSIZE_1 = 1 << 17;
        /// VLAN filter enable.
        const VFE = 1 << 18;
        /// Buffer size extension (multiplies BSIZE by 16).
        const BSEX = 1 << 25;
        /// Strip the Ethernet CRC before writing the frame to memory.
        const SECRC = 1 << 26;
    }
}

bitflags::bitflags! {
    /// TCTL bits (10.2.6.1); CT and COLD are fields set with [`Tctl::with_collision`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Tctl: u32 {
        /// Transmitter enable.
        const EN = 1 << 1;
        /// Pad short packets to 64 bytes.
        const PSP = 1 << 3;
        /// Re-transmit on late collision.
        const RTLC = 1 << 24;
        /// Multiple request support.
        const MULR = 1 << 28;
        // The CT (11:4) and COLD (21:12) fields.
        const _ = !0;
    }
}

impl Tctl {
    /// Sets the collision threshold (CT, bits 11:4) and collision distance (COLD, bits
    /// 21:12).
    pub fn with_collision(self, threshold: u32, distance: u32) -> Tctl {
        let fields = ((threshold & 0xff) << 4) | ((distance & 0x3ff) << 12);
        Tctl::from_bits_retain((self.bits() & !0x003f_fff0) | fields)
    }
}

/// The collision threshold the datasheet recommends (TCTL.CT, 4.6.6).
pub const TCTL_CT: u32 = 0x0f;
/// The collision distance for full duplex (TCTL.COLD, 4.6.6).
pub const TCTL_COLD_FULL_DUPLEX: u32 = 0x3f;
/// TIPG for copper links: IPGT 8, IPGR1 8, IPGR2 6 (10.2.6.2).
pub const TIPG_COPPER: u32 = 8 | (8 << 10) | (6 << 20);

/// EERD fields (10.2.2.6): start a read of a 16-bit NVM word, wait for DONE, take DATA.
pub mod eerd {
    /// Start the read.
    pub const START: u32 = 1 << 0;
    /// The read is done.
    pub const DONE: u32 = 1 << 1;
    /// Where the word address goes.
    pub const ADDR_SHIFT: u32 = 2;
    /// Where the data comes back.
    pub const DATA_SHIFT: u32 = 16;
}

/// RAH0's address-valid bit.
pub const RAH_AV: u32 = 1 << 31;

/// IVAR (10.2.4.9): for each cause a 3-bit MSI-X vector and a valid bit.
pub mod ivar {
    /// Valid bit of an entry (bit 3 of its 4-bit field).
    pub const VALID: u32 = 1 << 3;
    /// Shift of the receive queue 0 entry.
    pub const RXQ0_SHIFT: u32 = 0;
    /// Shift of the receive queue 1 entry.
    pub const RXQ1_SHIFT: u32 = 4;
    /// Shift of the transmit queue 0 entry.
    pub const TXQ0_SHIFT: u32 = 8;
    /// Shift of the transmit queue 1 entry.
    pub const TXQ1_SHIFT: u32 = 12;
    /// Shift of the "other causes" entry.
    pub const OTHER_SHIFT: u32 = 16;
    /// Interrupt on every transmit descriptor write-back (bit 31).
    pub const INT_ON_ALL_WB: u32 = 1 << 31;

    /// The entry at `shift` mapping its cause to `vector` (0–4).
    pub fn entry(shift: u32, vector: u32) -> u32 {
        ((vector & 0x7) | VALID) << shift
    }

    /// The vector of the entry at `shift`, if it is valid.
    pub fn vector(ivar: u32, shift: u32) -> Option<u32> {
        let field = (ivar >> shift) & 0xf;
        (field & VALID != 0).then_some(field & 0x7)
    }
}

/// MSI-X vectors the 82574 has (7.4.3).
pub const MSIX_VECTORS: u32 = 5;
