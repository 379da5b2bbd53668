//! The capture ring: a bounded, lock-free multi-producer queue of [`Record`]s
//! with gap-free sequence numbers and back-pressure.
//!
//! Built from well-kept parts rather than a ring of our own:
//! - `crossbeam_queue::ArrayQueue` holds the records (lock-free, bounded);
//! - a `tokio::sync::Semaphore` holds *credits*. A record costs one credit
//!   plus one per started 4 KiB of data, and the queue has one slot per
//!   credit, so a producer holding credits can always push. Producers wait for
//!   credits when the ring is full (back-pressure reaches the NBD client);
//!   the consumer returns credits only when it hands a record out in order;
//! - one `AtomicU64` hands out sequence numbers;
//! - the consumer is either a thread of its own ([`capture_ring`], for
//!   consumers that make system calls, like the capture log) or the
//!   producers themselves, one at a time ([`capture_ring_inline`], for
//!   consumers cheap enough to run on a connection's thread).
//!
//! A consumer thread sleeps on a `crossbeam_utils::sync::Parker`: while
//! records flow it ticks (wakes at least every [`CONSUMER_TICK`]), and after
//! a tick with nothing new it sleeps until the next push, so an idle filter
//! costs no CPU. Producers learn that it sleeps through the loom-checked
//! handshake of [`crate::wake`]. Waking it costs a context switch, which on a
//! machine whose cores are all busy preempts a connection's thread: about
//! 20 µs, once per MiB of writes. An inline consumer costs none: a producer
//! that has pushed takes the consumer's turn if it is free and drains the
//! ring, other producers' records included, through the loom-checked
//! handshake of [`crate::combine`], which strands nothing.
//!
//! Ordering. A producer takes its sequence number and pushes with no await in
//! between, so records reach the queue almost in order; the consumer puts the
//! few that overtake each other back in order with a small reorder map. The
//! map is bounded by the credits, because credits come back only on delivery.
//!
//! Causality. If record A's `send` returned before record B's `send` started
//! (for instance A's write was acknowledged before B's was submitted), then
//! A's `fetch_add` happens-before B's, and read-modify-writes of one atomic
//! follow happens-before in its modification order, so A.seq < B.seq even
//! with `Relaxed`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::sync::{Parker, Unparker};
use tokio::sync::Semaphore;

use super::record::{Record, RecordKind};
use crate::combine::Combiner;
use crate::wake::{AfterPush, WakeState};

/// Longest a record waits in the ring for a consumer that nobody woke.
const CONSUMER_TICK: Duration = Duration::from_millis(2);

/// Bytes of record data one credit stands for.
const CREDIT_BYTES: usize = 4096;

/// Record data waiting in the ring that is worth waking a consumer thread for.
/// Large writes should not wait for the tick: a payload buffer the consumer
/// has dropped is handed back by the allocator to the next request while its
/// cache lines are still warm, and with 2 ms of 1 MiB writes queued the
/// buffers cycle through more memory than the caches hold (measured: 7–11%
/// of the whole machine's CPU per MiB written, `docs/BENCHMARKS.md`).
const WAKE_BYTES: usize = 1 << 20;

/// The receiver is gone: nothing can be captured any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the capture stream is closed")]
pub struct CaptureClosed;

struct Shared {
    queue: ArrayQueue<Record>,
    credits: Semaphore,
    total_credits: usize,
    /// The next sequence number to hand out. Relaxed: see the module docs.
    next_seq: AtomicU64,
    /// Live [`CaptureSender`]s. AcqRel on decrement so that the last sender's
    /// pushes happen-before the receiver seeing zero (it loads with Acquire).
    senders: AtomicUsize,
    /// Unparks the receiver: a consumer thread when records are worth it,
    /// and either kind of receiver when the last sender goes.
    receiver: Unparker,
    consumer: Consumer,
}

/// Who drains the ring.
enum Consumer {
    /// A thread of its own, through a [`CaptureReceiver`].
    Thread(ThreadWake),
    /// The producers, one at a time.
    Inline(Combiner<InlineConsumer>),
}

/// When producers wake a consumer thread.
struct ThreadWake {
    /// Records waiting that are worth waking it for.
    batch: usize,
    /// Credits in use (data not yet handed out) worth waking it for.
    credits: usize,
    /// Whether it sleeps without a tick, so that the next push must wake it.
    state: WakeState,
}

impl ThreadWake {
    /// Whether the records now in the ring are worth a context switch of
    /// the consumer: a batch of records, a barrier, or [`WAKE_BYTES`] of
    /// data (or half the ring, if smaller). Anything less it finds by itself
    /// within a [`CONSUMER_TICK`].
    fn worth_waking(&self, shared: &Shared, barrier: bool) -> bool {
        let credits_in_use = shared.total_credits - shared.credits.available_permits();
        barrier || shared.queue.len() >= self.batch || credits_in_use >= self.credits
    }
}

/// The consumer of an inline ring, with where it stands.
struct InlineConsumer {
    cursor: Cursor,
    consume: Box<dyn FnMut(Record) + Send>,
}

impl InlineConsumer {
    fn drain(&mut self, shared: &Shared) {
        while let Some(record) = self.cursor.try_next(shared) {
            (self.consume)(record);
        }
    }
}

/// What a consumer has been handed so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivered {
    pub records: u64,
    pub data_bytes: u64,
    /// Sequence number of the next record to hand out.
    pub next_seq: u64,
}

/// Where a consumer stands: the records that overtook the next one in
/// sequence wait in a small reorder map.
struct Cursor {
    delivered: Delivered,
    reorder: BTreeMap<u64, Record>,
}

impl Cursor {
    fn new(first_seq: u64) -> Self {
        Cursor {
            delivered: Delivered {
                next_seq: first_seq,
                ..Default::default()
            },
            reorder: BTreeMap::new(),
        }
    }

    /// The next record in sequence, if one is ready now; gives its credits
    /// back.
    fn try_next(&mut self, shared: &Shared) -> Option<Record> {
        let next = self.delivered.next_seq;
        let record = match self.reorder.remove(&next) {
            Some(record) => record,
            None => loop {
                let record = shared.queue.pop()?;
                if record.seq == next {
                    break record;
                }
                self.reorder.insert(record.seq, record);
            },
        };
        self.delivered.next_seq += 1;
        self.delivered.records += 1;
        self.delivered.data_bytes += record.data.len() as u64;
        shared.credits.add_permits(shared.cost(record.data.len()));
        Some(record)
    }
}

impl Shared {
    fn cost(&self, data_len: usize) -> usize {
        (1 + data_len.div_ceil(CREDIT_BYTES)).min(self.total_credits)
    }

    /// Whether every sender is gone; every push happened-before.
    fn closed(&self) -> bool {
        self.senders.load(Ordering::Acquire) == 0
    }
}

/// The shared state of a ring holding about `budget_bytes` of record data,
/// numbered from `first_seq`, whose consumer `consumer` makes from the
/// ring's credit count; and the parker its receiver sleeps on.
fn shared_state(
    budget_bytes: usize,
    first_seq: u64,
    consumer: impl FnOnce(usize) -> Consumer,
) -> (Arc<Shared>, Parker) {
    let total_credits = (budget_bytes / CREDIT_BYTES).max(2);
    let parker = Parker::new();
    let shared = Shared {
        queue: ArrayQueue::new(total_credits),
        credits: Semaphore::new(total_credits),
        total_credits,
        next_seq: AtomicU64::new(first_seq),
        senders: AtomicUsize::new(1),
        receiver: parker.unparker().clone(),
        consumer: consumer(total_credits),
    };
    (Arc::new(shared), parker)
}

/// Creates a ring holding at most about `budget_bytes` of record data, whose
/// first record gets sequence number `first_seq`, drained by a thread of its
/// own through the [`CaptureReceiver`].
pub fn capture_ring(budget_bytes: usize, first_seq: u64) -> (CaptureSender, CaptureReceiver) {
    let (shared, parker) = shared_state(budget_bytes, first_seq, |total_credits| {
        Consumer::Thread(ThreadWake {
            batch: (total_credits / 4).clamp(1, 64),
            credits: (WAKE_BYTES / CREDIT_BYTES).min(total_credits / 2),
            state: WakeState::new(),
        })
    });
    let receiver = CaptureReceiver {
        shared: shared.clone(),
        parker,
        cursor: Cursor::new(first_seq),
    };
    (CaptureSender { shared }, receiver)
}

/// Creates a ring like [`capture_ring`] whose records the producers hand to
/// `consume` themselves, in sequence order, one producer at a time, before
/// their `send` returns (or another producer's does). `consume` runs on the
/// connections' threads: it must be quick and must not block.
pub fn capture_ring_inline(
    budget_bytes: usize,
    first_seq: u64,
    consume: impl FnMut(Record) + Send + 'static,
) -> (CaptureSender, InlineReceiver) {
    let consumer = InlineConsumer {
        cursor: Cursor::new(first_seq),
        consume: Box::new(consume),
    };
    let (shared, parker) = shared_state(budget_bytes, first_seq, |_| {
        Consumer::Inline(Combiner::new(consumer))
    });
    let receiver = InlineReceiver {
        shared: shared.clone(),
        parker,
    };
    (CaptureSender { shared }, receiver)
}

/// The producing side; clone it for every task that captures.
pub struct CaptureSender {
    shared: Arc<Shared>,
}

impl CaptureSender {
    /// Appends a record and returns its sequence number. Waits while the ring
    /// is full; fails only when the receiver is gone.
    pub async fn send(
        &self,
        kind: RecordKind,
        fua: bool,
        offset: u64,
        len: u64,
        data: Bytes,
    ) -> Result<u64, CaptureClosed> {
        let cost = self.shared.cost(data.len());
        let credits = self
            .shared
            .credits
            .acquire_many(cost as u32)
            .await
            .map_err(|_| CaptureClosed)?;
        credits.forget();
        let seq = self.shared.next_seq.fetch_add(1, Ordering::Relaxed);
        let barrier = kind.is_barrier() || fua;
        let record = Record {
            seq,
            kind,
            fua,
            offset,
            len,
            data,
        };
        if self.shared.queue.push(record).is_err() {
            unreachable!("a producer holding credits always finds a free slot");
        }
        let shared = &*self.shared;
        match &shared.consumer {
            Consumer::Thread(wake) => {
                // Waking a ticking consumer for every small record would
                // cost a context switch each; a sleeping one must be woken.
                let asleep = wake.state.after_push() == AfterPush::Wake;
                if asleep || wake.worth_waking(shared, barrier) {
                    shared.receiver.unpark();
                }
            }
            Consumer::Inline(combiner) => combiner.after_push(
                || shared.queue.is_empty(),
                |consumer| consumer.drain(shared),
            ),
        }
        Ok(seq)
    }

    /// The sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.shared.next_seq.load(Ordering::Relaxed)
    }
}

impl Clone for CaptureSender {
    fn clone(&self) -> Self {
        // Relaxed: a new sender is made from a live one, so the count is
        // already non-zero and cannot reach zero meanwhile.
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        CaptureSender {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for CaptureSender {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.receiver.unpark();
        }
    }
}

impl std::fmt::Debug for CaptureSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureSender")
            .field("next_seq", &self.next_seq())
            .finish()
    }
}

/// The consuming side of a [`capture_ring`]: hands records out in sequence
/// order, with no gaps.
pub struct CaptureReceiver {
    shared: Arc<Shared>,
    parker: Parker,
    cursor: Cursor,
}

impl CaptureReceiver {
    /// The next record in sequence, if one is ready now.
    pub fn try_recv(&mut self) -> Option<Record> {
        self.cursor.try_next(&self.shared)
    }

    /// The next record in sequence, waiting for it; `None` once every sender
    /// is gone and every record has been handed out.
    pub fn recv(&mut self) -> Option<Record> {
        let mut ticked = false;
        loop {
            if let Some(record) = self.try_recv() {
                return Some(record);
            }
            if self.shared.closed() {
                // Every push happened-before the last sender's drop; one more
                // look finds whatever was pushed last.
                return self.try_recv();
            }
            if ticked {
                self.sleep_until_pushed();
            } else {
                // Senders wake us for batches, barriers, a filling ring and
                // their last drop; the tick bounds how long a lone record
                // waits.
                self.parker.park_timeout(CONSUMER_TICK);
                ticked = true;
            }
        }
    }

    /// Parks with no tick until a producer pushes (or the last sender is
    /// dropped, which always unparks; an unpark that comes first makes the
    /// park return at once).
    fn sleep_until_pushed(&mut self) {
        let Consumer::Thread(wake) = &self.shared.consumer else {
            unreachable!("a CaptureReceiver is made only for a consumer thread")
        };
        if wake.state.may_sleep(|| self.shared.queue.is_empty()) {
            self.parker.park();
        }
        wake.state.awake();
    }

    /// What was handed out so far.
    pub fn delivered(&self) -> Delivered {
        self.cursor.delivered
    }
}

impl Drop for CaptureReceiver {
    fn drop(&mut self) {
        // Producers waiting for credits, and all later ones, fail with CaptureClosed.
        self.shared.credits.close();
    }
}

impl std::fmt::Debug for CaptureReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureReceiver")
            .field("delivered", &self.cursor.delivered)
            .field("reordering", &self.cursor.reorder.len())
            .finish()
    }
}

/// The receiving side of a [`capture_ring_inline`]: the producers consume,
/// and this waits for the stream to end.
pub struct InlineReceiver {
    shared: Arc<Shared>,
    parker: Parker,
}

impl InlineReceiver {
    /// Blocks until every sender is gone, and returns what the consumer
    /// was handed. By then every record has been consumed: each producer's
    /// `send` returned only after its record was consumed or another
    /// producer had the turn and was bound to see it.
    pub fn wait_closed(self) -> Delivered {
        while !self.shared.closed() {
            // The last sender's drop unparks; an unpark that comes first
            // makes the park return at once.
            self.parker.park();
        }
        let Consumer::Inline(combiner) = &self.shared.consumer else {
            unreachable!("an InlineReceiver is made only for an inline consumer")
        };
        let consumer = combiner.lock();
        debug_assert!(
            self.shared.queue.is_empty() && consumer.cursor.reorder.is_empty(),
            "records left behind in an inline ring"
        );
        consumer.cursor.delivered
    }
}

impl std::fmt::Debug for InlineReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlineReceiver").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
