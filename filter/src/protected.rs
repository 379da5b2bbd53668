//! The protected disk: the [`BlockDevice`] the filter exports. Every change
//! goes to the backing disk first and then into the capture ring, and only
//! then is it acknowledged, so an acknowledged change is never missing from
//! the captured stream. Overlapping changes take turns (see
//! [`crate::range_lock`]), so the stream replays to the disk's exact bytes.
//! A tagged barrier ([`ProtectedDisk::tagged_barrier`]) marks an
//! application-consistent point in the stream.

use std::io;

use bytes::Bytes;

use crate::backing::Backing;
use crate::capture::{CaptureSender, RecordKind, Tag};
use crate::device::{BlockDevice, BlockSizes, DeviceError, Extent, FileRange, ZeroMode};
use crate::range_lock::RangeLock;

/// Largest read or write payload we accept (the protocol's recommended floor
/// for servers that want every client to work is 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Largest read [`ProtectedDisk::record_contents`] makes at once, so that
/// capturing a long range does not hold all of it in memory.
const CONTENTS_READ: u64 = 4 << 20;

#[derive(Debug)]
pub struct ProtectedDisk {
    backing: Backing,
    capture: CaptureSender,
    changes: RangeLock,
}

impl ProtectedDisk {
    pub fn new(backing: Backing, capture: CaptureSender) -> Self {
        ProtectedDisk {
            backing,
            capture,
            changes: RangeLock::default(),
        }
    }

    /// The sequence number the next captured record will get.
    pub fn next_seq(&self) -> u64 {
        self.capture.next_seq()
    }

    /// Copies `[offset, offset + len)` of the disk, as it is now, into the
    /// capture stream: the full sync. The range is locked like a write, so a
    /// client write to it lands either wholly before the read (and the read
    /// sees it) or wholly after the records (and has a higher sequence
    /// number): the stream stays exact.
    pub async fn capture_contents(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let (start, end) = self.backing.touched_range(offset, len);
        let _turn = self.changes.lock(start, end).await;
        self.record_contents(offset, len).await
    }

    /// Captures what `[offset, offset + len)` holds now, for a caller that
    /// holds its range lock: holes and all-zero 4 KiB blocks as `Zero`
    /// records, everything else as `Write` records, read at most
    /// [`CONTENTS_READ`] at a time.
    async fn record_contents(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let runs = self
                .backing
                .extents(pos, end - pos)
                .await
                .map_err(io_error("block status", offset, len))?;
            if runs.is_empty() {
                break;
            }
            for run in runs {
                if run.hole {
                    self.capture(RecordKind::Zero, false, pos, run.length, Bytes::new())
                        .await?;
                    pos += run.length;
                    continue;
                }
                let run_end = pos + run.length;
                while pos < run_end {
                    let step = (run_end - pos).min(CONTENTS_READ);
                    let data = self
                        .backing
                        .read(pos, step as usize)
                        .await
                        .map_err(io_error("read", offset, len))?;
                    self.record_read(pos, data).await?;
                    pos += step;
                }
            }
        }
        Ok(())
    }

    /// Captures `data`, read at `offset` under its range lock: all-zero
    /// 4 KiB blocks as `Zero` records, everything else as `Write` records.
    async fn record_read(&self, offset: u64, data: Bytes) -> Result<(), DeviceError> {
        for piece in split_zero_blocks(offset, data) {
            match piece {
                Piece::Data(at, data) => {
                    self.capture(RecordKind::Write, false, at, data.len() as u64, data)
                        .await?
                }
                Piece::Zero(at, len) => {
                    self.capture(RecordKind::Zero, false, at, len, Bytes::new())
                        .await?
                }
            }
        }
        Ok(())
    }

    /// Captures the chunks of `[offset, offset + len)` (at most
    /// [`CONTENTS_READ`]) that differ from a copy elsewhere: the seeded full
    /// sync. Reads the range under its range lock, as
    /// [`Self::capture_contents`] does, so the stream stays exact; `differs`
    /// (run on the blocking pool: it digests megabytes) says which of its
    /// `chunk`-byte chunks (the last may be shorter) to capture, and those
    /// are captured as they are now. Returns the bytes captured.
    pub async fn capture_differing(
        &self,
        offset: u64,
        len: u64,
        chunk: u64,
        differs: impl FnOnce(&[u8]) -> Vec<bool> + Send + 'static,
    ) -> Result<u64, DeviceError> {
        debug_assert!(len <= CONTENTS_READ && chunk > 0);
        let (start, end) = self.backing.touched_range(offset, len);
        let _turn = self.changes.lock(start, end).await;
        let data = self
            .backing
            .read(offset, len as usize)
            .await
            .map_err(io_error("read", offset, len))?;
        let read = data.clone();
        let picked = tokio::task::spawn_blocking(move || differs(&read))
            .await
            .map_err(|e| io_error("compare", offset, len)(io::Error::other(e)))?;
        let mut captured = 0;
        for (i, _) in picked.iter().enumerate().filter(|(_, differs)| **differs) {
            let from = (i as u64 * chunk).min(len);
            let to = (from + chunk).min(len);
            captured += to - from;
            self.record_read(offset + from, data.slice(from as usize..to as usize))
                .await?;
        }
        Ok(captured)
    }

    /// After a change failed (its range still locked): a failed write or
    /// zeroing may have changed part of its range (a short write on a full
    /// file system), and the client was not told which part. Capturing the
    /// range as it now is keeps the stream equal to the disk; the failure
    /// itself is the caller's to report.
    async fn record_after_failure(&self, op: &str, offset: u64, len: u64) {
        if let Err(e) = self.record_contents(offset, len).await {
            tracing::error!(
                op,
                offset,
                len,
                error = %e,
                "a failed change could not be read back: the captured stream may differ \
                 from the disk in this range until it is written again"
            );
        }
    }

    /// fdatasync of the backing disk: every change completed before the call
    /// is durable.
    async fn flush_backing(&self) -> Result<(), DeviceError> {
        self.backing.flush().await.map_err(io_error("flush", 0, 0))
    }

    /// Inserts an application-consistent point: flushes the backing disk
    /// (fdatasync, as an NBD FLUSH does), then captures a
    /// [`RecordKind::Tag`] barrier carrying `tag`, and returns its sequence
    /// number. Every change acknowledged before the call is durable on the
    /// backing disk and has a lower sequence number (capture rule 2:
    /// numbers are taken at push time, after those changes' pushes).
    pub async fn tagged_barrier(&self, tag: &Tag) -> Result<u64, DeviceError> {
        self.flush_backing().await?;
        let name = Bytes::copy_from_slice(tag.as_str().as_bytes());
        self.capture
            .send(RecordKind::Tag, false, 0, 0, name)
            .await
            .map_err(|_| DeviceError::CaptureStopped)
    }

    async fn capture(
        &self,
        kind: RecordKind,
        fua: bool,
        offset: u64,
        len: u64,
        data: Bytes,
    ) -> Result<(), DeviceError> {
        self.capture
            .send(kind, fua, offset, len, data)
            .await
            .map(drop)
            .map_err(|_| DeviceError::CaptureStopped)
    }

    /// Zeroes a range (TRIM and WRITE_ZEROES) and captures it as `kind`.
    async fn zero(
        &self,
        kind: RecordKind,
        offset: u64,
        len: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<(), DeviceError> {
        let (start, end) = self.backing.touched_range(offset, len);
        let _turn = self.changes.lock(start, end).await;
        let op = if kind == RecordKind::Trim {
            "trim"
        } else {
            "write zeroes"
        };
        let done = match self
            .backing
            .zero(offset, len, mode.keep_allocated, mode.fast_only)
            .await
        {
            Err(e) if mode.fast_only && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // Refused before anything was changed.
                return Err(DeviceError::SlowZero { offset, len });
            }
            Err(source) => Err(io_error(op, offset, len)(source)),
            Ok(()) if fua => self
                .backing
                .flush()
                .await
                .map_err(io_error("flush", offset, len)),
            Ok(()) => Ok(()),
        };
        if let Err(e) = done {
            self.record_after_failure(op, offset, len).await;
            return Err(e);
        }
        self.capture(kind, fua, offset, len, Bytes::new()).await
    }
}

impl BlockDevice for ProtectedDisk {
    fn size(&self) -> u64 {
        self.backing.size()
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            minimum: 1,
            preferred: 4096.max(self.backing.alignment() as u32),
            maximum_payload: MAX_PAYLOAD,
        }
    }

    fn write_is_quick(&self, offset: u64, len: u64, fua: bool) -> bool {
        self.backing.writes_via_fast_path(offset, len, fua)
    }

    fn cached_range(&self, offset: u64, len: u32) -> Option<FileRange> {
        self.backing.cached_range(offset, len as usize)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DeviceError> {
        self.backing
            .read(offset, len as usize)
            .await
            .map_err(io_error("read", offset, len.into()))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        let len = data.len() as u64;
        let (start, end) = self.backing.touched_range(offset, len);
        let _turn = self.changes.lock(start, end).await;
        if let Err(source) = self.backing.write(offset, data.clone(), fua).await {
            self.record_after_failure("write", offset, len).await;
            return Err(io_error("write", offset, len)(source));
        }
        self.capture(RecordKind::Write, fua, offset, len, data)
            .await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.flush_backing().await?;
        self.capture(RecordKind::Flush, false, 0, 0, Bytes::new())
            .await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        self.zero(RecordKind::Trim, offset, len, ZeroMode::default(), fua)
            .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<(), DeviceError> {
        self.zero(RecordKind::Zero, offset, len, mode, fua).await
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.backing
            .prefetch(offset, len)
            .map_err(io_error("cache", offset, len))
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        self.backing
            .extents(offset, len)
            .await
            .map_err(io_error("block status", offset, len))
    }
}

/// Makes an I/O error of `op` on `[offset, offset + len)` a device error.
fn io_error(op: &'static str, offset: u64, len: u64) -> impl FnOnce(io::Error) -> DeviceError {
    move |source| DeviceError::Io {
        op,
        offset,
        len,
        source,
    }
}

/// A run of a data extent: bytes to ship, or zeros not to.
#[derive(Debug, PartialEq, Eq)]
enum Piece {
    Data(u64, Bytes),
    Zero(u64, u64),
}

/// Splits `data` (read at `offset`) into runs of all-zero 4 KiB blocks and
/// runs of other blocks, slicing without copying.
fn split_zero_blocks(offset: u64, data: Bytes) -> Vec<Piece> {
    const BLOCK: usize = 4096;
    let mut pieces = Vec::new();
    let mut run_start = 0;
    let mut run_zero = None;
    let mut at = 0;
    while at < data.len() {
        let block_end = (at + BLOCK).min(data.len());
        let zero = data[at..block_end].iter().all(|&b| b == 0);
        if run_zero.is_some_and(|z| z != zero) {
            pieces.push(piece(offset, &data, run_start, at, run_zero == Some(true)));
            run_start = at;
        }
        run_zero = Some(zero);
        at = block_end;
    }
    if run_start < data.len() {
        pieces.push(piece(
            offset,
            &data,
            run_start,
            data.len(),
            run_zero == Some(true),
        ));
    }
    pieces
}

fn piece(offset: u64, data: &Bytes, start: usize, end: usize, zero: bool) -> Piece {
    let at = offset + start as u64;
    if zero {
        Piece::Zero(at, (end - start) as u64)
    } else {
        Piece::Data(at, data.slice(start..end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::BackingOptions;
    use crate::capture::{capture_ring, Record};

    #[test]
    fn a_tagged_barrier_follows_every_acknowledged_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(1 << 20))
            .unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (sender, mut receiver) = capture_ring(1 << 20, 40);
        runtime.block_on(async {
            let backing = Backing::open(&path, BackingOptions::default()).unwrap();
            let disk = ProtectedDisk::new(backing, sender);
            disk.write(4096, Bytes::from_static(b"before"), false)
                .await
                .unwrap();
            let tag = Tag::new("app-consistent").unwrap();
            assert_eq!(disk.tagged_barrier(&tag).await.unwrap(), 41);
            disk.write(0, Bytes::from_static(b"after"), false)
                .await
                .unwrap();
        });
        let records: Vec<Record> = std::iter::from_fn(|| receiver.recv()).collect();
        let kinds: Vec<_> = records.iter().map(|r| (r.seq, r.kind)).collect();
        assert_eq!(
            kinds,
            [
                (40, RecordKind::Write),
                (41, RecordKind::Tag),
                (42, RecordKind::Write)
            ]
        );
        assert!(records[1].is_barrier());
        assert_eq!(
            records[1].tag().map(|t| t.to_string()).as_deref(),
            Some("app-consistent")
        );
        assert_eq!(std::fs::read(&path).unwrap()[4096..4102], *b"before");
    }

    #[test]
    fn zero_blocks_are_split_out_without_copying() {
        let mut raw = vec![0u8; 5 * 4096 + 100];
        raw[4096] = 1;
        raw[3 * 4096 + 7] = 2;
        let data = Bytes::from(raw);
        let pieces = split_zero_blocks(1 << 20, data.clone());
        assert_eq!(
            pieces,
            vec![
                Piece::Zero(1 << 20, 4096),
                Piece::Data((1 << 20) + 4096, data.slice(4096..8192)),
                Piece::Zero((1 << 20) + 8192, 4096),
                Piece::Data((1 << 20) + 3 * 4096, data.slice(3 * 4096..4 * 4096)),
                Piece::Zero((1 << 20) + 4 * 4096, 4096 + 100),
            ]
        );
    }
}
