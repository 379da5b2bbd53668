//! The control server inside `cdp protect`: accepts connections on the
//! control socket, reads requests line by line and answers each (protocol
//! in [`super::protocol`]). A malformed request gets an error line and the
//! connection goes on; only an over-long line ends it.
//!
//! It holds the protected disk weakly, so it never keeps the capture stream
//! open at shutdown; it stops accepting (and removes the socket) as soon as
//! protect begins to stop, while requests already waiting for the target
//! keep waiting until the shipper ends.

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use filter::capture::Tag;
use filter::nbd::Export;
use filter::protected::ProtectedDisk;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::protocol::{ErrorCode, ProtocolError, Reply, Request, MAX_LINE};
use super::socket::{self, SocketFile};
use super::ControlError;
use crate::shipper::{Acknowledged, SyncProgress};

/// What requests act on: the protected disk, where the full sync stands,
/// and how far the target has acknowledged.
#[derive(Debug)]
pub struct ControlContext {
    pub disk: Weak<Export<ProtectedDisk>>,
    pub sync: Arc<SyncProgress>,
    pub acknowledged: watch::Receiver<Acknowledged>,
}

/// A bound control socket, not yet serving.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    file: SocketFile,
}

impl ControlServer {
    /// Binds the control socket at `path` (mode 0600; see the module docs
    /// of `socket.rs` for what may already be there). Needs a tokio runtime.
    pub fn bind(path: &Path) -> Result<ControlServer, ControlError> {
        let (listener, file) = socket::bind(path)?;
        let listener = UnixListener::from_std(listener).map_err(|source| ControlError::Io {
            path: path.to_path_buf(),
            op: "register with the runtime",
            source,
        })?;
        Ok(ControlServer { listener, file })
    }

    /// Serves until `shutdown` is cancelled, then removes the socket and
    /// waits for the connections to finish.
    pub async fn serve(self, context: ControlContext, shutdown: CancellationToken) {
        let ControlServer { listener, file } = self;
        let context = Arc::new(context);
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        connections.spawn(connection(stream, context.clone(), shutdown.clone()));
                    }
                    Err(e) => {
                        tracing::warn!("control socket: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(listener);
        drop(file);
        while connections.join_next().await.is_some() {}
    }
}

/// One client: requests in order until it hangs up or protect stops.
async fn connection(stream: UnixStream, context: Arc<ControlContext>, shutdown: CancellationToken) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut read).take(MAX_LINE as u64);
        let got = tokio::select! {
            () = shutdown.cancelled() => return,
            got = limited.read_until(b'\n', &mut line) => got,
        };
        let result = match got {
            Ok(0) | Err(_) => return,
            Ok(n) if n == MAX_LINE && !line.ends_with(b"\n") => {
                let error = ProtocolError::new(
                    ErrorCode::BadRequest,
                    format!("a request line is at most {MAX_LINE} bytes; closing"),
                );
                let _ = send(&mut write, &Reply::Error(error)).await;
                return;
            }
            Ok(_) => answer(&line, &context, &mut write).await,
        };
        if result.is_err() {
            return;
        }
    }
}

/// Answers one request line.
async fn answer(
    line: &[u8],
    context: &ControlContext,
    write: &mut OwnedWriteHalf,
) -> std::io::Result<()> {
    let request = std::str::from_utf8(line)
        .map_err(|_| ProtocolError::new(ErrorCode::BadRequest, "a request must be UTF-8"))
        .and_then(Request::parse);
    match request {
        Err(error) => {
            tracing::warn!("control socket: refused a request: {error}");
            send(write, &Reply::Error(error)).await
        }
        Ok(Request::Tag { tag, timeout }) => {
            let capture_seq = match insert(context, &tag).await {
                Ok(seq) => seq,
                Err(error) => {
                    tracing::warn!(%tag, "tagged point not inserted: {error}");
                    return send(write, &Reply::Error(error)).await;
                }
            };
            let inserted = Reply::Inserted {
                tag: tag.clone(),
                capture_seq,
            };
            send(write, &inserted).await?;
            let reply = durable(context, tag, capture_seq, timeout).await;
            send(write, &reply).await
        }
    }
}

/// Inserts the tagged barrier; returns its capture sequence number.
async fn insert(context: &ControlContext, tag: &Tag) -> Result<u64, ProtocolError> {
    if !context.sync.is_complete() {
        return Err(ProtocolError::new(
            ErrorCode::FullSync,
            "a full sync is running, and restore points (tagged ones too) exist only once \
             it completes; try again after protect logs \"full sync complete\"",
        ));
    }
    let Some(export) = context.disk.upgrade() else {
        return Err(ProtocolError::new(
            ErrorCode::ShuttingDown,
            "protect is stopping",
        ));
    };
    let seq =
        export.device.tagged_barrier(tag).await.map_err(|e| {
            ProtocolError::new(ErrorCode::Capture, format!("no point inserted: {e}"))
        })?;
    tracing::info!(%tag, capture_seq = seq, "tagged barrier inserted");
    Ok(seq)
}

/// Waits until the target has acknowledged capture sequence number `seq`.
async fn durable(context: &ControlContext, tag: Tag, seq: u64, timeout: Duration) -> Reply {
    let mut acknowledged = context.acknowledged.clone();
    let waited = tokio::time::timeout(timeout, acknowledged.wait_for(|a| a.next > seq)).await;
    match waited.map(|r| r.map(|a| a.base)) {
        Ok(Ok(Some(base))) => {
            tracing::info!(%tag, seq = base + seq, "tagged point durable on the target");
            Reply::Durable {
                tag,
                seq: base + seq,
            }
        }
        Ok(Ok(None) | Err(_)) => Reply::Error(ProtocolError::new(
            ErrorCode::Replication,
            "replication stopped before the target acknowledged the point",
        )),
        Err(_) => Reply::Error(ProtocolError::new(
            ErrorCode::Timeout,
            format!(
                "the target has not acknowledged the point within {timeout:?}; it stays \
                 queued in protect and becomes a restore point once the target takes it"
            ),
        )),
    }
}

async fn send(write: &mut OwnedWriteHalf, reply: &Reply) -> std::io::Result<()> {
    write.write_all(reply.to_line().as_bytes()).await
}
