//! The busybox initramfs: loads the 9p modules, mounts the host's `/`
//! read-only as the new root and runs the per-run script named by
//! `ring3.run=` on the kernel command line.
//!
//! Nothing run-specific is baked in, so one initramfs per kernel version is
//! cached; it is rebuilt whenever the init script or busybox changes.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use super::host::Tools;
use super::kernel::Kernel;
use super::progress::Progress;

/// Modules (relative to `lib/modules/<version>/kernel/`) loaded in this
/// order to mount the host's file system over virtio-9p.
const MODULES: [&str; 4] = [
    "fs/netfs/netfs",
    "net/9p/9pnet",
    "net/9p/9pnet_virtio",
    "fs/9p/9p",
];

/// The 9p mount tag the host's `/` is exported under (see `vm.rs`).
pub(crate) const HOST_ROOT_TAG: &str = "hostroot";

/// The kernel command line parameter naming the run script.
pub(crate) const RUN_PARAM: &str = "ring3.run=";

/// The kernel command line parameter carrying the run's nonce, which makes
/// the markers below unguessable for guest output.
pub(crate) const NONCE_PARAM: &str = "ring3.nonce=";

/// The kernel command line parameter listing host directories (comma-separated) that lie
/// under the guest's own `/tmp`, `/run` or `/var/tmp` and must still be visible there
/// (a workspace cloned under `/tmp`, for example).
pub(crate) const SHARE_PARAM: &str = "ring3.share=";

/// The guest reports on the serial console with lines
/// `RING3-LAB-<nonce>-EXIT=<status>` or `RING3-LAB-<nonce>-ERROR=<message>`.
pub(crate) fn exit_marker(nonce: &str) -> String {
    format!("RING3-LAB-{nonce}-EXIT=")
}

pub(crate) fn error_marker(nonce: &str) -> String {
    format!("RING3-LAB-{nonce}-ERROR=")
}

fn init_script() -> String {
    // The markers are assembled at run time from the nonce, so this script
    // never contains one.
    format!(
        r#"#!/bin/busybox sh
# Lab init: mount the host's / read-only over virtio-9p and run the script
# named by {RUN_PARAM} on the kernel command line inside it.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
run=
nonce=
share=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        {RUN_PARAM}*) run="${{arg#{RUN_PARAM}}}" ;;
        {NONCE_PARAM}*) nonce="${{arg#{NONCE_PARAM}}}" ;;
        {SHARE_PARAM}*) share="${{arg#{SHARE_PARAM}}}" ;;
    esac
done
fail() {{ echo "RING3-LAB-$nonce-ERROR=$*"; poweroff -f; }}
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in netfs 9pnet 9pnet_virtio 9p; do
    insmod /mod/$m.ko || echo "lab init: insmod $m failed"
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 {HOST_ROOT_TAG} /newroot \
    || fail "could not mount the host file system over virtio-9p"
# A second view of the host's tree, not covered by the tmpfs mounts below.
mkdir -p /hostview
mount --bind /newroot /hostview
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mount -t tmpfs tmp /newroot/tmp
mount -t tmpfs run /newroot/run
mount -t tmpfs vartmp /newroot/var/tmp
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /newroot/dev/pts
mount -t tmpfs shm /newroot/dev/shm
for dir in $(echo "$share" | tr ',' ' '); do
    case "$dir" in
        /tmp/*|/run/*|/var/tmp/*)
            mkdir -p "/newroot$dir" && mount --bind "/hostview$dir" "/newroot$dir" \
                || fail "could not share the host's $dir with the guest" ;;
    esac
done
hostname ring3-lab
[ -n "$run" ] || fail "no {RUN_PARAM} on the kernel command line"
[ -f "/newroot$run" ] || fail "the run script $run is not visible in the guest"
chroot /newroot /bin/sh "$run"
echo "RING3-LAB-$nonce-EXIT=$?"
poweroff -f
"#
    )
}

/// Makes sure the initramfs for `kernel` is built and current.
pub(crate) fn ensure_initramfs(
    lab_dir: &Path,
    tools: &Tools,
    kernel: &Kernel,
    progress: &Progress,
) -> Result<PathBuf> {
    let image = lab_dir.join(format!("initramfs-{}.cpio.gz", kernel.version));
    let stamp_path = lab_dir.join(format!("initramfs-{}.stamp", kernel.version));
    let init = init_script();
    let busybox = fs::metadata(&tools.busybox)
        .with_context(|| format!("could not read {}", tools.busybox.display()))?;
    let stamp = format!(
        "busybox {} {} {}\n{init}",
        tools.busybox.display(),
        busybox.len(),
        busybox.mtime()
    );
    let current =
        image.is_file() && fs::read_to_string(&stamp_path).is_ok_and(|existing| existing == stamp);
    if current {
        return Ok(image);
    }

    progress.step("building the initramfs");
    let staging = tempfile::Builder::new()
        .prefix(".initramfs-")
        .tempdir_in(lab_dir)
        .with_context(|| format!("could not create a directory in {}", lab_dir.display()))?;
    let root = staging.path();
    for dir in ["bin", "mod", "newroot", "proc", "sys", "dev"] {
        fs::create_dir(root.join(dir))
            .with_context(|| format!("could not create {}", root.join(dir).display()))?;
    }
    fs::copy(&tools.busybox, root.join("bin/busybox"))
        .with_context(|| format!("could not copy {}", tools.busybox.display()))?;
    for module in MODULES {
        let name = module.rsplit('/').next().unwrap_or(module);
        extract_module(
            kernel,
            tools,
            module,
            &root.join("mod").join(format!("{name}.ko")),
        )?;
    }
    let init_path = root.join("init");
    fs::write(&init_path, &init)
        .with_context(|| format!("could not write {}", init_path.display()))?;
    fs::set_permissions(&init_path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("could not make {} executable", init_path.display()))?;

    let packed = tempfile::Builder::new()
        .prefix(".initramfs-")
        .suffix(".cpio.gz")
        .tempfile_in(lab_dir)
        .with_context(|| format!("could not create a file in {}", lab_dir.display()))?;
    pack(root, tools, packed.as_file())?;
    packed
        .as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .with_context(|| format!("could not set permissions on {}", packed.path().display()))?;
    packed
        .persist(&image)
        .with_context(|| format!("could not write {}", image.display()))?;
    fs::write(&stamp_path, stamp)
        .with_context(|| format!("could not write {}", stamp_path.display()))?;
    Ok(image)
}

/// Writes `lib/modules/<version>/kernel/<module>.ko[.xz]` uncompressed to `dest`.
fn extract_module(kernel: &Kernel, tools: &Tools, module: &str, dest: &Path) -> Result<()> {
    let base = kernel.modules_dir().join("kernel").join(module);
    let xz = base.with_extension("ko.xz");
    let plain = base.with_extension("ko");
    if xz.is_file() {
        let out = fs::File::create(dest)
            .with_context(|| format!("could not create {}", dest.display()))?;
        let status = Command::new(&tools.xz)
            .arg("-dc")
            .arg(&xz)
            .stdin(Stdio::null())
            .stdout(out)
            .status()
            .context("could not run xz")?;
        if !status.success() {
            bail!("xz -dc {} failed ({status})", xz.display());
        }
    } else if plain.is_file() {
        fs::copy(&plain, dest).with_context(|| format!("could not copy {}", plain.display()))?;
    } else {
        bail!(
            "the guest kernel has no module {} (looked for {}); the lab needs 9p as modules",
            module,
            xz.display()
        );
    }
    Ok(())
}

/// `find . | cpio -o -H newc | gzip -1 > out`, run in `root`.
fn pack(root: &Path, tools: &Tools, out: &fs::File) -> Result<()> {
    let mut find = Command::new(&tools.find)
        .arg(".")
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("could not run find")?;
    let find_out = find.stdout.take().context("find has no stdout")?;
    let mut cpio = Command::new(&tools.cpio)
        .args(["-o", "-H", "newc", "--quiet", "-R", "0:0"])
        .current_dir(root)
        .stdin(find_out)
        .stdout(Stdio::piped())
        .spawn()
        .context("could not run cpio")?;
    let cpio_out = cpio.stdout.take().context("cpio has no stdout")?;
    let gzip = Command::new(&tools.gzip)
        .arg("-1")
        .stdin(cpio_out)
        .stdout(
            out.try_clone()
                .context("could not duplicate a file handle")?,
        )
        .status()
        .context("could not run gzip")?;
    let find = find.wait().context("waiting for find")?;
    let cpio = cpio.wait().context("waiting for cpio")?;
    for (what, status) in [("find", find), ("cpio", cpio), ("gzip", gzip)] {
        if !status.success() {
            bail!("packing the initramfs failed: {what} exited with {status}");
        }
    }
    Ok(())
}
