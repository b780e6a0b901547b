//! A node cut off from the broker, for tests: the node runs in a network namespace of its own,
//! where the broker's address (`127.0.0.1:PORT`, as the broker advertises it) is a proxy the test
//! controls. The proxy's listening socket lives in the namespace; its connections to the broker
//! are made from the test's own namespace. Cutting a direction stops forwarding it: the
//! connection stays open and silent, like a network that drops packets.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

/// What passes through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Cut {
    /// Everything.
    Open = 0,
    /// Nothing, either way.
    Both = 1,
    /// The node's requests reach the broker; nothing comes back (it cannot read).
    Reads = 2,
}

/// A network namespace with a controllable proxy to the broker.
pub struct Partition {
    name: String,
    cut: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
}

impl Partition {
    /// Creates namespace `shiva-<pid>-<label>` and its proxy to `127.0.0.1:port`.
    pub fn new(label: &str, port: u16) -> Partition {
        let name = format!("shiva-{}-{label}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let created = Command::new("ip").args(["netns", "add", &name]).output().expect("run ip (iproute2)");
        assert!(
            created.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        let up = Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]).output().unwrap();
        assert!(up.status.success(), "lo up in {name}: {}", String::from_utf8_lossy(&up.stderr));
        let cut = Arc::new(AtomicU8::new(Cut::Open as u8));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (accepted_tx, accepted) = std::sync::mpsc::channel::<TcpStream>();
        let (path, thread_stop) = (format!("/var/run/netns/{name}"), stop.clone());
        std::thread::spawn(move || {
            // This thread alone enters the namespace: its listener is bound there.
            let namespace = std::fs::File::open(&path).expect("open the namespace");
            setns(namespace, CloneFlags::CLONE_NEWNET).expect("setns");
            let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the proxy in the namespace");
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !thread_stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if accepted_tx.send(stream).is_err() {
                            return;
                        }
                    }
                    Err(err) if err.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        ready.recv_timeout(Duration::from_secs(5)).expect("the proxy listens");
        let (pump_cut, pump_stop) = (cut.clone(), stop.clone());
        std::thread::spawn(move || {
            // This thread stays in the test's namespace: the broker is reached from here.
            for node_side in accepted {
                let Ok(broker_side) = TcpStream::connect(("127.0.0.1", port)) else { continue };
                let _ = node_side.set_nodelay(true);
                let _ = broker_side.set_nodelay(true);
                for (from, to, up) in [
                    (node_side.try_clone().unwrap(), broker_side.try_clone().unwrap(), true),
                    (broker_side, node_side, false),
                ] {
                    let (cut, stop) = (pump_cut.clone(), pump_stop.clone());
                    std::thread::spawn(move || pump(from, to, up, &cut, &stop));
                }
            }
        });
        Partition { name, cut, stop }
    }

    /// Changes what passes.
    pub fn set(&self, cut: Cut) {
        self.cut.store(cut as u8, Ordering::SeqCst);
    }

    /// The command prefix that runs a program in the namespace.
    pub fn exec(&self) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.name.clone()]
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, up: bool, cut: &AtomicU8, stop: &AtomicBool) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let blocked = match cut.load(Ordering::SeqCst) {
            1 => true,
            2 => !up,
            _ => false,
        };
        if blocked {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
