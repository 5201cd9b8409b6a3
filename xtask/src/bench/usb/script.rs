//! The guest script of `bench usb`: the kernel's usb-storage driver and ring3's mass
//! storage driver behind ublk on the same emulated USB stick (`R3RAW`), in one VM.
//!
//! 1. the USB device `46f4:0001` with serial `R3RAW` (QEMU's usb-storage on the lab's
//!    xHCI controller), `sd_mod` and `usb-storage` loaded, its disk `/dev/sdX` found by
//!    the serial;
//! 2. the fill pass (the whole device, 128 KiB sequential writes), then each workload with
//!    fio on `/dev/sdX`;
//! 3. `usb-storage` removed (`rmmod`), so that no kernel driver holds the interface;
//! 4. `ring3d` started with the device (`usb = "46f4:0001:R3RAW"`, `driver =
//!    "usb-storage"`, `expose = "ublk"`), and once `ring3 status` says it runs, each
//!    workload with the same fio options on the `/dev/ublkbN` it exposes;
//! 5. ring3d stopped with SIGTERM.
//!
//! Results go back on the console as in the other benches ([`crate::bench::capture`]).

use std::fmt::Write as _;

use crate::bench::script::{
    any_exit_note, helpers, ring3d_functions, ring3d_settings, stop_ring3d, MEASURE_FIO,
};
use crate::bench::workload::Workload;
use crate::lab::{shell_join, shell_quote, usb};

/// Exit status when the guest has no R3RAW disk under usb-storage.
pub const EXIT_NO_DEVICE: i32 = 3;
/// Exit status when the fill pass failed.
pub const EXIT_FILL_FAILED: i32 = 4;
/// Exit status when usb-storage could not be made to let go of the device.
pub const EXIT_RELEASE_FAILED: i32 = 5;
/// Exit status when ring3d did not bring the device up.
pub const EXIT_DAEMON_FAILED: i32 = 6;

/// The report's note on how the script ended, if not with status 0.
pub fn exit_note(result: &anyhow::Result<i32>) -> Option<String> {
    any_exit_note(
        result,
        &[
            (
                EXIT_NO_DEVICE,
                "no R3RAW disk under the kernel's usb-storage",
            ),
            (EXIT_FILL_FAILED, "the fill pass failed"),
            (
                EXIT_RELEASE_FAILED,
                "usb-storage did not let go of the device",
            ),
            (EXIT_DAEMON_FAILED, "ring3d did not bring the device up"),
        ],
    )
}

/// The name of the device in ring3d's config.
pub const DEVICE_NAME: &str = "usb0";

/// QEMU's usb-storage device.
pub const VID_PID: &str = "46f4:0001";

/// How long the script waits for a disk or for ring3d's device.
const START_TIMEOUT_S: u32 = 120;

/// What the guest is to run.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    pub workloads: &'a [Workload],
    /// Seconds per workload.
    pub duration_s: u64,
    /// Bytes from the start of the device that every workload uses.
    pub region_bytes: u64,
    /// `ring3` and `ring3d`, or `None` to measure the kernel driver only.
    pub ring3: Option<(&'a str, &'a str)>,
}

impl Plan<'_> {
    /// The `say` lines the script prints, for its `[step/steps]` counter.
    pub fn steps(&self) -> usize {
        // Loading usb-storage; the fill; the kernel runs; then the release, ring3d's
        // start, the ublk runs and the stop.
        let n = self.workloads.len();
        let kernel = 2 + n;
        match self.ring3 {
            Some(_) => kernel + 1 + 1 + n + 1,
            None => kernel,
        }
    }
}

/// ring3d's config for the `R3RAW` device (the daemon's settings as in the ublk bench).
pub fn daemon_config() -> String {
    let settings = ring3d_settings();
    format!(
        r#"{settings}[[device]]
name = "{DEVICE_NAME}"
usb = "{VID_PID}:{serial}"
driver = "usb-storage"
expose = "ublk"
"#,
        serial = usb::STORAGE_RAW
    )
}

/// The script, for `sh -c`.
pub fn guest_script(plan: &Plan<'_>) -> String {
    let duration = plan.duration_s;
    let region = plan.region_bytes;
    let serial = usb::STORAGE_RAW;
    let mut s = helpers("usb", plan.steps());
    let _ = writeln!(
        s,
        r#"# usb_device VID:PID:SERIAL: the device's sysfs directory, in $usbdev.
usb_device() {{
    usbdev=
    for d in /sys/bus/usb/devices/*; do
        [ -f "$d/idVendor" ] || continue
        [ "$(cat "$d/idVendor"):$(cat "$d/idProduct"):$(cat "$d/serial" 2>/dev/null)" = "$1" ] && usbdev=$d
    done
    [ -n "$usbdev" ]
}}
# find_disk: wait until the device has a SCSI disk; sets disk.
find_disk() {{
    disk=
    tries=0
    while [ -z "$disk" ] && [ $tries -lt {ticks} ]; do
        for b in /sys/block/sd*; do
            [ -e "$b/device" ] || continue
            case "$(readlink -f "$b/device")" in
                "$(readlink -f "$usbdev")"/*) [ -b "/dev/${{b##*/}}" ] && disk=${{b##*/}} ;;
            esac
        done
        [ -n "$disk" ] || {{ sleep 0.1; tries=$((tries + 1)); }}
    done
    [ -n "$disk" ] || echo "bench: the USB device {serial} ($usbdev) has no disk after {START_TIMEOUT_S} s"
    [ -n "$disk" ]
}}
# bound_drivers: the drivers bound to the device's interfaces.
bound_drivers() {{
    for i in "$usbdev"/*:*; do
        [ -e "$i/driver" ] && basename "$(readlink "$i/driver")"
    done
}}"#,
        ticks = START_TIMEOUT_S * 10,
    );
    s.push_str(MEASURE_FIO);
    let _ = writeln!(
        s,
        r#"usb_device {VID_PID}:{serial} || {{ echo "bench: no USB device {VID_PID} with serial {serial} in the guest"; exit {EXIT_NO_DEVICE}; }}
say "kernel: loading sd_mod and usb-storage"
modprobe sd_mod && modprobe usb-storage || {{ echo "bench: could not load usb-storage"; exit {EXIT_NO_DEVICE}; }}
find_disk || exit {EXIT_NO_DEVICE}
echo "bench: USB device {serial} is ${{usbdev##*/}}, its disk /dev/$disk"
{{
    echo "guest_kernel=$(uname -r)"
    echo "fio=$(fio --version)"
    echo "usb_device=${{usbdev##*/}}"
    echo "usb_speed_mbps=$(cat "$usbdev/speed")"
    echo "usb_product=$(cat "$usbdev/product" 2>/dev/null)"
    echo "disk=/dev/$disk"
    echo "logical_block_size=$(cat "/sys/block/$disk/queue/logical_block_size")"
    echo "device_bytes=$(( $(cat "/sys/block/$disk/size") * 512 ))"
    echo "kernel_max_sectors_kb=$(cat "/sys/block/$disk/queue/max_sectors_kb")"
    echo "kernel_queue_depth=$(cat "/sys/block/$disk/device/queue_depth" 2>/dev/null)"
    echo "cpus=$(nproc)"
    echo "memory_kib=$(awk '/^MemTotal:/ {{ print $2 }}' /proc/meminfo)"
}} > "$T/info"
emit info guest 0 "$T/info"
say "kernel: filling the first {region} bytes of /dev/$disk (128 KiB sequential writes, QD8)"
fio --name=fill --filename="/dev/$disk" --ioengine=io_uring --direct=1 --rw=write --bs=128k --iodepth=8 --size={region} --output-format=json --output="$T/fill.json" > "$T/fill.log" 2>&1
rc=$?
[ $rc = 0 ] || show "$T/fill.log"
emit fill fill $rc "$T/fill.json"
[ $rc = 0 ] || {{ echo "bench: the fill pass failed (fio exit status $rc)"; exit {EXIT_FILL_FAILED}; }}"#
    );
    for workload in plan.workloads {
        let _ = writeln!(
            s,
            "measure_fio kernel \"/dev/$disk\" {} {} {}",
            shell_quote(&workload.id()),
            shell_quote(&workload.describe()),
            shell_join(&workload.fio_args(duration, region))
        );
    }
    let Some((ring3, ring3d)) = plan.ring3 else {
        let _ = writeln!(s, "exit 0");
        return s;
    };
    let ring3d = shell_quote(ring3d);
    let config = daemon_config();
    let _ = writeln!(
        s,
        r#"say "kernel: letting go of {serial}: rmmod usb-storage"
sync
rmmod usb_storage || {{ echo "bench: rmmod usb-storage failed"; exit {EXIT_RELEASE_FAILED}; }}
[ -z "$(bound_drivers)" ] || {{ echo "bench: the device's interfaces are still bound to: $(bound_drivers)"; exit {EXIT_RELEASE_FAILED}; }}"#
    );
    s.push_str(&ring3d_functions(ring3, EXIT_DAEMON_FAILED));
    let _ = writeln!(
        s,
        r#"# wait_running SECONDS: wait until the device runs and has its ublk block device; sets
# pid and ublk. Says each other state.
wait_running() {{
    deadline=$(( $(date +%s) + $1 ))
    seen=
    while :; do
        st=$(status_json)
        state=$(printf '%s' "$st" | grep -o '"state":"[a-z_-]*"' | head -n 1 | cut -d'"' -f4)
        pid=$(printf '%s' "$st" | grep -o '"pid":[0-9]*' | head -n 1 | cut -d: -f2)
        ublk=$(printf '%s' "$st" | grep -o '/dev/ublkb[0-9]*' | head -n 1)
        if [ "$state" = running ] && [ -n "$ublk" ] && [ -b "$ublk" ]; then
            return 0
        fi
        if [ "$state" != "$seen" ] && [ "$state" != running ]; then
            echo "    ring3d: the device is ${{state:-not reported yet}}"
            seen=$state
        fi
        alive "$daemon" || {{ echo "bench: ring3d exited"; return 1; }}
        [ "$(date +%s)" -lt $deadline ] || break
        sleep 0.1
    done
    echo "bench: after $1 s ring3d's device is '${{state:-unknown}}': $st"
    return 1
}}
say "ring3d: starting it on {VID_PID}:{serial} (usb-storage driver, exposed through ublk)"
cat > "$T/ring3d.toml" <<'RING3D_CONFIG'
{config}RING3D_CONFIG
{ring3d} --config "$T/ring3d.toml" > "$T/ring3d.log" 2>&1 &
daemon=$!
started=$(date +%s%N)
wait_running {START_TIMEOUT_S} || daemon_failed "ring3d did not bring the device up"
echo "bench: ring3d's device runs after $(( ($(date +%s%N) - started) / 1000000 )) ms, driver pid $pid, exposed as $ublk"
{{
    echo "ublk_device=$ublk"
    echo "ublk_start_ms=$(( ($(date +%s%N) - started) / 1000000 ))"
    echo "ublk_bytes=$(( $(cat /sys/block/${{ublk##*/}}/size) * 512 ))"
    echo "ublk_logical_block_size=$(cat /sys/block/${{ublk##*/}}/queue/logical_block_size 2>/dev/null)"
    echo "ublk_queues=$(ls -d /sys/block/${{ublk##*/}}/mq/* 2>/dev/null | wc -l)"
    echo "ublk_max_sectors_kb=$(cat /sys/block/${{ublk##*/}}/queue/max_sectors_kb 2>/dev/null)"
}} > "$T/info-ublk"
emit info ublk 0 "$T/info-ublk""#
    );
    for workload in plan.workloads {
        let _ = writeln!(
            s,
            "measure_fio ublk \"$ublk\" {} {} {}",
            shell_quote(&workload.id()),
            shell_quote(&workload.describe()),
            shell_join(&workload.fio_args(duration, region))
        );
    }
    s.push_str(&stop_ring3d(""));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::{Completion, Pattern};

    fn workload(pattern: Pattern, block_size: u32, queue_depth: u32) -> Workload {
        Workload {
            pattern,
            block_size,
            queue_depth,
            completion: Completion::Interrupt,
        }
    }

    fn syntax_ok(script: &str) {
        let check = std::process::Command::new("sh")
            .args(["-n", "-c", script])
            .output()
            .unwrap_or_else(|e| panic!("running sh -n: {e}"));
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }

    #[test]
    fn kernel_then_ring3d_with_the_same_fio_options() {
        let workloads = [
            workload(Pattern::SeqRead, 128 << 10, 1),
            workload(Pattern::RandWrite, 4096, 8),
        ];
        let plan = Plan {
            workloads: &workloads,
            duration_s: 3,
            region_bytes: 64 << 20,
            ring3: Some(("/w/target/release/ring3", "/w/target/release/ring3d")),
        };
        let script = guest_script(&plan);
        let at = |needle: &str| {
            script
                .find(needle)
                .unwrap_or_else(|| panic!("{needle:?} in the script"))
        };
        let order = [
            at("modprobe sd_mod && modprobe usb-storage"),
            at("--name=fill"),
            at("\nmeasure_fio kernel \"/dev/$disk\" read-128k-qd1-interrupt "),
            at("\nrmmod usb_storage"),
            at("/w/target/release/ring3d --config"),
            at("\nmeasure_fio ublk \"$ublk\" read-128k-qd1-interrupt "),
            at("kill -TERM \"$daemon\""),
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        let options = |prefix: &str| {
            script
                .lines()
                .filter_map(|l| l.strip_prefix(prefix))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(options("measure_fio kernel \"/dev/$disk\" ").len(), 2);
        assert_eq!(
            options("measure_fio kernel \"/dev/$disk\" "),
            options("measure_fio ublk \"$ublk\" ")
        );
        assert!(script.contains("usb_device 46f4:0001:R3RAW"));
        assert!(script.contains("usb = \"46f4:0001:R3RAW\""));
        assert!(script.contains("driver = \"usb-storage\""));
        assert!(script.contains("expose = \"ublk\""));
        assert!(script.contains("driver_user = \"nobody\""));
        assert!(script.contains("--size=67108864"));
        assert!(script.contains(&format!("steps={}", plan.steps())));
        assert_eq!(script.matches("\nsay ").count() + 2 * 2, plan.steps());
        syntax_ok(&script);
    }

    #[test]
    fn kernel_only_never_starts_ring3d() {
        let workloads = [workload(Pattern::RandRead, 4096, 1)];
        let plan = Plan {
            workloads: &workloads,
            duration_s: 3,
            region_bytes: 64 << 20,
            ring3: None,
        };
        let script = guest_script(&plan);
        assert!(!script.contains("ring3d"));
        assert!(!script.contains("rmmod"));
        assert_eq!(plan.steps(), 3);
        syntax_ok(&script);
    }
}
