//! The scratch overlay of a writable serve (test failover): a sparse file the
//! size of the disk, created in the scratch directory and unlinked at once
//! (O_TMPFILE where the file system has it), so it disappears when the
//! process ends, even by SIGKILL; and the set of 4 KiB blocks it owns. A
//! block the overlay owns is read from it; every other block from the point.
//!
//! The overlay owns whole blocks: a write covering part of a block first
//! copies the block up from the point below (read-modify-write). Trimmed and
//! zeroed whole blocks become holes. Nothing here is ever durable: flush
//! and FUA have nothing to do, because the overlay is thrown away on exit.
//!
//! Callers serialise changes to overlapping blocks (the device's range
//! lock); the map is updated only after the file holds the new content, so
//! a read never sees a block the overlay claims but does not hold yet.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::plan::{Kept, BLOCK};
use crate::longterm::PointImage;

/// Zeros are written in pieces of this size where a hole cannot be punched.
const ZERO_CHUNK: usize = 1 << 20;

#[derive(Debug)]
pub(crate) struct Overlay {
    file: File,
    kept: Mutex<BTreeMap<u64, Kept>>,
}

impl Overlay {
    /// Creates the (already unlinked) overlay file in `dir`.
    pub(crate) fn create(dir: &Path, disk_size: u64) -> io::Result<Overlay> {
        let file = tempfile::tempfile_in(dir)?;
        file.set_len(disk_size.div_ceil(BLOCK) * BLOCK)?;
        Ok(Overlay {
            file,
            kept: Mutex::new(BTreeMap::new()),
        })
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// The blocks the overlay owns.
    pub(crate) fn kept(&self) -> MutexGuard<'_, BTreeMap<u64, Kept>> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn mark(&self, blocks: std::ops::Range<u64>, kept: Kept) {
        let mut map = self.kept();
        for block in blocks {
            map.insert(block, kept);
        }
    }

    /// Makes the overlay file hold `block`'s current content, copying it up
    /// from `below` unless the overlay owns it already. Does not mark it.
    fn copy_up(&self, below: &PointImage, block: u64) -> io::Result<()> {
        if self.kept().contains_key(&block) {
            return Ok(());
        }
        let mut buf = vec![0u8; BLOCK as usize];
        below
            .read_block(block, &mut buf)
            .map_err(io::Error::other)?;
        self.file.write_all_at(&buf, block * BLOCK)
    }

    /// Copies up the blocks at the ends of `offset..end` that the range
    /// covers only in part.
    fn copy_up_edges(&self, below: &PointImage, offset: u64, end: u64) -> io::Result<()> {
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        if offset % BLOCK != 0 {
            self.copy_up(below, first)?;
        }
        if end % BLOCK != 0 && (last != first || offset % BLOCK == 0) {
            self.copy_up(below, last)?;
        }
        Ok(())
    }

    /// Writes `data` at `offset` (blocking).
    pub(crate) fn write(&self, below: &PointImage, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset + data.len() as u64;
        self.copy_up_edges(below, offset, end)?;
        self.file.write_all_at(data, offset)?;
        self.mark(offset / BLOCK..end.div_ceil(BLOCK), Kept::Data);
        Ok(())
    }

    /// Makes `offset..offset + len` read as zeros (blocking): whole blocks
    /// become holes (or, with `keep_allocated`, written zeros), the parts of
    /// blocks at the ends get zeros written.
    pub(crate) fn zero(
        &self,
        below: &PointImage,
        offset: u64,
        len: u64,
        keep_allocated: bool,
    ) -> io::Result<()> {
        let end = offset + len;
        self.copy_up_edges(below, offset, end)?;
        let (whole_first, whole_end) = (offset.div_ceil(BLOCK), end / BLOCK);
        if whole_first >= whole_end {
            // Within one block, or two partial ones.
            self.write_zeros(offset, end)?;
            self.mark(offset / BLOCK..end.div_ceil(BLOCK), Kept::Data);
            return Ok(());
        }
        let (whole_start, whole_stop) = (whole_first * BLOCK, whole_end * BLOCK);
        self.write_zeros(offset, whole_start)?;
        self.write_zeros(whole_stop, end)?;
        if keep_allocated || !self.punch_hole(whole_start, whole_stop - whole_start) {
            self.write_zeros(whole_start, whole_stop)?;
        }
        let whole = if keep_allocated {
            Kept::Data
        } else {
            Kept::Zero
        };
        self.mark(offset / BLOCK..whole_first, Kept::Data);
        self.mark(whole_first..whole_end, whole);
        self.mark(whole_end..end.div_ceil(BLOCK), Kept::Data);
        Ok(())
    }

    fn write_zeros(&self, start: u64, end: u64) -> io::Result<()> {
        let zeros = vec![0u8; ((end - start) as usize).min(ZERO_CHUNK)];
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(ZERO_CHUNK);
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Frees `offset..offset + len` of the file; whether it could.
    fn punch_hole(&self, offset: u64, len: u64) -> bool {
        // SAFETY: fallocate reads only its integer arguments; the file stays
        // open for the call because `self` owns it.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        rc == 0
    }
}
