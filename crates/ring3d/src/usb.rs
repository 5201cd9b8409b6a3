//! USB devices in ring3d: finding a configured device, opening its usbfs node for a new
//! driver process (detaching a kernel driver when the config allows it), giving it back,
//! and the pseudo-terminal serial drivers are bridged to.
//!
//! ring3d opens a fresh usbfs file for every driver process and keeps no copy: when a
//! driver dies, its file closes with it, which cancels the transfers it had in flight
//! and releases its claims, so the next driver starts clean.

use std::fmt;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

use ring3_usb::{UsbAddress, UsbDevice, UsbDeviceSummary};

use crate::config::Driver;

/// Where the stable links to serial drivers' terminals go: `ttyUSB-<serial>`.
pub const TTY_DIR: &str = "/run/ring3";

/// USB mass storage over the Bulk-Only Transport with SCSI: class, subclass, protocol.
const MASS_STORAGE: (u8, u8, u8) = (0x08, 0x06, 0x50);

/// A kernel driver ring3d detached from an interface, to be attached again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detached {
    /// The interface.
    pub interface: u8,
    /// The kernel driver that had it (`usb-storage`, `ftdi_sio`).
    pub kernel_driver: String,
}

/// The USB device a driver was last started on.
#[derive(Debug)]
pub struct Opened {
    address: UsbAddress,
    summary: UsbDeviceSummary,
    /// The device's serial number string, if it has one.
    pub serial: Option<String>,
    /// The kernel driver ring3d detached, if any.
    pub detached: Option<Detached>,
}

impl fmt::Display for Opened {
    /// `usb 46f4:0001:R3RAW (bus 3 device 2, port 3-1)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "usb {} (bus {} device {}, port {})",
            self.address, self.summary.bus, self.summary.device_number, self.summary.port_path
        )
    }
}

impl Opened {
    /// Attaches the kernel driver ring3d detached again; returns its name, `None` if
    /// there was none (or the device is gone, taking the question with it).
    pub fn give_back(self) -> Result<Option<String>, String> {
        let Some(detached) = self.detached else {
            return Ok(None);
        };
        let Ok(summary) = ring3_usb::find(&self.address) else {
            return Ok(None);
        };
        let device = UsbDevice::open_path(&summary.usbfs_path()).map_err(|e| e.to_string())?;
        device
            .attach_kernel_driver(detached.interface)
            .map_err(|e| format!("attaching {}: {e}", detached.kernel_driver))?;
        tracing::info!(
            interface = detached.interface,
            kernel_driver = %detached.kernel_driver,
            "kernel driver attached again"
        );
        Ok(Some(detached.kernel_driver))
    }
}

/// Whether the device `address` names is plugged in.
pub fn present(address: &UsbAddress) -> bool {
    ring3_usb::find(address).is_ok()
}

/// The interface a driver takes on a device.
fn interface_for(driver: Driver, summary: &UsbDeviceSummary) -> Result<u8, String> {
    match driver {
        Driver::UsbStorage => summary
            .interfaces
            .iter()
            .find(|i| (i.class, i.subclass, i.protocol) == MASS_STORAGE)
            .map(|i| i.number)
            .ok_or_else(|| {
                format!(
                    "{:04x}:{:04x} has no USB mass storage interface with SCSI over the \
                     Bulk-Only Transport (class 08h, subclass 06h, protocol 50h)",
                    summary.vendor_id, summary.product_id
                )
            }),
        Driver::Ftdi => summary
            .interfaces
            .first()
            .map(|i| i.number)
            .ok_or_else(|| "the device has no interface".to_string()),
        other => Err(format!("{} is not a USB driver", other.name())),
    }
}

/// Finds the device and opens its usbfs node for a new driver. A kernel driver bound
/// to the interface the driver needs is detached if `force`, else it is an error that
/// says so. `detached_before` is what an earlier start detached (kept so that it is
/// given back on stop even if the kernel driver is no longer bound now).
pub fn open(
    address: &UsbAddress,
    driver: Driver,
    force: bool,
    detached_before: Option<Detached>,
) -> Result<(OwnedFd, Opened), String> {
    let summary = ring3_usb::find(address).map_err(|e| e.to_string())?;
    let interface = interface_for(driver, &summary)?;
    let bound = summary
        .interface(interface)
        .and_then(|i| i.driver.clone())
        .filter(|name| name != "usbfs");
    if let (Some(kernel_driver), false) = (&bound, force) {
        return Err(format!(
            "interface {interface} of usb {address} is bound to the kernel driver \
             {kernel_driver}; set force = true for the device in the config to let ring3d \
             detach it (it is attached again when ring3d stops)"
        ));
    }
    let device = UsbDevice::open_path(&summary.usbfs_path()).map_err(|e| e.to_string())?;
    let mut detached = detached_before;
    if let Some(kernel_driver) = bound {
        device
            .detach_kernel_driver(interface)
            .map_err(|e| format!("detaching the kernel driver {kernel_driver}: {e}"))?;
        tracing::info!(interface, %kernel_driver, "kernel driver detached");
        detached = Some(Detached {
            interface,
            kernel_driver,
        });
    }
    let fd = device
        .try_clone_fd()
        .map_err(|e| format!("duplicating the usbfs file: {e}"))?;
    let serial = summary.serial.clone();
    Ok((
        fd,
        Opened {
            address: address.clone(),
            summary,
            serial,
            detached,
        },
    ))
}

/// A serial driver's pseudo-terminal and its stable link; both go away when dropped.
pub struct PtyExposure {
    pty: ring3_ftdi::serial::Pty,
    path: String,
    link: ring3_ftdi::serial::Link,
}

impl PtyExposure {
    /// Opens a new terminal at `baud` and links `<dir>/ttyUSB-<label>` to it. The
    /// terminal's settings are the port's: the driver applies them, and what applications
    /// set later stays with the terminal across driver restarts.
    pub fn create(dir: &Path, label: &str, baud: u32) -> Result<PtyExposure, String> {
        let pty = ring3_ftdi::serial::Pty::open()
            .map_err(|e| format!("creating the pseudo-terminal: {e}"))?;
        ring3_ftdi::serial::set_baud(pty.master(), baud)
            .map_err(|e| format!("setting the terminal to {baud} baud: {e}"))?;
        let link_path = dir.join(format!("ttyUSB-{}", link_label(label)));
        let link = ring3_ftdi::serial::link(&link_path, pty.slave_path())
            .map_err(|e| format!("linking {} to the terminal: {e}", link_path.display()))?;
        let path = pty.slave_path().display().to_string();
        Ok(PtyExposure { pty, path, link })
    }

    /// The terminal's path, `/dev/pts/N`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The master side, for the driver.
    pub fn master(&self) -> BorrowedFd<'_> {
        self.pty.master()
    }

    /// What `ring3 status` shows: the terminal and its link.
    pub fn exposed(&self) -> Vec<String> {
        vec![
            self.path().to_string(),
            self.link.path().display().to_string(),
        ]
    }
}

/// A serial number as a file name: characters other than letters, digits, `-`, `_` and
/// `.` become `_` (a device chooses its serial string; it must not name a path).
fn link_label(label: &str) -> String {
    let cleaned: String = label
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match cleaned.as_str() {
        "" | "." | ".." => "unnamed".into(),
        _ => cleaned,
    }
}

#[cfg(test)]
mod tests {
    use super::link_label;

    #[test]
    fn serial_numbers_cannot_escape_the_link_directory() {
        assert_eq!(link_label("R3SERECHO"), "R3SERECHO");
        assert_eq!(link_label("../../etc/passwd"), ".._.._etc_passwd");
        assert_eq!(link_label(".."), "unnamed");
        assert_eq!(link_label(""), "unnamed");
        assert_eq!(link_label("a b/c"), "a_b_c");
        assert_eq!(link_label(&"x".repeat(100)).len(), 64);
    }
}
