//! The target's listener (`cdp target`): one journal per directory, one
//! source session at a time — a newly authenticated session replaces the
//! previous one, which may be a connection whose peer vanished without a
//! close (a source reconnecting after a network failure must not be locked
//! out). For every batch frame it verifies the frame
//! (authenticity, replay, disk, sequence), appends it to the journal —
//! which fdatasyncs — and only then acknowledges it. A batch the journal
//! already holds (a resend after a reconnect) is acknowledged without being
//! written twice. A tagged batch is journaled with its tag, and once it is
//! acknowledged the long-term roller is woken to keep it as a long-term
//! point at once. A connection that opens with the seed protocol's magic is
//! a new source asking for the digests of our copy ([`crate::seed`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pipeline::batch::Batch;
use pipeline::codec::{FrameKind, FrameMeta};
use pipeline::failback::Totals;
use pipeline::key::Key;
use pipeline::seed::{self, SEED};
use pipeline::session::{self, Hello, Refusal, SessionError, TargetState};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::journal::{BatchMeta, Journal, JournalError, JournalOptions};
use crate::restore::SALT_LEN;
use crate::roller::{LongTermOptions, Roller, SharedJournal};
use crate::seed::SeedServeError;

/// How long a connecting source may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything `cdp target` is told.
#[derive(Debug)]
pub struct TargetConfig {
    pub listen: SocketAddr,
    pub dir: PathBuf,
    pub key: Key,
    pub journal: JournalOptions,
    pub long_term: LongTermOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Why one source connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("handshake took longer than {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("replaced by a newer session of the source")]
    Replaced,
    #[error("frame for disk {got:02x?}, but this session is for disk {expected:02x?}")]
    OtherDisk { expected: [u8; 16], got: [u8; 16] },
    #[error("sequence gap: expected a batch starting at {expected}, got {first}..={last}")]
    Gap {
        expected: u64,
        first: u64,
        last: u64,
    },
    #[error("a batch {first}..={last} overlaps what the journal holds (through {held})")]
    Overlap { first: u64, last: u64, held: u64 },
    #[error("batch {first}..={last}: {source}")]
    Payload {
        first: u64,
        last: u64,
        #[source]
        source: pipeline::batch::BatchError,
    },
}

/// The session allowed to append; a newer one cancels it.
#[derive(Default)]
struct CurrentSession(Mutex<Option<CancellationToken>>);

impl CurrentSession {
    /// Cancels the current session, if any, and returns the token of the new one.
    fn take_over(&self) -> CancellationToken {
        let mine = CancellationToken::new();
        let previous = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(mine.clone());
        if let Some(previous) = previous {
            previous.cancel();
        }
        mine
    }
}

/// Serves sources until `shutdown` is cancelled. `ready` gets the bound address.
pub async fn run(
    config: TargetConfig,
    shutdown: CancellationToken,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), TargetError> {
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| TargetError::Listen {
                addr: config.listen,
                source,
            })?;
    let addr = listener
        .local_addr()
        .map_err(|source| TargetError::Listen {
            addr: config.listen,
            source,
        })?;
    // The journal, opened now if the directory holds one, or when the
    // first source connects.
    let journal: SharedJournal = Arc::new(Mutex::new(open_existing(&config)?));
    let config = Arc::new(config);
    let current = Arc::new(CurrentSession::default());
    ready(addr);
    let roller = Arc::new(Roller::start(
        config.dir.clone(),
        config.key.clone(),
        config.long_term,
        journal.clone(),
    ));
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (config, journal, current, roller, shutdown) = (
            config.clone(),
            journal.clone(),
            current.clone(),
            roller.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let magic = tokio::time::timeout(HANDSHAKE_TIMEOUT, peek_magic(&stream)).await;
            if matches!(magic, Ok(Ok(magic)) if magic == SEED.magic) {
                match serve_seed(stream, &config, &journal).await {
                    Ok(totals) => tracing::info!(
                        %peer,
                        chunks = totals.chunks,
                        "sent a new source the digests of our copy"
                    ),
                    Err(e) => tracing::warn!(%peer, "seed session ended: {e}"),
                }
                return;
            }
            let source = Source {
                config: &config,
                journal: &journal,
                current: &current,
                roller: &roller,
            };
            match serve_source(stream, source, &shutdown).await {
                Ok(()) => tracing::info!(%peer, "source disconnected"),
                Err(e) => tracing::warn!(%peer, "source connection ended: {e}"),
            }
        });
    }
    Ok(())
}

/// Opens the journal in `config.dir` if there is one.
fn open_existing(config: &TargetConfig) -> Result<Option<Journal>, TargetError> {
    let Some((disk_id, disk_size)) = Journal::identity_of(&config.dir)? else {
        return Ok(None);
    };
    Ok(Some(open_journal(config, disk_id, disk_size)?))
}

/// Opens (recovering) the journal of the disk `disk_id` and logs where it
/// stands.
fn open_journal(
    config: &TargetConfig,
    disk_id: [u8; 16],
    disk_size: u64,
) -> Result<Journal, JournalError> {
    let (journal, report) = Journal::open(&config.dir, disk_id, disk_size, config.journal)?;
    tracing::info!(points = journal.points().len(), last_seq = ?journal.last_seq(), ?report, "journal open");
    Ok(journal)
}

/// Reopens the journal if an append failed (a full file system, say): the
/// reopen cuts the torn entry off, so a source that comes back once there is
/// room carries on without a restart of the target. If the reopen fails, the
/// connection ends (the source retries later) and the next one tries again.
fn reopen_if_failed(config: &TargetConfig, journal: &SharedJournal) -> Result<(), JournalError> {
    let mut journal = journal.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(failed) = journal.take_if(|j| j.append_failed()) else {
        return Ok(());
    };
    let (disk_id, disk_size) = (failed.disk_id(), failed.disk_size());
    // Dropped first: it holds the directory lock the reopen takes.
    drop(failed);
    tracing::info!("reopening the journal after a failed append");
    *journal = Some(open_journal(config, disk_id, disk_size)?);
    Ok(())
}

/// The first 8 bytes the peer sent (its protocol's magic), left unread for
/// the handshake; fewer if it closed first.
async fn peek_magic(stream: &TcpStream) -> std::io::Result<[u8; 8]> {
    let mut magic = [0u8; 8];
    loop {
        let n = stream.peek(&mut magic).await?;
        if n == 0 || n == magic.len() {
            return Ok(magic);
        }
        // A hello arrives in one piece in practice; if not, wait for the rest.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A new source asks for the digests of our copy of its disk (its seeded
/// full sync): admitted if the journal here is that disk's; never takes
/// over the replication session.
async fn serve_seed(
    mut stream: TcpStream,
    config: &TargetConfig,
    journal: &SharedJournal,
) -> Result<Totals, SeedServeError> {
    stream.set_nodelay(true).map_err(SessionError::from)?;
    let handshake = seed::accept(&mut stream, &config.key, |hello| {
        let journal = journal.lock().unwrap_or_else(PoisonError::into_inner);
        match journal.as_ref() {
            Some(journal) => same_disk(config, journal, hello),
            None => Err(format!("{} holds no journal yet", config.dir.display())),
        }
    });
    let (session, hello) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| SessionError::Io(std::io::ErrorKind::TimedOut.into()))??;
    crate::seed::serve(&mut stream, session, hello, &config.dir, &config.key).await
}

/// What a source connection shares with the rest of the target.
struct Source<'a> {
    config: &'a TargetConfig,
    journal: &'a SharedJournal,
    current: &'a CurrentSession,
    roller: &'a Roller,
}

async fn serve_source(
    mut stream: TcpStream,
    source: Source<'_>,
    shutdown: &CancellationToken,
) -> Result<(), ConnectionError> {
    let Source {
        config,
        journal,
        current,
        roller,
    } = source;
    stream.set_nodelay(true).map_err(SessionError::from)?;
    reopen_if_failed(config, journal)?;
    let mut replaced = None;
    let handshake = session::accept(&mut stream, &config.key, |hello| {
        let state = admit(config, journal, hello)?;
        replaced = Some(current.take_over());
        Ok(state)
    });
    let (mut session, hello) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| ConnectionError::HandshakeTimeout)??;
    let mine = replaced.expect("admitted sessions took over");
    tracing::info!(disk_size = hello.disk_size, "source connected");
    loop {
        // The journal keeps each frame behind the session's salt: the frame
        // is read straight in after it, so the entry's body needs no copy.
        let mut body = session.salt.to_bytes().to_vec();
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = mine.cancelled() => return Err(ConnectionError::Replaced),
            read = session::read_frame_into(&mut stream, &mut body) => match read {
                Ok(()) => {}
                Err(SessionError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            },
        };
        let frame = &body[SALT_LEN..];
        let (meta, payload) = session.opener.open(frame).map_err(SessionError::from)?;
        if meta.kind != FrameKind::Batch {
            return Err(SessionError::UnexpectedFrame(meta.kind).into());
        }
        if meta.disk_id != hello.disk_id {
            return Err(ConnectionError::OtherDisk {
                expected: hello.disk_id,
                got: meta.disk_id,
            });
        }
        let batch =
            Batch::decode(payload.into(), meta.first_seq, meta.last_seq).map_err(|source| {
                ConnectionError::Payload {
                    first: meta.first_seq,
                    last: meta.last_seq,
                    source,
                }
            })?;
        let (next_seq, tagged) =
            tokio::task::block_in_place(|| append(journal, &meta, batch, &body))?;
        session
            .send_ack(&mut stream, hello.disk_id, next_seq)
            .await?;
        if let Some(id) = tagged {
            tracing::info!(point = id, "tagged point journaled");
            roller.wake();
        }
    }
}

/// Opens (or creates) the journal for the source's disk and says where it stands.
fn admit(
    config: &TargetConfig,
    journal: &SharedJournal,
    hello: &Hello,
) -> Result<TargetState, Refusal> {
    let mut journal = journal.lock().unwrap_or_else(PoisonError::into_inner);
    if journal.is_none() {
        let (opened, _) =
            Journal::open(&config.dir, hello.disk_id, hello.disk_size, config.journal)
                .map_err(|e| Refusal::OtherDisk(e.to_string()))?;
        *journal = Some(opened);
    }
    let journal = journal.as_ref().expect("opened above");
    same_disk(config, journal, hello).map_err(Refusal::OtherDisk)?;
    Ok(TargetState {
        next_seq: journal.last_seq().map_or(0, |last| last + 1),
    })
}

/// Whether `journal` is that of the disk `hello` announces.
fn same_disk(config: &TargetConfig, journal: &Journal, hello: &Hello) -> Result<(), String> {
    if journal.disk_id() != hello.disk_id || journal.disk_size() != hello.disk_size {
        return Err(format!(
            "{} holds the journal of another disk ({} bytes)",
            config.dir.display(),
            journal.disk_size()
        ));
    }
    Ok(())
}

/// Appends one verified batch unless the journal already holds it; returns
/// the next sequence number the target expects and, if the batch was
/// appended as a tagged point, its entry id.
fn append(
    journal: &SharedJournal,
    meta: &FrameMeta,
    batch: Batch,
    body: &[u8],
) -> Result<(u64, Option<u64>), ConnectionError> {
    let mut guard = journal.lock().unwrap_or_else(PoisonError::into_inner);
    let journal = guard.as_mut().expect("an admitted source has a journal");
    let next = journal.last_seq().map_or(0, |last| last + 1);
    let (first, last) = (meta.first_seq, meta.last_seq);
    if last < next {
        return Ok((next, None));
    }
    if first < next {
        return Err(ConnectionError::Overlap {
            first,
            last,
            held: next - 1,
        });
    }
    if first > next && journal.last_seq().is_some() {
        return Err(ConnectionError::Gap {
            expected: next,
            first,
            last,
        });
    }
    let batch_meta = BatchMeta {
        first_seq: first,
        last_seq: last,
        point_time_ns: meta.point_time_ns,
        ends_on_barrier: batch.ends_on_barrier,
        in_sync: batch.in_sync,
        tag: batch.tag,
    };
    let point = journal.append(batch_meta, body)?;
    if let Some(tag) = journal.tag(point.id) {
        tracing::info!(id = point.id, seq = last, tag, "tagged point journaled");
    }
    Ok((last + 1, point.tagged.then_some(point.id)))
}
