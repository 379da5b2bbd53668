//! The journal of one protected disk: what the target has received, one entry
//! per replicated batch, each entry a restore point. It owns `DIR/journal/`,
//! a run of segment files (layout in [`crate::format`]) numbered from 1.
//!
//! [`Journal::append`] writes an entry and fdatasyncs it before returning, so
//! a batch is acknowledged only once it is durable; segments roll over at
//! [`JournalOptions::segment_size`]. [`Journal::open`] verifies every segment
//! (same disk, consecutive segment numbers and entry ids, contiguous sequence
//! ranges, every CRC), rebuilds the restore points and applies the
//! [`RecoveryMode`] to a torn tail (what a crash while appending leaves; see
//! `scan.rs`). A tagged entry (an application-consistent point) keeps its
//! tag in plaintext at the start of its body, so [`Journal::tag`] names it
//! without the key; [`Journal::read_body`] returns the body without it. Anything else that fails verification is corruption: an error
//! naming the segment and offset, never skipped. One writer at a time holds
//! the journal (an `flock` on its directory); [`Journal::open_read_only`]
//! takes no lock and changes nothing.
//!
//! Inside: `scan` reads and verifies segments and tells a torn tail from
//! corruption, `recovery` reports what was found, `append` is the writer,
//! `files` the durable file-system steps, `error` the errors.

mod append;
mod error;
mod files;
mod recovery;
mod scan;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::{Buf, Bytes, BytesMut};
use filter::capture::Tag;

pub use error::JournalError;
pub use recovery::{RecoveryReport, TornCause, TornTail};

use crate::format::{
    decode_tag_field, EntryHeader, SegmentHeader, ENTRY_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use append::Writer;
use files::io_err;
use recovery::torn_tail;
use scan::{Bodies, Identity, Scan, Segment};

/// The journal's directory inside the target's directory for a disk.
pub const JOURNAL_DIR: &str = "journal";
/// Default size at which a segment rolls over: 64 MiB.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;

/// What [`Journal::open`] does with a torn tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// Truncate it, with a warning, and say so in the [`RecoveryReport`].
    #[default]
    TolerateTornTail,
    /// Refuse to open, as for any other damage.
    Strict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalOptions {
    /// A segment rolls over when the next entry would take it past this many
    /// bytes. An entry too big for a fresh segment still goes in, alone.
    pub segment_size: u64,
    pub recovery: RecoveryMode,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            segment_size: DEFAULT_SEGMENT_SIZE,
            recovery: RecoveryMode::default(),
        }
    }
}

/// One journal entry: a replicated batch, the point in time it restores to,
/// and where its body lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestorePoint {
    pub id: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// When the source cut the batch, ns since the epoch (the source's clock).
    pub point_time_ns: u64,
    /// When the target journaled it, ns since the epoch (the target's clock).
    pub received_time_ns: u64,
    pub ends_on_barrier: bool,
    /// Cut during a full sync: restores of later points apply it, but it is
    /// not a consistent image by itself.
    pub in_sync: bool,
    /// An application-consistent point: [`Journal::tag`] names it.
    pub tagged: bool,
    /// Segment number.
    pub segment: u64,
    /// Offset of the entry header in the segment.
    pub offset: u64,
    pub body_len: u32,
}

impl RestorePoint {
    fn new(header: &EntryHeader, segment: u64, offset: u64) -> Self {
        RestorePoint {
            id: header.id,
            first_seq: header.first_seq,
            last_seq: header.last_seq,
            point_time_ns: header.point_time_ns,
            received_time_ns: header.received_time_ns,
            ends_on_barrier: header.ends_on_barrier,
            in_sync: header.in_sync,
            tagged: header.tagged,
            segment,
            offset,
            body_len: header.body_len,
        }
    }
}

/// The metadata of a batch to append; the journal adds the id and the
/// received time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchMeta {
    pub first_seq: u64,
    pub last_seq: u64,
    /// When the source cut the batch, ns since the epoch (the source's clock).
    pub point_time_ns: u64,
    /// The batch ends on a barrier (a flush or FUA write).
    pub ends_on_barrier: bool,
    /// The batch was cut before the source's full sync completed.
    pub in_sync: bool,
    /// The batch ends on a tagged barrier: an application-consistent point.
    pub tag: Option<Tag>,
}

/// An open journal: the index of its restore points and, unless read-only,
/// the writer.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    identity: Identity,
    segments: Vec<Segment>,
    points: Vec<RestorePoint>,
    /// The tags of the tagged points, by entry id.
    tags: BTreeMap<u64, Tag>,
    writer: Option<Writer>,
}

impl Journal {
    /// Opens the journal in `dir/journal` for appending, creating it if
    /// missing, for the disk `disk_id` of `disk_size` bytes.
    pub fn open(
        dir: &Path,
        disk_id: [u8; 16],
        disk_size: u64,
        options: JournalOptions,
    ) -> Result<(Journal, RecoveryReport), JournalError> {
        let jdir = dir.join(JOURNAL_DIR);
        if !jdir.is_dir() {
            std::fs::create_dir_all(&jdir).map_err(io_err(&jdir, "create directory", 0))?;
            let parent = File::open(dir).map_err(io_err(dir, "open directory", 0))?;
            files::sync_dir(dir, &parent)?;
        }
        let dir_handle = files::lock_dir(&jdir)?;
        let identity = Identity {
            id: disk_id,
            size: disk_size,
        };
        let Scan {
            mut segments,
            points,
            tags,
            torn,
            leftover,
            ..
        } = scan::scan(&jdir, Some(identity), Bodies::All)?;
        let mut report = RecoveryReport {
            segments: segments.len(),
            points: points.len(),
            torn_tail: None,
            leftover_segments_removed: leftover.len(),
        };
        if let Some(torn) = torn {
            if options.recovery == RecoveryMode::Strict {
                return Err(JournalError::TornTail {
                    path: torn.path,
                    offset: torn.offset,
                    cause: torn.cause,
                });
            }
            if torn.cause == TornCause::SegmentHeader {
                files::remove(&jdir, &dir_handle, [torn.path.as_path()])?;
            } else {
                files::truncate(&torn.path, torn.offset)?;
                if let Some(newest) = segments.last_mut() {
                    newest.len = torn.offset;
                }
            }
            report.torn_tail = Some(torn_tail(torn, true));
        }
        // After the strict check: a refused open changes nothing.
        if !leftover.is_empty() {
            tracing::info!(
                count = leftover.len(),
                dir = %jdir.display(),
                "removing segments an interrupted retention left behind"
            );
            files::remove(&jdir, &dir_handle, leftover.iter().map(PathBuf::as_path))?;
        }
        let file = match segments.last() {
            Some(newest) => files::open_for_append(&newest.path)?,
            None => {
                let header = SegmentHeader {
                    disk_id,
                    disk_size,
                    number: 1,
                    first_entry_id: 1,
                };
                let (path, file) = files::create_segment(&jdir, &dir_handle, &header)?;
                segments.push(Segment {
                    number: 1,
                    path,
                    len: SEGMENT_HEADER_LEN as u64,
                });
                file
            }
        };
        let journal = Journal {
            dir: jdir,
            identity,
            segments,
            points,
            tags,
            writer: Some(Writer::new(dir_handle, file, options.segment_size)),
        };
        Ok((journal, report))
    }

    /// Opens the journal in `dir/journal` for reading only, for tools:
    /// takes the disk from the first segment, verifies everything like
    /// [`Journal::open`], and reports a torn tail without cutting it off.
    pub fn open_read_only(dir: &Path) -> Result<(Journal, RecoveryReport), JournalError> {
        Self::open_reading(dir, Bodies::All)
    }

    /// As [`Journal::open_read_only`], but reads only the headers (and the
    /// newest entry's body, to tell a torn tail): fast however long the
    /// journal is. Every other body is verified when [`Journal::read_body`]
    /// reads it.
    pub fn open_index(dir: &Path) -> Result<(Journal, RecoveryReport), JournalError> {
        Self::open_reading(dir, Bodies::Last)
    }

    fn open_reading(dir: &Path, bodies: Bodies) -> Result<(Journal, RecoveryReport), JournalError> {
        let jdir = dir.join(JOURNAL_DIR);
        let Scan {
            identity,
            segments,
            points,
            tags,
            torn,
            ..
        } = scan::scan(&jdir, None, bodies)?;
        let identity = identity.ok_or_else(|| JournalError::Empty { path: jdir.clone() })?;
        let report = RecoveryReport {
            segments: segments.len(),
            points: points.len(),
            torn_tail: torn.map(|torn| torn_tail(torn, false)),
            leftover_segments_removed: 0,
        };
        let journal = Journal {
            dir: jdir,
            identity,
            segments,
            points,
            tags,
            writer: None,
        };
        Ok((journal, report))
    }

    /// The disk id and size of the journal in `dir`, from its first
    /// segment's header alone (no scan); `None` if `dir` holds no journal.
    /// A damaged header is reported as a full read-only open reports it.
    pub fn identity_of(dir: &Path) -> Result<Option<([u8; 16], u64)>, JournalError> {
        let jdir = dir.join(JOURNAL_DIR);
        if !jdir.is_dir() {
            return Ok(None);
        }
        let Some((_, first)) = scan::list_segments(&jdir)?.live.into_iter().next() else {
            return Ok(None);
        };
        let mut raw = [0u8; SEGMENT_HEADER_LEN];
        let read = File::open(&first).and_then(|f| f.read_exact_at(&mut raw, 0));
        match read.ok().and_then(|()| SegmentHeader::decode(&raw).ok()) {
            Some(header) => Ok(Some((header.disk_id, header.disk_size))),
            None => Self::open_read_only(dir).map(|(j, _)| Some((j.disk_id(), j.disk_size()))),
        }
    }

    /// The restore points, oldest first.
    pub fn points(&self) -> &[RestorePoint] {
        &self.points
    }

    /// The tag of entry `id`, if it is a tagged point.
    pub fn tag(&self, id: u64) -> Option<&str> {
        self.tags.get(&id).map(Tag::as_str)
    }

    /// The last capture sequence number in the journal.
    pub fn last_seq(&self) -> Option<u64> {
        self.points.last().map(|p| p.last_seq)
    }

    pub fn disk_id(&self) -> [u8; 16] {
        self.identity.id
    }

    pub fn disk_size(&self) -> u64 {
        self.identity.size
    }

    /// Bytes in the segment files (a torn tail left by a read-only open
    /// included).
    pub fn bytes_on_disk(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// A read-only copy of the journal holding only the entries `ids`, for
    /// reading their bodies without holding the writer (the roll).
    pub fn read_only_slice(&self, ids: std::ops::RangeInclusive<u64>) -> Journal {
        Journal {
            dir: self.dir.clone(),
            identity: self.identity,
            segments: self.segments.clone(),
            points: self
                .points
                .iter()
                .filter(|p| ids.contains(&p.id))
                .copied()
                .collect(),
            tags: self
                .tags
                .iter()
                .filter(|(id, _)| ids.contains(id))
                .map(|(id, tag)| (*id, tag.clone()))
                .collect(),
            writer: None,
        }
    }

    /// Reads the body of `point` back from disk, verifying its header and
    /// body CRCs again: the session salt and the frame (a tagged entry's tag
    /// is left out).
    pub fn read_body(&self, point: &RestorePoint) -> Result<BytesMut, JournalError> {
        let first = self.points.first().map_or(1, |p| p.id);
        let stored = point
            .id
            .checked_sub(first)
            .and_then(|i| self.points.get(usize::try_from(i).ok()?))
            .filter(|p| *p == point)
            .ok_or(JournalError::UnknownPoint { id: point.id })?;
        let seg = self
            .segments
            .iter()
            .find(|s| s.number == stored.segment)
            .expect("every point lies in a segment of the journal");
        let (path, offset) = (&seg.path, stored.offset);
        let file = File::open(path).map_err(io_err(path, "open segment", offset))?;
        let mut raw = [0u8; ENTRY_HEADER_LEN];
        file.read_exact_at(&mut raw, offset)
            .map_err(io_err(path, "read entry header", offset))?;
        let header = EntryHeader::decode(&raw).map_err(|source| JournalError::EntryHeader {
            path: path.clone(),
            offset,
            source,
        })?;
        if RestorePoint::new(&header, seg.number, offset) != *stored {
            return Err(JournalError::Changed {
                path: path.clone(),
                offset,
                id: stored.id,
            });
        }
        let mut body = read_fresh(
            &file,
            header.body_len as usize,
            offset + ENTRY_HEADER_LEN as u64,
        )
        .map_err(io_err(path, "read entry body", offset))?;
        let computed = crc32c::crc32c(&body);
        if computed != header.body_crc {
            return Err(JournalError::BodyCrc {
                path: path.clone(),
                offset,
                id: header.id,
                stored: header.body_crc,
                computed,
            });
        }
        if header.tagged {
            let (_, field_len) = decode_tag_field(&body, header.tag_crc).map_err(|source| {
                JournalError::TagField {
                    path: path.clone(),
                    offset,
                    id: header.id,
                    source,
                }
            })?;
            body.advance(field_len);
        }
        Ok(body)
    }
}

/// `len` bytes of `file` from `offset`, read into fresh memory that is not
/// zeroed first: a body is up to a batch long, and zeroing it would cost as
/// much as reading it from the page cache.
fn read_fresh(file: &File, len: usize, offset: u64) -> std::io::Result<BytesMut> {
    use std::io::{Read, Seek, SeekFrom};
    let mut body = Vec::with_capacity(len);
    let mut file = file;
    file.seek(SeekFrom::Start(offset))?;
    file.take(len as u64).read_to_end(&mut body)?;
    if body.len() < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(BytesMut::from(Bytes::from(body)))
}
