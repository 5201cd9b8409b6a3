//! Lab tests of `ring3 net ADDR tap` inside the lab VM (`cargo xtask test`): a NIC driven
//! by ring3 (a virtio-net, or an e1000e) and bridged to a TAP interface (10.33.0.1/24), and
//! an e1000e NIC driven by the kernel's own e1000e driver in a network namespace of its own
//! (10.33.0.2/24). All of them sit on one QEMU hub, so traffic between the two addresses
//! leaves through one emulated NIC and comes in through the other.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring3::pci::{PciAddress, PciDevice, Sysfs};

const VIRTIO_NET: (u16, u16) = (0x1af4, 0x1041);
const E1000E: (u16, u16) = (0x8086, 0x10d3);
/// The TAP interface `ring3 net ADDR tap` creates.
const TAP_NAME: &str = "r3lab0";
const TAP_ADDRESS: &str = "10.33.0.1/24";
const PEER_NAMESPACE: &str = "r3peer";
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 33, 0, 2);
const PEER_ADDRESS: &str = "10.33.0.2/24";
/// Everything under TCG is slow: bringing a NIC up, the first frames, a transfer.
const SETUP_TIMEOUT: Duration = Duration::from_secs(90);

/// One setup at a time: the tests share the NICs, the namespace and the interface name.
static LAB: Mutex<()> = Mutex::new(());

fn in_lab() {
    assert_eq!(
        std::env::var("RING3_LAB").as_deref(),
        Ok("1"),
        "lab tests run inside the lab VM: use `cargo xtask test`"
    );
}

/// A command's output, echoed to the test's output; panics if it did not run at all.
fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    eprintln!(
        "$ {program} {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs a command that must succeed.
fn must(program: &str, args: &[&str]) -> Output {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{program} {} failed",
        args.join(" ")
    );
    output
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The hub NICs with these IDs, each alone in its IOMMU group (the lab's other NICs sit
/// behind a PCIe-to-PCI bridge, in a shared group, on another hub), in address order.
fn hub_nics(sysfs: &Sysfs, ids: (u16, u16)) -> Vec<PciDevice> {
    let mut nics: Vec<PciDevice> = sysfs
        .devices()
        .expect("listing PCI devices")
        .into_iter()
        .filter(|d| (d.vendor_id, d.device_id) == ids)
        .filter(|d| {
            d.iommu_group
                .and_then(|group| sysfs.iommu_group_devices(group).ok())
                .is_some_and(|members| members.len() == 1)
        })
        .collect();
    nics.sort_by_key(|d| d.address);
    nics
}

/// The guest kernel's module tree, which the lab unpacks under the target directory.
fn guest_modules_tree() -> PathBuf {
    let release = String::from_utf8(must("uname", &["-r"]).stdout)
        .expect("uname prints text")
        .trim()
        .to_owned();
    let exe = std::env::current_exe().expect("the test's path");
    // <target>/<profile>/deps/<test>
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the test runs from the target directory");
    let tree = target.join("lab/kernel").join(&release);
    assert!(
        tree.join("lib/modules").join(&release).is_dir(),
        "lab setup: the guest kernel's modules are in {}",
        tree.display()
    );
    tree
}

/// The kernel's network interface on the NIC at `address`.
fn interface_of(sysfs: &Sysfs, address: PciAddress) -> Option<String> {
    let dir = sysfs.device_path(address).join("net");
    fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .next()
}

/// The two ends: ring3 bridging one hub NIC to a TAP, the kernel's e1000e driving another
/// in namespace `r3peer`. Dropping it stops ring3 (SIGTERM), deletes the namespace and
/// gives ring3's NIC back to the kernel.
struct Wire {
    ring3: Option<Child>,
    ring3_output: PathBuf,
    /// ring3's NIC, once bound to vfio-pci.
    ours: Option<PciAddress>,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl Wire {
    /// ring3 drives a hub NIC with `ids`: the last virtio-net, or the first e1000e (the
    /// kernel takes the last e1000e).
    fn set_up(ids: (u16, u16)) -> Wire {
        in_lab();
        let lock = LAB.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let sysfs = Sysfs::system();
        // Cleans up from here on, also after a failed step (and after an earlier test that
        // failed to: its namespace may still hold the e1000e's interface).
        let mut wire = Wire {
            ring3: None,
            ring3_output: std::env::temp_dir()
                .join(format!("ring3-net-tap-{}.log", std::process::id())),
            ours: None,
            _lock: lock,
        };
        let _ = run("ip", &["netns", "del", PEER_NAMESPACE]);

        // The kernel's end: the last hub e1000e, on the kernel's e1000e driver.
        let e1000e = hub_nics(&sysfs, E1000E)
            .pop()
            .expect("lab setup: an e1000e NIC on the hub");
        if e1000e.driver.as_deref() == Some("vfio-pci") {
            sysfs
                .unbind_from_vfio(e1000e.address)
                .expect("giving the e1000e back to the kernel");
        }
        let tree = guest_modules_tree();
        must("modprobe", &["-d", &tree.to_string_lossy(), "e1000e"]);
        // ring3's TAP needs the tun module and its device node.
        must("modprobe", &["-d", &tree.to_string_lossy(), "tun"]);
        wait_until("/dev/net/tun", Duration::from_secs(5), || {
            PathBuf::from("/dev/net/tun").exists()
        });
        let e1000e_name = e1000e.address.to_string();
        if sysfs
            .device(e1000e.address)
            .expect("the e1000e")
            .driver
            .is_none()
        {
            fs::write("/sys/bus/pci/drivers_probe", &e1000e_name).expect("probing the e1000e");
        }
        let mut peer_interface = None;
        wait_until("the e1000e's interface", SETUP_TIMEOUT, || {
            peer_interface = interface_of(&sysfs, e1000e.address);
            peer_interface.is_some()
        });
        let peer_interface = peer_interface.unwrap_or_default();
        must("ip", &["netns", "add", PEER_NAMESPACE]);
        must(
            "ip",
            &["link", "set", &peer_interface, "netns", PEER_NAMESPACE],
        );
        let peer = |args: &[&str]| {
            let mut full = vec!["-n", PEER_NAMESPACE];
            full.extend_from_slice(args);
            must("ip", &full);
        };
        peer(&["addr", "add", PEER_ADDRESS, "dev", &peer_interface]);
        peer(&["link", "set", &peer_interface, "up"]);
        peer(&["link", "set", "lo", "up"]);

        // ring3's end, on vfio-pci, bridged to a TAP.
        let mut candidates = hub_nics(&sysfs, ids);
        let ours = if ids == E1000E {
            candidates.first().cloned()
        } else {
            candidates.pop()
        }
        .expect("lab setup: a NIC for ring3 on the hub");
        assert_ne!(
            ours.address, e1000e.address,
            "lab setup: two hub e1000e NICs"
        );
        sysfs
            .bind_to_vfio(ours.address, false)
            .expect("binding ring3's NIC to vfio-pci");
        wire.ours = Some(ours.address);
        let log = fs::File::create(&wire.ring3_output).expect("a log file");
        let ring3 = Command::new(env!("CARGO_BIN_EXE_ring3"))
            .args([
                "net",
                &ours.address.to_string(),
                "tap",
                "--name",
                TAP_NAME,
                "--address",
                TAP_ADDRESS,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting ring3 net tap");
        wire.ring3 = Some(ring3);
        wait_until(
            "ring3's TAP interface with its address",
            SETUP_TIMEOUT,
            || {
                if let Some(child) = wire.ring3.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("ring3 net tap exited early ({status}):\n{}", wire.log());
                    }
                }
                let shown = run("ip", &["-4", "addr", "show", "dev", TAP_NAME]);
                String::from_utf8_lossy(&shown.stdout).contains("10.33.0.1/24")
            },
        );
        wire
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.ring3_output).unwrap_or_default()
    }

    /// Stops ring3 with SIGTERM and returns its output; the TAP must be gone.
    fn stop_ring3(&mut self) -> String {
        let Some(mut child) = self.ring3.take() else {
            return self.log();
        };
        let pid = rustix::process::Pid::from_child(&child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .expect("sending SIGTERM to ring3");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for ring3") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ring3 did not stop on SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let log = self.log();
        assert!(status.success(), "ring3 net tap failed ({status}):\n{log}");
        assert!(
            !PathBuf::from("/sys/class/net").join(TAP_NAME).exists(),
            "the TAP interface is gone once ring3 stopped"
        );
        log
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        if let Some(mut child) = self.ring3.take() {
            let pid = rustix::process::Pid::from_child(&child);
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let _ = child.wait();
        }
        let _ = run("ip", &["netns", "del", PEER_NAMESPACE]);
        if let Some(ours) = self.ours {
            let _ = Sysfs::system().unbind_from_vfio(ours);
        }
        let _ = fs::remove_file(&self.ring3_output);
    }
}

/// `ping -c 5`, with the system's ping or busybox's.
fn ping(target: Ipv4Addr) -> Output {
    let target = target.to_string();
    let have_ping = Command::new("ping")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if have_ping {
        run("ping", &["-c", "5", "-W", "5", &target])
    } else {
        run("busybox", &["ping", "-c", "5", "-W", "5", &target])
    }
}

/// How many echo replies ping reports ("5 packets received" / "5 received").
fn replies(output: &Output) -> u32 {
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find(|line| line.contains("transmitted"))
        .and_then(|line| {
            let words: Vec<&str> = line.split([',', ' ']).filter(|w| !w.is_empty()).collect();
            let at = words.iter().position(|w| *w == "received")?;
            let count = if at >= 2 && words[at - 1] == "packets" {
                words[at - 2]
            } else {
                words.get(at.checked_sub(1)?)?
            };
            count.parse().ok()
        })
        .unwrap_or(0)
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_net_tap_info_shows_the_nic() {
    in_lab();
    let _lock = LAB.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let sysfs = Sysfs::system();
    let virtio = hub_nics(&sysfs, VIRTIO_NET)
        .pop()
        .expect("lab setup: a virtio-net NIC on the hub");
    sysfs
        .bind_to_vfio(virtio.address, false)
        .expect("binding the virtio-net to vfio-pci");
    let output = run(
        env!("CARGO_BIN_EXE_ring3"),
        &["net", &virtio.address.to_string(), "info"],
    );
    let _ = sysfs.unbind_from_vfio(virtio.address);
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("virtio-net driver"), "{text}");
    assert!(
        text.contains("MAC address  52:54:00:"),
        "QEMU's MAC prefix: {text}"
    );
    assert!(text.contains("link         up"), "{text}");
    assert!(text.contains("queue pairs  1"), "{text}");
}

fn ping_through(ids: (u16, u16)) {
    let mut wire = Wire::set_up(ids);
    let output = ping(PEER_IP);
    let received = replies(&output);
    let log = wire.stop_ring3();
    eprintln!("ring3 net tap:\n{log}");
    assert!(
        received >= 4,
        "{received} of 5 echo replies came back through the TAP:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(log.contains("received "), "ring3 printed its totals: {log}");
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_net_tap_ping_crosses_the_wire_to_the_kernels_e1000e() {
    ping_through(VIRTIO_NET);
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_net_tap_ping_from_ring3s_e1000e_to_the_kernels() {
    ping_through(E1000E);
}

/// Bytes that differ at every offset and between the two directions.
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

/// FNV-1a, 64 bits.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A server in the peer's namespace: reads a length and that many bytes, answers with
/// their checksum, then sends `reply` back. Returns the checksum of what it read.
fn serve_in_peer_namespace(reply: Vec<u8>) -> (u16, std::thread::JoinHandle<u64>) {
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        let namespace =
            fs::File::open(format!("/run/netns/{PEER_NAMESPACE}")).expect("the peer's namespace");
        // Only this thread moves; the sockets it opens from then on live in the namespace.
        rustix::thread::move_into_link_name_space(
            namespace.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("entering the peer's namespace");
        let listener =
            TcpListener::bind(SocketAddrV4::new(PEER_IP, 0)).expect("listening in the peer");
        let port = listener.local_addr().expect("the port").port();
        port_tx.send(port).expect("telling the port");
        let (mut stream, _) = listener.accept().expect("a connection");
        stream
            .set_read_timeout(Some(Duration::from_secs(300)))
            .expect("timeout");
        let mut length = [0u8; 8];
        stream.read_exact(&mut length).expect("the length");
        let mut data = vec![0u8; u64::from_le_bytes(length) as usize];
        stream.read_exact(&mut data).expect("the data");
        let sum = checksum(&data);
        stream.write_all(&sum.to_le_bytes()).expect("the checksum");
        stream.write_all(&reply).expect("the reply");
        stream.flush().expect("flush");
        sum
    });
    let port = port_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server listens");
    (port, server)
}

#[test]
#[ignore = "needs the lab VM: cargo xtask test"]
fn lab_net_tap_tcp_transfer_both_ways_keeps_every_byte() {
    const MIB: usize = 1 << 20;
    let mut wire = Wire::set_up(VIRTIO_NET);
    let to_peer = pattern(4 * MIB, 1);
    let from_peer = pattern(4 * MIB, 2);
    let (port, server) = serve_in_peer_namespace(from_peer.clone());

    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(
        &SocketAddrV4::new(PEER_IP, port).into(),
        Duration::from_secs(30),
    )
    .expect("connecting through the TAP");
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .expect("timeout");
    stream
        .write_all(&(to_peer.len() as u64).to_le_bytes())
        .expect("the length");
    stream.write_all(&to_peer).expect("sending");
    let mut sum = [0u8; 8];
    stream.read_exact(&mut sum).expect("the peer's checksum");
    let mut received = vec![0u8; from_peer.len()];
    stream.read_exact(&mut received).expect("receiving");
    let elapsed = started.elapsed();
    let served = server.join().expect("the server thread");
    let log = wire.stop_ring3();
    eprintln!(
        "8 MiB through the TAP in {elapsed:?} ({:.2} MiB/s)\nring3 net tap:\n{log}",
        8.0 / elapsed.as_secs_f64()
    );
    assert_eq!(served, checksum(&to_peer), "the peer read what was sent");
    assert_eq!(u64::from_le_bytes(sum), served, "the checksum came back");
    assert!(
        received == from_peer,
        "what came back is what the peer sent"
    );
}
