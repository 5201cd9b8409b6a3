//! The guest script of `bench ublk`: the kernel driver, ring3's API and ring3 behind
//! ublk on one controller, in one VM.
//!
//! 1. the controller and its namespace 1 under `nvme`, the fill pass (as in the NVMe
//!    bench, [`crate::bench::script`]);
//! 2. each workload with fio on the kernel's block device;
//! 3. `ring3 bench nvme` (polled, as ring3d's driver polls while I/O is in flight) at the
//!    direct-API depths, the controller moved to vfio-pci and back with `ring3 bind` /
//!    `ring3 unbind`;
//! 4. `ring3d` started on the controller (it unbinds `nvme` itself), and once `ring3
//!    status` says the device runs, each workload with the same fio options on the
//!    `/dev/ublkbN` it exposes;
//! 5. recovery: reads of one block timed with nothing killed (what the measurement itself
//!    costs), then with a QD1 reader running, the driver process killed with SIGKILL
//!    again and again, each time timing one direct read from the kill to its completion
//!    and waiting until the device runs with a new driver process;
//! 6. ring3d stopped with SIGTERM, which must give the controller back to `nvme`.
//!
//! Results go back on the console as in the NVMe bench; the recovery times as lines
//! `baseline I us=N status=S` and `kill I pid=P us=N status=S running_us=N new_pid=P
//! running=0|1` of the block `recovery kills`.

use std::fmt::Write as _;

use crate::bench::script::{
    fill, preamble, ring3_functions, ring3d_functions, ring3d_settings, stop_ring3d,
};
use crate::bench::workload::Workload;
use crate::lab::{shell_join, shell_quote};

/// Exit status when ring3d did not bring the device up.
pub const EXIT_DAEMON_FAILED: i32 = 6;

/// The name of the device in ring3d's config.
pub const DEVICE_NAME: &str = "nvme0";

/// I/O queue pairs and their depth that ring3d's driver gets.
pub const DAEMON_QUEUES: u32 = 2;
pub const DAEMON_QUEUE_DEPTH: u32 = 64;

/// Reads timed with nothing killed, to show what the measurement itself costs.
pub const BASELINE_READS: u32 = 5;

/// How long the script waits for ring3d's device to run, first and after each kill.
const START_TIMEOUT_S: u32 = 120;

/// What the guest is to run.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    /// Measured with fio on the kernel's disk and on the ublk device.
    pub workloads: &'a [Workload],
    /// Measured with `ring3 bench nvme`.
    pub direct: &'a [Workload],
    /// Seconds per workload.
    pub duration_s: u64,
    /// Bytes from the start of namespace 1 that every workload uses.
    pub region_bytes: u64,
    /// Times the driver process is killed.
    pub kills: u32,
    pub ring3: &'a str,
    pub ring3d: &'a str,
}

impl Plan<'_> {
    /// The `say` lines the script prints, for its `[step/steps]` counter.
    fn steps(&self) -> usize {
        // Fill; kernel runs; bind, direct runs, unbind; ring3d start; ublk runs; the
        // baseline and the kills; the stop.
        let n = self.workloads.len();
        1 + n + 2 + self.direct.len() + 1 + n + 1 + self.kills as usize + 1
    }
}

/// ring3d's config for the controller at `$addr`.
fn daemon_config() -> String {
    let settings = ring3d_settings();
    format!(
        r#"{settings}[[device]]
name = "{DEVICE_NAME}"
pci = "$addr"
driver = "nvme"

[device.nvme]
queues = {DAEMON_QUEUES}
queue_depth = {DAEMON_QUEUE_DEPTH}
namespaces = [1]
"#
    )
}

/// The script, for `sh -c`.
pub fn guest_script(plan: &Plan<'_>) -> String {
    let duration = plan.duration_s;
    let region = plan.region_bytes;
    let mut s = preamble("ublk", plan.steps());
    s.push_str(&ring3_functions(plan.ring3, duration, region));
    let ring3d = shell_quote(plan.ring3d);
    let kills = plan.kills;
    let config = daemon_config();
    s.push_str(&ring3d_functions(plan.ring3, EXIT_DAEMON_FAILED));
    let _ = writeln!(
        s,
        r#"# wait_running OLD-PID SECONDS: wait until the device runs with a driver process other
# than OLD-PID and has its ublk block device; sets pid and ublk. Says each other state.
wait_running() {{
    deadline=$(( $(date +%s) + $2 ))
    seen=
    while :; do
        st=$(status_json)
        state=$(printf '%s' "$st" | grep -o '"state":"[a-z_-]*"' | head -n 1 | cut -d'"' -f4)
        pid=$(printf '%s' "$st" | grep -o '"pid":[0-9]*' | head -n 1 | cut -d: -f2)
        ublk=$(printf '%s' "$st" | grep -o '/dev/ublkb[0-9]*' | head -n 1)
        if [ "$state" = running ] && [ -n "$pid" ] && [ "$pid" != "$1" ] && [ -n "$ublk" ] && [ -b "$ublk" ]; then
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
    echo "bench: after $2 s ring3d's device is '${{state:-unknown}}' with driver pid '${{pid:-none}}': $st"
    return 1
}}
# timed_read: one direct read of 4 KiB from the ublk device; sets us and rc.
timed_read() {{
    t0=$(date +%s%N)
    timeout {START_TIMEOUT_S} dd if="$ublk" of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null
    rc=$?
    us=$(( ($(date +%s%N) - t0) / 1000 ))
}}"#
    );

    s.push_str(&fill(region));
    for workload in plan.workloads {
        let _ = writeln!(
            s,
            "measure_kernel {} {} {}",
            shell_quote(&workload.id()),
            shell_quote(&workload.describe()),
            shell_join(&workload.fio_args(duration, region))
        );
    }
    let _ = writeln!(s, "to_ring3");
    for workload in plan.direct {
        let _ = writeln!(
            s,
            "measure_ring3 direct {} {} {}",
            shell_quote(&workload.id()),
            shell_quote(&workload.describe()),
            shell_join(&workload.ring3_args())
        );
    }
    let _ = writeln!(s, "to_kernel");

    let _ = writeln!(
        s,
        r#"say "ring3d: starting it on $addr (namespace 1 exposed through ublk)"
cat > "$T/ring3d.toml" <<RING3D_CONFIG
{config}RING3D_CONFIG
{ring3d} --config "$T/ring3d.toml" > "$T/ring3d.log" 2>&1 &
daemon=$!
started=$(date +%s%N)
wait_running none {START_TIMEOUT_S} || daemon_failed "ring3d did not bring the device up"
echo "bench: ring3d's device runs after $(( ($(date +%s%N) - started) / 1000000 )) ms, driver pid $pid, namespace 1 is $ublk"
{{
    echo "ublk_device=$ublk"
    echo "ublk_queues=$(ls -d /sys/block/${{ublk##*/}}/mq/* 2>/dev/null | wc -l)"
    echo "ublk_max_sectors=$(cat /sys/block/${{ublk##*/}}/queue/max_sectors_kb 2>/dev/null) KiB"
}} > "$T/info-ublk"
emit info ublk 0 "$T/info-ublk"
measure_ublk() {{ measure_fio ublk "$ublk" "$@"; }}"#
    );
    for workload in plan.workloads {
        let _ = writeln!(
            s,
            "measure_ublk {} {} {}",
            shell_quote(&workload.id()),
            shell_quote(&workload.describe()),
            shell_join(&workload.fio_args(duration, region))
        );
    }

    let _ = writeln!(
        s,
        r#"say "recovery: {BASELINE_READS} timed reads of 4 KiB from $ublk with nothing killed"
: > "$T/recovery"
i=0
while [ $i -lt {BASELINE_READS} ]; do
    i=$((i + 1))
    timed_read
    echo "baseline $i us=$us status=$rc" >> "$T/recovery"
done
fio --name=reader --filename="$ublk" --ioengine=psync --direct=1 --rw=randread --bs=4k --size={region} --norandommap --randrepeat=0 --time_based --runtime=86400 --continue_on_error=all --output-format=json --output="$T/reader.json" > "$T/reader.log" 2>&1 &
reader=$!
sleep 1
i=0
while [ $i -lt {kills} ]; do
    i=$((i + 1))
    say "recovery: SIGKILL $i of {kills} to the driver process $pid"
    old=$pid
    t0=$(date +%s%N)
    kill -KILL "$old"
    timeout {START_TIMEOUT_S} dd if="$ublk" of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null
    rc=$?
    us=$(( ($(date +%s%N) - t0) / 1000 ))
    if wait_running "$old" {START_TIMEOUT_S}; then up=1; else up=0; fi
    running_us=$(( ($(date +%s%N) - t0) / 1000 ))
    echo "kill $i pid=$old us=$us status=$rc running_us=$running_us new_pid=${{pid:-none}} running=$up" >> "$T/recovery"
    echo "    read completed $((us / 1000)) ms after the kill (dd status $rc); running again after $((running_us / 1000)) ms"
    [ $up = 1 ] || break
done
kill -INT "$reader" 2>/dev/null
wait "$reader"
emit reader reader $? "$T/reader.json"
emit recovery kills 0 "$T/recovery"
[ $up = 1 ] || daemon_failed "the device did not come back after kill $i""#
    );
    s.push_str(&stop_ring3d(
        r#"    if find_disk; then echo "after_stop=back on nvme as /dev/$disk"; else echo "after_stop=not back on nvme"; fi
"#,
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::{Completion, Pattern};

    fn randread(queue_depth: u32, completion: Completion) -> Workload {
        Workload {
            pattern: Pattern::RandRead,
            block_size: 4096,
            queue_depth,
            completion,
        }
    }

    #[test]
    fn every_part_in_order() {
        let workloads = [
            randread(1, Completion::Interrupt),
            randread(32, Completion::Interrupt),
        ];
        let direct = [randread(1, Completion::Poll)];
        let plan = Plan {
            workloads: &workloads,
            direct: &direct,
            duration_s: 3,
            region_bytes: 256 << 20,
            kills: 4,
            ring3: "/w/target/release/ring3",
            ring3d: "/w/target/release/ring3d",
        };
        let script = guest_script(&plan);
        let at = |needle: &str| {
            script
                .find(needle)
                .unwrap_or_else(|| panic!("{needle:?} in the script"))
        };
        let order = [
            at("--rw=write"),
            at("\nmeasure_kernel randread-4k-qd1-interrupt "),
            at("\nto_ring3\n"),
            at("\nmeasure_ring3 direct randread-4k-qd1-poll "),
            at("\nto_kernel\n"),
            at("/w/target/release/ring3d --config"),
            at("\nmeasure_ublk randread-4k-qd1-interrupt "),
            at("kill -KILL \"$old\""),
            at("kill -TERM \"$daemon\""),
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        assert_eq!(script.matches("\nmeasure_kernel ").count(), 2);
        assert_eq!(script.matches("\nmeasure_ublk ").count(), 2);
        // The same fio options on both block devices.
        let options = |prefix: &str| {
            script
                .lines()
                .filter(|l| l.starts_with(prefix))
                .map(|l| l.split_once(' ').map(|(_, rest)| rest.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(options("measure_kernel "), options("measure_ublk "));
        assert!(script.contains("while [ $i -lt 4 ]"));
        assert!(script.contains(&format!("steps={}", plan.steps())));
        assert!(script.contains("pci = \"$addr\""));
        assert!(script.contains("socket = \"/tmp/ring3d.sock\""));
        assert!(script.contains("--socket /tmp/ring3d.sock"));

        // The shell reads it without a syntax error.
        let check = std::process::Command::new("sh")
            .args(["-n", "-c", &script])
            .output()
            .expect("running sh -n");
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
}
