//! `ring3 mount-fat DEV MOUNTPOINT`: serve the FAT file system on a device or image through
//! FUSE until it is unmounted.

use std::io::Write;
use std::path::PathBuf;

use ring3_fat::{MountOptions, Mounted};

const UNMOUNT_HELP: &str = "\
Runs in the foreground until the mount point is unmounted: `umount MOUNTPOINT` (as root),
`fusermount3 -u MOUNTPOINT` (as a user; needs the fuse3 package), or Ctrl-C / SIGTERM, which
unmount it (lazily if it is busy). Everything is then written back, the volume is marked
clean and the device synced before the command exits. Data also reaches the device whenever
a file is closed or fsynced.

FAT has no owners or permissions: every file shows --uid/--gid and 0666 (directories 0777)
less --umask; chmod and chown succeed without effect. Timestamps are read and written as UTC.
A volume is found on the whole device or in the first FAT partition of an MBR.";

/// Arguments of `ring3 mount-fat`.
#[derive(clap::Args, Debug)]
#[command(after_long_help = UNMOUNT_HELP)]
pub struct MountFatArgs {
    /// Block device (e.g. /dev/ublkb0, a USB stick served by ring3) or image file holding
    /// a FAT12, FAT16 or FAT32 file system.
    #[arg(value_name = "DEV")]
    pub device: PathBuf,
    /// Existing directory to mount it on.
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: PathBuf,
    /// Mount read-only; the device is opened read-only and never written.
    #[arg(long)]
    pub read_only: bool,
    /// Owner shown for every file (default: the user running the command).
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,
    /// Group shown for every file (default: the group of the user running the command).
    #[arg(long, value_name = "GID")]
    pub gid: Option<u32>,
    /// Permission bits cleared, in octal: 022 shows files as 0644 and directories as 0755.
    #[arg(long, value_name = "OCTAL", default_value = "022", value_parser = parse_umask)]
    pub umask: u32,
    /// Let users other than the one mounting use it (as a user this needs
    /// `user_allow_other` in /etc/fuse.conf).
    #[arg(long)]
    pub allow_other: bool,
    /// Open DEV with O_DIRECT, so that only this process caches it.
    #[arg(long)]
    pub direct: bool,
}

fn parse_umask(text: &str) -> Result<u32, String> {
    match u32::from_str_radix(text, 8) {
        Ok(mask) if mask <= 0o777 => Ok(mask),
        _ => Err(format!("{text:?} is not an octal mask from 0 to 777")),
    }
}

fn announce(mounted: &Mounted) {
    let label = if mounted.label.is_empty() || mounted.label == "NO NAME" {
        String::new()
    } else {
        format!(" \"{}\"", mounted.label)
    };
    let partition = match mounted.placement.partition {
        Some(number) => format!(" (partition {number})"),
        None => String::new(),
    };
    let mode = if mounted.read_only {
        "read-only"
    } else {
        "read-write"
    };
    let mountpoint = mounted.mountpoint.display();
    println!(
        "{}{label} on {}{partition} mounted {mode} on {mountpoint}",
        mounted.fat_name(),
        mounted.device.display()
    );
    println!(
        "unmount with `umount {mountpoint}` (as a user: `fusermount3 -u {mountpoint}`) or Ctrl-C"
    );
    let _ = std::io::stdout().flush();
}

/// Serves the mount until it is unmounted.
pub fn run(args: MountFatArgs) -> Result<(), ring3_fat::Error> {
    let options = MountOptions {
        read_only: args.read_only,
        uid: args.uid,
        gid: args.gid,
        umask: args.umask,
        allow_other: args.allow_other,
        direct: args.direct,
        ..MountOptions::default()
    };
    ring3_fat::mount(&args.device, &args.mountpoint, &options, announce)?;
    println!(
        "unmounted {}; the volume is written back",
        args.mountpoint.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn umask_is_octal() {
        assert_eq!(parse_umask("022"), Ok(0o22));
        assert_eq!(parse_umask("0"), Ok(0));
        assert!(parse_umask("8").is_err());
        assert!(parse_umask("1000").is_err());
    }
}
