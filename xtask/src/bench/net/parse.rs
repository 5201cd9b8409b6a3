//! What each tool printed in the guest, read into one shape: packets per second sent and
//! received. The text comes from programs in the guest, so nothing here trusts it: a
//! missing or malformed number is an error naming it.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// One measurement: a driver sending frames of one size from one NIC to the other.
#[derive(Debug, Clone, PartialEq)]
pub struct Rates {
    /// Frames per second the sender handed to its NIC.
    pub tx_pps: f64,
    /// Frames per second the receiver got.
    pub rx_pps: f64,
    /// The receiver's bytes per second (frames without FCS).
    pub rx_bytes_per_s: f64,
    pub tx_packets: u64,
    pub rx_packets: u64,
    /// Seconds the sender ran.
    pub seconds: f64,
    /// What the tool said, for the JSON.
    pub raw: Value,
}

impl Rates {
    /// Frames sent that did not arrive.
    pub fn lost(&self) -> u64 {
        self.tx_packets.saturating_sub(self.rx_packets)
    }
}

fn number(text: &str, what: &str) -> Result<f64> {
    let value: f64 = text
        .trim()
        .parse()
        .with_context(|| format!("{what} is `{}`, not a number", text.trim()))?;
    checked(value, what)
}

fn checked(value: f64, what: &str) -> Result<f64> {
    if !(value.is_finite() && value >= 0.0) {
        bail!("{what} is {value}, not a finite, non-negative number");
    }
    Ok(value)
}

/// The word after `key` on the first line holding it (`key` ends with its separator).
fn word_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let at = line.find(key)?;
        line[at + key.len()..].split_whitespace().next()
    })
}

/// `key=value` lines.
fn value_of<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
}

// ---------------------------------------------------------------------------
// The kernel: pktgen and the receiving interface's counters
// ---------------------------------------------------------------------------

/// The kernel's measurement: the script's `ns`, `rx_packets`, `rx_bytes` and
/// `rx_dropped` lines, then pktgen's `/proc/net/pktgen/IF` after the run.
pub fn kernel(text: &str) -> Result<Rates> {
    let field = |key: &str| -> Result<f64> {
        number(
            value_of(text, key).with_context(|| format!("no {key} in the kernel's results"))?,
            key,
        )
    };
    let ns = field("ns")?;
    let rx_packets = field("rx_packets")? as u64;
    let rx_bytes = field("rx_bytes")?;
    let rx_dropped = field("rx_dropped")? as u64;
    let result = text
        .lines()
        .find(|line| line.starts_with("Result:"))
        .context("pktgen printed no Result line")?;
    if !result.starts_with("Result: OK:") {
        bail!("pktgen: {}", result.trim());
    }
    // Result: OK: 10000123(c9999000+d1123) usec, 123456 (64byte,0frags)
    let usec = result["Result: OK:".len()..]
        .split('(')
        .next()
        .context("pktgen's Result line has no time")?;
    let usec = number(usec, "pktgen's time in µs")?;
    let sent = result
        .split("usec,")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .context("pktgen's Result line has no packet count")?;
    let tx_packets = number(sent, "pktgen's packet count")? as u64;
    let pps = text
        .lines()
        .skip_while(|line| !line.starts_with("Result:"))
        .flat_map(str::split_whitespace)
        .find_map(|word| word.strip_suffix("pps"))
        .context("pktgen printed no pps")?;
    let tx_pps = number(pps, "pktgen's pps")?;
    let errors = word_after(text, "errors: ").unwrap_or("0");
    let seconds = ns / 1e9;
    if seconds <= 0.0 {
        bail!("the kernel's run took {ns} ns");
    }
    Ok(Rates {
        tx_pps,
        rx_pps: rx_packets as f64 / seconds,
        rx_bytes_per_s: rx_bytes / seconds,
        tx_packets,
        rx_packets,
        seconds: usec / 1e6,
        raw: json!({
            "pktgen_result": result.trim(),
            "pktgen_errors": errors,
            "window_ns": ns,
            "rx_packets": rx_packets,
            "rx_bytes": rx_bytes,
            "rx_dropped": rx_dropped,
        }),
    })
}

// ---------------------------------------------------------------------------
// ring3 bench net --json
// ---------------------------------------------------------------------------

/// `ring3 bench net --json`'s object, which must be for frames of `size` bytes.
pub fn ring3(text: &str, size: usize) -> Result<Rates> {
    let value: Value = serde_json::from_str(text.trim())
        .context("ring3 bench net printed no JSON object (is the output truncated?)")?;
    let get = |pointer: &str| -> Result<f64> {
        let number = value
            .pointer(pointer)
            .and_then(Value::as_f64)
            .with_context(|| format!("ring3 bench net's JSON has no number at {pointer}"))?;
        checked(number, pointer)
    };
    let frame = get("/frame_bytes")? as usize;
    if frame != size {
        bail!("ring3 bench net sent {frame}-byte frames, not {size}");
    }
    Ok(Rates {
        tx_pps: get("/tx/pps")?,
        rx_pps: get("/rx/pps")?,
        rx_bytes_per_s: get("/rx/bytes_per_s")?,
        tx_packets: get("/tx/packets")? as u64,
        rx_packets: get("/rx/packets")? as u64,
        seconds: get("/tx/seconds")?,
        raw: value,
    })
}

/// Share of transmit calls that found the ring full, and empty receive polls per frame
/// received, from ring3's JSON.
pub fn ring3_waiting(raw: &Value) -> Option<(f64, f64)> {
    let get = |pointer: &str| raw.pointer(pointer).and_then(Value::as_f64);
    let full = get("/tx/ring_full_calls")? / get("/tx/calls")?.max(1.0);
    let empty = get("/rx/empty_polls")? / get("/rx/packets")?.max(1.0);
    Some((full, empty))
}

// ---------------------------------------------------------------------------
// testpmd
// ---------------------------------------------------------------------------

/// What one testpmd instance printed: the periodic rates and the totals at exit.
#[derive(Debug, Clone, PartialEq)]
pub struct Testpmd {
    pub rx_pps: Vec<f64>,
    pub tx_pps: Vec<f64>,
    pub rx_bps: Vec<f64>,
    /// RX-packets and TX-packets of the accumulated forward statistics.
    pub rx_packets: Option<u64>,
    pub tx_packets: Option<u64>,
}

/// Reads testpmd's `--stats-period` output.
pub fn testpmd(log: &str) -> Testpmd {
    let mut out = Testpmd {
        rx_pps: Vec::new(),
        tx_pps: Vec::new(),
        rx_bps: Vec::new(),
        rx_packets: None,
        tx_packets: None,
    };
    let mut accumulated = false;
    for line in log.lines() {
        let line = line.trim();
        let rate = |key: &str| word_after(line, key).and_then(|w| w.parse::<f64>().ok());
        if line.starts_with("Rx-pps:") {
            out.rx_pps.extend(rate("Rx-pps:"));
            out.rx_bps.extend(rate("Rx-bps:"));
        } else if line.starts_with("Tx-pps:") {
            out.tx_pps.extend(rate("Tx-pps:"));
        } else if line.contains("Accumulated forward statistics") {
            accumulated = true;
        } else if accumulated && line.starts_with("RX-packets:") {
            out.rx_packets = rate("RX-packets:").map(|v| v as u64);
        } else if accumulated && line.starts_with("TX-packets:") {
            out.tx_packets = rate("TX-packets:").map(|v| v as u64);
            accumulated = false;
        }
    }
    out
}

/// The mean of the periodic rates while traffic flowed: the non-zero ones, less the
/// first and the last (each covers only part of a period) when there are three or more.
pub fn steady(rates: &[f64]) -> Option<f64> {
    let flowing: Vec<f64> = rates.iter().copied().filter(|&r| r > 0.0).collect();
    let inner = if flowing.len() >= 3 {
        &flowing[1..flowing.len() - 1]
    } else {
        &flowing[..]
    };
    (!inner.is_empty()).then(|| inner.iter().sum::<f64>() / inner.len() as f64)
}

/// Why a testpmd instance measured nothing: the lines of its log that say so.
pub fn testpmd_failure(log: &str) -> String {
    let telling: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            lower.contains("error") || lower.contains("cause") || lower.contains("fail")
        })
        .take(4)
        .collect();
    let lines = if telling.is_empty() {
        log.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect()
    } else {
        telling
    };
    if lines.is_empty() {
        "testpmd printed nothing".to_string()
    } else {
        format!("testpmd: {}", lines.join(" / "))
    }
}

/// The DPDK measurement from the two instances' logs.
pub fn dpdk(tx_log: &str, rx_log: &str) -> Result<Rates> {
    let tx = testpmd(tx_log);
    let rx = testpmd(rx_log);
    let Some(tx_pps) = steady(&tx.tx_pps) else {
        bail!("txonly: {}", testpmd_failure(tx_log));
    };
    let Some(rx_pps) = steady(&rx.rx_pps) else {
        bail!("rxonly received nothing: {}", testpmd_failure(rx_log));
    };
    let rx_bytes_per_s = steady(&rx.rx_bps).unwrap_or(0.0) / 8.0;
    let flowing = tx.tx_pps.iter().filter(|&&r| r > 0.0).count();
    Ok(Rates {
        tx_pps,
        rx_pps,
        rx_bytes_per_s,
        tx_packets: tx.tx_packets.unwrap_or(0),
        rx_packets: rx.rx_packets.unwrap_or(0),
        seconds: flowing as f64,
        raw: json!({
            "tx_pps_per_period": tx.tx_pps,
            "rx_pps_per_period": rx.rx_pps,
            "rx_bps_per_period": rx.rx_bps,
            "tx_packets": tx.tx_packets,
            "rx_packets": rx.rx_packets,
        }),
    })
}

// ---------------------------------------------------------------------------
// The guest's /proc/stat
// ---------------------------------------------------------------------------

/// Where the guest's CPUs' time went during a measurement, in percent of all of them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuestCpu {
    /// User and nice.
    pub user_percent: f64,
    /// System, IRQ and softirq.
    pub system_percent: f64,
}

impl GuestCpu {
    pub fn busy_percent(&self) -> f64 {
        self.user_percent + self.system_percent
    }
}

fn stat_fields(line: &str) -> Option<Vec<u64>> {
    let rest = line.trim().strip_prefix("cpu ")?;
    rest.split_whitespace().map(|f| f.parse().ok()).collect()
}

/// The `cpu` block: `before cpu ...` and `after cpu ...` lines of `/proc/stat`.
pub fn guest_cpu(text: &str) -> Option<GuestCpu> {
    let line = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(stat_fields)
    };
    let (before, after) = (line("before ")?, line("after ")?);
    let delta = |i: usize| {
        after
            .get(i)
            .copied()
            .unwrap_or(0)
            .saturating_sub(before.get(i).copied().unwrap_or(0)) as f64
    };
    // user nice system idle iowait irq softirq steal
    let total: f64 = (0..8).map(delta).sum();
    if total <= 0.0 {
        return None;
    }
    Some(GuestCpu {
        user_percent: 100.0 * (delta(0) + delta(1)) / total,
        system_percent: 100.0 * (delta(2) + delta(5) + delta(6)) / total,
    })
}

#[cfg(test)]
pub(super) mod samples {
    pub const PKTGEN: &str = "ns=3000000000
rx_packets=30000
rx_bytes=1920000
rx_dropped=0
Params: count 0  min_pkt_size: 64  max_pkt_size: 64
     frags: 0  delay: 0  clone_skb: 0  ifname: eth0
Current:
     pkts-sofar: 31000  errors: 0
Result: OK: 3000000(c2990000+d10000) usec, 31000 (64byte,0frags)
  10333pps 5Mb/sec (5290666bps) errors: 0
";

    pub const RING3: &str = r#"{"tx_device":"0000:00:01.0","rx_device":"0000:00:02.0","tx_driver":"virtio-net","rx_driver":"virtio-net","frame_bytes":64,"batch":32,"duration_s":3.0,"tx":{"packets":60000,"bytes":3840000,"seconds":3.0,"pps":20000.0,"calls":10000,"ring_full_calls":9000,"pool_empty":0,"cpu_s":3.0,"errors":0},"rx":{"packets":57000,"bytes":3648000,"seconds":3.0,"pps":19000.0,"bytes_per_s":1216000.0,"foreign":0,"gaps":3000,"out_of_order":0,"polls":171000,"empty_polls":114000,"device_drops":0,"cpu_s":3.0,"errors":0},"lost":3000,"loss_percent":5.0,"cpu":{"user_s":5.5,"system_s":0.5,"percent":200.0}}"#;

    pub const TESTPMD_TX: &str = "EAL: Detected CPU lcores: 2
Port statistics ====================================
  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:         5000          Tx-bps:      2560000
Port statistics ====================================
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:        15000          Tx-bps:      7680000
Port statistics ====================================
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:        17000          Tx-bps:      8704000
Port statistics ====================================
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:         4000          Tx-bps:      2048000
  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 41000          TX-dropped: 900000        TX-total: 941000
";

    pub const TESTPMD_RX: &str = "Port statistics ====================================
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  Rx-pps:         3000          Rx-bps:      1536000
  Tx-pps:            0          Tx-bps:            0
  Rx-pps:        14000          Rx-bps:      7168000
  Tx-pps:            0          Tx-bps:            0
  Rx-pps:        16000          Rx-bps:      8192000
  Tx-pps:            0          Tx-bps:            0
  Rx-pps:         8000          Rx-bps:      4096000
  Tx-pps:            0          Tx-bps:            0
  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 41000          RX-dropped: 0             RX-total: 41000
  TX-packets: 0              TX-dropped: 0             TX-total: 0
";
}

#[cfg(test)]
mod tests {
    use super::samples::*;
    use super::*;

    #[test]
    fn pktgen_and_the_interface_counters() {
        let rates = kernel(PKTGEN).expect("parses");
        assert_eq!(rates.tx_pps, 10333.0);
        assert_eq!(rates.tx_packets, 31000);
        assert_eq!(rates.rx_pps, 10000.0);
        assert_eq!(rates.rx_bytes_per_s, 640_000.0);
        assert_eq!(rates.seconds, 3.0);
        let failed = PKTGEN.replace(
            "Result: OK: 3000000(c2990000+d10000) usec, 31000 (64byte,0frags)",
            "Result: Idle",
        );
        let error = kernel(&failed).expect_err("not OK").to_string();
        assert!(error.contains("Result: Idle"), "{error}");
        assert!(kernel("ns=1\n").is_err());
    }

    #[test]
    fn ring3_json() {
        let rates = ring3(RING3, 64).expect("parses");
        assert_eq!((rates.tx_pps, rates.rx_pps), (20000.0, 19000.0));
        assert_eq!(rates.lost(), 3000);
        assert!(ring3(RING3, 1500).is_err(), "another frame size");
        assert!(ring3("{\"frame_bytes\": 64}", 64).is_err());
        let (full, empty) = ring3_waiting(&rates.raw).expect("counters");
        assert!((full - 0.9).abs() < 1e-9 && (empty - 2.0).abs() < 1e-9);
    }

    #[test]
    fn testpmd_rates_while_traffic_flows() {
        let rates = dpdk(TESTPMD_TX, TESTPMD_RX).expect("parses");
        assert_eq!(rates.tx_pps, 16000.0, "the mean of 15000 and 17000");
        assert_eq!(rates.rx_pps, 15000.0, "the mean of 14000 and 16000");
        assert_eq!(rates.rx_bytes_per_s, 7680000.0 / 8.0);
        assert_eq!((rates.tx_packets, rates.rx_packets), (41000, 41000));
        let error = dpdk(
            "EAL: Error - exiting with code: 1\n  Cause: No probed ethernet devices\n",
            TESTPMD_RX,
        )
        .expect_err("no rates")
        .to_string();
        assert!(error.contains("No probed ethernet devices"), "{error}");
        assert_eq!(steady(&[0.0, 5.0, 0.0]), Some(5.0));
        assert_eq!(steady(&[]), None);
    }

    #[test]
    fn guest_cpu_from_proc_stat() {
        let text = "before cpu  100 0 50 800 0 0 0 0 0 0\nafter cpu  200 0 100 900 0 0 50 0 0 0\n";
        let cpu = guest_cpu(text).expect("parses");
        assert!((cpu.user_percent - 100.0 / 3.0).abs() < 1e-9, "{cpu:?}");
        assert!((cpu.system_percent - 100.0 / 3.0).abs() < 1e-9, "{cpu:?}");
        assert!(guest_cpu("before cpu 1 2 3\n").is_none());
    }
}
