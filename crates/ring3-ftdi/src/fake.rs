//! [`FakeFt232`]: an in-process FT232 model implementing [`UsbTransport`], for tests.
//!
//! It decodes every vendor request the way the chip does and records the resulting
//! settings ([`FakeSettings`]); data sent to bulk OUT is either looped back to bulk IN
//! (as if TX were wired to RX) or recorded; data "received on the line" is handed out
//! on bulk IN in packets that each start with the two status bytes. Tests can also
//! queue raw IN transfers (malformed ones included), error bits and transfer errors.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ring3_usb::{ControlRequest, Recipient, RequestType, TransferError, UsbTransport};

use crate::protocol::{
    BaudDivisor, SIO_GET_LATENCY_TIMER, SIO_GET_MODEM_STATUS, SIO_MODEM_CTRL, SIO_RESET,
    SIO_SET_BAUD_RATE, SIO_SET_DATA, SIO_SET_FLOW_CTRL, SIO_SET_LATENCY_TIMER,
};

/// Bulk IN endpoint of the model.
pub const BULK_IN: u8 = 0x81;
/// Bulk OUT endpoint of the model.
pub const BULK_OUT: u8 = 0x02;

/// The settings the model was given, decoded from the requests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FakeSettings {
    /// Rate from the last `SIO_SET_BAUD_RATE`, as the chip computes it.
    pub baud: Option<u32>,
    /// Raw `wValue` of the last `SIO_SET_DATA`.
    pub data_value: Option<u16>,
    /// Data bits of the last `SIO_SET_DATA`.
    pub data_bits: Option<u8>,
    /// Parity field (0 none, 1 odd, 2 even, 3 mark, 4 space).
    pub parity: Option<u8>,
    /// Stop bits field (0 one, 1 one and a half, 2 two).
    pub stop_bits: Option<u8>,
    /// Break bit of the last `SIO_SET_DATA`.
    pub break_on: bool,
    /// Handshake bits of the last `SIO_SET_FLOW_CTRL` (1 RTS/CTS, 2 DTR/DSR, 4 XON/XOFF).
    pub flow: u8,
    /// XON and XOFF characters of the last XON/XOFF `SIO_SET_FLOW_CTRL`.
    pub xon_xoff: Option<(u8, u8)>,
    /// DTR output.
    pub dtr: bool,
    /// RTS output.
    pub rts: bool,
    /// Latency timer in ms.
    pub latency: u8,
    /// `SIO_RESET` requests (any kind).
    pub resets: u32,
    /// Vendor requests received, in order (`bRequest`, `wValue`, `wIndex`).
    pub requests: Vec<(u8, u16, u16)>,
}

struct State {
    loopback: bool,
    /// Bytes "received on the line", waiting to go out on bulk IN.
    line_rx: VecDeque<u8>,
    /// Whole IN transfers (or errors) to return before anything else.
    scripted: VecDeque<Result<Vec<u8>, TransferError>>,
    /// What bulk OUT accepted (when not looping back).
    sent: Vec<u8>,
    modem: u8,
    /// Line status bits for the next IN packet only.
    line_status_once: u8,
    /// Status-only packets when there is no data, as the real chip sends every latency
    /// period (the QEMU model NAKs instead, i.e. the transfer times out).
    status_only_packets: bool,
    disconnected: bool,
    /// Bulk OUT takes this long per call (a slow line).
    out_delay: Duration,
    settings: FakeSettings,
}

/// An FT232 model; see the [module docs](self).
pub struct FakeFt232 {
    state: Mutex<State>,
    changed: Condvar,
    max_packet: usize,
}

impl Default for FakeFt232 {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeFt232 {
    /// A model with 64-byte packets (full speed) that records what is sent to it.
    pub fn new() -> Self {
        Self::with_max_packet(64)
    }

    /// A model whose transmitted bytes come back on its receive side.
    pub fn loopback() -> Self {
        let fake = Self::new();
        fake.lock().loopback = true;
        fake
    }

    /// A recording model with another maximum packet size (512 for high speed parts).
    pub fn with_max_packet(max_packet: usize) -> Self {
        FakeFt232 {
            state: Mutex::new(State {
                loopback: false,
                line_rx: VecDeque::new(),
                scripted: VecDeque::new(),
                sent: Vec::new(),
                modem: 0x31,
                line_status_once: 0,
                status_only_packets: false,
                disconnected: false,
                out_delay: Duration::ZERO,
                settings: FakeSettings {
                    latency: 16,
                    ..FakeSettings::default()
                },
            }),
            changed: Condvar::new(),
            max_packet,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test thread that panicked with the lock held has failed the test already;
        // the state itself is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes arriving on the line, to be read through bulk IN.
    pub fn receive(&self, data: &[u8]) {
        self.lock().line_rx.extend(data);
        self.changed.notify_all();
    }

    /// The next bulk IN transfer returns exactly `transfer` (which may be malformed).
    pub fn push_raw_in(&self, transfer: Vec<u8>) {
        self.lock().scripted.push_back(Ok(transfer));
        self.changed.notify_all();
    }

    /// The next bulk IN transfer fails with `error`.
    pub fn push_in_error(&self, error: TransferError) {
        self.lock().scripted.push_back(Err(error));
        self.changed.notify_all();
    }

    /// Sets these line status bits (overrun, parity, ...) in the next IN packet.
    pub fn flag_next_packet(&self, line_status: u8) {
        self.lock().line_status_once = line_status;
    }

    /// Sets the modem status byte of every IN packet.
    pub fn set_modem_status(&self, modem: u8) {
        self.lock().modem = modem;
    }

    /// Sends status-only packets instead of timing out when there is no data.
    pub fn set_status_only_packets(&self, on: bool) {
        self.lock().status_only_packets = on;
    }

    /// Makes every bulk OUT call take this long (a slow line).
    pub fn set_out_delay(&self, delay: Duration) {
        self.lock().out_delay = delay;
    }

    /// Every later transfer fails with [`TransferError::Disconnected`].
    pub fn disconnect(&self) {
        self.lock().disconnected = true;
        self.changed.notify_all();
    }

    /// Takes what bulk OUT accepted so far (recording mode).
    pub fn take_sent(&self) -> Vec<u8> {
        std::mem::take(&mut self.lock().sent)
    }

    /// How many bytes bulk OUT accepted and not yet taken (recording mode).
    pub fn sent_len(&self) -> usize {
        self.lock().sent.len()
    }

    /// Waits until the settings satisfy `check`, up to `timeout`.
    pub fn wait_for_settings(
        &self,
        timeout: Duration,
        check: impl Fn(&FakeSettings) -> bool,
    ) -> Option<FakeSettings> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if check(&state.settings) {
                return Some(state.settings.clone());
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return None;
            }
            state = self
                .changed
                .wait_timeout(state, remaining)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The settings as decoded so far.
    pub fn settings(&self) -> FakeSettings {
        self.lock().settings.clone()
    }

    fn check_vendor(request: &ControlRequest) -> Result<(), TransferError> {
        if request.request_type != RequestType::Vendor || request.recipient != Recipient::Device {
            return Err(TransferError::Stall);
        }
        Ok(())
    }
}

impl UsbTransport for FakeFt232 {
    fn control_in(
        &self,
        request: ControlRequest,
        length: u16,
        _timeout: Duration,
    ) -> Result<Vec<u8>, TransferError> {
        Self::check_vendor(&request)?;
        let mut state = self.lock();
        if state.disconnected {
            return Err(TransferError::Disconnected);
        }
        state
            .settings
            .requests
            .push((request.request, request.value, request.index));
        let mut reply = match request.request {
            SIO_GET_MODEM_STATUS => vec![state.modem, 0x60],
            SIO_GET_LATENCY_TIMER => vec![state.settings.latency],
            _ => return Err(TransferError::Stall),
        };
        reply.truncate(usize::from(length));
        Ok(reply)
    }

    fn control_out(
        &self,
        request: ControlRequest,
        data: &[u8],
        _timeout: Duration,
    ) -> Result<(), TransferError> {
        Self::check_vendor(&request)?;
        if !data.is_empty() {
            return Err(TransferError::Stall);
        }
        let mut state = self.lock();
        if state.disconnected {
            return Err(TransferError::Disconnected);
        }
        let (value, index) = (request.value, request.index);
        let settings = &mut state.settings;
        settings.requests.push((request.request, value, index));
        match request.request {
            SIO_RESET => settings.resets += 1,
            SIO_MODEM_CTRL => {
                if value & 0x0100 != 0 {
                    settings.dtr = value & 1 != 0;
                }
                if value & 0x0200 != 0 {
                    settings.rts = value & 2 != 0;
                }
            }
            SIO_SET_FLOW_CTRL => {
                settings.flow = (index >> 8) as u8;
                settings.xon_xoff =
                    (settings.flow & 4 != 0).then_some((value as u8, (value >> 8) as u8));
            }
            SIO_SET_BAUD_RATE => settings.baud = Some(BaudDivisor::decode(value, index)),
            SIO_SET_DATA => {
                settings.data_value = Some(value);
                settings.data_bits = Some(value as u8);
                settings.parity = Some(((value >> 8) & 7) as u8);
                settings.stop_bits = Some(((value >> 11) & 3) as u8);
                settings.break_on = value & (1 << 14) != 0;
            }
            SIO_SET_LATENCY_TIMER => settings.latency = value as u8,
            _ => return Err(TransferError::Stall),
        }
        drop(state);
        self.changed.notify_all();
        Ok(())
    }

    fn bulk_in(
        &self,
        endpoint: u8,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<usize, TransferError> {
        if endpoint != BULK_IN {
            return Err(TransferError::Stall);
        }
        let deadline = Instant::now() + timeout;
        // Like the chip's latency timer: a status-only packet after a few ms of silence.
        let status_deadline = Instant::now() + Duration::from_millis(2);
        let mut state = self.lock();
        loop {
            if state.disconnected {
                return Err(TransferError::Disconnected);
            }
            if let Some(scripted) = state.scripted.pop_front() {
                let transfer = scripted?;
                if transfer.len() > buf.len() {
                    return Err(TransferError::Fault);
                }
                buf[..transfer.len()].copy_from_slice(&transfer);
                return Ok(transfer.len());
            }
            if !state.line_rx.is_empty() {
                break;
            }
            let now = Instant::now();
            if state.status_only_packets && now >= status_deadline {
                break;
            }
            let remaining = deadline.saturating_duration_since(now);
            if remaining.is_zero() {
                return Err(TransferError::Timeout);
            }
            let remaining = if state.status_only_packets {
                remaining.min(status_deadline.saturating_duration_since(now))
            } else {
                remaining
            };
            state = self
                .changed
                .wait_timeout(state, remaining)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        // Packets of up to max_packet bytes, each status + payload; a short packet ends
        // the transfer.
        let mut filled = 0;
        loop {
            let room = (buf.len() - filled).min(self.max_packet);
            if room < 2 {
                break;
            }
            let payload = (room - 2).min(state.line_rx.len());
            buf[filled] = state.modem;
            buf[filled + 1] = 0x60 | std::mem::take(&mut state.line_status_once);
            for (slot, byte) in buf[filled + 2..filled + 2 + payload]
                .iter_mut()
                .zip(state.line_rx.drain(..payload))
            {
                *slot = byte;
            }
            filled += 2 + payload;
            if 2 + payload < self.max_packet || state.line_rx.is_empty() {
                break;
            }
        }
        Ok(filled)
    }

    fn bulk_out(
        &self,
        endpoint: u8,
        data: &[u8],
        _timeout: Duration,
    ) -> Result<usize, TransferError> {
        if endpoint != BULK_OUT {
            return Err(TransferError::Stall);
        }
        let delay = self.lock().out_delay;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let mut state = self.lock();
        if state.disconnected {
            return Err(TransferError::Disconnected);
        }
        if state.loopback {
            state.line_rx.extend(data);
        } else {
            state.sent.extend_from_slice(data);
        }
        drop(state);
        self.changed.notify_all();
        Ok(data.len())
    }

    fn clear_halt(&self, _endpoint: u8) -> Result<(), TransferError> {
        if self.lock().disconnected {
            return Err(TransferError::Disconnected);
        }
        Ok(())
    }

    fn max_packet_size(&self, endpoint: u8) -> Option<usize> {
        (endpoint == BULK_IN || endpoint == BULK_OUT).then_some(self.max_packet)
    }
}
