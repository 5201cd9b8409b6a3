//! `ring3 usb storage ADDR info|read|write|verify`: a USB flash drive, disk or card
//! reader through ring3's mass-storage driver (Bulk-Only Transport, SCSI block commands),
//! with the kernel's usb-storage driver out of the way.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use ring3_usb::{ClaimedInterface, UsbAddress, UsbDevice, UsbTransport};
use ring3_usb_storage::{MassStorage, MassStorageOptions, StorageError};
use serde_json::json;

use crate::hexdump::hex_dump;
use crate::size::{human_bytes, parse_size};
use crate::CommandError;

/// USB mass storage: interface class 08h, SCSI transparent command set (06h),
/// Bulk-Only Transport (50h).
const CLASS_MASS_STORAGE: u8 = 0x08;
const SUBCLASS_SCSI: u8 = 0x06;
const PROTOCOL_BULK_ONLY: u8 = 0x50;

/// Drive a USB mass-storage device (flash drive, disk, card reader) with ring3's driver.
///
/// Needs root or write access to the device's usbfs node. While the command runs the
/// interface belongs to ring3; a kernel driver (usb-storage) bound to it is detached
/// only with --force, and bound again afterwards.
#[derive(Debug, clap::Args)]
pub struct StorageArgs {
    /// USB device: BUS-PORT[.PORT...] as in sysfs (e.g. 3-1), VID:PID in hex (e.g.
    /// 46f4:0001) or VID:PID:SERIAL (e.g. 46f4:0001:R3RAW); see `ring3 usb list`.
    #[arg(value_name = "ADDR")]
    pub address: UsbAddress,
    /// Interface number [default: the first mass-storage Bulk-Only interface].
    #[arg(long, short = 'i', value_name = "N", global = true)]
    pub interface: Option<u8>,
    /// Logical unit (card readers have several).
    #[arg(long, default_value_t = 0, global = true)]
    pub lun: u8,
    /// Detach a kernel driver bound to the interface (it is bound again on exit).
    #[arg(long, global = true)]
    pub force: bool,
    /// Largest transfer of one SCSI command (e.g. 64k, 1m); larger requests are split
    /// [default: 128k].
    #[arg(long, value_name = "SIZE", value_parser = parse_size, global = true)]
    pub max_transfer: Option<u64>,

    #[command(subcommand)]
    pub command: StorageCommand,
}

/// What to do with the device.
#[derive(Debug, clap::Subcommand)]
pub enum StorageCommand {
    /// Show what the device says about itself (INQUIRY) and its capacity.
    Info(InfoArgs),
    /// Read blocks to a file, or show them as a hex dump.
    Read(ReadArgs),
    /// Write a test pattern to blocks (then flush the device's cache).
    Write(WriteArgs),
    /// Write a test pattern over the device (or a range) with many transfer sizes, flush,
    /// read it back with other sizes and compare. Destroys the data in the range.
    Verify(VerifyArgs),
}

/// Options of `info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Options of `read`.
#[derive(Debug, clap::Args)]
pub struct ReadArgs {
    /// First logical block.
    #[arg(long, short = 'l', default_value_t = 0)]
    pub lba: u64,
    /// Number of blocks.
    #[arg(long, short = 'c', default_value_t = 1)]
    pub count: u64,
    /// Write the data to this file ("-" for raw bytes on standard output); without it,
    /// a hex dump is printed.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Check the blocks hold the pattern `write --pattern SEED` writes; fails naming the
    /// first block that differs.
    #[arg(long, value_name = "SEED")]
    pub expect_pattern: Option<u64>,
}

/// Options of `write`.
#[derive(Debug, clap::Args)]
pub struct WriteArgs {
    /// First logical block.
    #[arg(long, short = 'l', default_value_t = 0)]
    pub lba: u64,
    /// Number of blocks.
    #[arg(long, short = 'c', default_value_t = 1)]
    pub count: u64,
    /// Seed of the pattern: every block gets bytes computed from the seed and its LBA,
    /// so `read --expect-pattern SEED` can check any part of it.
    #[arg(long, value_name = "SEED")]
    pub pattern: u64,
}

/// Options of `verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// First logical block.
    #[arg(long, short = 'l', default_value_t = 0)]
    pub lba: u64,
    /// Number of blocks [default: to the end of the device].
    #[arg(long, short = 'c')]
    pub count: Option<u64>,
    /// Seed of the pattern [default: from the clock].
    #[arg(long, value_name = "SEED")]
    pub seed: Option<u64>,
    /// Transfer sizes to cycle through, in blocks, comma-separated [default: 1 block up
    /// to 1 MiB, including odd sizes].
    #[arg(long, value_delimiter = ',', value_name = "BLOCKS")]
    pub sizes: Option<Vec<u64>>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `ring3 usb storage`.
pub fn run(args: StorageArgs) -> Result<(), CommandError> {
    let device = UsbDevice::open(&args.address)?;
    let interface = match args.interface {
        Some(number) => number,
        None => device.find_interface(CLASS_MASS_STORAGE, SUBCLASS_SCSI, PROTOCOL_BULK_ONLY)?,
    };
    let claimed = device.claim(interface, args.force)?;
    let endpoints = claimed.bulk_endpoints()?;
    let mut options = MassStorageOptions::default();
    if let Some(bytes) = args.max_transfer {
        options.max_transfer_bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
    }
    let storage = MassStorage::with_options(claimed, endpoints, args.lun, options)?;
    match args.command {
        StorageCommand::Info(info_args) => info(&storage, &args.address, interface, info_args),
        StorageCommand::Read(read_args) => read(&storage, read_args),
        StorageCommand::Write(write_args) => write(&storage, write_args),
        StorageCommand::Verify(verify_args) => verify(&storage, verify_args),
    }
}

fn device_type_name(device_type: u8) -> &'static str {
    match device_type {
        0x00 => "direct-access block device",
        0x05 => "CD/DVD",
        0x0E => "simplified direct-access device",
        _ => "other",
    }
}

fn info(
    storage: &MassStorage<ClaimedInterface>,
    address: &UsbAddress,
    interface: u8,
    args: InfoArgs,
) -> Result<(), CommandError> {
    let inquiry = storage.inquiry();
    if args.json {
        let value = json!({
            "address": address.to_string(),
            "interface": interface,
            "lun": storage.lun(),
            "vendor": inquiry.vendor,
            "product": inquiry.product,
            "revision": inquiry.revision,
            "device_type": inquiry.peripheral_device_type,
            "removable": inquiry.removable,
            "block_size": storage.block_size(),
            "block_count": storage.block_count(),
            "bytes": storage.capacity_bytes(),
            "max_transfer_bytes": storage.max_transfer_bytes(),
        });
        println!("{value:#}");
        return Ok(());
    }
    println!(
        "{address} interface {interface} LUN {}: {} {} {}",
        storage.lun(),
        inquiry.vendor,
        inquiry.product,
        inquiry.revision
    );
    println!(
        "  {}{}",
        device_type_name(inquiry.peripheral_device_type),
        if inquiry.removable {
            ", removable medium"
        } else {
            ""
        }
    );
    println!(
        "  {} blocks of {} bytes = {} bytes ({})",
        storage.block_count(),
        storage.block_size(),
        storage.capacity_bytes(),
        human_bytes(storage.capacity_bytes())
    );
    println!(
        "  transfers up to {} per command",
        human_bytes(storage.max_transfer_bytes() as u64)
    );
    Ok(())
}

/// The length in bytes of `count` blocks from `lba`, checked against the device (the
/// driver checks again; this gives the error before allocating a buffer).
fn range_bytes<T: UsbTransport>(
    storage: &MassStorage<T>,
    lba: u64,
    count: u64,
) -> Result<usize, StorageError> {
    let inside = lba
        .checked_add(count)
        .is_some_and(|end| end <= storage.block_count());
    if !inside {
        return Err(StorageError::OutOfRange {
            lba,
            blocks: count,
            block_count: storage.block_count(),
        });
    }
    count
        .checked_mul(u64::from(storage.block_size()))
        .and_then(|bytes| usize::try_from(bytes).ok())
        .filter(|&bytes| bytes <= 1 << 30)
        .ok_or_else(|| StorageError::InvalidArgument {
            what: format!(
                "{count} blocks is more than this command reads or writes at once (1 GiB)"
            ),
        })
}

fn read(storage: &MassStorage<ClaimedInterface>, args: ReadArgs) -> Result<(), CommandError> {
    let len = range_bytes(storage, args.lba, args.count)?;
    let mut data = vec![0; len];
    storage.read(args.lba, &mut data)?;
    if let Some(seed) = args.expect_pattern {
        let block = storage.block_size() as usize;
        check_pattern(seed, args.lba, block, &data)?;
        eprintln!(
            "{} blocks from LBA {} hold pattern {seed}",
            args.count, args.lba
        );
    }
    match &args.out {
        Some(path) if path.as_os_str() == "-" => std::io::stdout().lock().write_all(&data)?,
        Some(path) => File::create(path)?.write_all(&data)?,
        None if args.expect_pattern.is_none() => {
            hex_dump(&data, args.lba * u64::from(storage.block_size()))
        }
        None => {}
    }
    Ok(())
}

fn write(storage: &MassStorage<ClaimedInterface>, args: WriteArgs) -> Result<(), CommandError> {
    let len = range_bytes(storage, args.lba, args.count)?;
    let block = storage.block_size() as usize;
    let mut data = vec![0; len];
    fill_pattern(args.pattern, args.lba, block, &mut data);
    storage.write(args.lba, &data)?;
    storage.synchronize_cache()?;
    println!(
        "wrote {} blocks ({}) from LBA {} with pattern {}",
        args.count,
        human_bytes(len as u64),
        args.lba,
        args.pattern
    );
    Ok(())
}

/// The default transfer sizes of `verify`, in bytes: one block up to 1 MiB, with sizes
/// that are not powers of two (and so split unevenly at the transfer limit).
const VERIFY_SIZES: [u64; 14] = [
    512, 1024, 1536, 4096, 3584, 8192, 15872, 32768, 65536, 126_976, 131_072, 135_168, 524_288,
    1_048_576,
];

fn verify(storage: &MassStorage<ClaimedInterface>, args: VerifyArgs) -> Result<(), CommandError> {
    let block = u64::from(storage.block_size());
    let count = match args.count {
        Some(count) => count,
        None => storage.block_count().saturating_sub(args.lba),
    };
    if args
        .lba
        .checked_add(count)
        .is_none_or(|end| end > storage.block_count())
    {
        return Err(StorageError::OutOfRange {
            lba: args.lba,
            blocks: count,
            block_count: storage.block_count(),
        }
        .into());
    }
    let sizes: Vec<u64> = match &args.sizes {
        Some(sizes) => sizes.clone(),
        None => VERIFY_SIZES
            .iter()
            .map(|&bytes| (bytes / block).max(1))
            .collect(),
    };
    if sizes.is_empty() || sizes.contains(&0) || sizes.iter().any(|&s| s > (64 << 20) / block) {
        return Err(StorageError::InvalidArgument {
            what: "--sizes must be block counts from 1 up to 64 MiB worth".into(),
        }
        .into());
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let total_bytes = count * block;
    let bar = ProgressBar::new(2 * total_bytes);
    bar.set_style(
        ProgressStyle::with_template("{msg:6} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );

    // Write with the sizes in order, read back starting elsewhere in the cycle, so the
    // reads straddle the writes' boundaries; the last transfer of each pass is whatever
    // is left (a tail that fits no size).
    let largest = sizes.iter().copied().max().unwrap_or(1) * block;
    let mut buffer = vec![0u8; largest as usize];
    let mut expected = vec![0u8; largest as usize];
    bar.set_message("write");
    let started = Instant::now();
    let mut commands_write = 0u64;
    let mut lba = args.lba;
    let end = args.lba + count;
    for &size in sizes.iter().cycle() {
        if lba >= end {
            break;
        }
        let blocks = size.min(end - lba);
        let data = &mut buffer[..(blocks * block) as usize];
        fill_pattern(seed, lba, block as usize, data);
        storage.write(lba, data)?;
        commands_write += 1;
        bar.inc(blocks * block);
        lba += blocks;
    }
    storage.synchronize_cache()?;
    let write_time = started.elapsed();

    bar.set_message("read");
    let started = Instant::now();
    let mut commands_read = 0u64;
    let mut lba = args.lba;
    for &size in sizes.iter().cycle().skip(sizes.len() / 2 + 1) {
        if lba >= end {
            break;
        }
        let blocks = size.min(end - lba);
        let len = (blocks * block) as usize;
        storage.read(lba, &mut buffer[..len])?;
        fill_pattern(seed, lba, block as usize, &mut expected[..len]);
        if buffer[..len] != expected[..len] {
            let bad = first_difference(&buffer[..len], &expected[..len], block as usize);
            bar.abandon();
            return Err(format!(
                "block {} differs from what was written (read of {blocks} blocks at LBA {lba}, pattern {seed})",
                lba + bad
            )
            .into());
        }
        commands_read += 1;
        bar.inc(blocks * block);
        lba += blocks;
    }
    let read_time = started.elapsed();
    bar.finish_and_clear();

    let rate = |time: Duration| total_bytes as f64 / time.as_secs_f64().max(1e-9) / 1e6;
    if args.json {
        let value = json!({
            "lba": args.lba,
            "blocks": count,
            "bytes": total_bytes,
            "seed": seed,
            "sizes_blocks": sizes,
            "writes": commands_write,
            "reads": commands_read,
            "write_seconds": write_time.as_secs_f64(),
            "read_seconds": read_time.as_secs_f64(),
            "write_mb_per_s": rate(write_time),
            "read_mb_per_s": rate(read_time),
            "verified": true,
        });
        println!("{value:#}");
    } else {
        println!(
            "verified {count} blocks ({}) from LBA {} with pattern {seed}: {commands_write} writes in {:.1} s \
             ({:.1} MB/s), {commands_read} reads in {:.1} s ({:.1} MB/s), transfers of {} blocks",
            human_bytes(total_bytes),
            args.lba,
            write_time.as_secs_f64(),
            rate(write_time),
            read_time.as_secs_f64(),
            rate(read_time),
            sizes.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// Fills `data` (whole blocks starting at `lba`) with the pattern of `seed`: each block's
/// bytes come from a generator seeded by the seed and the block's LBA, so every block
/// differs from every other and from other seeds.
pub fn fill_pattern(seed: u64, lba: u64, block_size: usize, data: &mut [u8]) {
    for (index, block) in data.chunks_mut(block_size).enumerate() {
        let mut state = (seed ^ (lba + index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
        for word in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bytes = state.to_le_bytes();
            word.copy_from_slice(&bytes[..word.len()]);
        }
    }
}

fn first_difference(actual: &[u8], expected: &[u8], block_size: usize) -> u64 {
    actual
        .chunks(block_size)
        .zip(expected.chunks(block_size))
        .position(|(a, b)| a != b)
        .unwrap_or(0) as u64
}

fn check_pattern(seed: u64, lba: u64, block_size: usize, data: &[u8]) -> Result<(), CommandError> {
    let mut expected = vec![0; data.len()];
    fill_pattern(seed, lba, block_size, &mut expected);
    if data != expected {
        let bad = first_difference(data, &expected, block_size);
        return Err(format!("block {} does not hold pattern {seed}", lba + bad).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_differs_per_block_and_seed_and_does_not_depend_on_the_split() {
        let mut whole = vec![0; 4 * 512];
        fill_pattern(7, 100, 512, &mut whole);
        let mut parts = vec![0; 4 * 512];
        fill_pattern(7, 100, 512, &mut parts[..512]);
        fill_pattern(7, 101, 512, &mut parts[512..]);
        assert_eq!(whole, parts);
        assert_ne!(whole[..512], whole[512..1024]);
        let mut other = vec![0; 512];
        fill_pattern(8, 100, 512, &mut other);
        assert_ne!(other[..], whole[..512]);
        assert!(check_pattern(7, 100, 512, &whole).is_ok());
        let error = check_pattern(7, 100, 512, &other).unwrap_err();
        assert_eq!(error.to_string(), "block 100 does not hold pattern 7");
        whole[3 * 512 + 5] ^= 1;
        let error = check_pattern(7, 100, 512, &whole).unwrap_err();
        assert_eq!(error.to_string(), "block 103 does not hold pattern 7");
    }
}
