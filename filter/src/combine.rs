//! Producers that consume their own queue, one at a time: the try-lock and
//! look-again handshake of the capture ring's inline consumer, kept apart so
//! that loom can check it (`RUSTFLAGS="--cfg cdp_loom" cargo test -p filter
//! --lib combine::`).
//!
//! A producer pushes onto the queue and calls [`Combiner::after_push`]. If no
//! other producer holds the consumer's turn, it takes the turn and drains the
//! queue, records of other producers included; if one does, it leaves at
//! once and the holder takes its record. Nothing is stranded, because a
//! holder looks at the queue again after it gives the turn up: a `SeqCst`
//! fence sits between a producer's push and its `try_lock`, and between a
//! holder's unlock and its second look, so the fences are totally ordered. If
//! the producer's comes first, the holder's look sees its push and the holder
//! takes another turn; if the holder's comes first, the producer's
//! `try_lock` (a compare-exchange, which reads the newest value of the lock)
//! sees the lock free, or held by a later holder to whom the same argument
//! applies.
//!
//! No one waits for the turn, so a producer is never held up by another's
//! consumption, and there is no consumer thread to wake: no context switch
//! per record.

use crate::sync::atomic::{fence, Ordering::SeqCst};
use crate::sync::{Mutex, MutexGuard, TryLockError};

/// The consumer's state, handed to one producer at a time.
#[derive(Debug)]
pub struct Combiner<T>(Mutex<T>);

impl<T> Combiner<T> {
    pub fn new(consumer: T) -> Self {
        Combiner(Mutex::new(consumer))
    }

    /// Producer side, right after pushing onto the queue: drains it with
    /// `drain` unless another producer is doing so, and takes turns until
    /// the queue looks empty after one.
    pub fn after_push(&self, queue_is_empty: impl Fn() -> bool, mut drain: impl FnMut(&mut T)) {
        fence(SeqCst);
        loop {
            let mut turn = match self.0.try_lock() {
                Ok(turn) => turn,
                // A consumer that panicked was mid-record; the stream is
                // already broken, and the next record keeps it going.
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            drain(&mut turn);
            drop(turn);
            fence(SeqCst);
            if queue_is_empty() {
                return;
            }
        }
    }

    /// Waits for the turn: for a caller that knows no producer remains.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(all(test, cdp_loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::{AtomicBool, Ordering};
    use loom::sync::Arc;

    /// Two producers each push one record into a slot of their own (a
    /// queue that promises release/acquire and nothing more) and combine,
    /// while nothing else consumes: once both are done, both records were
    /// consumed exactly once and no slot is full. Every interleaving with up
    /// to 3 preemptions.
    #[test]
    fn nothing_is_stranded() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(|| {
            let slots = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
            let combiner = Arc::new(Combiner::new(Vec::new()));
            let producers: Vec<_> = (0..2)
                .map(|i| {
                    let (slots, combiner) = (slots.clone(), combiner.clone());
                    loom::thread::spawn(move || {
                        slots[i].store(true, Ordering::Release);
                        combiner.after_push(
                            || slots.iter().all(|s| !s.load(Ordering::Acquire)),
                            |consumed| {
                                for (j, slot) in slots.iter().enumerate() {
                                    // Not `swap`: loom's RMWs other than
                                    // compare-exchange can read stale values
                                    // (tokio-rs/loom#254).
                                    let taken = slot.compare_exchange(
                                        true,
                                        false,
                                        Ordering::Acquire,
                                        Ordering::Relaxed,
                                    );
                                    if taken.is_ok() {
                                        consumed.push(j);
                                    }
                                }
                            },
                        );
                    })
                })
                .collect();
            for producer in producers {
                producer.join().unwrap();
            }
            let stranded: Vec<bool> = slots.iter().map(|s| s.load(Ordering::Relaxed)).collect();
            assert_eq!(stranded, [false, false], "a record was stranded");
            let mut consumed = combiner.lock().clone();
            consumed.sort_unstable();
            assert_eq!(consumed, [0, 1]);
        });
    }
}
