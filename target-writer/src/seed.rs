//! The target's side of the seed session (`pipeline::seed`): a new source
//! asks for the digests of the replica as it stood just before the source's
//! base, so that its full sync copies only the chunks that differ. This
//! module rebuilds that state as layers ([`History::image`]; the journal
//! part goes to an unnamed file in the target directory, gone when the
//! session ends) and streams the SHA-256 digest of every 64 KiB chunk, one
//! frame per 4 MiB window, then a done frame. It reads the history as
//! `serve-point` does, pinned against retention, and never writes to the
//! journal; the replication session goes on meanwhile.

use std::path::Path;
use std::time::Duration;

use filter::device::{BlockDevice, DeviceError};
use pipeline::codec::FrameKind;
use pipeline::failback::{chunk_digests, window_count, Span, Totals};
use pipeline::key::Key;
use pipeline::seed::{self, SeedError};
use pipeline::session::{Hello, SessionError};
use tokio::net::TcpStream;

use crate::history::{Check, History};
use crate::served::ServedPoint;

/// Why a seed session ended without its done frame.
#[derive(Debug, thiserror::Error)]
pub enum SeedServeError {
    #[error(transparent)]
    Seed(#[from] SeedError),
    #[error("refused the source: {0}")]
    Refused(String),
    #[error("reading our copy of the disk: {0}")]
    Read(#[from] DeviceError),
    #[error("a digest task died: {0}")]
    Task(String),
    #[error("the source read nothing for {0:?}")]
    Stalled(Duration),
}

/// How long a source may leave our digests unread before the session ends:
/// an open session pins the history, which defers retention.
const STALL: Duration = Duration::from_secs(600);

impl From<SessionError> for SeedServeError {
    fn from(e: SessionError) -> Self {
        SeedServeError::Seed(e.into())
    }
}

/// Serves one seed session on `stream`, whose handshake `accept` has
/// already run. `dir` is the target directory; `hello` the disk announced.
pub async fn serve(
    stream: &mut TcpStream,
    mut session: pipeline::session::Session,
    hello: Hello,
    dir: &Path,
    key: &Key,
) -> Result<Totals, SeedServeError> {
    let before = seed::read_request(&mut session, stream).await?;
    let started = std::time::Instant::now();
    let (dir_owned, key_owned) = (dir.to_path_buf(), key.clone());
    let opened = tokio::task::spawn_blocking(move || state_before(&dir_owned, &key_owned, before))
        .await
        .map_err(|e| SeedServeError::Task(e.to_string()))?;
    let (_history, copy) = match opened {
        Ok(opened) => opened,
        Err(why) => {
            let refusal = seed::meta(FrameKind::Refusal, hello.disk_id, 0, 0);
            // The source learns why, if it still listens; we log it either way.
            let _ = session.send(stream, &refusal, why.as_bytes()).await;
            return Err(SeedServeError::Refused(why));
        }
    };
    tracing::info!(
        before_seq = before,
        seconds = started.elapsed().as_secs_f64(),
        "a new source compares its disk with our copy: copy opened"
    );
    let size = hello.disk_size;
    let mut totals = Totals::default();
    for index in 0..window_count(size) {
        let span = Span::of_window(size, index);
        let data = copy.read(span.offset, span.len as u32).await?;
        let digests = tokio::task::spawn_blocking(move || chunk_digests(&data).concat())
            .await
            .map_err(|e| SeedServeError::Task(e.to_string()))?;
        let frame = seed::meta(FrameKind::Digests, hello.disk_id, span.first, span.last);
        tokio::time::timeout(STALL, session.send(stream, &frame, &digests))
            .await
            .map_err(|_| SeedServeError::Stalled(STALL))??;
        crate::longterm::crash_point("seed:digests-sent");
        totals.windows += 1;
        totals.chunks += span.chunks();
    }
    let done = seed::meta(FrameKind::Done, hello.disk_id, 0, 0);
    session.send(stream, &done, &totals.encode()).await?;
    Ok(totals)
}

/// Opens the history in `dir` and the disk as it stood before sequence
/// number `before`, as a read-only device; the history holds the pin while
/// the device is read. The error is the reason given to the source.
fn state_before(dir: &Path, key: &Key, before: u64) -> Result<(History, ServedPoint), String> {
    let history = History::open(dir, Check::WhenRead).map_err(|e| e.to_string())?;
    let point = history.state_before(before).ok_or_else(|| {
        format!(
            "{} holds no copy of the disk ending at sequence number {} (rolled past, or never \
             there)",
            dir.display(),
            before.saturating_sub(1)
        )
    })?;
    let image = history
        .image(key, &point, dir)
        .map_err(|e| format!("rebuilding our copy as of entry {}: {e}", point.id))?;
    Ok((history, ServedPoint::read_only(image)))
}
