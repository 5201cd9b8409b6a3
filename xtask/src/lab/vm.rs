//! Booting QEMU, handing the guest its job and watching the serial console.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, IsTerminal, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::initramfs::{
    error_marker, exit_marker, HOST_ROOT_TAG, NONCE_PARAM, RUN_PARAM, SHARE_PARAM,
};
use super::usb::{self, UsbFiles, UsbLab};
use super::{host, modules};
use super::{
    shell_quote, LabAssets, LabDevice, LabOptions, LabTimeout, NvmeNamespace,
    NVME_MAX_IO_QUEUE_PAIRS,
};

/// What the guest runs.
#[derive(Debug, Clone)]
pub(crate) enum Job {
    /// A shell command line, run with `sh -c` and stdin from /dev/null.
    Command(String),
    /// An interactive shell on the serial console.
    Shell,
}

/// How long QEMU gets to power off after the guest reported its status.
const POWEROFF_GRACE: Duration = Duration::from_secs(10);

/// How long QEMU gets to exit after SIGTERM before it is killed.
const TERMINATE_GRACE: Duration = Duration::from_secs(3);

/// The first line of a lab shell; input is held back until it appears.
const SHELL_BANNER: &str = "ring3 lab shell; 'exit' powers the VM off";

/// The minimal firmware Debian's QEMU ships; SeaBIOS is used without it.
const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// Boots a VM for `job` and returns the job's exit status.
pub(crate) fn run(
    assets: &LabAssets,
    opts: &LabOptions,
    job: &Job,
    output: Box<dyn Write + Send>,
) -> Result<i32> {
    let run_dir = RunDir::create(&assets.lab_dir)?;
    let script = run_dir.path.join("run.sh");
    check_cmdline_safe(&script)?;
    let nonce = make_nonce();
    let bin_dir = run_dir.path.join("bin");
    write_modprobe_wrapper(assets, &bin_dir)?;
    // The USB devices' images and echo server must exist before QEMU starts.
    let usb_count = opts
        .devices
        .iter()
        .filter(|d| **d == LabDevice::Usb)
        .count();
    if usb_count > 1 {
        bail!(
            "the lab attaches at most one usb controller: tests tell its devices apart by \
             their serial strings, which a second one would repeat"
        );
    }
    let usb_lab = if usb_count == 1 {
        Some(UsbLab::start(&run_dir.path)?)
    } else {
        None
    };
    let mut guest_env = Vec::new();
    if let Some(usb_lab) = &usb_lab {
        guest_env.extend(usb_lab.files.guest_env()?);
    }
    fs::write(
        &script,
        run_script(assets, opts, job, &bin_dir, &nonce, &guest_env)?,
    )
    .with_context(|| format!("could not write {}", script.display()))?;

    let interactive = matches!(job, Job::Shell);
    // A shell whose input is not a terminal (`echo cmd | ... lab shell`) gets
    // its input once it is ready: the guest drops what arrives earlier.
    let stdin_is_terminal = io::stdin().is_terminal();
    let feed_stdin = interactive && !stdin_is_terminal;
    let mut cmd = qemu_command(assets, opts, &run_dir.path, &script, &nonce, interactive)?;
    if opts.verbose {
        eprintln!("lab: {}", describe_command(&cmd));
    }
    let devices = opts
        .devices
        .iter()
        .map(|d| d.name())
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!(
        "lab: booting {} (TCG, {} CPUs, {} MiB; devices: {})",
        assets.kernel_version,
        opts.cpus,
        opts.memory_mib,
        if devices.is_empty() { "none" } else { &devices }
    );

    // SAFETY: the closure runs in the forked child before exec and only
    // makes an async-signal-safe system call.
    unsafe {
        cmd.pre_exec(|| {
            // QEMU must not outlive this process (e.g. when CI kills it).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(if feed_stdin {
            Stdio::piped()
        } else if interactive {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start {}", assets.tools.qemu.display()))?;
    let start = Instant::now();

    let (events, event_rx) = mpsc::channel();
    let stdout = child.stdout.take().context("QEMU has no stdout pipe")?;
    let scanner_events = events.clone();
    let (ready_tx, ready_rx) = mpsc::channel();
    // Dropped when this function returns, which lets the stdin feeder go.
    let (_finished_tx, finished_rx) = mpsc::channel::<()>();
    if feed_stdin {
        let child_stdin = child.stdin.take().context("QEMU has no stdin pipe")?;
        thread::spawn(move || feed_shell_input(child_stdin, &ready_rx, &finished_rx));
    }
    // For a shell, QEMU puts a terminal on stdin into raw mode, which needs
    // the `\r`s; everything else gets plain `\n` line ends.
    let strip_cr = !(interactive && stdin_is_terminal);
    let scanner = thread::spawn(move || {
        let mut scanner = Scanner::new(output, &nonce, strip_cr, scanner_events);
        if feed_stdin {
            scanner.ready = Some(ready_tx);
        }
        scanner.consume(stdout);
        scanner.result
    });
    let mut stderr = child.stderr.take().context("QEMU has no stderr pipe")?;
    let stderr_reader = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    });
    drop(events);

    let deadline = opts.timeout.map(|t| start + t);
    let mut grace_deadline: Option<Instant> = None;
    let mut timed_out = false;
    loop {
        let limit = match (deadline, grace_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let event = match limit {
            Some(limit) => {
                match event_rx.recv_timeout(limit.saturating_duration_since(Instant::now())) {
                    Ok(event) => Some(event),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => Some(Event::Eof),
                }
            }
            None => Some(event_rx.recv().unwrap_or(Event::Eof)),
        };
        match event {
            Some(Event::Done) => grace_deadline = Some(Instant::now() + POWEROFF_GRACE),
            Some(Event::Eof) => break,
            None => {
                // Either the timeout expired or the guest reported its
                // status but did not power off.
                timed_out = grace_deadline.is_none_or(|g| Instant::now() < g);
                terminate(&mut child);
                break;
            }
        }
    }
    let status = child.wait().context("waiting for QEMU")?;
    let scan = scanner
        .join()
        .map_err(|_| anyhow!("the guest output reader panicked"))?;
    let qemu_stderr = stderr_reader.join().unwrap_or_default();
    let fat_image = usb_lab.map(|usb_lab| {
        let image = usb_lab.files.fat_image.clone();
        let echoed = usb_lab.stop();
        if opts.verbose {
            eprintln!("lab: the USB serial echo server sent back {echoed} bytes");
        }
        image
    });

    let code = conclude(
        scan,
        status,
        &qemu_stderr,
        timed_out.then_some(opts.timeout).flatten(),
    )?;
    if let Some(image) = fat_image.filter(|_| opts.check_usb_fat) {
        match usb::check_fat_image(&image) {
            Ok(usb::FatCheck::CleanTestFilesIntact) => {
                eprintln!("lab: the USB FAT image is clean and the FUSE test's files are intact");
            }
            Ok(usb::FatCheck::CleanNoTestFiles) => {
                eprintln!("lab: the USB FAT image is clean (the FUSE test left no RING3/DONE)");
            }
            Err(err) => {
                return Err(err.context(format!(
                    "the USB FAT image failed its check after the run (the guest command \
                     exited with status {code})"
                )));
            }
        }
    }
    drop(run_dir);
    Ok(code)
}

/// Copies this process's stdin to the guest shell once it is ready, then
/// types `exit` (which keeps the last command's status) and keeps the pipe
/// open until the VM is gone, because QEMU spins on a closed stdin.
fn feed_shell_input(
    mut child_stdin: ChildStdin,
    ready: &mpsc::Receiver<()>,
    finished: &mpsc::Receiver<()>,
) {
    if ready.recv().is_err() {
        return;
    }
    let mut stdin = io::stdin().lock();
    let mut buf = [0u8; 4096];
    let mut at_line_start = true;
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if child_stdin.write_all(&buf[..n]).is_err() {
                    return;
                }
                at_line_start = buf[n - 1] == b'\n';
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let end: &[u8] = if at_line_start {
        b"exit\n"
    } else {
        b"\nexit\n"
    };
    let _ = child_stdin.write_all(end);
    let _ = child_stdin.flush();
    let _ = finished.recv();
}

fn conclude(
    scan: ScanResult,
    status: ExitStatus,
    qemu_stderr: &str,
    timed_out: Option<Duration>,
) -> Result<i32> {
    if let Some(message) = scan.error {
        bail!("the lab guest could not run the command: {message}");
    }
    if let Some(code) = scan.exit {
        return Ok(code);
    }
    if let Some(after) = timed_out {
        return Err(LabTimeout { after }.into());
    }
    if let Some(line) = scan.panic {
        bail!("guest kernel panicked: {line}");
    }
    if !status.success() {
        let stderr = qemu_stderr.trim();
        bail!(
            "QEMU aborted ({}); its stderr: {}",
            describe_status(status),
            if stderr.is_empty() { "(empty)" } else { stderr }
        );
    }
    bail!("the guest powered off without reporting an exit status (see its output above)")
}

/// The command line, quoted for a shell.
fn describe_command(cmd: &Command) -> String {
    let mut words = vec![cmd.get_program().to_string_lossy().into_owned()];
    words.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    super::shell_join(&words)
}

fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// Asks QEMU to quit (which restores the terminal), then kills it.
fn terminate(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: sending a signal has no memory-safety preconditions; the
        // child has not been reaped yet, so the pid still names it.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let until = Instant::now() + TERMINATE_GRACE;
        while Instant::now() < until {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = child.kill();
}

// ---------------------------------------------------------------------------
// Per-run directory and script
// ---------------------------------------------------------------------------

/// `<lab>/runs/<pid>-<n>/`, removed when dropped. The guest sees it at the
/// same path, since the host's `/` is the guest's root.
struct RunDir {
    path: PathBuf,
}

static RUN_COUNTER: AtomicUsize = AtomicUsize::new(0);

impl RunDir {
    fn create(lab_dir: &Path) -> Result<RunDir> {
        let runs = lab_dir.join("runs");
        fs::create_dir_all(&runs)
            .with_context(|| format!("could not create {}", runs.display()))?;
        remove_stale_runs(&runs);
        let n = RUN_COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = runs.join(format!("{}-{n}", std::process::id()));
        if path.exists() {
            let _ = fs::remove_dir_all(&path);
        }
        fs::create_dir(&path).with_context(|| format!("could not create {}", path.display()))?;
        Ok(RunDir { path })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Removes run directories of processes that no longer exist.
fn remove_stale_runs(runs: &Path) {
    let Ok(entries) = fs::read_dir(runs) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok());
        if pid.is_some_and(|pid| !host::process_alive(pid)) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The run script's path goes on the kernel command line, which the init
/// splits on whitespace; keep it to characters that survive that.
fn check_cmdline_safe(path: &Path) -> Result<()> {
    let text = path.to_str().unwrap_or("");
    let safe = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+@%,:=~".contains(&b));
    if !safe {
        bail!(
            "the lab's run directory {} has characters the guest kernel command line cannot \
             carry (spaces, quotes, globs or non-ASCII); set CARGO_TARGET_DIR to a plain path",
            path.display()
        );
    }
    Ok(())
}

/// The script the guest's init runs (as `sh run.sh`, chrooted into the
/// host's read-only `/`, with `/tmp`, `/run`, `/var/tmp`, `/dev/pts` and
/// `/dev/shm` already mounted): module loading and environment, then the
/// job. Its exit status is the job's; setup failures print the error marker.
fn run_script(
    assets: &LabAssets,
    opts: &LabOptions,
    job: &Job,
    bin_dir: &Path,
    nonce: &str,
    device_env: &[(String, String)],
) -> Result<String> {
    let workdir = match &opts.workdir {
        Some(dir) => dir.clone(),
        None => std::env::current_dir().context("could not determine the current directory")?,
    };
    let workdir = path_str(&workdir)?;
    let busybox = q(&path_str(&assets.tools.busybox)?);

    let mut s = String::new();
    let _ = writeln!(s, "# Generated by `cargo xtask lab`; runs in the guest.");
    let _ = writeln!(s, "export PATH={}", q(&guest_path(bin_dir)?));
    // Split, so that printing this script does not print the marker.
    let marker = error_marker(nonce);
    let (marker_head, marker_tail) = marker.split_at(marker.len() / 2);
    let _ = writeln!(
        s,
        "fail() {{ echo \"{marker_head}\"\"{marker_tail}$*\"; exit 125; }}"
    );

    // Loaded with the static busybox: kmod's modprobe is slow to start
    // under TCG.
    let mut wanted: Vec<&str> = Vec::new();
    if opts.load_vfio {
        wanted.extend(["vfio-pci", "vfio_iommu_type1"]);
    }
    wanted.extend(opts.extra_modules.iter().map(String::as_str));
    for load in modules::resolve(assets, &wanted)? {
        let mut insmod = format!("{busybox} insmod {}", q(&path_str(&load.path)?));
        for param in &load.params {
            insmod.push(' ');
            insmod.push_str(&q(param));
        }
        let _ = writeln!(
            s,
            "[ -d /sys/module/{name} ] || {insmod} || fail {}",
            q(&format!(
                "could not load the guest kernel module {}",
                load.name
            )),
            name = load.name,
        );
    }

    let _ = writeln!(s, "export HOME=/tmp RING3_LAB=1");
    let mut env: Vec<(String, String)> = ["RUST_LOG", "RUST_BACKTRACE"]
        .iter()
        .filter_map(|name| Some((name.to_string(), std::env::var(name).ok()?)))
        .collect();
    if matches!(job, Job::Shell) {
        // Input from a pipe: no escape sequences in the transcript.
        let term = if io::stdin().is_terminal() {
            std::env::var("TERM").unwrap_or_else(|_| "vt100".to_string())
        } else {
            "dumb".to_string()
        };
        env.push(("TERM".to_string(), term));
    }
    env.extend(device_env.iter().cloned());
    env.extend(opts.env.iter().cloned());
    for (name, value) in &env {
        let _ = writeln!(s, "export {name}={}", q(value));
    }

    let _ = writeln!(
        s,
        "cd {} 2>/dev/null || fail {}",
        q(&workdir),
        q(&format!("could not change to {workdir} in the guest"))
    );

    match job {
        Job::Command(command) => {
            let _ = writeln!(s, "/bin/sh -c {} </dev/null", q(command));
        }
        Job::Shell => {
            if let Some((rows, cols)) = terminal_size() {
                let _ = writeln!(
                    s,
                    "{busybox} stty -F /dev/ttyS0 rows {rows} cols {cols} 2>/dev/null"
                );
            }
            let _ = writeln!(s, "shell=/bin/sh");
            let _ = writeln!(s, "[ -x /bin/bash ] && shell=/bin/bash");
            let _ = writeln!(s, "echo {}", q(SHELL_BANNER));
            // The serial port as the shell's controlling terminal, so job
            // control and Ctrl-C work.
            let _ = writeln!(s, "setsid -c -w \"$shell\" -i <>/dev/ttyS0 >&0 2>&1");
        }
    }
    Ok(s)
}

/// The guest's `PATH`: the run's helper scripts, then the host's `PATH`,
/// then the standard directories it lacks.
fn guest_path(bin_dir: &Path) -> Result<String> {
    let mut dirs = vec![path_str(bin_dir)?];
    let host = std::env::var("PATH").unwrap_or_default();
    let standard = [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ];
    for dir in host.split(':').chain(standard) {
        if !dir.is_empty() && !dirs.iter().any(|d| d == dir) {
            dirs.push(dir.to_string());
        }
    }
    Ok(dirs.join(":"))
}

/// Writes `<bin_dir>/modprobe`, which runs the host's modprobe on the guest
/// kernel's modules (the host's `/lib/modules` is for the host kernel).
fn write_modprobe_wrapper(assets: &LabAssets, bin_dir: &Path) -> Result<()> {
    fs::create_dir_all(bin_dir)
        .with_context(|| format!("could not create {}", bin_dir.display()))?;
    let wrapper = bin_dir.join("modprobe");
    let text = format!(
        "#!/bin/sh\nexec {} -d {} -S {} \"$@\"\n",
        q(&path_str(&assets.tools.modprobe)?),
        q(&path_str(&assets.kernel_tree)?),
        q(&assets.kernel_version),
    );
    fs::write(&wrapper, text).with_context(|| format!("could not write {}", wrapper.display()))?;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("could not make {} executable", wrapper.display()))?;
    Ok(())
}

fn q(word: &str) -> String {
    shell_quote(word)
}

/// Host directories the guest must see although they lie under its own tmpfs `/tmp`,
/// `/run` or `/var/tmp`: the workspace, the target directory and the working directory.
fn shared_dirs(opts: &LabOptions) -> Result<Vec<String>> {
    let workdir = match &opts.workdir {
        Some(dir) => dir.clone(),
        None => std::env::current_dir().context("could not determine the current directory")?,
    };
    let mut shared = Vec::new();
    for dir in [
        crate::lab::workspace_root(),
        crate::lab::target_dir(),
        workdir,
    ] {
        let dir = path_str(&dir)?;
        let private = ["/tmp/", "/run/", "/var/tmp/"]
            .iter()
            .any(|prefix| dir.starts_with(prefix));
        if !private || shared.iter().any(|s: &String| dir.starts_with(s.as_str())) {
            continue;
        }
        if dir.contains(',') || dir.chars().any(char::is_whitespace) {
            bail!(
                "{dir} contains a comma or white space, so the lab cannot share it with the \
                 guest; move the workspace"
            );
        }
        shared.push(dir);
    }
    Ok(shared)
}

fn path_str(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_string)
        .with_context(|| format!("the path {} is not UTF-8", path.display()))
}

/// Rows and columns of the terminal on stdin, if it is one.
fn terminal_size() -> Option<(u16, u16)> {
    // SAFETY: winsize is plain old data; all-zero is a valid value.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize through the pointer, which points
    // to a live, correctly typed value; a non-terminal fd just fails.
    let rc = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}

// ---------------------------------------------------------------------------
// QEMU command line
// ---------------------------------------------------------------------------

/// A random hex string (falls back to a clock-derived one).
fn make_nonce() -> String {
    let mut bytes = [0u8; 8];
    let random = fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let mixed = nanos ^ (u128::from(std::process::id()) << 64);
        bytes.copy_from_slice(&mixed.to_le_bytes()[..8]);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Escapes a value for QEMU's `key=value,...` option syntax.
fn qemu_opt_value(value: &str) -> String {
    value.replace(',', ",,")
}

fn qemu_command(
    assets: &LabAssets,
    opts: &LabOptions,
    run_dir: &Path,
    script: &Path,
    nonce: &str,
    interactive: bool,
) -> Result<Command> {
    let mut cmd = Command::new(&assets.tools.qemu);
    cmd.args(["-machine", "q35,accel=tcg", "-cpu", "max"])
        .args(["-smp", &opts.cpus.to_string()])
        .args(["-m", &format!("{}M", opts.memory_mib)])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
    if Path::new(QBOOT).is_file() {
        // qboot boots a -kernel about half a second faster than SeaBIOS
        // under TCG.
        cmd.arg("-bios").arg(QBOOT);
    }
    if interactive {
        // The monitor is multiplexed in: Ctrl-A x quits, Ctrl-A c switches.
        cmd.args(["-serial", "mon:stdio"]);
    } else {
        // Output only: a stdio chardev whose stdin is at EOF makes QEMU's
        // main loop spin, which stalls the serial port and slows the guest.
        cmd.args(["-chardev", "file,id=console,path=/dev/stdout"])
            .args(["-serial", "chardev:console"]);
    }
    // The IOMMU must come before the devices it translates for.
    cmd.args(["-device", "intel-iommu,intremap=on,caching-mode=on"]);
    cmd.args(device_args(&opts.devices, &opts.nvme_namespaces, run_dir)?);

    let mut append = format!(
        "console=ttyS0 intel_iommu=on no_timer_check panic=-1 quiet {RUN_PARAM}{} {NONCE_PARAM}{nonce}",
        path_str(script)?
    );
    let shared = shared_dirs(opts)?;
    if !shared.is_empty() {
        append.push_str(&format!(" {SHARE_PARAM}{}", shared.join(",")));
    }
    cmd.arg("-kernel")
        .arg(&assets.vmlinuz)
        .arg("-initrd")
        .arg(&assets.initramfs)
        .args(["-append", &append]);
    cmd.args([
        "-virtfs",
        &format!(
            "local,path=/,mount_tag={HOST_ROOT_TAG},security_model=none,readonly=on,multidevs=remap"
        ),
    ]);
    cmd.args(&opts.qemu_args);
    Ok(cmd)
}

fn device_args(
    devices: &[LabDevice],
    nvme_namespaces: &[NvmeNamespace],
    run_dir: &Path,
) -> Result<Vec<String>> {
    let mut args = Vec::new();
    let mut arg = |a: &str, b: String| {
        args.push(a.to_string());
        args.push(b);
    };
    for (i, device) in devices.iter().enumerate() {
        match device {
            LabDevice::Edu => arg("-device", "edu".to_string()),
            LabDevice::Nvme => {
                check_nvme_namespaces(nvme_namespaces)?;
                arg(
                    "-device",
                    format!(
                        "nvme,id=nvme{i},serial=ring3nvme{i},max_ioqpairs={NVME_MAX_IO_QUEUE_PAIRS}"
                    ),
                );
                for (n, namespace) in nvme_namespaces.iter().enumerate() {
                    let nsid = n + 1;
                    let image = run_dir.join(format!("nvme{i}n{nsid}.img"));
                    create_sparse_image(&image, namespace.bytes)?;
                    arg(
                        "-drive",
                        format!(
                            // discard=unmap: deallocated blocks become holes in
                            // the image and read back as zeroes, as the namespace's
                            // DLFEAT promises (QEMU ignores discards by default).
                            "file={},if=none,id=nvme{i}n{nsid},format=raw,discard=unmap",
                            qemu_opt_value(&path_str(&image)?)
                        ),
                    );
                    arg(
                        "-device",
                        format!(
                            "nvme-ns,drive=nvme{i}n{nsid},bus=nvme{i},nsid={nsid},\
                             logical_block_size={size},physical_block_size={size}",
                            size = namespace.block_size
                        ),
                    );
                }
            }
            LabDevice::VirtioNet => {
                arg("-netdev", format!("hubport,id=net{i},hubid=0"));
                arg(
                    "-device",
                    format!(
                        "virtio-net-pci,netdev=net{i},disable-legacy=on,iommu_platform=on,romfile="
                    ),
                );
            }
            LabDevice::E1000e => {
                arg("-netdev", format!("hubport,id=net{i},hubid=0"));
                arg("-device", format!("e1000e,netdev=net{i},romfile="));
            }
            LabDevice::Usb => {
                for pair in usb::qemu_args(i, &UsbFiles::in_dir(run_dir))?.chunks(2) {
                    if let [a, b] = pair {
                        arg(a, b.clone());
                    }
                }
            }
        }
    }
    Ok(args)
}

/// A fresh sparse image per run keeps runs independent (and concurrent runs
/// free of QEMU's image locks).
pub(super) fn create_sparse_image(image: &Path, bytes: u64) -> Result<()> {
    let file =
        fs::File::create(image).with_context(|| format!("could not create {}", image.display()))?;
    file.set_len(bytes)
        .with_context(|| format!("could not size {}", image.display()))?;
    file.set_permissions(fs::Permissions::from_mode(0o644))
        .with_context(|| format!("could not set permissions on {}", image.display()))?;
    Ok(())
}

/// QEMU's own checks come late and read poorly; these name the namespace.
fn check_nvme_namespaces(namespaces: &[NvmeNamespace]) -> Result<()> {
    if namespaces.is_empty() {
        bail!("an NVMe controller in the lab needs at least one namespace");
    }
    for (n, namespace) in namespaces.iter().enumerate() {
        let nsid = n + 1;
        let block = namespace.block_size;
        if !block.is_power_of_two() || !(512..=(2 << 20)).contains(&block) {
            bail!(
                "NVMe namespace {nsid}: block size {block} is not a power of two from 512 B to 2 MiB"
            );
        }
        if namespace.bytes == 0 || namespace.bytes % u64::from(block) != 0 {
            bail!(
                "NVMe namespace {nsid}: size {} bytes is not a positive multiple of its {block}-byte blocks",
                namespace.bytes
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Serial console scanning
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// The guest reported its exit status or an error.
    Done,
    /// QEMU closed its stdout (it exited).
    Eof,
}

#[derive(Debug, Default)]
struct ScanResult {
    exit: Option<i32>,
    error: Option<String>,
    panic: Option<String>,
}

/// Forwards the guest console to `sink` as it arrives, minus the marker
/// lines, and picks out the markers and kernel panics.
struct Scanner {
    sink: Box<dyn Write + Send>,
    /// Turn the serial line's `\r\n` into `\n` (not for interactive use,
    /// where QEMU puts the terminal in raw mode).
    strip_cr: bool,
    events: mpsc::Sender<Event>,
    exit_marker: Vec<u8>,
    error_marker: Vec<u8>,
    line: Vec<u8>,
    /// Told when the shell banner appears.
    ready: Option<mpsc::Sender<()>>,
    /// How much of `line` has been written to `sink`.
    forwarded: usize,
    done: bool,
    result: ScanResult,
}

impl Scanner {
    fn new(
        sink: Box<dyn Write + Send>,
        nonce: &str,
        strip_cr: bool,
        events: mpsc::Sender<Event>,
    ) -> Self {
        Scanner {
            sink,
            strip_cr,
            events,
            exit_marker: exit_marker(nonce).into_bytes(),
            error_marker: error_marker(nonce).into_bytes(),
            ready: None,
            line: Vec::new(),
            forwarded: 0,
            done: false,
            result: ScanResult::default(),
        }
    }

    fn consume(&mut self, mut input: impl Read) {
        let mut buf = [0u8; 8192];
        loop {
            match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.feed(&buf[..n]),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if !self.done && !self.line.is_empty() {
            self.end_line();
        }
        let _ = self.sink.flush();
        let _ = self.events.send(Event::Eof);
    }

    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.done {
                return;
            }
            self.line.push(b);
            if b == b'\n' {
                self.end_line();
            }
        }
        self.forward_partial();
    }

    fn write(&mut self, bytes: &[u8]) {
        // A closed stdout (`| head`) must not stop the scanning.
        let _ = self.sink.write_all(bytes);
    }

    /// Forwards the unfinished line, holding back anything that may turn
    /// out to be the start of a marker (or a `\r` before a `\n`).
    fn forward_partial(&mut self) {
        let hold = self.marker_start(&self.line).unwrap_or_else(|| {
            let mut keep = self.line.len() - self.longest_marker_prefix_suffix(&self.line);
            if self.strip_cr && keep > 0 && self.line[keep - 1] == b'\r' {
                keep -= 1;
            }
            keep
        });
        if hold > self.forwarded {
            let chunk = self.line[self.forwarded..hold].to_vec();
            self.write(&chunk);
            self.forwarded = hold;
        }
        let _ = self.sink.flush();
    }

    /// Where a marker starts in `line`, if it contains one.
    fn marker_start(&self, line: &[u8]) -> Option<usize> {
        [&self.exit_marker, &self.error_marker]
            .iter()
            .filter_map(|marker| {
                line.windows(marker.len())
                    .position(|w| w == marker.as_slice())
            })
            .min()
    }

    /// The length of the longest suffix of `line` that is a proper prefix
    /// of a marker (so it may become one with more input).
    fn longest_marker_prefix_suffix(&self, line: &[u8]) -> usize {
        [&self.exit_marker, &self.error_marker]
            .iter()
            .map(|marker| {
                (1..marker.len().min(line.len() + 1))
                    .rev()
                    .find(|&n| line.ends_with(&marker[..n]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        let forwarded = std::mem::replace(&mut self.forwarded, 0);
        let mut content: &[u8] = &line;
        if let Some(rest) = content.strip_suffix(b"\n") {
            content = rest;
        }
        if let Some(rest) = content.strip_suffix(b"\r") {
            content = rest;
        }
        let text = String::from_utf8_lossy(content);

        if let Some(start) = self.marker_start(content) {
            let marker = &content[start..];
            let parsed = if let Some(code) = marker.strip_prefix(self.exit_marker.as_slice()) {
                String::from_utf8_lossy(code)
                    .trim()
                    .parse::<i32>()
                    .ok()
                    .map(|code| (Some(code), None))
            } else {
                marker
                    .strip_prefix(self.error_marker.as_slice())
                    .map(|message| {
                        (
                            None,
                            Some(String::from_utf8_lossy(message).trim().to_string()),
                        )
                    })
            };
            if let Some((exit, error)) = parsed {
                if start > forwarded {
                    let before = content[forwarded..start].to_vec();
                    self.write(&before);
                }
                if start > 0 {
                    self.write(b"\n");
                }
                let _ = self.sink.flush();
                self.result.exit = exit;
                self.result.error = error;
                self.done = true;
                let _ = self.events.send(Event::Done);
                return;
            }
        }

        if self.strip_cr {
            if content.len() > forwarded {
                let rest = content[forwarded..].to_vec();
                self.write(&rest);
            }
            self.write(b"\n");
        } else if line.len() > forwarded {
            self.write(&line[forwarded..]);
        }

        if text.contains(SHELL_BANNER) {
            if let Some(ready) = self.ready.take() {
                let _ = ready.send(());
            }
        }
        if self.result.panic.is_none() && text.contains("Kernel panic") {
            self.result.panic = Some(text.trim().to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn scan(chunks: &[&[u8]], strip_cr: bool) -> (String, ScanResult) {
        let out = Shared::default();
        let (tx, _rx) = mpsc::channel();
        let mut scanner = Scanner::new(Box::new(out.clone()), "n0", strip_cr, tx);
        for chunk in chunks {
            scanner.feed(chunk);
        }
        let text = String::from_utf8(out.0.lock().map(|v| v.clone()).unwrap_or_default())
            .unwrap_or_default();
        (text, scanner.result)
    }

    #[test]
    fn exit_marker_is_hidden_and_parsed() {
        let (out, res) = scan(
            &[
                b"hello\r\nwor",
                b"ld\r\nRING3-LAB-n0",
                b"-EXIT=3\r\nafter\r\n",
            ],
            true,
        );
        assert_eq!(out, "hello\nworld\n");
        assert_eq!(res.exit, Some(3));
        assert_eq!(res.error, None);
    }

    #[test]
    fn marker_after_partial_line() {
        let (out, res) = scan(&[b"no newline", b"RING3-LAB-n0-EXIT=0\r\n"], true);
        assert_eq!(out, "no newline\n");
        assert_eq!(res.exit, Some(0));
    }

    #[test]
    fn partial_output_is_forwarded_early() {
        let out = Shared::default();
        let (tx, _rx) = mpsc::channel();
        let mut scanner = Scanner::new(Box::new(out.clone()), "n0", true, tx);
        scanner.feed(b"prompt> RING");
        let so_far = out.0.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(so_far, b"prompt> ");
        scanner.feed(b"S\r");
        let so_far = out.0.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(so_far, b"prompt> RINGS");
    }

    #[test]
    fn error_marker_and_panic() {
        let (_, res) = scan(&[b"RING3-LAB-n0-ERROR=could not mount\r\n"], true);
        assert_eq!(res.error.as_deref(), Some("could not mount"));
        let (out, res) = scan(
            &[b"[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root\r\n"],
            true,
        );
        assert!(out.contains("Kernel panic"));
        assert_eq!(
            res.panic.as_deref(),
            Some("[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root")
        );
        assert_eq!(res.exit, None);
    }

    #[test]
    fn raw_mode_keeps_carriage_returns() {
        let (out, _) = scan(&[b"a\r\nb\r", b"\n"], false);
        assert_eq!(out, "a\r\nb\r\n");
    }

    #[test]
    fn marker_prefix_suffix() {
        let (tx, _rx) = mpsc::channel();
        let scanner = Scanner::new(Box::new(io::sink()), "n0", true, tx);
        assert_eq!(scanner.longest_marker_prefix_suffix(b"abc"), 0);
        assert_eq!(scanner.longest_marker_prefix_suffix(b"xR"), 1);
        assert_eq!(scanner.longest_marker_prefix_suffix(b"xRING3-LAB-n0-E"), 14);
        assert_eq!(scanner.marker_start(b"abRING3-LAB-n0-EXIT=1"), Some(2));
        assert_eq!(scanner.marker_start(b"abRING3-LAB-n1-EXIT=1"), None);
    }

    #[test]
    fn other_nonces_are_ordinary_output() {
        let (out, res) = scan(&[b"RING3-LAB-zz-EXIT=4\r\n"], true);
        assert_eq!(out, "RING3-LAB-zz-EXIT=4\n");
        assert_eq!(res.exit, None);
    }

    #[test]
    fn cmdline_paths() {
        assert!(
            check_cmdline_safe(Path::new("/home/dev/ring3/target/lab/runs/1-0/run.sh")).is_ok()
        );
        assert!(check_cmdline_safe(Path::new("/my work/run.sh")).is_err());
        assert!(check_cmdline_safe(Path::new("/a*/run.sh")).is_err());
    }

    #[test]
    fn nvme_controller_with_two_namespaces() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let args = device_args(
            &[LabDevice::Edu, LabDevice::Nvme],
            &NvmeNamespace::default_layout(),
            dir.path(),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        let devices: Vec<&str> = args
            .chunks(2)
            .filter(|pair| pair[0] == "-device")
            .map(|pair| pair[1].as_str())
            .collect();
        assert_eq!(
            devices,
            [
                "edu",
                "nvme,id=nvme1,serial=ring3nvme1,max_ioqpairs=8",
                "nvme-ns,drive=nvme1n1,bus=nvme1,nsid=1,logical_block_size=512,physical_block_size=512",
                "nvme-ns,drive=nvme1n2,bus=nvme1,nsid=2,logical_block_size=4096,physical_block_size=4096",
            ]
        );
        for nsid in [1, 2] {
            let image = dir.path().join(format!("nvme1n{nsid}.img"));
            let len = fs::metadata(&image).map(|m| m.len()).unwrap_or(0);
            assert_eq!(len, crate::lab::DEFAULT_NVME_NAMESPACE_BYTES);
        }
    }

    #[test]
    fn nvme_namespace_checks() {
        let ns = |bytes, block_size| NvmeNamespace { bytes, block_size };
        assert!(check_nvme_namespaces(&[ns(1 << 30, 4096)]).is_ok());
        assert!(check_nvme_namespaces(&[]).is_err());
        assert!(check_nvme_namespaces(&[ns(1 << 20, 1000)]).is_err());
        assert!(check_nvme_namespaces(&[ns(1 << 20, 256)]).is_err());
        assert!(check_nvme_namespaces(&[ns(4096 + 512, 4096)]).is_err());
        assert!(check_nvme_namespaces(&[ns(0, 512)]).is_err());
    }

    #[test]
    fn qemu_option_escaping() {
        assert_eq!(qemu_opt_value("/a,b/c"), "/a,,b/c");
    }
}
