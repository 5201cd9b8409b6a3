//! Opening a USB device through usbfs and claiming one of its interfaces: [`UsbDevice`]
//! and [`ClaimedInterface`], the [`UsbTransport`] drivers run on.
//!
//! ## Claiming and kernel drivers
//!
//! A kernel driver bound to an interface (`usb-storage`, `ftdi_sio`) owns it: claiming
//! without `force` refuses, naming the driver. With `force` the driver is detached and the
//! interface claimed in one step (`USBDEVFS_DISCONNECT_CLAIM`), and when the
//! [`ClaimedInterface`] is dropped the interface is released and the kernel is asked to
//! bind its driver again (`USBDEVFS_CONNECT`). An interface nobody had is claimed and
//! released without asking the kernel to probe it.
//!
//! ## Unplugging
//!
//! A device can go away at any moment. Transfers on a device that is gone fail with
//! [`TransferError::Disconnected`] (never hang: each has its timeout), and
//! [`UsbDevice::is_connected`] says whether it is still there. A device that comes back is
//! a new device (new device number, new usbfs node): find it again by its address and
//! open it again; the old [`UsbDevice`] stays disconnected.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nusb::transfer::{Buffer, Bulk, ControlIn, ControlOut, ControlType, In, Out};
use nusb::MaybeFuture;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::address::UsbAddress;
use crate::descriptor::{self, ConfigurationDescriptor, DeviceDescriptor, InterfaceDescriptor};
use crate::error::{Result, UsbError};
use crate::sysfs::{self, UsbDeviceSummary};
use crate::transport::{ControlRequest, Recipient, RequestType, TransferError, UsbTransport};
use crate::usbfs::{self, InterfaceOwner};

/// How long a transfer that was cancelled at its timeout may take to come back from the
/// kernel before the endpoint is reported stuck.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Buffers up to this size are kept for the next transfer on their endpoint; larger ones
/// are freed after use.
const KEPT_BUFFER_LIMIT: usize = 4 << 20;

/// An open USB device (its usbfs node). Cheap to clone; closed when the last clone and
/// every [`ClaimedInterface`] of it are dropped.
#[derive(Clone)]
pub struct UsbDevice {
    inner: Arc<DeviceInner>,
}

struct DeviceInner {
    nusb: nusb::Device,
    /// A second descriptor of the same open file, for the calls nusb does not offer.
    fd: OwnedFd,
    path: Option<PathBuf>,
    summary: Option<UsbDeviceSummary>,
    device_descriptor: DeviceDescriptor,
    configurations: Vec<ConfigurationDescriptor>,
}

impl std::fmt::Debug for UsbDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsbDevice")
            .field("path", &self.inner.path)
            .field("vendor_id", &self.inner.device_descriptor.vendor_id)
            .field("product_id", &self.inner.device_descriptor.product_id)
            .finish()
    }
}

impl UsbDevice {
    /// Opens the one device `address` names (needs root, or write permission on its
    /// usbfs node).
    pub fn open(address: &UsbAddress) -> Result<UsbDevice> {
        let summary = sysfs::find(address)?;
        let path = summary.usbfs_path();
        let mut device = UsbDevice::open_path(&path)?;
        if let Some(inner) = Arc::get_mut(&mut device.inner) {
            inner.summary = Some(summary);
        }
        Ok(device)
    }

    /// Opens a usbfs node, `/dev/bus/usb/BBB/DDD`.
    pub fn open_path(path: &Path) -> Result<UsbDevice> {
        let fd = rustix::fs::open(path, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()).map_err(
            |errno| match errno {
                Errno::ACCESS | Errno::PERM => UsbError::PermissionDenied {
                    path: path.to_owned(),
                    source: errno.into(),
                },
                Errno::NOENT | Errno::NODEV | Errno::NXIO => UsbError::Disconnected,
                errno => UsbError::io("opening", path, errno.into()),
            },
        )?;
        // nusb opens the node itself when its enumeration has it, which lets it read the
        // active configuration from sysfs; wrapping a descriptor instead makes it ask
        // the device (GET_CONFIGURATION, with a 50 ms timeout that slow emulated
        // controllers miss).
        let nusb = match enumerated(path) {
            Some(info) => info
                .open()
                .wait()
                .map_err(|source| nusb_open_error(path, source))?,
            None => {
                let copy = fd
                    .try_clone()
                    .map_err(|e| UsbError::io("duplicating the descriptor of", path, e))?;
                nusb::Device::from_fd(copy)
                    .wait()
                    .map_err(|source| nusb_open_error(path, source))?
            }
        };
        let mut device = UsbDevice::with(fd, nusb)?;
        if let Some(inner) = Arc::get_mut(&mut device.inner) {
            inner.path = Some(path.to_owned());
        }
        Ok(device)
    }

    /// Wraps an open usbfs node, for a process that may not open it itself (ring3d opens
    /// it and hands the descriptor over).
    pub fn from_fd(fd: OwnedFd) -> Result<UsbDevice> {
        let own = fd
            .try_clone()
            .map_err(|e| UsbError::io("duplicating the descriptor of", "usbfs node", e))?;
        let nusb = nusb::Device::from_fd(fd)
            .wait()
            .map_err(|source| nusb_open_error(Path::new("usbfs node"), source))?;
        UsbDevice::with(own, nusb)
    }

    fn with(fd: OwnedFd, nusb: nusb::Device) -> Result<UsbDevice> {
        let blob = usbfs::read_descriptors(&fd)
            .map_err(|e| UsbError::io("reading the descriptors from", "usbfs node", e))?;
        let (device_descriptor, configurations) = descriptor::parse_descriptors(&blob)?;
        Ok(UsbDevice {
            inner: Arc::new(DeviceInner {
                nusb,
                fd,
                path: None,
                summary: None,
                device_descriptor,
                configurations,
            }),
        })
    }

    /// The usbfs node, if the device was opened by path or address.
    pub fn usbfs_path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// What sysfs said about the device when it was opened by address.
    pub fn summary(&self) -> Option<&UsbDeviceSummary> {
        self.inner.summary.as_ref()
    }

    /// The device descriptor.
    pub fn device_descriptor(&self) -> &DeviceDescriptor {
        &self.inner.device_descriptor
    }

    /// Every configuration the device has.
    pub fn configurations(&self) -> &[ConfigurationDescriptor] {
        &self.inner.configurations
    }

    /// The configuration the device is in.
    pub fn active_configuration(&self) -> Result<&ConfigurationDescriptor> {
        let value = self
            .inner
            .nusb
            .active_configuration()
            .map_err(|_| UsbError::NotConfigured)?
            .configuration_value();
        self.inner
            .configurations
            .iter()
            .find(|c| c.value == value)
            .ok_or(UsbError::NotConfigured)
    }

    /// Whether the device is still there. Once it is gone it stays gone: a device that
    /// is plugged in again must be opened again.
    pub fn is_connected(&self) -> bool {
        !matches!(usbfs::interface_owner(&self.inner.fd, 0), Err(Errno::NODEV))
    }

    /// The kernel driver bound to `interface`, if any (`usbfs` when a process claimed it).
    pub fn kernel_driver(&self, interface: u8) -> Result<Option<String>> {
        match usbfs::interface_owner(&self.inner.fd, interface) {
            Ok(InterfaceOwner::Nobody) => Ok(None),
            Ok(InterfaceOwner::Usbfs) => Ok(Some("usbfs".into())),
            Ok(InterfaceOwner::KernelDriver(name)) => Ok(Some(name)),
            Err(Errno::NODEV) => Err(UsbError::Disconnected),
            Err(errno) => Err(UsbError::io(
                "asking for the kernel driver of an interface of",
                self.describe(),
                errno.into(),
            )),
        }
    }

    /// The number of the first interface (alternate setting 0) of the active
    /// configuration with this class, subclass and protocol.
    pub fn find_interface(&self, class: u8, subclass: u8, protocol: u8) -> Result<u8> {
        self.active_configuration()?
            .interfaces
            .iter()
            .find(|i| {
                i.alternate_setting == 0
                    && (i.class, i.subclass, i.protocol) == (class, subclass, protocol)
            })
            .map(|i| i.number)
            .ok_or(UsbError::NoInterfaceOfClass {
                class,
                subclass,
                protocol,
            })
    }

    /// Claims `interface` for this process. A kernel driver bound to it is detached only
    /// if `force` (and re-attached when the [`ClaimedInterface`] is dropped); without
    /// `force` that is [`UsbError::KernelDriverBound`]. An interface another process has
    /// claimed is [`UsbError::Busy`].
    pub fn claim(&self, interface: u8, force: bool) -> Result<ClaimedInterface> {
        let config = self.active_configuration()?;
        let Some(descriptor) = config.interface(interface, 0).cloned() else {
            let mut numbers: Vec<u8> = config.interfaces.iter().map(|i| i.number).collect();
            numbers.dedup();
            return Err(UsbError::NoSuchInterface {
                interface,
                available: numbers
                    .iter()
                    .map(u8::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let owner = match usbfs::interface_owner(&self.inner.fd, interface) {
            Ok(owner) => owner,
            Err(Errno::NODEV) => return Err(UsbError::Disconnected),
            Err(errno) => {
                return Err(UsbError::io(
                    "asking for the kernel driver of an interface of",
                    self.describe(),
                    errno.into(),
                ))
            }
        };
        let detached_driver = match owner {
            InterfaceOwner::Usbfs => return Err(UsbError::Busy { interface }),
            InterfaceOwner::KernelDriver(driver) if !force => {
                return Err(UsbError::KernelDriverBound { interface, driver })
            }
            InterfaceOwner::KernelDriver(driver) => Some(driver),
            InterfaceOwner::Nobody => None,
        };
        let claimed = if detached_driver.is_some() {
            // nusb asks the kernel to bind a driver again when this interface is released.
            self.inner.nusb.detach_and_claim_interface(interface).wait()
        } else {
            self.inner.nusb.claim_interface(interface).wait()
        };
        let nusb_interface = claimed.map_err(|source| match source.kind() {
            nusb::ErrorKind::Disconnected => UsbError::Disconnected,
            nusb::ErrorKind::Busy => {
                // Someone got there between the check and the claim.
                match usbfs::interface_owner(&self.inner.fd, interface) {
                    Ok(InterfaceOwner::KernelDriver(driver)) => {
                        UsbError::KernelDriverBound { interface, driver }
                    }
                    _ => UsbError::Busy { interface },
                }
            }
            _ => UsbError::Nusb {
                what: format!("claiming interface {interface}"),
                source,
            },
        })?;
        if let Some(driver) = &detached_driver {
            tracing::info!(interface, driver, "detached the kernel driver");
        }

        let mut endpoints = Vec::new();
        for endpoint in &descriptor.endpoints {
            if endpoint.transfer_type() != descriptor::TransferType::Bulk {
                continue;
            }
            let opened = match endpoint.direction() {
                descriptor::Direction::In => nusb_interface
                    .endpoint::<Bulk, In>(endpoint.address)
                    .map(|ep| EndpointState::BulkIn { ep, buffer: None }),
                descriptor::Direction::Out => nusb_interface
                    .endpoint::<Bulk, Out>(endpoint.address)
                    .map(|ep| EndpointState::BulkOut { ep, buffer: None }),
            };
            let state = opened.map_err(|source| UsbError::Nusb {
                what: format!(
                    "opening endpoint {:#04x} of interface {interface}",
                    endpoint.address
                ),
                source,
            })?;
            endpoints.push(EndpointSlot {
                address: endpoint.address,
                max_packet_size: endpoint.max_packet_bytes(),
                state: Mutex::new(state),
            });
        }

        Ok(ClaimedInterface {
            endpoints,
            interface: nusb_interface,
            device: self.clone(),
            descriptor,
            detached_driver,
        })
    }

    /// Detaches the kernel driver bound to `interface` without claiming it, for a
    /// supervisor that hands the device to another process (which then claims it). It
    /// stays detached until [`UsbDevice::attach_kernel_driver`].
    pub fn detach_kernel_driver(&self, interface: u8) -> Result<()> {
        self.inner
            .nusb
            .detach_kernel_driver(interface)
            .map_err(|source| match source.kind() {
                nusb::ErrorKind::Disconnected => UsbError::Disconnected,
                _ => UsbError::Nusb {
                    what: format!("detaching the kernel driver of interface {interface}"),
                    source,
                },
            })
    }

    /// Asks the kernel to bind a driver to `interface` again (after
    /// [`UsbDevice::detach_kernel_driver`]).
    pub fn attach_kernel_driver(&self, interface: u8) -> Result<()> {
        self.inner
            .nusb
            .attach_kernel_driver(interface)
            .map_err(|source| match source.kind() {
                nusb::ErrorKind::Disconnected => UsbError::Disconnected,
                _ => UsbError::Nusb {
                    what: format!("attaching a kernel driver to interface {interface}"),
                    source,
                },
            })
    }

    /// A new descriptor of the device's usbfs file, to hand to another process (which
    /// rebuilds the device with [`UsbDevice::from_fd`]).
    pub fn try_clone_fd(&self) -> std::io::Result<OwnedFd> {
        self.inner.fd.try_clone()
    }

    fn describe(&self) -> PathBuf {
        self.inner
            .path
            .clone()
            .unwrap_or_else(|| PathBuf::from("usbfs node"))
    }
}

/// The bulk endpoints a driver of a bulk-only interface needs (mass storage, serial
/// adapters): the first bulk IN and the first bulk OUT endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkEndpoints {
    /// The interface number.
    pub interface: u8,
    /// Address of the bulk IN endpoint (bit 7 set).
    pub bulk_in: u8,
    /// Address of the bulk OUT endpoint.
    pub bulk_out: u8,
    /// Largest packet of the IN endpoint, in bytes.
    pub max_packet_in: usize,
    /// Largest packet of the OUT endpoint, in bytes.
    pub max_packet_out: usize,
}

impl BulkEndpoints {
    /// The first bulk IN and OUT endpoints of an interface descriptor.
    pub fn of(interface: &InterfaceDescriptor) -> Result<BulkEndpoints> {
        let missing = |direction| UsbError::NoBulkEndpoint {
            interface: interface.number,
            direction,
        };
        let bulk_in = interface
            .first_bulk(descriptor::Direction::In)
            .ok_or_else(|| missing("IN"))?;
        let bulk_out = interface
            .first_bulk(descriptor::Direction::Out)
            .ok_or_else(|| missing("OUT"))?;
        Ok(BulkEndpoints {
            interface: interface.number,
            bulk_in: bulk_in.address,
            bulk_out: bulk_out.address,
            max_packet_in: bulk_in.max_packet_bytes(),
            max_packet_out: bulk_out.max_packet_bytes(),
        })
    }
}

struct EndpointSlot {
    address: u8,
    max_packet_size: usize,
    state: Mutex<EndpointState>,
}

/// An open endpoint and the buffer kept for its next transfer.
enum EndpointState {
    BulkIn {
        ep: nusb::Endpoint<Bulk, In>,
        buffer: Option<Buffer>,
    },
    BulkOut {
        ep: nusb::Endpoint<Bulk, Out>,
        buffer: Option<Buffer>,
    },
}

/// An interface claimed by this process: the [`UsbTransport`] its driver runs on.
///
/// Each bulk endpoint has its own lock, so one thread may read while another writes.
/// Dropping it releases the interface and, if claiming detached a kernel driver, asks
/// the kernel to bind it again.
///
/// Bulk IN transfers ask the device for `buf.len()` rounded up to a whole number of
/// packets; if the device sends more than `buf.len()` the call fails with
/// [`TransferError::Fault`] and no byte past `buf` is touched. When a bulk IN times out
/// after part of the data arrived, the bytes that arrived are returned rather than lost.
pub struct ClaimedInterface {
    // Dropped before `interface`: nusb releases the interface when its last endpoint goes.
    endpoints: Vec<EndpointSlot>,
    interface: nusb::Interface,
    device: UsbDevice,
    descriptor: InterfaceDescriptor,
    detached_driver: Option<String>,
}

/// nusb's entry for the usbfs node `/dev/bus/usb/BBB/DDD`, if it lists one.
fn enumerated(path: &Path) -> Option<nusb::DeviceInfo> {
    let mut parts = path.strip_prefix("/dev/bus/usb").ok()?.iter();
    let bus: u8 = parts.next()?.to_str()?.parse().ok()?;
    let number: u8 = parts.next()?.to_str()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    nusb::list_devices()
        .wait()
        .ok()?
        .find(|info| info.busnum() == bus && info.device_address() == number)
}

fn nusb_open_error(path: &Path, source: nusb::Error) -> UsbError {
    match source.kind() {
        nusb::ErrorKind::Disconnected => UsbError::Disconnected,
        nusb::ErrorKind::PermissionDenied => UsbError::PermissionDenied {
            path: path.to_owned(),
            source: source.into(),
        },
        _ => UsbError::Nusb {
            what: format!("opening {}", path.display()),
            source,
        },
    }
}

/// The usbfs implementation of [`UsbTransport`] (over nusb).
pub type NusbTransport = ClaimedInterface;

impl std::fmt::Debug for ClaimedInterface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimedInterface")
            .field("device", &self.device)
            .field("interface", &self.descriptor.number)
            .field("detached_driver", &self.detached_driver)
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic on another thread mid-transfer leaves the endpoint state consistent
    // (buffers are only swapped whole), so the lock stays usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ClaimedInterface {
    /// The interface number.
    pub fn number(&self) -> u8 {
        self.descriptor.number
    }

    /// The device it belongs to.
    pub fn device(&self) -> &UsbDevice {
        &self.device
    }

    /// Its descriptor (alternate setting 0) with its endpoints.
    pub fn descriptor(&self) -> &InterfaceDescriptor {
        &self.descriptor
    }

    /// The kernel driver claiming detached, which dropping this re-attaches.
    pub fn detached_driver(&self) -> Option<&str> {
        self.detached_driver.as_deref()
    }

    /// The first bulk IN and OUT endpoints of the interface.
    pub fn bulk_endpoints(&self) -> Result<BulkEndpoints> {
        BulkEndpoints::of(&self.descriptor)
    }

    fn slot(&self, endpoint: u8) -> Result<&EndpointSlot, TransferError> {
        self.endpoints
            .iter()
            .find(|slot| slot.address == endpoint)
            .ok_or_else(|| {
                TransferError::Other(format!(
                    "interface {} has no bulk endpoint {endpoint:#04x}",
                    self.descriptor.number
                ))
            })
    }

    /// nusb's view of a failed transfer in ours. Errors a vanished device can cause are
    /// checked against whether it is still there.
    fn transfer_error(&self, error: nusb::transfer::TransferError) -> TransferError {
        use nusb::transfer::TransferError as Nusb;
        let error = match error {
            Nusb::Cancelled => TransferError::Timeout,
            Nusb::Stall => TransferError::Stall,
            Nusb::Disconnected => TransferError::Disconnected,
            Nusb::Fault => TransferError::Fault,
            Nusb::InvalidArgument => TransferError::Other("invalid argument (EINVAL)".into()),
            Nusb::Unknown(code) => TransferError::Other(format!(
                "{}",
                std::io::Error::from_raw_os_error(i32::try_from(code).unwrap_or(i32::MAX))
            )),
        };
        match error {
            TransferError::Fault | TransferError::Other(_) | TransferError::Timeout
                if !self.device.is_connected() =>
            {
                TransferError::Disconnected
            }
            error => error,
        }
    }

    fn gone_or(&self, error: TransferError) -> TransferError {
        if self.device.is_connected() {
            error
        } else {
            TransferError::Disconnected
        }
    }
}

/// Waits for the one transfer in flight on an endpoint: until `timeout`, then cancels
/// it and waits a little longer for the kernel to hand it back. `None` if even that did
/// not come (the transfer stays queued; the next call collects it first).
fn complete<E, D>(
    ep: &mut nusb::Endpoint<E, D>,
    timeout: Duration,
) -> Option<nusb::transfer::Completion>
where
    E: nusb::transfer::BulkOrInterrupt,
    D: nusb::transfer::EndpointDirection,
{
    if let Some(done) = ep.wait_next_complete(timeout) {
        return Some(done);
    }
    ep.cancel_all();
    ep.wait_next_complete(CANCEL_GRACE)
}

/// Collects transfers a previous call gave up on; false if one is still in flight.
fn drain<E, D>(ep: &mut nusb::Endpoint<E, D>) -> bool
where
    E: nusb::transfer::BulkOrInterrupt,
    D: nusb::transfer::EndpointDirection,
{
    while ep.pending() > 0 {
        ep.cancel_all();
        if ep.wait_next_complete(CANCEL_GRACE).is_none() {
            return false;
        }
    }
    true
}

fn round_up(len: usize, packet: usize) -> usize {
    if packet == 0 {
        return len;
    }
    len.div_ceil(packet).saturating_mul(packet)
}

fn stuck(endpoint: u8) -> TransferError {
    TransferError::Other(format!(
        "a cancelled transfer on endpoint {endpoint:#04x} never came back from the kernel"
    ))
}

fn control_type(request_type: RequestType) -> ControlType {
    match request_type {
        RequestType::Standard => ControlType::Standard,
        RequestType::Class => ControlType::Class,
        RequestType::Vendor => ControlType::Vendor,
    }
}

fn recipient(recipient: Recipient) -> nusb::transfer::Recipient {
    match recipient {
        Recipient::Device => nusb::transfer::Recipient::Device,
        Recipient::Interface => nusb::transfer::Recipient::Interface,
        Recipient::Endpoint => nusb::transfer::Recipient::Endpoint,
        Recipient::Other => nusb::transfer::Recipient::Other,
    }
}

impl UsbTransport for ClaimedInterface {
    fn control_in(
        &self,
        request: ControlRequest,
        length: u16,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransferError> {
        let data = self
            .interface
            .control_in(
                ControlIn {
                    control_type: control_type(request.request_type),
                    recipient: recipient(request.recipient),
                    request: request.request,
                    value: request.value,
                    index: request.index,
                    length,
                },
                timeout,
            )
            .wait()
            .map_err(|e| self.transfer_error(e))?;
        if data.len() > usize::from(length) {
            return Err(TransferError::Fault);
        }
        Ok(data)
    }

    fn control_out(
        &self,
        request: ControlRequest,
        data: &[u8],
        timeout: Duration,
    ) -> Result<(), TransferError> {
        if data.len() > usize::from(u16::MAX) {
            return Err(TransferError::Other(format!(
                "a control transfer carries at most 65535 bytes, not {}",
                data.len()
            )));
        }
        self.interface
            .control_out(
                ControlOut {
                    control_type: control_type(request.request_type),
                    recipient: recipient(request.recipient),
                    request: request.request,
                    value: request.value,
                    index: request.index,
                    data,
                },
                timeout,
            )
            .wait()
            .map_err(|e| self.transfer_error(e))
    }

    fn bulk_in(
        &self,
        endpoint: u8,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<usize, TransferError> {
        let slot = self.slot(endpoint)?;
        let mut state = lock(&slot.state);
        let EndpointState::BulkIn { ep, buffer } = &mut *state else {
            return Err(TransferError::Other(format!(
                "endpoint {endpoint:#04x} is not a bulk IN endpoint"
            )));
        };
        if buf.is_empty() {
            return Ok(0);
        }
        if !drain(ep) {
            return Err(self.gone_or(stuck(endpoint)));
        }
        let requested = round_up(buf.len(), slot.max_packet_size);
        if u32::try_from(requested).is_err() {
            return Err(TransferError::Other(format!(
                "a bulk transfer of {requested} bytes is too large"
            )));
        }
        let mut transfer = match buffer.take() {
            Some(kept) if kept.capacity() >= requested => kept,
            _ => ep.allocate(requested),
        };
        transfer.clear();
        transfer.set_requested_len(requested);
        ep.submit(transfer);
        let Some(done) = complete(ep, timeout) else {
            return Err(self.gone_or(stuck(endpoint)));
        };
        let received = done.actual_len.min(done.buffer.len());
        let result = if received > buf.len() {
            tracing::warn!(
                endpoint,
                received,
                asked = buf.len(),
                "the device sent more than asked for"
            );
            Err(TransferError::Fault)
        } else {
            match done.status {
                Ok(()) => Ok(received),
                // What arrived before the timeout is data; the caller gets it.
                Err(nusb::transfer::TransferError::Cancelled) if received > 0 => Ok(received),
                Err(error) => Err(self.transfer_error(error)),
            }
        };
        if let Ok(received) = result {
            buf[..received].copy_from_slice(&done.buffer[..received]);
        }
        if done.buffer.capacity() <= KEPT_BUFFER_LIMIT {
            *buffer = Some(done.buffer);
        }
        result
    }

    fn bulk_out(
        &self,
        endpoint: u8,
        data: &[u8],
        timeout: Duration,
    ) -> Result<usize, TransferError> {
        let slot = self.slot(endpoint)?;
        let mut state = lock(&slot.state);
        let EndpointState::BulkOut { ep, buffer } = &mut *state else {
            return Err(TransferError::Other(format!(
                "endpoint {endpoint:#04x} is not a bulk OUT endpoint"
            )));
        };
        if !drain(ep) {
            return Err(self.gone_or(stuck(endpoint)));
        }
        if u32::try_from(data.len()).is_err() {
            return Err(TransferError::Other(format!(
                "a bulk transfer of {} bytes is too large",
                data.len()
            )));
        }
        let mut transfer = match buffer.take() {
            Some(kept) if kept.capacity() >= data.len() => kept,
            _ => ep.allocate(data.len()),
        };
        transfer.clear();
        transfer.extend_from_slice(data);
        ep.submit(transfer);
        let Some(done) = complete(ep, timeout) else {
            return Err(self.gone_or(stuck(endpoint)));
        };
        let result = match done.status {
            Ok(()) => Ok(done.actual_len.min(data.len())),
            Err(error) => Err(self.transfer_error(error)),
        };
        if done.buffer.capacity() <= KEPT_BUFFER_LIMIT {
            *buffer = Some(done.buffer);
        }
        result
    }

    fn clear_halt(&self, endpoint: u8) -> Result<(), TransferError> {
        let slot = self.slot(endpoint)?;
        let mut state = lock(&slot.state);
        let result = match &mut *state {
            EndpointState::BulkIn { ep, .. } => {
                if !drain(ep) {
                    return Err(self.gone_or(stuck(endpoint)));
                }
                ep.clear_halt().wait()
            }
            EndpointState::BulkOut { ep, .. } => {
                if !drain(ep) {
                    return Err(self.gone_or(stuck(endpoint)));
                }
                ep.clear_halt().wait()
            }
        };
        result.map_err(|error| match error.kind() {
            nusb::ErrorKind::Disconnected => TransferError::Disconnected,
            _ => self.gone_or(TransferError::Other(format!(
                "clearing the halt of endpoint {endpoint:#04x}: {error}"
            ))),
        })
    }

    fn max_packet_size(&self, endpoint: u8) -> Option<usize> {
        self.descriptor
            .endpoint(endpoint)
            .map(|e| e.max_packet_bytes())
    }
}

impl AsFd for UsbDevice {
    /// The usbfs node (a duplicate of the descriptor nusb uses), e.g. to hand to another
    /// process.
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_whole_packets() {
        assert_eq!(round_up(1, 512), 512);
        assert_eq!(round_up(512, 512), 512);
        assert_eq!(round_up(513, 512), 1024);
        assert_eq!(round_up(31, 64), 64);
        assert_eq!(round_up(1 << 20, 512), 1 << 20);
        assert_eq!(round_up(7, 0), 7);
    }

    #[test]
    fn the_transport_is_send_and_sync() {
        fn check<T: UsbTransport>() {}
        check::<ClaimedInterface>();
        check::<Arc<ClaimedInterface>>();
    }

    #[test]
    fn bulk_endpoints_come_from_the_descriptor() {
        let interface = InterfaceDescriptor {
            number: 2,
            alternate_setting: 0,
            num_endpoints: 3,
            class: 0xff,
            subclass: 0xff,
            protocol: 0xff,
            string_index: 0,
            endpoints: vec![
                descriptor::EndpointDescriptor {
                    address: 0x83,
                    attributes: 3,
                    max_packet_size: 8,
                    interval: 1,
                },
                descriptor::EndpointDescriptor {
                    address: 0x81,
                    attributes: 2,
                    max_packet_size: 64,
                    interval: 0,
                },
                descriptor::EndpointDescriptor {
                    address: 0x02,
                    attributes: 2,
                    max_packet_size: 0x1200,
                    interval: 0,
                },
            ],
        };
        assert_eq!(
            BulkEndpoints::of(&interface).unwrap(),
            BulkEndpoints {
                interface: 2,
                bulk_in: 0x81,
                bulk_out: 0x02,
                max_packet_in: 64,
                max_packet_out: 0x200,
            }
        );
        let only_interrupt = InterfaceDescriptor {
            endpoints: interface.endpoints[..1].to_vec(),
            ..interface
        };
        let error = BulkEndpoints::of(&only_interrupt).unwrap_err().to_string();
        assert_eq!(error, "interface 2 has no bulk IN endpoint");
    }
}
