//! [`Ft232`]: one FT232 on a claimed interface, over any [`UsbTransport`].

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring3_usb::{ControlRequest, Recipient, RequestType, TransferError, UsbTransport};

use crate::protocol::{
    modem_ctrl_value, strip_status, BaudDivisor, FlowControl, FramingCounts, LineSettings,
    LineStatus, ModemStatus, PacketStatus, ResetKind, SIO_GET_LATENCY_TIMER, SIO_GET_MODEM_STATUS,
    SIO_MODEM_CTRL, SIO_RESET, SIO_SET_BAUD_RATE, SIO_SET_DATA, SIO_SET_FLOW_CTRL,
    SIO_SET_LATENCY_TIMER,
};
use crate::{FtdiError, Result};

/// Timeout of each control request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);
/// At most this many packets are asked for in one bulk IN transfer.
const MAX_IN_PACKETS: usize = 64;
/// `wIndex` port number of a single-port chip's requests.
const PORT_INDEX: u16 = 0;
/// "No status seen yet" in [`Ft232::last_status`]'s atomic.
const NO_STATUS: u16 = 0xffff;

/// The bulk endpoints of an FT232's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    /// Bulk IN endpoint address (0x81 on FT232 chips).
    pub bulk_in: u8,
    /// Bulk OUT endpoint address (0x02 on FT232 chips).
    pub bulk_out: u8,
}

impl Default for Endpoints {
    /// The FT232's fixed endpoints: IN 0x81, OUT 0x02.
    fn default() -> Self {
        Endpoints {
            bulk_in: 0x81,
            bulk_out: 0x02,
        }
    }
}

impl From<&ring3_usb::BulkEndpoints> for Endpoints {
    fn from(endpoints: &ring3_usb::BulkEndpoints) -> Self {
        Endpoints {
            bulk_in: endpoints.bulk_in,
            bulk_out: endpoints.bulk_out,
        }
    }
}

impl From<ring3_usb::BulkEndpoints> for Endpoints {
    fn from(endpoints: ring3_usb::BulkEndpoints) -> Self {
        Endpoints::from(&endpoints)
    }
}

/// Counters of one [`Ft232`] since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ft232Stats {
    /// Payload bytes received from the line (status bytes excluded).
    pub bytes_read: u64,
    /// Bytes the chip accepted for transmission.
    pub bytes_written: u64,
    /// Bulk IN transfers that completed (with data or status only).
    pub read_transfers: u64,
    /// Bulk OUT transfers that completed.
    pub write_transfers: u64,
    /// IN packets, each with its two status bytes.
    pub packets: u64,
    /// Packets flagging an overrun (characters the chip lost).
    pub overrun_errors: u64,
    /// Packets flagging a parity error.
    pub parity_errors: u64,
    /// Packets flagging a framing error.
    pub framing_errors: u64,
    /// Packets flagging a break.
    pub breaks: u64,
    /// Packets flagging a receive FIFO error.
    pub fifo_errors: u64,
    /// IN pieces shorter than the two status bytes (device errors; dropped).
    pub short_packets: u64,
}

impl Ft232Stats {
    /// Packets flagging any line error: overrun, parity, framing, FIFO error or break.
    pub fn line_errors(&self) -> u64 {
        self.overrun_errors
            + self.parity_errors
            + self.framing_errors
            + self.fifo_errors
            + self.breaks
    }
}

#[derive(Default)]
struct Counters {
    bytes_written: AtomicU64,
    read_transfers: AtomicU64,
    write_transfers: AtomicU64,
    framing: Mutex<FramingCounts>,
}

/// What was received but not yet returned by [`Ft232::read`].
struct Receiver {
    transfer: Vec<u8>,
    payload: Vec<u8>,
    consumed: usize,
}

/// An FT232 USB serial adapter.
///
/// All methods take `&self`: one thread may [`read`](Self::read) while another
/// [`write`](Self::write)s and a third changes settings, as a serial port bridge does.
pub struct Ft232<T: UsbTransport> {
    transport: T,
    endpoints: Endpoints,
    max_packet_in: usize,
    max_packet_out: usize,
    receiver: Mutex<Receiver>,
    counters: Counters,
    last_status: AtomicU16,
}

impl<T: UsbTransport> std::fmt::Debug for Ft232<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ft232")
            .field("endpoints", &self.endpoints)
            .field("max_packet_in", &self.max_packet_in)
            .field("max_packet_out", &self.max_packet_out)
            .finish_non_exhaustive()
    }
}

impl<T: UsbTransport> Ft232<T> {
    /// Takes over the chip on `transport`: resets its serial engine (purging both
    /// buffers), then sets 9600 baud 8N1, no flow control, DTR and RTS on.
    pub fn new(transport: T, endpoints: impl Into<Endpoints>) -> Result<Self> {
        let endpoints = endpoints.into();
        let max_packet_in = transport
            .max_packet_size(endpoints.bulk_in)
            .ok_or(FtdiError::NoEndpoint(endpoints.bulk_in))?;
        let max_packet_out = transport
            .max_packet_size(endpoints.bulk_out)
            .ok_or(FtdiError::NoEndpoint(endpoints.bulk_out))?;
        if max_packet_in < 3 || max_packet_out == 0 {
            return Err(FtdiError::BadMaxPacket {
                endpoint: endpoints.bulk_in,
                size: max_packet_in,
            });
        }
        let port = Ft232 {
            transport,
            endpoints,
            max_packet_in,
            max_packet_out,
            receiver: Mutex::new(Receiver {
                transfer: Vec::new(),
                payload: Vec::new(),
                consumed: 0,
            }),
            counters: Counters::default(),
            last_status: AtomicU16::new(NO_STATUS),
        };
        port.reset(ResetKind::Sio)?;
        port.set_line(&LineSettings::default())?;
        port.set_flow_control(FlowControl::None)?;
        port.set_modem_lines(true, true)?;
        Ok(port)
    }

    /// The transport the chip is driven through.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The bulk endpoints in use.
    pub fn endpoints(&self) -> Endpoints {
        self.endpoints
    }

    /// Maximum packet size of the bulk OUT endpoint (64 at full speed).
    pub fn max_packet_out(&self) -> usize {
        self.max_packet_out
    }

    fn vendor_out(&self, name: &'static str, request: u8, value: u16, index: u16) -> Result<()> {
        let request = ControlRequest {
            request_type: RequestType::Vendor,
            recipient: Recipient::Device,
            request,
            value,
            index,
        };
        self.transport
            .control_out(request, &[], CONTROL_TIMEOUT)
            .map_err(|source| FtdiError::Control {
                request: name,
                source,
            })
    }

    fn vendor_in(&self, name: &'static str, request: u8, length: u16) -> Result<Vec<u8>> {
        let request = ControlRequest {
            request_type: RequestType::Vendor,
            recipient: Recipient::Device,
            request,
            value: 0,
            index: PORT_INDEX,
        };
        let reply = self
            .transport
            .control_in(request, length, CONTROL_TIMEOUT)
            .map_err(|source| FtdiError::Control {
                request: name,
                source,
            })?;
        if reply.len() < usize::from(length) {
            return Err(FtdiError::ShortReply {
                request: name,
                got: reply.len(),
                expected: usize::from(length),
            });
        }
        Ok(reply)
    }

    /// `SIO_RESET`: resets the serial engine or purges one buffer. A purge of the
    /// receive buffer also drops what this driver holds but has not returned yet.
    pub fn reset(&self, kind: ResetKind) -> Result<()> {
        self.vendor_out("SIO_RESET", SIO_RESET, kind as u16, PORT_INDEX)?;
        if kind != ResetKind::PurgeTx {
            if let Ok(mut receiver) = self.receiver.lock() {
                receiver.payload.clear();
                receiver.consumed = 0;
            }
        }
        Ok(())
    }

    /// Sets rate, data bits, parity and stop bits. Returns the rate the chip really
    /// runs at (within 3 % of the one asked for); a rate further off is refused with
    /// [`FtdiError::UnsupportedBaud`], naming the closest one, and nothing is changed.
    pub fn set_line(&self, line: &LineSettings) -> Result<u32> {
        let divisor = BaudDivisor::for_rate(line.baud)?;
        self.vendor_out(
            "SIO_SET_BAUD_RATE",
            SIO_SET_BAUD_RATE,
            divisor.value,
            divisor.index | (PORT_INDEX << 8),
        )?;
        self.vendor_out(
            "SIO_SET_DATA",
            SIO_SET_DATA,
            line.data_value(false),
            PORT_INDEX,
        )?;
        Ok(divisor.actual)
    }

    /// Starts (`true`) or ends a break condition, keeping the framing of `line`.
    pub fn set_break(&self, line: &LineSettings, on: bool) -> Result<()> {
        self.vendor_out(
            "SIO_SET_DATA",
            SIO_SET_DATA,
            line.data_value(on),
            PORT_INDEX,
        )
    }

    /// Sets the handshake the chip performs.
    pub fn set_flow_control(&self, flow: FlowControl) -> Result<()> {
        let (value, handshake) = flow.request_fields();
        self.vendor_out(
            "SIO_SET_FLOW_CTRL",
            SIO_SET_FLOW_CTRL,
            value,
            (handshake << 8) | PORT_INDEX,
        )
    }

    /// Sets the DTR and RTS outputs.
    pub fn set_modem_lines(&self, dtr: bool, rts: bool) -> Result<()> {
        self.vendor_out(
            "SIO_MODEM_CTRL",
            SIO_MODEM_CTRL,
            modem_ctrl_value(dtr, rts),
            PORT_INDEX,
        )
    }

    /// Sets how long (1–255 ms) the chip waits before sending a partly filled IN
    /// packet. Lower means less latency and more USB traffic.
    pub fn set_latency_timer(&self, milliseconds: u8) -> Result<()> {
        self.vendor_out(
            "SIO_SET_LATENCY_TIMER",
            SIO_SET_LATENCY_TIMER,
            u16::from(milliseconds.max(1)),
            PORT_INDEX,
        )
    }

    /// The latency timer in ms.
    pub fn latency_timer(&self) -> Result<u8> {
        let reply = self.vendor_in("SIO_GET_LATENCY_TIMER", SIO_GET_LATENCY_TIMER, 1)?;
        Ok(reply[0])
    }

    /// Asks the chip for its modem and line status now (`SIO_GET_MODEM_STATUS`).
    pub fn modem_status(&self) -> Result<PacketStatus> {
        let reply = self.vendor_in("SIO_GET_MODEM_STATUS", SIO_GET_MODEM_STATUS, 2)?;
        let status = PacketStatus {
            modem: ModemStatus::from_bits_retain(reply[0]),
            line: LineStatus::from_bits_retain(reply[1]),
        };
        self.remember(status);
        Ok(status)
    }

    /// The status in the last IN packet (or [`modem_status`](Self::modem_status)
    /// reply), if any came yet.
    pub fn last_status(&self) -> Option<PacketStatus> {
        let raw = self.last_status.load(Ordering::Relaxed);
        (raw != NO_STATUS).then(|| PacketStatus {
            modem: ModemStatus::from_bits_retain((raw >> 8) as u8),
            line: LineStatus::from_bits_retain(raw as u8),
        })
    }

    fn remember(&self, status: PacketStatus) {
        let raw = (u16::from(status.modem.bits()) << 8) | u16::from(status.line.bits());
        self.last_status.store(raw, Ordering::Relaxed);
    }

    /// Counters since the driver was created.
    pub fn stats(&self) -> Ft232Stats {
        let framing = self
            .counters
            .framing
            .lock()
            .map(|counts| *counts)
            .unwrap_or_default();
        Ft232Stats {
            bytes_read: framing.payload_bytes,
            bytes_written: self.counters.bytes_written.load(Ordering::Relaxed),
            read_transfers: self.counters.read_transfers.load(Ordering::Relaxed),
            write_transfers: self.counters.write_transfers.load(Ordering::Relaxed),
            packets: framing.packets,
            overrun_errors: framing.overrun_errors,
            parity_errors: framing.parity_errors,
            framing_errors: framing.framing_errors,
            breaks: framing.breaks,
            fifo_errors: framing.fifo_errors,
            short_packets: framing.short_packets,
        }
    }

    /// Reads what the chip received from the line into `buf`, status bytes removed.
    /// Waits up to `timeout` for at least one byte; returns 0 if none came (a chip
    /// that has nothing to say sends status-only packets every latency period, or
    /// nothing at all). Errors in the line status are counted in [`stats`](Self::stats),
    /// not returned.
    pub fn read(&self, buf: &mut [u8], timeout: Duration) -> Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = Instant::now() + timeout;
        let mut receiver = self.receiver.lock().map_err(|_| FtdiError::Poisoned)?;
        loop {
            if receiver.consumed < receiver.payload.len() {
                let start = receiver.consumed;
                let n = buf.len().min(receiver.payload.len() - start);
                buf[..n].copy_from_slice(&receiver.payload[start..start + n]);
                receiver.consumed += n;
                return Ok(n);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(0);
            }
            let payload_per_packet = self.max_packet_in - 2;
            let packets = buf
                .len()
                .div_ceil(payload_per_packet)
                .clamp(1, MAX_IN_PACKETS);
            let Receiver {
                transfer,
                payload,
                consumed,
            } = &mut *receiver;
            transfer.resize(packets * self.max_packet_in, 0);
            let received = match self
                .transport
                .bulk_in(self.endpoints.bulk_in, transfer, remaining)
            {
                Ok(n) => n.min(transfer.len()),
                Err(TransferError::Timeout) => return Ok(0),
                Err(TransferError::Stall) => {
                    // A halted endpoint stays halted until cleared; clear it so the next
                    // read can work, and report this one.
                    let _ = self.transport.clear_halt(self.endpoints.bulk_in);
                    return Err(FtdiError::Bulk {
                        direction: "IN",
                        source: TransferError::Stall,
                    });
                }
                Err(source) => {
                    return Err(FtdiError::Bulk {
                        direction: "IN",
                        source,
                    })
                }
            };
            self.counters.read_transfers.fetch_add(1, Ordering::Relaxed);
            payload.clear();
            *consumed = 0;
            let mut counts = FramingCounts::default();
            let status = strip_status(
                &transfer[..received],
                self.max_packet_in,
                payload,
                &mut counts,
            );
            if let Some(status) = status {
                self.remember(status);
            }
            if let Ok(mut total) = self.counters.framing.lock() {
                add_counts(&mut total, &counts);
            }
        }
    }

    /// Sends `data` to the line: one bulk OUT transfer, which the chip accepts as fast
    /// as it transmits (so `timeout` must allow for the baud rate). Returns how many
    /// bytes were accepted: all of them, or an error. After a timeout an unknown part
    /// of `data` may have been accepted.
    pub fn write(&self, data: &[u8], timeout: Duration) -> Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        match self
            .transport
            .bulk_out(self.endpoints.bulk_out, data, timeout)
        {
            Ok(n) => {
                let n = n.min(data.len());
                self.counters
                    .write_transfers
                    .fetch_add(1, Ordering::Relaxed);
                self.counters
                    .bytes_written
                    .fetch_add(n as u64, Ordering::Relaxed);
                Ok(n)
            }
            Err(source) => {
                if source == TransferError::Stall {
                    let _ = self.transport.clear_halt(self.endpoints.bulk_out);
                }
                Err(FtdiError::Bulk {
                    direction: "OUT",
                    source,
                })
            }
        }
    }
}

fn add_counts(total: &mut FramingCounts, more: &FramingCounts) {
    total.packets += more.packets;
    total.payload_bytes += more.payload_bytes;
    total.overrun_errors += more.overrun_errors;
    total.parity_errors += more.parity_errors;
    total.framing_errors += more.framing_errors;
    total.breaks += more.breaks;
    total.fifo_errors += more.fifo_errors;
    total.short_packets += more.short_packets;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeFt232, BULK_IN, BULK_OUT};
    use crate::protocol::{DataBits, Parity, StopBits};
    use std::sync::Arc;

    const SHORT: Duration = Duration::from_millis(50);

    fn port(fake: &Arc<FakeFt232>) -> Ft232<Arc<FakeFt232>> {
        Ft232::new(fake.clone(), Endpoints::default()).unwrap()
    }

    #[test]
    fn new_resets_and_sets_9600_8n1_with_dtr_rts() {
        let fake = Arc::new(FakeFt232::new());
        let _port = port(&fake);
        let settings = fake.settings();
        assert_eq!(settings.resets, 1);
        assert_eq!(settings.requests[0], (SIO_RESET, 0, 0));
        assert_eq!(settings.baud, Some(9600));
        assert_eq!(settings.data_value, Some(8));
        assert_eq!(settings.flow, 0);
        assert!(settings.dtr && settings.rts);
    }

    #[test]
    fn endpoints_must_exist() {
        let fake = FakeFt232::new();
        let endpoints = Endpoints {
            bulk_in: 0x83,
            bulk_out: BULK_OUT,
        };
        assert!(matches!(
            Ft232::new(fake, endpoints),
            Err(FtdiError::NoEndpoint(0x83))
        ));
    }

    #[test]
    fn line_flow_and_modem_requests() {
        let fake = Arc::new(FakeFt232::new());
        let port = port(&fake);
        let line = LineSettings {
            baud: 115_200,
            data_bits: DataBits::Seven,
            parity: Parity::Odd,
            stop_bits: StopBits::Two,
        };
        assert_eq!(port.set_line(&line).unwrap(), 115_385);
        port.set_flow_control(FlowControl::XonXoff {
            xon: 0x11,
            xoff: 0x13,
        })
        .unwrap();
        port.set_modem_lines(false, true).unwrap();
        port.set_latency_timer(2).unwrap();
        port.set_break(&line, true).unwrap();
        let settings = fake.settings();
        assert_eq!(settings.baud, Some(115_385));
        assert_eq!(settings.data_bits, Some(7));
        assert_eq!(settings.parity, Some(1));
        assert_eq!(settings.stop_bits, Some(2));
        assert!(settings.break_on);
        assert_eq!(settings.flow, 4);
        assert_eq!(settings.xon_xoff, Some((0x11, 0x13)));
        assert!(!settings.dtr && settings.rts);
        assert_eq!(port.latency_timer().unwrap(), 2);
        let requests = fake.settings().requests;
        // A refused rate changes nothing.
        assert!(matches!(
            port.set_line(&LineSettings {
                baud: 2_500_000,
                ..line
            }),
            Err(FtdiError::UnsupportedBaud { .. })
        ));
        assert_eq!(fake.settings().requests, requests);
    }

    #[test]
    fn read_strips_status_and_keeps_what_does_not_fit() {
        let fake = Arc::new(FakeFt232::new());
        let port = port(&fake);
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        fake.receive(&data);
        let mut got = Vec::new();
        let mut buf = [0u8; 10]; // smaller than a packet's payload
        while got.len() < data.len() {
            let n = port.read(&mut buf, SHORT).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, data);
        let stats = port.stats();
        assert_eq!(stats.bytes_read, 1000);
        assert_eq!(stats.packets, 1000u64.div_ceil(62));
        assert_eq!(port.read(&mut buf, SHORT).unwrap(), 0);
        assert!(port.last_status().unwrap().modem.contains(ModemStatus::CTS));
    }

    #[test]
    fn status_only_packets_are_not_data() {
        let fake = Arc::new(FakeFt232::new());
        fake.set_status_only_packets(true);
        let port = port(&fake);
        let mut buf = [0u8; 256];
        assert_eq!(port.read(&mut buf, SHORT).unwrap(), 0);
        fake.receive(b"abc");
        assert_eq!(port.read(&mut buf, SHORT).unwrap(), 3);
        assert_eq!(&buf[..3], b"abc");
        assert!(port.stats().packets > 1);
    }

    #[test]
    fn garbage_and_errors_are_counted_not_fatal() {
        let fake = Arc::new(FakeFt232::new());
        let port = port(&fake);
        let mut buf = [0u8; 4096];
        // A lone byte (shorter than the status), then a packet flagging a parity and a
        // framing error, then an overrun with data.
        fake.push_raw_in(vec![0x31]);
        fake.push_raw_in(vec![0x31, 0x6c]);
        assert_eq!(port.read(&mut buf, SHORT).unwrap(), 0);
        fake.flag_next_packet(0x02);
        fake.receive(b"xy");
        assert_eq!(port.read(&mut buf, SHORT).unwrap(), 2);
        let stats = port.stats();
        assert_eq!(stats.short_packets, 1);
        assert_eq!(stats.parity_errors, 1);
        assert_eq!(stats.framing_errors, 1);
        assert_eq!(stats.overrun_errors, 1);
        // A stall is reported (and the halt cleared); a timeout is just no data.
        fake.push_in_error(TransferError::Stall);
        assert!(matches!(
            port.read(&mut buf, SHORT),
            Err(FtdiError::Bulk {
                source: TransferError::Stall,
                ..
            })
        ));
        fake.push_in_error(TransferError::Timeout);
        assert_eq!(port.read(&mut buf, SHORT).unwrap(), 0);
        fake.disconnect();
        assert!(port.read(&mut buf, SHORT).unwrap_err().is_disconnected());
        assert!(port.write(b"a", SHORT).unwrap_err().is_disconnected());
    }

    #[test]
    fn oversized_transfer_is_a_fault() {
        let fake = Arc::new(FakeFt232::new());
        let port = port(&fake);
        fake.push_raw_in(vec![0; 64 * 64 + 1]);
        let mut buf = [0u8; 1 << 20];
        assert!(port.read(&mut buf, SHORT).is_err());
    }

    #[test]
    fn write_and_modem_status() {
        let fake = Arc::new(FakeFt232::new());
        let port = port(&fake);
        assert_eq!(port.write(b"hello", SHORT).unwrap(), 5);
        assert_eq!(fake.take_sent(), b"hello");
        assert_eq!(port.stats().bytes_written, 5);
        fake.set_modem_status(0xb1);
        let status = port.modem_status().unwrap();
        assert_eq!(status.modem, ModemStatus::from_bits_retain(0xb1));
        assert!(status
            .modem
            .contains(ModemStatus::DCD | ModemStatus::DSR | ModemStatus::CTS));
        assert_eq!(port.last_status(), Some(status));
        let _ = BULK_IN;
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_in_transfers_never_panic(
            transfers in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), 0..8),
        ) {
            let fake = Arc::new(FakeFt232::new());
            let port = port(&fake);
            let mut expected = Vec::new();
            for transfer in &transfers {
                fake.push_raw_in(transfer.clone());
                for packet in transfer.chunks(64) {
                    if packet.len() >= 2 {
                        expected.extend_from_slice(&packet[2..]);
                    }
                }
            }
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            for _ in 0..transfers.len() * 2 + 1 {
                if let Ok(n) = port.read(&mut buf, Duration::from_millis(1)) {
                    got.extend_from_slice(&buf[..n]);
                }
            }
            proptest::prop_assert_eq!(got, expected);
        }
    }
}
