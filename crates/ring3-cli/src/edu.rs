//! `ring3 edu`: drives QEMU's edu test device through the ring3 driver, one step at a time.
//!
//! The steps follow the device's features from simplest to most involved, so the first
//! failing line says how far the path from this process to the device works: config space
//! and BAR mapping (the header), MMIO reads (identification), MMIO writes (liveness),
//! interrupts (factorial), and DMA through the IOMMU.

use ring3::vfio::VfioBackend;
use ring3::{Backend, IrqMode};
use ring3_edu::registers::DMA_USABLE_SIZE;
use ring3_edu::{wrapping_factorial, Completion, Edu};

/// Exercise QEMU's edu test device step by step: identification, liveness, factorial, DMA.
#[derive(Debug, clap::Args)]
pub struct EduArgs {
    /// PCI address of the edu device, bound to vfio-pci (for example 0000:00:03.0).
    #[arg(value_name = "ADDR")]
    pub address: String,

    /// Wait for the device's interrupt (MSI, or INTx without MSI) [default].
    #[arg(long, conflicts_with = "poll")]
    pub irq: bool,

    /// Poll the device's status registers instead of waiting for interrupts.
    #[arg(long)]
    pub poll: bool,

    /// Bytes to send to the device's DMA buffer and back (1 to 4095; QEMU 7.2 aborts on a
    /// transfer that reaches the last byte of edu's 4096-byte buffer).
    #[arg(long, value_name = "N", default_value_t = DMA_USABLE_SIZE as u16,
          value_parser = clap::value_parser!(u16).range(1..=DMA_USABLE_SIZE as i64))]
    pub dma_size: u16,

    /// Compute N! on the device (its result wraps at 32 bits; at most 1000000).
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(..=1_000_000))]
    pub factorial: u32,
}

/// The value written to the liveness register; the device must answer its inverse.
const LIVENESS_PROBE: u32 = 0x1234_5678;

/// Runs the steps in order (identification, liveness, factorial, DMA), printing each as it
/// completes; the first failure ends the run with its error.
pub fn run(args: EduArgs) -> ring3::Result<()> {
    let completion = if args.poll {
        Completion::Poll
    } else {
        Completion::Interrupt
    };
    let backend = VfioBackend::open(&args.address)?;
    let mut edu = Edu::new(backend, completion)?;

    let (vendor_id, device_id) = edu.backend().ids()?;
    let how = match edu.irq_mode() {
        Some(mode) => format!("{mode} interrupt"),
        None => "polling".to_string(),
    };
    println!(
        "edu at {} ({vendor_id:04x}:{device_id:04x}), completion by {how}",
        edu.backend().address()
    );

    let version = edu.identification()?;
    println!("  identification: version {version}");

    edu.check_liveness(LIVENESS_PROBE)?;
    println!(
        "  liveness: wrote {LIVENESS_PROBE:#010x}, read {:#010x} (ok)",
        !LIVENESS_PROBE
    );

    let n = args.factorial;
    let result = edu.factorial(n)?;
    let expected = wrapping_factorial(n);
    if result != expected {
        return Err(ring3::Error::BadDeviceValue {
            what: format!("edu computed {n}! wrongly: expected {expected} (mod 2^32)"),
            value: u64::from(result),
        });
    }
    let wrapped = if n > 12 { " (mod 2^32)" } else { "" };
    let waited = match edu.irq_mode() {
        Some(IrqMode::Msi) => "waited for MSI",
        Some(IrqMode::Intx) => "waited for INTx",
        Some(IrqMode::MsiX) => "waited for MSI-X",
        None => "polled the status register",
    };
    println!("  factorial: {n}! = {result}{wrapped} ({waited})");

    let len = usize::from(args.dma_size);
    let data = test_pattern(len);
    edu.write_to_device(0, &data)?;
    let back = edu.read_from_device(0, len)?;
    if let Some(offset) = data.iter().zip(&back).position(|(sent, got)| sent != got) {
        return Err(ring3::Error::BadDeviceValue {
            what: format!(
                "DMA round trip changed byte {offset} of {len}: sent {:#04x}",
                data[offset]
            ),
            value: u64::from(back[offset]),
        });
    }
    println!(
        "  DMA: {len} bytes host → device → host through IOMMU at IOVA {:#x}: data verified",
        edu.dma_buffer_iova()
    );
    Ok(())
}

/// Bytes that differ from their neighbours and are never zero (the driver clears its host
/// buffer before reading back, so a transfer that did nothing cannot pass).
fn test_pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(0x9e37_79b1) >> 24) as u8 | 1)
        .collect()
}
