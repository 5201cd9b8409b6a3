//! The lab's USB devices: one qemu-xhci controller with two FT232 serial adapters and
//! two mass storage devices, told apart by their serial strings.
//!
//! - `usb-serial` `R3SERFILE`: what the device transmits lands in a host file, whose
//!   path the guest gets in [`SERIAL_OUT_ENV`] (the guest reads it over 9p, which the lab
//!   mounts without caching, so the growing file is seen as it grows).
//! - `usb-serial` `R3SERECHO`: connected to an [`EchoServer`] on the host, which sends
//!   every byte back.
//! - `usb-storage` `R3RAW`: a fresh 64 MiB sparse raw image.
//! - `usb-storage` `R3FAT`: a 32 MiB image formatted with `mkfs.vfat` before boot, path in
//!   [`FAT_IMAGE_ENV`]; [`check_fat_image`] checks it after the run.
//!
//! No class driver is loaded for them: the guest loads `usb-storage` or `ftdi_sio` itself
//! if a test wants the kernel's drivers.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::host;

/// Guest environment variable: the host file the `R3SERFILE` adapter writes to.
pub const SERIAL_OUT_ENV: &str = "RING3_LAB_USB_SERIAL_OUT";
/// Guest environment variable: the image behind the `R3FAT` mass storage device.
pub const FAT_IMAGE_ENV: &str = "RING3_LAB_USB_FAT_IMAGE";

/// USB serial strings of the lab's devices.
pub const SERIAL_FILE: &str = "R3SERFILE";
/// See [`SERIAL_FILE`].
pub const SERIAL_ECHO: &str = "R3SERECHO";
/// See [`SERIAL_FILE`].
pub const STORAGE_RAW: &str = "R3RAW";
/// See [`SERIAL_FILE`].
pub const STORAGE_FAT: &str = "R3FAT";

/// Size of the `R3RAW` image.
pub const RAW_IMAGE_BYTES: u64 = 64 << 20;
/// Size of the `R3FAT` image.
pub const FAT_IMAGE_BYTES: u64 = 32 << 20;

/// Sizes of the files `RING3/F<N>.BIN` the FUSE lab test leaves on the FAT image.
pub const FAT_TEST_FILE_SIZES: [usize; 8] = [0, 1, 511, 512, 4096, 65537, 262_144, 1_048_579];

/// Byte `i` of the FUSE lab test's file `RING3/F<n>.BIN`.
pub fn fat_test_byte(n: usize, i: usize) -> u8 {
    ((i * 131 + n * 17) % 251) as u8
}

/// Longest path a unix socket address holds (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The files of a run's USB devices, all in the run directory.
#[derive(Debug, Clone)]
pub(crate) struct UsbFiles {
    pub(crate) serial_out: PathBuf,
    pub(crate) echo_socket: PathBuf,
    pub(crate) raw_image: PathBuf,
    pub(crate) fat_image: PathBuf,
}

impl UsbFiles {
    pub(crate) fn in_dir(run_dir: &Path) -> UsbFiles {
        UsbFiles {
            serial_out: run_dir.join("usb-serial-out.bin"),
            echo_socket: run_dir.join("usb-echo.sock"),
            raw_image: run_dir.join("usb-raw.img"),
            fat_image: run_dir.join("usb-fat.img"),
        }
    }

    /// The guest environment that points tests at these files.
    pub(crate) fn guest_env(&self) -> Result<Vec<(String, String)>> {
        Ok(vec![
            (SERIAL_OUT_ENV.to_string(), path_str(&self.serial_out)?),
            (FAT_IMAGE_ENV.to_string(), path_str(&self.fat_image)?),
        ])
    }
}

fn path_str(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_string)
        .with_context(|| format!("the path {} is not UTF-8", path.display()))
}

/// Escapes a value for QEMU's `key=value,...` option syntax.
fn opt(path: &Path) -> Result<String> {
    Ok(path_str(path)?.replace(',', ",,"))
}

/// QEMU arguments for controller `xhci{index}` and its four devices.
pub(crate) fn qemu_args(index: usize, files: &UsbFiles) -> Result<Vec<String>> {
    let bus = format!("xhci{index}.0");
    let mut args = Vec::new();
    let mut arg = |a: &str, b: String| {
        args.push(a.to_string());
        args.push(b);
    };
    arg("-device", format!("qemu-xhci,id=xhci{index},p2=8,p3=8"));
    arg(
        "-chardev",
        format!("file,id=usbserfile{index},path={}", opt(&files.serial_out)?),
    );
    arg(
        "-device",
        format!("usb-serial,bus={bus},chardev=usbserfile{index},serial={SERIAL_FILE}"),
    );
    // A client of the echo server, which is listening before QEMU starts; it connects
    // again (after a second) should the connection drop.
    arg(
        "-chardev",
        format!(
            "socket,id=usbserecho{index},path={},reconnect=1",
            opt(&files.echo_socket)?
        ),
    );
    arg(
        "-device",
        format!("usb-serial,bus={bus},chardev=usbserecho{index},serial={SERIAL_ECHO}"),
    );
    for (id, image, serial) in [
        ("usbraw", &files.raw_image, STORAGE_RAW),
        ("usbfat", &files.fat_image, STORAGE_FAT),
    ] {
        arg(
            "-drive",
            format!("if=none,id={id}{index},format=raw,file={}", opt(image)?),
        );
        arg(
            "-device",
            format!("usb-storage,bus={bus},drive={id}{index},serial={serial}"),
        );
    }
    Ok(args)
}

/// What a run with USB devices holds on the host while the VM runs.
pub(crate) struct UsbLab {
    pub(crate) files: UsbFiles,
    echo: EchoServer,
}

impl UsbLab {
    /// Creates the images (formatting the FAT one) and starts the echo server: all of it
    /// before QEMU starts, which opens the images and connects to the server.
    pub(crate) fn start(run_dir: &Path) -> Result<UsbLab> {
        let files = UsbFiles::in_dir(run_dir);
        super::vm::create_sparse_image(&files.raw_image, RAW_IMAGE_BYTES)?;
        super::vm::create_sparse_image(&files.fat_image, FAT_IMAGE_BYTES)?;
        format_fat(&files.fat_image)?;
        // QEMU creates the file too, but the guest may look before anything was sent.
        fs::File::create(&files.serial_out)
            .with_context(|| format!("could not create {}", files.serial_out.display()))?;
        let echo = EchoServer::start(&files.echo_socket)?;
        Ok(UsbLab { files, echo })
    }

    /// Stops the echo server (the VM is gone) and returns how many bytes it echoed.
    pub(crate) fn stop(self) -> u64 {
        self.echo.stop()
    }
}

fn format_fat(image: &Path) -> Result<()> {
    let mkfs = host::find_program("mkfs.vfat").context(
        "the lab's USB devices need mkfs.vfat; install it with `apt-get install dosfstools`",
    )?;
    host::run_captured(
        Command::new(mkfs).args(["-n", STORAGE_FAT]).arg(image),
        "mkfs.vfat",
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Echo server
// ---------------------------------------------------------------------------

/// How often the server's threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// Bytes moved per read or write.
const CHUNK: usize = 64 << 10;

/// A unix socket server that sends back every byte it receives, one client at a time
/// (QEMU's chardev), accepting a new one when a client goes away, until stopped.
///
/// Receiving never waits for sending: what the client has not taken back yet is queued in
/// memory. QEMU's usb-serial writes to the chardev synchronously, stopping its main loop,
/// so a server that stopped reading while the guest did not read would deadlock it. The
/// guest side keeps the flow control: QEMU reads from the socket only as fast as the
/// guest drains the adapter.
pub(crate) struct EchoServer {
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Binds `path` (replacing a stale socket) and starts serving.
    pub(crate) fn start(path: &Path) -> Result<EchoServer> {
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            bail!(
                "the lab's echo socket path {} is {len} bytes long, more than a unix socket \
                 address holds ({MAX_SOCKET_PATH}); set CARGO_TARGET_DIR to a shorter path",
                path.display()
            );
        }
        let _ = fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .with_context(|| format!("could not listen on {}", path.display()))?;
        listener
            .set_nonblocking(true)
            .context("could not make the echo server's socket non-blocking")?;
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let thread = {
            let stop = Arc::clone(&stop);
            let echoed = Arc::clone(&echoed);
            thread::Builder::new()
                .name("lab-usb-echo".into())
                .spawn(move || serve(&listener, &stop, &echoed))
                .context("could not start the echo server thread")?
        };
        Ok(EchoServer {
            stop,
            echoed,
            thread: Some(thread),
        })
    }

    /// Stops serving and returns the number of bytes echoed.
    pub(crate) fn stop(mut self) -> u64 {
        self.shut_down();
        self.echoed.load(Ordering::SeqCst)
    }

    fn shut_down(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

fn serve(listener: &UnixListener, stop: &AtomicBool, echoed: &AtomicU64) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                // A broken connection ends only that connection.
                let _ = echo_connection(stream, stop, echoed);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// Bytes received and not yet sent back.
#[derive(Default)]
struct Pending {
    data: VecDeque<u8>,
    /// One side of the connection ended.
    closed: bool,
}

type Queue = (Mutex<Pending>, Condvar);

fn echo_connection(stream: UnixStream, stop: &AtomicBool, echoed: &AtomicU64) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(POLL))?;
    let writer = stream.try_clone()?;
    let queue: Queue = (Mutex::new(Pending::default()), Condvar::new());
    thread::scope(|scope| {
        scope.spawn(|| send_back(writer, &queue, stop, echoed));
        receive(stream, &queue, stop);
    });
    Ok(())
}

fn close(queue: &Queue) {
    if let Ok(mut pending) = queue.0.lock() {
        pending.closed = true;
    }
    queue.1.notify_all();
}

fn receive(mut stream: UnixStream, queue: &Queue, stop: &AtomicBool) {
    let mut buf = vec![0u8; CHUNK];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let Ok(mut pending) = queue.0.lock() else {
                    break;
                };
                if pending.closed {
                    break;
                }
                pending.data.extend(&buf[..n]);
                drop(pending);
                queue.1.notify_all();
            }
            Err(err) if is_retry(&err) => {}
            Err(_) => break,
        }
    }
    close(queue);
}

fn send_back(mut stream: UnixStream, queue: &Queue, stop: &AtomicBool, echoed: &AtomicU64) {
    'connection: loop {
        let chunk: Vec<u8> = {
            let Ok(mut pending) = queue.0.lock() else {
                break;
            };
            loop {
                if !pending.data.is_empty() {
                    break;
                }
                if pending.closed || stop.load(Ordering::SeqCst) {
                    break 'connection;
                }
                pending = match queue.1.wait_timeout(pending, POLL) {
                    Ok((pending, _)) => pending,
                    Err(_) => break 'connection,
                };
            }
            let n = pending.data.len().min(CHUNK);
            pending.data.drain(..n).collect()
        };
        let mut sent = 0;
        while sent < chunk.len() {
            if stop.load(Ordering::SeqCst) {
                break 'connection;
            }
            match stream.write(&chunk[sent..]) {
                Ok(0) => break 'connection,
                Ok(n) => {
                    sent += n;
                    echoed.fetch_add(n as u64, Ordering::SeqCst);
                }
                Err(err) if is_retry(&err) => {}
                Err(_) => break 'connection,
            }
        }
    }
    close(queue);
}

fn is_retry(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

// ---------------------------------------------------------------------------
// The FAT image after a run
// ---------------------------------------------------------------------------

/// What [`check_fat_image`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FatCheck {
    /// The file system is clean; the FUSE test left no `RING3/DONE`, so there were no
    /// files to check.
    CleanNoTestFiles,
    /// The file system is clean and the FUSE test's files are all intact.
    CleanTestFilesIntact,
}

/// Runs `fsck.vfat -n` on the image, then checks the FUSE lab test's files if it left
/// its `RING3/DONE` marker.
pub(crate) fn check_fat_image(image: &Path) -> Result<FatCheck> {
    let fsck = host::find_program("fsck.vfat").context(
        "checking the lab's FAT image needs fsck.vfat; install it with `apt-get install dosfstools`",
    )?;
    let output = Command::new(&fsck)
        .arg("-n")
        .arg(image)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("could not start {}", fsck.display()))?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() || report.contains("Dirty bit is set") {
        bail!(
            "fsck.vfat -n found errors on the USB FAT image {} ({}):\n{}",
            image.display(),
            output.status,
            report.trim()
        );
    }
    check_fat_test_files(image)
}

/// Reads and writes an image file without ever writing (the FAT library wants a
/// writable disk, and may try to update flags when it is dropped).
struct ReadOnly(fs::File);

impl Read for ReadOnly {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Seek for ReadOnly {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.0.seek(pos)
    }
}

impl Write for ReadOnly {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the image is only read",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Checks `RING3/F<N>.BIN` on the FAT image against [`FAT_TEST_FILE_SIZES`] and
/// [`fat_test_byte`], if `RING3/DONE` exists.
pub(crate) fn check_fat_test_files(image: &Path) -> Result<FatCheck> {
    let file = fs::File::open(image)
        .with_context(|| format!("could not open the USB FAT image {}", image.display()))?;
    let fs = fatfs::FileSystem::new(ReadOnly(file), fatfs::FsOptions::new())
        .with_context(|| format!("could not read the FAT file system on {}", image.display()))?;
    let root = fs.root_dir();
    let Ok(dir) = root.open_dir("RING3") else {
        return Ok(FatCheck::CleanNoTestFiles);
    };
    if dir.open_file("DONE").is_err() {
        return Ok(FatCheck::CleanNoTestFiles);
    }
    for (n, &size) in FAT_TEST_FILE_SIZES.iter().enumerate() {
        let name = format!("RING3/F{n}.BIN");
        let mut file = dir
            .open_file(&format!("F{n}.BIN"))
            .with_context(|| format!("{name} is missing from the USB FAT image"))?;
        let mut data = Vec::with_capacity(size);
        file.read_to_end(&mut data)
            .with_context(|| format!("could not read {name} from the USB FAT image"))?;
        if data.len() != size {
            bail!(
                "{name} on the USB FAT image has {} bytes, the FUSE test wrote {size}",
                data.len()
            );
        }
        if let Some(i) = (0..size).find(|&i| data[i] != fat_test_byte(n, i)) {
            bail!(
                "{name} on the USB FAT image differs from what the FUSE test wrote at byte {i}: \
                 {:#04x} instead of {:#04x}",
                data[i],
                fat_test_byte(n, i)
            );
        }
    }
    Ok(FatCheck::CleanTestFilesIntact)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fat_image_with_test_files(done: bool) -> tempfile::NamedTempFile {
        let image = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("tempfile: {e}"));
        let file = image.reopen().unwrap_or_else(|e| panic!("reopen: {e}"));
        file.set_len(FAT_IMAGE_BYTES)
            .unwrap_or_else(|e| panic!("set_len: {e}"));
        let mut file = image.reopen().unwrap_or_else(|e| panic!("reopen: {e}"));
        fatfs::format_volume(&mut file, fatfs::FormatVolumeOptions::new())
            .unwrap_or_else(|e| panic!("format: {e}"));
        {
            let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new())
                .unwrap_or_else(|e| panic!("mount: {e}"));
            let dir = fs
                .root_dir()
                .create_dir("RING3")
                .unwrap_or_else(|e| panic!("mkdir: {e}"));
            for (n, &size) in FAT_TEST_FILE_SIZES.iter().enumerate() {
                let data: Vec<u8> = (0..size).map(|i| fat_test_byte(n, i)).collect();
                let mut f = dir
                    .create_file(&format!("F{n}.BIN"))
                    .unwrap_or_else(|e| panic!("create: {e}"));
                f.write_all(&data).unwrap_or_else(|e| panic!("write: {e}"));
            }
            if done {
                dir.create_file("DONE")
                    .unwrap_or_else(|e| panic!("create DONE: {e}"));
            }
            drop(dir);
            fs.unmount().unwrap_or_else(|e| panic!("unmount: {e}"));
        }
        image
    }

    #[test]
    fn intact_files_pass_and_a_changed_byte_fails() {
        let image = fat_image_with_test_files(true);
        assert_eq!(
            check_fat_test_files(image.path()).unwrap_or_else(|e| panic!("{e:#}")),
            FatCheck::CleanTestFilesIntact
        );

        // Change byte 1000 of F7.BIN.
        {
            let mut disk = image.reopen().unwrap_or_else(|e| panic!("reopen: {e}"));
            let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())
                .unwrap_or_else(|e| panic!("mount: {e}"));
            let mut file = fs
                .root_dir()
                .open_file("RING3/F7.BIN")
                .unwrap_or_else(|e| panic!("open: {e}"));
            file.seek(SeekFrom::Start(1000))
                .unwrap_or_else(|e| panic!("seek: {e}"));
            file.write_all(&[fat_test_byte(7, 1000) ^ 0xff])
                .unwrap_or_else(|e| panic!("write: {e}"));
            drop(file);
            fs.unmount().unwrap_or_else(|e| panic!("unmount: {e}"));
        }
        let err = check_fat_test_files(image.path())
            .err()
            .unwrap_or_else(|| panic!("a changed byte passed"));
        let message = format!("{err:#}");
        assert!(message.contains("RING3/F7.BIN"), "{message}");
        assert!(message.contains("at byte 1000"), "{message}");
    }

    #[test]
    fn without_done_marker_nothing_is_checked() {
        let image = fat_image_with_test_files(false);
        assert_eq!(
            check_fat_test_files(image.path()).unwrap_or_else(|e| panic!("{e:#}")),
            FatCheck::CleanNoTestFiles
        );
    }

    #[test]
    fn fsck_passes_a_fresh_image_and_fails_a_dirty_one() {
        if host::find_program("fsck.vfat").is_none() || host::find_program("mkfs.vfat").is_none() {
            eprintln!("skipped: dosfstools is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let image = dir.path().join("fat.img");
        super::super::vm::create_sparse_image(&image, FAT_IMAGE_BYTES)
            .unwrap_or_else(|e| panic!("{e:#}"));
        format_fat(&image).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(
            check_fat_image(&image).unwrap_or_else(|e| panic!("{e:#}")),
            FatCheck::CleanNoTestFiles
        );
        // The dirty flag of a FAT12/16 boot sector: not unmounted cleanly.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap_or_else(|e| panic!("open: {e}"));
        file.seek(SeekFrom::Start(0x25))
            .unwrap_or_else(|e| panic!("seek: {e}"));
        file.write_all(&[1])
            .unwrap_or_else(|e| panic!("write: {e}"));
        drop(file);
        let err = check_fat_image(&image)
            .err()
            .unwrap_or_else(|| panic!("a dirty image passed"));
        assert!(format!("{err:#}").contains("fsck.vfat -n found errors"));
    }

    #[test]
    fn test_pattern() {
        assert_eq!(fat_test_byte(0, 0), 0);
        assert_eq!(fat_test_byte(0, 1), 131);
        assert_eq!(fat_test_byte(1, 0), 17);
        assert_eq!(fat_test_byte(0, 2), (262 % 251) as u8);
    }

    #[test]
    fn usb_qemu_arguments() {
        let files = UsbFiles::in_dir(Path::new("/r/1-0"));
        let args = qemu_args(4, &files).unwrap_or_else(|e| panic!("{e:#}"));
        let pairs: Vec<(&str, &str)> = args
            .chunks(2)
            .map(|p| (p[0].as_str(), p[1].as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("-device", "qemu-xhci,id=xhci4,p2=8,p3=8"),
                (
                    "-chardev",
                    "file,id=usbserfile4,path=/r/1-0/usb-serial-out.bin"
                ),
                (
                    "-device",
                    "usb-serial,bus=xhci4.0,chardev=usbserfile4,serial=R3SERFILE"
                ),
                (
                    "-chardev",
                    "socket,id=usbserecho4,path=/r/1-0/usb-echo.sock,reconnect=1"
                ),
                (
                    "-device",
                    "usb-serial,bus=xhci4.0,chardev=usbserecho4,serial=R3SERECHO"
                ),
                (
                    "-drive",
                    "if=none,id=usbraw4,format=raw,file=/r/1-0/usb-raw.img"
                ),
                (
                    "-device",
                    "usb-storage,bus=xhci4.0,drive=usbraw4,serial=R3RAW"
                ),
                (
                    "-drive",
                    "if=none,id=usbfat4,format=raw,file=/r/1-0/usb-fat.img"
                ),
                (
                    "-device",
                    "usb-storage,bus=xhci4.0,drive=usbfat4,serial=R3FAT"
                ),
            ]
        );
    }

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn connect(path: &Path) -> UnixStream {
        let stream = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap_or_else(|e| panic!("timeout: {e}"));
        stream
    }

    #[test]
    fn echo_server_returns_mebibytes_intact_while_the_client_reads_late() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = dir.path().join("echo.sock");
        let server = EchoServer::start(&path).unwrap_or_else(|e| panic!("{e:#}"));
        let data = pattern(6 << 20, 7);

        // First client: writes everything before reading anything, which needs the
        // server to keep receiving while its replies are not taken.
        let mut stream = connect(&path);
        stream
            .write_all(&data)
            .unwrap_or_else(|e| panic!("write: {e}"));
        let mut back = vec![0u8; data.len()];
        stream
            .read_exact(&mut back)
            .unwrap_or_else(|e| panic!("read: {e}"));
        assert!(back == data, "the echo differs");
        drop(stream);

        // A second client after the first went away, reading and writing at once.
        let stream = connect(&path);
        let mut reader = stream.try_clone().unwrap_or_else(|e| panic!("clone: {e}"));
        let expected = pattern(3 << 20, 9);
        let to_send = expected.clone();
        let writer = thread::spawn(move || {
            let mut stream = stream;
            for chunk in to_send.chunks(1000) {
                stream
                    .write_all(chunk)
                    .unwrap_or_else(|e| panic!("write: {e}"));
            }
            stream
        });
        let mut back = vec![0u8; expected.len()];
        reader
            .read_exact(&mut back)
            .unwrap_or_else(|e| panic!("read: {e}"));
        assert!(back == expected, "the second echo differs");
        drop(writer.join());
        drop(reader);

        assert_eq!(server.stop(), (9 << 20) as u64);
        // Stopped: nobody listens any more.
        assert!(UnixStream::connect(&path).is_err());
    }

    #[test]
    fn echo_server_rejects_overlong_socket_paths() {
        let long = PathBuf::from(format!("/tmp/{}/echo.sock", "d".repeat(120)));
        assert!(EchoServer::start(&long).is_err());
    }
}
