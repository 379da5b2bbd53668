//! Writing a layer: [`ImageBuilder`] applies batches, in order, on top of a
//! [`PointImage`] and records which blocks changed, whole: a block a batch
//! covers only in part is first filled with what the point below holds. The
//! result is a delta image (a sparse file: header, each changed block at its
//! own place, block map) or, for the first roll, `base.img` itself. Files are
//! written under a temporary name and made durable by the caller's rename.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use pipeline::batch::{Batch, Extent};

use super::chain::PointImage;
use super::error::{io_err, LongTermError};
use super::image::{BlockMap, BLOCK};
use crate::format::longterm::{encode_map, BlockState, ImageHeader, MapEntry, IMAGE_HEADER_LEN};

/// What a batch left in a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Touched {
    /// The block's whole content is in the file.
    Data,
    /// The block reads as zeros; the file's bytes there do not matter.
    Zero,
}

/// Builds one layer in a new file.
pub(crate) struct ImageBuilder<'a> {
    below: &'a PointImage,
    path: PathBuf,
    file: File,
    /// Where block 0 lies in the file.
    data_offset: u64,
    touched: BTreeMap<u64, Touched>,
    zeros: Vec<u8>,
}

impl<'a> ImageBuilder<'a> {
    /// Creates `path` (which must not exist) for a layer on top of `below`,
    /// with block 0 at `data_offset` (the image header's length for a delta
    /// image, 0 for `base.img`).
    pub(crate) fn create(
        below: &'a PointImage,
        path: &Path,
        data_offset: u64,
    ) -> Result<Self, LongTermError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err(path, "create image", 0))?;
        Ok(Self::over(below, path, file, data_offset))
    }

    /// A layer on top of `below` in a file without a name in the directory
    /// `dir` (O_TMPFILE): it is gone when the last handle closes, however
    /// the process ends. Block 0 is at offset 0.
    pub(crate) fn create_unnamed(below: &'a PointImage, dir: &Path) -> Result<Self, LongTermError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)
            .map_err(io_err(dir, "create an unnamed layer (O_TMPFILE)", 0))?;
        Ok(Self::over(below, dir, file, 0))
    }

    fn over(below: &'a PointImage, path: &Path, file: File, data_offset: u64) -> Self {
        ImageBuilder {
            below,
            path: path.to_path_buf(),
            file,
            data_offset,
            touched: BTreeMap::new(),
            zeros: vec![0; BLOCK as usize],
        }
    }

    /// Applies one batch on top of everything applied before.
    pub(crate) fn apply(&mut self, batch: &Batch) -> Result<(), LongTermError> {
        for extent in &batch.extents {
            let range = extent.range();
            let (first, last) = (range.start / BLOCK, (range.end - 1) / BLOCK);
            for edge in [first, last] {
                if range.start > edge * BLOCK || range.end < (edge + 1) * BLOCK {
                    self.fill(edge)?;
                }
            }
            match extent {
                Extent::Data { offset, data } => {
                    self.write(*offset, data)?;
                    for block in first..=last {
                        self.touched.insert(block, Touched::Data);
                    }
                }
                Extent::Zero { offset, len } => self.zero(*offset, *len, first, last)?,
            }
        }
        Ok(())
    }

    /// Zeroes `offset..offset + len`: whole blocks become zero blocks, the
    /// (already filled) edges get zeros written.
    fn zero(&mut self, offset: u64, len: u64, first: u64, last: u64) -> Result<(), LongTermError> {
        let end = offset + len;
        for block in first..=last {
            let start = (block * BLOCK).max(offset);
            let stop = ((block + 1) * BLOCK).min(end);
            if stop - start == BLOCK {
                self.touched.insert(block, Touched::Zero);
            } else {
                let zeros = &self.zeros[..(stop - start) as usize];
                self.file
                    .write_all_at(zeros, self.data_offset + start)
                    .map_err(io_err(&self.path, "write zeros", self.data_offset + start))?;
            }
        }
        Ok(())
    }

    /// Makes `block`'s whole content present in the file before a batch
    /// changes part of it.
    fn fill(&mut self, block: u64) -> Result<(), LongTermError> {
        let content = match self.touched.get(&block) {
            Some(Touched::Data) => return Ok(()),
            Some(Touched::Zero) => self.zeros.clone(),
            None => {
                let mut buf = vec![0u8; BLOCK as usize];
                self.below.read_block(block, &mut buf)?;
                buf
            }
        };
        self.write(block * BLOCK, &content)?;
        self.touched.insert(block, Touched::Data);
        Ok(())
    }

    fn write(&self, disk_offset: u64, data: &[u8]) -> Result<(), LongTermError> {
        let at = self.data_offset + disk_offset;
        self.file
            .write_all_at(data, at)
            .map_err(io_err(&self.path, "write block data", at))
    }

    /// Computes the block map (reading each data block back for its CRC),
    /// frees the space of zero blocks, and returns the file and its map.
    /// Data blocks past the end of the disk are padded with zeros.
    pub(crate) fn finish(self) -> Result<(File, BlockMap), LongTermError> {
        let disk_blocks = self.below.disk_size().div_ceil(BLOCK);
        self.file
            .set_len(self.data_offset + disk_blocks * BLOCK)
            .map_err(io_err(&self.path, "size image", 0))?;
        let mut entries = Vec::with_capacity(self.touched.len());
        let mut buf = vec![0u8; BLOCK as usize];
        for (&block, touched) in &self.touched {
            let state = match touched {
                Touched::Data => {
                    let at = self.data_offset + block * BLOCK;
                    self.file.read_exact_at(&mut buf, at).map_err(io_err(
                        &self.path,
                        "read block back",
                        at,
                    ))?;
                    BlockState::Data {
                        crc: crc32c::crc32c(&buf),
                    }
                }
                Touched::Zero => {
                    punch_hole(&self.file, self.data_offset + block * BLOCK, BLOCK);
                    BlockState::Zero
                }
            };
            entries.push(MapEntry { block, state });
        }
        Ok((self.file, BlockMap::new(entries)))
    }
}

/// Frees the space of a range that no map entry points at any more. Only an
/// optimisation: where the file system cannot punch holes the bytes stay.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) {
    // SAFETY: fallocate reads only its integer arguments; `file` stays open
    // for the call because it is borrowed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot punch a hole; the space stays in use");
    }
}

/// Writes `header` and `map` after `data_end` bytes of `file` (the header at
/// offset 0, the map at `data_end`), fdatasyncs, and returns the header as
/// written.
pub(crate) fn seal_image(
    file: &File,
    path: &Path,
    mut header: ImageHeader,
    map: &BlockMap,
    data_end: u64,
) -> Result<ImageHeader, LongTermError> {
    let raw_map = encode_map(map.entries());
    header.map_offset = data_end.max(IMAGE_HEADER_LEN as u64);
    header.map_entries = map.entries().len() as u64;
    header.map_crc = crc32c::crc32c(&raw_map);
    let raw_header = header.encode().map_err(|source| LongTermError::Format {
        path: path.to_path_buf(),
        source,
    })?;
    file.write_all_at(&raw_map, header.map_offset)
        .map_err(io_err(path, "write block map", header.map_offset))?;
    file.set_len(header.map_offset + raw_map.len() as u64)
        .map_err(io_err(path, "size image", header.map_offset))?;
    file.write_all_at(&raw_header, 0)
        .map_err(io_err(path, "write image header", 0))?;
    file.sync_all().map_err(io_err(path, "fsync image", 0))?;
    Ok(header)
}
