//! `ring3 list`, `ring3 bind` and `ring3 unbind`.

use std::io::{self, Write};

use clap::Args;
use ring3::pci::{BarKind, BindOutcome, PciAddress, PciDevice, Sysfs, UnbindOutcome};
use serde::Serialize;

/// Arguments of `ring3 list`.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print a JSON array of devices (with BARs and NUMA node) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `ring3 bind`.
#[derive(Args, Debug)]
pub struct BindArgs {
    /// PCI address of the device, DDDD:BB:DD.F or BB:DD.F (see `ring3 list`).
    pub address: PciAddress,
    /// Bind even if the device is in use (mounted file systems, network interfaces up):
    /// its users lose it.
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `ring3 unbind`.
#[derive(Args, Debug)]
pub struct UnbindArgs {
    /// PCI address of the device, DDDD:BB:DD.F or BB:DD.F (see `ring3 list`).
    pub address: PciAddress,
}

pub fn list(args: ListArgs) -> Result<(), Box<dyn std::error::Error>> {
    let devices = Sysfs::system().devices()?;
    let text = if args.json {
        let mut json = serde_json::to_string_pretty(&devices_json(&devices))?;
        json.push('\n');
        json
    } else {
        table(&devices)
    };
    write_stdout(&text)
}

pub fn bind(args: BindArgs) -> ring3::Result<()> {
    let outcome = Sysfs::system().bind_to_vfio(args.address, args.force)?;
    println!("{}", describe_bind(args.address, &outcome));
    Ok(())
}

pub fn unbind(args: UnbindArgs) -> ring3::Result<()> {
    let outcome = Sysfs::system().unbind_from_vfio(args.address)?;
    println!("{}", describe_unbind(args.address, &outcome));
    Ok(())
}

/// Writes to standard output; a closed pipe (`ring3 list | head`) is not an error.
fn write_stdout(text: &str) -> Result<(), Box<dyn std::error::Error>> {
    match io::stdout().lock().write_all(text.as_bytes()) {
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        result => Ok(result?),
    }
}

fn driver_name(driver: Option<&str>) -> &str {
    driver.unwrap_or("(no driver)")
}

fn describe_bind(address: PciAddress, outcome: &BindOutcome) -> String {
    match outcome {
        BindOutcome::AlreadyBound => format!("{address}: already bound to vfio-pci"),
        BindOutcome::Bound { previous_driver } => {
            format!(
                "{address}: {} → vfio-pci",
                driver_name(previous_driver.as_deref())
            )
        }
    }
}

fn describe_unbind(address: PciAddress, outcome: &UnbindOutcome) -> String {
    match outcome {
        UnbindOutcome::NotBound { driver } => format!(
            "{address}: not bound to vfio-pci (driver: {}); nothing to do",
            driver_name(driver.as_deref())
        ),
        UnbindOutcome::Released { driver } => {
            format!("{address}: vfio-pci → {}", driver_name(driver.as_deref()))
        }
    }
}

/// An lspci-like table: address, vendor:device, class, driver, IOMMU group.
fn table(devices: &[PciDevice]) -> String {
    let header = ["ADDRESS", "ID", "CLASS", "DRIVER", "GROUP"].map(String::from);
    let rows: Vec<[String; 5]> = devices
        .iter()
        .map(|device| {
            [
                device.address.to_string(),
                format!("{:04x}:{:04x}", device.vendor_id, device.device_id),
                device.class_name().to_string(),
                device.driver.clone().unwrap_or_else(|| "-".into()),
                device
                    .iommu_group
                    .map_or_else(|| "-".into(), |group| group.to_string()),
            ]
        })
        .collect();
    let mut widths = [0; 5];
    for row in std::iter::once(&header).chain(&rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (column, (cell, width)) in row.iter().zip(widths).enumerate() {
            if column > 0 {
                line.push_str("  ");
            }
            line.push_str(&format!("{cell:width$}"));
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// A device in `ring3 list --json`. IDs are hex strings as lspci writes them.
#[derive(Serialize, Debug)]
struct DeviceJson<'a> {
    address: String,
    vendor_id: String,
    device_id: String,
    subsystem_vendor_id: String,
    subsystem_id: String,
    class_code: String,
    class_name: &'static str,
    revision: u8,
    driver: Option<&'a str>,
    iommu_group: Option<u32>,
    numa_node: Option<i32>,
    bars: Vec<BarJson>,
}

#[derive(Serialize, Debug)]
struct BarJson {
    index: u8,
    start: u64,
    size: u64,
    kind: &'static str,
    prefetchable: bool,
}

fn devices_json(devices: &[PciDevice]) -> Vec<DeviceJson<'_>> {
    devices
        .iter()
        .map(|device| DeviceJson {
            address: device.address.to_string(),
            vendor_id: format!("{:04x}", device.vendor_id),
            device_id: format!("{:04x}", device.device_id),
            subsystem_vendor_id: format!("{:04x}", device.subsystem_vendor_id),
            subsystem_id: format!("{:04x}", device.subsystem_id),
            class_code: format!("{:06x}", device.class_code),
            class_name: device.class_name(),
            revision: device.revision,
            driver: device.driver.as_deref(),
            iommu_group: device.iommu_group,
            numa_node: device.numa_node,
            bars: device
                .bars
                .iter()
                .map(|bar| BarJson {
                    index: bar.index,
                    start: bar.start,
                    size: bar.size,
                    kind: match bar.kind {
                        BarKind::Memory32 => "memory32",
                        BarKind::Memory64 => "memory64",
                        BarKind::Io => "io",
                    },
                    prefetchable: bar.prefetchable,
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring3::pci::BarInfo;

    fn address(text: &str) -> PciAddress {
        text.parse().expect("test addresses are valid")
    }

    fn devices() -> Vec<PciDevice> {
        vec![
            PciDevice {
                address: address("0000:00:02.0"),
                vendor_id: 0x1234,
                device_id: 0x11e8,
                subsystem_vendor_id: 0x1af4,
                subsystem_id: 0x1100,
                class_code: 0x00_ff_00,
                revision: 0x10,
                driver: None,
                iommu_group: None,
                bars: vec![],
                numa_node: None,
            },
            PciDevice {
                address: address("0000:00:03.0"),
                vendor_id: 0x1b36,
                device_id: 0x0010,
                subsystem_vendor_id: 0x1af4,
                subsystem_id: 0x1100,
                class_code: 0x01_08_02,
                revision: 2,
                driver: Some("nvme".into()),
                iommu_group: Some(3),
                bars: vec![BarInfo {
                    index: 0,
                    start: 0xfe80_0000,
                    size: 0x4000,
                    kind: BarKind::Memory64,
                    prefetchable: false,
                }],
                numa_node: Some(0),
            },
        ]
    }

    #[test]
    fn list_table_aligns_columns_and_marks_missing_values() {
        let expected = "\
ADDRESS       ID         CLASS                                 DRIVER  GROUP
0000:00:02.0  1234:11e8  Unclassified device                   -       -
0000:00:03.0  1b36:0010  Mass storage controller: NVM Express  nvme    3
";
        assert_eq!(table(&devices()), expected);
    }

    #[test]
    fn list_json_has_one_object_per_device() {
        let json = serde_json::to_value(devices_json(&devices())).expect("serializable");
        let expected = serde_json::json!([
            {
                "address": "0000:00:02.0", "vendor_id": "1234", "device_id": "11e8",
                "subsystem_vendor_id": "1af4", "subsystem_id": "1100", "class_code": "00ff00",
                "class_name": "Unclassified device", "revision": 16, "driver": null,
                "iommu_group": null, "numa_node": null, "bars": []
            },
            {
                "address": "0000:00:03.0", "vendor_id": "1b36", "device_id": "0010",
                "subsystem_vendor_id": "1af4", "subsystem_id": "1100", "class_code": "010802",
                "class_name": "Mass storage controller: NVM Express", "revision": 2,
                "driver": "nvme", "iommu_group": 3, "numa_node": 0,
                "bars": [{"index": 0, "start": 0xfe80_0000u64, "size": 0x4000, "kind": "memory64", "prefetchable": false}]
            }
        ]);
        assert_eq!(json, expected);
    }

    #[test]
    fn bind_and_unbind_say_what_happened() {
        let nvme = address("0000:00:03.0");
        let bound = BindOutcome::Bound {
            previous_driver: Some("nvme".into()),
        };
        assert_eq!(describe_bind(nvme, &bound), "0000:00:03.0: nvme → vfio-pci");
        let bound = BindOutcome::Bound {
            previous_driver: None,
        };
        assert_eq!(
            describe_bind(nvme, &bound),
            "0000:00:03.0: (no driver) → vfio-pci"
        );
        assert_eq!(
            describe_bind(nvme, &BindOutcome::AlreadyBound),
            "0000:00:03.0: already bound to vfio-pci"
        );
        let released = UnbindOutcome::Released {
            driver: Some("nvme".into()),
        };
        assert_eq!(
            describe_unbind(nvme, &released),
            "0000:00:03.0: vfio-pci → nvme"
        );
        let not_bound = UnbindOutcome::NotBound { driver: None };
        assert_eq!(
            describe_unbind(nvme, &not_bound),
            "0000:00:03.0: not bound to vfio-pci (driver: (no driver)); nothing to do"
        );
    }
}
