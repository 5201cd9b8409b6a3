//! The NVMe workloads, and how each is spelled for fio (the kernel driver) and for
//! `ring3 bench nvme`.

use std::fmt;

use super::results::Direction;

/// The access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

impl Pattern {
    /// fio's `--rw` value, which `ring3 bench --pattern` shares.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::SeqRead => "read",
            Pattern::SeqWrite => "write",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Pattern::RandRead => "random read",
            Pattern::RandWrite => "random write",
            Pattern::SeqRead => "sequential read",
            Pattern::SeqWrite => "sequential write",
        }
    }

    /// The side of fio's report the pattern's numbers are in.
    pub fn direction(self) -> Direction {
        match self {
            Pattern::RandRead | Pattern::SeqRead => Direction::Read,
            Pattern::RandWrite | Pattern::SeqWrite => Direction::Write,
        }
    }
}

/// How completions are noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// MSI-X interrupts: the kernel's default; `ring3 bench --interrupts`.
    Interrupt,
    /// Polling the completion queue: fio `--hipri` on the kernel's poll queues; ring3's
    /// default.
    Poll,
}

impl Completion {
    /// The name `ring3 bench --json` reports.
    pub fn name(self) -> &'static str {
        match self {
            Completion::Interrupt => "interrupt",
            Completion::Poll => "poll",
        }
    }
}

/// One measured configuration; both drivers run each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    pub pattern: Pattern,
    /// Bytes per I/O.
    pub block_size: u32,
    pub queue_depth: u32,
    pub completion: Completion,
}

/// `4k`, `128k`, `512`.
fn size_label(bytes: u32) -> String {
    if bytes >= 1024 && bytes % 1024 == 0 {
        format!("{}k", bytes / 1024)
    } else {
        bytes.to_string()
    }
}

impl Workload {
    /// A stable name, e.g. `randread-4k-qd32-poll`; also the fio job name.
    pub fn id(&self) -> String {
        format!(
            "{}-{}-qd{}-{}",
            self.pattern.name(),
            size_label(self.block_size),
            self.queue_depth,
            self.completion.name()
        )
    }

    /// For people: `4 KiB random read, QD32, polled`.
    pub fn describe(&self) -> String {
        let size = if self.block_size % 1024 == 0 {
            format!("{} KiB", self.block_size / 1024)
        } else {
            format!("{} B", self.block_size)
        };
        let completion = match self.completion {
            Completion::Interrupt => "interrupts",
            Completion::Poll => "polled",
        };
        format!(
            "{size} {}, QD{}, {completion}",
            self.pattern.describe(),
            self.queue_depth
        )
    }

    /// fio's options for this workload, for `--filename=<the namespace>`: io_uring with
    /// O_DIRECT, registered buffers and file, one job, `duration_s` seconds over the first
    /// `region_bytes` of the namespace, total and completion latency percentiles.
    pub fn fio_args(&self, duration_s: u64, region_bytes: u64) -> Vec<String> {
        let mut args: Vec<String> = vec![
            format!("--name={}", self.id()),
            "--ioengine=io_uring".into(),
            "--direct=1".into(),
            format!("--rw={}", self.pattern.name()),
            format!("--bs={}", self.block_size),
            format!("--iodepth={}", self.queue_depth),
            "--numjobs=1".into(),
            format!("--size={region_bytes}"),
            "--time_based".into(),
            format!("--runtime={duration_s}"),
            "--norandommap".into(),
            "--randrepeat=0".into(),
            "--fixedbufs=1".into(),
            "--registerfiles=1".into(),
            "--clat_percentiles=1".into(),
            "--lat_percentiles=1".into(),
            "--percentile_list=50:90:99:99.9:99.99".into(),
            "--output-format=json".into(),
        ];
        if self.completion == Completion::Poll {
            args.push("--hipri=1".into());
        }
        args
    }

    /// `ring3 bench nvme ADDR` options for this workload, except the ones every run
    /// shares (duration, region, `--json`).
    pub fn ring3_args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--nsid".into(),
            "1".into(),
            "--pattern".into(),
            self.pattern.name().into(),
            "--bs".into(),
            self.block_size.to_string(),
            "--qd".into(),
            self.queue_depth.to_string(),
            "--queues".into(),
            "1".into(),
        ];
        if self.completion == Completion::Interrupt {
            args.push("--interrupts".into());
        }
        args
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// 4 KiB, the block size of the bench's namespace.
pub const SMALL_BLOCK: u32 = 4096;

/// The queue depths of the random-read sweep.
pub fn sweep_depths(quick: bool) -> &'static [u32] {
    if quick {
        &[1, 4, 32]
    } else {
        &[1, 2, 4, 8, 16, 32]
    }
}

/// The workloads, in the order they run: the 4 KiB random-read queue-depth sweep with
/// interrupts and polled, then 4 KiB random writes and 128 KiB sequential reads.
pub fn workloads(quick: bool) -> Vec<Workload> {
    let mut list = Vec::new();
    for completion in [Completion::Interrupt, Completion::Poll] {
        for &queue_depth in sweep_depths(quick) {
            list.push(Workload {
                pattern: Pattern::RandRead,
                block_size: SMALL_BLOCK,
                queue_depth,
                completion,
            });
        }
    }
    let write_depths: &[u32] = if quick { &[32] } else { &[1, 32] };
    for &queue_depth in write_depths {
        list.push(Workload {
            pattern: Pattern::RandWrite,
            block_size: SMALL_BLOCK,
            queue_depth,
            completion: Completion::Interrupt,
        });
    }
    list.push(Workload {
        pattern: Pattern::SeqRead,
        block_size: 128 * 1024,
        queue_depth: 32,
        completion: Completion::Interrupt,
    });
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let w = Workload {
            pattern: Pattern::RandRead,
            block_size: 4096,
            queue_depth: 32,
            completion: Completion::Poll,
        };
        assert_eq!(w.id(), "randread-4k-qd32-poll");
        assert_eq!(w.describe(), "4 KiB random read, QD32, polled");
        let w = Workload {
            pattern: Pattern::SeqRead,
            block_size: 128 * 1024,
            queue_depth: 1,
            completion: Completion::Interrupt,
        };
        assert_eq!(w.id(), "read-128k-qd1-interrupt");
        assert_eq!(w.describe(), "128 KiB sequential read, QD1, interrupts");
        assert_eq!(size_label(512), "512");
    }

    #[test]
    fn the_mandatory_workloads_are_there_and_ids_are_unique() {
        for quick in [false, true] {
            let list = workloads(quick);
            let mut ids: Vec<String> = list.iter().map(Workload::id).collect();
            for wanted in [
                "randread-4k-qd1-interrupt",
                "randread-4k-qd32-interrupt",
                "randread-4k-qd32-poll",
                "randwrite-4k-qd32-interrupt",
                "read-128k-qd32-interrupt",
            ] {
                assert!(ids.iter().any(|id| id == wanted), "{wanted} in {ids:?}");
            }
            let count = ids.len();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), count, "unique IDs");
        }
    }

    #[test]
    fn both_tools_get_the_same_workload() {
        let w = Workload {
            pattern: Pattern::RandWrite,
            block_size: 4096,
            queue_depth: 8,
            completion: Completion::Interrupt,
        };
        let fio = w.fio_args(10, 1 << 30);
        for arg in [
            "--rw=randwrite",
            "--bs=4096",
            "--iodepth=8",
            "--runtime=10",
            "--size=1073741824",
            "--direct=1",
            "--ioengine=io_uring",
        ] {
            assert!(fio.iter().any(|a| a == arg), "{arg} in {fio:?}");
        }
        assert!(!fio.iter().any(|a| a.starts_with("--hipri")));
        assert_eq!(
            w.ring3_args().join(" "),
            "--nsid 1 --pattern randwrite --bs 4096 --qd 8 --queues 1 --interrupts"
        );
        let polled = Workload {
            completion: Completion::Poll,
            ..w
        };
        assert!(polled
            .fio_args(10, 1 << 30)
            .iter()
            .any(|a| a == "--hipri=1"));
        assert!(!polled.ring3_args().iter().any(|a| a == "--interrupts"));
    }
}
