//! `ring3 usb serial ADDR`: an FT232 USB serial adapter as a pseudo-terminal, driven by
//! ring3's FT232 driver in the foreground until Ctrl-C or SIGTERM.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Args;
use ring3_ftdi::protocol::BaudDivisor;
use ring3_ftdi::{serial, Ft232};
use ring3_usb::{UsbAddress, UsbDevice, UsbError};

use crate::CommandError;

/// FTDI's USB vendor ID.
const FTDI_VENDOR_ID: u16 = 0x0403;

/// Options of `usb serial`.
#[derive(Debug, Args)]
pub struct SerialArgs {
    /// USB device: BUS-PORT[.PORT...] as in sysfs (e.g. 3-1), VID:PID in hex (e.g.
    /// 0403:6001) or VID:PID:SERIAL (e.g. 0403:6001:R3SERECHO).
    #[arg(value_name = "ADDR")]
    pub address: UsbAddress,
    /// Detach a kernel driver (ftdi_sio) bound to the interface; it is bound again on exit.
    #[arg(long)]
    pub force: bool,
    /// Symlink to the pty [default: /run/ring3/ttyUSB-<serial number>, or
    /// ttyUSB-<port path> for a device without one].
    #[arg(long, value_name = "PATH")]
    pub link: Option<PathBuf>,
    /// Make no symlink.
    #[arg(long, conflicts_with = "link")]
    pub no_link: bool,
    /// Initial baud rate of the pty and the chip (applications change it with stty or
    /// tcsetattr on the pty) [default: the pty's, 38400].
    #[arg(long, value_name = "N")]
    pub baud: Option<u32>,
    /// Interface number [default: the first of the active configuration].
    #[arg(long, short = 'i', value_name = "N")]
    pub interface: Option<u8>,
}

/// Runs `ring3 usb serial`.
pub fn run(args: SerialArgs) -> Result<(), CommandError> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    if let Some(baud) = args.baud {
        // Refuse a rate the chip cannot make before touching the device.
        BaudDivisor::for_rate(baud)?;
    }

    let device = UsbDevice::open(&args.address)?;
    let summary = device.summary().cloned();
    let descriptor = device.device_descriptor();
    if descriptor.vendor_id != FTDI_VENDOR_ID {
        eprintln!(
            "warning: {} has vendor ID {:04x}, not FTDI's {FTDI_VENDOR_ID:04x}; trying it as an FT232",
            args.address, descriptor.vendor_id
        );
    }
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
    let endpoints = claimed.bulk_endpoints()?;
    if let Some(driver) = claimed.detached_driver() {
        eprintln!("detached the kernel driver {driver} from interface {interface}");
    }
    let port = Ft232::new(claimed, endpoints)?;

    let pty = serial::Pty::open()?;
    if let Some(baud) = args.baud {
        serial::set_baud(pty.master(), baud)?;
    }
    let link = if args.no_link {
        None
    } else {
        let explicit = args.link.is_some();
        let path = args.link.unwrap_or_else(|| {
            let name = summary
                .as_ref()
                .and_then(|s| s.serial.clone())
                .filter(|s| !s.is_empty())
                .or_else(|| summary.as_ref().map(|s| s.port_path.to_string()))
                .unwrap_or_else(|| args.address.to_string());
            serial::default_link_path(&name)
        });
        match serial::link(&path, pty.slave_path()) {
            Ok(link) => Some(link),
            Err(error) if !explicit => {
                eprintln!("warning: {error}; continuing without the link");
                None
            }
            Err(error) => return Err(error.into()),
        }
    };

    // The pty's path alone on the first line of stdout, for scripts.
    println!("{}", pty.slave_path().display());
    std::io::stdout().flush()?;
    let place = summary
        .as_ref()
        .map(|s| format!("{} ({})", s.id_address(), s.port_path))
        .unwrap_or_else(|| args.address.to_string());
    match &link {
        Some(link) => eprintln!(
            "{place}: serial port at {} (link {}); Ctrl-C stops",
            pty.slave_path().display(),
            link.path().display()
        ),
        None => eprintln!(
            "{place}: serial port at {}; Ctrl-C stops",
            pty.slave_path().display()
        ),
    }

    let stats = serial::run_bridge(&port, pty.master(), &stop)?;
    drop(link);
    let device = stats.device;
    eprintln!(
        "stopped: {} bytes to the device, {} from it; settings applied {}, refused {}; transfer errors {}; line errors: overrun {}, parity {}, framing {}, break {}; malformed packets {}",
        stats.to_device,
        stats.from_device,
        stats.settings_applied,
        stats.settings_refused,
        stats.transfer_errors,
        device.overrun_errors,
        device.parity_errors,
        device.framing_errors,
        device.breaks,
        device.short_packets,
    );
    Ok(())
}
