//! A bridge whose pty nobody has open, or which has nothing to move, must not spin.
//! Alone in its test binary so that the process's CPU time is the bridge's.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ring3_ftdi::fake::FakeFt232;
use ring3_ftdi::{serial, Endpoints, Ft232};
use rustix::fs::{Mode, OFlags};
use rustix::time::{clock_gettime, ClockId};

fn cpu_time() -> Duration {
    let t = clock_gettime(ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

#[test]
fn idle_bridge_uses_little_cpu() {
    let fake = Arc::new(FakeFt232::loopback());
    let port = Ft232::new(fake.clone(), Endpoints::default()).unwrap();
    let pty = serial::Pty::open().unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let bridge = scope.spawn(|| serial::run_bridge(&port, pty.master(), &stop));
        // Never opened, then opened and idle, then closed again (the master reports a
        // hang-up at once from then on).
        let mut used = Vec::new();
        let measure = |used: &mut Vec<Duration>| {
            let before = cpu_time();
            std::thread::sleep(Duration::from_secs(1));
            used.push(cpu_time() - before);
        };
        measure(&mut used);
        let slave = rustix::fs::open(
            pty.slave_path(),
            OFlags::RDWR | OFlags::NOCTTY,
            Mode::empty(),
        )
        .unwrap();
        measure(&mut used);
        drop(slave);
        measure(&mut used);
        stop.store(true, Ordering::Relaxed);
        bridge.join().unwrap().unwrap();
        eprintln!("CPU in 1 s (never opened, open idle, closed): {used:?}");
        for (phase, time) in ["never opened", "open, idle", "closed"].iter().zip(&used) {
            assert!(
                *time < Duration::from_millis(100),
                "{phase}: {time:?} of CPU in 1 s"
            );
        }
    });
    let _ = pty.master().as_fd();
}
