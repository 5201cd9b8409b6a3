//! A sysfs tree in a temporary directory, laid out like the kernel's, for the pci tests;
//! and a stand-in for the kernel's side of driver binding.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::Sysfs;

/// Drivers present in every fixture (each with `bind` and `unbind` files).
const DRIVERS: [&str; 5] = ["nvme", "vfio-pci", "pcieport", "e1000e", "virtio-pci"];

pub(super) struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// An empty machine: the PCI bus, its drivers, no devices, no modules, no mounts.
    pub fn new() -> Self {
        let fixture = Fixture {
            dir: tempfile::tempdir().expect("creating a temporary directory"),
        };
        for driver in DRIVERS {
            fixture.write(&format!("bus/pci/drivers/{driver}/bind"), "");
            fixture.write(&format!("bus/pci/drivers/{driver}/unbind"), "");
        }
        fixture.write("bus/pci/drivers_probe", "");
        fixture.mkdir("bus/pci/devices");
        fixture.mkdir("kernel/iommu_groups");
        fixture.mkdir("module");
        fixture.mkdir("class/block");
        fixture.mkdir("class/net");
        fixture.write("proc/self/mountinfo", MOUNTINFO_WITHOUT_DEVICES);
        fixture
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("sys")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("run/ring3/original-drivers")
    }

    pub fn sysfs(&self) -> Sysfs {
        Sysfs::at(self.root())
            .with_mountinfo(self.root().join("proc/self/mountinfo"))
            .with_state_dir(self.state_dir())
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.root().join(relative)
    }

    pub fn mkdir(&self, relative: &str) -> PathBuf {
        let path = self.path(relative);
        fs::create_dir_all(&path).expect("creating a fixture directory");
        path
    }

    pub fn write(&self, relative: &str, contents: &str) {
        let path = self.path(relative);
        fs::create_dir_all(path.parent().expect("fixture paths have parents"))
            .expect("creating a fixture directory");
        fs::write(&path, contents).expect("writing a fixture file");
    }

    pub fn read(&self, relative: &str) -> String {
        fs::read_to_string(self.path(relative)).expect("reading a fixture file")
    }

    /// Makes `relative` a symlink to `target` (relative to the link, as sysfs does).
    pub fn link(&self, relative: &str, target: &str) {
        let path = self.path(relative);
        fs::create_dir_all(path.parent().expect("fixture paths have parents"))
            .expect("creating a fixture directory");
        let _ = fs::remove_file(&path);
        symlink(target, &path).expect("creating a fixture symlink");
    }

    pub fn load_module(&self, name: &str) {
        self.mkdir(&format!("module/{name}"));
    }

    /// A PCI function under host bridge pci0000:00, with the files and links Linux gives it.
    /// Returns the device directory relative to the root, for adding children.
    pub fn add_device(&self, device: &DeviceSpec) -> String {
        let address = device.address;
        let dir = format!("devices/pci0000:00/{address}");
        self.write(
            &format!("{dir}/vendor"),
            &format!("0x{:04x}\n", device.vendor),
        );
        self.write(
            &format!("{dir}/device"),
            &format!("0x{:04x}\n", device.device),
        );
        self.write(&format!("{dir}/subsystem_vendor"), "0x1af4\n");
        self.write(&format!("{dir}/subsystem_device"), "0x1100\n");
        self.write(
            &format!("{dir}/class"),
            &format!("0x{:06x}\n", device.class),
        );
        self.write(&format!("{dir}/revision"), "0x02\n");
        self.write(&format!("{dir}/numa_node"), "-1\n");
        self.write(&format!("{dir}/resource"), device.resource);
        self.write(&format!("{dir}/driver_override"), "(null)\n");
        self.link(&format!("{dir}/subsystem"), "../../../bus/pci");
        self.link(
            &format!("bus/pci/devices/{address}"),
            &format!("../../../devices/pci0000:00/{address}"),
        );
        if let Some(driver) = device.driver {
            self.bind(address, driver);
        }
        if let Some(group) = device.iommu_group {
            self.link(
                &format!("{dir}/iommu_group"),
                &format!("../../../kernel/iommu_groups/{group}"),
            );
            self.link(
                &format!("kernel/iommu_groups/{group}/devices/{address}"),
                &format!("../../../../devices/pci0000:00/{address}"),
            );
        }
        dir
    }

    /// Binds the device to `driver` as the kernel would show it.
    pub fn bind(&self, address: &str, driver: &str) {
        let dir = format!("devices/pci0000:00/{address}");
        self.link(
            &format!("{dir}/driver"),
            &format!("../../../bus/pci/drivers/{driver}"),
        );
        self.link(
            &format!("bus/pci/drivers/{driver}/{address}"),
            &format!("../../../../devices/pci0000:00/{address}"),
        );
    }

    /// An NVMe namespace block device (with partitions) below device directory `dir`,
    /// at `nvme/nvme0/<disk>` as Linux puts it.
    pub fn add_nvme_disk(&self, dir: &str, disk: &str, minor: u32, partitions: &[&str]) {
        let disk_dir = format!("{dir}/nvme/nvme0/{disk}");
        self.write(&format!("{disk_dir}/dev"), &format!("259:{minor}\n"));
        self.mkdir(&format!("{disk_dir}/holders"));
        self.link(
            &format!("{disk_dir}/subsystem"),
            "../../../../../../class/block",
        );
        self.link(&format!("class/block/{disk}"), &format!("../../{disk_dir}"));
        for (partition, part_minor) in partitions.iter().zip(minor + 1..) {
            let part_dir = format!("{disk_dir}/{partition}");
            self.write(&format!("{part_dir}/dev"), &format!("259:{part_minor}\n"));
            self.write(&format!("{part_dir}/partition"), "1\n");
            self.mkdir(&format!("{part_dir}/holders"));
            self.link(
                &format!("{part_dir}/subsystem"),
                "../../../../../../../class/block",
            );
        }
    }

    /// A virtio-blk style disk at `virtio<n>/block/<disk>`, without a `subsystem` link,
    /// so that it is found by its parent directory's name.
    pub fn add_virtio_disk(&self, dir: &str, disk: &str, device_number: &str) {
        let disk_dir = format!("{dir}/virtio1/block/{disk}");
        self.write(&format!("{disk_dir}/dev"), &format!("{device_number}\n"));
        self.mkdir(&format!("{disk_dir}/holders"));
    }

    /// A network interface at `<dir>/net/<name>` with `flags` and `operstate`.
    pub fn add_interface(&self, dir: &str, name: &str, flags: u32, operstate: &str) {
        let net_dir = format!("{dir}/net/{name}");
        self.write(&format!("{net_dir}/flags"), &format!("{flags:#x}\n"));
        self.write(&format!("{net_dir}/operstate"), &format!("{operstate}\n"));
        self.link(&format!("{net_dir}/subsystem"), "../../../../../class/net");
    }

    pub fn set_mountinfo(&self, extra_lines: &str) {
        self.write(
            "proc/self/mountinfo",
            &format!("{MOUNTINFO_WITHOUT_DEVICES}{extra_lines}"),
        );
    }

    /// Plays the kernel's part of binding until the returned guard is dropped:
    /// a write to a driver's `unbind` detaches the device, a write to `drivers_probe`
    /// binds an unbound device to its `driver_override`, or else to `default_driver`.
    pub fn fake_kernel(&self, default_driver: Option<&'static str>) -> FakeKernel {
        let root = self.root();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let fixture = FixtureView { root };
            let deadline = Instant::now() + Duration::from_secs(20);
            while !thread_stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                fixture.step(default_driver);
                thread::sleep(Duration::from_millis(2));
            }
        });
        FakeKernel {
            stop,
            handle: Some(handle),
        }
    }
}

pub(super) struct FakeKernel {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for FakeKernel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// What the fake kernel thread needs of the fixture.
struct FixtureView {
    root: PathBuf,
}

impl FixtureView {
    fn take_request(path: &Path) -> Option<String> {
        let text = fs::read_to_string(path).ok()?;
        if text.is_empty() {
            return None;
        }
        fs::write(path, "").ok()?;
        Some(text.trim().to_string())
    }

    fn step(&self, default_driver: Option<&str>) {
        // Unbinds first: a caller writes unbind before drivers_probe.
        for driver in DRIVERS {
            let unbind = self.root.join(format!("bus/pci/drivers/{driver}/unbind"));
            if let Some(address) = Self::take_request(&unbind) {
                let _ = fs::remove_file(self.device_dir(&address).join("driver"));
                let _ = fs::remove_file(
                    self.root
                        .join(format!("bus/pci/drivers/{driver}/{address}")),
                );
            }
        }
        for driver in DRIVERS {
            let bind = self.root.join(format!("bus/pci/drivers/{driver}/bind"));
            if let Some(address) = Self::take_request(&bind) {
                self.attach(&address, driver);
            }
        }
        let probe = self.root.join("bus/pci/drivers_probe");
        if let Some(address) = Self::take_request(&probe) {
            let dir = self.device_dir(&address);
            if fs::symlink_metadata(dir.join("driver")).is_ok() {
                return;
            }
            let driver_override =
                fs::read_to_string(dir.join("driver_override")).unwrap_or_default();
            let driver_override = driver_override.trim();
            if !driver_override.is_empty() && driver_override != "(null)" {
                if DRIVERS.contains(&driver_override) {
                    self.attach(&address, driver_override);
                }
            } else if let Some(driver) = default_driver {
                self.attach(&address, driver);
            }
        }
    }

    fn device_dir(&self, address: &str) -> PathBuf {
        self.root.join(format!("devices/pci0000:00/{address}"))
    }

    fn attach(&self, address: &str, driver: &str) {
        let link = self.device_dir(address).join("driver");
        let _ = fs::remove_file(&link);
        let _ = symlink(format!("../../../bus/pci/drivers/{driver}"), link);
    }
}

/// A device for [`Fixture::add_device`].
pub(super) struct DeviceSpec {
    pub address: &'static str,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub driver: Option<&'static str>,
    pub iommu_group: Option<u32>,
    pub resource: &'static str,
}

/// QEMU's NVMe controller: a 16 KiB 64-bit BAR 0 and a 4 KiB MSI-X BAR 4 (as 64-bit).
pub(super) const NVME_RESOURCE: &str = "\
0x00000000fe800000 0x00000000fe803fff 0x0000000000140204
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000fe804000 0x0000000000fe804fff 0x0000000000140204
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
";

/// An old-style device: 32-bit memory BAR 0, I/O BAR 1, prefetchable 64-bit BAR 2.
pub(super) const MIXED_RESOURCE: &str = "\
0x00000000febf0000 0x00000000febfffff 0x0000000000040200
0x000000000000c000 0x000000000000c01f 0x0000000000040101
0x0000000800000000 0x0000000800ffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x00000000feb80000 0x00000000febbffff 0x0000000000046200
";

/// The mounts every fixture machine has: none of them on a fixture device.
const MOUNTINFO_WITHOUT_DEVICES: &str = "\
21 1 0:19 / / rw,relatime shared:1 - ext4 /dev/root rw
22 21 0:20 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
23 21 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
24 21 0:22 / /run rw,nosuid,nodev shared:5 - tmpfs tmpfs rw,size=1000k
";
