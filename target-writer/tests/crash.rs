//! Crash-style tests: leave the files as a crash while appending would (a
//! write cut short, a size extended over bytes never written, a segment
//! created but not filled), reopen, and check that exactly the unfinished
//! entry is lost and appending carries on; strict recovery refuses instead.
mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use common::*;
use target_writer::format::{SegmentHeader, ENTRY_HEADER_LEN, SEGMENT_HEADER_LEN};
use target_writer::{Journal, JournalError, RestorePoint, TornCause};
use tempfile::TempDir;

const HEADER: u64 = SEGMENT_HEADER_LEN as u64;
const ENTRY: u64 = ENTRY_HEADER_LEN as u64;
const COUNT: u64 = 12;

/// A journal of `COUNT` batches, closed.
fn pristine(segment_size: u64) -> (TempDir, Vec<RestorePoint>) {
    let dir = tempfile::tempdir().unwrap();
    let points = fill(dir.path(), COUNT, segment_size);
    (dir, points)
}

fn entry_end(point: &RestorePoint) -> u64 {
    point.offset + ENTRY + u64::from(point.body_len)
}

fn copy_of(src: &Path) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_journal(src, dir.path());
    dir
}

fn append_raw(path: &Path, bytes: &[u8]) {
    let mut file = OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(bytes).unwrap();
}

/// Opens `dir`, expecting a torn tail at `offset` of segment `segment` that
/// was cut off, and everything before it intact; then appends the batch
/// that was lost and reopens.
fn recovers(dir: &Path, segment_size: u64, points: &[RestorePoint], segment: u64, offset: u64) {
    let (mut journal, report) = open(dir, options(segment_size));
    let torn = report.torn_tail.expect("a torn tail");
    let path = segment_path(dir, segment);
    assert_eq!((&torn.path, torn.offset, torn.cut), (&path, offset, true));
    assert_eq!(journal.points(), points);
    if torn.cause == TornCause::SegmentHeader {
        assert!(!path.exists(), "{} survived", path.display());
    } else {
        assert_eq!(file_len(&path), offset);
    }
    let n = points.len() as u64 + 1;
    let again = journal.append(batch(n), &body(n)).unwrap();
    assert_eq!(again.id, n);
    drop(journal);
    let (journal, report) = open(dir, options(segment_size));
    assert_eq!((report.points as u64, report.torn_tail), (n, None));
    assert_eq!(journal.read_body(&again).unwrap(), body(n));
}

#[test]
fn a_cut_anywhere_in_the_last_entry_is_a_torn_tail() {
    // 1024: the last entry is in the middle of a segment; 0: every entry is
    // alone in its segment, so the last one starts a fresh segment.
    for segment_size in [1024, 0] {
        let (src, points) = pristine(segment_size);
        let last = points.last().unwrap();
        for cut in last.offset + 1..entry_end(last) {
            let dir = copy_of(src.path());
            set_len(&segment_path(dir.path(), last.segment), cut);
            let (journal, report) = open(dir.path(), options(segment_size));
            let torn = report.torn_tail.unwrap();
            let cause = if cut < last.offset + ENTRY {
                TornCause::EntryHeaderCut
            } else {
                TornCause::BodyCut
            };
            assert_eq!((torn.cause, torn.dropped_bytes), (cause, cut - last.offset));
            drop(journal);
            // Reopening again finds nothing more to do.
            let (journal, report) = open(dir.path(), options(segment_size));
            assert_eq!(report.torn_tail, None, "cut at {cut}");
            assert_eq!(journal.points(), &points[..points.len() - 1]);
            drop(journal);
            recovers_clean_append(dir.path(), segment_size, last);
        }
    }
}

/// After a torn tail was cut off, the lost batch goes back where it was.
fn recovers_clean_append(dir: &Path, segment_size: u64, lost: &RestorePoint) {
    let (mut journal, _) = open(dir, options(segment_size));
    let again = journal.append(batch(lost.id), &body(lost.id)).unwrap();
    assert_eq!(
        (again.id, again.segment, again.offset),
        (lost.id, lost.segment, lost.offset)
    );
    drop(journal);
    let (journal, _) = open(dir, options(segment_size));
    assert_eq!(journal.read_body(&again).unwrap(), body(lost.id));
}

#[test]
fn strict_recovery_refuses_a_torn_tail_and_changes_nothing() {
    let (src, points) = pristine(1024);
    let last = points.last().unwrap();
    let path = |dir: &TempDir| segment_path(dir.path(), last.segment);
    for cut in last.offset + 1..entry_end(last) {
        let dir = copy_of(src.path());
        set_len(&path(&dir), cut);
        let before = snapshot(dir.path());
        let err = Journal::open(dir.path(), DISK_ID, DISK_SIZE, strict(1024)).unwrap_err();
        assert!(matches!(err, JournalError::TornTail { .. }), "{err}");
        assert_eq!(location(&err), Some((path(&dir).as_path(), last.offset)));
        assert_eq!(snapshot(dir.path()), before, "cut at {cut}");
    }
}

#[test]
fn a_crash_between_writing_an_entry_and_its_fsync_recovers_as_a_torn_tail() {
    let (src, points) = pristine(1 << 20);
    // The bytes the next append writes, from a journal that finished it.
    let done = copy_of(src.path());
    let (mut journal, _) = open(done.path(), options(1 << 20));
    let next = append(&mut journal, COUNT + 1, COUNT + 1)[0];
    assert_eq!(next.segment, points.last().unwrap().segment);
    let written = std::fs::read(segment_path(done.path(), next.segment)).unwrap();
    let entry = &written[next.offset as usize..];
    let len = entry.len();
    let zeros = vec![0u8; len];
    let header_then_zeros = [&entry[..ENTRY_HEADER_LEN], &zeros[ENTRY_HEADER_LEN..]].concat();
    let torn_header = [&entry[..40], &zeros[40..]].concat();
    let injected: Vec<(&str, &[u8])> = vec![
        ("1 byte", &entry[..1]),
        ("header less a byte", &entry[..ENTRY_HEADER_LEN - 1]),
        ("header only", &entry[..ENTRY_HEADER_LEN]),
        (
            "half the body",
            &entry[..ENTRY_HEADER_LEN + (len - ENTRY_HEADER_LEN) / 2],
        ),
        ("all but a byte", &entry[..len - 1]),
        ("size extended, nothing written", &zeros),
        ("size extended, a zero header", &zeros[..ENTRY_HEADER_LEN]),
        ("size extended, body not written", &header_then_zeros),
        ("size extended, header torn", &torn_header),
    ];
    for (what, bytes) in injected {
        let dir = copy_of(src.path());
        append_raw(&segment_path(dir.path(), next.segment), bytes);
        eprintln!("injected: {what}");
        recovers(dir.path(), 1 << 20, &points, next.segment, next.offset);
    }
}

#[test]
fn a_final_entry_failing_its_body_crc_is_torn_but_strict_refuses_it() {
    let (src, points) = pristine(1024);
    let last = points.last().unwrap();
    for at in [entry_end(last) - 1, last.offset + ENTRY] {
        let dir = copy_of(src.path());
        flip_bit(&segment_path(dir.path(), last.segment), at, 3);
        let err = Journal::open(dir.path(), DISK_ID, DISK_SIZE, strict(1024)).unwrap_err();
        assert!(
            matches!(
                err,
                JournalError::TornTail {
                    cause: TornCause::BodyCrc,
                    ..
                }
            ),
            "{err}"
        );
        recovers(
            dir.path(),
            1024,
            &points[..points.len() - 1],
            last.segment,
            last.offset,
        );
    }
}

#[test]
fn a_segment_torn_while_being_created_is_removed() {
    let (src, points) = pristine(1024);
    let number = points.last().unwrap().segment + 1;
    let header = SegmentHeader {
        disk_id: DISK_ID,
        disk_size: DISK_SIZE,
        number,
        first_entry_id: COUNT + 1,
    }
    .encode();
    for len in 0..=SEGMENT_HEADER_LEN {
        let dir = copy_of(src.path());
        let path = segment_path(dir.path(), number);
        std::fs::write(&path, &header[..len]).unwrap();
        if len == SEGMENT_HEADER_LEN {
            flip_bit(&path, 20, 0);
        }
        let before = snapshot(dir.path());
        let err = Journal::open(dir.path(), DISK_ID, DISK_SIZE, strict(1024)).unwrap_err();
        assert_eq!(location(&err), Some((path.as_path(), 0)), "{err}");
        assert_eq!(snapshot(dir.path()), before);
        recovers(dir.path(), 1024, &points, number, 0);
    }
}

#[test]
fn a_complete_but_empty_newest_segment_is_kept() {
    let (src, points) = pristine(1024);
    let number = points.last().unwrap().segment + 1;
    let dir = copy_of(src.path());
    let header = SegmentHeader {
        disk_id: DISK_ID,
        disk_size: DISK_SIZE,
        number,
        first_entry_id: COUNT + 1,
    };
    std::fs::write(segment_path(dir.path(), number), header.encode()).unwrap();
    let (mut journal, report) = open(dir.path(), options(1024));
    assert_eq!(report.torn_tail, None);
    let next = append(&mut journal, COUNT + 1, COUNT + 1)[0];
    assert_eq!((next.segment, next.offset), (number, HEADER));
}

#[test]
fn a_journal_whose_first_segment_was_torn_while_created_starts_afresh() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), options(1024)));
    let first = segment_path(dir.path(), 1);
    set_len(&first, 10);
    let (mut journal, report) = open(dir.path(), options(1024));
    let torn = report.torn_tail.unwrap();
    assert_eq!(
        (torn.cause, torn.dropped_bytes),
        (TornCause::SegmentHeader, 10)
    );
    assert_eq!(file_len(&first), HEADER);
    assert_eq!(append(&mut journal, 1, 1)[0].id, 1);
}

#[test]
fn after_a_failed_append_the_journal_takes_no_more_until_reopened() {
    let (src, points) = pristine(1024);
    let dir = copy_of(src.path());
    let (mut journal, _) = open(dir.path(), options(1024));
    // Inject: the next segment's name is taken, so rolling over fails.
    let next = segment_path(dir.path(), points.last().unwrap().segment + 1);
    std::fs::write(&next, b"").unwrap();
    let big = vec![1u8; 2048];
    let err = journal.append(batch(COUNT + 1), &big).unwrap_err();
    assert!(matches!(err, JournalError::Io { .. }), "{err}");
    assert_eq!(location(&err), Some((next.as_path(), 0)));
    let err = journal
        .append(batch(COUNT + 1), &body(COUNT + 1))
        .unwrap_err();
    assert!(matches!(err, JournalError::Failed { .. }), "{err}");
    assert_eq!(journal.points(), points.as_slice());
    drop(journal);
    // The empty file is what a crash while creating a segment leaves.
    recovers(
        dir.path(),
        1024,
        &points,
        points.last().unwrap().segment + 1,
        0,
    );
}

/// A crash after retention recorded the new first segment but before it
/// removed every older one leaves those files behind. A read-only open
/// ignores them and leaves them; the writer's open deletes them and keeps
/// every retained point.
#[test]
fn segments_left_by_an_interrupted_retention_are_removed_by_the_writer() {
    let (src, points) = pristine(1024);
    let dir = copy_of(src.path());
    let saved = tempfile::tempdir().unwrap();
    copy_journal(dir.path(), saved.path());
    let (mut journal, _) = open(dir.path(), options(1024));
    let up_to = points[COUNT as usize - 2];
    let removed = journal.remove_old_segments(up_to.id, u64::MAX).unwrap();
    assert!(removed >= 2, "retention removed {removed} segments");
    let kept = journal.points().to_vec();
    drop(journal);
    // The crash: the removed segments are back, as if never unlinked.
    let leftovers: Vec<_> = (1..=removed as u64)
        .map(|n| segment_path(dir.path(), n))
        .collect();
    for path in &leftovers {
        let name = path.file_name().unwrap();
        std::fs::copy(saved.path().join("journal").join(name), path).unwrap();
    }
    let (journal, report) = Journal::open_read_only(dir.path()).unwrap();
    assert_eq!(
        (journal.points(), report.leftover_segments_removed),
        (&kept[..], 0)
    );
    assert!(
        leftovers.iter().all(|p| p.exists()),
        "a read-only open deleted files"
    );
    let (journal, report) = open(dir.path(), options(1024));
    assert_eq!(report.leftover_segments_removed, removed);
    assert_eq!(journal.points(), &kept[..]);
    let survivors: Vec<_> = leftovers.iter().filter(|p| p.exists()).collect();
    assert!(survivors.is_empty(), "leftovers still there: {survivors:?}");
}
