//! Everything that can go wrong with a journal. Each error about bytes on disk
//! names the segment file and, where there is one, the byte offset (of the
//! entry, for entry errors).

use std::io;
use std::path::PathBuf;

use super::TornCause;
use crate::format::{HeaderError, TagFieldError};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{}: {op} at offset {offset}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("{}: corrupt segment header at offset 0: {source}", path.display())]
    SegmentHeader {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
    #[error("{}: the segment header says segment {found}, the file name says {expected}", path.display())]
    SegmentNumber {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{}: the segment header says its first entry is {found}, expected {expected}", path.display())]
    FirstEntryId {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{}: segment {expected} should come next; segments are missing", path.display())]
    SegmentGap { path: PathBuf, expected: u64 },
    #[error(
        "{}: segment of disk {} ({found_size} bytes), but this journal is of disk {} ({expected_size} bytes)",
        path.display(), hex(found_id), hex(expected_id)
    )]
    OtherDisk {
        path: PathBuf,
        expected_id: [u8; 16],
        expected_size: u64,
        found_id: [u8; 16],
        found_size: u64,
    },
    #[error("{}: corrupt entry header at offset {offset}: {source}", path.display())]
    EntryHeader {
        path: PathBuf,
        offset: u64,
        #[source]
        source: HeaderError,
    },
    #[error(
        "{}: body CRC mismatch in entry {id} at offset {offset} (stored {stored:#010x}, computed {computed:#010x})",
        path.display()
    )]
    BodyCrc {
        path: PathBuf,
        offset: u64,
        id: u64,
        stored: u32,
        computed: u32,
    },
    #[error("{}: entry {id} at offset {offset} is tagged, but its tag is bad: {source}", path.display())]
    TagField {
        path: PathBuf,
        offset: u64,
        id: u64,
        #[source]
        source: TagFieldError,
    },
    #[error(
        "{}: entry at offset {offset} is cut short: it needs {needed} bytes, the segment has {available} left",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error("{}: entry at offset {offset} has id {found}, expected {expected}", path.display())]
    EntryId {
        path: PathBuf,
        offset: u64,
        expected: u64,
        found: u64,
    },
    #[error("{}: entry at offset {offset} starts at seq {found}, expected {expected}", path.display())]
    SeqGap {
        path: PathBuf,
        offset: u64,
        expected: u64,
        found: u64,
    },
    #[error(
        "{}: torn tail at offset {offset} ({cause}); strict recovery does not truncate it",
        path.display()
    )]
    TornTail {
        path: PathBuf,
        offset: u64,
        cause: TornCause,
    },
    #[error(
        "{}: the entry at offset {offset} no longer matches restore point {id}",
        path.display()
    )]
    Changed { path: PathBuf, offset: u64, id: u64 },
    #[error("{}: another writer holds the journal", path.display())]
    Locked { path: PathBuf },
    #[error("{}: no segment with a complete header", path.display())]
    Empty { path: PathBuf },
    #[error("{}: the journal is open read-only", path.display())]
    ReadOnly { path: PathBuf },
    #[error(
        "{}: an append failed at offset {offset}; reopen the journal to recover",
        path.display()
    )]
    Failed { path: PathBuf, offset: u64 },
    #[error("batch seq {first_seq}..={last_seq} does not continue the journal, which ends at seq {journal_last_seq}")]
    NotContiguous {
        first_seq: u64,
        last_seq: u64,
        journal_last_seq: u64,
    },
    #[error("batch seq range {first_seq}..={last_seq} is reversed")]
    SeqRange { first_seq: u64, last_seq: u64 },
    #[error(
        "batch body of {len} bytes is larger than an entry can hold ({} bytes)",
        u32::MAX
    )]
    BodyTooLarge { len: usize },
    #[error("restore point {id} is not in this journal")]
    UnknownPoint { id: u64 },
}

fn hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
