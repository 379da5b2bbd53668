//! The source's transport: ships batches to the target and keeps each one
//! until the target acknowledges it as durable. After a lost connection it
//! reconnects with backoff and resends whatever is unacknowledged; the target
//! skips what it already holds. It holds at most `max_unacked` bytes of
//! batches: beyond that it stops taking new ones, the cutter stops draining
//! the capture ring, the ring fills, and NBD clients wait — back-pressure
//! instead of loss.
//!
//! Sequence numbers: the target's journal is one gap-free sequence. This
//! process numbers its records from 0; on the first handshake it learns the
//! target's next sequence number and ships every record as that base plus
//! its own number (`docs/REPLICATION.md`). How far the target has
//! acknowledged is published as [`Acknowledged`] (the control socket waits
//! on it for a tagged point to become durable).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::task::AbortOnDropHandle;

use crate::batch::Batch;
use crate::codec::{FrameKind, FrameMeta, Opener};
use crate::key::Key;
use crate::session::{self, decode_ack, Hello, Session, SessionError};

/// Everything the shipper is told.
#[derive(Debug)]
pub struct ShipperConfig {
    /// `HOST:PORT` of the target.
    pub target: String,
    pub key: Key,
    pub hello: Hello,
    /// Bytes per second on the wire, if throttled.
    pub throttle: Option<u64>,
    /// Bytes of unacknowledged batches held before new ones wait.
    pub max_unacked: usize,
    /// How long to keep trying to deliver what is left after the capture
    /// stream ends (shutdown).
    pub drain_timeout: Duration,
    /// Where the shipper publishes how far the target has acknowledged; it
    /// is dropped (closing the watch) when the shipper ends.
    pub acknowledged: watch::Sender<Acknowledged>,
}

/// How far the target has acknowledged. A record of local sequence number
/// `s` is durable on the target (its batch is journaled) once `next > s`;
/// its sequence number in the journal is then `base + s`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Acknowledged {
    /// The journal's sequence number of local record 0, once the target
    /// told us (at the first connection).
    pub base: Option<u64>,
    /// Local sequence number after the last acknowledged batch.
    pub next: u64,
}

/// Where the full sync stands, shared with the task that runs it.
#[derive(Debug, Default)]
pub struct SyncProgress {
    /// `u64::MAX` until the sync completes; then the local sequence number
    /// after its last record. Batches ending before it are `in_sync`.
    /// Release/Acquire: the sync's records are in the ring before this is set.
    complete_at: AtomicU64,
}

impl SyncProgress {
    pub fn new() -> Arc<Self> {
        Arc::new(SyncProgress {
            complete_at: AtomicU64::new(u64::MAX),
        })
    }

    /// Called once the sync's last record is in the ring, with the local
    /// sequence number the next record will get.
    pub fn complete(&self, next_seq: u64) {
        self.complete_at.store(next_seq, Ordering::Release);
    }

    /// Whether the sync has completed: every batch cut from now on is a restore point.
    pub fn is_complete(&self) -> bool {
        self.complete_at.load(Ordering::Acquire) != u64::MAX
    }

    /// Whether a batch ending at local `last_seq` was cut before the sync completed.
    fn in_sync(&self, last_seq: u64) -> bool {
        let complete_at = self.complete_at.load(Ordering::Acquire);
        complete_at == u64::MAX || last_seq + 1 < complete_at
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("{unacked} batches (through local seq {last_seq}) were not acknowledged before the drain timeout")]
    Undelivered { unacked: usize, last_seq: u64 },
    #[error("the target refused this source: {0}")]
    Refused(String),
    #[error("the target expects seq {target_next}, but had acknowledged through {acknowledged}: its journal lost acknowledged batches")]
    TargetLost { target_next: u64, acknowledged: u64 },
    #[error("the target expects seq {target_next}, beyond anything we shipped ({shipped}): another source wrote to its journal")]
    TargetAhead { target_next: u64, shipped: u64 },
}

/// One batch as shipped: its frame metadata (local sequence numbers; the
/// base is added when it is sealed) and encoded payload.
#[derive(Debug)]
struct Outgoing {
    meta: FrameMeta,
    payload: Vec<u8>,
}

/// What the shipper did.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShipStats {
    pub batches: u64,
    pub bytes: u64,
}

/// Ships batches from `batches` until that channel closes and everything is
/// acknowledged (or `drain_timeout` passes after it closed).
pub async fn run(
    config: ShipperConfig,
    mut batches: mpsc::Receiver<(Batch, u64)>,
    sync: Arc<SyncProgress>,
) -> Result<ShipStats, ShipError> {
    let mut state = State {
        config,
        sync,
        base: None,
        acked_next: 0,
        unacked: VecDeque::new(),
        unacked_bytes: 0,
        stats: ShipStats::default(),
    };
    let mut backoff = Duration::from_millis(100);
    let mut input_open = true;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        if !input_open && state.unacked.is_empty() {
            return Ok(state.stats);
        }
        if drain_deadline.is_some_and(|d| Instant::now() > d) {
            let last_seq = state.unacked.back().map_or(0, |o| o.meta.last_seq);
            return Err(ShipError::Undelivered {
                unacked: state.unacked.len(),
                last_seq,
            });
        }
        let retry = match state.connect().await {
            Ok((stream, session)) => {
                let acked_before = state.acked_next;
                match state
                    .stream(stream, session, &mut batches, &mut input_open)
                    .await
                {
                    Ok(()) => None,
                    Err(StreamEnd::Fatal(e)) => return Err(e),
                    // A session that got something acknowledged reconnects
                    // at once; one that did not (a target that admits us and
                    // then fails every append, say) backs off like a target
                    // that cannot be reached.
                    Err(StreamEnd::Lost(e)) if state.acked_next > acked_before => {
                        backoff = Duration::from_millis(100);
                        tracing::warn!("connection to the target lost: {e}; reconnecting");
                        None
                    }
                    Err(StreamEnd::Lost(e)) => Some(format!("connection to the target lost: {e}")),
                }
            }
            Err(StreamEnd::Fatal(e)) => return Err(e),
            Err(StreamEnd::Lost(e)) => Some(format!("cannot reach the target: {e}")),
        };
        if let Some(why) = retry {
            tracing::warn!(target = %state.config.target, "{why}; retrying in {backoff:?}");
            // Keep taking batches while disconnected, up to the budget.
            let wait = tokio::time::sleep(backoff);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    batch = batches.recv(), if input_open && state.has_room() => match batch {
                        Some((batch, cut_ns)) => state.enqueue(batch, cut_ns),
                        None => input_open = false,
                    },
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        if !input_open && drain_deadline.is_none() {
            drain_deadline = Some(Instant::now() + state.config.drain_timeout);
        }
    }
}

enum StreamEnd {
    /// Reconnect and resend.
    Lost(String),
    /// Give up.
    Fatal(ShipError),
}

struct State {
    config: ShipperConfig,
    sync: Arc<SyncProgress>,
    /// Global sequence number of local record 0, once the target told us.
    base: Option<u64>,
    /// Local sequence number after the last acknowledged batch.
    acked_next: u64,
    unacked: VecDeque<Outgoing>,
    unacked_bytes: usize,
    stats: ShipStats,
}

impl State {
    fn has_room(&self) -> bool {
        self.unacked_bytes < self.config.max_unacked
    }

    /// `cut_ns`: when the cutter cut the batch (the restore point's time).
    fn enqueue(&mut self, mut batch: Batch, cut_ns: u64) {
        batch.in_sync = self.sync.in_sync(batch.last_seq);
        let point_time_ns = cut_ns;
        let payload = batch.encode();
        self.unacked_bytes += payload.len();
        let meta = FrameMeta {
            kind: FrameKind::Batch,
            disk_id: self.config.hello.disk_id,
            first_seq: batch.first_seq,
            last_seq: batch.last_seq,
            point_time_ns,
        };
        self.unacked.push_back(Outgoing { meta, payload });
    }

    async fn connect(&mut self) -> Result<(TcpStream, Session), StreamEnd> {
        let lost = |e: &dyn std::fmt::Display| StreamEnd::Lost(e.to_string());
        let mut stream = tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect(&self.config.target),
        )
        .await
        .map_err(|_| lost(&"connect timed out"))?
        .map_err(|e| lost(&e))?;
        stream.set_nodelay(true).map_err(|e| lost(&e))?;
        let (session, target) =
            match session::connect(&mut stream, &self.config.key, self.config.hello).await {
                Ok(done) => done,
                Err(
                    e @ (SessionError::PeerWrongKey { .. }
                    | SessionError::OurProofRejected { .. }
                    | SessionError::Version { .. }),
                ) => {
                    return Err(StreamEnd::Fatal(ShipError::Refused(e.to_string())));
                }
                Err(SessionError::Refused { message, .. }) => {
                    return Err(StreamEnd::Fatal(ShipError::Refused(message)))
                }
                Err(e) => return Err(lost(&e)),
            };
        let base = *self.base.get_or_insert(target.next_seq);
        let acknowledged = base + self.acked_next;
        let shipped = base
            + self
                .unacked
                .back()
                .map_or(self.acked_next, |o| o.meta.last_seq + 1);
        if target.next_seq < acknowledged {
            return Err(StreamEnd::Fatal(ShipError::TargetLost {
                target_next: target.next_seq,
                acknowledged,
            }));
        }
        if target.next_seq > shipped {
            return Err(StreamEnd::Fatal(ShipError::TargetAhead {
                target_next: target.next_seq,
                shipped,
            }));
        }
        tracing::info!(target = %self.config.target, next_seq = target.next_seq, base, "connected to the target");
        self.drop_acked(target.next_seq);
        self.publish();
        Ok((stream, session))
    }

    /// Tells those watching how far the target has acknowledged.
    fn publish(&self) {
        let now = Acknowledged {
            base: self.base,
            next: self.acked_next,
        };
        self.config.acknowledged.send_if_modified(|published| {
            let changed = *published != now;
            *published = now;
            changed
        });
    }

    /// Forgets batches the target holds (global last seq below `next_seq`).
    fn drop_acked(&mut self, next_seq: u64) {
        let base = self.base.unwrap_or(0);
        while let Some(outgoing) = self.unacked.front() {
            if base + outgoing.meta.last_seq >= next_seq {
                break;
            }
            self.acked_next = outgoing.meta.last_seq + 1;
            self.unacked_bytes -= outgoing.payload.len();
            self.stats.batches += 1;
            self.stats.bytes += outgoing.payload.len() as u64;
            self.unacked.pop_front();
        }
    }

    /// Resends what is unacknowledged, then ships new batches as they come,
    /// reading acknowledgments meanwhile.
    async fn stream(
        &mut self,
        stream: TcpStream,
        session: Session,
        batches: &mut mpsc::Receiver<(Batch, u64)>,
        input_open: &mut bool,
    ) -> Result<(), StreamEnd> {
        let lost = |e: &dyn std::fmt::Display| StreamEnd::Lost(e.to_string());
        let (reader, mut writer) = stream.into_split();
        let Session {
            mut sealer, opener, ..
        } = session;
        // Acknowledgments are read by a task of their own: a frame read cut
        // short by the `select!` below would lose the bytes it had taken.
        let (acks_tx, mut acks) = mpsc::channel(16);
        let _reading = AbortOnDropHandle::new(tokio::spawn(read_acks(reader, opener, acks_tx)));
        let mut throttle = self.config.throttle.map(Throttle::new);
        let mut sent = 0; // how many of `unacked` went out on this connection
        let base = self.base.expect("set by connect");
        loop {
            if !*input_open && self.unacked.is_empty() {
                let _ = writer.shutdown().await;
                return Ok(());
            }
            if sent < self.unacked.len() {
                let outgoing = &self.unacked[sent];
                let mut meta = outgoing.meta;
                meta.first_seq += base;
                meta.last_seq += base;
                let frame = sealer.seal(&meta, &outgoing.payload);
                if let Some(throttle) = &mut throttle {
                    throttle.take(frame.len()).await;
                }
                writer.write_all(&frame).await.map_err(|e| lost(&e))?;
                sent += 1;
                continue;
            }
            tokio::select! {
                ack = acks.recv() => {
                    let next_seq = ack
                        .unwrap_or_else(|| Err("the acknowledgment reader stopped".into()))
                        .map_err(StreamEnd::Lost)?;
                    let before = self.unacked.len();
                    self.drop_acked(next_seq);
                    self.publish();
                    sent -= before - self.unacked.len();
                }
                batch = batches.recv(), if *input_open && self.has_room() => match batch {
                    Some((batch, cut_ns)) => self.enqueue(batch, cut_ns),
                    None => *input_open = false,
                },
            }
        }
    }
}

/// Reads the target's acknowledgments off `reader` until the connection
/// fails, passing on the next sequence number each names; the error that
/// ends it is passed on too.
async fn read_acks(
    mut reader: OwnedReadHalf,
    mut opener: Opener,
    acks: mpsc::Sender<Result<u64, String>>,
) {
    loop {
        let ack = async {
            let frame = session::read_frame(&mut reader)
                .await
                .map_err(|e| e.to_string())?;
            let (meta, body) = opener.open(&frame).map_err(|e| e.to_string())?;
            if meta.kind != FrameKind::Ack {
                return Err(format!("unexpected {:?} frame from the target", meta.kind));
            }
            decode_ack(&body).map_err(|e| e.to_string())
        }
        .await;
        let failed = ack.is_err();
        if acks.send(ack).await.is_err() || failed {
            return;
        }
    }
}

/// Now, in ns since the epoch, rounded down to the millisecond.
pub fn now_ms_as_ns() -> u64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    ms * 1_000_000
}

/// A token bucket over bytes sent, allowing one second of burst.
#[derive(Debug)]
struct Throttle {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Throttle {
    fn new(rate: u64) -> Self {
        Throttle {
            rate: rate as f64,
            tokens: rate as f64,
            last: Instant::now(),
        }
    }

    /// Waits until `bytes` may be sent.
    async fn take(&mut self, bytes: usize) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-self.tokens / self.rate)).await;
        }
    }
}
