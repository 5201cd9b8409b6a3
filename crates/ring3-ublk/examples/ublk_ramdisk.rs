//! A ublk RAM disk: the whole cycle of a ublk server in one process (run it as root).
//!
//! ```text
//! ublk_ramdisk [--size-mib 64] [--queues 2] [--depth 64] [--backing FILE] [--recovery]
//! ublk_ramdisk --recover ID --backing FILE
//! ```
//!
//! The data lives in a memfd, or in `--backing FILE` (created and sized if needed) so that
//! it outlives the process: with `--recovery` the device survives the server's death, and
//! `--recover ID` starts a new server for device ID over the same file. The server prints
//! `id=N block=/dev/ublkbN` once the device is live, then serves until SIGTERM/SIGINT or
//! until its stdin is closed, and then stops and deletes the device.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::Parser;
use ring3_ublk::{Control, DeviceInfo, DeviceSpec, Discard, Op, Params, Queue, Request};
use rustix::fs::FallocateFlags;

const MAX_IO_BYTES: u32 = 256 << 10;
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Parser)]
struct Args {
    /// Capacity in MiB (ignored with --recover: the backing file's size counts).
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// Hardware queues, one thread each.
    #[arg(long, default_value_t = 2)]
    queues: u16,
    /// Tags per queue.
    #[arg(long, default_value_t = 64)]
    depth: u16,
    /// Keep the data in this file instead of a memfd.
    #[arg(long)]
    backing: Option<PathBuf>,
    /// Let the device survive this server (UBLK_F_USER_RECOVERY_REISSUE).
    #[arg(long)]
    recovery: bool,
    /// Take over device ID, whose server died, instead of adding a device.
    #[arg(long, value_name = "ID", requires = "backing")]
    recover: Option<u32>,
}

fn main() {
    if let Err(error) = run(Args::parse()) {
        eprintln!("ublk_ramdisk: {error}");
        let mut source = std::error::Error::source(&*error);
        while let Some(cause) = source {
            eprintln!("  caused by: {cause}");
            source = cause.source();
        }
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Block the stop signals before any thread starts, so only `wait_for_stop` sees them.
    let stop_signals = block_stop_signals();
    let backing = Arc::new(open_backing(&args)?);
    let size_bytes = backing.metadata()?.len();
    let control = Control::open()?;
    let server_pid = std::process::id() as i32;

    let info = match args.recover {
        None => {
            let info = control.add(&DeviceSpec {
                id: None,
                queues: args.queues,
                depth: args.depth,
                max_io_bytes: MAX_IO_BYTES,
                recovery: args.recovery,
            })?;
            control.set_params(
                info.id,
                &Params {
                    size_bytes,
                    logical_block: 512,
                    physical_block: 4096,
                    max_io_bytes: info.max_io_bytes,
                    volatile_cache: true,
                    fua: false,
                    discard: Some(Discard {
                        granularity: 4096,
                        max_bytes: 64 << 20,
                    }),
                    write_zeroes_max_bytes: 64 << 20,
                },
            )?;
            info
        }
        Some(id) => {
            control.start_recovery(id, TIMEOUT)?;
            control.info(id)?
        }
    };

    let cdev = Arc::new(control.open_char_device(info.id, TIMEOUT)?);
    let servers = (0..info.queues)
        .map(|queue_id| {
            let (cdev, backing) = (cdev.clone(), backing.clone());
            thread::Builder::new()
                .name(format!("ublk-q{queue_id}"))
                .spawn(move || serve(cdev, queue_id, info, &backing, size_bytes))
        })
        .collect::<Result<Vec<_>, _>>()?;
    drop(cdev); // the queues hold it; recovery needs every copy closed when they go

    match args.recover {
        None => control.start(info.id, server_pid, TIMEOUT)?,
        Some(id) => control.end_recovery(id, server_pid, TIMEOUT)?,
    }
    println!("id={} block={}", info.id, info.block_device().display());
    std::io::stdout().flush()?;

    wait_for_stop(stop_signals);
    control.stop(info.id)?;
    for server in servers {
        server.join().map_err(|_| "a queue thread panicked")??;
    }
    control.delete(info.id)?;
    Ok(())
}

fn open_backing(args: &Args) -> std::io::Result<File> {
    let file = match &args.backing {
        Some(path) => std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?,
        None => File::from(rustix::fs::memfd_create(
            "ublk_ramdisk",
            rustix::fs::MemfdFlags::CLOEXEC,
        )?),
    };
    if args.recover.is_none() && file.metadata()?.len() == 0 {
        file.set_len(args.size_mib << 20)?;
    }
    Ok(file)
}

/// Serves one queue until ublk_drv aborts it.
fn serve(
    cdev: Arc<OwnedFd>,
    queue_id: u16,
    info: DeviceInfo,
    backing: &File,
    size_bytes: u64,
) -> ring3_ublk::Result<()> {
    let tag_bytes = info.max_io_bytes as usize;
    let mut buffers = vec![0u8; usize::from(info.depth) * tag_bytes];
    let mut queue = Queue::new(cdev, queue_id, info.depth, info.max_io_bytes)?;
    for tag in 0..info.depth {
        let buffer = buffers[usize::from(tag) * tag_bytes..].as_mut_ptr();
        // SAFETY: every tag gets its own max_io_bytes of `buffers`, which is dropped
        // after `queue`, and not touched while the kernel has the tag.
        unsafe { queue.fetch(tag, buffer)? };
    }
    let mut requests = Vec::with_capacity(info.depth.into());
    while queue.poll(&mut requests, Some(Duration::from_millis(200)))? {
        for request in &requests {
            let start = usize::from(request.tag) * tag_bytes;
            let buffer = &mut buffers[start..start + tag_bytes];
            let result = handle(request, buffer, backing, size_bytes);
            // SAFETY: as for fetch; `buffer`'s borrow ended with `handle`.
            unsafe { queue.complete(request.tag, result, buffers[start..].as_mut_ptr())? };
        }
    }
    let rejected = queue.rejected();
    drop(queue);
    drop(buffers);
    if rejected != 0 {
        // Not expected from a sane kernel: make it visible (and fail the lab tests).
        eprintln!("queue {queue_id}: {rejected} requests with invalid descriptors failed with EIO");
        std::process::exit(2);
    }
    Ok(())
}

/// Does one request against the backing file; returns bytes or a negative errno.
fn handle(request: &Request, buffer: &mut [u8], backing: &File, size_bytes: u64) -> i32 {
    let (offset, len) = (request.offset_bytes(), request.len_bytes());
    if request.op != Op::Flush && offset + len > size_bytes {
        return -libc::EIO;
    }
    let data = &mut buffer[..len as usize];
    let outcome = match request.op {
        Op::Read => backing.read_exact_at(data, offset),
        Op::Write => backing.write_all_at(data, offset),
        Op::Flush => backing.sync_data(),
        // A hole reads back as zeros, and tmpfs (memfd, /dev/shm) has no ZERO_RANGE.
        Op::Discard | Op::WriteZeroes => punch_hole(backing, offset, len),
        Op::Other(_) => return -libc::EOPNOTSUPP,
    };
    match outcome {
        Ok(()) if request.op.has_data() => len as i32,
        Ok(()) => 0,
        Err(error) => -error.raw_os_error().unwrap_or(libc::EIO),
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    rustix::fs::fallocate(file, mode, offset, len)?;
    Ok(())
}

/// Blocks SIGTERM and SIGINT in this thread (and the threads it starts).
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Returns on SIGTERM/SIGINT or when stdin is closed.
fn wait_for_stop(signals: libc::sigset_t) {
    let (stop, stopped) = mpsc::channel();
    let on_signal = stop.clone();
    thread::spawn(move || {
        let mut signal = 0;
        // SAFETY: `signals` is an initialised set, `signal` a valid out-pointer.
        unsafe { libc::sigwait(&signals, &mut signal) };
        let _ = on_signal.send(());
    });
    thread::spawn(move || {
        let mut sink = [0u8; 256];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(1..)) {}
        let _ = stop.send(());
    });
    let _ = stopped.recv();
}
