//! Listening sockets and the life of connections: accept on TCP (with
//! TCP_NODELAY) or a Unix socket, serve each connection on a thread of its
//! own, and on shutdown stop accepting and wait until every connection has
//! finished its requests in flight.
//!
//! A connection's thread runs a single-threaded runtime: its reader, its
//! reply writer and its requests' tasks all run there, so a write's payload
//! is received and copied into the page cache on one core. On the shared
//! multi-threaded runtime the reader moved between workers each time it
//! waited for the socket, and a 1 MiB payload received on one core and
//! written on the other cost 100–150 µs more (`docs/BENCHMARKS.md`, "1 MiB
//! writes"). Connections share the export, its engine threads and the
//! capture rings, and run in parallel with each other as before.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::device::BlockDevice;
use crate::nbd::{serve_connection, Export};

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`. A stale Unix socket file at the path is replaced; any
    /// other file there is an error.
    pub async fn bind(addr: &ListenAddr) -> io::Result<Self> {
        match addr {
            ListenAddr::Tcp(addr) => Ok(Listener::Tcp(TcpListener::bind(addr).await?)),
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                Ok(Listener::Unix(UnixListener::bind(path)?, path.clone()))
            }
        }
    }

    /// The address as a client would name it, e.g. `127.0.0.1:10809` or `unix:/run/cdp.sock`.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("tcp (unknown: {e})"), |a| a.to_string()),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Serves `export` on every listener until `shutdown` is cancelled, then
/// waits for all connections to finish.
pub async fn serve<D: BlockDevice>(
    listeners: Vec<Listener>,
    export: Arc<Export<D>>,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    let acceptors = TaskTracker::new();
    for listener in listeners {
        let export = export.clone();
        let shutdown = shutdown.clone();
        let connections = connections.clone();
        acceptors.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = shutdown.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                match accepted {
                    Ok(connection) => {
                        if let Some(done) = connection.serve_on_thread(&export, &shutdown) {
                            connections.spawn(done);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(listener = %listener.describe(), error = %e, "accept failed");
                        // Out of descriptors and the like: let things settle.
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
            if let Listener::Unix(_, path) = &listener {
                let _ = std::fs::remove_file(path);
            }
        });
    }
    acceptors.close();
    acceptors.wait().await;
    connections.close();
    connections.wait().await;
}

/// An accepted connection and who is on the other end.
enum Connection {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

impl Listener {
    async fn accept(&self) -> io::Result<Connection> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                stream.set_nodelay(true)?;
                if peer.ip().is_loopback() {
                    unpaced(&stream);
                }
                Ok(Connection::Tcp(stream, peer))
            }
            Listener::Unix(l, _) => Ok(Connection::Unix(l.accept().await?.0)),
        }
    }
}

/// Congestion control without pacing, for a peer on this host: there is no
/// path to measure or queue to keep short on loopback, and BBR (the default
/// on many distributions) paces every segment with a timer of its own, which
/// costs a hypervisor exit per reply on a virtual machine. Reno is open to
/// unprivileged processes; where it is refused the default stays.
fn unpaced(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    const RENO: &[u8] = b"reno";
    // SAFETY: setsockopt reads RENO.len() bytes of a static string.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            RENO.as_ptr().cast(),
            RENO.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "keeping the default congestion control");
    }
}

impl Connection {
    /// Starts serving this connection on a thread of its own; the future
    /// completes when that thread is done. A connection that cannot get a
    /// thread or a runtime is logged and closed (`None`).
    fn serve_on_thread<D: BlockDevice>(
        self,
        export: &Arc<Export<D>>,
        shutdown: &CancellationToken,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let (export, shutdown) = (export.clone(), shutdown.clone());
        let detached = match self.detach() {
            Ok(detached) => detached,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand a connection to its thread; closing it");
                return None;
            }
        };
        let (finished, done) = tokio::sync::oneshot::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("cdp-conn".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start a connection's runtime; closing it");
                        return;
                    }
                };
                runtime.block_on(async move {
                    match Connection::attach(detached) {
                        Ok(connection) => run_connection(connection, export, shutdown).await,
                        Err(e) => tracing::warn!(error = %e, "cannot register a connection; closing it"),
                    }
                });
                // Dropped only here, so a shutdown waits for the whole thread.
                drop(finished);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a connection's thread; closing it");
            return None;
        }
        Some(async move {
            // Err(_) just means the thread is done: it never sends.
            let _ = done.await;
        })
    }

    /// The socket, taken off this runtime's reactor.
    fn detach(self) -> io::Result<DetachedConnection> {
        Ok(match self {
            Connection::Tcp(stream, peer) => DetachedConnection::Tcp(stream.into_std()?, peer),
            Connection::Unix(stream) => DetachedConnection::Unix(stream.into_std()?),
        })
    }

    /// The socket, registered with the current runtime's reactor.
    fn attach(detached: DetachedConnection) -> io::Result<Self> {
        Ok(match detached {
            DetachedConnection::Tcp(stream, peer) => {
                Connection::Tcp(TcpStream::from_std(stream)?, peer)
            }
            DetachedConnection::Unix(stream) => Connection::Unix(UnixStream::from_std(stream)?),
        })
    }
}

/// A connection between two runtimes (still non-blocking).
enum DetachedConnection {
    Tcp(std::net::TcpStream, SocketAddr),
    Unix(std::os::unix::net::UnixStream),
}

async fn run_connection<D: BlockDevice>(
    connection: Connection,
    export: Arc<Export<D>>,
    shutdown: CancellationToken,
) {
    let (peer, end) = match connection {
        Connection::Tcp(stream, peer) => {
            let (r, w) = stream.into_split();
            (
                peer.to_string(),
                serve_connection(r, w, export, shutdown).await,
            )
        }
        Connection::Unix(stream) => {
            let (r, w) = stream.into_split();
            (
                "unix".to_string(),
                serve_connection(r, w, export, shutdown).await,
            )
        }
    };
    if end.is_orderly() {
        tracing::info!(%peer, "connection closed: {end}");
    } else {
        tracing::warn!(%peer, "connection closed: {end}");
    }
}
