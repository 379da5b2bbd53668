//! Reading a journal back: lists its segments, verifies every header and
//! entry in order, rebuilds the restore points (and reads the tags of tagged
//! ones), and tells a torn tail from
//! corruption. It only reads; what to do with a torn tail is the opener's
//! business.
//!
//! A torn tail is what a crash while appending leaves at the end of the
//! newest segment, and only there (an entry is acknowledged only once it is
//! fdatasynced, and nothing is written after an entry until then):
//! - a segment header cut short, or damaged in a segment holding nothing
//!   else (a crash while creating the segment);
//! - an entry header or body cut short by the end of the file;
//! - a final entry whose body CRC fails and which ends at the end of the file;
//! - a damaged entry header (bad magic or CRC) with no intact later entry
//!   anywhere after it in the file. An intact later entry proves the damaged
//!   one was acknowledged, so that is corruption, whatever its length field.
//!
//! Anything else that fails, in any segment, is corruption.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use filter::capture::Tag;

use super::files::io_err;
use super::{JournalError, RestorePoint, TornCause};
use crate::format::{
    decode_first_segment, decode_tag_field, parse_segment_file_name, EntryHeader, SegmentHeader,
    ENTRY_HEADER_LEN, ENTRY_MAGIC, FIRST_SEGMENT_FILE, SEGMENT_HEADER_LEN, TAG_FIELD_MAX,
};

/// Bodies are read in pieces of this size to check their CRC.
const CHUNK: usize = 1 << 20;

/// The disk a journal belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Identity {
    pub id: [u8; 16],
    pub size: u64,
}

/// A segment file with a complete header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Segment {
    pub number: u64,
    pub path: PathBuf,
    /// Bytes in the file.
    pub len: u64,
}

/// Where a torn tail starts, in the newest segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Torn {
    pub path: PathBuf,
    pub offset: u64,
    pub file_len: u64,
    pub cause: TornCause,
}

/// A verified journal.
#[derive(Debug)]
pub(super) struct Scan {
    /// `None` only when no segment has a complete header.
    pub identity: Option<Identity>,
    /// Segments with a complete header, oldest first; a segment whose header
    /// is torn is not among them.
    pub segments: Vec<Segment>,
    pub points: Vec<RestorePoint>,
    /// The tags of the tagged points, by entry id.
    pub tags: BTreeMap<u64, Tag>,
    pub torn: Option<Torn>,
    /// Segment files below the journal's first: see [`SegmentFiles`].
    pub leftover: Vec<PathBuf>,
}

/// Verifies the journal in `dir`. With `expected`, every segment must be of
/// that disk; without, of the disk the first segment names.
pub(super) fn scan(
    dir: &Path,
    expected: Option<Identity>,
    bodies: Bodies,
) -> Result<Scan, JournalError> {
    let SegmentFiles {
        live: files,
        leftover,
    } = list_segments(dir)?;
    let mut scanner = Scanner {
        bodies,
        identity: expected,
        next_id: 0,
        last_seq: None,
        points: Vec::new(),
        tags: BTreeMap::new(),
        buf: Vec::new(),
    };
    let count = files.len();
    let mut segments = Vec::with_capacity(count);
    let mut torn = None;
    for (i, (number, path)) in files.into_iter().enumerate() {
        let newest = i + 1 == count;
        let file = File::open(&path).map_err(io_err(&path, "open segment", 0))?;
        let len = file
            .metadata()
            .map_err(io_err(&path, "stat segment", 0))?
            .len();
        let segment = SegmentScan {
            file,
            path,
            number,
            len,
            newest,
        };
        torn = scanner.segment(&segment)?.map(|(offset, cause)| Torn {
            path: segment.path.clone(),
            offset,
            file_len: len,
            cause,
        });
        // A segment whose header is torn holds nothing: it is not one.
        if torn
            .as_ref()
            .is_none_or(|t| t.cause != TornCause::SegmentHeader)
        {
            segments.push(Segment {
                number,
                path: segment.path,
                len,
            });
        }
    }
    Ok(Scan {
        identity: scanner.identity,
        segments,
        points: scanner.points,
        tags: scanner.tags,
        torn,
        leftover,
    })
}

/// The segment files of a journal directory. Files that do not name a
/// segment are ignored.
pub(super) struct SegmentFiles {
    /// The journal's segments in order, numbered without a gap from 1, or
    /// from the first one short-term retention kept.
    pub live: Vec<(u64, PathBuf)>,
    /// Segments numbered below that first one: what a crash left while
    /// retention removed them. No longer part of the journal.
    pub leftover: Vec<PathBuf>,
}

pub(super) fn list_segments(dir: &Path) -> Result<SegmentFiles, JournalError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir, "list directory", 0))? {
        let entry = entry.map_err(io_err(dir, "list directory", 0))?;
        let name = entry.file_name();
        if let Some(number) = name.to_str().and_then(parse_segment_file_name) {
            found.push((number, entry.path()));
        }
    }
    found.sort_unstable();
    let first = retained_from(dir)?;
    let live = found.split_off(found.partition_point(|(number, _)| *number < first));
    let leftover = found.into_iter().map(|(_, path)| path).collect();
    for (expected, (number, path)) in (first..).zip(&live) {
        if *number != expected {
            return Err(JournalError::SegmentGap {
                path: path.clone(),
                expected,
            });
        }
    }
    Ok(SegmentFiles { live, leftover })
}

/// The number the journal's segments start at: 1, or what short-term
/// retention recorded in `first-segment`.
fn retained_from(dir: &Path) -> Result<u64, JournalError> {
    let path = dir.join(FIRST_SEGMENT_FILE);
    match std::fs::read(&path) {
        Ok(raw) => decode_first_segment(&raw)
            .map_err(|source| JournalError::SegmentHeader { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(1),
        Err(e) => Err(io_err(&path, "read", 0)(e)),
    }
}

/// One segment file being scanned.
struct SegmentScan {
    file: File,
    path: PathBuf,
    number: u64,
    len: u64,
    newest: bool,
}

impl SegmentScan {
    /// `cause` if this is the newest segment, where a tail may be torn;
    /// elsewhere the same damage is corruption, `err`.
    fn torn_or(&self, cause: TornCause, err: JournalError) -> Result<TornCause, JournalError> {
        if self.newest {
            Ok(cause)
        } else {
            Err(err)
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64, op: &'static str) -> Result<(), JournalError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(io_err(&self.path, op, offset))
    }

    fn cut_short(&self, offset: u64, needed: u64) -> JournalError {
        JournalError::Truncated {
            path: self.path.clone(),
            offset,
            needed,
            available: self.len - offset,
        }
    }
}

/// Which entry bodies a scan reads to check their CRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Bodies {
    /// Every body.
    All,
    /// Only the newest segment's last entry (where a torn tail shows as a
    /// body CRC failure); the others are checked when read.
    Last,
}

/// What the scan has established so far, carried from segment to segment.
struct Scanner {
    bodies: Bodies,
    identity: Option<Identity>,
    /// The id the next entry must have; 0 (never an id) until the first
    /// segment header sets it.
    next_id: u64,
    last_seq: Option<u64>,
    points: Vec<RestorePoint>,
    tags: BTreeMap<u64, Tag>,
    buf: Vec<u8>,
}

impl Scanner {
    /// Verifies one segment and collects its points; returns where its torn
    /// tail starts, if it has one.
    fn segment(&mut self, seg: &SegmentScan) -> Result<Option<(u64, TornCause)>, JournalError> {
        let header_len = SEGMENT_HEADER_LEN as u64;
        if seg.len < header_len {
            let err = seg.cut_short(0, header_len);
            return seg
                .torn_or(TornCause::SegmentHeader, err)
                .map(|cause| Some((0, cause)));
        }
        let mut raw = [0u8; SEGMENT_HEADER_LEN];
        seg.read_at(&mut raw, 0, "read segment header")?;
        let header = match SegmentHeader::decode(&raw) {
            Ok(header) => header,
            Err(source) if source.is_damage() && seg.len == header_len => {
                let err = JournalError::SegmentHeader {
                    path: seg.path.clone(),
                    source,
                };
                return seg
                    .torn_or(TornCause::SegmentHeader, err)
                    .map(|cause| Some((0, cause)));
            }
            Err(source) => {
                return Err(JournalError::SegmentHeader {
                    path: seg.path.clone(),
                    source,
                })
            }
        };
        self.check_segment_header(seg, &header)?;
        let mut offset = header_len;
        while offset < seg.len {
            match self.entry(seg, offset)? {
                Step::Next(len) => offset += len,
                Step::Torn(cause) => return Ok(Some((offset, cause))),
            }
        }
        Ok(None)
    }

    fn check_segment_header(
        &mut self,
        seg: &SegmentScan,
        header: &SegmentHeader,
    ) -> Result<(), JournalError> {
        let found = Identity {
            id: header.disk_id,
            size: header.disk_size,
        };
        let expected = *self.identity.get_or_insert(found);
        if found != expected {
            return Err(JournalError::OtherDisk {
                path: seg.path.clone(),
                expected_id: expected.id,
                expected_size: expected.size,
                found_id: found.id,
                found_size: found.size,
            });
        }
        if header.number != seg.number {
            return Err(JournalError::SegmentNumber {
                path: seg.path.clone(),
                expected: seg.number,
                found: header.number,
            });
        }
        // The oldest segment retained starts the ids; the rest continue them.
        if self.next_id == 0 {
            self.next_id = header.first_entry_id;
        }
        let expected = self.next_id;
        if header.first_entry_id != expected {
            return Err(JournalError::FirstEntryId {
                path: seg.path.clone(),
                expected,
                found: header.first_entry_id,
            });
        }
        Ok(())
    }

    /// Verifies the entry at `offset`.
    fn entry(&mut self, seg: &SegmentScan, offset: u64) -> Result<Step, JournalError> {
        let available = seg.len - offset;
        if available < ENTRY_HEADER_LEN as u64 {
            let err = seg.cut_short(offset, ENTRY_HEADER_LEN as u64);
            return seg.torn_or(TornCause::EntryHeaderCut, err).map(Step::Torn);
        }
        let mut raw = [0u8; ENTRY_HEADER_LEN];
        seg.read_at(&mut raw, offset, "read entry header")?;
        let header = match EntryHeader::decode(&raw) {
            Ok(header) => header,
            Err(source) => {
                let torn =
                    seg.newest && source.is_damage() && !self.later_entry_after(seg, offset + 1)?;
                if torn {
                    return Ok(Step::Torn(TornCause::EntryHeaderDamaged));
                }
                return Err(JournalError::EntryHeader {
                    path: seg.path.clone(),
                    offset,
                    source,
                });
            }
        };
        self.check_order(seg, offset, &header)?;
        let len = header.entry_len();
        if len > available {
            let err = seg.cut_short(offset, len);
            return seg.torn_or(TornCause::BodyCut, err).map(Step::Torn);
        }
        let last = seg.newest && len == available;
        let computed = if self.bodies == Bodies::All || last {
            self.body_crc(seg, offset + ENTRY_HEADER_LEN as u64, header.body_len)?
        } else {
            header.body_crc
        };
        if computed != header.body_crc {
            let err = JournalError::BodyCrc {
                path: seg.path.clone(),
                offset,
                id: header.id,
                stored: header.body_crc,
                computed,
            };
            if len == available {
                return seg.torn_or(TornCause::BodyCrc, err).map(Step::Torn);
            }
            return Err(err);
        }
        if header.tagged {
            let tag = self.tag(seg, offset, &header)?;
            self.tags.insert(header.id, tag);
        }
        self.points
            .push(RestorePoint::new(&header, seg.number, offset));
        self.next_id += 1;
        self.last_seq = Some(header.last_seq);
        Ok(Step::Next(len))
    }

    fn check_order(
        &self,
        seg: &SegmentScan,
        offset: u64,
        header: &EntryHeader,
    ) -> Result<(), JournalError> {
        if header.id != self.next_id {
            return Err(JournalError::EntryId {
                path: seg.path.clone(),
                offset,
                expected: self.next_id,
                found: header.id,
            });
        }
        if let Some(last) = self.last_seq {
            if last.checked_add(1) != Some(header.first_seq) {
                return Err(JournalError::SeqGap {
                    path: seg.path.clone(),
                    offset,
                    expected: last.saturating_add(1),
                    found: header.first_seq,
                });
            }
        }
        Ok(())
    }

    /// The tag at the start of a tagged entry's body, checked against the
    /// header's tag CRC: a bad one is corruption, never a torn tail (a torn
    /// final entry fails its body CRC first).
    fn tag(
        &self,
        seg: &SegmentScan,
        offset: u64,
        header: &EntryHeader,
    ) -> Result<Tag, JournalError> {
        let mut start = vec![0u8; TAG_FIELD_MAX.min(header.body_len as usize)];
        seg.read_at(
            &mut start,
            offset + ENTRY_HEADER_LEN as u64,
            "read entry tag",
        )?;
        decode_tag_field(&start, header.tag_crc)
            .map(|(tag, _)| tag)
            .map_err(|source| JournalError::TagField {
                path: seg.path.clone(),
                offset,
                id: header.id,
                source,
            })
    }

    fn body_crc(&mut self, seg: &SegmentScan, offset: u64, len: u32) -> Result<u32, JournalError> {
        let len = u64::from(len);
        self.buf.resize(CHUNK, 0);
        let mut crc = 0;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            seg.read_at(&mut self.buf[..n], offset + done, "read entry body")?;
            crc = crc32c::crc32c_append(crc, &self.buf[..n]);
            done += n as u64;
        }
        Ok(crc)
    }

    /// Whether an intact entry header with an id the journal has not reached
    /// yet starts anywhere from `from` on: proof that what lies before it was
    /// acknowledged, so is no torn tail.
    fn later_entry_after(&mut self, seg: &SegmentScan, from: u64) -> Result<bool, JournalError> {
        let header_len = ENTRY_HEADER_LEN as u64;
        let magic = ENTRY_MAGIC.to_le_bytes();
        self.buf.resize(CHUNK, 0);
        let mut pos = from;
        while pos + header_len <= seg.len {
            let n = (seg.len - pos).min(CHUNK as u64) as usize;
            let chunk = &mut self.buf[..n];
            seg.read_at(chunk, pos, "search for a later entry")?;
            for at in 0..=n - ENTRY_HEADER_LEN {
                if chunk[at..at + 4] != magic {
                    continue;
                }
                let raw = chunk[at..at + ENTRY_HEADER_LEN]
                    .try_into()
                    .expect("64 bytes");
                if EntryHeader::decode(raw).is_ok_and(|h| h.id > self.next_id) {
                    return Ok(true);
                }
            }
            // The next chunk starts just after the last position checked.
            pos += (n - ENTRY_HEADER_LEN + 1) as u64;
        }
        Ok(false)
    }
}

/// How scanning an entry ended.
enum Step {
    /// A good entry of this many bytes.
    Next(u64),
    /// The torn tail starts here.
    Torn(TornCause),
}
