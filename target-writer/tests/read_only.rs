//! The read-only opener, for tools: it verifies like the writer, reports a
//! torn tail without cutting it, takes no lock, refuses to append, and
//! leaves every byte and timestamp of the journal as it was.
mod common;

use common::*;
use target_writer::format::SEGMENT_HEADER_LEN;
use target_writer::{BatchMeta, Journal, JournalError, TornCause};

#[test]
fn a_segment_torn_while_created_is_reported_and_left_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let points = fill(dir.path(), 30, 1024);
    let last = points.last().unwrap();
    let torn_segment = segment_path(dir.path(), last.segment + 1);
    std::fs::write(&torn_segment, b"CDPJ").unwrap();
    let before = snapshot(dir.path());

    let (mut journal, report) = Journal::open_read_only(dir.path()).unwrap();
    assert_eq!(
        (journal.disk_id(), journal.disk_size()),
        (DISK_ID, DISK_SIZE)
    );
    let torn = report.torn_tail.unwrap();
    assert_eq!(
        (
            &torn.path,
            torn.offset,
            torn.dropped_bytes,
            torn.cause,
            torn.cut
        ),
        (&torn_segment, 0, 4, TornCause::SegmentHeader, false)
    );
    assert_eq!(report.segments as u64, last.segment);
    assert_eq!(journal.points(), points.as_slice());
    for (n, point) in (1..).zip(journal.points()) {
        assert_eq!(journal.read_body(point).unwrap(), body(n));
    }
    let err = journal.append(batch(31), &body(31)).unwrap_err();
    assert!(matches!(err, JournalError::ReadOnly { .. }), "{err}");
    drop(journal);
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn a_torn_entry_is_reported_and_left_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let points = fill(dir.path(), 10, 1024);
    let last = points.last().unwrap();
    let newest = segment_path(dir.path(), last.segment);
    set_len(&newest, last.offset + 100);
    let before = snapshot(dir.path());
    let (journal, report) = Journal::open_read_only(dir.path()).unwrap();
    let torn = report.torn_tail.unwrap();
    assert_eq!(
        (torn.offset, torn.dropped_bytes, torn.cut),
        (last.offset, 100, false)
    );
    assert_eq!(journal.points(), &points[..9]);
    assert_eq!(journal.bytes_on_disk(), {
        let segments = 1..=last.segment;
        segments
            .map(|n| file_len(&segment_path(dir.path(), n)))
            .sum::<u64>()
    });
    drop(journal);
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn a_reader_needs_no_lock_and_sees_what_the_writer_made_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (mut writer, _) = open(dir.path(), options(1024));
    let points = append(&mut writer, 1, 5);
    let (reader, report) = Journal::open_read_only(dir.path()).unwrap();
    assert_eq!((report.points, report.torn_tail), (5, None));
    assert_eq!(reader.points(), points.as_slice());
    let point = writer
        .append(
            BatchMeta {
                first_seq: batch(5).last_seq + 1,
                ..batch(6)
            },
            b"late",
        )
        .unwrap();
    assert_eq!(reader.points().len(), 5);
    assert!(matches!(
        reader.read_body(&point).unwrap_err(),
        JournalError::UnknownPoint { id: 6 }
    ));
}

#[test]
fn a_directory_without_a_complete_segment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("journal")).unwrap();
    let err = Journal::open_read_only(dir.path()).unwrap_err();
    assert!(matches!(err, JournalError::Empty { .. }), "{err}");
    std::fs::write(segment_path(dir.path(), 1), [0u8; SEGMENT_HEADER_LEN - 1]).unwrap();
    let err = Journal::open_read_only(dir.path()).unwrap_err();
    assert!(matches!(err, JournalError::Empty { .. }), "{err}");
    let err = Journal::open_read_only(&dir.path().join("missing")).unwrap_err();
    assert!(matches!(err, JournalError::Io { .. }), "{err}");
}
