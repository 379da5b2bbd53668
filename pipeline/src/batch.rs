//! Batches: the net effect of a run of consecutive capture records.
//!
//! This module owns coalescing records into a batch ([`BatchBuilder`]: for
//! every byte the newest record wins, exactly, at byte granularity), the
//! batch's plaintext encoding (the payload a frame carries; "Batch payload,
//! version 1" in `docs/FORMATS.md`), and applying a batch to an image. A
//! batch whose last record is a tagged barrier carries the tag: it is an
//! application-consistent point.
//!
//! A batch covers the records `first_seq..=last_seq`, with no gaps. Applied to
//! an image that holds the disk as of the record before `first_seq`, it gives
//! the disk as of `last_seq`. Trims and zeroes become [`Extent::Zero`] (the
//! filter guarantees that trimmed bytes read as zeros), and so does a write
//! whose data is all zeros: zeros are never carried as data.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use filter::capture::log::zero_range;
use filter::capture::{Record, RecordKind, Tag, TagError};

/// The payload version this code writes and the only one it reads.
const VERSION: u8 = 1;
/// Flags bit 0: the batch ends on a barrier.
const FLAG_BARRIER: u8 = 1;
const FLAG_IN_SYNC: u8 = 2;
/// Flags bit 2: the batch ends on a tagged barrier; the tag follows the header.
const FLAG_TAGGED: u8 = 4;
/// Version, flags, extent count.
const HEADER_LEN: usize = 1 + 1 + 4;
/// Kind, offset, length.
const EXTENT_HEADER_LEN: usize = 1 + 8 + 8;
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;

/// One range of the disk in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extent {
    /// The range `offset..offset + data.len()` holds `data`.
    Data { offset: u64, data: Bytes },
    /// The range `offset..offset + len` reads as zeros.
    Zero { offset: u64, len: u64 },
}

impl Extent {
    /// The bytes of the disk this extent covers.
    pub fn range(&self) -> Range<u64> {
        match self {
            Extent::Data { offset, data } => *offset..offset + data.len() as u64,
            Extent::Zero { offset, len } => *offset..offset + len,
        }
    }
}

/// The net effect of the records `first_seq..=last_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub first_seq: u64,
    pub last_seq: u64,
    /// The last record is a barrier (a flush, or a FUA change).
    pub ends_on_barrier: bool,
    /// Cut before the source's full sync completed: not a consistent image
    /// by itself (set by the shipper, which knows where the sync stands).
    pub in_sync: bool,
    /// The last record is a tagged barrier: the batch ends on an
    /// application-consistent point of this name (and on a barrier).
    pub tag: Option<Tag>,
    /// Sorted by offset, non-overlapping, none empty.
    pub extents: Vec<Extent>,
}

/// Why a batch payload was refused. `at` is always a byte offset in the payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch payload: sequence range {first_seq}..={last_seq} is backwards")]
    SeqRange { first_seq: u64, last_seq: u64 },
    #[error("batch payload truncated: {what} at byte {at} needs {needed} bytes, {available} left")]
    Truncated {
        what: &'static str,
        at: usize,
        needed: u64,
        available: usize,
    },
    #[error("batch payload: unknown version {version} at byte {at}")]
    Version { at: usize, version: u8 },
    #[error("batch payload: unknown flags {flags:#04x} at byte {at}")]
    Flags { at: usize, flags: u8 },
    #[error("batch payload: the tag at byte {at}: {source}")]
    Tag {
        at: usize,
        #[source]
        source: TagError,
    },
    #[error(
        "batch payload: flags {flags:#04x} at byte {at} say tagged but not ending on a barrier"
    )]
    TagWithoutBarrier { at: usize, flags: u8 },
    #[error("batch payload: extent count {count} at byte {at} cannot fit in the {available} bytes that follow")]
    Count {
        at: usize,
        count: u32,
        available: usize,
    },
    #[error("batch payload: extent {index} at byte {at}: unknown kind {kind}")]
    Kind { index: u32, at: usize, kind: u8 },
    #[error("batch payload: extent {index} at byte {at} is empty")]
    Empty { index: u32, at: usize },
    #[error(
        "batch payload: extent {index} at byte {at}: offset {start} plus length {len} overflows"
    )]
    Overflow {
        index: u32,
        at: usize,
        start: u64,
        len: u64,
    },
    #[error("batch payload: extent {index} at byte {at} starts at disk offset {start}, before the previous extent ends at {previous_end}")]
    Unsorted {
        index: u32,
        at: usize,
        start: u64,
        previous_end: u64,
    },
    #[error("batch payload: {count} stray bytes after the last extent, at byte {at}")]
    Trailing { at: usize, count: usize },
}

impl Batch {
    /// The plaintext payload (layout in `docs/FORMATS.md`, "Batch payload,
    /// version 1"). The sequence range is not in it: the frame carries it.
    pub fn encode(&self) -> Vec<u8> {
        let data: usize = self
            .extents
            .iter()
            .map(|extent| match extent {
                Extent::Data { data, .. } => data.len(),
                Extent::Zero { .. } => 0,
            })
            .sum();
        let count = u32::try_from(self.extents.len()).expect("fewer than 2^32 extents in a batch");
        let tag_len = self.tag.as_ref().map_or(0, |tag| 1 + tag.as_str().len());
        let mut out = Vec::with_capacity(
            HEADER_LEN + tag_len + self.extents.len() * EXTENT_HEADER_LEN + data,
        );
        out.push(VERSION);
        let flag = |set: bool, bit: u8| if set { bit } else { 0 };
        out.push(
            flag(self.ends_on_barrier || self.tag.is_some(), FLAG_BARRIER)
                | flag(self.in_sync, FLAG_IN_SYNC)
                | flag(self.tag.is_some(), FLAG_TAGGED),
        );
        out.extend_from_slice(&count.to_le_bytes());
        if let Some(tag) = &self.tag {
            out.push(tag.len_byte());
            out.extend_from_slice(tag.as_str().as_bytes());
        }
        for extent in &self.extents {
            let (kind, offset, len) = match extent {
                Extent::Data { offset, data } => (KIND_DATA, *offset, data.len() as u64),
                Extent::Zero { offset, len } => (KIND_ZERO, *offset, *len),
            };
            out.push(kind);
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            if let Extent::Data { data, .. } = extent {
                out.extend_from_slice(data);
            }
        }
        out
    }

    /// Reads a payload made by [`Batch::encode`] for the records
    /// `first_seq..=last_seq`. Everything is checked: version, flags, the tag
    /// (a tagged batch ends on a barrier; the tag is a valid [`Tag`]), the
    /// extent count and every length against the bytes left, extent kinds,
    /// that extents are non-empty, sorted and non-overlapping, and that
    /// nothing follows the last one. An accepted payload re-encodes to itself.
    /// Data extents are slices of `payload`: nothing is copied.
    pub fn decode(payload: Bytes, first_seq: u64, last_seq: u64) -> Result<Batch, BatchError> {
        if first_seq > last_seq {
            return Err(BatchError::SeqRange {
                first_seq,
                last_seq,
            });
        }
        let mut r = Reader {
            payload: &payload,
            pos: 0,
        };
        let at = r.pos;
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(BatchError::Version { at, version });
        }
        let at = r.pos;
        let flags = r.u8("flags")?;
        if flags & !(FLAG_BARRIER | FLAG_IN_SYNC | FLAG_TAGGED) != 0 {
            return Err(BatchError::Flags { at, flags });
        }
        if flags & FLAG_TAGGED != 0 && flags & FLAG_BARRIER == 0 {
            return Err(BatchError::TagWithoutBarrier { at, flags });
        }
        let count_at = r.pos;
        let count = r.u32("extent count")?;
        let tag = if flags & FLAG_TAGGED != 0 {
            let at = r.pos;
            let len = r.u8("tag length")?;
            let place = r.take(len.into(), "tag")?;
            let tag = Tag::from_bytes(&payload[place])
                .map_err(|source| BatchError::Tag { at, source })?;
            Some(tag)
        } else {
            None
        };
        if count as usize > r.remaining() / EXTENT_HEADER_LEN {
            return Err(BatchError::Count {
                at: count_at,
                count,
                available: r.remaining(),
            });
        }
        let mut parsed = Vec::with_capacity(count as usize);
        let mut previous_end = None;
        for index in 0..count {
            let at = r.pos;
            let kind = r.u8("extent kind")?;
            if kind != KIND_DATA && kind != KIND_ZERO {
                return Err(BatchError::Kind { index, at, kind });
            }
            let start = r.u64("extent offset")?;
            let len = r.u64("extent length")?;
            if len == 0 {
                return Err(BatchError::Empty { index, at });
            }
            let end = start.checked_add(len).ok_or(BatchError::Overflow {
                index,
                at,
                start,
                len,
            })?;
            if let Some(previous_end) = previous_end.filter(|&previous_end| start < previous_end) {
                return Err(BatchError::Unsorted {
                    index,
                    at,
                    start,
                    previous_end,
                });
            }
            previous_end = Some(end);
            parsed.push(if kind == KIND_DATA {
                (start, Parsed::Data(r.take(len, "extent data")?))
            } else {
                (start, Parsed::Zero(len))
            });
        }
        if r.remaining() > 0 {
            return Err(BatchError::Trailing {
                at: r.pos,
                count: r.remaining(),
            });
        }
        let extents = parsed
            .into_iter()
            .map(|(offset, parsed)| match parsed {
                Parsed::Data(place) => Extent::Data {
                    offset,
                    data: payload.slice(place),
                },
                Parsed::Zero(len) => Extent::Zero { offset, len },
            })
            .collect();
        Ok(Batch {
            first_seq,
            last_seq,
            ends_on_barrier: flags & FLAG_BARRIER != 0,
            in_sync: flags & FLAG_IN_SYNC != 0,
            tag,
            extents,
        })
    }

    /// Writes the batch into `image`: data extents with `pwrite`, zero
    /// extents with [`zero_range`] (a punched hole, or written zeros where
    /// holes are not supported). The image should already be as large as the
    /// disk: a punched hole does not grow the file. Does not fsync.
    pub fn apply(&self, image: &File) -> io::Result<()> {
        for extent in &self.extents {
            let result = match extent {
                Extent::Data { offset, data } => image.write_all_at(data, *offset),
                Extent::Zero { offset, len } => zero_range(image, *offset, *len),
            };
            result.map_err(|e| {
                let range = extent.range();
                io::Error::new(
                    e.kind(),
                    format!(
                        "applying batch {}..={}: bytes {}..{}: {e}",
                        self.first_seq, self.last_seq, range.start, range.end
                    ),
                )
            })?;
        }
        Ok(())
    }
}

/// A checked extent of a payload being decoded.
enum Parsed {
    /// Where its data is in the payload.
    Data(Range<usize>),
    Zero(u64),
}

/// Reads a payload front to back, reporting where it ran out.
struct Reader<'a> {
    payload: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.payload.len() - self.pos
    }

    /// The position range of the next `n` bytes, consumed.
    fn take(&mut self, n: u64, what: &'static str) -> Result<Range<usize>, BatchError> {
        let available = self.remaining();
        if n > available as u64 {
            return Err(BatchError::Truncated {
                what,
                at: self.pos,
                needed: n,
                available,
            });
        }
        let range = self.pos..self.pos + n as usize;
        self.pos = range.end;
        Ok(range)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], BatchError> {
        let range = self.take(N as u64, what)?;
        Ok(self.payload[range].try_into().expect("N bytes"))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, BatchError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, BatchError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, BatchError> {
        self.array(what).map(u64::from_le_bytes)
    }
}

/// What the builder holds for one extent, keyed by its offset.
#[derive(Debug)]
enum Piece {
    Data(Bytes),
    Zero(u64),
}

impl Piece {
    fn len(&self) -> u64 {
        match self {
            Piece::Data(data) => data.len() as u64,
            Piece::Zero(len) => *len,
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Piece::Data(data) => data.len(),
            Piece::Zero(_) => 0,
        }
    }

    /// The part `range` (relative to the piece's start); data is sliced, not copied.
    fn slice(&self, range: Range<u64>) -> Piece {
        match self {
            Piece::Data(data) => Piece::Data(data.slice(range.start as usize..range.end as usize)),
            Piece::Zero(_) => Piece::Zero(range.end - range.start),
        }
    }
}

/// Accumulates consecutive records into a [`Batch`].
///
/// Extents live in a `BTreeMap` keyed by offset, never overlapping. A new
/// extent removes the older extents it covers and trims the (at most two) it
/// overlaps partly, slicing their `Bytes` without copying, so a push costs
/// O(log n) per extent it touches. Adjacent zero extents are merged; adjacent
/// data extents are left as they are.
///
/// Memory: [`BatchBuilder::data_bytes`] counts the bytes of data held. A
/// slice keeps the whole buffer it came from alive (the NBD layer's receive
/// buffer, or a record later partly overwritten), so the memory really held
/// can exceed it when most of a buffer was overwritten within the batch.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    extents: BTreeMap<u64, Piece>,
    /// First and last sequence number pushed since the last take.
    seqs: Option<(u64, u64)>,
    ends_on_barrier: bool,
    /// The tag of the last record pushed, if it was a tagged barrier.
    tag: Option<Tag>,
    data_bytes: usize,
}

impl BatchBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next record. Records must come in sequence order without
    /// gaps (as a `CaptureReceiver` hands them out); a gap panics, because a
    /// batch claiming records it does not hold would corrupt the target.
    pub fn push(&mut self, record: &Record) {
        match &mut self.seqs {
            None => self.seqs = Some((record.seq, record.seq)),
            Some((_, last)) => {
                assert_eq!(
                    record.seq,
                    *last + 1,
                    "capture records must be pushed in sequence without gaps"
                );
                *last = record.seq;
            }
        }
        self.ends_on_barrier = record.is_barrier();
        self.tag = record.tag();
        match record.kind {
            RecordKind::Write if record.data.is_empty() => {}
            RecordKind::Write if is_all_zero(&record.data) => {
                self.insert(record.offset, Piece::Zero(record.data.len() as u64));
            }
            RecordKind::Write => self.insert(record.offset, Piece::Data(record.data.clone())),
            RecordKind::Trim | RecordKind::Zero if record.len > 0 => {
                self.insert(record.offset, Piece::Zero(record.len));
            }
            RecordKind::Trim | RecordKind::Zero | RecordKind::Flush | RecordKind::Tag => {}
        }
    }

    /// No record was pushed since the last take.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_none()
    }

    /// Bytes of data held in data extents (overwritten data is not counted).
    pub fn data_bytes(&self) -> usize {
        self.data_bytes
    }

    /// Extents held (data and zero).
    pub fn extent_count(&self) -> usize {
        self.extents.len()
    }

    /// The batch of the records pushed since the last take, if any; the
    /// builder starts over empty.
    pub fn take(&mut self) -> Option<Batch> {
        let (first_seq, last_seq) = self.seqs?;
        let taken = std::mem::take(self);
        Some(Batch {
            first_seq,
            last_seq,
            ends_on_barrier: taken.ends_on_barrier,
            in_sync: false,
            tag: taken.tag,
            extents: taken
                .extents
                .into_iter()
                .map(|(offset, piece)| match piece {
                    Piece::Data(data) => Extent::Data { offset, data },
                    Piece::Zero(len) => Extent::Zero { offset, len },
                })
                .collect(),
        })
    }

    /// Puts `piece` at `start`, over whatever older extents were there.
    fn insert(&mut self, start: u64, piece: Piece) {
        let end = start + piece.len();
        // An extent starting before `start` and reaching into the new one
        // keeps its head, and its tail if it reaches past `end`.
        let before = self.extents.range(..start).next_back();
        if let Some((&offset, old)) = before.filter(|&(&offset, old)| offset + old.len() > start) {
            let old_end = offset + old.len();
            let old = self.remove(offset);
            self.put(offset, old.slice(0..start - offset));
            if old_end > end {
                self.put(end, old.slice(end - offset..old_end - offset));
            }
        }
        // Extents starting inside the new one go, except a tail past `end`.
        while let Some(offset) = self.extents.range(start..end).next().map(|(&k, _)| k) {
            let old = self.remove(offset);
            let old_end = offset + old.len();
            if old_end > end {
                self.put(end, old.slice(end - offset..old_end - offset));
            }
        }
        match piece {
            Piece::Zero(_) => self.put_zero(start, end),
            data => self.put(start, data),
        }
    }

    /// Puts zeros at `start..end` (free of extents), merged with zero extents
    /// that end at `start` or begin at `end`.
    fn put_zero(&mut self, mut start: u64, mut end: u64) {
        let before = self.extents.range(..start).next_back();
        if let Some((&offset, _)) = before
            .filter(|&(&offset, old)| matches!(old, Piece::Zero(len) if offset + len == start))
        {
            self.extents.remove(&offset);
            start = offset;
        }
        if let Some(&Piece::Zero(len)) = self.extents.get(&end) {
            self.extents.remove(&end);
            end += len;
        }
        self.extents.insert(start, Piece::Zero(end - start));
    }

    fn put(&mut self, offset: u64, piece: Piece) {
        self.data_bytes += piece.data_len();
        self.extents.insert(offset, piece);
    }

    fn remove(&mut self, offset: u64) -> Piece {
        let piece = self
            .extents
            .remove(&offset)
            .expect("removing an extent just found");
        self.data_bytes -= piece.data_len();
        piece
    }
}

/// Whether every byte is zero; looks at a page at a time so that ordinary
/// data is told apart after its first page.
fn is_all_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|page| page.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests;
