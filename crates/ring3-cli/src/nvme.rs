//! `ring3 nvme ADDR identify|read|write|trim|smart`: an NVMe controller through the ring3
//! driver, one command at a time, with human output or `--json`.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use ring3::vfio::VfioBackend;
use ring3::{Backend, DmaBuffer};
use ring3_nvme::{Controller, ControllerOptions, IoQueue, IoQueueOptions, Namespace};
use serde_json::json;

use crate::hexdump::hex_dump;
use crate::size::human_bytes;

/// Drive an NVMe controller bound to vfio-pci.
#[derive(Debug, clap::Args)]
pub struct NvmeArgs {
    /// PCI address of the NVMe controller, bound to vfio-pci (for example 0000:00:03.0).
    #[arg(value_name = "ADDR")]
    pub address: String,

    #[command(subcommand)]
    pub command: NvmeCommand,
}

/// What to do with the controller.
#[derive(Debug, clap::Subcommand)]
pub enum NvmeCommand {
    /// Show the controller (model, serial, limits) and its namespaces.
    Identify(JsonArg),
    /// Read blocks of a namespace to a file or standard output.
    Read(ReadArgs),
    /// Write blocks of a namespace from a file, standard input or a repeated byte.
    Write(WriteArgs),
    /// Deallocate (trim) blocks of a namespace; they read back as zeroes where the
    /// namespace says so.
    Trim(RangeArgs),
    /// Show the SMART / health log and the most recent errors.
    Smart(JsonArg),
}

/// Only `--json`.
#[derive(Debug, clap::Args)]
pub struct JsonArg {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A range of blocks of a namespace.
#[derive(Debug, clap::Args)]
pub struct RangeArgs {
    /// Namespace ID.
    #[arg(long, short = 'n', default_value_t = 1)]
    pub nsid: u32,
    /// First logical block.
    #[arg(long, short = 'l', default_value_t = 0)]
    pub lba: u64,
    /// Number of logical blocks [default: 1, or for `write --input` what the input fills].
    #[arg(long, short = 'c')]
    pub blocks: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Options of `read`.
#[derive(Debug, clap::Args)]
pub struct ReadArgs {
    #[command(flatten)]
    pub range: RangeArgs,
    /// Write the data to this file ("-" for raw bytes on standard output); without it, a
    /// hex dump is printed.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Options of `write`.
#[derive(Debug, clap::Args)]
pub struct WriteArgs {
    #[command(flatten)]
    pub range: RangeArgs,
    /// Take the data from this file ("-" for standard input); the last block is padded
    /// with zeroes. Sets the block count unless --blocks is given.
    #[arg(long, short = 'i', value_name = "FILE", conflicts_with = "fill")]
    pub input: Option<PathBuf>,
    /// Write this byte value to every byte of the range instead (0-255, or 0xNN).
    #[arg(long, value_name = "BYTE", value_parser = parse_byte)]
    pub fill: Option<u8>,
}

impl RangeArgs {
    /// The block count, 1 unless given.
    fn count(&self) -> u64 {
        self.blocks.unwrap_or(1)
    }
}

fn parse_byte(text: &str) -> Result<u8, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("`{text}` is not a byte value (0-255 or 0x00-0xff)"))
}

/// Opens the controller with the default options.
pub fn open(address: &str) -> ring3::Result<Controller<VfioBackend>> {
    open_with(address, ControllerOptions::default())
}

/// Opens the controller with `options`.
pub fn open_with(
    address: &str,
    options: ControllerOptions,
) -> ring3::Result<Controller<VfioBackend>> {
    let backend = VfioBackend::open(address)?;
    Ok(Controller::new(backend, options)?)
}

/// Runs `ring3 nvme`.
pub fn run(args: NvmeArgs) -> ring3::Result<()> {
    let controller = open(&args.address)?;
    match args.command {
        NvmeCommand::Identify(json) => identify(&controller, json.json),
        NvmeCommand::Smart(json) => smart(&controller, json.json),
        NvmeCommand::Read(read_args) => read(&controller, read_args),
        NvmeCommand::Write(write_args) => write(&controller, write_args),
        NvmeCommand::Trim(range) => trim(&controller, range),
    }
}

fn namespace_json(ns: &Namespace) -> serde_json::Value {
    json!({
        "nsid": ns.id,
        "blocks": ns.blocks,
        "block_size": ns.block_size(),
        "bytes": ns.size_bytes(),
        "capacity_blocks": ns.capacity,
        "used_blocks": ns.utilization,
        "metadata_size": ns.metadata_size,
        "deallocated_reads_zeroes": ns.deallocated_reads_zeroes,
    })
}

fn identify<B: Backend>(controller: &Controller<B>, as_json: bool) -> ring3::Result<()> {
    let info = controller.info();
    let (vendor, device) = controller.backend().ids()?;
    if as_json {
        let value = json!({
            "address": controller.address(),
            "pci_id": format!("{vendor:04x}:{device:04x}"),
            "model": info.model,
            "serial": info.serial,
            "firmware": info.firmware,
            "version": controller.version().to_string(),
            "controller_id": info.controller_id,
            "max_transfer_bytes": controller.max_transfer_bytes(),
            "max_queue_entries": controller.capabilities().max_queue_entries(),
            "io_queues": controller.max_io_queues(),
            "volatile_write_cache": info.volatile_write_cache,
            "supports_deallocate": info.supports_deallocate(),
            "supports_write_zeroes": info.supports_write_zeroes(),
            "namespaces": controller.namespaces().iter().map(namespace_json).collect::<Vec<_>>(),
        });
        println!("{value:#}");
        return Ok(());
    }
    println!(
        "{} ({vendor:04x}:{device:04x}): {}",
        controller.address(),
        info.model
    );
    println!(
        "  serial {}, firmware {}, NVMe {}",
        info.serial,
        info.firmware,
        controller.version()
    );
    println!(
        "  {} I/O queue pairs of up to {} entries, transfers up to {}",
        controller.max_io_queues(),
        controller.capabilities().max_queue_entries(),
        human_bytes(controller.max_transfer_bytes() as u64)
    );
    let mut optional = Vec::new();
    if info.supports_deallocate() {
        optional.push("deallocate");
    }
    if info.supports_write_zeroes() {
        optional.push("write zeroes");
    }
    if info.volatile_write_cache {
        optional.push("volatile write cache");
    }
    if !optional.is_empty() {
        println!("  {}", optional.join(", "));
    }
    println!("  namespaces:");
    for ns in controller.namespaces() {
        println!(
            "    {:>3}: {} blocks of {} bytes ({})",
            ns.id,
            ns.blocks,
            ns.block_size(),
            human_bytes(ns.size_bytes())
        );
    }
    if controller.namespaces().is_empty() {
        println!("    none active");
    }
    Ok(())
}

fn smart<B: Backend>(controller: &Controller<B>, as_json: bool) -> ring3::Result<()> {
    let log = controller.smart_log()?;
    let errors = controller.error_log()?;
    if as_json {
        let value = json!({
            "address": controller.address(),
            "critical_warning": log.critical_warning.bits(),
            "temperature_celsius": log.temperature_celsius(),
            "available_spare_percent": log.available_spare,
            "spare_threshold_percent": log.spare_threshold,
            "percentage_used": log.percentage_used,
            "bytes_read": log.bytes_read().to_string(),
            "bytes_written": log.bytes_written().to_string(),
            "host_reads": log.host_reads.to_string(),
            "host_writes": log.host_writes.to_string(),
            "power_cycles": log.power_cycles.to_string(),
            "power_on_hours": log.power_on_hours.to_string(),
            "unsafe_shutdowns": log.unsafe_shutdowns.to_string(),
            "media_errors": log.media_errors.to_string(),
            "error_log_entries": log.error_log_entries.to_string(),
            "recent_errors": errors.iter().map(|e| json!({
                "error_count": e.error_count,
                "sq_id": e.sq_id,
                "command_id": e.command_id,
                "status": e.status.to_string(),
                "lba": e.lba,
                "nsid": e.namespace_id,
            })).collect::<Vec<_>>(),
        });
        println!("{value:#}");
        return Ok(());
    }
    println!("{} SMART / health:", controller.address());
    let warning = if log.critical_warning.is_empty() {
        "none".to_string()
    } else {
        format!("{:?}", log.critical_warning)
    };
    println!("  critical warning   {warning}");
    println!("  temperature        {} °C", log.temperature_celsius());
    println!(
        "  available spare    {}% (threshold {}%)",
        log.available_spare, log.spare_threshold
    );
    println!("  percentage used    {}%", log.percentage_used);
    println!(
        "  data read          {} ({} commands)",
        human_bytes(u64::try_from(log.bytes_read()).unwrap_or(u64::MAX)),
        log.host_reads
    );
    println!(
        "  data written       {} ({} commands)",
        human_bytes(u64::try_from(log.bytes_written()).unwrap_or(u64::MAX)),
        log.host_writes
    );
    println!("  power cycles       {}", log.power_cycles);
    println!("  power-on hours     {}", log.power_on_hours);
    println!("  unsafe shutdowns   {}", log.unsafe_shutdowns);
    println!("  media errors       {}", log.media_errors);
    println!("  error log entries  {}", log.error_log_entries);
    for error in &errors {
        println!(
            "    #{}: queue {}, command {}, namespace {}, LBA {}: {}",
            error.error_count,
            error.sq_id,
            error.command_id,
            error.namespace_id,
            error.lba,
            error.status
        );
    }
    Ok(())
}

/// Checks that `blocks` blocks from `lba` lie inside the namespace and returns it.
fn checked_range<'a, B: Backend>(
    controller: &'a Controller<B>,
    range: &RangeArgs,
) -> ring3::Result<&'a Namespace> {
    let ns = controller.namespace(range.nsid)?;
    if range.count() == 0 {
        return Err(invalid("--blocks must be at least 1".into()));
    }
    let end = range.lba.checked_add(range.count());
    if end.is_none_or(|end| end > ns.blocks) {
        return Err(invalid(format!(
            "blocks {}..{} lie outside namespace {} ({} blocks of {} bytes)",
            range.lba,
            range.lba.saturating_add(range.count()),
            ns.id,
            ns.blocks,
            ns.block_size()
        )));
    }
    Ok(ns)
}

fn invalid(what: String) -> ring3::Error {
    ring3_nvme::Error::InvalidArgument { what }.into()
}

/// Splits `blocks` from `lba` into commands of at most `per_command` blocks, runs up to
/// `depth` at once on `queue`, and calls `each(buffer, first block offset, blocks)` for
/// the data of each finished read, or to fill each write's buffer before it goes.
struct Chunker {
    lba: u64,
    blocks: u64,
    per_command: u64,
    block_size: usize,
}

impl Chunker {
    fn chunks(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let per = self.per_command;
        let count = self.blocks.div_ceil(per);
        (0..count).map(move |i| {
            let start = i * per;
            let len = (self.blocks - start).min(per);
            (self.lba + start, len as u32)
        })
    }
}

fn chunker<B: Backend>(queue: &IoQueue<B>, ns: &Namespace, range: &RangeArgs) -> Chunker {
    let block_size = ns.block_size() as usize;
    let per_command = (queue.max_transfer_bytes() / block_size).max(1) as u64;
    Chunker {
        lba: range.lba,
        blocks: range.count(),
        per_command,
        block_size,
    }
}

/// Runs reads or writes of every chunk, `depth` at a time. `fill` prepares a write's
/// buffer; `done` receives each finished read's buffer with its first LBA and length.
fn run_chunks<B: Backend>(
    queue: &mut IoQueue<B>,
    nsid: u32,
    chunker: &Chunker,
    writing: bool,
    mut fill: impl FnMut(&DmaBuffer, u64, u32) -> ring3::Result<()>,
    mut done: impl FnMut(&DmaBuffer, u64, u32) -> ring3::Result<()>,
) -> ring3::Result<()> {
    let depth = queue.depth().min(8);
    let chunk_bytes = chunker.per_command as usize * chunker.block_size;
    let mut free: Vec<DmaBuffer> = (0..depth)
        .map(|_| queue.alloc_buffer(chunk_bytes))
        .collect::<Result<_, _>>()?;
    let chunks: Vec<(u64, u32)> = chunker.chunks().collect();
    let mut next = 0;
    let mut out = Vec::new();
    let mut first_error: Option<ring3_nvme::Error> = None;
    while next < chunks.len() || queue.in_flight() > 0 {
        while first_error.is_none() && next < chunks.len() {
            let Some(buffer) = free.pop() else { break };
            let (lba, blocks) = chunks[next];
            let placed = if writing {
                fill(&buffer, lba, blocks)?;
                queue.write(nsid, lba, blocks, buffer, next as u64)
            } else {
                queue.read(nsid, lba, blocks, buffer, next as u64)
            };
            placed.map_err(ring3_nvme::Error::from)?;
            next += 1;
        }
        if queue.in_flight() == 0 {
            break;
        }
        queue.wait(&mut out)?;
        for completion in out.drain(..) {
            let (lba, blocks) = chunks[completion.tag as usize];
            match completion.result {
                Ok(()) => {
                    if let Some(buffer) = &completion.buffer {
                        if !writing {
                            done(buffer, lba, blocks)?;
                        }
                    }
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
            if let Some(buffer) = completion.buffer {
                free.push(buffer);
            }
        }
    }
    match first_error {
        Some(error) => Err(error.into()),
        None => Ok(()),
    }
}

fn read<B: Backend>(controller: &Controller<B>, args: ReadArgs) -> ring3::Result<()> {
    let ns = checked_range(controller, &args.range)?.clone();
    let mut queue = controller.io_queue(IoQueueOptions::default())?;
    let chunker = chunker(&queue, &ns, &args.range);
    let block_size = chunker.block_size;
    let total = (args.range.count() as usize).saturating_mul(block_size);

    enum Sink {
        File(File),
        Stdout,
        Dump(Vec<u8>),
    }
    let mut sink = match &args.output {
        Some(path) if path.as_os_str() == "-" => Sink::Stdout,
        Some(path) => {
            Sink::File(File::create(path).map_err(|e| ring3::Error::path("creating", path, e))?)
        }
        None => {
            if total > 1 << 20 {
                return Err(invalid(format!(
                    "{total} bytes are too many for a hex dump: use --output FILE"
                )));
            }
            Sink::Dump(vec![0; total])
        }
    };
    if let Sink::Stdout = sink {
        if std::io::stdout().is_terminal() {
            return Err(invalid(
                "refusing to write raw data to a terminal: use --output FILE".into(),
            ));
        }
    }
    // Reads can finish out of order: files are written at their offset, stdout in order.
    let mut pending: std::collections::BTreeMap<u64, Vec<u8>> = Default::default();
    let mut next_out = args.range.lba;
    let first = args.range.lba;
    run_chunks(
        &mut queue,
        ns.id,
        &chunker,
        false,
        |_, _, _| Ok(()),
        |buffer, lba, blocks| {
            let len = blocks as usize * block_size;
            let mut data = vec![0u8; len];
            buffer.read(0, &mut data)?;
            let at = (lba - first) as usize * block_size;
            match &mut sink {
                Sink::Dump(all) => all[at..at + len].copy_from_slice(&data),
                Sink::File(file) => {
                    use std::os::unix::fs::FileExt;
                    file.write_all_at(&data, at as u64)
                        .map_err(|e| ring3::Error::io("writing the output file", e))?;
                }
                Sink::Stdout => {
                    pending.insert(lba, data);
                    let mut stdout = std::io::stdout().lock();
                    while let Some(chunk) = pending.remove(&next_out) {
                        next_out += (chunk.len() / block_size) as u64;
                        stdout
                            .write_all(&chunk)
                            .map_err(|e| ring3::Error::io("writing to standard output", e))?;
                    }
                }
            }
            Ok(())
        },
    )?;
    match sink {
        Sink::Dump(all) => {
            if args.range.json {
                println!(
                    "{:#}",
                    json!({"nsid": ns.id, "lba": args.range.lba, "blocks": args.range.count(),
                           "bytes": total, "data_hex": hex(&all)})
                );
            } else {
                let base = args.range.lba * block_size as u64;
                hex_dump(&all, base);
                if !all.is_empty() {
                    println!("{:08x}", base + all.len() as u64);
                }
            }
        }
        Sink::File(_) | Sink::Stdout => {
            if args.range.json {
                eprintln!(
                    "{}",
                    json!({"nsid": ns.id, "lba": args.range.lba, "blocks": args.range.count(), "bytes": total})
                );
            } else {
                eprintln!(
                    "read {total} bytes ({} blocks from LBA {}) of namespace {}",
                    args.range.count(),
                    args.range.lba,
                    ns.id
                );
            }
        }
    }
    Ok(())
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn write<B: Backend>(controller: &Controller<B>, mut args: WriteArgs) -> ring3::Result<()> {
    let block_size = u64::from(controller.namespace(args.range.nsid)?.block_size());
    let data = match (&args.input, args.fill) {
        (Some(path), _) => {
            let mut data = Vec::new();
            if path.as_os_str() == "-" {
                std::io::stdin()
                    .read_to_end(&mut data)
                    .map_err(|e| ring3::Error::io("reading standard input", e))?;
            } else {
                File::open(path)
                    .and_then(|mut file| file.read_to_end(&mut data))
                    .map_err(|e| ring3::Error::path("reading", path, e))?;
            }
            if data.is_empty() {
                return Err(invalid("the input is empty: nothing to write".into()));
            }
            // Unless the block count was given, the input decides it.
            if args.range.blocks.is_none() {
                args.range.blocks = Some((data.len() as u64).div_ceil(block_size));
            }
            Some(data)
        }
        (None, Some(_)) => None,
        (None, None) => {
            return Err(invalid(
                "say what to write: --input FILE (or - for standard input) or --fill BYTE".into(),
            ))
        }
    };
    let ns = checked_range(controller, &args.range)?.clone();
    let mut queue = controller.io_queue(IoQueueOptions::default())?;
    let chunker = chunker(&queue, &ns, &args.range);
    let first = args.range.lba;
    let fill_byte = args.fill.unwrap_or(0);
    run_chunks(
        &mut queue,
        ns.id,
        &chunker,
        true,
        |buffer, lba, blocks| {
            let len = blocks as usize * chunker.block_size;
            let at = (lba - first) as usize * chunker.block_size;
            let mut chunk = vec![fill_byte; len];
            if let Some(data) = &data {
                chunk.fill(0);
                if at < data.len() {
                    let end = (at + len).min(data.len());
                    chunk[..end - at].copy_from_slice(&data[at..end]);
                }
            }
            buffer.write(0, &chunk)?;
            Ok(())
        },
        |_, _, _| Ok(()),
    )?;
    // Make the data durable before saying it is written.
    queue.flush(ns.id, 0)?;
    queue.run_one()?;
    let bytes = args.range.count() * block_size;
    if args.range.json {
        println!(
            "{}",
            json!({"nsid": ns.id, "lba": args.range.lba, "blocks": args.range.count(), "bytes": bytes})
        );
    } else {
        println!(
            "wrote {bytes} bytes ({} blocks at LBA {}) to namespace {} and flushed",
            args.range.count(),
            args.range.lba,
            ns.id
        );
    }
    Ok(())
}

fn trim<B: Backend>(controller: &Controller<B>, range: RangeArgs) -> ring3::Result<()> {
    let ns = checked_range(controller, &range)?.clone();
    if !controller.info().supports_deallocate() {
        return Err(invalid(format!(
            "{} does not support Dataset Management (ONCS bit 2): it cannot deallocate",
            controller.address()
        )));
    }
    let mut queue = controller.io_queue(IoQueueOptions::default())?;
    // One range holds up to 2^32 - 1 blocks; one command up to 256 ranges.
    let per_range = u64::from(u32::MAX);
    let mut ranges = Vec::new();
    let mut lba = range.lba;
    let end = range.lba + range.count();
    while lba < end {
        let blocks = (end - lba).min(per_range);
        ranges.push((lba, blocks as u32));
        lba += blocks;
    }
    for group in ranges.chunks(ring3_nvme::io::MAX_DEALLOCATE_RANGES) {
        queue.deallocate(ns.id, group, 0)?;
        queue.run_one()?;
    }
    if range.json {
        println!(
            "{}",
            json!({"nsid": ns.id, "lba": range.lba, "blocks": range.count(),
                              "reads_zeroes": ns.deallocated_reads_zeroes})
        );
    } else {
        let after = if ns.deallocated_reads_zeroes {
            "they read back as zeroes"
        } else {
            "the namespace does not promise what they read back as"
        };
        println!(
            "deallocated {} blocks at LBA {} of namespace {}; {after}",
            range.count(),
            range.lba,
            ns.id
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_range_without_overlap() {
        let chunker = Chunker {
            lba: 10,
            blocks: 1000,
            per_command: 256,
            block_size: 512,
        };
        let chunks: Vec<_> = chunker.chunks().collect();
        assert_eq!(chunks, vec![(10, 256), (266, 256), (522, 256), (778, 232)]);
    }

    #[test]
    fn byte_values_parse_in_decimal_and_hex() {
        assert_eq!(parse_byte("171"), Ok(171));
        assert_eq!(parse_byte("0xab"), Ok(0xab));
        assert!(parse_byte("256").is_err());
        assert!(parse_byte("x").is_err());
    }
}
