//! Guest kernel modules, resolved on the host.
//!
//! Under TCG every exec of a dynamically linked program costs a few hundred
//! milliseconds, so the guest does not run kmod's `modprobe` for the modules
//! the lab loads up front: the host works out the dependency order with
//! `modprobe --show-depends`, decompresses the modules once into the kernel
//! cache, and the guest loads them with the static busybox's `insmod`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::host;
use super::LabAssets;

/// One `insmod` the guest has to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModuleLoad {
    /// The module's name as in `/sys/module/` (dashes become underscores).
    pub(crate) name: String,
    /// An uncompressed `.ko` the guest can read.
    pub(crate) path: PathBuf,
    /// Parameters from the host's modprobe configuration.
    pub(crate) params: Vec<String>,
}

/// The loads needed for `modules` and their dependencies, dependencies
/// first, each module once. Each entry is `NAME [PARAM=VALUE...]`; the
/// parameters go to that module's own load, after any from the host's
/// modprobe configuration.
pub(crate) fn resolve(assets: &LabAssets, modules: &[&str]) -> Result<Vec<ModuleLoad>> {
    let mut loads: Vec<ModuleLoad> = Vec::new();
    for spec in modules {
        let (module, params) = parse_module_spec(spec)?;
        let output = host::run_captured(
            Command::new(&assets.tools.modprobe)
                .arg("-d")
                .arg(&assets.kernel_tree)
                .args(["-S", &assets.kernel_version, "--show-depends", module]),
            &format!("resolving the guest kernel module `{module}` (modprobe --show-depends)"),
        )?;
        let resolved = parse_show_depends(&String::from_utf8_lossy(&output.stdout))?;
        // modprobe lists the module itself last, after its dependencies.
        let target = resolved.last().map(|load| load.name.clone());
        for load in resolved {
            if !loads.iter().any(|l| l.name == load.name) {
                loads.push(load);
            }
        }
        if !params.is_empty() {
            let Some(load) = target.and_then(|name| loads.iter_mut().find(|l| l.name == name))
            else {
                bail!(
                    "the guest kernel module `{module}` is built in, so it cannot take the \
                     parameters {}; put them on the kernel command line instead",
                    params.join(" ")
                );
            };
            load.params.extend(params);
        }
    }
    let cache = assets.kernel_tree.join("decompressed");
    for load in &mut loads {
        load.path = uncompressed(assets, &cache, &load.path)?;
    }
    Ok(loads)
}

/// Splits `NAME [PARAM=VALUE...]` into the name and its parameters.
fn parse_module_spec(spec: &str) -> Result<(&str, Vec<String>)> {
    let mut words = spec.split_whitespace();
    let name = words
        .next()
        .context("an empty guest kernel module name was given")?;
    let params: Vec<String> = words.map(str::to_string).collect();
    if let Some(bad) = params
        .iter()
        .find(|p| p.starts_with('=') || p.starts_with('-'))
    {
        bail!("`{bad}` is not a module parameter (expected PARAM=VALUE) in `{spec}`");
    }
    Ok((name, params))
}

/// Parses `insmod PATH PARAMS...` lines; `builtin NAME` lines need nothing.
fn parse_show_depends(text: &str) -> Result<Vec<ModuleLoad>> {
    let mut loads = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("insmod") => {
                let path = PathBuf::from(
                    words
                        .next()
                        .context("modprobe printed `insmod` without a path")?,
                );
                let file = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .with_context(|| format!("odd module path {}", path.display()))?;
                let name = file.split('.').next().unwrap_or(file).replace('-', "_");
                loads.push(ModuleLoad {
                    name,
                    path,
                    params: words.map(str::to_string).collect(),
                });
            }
            Some("builtin") | None => {}
            Some(_) => bail!("unexpected output from modprobe --show-depends: {line}"),
        }
    }
    Ok(loads)
}

/// An uncompressed copy of `module` under `cache`, made once.
fn uncompressed(assets: &LabAssets, cache: &Path, module: &Path) -> Result<PathBuf> {
    let Some(name) = module.to_str() else {
        bail!("the module path {} is not UTF-8", module.display());
    };
    if name.ends_with(".ko") {
        return Ok(module.to_path_buf());
    }
    let Some(stem) = name.strip_suffix(".xz") else {
        bail!(
            "the guest kernel module {name} is compressed in a format the lab does not handle \
             (only .ko and .ko.xz)"
        );
    };
    let relative = Path::new(stem)
        .strip_prefix(&assets.kernel_tree)
        .unwrap_or_else(|_| Path::new(stem).strip_prefix("/").unwrap_or(Path::new(stem)));
    let dest = cache.join(relative);
    if dest.is_file() {
        return Ok(dest);
    }
    let dir = dest.parent().unwrap_or(cache);
    fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".module-")
        .tempfile_in(dir)
        .with_context(|| format!("could not create a file in {}", dir.display()))?;
    let status = Command::new(&assets.tools.xz)
        .arg("-dc")
        .arg(module)
        .stdout(
            tmp.as_file()
                .try_clone()
                .context("could not duplicate a file handle")?,
        )
        .status()
        .context("could not run xz")?;
    if !status.success() {
        bail!("xz -dc {} failed ({status})", module.display());
    }
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))
            .with_context(|| format!("could not set permissions on {}", tmp.path().display()))?;
    }
    tmp.persist(&dest)
        .with_context(|| format!("could not write {}", dest.display()))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_depends() {
        let text = "insmod /k/lib/modules/v/kernel/virt/lib/irqbypass.ko.xz \n\
                    builtin iommufd\n\
                    insmod /k/lib/modules/v/kernel/drivers/vfio/pci/vfio-pci.ko.xz ids=1234:11e8 \n";
        let loads = parse_show_depends(text).unwrap_or_default();
        assert_eq!(loads.len(), 2);
        assert_eq!(loads[0].name, "irqbypass");
        assert_eq!(loads[1].name, "vfio_pci");
        assert_eq!(loads[1].params, vec!["ids=1234:11e8".to_string()]);
        assert!(parse_show_depends("bogus line").is_err());
    }

    #[test]
    fn module_specs() {
        let (name, params) =
            parse_module_spec("nvme poll_queues=2  io_queue_depth=64").unwrap_or(("", Vec::new()));
        assert_eq!(name, "nvme");
        assert_eq!(params, vec!["poll_queues=2", "io_queue_depth=64"]);
        let (name, params) = parse_module_spec("vfio-pci").unwrap_or(("", Vec::new()));
        assert_eq!(name, "vfio-pci");
        assert!(params.is_empty());
        assert!(parse_module_spec("  ").is_err());
        assert!(parse_module_spec("nvme =2").is_err());
        assert!(parse_module_spec("nvme --force").is_err());
    }
}
