//! The FT232's vendor requests and the framing of its bulk IN data, as pure functions.
//!
//! FTDI's chips (FT232AM/BM/R and the single-port parts that share their interface) are
//! configured with vendor control requests to the device ("SIO" requests in FTDI's
//! application notes AN232B-04 and AN232B-05); data moves on one bulk IN and one bulk
//! OUT endpoint. Every maximum-packet-sized piece of a bulk IN transfer starts with two
//! status bytes: modem status, then line status. Nothing here touches a device, so all
//! of it is unit- and property-tested.

use bitflags::bitflags;

use crate::FtdiError;

/// `SIO_RESET`: reset the chip, or purge one of its buffers (`wValue`, see [`ResetKind`]).
pub const SIO_RESET: u8 = 0;
/// `SIO_MODEM_CTRL`: set DTR and RTS. `wValue` bit 0 = DTR, bit 1 = RTS; bits 8 and 9
/// say which of the two the request changes.
pub const SIO_MODEM_CTRL: u8 = 1;
/// `SIO_SET_FLOW_CTRL`: the handshake mode in the high byte of `wIndex`; for XON/XOFF,
/// `wValue` holds the XON character (low byte) and the XOFF character (high byte).
pub const SIO_SET_FLOW_CTRL: u8 = 2;
/// `SIO_SET_BAUD_RATE`: the encoded divisor, 16 bits in `wValue` and its top bit in
/// bit 0 of `wIndex` (see [`BaudDivisor`]).
pub const SIO_SET_BAUD_RATE: u8 = 3;
/// `SIO_SET_DATA`: data bits, parity, stop bits and break (see [`LineSettings::data_value`]).
pub const SIO_SET_DATA: u8 = 4;
/// `SIO_GET_MODEM_STATUS`: two bytes, modem status then line status.
pub const SIO_GET_MODEM_STATUS: u8 = 5;
/// `SIO_SET_LATENCY_TIMER`: how long (1–255 ms) the chip holds a partly filled IN packet.
pub const SIO_SET_LATENCY_TIMER: u8 = 9;
/// `SIO_GET_LATENCY_TIMER`: one byte, the latency timer in ms.
pub const SIO_GET_LATENCY_TIMER: u8 = 10;

/// `wValue` of [`SIO_RESET`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ResetKind {
    /// Reset the serial engine (and purge both buffers).
    Sio = 0,
    /// Purge the receive buffer (data from the line not yet sent to the host).
    PurgeRx = 1,
    /// Purge the transmit buffer (data from the host not yet sent on the line).
    PurgeTx = 2,
}

/// The chip's baud rate generator runs at 3 MHz (48 MHz / 16); its divisor has 14
/// integer bits and a fraction in eighths.
const BASE_CLOCK_EIGHTHS: u64 = 3_000_000 * 8;
/// The largest divisor in eighths: 0x3fff + 7/8.
const MAX_DIVISOR_EIGHTHS: u64 = (0x3fff << 3) | 7;
/// How far a rate may be from the requested one (3 %, what a UART receiver tolerates
/// with margin for the other end's own error).
const MAX_BAUD_ERROR_PER_MILLE: u64 = 30;
/// The 3-bit code the chip expects for each fraction of eighths 0/8 .. 7/8. The codes
/// are not in order: code 1 is 1/2, code 2 is 1/4, code 3 is 1/8, codes 4–7 are
/// 3/8, 5/8, 6/8, 7/8 (AN232B-05, "sub-integer divisors").
const FRACTION_CODE: [u16; 8] = [0, 3, 2, 4, 1, 5, 6, 7];

/// An encoded baud rate divisor for [`SIO_SET_BAUD_RATE`], with the rate it really gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaudDivisor {
    /// `wValue`: the integer part in bits 0–13, the low two bits of the fraction code in
    /// bits 14–15.
    pub value: u16,
    /// `wIndex`: the third bit of the fraction code in bit 0.
    pub index: u16,
    /// The rate the chip produces with this divisor, rounded to whole baud.
    pub actual: u32,
}

impl BaudDivisor {
    /// The divisor closest to `requested`, if its rate is within 3 % of it; otherwise
    /// [`FtdiError::UnsupportedBaud`] naming the closest rate the chip can make.
    ///
    /// Two divisors are special: integer 0 means 3 000 000 baud and integer 1 means
    /// 2 000 000 baud; divisors between 1 and 2 do not exist, so the eighths run 8, 12,
    /// then 16 upwards.
    pub fn for_rate(requested: u32) -> Result<BaudDivisor, FtdiError> {
        if requested == 0 {
            return Err(FtdiError::UnsupportedBaud {
                requested,
                closest: 183,
            });
        }
        let requested_rate = u64::from(requested);
        let floor = BASE_CLOCK_EIGHTHS / requested_rate;
        let candidates = [
            8,
            12,
            floor.clamp(16, MAX_DIVISOR_EIGHTHS),
            (floor + 1).clamp(16, MAX_DIVISOR_EIGHTHS),
        ];
        // Compare errors exactly: |base/d - r| = |base - r*d| / d; cross-multiply.
        let error_numerator = |eighths: u64| BASE_CLOCK_EIGHTHS.abs_diff(requested_rate * eighths);
        let mut best = candidates[0];
        for &eighths in &candidates[1..] {
            if u128::from(error_numerator(eighths)) * u128::from(best)
                < u128::from(error_numerator(best)) * u128::from(eighths)
            {
                best = eighths;
            }
        }
        let actual = u32::try_from((BASE_CLOCK_EIGHTHS + best / 2) / best).unwrap_or(u32::MAX);
        // error / requested > 3 %  <=>  error_numerator * 1000 > 30 * requested * best
        if u128::from(error_numerator(best)) * 1000
            > u128::from(MAX_BAUD_ERROR_PER_MILLE) * u128::from(requested_rate) * u128::from(best)
        {
            return Err(FtdiError::UnsupportedBaud {
                requested,
                closest: actual,
            });
        }
        Ok(Self::encode(best, actual))
    }

    fn encode(eighths: u64, actual: u32) -> BaudDivisor {
        match eighths {
            8 => BaudDivisor {
                value: 0,
                index: 0,
                actual,
            },
            12 => BaudDivisor {
                value: 1,
                index: 0,
                actual,
            },
            _ => {
                // `eighths` is at most MAX_DIVISOR_EIGHTHS, so the integer part fits 14 bits.
                let integer = ((eighths >> 3) & 0x3fff) as u16;
                let code = FRACTION_CODE[(eighths & 7) as usize];
                BaudDivisor {
                    value: integer | ((code & 3) << 14),
                    index: code >> 2,
                    actual,
                }
            }
        }
    }

    /// The rate a chip produces for a `wValue`/`wIndex` pair (the inverse of the
    /// encoding, as the chip interprets it).
    pub fn decode(value: u16, index: u16) -> u32 {
        // Fraction in eighths for each code (the inverse of FRACTION_CODE).
        const CODE_EIGHTHS: [u64; 8] = [0, 4, 2, 1, 3, 5, 6, 7];
        let code = usize::from((value >> 14) | ((index & 1) << 2));
        let integer = u64::from(value & 0x3fff);
        let eighths = match (integer, CODE_EIGHTHS[code]) {
            (0, 0) => 8,
            (1, 0) => 12,
            (integer, fraction) => (integer << 3) | fraction,
        };
        let eighths = eighths.max(1);
        u32::try_from((BASE_CLOCK_EIGHTHS + eighths / 2) / eighths).unwrap_or(u32::MAX)
    }
}

/// Data bits per character. The FT232 supports 7 and 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataBits {
    /// 7 data bits.
    Seven,
    /// 8 data bits.
    Eight,
}

/// Parity bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Parity {
    /// No parity bit.
    None,
    /// Odd parity.
    Odd,
    /// Even parity.
    Even,
    /// Parity bit always 1.
    Mark,
    /// Parity bit always 0.
    Space,
}

/// Stop bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopBits {
    /// One stop bit.
    One,
    /// One and a half stop bits.
    OneAndHalf,
    /// Two stop bits.
    Two,
}

/// Character framing and rate of the serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LineSettings {
    /// Baud rate (must be within 3 % of a rate the chip can make).
    pub baud: u32,
    /// Data bits per character.
    pub data_bits: DataBits,
    /// Parity.
    pub parity: Parity,
    /// Stop bits.
    pub stop_bits: StopBits,
}

impl Default for LineSettings {
    /// 9600 baud, 8 data bits, no parity, 1 stop bit: the chip's power-on setting.
    fn default() -> Self {
        LineSettings {
            baud: 9600,
            data_bits: DataBits::Eight,
            parity: Parity::None,
            stop_bits: StopBits::One,
        }
    }
}

impl LineSettings {
    /// `wValue` of [`SIO_SET_DATA`]: data bits in bits 0–7, parity in bits 8–10
    /// (0 none, 1 odd, 2 even, 3 mark, 4 space), stop bits in bits 11–12 (0 one,
    /// 1 one and a half, 2 two), break in bit 14.
    pub fn data_value(&self, send_break: bool) -> u16 {
        let bits: u16 = match self.data_bits {
            DataBits::Seven => 7,
            DataBits::Eight => 8,
        };
        let parity: u16 = match self.parity {
            Parity::None => 0,
            Parity::Odd => 1,
            Parity::Even => 2,
            Parity::Mark => 3,
            Parity::Space => 4,
        };
        let stop: u16 = match self.stop_bits {
            StopBits::One => 0,
            StopBits::OneAndHalf => 1,
            StopBits::Two => 2,
        };
        bits | (parity << 8) | (stop << 11) | (u16::from(send_break) << 14)
    }
}

/// Handshaking the chip performs by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FlowControl {
    /// No handshake.
    #[default]
    None,
    /// RTS/CTS: the chip stops sending while CTS is low and drops RTS when its receive
    /// buffer fills.
    RtsCts,
    /// DTR/DSR, likewise with those lines.
    DtrDsr,
    /// XON/XOFF with these two characters (normally 0x11 and 0x13).
    XonXoff {
        /// Character that resumes transmission.
        xon: u8,
        /// Character that pauses transmission.
        xoff: u8,
    },
}

impl FlowControl {
    /// `(wValue, handshake bits for the high byte of wIndex)` of [`SIO_SET_FLOW_CTRL`].
    pub fn request_fields(&self) -> (u16, u16) {
        match *self {
            FlowControl::None => (0, 0),
            FlowControl::RtsCts => (0, 0x01),
            FlowControl::DtrDsr => (0, 0x02),
            FlowControl::XonXoff { xon, xoff } => (u16::from(xon) | (u16::from(xoff) << 8), 0x04),
        }
    }
}

/// `wValue` of [`SIO_MODEM_CTRL`] setting both DTR and RTS.
pub fn modem_ctrl_value(dtr: bool, rts: bool) -> u16 {
    const DTR: u16 = 1 << 0;
    const RTS: u16 = 1 << 1;
    const DTR_MASK: u16 = DTR << 8;
    const RTS_MASK: u16 = RTS << 8;
    DTR_MASK | RTS_MASK | if dtr { DTR } else { 0 } | if rts { RTS } else { 0 }
}

bitflags! {
    /// The first status byte of every IN packet (and of [`SIO_GET_MODEM_STATUS`]).
    /// Bits 0–3 are reserved (the chip sets bit 0).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct ModemStatus: u8 {
        /// Clear To Send.
        const CTS = 1 << 4;
        /// Data Set Ready.
        const DSR = 1 << 5;
        /// Ring Indicator.
        const RI = 1 << 6;
        /// Data Carrier Detect (receive line signal detect).
        const DCD = 1 << 7;
        const _ = !0;
    }
}

bitflags! {
    /// The second status byte of every IN packet: the UART's line status register.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct LineStatus: u8 {
        /// Data ready.
        const DR = 1 << 0;
        /// Overrun: a character was lost because the receive buffer was full.
        const OE = 1 << 1;
        /// Parity error.
        const PE = 1 << 2;
        /// Framing error (no stop bit where one belonged).
        const FE = 1 << 3;
        /// Break received.
        const BI = 1 << 4;
        /// Transmitter holding register empty.
        const THRE = 1 << 5;
        /// Transmitter empty.
        const TEMT = 1 << 6;
        /// Error in the receive FIFO.
        const FIFO = 1 << 7;
    }
}

/// The two status bytes at the start of an IN packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PacketStatus {
    /// Modem lines.
    pub modem: ModemStatus,
    /// Line status (errors, transmitter state).
    pub line: LineStatus,
}

/// Counters of what [`strip_status`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FramingCounts {
    /// Packets with their status bytes.
    pub packets: u64,
    /// Payload bytes (status bytes excluded).
    pub payload_bytes: u64,
    /// Packets flagging an overrun.
    pub overrun_errors: u64,
    /// Packets flagging a parity error.
    pub parity_errors: u64,
    /// Packets flagging a framing error.
    pub framing_errors: u64,
    /// Packets flagging a received break.
    pub breaks: u64,
    /// Packets flagging a receive FIFO error.
    pub fifo_errors: u64,
    /// Pieces shorter than the two status bytes (a device error; their bytes are dropped).
    pub short_packets: u64,
}

/// Splits one bulk IN transfer into packets of `max_packet` bytes, appends their payload
/// (everything after each packet's two status bytes) to `payload`, counts errors into
/// `counts`, and returns the last packet's status. A final piece shorter than two bytes
/// is a device error: it is counted and its byte dropped.
pub fn strip_status(
    transfer: &[u8],
    max_packet: usize,
    payload: &mut Vec<u8>,
    counts: &mut FramingCounts,
) -> Option<PacketStatus> {
    let mut last = None;
    for packet in transfer.chunks(max_packet.max(3)) {
        let [modem, line, data @ ..] = packet else {
            counts.short_packets += 1;
            continue;
        };
        let status = PacketStatus {
            modem: ModemStatus::from_bits_retain(*modem),
            line: LineStatus::from_bits_retain(*line),
        };
        counts.packets += 1;
        counts.payload_bytes += data.len() as u64;
        let count_if = |flag: LineStatus, counter: &mut u64| {
            if status.line.contains(flag) {
                *counter += 1;
            }
        };
        count_if(LineStatus::OE, &mut counts.overrun_errors);
        count_if(LineStatus::PE, &mut counts.parity_errors);
        count_if(LineStatus::FE, &mut counts.framing_errors);
        count_if(LineStatus::BI, &mut counts.breaks);
        count_if(LineStatus::FIFO, &mut counts.fifo_errors);
        payload.extend_from_slice(data);
        last = Some(status);
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn divisors_of_common_rates() {
        // (rate, wValue, wIndex): the divisors in FTDI's AN232B-05 tables and the
        // values the Linux ftdi_sio driver sends for the same rates.
        let table: &[(u32, u16, u16)] = &[
            (300, 0x2710, 0),
            (1200, 0x09c4, 0),
            (2400, 0x04e2, 0),
            (4800, 0x0271, 0),
            (9600, 0x4138, 0),
            (19200, 0x809c, 0),
            (38400, 0xc04e, 0),
            (57600, 0xc034, 0),
            (115200, 0x001a, 0),
            (230400, 0x000d, 0),
            (460800, 0x4006, 0),
            (921600, 0x8003, 0),
            (1_000_000, 0x0003, 0),
            (1_500_000, 0x0002, 0),
            (2_000_000, 0x0001, 0),
            (3_000_000, 0x0000, 0),
        ];
        for &(rate, value, index) in table {
            let divisor = BaudDivisor::for_rate(rate).unwrap();
            assert_eq!(
                (divisor.value, divisor.index),
                (value, index),
                "{rate} baud"
            );
            let decoded = BaudDivisor::decode(value, index);
            assert!(
                decoded.abs_diff(rate) * 100 <= rate * 3,
                "{rate}: {decoded}"
            );
            assert_eq!(decoded, divisor.actual);
        }
    }

    #[test]
    fn fraction_code_above_three_sets_the_index_bit() {
        // 3 MHz / (100 + 3/8) = 29888 baud; 3/8 is code 4: low bits 0, wIndex bit 0 set.
        let divisor = BaudDivisor::for_rate(29_888).unwrap();
        assert_eq!(divisor.value, 100);
        assert_eq!(divisor.index, 1);
        assert_eq!(BaudDivisor::decode(divisor.value, divisor.index), 29_888);
    }

    #[test]
    fn rates_the_chip_cannot_make_are_refused_with_the_closest() {
        // Halfway between 2 M and 3 M: 20 % off either.
        match BaudDivisor::for_rate(2_500_000) {
            Err(FtdiError::UnsupportedBaud { closest, .. }) => {
                assert!(closest == 2_000_000 || closest == 3_000_000)
            }
            other => panic!("{other:?}"),
        }
        match BaudDivisor::for_rate(4_000_000) {
            Err(FtdiError::UnsupportedBaud { closest, .. }) => assert_eq!(closest, 3_000_000),
            other => panic!("{other:?}"),
        }
        match BaudDivisor::for_rate(100) {
            Err(FtdiError::UnsupportedBaud { closest, .. }) => assert_eq!(closest, 183),
            other => panic!("{other:?}"),
        }
        // 1.75 M is 12.5 % from 1.5 M and 2 M.
        assert!(BaudDivisor::for_rate(1_750_000).is_err());
        assert!(BaudDivisor::for_rate(0).is_err());
        // Within 3 %: 3.05 M gives 3 M.
        assert_eq!(BaudDivisor::for_rate(3_050_000).unwrap().actual, 3_000_000);
    }

    #[test]
    fn data_value_fields() {
        let mut line = LineSettings::default();
        assert_eq!(line.data_value(false), 0x0008);
        line.data_bits = DataBits::Seven;
        line.parity = Parity::Even;
        line.stop_bits = StopBits::Two;
        assert_eq!(line.data_value(false), 7 | 2 << 8 | 2 << 11);
        line.parity = Parity::Space;
        line.stop_bits = StopBits::OneAndHalf;
        assert_eq!(line.data_value(true), 7 | 4 << 8 | 1 << 11 | 1 << 14);
        assert_eq!(modem_ctrl_value(true, false), 0x0301);
        assert_eq!(modem_ctrl_value(false, true), 0x0302);
        assert_eq!(
            FlowControl::XonXoff {
                xon: 0x11,
                xoff: 0x13
            }
            .request_fields(),
            (0x1311, 4)
        );
    }

    #[test]
    fn status_is_stripped_from_every_packet() {
        let mut transfer = Vec::new();
        for packet in 0..3u8 {
            transfer.extend_from_slice(&[0x31, if packet == 1 { 0x62 } else { 0x60 }]);
            transfer.extend((0..62).map(|i| packet.wrapping_mul(62).wrapping_add(i)));
        }
        transfer.extend_from_slice(&[0x11, 0x70, 0xaa, 0xbb]);
        let mut payload = Vec::new();
        let mut counts = FramingCounts::default();
        let last = strip_status(&transfer, 64, &mut payload, &mut counts).unwrap();
        let expected: Vec<u8> = (0..186u8).chain([0xaa, 0xbb]).collect();
        assert_eq!(payload, expected);
        assert_eq!(counts.packets, 4);
        assert_eq!(counts.payload_bytes, 188);
        assert_eq!(counts.overrun_errors, 1);
        assert_eq!(counts.breaks, 1);
        assert_eq!(
            last.modem,
            ModemStatus::CTS | ModemStatus::from_bits_retain(1)
        );
        assert!(last
            .line
            .contains(LineStatus::BI | LineStatus::THRE | LineStatus::TEMT));
    }

    #[test]
    fn a_piece_shorter_than_the_status_is_counted_and_dropped() {
        let mut transfer = vec![0x01, 0x60, 7, 8];
        transfer.resize(64, 9);
        transfer.push(0x01); // a 1-byte final piece
        let mut payload = Vec::new();
        let mut counts = FramingCounts::default();
        strip_status(&transfer, 64, &mut payload, &mut counts);
        assert_eq!(payload.len(), 62);
        assert_eq!(counts.short_packets, 1);
        assert_eq!(strip_status(&[], 64, &mut payload, &mut counts), None);
    }

    proptest! {
        #[test]
        fn any_in_data_is_the_concatenation_of_packet_payloads(
            transfer in proptest::collection::vec(any::<u8>(), 0..2048),
            max_packet in prop_oneof![Just(8usize), Just(64), Just(512), 0usize..600],
        ) {
            let mut payload = Vec::new();
            let mut counts = FramingCounts::default();
            strip_status(&transfer, max_packet, &mut payload, &mut counts);
            let expected: Vec<u8> = transfer
                .chunks(max_packet.max(3))
                .filter(|chunk| chunk.len() >= 2)
                .flat_map(|chunk| chunk[2..].iter().copied())
                .collect();
            prop_assert_eq!(payload.len() as u64, counts.payload_bytes);
            prop_assert_eq!(payload, expected);
        }

        #[test]
        fn every_accepted_rate_is_within_three_percent(rate in 1u32..4_000_000) {
            if let Ok(divisor) = BaudDivisor::for_rate(rate) {
                let decoded = BaudDivisor::decode(divisor.value, divisor.index);
                prop_assert_eq!(decoded, divisor.actual);
                prop_assert!(u64::from(decoded.abs_diff(rate)) * 100 <= u64::from(rate) * 3 + 100);
            }
        }
    }
}
