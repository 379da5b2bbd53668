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
    fn new(budget_bytes: usize, first_seq: u64, receiver: Unparker, consumer: Consumer) -> Self {
        let total_credits = credits_for(budget_bytes);
        Shared {
            queue: ArrayQueue::new(total_credits),
            credits: Semaphore::new(total_credits),
            total_credits,
            next_seq: AtomicU64::new(first_seq),
            senders: AtomicUsize::new(1),
            receiver,
            consumer,
        }
    }

    fn cost(&self, data_len: usize) -> usize {
        (1 + data_len.div_ceil(CREDIT_BYTES)).min(self.total_credits)
    }

    /// Whether every sender is gone; every push happened-before.
    fn closed(&self) -> bool {
        self.senders.load(Ordering::Acquire) == 0
    }
}

fn credits_for(budget_bytes: usize) -> usize {
    (budget_bytes / CREDIT_BYTES).max(2)
}

/// Creates a ring holding at most about `budget_bytes` of record data, whose
/// first record gets sequence number `first_seq`, drained by a thread of its
/// own through the [`CaptureReceiver`].
pub fn capture_ring(budget_bytes: usize, first_seq: u64) -> (CaptureSender, CaptureReceiver) {
    let total_credits = credits_for(budget_bytes);
    let wake = ThreadWake {
        batch: (total_credits / 4).clamp(1, 64),
        credits: (WAKE_BYTES / CREDIT_BYTES).min(total_credits / 2),
        state: WakeState::new(),
    };
    let parker = Parker::new();
    let shared = Arc::new(Shared::new(
        budget_bytes,
        first_seq,
        parker.unparker().clone(),
        Consumer::Thread(wake),
    ));
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
    let parker = Parker::new();
    let shared = Arc::new(Shared::new(
        budget_bytes,
        first_seq,
        parker.unparker().clone(),
        Consumer::Inline(Combiner::new(consumer)),
    ));
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

    /// The sequence number of the next record to be handed out.
    pub fn next_seq(&self) -> u64 {
        self.cursor.delivered.next_seq
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
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    /// Who drains the ring in [`run`].
    #[derive(Debug, Clone, Copy)]
    enum Drainer {
        Thread,
        Inline,
    }

    /// Runs `producers` tasks on a multi-threaded runtime, each sending
    /// `per_producer` records whose offset encodes (producer, index), while
    /// `drainer` drains the ring. Returns what the consumer saw, and what the
    /// receiver says it was handed.
    fn run(
        drainer: Drainer,
        budget: usize,
        producers: u64,
        per_producer: u64,
        data_len: usize,
    ) -> (Vec<Record>, Delivered) {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (sender, consumer) = match drainer {
            Drainer::Thread => {
                let (sender, mut receiver) = capture_ring(budget, 1000);
                let seen = seen.clone();
                let consumer = std::thread::spawn(move || {
                    while let Some(record) = receiver.recv() {
                        seen.lock().unwrap().push(record);
                    }
                    receiver.delivered()
                });
                (sender, consumer)
            }
            Drainer::Inline => {
                let into = seen.clone();
                let (sender, receiver) = capture_ring_inline(budget, 1000, move |record| {
                    into.lock().unwrap().push(record)
                });
                (sender, std::thread::spawn(move || receiver.wait_closed()))
            }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        runtime.block_on(async move {
            let mut tasks = Vec::new();
            for p in 0..producers {
                let sender = sender.clone();
                tasks.push(tokio::spawn(async move {
                    let mut last_seq = None;
                    for i in 0..per_producer {
                        let data = Bytes::from(vec![p as u8; data_len]);
                        let seq = sender
                            .send(RecordKind::Write, false, p << 32 | i, data_len as u64, data)
                            .await
                            .unwrap();
                        // Causality: a send that returned earlier has a lower seq.
                        assert!(last_seq.is_none_or(|last| last < seq));
                        last_seq = Some(seq);
                        if i % 7 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
        });
        let delivered = consumer.join().unwrap();
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        (seen, delivered)
    }

    /// Checks what [`run`] saw.
    fn check_stream(
        (seen, delivered): (Vec<Record>, Delivered),
        producers: u64,
        per_producer: u64,
        data_len: usize,
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(seen.len() as u64, producers * per_producer);
        for (i, record) in seen.iter().enumerate() {
            prop_assert_eq!(
                record.seq,
                1000 + i as u64,
                "gap or reorder at position {}",
                i
            );
            prop_assert_eq!(record.data.len(), data_len);
        }
        let distinct: HashSet<u64> = seen.iter().map(|r| r.offset).collect();
        prop_assert_eq!(distinct.len(), seen.len(), "a record was delivered twice");
        // Each producer's records come out in the order it sent them.
        for p in 0..producers {
            let mine: Vec<u64> = seen
                .iter()
                .filter(|r| r.offset >> 32 == p)
                .map(|r| r.offset & 0xffff_ffff)
                .collect();
            prop_assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "producer {} out of order",
                p
            );
        }
        let expected = Delivered {
            records: seen.len() as u64,
            data_bytes: seen.len() as u64 * data_len as u64,
            next_seq: 1000 + seen.len() as u64,
        };
        prop_assert_eq!(delivered, expected);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn nothing_lost_doubled_or_reordered(
            budget_pages in 2usize..64,
            producers in 1u64..6,
            per_producer in 1u64..300,
            data_len in 0usize..10_000,
        ) {
            let stream = run(Drainer::Thread, budget_pages * CREDIT_BYTES, producers, per_producer, data_len);
            check_stream(stream, producers, per_producer, data_len)?;
        }

        #[test]
        fn nothing_lost_doubled_or_reordered_when_producers_consume(
            budget_pages in 2usize..64,
            producers in 1u64..6,
            per_producer in 1u64..300,
            data_len in 0usize..10_000,
        ) {
            let stream = run(Drainer::Inline, budget_pages * CREDIT_BYTES, producers, per_producer, data_len);
            check_stream(stream, producers, per_producer, data_len)?;
        }
    }

    #[test]
    fn an_inline_consumer_has_a_lone_record_before_its_send_returns() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let into = seen.clone();
        let (sender, receiver) = capture_ring_inline(1 << 20, 7, move |record: Record| {
            into.lock().unwrap().push(record.seq)
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for expected in 7..10 {
            let seq = runtime
                .block_on(sender.send(RecordKind::Write, false, 0, 1, Bytes::from_static(b"x")))
                .unwrap();
            assert_eq!(seq, expected);
            assert_eq!(
                seen.lock().unwrap().last(),
                Some(&expected),
                "record {seq} not consumed yet"
            );
        }
        drop(sender);
        let delivered = receiver.wait_closed();
        assert_eq!((delivered.records, delivered.next_seq), (3, 10));
    }

    #[test]
    fn full_ring_makes_producers_wait_until_the_consumer_drains() {
        let (sender, mut receiver) = capture_ring(4 * CREDIT_BYTES, 0);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            // Two records of one page each cost 2 credits apiece: the ring is full.
            for _ in 0..2 {
                sender
                    .send(
                        RecordKind::Write,
                        false,
                        0,
                        10,
                        Bytes::from_static(b"0123456789"),
                    )
                    .await
                    .unwrap();
            }
            let blocked = tokio::time::timeout(
                Duration::from_millis(50),
                sender.send(RecordKind::Flush, false, 0, 0, Bytes::new()),
            )
            .await;
            assert!(blocked.is_err(), "a full ring accepted another record");
            assert_eq!(receiver.try_recv().map(|r| r.seq), Some(0));
            let seq = sender
                .send(RecordKind::Flush, false, 0, 0, Bytes::new())
                .await
                .unwrap();
            assert_eq!(seq, 2);
        });
    }

    #[test]
    fn the_consumer_is_woken_for_a_megabyte_a_batch_or_a_barrier() {
        let (sender, mut receiver) = capture_ring(256 << 20, 0);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let shared = &*sender.shared;
        let Consumer::Thread(wake) = &shared.consumer else {
            panic!("capture_ring has a consumer thread")
        };
        let write = |len: usize| {
            let data = Bytes::from(vec![1u8; len]);
            runtime.block_on(sender.send(RecordKind::Write, false, 0, len as u64, data))
        };
        write(64 << 10).unwrap();
        assert!(
            !wake.worth_waking(shared, false),
            "64 KiB waits for the tick"
        );
        assert!(
            wake.worth_waking(shared, true),
            "a barrier is always worth it"
        );
        write(WAKE_BYTES - (64 << 10)).unwrap();
        assert!(
            wake.worth_waking(shared, false),
            "1 MiB of data is worth it"
        );
        while receiver.try_recv().is_some() {}
        assert!(!wake.worth_waking(shared, false), "drained");
        for _ in 0..wake.batch {
            write(512).unwrap();
        }
        assert!(
            wake.worth_waking(shared, false),
            "a batch of small records is worth it"
        );
    }

    /// Voluntary context switches of thread `tid` of this process so far.
    fn context_switches(tid: i32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("voluntary_ctxt_switches:"))
            .expect("a voluntary_ctxt_switches line");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn an_idle_consumer_sleeps_until_a_record_comes() {
        let (sender, mut receiver) = capture_ring(1 << 20, 0);
        let (delivered, seen) = std::sync::mpsc::channel();
        let consumer = std::thread::spawn(move || {
            // SAFETY: gettid has no arguments and cannot fail.
            delivered.send(Err(unsafe { libc::gettid() })).unwrap();
            while let Some(record) = receiver.recv() {
                delivered.send(Ok(record.seq)).unwrap();
            }
        });
        let Ok(Err(tid)) = seen.recv() else {
            panic!("the consumer sends its thread id first")
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // Lone small records, each after the consumer has gone to sleep:
        // every one must still wake it (a lost wake-up would hang here).
        for seq in 0..50 {
            std::thread::sleep(CONSUMER_TICK * 3);
            runtime
                .block_on(sender.send(RecordKind::Write, false, 0, 1, Bytes::from_static(b"x")))
                .unwrap();
            let got = seen.recv_timeout(Duration::from_secs(5));
            assert_eq!(
                got,
                Ok(Ok(seq)),
                "record {seq} was not delivered to a sleeping consumer"
            );
        }
        std::thread::sleep(CONSUMER_TICK * 3);
        let before = context_switches(tid);
        std::thread::sleep(CONSUMER_TICK * 100);
        let woken = context_switches(tid) - before;
        assert!(
            woken <= 2,
            "an idle consumer woke {woken} times in {:?}",
            CONSUMER_TICK * 100
        );
        drop(sender);
        consumer.join().unwrap();
    }

    #[test]
    fn senders_fail_once_the_receiver_is_gone() {
        let (sender, receiver) = capture_ring(1 << 20, 0);
        drop(receiver);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let result = runtime.block_on(sender.send(RecordKind::Flush, false, 0, 0, Bytes::new()));
        assert_eq!(result, Err(CaptureClosed));
    }
}
