//! Rebuilding a disk image from the journal: which entries are restore
//! points, how a point is chosen by id, time or tag, and the rebuild itself
//! (a sparse image of the disk's size, every batch up to the point applied
//! in order, frames decrypted with the key file and the salt stored beside
//! each one).

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

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

/// The entries a user may restore to: every batch cut after a full sync
/// completed.
pub fn restore_points(journal: &Journal) -> Vec<RestorePoint> {
    journal
        .points()
        .iter()
        .filter(|p| !p.in_sync)
        .copied()
        .collect()
}

/// Finds the point a selector names.
pub fn select(journal: &Journal, selector: PointSelector) -> Result<RestorePoint, RestoreError> {
    let points = restore_points(journal);
    let first = *points.first().ok_or(RestoreError::NoPoints)?;
    match selector {
        PointSelector::Id(id) => points
            .iter()
            .find(|p| p.id == id)
            .copied()
            .ok_or(RestoreError::UnknownPoint(id)),
        PointSelector::AtOrBefore(time_ns) => points
            .iter()
            .rev()
            .find(|p| p.point_time_ns <= time_ns)
            .copied()
            .ok_or_else(|| RestoreError::TooEarly {
                requested: format_time(time_ns),
                first: format_time(first.point_time_ns),
            }),
        PointSelector::Tag(name) => points
            .iter()
            .rev()
            .find(|p| journal.tag(p.id) == Some(name.as_str()))
            .copied()
            .ok_or(RestoreError::UnknownTag(name)),
    }
}

/// Rebuilds the disk at `point` into a new sparse file at `out`, calling
/// `progress(entries_done, entries_total)` as it goes. On failure the
/// partial image is removed.
pub fn restore(
    journal: &Journal,
    key: &Key,
    point: &RestorePoint,
    out: &Path,
    progress: impl FnMut(u64, u64),
) -> Result<(), RestoreError> {
    let output = |op| {
        let path = out.to_path_buf();
        move |source| RestoreError::Output { path, op, source }
    };
    let image = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(output("create"))?;
    let result = rebuild(journal, key, point, &image, out, progress)
        .and_then(|()| image.sync_all().map_err(output("fsync")));
    if result.is_err() {
        drop(image);
        let _ = std::fs::remove_file(out);
    }
    result
}

fn rebuild(
    journal: &Journal,
    key: &Key,
    point: &RestorePoint,
    image: &std::fs::File,
    out: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), RestoreError> {
    let output = |op| {
        let path = out.to_path_buf();
        move |source| RestoreError::Output { path, op, source }
    };
    image.set_len(journal.disk_size()).map_err(output("size"))?;
    let entries: Vec<&RestorePoint> = journal
        .points()
        .iter()
        .take_while(|p| p.id <= point.id)
        .collect();
    let total = entries.len() as u64;
    for (done, entry) in entries.into_iter().enumerate() {
        read_batch(journal, key, entry)?
            .apply(image)
            .map_err(output("write"))?;
        progress(done as u64 + 1, total);
    }
    Ok(())
}

/// Reads, verifies, decrypts and decodes one journal entry.
pub fn read_batch(
    journal: &Journal,
    key: &Key,
    entry: &RestorePoint,
) -> Result<Batch, RestoreError> {
    let body = journal.read_body(entry)?;
    if body.len() < SALT_LEN {
        return Err(RestoreError::ShortBody { id: entry.id });
    }
    let salt = SessionSalt::from_bytes(body[..SALT_LEN].try_into().expect("SALT_LEN bytes"));
    let (_, payload) = open_at_rest(key, &salt, Direction::SourceToTarget, &body[SALT_LEN..])
        .map_err(|source| RestoreError::Frame {
            id: entry.id,
            source,
        })?;
    Batch::decode(&payload, entry.first_seq, entry.last_seq).map_err(|source| {
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
