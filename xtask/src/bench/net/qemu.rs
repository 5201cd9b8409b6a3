//! Where QEMU's CPU time went during each measurement, sampled on the host.
//!
//! Under TCG each vCPU is a host thread running translated guest code; the NICs' device
//! models run in QEMU's main loop (the process's first thread): virtio-net's transmit
//! bottom half, the hub and the receive path, and the e1000e's transmit and receive
//! rings. The guest sends a `mark` block when a measurement starts and a `cpu` block when
//! it ends; the host reads every QEMU thread's CPU time from `/proc` when each arrives.
//! QEMU names its threads (`CPU 0/TCG`) when started with `-name ...,debug-threads=on`.

use std::collections::HashMap;
use std::fs;
use std::time::Instant;

/// QEMU's threads' CPU time at one moment, in clock ticks, by kind, and the host's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    at: Instant,
    main_loop: u64,
    vcpus: u64,
    other: u64,
    /// All the host's CPUs: time in processes (user, nice, system; not interrupts, which
    /// no thread is charged for) and in all.
    host_busy: u64,
    host_total: u64,
}

/// Each kind of QEMU thread's CPU time over a measurement, in percent of one host CPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QemuCpu {
    /// The main loop thread: the device models, the hub, timers.
    pub main_loop_percent: f64,
    /// All vCPU threads together: the guest's code, translated.
    pub vcpus_percent: f64,
    /// The rest (RCU, I/O workers).
    pub other_percent: f64,
    /// The host's CPU time that went to other processes (user and system time not in
    /// QEMU's threads), in percent of all the host's CPUs: what a busy host took from the
    /// measurement.
    pub host_others_percent: f64,
    pub seconds: f64,
}

/// The QEMU process this process started, if it is running.
fn qemu_pid() -> Option<u32> {
    let ours = std::process::id();
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
        let (name, rest) = split_stat(&stat)?;
        let parent: u32 = rest.get(1)?.parse().ok()?;
        (parent == ours && name.starts_with("qemu-system")).then_some(pid)
    })
}

/// A `stat` file's command name and the fields after it (state first).
fn split_stat(stat: &str) -> Option<(&str, Vec<&str>)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    Some((
        &stat[open + 1..close],
        stat[close + 1..].split_whitespace().collect(),
    ))
}

/// utime + stime of a `stat` file's fields after the name (fields 14 and 15 of the file).
fn cpu_ticks(fields: &[&str]) -> Option<u64> {
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The aggregate `cpu` line of `/proc/stat`: ticks spent in processes, and all ticks.
fn host_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    let total: u64 = fields.iter().sum();
    // user, nice and system: what the threads' utime and stime add up to.
    Some((field(0) + field(1) + field(2), total))
}

/// QEMU's threads now, or `None` if QEMU cannot be found.
pub fn sample() -> Option<Sample> {
    let pid = qemu_pid()?;
    let (host_busy, host_total) = host_ticks(&fs::read_to_string("/proc/stat").ok()?)?;
    let mut sample = Sample {
        at: Instant::now(),
        main_loop: 0,
        vcpus: 0,
        other: 0,
        host_busy,
        host_total,
    };
    for entry in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((name, fields)) = split_stat(&stat) else {
            continue;
        };
        let Some(ticks) = cpu_ticks(&fields) else {
            continue;
        };
        if tid == pid {
            sample.main_loop += ticks;
        } else if name.starts_with("CPU ") {
            sample.vcpus += ticks;
        } else {
            sample.other += ticks;
        }
    }
    Some(sample)
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

/// QEMU's CPU use from `before` to `after`.
pub fn between(before: &Sample, after: &Sample) -> Option<QemuCpu> {
    let seconds = after.at.checked_duration_since(before.at)?.as_secs_f64();
    if seconds <= 0.0 {
        return None;
    }
    let ticks = ticks_per_second();
    let percent = |a: u64, b: u64| 100.0 * b.saturating_sub(a) as f64 / ticks / seconds;
    let qemu = |s: &Sample| s.main_loop + s.vcpus + s.other;
    let host_total = after.host_total.saturating_sub(before.host_total) as f64;
    let others = after
        .host_busy
        .saturating_sub(before.host_busy)
        .saturating_sub(qemu(after).saturating_sub(qemu(before)));
    Some(QemuCpu {
        main_loop_percent: percent(before.main_loop, after.main_loop),
        vcpus_percent: percent(before.vcpus, after.vcpus),
        other_percent: percent(before.other, after.other),
        host_others_percent: if host_total > 0.0 {
            100.0 * others as f64 / host_total
        } else {
            0.0
        },
        seconds,
    })
}

/// Samples taken at each measurement's `mark`, and the results once its `cpu` block came.
#[derive(Debug, Default)]
pub struct Profiler {
    started: HashMap<String, Sample>,
    pub measured: HashMap<String, QemuCpu>,
}

impl Profiler {
    /// A measurement `id` starts.
    pub fn start(&mut self, id: &str) {
        if let Some(sample) = sample() {
            self.started.insert(id.to_string(), sample);
        }
    }

    /// Measurement `id` ended.
    pub fn stop(&mut self, id: &str) {
        let Some(before) = self.started.remove(id) else {
            return;
        };
        if let Some(cpu) = sample().and_then(|after| between(&before, &after)) {
            self.measured.insert(id.to_string(), cpu);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_files_with_spaces_in_the_name() {
        let stat = "4242 (CPU 0/TCG) R 4200 1 2 3 4 5 6 7 8 9 150 50 0 0 20 0 5 0 1 2 3";
        let (name, fields) = split_stat(stat).expect("parses");
        assert_eq!(name, "CPU 0/TCG");
        assert_eq!(fields[1], "4200");
        assert_eq!(cpu_ticks(&fields), Some(200));
    }

    #[test]
    fn percent_of_one_cpu() {
        let before = Sample {
            at: Instant::now(),
            main_loop: 0,
            vcpus: 0,
            other: 0,
            host_busy: 0,
            host_total: 0,
        };
        let ticks = ticks_per_second() as u64;
        // Two host CPUs for 2 s: 4 s of CPU time, 3.5 s busy, 0.5 s of it not QEMU's.
        let after = Sample {
            at: before.at + std::time::Duration::from_secs(2),
            main_loop: 2 * ticks,
            vcpus: ticks,
            other: 0,
            host_busy: 7 * ticks / 2,
            host_total: 4 * ticks,
        };
        let cpu = between(&before, &after).expect("computes");
        assert!((cpu.main_loop_percent - 100.0).abs() < 1e-9, "{cpu:?}");
        assert!((cpu.vcpus_percent - 50.0).abs() < 1e-9, "{cpu:?}");
        assert!((cpu.host_others_percent - 12.5).abs() < 1e-9, "{cpu:?}");
        assert_eq!(host_ticks("cpu  10 0 5 80 2 1 1 1 0 0\n"), Some((15, 100)));
        assert!(between(&after, &before).is_none());
    }

    #[test]
    fn no_qemu_here() {
        // The unit tests start no QEMU.
        assert!(sample().is_none());
    }
}
