//! The shell script the bench runs in the lab guest: both drivers, one VM.
//!
//! 1. find the NVMe controller by its class (0x010802) and its namespace 1 under the
//!    kernel's `nvme` driver (loaded by the lab with `poll_queues=2`);
//! 2. fill the measured region with data, so that reads hit allocated blocks;
//! 3. run each workload on both drivers back to back: fio on the kernel's block device,
//!    `ring3 bench nvme` with the controller on vfio-pci. The order alternates (kernel
//!    then ring3, then ring3 then kernel, ...), so that a change in the host's speed
//!    during the run (other load, a slower phase of the emulation) falls on both drivers
//!    alike, and the controller changes hands (`ring3 bind` / `ring3 unbind`) about once
//!    per workload.
//!
//! Every result file goes back on the console between tagged lines (see [`super::capture`]);
//! a failed run is reported with its exit status and the script carries on. Failing to
//! move the controller between drivers ends the script.

use std::fmt::Write as _;

use super::capture::TAG;
use super::workload::Workload;
use crate::lab::{shell_join, shell_quote};

/// The PCI class of an NVMe controller (mass storage, non-volatile memory, NVMe).
pub const NVME_CLASS: &str = "0x010802";

/// Exit status when the guest has no usable NVMe namespace.
pub const EXIT_NO_DEVICE: i32 = 3;
/// Exit status when the fill pass failed.
pub const EXIT_FILL_FAILED: i32 = 4;
/// Exit status when moving the controller between the drivers failed.
pub const EXIT_SWITCH_FAILED: i32 = 5;

/// The report's note on how this script ended, if not with status 0; `more` explains
/// a bench's own exit statuses.
pub fn exit_note(result: &anyhow::Result<i32>, more: &[(i32, &str)]) -> Option<String> {
    let known = [
        (
            EXIT_NO_DEVICE,
            "no usable NVMe namespace under the kernel driver",
        ),
        (EXIT_FILL_FAILED, "the fill pass failed"),
        (
            EXIT_SWITCH_FAILED,
            "moving the controller between nvme and vfio-pci failed",
        ),
    ];
    let reasons: Vec<(i32, &str)> = known.iter().chain(more).copied().collect();
    any_exit_note(result, &reasons)
}

/// The report's note on how a guest script ended, if not with status 0; `reasons`
/// explains its exit statuses.
pub fn any_exit_note(result: &anyhow::Result<i32>, reasons: &[(i32, &str)]) -> Option<String> {
    match result {
        Ok(0) => None,
        Ok(status) => {
            let why = reasons
                .iter()
                .find(|(code, _)| code == status)
                .map(|(_, why)| format!(": {why}"))
                .unwrap_or_default();
            Some(format!(
                "The guest script stopped with exit status {status}{why}."
            ))
        }
        Err(err) => Some(format!("The lab run failed: {err:#}.")),
    }
}

/// What the guest is to run.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    pub workloads: &'a [Workload],
    /// Seconds per workload.
    pub duration_s: u64,
    /// Bytes from the start of namespace 1 that every workload uses.
    pub region_bytes: u64,
    /// The `ring3` binary, or `None` to measure the kernel driver only.
    pub ring3: Option<&'a str>,
}

/// One numbered step of the script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Write the region once with the kernel driver.
    Fill,
    /// Measure a workload with fio on the kernel driver.
    Kernel(Workload),
    /// Measure a workload with `ring3 bench nvme`.
    Ring3(Workload),
    /// `ring3 bind`: from `nvme` to vfio-pci.
    ToRing3,
    /// `ring3 unbind`: back to `nvme`, and wait for the namespace's block device.
    ToKernel,
}

impl Plan<'_> {
    /// The steps in order: the fill pass, then each workload on both drivers, alternating
    /// which goes first, with the moves between drivers in between.
    pub fn schedule(&self) -> Vec<Step> {
        let mut steps = vec![Step::Fill];
        let mut on_kernel = true;
        for (i, &workload) in self.workloads.iter().enumerate() {
            if self.ring3.is_none() {
                steps.push(Step::Kernel(workload));
                continue;
            }
            let kernel_first = i % 2 == 0;
            for kernel in [kernel_first, !kernel_first] {
                if kernel != on_kernel {
                    steps.push(if kernel {
                        Step::ToKernel
                    } else {
                        Step::ToRing3
                    });
                    on_kernel = kernel;
                }
                steps.push(if kernel {
                    Step::Kernel(workload)
                } else {
                    Step::Ring3(workload)
                });
            }
        }
        steps
    }
}

/// The start of every bench's guest script: its scratch directory `$T`, the step
/// counter and helper functions, then the NVMe controller (`$addr`) and its namespace 1
/// under the kernel driver (`/dev/$disk`), the guest's facts as an `info` block, and
/// `measure_fio` / `measure_kernel`.
pub fn preamble(bench: &str, steps: usize) -> String {
    let mut s = helpers(bench, steps);
    nvme_preamble(&mut s);
    s
}

/// The start of any bench's guest script: its scratch directory `$T`, the step counter
/// and `say` (a numbered step), `emit` (a result file back to the host, see
/// [`super::capture`]) and `show` (a tool's messages, indented).
pub fn helpers(bench: &str, steps: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Generated by `cargo xtask bench {bench}`; runs in the lab guest."
    );
    let _ = writeln!(s, "T=/tmp/ring3-bench");
    let _ = writeln!(s, "mkdir -p \"$T\" || exit 1");
    let _ = writeln!(s, "step=0");
    let _ = writeln!(s, "steps={steps}");
    let _ = writeln!(
        s,
        r#"say() {{ step=$((step + 1)); echo "==> [$step/$steps] $*"; }}
# emit SOURCE ID STATUS FILE: the file between tagged lines, for the host to pick up.
emit() {{
    echo "{TAG} begin $1 $2 $3"
    [ -s "$4" ] && sed 's/^/{TAG} | /' "$4"
    echo "{TAG} end"
}}
# show FILE: a tool's messages, indented.
show() {{ [ -s "$1" ] && sed 's/^/    /' "$1"; }}"#
    );
    s
}

/// The NVMe part of [`preamble`].
fn nvme_preamble(s: &mut String) {
    let _ = writeln!(
        s,
        r#"# find_disk: wait until the controller is on nvme and its namespace 1 has a block device.
find_disk() {{
    disk=
    tries=0
    while [ -z "$disk" ] && [ $tries -lt 300 ]; do
        driver=$(basename "$(readlink "/sys/bus/pci/devices/$addr/driver" 2>/dev/null)" 2>/dev/null)
        if [ "$driver" = nvme ]; then
            for ns in /sys/block/nvme*n*; do
                [ "$(cat "$ns/nsid" 2>/dev/null)" = 1 ] && [ -b "/dev/${{ns##*/}}" ] && disk=${{ns##*/}}
            done
        fi
        [ -n "$disk" ] || {{ sleep 0.1; tries=$((tries + 1)); }}
    done
    [ -n "$disk" ] || echo "bench: $addr is on '${{driver:-no driver}}' and namespace 1 has no block device after 30 s"
    [ -n "$disk" ]
}}"#
    );

    // The controller and its namespace 1.
    let _ = writeln!(
        s,
        r#"addr=
for dev in /sys/bus/pci/devices/*; do
    if [ "$(cat "$dev/class")" = {NVME_CLASS} ]; then addr=${{dev##*/}}; break; fi
done
[ -n "$addr" ] || {{ echo "bench: no NVMe controller (PCI class {NVME_CLASS}) in the guest"; exit {EXIT_NO_DEVICE}; }}
find_disk || exit {EXIT_NO_DEVICE}
echo "bench: NVMe controller $addr, namespace 1 is /dev/$disk"
{{
    echo "guest_kernel=$(uname -r)"
    echo "fio=$(fio --version)"
    echo "device=$addr"
    echo "disk=/dev/$disk"
    echo "logical_block_size=$(cat "/sys/block/$disk/queue/logical_block_size")"
    echo "namespace_bytes=$(( $(cat "/sys/block/$disk/size") * 512 ))"
    echo "nvme_poll_queues=$(cat /sys/module/nvme/parameters/poll_queues)"
    echo "nvme_queues=$(dmesg | grep -o '[0-9]*/[0-9]*/[0-9]* default/read/poll queues' | tail -n 1)"
    echo "cpus=$(nproc)"
    echo "memory_kib=$(awk '/^MemTotal:/ {{ print $2 }}' /proc/meminfo)"
}} > "$T/info"
emit info guest 0 "$T/info""#
    );
    s.push_str(MEASURE_FIO);
    let _ = writeln!(
        s,
        r#"# measure_kernel ID DESCRIPTION FIO-OPTIONS...
measure_kernel() {{ measure_fio kernel "/dev/$disk" "$@"; }}"#
    );
}

/// `measure_fio`: one fio run on a block device, its JSON output emitted as SOURCE ID.
pub const MEASURE_FIO: &str = r#"# measure_fio SOURCE DEVICE ID DESCRIPTION FIO-OPTIONS...
measure_fio() {
    src=$1; dev=$2; id=$3; shift 3
    say "$src: $1"; shift
    fio --filename="$dev" "$@" --output="$T/$src-$id.json" > "$T/$src-$id.log" 2>&1
    rc=$?
    [ $rc = 0 ] || show "$T/$src-$id.log"
    emit "$src" "$id" $rc "$T/$src-$id.json"
}
"#;

/// ring3d's control socket in the guest, for the benches that run it.
pub const RING3D_SOCKET: &str = "/tmp/ring3d.sock";

/// The `[daemon]` part of ring3d's config in the guest, a blank line after it; the
/// driver processes run as `nobody`.
pub fn ring3d_settings() -> String {
    format!(
        r#"[daemon]
socket = "{RING3D_SOCKET}"
driver_user = "nobody"
heartbeat_ms = 200
heartbeat_timeout_ms = 3000
restart_budget = {{ restarts = 100, window_s = 3600 }}

"#
    )
}

/// The shell functions for a ring3d started as `$daemon`: `alive PID`, `status_json`
/// (`ring3 status --json`) and `daemon_failed MESSAGE`, which shows ring3d's log, emits
/// its status and ends the script with `exit_status`.
pub fn ring3d_functions(ring3: &str, exit_status: i32) -> String {
    let ring3 = shell_quote(ring3);
    format!(
        r#"# alive PID: the process runs (a zombie does not).
alive() {{ [ -r "/proc/$1/stat" ] && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]; }}
# status_json: ring3d's view of its devices, on one line without blanks.
status_json() {{ {ring3} status --json --socket {RING3D_SOCKET} 2>/dev/null | tr -d ' \n\t'; }}
daemon_failed() {{
    echo "bench: $*; ring3d's log:"
    show "$T/ring3d.log"
    status_json > "$T/status.json"
    emit status ring3d 1 "$T/status.json"
    exit {exit_status}
}}
"#
    )
}

/// The end of a script that started ring3d: its status emitted, then ring3d stopped with
/// SIGTERM (SIGKILL after 60 s) and its exit status and stop time emitted as `info stop`,
/// with `more` (shell lines that echo `key=value`) in that block; `exit 0`.
pub fn stop_ring3d(more: &str) -> String {
    format!(
        r#"status_json > "$T/status.json"
emit status ring3d 0 "$T/status.json"
say "ring3d: stopping it (SIGTERM)"
t0=$(date +%s%N)
kill -TERM "$daemon"
tries=0
while alive "$daemon" && [ $tries -lt 600 ]; do sleep 0.1; tries=$((tries + 1)); done
if alive "$daemon"; then
    echo "bench: ring3d still runs 60 s after SIGTERM; killing it"
    kill -KILL "$daemon"
fi
wait "$daemon"
rc=$?
{{
    echo "stop_status=$rc"
    echo "stop_ms=$(( ($(date +%s%N) - t0) / 1000000 ))"
{more}}} > "$T/stop"
[ $rc = 0 ] || show "$T/ring3d.log"
emit info stop 0 "$T/stop"
exit 0
"#
    )
}

/// `measure_ring3` (`ring3 bench nvme` on the controller, reported as SOURCE), and
/// `to_ring3` / `to_kernel`, which move the controller between nvme and vfio-pci.
pub fn ring3_functions(ring3: &str, duration_s: u64, region_bytes: u64) -> String {
    let ring3 = shell_quote(ring3);
    format!(
        r#"# measure_ring3 SOURCE ID DESCRIPTION RING3-BENCH-OPTIONS...
measure_ring3() {{
    src=$1; id=$2; shift 2
    say "$src: $1"; shift
    {ring3} bench nvme "$addr" "$@" --duration {duration_s} --offset 0 --size {region_bytes} --json > "$T/$src-$id.json" 2> "$T/$src-$id.log"
    rc=$?
    show "$T/$src-$id.log"
    emit "$src" "$id" $rc "$T/$src-$id.json"
}}
to_ring3() {{
    say "moving $addr to vfio-pci: ring3 bind $addr"
    {ring3} bind "$addr" || {{ echo "bench: ring3 bind $addr failed"; exit {EXIT_SWITCH_FAILED}; }}
}}
to_kernel() {{
    say "moving $addr back to nvme: ring3 unbind $addr"
    {ring3} unbind "$addr" || {{ echo "bench: ring3 unbind $addr failed"; exit {EXIT_SWITCH_FAILED}; }}
    find_disk || exit {EXIT_SWITCH_FAILED}
}}
"#
    )
}

/// The fill pass: the first `region_bytes` of `/dev/$disk` written once, so that reads
/// hit allocated blocks; the script ends when it fails.
pub fn fill(region_bytes: u64) -> String {
    format!(
        r#"say "kernel: filling the first {region_bytes} bytes of /dev/$disk (128 KiB sequential writes, QD32)"
fio --name=fill --filename="/dev/$disk" --ioengine=io_uring --direct=1 --rw=write --bs=128k --iodepth=32 --size={region_bytes} --output-format=json --output="$T/fill.json" > "$T/fill.log" 2>&1
rc=$?
[ $rc = 0 ] || show "$T/fill.log"
emit fill fill $rc "$T/fill.json"
[ $rc = 0 ] || {{ echo "bench: the fill pass failed (fio exit status $rc)"; exit {EXIT_FILL_FAILED}; }}
"#
    )
}

/// The script, for `sh -c`.
pub fn guest_script(plan: &Plan<'_>) -> String {
    let duration = plan.duration_s;
    let region = plan.region_bytes;
    let schedule = plan.schedule();
    let mut s = preamble("nvme", schedule.len());
    if let Some(ring3) = plan.ring3 {
        s.push_str(&ring3_functions(ring3, duration, region));
    }

    for step in &schedule {
        match step {
            Step::Fill => s.push_str(&fill(region)),
            Step::Kernel(workload) => {
                let _ = writeln!(
                    s,
                    "measure_kernel {} {} {}",
                    shell_quote(&workload.id()),
                    shell_quote(&workload.describe()),
                    shell_join(&workload.fio_args(duration, region))
                );
            }
            Step::Ring3(workload) => {
                let _ = writeln!(
                    s,
                    "measure_ring3 ring3 {} {} {}",
                    shell_quote(&workload.id()),
                    shell_quote(&workload.describe()),
                    shell_join(&workload.ring3_args())
                );
            }
            Step::ToRing3 => {
                let _ = writeln!(s, "to_ring3");
            }
            Step::ToKernel => {
                let _ = writeln!(s, "to_kernel");
            }
        }
    }
    let _ = writeln!(s, "exit 0");
    s
}

#[cfg(test)]
mod tests {
    use super::super::workload::workloads;
    use super::*;

    #[test]
    fn both_drivers_alternate_with_one_move_per_workload() {
        let list = workloads(true);
        let plan = Plan {
            workloads: &list,
            duration_s: 3,
            region_bytes: 256 << 20,
            ring3: Some("/w/target/release/ring3"),
        };
        let schedule = plan.schedule();
        assert_eq!(schedule[0], Step::Fill);
        assert_eq!(
            &schedule[1..7],
            [
                Step::Kernel(list[0]),
                Step::ToRing3,
                Step::Ring3(list[0]),
                Step::Ring3(list[1]),
                Step::ToKernel,
                Step::Kernel(list[1]),
            ]
        );
        // Every workload on both drivers, once each.
        for workload in &list {
            assert_eq!(
                schedule
                    .iter()
                    .filter(|s| **s == Step::Kernel(*workload))
                    .count(),
                1
            );
            assert_eq!(
                schedule
                    .iter()
                    .filter(|s| **s == Step::Ring3(*workload))
                    .count(),
                1
            );
        }
        // Measurements only on the driver the controller is on.
        let mut on_kernel = true;
        for step in &schedule {
            match step {
                Step::ToRing3 => on_kernel = false,
                Step::ToKernel => on_kernel = true,
                Step::Kernel(_) | Step::Fill => assert!(on_kernel),
                Step::Ring3(_) => assert!(!on_kernel),
            }
        }
        let moves = schedule
            .iter()
            .filter(|s| matches!(s, Step::ToRing3 | Step::ToKernel))
            .count();
        assert_eq!(moves, list.len());

        let script = guest_script(&plan);
        assert!(script.contains(&format!("steps={}", schedule.len())));
        let fill = script.find("--rw=write").expect("a fill pass");
        let first_kernel = script
            .find("\nmeasure_kernel randread-4k-qd1-interrupt ")
            .expect("kernel runs");
        let bind = script.find("\nto_ring3\n").expect("a move to vfio-pci");
        let first_ring3 = script
            .find("\nmeasure_ring3 ring3 randread-4k-qd1-interrupt ")
            .expect("ring3 runs");
        assert!(fill < first_kernel && first_kernel < bind && bind < first_ring3);
        assert_eq!(script.matches("\nmeasure_kernel ").count(), list.len());
        assert_eq!(script.matches("\nmeasure_ring3 ").count(), list.len());
        assert!(script.contains("--size=268435456"));
        assert!(script.contains("--duration 3 --offset 0 --size 268435456 --json"));
        assert!(script.contains("'4 KiB random read, QD32, polled'"));
        assert!(script.contains(NVME_CLASS));
    }

    #[test]
    fn kernel_only_script_never_moves_the_controller() {
        let list = workloads(true);
        let plan = Plan {
            workloads: &list,
            duration_s: 3,
            region_bytes: 1 << 20,
            ring3: None,
        };
        let schedule = plan.schedule();
        assert_eq!(schedule.len(), 1 + list.len());
        assert!(schedule
            .iter()
            .all(|s| matches!(s, Step::Fill | Step::Kernel(_))));
        let script = guest_script(&plan);
        assert!(!script.contains("bind"));
        assert!(!script.contains("bench nvme \"$addr\""));
        assert!(!script.contains("measure_ring3"));
    }
}
