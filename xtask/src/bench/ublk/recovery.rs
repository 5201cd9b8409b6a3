//! The recovery measurement: what the guest's `recovery kills` block says, and its
//! median and maximum.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// One SIGKILL to the driver process.
#[derive(Debug, Clone, PartialEq)]
pub struct Kill {
    /// The driver process killed.
    pub pid: u32,
    /// From the kill to the completion of the read issued right after it.
    pub read_us: u64,
    /// dd's exit status: 0 when the read completed without error.
    pub read_status: i32,
    /// From the kill until `ring3 status` showed the device running with a new process.
    pub running_us: u64,
    /// Whether it did, within the script's limit.
    pub running: bool,
}

impl Kill {
    /// Whether the read after the kill completed without error.
    pub fn recovered(&self) -> bool {
        self.read_status == 0
    }
}

/// Everything the recovery block holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recovery {
    /// Microseconds of each timed read with nothing killed, and dd's status.
    pub baseline: Vec<(u64, i32)>,
    pub kills: Vec<Kill>,
}

/// `key=value` of the line's fields.
fn field<'a>(fields: &[&'a str], key: &str) -> Result<&'a str> {
    fields
        .iter()
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
        .with_context(|| format!("no {key}="))
}

fn number<T: std::str::FromStr>(fields: &[&str], key: &str) -> Result<T> {
    let text = field(fields, key)?;
    text.parse()
        .ok()
        .with_context(|| format!("{key}={text} is not a number"))
}

impl Recovery {
    /// Parses the block's lines; a line it does not know is an error naming it.
    pub fn parse(text: &str) -> Result<Recovery> {
        let mut recovery = Recovery::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let parsed = match fields.first() {
                Some(&"baseline") => number(&fields, "us")
                    .and_then(|us| Ok((us, number(&fields, "status")?)))
                    .map(|sample| recovery.baseline.push(sample)),
                Some(&"kill") => (|| {
                    Ok(Kill {
                        pid: number(&fields, "pid")?,
                        read_us: number(&fields, "us")?,
                        read_status: number(&fields, "status")?,
                        running_us: number(&fields, "running_us")?,
                        running: field(&fields, "running")? == "1",
                    })
                })()
                .map(|kill| recovery.kills.push(kill)),
                _ => Err(anyhow::anyhow!("unknown line")),
            };
            parsed.with_context(|| format!("recovery line {line:?}"))?;
        }
        if recovery.kills.is_empty() {
            bail!("the recovery block has no kills");
        }
        Ok(recovery)
    }

    /// The kills whose read completed.
    pub fn recovered(&self) -> impl Iterator<Item = &Kill> {
        self.kills.iter().filter(|k| k.recovered())
    }

    /// Median and maximum of the kill-to-read times of the recovered kills, in ms.
    pub fn read_ms(&self) -> Option<Stats> {
        Stats::of(self.recovered().map(|k| k.read_us))
    }

    /// Median and maximum of the kill-to-"running" times, in ms.
    pub fn running_ms(&self) -> Option<Stats> {
        Stats::of(
            self.kills
                .iter()
                .filter(|k| k.running)
                .map(|k| k.running_us),
        )
    }

    /// Median and maximum of the reads with nothing killed, in ms.
    pub fn baseline_ms(&self) -> Option<Stats> {
        Stats::of(
            self.baseline
                .iter()
                .filter(|(_, status)| *status == 0)
                .map(|(us, _)| *us),
        )
    }

    pub fn json(&self) -> Value {
        let stats = |s: Option<Stats>| s.map(|s| json!({ "median_ms": s.median, "max_ms": s.max }));
        json!({
            "kills": self.kills.len(),
            "recovered": self.recovered().count(),
            "kill_to_read": stats(self.read_ms()),
            "kill_to_running": stats(self.running_ms()),
            "baseline_read": stats(self.baseline_ms()),
            "baseline_us": self.baseline.iter().map(|(us, status)| json!({ "us": us, "status": status })).collect::<Vec<_>>(),
            "each": self.kills.iter().map(|k| json!({
                "pid": k.pid,
                "read_us": k.read_us,
                "read_status": k.read_status,
                "running_us": k.running_us,
                "running": k.running,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Median and maximum of a sample, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub max: f64,
    pub count: usize,
}

impl Stats {
    /// Of microsecond values; `None` for none.
    fn of(values: impl Iterator<Item = u64>) -> Option<Stats> {
        let mut ms: Vec<f64> = values.map(|us| us as f64 / 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => ms[n / 2],
            _ => (ms[n / 2 - 1] + ms[n / 2]) / 2.0,
        };
        Some(Stats {
            median,
            max: ms[n - 1],
            count: n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "baseline 1 us=9000 status=0\n\
                          baseline 2 us=11000 status=0\n\
                          kill 1 pid=210 us=1500000 status=0 running_us=1800000 new_pid=233 running=1\n\
                          kill 2 pid=233 us=900000 status=0 running_us=1200000 new_pid=250 running=1\n\
                          kill 3 pid=250 us=120000000 status=124 running_us=121000000 new_pid=none running=0\n";

    #[test]
    fn parses_and_summarises() {
        let recovery = Recovery::parse(SAMPLE).expect("parses");
        assert_eq!(recovery.kills.len(), 3);
        assert_eq!(recovery.recovered().count(), 2);
        let read = recovery.read_ms().expect("two recovered");
        assert_eq!((read.median, read.max, read.count), (1200.0, 1500.0, 2));
        let running = recovery.running_ms().expect("two ran again");
        assert_eq!(running.median, 1500.0);
        assert_eq!(recovery.baseline_ms().map(|s| s.median), Some(10.0));
        let json = recovery.json();
        assert_eq!(json["recovered"], 2);
        assert_eq!(json["each"][2]["read_status"], 124);
    }

    #[test]
    fn odd_counts_take_the_middle() {
        let stats = Stats::of([5000, 1000, 3000].into_iter()).expect("values");
        assert_eq!((stats.median, stats.max), (3.0, 5.0));
        assert_eq!(Stats::of(std::iter::empty()), None);
    }

    #[test]
    fn bad_lines_are_named() {
        let err = Recovery::parse("kill 1 pid=x us=1 status=0 running_us=1 running=1")
            .expect_err("pid is not a number");
        assert!(format!("{err:#}").contains("pid=x"), "{err:#}");
        assert!(Recovery::parse("surprise\n").is_err());
        assert!(Recovery::parse("baseline 1 us=5 status=0\n").is_err());
    }
}
