//! What one workload measured, read from fio's JSON (the kernel driver) or from
//! `ring3 bench nvme --json` (ring3), into one shape both drivers share.
//!
//! Both inputs come from programs run in the guest, so nothing here trusts them: missing
//! fields, wrong types and non-finite numbers are errors naming the field.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

/// Latency from submission to completion, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

/// One workload's result for one driver.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// I/O operations per second over the measured interval.
    pub iops: f64,
    pub bandwidth_bytes_per_s: f64,
    /// I/Os completed.
    pub ios: u64,
    pub latency_us: Latency,
    /// CPU time (user + system) over wall time, in percent of one CPU.
    pub cpu_percent: Option<f64>,
    /// I/O errors the tool reported (fio: the job's error code, non-zero on failure).
    pub errors: u64,
    /// How long the workload ran, in seconds.
    pub duration_s: f64,
}

fn finite(value: f64, what: &str) -> Result<f64> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        bail!("{what} is {value}, not a finite, non-negative number")
    }
}

impl Latency {
    fn checked(self, what: &str) -> Result<Latency> {
        Ok(Latency {
            mean: finite(self.mean, &format!("{what} mean"))?,
            p50: finite(self.p50, &format!("{what} p50"))?,
            p99: finite(self.p99, &format!("{what} p99"))?,
            p99_9: finite(self.p99_9, &format!("{what} p99.9"))?,
            max: finite(self.max, &format!("{what} max"))?,
        })
    }
}

/// A closed loop at queue depth QD keeps about QD I/Os in flight, so by Little's law the
/// mean latency is about QD / IOPS. A result further from that than a factor of four
/// either way has latencies that cannot be right; this says why.
pub fn implausible_latency(queue_depth: u32, m: &Measurement) -> Option<String> {
    if m.iops <= 0.0 {
        return None;
    }
    let in_flight = m.latency_us.mean * m.iops / 1e6;
    let depth = f64::from(queue_depth);
    (in_flight < depth / 4.0 || in_flight > depth * 4.0).then(|| {
        format!(
            "a mean of {:.3} µs at {:.0} IOPS means {in_flight:.3} I/Os in flight on average \
             (Little's law), not about {queue_depth}",
            m.latency_us.mean, m.iops
        )
    })
}

// ---------------------------------------------------------------------------
// fio
// ---------------------------------------------------------------------------

/// The direction fio reports a workload under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

impl Direction {
    fn key(self) -> &'static str {
        match self {
            Direction::Read => "read",
            Direction::Write => "write",
        }
    }
}

/// fio's JSON output (`--output-format=json`): anything before the first `{` (fio prints
/// warnings there) is skipped.
pub fn parse_fio_output(text: &str) -> Result<Value> {
    let start = text
        .find('{')
        .context("fio printed no JSON object (is the output truncated?)")?;
    serde_json::from_str(&text[start..]).context("fio's output is not valid JSON")
}

/// The first job of fio's output, which is the only one the bench runs.
pub fn fio_job(output: &Value) -> Result<&Value> {
    output
        .get("jobs")
        .and_then(Value::as_array)
        .and_then(|jobs| jobs.first())
        .context("fio's JSON has no jobs[0]")
}

fn number(value: &Value, path: &[&str]) -> Result<f64> {
    let mut node = value;
    for key in path {
        node = node
            .get(key)
            .with_context(|| format!("fio's JSON has no {}", path.join(".")))?;
    }
    let number = node
        .as_f64()
        .with_context(|| format!("fio's {} is not a number: {node}", path.join(".")))?;
    finite(number, &format!("fio's {}", path.join(".")))
}

/// A percentile from fio's `percentile` map, whose keys look like `99.900000`.
fn percentile(latency: &Value, which: f64, what: &str) -> Result<f64> {
    let map = latency
        .get("percentile")
        .and_then(Value::as_object)
        .with_context(|| {
            format!("fio's {what} has no percentiles (run fio with --{what}_percentiles=1)")
        })?;
    for (key, value) in map {
        if let Ok(key) = key.parse::<f64>() {
            if (key - which).abs() < 1e-6 {
                let ns = value
                    .as_f64()
                    .with_context(|| format!("fio's {what} p{key} is not a number"))?;
                return finite(ns, &format!("fio's {what} p{key}"));
            }
        }
    }
    bail!("fio's {what} has no {which} percentile (add it to --percentile_list)")
}

/// The measurement of fio job `job` in direction `direction`. Latency is fio's total
/// latency (`lat_ns`, submission to completion, which needs `--lat_percentiles=1`); when
/// only completion latency (`clat_ns`) has percentiles, that is used.
pub fn fio_measurement(job: &Value, direction: Direction) -> Result<Measurement> {
    let error = number(job, &["error"])?;
    let data = job
        .get(direction.key())
        .with_context(|| format!("fio's job has no `{}` section", direction.key()))?;
    let latency_key = if data
        .get("lat_ns")
        .and_then(|lat| lat.get("percentile"))
        .is_some()
    {
        "lat_ns"
    } else {
        "clat_ns"
    };
    let latency = data
        .get(latency_key)
        .with_context(|| format!("fio's job has no {}.{latency_key}", direction.key()))?;
    let what = latency_key.trim_end_matches("_ns");
    let us = |ns: f64| ns / 1000.0;
    let latency_us = Latency {
        mean: us(number(latency, &["mean"])?),
        p50: us(percentile(latency, 50.0, what)?),
        p99: us(percentile(latency, 99.0, what)?),
        p99_9: us(percentile(latency, 99.9, what)?),
        max: us(number(latency, &["max"])?),
    };
    let cpu = number(job, &["usr_cpu"])? + number(job, &["sys_cpu"])?;
    let runtime_ms = number(data, &["runtime"])?;
    Ok(Measurement {
        iops: number(data, &["iops"])?,
        bandwidth_bytes_per_s: number(data, &["bw_bytes"])?,
        ios: number(data, &["total_ios"])? as u64,
        latency_us,
        cpu_percent: Some(cpu),
        errors: error as u64,
        duration_s: runtime_ms / 1000.0,
    })
}

// ---------------------------------------------------------------------------
// ring3 bench nvme --json
// ---------------------------------------------------------------------------

/// The object `ring3 bench nvme --json` prints.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Ring3Report {
    pub device: String,
    pub nsid: u32,
    pub pattern: String,
    pub block_size: u64,
    pub queue_depth: u32,
    pub queues: u32,
    /// `poll` or `interrupt`.
    pub completion: String,
    pub duration_s: f64,
    pub ios: u64,
    pub iops: f64,
    pub bandwidth_bytes_per_s: f64,
    pub latency_us: Latency,
    pub cpu: Ring3Cpu,
    pub errors: u64,
}

/// CPU time `ring3 bench` used.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Ring3Cpu {
    pub user_s: f64,
    pub system_s: f64,
    pub percent: f64,
}

/// Parses `ring3 bench nvme --json`'s standard output: one JSON object, possibly after
/// stray lines.
pub fn parse_ring3_output(text: &str) -> Result<(Value, Ring3Report)> {
    let start = text
        .find('{')
        .context("ring3 bench printed no JSON object")?;
    let raw: Value =
        serde_json::from_str(&text[start..]).context("ring3 bench's output is not valid JSON")?;
    let report: Ring3Report = serde_json::from_value(raw.clone())
        .context("ring3 bench's JSON does not have the expected fields")?;
    Ok((raw, report))
}

impl Ring3Report {
    /// The shared measurement, with every number checked.
    pub fn measurement(&self) -> Result<Measurement> {
        if !matches!(self.completion.as_str(), "poll" | "interrupt") {
            bail!(
                "ring3 bench reported completion {:?}, expected \"poll\" or \"interrupt\"",
                self.completion
            );
        }
        Ok(Measurement {
            iops: finite(self.iops, "ring3's iops")?,
            bandwidth_bytes_per_s: finite(
                self.bandwidth_bytes_per_s,
                "ring3's bandwidth_bytes_per_s",
            )?,
            ios: self.ios,
            latency_us: self.latency_us.checked("ring3's latency_us")?,
            cpu_percent: Some(finite(self.cpu.percent, "ring3's cpu.percent")?),
            errors: self.errors,
            duration_s: finite(self.duration_s, "ring3's duration_s")?,
        })
    }
}

#[cfg(test)]
pub(crate) mod samples {
    /// Trimmed output of `fio --output-format=json --lat_percentiles=1` for a randread job
    /// (fio 3.33), with a warning line before it as fio sometimes prints.
    pub(crate) const FIO_RANDREAD: &str = r#"note: a warning fio printed first
{
  "fio version" : "fio-3.33",
  "timestamp" : 1700000000,
  "jobs" : [
    {
      "jobname" : "randread-4k-qd32-interrupt",
      "groupid" : 0,
      "error" : 0,
      "job options" : { "rw" : "randread", "bs" : "4096", "iodepth" : "32" },
      "read" : {
        "io_bytes" : 409600000,
        "bw_bytes" : 40960000,
        "iops" : 10000.5,
        "runtime" : 10000,
        "total_ios" : 100005,
        "short_ios" : 0,
        "drop_ios" : 0,
        "slat_ns" : { "min" : 1000, "max" : 90000, "mean" : 2000.0, "stddev" : 10.0, "N" : 100005 },
        "clat_ns" : {
          "min" : 100000, "max" : 9000000, "mean" : 3100000.0, "stddev" : 1000.0, "N" : 100005,
          "percentile" : { "50.000000" : 3000000, "90.000000" : 3500000, "99.000000" : 4000000,
                           "99.900000" : 6000000, "99.990000" : 8000000 }
        },
        "lat_ns" : {
          "min" : 101000, "max" : 9100000, "mean" : 3200000.0, "stddev" : 1000.0, "N" : 100005,
          "percentile" : { "50.000000" : 3100000, "90.000000" : 3600000, "99.000000" : 4100000,
                           "99.900000" : 6100000, "99.990000" : 8100000 }
        }
      },
      "write" : {
        "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.0, "runtime" : 0, "total_ios" : 0,
        "clat_ns" : { "min" : 0, "max" : 0, "mean" : 0.0, "stddev" : 0.0, "N" : 0 },
        "lat_ns" : { "min" : 0, "max" : 0, "mean" : 0.0, "stddev" : 0.0, "N" : 0 }
      },
      "usr_cpu" : 12.5,
      "sys_cpu" : 60.25,
      "ctx" : 1234
    }
  ]
}
"#;

    /// `ring3 bench nvme --json` as its contract describes it.
    pub(crate) const RING3_RANDREAD: &str = r#"{"device":"0000:00:03.0","nsid":1,"pattern":"randread","block_size":4096,"queue_depth":32,"queues":1,"completion":"poll","duration_s":10.0,"ios":123000,"iops":12300.0,"bandwidth_bytes_per_s":50380800.0,"latency_us":{"mean":2600.0,"p50":2500.0,"p99":4000.0,"p99_9":5000.0,"max":9000.0},"cpu":{"user_s":9.5,"system_s":0.1,"percent":96.0},"errors":0}"#;
}

#[cfg(test)]
mod tests {
    use super::samples::*;
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * a.abs().max(1.0)
    }

    #[test]
    fn fio_randread_job() {
        let output = parse_fio_output(FIO_RANDREAD).expect("parses");
        let job = fio_job(&output).expect("has a job");
        let m = fio_measurement(job, Direction::Read).expect("measurement");
        assert!(close(m.iops, 10000.5));
        assert!(close(m.bandwidth_bytes_per_s, 40960000.0));
        assert_eq!(m.ios, 100005);
        assert_eq!(m.errors, 0);
        assert!(close(m.duration_s, 10.0));
        // Total latency (lat_ns) is preferred over completion latency.
        assert!(close(m.latency_us.p50, 3100.0));
        assert!(close(m.latency_us.p99, 4100.0));
        assert!(close(m.latency_us.p99_9, 6100.0));
        assert!(close(m.latency_us.mean, 3200.0));
        assert!(close(m.latency_us.max, 9100.0));
        assert_eq!(m.cpu_percent, Some(72.75));
    }

    #[test]
    fn fio_without_total_latency_percentiles_uses_completion_latency() {
        let mut output = parse_fio_output(FIO_RANDREAD).expect("parses");
        if let Some(lat) = output
            .pointer_mut("/jobs/0/read/lat_ns")
            .and_then(Value::as_object_mut)
        {
            lat.remove("percentile");
        }
        let job = fio_job(&output).expect("has a job");
        let m = fio_measurement(job, Direction::Read).expect("measurement");
        assert!(close(m.latency_us.p50, 3000.0));
        assert!(close(m.latency_us.max, 9000.0));
    }

    #[test]
    fn fio_errors_name_the_field() {
        assert!(parse_fio_output("fio: no such engine").is_err());
        assert!(parse_fio_output("{\"jobs\": [").is_err());
        let empty = parse_fio_output("{\"jobs\": []}").expect("valid JSON");
        assert!(fio_job(&empty).is_err());

        let mut output = parse_fio_output(FIO_RANDREAD).expect("parses");
        if let Some(read) = output.pointer_mut("/jobs/0/read") {
            read["iops"] = Value::String("many".into());
        }
        let job = fio_job(&output).expect("has a job");
        let err = fio_measurement(job, Direction::Read).expect_err("iops is a string");
        assert!(format!("{err:#}").contains("read.iops") || format!("{err:#}").contains("iops"));

        let output = parse_fio_output(FIO_RANDREAD).expect("parses");
        let job = fio_job(&output).expect("has a job");
        // The write side has no percentiles at all.
        let err = fio_measurement(job, Direction::Write).expect_err("no write percentiles");
        assert!(format!("{err:#}").contains("percentile"), "{err:#}");
    }

    #[test]
    fn ring3_report() {
        let (raw, report) = parse_ring3_output(RING3_RANDREAD).expect("parses");
        assert_eq!(raw["device"], "0000:00:03.0");
        assert_eq!(report.queue_depth, 32);
        assert_eq!(report.completion, "poll");
        let m = report.measurement().expect("valid");
        assert!(close(m.iops, 12300.0));
        assert!(close(m.latency_us.p99, 4000.0));
        assert_eq!(m.cpu_percent, Some(96.0));
        assert_eq!(m.ios, 123000);
    }

    #[test]
    fn latency_must_agree_with_iops_and_depth() {
        let (_, report) = parse_ring3_output(RING3_RANDREAD).expect("parses");
        let mut m = report.measurement().expect("valid");
        // 12300 IOPS at a mean of 2600 µs: 32 in flight.
        assert_eq!(implausible_latency(32, &m), None);
        // What a histogram clamped at 2 ns reports.
        m.latency_us.mean = 0.002;
        let problem = implausible_latency(32, &m).expect("flagged");
        assert!(problem.contains("Little's law"), "{problem}");
        m.latency_us.mean = 100_000.0;
        assert!(implausible_latency(32, &m).is_some());
        // fio's own numbers from the sample: 10000.5 IOPS at 3200 µs is 32 in flight.
        let output = parse_fio_output(FIO_RANDREAD).expect("parses");
        let job = fio_job(&output).expect("has a job");
        let m = fio_measurement(job, Direction::Read).expect("measurement");
        assert_eq!(implausible_latency(32, &m), None);
    }

    #[test]
    fn ring3_report_with_log_lines_before_it() {
        let text = format!("warning: something\n{RING3_RANDREAD}\n");
        assert!(parse_ring3_output(&text).is_ok());
    }

    #[test]
    fn ring3_report_rejects_bad_data() {
        assert!(parse_ring3_output("").is_err());
        assert!(parse_ring3_output("error: no such command `bench`").is_err());
        let missing = RING3_RANDREAD.replace("\"iops\":12300.0,", "");
        assert!(parse_ring3_output(&missing).is_err());
        let negative = RING3_RANDREAD.replace("\"p99\":4000.0", "\"p99\":-1.0");
        let (_, report) = parse_ring3_output(&negative).expect("parses");
        assert!(report.measurement().is_err());
        let odd = RING3_RANDREAD.replace("\"completion\":\"poll\"", "\"completion\":\"magic\"");
        let (_, report) = parse_ring3_output(&odd).expect("parses");
        assert!(report.measurement().is_err());
    }
}
