//! Serialises overlapping writes. Two in-flight writes to overlapping ranges
//! take turns, so the order in which they reach the backing disk is the order
//! of their capture sequence numbers, and replaying the captured stream gives
//! the disk's bytes exactly. Writes to disjoint ranges never wait.

use std::sync::{Mutex, PoisonError};

use tokio::sync::Notify;

/// The set of byte ranges held by in-flight writes.
#[derive(Debug, Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    released: Notify,
}

/// Holds `[start, end)` until dropped.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl RangeLock {
    /// Waits until no held range overlaps `[start, end)`, then holds it.
    pub async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        loop {
            // Register interest before looking, so a release between the look
            // and the await still wakes us.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
                if !held.iter().any(|&(s, e)| s < end && start < e) {
                    held.push((start, end));
                    return RangeGuard {
                        lock: self,
                        range: (start, end),
                    };
                }
            }
            released.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self
            .lock
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn disjoint_ranges_do_not_wait() {
        let lock = RangeLock::default();
        let _a = lock.lock(0, 10).await;
        let _b = lock.lock(10, 20).await;
    }

    #[tokio::test]
    async fn overlapping_range_waits_for_release() {
        let lock = Arc::new(RangeLock::default());
        let guard = lock.lock(0, 4096).await;
        let waiter = {
            let lock = lock.clone();
            tokio::spawn(async move {
                let _g = lock.lock(4095, 5000).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "overlapping lock was granted while held"
        );
        drop(guard);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter not woken after release")
            .unwrap();
    }
}
