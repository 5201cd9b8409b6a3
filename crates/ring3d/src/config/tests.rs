use std::path::Path;
use std::time::Duration;

use ring3::pci::{PciAddress, PciDevice, Sysfs};

use super::*;

const FILE: &str = "ring3d.toml";

/// A valid device for cases that need one besides the broken part.
const GOOD_DEVICE: &str = r#"
[[device]]
name = "good"
pci = "0000:05:00.0"
driver = "nvme"
"#;

fn errors_of(text: &str) -> ConfigErrors {
    match Config::parse(text, FILE) {
        Ok(config) => panic!("expected errors, parsed {config:#?}"),
        Err(errors) => errors,
    }
}

/// Asserts that `text` has exactly one problem, on `line`, whose message contains
/// `fragment`; returns it.
#[track_caller]
fn assert_one_error(text: &str, line: usize, fragment: &str) -> ConfigError {
    let errors = errors_of(text);
    assert_eq!(errors.len(), 1, "expected one error, got:\n{errors}");
    let error = errors.errors()[0].clone();
    assert_eq!(
        error.location.map(|location| location.line),
        Some(line),
        "wrong line in: {error}"
    );
    assert!(
        error.message.contains(fragment),
        "{fragment:?} not in: {error}"
    );
    assert_eq!(error.file, Path::new(FILE));
    error
}

fn parse(text: &str) -> Config {
    Config::parse(text, FILE).unwrap_or_else(|errors| panic!("should parse:\n{errors}"))
}

// --- files that are right ---

#[test]
fn example_file_parses() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/ring3d.example.toml");
    let config = Config::load(path).unwrap_or_else(|errors| panic!("{errors}"));
    assert_eq!(
        config.daemon,
        DaemonConfig {
            socket: "/run/ring3/ring3d.sock".into(),
            socket_group: Some("ring3".into()),
            driver_user: "ring3".into(),
            restart_budget: RestartBudget {
                restarts: 5,
                window: Duration::from_secs(1800),
            },
            heartbeat: Duration::from_millis(1000),
            heartbeat_timeout: Duration::from_millis(5000),
        }
    );
    assert_eq!(config.devices.len(), 5);
    assert_eq!(config.devices[3].driver, DriverConfig::UsbStorage);
    assert!(config.devices[3].force);
    assert_eq!(
        config.devices[4].driver,
        DriverConfig::Ftdi(SerialOptions { baud: 115_200 })
    );
    let fast = &config.devices[0];
    assert_eq!(fast.name, "fast0");
    assert_eq!(
        fast.selector,
        DeviceSelector::Address("0000:03:00.0".parse().unwrap())
    );
    assert_eq!(
        fast.driver,
        DriverConfig::Nvme(NvmeOptions {
            queues: 4,
            queue_depth: 128,
            namespaces: Namespaces::Only(vec![1]),
        })
    );
    assert_eq!(fast.expose, Exposure::Ublk);
    assert_eq!(fast.location.line, 15);
    assert_eq!(
        fast.selector_location,
        Location {
            line: 17,
            column: 7
        }
    );
    let scratch = &config.devices[1];
    assert_eq!(
        scratch.selector,
        DeviceSelector::Match {
            vendor_id: 0x1b36,
            device_id: 0x0010,
            index: Some(1),
        }
    );
    assert_eq!(scratch.driver, DriverConfig::Nvme(NvmeOptions::default()));
    let lan = &config.devices[2];
    assert_eq!(
        lan.driver,
        DriverConfig::Net(
            Driver::VirtioNet,
            NetOptions {
                queues: 1,
                ring_size: 256
            }
        )
    );
    assert_eq!(lan.expose, Exposure::Tap);
}

#[test]
fn network_drivers_take_the_net_table_only() {
    let errors = errors_of(
        "[[device]]\nname = \"l\"\npci = \"05:00.0\"\ndriver = \"e1000e\"\n\
         [device.nvme]\nqueues = 2\n",
    )
    .to_string();
    assert!(
        errors.contains("[device.nvme] does not apply to driver e1000e"),
        "{errors}"
    );
    let errors = errors_of(
        "[[device]]\nname = \"l\"\npci = \"05:00.0\"\ndriver = \"virtio-net\"\n\
         expose = \"ublk\"\n",
    )
    .to_string();
    assert!(errors.contains("expose"), "{errors}");
    let errors = errors_of(
        "[[device]]\nname = \"l\"\npci = \"05:00.0\"\ndriver = \"virtio-net\"\n\
         [device.net]\nring_size = 8\n",
    )
    .to_string();
    assert!(
        errors.contains("ring_size 8 is out of range (64 to 4096)"),
        "{errors}"
    );
    let config = parse("[[device]]\nname = \"l\"\npci = \"05:00.0\"\ndriver = \"e1000e\"\n");
    assert_eq!(config.devices[0].expose, Exposure::Tap);
}

#[test]
fn minimal_file_gets_every_default() {
    let config = parse("[[device]]\nname = \"n\"\npci = \"03:00.0\"\ndriver = \"nvme\"\n");
    assert_eq!(config.daemon, DaemonConfig::default());
    assert_eq!(config.daemon.socket_group, None);
    assert_eq!(config.devices.len(), 1);
    assert_eq!(config.devices[0].expose, Exposure::Ublk);
    assert_eq!(
        config.devices[0].driver,
        DriverConfig::Nvme(NvmeOptions {
            queues: 4,
            queue_depth: 128,
            namespaces: Namespaces::All
        })
    );
    assert_eq!(config.path, Path::new(FILE));
}

#[test]
fn range_limits_are_accepted() {
    let config = parse(
        "[daemon]\nrestart_budget = { restarts = 0, window_s = 1 }\nheartbeat_ms = 10\n\
         heartbeat_timeout_ms = 20\n\
         [[device]]\nname = \"n\"\nmatch = \"8086:F1A5\"\nindex = 0\ndriver = \"nvme\"\n\
         [device.nvme]\nqueues = 1024\nqueue_depth = 2\nnamespaces = [4294967294, 1]\n",
    );
    assert_eq!(config.daemon.restart_budget.restarts, 0);
    assert_eq!(
        config.devices[0].driver,
        DriverConfig::Nvme(NvmeOptions {
            queues: 1024,
            queue_depth: 2,
            namespaces: Namespaces::Only(vec![0xffff_fffe, 1]),
        })
    );
    assert_eq!(
        config.devices[0].selector,
        DeviceSelector::Match {
            vendor_id: 0x8086,
            device_id: 0xf1a5,
            index: Some(0)
        }
    );
}

// --- one malformed case each ---

#[test]
fn out_of_range_queue_depth_reads_like_the_manual() {
    let text = "[[device]]\nname = \"fast0\"\npci = \"0000:03:00.0\"\ndriver = \"nvme\"\n\
                [device.nvme]\nqueue_depth = 5000\n";
    let error = assert_one_error(text, 6, "queue_depth 5000 is out of range (2 to 4096)");
    assert_eq!(
        error.to_string(),
        "ring3d.toml:6:15: device \"fast0\": nvme: queue_depth 5000 is out of range (2 to 4096)"
    );
}

#[test]
fn syntax_error() {
    assert_one_error(
        "[daemon]\nheartbeat_ms = 1000\n[[device]\nname = \"x\"\n",
        3,
        "unclosed array table, expected `]`",
    );
}

#[test]
fn unknown_key_in_a_device() {
    let error = assert_one_error(
        "[[device]]\nname = \"a\"\npci = \"03:00.0\"\ndriver = \"nvme\"\nqueues = 4\n",
        5,
        "device \"a\": unknown key `queues`, expected one of",
    );
    assert!(error.message.contains("`driver`"), "{error}");
    assert_eq!(error.location.unwrap().column, 1);
}

#[test]
fn unknown_key_in_daemon() {
    assert_one_error(
        &format!("[daemon]\nsocket = \"/run/x.sock\"\nsokcet_group = \"ring3\"\n{GOOD_DEVICE}"),
        3,
        "daemon: unknown key `sokcet_group`",
    );
}

#[test]
fn unknown_key_in_driver_options() {
    assert_one_error(
        &format!("{GOOD_DEVICE}[device.nvme]\nqueues = 2\nqueus = 4\n"),
        8,
        "device \"good\": nvme: unknown key `queus`, expected one of `queues`, `queue_depth`, `namespaces`",
    );
}

#[test]
fn unknown_key_in_restart_budget() {
    assert_one_error(
        &format!("[daemon]\nrestart_budget = {{ restarts = 5, window = 60 }}\n{GOOD_DEVICE}"),
        2,
        "daemon: restart_budget: unknown key `window`",
    );
}

#[test]
fn unknown_section() {
    assert_one_error(
        &format!("{GOOD_DEVICE}[devices]\nname = \"x\"\n"),
        6,
        "unknown section `devices`",
    );
}

#[test]
fn wrong_type_integer_as_string() {
    assert_one_error(
        &format!("{GOOD_DEVICE}[device.nvme]\nqueues = \"4\"\n"),
        7,
        "device \"good\": nvme: invalid type: string \"4\", expected an integer",
    );
}

#[test]
fn wrong_type_name_not_a_string() {
    assert_one_error(
        "[[device]]\nname = 7\npci = \"03:00.0\"\ndriver = \"nvme\"\n",
        2,
        "device #1: invalid type: integer `7`, expected a string",
    );
}

#[test]
fn wrong_type_namespaces_not_an_array() {
    assert_one_error(
        &format!("{GOOD_DEVICE}[device.nvme]\nnamespaces = 1\n"),
        7,
        "expected an array",
    );
}

#[test]
fn wrong_type_restart_budget_not_a_table() {
    assert_one_error(
        &format!("[daemon]\nrestart_budget = 5\n{GOOD_DEVICE}"),
        2,
        "expected a table such as { restarts = 5, window_s = 1800 }",
    );
}

#[test]
fn wrong_type_driver_options_not_a_table() {
    assert_one_error(
        "[[device]]\nname = \"a\"\npci = \"03:00.0\"\ndriver = \"nvme\"\nnvme = 4\n",
        5,
        "device \"a\": nvme: invalid type: integer `4`, expected a table",
    );
}

#[test]
fn device_as_a_single_table() {
    assert_one_error(
        "[device]\nname = \"a\"\npci = \"03:00.0\"\ndriver = \"nvme\"\n",
        1,
        "[[device]] sections (note the double brackets)",
    );
}

#[test]
fn malformed_pci_address() {
    assert_one_error(
        "[[device]]\nname = \"a\"\npci = \"0000:03:00\"\ndriver = \"nvme\"\n",
        3,
        "device \"a\": pci \"0000:03:00\" is not a PCI address; write domain:bus:device.function",
    );
}

#[test]
fn pci_address_with_device_out_of_range() {
    assert_one_error(
        "[[device]]\nname = \"a\"\npci = \"0000:03:20.0\"\ndriver = \"nvme\"\n",
        3,
        "is not a PCI address",
    );
}

#[test]
fn bad_vendor_device_match() {
    for bad in [
        "1b36-0010",
        "1b36:10",
        "1b36:0010:1",
        "1b3g:0010",
        "",
        "0x1b:0010",
    ] {
        assert_one_error(
            &format!("[[device]]\nname = \"a\"\nmatch = \"{bad}\"\ndriver = \"nvme\"\n"),
            3,
            &format!("match {bad:?} is not vendor:device; write two 4-digit hex IDs"),
        );
    }
}

#[test]
fn both_pci_and_match() {
    assert_one_error(
        "[[device]]\nname = \"a\"\npci = \"03:00.0\"\nmatch = \"1b36:0010\"\ndriver = \"nvme\"\n",
        4,
        "device \"a\": both pci and match are given; keep one",
    );
}

#[test]
fn neither_pci_nor_match() {
    assert_one_error(
        "[daemon]\n\n[[device]]\nname = \"a\"\ndriver = \"nvme\"\n",
        3,
        "device \"a\": missing pci, match or usb",
    );
}

#[test]
fn index_with_pci() {
    assert_one_error(
        "[[device]]\nname = \"a\"\npci = \"03:00.0\"\nindex = 1\ndriver = \"nvme\"\n",
        4,
        "index goes with match, not with pci",
    );
}

#[test]
fn negative_index() {
    assert_one_error(
        "[[device]]\nname = \"a\"\nmatch = \"1b36:0010\"\nindex = -1\ndriver = \"nvme\"\n",
        4,
        "index -1 is out of range (0 to 65535)",
    );
}

#[test]
fn duplicate_device_names() {
    assert_one_error(
        "[[device]]\nname = \"a\"\npci = \"03:00.0\"\ndriver = \"nvme\"\n\n\
         [[device]]\nname = \"a\"\npci = \"04:00.0\"\ndriver = \"nvme\"\n",
        7,
        "device \"a\": the name is already used by the device at line 1",
    );
}

#[test]
fn same_pci_address_twice_in_different_spellings() {
    assert_one_error(
        "[[device]]\nname = \"a\"\npci = \"0000:03:00.0\"\ndriver = \"nvme\"\n\n\
         [[device]]\nname = \"b\"\npci = \"03:00.0\"\ndriver = \"nvme\"\n",
        8,
        "device \"b\": pci 0000:03:00.0 is already used by device \"a\" (line 1)",
    );
}

#[test]
fn same_match_twice() {
    assert_one_error(
        "[[device]]\nname = \"a\"\nmatch = \"1b36:0010\"\ndriver = \"nvme\"\n\n\
         [[device]]\nname = \"b\"\nmatch = \"1B36:0010\"\ndriver = \"nvme\"\n",
        8,
        "device \"b\": match 1b36:0010 is already used by device \"a\" (line 1)",
    );
}

#[test]
fn invalid_device_name() {
    assert_one_error(
        "[[device]]\nname = \"fast 0\"\npci = \"03:00.0\"\ndriver = \"nvme\"\n",
        2,
        "name \"fast 0\" is not a device name",
    );
}

#[test]
fn missing_name() {
    assert_one_error(
        "[[device]]\npci = \"03:00.0\"\ndriver = \"nvme\"\n",
        1,
        "device #1: missing name",
    );
}

#[test]
fn unknown_driver() {
    assert_one_error(
        "[[device]]\nname = \"a\"\npci = \"03:00.0\"\ndriver = \"nvm\"\n",
        4,
        "device \"a\": driver \"nvm\" is unknown; the known drivers are: nvme",
    );
}

#[test]
fn missing_driver() {
    assert_one_error(
        "[[device]]\nname = \"a\"\npci = \"03:00.0\"\n",
        1,
        "device \"a\": missing driver; name one of the known drivers: nvme",
    );
}

#[test]
fn exposure_that_does_not_fit_the_driver() {
    assert_one_error(
        "[[device]]\nname = \"a\"\npci = \"03:00.0\"\ndriver = \"nvme\"\nexpose = \"tap\"\n",
        5,
        "device \"a\": expose \"tap\" does not fit driver \"nvme\"; nvme devices are exposed as: ublk",
    );
}

#[test]
fn unknown_exposure() {
    assert_one_error(
        "[[device]]\nname = \"a\"\npci = \"03:00.0\"\ndriver = \"nvme\"\nexpose = \"nbd\"\n",
        5,
        "expose \"nbd\" is unknown; nvme devices are exposed as: ublk",
    );
}

#[test]
fn queues_out_of_range() {
    for (queues, shown) in [("0", "0"), ("1025", "1025"), ("-3", "-3")] {
        assert_one_error(
            &format!("{GOOD_DEVICE}[device.nvme]\nqueues = {queues}\n"),
            7,
            &format!("device \"good\": nvme: queues {shown} is out of range (1 to 1024)"),
        );
    }
}

#[test]
fn queue_depth_too_small() {
    assert_one_error(
        &format!("{GOOD_DEVICE}[device.nvme]\nqueue_depth = 1\n"),
        7,
        "queue_depth 1 is out of range (2 to 4096)",
    );
}

#[test]
fn empty_namespace_list() {
    assert_one_error(
        &format!("{GOOD_DEVICE}[device.nvme]\nnamespaces = []\n"),
        7,
        "namespaces is empty; list namespace IDs such as [1, 2], or leave the key out",
    );
}

#[test]
fn namespace_zero() {
    assert_one_error(
        &format!("{GOOD_DEVICE}[device.nvme]\nnamespaces = [1, 0]\n"),
        7,
        "namespace ID 0 is out of range (1 to 4294967294)",
    );
}

#[test]
fn namespace_listed_twice() {
    assert_one_error(
        &format!("{GOOD_DEVICE}[device.nvme]\nnamespaces = [1,\n  2,\n  1]\n"),
        9,
        "namespace 1 is listed twice",
    );
}

#[test]
fn negative_restarts() {
    assert_one_error(
        &format!("[daemon]\nrestart_budget = {{ restarts = -1, window_s = 60 }}\n{GOOD_DEVICE}"),
        2,
        "daemon: restart_budget: restarts -1 is out of range (0 to 1000)",
    );
}

#[test]
fn zero_restart_window() {
    assert_one_error(
        &format!("[daemon]\nrestart_budget = {{ restarts = 3, window_s = 0 }}\n{GOOD_DEVICE}"),
        2,
        "daemon: restart_budget: window_s 0 is out of range (1 to 604800)",
    );
}

#[test]
fn heartbeat_timeout_not_longer_than_heartbeat() {
    assert_one_error(
        &format!("[daemon]\nheartbeat_ms = 1000\nheartbeat_timeout_ms = 1000\n{GOOD_DEVICE}"),
        3,
        "daemon: heartbeat_timeout_ms 1000 must be greater than heartbeat_ms 1000",
    );
}

#[test]
fn heartbeat_longer_than_the_default_timeout() {
    assert_one_error(
        &format!("[daemon]\nheartbeat_ms = 6000\n{GOOD_DEVICE}"),
        2,
        "heartbeat_timeout_ms 5000 must be greater than heartbeat_ms 6000",
    );
}

#[test]
fn zero_heartbeat() {
    assert_one_error(
        &format!("[daemon]\nheartbeat_ms = 0\n{GOOD_DEVICE}"),
        2,
        "daemon: heartbeat_ms 0 is out of range (10 to 60000)",
    );
}

#[test]
fn relative_socket_path() {
    assert_one_error(
        &format!("[daemon]\nsocket = \"ring3d.sock\"\n{GOOD_DEVICE}"),
        2,
        "daemon: socket \"ring3d.sock\" is not an absolute path",
    );
}

#[test]
fn driver_user_root() {
    assert_one_error(
        &format!("[daemon]\ndriver_user = \"root\"\n{GOOD_DEVICE}"),
        2,
        "daemon: driver_user must not be root",
    );
}

#[test]
fn bad_socket_group_name() {
    assert_one_error(
        &format!("[daemon]\nsocket_group = \"Ring 3\"\n{GOOD_DEVICE}"),
        2,
        "daemon: socket_group \"Ring 3\" is not a group name",
    );
}

#[test]
fn no_devices() {
    let error = assert_one_error(
        "[daemon]\nheartbeat_ms = 100\n",
        3,
        "no devices: add a [[device]] section",
    );
    assert_eq!(error.location, Some(Location { line: 3, column: 1 }));
}

#[test]
fn empty_device_array() {
    assert_one_error("device = []\n", 1, "no devices");
}

// --- several problems at once ---

#[test]
fn every_problem_of_a_file_is_reported_in_file_order() {
    let text = r#"[daemon]
socket = "relative.sock"
heartbeat_ms = "fast"
heartbeat_timeout_ms = 500
colour = "blue"

[[device]]
name = "fast0"
pci = "0000:03:00.0"
driver = "nvme"
expose = "tap"
[device.nvme]
queues = 0
queue_depth = 5000
bogus = true

[[device]]
name = "fast0"
pci = "03:00.0"
driver = "e1000"

[[device]]
name = "third"
match = "zz:0010"
driver = "nvme"
"#;
    let errors = errors_of(text);
    let lines: Vec<usize> = errors
        .iter()
        .map(|error| error.location.expect("every problem has a place").line)
        .collect();
    assert_eq!(
        lines,
        [2, 3, 5, 11, 13, 14, 15, 18, 19, 20, 24],
        "got:\n{errors}"
    );
    let shown = errors.to_string();
    assert_eq!(
        shown.lines().count(),
        errors.len(),
        "one per line:\n{shown}"
    );
    for fragment in [
        "ring3d.toml:2:10: daemon: socket \"relative.sock\"",
        "ring3d.toml:3:16: daemon: invalid type: string \"fast\", expected an integer",
        "ring3d.toml:5:1: daemon: unknown key `colour`",
        "ring3d.toml:11:10: device \"fast0\": expose \"tap\" does not fit",
        "ring3d.toml:13:10: device \"fast0\": nvme: queues 0 is out of range (1 to 1024)",
        "ring3d.toml:14:15: device \"fast0\": nvme: queue_depth 5000 is out of range (2 to 4096)",
        "ring3d.toml:15:1: device \"fast0\": nvme: unknown key `bogus`",
        "ring3d.toml:18:8: device \"fast0\": the name is already used by the device at line 7",
        "ring3d.toml:19:7: device \"fast0\": pci 0000:03:00.0 is already used by device \"fast0\" (line 7)",
        "ring3d.toml:20:10: device \"fast0\": driver \"e1000\" is unknown",
        "ring3d.toml:24:9: device \"third\": match \"zz:0010\" is not vendor:device",
    ] {
        assert!(shown.contains(fragment), "{fragment:?} not in:\n{shown}");
    }
    // A bad heartbeat_ms is not compared with the timeout.
    assert!(!shown.contains("must be greater"), "{shown}");
}

#[test]
fn several_syntax_errors_are_all_reported() {
    let errors = errors_of("[daemon]\nheartbeat_ms = \nsocket = \n[[device]]\n");
    let lines: Vec<usize> = errors.iter().map(|e| e.location.unwrap().line).collect();
    assert_eq!(lines, [2, 3], "{errors}");
}

#[test]
fn unreadable_file_says_so_without_a_line() {
    let errors = Config::load("/nonexistent/ring3d.toml").unwrap_err();
    assert_eq!(errors.len(), 1);
    let error = &errors.errors()[0];
    assert_eq!(error.location, None);
    assert!(
        error
            .to_string()
            .starts_with("/nonexistent/ring3d.toml: cannot read the config file: "),
        "{error}"
    );
}

#[test]
fn location_counts_characters_not_bytes() {
    let text = "a = \"é\"\nbé = 1\n";
    assert_eq!(
        Location::of_offset(text, 0),
        Location { line: 1, column: 1 }
    );
    assert_eq!(
        Location::of_offset(text, 9),
        Location { line: 2, column: 1 }
    );
    assert_eq!(
        Location::of_offset(text, 12),
        Location { line: 2, column: 3 }
    );
    // Inside the two bytes of é: rounded down to its start.
    assert_eq!(
        Location::of_offset(text, 6),
        Location { line: 1, column: 6 }
    );
    assert_eq!(
        Location::of_offset(text, 1000),
        Location { line: 3, column: 1 }
    );
}

#[test]
fn error_columns_count_characters() {
    let text = "device = [{ name = \"émile\", pci = \"x\", driver = \"nvme\" }]\n";
    let errors = errors_of(text);
    let pci = errors
        .iter()
        .find(|error| error.message.contains("pci \"x\""))
        .unwrap_or_else(|| panic!("{errors}"));
    let byte_column = text.find("\"x\"").unwrap() + 1;
    assert_eq!(
        pci.location,
        Some(Location {
            line: 1,
            column: byte_column - 1
        })
    );
}

// --- resolution ---

fn pci_device(address: &str, vendor_id: u16, device_id: u16, class_code: u32) -> PciDevice {
    PciDevice {
        address: address.parse().unwrap(),
        vendor_id,
        device_id,
        subsystem_vendor_id: 0,
        subsystem_id: 0,
        class_code,
        revision: 0,
        driver: Some("nvme".into()),
        iommu_group: Some(7),
        bars: Vec::new(),
        numa_node: None,
    }
}

const NVME: u32 = 0x01_08_02;

fn machine() -> Vec<PciDevice> {
    vec![
        pci_device("0000:00:02.0", 0x1234, 0x1111, 0x03_00_00),
        pci_device("0000:04:00.0", 0x1b36, 0x0010, NVME),
        pci_device("0000:03:00.0", 0x1b36, 0x0010, NVME),
        pci_device("0000:05:00.0", 0x144d, 0xa808, NVME),
    ]
}

fn resolve_errors(text: &str) -> ConfigErrors {
    match parse(text).resolve_against(&machine()) {
        Ok(plan) => panic!("expected errors, resolved {plan:#?}"),
        Err(errors) => errors,
    }
}

fn address(text: &str) -> PciAddress {
    text.parse().unwrap()
}

#[test]
fn resolves_addresses_and_matches() {
    let plan = parse(
        "[[device]]\nname = \"a\"\npci = \"05:00.0\"\ndriver = \"nvme\"\n\
         [[device]]\nname = \"b\"\nmatch = \"1b36:0010\"\nindex = 1\ndriver = \"nvme\"\n\
         [[device]]\nname = \"c\"\nmatch = \"1b36:0010\"\nindex = 0\ndriver = \"nvme\"\n",
    )
    .resolve_against(&machine())
    .unwrap_or_else(|errors| panic!("{errors}"));
    let addresses: Vec<(&str, PciAddress)> = plan
        .devices
        .iter()
        .map(|device| {
            (
                device.name.as_str(),
                device.address.pci().expect("a PCI device"),
            )
        })
        .collect();
    // index counts in address order, not in the order the machine listed them.
    assert_eq!(
        addresses,
        [
            ("a", address("0000:05:00.0")),
            ("b", address("0000:04:00.0")),
            ("c", address("0000:03:00.0")),
        ]
    );
    assert_eq!(
        plan.devices[0].to_string(),
        "a: 0000:05:00.0 (144d:a808, kernel driver nvme) -> nvme (queues 4, queue depth 128, \
         namespaces all) exposed as ublk"
    );
    assert_eq!(plan.to_string().lines().count(), 3);
}

#[test]
fn resolve_reports_a_missing_address() {
    let errors = resolve_errors("[[device]]\nname = \"a\"\npci = \"09:00.0\"\ndriver = \"nvme\"\n");
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors.to_string(),
        "ring3d.toml:3:7: device \"a\": no PCI device at 0000:09:00.0 on this machine; \
         `ring3 list` shows the devices there are"
    );
}

#[test]
fn resolve_reports_a_match_without_devices() {
    let errors =
        resolve_errors("[[device]]\nname = \"a\"\nmatch = \"8086:0953\"\ndriver = \"nvme\"\n");
    assert_eq!(errors.len(), 1, "{errors}");
    assert!(
        errors
            .to_string()
            .contains("3:9: device \"a\": no PCI device matches 8086:0953"),
        "{errors}"
    );
}

#[test]
fn resolve_reports_an_ambiguous_match() {
    let errors =
        resolve_errors("[[device]]\nname = \"a\"\nmatch = \"1b36:0010\"\ndriver = \"nvme\"\n");
    assert_eq!(errors.len(), 1, "{errors}");
    assert!(
        errors.to_string().contains(
            "device \"a\": match 1b36:0010 fits 2 devices (0000:03:00.0, 0000:04:00.0); add \
             index = N (0 to 1)"
        ),
        "{errors}"
    );
}

#[test]
fn resolve_reports_an_index_past_the_matches() {
    let errors = resolve_errors(
        "[[device]]\nname = \"a\"\nmatch = \"144d:a808\"\nindex = 1\ndriver = \"nvme\"\n",
    );
    assert!(
        errors.to_string().contains(
            "index 1 is out of range: match 144d:a808 fits 1 device (0000:05:00.0), so index is 0 to 0"
        ),
        "{errors}"
    );
}

#[test]
fn resolve_refuses_a_device_of_the_wrong_class() {
    let errors =
        resolve_errors("[[device]]\nname = \"gpu\"\npci = \"00:02.0\"\ndriver = \"nvme\"\n");
    assert!(
        errors.to_string().contains(
            "device \"gpu\": 0000:00:02.0 is a Display controller: VGA compatible (class 030000), \
             not an NVMe controller (class 010802)"
        ),
        "{errors}"
    );
}

#[test]
fn resolve_refuses_two_entries_for_one_device() {
    let errors = resolve_errors(
        "[[device]]\nname = \"a\"\npci = \"05:00.0\"\ndriver = \"nvme\"\n\n\
         [[device]]\nname = \"b\"\nmatch = \"144d:a808\"\ndriver = \"nvme\"\n",
    );
    assert_eq!(errors.len(), 1, "{errors}");
    assert_eq!(
        errors.errors()[0].to_string(),
        "ring3d.toml:8:9: device \"b\": match 144d:a808 resolves to 0000:05:00.0, which device \
         \"a\" (line 1) already uses; each device can be driven only once"
    );
}

#[test]
fn resolve_reports_every_device_that_fails() {
    let errors = resolve_errors(
        "[[device]]\nname = \"a\"\npci = \"09:00.0\"\ndriver = \"nvme\"\n\
         [[device]]\nname = \"b\"\nmatch = \"1b36:0010\"\ndriver = \"nvme\"\n\
         [[device]]\nname = \"c\"\npci = \"05:00.0\"\ndriver = \"nvme\"\n",
    );
    let lines: Vec<usize> = errors.iter().map(|e| e.location.unwrap().line).collect();
    assert_eq!(lines, [3, 7], "{errors}");
}

#[test]
fn resolve_reads_sysfs_without_changing_it() {
    let dir = tempfile::tempdir().unwrap();
    let add = |address: &str, vendor: &str, device: &str, class: &str| {
        let path = dir.path().join("bus/pci/devices").join(address);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("vendor"), format!("{vendor}\n")).unwrap();
        std::fs::write(path.join("device"), format!("{device}\n")).unwrap();
        std::fs::write(path.join("class"), format!("{class}\n")).unwrap();
    };
    add("0000:03:00.0", "0x1b36", "0x0010", "0x010802");
    add("0000:00:1f.0", "0x8086", "0x2918", "0x060100");
    let snapshot = || {
        let mut files: Vec<(std::path::PathBuf, Vec<u8>)> = Vec::new();
        let mut stack = vec![dir.path().to_path_buf()];
        while let Some(path) = stack.pop() {
            for entry in std::fs::read_dir(&path).unwrap() {
                let entry = entry.unwrap();
                if entry.file_type().unwrap().is_dir() {
                    stack.push(entry.path());
                } else {
                    files.push((entry.path(), std::fs::read(entry.path()).unwrap()));
                }
            }
        }
        files.sort();
        files
    };
    let before = snapshot();
    let config = parse("[[device]]\nname = \"a\"\nmatch = \"1b36:0010\"\ndriver = \"nvme\"\n");
    let plan = config
        .resolve(&Sysfs::at(dir.path()))
        .unwrap_or_else(|errors| panic!("{errors}"));
    assert_eq!(plan.devices.len(), 1);
    assert_eq!(
        plan.devices[0].address,
        super::DeviceAddress::Pci(address("0000:03:00.0"))
    );
    assert_eq!(plan.devices[0].current_driver, None);
    assert_eq!(snapshot(), before);

    let errors = config
        .resolve(&Sysfs::at(dir.path().join("nowhere")))
        .unwrap_err();
    assert!(
        errors
            .to_string()
            .starts_with("ring3d.toml: cannot list the PCI devices"),
        "{errors}"
    );
}

// --- USB devices ---

#[test]
fn usb_devices_parse_with_their_options() {
    let config = parse(
        "[[device]]\nname = \"stick\"\nusb = \"46f4:0001:R3RAW\"\ndriver = \"usb-storage\"\n\
         force = true\n\
         [[device]]\nname = \"tty\"\nusb = \"1-2.3\"\ndriver = \"ftdi\"\n\
         [device.serial]\nbaud = 9600\n",
    );
    let stick = &config.devices[0];
    assert!(stick.selector.is_usb());
    assert_eq!(stick.selector.to_string(), "usb 46f4:0001:R3RAW");
    assert_eq!(stick.driver, DriverConfig::UsbStorage);
    assert_eq!(stick.expose, Exposure::Ublk);
    assert!(stick.force);
    let tty = &config.devices[1];
    assert_eq!(tty.selector.to_string(), "usb 1-2.3");
    assert_eq!(tty.driver, DriverConfig::Ftdi(SerialOptions { baud: 9600 }));
    assert_eq!(tty.expose, Exposure::Pty);
    assert!(!tty.force);
    // USB devices are looked up when their driver starts, not at plan time.
    let plan = config
        .resolve_against(&machine())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.devices.len(), 2);
    assert!(plan.devices[0].address.pci().is_none());
    assert!(
        plan.devices[0].to_string().contains("detached"),
        "{}",
        plan.devices[0]
    );
}

#[test]
fn usb_driver_on_a_pci_device_and_back() {
    assert_one_error(
        "[[device]]\nname = \"a\"\npci = \"0000:03:00.0\"\ndriver = \"usb-storage\"\n",
        3,
        "driver usb-storage drives a USB device; name it with usb = ",
    );
    assert_one_error(
        "[[device]]\nname = \"a\"\nusb = \"46f4:0001\"\ndriver = \"nvme\"\n",
        3,
        "driver nvme drives a PCI device",
    );
}

#[test]
fn bad_usb_addresses_and_mixed_selectors() {
    assert_one_error(
        "[[device]]\nname = \"a\"\nusb = \"46f4-zz\"\ndriver = \"usb-storage\"\n",
        3,
        "is not a USB device address",
    );
    assert_one_error(
        "[[device]]\nname = \"a\"\nusb = \"46f4:0001\"\npci = \"0000:03:00.0\"\n\
         driver = \"usb-storage\"\n",
        4,
        "keep one",
    );
    assert_one_error(
        "[[device]]\nname = \"a\"\nusb = \"46f4:0001\"\nindex = 1\ndriver = \"usb-storage\"\n",
        4,
        "index goes with match, not with usb",
    );
}

#[test]
fn usb_options_are_checked() {
    assert_one_error(
        "[[device]]\nname = \"a\"\nusb = \"0403:6001\"\ndriver = \"ftdi\"\n\
         [device.serial]\nbaud = 5000000\n",
        6,
        "baud 5000000 is out of range (183 to 3000000)",
    );
    assert_one_error(
        "[[device]]\nname = \"a\"\nusb = \"46f4:0001\"\ndriver = \"usb-storage\"\n\
         [device.serial]\nbaud = 9600\n",
        5,
        "[device.serial] does not apply to driver usb-storage",
    );
    assert_one_error(
        "[[device]]\nname = \"a\"\npci = \"0000:03:00.0\"\ndriver = \"nvme\"\nforce = true\n",
        5,
        "force applies to USB devices",
    );
    assert_one_error(
        "[[device]]\nname = \"a\"\nusb = \"0403:6001\"\ndriver = \"ftdi\"\nexpose = \"ublk\"\n",
        5,
        "expose \"ublk\" does not fit driver \"ftdi\"",
    );
}
