//! The guest kernel: Debian's stock kernel package, cached unpacked under
//! `<lab>/kernel/<version>/`.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::host::{self, Tools};
use super::progress::Progress;

/// The meta package that always depends on the current kernel of the series.
pub(crate) const KERNEL_META_PACKAGE: &str = "linux-image-6.12-amd64";

/// An unpacked kernel package.
#[derive(Debug, Clone)]
pub(crate) struct Kernel {
    /// The ABI name, e.g. `6.12.117+deb12-amd64`.
    pub(crate) version: String,
    /// The unpacked package (`boot/`, `lib/modules/<version>/`).
    pub(crate) tree: PathBuf,
}

impl Kernel {
    pub(crate) fn vmlinuz(&self) -> PathBuf {
        self.tree
            .join("boot")
            .join(format!("vmlinuz-{}", self.version))
    }

    pub(crate) fn modules_dir(&self) -> PathBuf {
        self.tree.join("lib/modules").join(&self.version)
    }

    fn is_complete(&self) -> bool {
        self.vmlinuz().is_file() && self.modules_dir().join("modules.dep").is_file()
    }
}

/// The versioned kernel package the meta package currently points to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KernelPackage {
    name: String,
    version: String,
}

/// Makes sure the current kernel is unpacked in the cache and returns it.
/// Falls back to the newest cached kernel when apt cannot tell what the
/// current one is.
pub(crate) fn ensure_kernel(lab_dir: &Path, tools: &Tools, progress: &Progress) -> Result<Kernel> {
    let cache = lab_dir.join("kernel");
    fs::create_dir_all(&cache).with_context(|| format!("could not create {}", cache.display()))?;
    remove_leftovers(&cache);

    let package = match resolve_package(&cache, tools, progress) {
        Ok(package) => package,
        Err(err) => match newest_cached(&cache) {
            Some(kernel) => {
                progress.println(format!(
                    "lab: warning: {err:#}; using the cached kernel {}",
                    kernel.version
                ));
                return Ok(kernel);
            }
            None => return Err(err),
        },
    };

    let kernel = Kernel {
        tree: cache.join(&package.version),
        version: package.version.clone(),
    };
    if kernel.is_complete() {
        return Ok(kernel);
    }
    if kernel.tree.exists() {
        // Only complete trees are ever renamed into place; this one was
        // damaged afterwards.
        fs::remove_dir_all(&kernel.tree)
            .with_context(|| format!("could not remove the damaged {}", kernel.tree.display()))?;
    }
    download_and_unpack(&cache, &package, &kernel, tools, progress)?;
    Ok(kernel)
}

/// Files whose change can change what apt-cache answers.
const APT_STATE: [&str; 5] = [
    "/var/lib/apt/lists",
    "/etc/apt/sources.list",
    "/etc/apt/sources.list.d",
    "/etc/apt/preferences",
    "/etc/apt/preferences.d",
];

/// A fingerprint of apt's package lists and configuration.
fn apt_state() -> String {
    APT_STATE
        .iter()
        .map(|path| match fs::metadata(path) {
            Ok(m) => format!("{path} {} {}.{}\n", m.len(), m.mtime(), m.mtime_nsec()),
            Err(_) => format!("{path} -\n"),
        })
        .collect()
}

/// Resolves the kernel package, reusing the previous answer while apt's
/// package lists are unchanged (apt-cache can take half a second).
fn resolve_package(cache: &Path, tools: &Tools, progress: &Progress) -> Result<KernelPackage> {
    let memo = cache.join(".resolved");
    let state = apt_state();
    if let Ok(text) = fs::read_to_string(&memo) {
        if let Some(rest) = text.strip_prefix(&state) {
            let mut lines = rest.lines();
            if let (Some(name), Some(version), None) = (lines.next(), lines.next(), lines.next()) {
                return Ok(KernelPackage {
                    name: name.to_string(),
                    version: version.to_string(),
                });
            }
        }
    }
    let package = query_or_update(tools, progress)?;
    // The state is taken again: `apt-get update` may just have changed it.
    let text = format!("{}{}\n{}\n", apt_state(), package.name, package.version);
    let _ = fs::write(&memo, text);
    Ok(package)
}

fn query_or_update(tools: &Tools, progress: &Progress) -> Result<KernelPackage> {
    progress.status("resolving kernel package");
    match query_package(tools) {
        Ok(Some(package)) => return Ok(package),
        Ok(None) => {}
        Err(err) if !host::is_root() => return Err(err),
        Err(_) => {}
    }
    // apt's package lists may be missing or stale: refresh them once.
    if host::apt_update_once(&tools.apt_get, progress)? {
        if let Some(package) = query_package(tools)? {
            return Ok(package);
        }
    }
    bail!(
        "apt does not know the kernel package {KERNEL_META_PACKAGE}; run `sudo apt-get update` \
         (the lab needs a Debian 12 (bookworm) or newer host whose apt sources provide it)"
    )
}

/// Asks apt-cache which versioned package the meta package depends on.
fn query_package(tools: &Tools) -> Result<Option<KernelPackage>> {
    let output = Command::new(&tools.apt_cache)
        .args(["show", "--no-all-versions", KERNEL_META_PACKAGE])
        .stdin(Stdio::null())
        .output()
        .context("could not run apt-cache")?;
    if !output.status.success() {
        return Ok(None);
    }
    Ok(parse_depends(&String::from_utf8_lossy(&output.stdout)))
}

/// Finds the `linux-image-<version>` package on the `Depends:` line.
fn parse_depends(show: &str) -> Option<KernelPackage> {
    let depends = show
        .lines()
        .find_map(|line| line.strip_prefix("Depends:"))?;
    depends
        .split([',', '|'])
        .filter_map(|dep| dep.split_whitespace().next())
        .find_map(|name| {
            let version = name.strip_prefix("linux-image-")?;
            (!version.is_empty()).then(|| KernelPackage {
                name: name.to_string(),
                version: version.to_string(),
            })
        })
}

/// The download size of `package` from apt-cache, if known.
fn package_size(tools: &Tools, package: &str) -> Option<u64> {
    let output = Command::new(&tools.apt_cache)
        .args(["show", "--no-all-versions", package])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("Size:"))
        .and_then(|size| size.trim().parse().ok())
}

fn download_and_unpack(
    cache: &Path,
    package: &KernelPackage,
    kernel: &Kernel,
    tools: &Tools,
    progress: &Progress,
) -> Result<()> {
    let size = package_size(tools, &package.name);
    let size_note = size
        .map(|s| format!(" ({} MB)", s.div_ceil(1_000_000)))
        .unwrap_or_default();
    progress.start_bytes(format!("downloading {}{size_note}", package.name), size);

    let download = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(cache)
        .with_context(|| {
            format!(
                "could not create a download directory in {}",
                cache.display()
            )
        })?;
    let log = tempfile::tempfile().context("could not create a temporary file")?;
    let mut child = host::apt_get(tools)
        .args(["download", &package.name])
        .current_dir(download.path())
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .context("could not duplicate a file handle")?,
        )
        .stderr(
            log.try_clone()
                .context("could not duplicate a file handle")?,
        )
        .spawn()
        .context("could not start apt-get download")?;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for apt-get download")? {
            break status;
        }
        progress.set_bytes(dir_size(download.path()));
        std::thread::sleep(Duration::from_millis(200));
    };
    if !status.success() {
        let mut log = log;
        let output = read_to_string_from_start(&mut log);
        bail!(
            "apt-get download {} failed ({status}): {}\n(check the network and your apt sources)",
            package.name,
            output.trim()
        );
    }
    let deb = find_deb(download.path())?;

    progress.step(format!("unpacking {}", package.name));
    let unpack = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(cache)
        .with_context(|| format!("could not create a directory in {}", cache.display()))?;
    host::run_captured(
        Command::new(&tools.dpkg_deb)
            .arg("-x")
            .arg(&deb)
            .arg(unpack.path()),
        "dpkg-deb -x",
    )?;
    drop(download);

    let staged = Kernel {
        version: kernel.version.clone(),
        tree: unpack.path().to_path_buf(),
    };
    link_usr_lib(&staged)?;
    if !staged.vmlinuz().is_file() {
        bail!(
            "{} has no boot/vmlinuz-{}; is {KERNEL_META_PACKAGE} an x86-64 kernel package?",
            package.name,
            kernel.version
        );
    }

    progress.step("depmod");
    host::run_captured(
        Command::new(&tools.depmod)
            .arg("-b")
            .arg(unpack.path())
            .arg(&kernel.version),
        "depmod",
    )?;
    if !staged.is_complete() {
        bail!(
            "depmod did not create {}",
            staged.modules_dir().join("modules.dep").display()
        );
    }

    // The rename is atomic: an interrupted preparation never leaves a
    // half-filled cache entry behind.
    fs::rename(unpack.path(), &kernel.tree).with_context(|| {
        format!(
            "could not move the unpacked kernel to {}",
            kernel.tree.display()
        )
    })?;
    // `unpack` now points nowhere; dropping it is a no-op.
    drop(unpack);
    Ok(())
}

/// Newer packages ship modules under `usr/lib/modules`; depmod and modprobe
/// with a base directory look under `lib/modules`.
fn link_usr_lib(kernel: &Kernel) -> Result<()> {
    let lib = kernel.tree.join("lib");
    if !lib.exists() && kernel.tree.join("usr/lib/modules").is_dir() {
        std::os::unix::fs::symlink("usr/lib", &lib)
            .with_context(|| format!("could not create {}", lib.display()))?;
    }
    Ok(())
}

fn find_deb(dir: &Path) -> Result<PathBuf> {
    fs::read_dir(dir)
        .with_context(|| format!("could not read {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .with_context(|| format!("apt-get download left no .deb file in {}", dir.display()))
}

fn dir_size(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn read_to_string_from_start(file: &mut fs::File) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = String::new();
    if file.seek(SeekFrom::Start(0)).is_ok() {
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_ok() {
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    text
}

/// Removes what interrupted preparations left (temporary directories,
/// package files); the caller holds the lab lock. Unpacked trees stay.
fn remove_leftovers(cache: &Path) {
    let Ok(entries) = fs::read_dir(cache) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".download-") || name.starts_with(".unpack-") {
            let _ = fs::remove_dir_all(&path);
        } else if name.ends_with(".deb") {
            let _ = fs::remove_file(&path);
        }
    }
}

/// The most recently unpacked complete kernel in the cache.
fn newest_cached(cache: &Path) -> Option<Kernel> {
    fs::read_dir(cache)
        .ok()?
        .flatten()
        .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|entry| {
            let kernel = Kernel {
                version: entry.file_name().to_string_lossy().into_owned(),
                tree: entry.path(),
            };
            let modified = entry.metadata().ok()?.modified().ok()?;
            kernel.is_complete().then_some((modified, kernel))
        })
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, kernel)| kernel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_line() {
        let show = "Package: linux-image-6.12-amd64\n\
                    Version: 6.12.117-1~deb12u1\n\
                    Depends: linux-image-6.12.117+deb12-amd64 (= 6.12.117-1~deb12u1)\n\
                    Size: 1476\n";
        assert_eq!(
            parse_depends(show),
            Some(KernelPackage {
                name: "linux-image-6.12.117+deb12-amd64".to_string(),
                version: "6.12.117+deb12-amd64".to_string(),
            })
        );
        let alternatives = "Depends: foo (>= 1), linux-image-6.12.1-amd64 | bar\n";
        assert_eq!(
            parse_depends(alternatives).map(|p| p.version),
            Some("6.12.1-amd64".to_string())
        );
        assert_eq!(parse_depends("Package: x\nDepends: foo\n"), None);
        assert_eq!(parse_depends("Package: x\n"), None);
    }
}
