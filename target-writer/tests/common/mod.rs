//! Shared helpers for the journal tests: fill a journal with known batches,
//! copy and damage its files, snapshot them, and find where an error points.
//! Every helper panics with what it saw.
#![allow(dead_code)] // each test binary uses its own subset of the helpers

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use filter::capture::Tag;
use target_writer::format::segment_file_name;
use target_writer::{
    BatchMeta, Journal, JournalError, JournalOptions, RecoveryMode, RecoveryReport, RestorePoint,
};

pub const DISK_ID: [u8; 16] = *b"cdp-test-disk-01";
pub const DISK_SIZE: u64 = 1 << 30;

pub fn options(segment_size: u64) -> JournalOptions {
    JournalOptions {
        segment_size,
        recovery: RecoveryMode::TolerateTornTail,
    }
}

pub fn strict(segment_size: u64) -> JournalOptions {
    JournalOptions {
        segment_size,
        recovery: RecoveryMode::Strict,
    }
}

pub fn open(dir: &Path, options: JournalOptions) -> (Journal, RecoveryReport) {
    Journal::open(dir, DISK_ID, DISK_SIZE, options)
        .unwrap_or_else(|e| panic!("opening {}: {e}", dir.display()))
}

/// Batch `n` (from 1) covers seqs `10n ..= 10n + 9`; every third ends on a
/// barrier, and every fifth (from 2) on a tagged one, named by [`tag`].
pub fn batch(n: u64) -> BatchMeta {
    let tag = tag(n).map(|name| Tag::new(&name).expect("a valid tag"));
    BatchMeta {
        first_seq: 10 * n,
        last_seq: 10 * n + 9,
        point_time_ns: 1_000_000 * n,
        ends_on_barrier: n % 3 == 0 || tag.is_some(),
        in_sync: n % 4 == 1,
        tag,
    }
}

/// The tag of batch `n`, if it is tagged.
pub fn tag(n: u64) -> Option<String> {
    (n % 5 == 2).then(|| format!("point {n} ✓"))
}

/// Bytes the tag of batch `n` adds to its entry's body (length and tag).
pub fn tag_field_len(n: u64) -> usize {
    tag(n).map_or(0, |name| 1 + name.len())
}

/// The body of batch `n`: a 64-byte "salt" then a "frame", of a length that
/// varies with `n`, filled with bytes derived from `n`.
pub fn body(n: u64) -> Vec<u8> {
    let len = 64 + (n * 37 % 200) as usize;
    let mut state = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Appends batches `from ..= to` and returns their points.
pub fn append(journal: &mut Journal, from: u64, to: u64) -> Vec<RestorePoint> {
    (from..=to)
        .map(|n| {
            journal
                .append(batch(n), &body(n))
                .unwrap_or_else(|e| panic!("appending batch {n}: {e}"))
        })
        .collect()
}

/// A journal in `dir` holding batches `1 ..= count`; returns their points.
pub fn fill(dir: &Path, count: u64, segment_size: u64) -> Vec<RestorePoint> {
    let (mut journal, report) = open(dir, options(segment_size));
    assert_eq!(report.points, 0, "{} is not empty", dir.display());
    append(&mut journal, 1, count)
}

pub fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join("journal").join(segment_file_name(number))
}

/// Copies the journal in `src` to `dst`.
pub fn copy_journal(src: &Path, dst: &Path) {
    let to = dst.join("journal");
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(src.join("journal")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

pub fn flip_bit(path: &Path, offset: u64, bit: u8) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ (1 << bit)], offset).unwrap();
}

pub fn set_len(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Every file in `dir/journal`: contents and modification time.
pub fn snapshot(dir: &Path) -> BTreeMap<String, (Vec<u8>, SystemTime)> {
    std::fs::read_dir(dir.join("journal"))
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            let contents = std::fs::read(entry.path()).unwrap();
            let modified = entry.metadata().unwrap().modified().unwrap();
            (name, (contents, modified))
        })
        .collect()
}

/// The segment path and offset an error names.
pub fn location(err: &JournalError) -> Option<(&Path, u64)> {
    use JournalError::*;
    match err {
        Io { path, offset, .. }
        | EntryHeader { path, offset, .. }
        | BodyCrc { path, offset, .. }
        | Truncated { path, offset, .. }
        | EntryId { path, offset, .. }
        | SeqGap { path, offset, .. }
        | TornTail { path, offset, .. }
        | TagField { path, offset, .. }
        | Changed { path, offset, .. } => Some((path, *offset)),
        SegmentHeader { path, .. }
        | SegmentNumber { path, .. }
        | FirstEntryId { path, .. }
        | SegmentGap { path, .. }
        | OtherDisk { path, .. } => Some((path, 0)),
        _ => None,
    }
}
