//! The seeded full sync: a new `cdp protect` process compares its disk with
//! the target's copy instead of copying all of it. It asks the target for
//! the SHA-256 digest of every 64 KiB chunk of the replica as it stood just
//! before the source's first record (the base the replication session
//! learned), and captures only the chunks whose digests differ from the
//! disk's. This module owns the seed session, a connection of its own beside
//! the replication session: the source's side ([`sync`]) and the wire
//! helpers the target's side (`target_writer::seed`) uses. Chunks and
//! windows are failback's ([`crate::failback`]). Format: `docs/FORMATS.md`
//! ("Seed session, version 1"); why this is exact: `docs/REPLICATION.md`
//! ("Full sync").

use std::time::Duration;

use filter::device::DeviceError;
use filter::protected::ProtectedDisk;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::codec::{FrameKind, FrameMeta};
pub use crate::failback::wire::meta;
use crate::failback::wire::{decode_digests, Totals};
use crate::failback::{chunk_digests, window_count, Span, CHUNK_SIZE};
use crate::key::Key;
use crate::session::{self, Hello, Protocol, Session, SessionError};

/// Seed: `cdp protect` (the source) asks `cdp target` for digests.
pub const SEED: Protocol = Protocol {
    name: "seed",
    magic: *b"CDPSEED1",
    version: 1,
    initiator: "source",
    responder: "target",
};

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("cannot reach the target: {0}")]
    Connect(String),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("the target cannot digest its copy: {0}")]
    Refused(String),
    #[error("seed protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Disk(#[from] DeviceError),
}

/// The target's side of the handshake: proves our key, checks the source's,
/// and asks `admit` whether we hold a copy of the announced disk.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &Key,
    admit: impl FnOnce(&Hello) -> Result<(), String>,
) -> Result<(Session, Hello), SessionError> {
    session::accept_with(stream, key, &SEED, admit).await
}

/// The target's side: which state the source asks for (every record below
/// the returned sequence number).
pub async fn read_request<S: AsyncRead + Unpin>(
    session: &mut Session,
    stream: &mut S,
) -> Result<u64, SeedError> {
    let (meta, _) = session.receive(stream).await?;
    if meta.kind != FrameKind::Request {
        return Err(SessionError::UnexpectedFrame(meta.kind).into());
    }
    Ok(meta.first_seq)
}

/// Captures the chunks of `disk` that differ from the target's copy as it
/// stood before sequence number `before`; `progress(bytes_compared)` is
/// called after every window. Returns `None` if `shutdown` came first.
pub async fn sync(
    target: &str,
    key: &Key,
    hello: Hello,
    before: u64,
    disk: &ProtectedDisk,
    shutdown: &CancellationToken,
    mut progress: impl FnMut(u64),
) -> Result<Option<Totals>, SeedError> {
    let connect = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target));
    let mut stream = connect
        .await
        .map_err(|_| SeedError::Connect("connect timed out".into()))?
        .map_err(|e| SeedError::Connect(e.to_string()))?;
    stream.set_nodelay(true).map_err(SessionError::from)?;
    let mut session = session::connect_with(&mut stream, key, &SEED, hello).await?;
    let request = meta(FrameKind::Request, hello.disk_id, before, 0);
    session.send(&mut stream, &request, &[]).await?;
    let mut totals = Totals::default();
    for index in 0..window_count(hello.disk_size) {
        let span = Span::of_window(hello.disk_size, index);
        let (got, body) = tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            digests = receive(&mut session, &mut stream, FrameKind::Digests) => digests?,
        };
        if (got.first_seq, got.last_seq) != (span.first, span.last) {
            return Err(SeedError::Protocol(format!(
                "digests for chunks {}..={} arrived where we expected {}..={}",
                got.first_seq, got.last_seq, span.first, span.last
            )));
        }
        let theirs =
            decode_digests(&body, span.chunks()).map_err(|e| SeedError::Protocol(e.to_string()))?;
        let bytes = disk
            .capture_differing(span.offset, span.len, CHUNK_SIZE, move |ours| {
                let ours = chunk_digests(ours);
                ours.iter().zip(&theirs).map(|(a, b)| a != b).collect()
            })
            .await?;
        totals.windows += 1;
        totals.chunks += span.chunks();
        // Only the disk's last chunk may be short, so this counts chunks.
        totals.differing += bytes.div_ceil(CHUNK_SIZE);
        totals.bytes += bytes;
        progress(span.offset + span.len);
    }
    let (_, body) = receive(&mut session, &mut stream, FrameKind::Done).await?;
    let theirs = Totals::decode(&body).map_err(|e| SeedError::Protocol(e.to_string()))?;
    if (theirs.windows, theirs.chunks) != (totals.windows, totals.chunks) {
        return Err(SeedError::Protocol(format!(
            "the target digested {} windows ({} chunks), we compared {} ({})",
            theirs.windows, theirs.chunks, totals.windows, totals.chunks
        )));
    }
    Ok(Some(totals))
}

/// The next frame, which must be of kind `want` (or a refusal, which
/// becomes the error).
async fn receive(
    session: &mut Session,
    stream: &mut TcpStream,
    want: FrameKind,
) -> Result<(FrameMeta, Vec<u8>), SeedError> {
    let (meta, body) = session.receive(stream).await?;
    match meta.kind {
        kind if kind == want => Ok((meta, body)),
        FrameKind::Refusal => Err(SeedError::Refused(
            String::from_utf8_lossy(&body).into_owned(),
        )),
        other => Err(SessionError::UnexpectedFrame(other).into()),
    }
}
