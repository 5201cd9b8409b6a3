//! PCI devices as Linux shows them in sysfs: finding them, reading their IDs, BARs and
//! IOMMU groups, and handing them to vfio-pci and back.
//!
//! Everything here reads and writes files under a [`Sysfs`] root, `/sys` on a real
//! machine and a fixture tree in tests, so the parsing and the refusal rules are tested
//! without hardware.
//!
//! ```no_run
//! use ring3::pci::{PciAddress, Sysfs};
//!
//! # fn main() -> ring3::Result<()> {
//! let sysfs = Sysfs::system();
//! for device in sysfs.devices()? {
//!     println!("{} {:04x}:{:04x} {}", device.address, device.vendor_id, device.device_id,
//!              device.class_name());
//! }
//! let address: PciAddress = "0000:00:03.0".parse()?;
//! sysfs.bind_to_vfio(address, false)?; // refuses if the device is in use
//! # Ok(()) }
//! ```
//!
//! Concepts:
//! - a device's [IOMMU group](https://docs.kernel.org/driver-api/vfio.html#groups-devices-and-iommus)
//!   is the unit VFIO hands out: every device in it must be bound to vfio-pci (or to no
//!   driver, or be a PCIe port) before any of them can be opened;
//! - binding uses `driver_override`, so the choice holds only until the device is
//!   unbound or the machine reboots; ring3 remembers the driver it took the device from
//!   in a small state file so that another process can give it back.

mod address;
mod bind;
mod class;
mod device;

pub use address::PciAddress;
pub use bind::{BindOutcome, UnbindOutcome};
pub use device::{BarInfo, BarKind, PciDevice, Sysfs};

#[cfg(test)]
mod fixture;
#[cfg(test)]
mod tests;
