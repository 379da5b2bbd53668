//! A TCP proxy between `cdp protect` and `cdp target` that tests break.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::common::read_all;
use crate::support::*;
use crate::workload::Writer;

/// `cdp target`, a proxy in front of it, and `cdp protect` of a seeded disk
/// replicating through the proxy while a writer writes to it.
pub struct ProxiedReplication {
    pub disk: PathBuf,
    /// What the disk held before protect started.
    pub initial: Vec<u8>,
    pub port: u16,
    pub upstream: SocketAddr,
    pub proxy: Proxy,
    pub protect: Daemon,
    pub writer: Writer,
    _target: Daemon,
}

impl ProxiedReplication {
    /// `proxy` starts the proxy on a free port in front of the target.
    pub fn start(lab: &Lab, seed: u64, proxy: impl FnOnce(u16, SocketAddr) -> Proxy) -> Self {
        let disk = lab.disk("disk.img", seed);
        let initial = read_all(&disk);
        let target = lab.target("127.0.0.1:0");
        let upstream: SocketAddr = target.addr.parse().expect("target address");
        let port = free_port();
        let proxy = proxy(port, upstream);
        let protect = lab.protect(&disk, &format!("127.0.0.1:{port}"));
        let writer = Writer::start(&lab.workload, protect.uri(), 0);
        ProxiedReplication {
            disk,
            initial,
            port,
            upstream,
            proxy,
            protect,
            writer,
            _target: target,
        }
    }
}

/// One proxied connection: client side, upstream side, abandoned.
type Conn = (TcpStream, TcpStream, Arc<AtomicBool>);

/// A TCP proxy on 127.0.0.1:`port` to `upstream`, which tests break.
pub struct Proxy {
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<Conn>>>,
    /// Set: the next read from a client forwards half its bytes, then that
    /// connection is cut (both sides).
    cut_mid_frame: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(port: u16, upstream: SocketAddr) -> Proxy {
        Proxy::start_with(port, upstream, None)
    }

    /// A proxy that passes what the target sends on a byte at a time, one
    /// every `per_byte`, as a slow or lossy return path would.
    pub fn start_trickling(port: u16, upstream: SocketAddr, per_byte: Duration) -> Proxy {
        Proxy::start_with(port, upstream, Some(per_byte))
    }

    fn start_with(port: u16, upstream: SocketAddr, trickle: Option<Duration>) -> Proxy {
        let listener = crate::common::retry(Duration::from_secs(5), || {
            TcpListener::bind(("127.0.0.1", port)).map_err(|e| e.to_string())
        })
        .unwrap_or_else(|e| panic!("the proxy cannot bind port {port}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<_>>> = Arc::default();
        let cut_mid_frame = Arc::new(AtomicBool::new(false));
        let (flag, list, cut) = (stop.clone(), conns.clone(), cut_mid_frame.clone());
        let accept = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    sleep_ms(5);
                    continue;
                };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue; // dropping the client closes it
                };
                client.set_nonblocking(false).expect("blocking");
                let abandoned = Arc::new(AtomicBool::new(false));
                let clone = |s: &TcpStream| s.try_clone().expect("clone socket");
                list.lock().expect("lock").push((
                    clone(&client),
                    clone(&server),
                    abandoned.clone(),
                ));
                let up = (clone(&client), clone(&server), abandoned.clone());
                let cut = cut.clone();
                std::thread::spawn(move || pump(up.0, up.1, up.2, Some(cut)));
                std::thread::spawn(move || match trickle {
                    Some(per_byte) => trickle_pump(server, client, per_byte),
                    None => pump(server, client, abandoned, None),
                });
            }
        });
        Proxy {
            stop,
            conns,
            cut_mid_frame,
            accept: Some(accept),
        }
    }

    /// Cuts the connection in the middle of what the source is sending
    /// (waits up to 5 s for it to send something); keeps listening.
    pub fn cut_mid_frame(&self) {
        self.cut_mid_frame.store(true, Ordering::SeqCst);
        let cut = crate::common::retry(Duration::from_secs(5), || {
            match self.cut_mid_frame.load(Ordering::SeqCst) {
                false => Ok(()),
                true => Err("the source sent nothing for 5 s".to_string()),
            }
        });
        cut.unwrap_or_else(|e| panic!("cannot cut mid-frame: {e}"));
    }

    /// Closes the source's side of every connection but leaves the target's
    /// side open and silent, as a network that fails without a FIN or RST
    /// reaching the target would.
    pub fn abandon_connections(&self) {
        for (client, _, abandoned) in self.conns.lock().expect("lock").iter() {
            abandoned.store(true, Ordering::SeqCst);
            let _ = client.shutdown(Shutdown::Both);
        }
    }

    /// Stops listening and closes every connection (both sides).
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for (client, server, _) in self.conns.lock().expect("lock").drain(..) {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shut();
    }
}

/// Copies `from` to `to` a byte at a time, each in a segment of its own,
/// until either fails; then closes both.
fn trickle_pump(mut from: TcpStream, mut to: TcpStream, per_byte: Duration) {
    to.set_nodelay(true).expect("TCP_NODELAY");
    let mut buf = vec![0u8; 64 << 10];
    'copy: while let Ok(n @ 1..) = from.read(&mut buf) {
        for byte in &buf[..n] {
            std::thread::sleep(per_byte);
            if to.write_all(std::slice::from_ref(byte)).is_err() {
                break 'copy;
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Copies `from` to `to` until either fails; then closes both, except the
/// upstream side of an abandoned connection.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    abandoned: Arc<AtomicBool>,
    cut: Option<Arc<AtomicBool>>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.as_ref().is_some_and(|c| c.load(Ordering::SeqCst)) {
            let _ = to.write_all(&buf[..n.div_ceil(2)]);
            if let Some(cut) = &cut {
                cut.store(false, Ordering::SeqCst);
            }
            break;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    if !abandoned.load(Ordering::SeqCst) {
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    }
}
