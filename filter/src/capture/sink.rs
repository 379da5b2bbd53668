//! Where the captured stream goes in the filter on its own: a capture log, or
//! nowhere (numbered, ringed and handed out in order like any stream, then
//! dropped by the connections' threads as they push, so capture still costs
//! what it costs).

use super::log::{LogError, LogWriter};
use super::ring::{capture_ring, capture_ring_inline, CaptureReceiver, Delivered, InlineReceiver};
use super::CaptureSender;

/// The consumer of a capture ring.
#[derive(Debug)]
pub enum CaptureSink {
    Log(LogWriter),
    Discard,
}

/// A sink consuming its ring.
#[derive(Debug)]
pub enum StartedSink {
    /// The log drains the ring on the thread that calls
    /// [`StartedSink::finish`]: its appends are system calls.
    Log(LogWriter, CaptureReceiver),
    /// The producers drop the records themselves (see
    /// [`capture_ring_inline`]): no thread to wake per write.
    Discard(InlineReceiver),
}

impl CaptureSink {
    /// Creates a ring holding about `budget_bytes` of record data, numbered
    /// from `first_seq`, for this sink; [`StartedSink::finish`] then
    /// consumes it.
    pub fn start(self, budget_bytes: usize, first_seq: u64) -> (CaptureSender, StartedSink) {
        match self {
            CaptureSink::Log(log) => {
                let (sender, receiver) = capture_ring(budget_bytes, first_seq);
                (sender, StartedSink::Log(log, receiver))
            }
            CaptureSink::Discard => {
                let (sender, receiver) = capture_ring_inline(budget_bytes, first_seq, drop);
                (sender, StartedSink::Discard(receiver))
            }
        }
    }
}

impl StartedSink {
    /// Consumes the ring until every sender is gone, then closes the log
    /// (flush + fsync). Blocking: run it on a thread of its own. If the log
    /// fails, its receiver is dropped, so further captures fail instead of
    /// being lost silently.
    pub fn finish(self) -> Result<Delivered, LogError> {
        match self {
            StartedSink::Log(log, receiver) => drain_into_log(log, receiver),
            StartedSink::Discard(receiver) => Ok(receiver.wait_closed()),
        }
    }
}

fn drain_into_log(
    mut log: LogWriter,
    mut receiver: CaptureReceiver,
) -> Result<Delivered, LogError> {
    loop {
        let record = match receiver.try_recv() {
            Some(record) => record,
            None => {
                // About to wait: hand what we have to the kernel first.
                log.flush()?;
                match receiver.recv() {
                    Some(record) => record,
                    None => break,
                }
            }
        };
        log.append(&record)?;
    }
    log.close()?;
    Ok(receiver.delivered())
}
