//! Tests of discovery and binding against fixture sysfs trees.

use std::fs;

use proptest::prelude::*;

use super::device::parse_bars;
use super::fixture::{DeviceSpec, Fixture, MIXED_RESOURCE, NVME_RESOURCE};
use super::*;
use crate::error::{Error, Result};

const NVME: &str = "0000:00:03.0";
const NVME_SECOND_FUNCTION: &str = "0000:00:03.1";
const EDU: &str = "0000:00:02.0";

fn address(text: &str) -> PciAddress {
    text.parse().expect("test addresses are valid")
}

/// A small machine: an NVMe controller bound to nvme in IOMMU group 3 with a second,
/// unbound function, and an unbound edu device in group 2. Added out of order on purpose.
fn machine() -> (Fixture, String) {
    let fixture = Fixture::new();
    fixture.load_module("vfio_pci");
    let nvme_dir = fixture.add_device(&DeviceSpec {
        address: NVME,
        vendor: 0x1b36,
        device: 0x0010,
        class: 0x01_08_02,
        driver: Some("nvme"),
        iommu_group: Some(3),
        resource: NVME_RESOURCE,
    });
    fixture.add_device(&DeviceSpec {
        address: EDU,
        vendor: 0x1234,
        device: 0x11e8,
        class: 0x00_ff_00,
        driver: None,
        iommu_group: Some(2),
        resource: MIXED_RESOURCE,
    });
    fixture.add_device(&DeviceSpec {
        address: NVME_SECOND_FUNCTION,
        vendor: 0x1b36,
        device: 0x0010,
        class: 0x01_08_02,
        driver: None,
        iommu_group: Some(3),
        resource: NVME_RESOURCE,
    });
    (fixture, nvme_dir)
}

fn assert_busy(result: Result<BindOutcome>, needles: &[&str]) {
    match result {
        Err(error @ Error::Busy { .. }) => {
            let message = error.to_string();
            for needle in needles {
                assert!(
                    message.contains(needle),
                    "{message:?} should mention {needle:?}"
                );
            }
        }
        other => panic!("expected Busy, got {other:?}"),
    }
}

// ---- discovery ----

#[test]
fn devices_are_listed_sorted_by_address() {
    let (fixture, _) = machine();
    let devices = fixture
        .sysfs()
        .devices()
        .expect("listing the fixture devices");
    let addresses: Vec<String> = devices.iter().map(|d| d.address.to_string()).collect();
    assert_eq!(addresses, [EDU, NVME, NVME_SECOND_FUNCTION]);
}

#[test]
fn device_reads_ids_class_driver_group_and_bars() {
    let (fixture, _) = machine();
    let device = fixture
        .sysfs()
        .device(address(NVME))
        .expect("reading the nvme device");
    assert_eq!(device.address, address(NVME));
    assert_eq!((device.vendor_id, device.device_id), (0x1b36, 0x0010));
    assert_eq!(
        (device.subsystem_vendor_id, device.subsystem_id),
        (0x1af4, 0x1100)
    );
    assert_eq!(device.class_code, 0x01_08_02);
    assert_eq!(device.class_name(), "Mass storage controller: NVM Express");
    assert_eq!(device.revision, 2);
    assert_eq!(device.driver.as_deref(), Some("nvme"));
    assert_eq!(device.iommu_group, Some(3));
    assert_eq!(device.numa_node, None);
    assert_eq!(
        device.bars,
        [
            BarInfo {
                index: 0,
                start: 0xfe80_0000,
                size: 0x4000,
                kind: BarKind::Memory64,
                prefetchable: false
            },
            BarInfo {
                index: 4,
                start: 0xfe80_4000,
                size: 0x1000,
                kind: BarKind::Memory64,
                prefetchable: false
            },
        ]
    );
}

#[test]
fn device_reads_memory_io_and_prefetchable_bars_but_not_the_rom() {
    let (fixture, _) = machine();
    let device = fixture
        .sysfs()
        .device(address(EDU))
        .expect("reading the edu device");
    assert_eq!(device.driver, None);
    assert_eq!(device.class_name(), "Unclassified device");
    assert_eq!(
        device.bars,
        [
            BarInfo {
                index: 0,
                start: 0xfebf_0000,
                size: 0x1_0000,
                kind: BarKind::Memory32,
                prefetchable: false
            },
            BarInfo {
                index: 1,
                start: 0xc000,
                size: 0x20,
                kind: BarKind::Io,
                prefetchable: false
            },
            BarInfo {
                index: 2,
                start: 0x8_0000_0000,
                size: 0x100_0000,
                kind: BarKind::Memory64,
                prefetchable: true
            },
        ]
    );
}

#[test]
fn device_reads_numa_node() {
    let (fixture, nvme_dir) = machine();
    fixture.write(&format!("{nvme_dir}/numa_node"), "1\n");
    let device = fixture
        .sysfs()
        .device(address(NVME))
        .expect("reading the nvme device");
    assert_eq!(device.numa_node, Some(1));
}

#[test]
fn device_at_an_empty_address_is_no_such_device() {
    let (fixture, _) = machine();
    match fixture.sysfs().device(address("0000:00:1f.7")) {
        Err(Error::NoSuchDevice { address }) => assert_eq!(address, "0000:00:1f.7"),
        other => panic!("expected NoSuchDevice, got {other:?}"),
    }
}

#[test]
fn malformed_vendor_file_is_an_error_naming_the_file() {
    let (fixture, _) = machine();
    let dir = fixture.add_device(&DeviceSpec {
        address: "0000:00:04.0",
        vendor: 0,
        device: 0x10d3,
        class: 0x02_00_00,
        driver: None,
        iommu_group: Some(4),
        resource: "",
    });
    fixture.write(&format!("{dir}/vendor"), "intel\n");
    let expect_malformed = |result: Result<()>| match result {
        Err(error @ Error::MalformedFile { .. }) => {
            let Error::MalformedFile { path, found, .. } = &error else {
                unreachable!()
            };
            assert!(path.ends_with("0000:00:04.0/vendor"), "{path:?}");
            assert_eq!(found, "intel");
            assert!(error.to_string().contains("vendor"), "{error}");
        }
        other => panic!("expected MalformedFile, got {other:?}"),
    };
    expect_malformed(fixture.sysfs().device(address("0000:00:04.0")).map(drop));
    expect_malformed(fixture.sysfs().devices().map(drop));
}

#[test]
fn out_of_range_ids_are_malformed() {
    let (fixture, nvme_dir) = machine();
    for (file, contents) in [
        ("vendor", "0x12345\n"),
        ("class", "0x1000000\n"),
        ("revision", "0x100\n"),
        ("device", "0x\n"),
    ] {
        let (fixture, nvme_dir) = (&fixture, &nvme_dir);
        let original = fixture.read(&format!("{nvme_dir}/{file}"));
        fixture.write(&format!("{nvme_dir}/{file}"), contents);
        match fixture.sysfs().device(address(NVME)) {
            Err(Error::MalformedFile { path, .. }) => assert!(path.ends_with(file), "{path:?}"),
            other => panic!("{file} = {contents:?}: expected MalformedFile, got {other:?}"),
        }
        fixture.write(&format!("{nvme_dir}/{file}"), &original);
    }
}

#[test]
fn devices_skips_entries_that_are_not_pci_addresses() {
    let (fixture, _) = machine();
    // Intel VMD puts devices in domains wider than 16 bits.
    fixture.mkdir("bus/pci/devices/10000:00:00.0");
    let devices = fixture
        .sysfs()
        .devices()
        .expect("listing the fixture devices");
    assert_eq!(devices.len(), 3);
}

#[test]
fn devices_without_a_pci_bus_is_unavailable() {
    let fixture = Fixture::new();
    fs::remove_dir_all(fixture.path("bus")).expect("removing the bus");
    match fixture.sysfs().devices() {
        Err(error @ Error::Unavailable { .. }) => assert!(error.to_string().contains("sysfs")),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn iommu_group_devices_lists_the_group_sorted() {
    let (fixture, _) = machine();
    let sysfs = fixture.sysfs();
    assert_eq!(
        sysfs.iommu_group_devices(3).expect("reading group 3"),
        [address(NVME), address(NVME_SECOND_FUNCTION)]
    );
    assert_eq!(
        sysfs.iommu_group_devices(2).expect("reading group 2"),
        [address(EDU)]
    );
    assert!(matches!(
        sysfs.iommu_group_devices(9),
        Err(Error::Unavailable { .. })
    ));
}

#[test]
fn module_loaded_reads_dashes_as_underscores() {
    let (fixture, _) = machine();
    let sysfs = fixture.sysfs();
    assert!(sysfs.module_loaded("vfio-pci"));
    assert!(sysfs.module_loaded("vfio_pci"));
    assert!(!sysfs.module_loaded("vfio_iommu_type1"));
    assert!(!sysfs.module_loaded(""));
    assert!(!sysfs.module_loaded("../module"));
}

#[test]
fn parse_bars_rejects_malformed_lines() {
    let path = std::path::Path::new("resource");
    for text in [
        "0x1000 0x0fff\n",                // two fields
        "0x2000 0x1000 0x200\n",          // end before start
        "0x0 0xffffffffffffffff 0x200\n", // size overflows
        "1000 1fff 200\n",                // no 0x
        "0x1000 0x1fff 0x200 0x0\n",      // four fields
        "0xzz 0x1fff 0x200\n",
    ] {
        assert!(
            matches!(parse_bars(path, text), Err(Error::MalformedFile { .. })),
            "{text:?} should be rejected"
        );
    }
}

proptest! {
    #[test]
    fn parse_bars_never_panics(text in "(0x[0-9a-f]{0,17}| |\n|[a-z0-9]){0,80}") {
        let _ = parse_bars(std::path::Path::new("resource"), &text);
    }

    #[test]
    fn parse_bars_reads_any_well_formed_range(start in 1u64..u64::MAX / 2, size in 1u64..u64::MAX / 2, flags in any::<u32>()) {
        let end = start + size - 1;
        let text = format!("0x{start:016x} 0x{end:016x} 0x{flags:016x}\n");
        let bars = parse_bars(std::path::Path::new("resource"), &text).expect("well-formed");
        let flags = u64::from(flags);
        if flags & 0x300 == 0 {
            prop_assert!(bars.is_empty());
        } else {
            prop_assert_eq!(bars.len(), 1);
            prop_assert_eq!(bars[0].start, start);
            prop_assert_eq!(bars[0].size, size);
        }
    }
}

// ---- binding: refusals ----

#[test]
fn bind_needs_the_vfio_pci_module() {
    let (fixture, _) = machine();
    fs::remove_dir(fixture.path("module/vfio_pci")).expect("unloading the module");
    match fixture.sysfs().bind_to_vfio(address(NVME), true) {
        Err(Error::ModuleMissing { module }) => assert_eq!(module, "vfio-pci"),
        other => panic!("expected ModuleMissing, got {other:?}"),
    }
}

#[test]
fn bind_of_a_missing_device_is_no_such_device() {
    let (fixture, _) = machine();
    let result = fixture.sysfs().bind_to_vfio(address("0000:00:09.0"), false);
    assert!(
        matches!(result, Err(Error::NoSuchDevice { .. })),
        "{result:?}"
    );
}

#[test]
fn bind_needs_an_iommu_group() {
    let (fixture, _) = machine();
    fixture.add_device(&DeviceSpec {
        address: "0000:00:05.0",
        vendor: 0x8086,
        device: 0x10d3,
        class: 0x02_00_00,
        driver: None,
        iommu_group: None,
        resource: "",
    });
    match fixture.sysfs().bind_to_vfio(address("0000:00:05.0"), true) {
        Err(error @ Error::Unavailable { .. }) => {
            let message = error.to_string();
            assert!(
                message.contains("no IOMMU group for 0000:00:05.0"),
                "{message}"
            );
            assert!(message.contains("intel_iommu=on"), "{message}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn bind_refuses_when_a_group_member_is_bound_elsewhere_even_with_force() {
    let (fixture, _) = machine();
    fixture.bind(NVME_SECOND_FUNCTION, "e1000e");
    for force in [false, true] {
        assert_busy(
            fixture.sysfs().bind_to_vfio(address(NVME), force),
            &[
                NVME_SECOND_FUNCTION,
                "e1000e",
                "IOMMU group 3",
                "ring3 bind 0000:00:03.1",
            ],
        );
    }
    assert_eq!(
        fixture.read(&format!("devices/pci0000:00/{NVME}/driver_override")),
        "(null)\n"
    );
}

#[test]
fn bind_accepts_group_members_on_pcieport_or_vfio_pci() {
    let (fixture, _) = machine();
    let sysfs = fixture.sysfs();
    for driver in ["pcieport", "vfio-pci"] {
        fixture.bind(NVME_SECOND_FUNCTION, driver);
        let device = sysfs.device(address(NVME)).expect("reading the device");
        sysfs
            .check_can_bind(&device, false)
            .expect("the group is viable");
    }
}

#[test]
fn bind_refuses_a_mounted_partition() {
    let (fixture, nvme_dir) = machine();
    fixture.add_nvme_disk(&nvme_dir, "nvme0n1", 0, &["nvme0n1p1", "nvme0n1p2"]);
    // Found by device number: the source is written through a by-uuid link.
    fixture.set_mountinfo(
        "40 21 259:2 / /srv rw,relatime shared:30 - ext4 /dev/disk/by-uuid/1234 rw\n\
         41 21 259:2 /www /var/www rw,relatime shared:30 - ext4 /dev/disk/by-uuid/1234 rw\n\
         42 21 259:2 / /srv rw,relatime shared:30 - ext4 /dev/disk/by-uuid/1234 rw\n",
    );
    assert_busy(
        fixture.sysfs().bind_to_vfio(address(NVME), false),
        &["/dev/nvme0n1p2 is mounted on /srv, /var/www: unmount it first; or pass --force"],
    );
}

#[test]
fn bind_refuses_a_mounted_disk_found_by_its_name() {
    let (fixture, nvme_dir) = machine();
    fixture.add_virtio_disk(&nvme_dir, "vda", "254:0");
    // btrfs reports an anonymous device number; the source still names the disk.
    fixture.set_mountinfo("41 21 0:45 / /data rw shared:31 master:1 - btrfs /dev/vda rw\n");
    assert_busy(
        fixture.sysfs().bind_to_vfio(address(NVME), false),
        &["/dev/vda is mounted on /data", "--force"],
    );
}

#[test]
fn bind_refuses_a_disk_held_by_device_mapper() {
    let (fixture, nvme_dir) = machine();
    fixture.add_nvme_disk(&nvme_dir, "nvme0n1", 0, &["nvme0n1p1"]);
    fixture.mkdir(&format!(
        "{nvme_dir}/nvme/nvme0/nvme0n1/nvme0n1p1/holders/dm-0"
    ));
    assert_busy(
        fixture.sysfs().bind_to_vfio(address(NVME), false),
        &["/dev/nvme0n1p1 is used by dm-0", "--force"],
    );
}

#[test]
fn bind_refuses_an_interface_that_is_up() {
    let (fixture, nvme_dir) = machine();
    fixture.add_interface(&nvme_dir, "enp0s3", 0x1003, "up");
    assert_busy(
        fixture.sysfs().bind_to_vfio(address(NVME), false),
        &["enp0s3 is up", "ip link set enp0s3 down", "--force"],
    );
}

#[test]
fn unmounted_disks_and_interfaces_that_are_down_are_not_in_use() {
    let (fixture, nvme_dir) = machine();
    fixture.add_nvme_disk(&nvme_dir, "nvme0n1", 0, &["nvme0n1p1"]);
    fixture.add_interface(&nvme_dir, "enp0s3", 0x1002, "down");
    let sysfs = fixture.sysfs();
    let device = sysfs.device(address(NVME)).expect("reading the device");
    sysfs
        .check_can_bind(&device, false)
        .expect("nothing uses the device");
}

#[test]
fn malformed_mountinfo_is_an_error_naming_the_file() {
    let (fixture, nvme_dir) = machine();
    fixture.add_nvme_disk(&nvme_dir, "nvme0n1", 0, &[]);
    fixture.set_mountinfo("this is not mountinfo\n");
    match fixture.sysfs().bind_to_vfio(address(NVME), false) {
        Err(Error::MalformedFile { path, .. }) => assert!(path.ends_with("mountinfo"), "{path:?}"),
        other => panic!("expected MalformedFile, got {other:?}"),
    }
}

// ---- binding: the write sequence, against a fake kernel ----

#[test]
fn bind_of_a_device_on_vfio_pci_is_already_bound() {
    let (fixture, _) = machine();
    fixture.bind(NVME, "vfio-pci");
    let outcome = fixture
        .sysfs()
        .bind_to_vfio(address(NVME), false)
        .expect("binding");
    assert_eq!(outcome, BindOutcome::AlreadyBound);
}

#[test]
fn force_binds_a_device_in_use_and_records_its_driver() {
    let (fixture, nvme_dir) = machine();
    fixture.add_interface(&nvme_dir, "enp0s3", 0x1003, "up");
    let _kernel = fixture.fake_kernel(Some("nvme"));
    let outcome = fixture
        .sysfs()
        .bind_to_vfio(address(NVME), true)
        .expect("binding with force");
    assert_eq!(
        outcome,
        BindOutcome::Bound {
            previous_driver: Some("nvme".into())
        }
    );
    assert_eq!(
        fixture.read(&format!("{nvme_dir}/driver_override")),
        "vfio-pci"
    );
    let record = fs::read_to_string(fixture.state_dir().join(NVME)).expect("reading the record");
    assert_eq!(record, "nvme\n");
    let device = fixture
        .sysfs()
        .device(address(NVME))
        .expect("reading the device");
    assert_eq!(device.driver.as_deref(), Some("vfio-pci"));
}

#[test]
fn bind_then_unbind_gives_the_device_back() {
    let (fixture, nvme_dir) = machine();
    let sysfs = fixture.sysfs();
    let _kernel = fixture.fake_kernel(Some("nvme"));
    sysfs.bind_to_vfio(address(NVME), false).expect("binding");
    let outcome = sysfs.unbind_from_vfio(address(NVME)).expect("unbinding");
    assert_eq!(
        outcome,
        UnbindOutcome::Released {
            driver: Some("nvme".into())
        }
    );
    assert_eq!(fixture.read(&format!("{nvme_dir}/driver_override")), "\n");
    assert!(
        !fixture.state_dir().join(NVME).exists(),
        "the record is removed"
    );
}

#[test]
fn unbind_offers_the_device_to_its_original_driver_when_probing_does_not() {
    let (fixture, _) = machine();
    let sysfs = fixture.sysfs();
    let _kernel = fixture.fake_kernel(None);
    sysfs.bind_to_vfio(address(NVME), false).expect("binding");
    let outcome = sysfs.unbind_from_vfio(address(NVME)).expect("unbinding");
    assert_eq!(
        outcome,
        UnbindOutcome::Released {
            driver: Some("nvme".into())
        }
    );
}

#[test]
fn unbind_without_a_record_leaves_the_device_to_the_kernel() {
    let (fixture, _) = machine();
    fixture.bind(EDU, "vfio-pci");
    let _kernel = fixture.fake_kernel(None);
    let outcome = fixture
        .sysfs()
        .unbind_from_vfio(address(EDU))
        .expect("unbinding");
    assert_eq!(outcome, UnbindOutcome::Released { driver: None });
}

#[test]
fn unbind_says_to_load_a_missing_original_driver() {
    let (fixture, _) = machine();
    fixture.bind(EDU, "vfio-pci");
    fixture.write("../run/ring3/original-drivers/0000:00:02.0", "qemu_edu\n");
    let _kernel = fixture.fake_kernel(None);
    match fixture.sysfs().unbind_from_vfio(address(EDU)) {
        Err(error @ Error::Unavailable { .. }) => {
            assert!(error.to_string().contains("modprobe qemu_edu"), "{error}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(
        !fixture.state_dir().join(EDU).exists(),
        "the record is removed"
    );
}

#[test]
fn unbind_of_a_device_not_on_vfio_pci_changes_nothing() {
    let (fixture, _) = machine();
    let outcome = fixture
        .sysfs()
        .unbind_from_vfio(address(NVME))
        .expect("unbinding");
    assert_eq!(
        outcome,
        UnbindOutcome::NotBound {
            driver: Some("nvme".into())
        }
    );
}

#[test]
fn unbind_rejects_a_malformed_record() {
    let (fixture, _) = machine();
    fixture.bind(EDU, "vfio-pci");
    fixture.write("../run/ring3/original-drivers/0000:00:02.0", "../../evil\n");
    let result = fixture.sysfs().unbind_from_vfio(address(EDU));
    assert!(
        matches!(result, Err(Error::MalformedFile { .. })),
        "{result:?}"
    );
}

#[test]
fn failed_bind_gives_the_device_back() {
    let (fixture, nvme_dir) = machine();
    // No fake kernel: the unbind and probe writes have no effect, as if vfio-pci refused.
    match fixture.sysfs().bind_to_vfio(address(NVME), false) {
        Err(error @ Error::Unavailable { .. }) => {
            assert!(
                error
                    .to_string()
                    .contains("bound to nvme after probing, not to vfio-pci"),
                "{error}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(fixture.read("bus/pci/drivers/nvme/unbind"), NVME);
    assert_eq!(fixture.read(&format!("{nvme_dir}/driver_override")), "\n");
    assert!(
        !fixture.state_dir().join(NVME).exists(),
        "the record is removed"
    );
}

#[test]
fn bind_that_cannot_set_driver_override_leaves_no_record() {
    let (fixture, nvme_dir) = machine();
    fs::remove_file(fixture.path(&format!("{nvme_dir}/driver_override")))
        .expect("removing driver_override");
    match fixture.sysfs().bind_to_vfio(address(NVME), false) {
        Err(error @ Error::Io { .. }) => {
            assert!(error.to_string().contains("driver_override"), "{error}");
        }
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(
        !fixture.state_dir().join(NVME).exists(),
        "the record is removed"
    );
    let device = fixture
        .sysfs()
        .device(address(NVME))
        .expect("reading the device");
    assert_eq!(device.driver.as_deref(), Some("nvme"));
}
