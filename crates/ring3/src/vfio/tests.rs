//! What can be checked without a device: the order and wording of `VfioBackend::open`'s
//! refusals, against a small sysfs tree. The VFIO ioctls themselves run in the lab
//! (`cargo xtask lab run -- target/debug/examples/vfio_probe --edu-selftest`).

use std::fs;
use std::os::unix::fs::symlink;

use super::*;
use crate::error::ErrorKind;

/// A sysfs root with only what `Sysfs::device` and the open checks read.
struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new() -> Self {
        Tree {
            dir: tempfile::tempdir().expect("creating a temporary directory"),
        }
    }

    fn sysfs(&self) -> Sysfs {
        Sysfs::at(self.dir.path())
    }

    fn load_vfio_pci(&self) {
        fs::create_dir_all(self.dir.path().join("module/vfio_pci")).unwrap();
    }

    fn add(&self, address: &str, driver: Option<&str>, group: Option<u32>) {
        let dir = self.dir.path().join("bus/pci/devices").join(address);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("vendor"), "0x1234\n").unwrap();
        fs::write(dir.join("device"), "0x11e8\n").unwrap();
        fs::write(dir.join("class"), "0x00ff00\n").unwrap();
        if let Some(driver) = driver {
            symlink(
                format!("../../../bus/pci/drivers/{driver}"),
                dir.join("driver"),
            )
            .unwrap();
        }
        if let Some(group) = group {
            symlink(
                format!("../../../kernel/iommu_groups/{group}"),
                dir.join("iommu_group"),
            )
            .unwrap();
            let members = self
                .dir
                .path()
                .join(format!("kernel/iommu_groups/{group}/devices"));
            fs::create_dir_all(&members).unwrap();
            symlink(&dir, members.join(address)).unwrap();
        }
    }
}

fn open(tree: &Tree, address: &str) -> Error {
    VfioBackend::open_with(&tree.sysfs(), address).expect_err("opening must fail without VFIO")
}

#[test]
fn a_malformed_address_is_refused_first() {
    let tree = Tree::new();
    assert!(matches!(
        open(&tree, "00:zz.0"),
        Error::InvalidAddress { .. }
    ));
}

#[test]
fn a_missing_device_comes_before_a_missing_module() {
    let tree = Tree::new();
    assert!(matches!(
        open(&tree, "0000:00:03.0"),
        Error::NoSuchDevice { .. }
    ));
}

#[test]
fn a_missing_vfio_pci_module_is_named() {
    let tree = Tree::new();
    tree.add("0000:00:03.0", Some("vfio-pci"), Some(5));
    let err = open(&tree, "0000:00:03.0");
    assert!(
        matches!(err, Error::ModuleMissing { module: "vfio-pci" }),
        "{err}"
    );
    assert!(err.to_string().contains("modprobe vfio-pci"), "{err}");
}

#[test]
fn a_device_on_another_driver_or_none_is_not_bound_to_vfio() {
    let tree = Tree::new();
    tree.load_vfio_pci();
    tree.add("0000:00:03.0", Some("nvme"), Some(5));
    tree.add("0000:00:04.0", None, Some(6));
    let err = open(&tree, "0000:00:03.0");
    assert!(
        matches!(&err, Error::NotBoundToVfio { driver, .. } if driver == "nvme"),
        "{err}"
    );
    assert!(err.to_string().contains("ring3 bind 0000:00:03.0"), "{err}");
    let err = open(&tree, "0000:00:04.0");
    assert!(
        matches!(&err, Error::NotBoundToVfio { driver, .. } if driver == "no driver"),
        "{err}"
    );
}

#[test]
fn a_device_without_an_iommu_group_needs_the_iommu() {
    let tree = Tree::new();
    tree.load_vfio_pci();
    tree.add("0000:00:03.0", Some("vfio-pci"), None);
    let err = open(&tree, "0000:00:03.0");
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("intel_iommu=on"), "{err}");
    assert_eq!(err.kind(), ErrorKind::Environment);
}

#[test]
fn a_group_without_a_vfio_node_says_to_bind() {
    let tree = Tree::new();
    tree.load_vfio_pci();
    // No machine has IOMMU group 4000000, so /dev/vfio/4000000 does not exist.
    tree.add("0000:00:03.0", Some("vfio-pci"), Some(4_000_000));
    let err = open(&tree, "0000:00:03.0");
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("/dev/vfio/4000000"), "{err}");
}

#[test]
fn a_group_that_is_not_viable_names_the_devices_holding_it() {
    let tree = Tree::new();
    tree.add("0000:00:1f.0", Some("vfio-pci"), Some(3));
    tree.add("0000:00:1f.2", Some("ahci"), Some(3));
    tree.add("0000:00:1f.3", None, Some(3));
    tree.add("0000:00:1c.0", Some("pcieport"), Some(3));
    let message = not_viable(&tree.sysfs(), 3).to_string();
    assert!(message.contains("IOMMU group 3"), "{message}");
    assert!(message.contains("0000:00:1f.2 (ahci)"), "{message}");
    for allowed in ["0000:00:1f.0", "0000:00:1f.3", "0000:00:1c.0"] {
        assert!(
            !message.contains(allowed),
            "{allowed} does not block: {message}"
        );
    }
}

#[test]
fn vfio_pci_variants_count_as_vfio() {
    assert!(is_vfio_driver("vfio-pci"));
    assert!(is_vfio_driver("mlx5_vfio_pci"));
    assert!(!is_vfio_driver("nvme"));
    assert!(allowed_in_vfio_group(None));
    assert!(allowed_in_vfio_group(Some("pci-stub")));
    assert!(!allowed_in_vfio_group(Some("e1000e")));
}
