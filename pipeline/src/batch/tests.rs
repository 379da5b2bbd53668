//! Tests of [`super`].
use super::*;
use proptest::prelude::*;
use std::io::{Read, Seek, SeekFrom, Write};

/// The size of the disk the property tests play on.
const DISK: u64 = 64 * 1024;
/// What every byte of the image holds before the first batch, so that
/// zero extents have something to clear.
const BEFORE: u8 = 0xAA;

#[derive(Debug, Clone, Copy)]
enum Fill {
    /// No zero byte at all.
    Pattern,
    /// Every byte zero: must become a zero extent.
    Zeros,
    /// Runs of zeros between runs of data.
    Mixed,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write { offset: u64, len: u64, fill: Fill },
    Trim { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
    Flush,
    Tag,
}

/// An op, whether it is FUA, and whether to cut a batch after it.
type Step = (Op, bool, bool);

fn range() -> impl Strategy<Value = (u64, u64)> {
    // Most ranges fall in the first 16 KiB, so they overlap heavily.
    prop_oneof![
        6 => (0u64..16 * 1024, 1u64..4096),
        3 => (0u64..DISK, 1u64..=16 * 1024),
        1 => (0u64..DISK, Just(0u64)),
    ]
    .prop_map(|(offset, len)| (offset, len.min(DISK - offset)))
}

fn op() -> impl Strategy<Value = Op> {
    let fill = prop_oneof![
        6 => Just(Fill::Pattern),
        1 => Just(Fill::Zeros),
        2 => Just(Fill::Mixed),
    ];
    prop_oneof![
        8 => (range(), fill).prop_map(|((offset, len), fill)| Op::Write { offset, len, fill }),
        2 => range().prop_map(|(offset, len)| Op::Trim { offset, len }),
        2 => range().prop_map(|(offset, len)| Op::Zero { offset, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Tag),
    ]
}

fn steps(max: usize) -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (op(), prop::bool::weighted(0.2), prop::bool::weighted(0.1)),
        1..max,
    )
}

fn record(seq: u64, op: Op, fua: bool) -> Record {
    let (kind, offset, len, data) = match op {
        Op::Write { offset, len, fill } => {
            let data: Vec<u8> = (offset..offset + len)
                .map(|at| match fill {
                    Fill::Zeros => 0,
                    Fill::Mixed if (at / 97) % 2 == 0 => 0,
                    Fill::Pattern | Fill::Mixed => ((seq * 131 + at * 7) % 255 + 1) as u8,
                })
                .collect();
            (RecordKind::Write, offset, len, Bytes::from(data))
        }
        Op::Trim { offset, len } => (RecordKind::Trim, offset, len, Bytes::new()),
        Op::Zero { offset, len } => (RecordKind::Zero, offset, len, Bytes::new()),
        Op::Flush => (RecordKind::Flush, 0, 0, Bytes::new()),
        Op::Tag => (RecordKind::Tag, 0, 0, Bytes::from(format!("tag {seq}"))),
    };
    Record {
        seq,
        kind,
        fua: fua && !kind.is_barrier(),
        offset,
        len,
        data,
    }
}

/// What a byte became within the current batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Touched {
    Data,
    Zeros,
}

/// The byte model: the disk after every record so far, record by record,
/// and what each byte became in the batch being built.
struct Model {
    disk: Vec<u8>,
    touched: Vec<Option<Touched>>,
    next_seq: u64,
    first_seq: u64,
    last_was_barrier: bool,
    last_tag: Option<Tag>,
}

impl Model {
    fn new(first_seq: u64) -> Self {
        Model {
            disk: vec![BEFORE; DISK as usize],
            touched: vec![None; DISK as usize],
            next_seq: first_seq,
            first_seq,
            last_was_barrier: false,
            last_tag: None,
        }
    }

    fn apply(&mut self, record: &Record) {
        let range = record.offset as usize..(record.offset + record.len) as usize;
        match record.kind {
            RecordKind::Write => {
                self.disk[range.clone()].copy_from_slice(&record.data);
                let became = if record.data.iter().all(|&b| b == 0) {
                    Touched::Zeros
                } else {
                    Touched::Data
                };
                self.touched[range].fill(Some(became));
            }
            RecordKind::Trim | RecordKind::Zero => {
                self.disk[range.clone()].fill(0);
                self.touched[range].fill(Some(Touched::Zeros));
            }
            RecordKind::Flush => {}
            RecordKind::Tag => {}
        }
        self.next_seq = record.seq + 1;
        self.last_was_barrier = record.is_barrier();
        self.last_tag = (record.kind == RecordKind::Tag)
            .then(|| Tag::new(&format!("tag {}", record.seq)).unwrap());
    }

    /// Checks a batch just taken against the model, and starts a new one.
    fn check_batch(&mut self, batch: &Batch) -> Result<(), TestCaseError> {
        prop_assert_eq!(batch.first_seq, self.first_seq, "seq ranges not contiguous");
        prop_assert_eq!(batch.last_seq, self.next_seq - 1);
        prop_assert_eq!(batch.ends_on_barrier, self.last_was_barrier);
        prop_assert_eq!(&batch.tag, &self.last_tag);
        check_shape(batch)?;
        let mut covered = vec![None; DISK as usize];
        for extent in &batch.extents {
            let range = extent.range();
            prop_assert!(range.end <= DISK);
            let range = range.start as usize..range.end as usize;
            let kind = match extent {
                Extent::Data { data, .. } => {
                    prop_assert_eq!(&data[..], &self.disk[range.clone()], "stale data");
                    Touched::Data
                }
                Extent::Zero { .. } => Touched::Zeros,
            };
            covered[range].fill(Some(kind));
        }
        // Exactly the bytes changed in the batch are covered, zeros never as data.
        prop_assert!(
            covered == self.touched,
            "coverage differs from what changed"
        );
        self.touched.fill(None);
        self.first_seq = self.next_seq;
        Ok(())
    }
}

/// Extents sorted, non-overlapping, non-empty, adjacent zeros merged.
fn check_shape(batch: &Batch) -> Result<(), TestCaseError> {
    for pair in batch.extents.windows(2) {
        let (a, b) = (pair[0].range(), pair[1].range());
        prop_assert!(
            a.end <= b.start,
            "extents unsorted or overlapping: {:?} {:?}",
            a,
            b
        );
        let both_zero = matches!(pair, [Extent::Zero { .. }, Extent::Zero { .. }]);
        prop_assert!(
            !(both_zero && a.end == b.start),
            "adjacent zero extents not merged"
        );
    }
    prop_assert!(batch.extents.iter().all(|e| !e.range().is_empty()));
    Ok(())
}

fn image() -> File {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&vec![BEFORE; DISK as usize]).unwrap();
    file
}

fn read_image(file: &mut File) -> Vec<u8> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0)).unwrap();
    file.read_to_end(&mut bytes).unwrap();
    bytes
}

/// Builds one batch of all `steps` (ignoring their cut marks).
fn one_batch(steps: &[Step]) -> Batch {
    let mut builder = BatchBuilder::new();
    for (seq, &(op, fua, _)) in steps.iter().enumerate() {
        builder.push(&record(seq as u64, op, fua));
    }
    builder.take().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn batches_applied_in_order_equal_the_records_applied_one_by_one(
        steps in steps(200),
        first_seq in 0u64..1 << 40,
    ) {
        let mut model = Model::new(first_seq);
        let mut builder = BatchBuilder::new();
        let mut file = image();
        let mut batches = 0;
        let mut cut = |builder: &mut BatchBuilder, model: &mut Model| -> Result<(), TestCaseError> {
            let (data_bytes, extent_count) = (builder.data_bytes(), builder.extent_count());
            let batch = builder.take().unwrap();
            prop_assert!(builder.is_empty() && builder.take().is_none());
            prop_assert_eq!(extent_count, batch.extents.len());
            let held: usize = batch.extents.iter().map(|e| match e {
                Extent::Data { data, .. } => data.len(),
                Extent::Zero { .. } => 0,
            }).sum();
            prop_assert_eq!(data_bytes, held);
            model.check_batch(&batch)?;
            let payload = batch.encode();
            let decoded = Batch::decode(Bytes::copy_from_slice(&payload), batch.first_seq, batch.last_seq).unwrap();
            prop_assert_eq!(&decoded, &batch);
            decoded.apply(&file).unwrap();
            batches += 1;
            Ok(())
        };
        for (i, &(op, fua, cut_after)) in steps.iter().enumerate() {
            let record = record(first_seq + i as u64, op, fua);
            model.apply(&record);
            builder.push(&record);
            if cut_after {
                cut(&mut builder, &mut model)?;
            }
        }
        if !builder.is_empty() {
            cut(&mut builder, &mut model)?;
        }
        prop_assert!(batches >= 1);
        prop_assert!(read_image(&mut file) == model.disk, "image differs from the model");
    }
}

proptest! {
    // Every truncation of a payload of up to about 70 KB is a lot of decodes.
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn decode_rejects_every_truncation(steps in steps(60), barrier in any::<bool>()) {
        let mut batch = one_batch(&steps);
        batch.ends_on_barrier = barrier || batch.tag.is_some(); // a tagged batch ends on a barrier
        let payload = batch.encode();
        prop_assert_eq!(Batch::decode(Bytes::copy_from_slice(&payload), batch.first_seq, batch.last_seq), Ok(batch.clone()));
        for len in 0..payload.len() {
            let result = Batch::decode(Bytes::copy_from_slice(&payload[..len]), batch.first_seq, batch.last_seq);
            prop_assert!(result.is_err(), "a {} byte prefix of {} decoded", len, payload.len());
        }
    }

    #[test]
    fn decode_survives_corruption(
        steps in steps(60),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let batch = one_batch(&steps);
        let mut payload = batch.encode();
        for (at, xor) in flips {
            let at = at.index(payload.len());
            payload[at] ^= xor;
        }
        // Flipped data bytes are undetectable here (the frame's AEAD tag
        // catches them); anything accepted must be well formed and
        // re-encode to exactly what was decoded.
        if let Ok(decoded) = Batch::decode(Bytes::copy_from_slice(&payload), 7, 9) {
            check_shape_loose(&decoded)?;
            prop_assert!(decoded.encode() == payload);
        }
    }
}

/// Sorted, non-overlapping and non-empty: what decode promises (it does
/// not insist that adjacent zero extents were merged).
fn check_shape_loose(batch: &Batch) -> Result<(), TestCaseError> {
    for pair in batch.extents.windows(2) {
        prop_assert!(pair[0].range().end <= pair[1].range().start);
    }
    prop_assert!(batch.extents.iter().all(|e| !e.range().is_empty()));
    Ok(())
}

fn write(seq: u64, offset: u64, data: &'static [u8], fua: bool) -> Record {
    Record {
        seq,
        kind: RecordKind::Write,
        fua,
        offset,
        len: data.len() as u64,
        data: Bytes::from_static(data),
    }
}

fn change(seq: u64, kind: RecordKind, offset: u64, len: u64) -> Record {
    Record {
        seq,
        kind,
        fua: false,
        offset,
        len,
        data: Bytes::new(),
    }
}

fn data(offset: u64, data: &'static [u8]) -> Extent {
    Extent::Data {
        offset,
        data: Bytes::from_static(data),
    }
}

#[test]
fn overlaps_split_trim_and_merge() {
    let mut builder = BatchBuilder::new();
    builder.push(&write(5, 10, b"abcdefghij", false));
    builder.push(&change(6, RecordKind::Trim, 13, 2)); // splits the write
    builder.push(&change(7, RecordKind::Zero, 15, 1)); // merges with the trim
    builder.push(&write(8, 8, b"XYZ", false)); // trims the write's head
    builder.push(&write(9, 30, &[0; 4], false)); // zeros are not data
    builder.push(&write(10, 18, b"..", true)); // trims its tail; FUA
    assert_eq!(builder.data_bytes(), 3 + 2 + 2 + 2);
    let batch = builder.take().unwrap();
    assert_eq!(
        batch,
        Batch {
            first_seq: 5,
            last_seq: 10,
            ends_on_barrier: true,
            in_sync: false,
            tag: None,
            extents: vec![
                data(8, b"XYZ"),
                data(11, b"bc"),
                Extent::Zero { offset: 13, len: 3 },
                data(16, b"gh"),
                data(18, b".."),
                Extent::Zero { offset: 30, len: 4 },
            ],
        }
    );
    assert!(builder.is_empty());
    assert_eq!((builder.data_bytes(), builder.extent_count()), (0, 0));
}

#[test]
fn flushes_only_advance_the_range_and_set_the_barrier() {
    let mut builder = BatchBuilder::new();
    assert_eq!(builder.take(), None);
    builder.push(&change(0, RecordKind::Flush, 0, 0));
    assert!(!builder.is_empty());
    let batch = builder.take().unwrap();
    assert_eq!((batch.first_seq, batch.last_seq), (0, 0));
    assert!(batch.ends_on_barrier && batch.extents.is_empty());
    assert_eq!(batch.encode(), [1, 1, 0, 0, 0, 0]);
    builder.push(&change(1, RecordKind::Flush, 0, 0));
    builder.push(&write(2, 0, b"a", false));
    assert!(!builder.take().unwrap().ends_on_barrier);
}

#[test]
#[should_panic(expected = "without gaps")]
fn a_sequence_gap_panics() {
    let mut builder = BatchBuilder::new();
    builder.push(&change(0, RecordKind::Flush, 0, 0));
    builder.push(&change(2, RecordKind::Flush, 0, 0));
}

#[test]
fn encoding_is_the_documented_layout() {
    let batch = Batch {
        first_seq: 1,
        last_seq: 2,
        ends_on_barrier: false,
        in_sync: false,
        tag: None,
        extents: vec![data(0x0102, b"hi"), Extent::Zero { offset: 9, len: 3 }],
    };
    let mut expected = vec![1, 0, 2, 0, 0, 0];
    expected.extend_from_slice(&[1, 2, 1, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    expected.extend_from_slice(b"hi");
    expected.extend_from_slice(&[2, 9, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(batch.encode(), expected);
}

/// A payload of `extents`, each `(kind, offset, len, data)`.
fn payload(flags: u8, count: u32, extents: &[(u8, u64, u64, &[u8])]) -> Vec<u8> {
    let mut out = vec![1, flags];
    out.extend_from_slice(&count.to_le_bytes());
    for &(kind, offset, len, data) in extents {
        out.push(kind);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

#[test]
fn decode_says_what_is_wrong_and_where() {
    let decode = |payload: &[u8]| Batch::decode(Bytes::copy_from_slice(payload), 0, 0).unwrap_err();
    let mut bad_version = payload(0, 0, &[]);
    bad_version[0] = 2;
    assert_eq!(
        decode(&bad_version),
        BatchError::Version { at: 0, version: 2 }
    );
    assert_eq!(
        decode(&payload(9, 0, &[])),
        BatchError::Flags { at: 1, flags: 9 }
    );
    assert_eq!(
        decode(&payload(0, 2, &[(2, 0, 1, b"")])),
        BatchError::Count {
            at: 2,
            count: 2,
            available: 17
        }
    );
    assert_eq!(
        decode(&payload(0, 1, &[(3, 0, 1, b"")])),
        BatchError::Kind {
            index: 0,
            at: 6,
            kind: 3
        }
    );
    assert_eq!(
        decode(&payload(0, 2, &[(2, 0, 1, b""), (2, 5, 0, b"")])),
        BatchError::Empty { index: 1, at: 23 }
    );
    assert_eq!(
        decode(&payload(0, 1, &[(2, u64::MAX, 1, b"")])),
        BatchError::Overflow {
            index: 0,
            at: 6,
            start: u64::MAX,
            len: 1
        }
    );
    assert_eq!(
        decode(&payload(0, 2, &[(1, 4, 2, b"ab"), (2, 5, 1, b"")])),
        BatchError::Unsorted {
            index: 1,
            at: 25,
            start: 5,
            previous_end: 6
        }
    );
    assert_eq!(
        decode(&payload(0, 1, &[(1, 4, 3, b"ab")])),
        BatchError::Truncated {
            what: "extent data",
            at: 23,
            needed: 3,
            available: 2
        }
    );
    assert_eq!(
        decode(&payload(0, 1, &[(2, 4, 3, b"!")])),
        BatchError::Trailing { at: 23, count: 1 }
    );
    assert_eq!(
        decode(&payload(0, 0, &[])[..5]),
        BatchError::Truncated {
            what: "extent count",
            at: 2,
            needed: 4,
            available: 3
        }
    );
    assert_eq!(
        Batch::decode(payload(0, 0, &[]).into(), 3, 2).unwrap_err(),
        BatchError::SeqRange {
            first_seq: 3,
            last_seq: 2
        }
    );
    let message = decode(&payload(0, 1, &[(3, 0, 1, b"")])).to_string();
    assert_eq!(message, "batch payload: extent 0 at byte 6: unknown kind 3");
}

#[test]
fn apply_zeroes_and_writes() {
    let mut file = image();
    let batch = Batch {
        first_seq: 0,
        last_seq: 0,
        ends_on_barrier: false,
        in_sync: false,
        tag: None,
        extents: vec![
            data(1, b"xy"),
            Extent::Zero {
                offset: 4,
                len: 8192,
            },
        ],
    };
    batch.apply(&file).unwrap();
    let bytes = read_image(&mut file);
    assert_eq!(bytes.len(), DISK as usize);
    assert_eq!(&bytes[..5], &[BEFORE, b'x', b'y', BEFORE, 0]);
    assert!(bytes[4..8196].iter().all(|&b| b == 0));
    assert_eq!(bytes[8196], BEFORE);
}

fn tag_record(seq: u64, name: &str) -> Record {
    Record {
        seq,
        kind: RecordKind::Tag,
        fua: false,
        offset: 0,
        len: 0,
        data: Bytes::copy_from_slice(name.as_bytes()),
    }
}

#[test]
fn a_batch_ending_on_a_tagged_barrier_carries_the_tag() {
    let mut builder = BatchBuilder::new();
    builder.push(&write(0, 4, b"ab", false));
    builder.push(&tag_record(1, "v1"));
    let batch = builder.take().unwrap();
    assert_eq!(batch.tag, Some(Tag::new("v1").unwrap()));
    assert!(batch.ends_on_barrier);
    assert_eq!(batch.extents, [data(4, b"ab")]);
    // Header, then the tag (length, bytes), then the extents.
    let mut expected = vec![1, 1 | 4, 1, 0, 0, 0, 2, b'v', b'1'];
    expected.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    expected.extend_from_slice(b"ab");
    let payload = batch.encode();
    assert_eq!(payload, expected);
    assert_eq!(Batch::decode(payload.into(), 0, 1), Ok(batch));
    // A tag followed by more records is no longer the batch's end.
    builder.push(&tag_record(2, "v2"));
    builder.push(&write(3, 0, b"c", false));
    assert_eq!(builder.take().unwrap().tag, None);
}

#[test]
fn bad_tags_are_refused_with_their_offset() {
    let decode = |payload: &[u8]| Batch::decode(Bytes::copy_from_slice(payload), 0, 0).unwrap_err();
    let tagged = |tag: &[u8]| {
        let mut out = vec![1, 1 | 4, 0, 0, 0, 0, tag.len() as u8];
        out.extend_from_slice(tag);
        out
    };
    assert_eq!(
        decode(&tagged(b"a\xffb")),
        BatchError::Tag {
            at: 6,
            source: TagError::NotUtf8(1)
        }
    );
    assert_eq!(
        decode(&tagged(b"")),
        BatchError::Tag {
            at: 6,
            source: TagError::Empty
        }
    );
    assert_eq!(
        decode(&tagged(b"a\tb")),
        BatchError::Tag {
            at: 6,
            source: TagError::Control('\t', 1)
        }
    );
    assert_eq!(
        decode(&tagged(b"abc")[..8]),
        BatchError::Truncated {
            what: "tag",
            at: 7,
            needed: 3,
            available: 1
        }
    );
    let mut no_barrier = tagged(b"x");
    no_barrier[1] = 4;
    assert_eq!(
        decode(&no_barrier),
        BatchError::TagWithoutBarrier { at: 1, flags: 4 }
    );
    // The longest tag fits; a tag is never longer (its length is one byte).
    let longest = tagged(&[b'x'; 255]);
    let batch = Batch::decode(longest.into(), 0, 0).unwrap();
    assert_eq!(batch.tag.map(|t| t.as_str().len()), Some(255));
}

#[test]
fn a_flipped_bit_of_a_tagged_payload_is_refused_or_reencodes_exactly() {
    let mut builder = BatchBuilder::new();
    builder.push(&tag_record(0, "tag"));
    let payload = builder.take().unwrap().encode();
    for bit in 0..payload.len() * 8 {
        let mut bad = payload.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        if let Ok(decoded) = Batch::decode(Bytes::copy_from_slice(&bad), 0, 0) {
            assert_eq!(decoded.encode(), bad, "bit {bit}");
        }
    }
}
