//! What a USB driver needs from the platform: the [`UsbTransport`] trait.
//!
//! Drivers are written against this trait, not against usbfs, so that they can be tested
//! against in-process device models (which also inject stalls, short transfers and
//! corrupt replies) and so that another platform only has to provide these few calls.

use std::fmt;
use std::time::Duration;

/// The `bmRequestType` type bits of a control request (USB 2.0 §9.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// A request defined by the USB specification (chapter 9).
    Standard,
    /// A request defined by a device class (mass storage, CDC, ...).
    Class,
    /// A request defined by the vendor (FTDI's, for example).
    Vendor,
}

/// The `bmRequestType` recipient bits of a control request (USB 2.0 §9.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipient {
    /// The device as a whole.
    Device,
    /// The interface numbered by `index`.
    Interface,
    /// The endpoint addressed by `index`.
    Endpoint,
    /// Something else (`bmRequestType` recipient 3).
    Other,
}

/// The SETUP packet of a control transfer, without its direction and length, which come
/// from the call ([`UsbTransport::control_in`] or [`UsbTransport::control_out`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlRequest {
    /// Standard, class or vendor request.
    pub request_type: RequestType,
    /// Who the request is addressed to.
    pub recipient: Recipient,
    /// `bRequest`.
    pub request: u8,
    /// `wValue`.
    pub value: u16,
    /// `wIndex`.
    pub index: u16,
}

/// Why a USB transfer failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferError {
    /// The transfer did not complete within its timeout and was cancelled.
    Timeout,
    /// The endpoint answered with STALL. A bulk endpoint stays halted until
    /// [`UsbTransport::clear_halt`]; the control endpoint recovers by itself.
    Stall,
    /// The device is gone (unplugged, reset away, or its usbfs node revoked).
    Disconnected,
    /// A protocol or hardware error: babble, CRC, a device that sent more than asked.
    Fault,
    /// Anything else, with the platform's description.
    Other(String),
}

impl fmt::Display for TransferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransferError::Timeout => f.write_str("the transfer timed out"),
            TransferError::Stall => f.write_str("the endpoint stalled"),
            TransferError::Disconnected => f.write_str("the device was disconnected"),
            TransferError::Fault => f.write_str("USB protocol or hardware error"),
            TransferError::Other(what) => write!(f, "USB transfer failed: {what}"),
        }
    }
}

impl std::error::Error for TransferError {}

/// The USB operations a driver performs on one claimed interface.
///
/// Every call has a timeout and returns an error rather than blocking for ever. Methods
/// take `&self` so that a driver may run its IN and OUT directions on two threads (a
/// serial port reads and writes at the same time); implementations serialise what must
/// be serialised per endpoint.
///
/// Endpoints are named by their address (`0x81` is IN endpoint 1, `0x02` OUT endpoint 2).
pub trait UsbTransport: Send + Sync {
    /// A control transfer from the device: returns what the device sent, at most
    /// `length` bytes (a device may send less).
    fn control_in(
        &self,
        request: ControlRequest,
        length: u16,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransferError>;

    /// A control transfer to the device, with `data` (possibly empty) in its data stage.
    fn control_out(
        &self,
        request: ControlRequest,
        data: &[u8],
        timeout: Duration,
    ) -> Result<(), TransferError>;

    /// One bulk IN transfer of up to `buf.len()` bytes into `buf`; returns how many
    /// bytes the device sent. A short packet ends the transfer early. `buf.len()`
    /// should be a multiple of the endpoint's maximum packet size, or a device that
    /// sends a full packet overflows it ([`TransferError::Fault`]).
    fn bulk_in(
        &self,
        endpoint: u8,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<usize, TransferError>;

    /// One bulk OUT transfer of `data`; returns how many bytes the device accepted
    /// (all of them unless it stalled or timed out part-way, which are errors).
    fn bulk_out(
        &self,
        endpoint: u8,
        data: &[u8],
        timeout: Duration,
    ) -> Result<usize, TransferError>;

    /// Clears a halt (STALL) on a bulk endpoint, resetting its data toggle.
    fn clear_halt(&self, endpoint: u8) -> Result<(), TransferError>;

    /// The maximum packet size of an endpoint of the claimed interface, if it has one by
    /// that address.
    fn max_packet_size(&self, endpoint: u8) -> Option<usize>;
}

impl<T: UsbTransport + ?Sized> UsbTransport for std::sync::Arc<T> {
    fn control_in(
        &self,
        request: ControlRequest,
        length: u16,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransferError> {
        (**self).control_in(request, length, timeout)
    }

    fn control_out(
        &self,
        request: ControlRequest,
        data: &[u8],
        timeout: Duration,
    ) -> Result<(), TransferError> {
        (**self).control_out(request, data, timeout)
    }

    fn bulk_in(
        &self,
        endpoint: u8,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<usize, TransferError> {
        (**self).bulk_in(endpoint, buf, timeout)
    }

    fn bulk_out(
        &self,
        endpoint: u8,
        data: &[u8],
        timeout: Duration,
    ) -> Result<usize, TransferError> {
        (**self).bulk_out(endpoint, data, timeout)
    }

    fn clear_halt(&self, endpoint: u8) -> Result<(), TransferError> {
        (**self).clear_halt(endpoint)
    }

    fn max_packet_size(&self, endpoint: u8) -> Option<usize> {
        (**self).max_packet_size(endpoint)
    }
}
