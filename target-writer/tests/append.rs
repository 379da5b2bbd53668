//! Appending and reopening: restore points survive, segments roll, the
//! journal enforces ids and sequence contiguity, and refuses other disks and
//! a second writer.
mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use proptest::prelude::*;
use target_writer::format::{ENTRY_HEADER_LEN, SEGMENT_HEADER_LEN};
use target_writer::{BatchMeta, Journal, JournalError, JournalOptions, RestorePoint};

const HEADER: u64 = SEGMENT_HEADER_LEN as u64;
const ENTRY: u64 = ENTRY_HEADER_LEN as u64;

fn now_ns() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(since.as_nanos()).unwrap()
}

#[test]
fn a_new_journal_has_one_empty_segment() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk-a");
    let (journal, report) = open(&target, JournalOptions::default());
    assert_eq!(
        (report.segments, report.points, report.torn_tail),
        (0, 0, None)
    );
    assert_eq!(journal.points(), &[]);
    assert_eq!(journal.last_seq(), None);
    assert_eq!(
        (journal.disk_id(), journal.disk_size()),
        (DISK_ID, DISK_SIZE)
    );
    assert_eq!(file_len(&segment_path(&target, 1)), HEADER);
    assert_eq!(journal.bytes_on_disk(), HEADER);
}

#[test]
fn points_and_bodies_survive_a_reopen_over_many_segments() {
    let dir = tempfile::tempdir().unwrap();
    let before = now_ns();
    let written = fill(dir.path(), 60, 1024);
    let after = now_ns();
    let segments = written.last().unwrap().segment;
    assert!(segments >= 5, "only {segments} segments");
    for (n, point) in (1..).zip(&written) {
        let b = batch(n);
        assert_eq!(point.id, n);
        assert_eq!((point.first_seq, point.last_seq), (b.first_seq, b.last_seq));
        assert_eq!(point.point_time_ns, b.point_time_ns);
        assert_eq!(point.ends_on_barrier, b.ends_on_barrier);
        assert_eq!(point.in_sync, b.in_sync);
        assert_eq!(point.body_len as usize, body(n).len() + tag_field_len(n));
        assert_eq!(point.tagged, b.tag.is_some());
        assert!((before..=after).contains(&point.received_time_ns));
    }
    let (journal, report) = open(dir.path(), options(1024));
    assert_eq!(report.segments as u64, segments);
    assert_eq!((report.points, report.torn_tail), (60, None));
    assert_eq!(journal.points(), written.as_slice());
    assert_eq!(journal.last_seq(), Some(batch(60).last_seq));
    for (n, point) in (1..).zip(journal.points()) {
        assert_eq!(journal.read_body(point).unwrap(), body(n), "batch {n}");
        assert_eq!(journal.tag(point.id), tag(n).as_deref(), "batch {n}");
    }
    let mut on_disk = 0;
    for number in 1..=segments {
        let len = file_len(&segment_path(dir.path(), number));
        let entries = written.iter().filter(|p| p.segment == number).count();
        assert!(len <= 1024 || entries == 1, "segment {number}: {len} bytes");
        assert!(entries >= 1, "segment {number} is empty");
        on_disk += len;
    }
    assert_eq!(journal.bytes_on_disk(), on_disk);
}

#[test]
fn appends_continue_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let first = fill(dir.path(), 10, 700);
    let (mut journal, _) = open(dir.path(), options(700));
    let second = append(&mut journal, 11, 25);
    assert_eq!(second[0].id, 11);
    assert!(second[0].segment >= first[9].segment);
    drop(journal);
    let (journal, _) = open(dir.path(), options(700));
    let all: Vec<RestorePoint> = first.into_iter().chain(second).collect();
    assert_eq!(journal.points(), all.as_slice());
}

#[test]
fn sequence_ranges_must_continue_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) = open(dir.path(), options(1024));
    let first = BatchMeta {
        first_seq: 0,
        last_seq: 0,
        point_time_ns: 5,
        ends_on_barrier: true,
        in_sync: false,
        tag: None,
    };
    journal.append(first.clone(), b"any first range").unwrap();
    let with = |first_seq, last_seq| BatchMeta {
        first_seq,
        last_seq,
        ..first.clone()
    };
    for (a, b) in [(2, 5), (0, 3), (0, 0)] {
        let err = journal.append(with(a, b), b"x").unwrap_err();
        assert!(
            matches!(
                err,
                JournalError::NotContiguous {
                    journal_last_seq: 0,
                    ..
                }
            ),
            "{a}..={b}: {err}"
        );
    }
    assert!(matches!(
        journal.append(with(3, 2), b"x").unwrap_err(),
        JournalError::SeqRange {
            first_seq: 3,
            last_seq: 2
        }
    ));
    let point = journal.append(with(1, 1), b"").unwrap();
    assert_eq!((point.id, journal.last_seq()), (2, Some(1)));
    assert_eq!(journal.points().len(), 2);
}

#[test]
fn an_entry_too_big_for_a_fresh_segment_goes_in_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) = open(dir.path(), options(256));
    let big = vec![0xab; 1000];
    let small = append(&mut journal, 1, 1);
    let p2 = journal.append(batch(2), &big).unwrap();
    let p3 = journal.append(batch(3), &big).unwrap();
    let p4 = journal.append(batch(4), &body(4)).unwrap();
    assert_eq!(small[0].segment, 1);
    assert_eq!((p2.segment, p2.offset), (2, HEADER));
    assert_eq!((p3.segment, p3.offset), (3, HEADER));
    assert_eq!((p4.segment, p4.offset), (4, HEADER));
    assert_eq!(
        file_len(&segment_path(dir.path(), 2)),
        HEADER + ENTRY + 1000 + tag_field_len(2) as u64
    );
    drop(journal);
    let (journal, _) = open(dir.path(), options(256));
    assert_eq!(journal.read_body(&p3).unwrap(), big);
    assert_eq!(journal.read_body(&p2).unwrap(), big);
    assert_eq!(journal.tag(2), tag(2).as_deref());
}

#[test]
fn a_journal_of_another_disk_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 3, 1024);
    let mut other_id = DISK_ID;
    other_id[0] ^= 1;
    for (id, size) in [(other_id, DISK_SIZE), (DISK_ID, DISK_SIZE + 512)] {
        let err = Journal::open(dir.path(), id, size, options(1024)).unwrap_err();
        assert!(matches!(err, JournalError::OtherDisk { .. }), "{err}");
        assert_eq!(
            location(&err),
            Some((segment_path(dir.path(), 1).as_path(), 0))
        );
    }
}

#[test]
fn a_segment_of_another_disk_among_ours_is_refused() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    fill(ours.path(), 20, 512);
    Journal::open(theirs.path(), [7; 16], DISK_SIZE, options(512))
        .map(|(mut j, _)| append(&mut j, 1, 20))
        .unwrap();
    let stray = segment_path(ours.path(), 2);
    std::fs::copy(segment_path(theirs.path(), 2), &stray).unwrap();
    let err = Journal::open(ours.path(), DISK_ID, DISK_SIZE, options(512)).unwrap_err();
    assert!(matches!(err, JournalError::OtherDisk { .. }), "{err}");
    assert_eq!(location(&err), Some((stray.as_path(), 0)));
}

#[test]
fn a_second_writer_is_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = open(dir.path(), options(1024));
    let err = Journal::open(dir.path(), DISK_ID, DISK_SIZE, options(1024)).unwrap_err();
    assert!(matches!(err, JournalError::Locked { .. }), "{err}");
    drop(journal);
    open(dir.path(), options(1024));
}

#[test]
fn read_body_refuses_a_point_that_is_not_in_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let points = fill(dir.path(), 4, 1024);
    let (journal, _) = open(dir.path(), options(1024));
    let mut forged = points[1];
    forged.offset += 1;
    let mut beyond = points[3];
    beyond.id = 5;
    for point in [forged, beyond] {
        let err = journal.read_body(&point).unwrap_err();
        assert!(matches!(err, JournalError::UnknownPoint { .. }), "{err}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn any_run_of_batches_reads_back_exactly(
        lens in proptest::collection::vec(0usize..600, 1..40),
        segment_size in 0u64..2048,
        split in 0usize..40,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let bodies: Vec<Vec<u8>> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| (0..len).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        let split = split.min(bodies.len());
        let mut written = Vec::new();
        for (range, reopen) in [(0..split, false), (split..bodies.len(), true)] {
            let (mut journal, report) = open(dir.path(), options(segment_size));
            prop_assert_eq!(report.points, written.len());
            prop_assert!(!reopen || journal.points() == written.as_slice());
            for i in range {
                let n = i as u64 + 1;
                written.push(journal.append(batch(n), &bodies[i]).unwrap());
            }
        }
        let (journal, _) = open(dir.path(), options(segment_size));
        prop_assert_eq!(journal.points(), written.as_slice());
        for (point, body) in journal.points().iter().zip(&bodies) {
            prop_assert_eq!(&journal.read_body(point).unwrap(), body);
        }
    }
}

#[test]
fn a_tag_selects_the_newest_point_of_that_name() {
    use filter::capture::Tag;
    use target_writer::history::{Check, History};
    use target_writer::restore::{PointSelector, RestoreError};
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 12, 1024);
    let (mut journal, _) = open(dir.path(), options(1024));
    let by_tag = |name: &str| {
        let history = History::open(dir.path(), Check::Everything).unwrap();
        history.select(PointSelector::Tag(name.into()))
    };
    assert_eq!(by_tag("point 7 ✓").unwrap().id, 7);
    let again = BatchMeta {
        tag: Some(Tag::new("point 7 ✓").unwrap()),
        ends_on_barrier: true,
        in_sync: false,
        ..batch(13)
    };
    journal.append(again, &body(13)).unwrap();
    assert_eq!(by_tag("point 7 ✓").unwrap().id, 13);
    let err = by_tag("point 8 ✓").unwrap_err();
    assert!(
        matches!(err, RestoreError::UnknownTag(ref name) if name == "point 8 ✓"),
        "{err}"
    );
    let (read_only, _) = Journal::open_read_only(dir.path()).unwrap();
    assert_eq!(read_only.tag(13), Some("point 7 ✓"));
    assert_eq!(by_tag("point 12 ✓").unwrap().id, 12);
}
