//! How much of the host's CPU time went elsewhere while the VM ran.
//!
//! Under TCG the guest's speed is the host's: another process (a build, a second VM)
//! taking CPU time slows whichever driver is being measured at that moment. The host's
//! busy time from `/proc/stat`, less the CPU time of this process and of its children
//! (QEMU, once waited for), is what other processes used; steal time is what the
//! hypervisor under this host took.

use std::fs;
use std::time::Duration;

/// Host CPU counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuSnapshot {
    /// All CPUs' time counters from `/proc/stat`, in clock ticks.
    stat: StatTicks,
    /// CPU time of this process and its waited-for children.
    ours: Duration,
}

/// The aggregate `cpu` line of `/proc/stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct StatTicks {
    busy: u64,
    steal: u64,
    total: u64,
}

/// Where the host's CPU time went between two snapshots, in percent of all of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostLoad {
    /// Used by processes other than the bench and its VM.
    pub others_percent: f64,
    /// Taken by the hypervisor this host runs under.
    pub steal_percent: f64,
}

/// Parses the first (`cpu `) line of `/proc/stat`: user nice system idle iowait irq
/// softirq steal [guest guest_nice]; guest time is already counted in user.
fn parse_stat(text: &str) -> Option<StatTicks> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    if fields.len() < 4 {
        return None;
    }
    let (idle, iowait, steal) = (field(3), field(4), field(7));
    let total: u64 = fields.iter().take(8).sum();
    Some(StatTicks {
        busy: total - idle - iowait - steal,
        steal,
        total,
    })
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

fn rusage_cpu(who: libc::c_int) -> Option<Duration> {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage through a pointer to a live, correctly typed
    // value and has no other preconditions.
    if unsafe { libc::getrusage(who, &mut usage) } != 0 {
        return None;
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    Some(time(usage.ru_utime) + time(usage.ru_stime))
}

/// The counters now, or `None` where `/proc/stat` cannot be read.
pub fn snapshot() -> Option<CpuSnapshot> {
    let stat = parse_stat(&fs::read_to_string("/proc/stat").ok()?)?;
    let ours = rusage_cpu(libc::RUSAGE_SELF)? + rusage_cpu(libc::RUSAGE_CHILDREN)?;
    Some(CpuSnapshot { stat, ours })
}

/// Where the host's CPU time went from `before` to `after`.
pub fn between(before: &CpuSnapshot, after: &CpuSnapshot) -> Option<HostLoad> {
    load(before, after, ticks_per_second())
}

fn load(before: &CpuSnapshot, after: &CpuSnapshot, ticks_per_second: f64) -> Option<HostLoad> {
    let total = after.stat.total.checked_sub(before.stat.total)? as f64;
    if total <= 0.0 {
        return None;
    }
    let busy = after.stat.busy.checked_sub(before.stat.busy)? as f64;
    let steal = after.stat.steal.checked_sub(before.stat.steal)? as f64;
    let ours = after.ours.checked_sub(before.ours)?.as_secs_f64() * ticks_per_second;
    Some(HostLoad {
        others_percent: (100.0 * (busy - ours) / total).clamp(0.0, 100.0),
        steal_percent: 100.0 * steal / total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_line() {
        let text = "cpu  100 5 50 800 10 3 2 30 0 0\ncpu0 50 2 25 400 5 1 1 15 0 0\nintr 1\n";
        let ticks = parse_stat(text).expect("parses");
        assert_eq!(ticks.total, 1000);
        assert_eq!(ticks.steal, 30);
        assert_eq!(ticks.busy, 1000 - 800 - 10 - 30);
        assert_eq!(parse_stat("intr 1\n"), None);
        assert_eq!(parse_stat("cpu  a b c d\n"), None);
        // Old kernels print fewer columns.
        assert_eq!(parse_stat("cpu  1 2 3 4\n").map(|t| t.total), Some(10));
    }

    #[test]
    fn others_are_busy_time_minus_ours() {
        let before = CpuSnapshot {
            stat: StatTicks {
                busy: 1000,
                steal: 0,
                total: 10_000,
            },
            ours: Duration::from_secs(5),
        };
        // 2000 ticks passed; 1500 busy, of which 12 s (1200 ticks) were ours; 100 stolen.
        let after = CpuSnapshot {
            stat: StatTicks {
                busy: 2500,
                steal: 100,
                total: 12_000,
            },
            ours: Duration::from_secs(17),
        };
        let load = load(&before, &after, 100.0).expect("computes");
        assert!((load.others_percent - 15.0).abs() < 1e-9, "{load:?}");
        assert!((load.steal_percent - 5.0).abs() < 1e-9, "{load:?}");
        assert_eq!(super::load(&after, &before, 100.0), None);
    }

    #[test]
    fn snapshots_work_here() {
        let first = snapshot().expect("/proc/stat is readable");
        let second = snapshot().expect("/proc/stat is readable");
        if let Some(load) = between(&first, &second) {
            assert!((0.0..=100.0).contains(&load.others_percent));
        }
    }
}
