//! `ring3 net ADDR info|tap|stats`: a NIC through a ring3 network driver (virtio-net or
//! e1000e, chosen by its PCI IDs), bridged to a TAP interface in the foreground, or its
//! counters from ring3d.

use std::fmt;
use std::io::IsTerminal;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use ring3::pci::{PciAddress, Sysfs};
use ring3::vfio::VfioBackend;
use ring3_net::e1000e::{E1000e, E1000eOptions};
use ring3_net::tap::{self, BridgeCounters, BridgeOptions, BridgeStats, Tap};
use ring3_net::virtio::{VirtioNet, VirtioOptions};
use ring3_net::NetDevice;
use ring3d::control::{NetQueueCounters, Request, Response};

use crate::daemon::SocketArg;
use crate::CommandError;

/// How long `stats` waits for the daemon.
const STATS_TIMEOUT: Duration = Duration::from_secs(10);
/// The Ethernet header: the TAP's MTU is the NIC's largest frame less this.
const ETHERNET_HEADER: usize = 14;

/// Drive a network card bound to vfio-pci.
#[derive(Debug, Args)]
pub struct NetArgs {
    /// PCI address of the NIC, DDDD:BB:DD.F or BB:DD.F (a virtio-net 1af4:1041 or an
    /// e1000e 8086:10d3), bound to vfio-pci for `info` and `tap`.
    #[arg(value_name = "ADDR")]
    pub address: PciAddress,

    #[command(subcommand)]
    pub command: NetCommand,
}

/// What to do with the NIC.
#[derive(Debug, Subcommand)]
pub enum NetCommand {
    /// Show the NIC: driver, MAC address, link, queues, largest frame.
    Info,
    /// Run the driver in the foreground, bridged to a new TAP interface (needs root);
    /// Ctrl-C or SIGTERM stops it and removes the interface.
    Tap(TapArgs),
    /// Show the packet counters of a NIC that ring3d drives, per queue.
    Stats(StatsArgs),
}

/// Options of `tap`.
#[derive(Debug, Args)]
pub struct TapArgs {
    /// Name of the TAP interface [default: r3-BB-DD.F from the PCI address].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// IPv4 address and prefix length to give the interface, e.g. 10.33.0.1/24.
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
    pub address: Option<Cidr>,
    /// Seconds between two lines of counters (printed only when standard output is a
    /// terminal; 0: never).
    #[arg(long, value_name = "SECS", default_value_t = 2)]
    pub interval: u64,
}

/// Options of `stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Print the queues as JSON (an array of objects, one per queue) instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

/// An IPv4 address with a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The address.
    pub address: Ipv4Addr,
    /// The prefix length, 0–32.
    pub prefix: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

fn parse_cidr(text: &str) -> Result<Cidr, String> {
    let bad = || format!("`{text}` is not an IPv4 address with a prefix length, like 10.33.0.1/24");
    let (address, prefix) = text.split_once('/').ok_or_else(bad)?;
    let address: Ipv4Addr = address.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    Ok(Cidr { address, prefix })
}

/// A `ring3 net` failure that is not a driver's or the system's error.
#[derive(Debug)]
pub struct NetError(pub(crate) String);

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NetError {}

/// The ring3 network drivers, by the PCI IDs they drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// virtio-net, modern (virtio 1.x) PCI.
    Virtio,
    /// Intel 82574L.
    E1000e,
}

impl Driver {
    /// The driver for a device with these IDs, if there is one.
    pub fn for_ids(vendor: u16, device: u16) -> Option<Driver> {
        match (vendor, device) {
            (0x1af4, 0x1041) => Some(Driver::Virtio),
            (0x8086, 0x10d3) => Some(Driver::E1000e),
            _ => None,
        }
    }

    /// The driver's name, as ring3d's config spells it.
    pub fn name(self) -> &'static str {
        match self {
            Driver::Virtio => "virtio-net",
            Driver::E1000e => "e1000e",
        }
    }
}

/// Runs `ring3 net`.
pub fn run(args: NetArgs) -> Result<(), CommandError> {
    let address = args.address.to_string();
    if let NetCommand::Stats(stats_args) = &args.command {
        return stats(&address, stats_args);
    }
    let driver = driver_for(args.address)?;
    open_and_run(driver, &address, args.command)
}

/// The ring3 driver for the NIC at `address`, by its PCI IDs.
pub fn driver_for(address: PciAddress) -> Result<Driver, CommandError> {
    let device = Sysfs::system().device(address)?;
    let driver = Driver::for_ids(device.vendor_id, device.device_id).ok_or_else(|| {
        NetError(format!(
            "{address} is {:04x}:{:04x}, which no ring3 network driver drives (virtio-net is \
             1af4:1041, e1000e 8086:10d3); `ring3 list` shows the devices",
            device.vendor_id, device.device_id
        ))
    })?;
    Ok(driver)
}

/// Opens the NIC with `driver` and runs `command` on it. `tap` asks for interrupts, so
/// that an idle bridge sleeps; `info` polls.
fn open_and_run(driver: Driver, address: &str, command: NetCommand) -> Result<(), CommandError> {
    let interrupts = matches!(command, NetCommand::Tap(_));
    let backend = VfioBackend::open(address)?;
    match driver {
        Driver::Virtio => {
            let options = VirtioOptions {
                interrupts,
                ..VirtioOptions::default()
            };
            let device = VirtioNet::new(backend, options)?;
            run_on(driver, address, device, command)
        }
        Driver::E1000e => {
            let options = E1000eOptions {
                interrupts,
                ..E1000eOptions::default()
            };
            let device = E1000e::new(backend, options)?;
            run_on(driver, address, device, command)
        }
    }
}

/// Runs `command` (`info` or `tap`) on an opened NIC.
fn run_on<D: NetDevice>(
    driver: Driver,
    address: &str,
    device: D,
    command: NetCommand,
) -> Result<(), CommandError> {
    match command {
        NetCommand::Info => info(driver, address, &device),
        NetCommand::Tap(tap_args) => bridge(address, device, &tap_args),
        NetCommand::Stats(stats_args) => stats(address, &stats_args),
    }
}

fn info<D: NetDevice>(driver: Driver, address: &str, device: &D) -> Result<(), CommandError> {
    let link = device.link()?;
    println!("{address}: {} driver", driver.name());
    println!("  MAC address  {}", tap::format_mac(device.mac()));
    let mut link_text = if link.up { "up" } else { "down" }.to_owned();
    if let Some(speed) = link.speed_mbps {
        link_text.push_str(&format!(", {speed} Mbit/s"));
    }
    match link.full_duplex {
        Some(true) => link_text.push_str(", full duplex"),
        Some(false) => link_text.push_str(", half duplex"),
        None => {}
    }
    println!("  link         {link_text}");
    println!("  queue pairs  {}", device.queue_count());
    println!("  max frame    {} bytes", device.max_frame());
    Ok(())
}

/// `tap`: creates the interface, forwards frames until a signal, then closes the TAP,
/// which removes the interface (and its address) with it.
fn bridge<D: NetDevice>(address: &str, mut device: D, args: &TapArgs) -> Result<(), CommandError> {
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| tap::interface_name(address));
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    let tap = Tap::create(&name, None)?;
    tap.set_mac(device.mac())?;
    let max_frame = device.max_frame();
    let mtu = max_frame.saturating_sub(ETHERNET_HEADER);
    tap.set_mtu(u32::try_from(mtu).unwrap_or(u32::MAX))?;
    tap.set_up(true)?;
    if let Some(cidr) = args.address {
        add_address(&name, cidr)?;
    }
    let mut queue = device.take_queue(0)?;
    let link = device.link()?;
    eprintln!(
        "{address}: bridged to {name} (MAC {}, MTU {mtu}, link {}){}; Ctrl-C stops",
        tap::format_mac(device.mac()),
        if link.up { "up" } else { "down" },
        args.address
            .map(|cidr| format!(", address {cidr}"))
            .unwrap_or_default(),
    );

    let stats = Arc::new(BridgeStats::default());
    let printer = (std::io::stdout().is_terminal() && args.interval > 0).then(|| {
        let (stats, stop) = (Arc::clone(&stats), Arc::clone(&stop));
        let interval = Duration::from_secs(args.interval);
        std::thread::spawn(move || print_stats_every(&stats, &stop, interval))
    });
    let options = BridgeOptions {
        max_frame,
        ..BridgeOptions::default()
    };
    let result = tap::run_bridge(&mut queue, &tap, &stop, &stats, &options);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(printer) = printer {
        let _ = printer.join();
    }
    drop(tap);
    let totals = stats.snapshot();
    println!("{}", render_totals(&totals));
    result?;
    Ok(())
}

/// `ip addr add CIDR dev NAME`.
fn add_address(name: &str, cidr: Cidr) -> Result<(), CommandError> {
    let output = Command::new("ip")
        .args(["addr", "add", &cidr.to_string(), "dev", name])
        .output()
        .map_err(|e| {
            NetError(format!(
                "cannot run `ip addr add {cidr} dev {name}` (is iproute2 installed?): {e}"
            ))
        })?;
    if !output.status.success() {
        return Err(NetError(format!(
            "`ip addr add {cidr} dev {name}` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
        .into());
    }
    Ok(())
}

fn print_stats_every(stats: &BridgeStats, stop: &AtomicBool, interval: Duration) {
    let mut last = stats.snapshot();
    let mut last_time = Instant::now();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if last_time.elapsed() < interval {
            continue;
        }
        let now = stats.snapshot();
        let seconds = last_time.elapsed().as_secs_f64();
        println!("{}", render_rates(&last, &now, seconds));
        last = now;
        last_time = Instant::now();
    }
}

/// One line of rates between two snapshots `seconds` apart.
fn render_rates(before: &BridgeCounters, now: &BridgeCounters, seconds: f64) -> String {
    let rate = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / seconds.max(1e-9);
    format!(
        "rx {:.0} pkt/s {:.2} Mbit/s, tx {:.0} pkt/s {:.2} Mbit/s, drops rx {} tx {}, errors {}",
        rate(before.to_tap_frames, now.to_tap_frames),
        rate(before.to_tap_bytes, now.to_tap_bytes) * 8.0 / 1e6,
        rate(before.to_device_frames, now.to_device_frames),
        rate(before.to_device_bytes, now.to_device_bytes) * 8.0 / 1e6,
        now.rx_drops(),
        now.tx_drops(),
        now.queue.errors,
    )
}

fn render_totals(totals: &BridgeCounters) -> String {
    format!(
        "received {} packets ({} bytes), sent {} packets ({} bytes); dropped: {} no receive \
         buffer, {} TAP full, {} no transmit buffer, {} too long; {} device errors",
        totals.to_tap_frames,
        totals.to_tap_bytes,
        totals.to_device_frames,
        totals.to_device_bytes,
        totals.queue.rx_drops,
        totals.drops_tap_full,
        totals.drops_pool_empty,
        totals.drops_oversize,
        totals.queue.errors,
    )
}

/// `ring3 net ADDR stats`: the counters ring3d reports for the device at `address`.
fn stats(address: &str, args: &StatsArgs) -> Result<(), CommandError> {
    let devices =
        match ring3d::control::request(&args.socket.socket, &Request::Status, STATS_TIMEOUT)? {
            Response::Status { devices } => devices,
            Response::Error { message } => {
                return Err(NetError(format!("ring3d: {message}")).into())
            }
            other => {
                return Err(
                    NetError(format!("ring3d answered a status request with {other:?}")).into(),
                )
            }
        };
    let device = devices.iter().find(|d| d.pci == address).ok_or_else(|| {
        NetError(format!(
            "{address} is not running under ring3d (`ring3 status` lists what it drives); a NIC \
             bridged with `ring3 net {address} tap` prints its counters on its own terminal"
        ))
    })?;
    let queues = &device.net;
    if queues.is_empty() {
        return Err(NetError(format!(
            "ring3d drives {address} as `{}` ({}, {}) but reports no network counters for it \
             (state {}); try again once it is running",
            device.name, device.driver, device.expose, device.state
        ))
        .into());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(queues)?);
    } else {
        print!("{}", render_queue_table(queues));
    }
    Ok(())
}

/// The queues as a table, columns padded to their widest cell.
fn render_queue_table(queues: &[NetQueueCounters]) -> String {
    let header = [
        "QUEUE",
        "RX PACKETS",
        "RX BYTES",
        "RX DROPS",
        "TX PACKETS",
        "TX BYTES",
        "TX DROPS",
        "ERRORS",
    ];
    let rows: Vec<[String; 8]> = queues
        .iter()
        .map(|q| {
            [
                q.queue.to_string(),
                q.rx_packets.to_string(),
                q.rx_bytes.to_string(),
                q.rx_drops.to_string(),
                q.tx_packets.to_string(),
                q.tx_bytes.to_string(),
                q.tx_drops.to_string(),
                q.errors.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut text = String::new();
    let mut line = |cells: &[&str]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:>width$}"))
            .collect();
        text.push_str(padded.join("  ").trim_end());
        text.push('\n');
    };
    line(&header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(
            parse_cidr("10.33.0.1/24"),
            Ok(Cidr {
                address: Ipv4Addr::new(10, 33, 0, 1),
                prefix: 24
            })
        );
        for bad in [
            "10.33.0.1",
            "10.33.0.1/33",
            "10.33.0/24",
            "fe80::1/64",
            "x/1",
        ] {
            let error = parse_cidr(bad).expect_err(bad);
            assert!(error.contains("10.33.0.1/24"), "{error}");
        }
    }

    #[test]
    fn drivers_are_chosen_by_pci_ids() {
        assert_eq!(Driver::for_ids(0x1af4, 0x1041), Some(Driver::Virtio));
        assert_eq!(Driver::for_ids(0x8086, 0x10d3), Some(Driver::E1000e));
        assert_eq!(Driver::for_ids(0x1af4, 0x1000), None, "legacy virtio-net");
        assert_eq!(Driver::for_ids(0x8086, 0x100e), None, "e1000, not e1000e");
    }

    #[test]
    fn the_queue_table_lines_up() {
        let queues = [
            NetQueueCounters {
                queue: 0,
                rx_packets: 123_456,
                rx_bytes: 9_876_543_210,
                ..NetQueueCounters::default()
            },
            NetQueueCounters {
                queue: 1,
                tx_drops: 7,
                errors: 1,
                ..NetQueueCounters::default()
            },
        ];
        let table = render_queue_table(&queues);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("QUEUE  RX PACKETS"), "{table}");
        assert!(lines[1].contains("9876543210"), "{table}");
        assert_eq!(lines[0].len(), lines[1].len(), "{table}");
        assert_eq!(lines[1].len(), lines[2].len(), "{table}");
    }

    #[test]
    fn rates_are_per_second() {
        let before = BridgeCounters::default();
        let now = BridgeCounters {
            to_tap_frames: 2000,
            to_tap_bytes: 2_500_000,
            to_device_frames: 10,
            drops_tap_full: 3,
            ..BridgeCounters::default()
        };
        let line = render_rates(&before, &now, 2.0);
        assert!(
            line.starts_with("rx 1000 pkt/s 10.00 Mbit/s, tx 5 pkt/s"),
            "{line}"
        );
        assert!(line.contains("drops rx 3 tx 0"), "{line}");
    }
}
