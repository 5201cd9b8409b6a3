//! Lab test of `ring3 mount-fat`: a FAT image file served through FUSE inside the lab VM
//! (which loads the fuse module), checked with fsck.vfat afterwards.
//!
//! Outside the VM it is ignored; run by hand elsewhere it fails at once, saying where it
//! belongs. Run it with `cargo xtask test --lab-only --lab-filter lab_fat`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

fn in_lab() {
    assert_eq!(
        std::env::var("RING3_LAB").as_deref(),
        Ok("1"),
        "lab tests run inside the lab VM: use `cargo xtask test`"
    );
}

fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    eprintln!(
        "$ {program} {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn ring3(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_ring3"), args)
}

/// Deterministic bytes that differ at every offset and between seeds.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8 ^ (i >> 16) as u8)
        .collect()
}

fn mounted(mountpoint: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/mounts").expect("reading /proc/mounts");
    let wanted = mountpoint.to_string_lossy();
    mounts
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some(wanted.as_ref()))
}

/// A running `ring3 mount-fat`, with its output in a file.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    fn start(image: &Path, mountpoint: &Path, extra: &[&str], log: &Path) -> Server {
        let out = fs::File::create(log).expect("creating the log");
        let err = out.try_clone().expect("cloning the log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_ring3"))
            .arg("mount-fat")
            .arg(image)
            .arg(mountpoint)
            .args(extra)
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("starting ring3 mount-fat");
        let deadline = Instant::now() + Duration::from_secs(60);
        // Mounted, and the command has said so (it prints once the mount is up).
        while !mounted(mountpoint) || !read_log(log).contains("mounted") {
            if let Some(status) = child.try_wait().expect("polling ring3") {
                panic!(
                    "ring3 mount-fat exited ({status}) before mounting:\n{}",
                    read_log(log)
                );
            }
            assert!(
                Instant::now() < deadline,
                "no mount after 60 s:\n{}",
                read_log(log)
            );
            sleep(Duration::from_millis(100));
        }
        Server {
            child,
            log: log.to_path_buf(),
        }
    }

    /// Waits for the command to exit (after an unmount) and returns its log.
    fn wait(mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait().expect("polling ring3") {
                let log = read_log(&self.log);
                assert!(
                    status.success(),
                    "ring3 mount-fat exited with {status}:\n{log}"
                );
                return log;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "ring3 mount-fat still runs 120 s after the unmount:\n{}",
                    read_log(&self.log)
                );
            }
            sleep(Duration::from_millis(100));
        }
    }
}

fn read_log(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

fn fsck_clean(image: &Path) {
    let output = run("fsck.vfat", &["-n", &image.to_string_lossy()]);
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "fsck.vfat -n failed:\n{report}");
    assert!(
        !report.contains("Dirty bit"),
        "the volume was left dirty:\n{report}"
    );
}

const SIZES: [usize; 8] = [0, 1, 511, 4096, 65_537, 1 << 20, (2 << 20) + 3, 3 << 20];

fn exercise(bits: &str, image_mib: u64) {
    let work = PathBuf::from(format!("/tmp/ring3-lab-fat{bits}"));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(work.join("mnt")).expect("creating the mount point");
    fs::create_dir_all(work.join("src")).expect("creating the source directory");
    let image = work.join("img");
    let mountpoint = work.join("mnt");
    let source = work.join("src");
    fs::File::create(&image)
        .and_then(|f| f.set_len(image_mib << 20))
        .expect("creating the image");
    let made = run(
        "mkfs.vfat",
        &["-F", bits, "-n", "RING3LAB", &image.to_string_lossy()],
    );
    assert!(made.status.success(), "mkfs.vfat failed");

    // Mount, copy files in with cp, read them back.
    let server = Server::start(&image, &mountpoint, &[], &work.join("log1"));
    let log = read_log(&work.join("log1"));
    assert!(
        log.contains(&format!("FAT{bits}")) && log.contains("mounted"),
        "{log}"
    );
    for (i, size) in SIZES.iter().enumerate() {
        fs::write(source.join(format!("file{i}.bin")), pattern(*size, i as u8)).expect("source");
    }
    let copied = run(
        "sh",
        &[
            "-c",
            &format!("cp {}/*.bin {}/", source.display(), mountpoint.display()),
        ],
    );
    assert!(copied.status.success(), "cp into the mount failed");
    for (i, size) in SIZES.iter().enumerate() {
        let back = fs::read(mountpoint.join(format!("file{i}.bin"))).expect("reading back");
        assert!(
            back == pattern(*size, i as u8),
            "file{i}.bin ({size} bytes) differs"
        );
    }
    // Directories, renames, deletes, a long name, an overwrite in place.
    fs::create_dir_all(mountpoint.join("Some Directory/nested")).expect("mkdir -p");
    fs::rename(
        mountpoint.join("file5.bin"),
        mountpoint.join("Some Directory/nested/moved file.bin"),
    )
    .expect("rename across directories");
    fs::rename(
        mountpoint.join("Some Directory"),
        mountpoint.join("renamed dir"),
    )
    .expect("rename dir");
    fs::remove_file(mountpoint.join("file3.bin")).expect("rm");
    fs::write(mountpoint.join("file1.bin"), b"replaced").expect("overwrite");
    assert_eq!(
        fs::remove_dir(mountpoint.join("renamed dir"))
            .expect_err("rmdir of a non-empty dir")
            .raw_os_error(),
        Some(libc_enotempty())
    );
    let listing = run("ls", &["-la", &mountpoint.to_string_lossy()]);
    assert!(listing.status.success());
    let copied_out = run(
        "sh",
        &[
            "-c",
            &format!(
                "cp -r '{}/renamed dir' {}/out",
                mountpoint.display(),
                work.display()
            ),
        ],
    );
    assert!(copied_out.status.success(), "cp out of the mount failed");
    assert!(
        fs::read(work.join("out/nested/moved file.bin")).expect("copied out")
            == pattern(SIZES[5], 5),
        "the moved file differs after copying it out"
    );
    let df = run("df", &[&mountpoint.to_string_lossy()]);
    assert!(df.status.success(), "statfs failed");

    let unmounted = run("umount", &[&mountpoint.to_string_lossy()]);
    assert!(unmounted.status.success(), "umount failed");
    let log = server.wait();
    assert!(log.contains("unmounted"), "{log}");
    assert!(!mounted(&mountpoint));
    fsck_clean(&image);

    // Mount again, read-only: everything is still there; stop it with SIGTERM.
    let server = Server::start(&image, &mountpoint, &["--read-only"], &work.join("log2"));
    let expect = |path: &str, data: &[u8]| {
        let back = fs::read(mountpoint.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(back == data, "{path} differs after re-mounting");
    };
    expect("file0.bin", &[]);
    expect("file1.bin", b"replaced");
    expect("file7.bin", &pattern(SIZES[7], 7));
    expect("renamed dir/nested/moved file.bin", &pattern(SIZES[5], 5));
    assert!(!mountpoint.join("file3.bin").exists());
    assert!(!mountpoint.join("Some Directory").exists());
    let refused = fs::write(mountpoint.join("new"), b"x").expect_err("writing a read-only mount");
    assert_eq!(refused.raw_os_error(), Some(30), "not EROFS: {refused}");
    let killed = run("kill", &["-TERM", &server.child.id().to_string()]);
    assert!(killed.status.success());
    server.wait();
    assert!(!mounted(&mountpoint), "SIGTERM did not unmount");
    fsck_clean(&image);

    // Clear errors.
    let not_fat = work.join("zeros");
    fs::write(&not_fat, vec![0u8; 1 << 20]).expect("zeros");
    let output = ring3(&[
        "mount-fat",
        &not_fat.to_string_lossy(),
        &mountpoint.to_string_lossy(),
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("does not hold a FAT file system"));
    let output = ring3(&["mount-fat", &image.to_string_lossy(), "/tmp/no/such/dir"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a directory"));
    let output = ring3(&[
        "mount-fat",
        "/tmp/no-such-image",
        &mountpoint.to_string_lossy(),
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("does not exist"));

    let _ = fs::remove_dir_all(&work);
}

fn libc_enotempty() -> i32 {
    39
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_fat_mount_image_file() {
    in_lab();
    exercise("32", 64);
    exercise("16", 32);
    exercise("12", 8);
}
