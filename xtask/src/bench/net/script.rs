//! The guest script of the network bench: one NIC pair, three drivers, one VM.
//!
//! 1. find the pair by PCI IDs (the lower address transmits, the higher receives) and
//!    their interfaces under the kernel's driver, which the lab loaded;
//! 2. the kernel: pktgen on the transmitting interface for each frame size, the
//!    receiving interface's counters before and after;
//! 3. both NICs to vfio-pci (`ring3 bind`), hugepages for DPDK;
//! 4. per frame size, `ring3 bench net`, then DPDK's testpmd: an rxonly instance on the
//!    receiving NIC, then a txonly one on the transmitting NIC, each forwarding on its
//!    own vCPU, stopped with SIGINT after the duration.
//!
//! Around every measurement the script sends a `mark` block (the host samples QEMU's
//! threads' CPU time when it arrives) and afterwards a `cpu` block with the guest's
//! `/proc/stat` totals from before and after, so the report can say where the time went
//! in the guest and in QEMU.

use std::fmt::Write as _;

use super::super::script::helpers;
use super::{Driver, Nic};
use crate::lab::shell_quote;

/// Exit status when the guest does not have two NICs of the kind asked for (the NVMe
/// bench's statuses are 3 to 5).
pub const EXIT_NO_NICS: i32 = 6;
/// Exit status when the NICs could not be moved to vfio-pci.
pub const EXIT_BIND_FAILED: i32 = 7;

/// Hugepages (2 MiB) set aside for the two testpmd instances, and the memory each may
/// take of them, in MiB.
pub const HUGEPAGES: u32 = 300;
pub const TESTPMD_MEMORY_MIB: u32 = 256;
/// Seconds a testpmd instance may take to start forwarding under TCG.
const TESTPMD_START_S: u32 = 120;

/// What the guest is to run.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    pub nic: Nic,
    pub sizes: &'a [usize],
    pub duration_s: u64,
    pub batch: u16,
    pub ring3: &'a str,
}

/// The ID of one measurement in the blocks the guest sends: `ring3-64`.
pub fn measurement_id(driver: Driver, size: usize) -> String {
    format!("{}-{size}", driver.name())
}

impl Plan<'_> {
    /// The measurements in the order the script runs them.
    pub fn order(&self) -> Vec<(Driver, usize)> {
        let mut order: Vec<(Driver, usize)> =
            self.sizes.iter().map(|&s| (Driver::Kernel, s)).collect();
        for &size in self.sizes {
            order.push((Driver::Ring3, size));
            order.push((Driver::Dpdk, size));
        }
        order
    }
}

/// The script, for `sh -c`.
pub fn guest_script(plan: &Plan<'_>) -> String {
    let order = plan.order();
    // The measurements, the move to vfio-pci and the hugepages.
    let mut s = helpers("net", order.len() + 2);
    let (vendor, device) = plan.nic.ids();
    let duration = plan.duration_s;
    let ring3 = shell_quote(plan.ring3);
    let _ = writeln!(
        s,
        r#"D={duration}
# mark ID: a measurement starts (the host samples QEMU's threads when this arrives).
mark() {{ emit mark "$1" 0 /dev/null; }}
# cpu_block ID BEFORE AFTER: the guest's /proc/stat totals around a measurement.
cpu_block() {{ printf 'before %s\nafter %s\n' "$2" "$3" > "$T/cpu-$1"; emit cpu "$1" 0 "$T/cpu-$1"; }}
cpu_now() {{ head -n 1 /proc/stat; }}
set --
for dev in /sys/bus/pci/devices/*; do
    [ "$(cat "$dev/vendor"):$(cat "$dev/device")" = "0x{vendor:04x}:0x{device:04x}" ] && set -- "$@" "${{dev##*/}}"
done
[ $# -ge 2 ] || {{ echo "bench: the guest has $# {name} NICs ({vendor:04x}:{device:04x}), the bench needs two"; exit {EXIT_NO_NICS}; }}
tx=$1; rx=$2
# netif ADDR: the kernel's interface for the NIC, once it has one (30 s at most).
netif() {{
    tries=0
    while [ $tries -lt 300 ]; do
        for n in /sys/bus/pci/devices/$1/net/* /sys/bus/pci/devices/$1/virtio*/net/*; do
            [ -e "$n" ] && {{ echo "${{n##*/}}"; return 0; }}
        done
        sleep 0.1; tries=$((tries + 1))
    done
    return 1
}}
txif=$(netif "$tx"); rxif=$(netif "$rx")
echo "bench: {name} NICs: $tx transmits (${{txif:-no interface}}), $rx receives (${{rxif:-no interface}})"
rxmac=
if [ -n "$txif" ] && [ -n "$rxif" ]; then
    ip link set "$txif" up && ip link set "$rxif" up
    rxmac=$(cat "/sys/class/net/$rxif/address")
    tries=0
    while [ "$(cat "/sys/class/net/$rxif/carrier" 2>/dev/null)" != 1 ] && [ $tries -lt 100 ]; do sleep 0.1; tries=$((tries + 1)); done
fi
{{
    echo "guest_kernel=$(uname -r)"
    echo "nic={name}"
    echo "tx_device=$tx"
    echo "rx_device=$rx"
    echo "tx_interface=$txif"
    echo "rx_interface=$rxif"
    echo "kernel_driver=$(basename "$(readlink "/sys/class/net/$rxif/device/driver" 2>/dev/null)" 2>/dev/null)"
    echo "dpdk=$(dpkg-query -W -f '${{Version}}' dpdk-dev 2>/dev/null)"
    echo "clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
    echo "cpus=$(nproc)"
    echo "memory_kib=$(awk '/^MemTotal:/ {{ print $2 }}' /proc/meminfo)"
}} > "$T/info"
emit info guest 0 "$T/info""#,
        name = plan.nic.name(),
    );

    // The kernel: pktgen.
    let _ = writeln!(
        s,
        r#"# measure_kernel SIZE: pktgen sends SIZE-byte frames on $txif for $D s.
pg() {{ echo "$2" > "/proc/net/pktgen/$1" || echo "bench: pktgen $1 refused '$2'"; }}
measure_kernel() {{
    id=kernel-$1
    say "kernel: pktgen on $txif, $1-byte frames, $D s; $rxif's counters"
    if [ -z "$rxmac" ] || [ ! -e /proc/net/pktgen/pgctrl ]; then
        echo "bench: no kernel interfaces or no pktgen; skipping"
        echo "no kernel interface for the NICs, or pktgen is not loaded" > "$T/$id"
        emit kernel "$1" 1 "$T/$id"
        return
    fi
    pg kpktgend_0 rem_device_all
    pg kpktgend_0 "add_device $txif"
    pg "$txif" "count 0"
    pg "$txif" "pkt_size $1"
    pg "$txif" "dst_mac $rxmac"
    pg "$txif" "delay 0"
    stats=/sys/class/net/$rxif/statistics
    rx0=$(cat $stats/rx_packets); rb0=$(cat $stats/rx_bytes); rd0=$(cat $stats/rx_dropped)
    c0=$(cpu_now); t0=$(date +%s%N)
    mark "$id"
    echo start > /proc/net/pktgen/pgctrl &
    pgpid=$!
    sleep "$D"
    echo stop > /proc/net/pktgen/pgctrl
    t1=$(date +%s%N); c1=$(cpu_now)
    rx1=$(cat $stats/rx_packets); rb1=$(cat $stats/rx_bytes); rd1=$(cat $stats/rx_dropped)
    wait $pgpid
    {{
        echo "ns=$((t1 - t0))"
        echo "rx_packets=$((rx1 - rx0))"
        echo "rx_bytes=$((rb1 - rb0))"
        echo "rx_dropped=$((rd1 - rd0))"
        cat "/proc/net/pktgen/$txif"
    }} > "$T/$id"
    cpu_block "$id" "$c0" "$c1"
    emit kernel "$1" 0 "$T/$id"
}}"#
    );

    // ring3 and DPDK.
    let batch = plan.batch;
    let _ = writeln!(
        s,
        r#"# measure_ring3 SIZE
measure_ring3() {{
    id=ring3-$1
    say "ring3: ring3 bench net, $1-byte frames, $D s"
    c0=$(cpu_now)
    mark "$id"
    {ring3} bench net --tx "$tx" --rx "$rx" --size "$1" --duration "$D" --batch {batch} --json > "$T/$id" 2> "$T/$id.log"
    rc=$?
    c1=$(cpu_now)
    show "$T/$id.log"
    cpu_block "$id" "$c0" "$c1"
    emit ring3 "$1" $rc "$T/$id"
}}
# testpmd NAME MAIN-LCORE ADDR OPTIONS...: starts an instance in the background ($pid) and
# waits until it forwards.
testpmd() {{
    name=$1; main=$2; addr=$3; shift 3
    dpdk-testpmd -l 0,1 --main-lcore "$main" -n 1 --file-prefix "ring3-$name" --huge-dir "$T/huge" -m {TESTPMD_MEMORY_MIB} -a "$addr" -- --nb-cores=1 --burst={batch} --total-num-mbufs=8192 --stats-period 1 "$@" < /dev/null > "$T/dpdk-$name.log" 2>&1 &
    pid=$!
    tries=0
    while ! grep -q "Port statistics" "$T/dpdk-$name.log" && kill -0 $pid 2>/dev/null && [ $tries -lt {start} ]; do
        sleep 0.1; tries=$((tries + 1))
    done
    grep -q "Port statistics" "$T/dpdk-$name.log"
}}
# measure_dpdk SIZE: testpmd rxonly on $rx (forwarding on vCPU 1), txonly on $tx (vCPU 0).
measure_dpdk() {{
    id=dpdk-$1
    say "DPDK: testpmd txonly on $tx, rxonly on $rx, $1-byte frames, $D s"
    if [ -n "$dpdk_missing" ]; then
        echo "$dpdk_missing" > "$T/$id"
        emit dpdk-tx "$1" 1 "$T/$id"
        return
    fi
    rm -f "$T/dpdk-rx.log" "$T/dpdk-tx.log"
    if testpmd rx 0 "$rx" --forward-mode=rxonly; then
        rxpid=$pid
        if testpmd tx 1 "$tx" --forward-mode=txonly --txpkts="$1" --eth-peer="0,$rxmac"; then
            txpid=$pid
            c0=$(cpu_now)
            mark "$id"
            sleep "$D"
            kill -INT $txpid
            c1=$(cpu_now)
        else
            txpid=$pid
            echo "bench: testpmd txonly did not start forwarding"
            kill -INT $txpid 2>/dev/null
        fi
        wait $txpid; txrc=$?
        sleep 1
        kill -INT $rxpid 2>/dev/null
        wait $rxpid; rxrc=$?
    else
        rxpid=$pid
        echo "bench: testpmd rxonly did not start forwarding"
        kill -INT $rxpid 2>/dev/null
        wait $rxpid; rxrc=$?; txrc=1
        : > "$T/dpdk-tx.log"
    fi
    [ -n "$c1" ] && cpu_block "$id" "$c0" "$c1"
    c1=
    emit dpdk-tx "$1" $txrc "$T/dpdk-tx.log"
    emit dpdk-rx "$1" $rxrc "$T/dpdk-rx.log"
}}"#,
        start = TESTPMD_START_S * 10,
    );

    for &(driver, size) in order.iter().filter(|(d, _)| *d == Driver::Kernel) {
        let _ = writeln!(s, "measure_{} {size}", driver.name());
    }

    // To vfio-pci; hugepages for DPDK.
    let _ = writeln!(
        s,
        r#"say "moving $tx and $rx to vfio-pci: ring3 bind"
[ -e /proc/net/pktgen/kpktgend_0 ] && pg kpktgend_0 rem_device_all
for netif in $txif $rxif; do ip link set "$netif" down; done
for addr in "$tx" "$rx"; do
    {ring3} bind "$addr" || {{ echo "bench: ring3 bind $addr failed"; exit {EXIT_BIND_FAILED}; }}
done
say "DPDK: {HUGEPAGES} hugepages of 2 MiB"
dpdk_missing=
if ! command -v dpdk-testpmd > /dev/null; then
    dpdk_missing="dpdk-testpmd is not installed on the host (Debian: apt-get install dpdk-dev)"
else
    echo {HUGEPAGES} > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
    mkdir -p "$T/huge" && mount -t hugetlbfs nodev "$T/huge" || dpdk_missing="could not mount hugetlbfs in the guest"
    got=$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages)
    [ "$got" -ge {needed} ] 2>/dev/null || dpdk_missing="the guest set aside only $got of {HUGEPAGES} hugepages"
fi
[ -n "$dpdk_missing" ] && echo "bench: $dpdk_missing""#,
        // Two instances, each of TESTPMD_MEMORY_MIB, in 2 MiB pages.
        needed = TESTPMD_MEMORY_MIB,
    );
    for &(driver, size) in order.iter().filter(|(d, _)| *d != Driver::Kernel) {
        let _ = writeln!(s, "measure_{} {size}", driver.name());
    }
    let _ = writeln!(s, "exit 0");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_driver_and_size_once_kernel_first() {
        let plan = Plan {
            nic: Nic::VirtioNet,
            sizes: &[64, 1500],
            duration_s: 3,
            batch: 32,
            ring3: "/w/target/release/ring3",
        };
        let order = plan.order();
        assert_eq!(
            order,
            [
                (Driver::Kernel, 64),
                (Driver::Kernel, 1500),
                (Driver::Ring3, 64),
                (Driver::Dpdk, 64),
                (Driver::Ring3, 1500),
                (Driver::Dpdk, 1500),
            ]
        );
        let script = guest_script(&plan);
        assert!(script.contains("steps=8"));
        assert!(script.contains("0x1af4:0x1041"));
        let kernel = script.find("\nmeasure_kernel 1500\n").expect("kernel runs");
        let bind = script.find("bind \"$addr\"").expect("a move to vfio-pci");
        let ring3 = script.find("\nmeasure_ring3 64\n").expect("ring3 runs");
        let dpdk = script.find("\nmeasure_dpdk 1500\n").expect("DPDK runs");
        assert!(kernel < bind && bind < ring3 && ring3 < dpdk);
        assert!(script.contains("--batch 32 --json"));
        assert!(script.contains("--forward-mode=txonly --txpkts=\"$1\""));
        let e1000e = guest_script(&Plan {
            nic: Nic::E1000e,
            ..plan
        });
        assert!(e1000e.contains("0x8086:0x10d3"));
    }
}
