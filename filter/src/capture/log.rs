//! The capture log: a local file holding the captured stream (layout in
//! [`super::format`]). [`LogWriter`] appends to it, [`LogReader`] reads and
//! verifies it, and [`replay`] applies it to an image.
//!
//! Recovery rule: a record cut short by the end of the file is a torn tail;
//! reopening for append truncates it, replay stops before it and says so. A
//! record that fails its CRC, or breaks the sequence, is corruption: it is
//! reported with path and offset and never skipped.
//!
//! Versions: new logs are written as version 2, which may hold tag records.
//! Opening a version 1 log for append rewrites its header as version 2
//! (a version 1 log is a valid version 2 log), so a tag never lands in a
//! file that says it cannot hold one.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::format::{
    FileHeader, HeaderError, RecordHeader, FILE_HEADER_LEN, RECORD_HEADER_LEN, TAG_VERSION, VERSION,
};
use super::record::{Record, RecordKind};
use super::tag::{Tag, TagError};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {op} at offset {offset}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("{path}: corrupt header at offset {offset}: {source}")]
    Header {
        path: PathBuf,
        offset: u64,
        #[source]
        source: HeaderError,
    },
    #[error("{path}: payload CRC mismatch in record seq {seq} at offset {offset}")]
    PayloadCrc {
        path: PathBuf,
        offset: u64,
        seq: u64,
    },
    #[error("{path}: sequence gap at offset {offset}: expected seq {expected}, found {found}")]
    SequenceGap {
        path: PathBuf,
        offset: u64,
        expected: u64,
        found: u64,
    },
    #[error("{path}: the log is of a {log} byte disk, but this disk has {disk} bytes")]
    DiskSizeMismatch { path: PathBuf, log: u64, disk: u64 },
    #[error("{path}: tag record seq {seq} at offset {offset} in a version {version} log (tags need version {TAG_VERSION})")]
    TagInOldLog {
        path: PathBuf,
        offset: u64,
        seq: u64,
        version: u32,
    },
    #[error("{path}: tag record seq {seq} at offset {offset}: {source}")]
    BadTag {
        path: PathBuf,
        offset: u64,
        seq: u64,
        #[source]
        source: TagError,
    },
    #[error("{path}: record at offset {offset} reaches past the end of the {disk_size} byte disk")]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        disk_size: u64,
    },
}

/// Wraps an I/O error with the file and what was being done where.
fn io_error(path: &Path, op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> LogError {
    let path = path.to_path_buf();
    move |source| LogError::Io {
        path,
        op,
        offset,
        source,
    }
}

/// Reads a capture log record by record, verifying each.
#[derive(Debug)]
pub struct LogReader {
    path: PathBuf,
    file: BufReader<File>,
    header: FileHeader,
    offset: u64,
    next_seq: u64,
    torn_tail: Option<u64>,
}

impl LogReader {
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let io_err = |op, offset| io_error(path, op, offset);
        let mut file = File::open(path).map_err(io_err("open", 0))?;
        let mut raw = [0u8; FILE_HEADER_LEN];
        file.read_exact(&mut raw)
            .map_err(io_err("read file header", 0))?;
        let header = FileHeader::decode(&raw).map_err(|source| LogError::Header {
            path: path.to_path_buf(),
            offset: 0,
            source,
        })?;
        Ok(LogReader {
            path: path.to_path_buf(),
            file: BufReader::with_capacity(1 << 20, file),
            header,
            offset: FILE_HEADER_LEN as u64,
            next_seq: header.first_seq,
            torn_tail: None,
        })
    }

    pub fn header(&self) -> FileHeader {
        self.header
    }

    /// Byte offset just past the last record read.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Sequence number the next record must have.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Where a torn tail starts, once reading has reached it.
    pub fn torn_tail(&self) -> Option<u64> {
        self.torn_tail
    }

    /// The next record; `Ok(None)` at the end of the log or at a torn tail.
    pub fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        if self.torn_tail.is_some() {
            return Ok(None);
        }
        let start = self.offset;
        let mut raw = [0u8; RECORD_HEADER_LEN];
        match read_full(&mut self.file, &mut raw) {
            Ok(0) => return Ok(None),
            Ok(n) if n < RECORD_HEADER_LEN => return self.torn(start),
            Ok(_) => {}
            Err(source) => return Err(self.io("read record header", start, source)),
        }
        let header = RecordHeader::decode(&raw).map_err(|source| LogError::Header {
            path: self.path.clone(),
            offset: start,
            source,
        })?;
        if header.seq != self.next_seq {
            return Err(LogError::SequenceGap {
                path: self.path.clone(),
                offset: start,
                expected: self.next_seq,
                found: header.seq,
            });
        }
        if header
            .offset
            .checked_add(header.len)
            .is_none_or(|end| end > self.header.disk_size)
        {
            return Err(LogError::OutOfRange {
                path: self.path.clone(),
                offset: start,
                disk_size: self.header.disk_size,
            });
        }
        let mut payload = vec![0u8; header.payload_len as usize];
        match read_full(&mut self.file, &mut payload) {
            Ok(n) if n < payload.len() => return self.torn(start),
            Ok(_) => {}
            Err(source) => return Err(self.io("read record payload", start, source)),
        }
        if crc32c::crc32c(&payload) != header.payload_crc {
            return Err(LogError::PayloadCrc {
                path: self.path.clone(),
                offset: start,
                seq: header.seq,
            });
        }
        if header.kind == RecordKind::Tag {
            self.check_tag(start, header.seq, &payload)?;
        }
        self.offset = start + (RECORD_HEADER_LEN + payload.len()) as u64;
        self.next_seq += 1;
        Ok(Some(Record {
            seq: header.seq,
            kind: header.kind,
            fua: header.fua,
            offset: header.offset,
            len: header.len,
            data: Bytes::from(payload),
        }))
    }

    /// A tag record must be in a log that may hold one and name a valid tag.
    fn check_tag(&self, offset: u64, seq: u64, payload: &[u8]) -> Result<(), LogError> {
        if self.header.version < TAG_VERSION {
            return Err(LogError::TagInOldLog {
                path: self.path.clone(),
                offset,
                seq,
                version: self.header.version,
            });
        }
        Tag::from_bytes(payload)
            .map(drop)
            .map_err(|source| LogError::BadTag {
                path: self.path.clone(),
                offset,
                seq,
                source,
            })
    }

    fn torn(&mut self, offset: u64) -> Result<Option<Record>, LogError> {
        self.torn_tail = Some(offset);
        Ok(None)
    }

    fn io(&self, op: &'static str, offset: u64, source: io::Error) -> LogError {
        io_error(&self.path, op, offset)(source)
    }
}

/// Reads until `buf` is full or the file ends; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Appends records to a capture log.
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    file: BufWriter<File>,
    offset: u64,
}

impl LogWriter {
    /// Opens the log at `path` for a disk of `disk_size` bytes, creating it if
    /// needed. An existing log is verified to its end (a torn tail is cut
    /// off) and must be of a disk of the same size. Returns the writer and
    /// the sequence number the next record must get.
    pub fn open(path: &Path, disk_size: u64) -> Result<(Self, u64), LogError> {
        let io_err = |op, offset| io_error(path, op, offset);
        let existing = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let (end, next_seq) = if existing == 0 {
            let mut file = File::create(path).map_err(io_err("create", 0))?;
            let header = FileHeader {
                version: VERSION,
                disk_size,
                first_seq: 0,
            };
            file.write_all(&header.encode())
                .map_err(io_err("write file header", 0))?;
            (FILE_HEADER_LEN as u64, 0)
        } else {
            let mut reader = LogReader::open(path)?;
            if reader.header().disk_size != disk_size {
                return Err(LogError::DiskSizeMismatch {
                    path: path.to_path_buf(),
                    log: reader.header().disk_size,
                    disk: disk_size,
                });
            }
            while reader.next_record()?.is_some() {}
            if let Some(torn) = reader.torn_tail() {
                tracing::warn!(
                    path = %path.display(),
                    offset = torn,
                    dropped_bytes = existing - torn,
                    "capture log ends in a torn record; truncating it"
                );
            }
            if reader.header().version < VERSION {
                upgrade(path, reader.header())?;
            }
            (reader.offset(), reader.next_seq())
        };
        let mut file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err("open", 0))?;
        file.set_len(end).map_err(io_err("truncate", end))?;
        file.seek(SeekFrom::Start(end))
            .map_err(io_err("seek", end))?;
        let writer = LogWriter {
            path: path.to_path_buf(),
            file: BufWriter::with_capacity(1 << 20, file),
            offset: end,
        };
        Ok((writer, next_seq))
    }

    pub fn append(&mut self, record: &Record) -> Result<(), LogError> {
        let header = RecordHeader {
            kind: record.kind,
            fua: record.fua,
            seq: record.seq,
            offset: record.offset,
            len: record.len,
            payload_len: record.data.len() as u32,
            payload_crc: crc32c::crc32c(&record.data),
        };
        let offset = self.offset;
        let result = self
            .file
            .write_all(&header.encode())
            .and_then(|()| self.file.write_all(&record.data));
        result.map_err(|source| self.io("append record", offset, source))?;
        self.offset += (RECORD_HEADER_LEN + record.data.len()) as u64;
        Ok(())
    }

    /// Hands buffered records to the kernel.
    pub fn flush(&mut self) -> Result<(), LogError> {
        let offset = self.offset;
        self.file
            .flush()
            .map_err(|source| self.io("flush", offset, source))
    }

    /// Flushes and fsyncs the log.
    pub fn close(mut self) -> Result<(), LogError> {
        self.flush()?;
        let offset = self.offset;
        self.file
            .get_ref()
            .sync_all()
            .map_err(|source| self.io("fsync", offset, source))
    }

    fn io(&self, op: &'static str, offset: u64, source: io::Error) -> LogError {
        io_error(&self.path, op, offset)(source)
    }
}

/// Rewrites the header of an older log at `path` as the current version,
/// durably, before anything is appended to it.
fn upgrade(path: &Path, old: FileHeader) -> Result<(), LogError> {
    let io_err = |op| io_error(path, op, 0);
    let header = FileHeader {
        version: VERSION,
        ..old
    };
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open"))?;
    file.write_all_at(&header.encode(), 0)
        .map_err(io_err("rewrite file header"))?;
    file.sync_data().map_err(io_err("fsync"))?;
    tracing::info!(path = %path.display(), from = old.version, to = VERSION, "capture log header upgraded");
    Ok(())
}

/// What [`replay`] applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplaySummary {
    pub records: u64,
    pub first_seq: u64,
    /// Sequence number after the last record applied.
    pub next_seq: u64,
    pub data_bytes: u64,
    /// Offset of a torn record at the end of the log, which was not applied.
    pub torn_tail: Option<u64>,
}

/// Applies the capture log at `log` to the image at `image` (created if
/// missing, grown to the disk's size if smaller) and fsyncs the image.
pub fn replay(log: &Path, image: &Path) -> Result<ReplaySummary, LogError> {
    let mut reader = LogReader::open(log)?;
    let disk_size = reader.header().disk_size;
    let io_err = |op, offset| io_error(image, op, offset);
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(image)
        .map_err(io_err("open image", 0))?;
    let image_len = out.metadata().map_err(io_err("stat image", 0))?.len();
    if image_len < disk_size {
        out.set_len(disk_size)
            .map_err(io_err("grow image", disk_size))?;
    }
    let mut summary = ReplaySummary {
        first_seq: reader.next_seq(),
        ..Default::default()
    };
    while let Some(record) = reader.next_record()? {
        match record.kind {
            RecordKind::Write => {
                out.write_all_at(&record.data, record.offset)
                    .map_err(io_err("write image", record.offset))?;
                summary.data_bytes += record.len;
            }
            RecordKind::Trim | RecordKind::Zero => {
                zero_range(&out, record.offset, record.len)
                    .map_err(io_err("zero image range", record.offset))?;
            }
            RecordKind::Flush | RecordKind::Tag => {}
        }
        summary.records += 1;
    }
    out.sync_all().map_err(io_err("fsync image", 0))?;
    summary.next_seq = reader.next_seq();
    summary.torn_tail = reader.torn_tail();
    Ok(summary)
}

/// Makes `[offset, offset + len)` of `file` read as zeros: a punched hole
/// where the file system allows it, written zeros where it does not.
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate only reads its integer arguments; the fd is open for
    // the duration of the call because `file` is borrowed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    let zeros = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, kind: RecordKind, offset: u64, data: &[u8], len: u64) -> Record {
        Record {
            seq,
            kind,
            fua: false,
            offset,
            len,
            data: Bytes::copy_from_slice(data),
        }
    }

    fn sample_log(dir: &Path) -> PathBuf {
        let path = dir.join("capture.log");
        let (mut writer, next) = LogWriter::open(&path, 1 << 20).unwrap();
        assert_eq!(next, 0);
        writer
            .append(&record(0, RecordKind::Write, 100, b"hello", 5))
            .unwrap();
        writer
            .append(&record(1, RecordKind::Zero, 101, b"", 2))
            .unwrap();
        writer
            .append(&record(2, RecordKind::Flush, 0, b"", 0))
            .unwrap();
        writer.close().unwrap();
        path
    }

    #[test]
    fn replay_applies_records_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = sample_log(dir.path());
        let image = dir.path().join("image");
        let summary = replay(&log, &image).unwrap();
        assert_eq!(
            (summary.records, summary.next_seq, summary.torn_tail),
            (3, 3, None)
        );
        let bytes = std::fs::read(&image).unwrap();
        assert_eq!(bytes.len(), 1 << 20);
        assert_eq!(&bytes[100..105], b"h\0\0lo");
    }

    #[test]
    fn reopening_continues_the_sequence_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = sample_log(dir.path());
        let good_len = std::fs::metadata(&log).unwrap().len();
        // A record header cut short, as a crash mid-append leaves it.
        let mut file = OpenOptions::new().append(true).open(&log).unwrap();
        file.write_all(&[0x43, 0x52, 0x45]).unwrap();
        drop(file);
        let (writer, next) = LogWriter::open(&log, 1 << 20).unwrap();
        assert_eq!(next, 3);
        writer.close().unwrap();
        assert_eq!(std::fs::metadata(&log).unwrap().len(), good_len);
    }

    #[test]
    fn a_flipped_payload_bit_is_reported_with_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let log = sample_log(dir.path());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&log)
            .unwrap();
        let at = (FILE_HEADER_LEN + RECORD_HEADER_LEN + 1) as u64;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 0x10], at).unwrap();
        let err = replay(&log, &dir.path().join("image")).unwrap_err();
        assert!(
            matches!(err, LogError::PayloadCrc { offset, seq: 0, .. } if offset == FILE_HEADER_LEN as u64),
            "{err}"
        );
    }

    /// Writes a record header and payload at the end of `log` as they are
    /// on disk, whatever they say.
    fn append_raw(log: &Path, header: RecordHeader, payload: &[u8]) {
        let mut file = OpenOptions::new().append(true).open(log).unwrap();
        file.write_all(&header.encode()).unwrap();
        file.write_all(payload).unwrap();
    }

    fn tag_header(seq: u64, payload: &[u8]) -> RecordHeader {
        RecordHeader {
            kind: RecordKind::Tag,
            fua: false,
            seq,
            offset: 0,
            len: 0,
            payload_len: payload.len() as u32,
            payload_crc: crc32c::crc32c(payload),
        }
    }

    #[test]
    fn tag_records_round_trip_and_replay_as_barriers() {
        let dir = tempfile::tempdir().unwrap();
        let log = sample_log(dir.path());
        let (mut writer, next) = LogWriter::open(&log, 1 << 20).unwrap();
        assert_eq!(next, 3);
        let tagged = record(3, RecordKind::Tag, 0, "vor dem Update".as_bytes(), 0);
        writer.append(&tagged).unwrap();
        writer
            .append(&record(4, RecordKind::Write, 0, b"x", 1))
            .unwrap();
        writer.close().unwrap();
        let mut reader = LogReader::open(&log).unwrap();
        assert_eq!(reader.header().version, VERSION);
        let records: Vec<Record> = std::iter::from_fn(|| reader.next_record().unwrap()).collect();
        assert_eq!(records[3], tagged);
        assert!(records[3].is_barrier());
        assert_eq!(
            records[3].tag().map(|t| t.to_string()).as_deref(),
            Some("vor dem Update")
        );
        let summary = replay(&log, &dir.path().join("image")).unwrap();
        assert_eq!(summary.next_seq, 5);
    }

    #[test]
    fn a_version_1_log_is_upgraded_when_opened_for_append() {
        let dir = tempfile::tempdir().unwrap();
        let log = sample_log(dir.path());
        let v1 = FileHeader {
            version: 1,
            disk_size: 1 << 20,
            first_seq: 0,
        };
        let file = OpenOptions::new().write(true).open(&log).unwrap();
        file.write_all_at(&v1.encode(), 0).unwrap();
        drop(file);
        // A tag in a version 1 log is refused, naming the record.
        let plain = dir.path().join("plain.log");
        std::fs::copy(&log, &plain).unwrap();
        append_raw(&plain, tag_header(3, b"t"), b"t");
        let err = replay(&plain, &dir.path().join("image")).unwrap_err();
        assert!(
            matches!(
                err,
                LogError::TagInOldLog {
                    seq: 3,
                    version: 1,
                    ..
                }
            ),
            "{err}"
        );
        // Opened for append, it becomes version 2 and keeps its records.
        let (mut writer, next) = LogWriter::open(&log, 1 << 20).unwrap();
        assert_eq!(next, 3);
        writer
            .append(&record(3, RecordKind::Tag, 0, b"t", 0))
            .unwrap();
        writer.close().unwrap();
        let reader = LogReader::open(&log).unwrap();
        assert_eq!(reader.header(), FileHeader { version: 2, ..v1 });
        assert_eq!(replay(&log, &dir.path().join("image")).unwrap().records, 4);
    }

    #[test]
    fn a_tag_record_naming_no_valid_tag_is_refused() {
        for payload in [&b"bad\xff"[..], b"line\nbreak"] {
            let dir = tempfile::tempdir().unwrap();
            let log = sample_log(dir.path());
            append_raw(&log, tag_header(3, payload), payload);
            let err = replay(&log, &dir.path().join("image")).unwrap_err();
            assert!(
                matches!(err, LogError::BadTag { seq: 3, .. }),
                "{payload:?}: {err}"
            );
        }
    }

    #[test]
    fn a_log_of_another_disk_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = sample_log(dir.path());
        let err = LogWriter::open(&log, 2 << 20).unwrap_err();
        assert!(matches!(err, LogError::DiskSizeMismatch { .. }), "{err}");
    }
}
