//! The network driver process: a NIC (virtio-net or e1000e) bridged to the TAP interface
//! ring3d created for it, so the kernel's network stack and every program see an ordinary
//! interface while the driver runs here, unprivileged.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring3_net::e1000e::{E1000e, E1000eOptions};
use ring3_net::tap::{BridgeOptions, BridgeStats, Tap};
use ring3_net::virtio::{VirtioNet, VirtioOptions};
use ring3_net::NetDevice;

use super::ipc_failed;
use crate::control::{IoCounters, NetQueueCounters};
use crate::ipc::{Channel, Setup, ToDriver, ToHost};

pub(super) fn run(channel: &Channel, setup: &Setup, fds: Vec<OwnedFd>) -> Result<(), String> {
    let backend = super::sandboxed_device(setup, fds)?;
    match setup.driver.as_str() {
        "virtio-net" => {
            let nic = VirtioNet::new(
                backend,
                VirtioOptions {
                    queue_pairs: setup.queues,
                    queue_size: setup.queue_depth,
                    interrupts: true,
                    mac: None,
                },
            )
            .map_err(|e| format!("bringing the virtio-net device up: {e}"))?;
            serve(channel, setup, nic)
        }
        "e1000e" => {
            let nic = E1000e::new(
                backend,
                E1000eOptions {
                    rx_ring: setup.queue_depth,
                    tx_ring: setup.queue_depth,
                    interrupts: true,
                },
            )
            .map_err(|e| format!("bringing the e1000e up: {e}"))?;
            serve(channel, setup, nic)
        }
        other => Err(format!("unknown network driver {other:?}")),
    }
}

fn serve<D>(channel: &Channel, setup: &Setup, mut nic: D) -> Result<(), String>
where
    D: NetDevice,
    D::Queue: 'static,
{
    let mac = nic.mac();
    let link = nic
        .link()
        .map_err(|e| format!("reading the link state: {e}"))?;
    let text = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    channel
        .send(
            &ToHost::NetHello {
                pid: std::process::id(),
                mac: text,
                queues: 1,
                link_up: link.up,
            },
            &[],
        )
        .map_err(|e| ipc_failed("telling ring3d what the NIC has", e))?;
    let (message, fds) = channel
        .recv::<ToDriver>(Some(super::HOST_TIMEOUT))
        .map_err(|e| ipc_failed("waiting for the TAP interface", e))?;
    let ToDriver::ServeTap { interface } = message else {
        return Err("ring3d sent something other than the TAP interface".into());
    };
    let mut fds = fds.into_iter();
    let (Some(fd), None) = (fds.next(), fds.next()) else {
        return Err("the TAP interface came without exactly one file".into());
    };
    let tap = Tap::from_fd(fd, &interface).map_err(|e| format!("the TAP interface: {e}"))?;
    // One queue pair: the TAP interface has one queue.
    let mut queue = nic
        .take_queue(0)
        .map_err(|e| format!("taking queue 0: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stats: Arc<BridgeStats> = Arc::default();
    let options = BridgeOptions {
        max_frame: nic.max_frame(),
        ..BridgeOptions::default()
    };
    let bridge = {
        let stop = Arc::clone(&stop);
        let stats = Arc::clone(&stats);
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("bridge".into())
            .spawn(move || {
                let _entered = span.enter();
                ring3_net::tap::run_bridge(&mut queue, &tap, &stop, &stats, &options)
                    .map_err(|e| format!("bridging to {}: {e}", tap.name()))
            })
            .map_err(|e| format!("starting the bridge thread: {e}"))?
    };
    channel
        .send(&ToHost::Ready { id: 0 }, &[])
        .map_err(|e| ipc_failed("telling ring3d the bridge runs", e))?;
    tracing::info!(%interface, "bridged");
    let period = Duration::from_millis(setup.heartbeat_ms.max(1));
    let mut next = Instant::now();
    loop {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += period;
        if bridge.is_finished() {
            break;
        }
        let now = stats.snapshot();
        let beat = ToHost::Heartbeat {
            io: IoCounters {
                reads: now.queue.rx_packets,
                read_bytes: now.queue.rx_bytes,
                writes: now.queue.tx_packets,
                written_bytes: now.queue.tx_bytes,
                errors: now.queue.errors,
                ..IoCounters::default()
            },
            net: vec![NetQueueCounters {
                queue: 0,
                rx_packets: now.queue.rx_packets,
                rx_bytes: now.queue.rx_bytes,
                rx_drops: now.rx_drops(),
                tx_packets: now.queue.tx_packets,
                tx_bytes: now.queue.tx_bytes,
                tx_drops: now.tx_drops(),
                errors: now.queue.errors,
            }],
        };
        if let Err(e) = channel.send(&beat, &[]) {
            stop.store(true, Ordering::Release);
            return Err(ipc_failed("sending a heartbeat", e));
        }
    }
    match bridge.join() {
        Ok(result) => result,
        Err(_) => Err("the bridge thread panicked".into()),
    }
}
