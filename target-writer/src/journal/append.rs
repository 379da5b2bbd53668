//! Appending: checks that a batch continues the journal, writes its entry
//! (a tagged batch's tag first in the body), rolls to a new segment when the
//! newest is full, and makes every step durable before it returns. Also the
//! writer's other change, removing old segments (short-term retention).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use super::files::{self, io_err};
use super::scan::Segment;
use super::{BatchMeta, Journal, JournalError, RestorePoint};
use crate::format::{
    encode_tag_field, segment_file_name, EntryHeader, SegmentHeader, ENTRY_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};

/// The writing side of a journal opened for appending.
#[derive(Debug)]
pub(super) struct Writer {
    /// The locked journal directory.
    dir_handle: File,
    /// The newest segment.
    file: File,
    /// Where an append failed; the journal takes no more until reopened.
    failed: Option<(PathBuf, u64)>,
    segment_size: u64,
}

impl Writer {
    /// `dir_handle` is the locked journal directory, `file` the newest
    /// segment, open for writing.
    pub(super) fn new(dir_handle: File, file: File, segment_size: u64) -> Self {
        Writer {
            dir_handle,
            file,
            failed: None,
            segment_size,
        }
    }
}

impl Journal {
    /// Appends one batch as a new restore point and makes it durable
    /// (fdatasync) before returning. The batch must continue the journal's
    /// sequence: its first seq is one past the journal's last. `body` is
    /// the session salt and frame; a tagged batch's tag goes before it. After
    /// an I/O error the journal refuses further appends until reopened.
    pub fn append(&mut self, batch: BatchMeta, body: &[u8]) -> Result<RestorePoint, JournalError> {
        let segment_size = self.writer()?.segment_size;
        let tag_field = batch.tag.as_ref().map(encode_tag_field).unwrap_or_default();
        let header = self.entry_header(&batch, &tag_field, body)?;
        let newest = self.newest();
        let has_entries = newest.len > SEGMENT_HEADER_LEN as u64;
        if has_entries && newest.len.saturating_add(header.entry_len()) > segment_size {
            self.roll(header.id)?;
        }
        let point = self.write_entry(&header, &tag_field, body)?;
        if let Some(tag) = batch.tag {
            self.tags.insert(point.id, tag);
        }
        Ok(point)
    }

    /// Short-term retention: removes the oldest segments whose entries all
    /// have ids up to `up_to_id` (their content is in a long-term point) and
    /// were all received before `received_before_ns`. The segment holding
    /// the newest entry, and any after it, always stay. Returns how many
    /// segments went.
    pub fn remove_old_segments(
        &mut self,
        up_to_id: u64,
        received_before_ns: u64,
    ) -> Result<usize, JournalError> {
        let writer = self.writer()?;
        let keep_from = self.points.last().map_or(u64::MAX, |p| p.segment);
        let mut removable = 0;
        for segment in self.segments.iter().take_while(|s| s.number < keep_from) {
            let mut entries = self.points.iter().filter(|p| p.segment == segment.number);
            if !entries.all(|p| p.id <= up_to_id && p.received_time_ns < received_before_ns) {
                break;
            }
            removable += 1;
        }
        if removable == 0 {
            return Ok(0);
        }
        files::record_first_segment(
            &self.dir,
            &writer.dir_handle,
            self.segments[removable].number,
        )?;
        let paths = self.segments[..removable].iter().map(|s| s.path.as_path());
        files::remove(&self.dir, &writer.dir_handle, paths)?;
        let gone = self.segments[removable - 1].number;
        self.segments.drain(..removable);
        self.points.retain(|p| p.segment > gone);
        Ok(removable)
    }

    /// Whether an append failed, so that the journal takes no more until
    /// it is reopened (which cuts the failed entry off).
    pub fn append_failed(&self) -> bool {
        matches!(
            &self.writer,
            Some(Writer {
                failed: Some(_),
                ..
            })
        )
    }

    /// The writer, if the journal takes appends.
    fn writer(&self) -> Result<&Writer, JournalError> {
        match &self.writer {
            None => Err(JournalError::ReadOnly {
                path: self.dir.clone(),
            }),
            Some(Writer {
                failed: Some((path, offset)),
                ..
            }) => Err(JournalError::Failed {
                path: path.clone(),
                offset: *offset,
            }),
            Some(writer) => Ok(writer),
        }
    }

    fn newest(&self) -> &Segment {
        self.segments.last().expect("an open journal has a segment")
    }

    /// The header for `batch`, whose body is `tag_field` then `body`, once
    /// it is known to continue the journal.
    fn entry_header(
        &self,
        batch: &BatchMeta,
        tag_field: &[u8],
        body: &[u8],
    ) -> Result<EntryHeader, JournalError> {
        if batch.first_seq > batch.last_seq {
            return Err(JournalError::SeqRange {
                first_seq: batch.first_seq,
                last_seq: batch.last_seq,
            });
        }
        if let Some(last) = self.last_seq() {
            if last.checked_add(1) != Some(batch.first_seq) {
                return Err(JournalError::NotContiguous {
                    first_seq: batch.first_seq,
                    last_seq: batch.last_seq,
                    journal_last_seq: last,
                });
            }
        }
        let len = tag_field.len() + body.len();
        let body_len = u32::try_from(len).map_err(|_| JournalError::BodyTooLarge { len })?;
        Ok(EntryHeader {
            ends_on_barrier: batch.ends_on_barrier,
            in_sync: batch.in_sync,
            tagged: batch.tag.is_some(),
            id: self.points.last().map_or(1, |p| p.id + 1),
            first_seq: batch.first_seq,
            last_seq: batch.last_seq,
            point_time_ns: batch.point_time_ns,
            received_time_ns: now_ns(),
            body_len,
            body_crc: crc32c::crc32c_append(crc32c::crc32c(tag_field), body),
            tag_crc: if tag_field.is_empty() {
                0
            } else {
                crc32c::crc32c(tag_field)
            },
        })
    }

    /// Starts the next segment, whose first entry will be `first_entry_id`.
    fn roll(&mut self, first_entry_id: u64) -> Result<(), JournalError> {
        let number = self.newest().number + 1;
        let header = SegmentHeader {
            disk_id: self.identity.id,
            disk_size: self.identity.size,
            number,
            first_entry_id,
        };
        let writer = self.writer.as_mut().expect("checked writable");
        match files::create_segment(&self.dir, &writer.dir_handle, &header) {
            Ok((path, file)) => {
                writer.file = file;
                self.segments.push(Segment {
                    number,
                    path,
                    len: SEGMENT_HEADER_LEN as u64,
                });
                Ok(())
            }
            Err(err) => {
                let path = self.dir.join(segment_file_name(number));
                writer.failed = Some((path, 0));
                Err(err)
            }
        }
    }

    fn write_entry(
        &mut self,
        header: &EntryHeader,
        tag_field: &[u8],
        body: &[u8],
    ) -> Result<RestorePoint, JournalError> {
        let writer = self.writer.as_mut().expect("checked writable");
        let seg = self
            .segments
            .last_mut()
            .expect("an open journal has a segment");
        let offset = seg.len;
        let body_at = offset + ENTRY_HEADER_LEN as u64;
        let written = writer
            .file
            .write_all_at(&header.encode(), offset)
            .and_then(|()| writer.file.write_all_at(tag_field, body_at))
            .and_then(|()| {
                writer
                    .file
                    .write_all_at(body, body_at + tag_field.len() as u64)
            })
            .and_then(|()| writer.file.sync_data());
        if let Err(source) = written {
            writer.failed = Some((seg.path.clone(), offset));
            return Err(io_err(&seg.path, "append entry", offset)(source));
        }
        seg.len += header.entry_len();
        let point = RestorePoint::new(header, seg.number, offset);
        self.points.push(point);
        Ok(point)
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
