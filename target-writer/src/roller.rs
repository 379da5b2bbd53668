//! The target's background long-term work, on a thread of its own so that
//! ingest and acknowledgments never wait for it: rolling the journal into
//! long-term points (on a schedule, and at once for tagged points) and
//! retention (merging expired long-term points into the base, removing
//! journal segments whose content a long-term point holds and that are older
//! than the short-term retention).
//!
//! The journal's lock is held only to copy the list of entries to roll and
//! to remove segments; reading and decrypting entries and writing images
//! happen without it.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pipeline::key::Key;

use crate::journal::{Journal, RestorePoint};
use crate::longterm::{LongTermError, LongTermStore};

/// When to roll and what to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongTermOptions {
    /// How often a long-term point is made (`--long-term-every`).
    pub every: Duration,
    /// Journal segments whose content is in a long-term point go once they
    /// are older than this (`--short-term-retention`); `None` keeps them.
    pub short_term: Option<Duration>,
    /// Long-term points older than this merge into the base
    /// (`--long-term-retention`); `None` keeps them.
    pub long_term: Option<Duration>,
    /// At most this many long-term points are kept (`--keep-long-term`).
    pub keep: Option<usize>,
}

impl Default for LongTermOptions {
    fn default() -> Self {
        LongTermOptions {
            every: Duration::from_secs(3600),
            short_term: Some(Duration::from_secs(4 * 3600)),
            long_term: Some(Duration::from_secs(7 * 24 * 3600)),
            keep: None,
        }
    }
}

/// The journal the server appends to, shared with the roller.
pub type SharedJournal = Arc<Mutex<Option<Journal>>>;

#[derive(Debug, Default)]
struct Signal {
    state: Mutex<(bool, bool)>,
    changed: Condvar,
}

/// The running roller; stops (finishing the step in progress) when dropped.
#[derive(Debug)]
pub struct Roller {
    signal: Arc<Signal>,
    thread: Option<JoinHandle<()>>,
}

impl Roller {
    pub fn start(
        dir: PathBuf,
        key: Key,
        options: LongTermOptions,
        journal: SharedJournal,
    ) -> Roller {
        let signal = Arc::new(Signal::default());
        let worker = Worker {
            dir,
            key,
            options,
            journal,
            store: None,
            signal: signal.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("long-term".into())
            .spawn(move || worker.run())
            .expect("spawning the long-term thread");
        Roller {
            signal,
            thread: Some(thread),
        }
    }

    /// Asks for a look at the journal now (a tagged point arrived).
    pub fn wake(&self) {
        let mut state = self
            .signal
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.0 = true;
        self.signal.changed.notify_one();
    }
}

impl Drop for Roller {
    fn drop(&mut self) {
        let mut state = self
            .signal
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.1 = true;
        self.signal.changed.notify_one();
        drop(state);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn now_ns() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

struct Worker {
    dir: PathBuf,
    key: Key,
    options: LongTermOptions,
    journal: SharedJournal,
    store: Option<LongTermStore>,
    signal: Arc<Signal>,
}

/// What to roll next: the journal entries to read and the point to stop at.
struct RollPlan {
    slice: Journal,
    to: RestorePoint,
    tag: Option<String>,
}

impl Worker {
    fn run(mut self) {
        let tick = self.options.every.min(Duration::from_secs(1));
        loop {
            if let Err(e) = self.step() {
                tracing::error!("long-term work failed, retrying later: {e}");
                // A failed step is handled like a crash: the store is opened
                // again next round, and opening removes what the step left
                // half done (a partial image would otherwise stand in the
                // way of every retry, and hold on to its space).
                self.store = None;
            }
            let state = self
                .signal
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let (mut state, _) = self
                .signal
                .changed
                .wait_timeout_while(state, tick, |(woken, stop)| !*woken && !*stop)
                .unwrap_or_else(PoisonError::into_inner);
            if state.1 {
                return;
            }
            state.0 = false;
        }
    }

    /// One round: every roll that is due, then retention.
    fn step(&mut self) -> Result<(), LongTermError> {
        if self.store.is_none() {
            let identity = {
                let journal = self.journal.lock().unwrap_or_else(PoisonError::into_inner);
                journal.as_ref().map(|j| (j.disk_id(), j.disk_size()))
            };
            let Some((id, size)) = identity else {
                return Ok(());
            };
            self.store = Some(LongTermStore::open(&self.dir, id, size)?);
        }
        while let Some(plan) = self.next_roll() {
            let store = self.store.as_mut().expect("opened above");
            let started = std::time::Instant::now();
            let entries = plan.slice.points().len();
            let journal_bytes: u64 = plan
                .slice
                .points()
                .iter()
                .map(|p| u64::from(p.body_len))
                .sum();
            store.roll(&plan.slice, &self.key, &plan.to, plan.tag.clone())?;
            let seconds = started.elapsed().as_secs_f64();
            tracing::info!(
                point = plan.to.id,
                tag = ?plan.tag,
                entries,
                journal_bytes,
                seconds,
                "long-term point made"
            );
        }
        self.expire_long_term()?;
        self.expire_short_term()
    }

    /// The next roll due, if any: up to the oldest tagged point not rolled
    /// yet; else up to the newest restore point, once `every` has passed
    /// since the newest long-term point (or since the first restore point).
    fn next_roll(&self) -> Option<RollPlan> {
        let store = self.store.as_ref()?;
        let newest = store.newest().map(|p| p.point);
        let journal = self.journal.lock().unwrap_or_else(PoisonError::into_inner);
        let journal = journal.as_ref()?;
        let after = newest.map_or(0, |p| p.entry_id);
        let candidates = journal
            .points()
            .iter()
            .filter(|p| p.id > after && !p.in_sync);
        // A tagged point becomes a long-term point at once, whatever the schedule.
        if let Some(tagged) = candidates.clone().find(|p| p.tagged) {
            return Some(RollPlan {
                slice: journal.read_only_slice(after + 1..=tagged.id),
                to: *tagged,
                tag: journal.tag(tagged.id).map(String::from),
            });
        }
        let to = *candidates.clone().next_back()?;
        let since = newest.map_or_else(
            || {
                candidates
                    .clone()
                    .next()
                    .map_or(u64::MAX, |p| p.received_time_ns)
            },
            |p| p.received_time_ns,
        );
        if now_ns() < since.saturating_add(ns(self.options.every)) {
            return None;
        }
        Some(RollPlan {
            slice: journal.read_only_slice(after + 1..=to.id),
            to,
            tag: None,
        })
    }

    /// Merges the oldest long-term points into the base while they are
    /// expired (too old, or more than `keep`).
    fn expire_long_term(&mut self) -> Result<(), LongTermError> {
        let store = self.store.as_mut().expect("opened");
        loop {
            let catalog = store.catalog();
            let Some(base) = &catalog.base else {
                return Ok(());
            };
            if catalog.deltas.is_empty() {
                return Ok(());
            }
            // A merge a crash (or a reader's pin) left unfinished comes first.
            let unfinished = catalog.merging.is_some();
            let count = catalog.deltas.len() + 1;
            let too_many = self.options.keep.is_some_and(|keep| count > keep.max(1));
            let too_old = self
                .options
                .long_term
                .is_some_and(|age| base.point.received_time_ns.saturating_add(ns(age)) < now_ns());
            if !too_many && !too_old && !unfinished {
                return Ok(());
            }
            let expiring = base.point.entry_id;
            if !store.merge_oldest()? {
                return Ok(());
            }
            tracing::info!(
                point = expiring,
                "long-term point expired (merged into the base)"
            );
        }
    }

    /// Removes journal segments rolled into long-term points and older than
    /// the short-term retention.
    fn expire_short_term(&mut self) -> Result<(), LongTermError> {
        let (Some(retention), Some(store)) = (self.options.short_term, &self.store) else {
            return Ok(());
        };
        let Some(rolled) = store.newest().map(|p| p.point.entry_id) else {
            return Ok(());
        };
        let cutoff = now_ns().saturating_sub(ns(retention));
        let mut journal = self.journal.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(journal) = journal.as_mut() else {
            return Ok(());
        };
        let oldest = journal.points().first().map(|p| (p.id, p.received_time_ns));
        let due = oldest.is_some_and(|(id, received)| id <= rolled && received < cutoff);
        if !due {
            return Ok(());
        }
        let Some(_pin) = store.pin()? else {
            return Ok(());
        };
        let removed = journal.remove_old_segments(rolled, cutoff)?;
        if removed > 0 {
            tracing::info!(
                segments = removed,
                "journal segments past short-term retention removed"
            );
        }
        Ok(())
    }
}
