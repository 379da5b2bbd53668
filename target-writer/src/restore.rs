//! What restoring shares across tiers: how a user names a point (id, time or tag), the
//! errors, reading one journal entry back as a batch (its frame decrypted
//! with the key file and the salt stored beside it), and times as users
//! write them. Which points exist and the rebuild itself are in
//! [`crate::history`].

use std::io;
use std::path::PathBuf;

use pipeline::batch::{Batch, BatchError};
use pipeline::codec::{open_at_rest, CodecError, Direction, SessionSalt};
use pipeline::key::Key;

use crate::journal::{Journal, JournalError, RestorePoint};

/// Bytes of session salt stored before each frame in a journal entry body.
pub const SALT_LEN: usize = 64;

/// How a user names a point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PointSelector {
    /// A restore point id, as `cdp points` shows it.
    Id(u64),
    /// The newest point at or before this time (ns since the epoch, the
    /// source's clock).
    AtOrBefore(u64),
    /// The newest tagged point of this name.
    Tag(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    LongTerm(#[from] crate::longterm::LongTermError),
    #[error("the journal holds no restore point yet (a full sync has not completed)")]
    NoPoints,
    #[error("there is no restore point {0}; `cdp points` lists them")]
    UnknownPoint(u64),
    #[error("no restore point is tagged {0:?}; `cdp points` lists the tags")]
    UnknownTag(String),
    #[error("{requested} is before the first restore point ({first})")]
    TooEarly { requested: String, first: String },
    #[error("entry {id}: its body is shorter than a session salt")]
    ShortBody { id: u64 },
    #[error("entry {id}: cannot open its frame (wrong key file, or damage): {source}")]
    Frame {
        id: u64,
        #[source]
        source: CodecError,
    },
    #[error("entry {id}: {source}")]
    Payload {
        id: u64,
        #[source]
        source: BatchError,
    },
    #[error("{path}: {op}: {source}")]
    Output {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Reads, verifies, decrypts and decodes one journal entry.
pub fn read_batch(
    journal: &Journal,
    key: &Key,
    entry: &RestorePoint,
) -> Result<Batch, RestoreError> {
    let mut frame = journal.read_body(entry)?;
    if frame.len() < SALT_LEN {
        return Err(RestoreError::ShortBody { id: entry.id });
    }
    let salt = frame.split_to(SALT_LEN);
    let salt = SessionSalt::from_bytes(salt[..].try_into().expect("SALT_LEN bytes"));
    let (_, payload) =
        open_at_rest(key, &salt, Direction::SourceToTarget, frame).map_err(|source| {
            RestoreError::Frame {
                id: entry.id,
                source,
            }
        })?;
    Batch::decode(payload, entry.first_seq, entry.last_seq).map_err(|source| {
        RestoreError::Payload {
            id: entry.id,
            source,
        }
    })
}

/// RFC 3339 in UTC with milliseconds, e.g. `2026-11-23T04:13:00.123Z`.
pub fn format_time(ns: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns);
    humantime::format_rfc3339_millis(time).to_string()
}

/// Parses RFC 3339 in UTC (`2026-11-23T04:13:00.123Z`) or seconds since the
/// epoch (`1763871180` or `1763871180.5`) into ns since the epoch.
pub fn parse_time(text: &str) -> Option<u64> {
    if let Some(ns) = parse_epoch_seconds(text) {
        return Some(ns);
    }
    let time = humantime::parse_rfc3339_weak(text).ok()?;
    let since = time.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(since.as_nanos()).ok()
}

/// `1763871180` or `1763871180.123` (up to 9 fraction digits) as ns,
/// exactly (no floating point).
fn parse_epoch_seconds(text: &str) -> Option<u64> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || (!fraction.is_empty() && !digits(fraction)) || fraction.len() > 9 {
        return None;
    }
    let nanos = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<9}").parse::<u64>().ok()?
    };
    whole
        .parse::<u64>()
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_through_rfc3339() {
        let ns = 1_763_871_180_123_000_000;
        assert_eq!(format_time(ns), "2025-11-23T04:13:00.123Z");
        assert_eq!(parse_time("2025-11-23T04:13:00.123Z"), Some(ns));
        assert_eq!(
            parse_time("1763871180.123").map(|t| t / 1_000_000),
            Some(ns / 1_000_000)
        );
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_time("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_time("yesterday"), None);
    }
}
