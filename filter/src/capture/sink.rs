//! Where the captured stream goes in the filter on its own: a capture log, or
//! nowhere (drained and dropped, so capture still costs what it costs).

use super::log::{LogError, LogWriter};
use super::ring::CaptureReceiver;

/// The consumer of a capture ring.
#[derive(Debug)]
pub enum CaptureSink {
    Log(LogWriter),
    Discard,
}

/// What a sink consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkStats {
    pub records: u64,
    pub data_bytes: u64,
    /// Sequence number after the last record consumed.
    pub next_seq: u64,
}

impl CaptureSink {
    /// Drains `receiver` until every sender is gone, then closes the log
    /// (flush + fsync). Blocking: run it on a thread of its own. On an error
    /// the receiver is dropped, so further captures fail instead of being lost
    /// silently.
    pub fn drain(mut self, mut receiver: CaptureReceiver) -> Result<SinkStats, LogError> {
        let mut stats = SinkStats {
            next_seq: receiver.next_seq(),
            ..Default::default()
        };
        loop {
            let record = match receiver.try_recv() {
                Some(record) => record,
                None => {
                    // About to wait: hand what we have to the kernel first.
                    if let CaptureSink::Log(log) = &mut self {
                        log.flush()?;
                    }
                    match receiver.recv() {
                        Some(record) => record,
                        None => break,
                    }
                }
            };
            if let CaptureSink::Log(log) = &mut self {
                log.append(&record)?;
            }
            stats.records += 1;
            stats.data_bytes += record.data.len() as u64;
            stats.next_seq = record.seq + 1;
        }
        if let CaptureSink::Log(log) = self {
            log.close()?;
        }
        Ok(stats)
    }
}
