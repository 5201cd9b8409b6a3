//! Lab tests: ring3 against QEMU's device models, inside the lab VM.
//!
//! `cargo xtask test` boots the VM (q35, intel-iommu, an edu device, a virtio-net device,
//! and an e1000 + virtio-net pair behind one PCIe-to-PCI bridge, hence in one IOMMU group)
//! and runs
//! these with `--ignored`, one at a time. Outside the VM they are ignored; run by hand
//! elsewhere they fail at once, saying where they belong.

use std::collections::HashSet;
use std::process::{Command, Output};
use std::time::Duration;

use ring3::pci::{PciAddress, PciDevice, Sysfs};
use ring3::vfio::VfioBackend;
use ring3::{Backend, Error};
use ring3_edu::{Completion, Direction, Edu};

const EDU: (u16, u16) = (0x1234, 0x11e8);
const VIRTIO_NET: (u16, u16) = (0x1af4, 0x1041);
const E1000: (u16, u16) = (0x8086, 0x100e);

fn in_lab() {
    assert_eq!(
        std::env::var("RING3_LAB").as_deref(),
        Ok("1"),
        "lab tests run inside the lab VM: use `cargo xtask test`"
    );
}

fn devices(ids: (u16, u16)) -> Vec<PciDevice> {
    let all = Sysfs::system().devices().expect("listing PCI devices");
    all.into_iter()
        .filter(|d| (d.vendor_id, d.device_id) == ids)
        .collect()
}

/// The device with these IDs that is alone in its IOMMU group.
fn single(ids: (u16, u16)) -> PciDevice {
    devices(ids)
        .into_iter()
        .find(|d| group_members(d).len() == 1)
        .unwrap_or_else(|| panic!("the lab VM has no lone {:04x}:{:04x} device", ids.0, ids.1))
}

fn group_members(device: &PciDevice) -> Vec<PciAddress> {
    let group = device.iommu_group.expect("lab devices have IOMMU groups");
    Sysfs::system()
        .iommu_group_devices(group)
        .expect("listing an IOMMU group")
}

fn driver_of(address: PciAddress) -> Option<String> {
    Sysfs::system().device(address).expect("device").driver
}

fn ring3(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_ring3"))
        .args(args)
        .output()
        .expect("running ring3");
    eprintln!(
        "$ ring3 {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn sh(script: &str) -> Output {
    let output = Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("running sh");
    assert!(
        output.status.success(),
        "`{script}` failed: {}",
        stderr(&output)
    );
    output
}

/// The edu device, bound to vfio-pci (bound here if it was not).
fn edu_on_vfio() -> String {
    in_lab();
    let edu = single(EDU);
    Sysfs::system()
        .bind_to_vfio(edu.address, false)
        .expect("binding edu to vfio-pci");
    assert_eq!(driver_of(edu.address).as_deref(), Some("vfio-pci"));
    edu.address.to_string()
}

fn open_edu(completion: Completion) -> Edu<VfioBackend> {
    let address = edu_on_vfio();
    let backend = VfioBackend::open(&address).expect("opening edu through VFIO");
    Edu::new(backend, completion).expect("initialising edu")
}

/// Deterministic bytes that differ at every offset and between seeds.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn run_edu_sequence(flag: &str, expect_interrupt: &str) {
    let address = edu_on_vfio();
    let output = ring3(&["edu", &address, flag]);
    assert!(output.status.success(), "ring3 edu {flag} failed");
    let text = stdout(&output);
    for step in ["identification", "liveness", "factorial", "DMA"] {
        assert!(text.contains(step), "no {step} step in:\n{text}");
    }
    assert!(text.contains("3628800"), "10! not printed:\n{text}");
    assert!(
        text.contains(expect_interrupt),
        "expected {expect_interrupt:?} in:\n{text}"
    );
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_edu_sequence_with_msi() {
    run_edu_sequence("--irq", "MSI");
    let mut edu = open_edu(Completion::Interrupt);
    assert_eq!(edu.irq_mode(), Some(ring3::IrqMode::Msi));
    for n in [0, 1, 5, 12, 13] {
        assert_eq!(
            edu.factorial(n).unwrap(),
            ring3_edu::wrapping_factorial(n),
            "{n}!"
        );
    }
    // Raising by hand, waiting for the MSI, acknowledging: status clears each round.
    for _ in 0..3 {
        edu.raise_and_ack_interrupt().unwrap();
    }
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_edu_sequence_with_polling() {
    run_edu_sequence("--poll", "poll");
    let mut edu = open_edu(Completion::Poll);
    assert_eq!(edu.identification().unwrap().major, 1);
    edu.check_liveness(0xdead_beef).unwrap();
    assert_eq!(edu.factorial(10).unwrap(), 3_628_800);
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_edu_dma_of_several_sizes_both_directions() {
    for completion in [Completion::Poll, Completion::Interrupt] {
        let mut edu = open_edu(completion);
        let cases = [
            (0, 1),
            (0, 8),
            (3, 61),
            (512, 512),
            (100, 3000),
            (1, 4094),
            (0, ring3_edu::registers::DMA_USABLE_SIZE),
        ];
        for (seed, (offset, len)) in cases.into_iter().enumerate() {
            let data = pattern(len, seed as u8 + 1);
            edu.write_to_device(offset, &data).unwrap();
            let back = edu.read_from_device(offset, len).unwrap();
            assert!(
                back == data,
                "{completion:?}: {len} bytes at {offset} came back different"
            );
        }
        // Bytes outside a transfer are left alone by it.
        let usable = ring3_edu::registers::DMA_USABLE_SIZE;
        edu.write_to_device(0, &vec![0xaa; usable]).unwrap();
        edu.write_to_device(1000, &[0x55; 10]).unwrap();
        let whole = edu.read_from_device(0, usable).unwrap();
        assert!(whole[..1000].iter().all(|&b| b == 0xaa));
        assert!(whole[1000..1010].iter().all(|&b| b == 0x55));
        assert!(whole[1010..].iter().all(|&b| b == 0xaa));
        // What the device cannot do is refused before the device is touched.
        assert!(edu.write_to_device(4000, &[0; 200]).is_err());
        assert!(edu.read_from_device(0, 4097).is_err());
        assert!(
            edu.read_from_device(0, usable + 1).is_err(),
            "the device's last byte is out of reach"
        );
    }
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_bind_use_unbind_restores_the_original_driver() {
    in_lab();
    let nic = single(VIRTIO_NET);
    let original = driver_of(nic.address);
    assert_eq!(
        original.as_deref(),
        Some("virtio-pci"),
        "lab setup: virtio-pci drives the NIC"
    );
    let address = nic.address.to_string();

    let bound = ring3(&["bind", &address]);
    assert!(bound.status.success());
    assert_eq!(driver_of(nic.address).as_deref(), Some("vfio-pci"));
    {
        let backend = VfioBackend::open(&address).unwrap();
        assert_eq!(backend.ids().unwrap(), VIRTIO_NET);
        assert!(!backend.bar(4).unwrap().is_empty(), "virtio's BAR4 maps");
    }
    let unbound = ring3(&["unbind", &address]);
    assert!(unbound.status.success());
    assert_eq!(
        driver_of(nic.address),
        original,
        "the original driver is back"
    );
    let override_path = Sysfs::system()
        .device_path(nic.address)
        .join("driver_override");
    let left = std::fs::read_to_string(override_path).unwrap();
    assert_eq!(left.trim(), "(null)", "driver_override is cleared");

    // A device that had no driver goes back to having none.
    let edu = single(EDU);
    Sysfs::system().unbind_from_vfio(edu.address).unwrap();
    assert_eq!(driver_of(edu.address), None);
    assert!(ring3(&["bind", &edu.address.to_string()]).status.success());
    assert!(ring3(&["unbind", &edu.address.to_string()])
        .status
        .success());
    assert_eq!(driver_of(edu.address), None);
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_opening_a_device_twice_is_busy() {
    let address = edu_on_vfio();
    let first = VfioBackend::open(&address).unwrap();
    let second = VfioBackend::open(&address).unwrap_err();
    assert!(matches!(second, Error::Busy { .. }), "{second}");
    assert!(second.to_string().contains("busy"), "{second}");

    // Another process gets the same answer, and the holder is unharmed.
    let other = ring3(&["edu", &address, "--poll"]);
    assert!(!other.status.success());
    assert!(stderr(&other).contains("busy"), "{}", stderr(&other));
    drop(first);
    assert!(
        VfioBackend::open(&address).is_ok(),
        "free again once closed"
    );
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_nonexistent_address_is_a_clear_error() {
    in_lab();
    let output = ring3(&["edu", "0000:00:1e.7"]);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(text.contains("no PCI device at 0000:00:1e.7"), "{text}");
    assert!(text.contains("ring3 list"), "the fix is named: {text}");
    let bind = ring3(&["bind", "0000:00:1e.7"]);
    assert!(stderr(&bind).contains("no PCI device"), "{}", stderr(&bind));
    let malformed = ring3(&["edu", "00:1g.0"]);
    assert!(!malformed.status.success());
    assert!(
        stderr(&malformed).contains("invalid PCI address"),
        "{}",
        stderr(&malformed)
    );
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_device_bound_elsewhere_is_a_clear_error() {
    in_lab();
    let nic = single(VIRTIO_NET);
    assert_eq!(driver_of(nic.address).as_deref(), Some("virtio-pci"));
    let address = nic.address.to_string();
    let err = VfioBackend::open(&address).unwrap_err();
    assert!(matches!(err, Error::NotBoundToVfio { .. }), "{err}");
    let output = ring3(&["edu", &address]);
    let text = stderr(&output);
    assert!(text.contains("virtio-pci"), "names the driver: {text}");
    assert!(
        text.contains(&format!("ring3 bind {address}")),
        "names the fix: {text}"
    );
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_group_member_bound_elsewhere_blocks_bind() {
    in_lab();
    let e1000 = devices(E1000)
        .into_iter()
        .next()
        .expect("lab setup: an e1000 behind a PCI bridge");
    let sibling = group_members(&e1000)
        .into_iter()
        .find(|&member| driver_of(member).as_deref() == Some("virtio-pci"))
        .expect("lab setup: a virtio-net in the e1000's IOMMU group");

    let output = ring3(&["bind", &e1000.address.to_string()]);
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains(&sibling.to_string()),
        "names the group member: {text}"
    );
    assert!(text.contains("virtio-pci"), "names its driver: {text}");
    let forced = ring3(&["bind", "--force", &e1000.address.to_string()]);
    assert!(
        !forced.status.success(),
        "--force does not split an IOMMU group"
    );
    assert_eq!(driver_of(e1000.address), None, "nothing was changed");
    assert_eq!(driver_of(sibling).as_deref(), Some("virtio-pci"));
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_missing_vfio_module_is_a_clear_error() {
    in_lab();
    let edu = single(EDU);
    Sysfs::system().unbind_from_vfio(edu.address).unwrap();
    sh("rmmod vfio_pci vfio_pci_core");
    let address = edu.address.to_string();
    let open = VfioBackend::open(&address).unwrap_err();
    let bind = ring3(&["bind", &address]);
    let run = ring3(&["edu", &address]);
    // Put the module back before asserting, so later tests find it.
    sh("modprobe vfio-pci");
    assert!(matches!(open, Error::ModuleMissing { .. }), "{open}");
    for output in [bind, run] {
        assert!(!output.status.success());
        assert!(
            stderr(&output).contains("modprobe vfio-pci"),
            "{}",
            stderr(&output)
        );
    }
    assert!(Sysfs::system().module_loaded("vfio_pci"));
}

fn dmar_faults() -> Vec<String> {
    let output = sh("dmesg");
    stdout(&output)
        .lines()
        .filter(|line| line.contains("DMAR") && line.to_lowercase().contains("fault"))
        .map(str::to_owned)
        .collect()
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_dma_from_an_unmapped_iova_is_stopped_by_the_iommu() {
    let mut edu = open_edu(Completion::Poll);
    let before: HashSet<String> = dmar_faults().into_iter().collect();

    // A buffer that is mapped, and an IOVA that never was: far from the allocator's
    // low addresses, below the device's 28-bit mask.
    let mapped = edu.backend().dma_alloc(4096).unwrap();
    let never_mapped = 0x0abc_d000;
    assert!(mapped.iova() + 4096 <= never_mapped || mapped.iova() > never_mapped + 4096);

    // The device tries to write its buffer to the unmapped IOVA, then to read from it.
    edu.write_to_device(0, &pattern(4000, 7)).unwrap();
    edu.dma_raw(Direction::FromDevice, never_mapped, 0, 4000)
        .unwrap();
    edu.dma_raw(Direction::ToDevice, never_mapped, 0, 64)
        .unwrap();

    // The IOMMU reported the faults...
    let mut new_faults = Vec::new();
    for _ in 0..50 {
        new_faults = dmar_faults()
            .into_iter()
            .filter(|l| !before.contains(l))
            .collect();
        if !new_faults.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!new_faults.is_empty(), "no DMAR fault in the kernel log");
    let fault_text = new_faults.join("\n");
    assert!(
        fault_text.contains("abcd"),
        "fault at the unmapped IOVA: {fault_text}"
    );
    // ...no memory of this process changed...
    assert!(
        mapped.to_vec().iter().all(|&b| b == 0),
        "the mapped buffer was untouched"
    );
    // ...and the process and device still work.
    edu.check_liveness(0x1234_5678).unwrap();
    let data = pattern(256, 9);
    edu.write_to_device(0, &data).unwrap();
    assert_eq!(edu.read_from_device(0, 256).unwrap(), data);
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_interface_that_is_up_is_not_taken_unless_forced() {
    in_lab();
    let nic = single(VIRTIO_NET);
    let address = nic.address.to_string();
    sh("modprobe virtio_net");
    // With several virtio devices the lone NIC's is not necessarily virtio0.
    let device_dir = Sysfs::system().device_path(nic.address);
    let interface = (0..50)
        .find_map(|_| {
            let virtio_dir = std::fs::read_dir(&device_dir)
                .ok()?
                .flatten()
                .find(|entry| entry.file_name().to_string_lossy().starts_with("virtio"));
            let name = virtio_dir
                .and_then(|dir| std::fs::read_dir(dir.path().join("net")).ok())
                .into_iter()
                .flatten()
                .flatten()
                .next()
                .map(|entry| entry.file_name().to_string_lossy().into_owned());
            if name.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            name
        })
        .expect("virtio_net made an interface for the lab NIC");
    sh(&format!("ip link set {interface} up"));

    let refused = ring3(&["bind", &address]);
    assert!(!refused.status.success());
    let text = stderr(&refused);
    assert!(text.contains(&interface), "names the interface: {text}");
    assert!(text.contains("--force"), "names the override: {text}");
    assert_eq!(
        driver_of(nic.address).as_deref(),
        Some("virtio-pci"),
        "nothing changed"
    );

    let forced = ring3(&["bind", "--force", &address]);
    assert!(forced.status.success());
    assert_eq!(driver_of(nic.address).as_deref(), Some("vfio-pci"));
    assert!(ring3(&["unbind", &address]).status.success());
    assert_eq!(driver_of(nic.address).as_deref(), Some("virtio-pci"));
    sh("rmmod virtio_net");
}
