//! Corruption anywhere but a torn tail: a flipped bit in any entry but the
//! last, in a segment header, an entry that breaks the order, a segment cut
//! short or missing in the middle. Each is an error naming the segment and
//! offset, in both recovery modes, and the files are left as they were.
mod common;

use std::path::Path;

use common::*;
use target_writer::format::{EntryHeader, ENTRY_HEADER_LEN, SEGMENT_HEADER_LEN};
use target_writer::{Journal, JournalError, JournalOptions, RestorePoint};
use tempfile::TempDir;

const ENTRY: u64 = ENTRY_HEADER_LEN as u64;
const SEGMENT_SIZE: u64 = 1024;
const COUNT: u64 = 19;

/// Header bytes to damage: magic, kind, flags, reserved, each field, body
/// length (low and high byte), body CRC, header CRC.
const HEADER_BYTES: [u64; 14] = [0, 3, 4, 5, 6, 8, 16, 24, 32, 40, 48, 51, 52, 60];

fn pristine() -> (TempDir, Vec<RestorePoint>) {
    let dir = tempfile::tempdir().unwrap();
    let points = fill(dir.path(), COUNT, SEGMENT_SIZE);
    (dir, points)
}

/// Damages a copy of `src` with `damage`, then checks that opening it, in
/// either mode or read-only, fails with an error at `at` (segment, offset)
/// and changes nothing.
fn refused(src: &Path, at: (u64, u64), damage: impl Fn(&Path)) -> JournalError {
    let dir = tempfile::tempdir().unwrap();
    copy_journal(src, dir.path());
    damage(dir.path());
    let before = snapshot(dir.path());
    let path = segment_path(dir.path(), at.0);
    let expected = Some((path.as_path(), at.1));
    let mut errors = Vec::new();
    for options in [options(SEGMENT_SIZE), strict(SEGMENT_SIZE)] {
        let err = Journal::open(dir.path(), DISK_ID, DISK_SIZE, options).unwrap_err();
        assert_eq!(location(&err), expected, "{err}");
        errors.push(err);
    }
    let err = Journal::open_read_only(dir.path()).unwrap_err();
    assert_eq!(location(&err), expected, "{err}");
    assert_eq!(snapshot(dir.path()), before, "the files changed");
    errors.swap_remove(0)
}

#[test]
fn a_flipped_bit_in_any_entry_but_the_last_is_reported_where_it_is() {
    let (src, points) = pristine();
    assert!(points.last().unwrap().segment >= 4);
    // The newest segment holds several entries, so some non-final entries are
    // in the segment where a torn tail could be.
    let newest = points.last().unwrap().segment;
    assert!(points.iter().filter(|p| p.segment == newest).count() >= 2);
    for point in &points[..points.len() - 1] {
        let body_len = u64::from(point.body_len);
        let body_bytes = [0, body_len / 2, body_len - 1].map(|b| ENTRY + b);
        for (i, byte) in HEADER_BYTES.iter().chain(&body_bytes).enumerate() {
            let bit = (i % 8) as u8;
            let err = refused(src.path(), (point.segment, point.offset), |dir| {
                flip_bit(&segment_path(dir, point.segment), point.offset + byte, bit)
            });
            let expected = if *byte < ENTRY {
                matches!(err, JournalError::EntryHeader { .. })
            } else {
                matches!(err, JournalError::BodyCrc { id, .. } if id == point.id)
            };
            assert!(expected, "entry {} byte {byte}: {err}", point.id);
        }
    }
}

#[test]
fn a_flipped_bit_in_a_segment_header_is_reported() {
    let (src, points) = pristine();
    for number in 1..=points.last().unwrap().segment {
        for (byte, bit) in [
            (0, 0),
            (9, 1),
            (13, 2),
            (20, 3),
            (33, 4),
            (41, 5),
            (49, 6),
            (58, 0),
            (62, 7),
        ] {
            let err = refused(src.path(), (number, 0), |dir| {
                flip_bit(&segment_path(dir, number), byte, bit)
            });
            assert!(matches!(err, JournalError::SegmentHeader { .. }), "{err}");
        }
    }
}

#[test]
fn an_older_segment_cut_short_is_corruption() {
    let (src, points) = pristine();
    let last_of_first = points.iter().rfind(|p| p.segment == 1).unwrap();
    for cut in [last_of_first.offset + 10, last_of_first.offset + ENTRY + 1] {
        let err = refused(src.path(), (1, last_of_first.offset), |dir| {
            set_len(&segment_path(dir, 1), cut)
        });
        assert!(matches!(err, JournalError::Truncated { .. }), "{err}");
    }
    let err = refused(src.path(), (2, 0), |dir| set_len(&segment_path(dir, 2), 30));
    assert!(matches!(err, JournalError::Truncated { .. }), "{err}");
}

#[test]
fn a_missing_segment_is_reported() {
    let (src, _) = pristine();
    let err = refused(src.path(), (3, 0), |dir| {
        std::fs::remove_file(segment_path(dir, 2)).unwrap()
    });
    assert!(
        matches!(err, JournalError::SegmentGap { expected: 2, .. }),
        "{err}"
    );
    let err = refused(src.path(), (2, 0), |dir| {
        std::fs::remove_file(segment_path(dir, 1)).unwrap()
    });
    assert!(
        matches!(err, JournalError::SegmentGap { expected: 1, .. }),
        "{err}"
    );
}

/// Rewrites the header of the entry at `point` with `change` applied and a
/// valid CRC: intact bytes that break the journal's order.
fn rewrite_header(dir: &Path, point: &RestorePoint, change: impl Fn(&mut EntryHeader)) {
    use std::os::unix::fs::FileExt;
    let path = segment_path(dir, point.segment);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut raw = [0u8; ENTRY_HEADER_LEN];
    file.read_exact_at(&mut raw, point.offset).unwrap();
    let mut header = EntryHeader::decode(&raw).unwrap();
    change(&mut header);
    file.write_all_at(&header.encode(), point.offset).unwrap();
}

#[test]
fn entries_out_of_order_are_reported() {
    let (src, points) = pristine();
    // The last entry too: its bytes are intact, so this is no torn tail.
    for point in [&points[5], points.last().unwrap()] {
        let at = (point.segment, point.offset);
        let err = refused(src.path(), at, |dir| {
            rewrite_header(dir, point, |h| h.id += 1)
        });
        assert!(matches!(err, JournalError::EntryId { .. }), "{err}");
        let err = refused(src.path(), at, |dir| {
            rewrite_header(dir, point, |h| h.first_seq += 1)
        });
        assert!(matches!(err, JournalError::SeqGap { .. }), "{err}");
    }
}

#[test]
fn read_body_reports_damage_that_appears_after_opening() {
    let (src, points) = pristine();
    let dir = tempfile::tempdir().unwrap();
    copy_journal(src.path(), dir.path());
    let (journal, _) = open(
        dir.path(),
        JournalOptions {
            segment_size: SEGMENT_SIZE,
            ..Default::default()
        },
    );
    let point = &points[7];
    let path = segment_path(dir.path(), point.segment);
    flip_bit(&path, point.offset + ENTRY + 5, 1);
    let err = journal.read_body(point).unwrap_err();
    assert!(matches!(err, JournalError::BodyCrc { .. }), "{err}");
    assert_eq!(location(&err), Some((path.as_path(), point.offset)));
    flip_bit(&path, point.offset + 17, 1);
    let err = journal.read_body(point).unwrap_err();
    assert!(matches!(err, JournalError::EntryHeader { .. }), "{err}");
    assert_eq!(location(&err), Some((path.as_path(), point.offset)));
    assert_eq!(journal.read_body(&points[8]).unwrap(), body(9));
    assert_eq!(SEGMENT_HEADER_LEN as u64, points[0].offset);
}

#[test]
fn a_damaged_header_is_corruption_however_far_away_the_next_entry_is() {
    // The search for a later intact entry reads 1 MiB at a time from just
    // past the damaged header; this puts the next header across the seam.
    let seam = ENTRY + 1 + (1 << 20);
    let first_len = seam - 30 - 2 * ENTRY;
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) = open(dir.path(), JournalOptions::default());
    let first = journal
        .append(batch(1), &vec![7; first_len as usize])
        .unwrap();
    let second = append(&mut journal, 2, 2)[0];
    assert_eq!(second.offset, seam - 30);
    drop(journal);
    let err = refused(dir.path(), (1, first.offset), |dir| {
        flip_bit(&segment_path(dir, 1), first.offset + 51, 6)
    });
    assert!(matches!(err, JournalError::EntryHeader { .. }), "{err}");
}

/// A tagged entry whose tag field is bad though its body CRC checks out:
/// a tag byte changed behind the tag CRC's back, or (CRCs and all) no tag,
/// not UTF-8, a control character, longer than the body — what a faulty
/// writer would leave. It is corruption, reported where the entry is.
#[test]
fn a_tagged_entry_with_a_bad_tag_is_corruption_even_with_good_crcs() {
    use std::os::unix::fs::FileExt;
    use target_writer::format::TagFieldError;
    let (src, points) = pristine();
    let point = *points.iter().find(|p| p.tagged).expect("a tagged point");
    assert!(
        point.body_len < 255,
        "the body must be shorter than the longest tag"
    );
    for (at, value, fix_tag_crc) in [
        (3, b'X', false),
        (0, 0, true),
        (2, 0xff, true),
        (1, b'\n', true),
        (0, 255, true),
    ] {
        let err = refused(src.path(), (point.segment, point.offset), |dir| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(segment_path(dir, point.segment))
                .unwrap();
            let mut raw = [0u8; ENTRY_HEADER_LEN];
            file.read_exact_at(&mut raw, point.offset).unwrap();
            let mut header = EntryHeader::decode(&raw).unwrap();
            let mut body = vec![0u8; point.body_len as usize];
            file.read_exact_at(&mut body, point.offset + ENTRY).unwrap();
            body[at] = value;
            header.body_crc = crc32c::crc32c(&body);
            if fix_tag_crc {
                let field_len = (1 + usize::from(body[0])).min(body.len());
                header.tag_crc = crc32c::crc32c(&body[..field_len]);
            }
            file.write_all_at(&header.encode(), point.offset).unwrap();
            file.write_all_at(&body, point.offset + ENTRY).unwrap();
        });
        let JournalError::TagField { id, source, .. } = &err else {
            panic!("byte {at} = {value}: {err}");
        };
        assert_eq!(*id, point.id);
        let crc_failed = matches!(source, TagFieldError::Crc { .. });
        assert_eq!(crc_failed, !fix_tag_crc, "byte {at} = {value}: {err}");
    }
}
