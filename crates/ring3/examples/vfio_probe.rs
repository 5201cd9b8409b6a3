//! Opens a device already bound to vfio-pci and prints what VFIO reports about it.
//!
//! ```text
//! cargo run -p ring3 --example vfio_probe -- [ADDRESS] [--edu-selftest]
//! ```
//!
//! Without an address, the first device bound to vfio-pci is used. With `--edu-selftest`
//! and QEMU's edu device (1234:11e8), it also checks the VFIO layer end to end: BAR
//! access, DMA both ways through the IOMMU, MSI and INTx delivery, and reset. It binds
//! nothing: bind the device first (`ring3 bind ADDRESS`, or driver_override + drivers_probe).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use ring3::pci::Sysfs;
use ring3::vfio::{DeviceFlags, VfioBackend, BAR_COUNT, CONFIG_REGION, ROM_REGION};
use ring3::{Backend, IrqMode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let selftest = args.iter().any(|a| a == "--edu-selftest");
    let generic_check = args.iter().any(|a| a == "--check");
    let address = args.iter().find(|a| !a.starts_with("--")).cloned();
    match run(address, selftest, generic_check) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            eprintln!("  (kind: {:?})", error.kind());
            ExitCode::FAILURE
        }
    }
}

fn run(address: Option<String>, selftest: bool, generic_check: bool) -> ring3::Result<()> {
    let address = match address {
        Some(address) => address,
        None => Sysfs::system()
            .devices()?
            .into_iter()
            .find(|d| d.driver.as_deref() == Some("vfio-pci"))
            .map(|d| d.address.to_string())
            .ok_or_else(|| ring3::Error::InvalidArgument {
                what: "no device is bound to vfio-pci; name one".into(),
            })?,
    };
    let backend = VfioBackend::open(&address)?;
    let device = backend.device();
    let (vendor, id) = backend.ids()?;
    println!(
        "{address}: {vendor:04x}:{id:04x}, IOMMU group {}",
        backend.group().number()
    );
    println!("  {:?}", device.info());
    let iommu = backend.container().iommu_info()?;
    println!(
        "  IOMMU {:?}: page sizes {:#x}, DMA mappings left {:?}",
        backend.container().iommu_type(),
        iommu.page_sizes,
        iommu.dma_mappings_available
    );
    for range in iommu.iova_ranges.iter().flatten() {
        println!("    valid IOVAs {:#x}..={:#x}", range.start, range.last);
    }
    for index in (0..u32::from(BAR_COUNT)).chain([ROM_REGION, CONFIG_REGION]) {
        let region = device.region_info(index)?;
        if region.size > 0 {
            println!(
                "  region {index}: {:#x} bytes at fd offset {:#x}, {:?}",
                region.size, region.offset, region.flags
            );
        }
    }
    for mode in [IrqMode::Intx, IrqMode::Msi, IrqMode::MsiX] {
        let info = device.irq_info(mode)?;
        println!("  {mode}: {} vectors, {:?}", info.count, info.flags);
    }
    if generic_check {
        check_any_device(&backend)?;
    }
    if selftest {
        if (vendor, id) != (0x1234, 0x11e8) {
            return Err(ring3::Error::InvalidArgument {
                what: format!(
                    "--edu-selftest needs QEMU's edu device (1234:11e8), not {vendor:04x}:{id:04x}"
                ),
            });
        }
        edu_selftest(&backend)?;
        // A buffer that outlives its backend is still unmapped when it drops: it keeps
        // the container, and the container keeps the group attached.
        let buffer = backend.dma_alloc(4096)?;
        let container = std::sync::Arc::clone(backend.container());
        let available =
            |c: &ring3::vfio::Container| c.iommu_info().map(|i| i.dma_mappings_available);
        let with_buffer = available(&container)?;
        drop(backend);
        drop(buffer);
        let after = available(&container)?;
        println!("  DMA mappings left: {with_buffer:?} with the buffer, {after:?} after backend and buffer dropped");
        check(
            with_buffer.zip(after).is_none_or(|(w, a)| a == w + 1),
            "the buffer was not unmapped after its backend dropped",
        )?;
        println!("edu self-test passed");
    }
    Ok(())
}

/// Maps every BAR and reads its first register; enables and disables every interrupt
/// mode. Reads can have side effects on some devices: only for test devices.
fn check_any_device(backend: &VfioBackend) -> ring3::Result<()> {
    for index in 0..BAR_COUNT {
        match backend.bar(index) {
            Ok(bar) => {
                let first = bar.read32(0)?;
                let mapped_once = backend.bar(index)?.read32(0)? == first;
                println!(
                    "  BAR{index}: {:#x} bytes, first register {first:#x} (cached: {mapped_once})",
                    bar.len()
                );
            }
            Err(error) => println!("  BAR{index}: {error}"),
        }
    }
    if backend.device().info().flags.contains(DeviceFlags::RESET) {
        let command_before = backend.config_read_u16(ring3::backend::config::COMMAND)?;
        backend.reset()?;
        let command_after = backend.config_read_u16(ring3::backend::config::COMMAND)?;
        let first = backend.bar(0).and_then(|bar| bar.read32(0));
        println!("  reset: ok; command register {command_before:#x} -> {command_after:#x}, BAR0[0] now {first:x?}");
    }
    for mode in [IrqMode::Intx, IrqMode::Msi, IrqMode::MsiX] {
        let count = backend.interrupt_count(mode)?;
        if count == 0 {
            continue;
        }
        let vectors = backend.enable_interrupts(mode, count)?;
        check(vectors.len() == count as usize, "vector count")?;
        check(
            backend.device().enabled_irq_mode() == Some(mode),
            "mode not recorded",
        )?;
        println!("  {mode}: enabled {count} vectors");
    }
    // The last mode stays enabled: dropping the backend must disable it.
    Ok(())
}

fn check(ok: bool, what: impl Into<String>) -> ring3::Result<()> {
    if ok {
        Ok(())
    } else {
        Err(ring3::Error::InvalidArgument { what: what.into() })
    }
}

/// Register offsets from QEMU's docs/specs/edu.rst ("MMIO area spec"); the real driver is
/// the ring3-edu crate, this only exercises the VFIO layer.
fn edu_selftest(backend: &VfioBackend) -> ring3::Result<()> {
    const LIVENESS: usize = 0x04;
    const INTERRUPT_STATUS: usize = 0x24;
    const INTERRUPT_RAISE: usize = 0x60;
    const INTERRUPT_ACK: usize = 0x64;
    const DMA_SOURCE: usize = 0x80;
    const DMA_DESTINATION: usize = 0x88;
    const DMA_COUNT: usize = 0x90;
    const DMA_COMMAND: usize = 0x98;
    const DMA_START: u64 = 1;
    const DMA_TO_RAM: u64 = 2;
    const DMA_RAISE: u64 = 4;
    const DEVICE_BUFFER: u64 = 0x4_0000;

    let bar = backend.bar(0)?;
    let again = backend.bar(0)?;
    check(
        bar.len() == 1 << 20,
        format!("BAR0 is {:#x} bytes", bar.len()),
    )?;
    let id = bar.read32(0)?;
    println!("  identification {id:#010x}");
    check(id & 0xff == 0xed, "identification register")?;
    again.write32(LIVENESS, 0x1234_5678)?;
    check(
        bar.read32(LIVENESS)? == !0x1234_5678,
        "liveness register (BAR mapped twice?)",
    )?;

    backend.set_bus_master(true)?;
    backend.set_dma_mask(28);
    let source = backend.dma_alloc(4096)?;
    let destination = backend.dma_alloc(4096)?;
    println!(
        "  DMA buffers at IOVA {:#x} and {:#x}",
        source.iova(),
        destination.iova()
    );
    let pattern: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(7) ^ 0x5a).collect();
    source.write(0, &pattern)?;

    let transfer = |from: u64, to: u64, command: u64| -> ring3::Result<()> {
        bar.write::<u64>(DMA_SOURCE, from)?;
        bar.write::<u64>(DMA_DESTINATION, to)?;
        bar.write::<u64>(DMA_COUNT, pattern.len() as u64)?;
        bar.write::<u64>(DMA_COMMAND, DMA_START | command)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while bar.read::<u64>(DMA_COMMAND)? & DMA_START != 0 {
            check(Instant::now() < deadline, "DMA did not finish in 5 s")?;
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    };

    let msi = backend.enable_interrupts(IrqMode::Msi, 1)?;
    transfer(source.iova(), DEVICE_BUFFER, 0)?;
    transfer(DEVICE_BUFFER, destination.iova(), DMA_TO_RAM | DMA_RAISE)?;
    let mut copied = vec![0u8; pattern.len()];
    destination.read(0, &mut copied)?;
    check(
        copied == pattern,
        "data did not survive DMA to the device and back",
    )?;
    println!("  DMA to the device and back: ok");
    let count = msi[0].wait(Duration::from_secs(5))?;
    let status = bar.read32(INTERRUPT_STATUS)?;
    check(
        status & 0x100 != 0,
        format!("interrupt status {status:#x} after DMA"),
    )?;
    bar.write32(INTERRUPT_ACK, status)?;
    println!("  MSI after DMA: {count} interrupt(s)");

    bar.write32(INTERRUPT_RAISE, 0x1)?;
    let count = msi[0].wait(Duration::from_secs(5))?;
    bar.write32(INTERRUPT_ACK, 0x1)?;
    println!("  MSI raised by hand: {count}");

    let intx = backend.enable_interrupts(IrqMode::Intx, 1)?;
    check(
        backend.device().enabled_irq_mode() == Some(IrqMode::Intx),
        "INTx not enabled",
    )?;
    for round in 0..3 {
        bar.write32(INTERRUPT_RAISE, 0x2)?;
        let count = intx[0].wait(Duration::from_secs(5))?;
        bar.write32(INTERRUPT_ACK, 0x2)?;
        println!("  INTx round {round}: {count}");
    }
    // Deliveries that arrive only because the unmask ran before the acknowledgement.
    std::thread::sleep(Duration::from_millis(50));
    println!(
        "  INTx left pending after acknowledging: {}",
        intx[0].poll()?
    );
    // The order level-triggered INTx needs: take the event, acknowledge, then unmask.
    for round in 0..2 {
        bar.write32(INTERRUPT_RAISE, 0x2)?;
        check(
            ring3::sys::wait_readable(&intx[0], Duration::from_secs(5))?,
            "INTx (manual unmask) did not arrive",
        )?;
        let count = ring3::sys::eventfd_take(std::os::fd::AsFd::as_fd(&intx[0]))?;
        bar.write32(INTERRUPT_ACK, 0x2)?;
        backend.device().unmask_intx()?;
        std::thread::sleep(Duration::from_millis(50));
        let spurious = ring3::sys::eventfd_take(std::os::fd::AsFd::as_fd(&intx[0]))?;
        println!("  INTx acknowledged before unmask, round {round}: {count:?}, then pending {spurious:?}");
    }
    backend.disable_interrupts(IrqMode::Intx)?;
    check(
        backend.device().enabled_irq_mode().is_none(),
        "INTx still enabled",
    )?;

    match backend.reset() {
        Ok(()) => {
            // A reset returns the liveness register to its initial state (0).
            println!("  reset: ok, liveness now {:#x}", !bar.read32(LIVENESS)?);
            let (vendor, _) = backend.ids()?;
            check(vendor == 0x1234, "config space after reset")?;
        }
        Err(error) => println!("  reset: {error}"),
    }
    drop((source, destination));
    Ok(())
}
