//! The `ring3d` config file: which devices to drive, with which driver, exposed how, and
//! how the daemon runs them. The file format is described in the [crate docs](crate).
//!
//! Reading a config is two steps, neither of which touches a device:
//! 1. [`Config::load`] / [`Config::parse`] check the file alone: syntax, keys, types,
//!    ranges, and that the devices make sense together (unique names and addresses,
//!    drivers and exposures that fit);
//! 2. [`Config::resolve`] looks the devices up in sysfs: each `pci` address must exist
//!    and each `match` must pick exactly one device, of a class its driver can drive.
//!    The result is a [`Plan`]: the device at each address and what to run on it.
//!
//! Both steps report every problem they find, not just the first.

mod raw;
mod resolve;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ring3::pci::PciAddress;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::error::{ConfigError, ConfigErrors, Location};
use raw::{section, Checked, RawDaemon, RawDevice, RawNet, RawNvme, RawRestartBudget, Report};
pub use resolve::{DeviceAddress, Plan, PlannedDevice};

/// Where `ring3d` looks for its config file unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ring3/ring3d.toml";

/// A checked configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from, as named to [`Config::load`] or [`Config::parse`]
    /// (for messages).
    pub path: PathBuf,
    /// How the daemon runs.
    pub daemon: DaemonConfig,
    /// The devices, in file order (at least one).
    pub devices: Vec<DeviceConfig>,
}

/// `[daemon]`: how the daemon runs. Every key has a default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonConfig {
    /// The control socket (`socket`; default [`DaemonConfig::DEFAULT_SOCKET`]).
    pub socket: PathBuf,
    /// The group allowed to use the control socket (`socket_group`), which then gets mode
    /// 0660; without one only root may use it (mode 0600).
    pub socket_group: Option<String>,
    /// The unprivileged user the driver processes run as (`driver_user`; default
    /// [`DaemonConfig::DEFAULT_DRIVER_USER`]). Never root.
    pub driver_user: String,
    /// How often a driver may be restarted before the daemon gives up on it.
    pub restart_budget: RestartBudget,
    /// How often a driver process must report that it is alive (`heartbeat_ms`).
    pub heartbeat: Duration,
    /// How long without a heartbeat before the driver is deemed hung and restarted
    /// (`heartbeat_timeout_ms`); longer than `heartbeat`.
    pub heartbeat_timeout: Duration,
}

impl DaemonConfig {
    /// The default control socket.
    pub const DEFAULT_SOCKET: &'static str = "/run/ring3/ring3d.sock";
    /// The default user for driver processes.
    pub const DEFAULT_DRIVER_USER: &'static str = "ring3";
    /// `heartbeat_ms`: allowed range and default.
    pub const HEARTBEAT_MS: RangeInclusive<u64> = 10..=60_000;
    /// Default `heartbeat_ms`.
    pub const DEFAULT_HEARTBEAT_MS: u64 = 1000;
    /// `heartbeat_timeout_ms`: allowed range (and it must exceed `heartbeat_ms`).
    pub const HEARTBEAT_TIMEOUT_MS: RangeInclusive<u64> = 20..=600_000;
    /// Default `heartbeat_timeout_ms`.
    pub const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 5000;
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: PathBuf::from(Self::DEFAULT_SOCKET),
            socket_group: None,
            driver_user: Self::DEFAULT_DRIVER_USER.to_string(),
            restart_budget: RestartBudget::default(),
            heartbeat: Duration::from_millis(Self::DEFAULT_HEARTBEAT_MS),
            heartbeat_timeout: Duration::from_millis(Self::DEFAULT_HEARTBEAT_TIMEOUT_MS),
        }
    }
}

/// `restart_budget = { restarts = N, window_s = S }`: a driver that dies more than
/// `restarts` times within `window` is left stopped (and reported by `ring3 status`)
/// instead of being restarted again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartBudget {
    /// Restarts allowed within the window; 0 means never restart.
    pub restarts: u32,
    /// The sliding window the restarts are counted in.
    pub window: Duration,
}

impl RestartBudget {
    /// `restarts`: allowed range.
    pub const RESTARTS: RangeInclusive<u64> = 0..=1000;
    /// Default `restarts`.
    pub const DEFAULT_RESTARTS: u32 = 5;
    /// `window_s`: allowed range (up to a week).
    pub const WINDOW_S: RangeInclusive<u64> = 1..=604_800;
    /// Default `window_s`.
    pub const DEFAULT_WINDOW_S: u64 = 1800;
}

impl Default for RestartBudget {
    fn default() -> Self {
        RestartBudget {
            restarts: Self::DEFAULT_RESTARTS,
            window: Duration::from_secs(Self::DEFAULT_WINDOW_S),
        }
    }
}

/// One `[[device]]`: a device, the driver for it and how the result is exposed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Unique name, used by `ring3 status/restart/stop`.
    pub name: String,
    /// Which device.
    pub selector: DeviceSelector,
    /// USB devices: whether a kernel driver bound to the interface may be detached
    /// (`force = true`); it is attached again when ring3d lets the device go.
    pub force: bool,
    /// The driver and its options.
    pub driver: DriverConfig,
    /// How the driven device is handed to the system.
    pub expose: Exposure,
    /// Where the device's `[[device]]` header is in the file.
    pub location: Location,
    /// Where its `pci` or `match` value is in the file (for resolution errors).
    pub selector_location: Location,
}

impl DeviceConfig {
    /// Longest device name.
    pub const MAX_NAME_LEN: usize = 32;
}

/// How a `[[device]]` names its device.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DeviceSelector {
    /// `pci = "DDDD:BB:DD.F"`: the device at this address.
    Address(PciAddress),
    /// `match = "VVVV:DDDD"` (and `index = N`): the devices with these IDs, sorted by
    /// address, and the `index`-th of them (counting from 0). Without an index, exactly
    /// one device may match.
    Match {
        /// PCI vendor ID.
        vendor_id: u16,
        /// PCI device ID.
        device_id: u16,
        /// Which of several matching devices, from 0 in address order.
        index: Option<u32>,
    },
    /// `usb = "VID:PID[:SERIAL]"` or `usb = "BUS-PORT[.PORT...]"`: a USB device, looked
    /// up each time its driver starts (it may come and go).
    Usb(ring3_usb::UsbAddress),
}

impl DeviceSelector {
    /// Whether this names a USB device.
    pub fn is_usb(&self) -> bool {
        matches!(self, DeviceSelector::Usb(_))
    }
}

impl fmt::Display for DeviceSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSelector::Address(address) => write!(f, "pci {address}"),
            DeviceSelector::Match {
                vendor_id,
                device_id,
                index,
            } => {
                write!(f, "match {vendor_id:04x}:{device_id:04x}")?;
                match index {
                    Some(index) => write!(f, " index {index}"),
                    None => Ok(()),
                }
            }
            DeviceSelector::Usb(address) => write!(f, "usb {address}"),
        }
    }
}

/// The drivers `ring3d` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Driver {
    /// NVMe controllers (`ring3-nvme`).
    Nvme,
    /// virtio-net NICs, virtio 1.x modern PCI (`ring3-net`).
    VirtioNet,
    /// Intel 82574L NICs (`ring3-net`).
    E1000e,
    /// USB mass storage, Bulk-Only Transport with SCSI (`ring3-usb-storage`).
    UsbStorage,
    /// FTDI FT232 USB serial adapters (`ring3-ftdi`).
    Ftdi,
}

impl Driver {
    /// Every known driver.
    pub const ALL: [Driver; 5] = [
        Driver::Nvme,
        Driver::VirtioNet,
        Driver::E1000e,
        Driver::UsbStorage,
        Driver::Ftdi,
    ];

    /// The driver's name in the config file.
    pub fn name(self) -> &'static str {
        match self {
            Driver::Nvme => "nvme",
            Driver::VirtioNet => "virtio-net",
            Driver::E1000e => "e1000e",
            Driver::UsbStorage => "usb-storage",
            Driver::Ftdi => "ftdi",
        }
    }

    /// Whether the driver drives USB devices (named with `usb`) rather than PCI ones.
    pub fn is_usb(self) -> bool {
        matches!(self, Driver::UsbStorage | Driver::Ftdi)
    }

    /// The driver named `name` in the config file.
    pub fn from_name(name: &str) -> Option<Driver> {
        Driver::ALL.into_iter().find(|driver| driver.name() == name)
    }

    /// The ways this driver's devices can be exposed; the first is the default.
    pub fn exposures(self) -> &'static [Exposure] {
        match self {
            Driver::Nvme | Driver::UsbStorage => &[Exposure::Ublk],
            Driver::VirtioNet | Driver::E1000e => &[Exposure::Tap],
            Driver::Ftdi => &[Exposure::Pty],
        }
    }

    /// The PCI class code (base class, subclass, programming interface) of the devices
    /// this driver drives; `None` for USB drivers.
    pub fn class_code(self) -> Option<u32> {
        match self {
            // Mass storage, non-volatile memory, NVM Express.
            Driver::Nvme => Some(0x01_08_02),
            // Network controller, Ethernet.
            Driver::VirtioNet | Driver::E1000e => Some(0x02_00_00),
            Driver::UsbStorage | Driver::Ftdi => None,
        }
    }

    /// The vendor:device IDs the driver takes, when its class is not enough (any NIC is
    /// class 020000); `None`: any device of the class.
    pub fn device_ids(self) -> Option<&'static [(u16, u16)]> {
        match self {
            Driver::Nvme | Driver::UsbStorage | Driver::Ftdi => None,
            Driver::VirtioNet => Some(&[(0x1af4, 0x1041)]),
            Driver::E1000e => Some(&[(0x8086, 0x10d3)]),
        }
    }

    /// What the driver's devices are called, for messages.
    pub fn device_kind(self) -> &'static str {
        match self {
            Driver::Nvme => "an NVMe controller",
            Driver::VirtioNet => "a virtio-net NIC (1af4:1041)",
            Driver::E1000e => "an Intel 82574L NIC (8086:10d3)",
            Driver::UsbStorage => "a USB mass storage device",
            Driver::Ftdi => "an FTDI FT232 USB serial adapter",
        }
    }
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A driver with its options (the `[device.<driver>]` table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriverConfig {
    /// `driver = "nvme"`.
    Nvme(NvmeOptions),
    /// `driver = "virtio-net"` or `"e1000e"`.
    Net(Driver, NetOptions),
    /// `driver = "usb-storage"`.
    UsbStorage,
    /// `driver = "ftdi"`.
    Ftdi(SerialOptions),
}

impl DriverConfig {
    /// Which driver.
    pub fn driver(&self) -> Driver {
        match self {
            DriverConfig::Nvme(_) => Driver::Nvme,
            DriverConfig::Net(driver, _) => *driver,
            DriverConfig::UsbStorage => Driver::UsbStorage,
            DriverConfig::Ftdi(_) => Driver::Ftdi,
        }
    }
}

impl fmt::Display for DriverConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverConfig::Nvme(options) => write!(f, "nvme ({options})"),
            DriverConfig::Net(driver, options) => write!(f, "{driver} ({options})"),
            DriverConfig::UsbStorage => f.write_str("usb-storage"),
            DriverConfig::Ftdi(options) => write!(f, "ftdi ({options})"),
        }
    }
}

/// `[device.nvme]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmeOptions {
    /// I/O queue pairs to ask the controller for (`queues`).
    pub queues: u16,
    /// Entries per I/O queue (`queue_depth`).
    pub queue_depth: u16,
    /// Which namespaces to expose (`namespaces`; default all).
    pub namespaces: Namespaces,
}

impl NvmeOptions {
    /// `queues`: allowed range.
    pub const QUEUES: RangeInclusive<u64> = 1..=1024;
    /// Default `queues`.
    pub const DEFAULT_QUEUES: u16 = 4;
    /// `queue_depth`: allowed range (NVMe queues have at least 2 entries; 4096 is what
    /// most controllers offer at most).
    pub const QUEUE_DEPTH: RangeInclusive<u64> = 2..=4096;
    /// Default `queue_depth`.
    pub const DEFAULT_QUEUE_DEPTH: u16 = 128;
    /// Valid namespace IDs (0 and 0xffffffff are not namespaces).
    pub const NAMESPACE_ID: RangeInclusive<u64> = 1..=0xffff_fffe;
}

impl Default for NvmeOptions {
    fn default() -> Self {
        NvmeOptions {
            queues: Self::DEFAULT_QUEUES,
            queue_depth: Self::DEFAULT_QUEUE_DEPTH,
            namespaces: Namespaces::All,
        }
    }
}

impl fmt::Display for NvmeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "queues {}, queue depth {}, namespaces {}",
            self.queues, self.queue_depth, self.namespaces
        )
    }
}

/// `[device.net]`: options of the network drivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetOptions {
    /// Queue pairs to ask for (`queues`; the e1000e has one).
    pub queues: u16,
    /// Descriptors per ring (`ring_size`).
    pub ring_size: u16,
}

impl NetOptions {
    /// `queues`: allowed range.
    pub const QUEUES: RangeInclusive<u64> = 1..=16;
    /// `ring_size`: allowed range (a power of two for virtio, a multiple of 8 for e1000e;
    /// the driver rounds down to what the device takes).
    pub const RING_SIZE: RangeInclusive<u64> = 64..=4096;
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            queues: 1,
            ring_size: 256,
        }
    }
}

impl fmt::Display for NetOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "queues {}, ring size {}", self.queues, self.ring_size)
    }
}

/// `[device.serial]`: options of the serial drivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialOptions {
    /// The line speed set when the driver starts (`baud`), until an application sets
    /// another on the terminal.
    pub baud: u32,
}

impl SerialOptions {
    /// `baud`: allowed range (the FT232's slowest and fastest rates).
    pub const BAUD: RangeInclusive<u64> = 183..=3_000_000;
}

impl Default for SerialOptions {
    fn default() -> Self {
        SerialOptions { baud: 115_200 }
    }
}

impl fmt::Display for SerialOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} baud", self.baud)
    }
}

/// Which NVMe namespaces to expose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespaces {
    /// Every active namespace the controller reports.
    All,
    /// These namespace IDs, in the order given (no duplicates).
    Only(Vec<u32>),
}

impl fmt::Display for Namespaces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Namespaces::All => f.write_str("all"),
            Namespaces::Only(ids) => {
                let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
                f.write_str(&ids.join(","))
            }
        }
    }
}

/// How a driven device is handed to the rest of the system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Exposure {
    /// A ublk block device, `/dev/ublkbN` (storage drivers).
    Ublk,
    /// A TAP network interface (network drivers).
    Tap,
    /// A pseudo-terminal, `/dev/pts/N`, linked from `/run/ring3/ttyUSB-<serial>`
    /// (serial drivers).
    Pty,
}

impl Exposure {
    /// Every exposure.
    pub const ALL: [Exposure; 3] = [Exposure::Ublk, Exposure::Tap, Exposure::Pty];

    /// The exposure's name in the config file.
    pub fn name(self) -> &'static str {
        match self {
            Exposure::Ublk => "ublk",
            Exposure::Tap => "tap",
            Exposure::Pty => "pty",
        }
    }

    /// The exposure named `name` in the config file.
    pub fn from_name(name: &str) -> Option<Exposure> {
        Exposure::ALL
            .into_iter()
            .find(|exposure| exposure.name() == name)
    }
}

impl fmt::Display for Exposure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Config {
    /// Reads and checks the config file at `path`. Nothing on the machine is looked at
    /// or changed; see [`Config::resolve`] for finding the devices.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigErrors> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| {
            ConfigError::new(path, None, format!("cannot read the config file: {error}"))
        })?;
        Config::parse(&text, path)
    }

    /// Checks the config in `text`; `path` is the file name used in messages.
    pub fn parse(text: &str, path: impl AsRef<Path>) -> Result<Config, ConfigErrors> {
        let path = path.as_ref();
        let mut report = Report::new(text, path);
        let (document, syntax_errors) = DeTable::parse_recoverable(text);
        if !syntax_errors.is_empty() {
            // The structure after a syntax error is a guess: report only the syntax.
            for error in &syntax_errors {
                report.toml("", error, 0..0);
            }
            return Err(ConfigErrors::new(report.into_errors()));
        }

        let mut daemon = None;
        let mut device_values = None;
        for (key, value) in document.get_ref().iter() {
            match &**key.get_ref() {
                "daemon" => daemon = section::<RawDaemon>(value, "daemon", &mut report),
                "device" => device_values = Some(value),
                other => report.at(
                    key.span(),
                    format!(
                        "unknown section `{other}`: a config has a [daemon] section and \
                         [[device]] sections"
                    ),
                ),
            }
        }
        let daemon = check_daemon(daemon, &mut report);
        let devices = check_devices(device_values, &mut report);
        if report.is_empty() {
            Ok(Config {
                path: path.to_path_buf(),
                daemon,
                devices,
            })
        } else {
            Err(ConfigErrors::new(report.into_errors()))
        }
    }
}

/// `value` as an integer in `range`, or a report that it is not.
fn in_range(
    value: &Spanned<i64>,
    range: RangeInclusive<u64>,
    what: &str,
    context: &str,
    report: &mut Report<'_>,
) -> Option<u64> {
    let number = *value.get_ref();
    match u64::try_from(number) {
        Ok(number) if range.contains(&number) => Some(number),
        _ => {
            report.at(
                value.span(),
                format!(
                    "{context}: {what} {number} is out of range ({} to {})",
                    range.start(),
                    range.end()
                ),
            );
            None
        }
    }
}

fn check_daemon(raw: Option<Checked<RawDaemon>>, report: &mut Report<'_>) -> DaemonConfig {
    const CONTEXT: &str = "daemon";
    let mut daemon = DaemonConfig::default();
    let Some(Checked { value: raw, failed }) = raw else {
        return daemon;
    };
    if let Some(socket) = &raw.socket {
        let path = Path::new(socket.get_ref());
        if path.is_absolute() && !socket.get_ref().ends_with('/') {
            daemon.socket = path.to_path_buf();
        } else {
            report.at(
                socket.span(),
                format!(
                    "{CONTEXT}: socket {:?} is not an absolute path to a file; write one \
                     such as \"{}\"",
                    socket.get_ref(),
                    DaemonConfig::DEFAULT_SOCKET
                ),
            );
        }
    }
    if let Some(group) = &raw.socket_group {
        if check_account_name(group, "socket_group", "group", CONTEXT, report) {
            daemon.socket_group = Some(group.get_ref().clone());
        }
    }
    if let Some(user) = &raw.driver_user {
        if user.get_ref() == "root" {
            report.at(
                user.span(),
                format!(
                    "{CONTEXT}: driver_user must not be root: drivers run unprivileged; name \
                     a system user of their own, such as \"{}\"",
                    DaemonConfig::DEFAULT_DRIVER_USER
                ),
            );
        } else if check_account_name(user, "driver_user", "user", CONTEXT, report) {
            daemon.driver_user = user.get_ref().clone();
        }
    }
    if let Some(budget) = &raw.restart_budget {
        let context = format!("{CONTEXT}: restart_budget");
        let RawRestartBudget { restarts, window_s } = budget.get_ref();
        if let Some(restarts) = restarts {
            if let Some(restarts) = in_range(
                restarts,
                RestartBudget::RESTARTS,
                "restarts",
                &context,
                report,
            ) {
                daemon.restart_budget.restarts =
                    u32::try_from(restarts).expect("the range fits in u32");
            }
        }
        if let Some(window) = window_s {
            if let Some(window) = in_range(
                window,
                RestartBudget::WINDOW_S,
                "window_s",
                &context,
                report,
            ) {
                daemon.restart_budget.window = Duration::from_secs(window);
            }
        }
    }
    let heartbeat = raw.heartbeat_ms.as_ref().map(|value| {
        let ms = in_range(
            value,
            DaemonConfig::HEARTBEAT_MS,
            "heartbeat_ms",
            CONTEXT,
            report,
        );
        (value.span(), ms)
    });
    let timeout = raw.heartbeat_timeout_ms.as_ref().map(|value| {
        let ms = in_range(
            value,
            DaemonConfig::HEARTBEAT_TIMEOUT_MS,
            "heartbeat_timeout_ms",
            CONTEXT,
            report,
        );
        (value.span(), ms)
    });
    if let Some((_, Some(ms))) = heartbeat {
        daemon.heartbeat = Duration::from_millis(ms);
    }
    if let Some((_, Some(ms))) = timeout {
        daemon.heartbeat_timeout = Duration::from_millis(ms);
    }
    // Compare only values that are themselves fine (given ones, or defaults).
    let heartbeat_fine = !failed.contains("heartbeat_ms") && !matches!(heartbeat, Some((_, None)));
    let timeout_fine =
        !failed.contains("heartbeat_timeout_ms") && !matches!(timeout, Some((_, None)));
    // The defaults are in order, so a given value is to blame: the timeout if given.
    let blamed = timeout.as_ref().or(heartbeat.as_ref());
    let out_of_order = daemon.heartbeat_timeout <= daemon.heartbeat;
    if let (true, Some((span, _))) = (heartbeat_fine && timeout_fine && out_of_order, blamed) {
        let heartbeat_ms = daemon.heartbeat.as_millis();
        let timeout_ms = daemon.heartbeat_timeout.as_millis();
        report.at(
            span.clone(),
            format!(
                "{CONTEXT}: heartbeat_timeout_ms {timeout_ms} must be greater than heartbeat_ms \
                 {heartbeat_ms}; a few heartbeats, such as {}, lets a busy driver miss one",
                heartbeat_ms * 5
            ),
        );
    }
    daemon
}

/// Whether `name` is a portable user or group name (`[a-z_][a-z0-9_-]*`, at most 32
/// characters); reports it if not. Whether the account exists is the daemon's business.
fn check_account_name(
    name: &Spanned<String>,
    key: &str,
    kind: &str,
    context: &str,
    report: &mut Report<'_>,
) -> bool {
    let text = name.get_ref();
    let mut chars = text.chars();
    let valid = text.len() <= 32
        && chars
            .next()
            .is_some_and(|first| first.is_ascii_lowercase() || first == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !valid {
        report.at(
            name.span(),
            format!(
                "{context}: {key} {text:?} is not a {kind} name; use lower-case letters, digits, \
                 '_' and '-', starting with a letter (at most 32), such as \"ring3\""
            ),
        );
    }
    valid
}

fn check_devices(
    values: Option<&Spanned<DeValue<'_>>>,
    report: &mut Report<'_>,
) -> Vec<DeviceConfig> {
    const NO_DEVICES: &str = "no devices: add a [[device]] section for each device to drive, \
                              with name, pci (or match) and driver";
    let Some(values) = values else {
        report.at_end(NO_DEVICES);
        return Vec::new();
    };
    let tables = match values.get_ref() {
        DeValue::Array(tables) if !tables.is_empty() => tables,
        DeValue::Array(_) => {
            report.at(values.span(), NO_DEVICES);
            return Vec::new();
        }
        _ => {
            report.at(
                values.span(),
                "`device` must be a list of [[device]] sections (note the double brackets)",
            );
            return Vec::new();
        }
    };

    let mut devices = Vec::new();
    // Where each name, address and match was first used, to report the second use.
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut selectors: HashMap<DeviceSelector, (String, usize)> = HashMap::new();
    for (number, value) in (1..).zip(tables.iter()) {
        let context = device_context(value, number);
        let Some(checked) = section::<RawDevice>(value, &context, report) else {
            continue;
        };
        let header = value.span();
        let line = report.location(&header).line;
        let raw = &checked.value;

        let name = check_name(raw, &checked, header.clone(), &context, report);
        if let Some(name) = &name {
            if let Some(first_line) = names.get(name.get_ref()) {
                report.at(
                    name.span(),
                    format!(
                        "{context}: the name is already used by the device at line {first_line}; \
                         give each device its own name"
                    ),
                );
            } else {
                names.insert(name.get_ref().clone(), line);
            }
        }

        let selector = check_selector(raw, &checked, header.clone(), &context, report);
        if let Some((selector, span)) = &selector {
            let display_name = name.as_ref().map_or_else(
                || format!("#{number}"),
                |name| format!("{:?}", name.get_ref()),
            );
            if let Some((first, first_line)) = selectors.get(selector) {
                report.at(
                    span.clone(),
                    format!(
                        "{context}: {selector} is already used by device {first} (line \
                         {first_line}); each device can be driven only once"
                    ),
                );
            } else {
                selectors.insert(selector.clone(), (display_name, line));
            }
        }

        let driver = check_driver(raw, &checked, header.clone(), &context, report);
        let expose = driver.and_then(|driver| check_expose(raw, driver, &context, report));
        let driver_config = driver.and_then(|driver| check_options(raw, driver, &context, report));
        let bus_fits = match (&selector, driver) {
            (Some((selector, span)), Some(driver)) if selector.is_usb() != driver.is_usb() => {
                let (bus, key) = if driver.is_usb() {
                    ("a USB", "usb = \"VID:PID[:SERIAL]\"")
                } else {
                    ("a PCI", "pci = ADDRESS or match = IDS")
                };
                report.at(
                    span.clone(),
                    format!(
                        "{context}: driver {} drives {bus} device; name it with {key}",
                        driver.name()
                    ),
                );
                false
            }
            _ => true,
        };
        let force = check_force(raw, driver, &context, report);

        if let (Some(name), Some((selector, selector_span)), Some(driver), Some(expose), true) =
            (name, selector, driver_config, expose, bus_fits)
        {
            devices.push(DeviceConfig {
                name: name.into_inner(),
                selector,
                force,
                driver,
                expose,
                location: report.location(&header),
                selector_location: report.location(&selector_span),
            });
        }
    }
    devices
}

/// `device "fast0"` if the device has a name that is a string, else `device #N`.
fn device_context(value: &Spanned<DeValue<'_>>, number: usize) -> String {
    match value.get_ref().get("name").map(|name| name.get_ref()) {
        Some(DeValue::String(name)) => format!("device {:?}", &**name),
        _ => format!("device #{number}"),
    }
}

fn check_name(
    raw: &RawDevice,
    checked: &Checked<RawDevice>,
    header: Range<usize>,
    context: &str,
    report: &mut Report<'_>,
) -> Option<Spanned<String>> {
    let Some(name) = &raw.name else {
        if !checked.failed("name") {
            report.at(
                header,
                format!(
                    "{context}: missing name; give each device a unique name, such as \
                     name = \"nvme0\""
                ),
            );
        }
        return None;
    };
    let text = name.get_ref();
    let mut chars = text.chars();
    let valid = text.len() <= DeviceConfig::MAX_NAME_LEN
        && chars
            .next()
            .is_some_and(|first| first.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if !valid {
        report.at(
            name.span(),
            format!(
                "{context}: name {text:?} is not a device name; use letters, digits, '_', '-' \
                 and '.', starting with a letter or digit (at most {}), such as \"nvme0\"",
                DeviceConfig::MAX_NAME_LEN
            ),
        );
        return None;
    }
    Some(name.clone())
}

fn check_selector(
    raw: &RawDevice,
    checked: &Checked<RawDevice>,
    header: Range<usize>,
    context: &str,
    report: &mut Report<'_>,
) -> Option<(DeviceSelector, Range<usize>)> {
    let index = raw.index.as_ref().and_then(|index| {
        let value = in_range(index, 0..=u64::from(u16::MAX), "index", context, report)?;
        Some(u32::try_from(value).expect("the range fits in u32"))
    });
    if let Some(usb) = &raw.usb {
        if let Some(other) = raw.pci.as_ref().or(raw.match_ids.as_ref()) {
            report.at(
                other.span(),
                format!("{context}: usb names a USB device, pci and match a PCI device; keep one"),
            );
            return None;
        }
        if let Some(index) = &raw.index {
            report.at(
                index.span(),
                format!(
                    "{context}: index goes with match, not with usb; tell several devices with \
                     the same IDs apart by serial number (\"VID:PID:SERIAL\") or port \
                     (\"BUS-PORT\")"
                ),
            );
            return None;
        }
        return match usb.get_ref().parse::<ring3_usb::UsbAddress>() {
            Ok(address) => Some((DeviceSelector::Usb(address), usb.span())),
            Err(e) => {
                report.at(
                    usb.span(),
                    format!(
                        "{context}: usb {:?} is not a USB device address: {e}; write \
                         \"VID:PID\", \"VID:PID:SERIAL\" or a port such as \"1-2\" \
                         (`ring3 usb list` shows them)",
                        usb.get_ref()
                    ),
                );
                None
            }
        };
    }
    match (&raw.pci, &raw.match_ids) {
        (Some(_), Some(match_ids)) => {
            report.at(
                match_ids.span(),
                format!(
                    "{context}: both pci and match are given; keep one: pci names one address, \
                     match finds a device by its IDs"
                ),
            );
            None
        }
        (Some(pci), None) => {
            if let Some(index) = &raw.index {
                report.at(
                    index.span(),
                    format!(
                        "{context}: index goes with match, not with pci (an address names \
                         exactly one device); remove it"
                    ),
                );
            }
            match pci.get_ref().parse::<PciAddress>() {
                Ok(address) => Some((DeviceSelector::Address(address), pci.span())),
                Err(_) => {
                    report.at(
                        pci.span(),
                        format!(
                            "{context}: pci {:?} is not a PCI address; write \
                             domain:bus:device.function in hex, such as \"0000:03:00.0\" \
                             (`ring3 list` shows them)",
                            pci.get_ref()
                        ),
                    );
                    None
                }
            }
        }
        (None, Some(match_ids)) => {
            let Some((vendor_id, device_id)) = parse_ids(match_ids.get_ref()) else {
                report.at(
                    match_ids.span(),
                    format!(
                        "{context}: match {:?} is not vendor:device; write two 4-digit hex \
                         IDs, such as \"1b36:0010\" (`ring3 list` shows them)",
                        match_ids.get_ref()
                    ),
                );
                return None;
            };
            if raw.index.is_some() && index.is_none() {
                return None; // reported above
            }
            Some((
                DeviceSelector::Match {
                    vendor_id,
                    device_id,
                    index,
                },
                match_ids.span(),
            ))
        }
        (None, None) => {
            if !checked.failed("pci") && !checked.failed("match") && !checked.failed("usb") {
                report.at(
                    header,
                    format!(
                        "{context}: missing pci, match or usb; say which device: \
                         pci = \"0000:03:00.0\", match = \"1b36:0010\" or \
                         usb = \"46f4:0001\""
                    ),
                );
            }
            None
        }
    }
}

/// `VVVV:DDDD`, each exactly 4 hex digits.
fn parse_ids(text: &str) -> Option<(u16, u16)> {
    let (vendor, device) = text.split_once(':')?;
    let id = |field: &str| {
        (field.len() == 4 && field.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u16::from_str_radix(field, 16).ok())
            .flatten()
    };
    Some((id(vendor)?, id(device)?))
}

fn known_names<T: Copy>(all: &[T], name: fn(T) -> &'static str) -> String {
    all.iter()
        .map(|&item| name(item))
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_driver(
    raw: &RawDevice,
    checked: &Checked<RawDevice>,
    header: Range<usize>,
    context: &str,
    report: &mut Report<'_>,
) -> Option<Driver> {
    let known = known_names(&Driver::ALL, Driver::name);
    let Some(driver) = &raw.driver else {
        if !checked.failed("driver") {
            report.at(
                header,
                format!("{context}: missing driver; name one of the known drivers: {known}"),
            );
        }
        return None;
    };
    let found = Driver::from_name(driver.get_ref());
    if found.is_none() {
        report.at(
            driver.span(),
            format!(
                "{context}: driver {:?} is unknown; the known drivers are: {known}",
                driver.get_ref()
            ),
        );
    }
    found
}

fn check_expose(
    raw: &RawDevice,
    driver: Driver,
    context: &str,
    report: &mut Report<'_>,
) -> Option<Exposure> {
    let fits = driver.exposures();
    let Some(expose) = &raw.expose else {
        return fits.first().copied();
    };
    let fitting = known_names(fits, Exposure::name);
    match Exposure::from_name(expose.get_ref()) {
        Some(exposure) if fits.contains(&exposure) => Some(exposure),
        Some(exposure) => {
            report.at(
                expose.span(),
                format!(
                    "{context}: expose {:?} does not fit driver {driver:?}; {driver} devices \
                     are exposed as: {fitting}",
                    exposure.name(),
                    driver = driver.name(),
                ),
            );
            None
        }
        None => {
            report.at(
                expose.span(),
                format!(
                    "{context}: expose {:?} is unknown; {driver} devices are exposed as: \
                     {fitting}",
                    expose.get_ref(),
                    driver = driver.name(),
                ),
            );
            None
        }
    }
}

/// The driver's options from `[device.<driver>]`, defaults for those not given.
fn check_options(
    raw: &RawDevice,
    driver: Driver,
    context: &str,
    report: &mut Report<'_>,
) -> Option<DriverConfig> {
    let tables = [
        (
            raw.nvme.as_ref().map(|t| t.span()),
            "nvme",
            Driver::Nvme.name(),
        ),
        (
            raw.net.as_ref().map(|t| t.span()),
            "net",
            Driver::VirtioNet.name(),
        ),
        (
            raw.serial.as_ref().map(|t| t.span()),
            "serial",
            Driver::Ftdi.name(),
        ),
    ];
    let fits = |table: &str| match driver {
        Driver::Nvme => table == "nvme",
        Driver::VirtioNet | Driver::E1000e => table == "net",
        Driver::Ftdi => table == "serial",
        Driver::UsbStorage => false,
    };
    let misplaced = tables
        .into_iter()
        .find_map(|(span, table, _)| Some((span?, table)).filter(|(_, t)| !fits(t)));
    if let Some((span, table)) = misplaced {
        report.at(
            span,
            format!(
                "{context}: [device.{table}] does not apply to driver {driver}; remove it",
                driver = driver.name()
            ),
        );
        return None;
    }
    match driver {
        Driver::Nvme => {
            let Some(nvme) = &raw.nvme else {
                return Some(DriverConfig::Nvme(NvmeOptions::default()));
            };
            check_nvme(nvme.get_ref(), &format!("{context}: nvme"), report).map(DriverConfig::Nvme)
        }
        Driver::VirtioNet | Driver::E1000e => {
            let Some(net) = &raw.net else {
                return Some(DriverConfig::Net(driver, NetOptions::default()));
            };
            check_net(net.get_ref(), &format!("{context}: net"), report)
                .map(|options| DriverConfig::Net(driver, options))
        }
        Driver::UsbStorage => Some(DriverConfig::UsbStorage),
        Driver::Ftdi => {
            let Some(serial) = &raw.serial else {
                return Some(DriverConfig::Ftdi(SerialOptions::default()));
            };
            let mut options = SerialOptions::default();
            if let Some(baud) = &serial.get_ref().baud {
                let value = in_range(
                    baud,
                    SerialOptions::BAUD,
                    "baud",
                    &format!("{context}: serial"),
                    report,
                )?;
                options.baud = u32::try_from(value).ok()?;
            }
            Some(DriverConfig::Ftdi(options))
        }
    }
}

/// `force = true`: only for USB drivers, which may detach a kernel driver.
fn check_force(
    raw: &RawDevice,
    driver: Option<Driver>,
    context: &str,
    report: &mut Report<'_>,
) -> bool {
    let Some(force) = &raw.force else {
        return false;
    };
    if driver.is_some_and(|driver| !driver.is_usb()) {
        report.at(
            force.span(),
            format!(
                "{context}: force applies to USB devices (detaching their kernel driver); a \
                 PCI device is always taken from its kernel driver; remove it"
            ),
        );
        return false;
    }
    *force.get_ref()
}

fn check_net(raw: &RawNet, context: &str, report: &mut Report<'_>) -> Option<NetOptions> {
    let mut options = NetOptions::default();
    let mut valid = true;
    if let Some(queues) = &raw.queues {
        match in_range(queues, NetOptions::QUEUES, "queues", context, report) {
            Some(queues) => options.queues = u16::try_from(queues).expect("the range fits"),
            None => valid = false,
        }
    }
    if let Some(size) = &raw.ring_size {
        match in_range(size, NetOptions::RING_SIZE, "ring_size", context, report) {
            Some(size) => options.ring_size = u16::try_from(size).expect("the range fits"),
            None => valid = false,
        }
    }
    valid.then_some(options)
}

fn check_nvme(raw: &RawNvme, context: &str, report: &mut Report<'_>) -> Option<NvmeOptions> {
    let mut options = NvmeOptions::default();
    let mut valid = true;
    if let Some(queues) = &raw.queues {
        match in_range(queues, NvmeOptions::QUEUES, "queues", context, report) {
            Some(queues) => options.queues = u16::try_from(queues).expect("the range fits"),
            None => valid = false,
        }
    }
    if let Some(depth) = &raw.queue_depth {
        match in_range(
            depth,
            NvmeOptions::QUEUE_DEPTH,
            "queue_depth",
            context,
            report,
        ) {
            Some(depth) => options.queue_depth = u16::try_from(depth).expect("the range fits"),
            None => valid = false,
        }
    }
    if let Some(namespaces) = &raw.namespaces {
        if namespaces.get_ref().is_empty() {
            report.at(
                namespaces.span(),
                format!(
                    "{context}: namespaces is empty; list namespace IDs such as [1, 2], or \
                     leave the key out to expose every namespace"
                ),
            );
            valid = false;
        }
        let mut ids = Vec::new();
        for id in namespaces.get_ref() {
            let Some(number) = in_range(
                id,
                NvmeOptions::NAMESPACE_ID,
                "namespace ID",
                context,
                report,
            ) else {
                valid = false;
                continue;
            };
            let number = u32::try_from(number).expect("the range fits");
            if ids.contains(&number) {
                report.at(
                    id.span(),
                    format!("{context}: namespace {number} is listed twice; list it once"),
                );
                valid = false;
            }
            ids.push(number);
        }
        options.namespaces = Namespaces::Only(ids);
    }
    valid.then_some(options)
}
