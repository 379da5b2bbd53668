//! The sleep/wake handshake between the producers of a queue and the one
//! thread that consumes it, kept apart so that loom can check it
//! (`RUSTFLAGS="--cfg cdp_loom" cargo test -p filter --lib wake::`). Used by
//! the io_uring engine (callers and its ring thread, which blocks on an
//! eventfd) and by the capture ring (producers and its consumer, which
//! blocks on a parker once it is idle).
//!
//! A caller pushes onto the queue and then calls [`WakeState::after_push`];
//! the consuming thread calls [`WakeState::may_sleep`] before it blocks, and
//! [`WakeState::awake`] after. The text below says "ring thread" for the
//! consuming thread and "caller" for a producer.
//!
//! Dekker handshake: the ring thread stores `SLEEPING`, then looks at the
//! queue; a caller pushes, then compare-exchanges `SLEEPING` to `AWAKE`. A
//! `SeqCst` fence sits between the two steps on both sides, so the fences are
//! totally ordered: if the caller's comes second, its exchange sees
//! `SLEEPING` (or a later value) and it wakes the thread (or another caller
//! did); if the thread's comes second, its look at the queue sees the push
//! and it does not block. The fences carry the proof because the queue
//! promises no particular ordering; the state operations are `SeqCst` too,
//! for simplicity, not necessity. `DEAD` uses the same handshake: the exiting
//! thread stores it, fences, and drains the queue; a caller that sees it
//! drains the queue itself, so no request is stranded.

use crate::sync::atomic::{fence, AtomicU8, Ordering::SeqCst};

const AWAKE: u8 = 0;
const SLEEPING: u8 = 1;
const DEAD: u8 = 2;

/// Whether the ring thread runs, is about to sleep, or is gone.
#[derive(Debug)]
pub struct WakeState(AtomicU8);

/// What a caller must do after queueing a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterPush {
    /// The ring thread will see the request.
    Nothing,
    /// The ring thread sleeps or is about to: write its eventfd.
    Wake,
    /// The ring thread is gone: drain the queue (failing the requests).
    Drain,
}

impl Default for WakeState {
    fn default() -> Self {
        WakeState(AtomicU8::new(AWAKE))
    }
}

impl WakeState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Caller side, right after pushing onto the queue.
    pub fn after_push(&self) -> AfterPush {
        fence(SeqCst);
        match self.0.compare_exchange(SLEEPING, AWAKE, SeqCst, SeqCst) {
            Ok(_) => AfterPush::Wake,
            Err(DEAD) => AfterPush::Drain,
            Err(_) => AfterPush::Nothing,
        }
    }

    /// Ring side, before blocking: announces the sleep, then asks
    /// `queue_is_empty`; the thread may block only if this returns true.
    pub fn may_sleep(&self, queue_is_empty: impl FnOnce() -> bool) -> bool {
        self.0.store(SLEEPING, SeqCst);
        fence(SeqCst);
        queue_is_empty()
    }

    /// Ring side, after blocking (or deciding not to).
    pub fn awake(&self) {
        self.0.store(AWAKE, SeqCst);
    }

    /// Ring side, on exit; the caller then drains the queue.
    pub fn die(&self) {
        self.0.store(DEAD, SeqCst);
        fence(SeqCst);
    }
}

#[cfg(all(test, cdp_loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::{AtomicUsize, Ordering};
    use loom::sync::{Arc, Condvar, Mutex};
    use std::collections::VecDeque;

    /// An eventfd: a counter the ring thread blocks on until it is non-zero.
    #[derive(Default)]
    struct EventFd {
        count: Mutex<u64>,
        signal: Condvar,
    }

    impl EventFd {
        fn write(&self) {
            *self.count.lock().unwrap() += 1;
            self.signal.notify_one();
        }

        fn wait(&self) {
            let mut count = self.count.lock().unwrap();
            while *count == 0 {
                count = self.signal.wait(count).unwrap();
            }
            *count = 0;
        }
    }

    struct Engine {
        queue: Mutex<VecDeque<u32>>,
        state: WakeState,
        eventfd: EventFd,
        drained: AtomicUsize,
    }

    impl Engine {
        fn new() -> Arc<Self> {
            Arc::new(Engine {
                queue: Mutex::new(VecDeque::new()),
                state: WakeState::new(),
                eventfd: EventFd::default(),
                drained: AtomicUsize::new(0),
            })
        }

        fn submit(&self, request: u32) {
            self.queue.lock().unwrap().push_back(request);
            match self.state.after_push() {
                AfterPush::Wake => self.eventfd.write(),
                AfterPush::Drain => self.drain(),
                AfterPush::Nothing => {}
            }
        }

        fn drain(&self) {
            let n = self.queue.lock().unwrap().drain(..).count();
            self.drained.fetch_add(n, Ordering::SeqCst);
        }

        fn pop(&self) -> Option<u32> {
            self.queue.lock().unwrap().pop_front()
        }
    }

    /// Two callers submit while the ring thread works and sleeps: the ring
    /// thread gets both requests. A lost wake-up leaves it blocked for ever,
    /// which loom reports as a deadlock.
    /// Explores every interleaving with up to 3 preemptions: enough for the
    /// handshake's two-step sides, and fast enough for every test run.
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(f);
    }

    #[test]
    fn no_wake_up_is_lost() {
        model(|| {
            let engine = Engine::new();
            let callers: Vec<_> = (0..2)
                .map(|i| {
                    let engine = engine.clone();
                    loom::thread::spawn(move || engine.submit(i))
                })
                .collect();
            let mut seen = 0;
            while seen < 2 {
                while engine.pop().is_some() {
                    seen += 1;
                }
                if seen < 2
                    && engine
                        .state
                        .may_sleep(|| engine.queue.lock().unwrap().is_empty())
                {
                    engine.eventfd.wait();
                }
                engine.state.awake();
            }
            for caller in callers {
                caller.join().unwrap();
            }
        });
    }

    /// The ring thread exits while a caller submits: the request is either
    /// taken by the ring thread or drained by someone; none is stranded.
    #[test]
    fn nothing_is_stranded_when_the_thread_dies() {
        model(|| {
            let engine = Engine::new();
            let caller = {
                let engine = engine.clone();
                loom::thread::spawn(move || engine.submit(7))
            };
            let taken = usize::from(engine.pop().is_some());
            engine.state.die();
            engine.drain();
            caller.join().unwrap();
            assert!(
                engine.queue.lock().unwrap().is_empty(),
                "a request was stranded"
            );
            assert_eq!(taken + engine.drained.load(Ordering::SeqCst), 1);
        });
    }
}
