//! `ring3 usb ...`: USB devices through usbfs: list them with the kernel driver of each
//! interface, claim an interface away from the kernel and give it back.
//!
//! A driver crate adds its own subcommand as a variant of [`UsbArgs`] and an arm in
//! [`run`].

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use ring3_usb::descriptor::class_name;
use ring3_usb::sysfs::Sysfs;
use ring3_usb::{UsbAddress, UsbDevice, UsbDeviceSummary, UsbError};

use crate::CommandError;

/// How often `claim` checks for a signal and for the device going away.
const HOLD_POLL: Duration = Duration::from_millis(100);
/// How long `claim` waits for the kernel to bind its driver again after letting go.
const REBIND_WAIT: Duration = Duration::from_secs(5);

/// USB devices through usbfs.
///
/// A device is named by its place on the bus, BUS-PORT[.PORT...] as sysfs names it
/// (e.g. 3-1.2: port 2 of the hub on port 1 of bus 3), by its IDs VID:PID (hex, e.g.
/// 0403:6001) when only one device has them, or by VID:PID:SERIAL. `ring3 usb list`
/// shows both forms for every device.
#[derive(Debug, Subcommand)]
pub enum UsbArgs {
    /// List the USB devices (root hubs aside) with their interfaces and the kernel driver
    /// bound to each.
    ///
    /// Each device shows its port path and VID:PID:SERIAL, its bus and device number,
    /// speed, class and strings; each interface its number, class/subclass/protocol,
    /// kernel driver ("-" for none, "usbfs" when a process claimed it) and endpoints.
    ///
    /// The other `ring3 usb` commands take a device address in one of these forms:
    /// BUS-PORT[.PORT...], the port path in the first column (e.g. 3-1.2: port 2 of the
    /// hub on port 1 of bus 3; stays the same while the device stays in that port);
    /// VID:PID in hex (e.g. 0403:6001), when only one device has these IDs; or
    /// VID:PID:SERIAL (e.g. 0403:6001:R3SERECHO). Bus and device numbers change at
    /// every replug and are not addresses.
    List(ListArgs),
    /// Claim an interface of a device and hold it until Ctrl-C or SIGTERM, then give it
    /// back (needs root or write access to the device's usbfs node).
    ///
    /// With --force a kernel driver bound to the interface is detached, and bound again
    /// when the interface is given back.
    Claim(ClaimArgs),
    /// Drive a mass-storage device (flash drive, disk, card reader) with ring3's driver:
    /// info, read, write, verify.
    Storage(crate::usb_storage::StorageArgs),
    /// Drive an FT232 USB serial adapter with ring3's driver and expose it as a
    /// pseudo-terminal (printed, and linked as /run/ring3/ttyUSB-<serial>) until Ctrl-C
    /// or SIGTERM; stty on the pty sets the adapter's baud rate and flow control.
    Serial(crate::usb_serial::SerialArgs),
}

/// Options of `usb list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print a JSON array of devices instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Options of `usb claim`.
#[derive(Debug, Args)]
pub struct ClaimArgs {
    /// USB device: BUS-PORT[.PORT...] as in sysfs (e.g. 3-1.2), VID:PID in hex (e.g.
    /// 0403:6001) or VID:PID:SERIAL (e.g. 46f4:0001:R3RAW).
    #[arg(value_name = "ADDR")]
    pub address: UsbAddress,
    /// Interface number to claim [default: the first interface of the active
    /// configuration].
    #[arg(long, short = 'i', value_name = "N")]
    pub interface: Option<u8>,
    /// Detach a kernel driver bound to the interface (it is bound again on exit).
    #[arg(long)]
    pub force: bool,
}

/// Runs a `ring3 usb` subcommand.
pub fn run(args: UsbArgs) -> Result<(), CommandError> {
    match args {
        UsbArgs::List(args) => list(args),
        UsbArgs::Claim(args) => claim(args),
        UsbArgs::Storage(args) => crate::usb_storage::run(args),
        UsbArgs::Serial(args) => crate::usb_serial::run(args),
    }
}

fn list(args: ListArgs) -> Result<(), CommandError> {
    let devices = ring3_usb::list_devices()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&devices)?);
        return Ok(());
    }
    if devices.is_empty() {
        println!("no USB devices (other than root hubs)");
        return Ok(());
    }
    for device in &devices {
        print!("{}", format_device(device));
    }
    Ok(())
}

/// A device and its interfaces, as `list` prints them.
fn format_device(device: &UsbDeviceSummary) -> String {
    let speed = device
        .speed
        .map(|s| s.to_string())
        .unwrap_or_else(|| "?".into());
    let strings: Vec<&str> = [device.manufacturer.as_deref(), device.product.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    let mut text = format!(
        "{:<8} {:<28} bus {:03} device {:03}  {:>5}  class {:02x} ({})  {}\n",
        device.port_path.to_string(),
        device.id_address().to_string(),
        device.bus,
        device.device_number,
        speed,
        device.class,
        class_name(device.class),
        if strings.is_empty() {
            "-".to_owned()
        } else {
            strings.join(" / ")
        },
    );
    if device.configuration.is_none() {
        text.push_str("         (not configured)\n");
    }
    for interface in &device.interfaces {
        let endpoints: Vec<String> = interface
            .endpoints
            .iter()
            .map(|e| {
                format!(
                    "{:02x} {} {}",
                    e.address, e.transfer_type, e.max_packet_size
                )
            })
            .collect();
        text.push_str(&format!(
            "         interface {:<3} class {:02x}/{:02x}/{:02x} {:<18} driver {:<12} {}\n",
            interface.number,
            interface.class,
            interface.subclass,
            interface.protocol,
            format!("({})", class_name(interface.class)),
            interface.driver.as_deref().unwrap_or("-"),
            if endpoints.is_empty() {
                String::new()
            } else {
                format!("endpoints {}", endpoints.join(", "))
            }
        ));
    }
    text
}

fn claim(args: ClaimArgs) -> Result<(), CommandError> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    let device = UsbDevice::open(&args.address)?;
    let summary = device.summary().cloned();
    let interface = match args.interface {
        Some(number) => number,
        None => device
            .active_configuration()?
            .interfaces
            .first()
            .map(|i| i.number)
            .ok_or(UsbError::NoSuchInterface {
                interface: 0,
                available: String::new(),
            })?,
    };
    let claimed = device.claim(interface, args.force)?;
    let place = summary
        .as_ref()
        .map(|s| format!("{} ({})", s.port_path, s.id_address()))
        .unwrap_or_else(|| args.address.to_string());
    let detached = claimed.detached_driver().map(str::to_owned);
    match &detached {
        Some(driver) => println!(
            "claimed interface {interface} of {place}, detached from the kernel driver {driver}; Ctrl-C gives it back"
        ),
        None => println!("claimed interface {interface} of {place}; Ctrl-C gives it back"),
    }
    std::io::stdout().flush()?;

    let mut disconnected = false;
    while !stop.load(Ordering::Relaxed) {
        if !device.is_connected() {
            disconnected = true;
            break;
        }
        std::thread::sleep(HOLD_POLL);
    }
    drop(claimed);
    if disconnected {
        return Err(UsbError::Disconnected.into());
    }
    println!("released interface {interface}");

    // The kernel binds its driver again in the background; say whether it did.
    if let (Some(driver), Some(summary)) = (detached, summary) {
        let sysfs = Sysfs::system();
        let configuration = summary.configuration.unwrap_or(1);
        let deadline = Instant::now() + REBIND_WAIT;
        loop {
            let bound = sysfs.interface_driver(&summary.port_path, configuration, interface);
            if bound.as_deref() == Some(driver.as_str()) {
                println!("{driver} is bound to interface {interface} again");
                break;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "warning: {driver} did not bind to interface {interface} again within {}s (now: {}); replug the device or write its interface to /sys/bus/usb/drivers/{driver}/bind",
                    REBIND_WAIT.as_secs(),
                    bound.as_deref().unwrap_or("no driver")
                );
                break;
            }
            std::thread::sleep(HOLD_POLL);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring3_usb::{InterfaceSummary, PortPath, Speed};

    #[test]
    fn a_device_prints_its_addresses_interfaces_and_drivers() {
        let device = UsbDeviceSummary {
            bus: 3,
            device_number: 4,
            port_path: PortPath {
                bus: 3,
                ports: vec![1, 2],
            },
            vendor_id: 0x46f4,
            product_id: 1,
            class: 0,
            subclass: 0,
            protocol: 0,
            manufacturer: Some("QEMU".into()),
            product: Some("QEMU USB HARDDRIVE".into()),
            serial: Some("R3RAW".into()),
            speed: Some(Speed::High),
            configuration: Some(1),
            interfaces: vec![
                InterfaceSummary {
                    number: 0,
                    alternate_setting: 0,
                    class: 8,
                    subclass: 6,
                    protocol: 0x50,
                    driver: None,
                    endpoints: vec![],
                },
                InterfaceSummary {
                    number: 1,
                    alternate_setting: 0,
                    class: 0xff,
                    subclass: 0,
                    protocol: 0,
                    driver: Some("usb-storage".into()),
                    endpoints: vec![],
                },
            ],
        };
        let text = format_device(&device);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("3-1.2 "), "{text}");
        assert!(lines[0].contains("46f4:0001:R3RAW"), "{text}");
        assert!(lines[0].contains("bus 003 device 004"), "{text}");
        assert!(lines[0].contains("480M"), "{text}");
        assert!(lines[0].contains("QEMU / QEMU USB HARDDRIVE"), "{text}");
        assert!(lines[1].contains("interface 0"), "{text}");
        assert!(lines[1].contains("08/06/50 (mass storage)"), "{text}");
        assert!(lines[1].contains("driver -"), "{text}");
        assert!(lines[2].contains("driver usb-storage"), "{text}");
    }
}
