//! Lab tests of the NVMe driver against QEMU's NVMe controller (two namespaces, 512-byte
//! and 4096-byte blocks, eight I/O queue pairs), inside the lab VM (`cargo xtask test`).

use std::process::{Command, Output};
use std::sync::Arc;

use ring3::pci::Sysfs;
use ring3::vfio::VfioBackend;
use ring3_nvme::{Controller, ControllerOptions, Error, IoQueueOptions};

const NVME_CLASS: u32 = 0x01_08_02;

fn in_lab() {
    assert_eq!(
        std::env::var("RING3_LAB").as_deref(),
        Ok("1"),
        "lab tests run inside the lab VM: use `cargo xtask test`"
    );
}

/// The NVMe controller, bound to vfio-pci (bound here if it was not).
fn nvme_on_vfio() -> String {
    in_lab();
    let sysfs = Sysfs::system();
    let device = sysfs
        .devices()
        .expect("listing PCI devices")
        .into_iter()
        .find(|d| d.class_code == NVME_CLASS)
        .expect("the lab VM has an NVMe controller");
    sysfs
        .bind_to_vfio(device.address, false)
        .expect("binding the NVMe controller to vfio-pci");
    device.address.to_string()
}

fn open() -> Controller<VfioBackend> {
    let address = nvme_on_vfio();
    let backend = VfioBackend::open(&address).expect("opening the controller through VFIO");
    Controller::new(backend, ControllerOptions::default()).expect("bringing the controller up")
}

fn ring3(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_ring3"))
        .args(args)
        .output()
        .expect("running ring3");
    eprintln!(
        "$ ring3 {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn json(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "ring3 failed");
    serde_json::from_slice(&output.stdout).expect("ring3 printed JSON")
}

/// Bytes that differ at every offset, between LBAs and between runs of the same LBA.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_nvme_identify_shows_the_namespaces_and_queues() {
    let address = nvme_on_vfio();
    let info = json(&ring3(&["nvme", &address, "identify", "--json"]));
    let namespaces = info["namespaces"].as_array().expect("namespaces");
    assert!(namespaces.len() >= 2, "{info}");
    let sizes: Vec<u64> = namespaces
        .iter()
        .map(|ns| ns["block_size"].as_u64().unwrap_or(0))
        .collect();
    assert!(sizes.contains(&512) && sizes.contains(&4096), "{sizes:?}");
    assert!(info["io_queues"].as_u64() >= Some(4), "{info}");
    assert!(info["max_transfer_bytes"].as_u64() > Some(8192), "{info}");
    let text = ring3(&["nvme", &address, "identify"]);
    assert!(text.status.success());
    assert!(String::from_utf8_lossy(&text.stdout).contains("QEMU NVMe Ctrl"));
}

/// Writes a pattern at LBAs spread over the whole range of both namespaces, with many
/// transfer sizes and queue depths, from four queues on four threads at once; then reads
/// everything back on other queues and compares.
#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_nvme_pattern_over_the_lba_range_from_several_queues_reads_back() {
    let nvme = Arc::new(open());
    let max_transfer = nvme.max_transfer_bytes();
    let queues = 4usize;
    assert!(usize::from(nvme.max_io_queues()) >= queues);
    // (namespace, LBA, blocks) of every write, spread over each namespace.
    let mut plan = Vec::new();
    for ns in nvme.namespaces() {
        let block = ns.block_size() as usize;
        let max_blocks = (max_transfer / block) as u64;
        let sizes = [1, 2, 7, 8, 9, 16, 33, 64, max_blocks - 1, max_blocks];
        let regions = 24u64;
        for i in 0..regions {
            let blocks = sizes[i as usize % sizes.len()].clamp(1, max_blocks);
            // From LBA 0 to the last blocks of the namespace.
            let lba = (ns.blocks - blocks) * i / (regions - 1);
            plan.push((ns.id, lba & !7, blocks));
        }
    }
    // Regions must not overlap, or the last writer would win.
    plan.sort_by_key(|&(ns, lba, _)| (ns, lba));
    plan.dedup_by(|b, a| a.0 == b.0 && a.1 + a.2 > b.1);
    let depths = [1usize, 4, 16, 32];

    std::thread::scope(|scope| {
        for (q, &depth) in depths.iter().enumerate() {
            let (nvme, plan) = (&nvme, &plan);
            scope.spawn(move || {
                let mut queue = nvme
                    .io_queue(IoQueueOptions {
                        entries: 64,
                        interrupts: false,
                    })
                    .expect("I/O queue");
                let mut out = Vec::new();
                for (i, &(nsid, lba, blocks)) in plan.iter().enumerate().skip(q).step_by(queues) {
                    let len = blocks as usize * nvme.namespace(nsid).unwrap().block_size() as usize;
                    let buffer = queue.alloc_buffer(len).expect("buffer");
                    buffer
                        .write(0, &pattern(len, lba ^ u64::from(nsid) << 40))
                        .unwrap();
                    queue
                        .write(nsid, lba, blocks as u32, buffer, i as u64)
                        .expect("write placed");
                    while queue.in_flight() >= depth {
                        queue.wait(&mut out).expect("waiting");
                    }
                }
                queue.drain(&mut out).expect("draining");
                for completion in out {
                    completion.result.expect("write succeeded");
                }
            });
        }
    });

    // Read back on fresh queues (other queue IDs than the writers' where possible).
    std::thread::scope(|scope| {
        for q in 0..queues {
            let (nvme, plan) = (&nvme, &plan);
            scope.spawn(move || {
                let mut queue = nvme.io_queue(IoQueueOptions::default()).expect("I/O queue");
                for &(nsid, lba, blocks) in plan.iter().skip((q + 1) % queues).step_by(queues) {
                    let len = blocks as usize * nvme.namespace(nsid).unwrap().block_size() as usize;
                    let buffer = queue.alloc_buffer(len).expect("buffer");
                    let buffer = queue
                        .read_sync(nsid, lba, blocks as u32, buffer)
                        .expect("read");
                    let mut data = vec![0; len];
                    buffer.read(0, &mut data).unwrap();
                    assert!(
                        data == pattern(len, lba ^ u64::from(nsid) << 40),
                        "namespace {nsid}, LBA {lba}, {blocks} blocks differ"
                    );
                }
            });
        }
    });
    eprintln!("{} regions written and verified", plan.len());
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_nvme_out_of_range_lba_gives_the_devices_error() {
    let nvme = open();
    let ns = nvme.namespaces()[0].clone();
    let mut queue = nvme.io_queue(IoQueueOptions::default()).unwrap();
    let buffer = queue.alloc_buffer(4 * ns.block_size() as usize).unwrap();
    let error = queue
        .read_sync(ns.id, ns.blocks - 1, 2, buffer)
        .unwrap_err();
    assert!(matches!(error, Error::IoFailed { .. }), "{error}");
    let text = error.to_string();
    assert!(text.contains("LBA out of range"), "{text}");
    assert_eq!(nvme.resets(), 0, "a command error is not a reason to reset");
    // The queue and the controller carry on.
    let buffer = queue.alloc_buffer(ns.block_size() as usize).unwrap();
    queue
        .read_sync(ns.id, ns.blocks - 1, 1, buffer)
        .expect("the last block reads");
    let log = nvme.error_log().unwrap();
    eprintln!("error log: {log:?}");
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_nvme_cli_write_read_trim_round_trip() {
    let address = nvme_on_vfio();
    let dir = std::env::temp_dir().join(format!("ring3-nvme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.bin");
    let output = dir.join("out.bin");
    // 100 KiB: not a whole number of 4 KiB blocks, spans PRP lists.
    let data = pattern(100 * 1024 + 100, 99);
    std::fs::write(&input, &data).unwrap();
    let (i, o) = (input.to_str().unwrap(), output.to_str().unwrap());

    let wrote = json(&ring3(&[
        "nvme", &address, "write", "-n", "2", "--lba", "1000", "--input", i, "--json",
    ]));
    assert_eq!(wrote["blocks"], 26, "{wrote}");
    assert!(ring3(&[
        "nvme", &address, "read", "-n", "2", "--lba", "1000", "--blocks", "26", "--output", o
    ])
    .status
    .success());
    let back = std::fs::read(&output).unwrap();
    assert_eq!(back.len(), 26 * 4096);
    assert!(back[..data.len()] == data[..], "data read back differs");
    assert!(
        back[data.len()..].iter().all(|&b| b == 0),
        "padding is zeroes"
    );

    let trimmed = json(&ring3(&[
        "nvme", &address, "trim", "-n", "2", "--lba", "1002", "--blocks", "3", "--json",
    ]));
    assert_eq!(trimmed["reads_zeroes"], true, "{trimmed}");
    assert!(ring3(&[
        "nvme", &address, "read", "-n", "2", "--lba", "1000", "--blocks", "6", "--output", o
    ])
    .status
    .success());
    let back = std::fs::read(&output).unwrap();
    assert!(
        back[..2 * 4096] == data[..2 * 4096],
        "blocks before the trim are kept"
    );
    assert!(
        back[2 * 4096..5 * 4096].iter().all(|&b| b == 0),
        "trimmed blocks read zeroes"
    );
    assert!(
        back[5 * 4096..] == data[5 * 4096..6 * 4096],
        "blocks after the trim are kept"
    );

    let hex = ring3(&["nvme", &address, "read", "-n", "2", "--lba", "1000"]);
    assert!(hex.status.success());
    assert!(
        String::from_utf8_lossy(&hex.stdout).starts_with("003e8000  "),
        "a hex dump at byte 1000 × 4096"
    );

    let smart = json(&ring3(&["nvme", &address, "smart", "--json"]));
    assert!(
        smart["host_writes"]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok())
            >= Some(1),
        "{smart}"
    );
    let text = ring3(&["nvme", &address, "smart"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("temperature"));

    let outside = ring3(&["nvme", &address, "read", "-n", "2", "--lba", "999999999"]);
    assert!(!outside.status.success());
    assert!(String::from_utf8_lossy(&outside.stderr).contains("outside namespace 2"));
    let missing = ring3(&["nvme", &address, "read", "-n", "9"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("namespace 9 does not exist"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_nvme_interrupts_work_end_to_end() {
    let nvme = open();
    let mut queue = nvme
        .io_queue(IoQueueOptions {
            entries: 32,
            interrupts: true,
        })
        .expect("a queue with an MSI-X vector");
    assert!(queue.interrupt_vector().is_some());
    let ns = nvme.namespaces()[0].clone();
    let block = ns.block_size() as usize;
    let mut out = Vec::new();
    for round in 0..4u64 {
        for i in 0..16u64 {
            let lba = 5000 + i * 8;
            let buffer = queue.alloc_buffer(8 * block).unwrap();
            buffer.write(0, &pattern(8 * block, lba + round)).unwrap();
            queue.write(ns.id, lba, 8, buffer, lba).unwrap();
        }
        queue.drain(&mut out).unwrap();
        assert!(out.drain(..).all(|c| c.result.is_ok()));
        for i in 0..16u64 {
            let lba = 5000 + i * 8;
            let buffer = queue.alloc_buffer(8 * block).unwrap();
            let buffer = queue.read_sync(ns.id, lba, 8, buffer).unwrap();
            let mut data = vec![0; 8 * block];
            buffer.read(0, &mut data).unwrap();
            assert!(
                data == pattern(8 * block, lba + round),
                "LBA {lba} round {round}"
            );
        }
    }
    drop(queue);
    drop(nvme);

    let address = nvme_on_vfio();
    let bench = json(&ring3(&[
        "bench",
        "nvme",
        &address,
        "--interrupts",
        "--qd",
        "4",
        "--duration",
        "1",
        "--json",
    ]));
    assert_eq!(bench["completion"], "interrupt");
    assert!(bench["ios"].as_u64() > Some(0), "{bench}");
    assert_eq!(bench["errors"], 0, "{bench}");
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_nvme_bench_reports_rates_and_latencies() {
    let address = nvme_on_vfio();
    for args in [
        &["--pattern", "randread", "--qd", "8"][..],
        &[
            "--pattern",
            "write",
            "--bs",
            "16k",
            "--qd",
            "2",
            "--queues",
            "2",
            "-n",
            "2",
        ][..],
        &["--pattern", "mixed", "--bs", "512", "--qd", "1"][..],
    ] {
        let mut all = vec![
            "bench",
            "nvme",
            &address,
            "--duration",
            "1",
            "--size",
            "16m",
            "--json",
        ];
        all.extend_from_slice(args);
        let result = json(&ring3(&all));
        assert!(result["iops"].as_f64() > Some(0.0), "{result}");
        assert_eq!(result["errors"], 0, "{result}");
        let p50 = result["latency_us"]["p50"].as_f64().unwrap_or(0.0);
        let p99 = result["latency_us"]["p99"].as_f64().unwrap_or(0.0);
        assert!(p50 > 0.0 && p99 >= p50, "{result}");
        // Little's law: IOPS × mean latency is the number of I/Os in flight, which the
        // benchmark keeps at the queue depth on every queue.
        let in_flight = result["iops"].as_f64().unwrap_or(0.0)
            * result["latency_us"]["mean"].as_f64().unwrap_or(0.0)
            / 1e6;
        let depth = result["queue_depth"].as_f64().unwrap_or(0.0)
            * result["queues"].as_f64().unwrap_or(0.0);
        assert!(
            in_flight > depth * 0.5 && in_flight < depth * 1.5,
            "{in_flight} I/Os in flight by Little's law, not about {depth}: {result}"
        );
    }
    let bad = ring3(&["bench", "nvme", &address, "--bs", "1000", "--duration", "1"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a multiple"));
}
