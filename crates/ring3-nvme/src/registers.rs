//! The NVMe controller registers (NVM Express Base Specification 2.0, section 3.1.4,
//! "Controller Properties"), as they appear at the start of BAR0 of a PCIe controller.
//!
//! The block at 0x00..0x38 is described by [`ControllerRegisters`]; the fields of CAP, CC
//! and CSTS are decoded by [`Capabilities`], [`Configuration`] and [`Status`]. The doorbells
//! follow at 0x1000, spaced by the stride CAP.DSTRD gives ([`doorbell_offset`]).

use std::mem::offset_of;
use std::time::Duration;

use ring3::mmio::{ReadOnly, ReadWrite, RegisterBlock, WriteOnly};

use crate::error::{Error, Result};

/// PCI class code of an NVM Express I/O controller: mass storage (0x01), non-volatile
/// memory (0x08), NVM Express I/O controller interface (0x02) (NVMe over PCIe 1.0, 3.8.1.6).
pub const CLASS_CODE: u32 = 0x01_08_02;

/// Where the doorbells begin in BAR0 (3.1.4, "Offset 1000h").
pub const DOORBELL_BASE: usize = 0x1000;

/// The smallest BAR0 that holds the registers and the admin queue's two doorbells.
pub const MIN_BAR0_SIZE: usize = DOORBELL_BASE + 8;

/// The controller register block (3.1.4, figure "Offset Map for Controller Properties").
#[repr(C)]
#[derive(bytemuck::Zeroable)]
pub struct ControllerRegisters {
    /// 0x00 CAP: controller capabilities ([`Capabilities`]).
    pub cap: ReadOnly<u64>,
    /// 0x08 VS: version ([`Version`]).
    pub vs: ReadOnly<u32>,
    /// 0x0c INTMS: interrupt mask set (writing 1s masks those vectors; INTx and MSI only).
    pub intms: WriteOnly<u32>,
    /// 0x10 INTMC: interrupt mask clear (writing 1s unmasks those vectors).
    pub intmc: WriteOnly<u32>,
    /// 0x14 CC: controller configuration ([`Configuration`]).
    pub cc: ReadWrite<u32>,
    _reserved_18: [u32; 1],
    /// 0x1c CSTS: controller status ([`Status`]).
    pub csts: ReadOnly<u32>,
    /// 0x20 NSSR: NVM subsystem reset; writing [`NSSR_RESET`] resets the subsystem.
    pub nssr: ReadWrite<u32>,
    /// 0x24 AQA: admin queue attributes, zero-based sizes of the admin SQ (bits 11:0) and
    /// CQ (bits 27:16).
    pub aqa: ReadWrite<u32>,
    /// 0x28 ASQ: admin submission queue base address (page-aligned IOVA).
    pub asq: ReadWrite<u64>,
    /// 0x30 ACQ: admin completion queue base address (page-aligned IOVA).
    pub acq: ReadWrite<u64>,
}

// SAFETY: ControllerRegisters is repr(C) and made only of register fields and an integer
// padding array.
unsafe impl RegisterBlock for ControllerRegisters {}

const _: () = assert!(offset_of!(ControllerRegisters, cap) == 0x00);
const _: () = assert!(offset_of!(ControllerRegisters, vs) == 0x08);
const _: () = assert!(offset_of!(ControllerRegisters, intms) == 0x0c);
const _: () = assert!(offset_of!(ControllerRegisters, intmc) == 0x10);
const _: () = assert!(offset_of!(ControllerRegisters, cc) == 0x14);
const _: () = assert!(offset_of!(ControllerRegisters, csts) == 0x1c);
const _: () = assert!(offset_of!(ControllerRegisters, nssr) == 0x20);
const _: () = assert!(offset_of!(ControllerRegisters, aqa) == 0x24);
const _: () = assert!(offset_of!(ControllerRegisters, asq) == 0x28);
const _: () = assert!(offset_of!(ControllerRegisters, acq) == 0x30);
const _: () = assert!(std::mem::size_of::<ControllerRegisters>() == 0x38);

/// The value that starts an NVM subsystem reset ("NVMe" in ASCII, 3.1.4.8).
pub const NSSR_RESET: u32 = 0x4E56_4D65;

/// The largest admin queue AQA can describe (12-bit zero-based sizes, 3.1.4.9).
pub const MAX_ADMIN_QUEUE_ENTRIES: u16 = 4096;

/// AQA for admin queues of `sq_entries` and `cq_entries` (each 2..=4096).
pub fn admin_queue_attributes(sq_entries: u16, cq_entries: u16) -> u32 {
    let zero_based = |n: u16| u32::from(n.saturating_sub(1)) & 0xfff;
    zero_based(sq_entries) | (zero_based(cq_entries) << 16)
}

/// CAP, controller capabilities (3.1.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// MQES + 1: the most entries an I/O queue may have (MQES is zero-based; at least 2).
    pub fn max_queue_entries(self) -> u32 {
        (self.0 & 0xffff) as u32 + 1
    }

    /// CQR: queues must be physically contiguous.
    pub fn contiguous_queues_required(self) -> bool {
        self.0 & (1 << 16) != 0
    }

    /// AMS: which arbitration mechanisms beyond round robin the controller offers.
    pub fn arbitration_mechanisms(self) -> u8 {
        ((self.0 >> 17) & 0x3) as u8
    }

    /// TO in its raw unit of 500 ms: the worst case for CSTS.RDY to follow CC.EN.
    pub fn timeout_units(self) -> u8 {
        ((self.0 >> 24) & 0xff) as u8
    }

    /// TO as a duration (TO × 500 ms).
    pub fn ready_timeout(self) -> Duration {
        Duration::from_millis(500 * u64::from(self.timeout_units()))
    }

    /// DSTRD: doorbells are `4 << DSTRD` bytes apart.
    pub fn doorbell_stride_shift(self) -> u8 {
        ((self.0 >> 32) & 0xf) as u8
    }

    /// NSSRS: the controller supports NVM subsystem reset.
    pub fn subsystem_reset_supported(self) -> bool {
        self.0 & (1 << 36) != 0
    }

    /// CSS: the command sets supported, bit 0 NVM, bit 6 I/O command sets, bit 7 admin only.
    pub fn command_sets(self) -> u8 {
        ((self.0 >> 37) & 0xff) as u8
    }

    /// CSS bit 0: the NVM command set.
    pub fn supports_nvm_command_set(self) -> bool {
        self.command_sets() & 1 != 0
    }

    /// MPSMIN: smallest memory page size as a shift (12 + MPSMIN, so 12 is 4 KiB).
    pub fn min_page_shift(self) -> u8 {
        12 + ((self.0 >> 48) & 0xf) as u8
    }

    /// MPSMAX: largest memory page size as a shift.
    pub fn max_page_shift(self) -> u8 {
        12 + ((self.0 >> 52) & 0xf) as u8
    }
}

/// VS, the version of the specification the controller implements (3.1.4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Major version (bits 31:16).
    pub major: u16,
    /// Minor version (bits 15:8).
    pub minor: u8,
    /// Tertiary version (bits 7:0).
    pub tertiary: u8,
}

impl Version {
    /// Decodes VS.
    pub fn from_register(value: u32) -> Self {
        Version {
            major: (value >> 16) as u16,
            minor: (value >> 8) as u8,
            tertiary: value as u8,
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.tertiary)
    }
}

/// CC.SHN, a shutdown request (3.1.4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownNotification {
    /// No notification.
    None = 0,
    /// Normal shutdown.
    Normal = 1,
    /// Abrupt shutdown.
    Abrupt = 2,
}

/// CC, controller configuration (3.1.4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Configuration(pub u32);

impl Configuration {
    const EN: u32 = 1 << 0;
    const CSS_SHIFT: u32 = 4;
    const MPS_SHIFT: u32 = 7;
    const AMS_SHIFT: u32 = 11;
    const SHN_SHIFT: u32 = 14;
    const IOSQES_SHIFT: u32 = 16;
    const IOCQES_SHIFT: u32 = 20;

    /// CSS value selecting the NVM command set.
    pub const CSS_NVM: u8 = 0;

    /// CC for a controller about to be enabled: command set `css` (3 bits), memory page
    /// size `1 << page_shift` (12..=27), round-robin arbitration, I/O submission and
    /// completion entries of `1 << sq_entry_shift` and `1 << cq_entry_shift` bytes. EN is clear.
    pub fn new(css: u8, page_shift: u8, sq_entry_shift: u8, cq_entry_shift: u8) -> Self {
        let mps = u32::from(page_shift.saturating_sub(12)) & 0xf;
        Configuration(
            (u32::from(css & 0x7) << Self::CSS_SHIFT)
                | (mps << Self::MPS_SHIFT)
                | (u32::from(sq_entry_shift & 0xf) << Self::IOSQES_SHIFT)
                | (u32::from(cq_entry_shift & 0xf) << Self::IOCQES_SHIFT),
        )
    }

    /// EN: the controller is enabled (processes commands once CSTS.RDY follows).
    pub fn enabled(self) -> bool {
        self.0 & Self::EN != 0
    }

    /// This configuration with EN set or cleared.
    pub fn with_enabled(self, enable: bool) -> Self {
        if enable {
            Configuration(self.0 | Self::EN)
        } else {
            Configuration(self.0 & !Self::EN)
        }
    }

    /// CSS: the selected command set.
    pub fn command_set(self) -> u8 {
        ((self.0 >> Self::CSS_SHIFT) & 0x7) as u8
    }

    /// MPS as a shift: the memory page size is `1 << page_shift()`.
    pub fn page_shift(self) -> u8 {
        12 + ((self.0 >> Self::MPS_SHIFT) & 0xf) as u8
    }

    /// AMS: the selected arbitration mechanism (0 is round robin).
    pub fn arbitration(self) -> u8 {
        ((self.0 >> Self::AMS_SHIFT) & 0x7) as u8
    }

    /// SHN as its raw two bits.
    pub fn shutdown_bits(self) -> u8 {
        ((self.0 >> Self::SHN_SHIFT) & 0x3) as u8
    }

    /// This configuration with SHN set to `notification`.
    pub fn with_shutdown(self, notification: ShutdownNotification) -> Self {
        let cleared = self.0 & !(0x3 << Self::SHN_SHIFT);
        Configuration(cleared | ((notification as u32) << Self::SHN_SHIFT))
    }

    /// IOSQES: I/O submission entries are `1 << io_sq_entry_shift()` bytes.
    pub fn io_sq_entry_shift(self) -> u8 {
        ((self.0 >> Self::IOSQES_SHIFT) & 0xf) as u8
    }

    /// IOCQES: I/O completion entries are `1 << io_cq_entry_shift()` bytes.
    pub fn io_cq_entry_shift(self) -> u8 {
        ((self.0 >> Self::IOCQES_SHIFT) & 0xf) as u8
    }
}

bitflags::bitflags! {
    /// CSTS, controller status (3.1.4.6). SHST is two bits: see [`Status::shutdown_status`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Status: u32 {
        /// RDY: the controller is ready to process commands.
        const RDY = 1 << 0;
        /// CFS: controller fatal status; only a reset brings the controller back.
        const CFS = 1 << 1;
        /// NSSRO: an NVM subsystem reset occurred.
        const NSSRO = 1 << 4;
        /// PP: processing paused.
        const PP = 1 << 5;
        const _ = !0;
    }
}

/// CSTS.SHST, how far a shutdown has come (3.1.4.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownStatus {
    /// Normal operation, no shutdown requested.
    Normal,
    /// Shutdown processing is under way.
    Occurring,
    /// Shutdown processing is complete.
    Complete,
    /// The reserved value 11b.
    Reserved,
}

impl Status {
    /// SHST.
    pub fn shutdown_status(self) -> ShutdownStatus {
        match (self.bits() >> 2) & 0x3 {
            0 => ShutdownStatus::Normal,
            1 => ShutdownStatus::Occurring,
            2 => ShutdownStatus::Complete,
            _ => ShutdownStatus::Reserved,
        }
    }
}

/// Offset in BAR0 of a doorbell (3.1.4, "Offset (1000h + ((2y) * (4 << CAP.DSTRD)))" for
/// submission queue y's tail and "(2y + 1)" for completion queue y's head), checked against
/// the BAR's length.
pub fn doorbell_offset(
    queue_id: u16,
    completion: bool,
    stride_shift: u8,
    bar_len: usize,
) -> Result<usize> {
    let index = 2 * u64::from(queue_id) + u64::from(completion);
    let offset = 4u64
        .checked_shl(u32::from(stride_shift))
        .and_then(|stride| index.checked_mul(stride))
        .and_then(|distance| distance.checked_add(DOORBELL_BASE as u64))
        .and_then(|offset| usize::try_from(offset).ok());
    match offset {
        Some(offset) if offset.checked_add(4).is_some_and(|end| end <= bar_len) => Ok(offset),
        _ => Err(Error::DoorbellOutOfRange {
            queue_id,
            completion,
            stride_shift,
            bar_len,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_decode_a_qemu_like_value() {
        // MQES 0x7ff, CQR, TO 15, DSTRD 0, NSSRS, CSS NVM + I/O sets, MPSMIN 0, MPSMAX 4.
        let cap = Capabilities(0x7ff | 1 << 16 | 0xf << 24 | 1 << 36 | 0x41 << 37 | 4 << 52);
        assert_eq!(cap.max_queue_entries(), 2048);
        assert!(cap.contiguous_queues_required());
        assert_eq!(cap.ready_timeout(), Duration::from_millis(7500));
        assert_eq!(cap.doorbell_stride_shift(), 0);
        assert!(cap.subsystem_reset_supported());
        assert!(cap.supports_nvm_command_set());
        assert_eq!((cap.min_page_shift(), cap.max_page_shift()), (12, 16));
    }

    #[test]
    fn configuration_fields_land_in_their_bits() {
        let cc = Configuration::new(Configuration::CSS_NVM, 12, 6, 4).with_enabled(true);
        assert_eq!(cc.0, 0x0046_0001);
        assert_eq!(cc.page_shift(), 12);
        assert_eq!((cc.io_sq_entry_shift(), cc.io_cq_entry_shift()), (6, 4));
        let cc = cc.with_shutdown(ShutdownNotification::Normal);
        assert_eq!(cc.shutdown_bits(), 1);
        assert!(!cc.with_enabled(false).enabled());
        assert_eq!(Configuration::new(0, 16, 6, 4).page_shift(), 16);
    }

    #[test]
    fn status_and_version_decode() {
        let csts = Status::from_bits_retain(0b1001);
        assert!(csts.contains(Status::RDY));
        assert_eq!(csts.shutdown_status(), ShutdownStatus::Complete);
        assert_eq!(Version::from_register(0x0002_0100).to_string(), "2.1.0");
        assert_eq!(admin_queue_attributes(32, 64), 0x003f_001f);
    }

    #[test]
    fn doorbells_follow_the_stride_and_stay_in_the_bar() {
        assert_eq!(doorbell_offset(0, false, 0, 0x4000).unwrap(), 0x1000);
        assert_eq!(doorbell_offset(0, true, 0, 0x4000).unwrap(), 0x1004);
        assert_eq!(doorbell_offset(3, true, 0, 0x4000).unwrap(), 0x101c);
        assert_eq!(doorbell_offset(1, false, 2, 0x4000).unwrap(), 0x1020);
        assert!(doorbell_offset(0, true, 0, 0x1007).is_err());
        assert!(doorbell_offset(0, true, 0, 0x1008).is_ok());
        assert!(doorbell_offset(u16::MAX, true, 15, 0x4000).is_err());
        assert!(doorbell_offset(u16::MAX, true, 15, usize::MAX).is_ok());
    }
}
