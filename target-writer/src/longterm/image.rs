//! One layer of a long-term point: a delta image, or `base.img` with its base
//! map. A layer knows which blocks it holds ([`BlockMap`]) and reads them
//! back, checking each block's CRC. Writing images is `builder.rs`'s job.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::chain::MAX_RUN_BLOCKS;
use super::error::{io_err, LongTermError};
use crate::format::longterm::{
    decode_map, BlockState, ImageHeader, ImageKind, MapEntry, PointStamp, BLOCK_SIZE,
    IMAGE_HEADER_LEN,
};

pub(crate) const BLOCK: u64 = BLOCK_SIZE as u64;

/// The blocks a layer holds, sorted by block number.
#[derive(Debug, Clone, Default)]
pub struct BlockMap {
    entries: Vec<MapEntry>,
}

impl BlockMap {
    pub(crate) fn new(entries: Vec<MapEntry>) -> Self {
        debug_assert!(entries.windows(2).all(|w| w[0].block < w[1].block));
        BlockMap { entries }
    }

    pub fn get(&self, block: u64) -> Option<BlockState> {
        self.entries
            .binary_search_by_key(&block, |e| e.block)
            .ok()
            .map(|i| self.entries[i].state)
    }

    pub fn entries(&self) -> &[MapEntry] {
        &self.entries
    }

    /// Runs of consecutive blocks in the same state, at most
    /// [`MAX_RUN_BLOCKS`] long: `(first block, blocks, holds data)`.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64, bool)> + '_ {
        let mut entries = self.entries.iter().peekable();
        std::iter::from_fn(move || {
            let first = entries.next()?;
            let data = matches!(first.state, BlockState::Data { .. });
            let mut blocks = 1;
            while let Some(next) = entries.peek() {
                let same = matches!(next.state, BlockState::Data { .. }) == data;
                if !same || next.block != first.block + blocks || blocks == MAX_RUN_BLOCKS {
                    break;
                }
                blocks += 1;
                entries.next();
            }
            Some((first.block, blocks, data))
        })
    }

    /// Bytes of block data the map stands for.
    pub fn data_bytes(&self) -> u64 {
        let data = self
            .entries
            .iter()
            .filter(|e| matches!(e.state, BlockState::Data { .. }))
            .count();
        data as u64 * BLOCK
    }
}

/// A delta image or the base, open for reading.
#[derive(Debug)]
pub struct Layer {
    /// The file holding the block data.
    path: PathBuf,
    file: File,
    /// Where block 0's data starts in `file`.
    data_offset: u64,
    header: ImageHeader,
    map: BlockMap,
}

impl Layer {
    /// Opens the delta image at `path`.
    pub fn open_delta(path: &Path) -> Result<Layer, LongTermError> {
        let file = File::open(path).map_err(io_err(path, "open delta image", 0))?;
        let (header, map) = read_header_and_map(&file, path, ImageKind::Delta)?;
        Ok(Layer {
            path: path.to_path_buf(),
            file,
            data_offset: IMAGE_HEADER_LEN as u64,
            header,
            map,
        })
    }

    /// Opens `base.img` at `image` with its base map at `map_path`.
    pub fn open_base(image: &Path, map_path: &Path) -> Result<Layer, LongTermError> {
        let map_file = File::open(map_path).map_err(io_err(map_path, "open base map", 0))?;
        let (header, map) = read_header_and_map(&map_file, map_path, ImageKind::BaseMap)?;
        let file = File::open(image).map_err(io_err(image, "open base image", 0))?;
        Ok(Layer {
            path: image.to_path_buf(),
            file,
            data_offset: 0,
            header,
            map,
        })
    }

    /// A layer over a file an [`super::builder::ImageBuilder`] wrote with
    /// block 0 at offset 0 and kept only in memory (the journal part of a
    /// point being served): its header is made up from `disk_size` and
    /// `point`; `path` names it in errors.
    pub(crate) fn in_memory(
        path: PathBuf,
        file: File,
        map: BlockMap,
        disk_size: u64,
        point: PointStamp,
    ) -> Layer {
        let header = ImageHeader {
            kind: ImageKind::Delta,
            disk_id: [0; 16],
            disk_size,
            block_size: BLOCK_SIZE,
            number: 0,
            point,
            map_offset: 0,
            map_entries: 0,
            map_crc: 0,
            tag: None,
        };
        Layer {
            path,
            file,
            data_offset: 0,
            header,
            map,
        }
    }

    pub fn header(&self) -> &ImageHeader {
        &self.header
    }

    pub fn map(&self) -> &BlockMap {
        &self.map
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `count` consecutive data blocks from `block` on into `buf`
    /// (`count * BLOCK` bytes), checking each against its CRC. Every block
    /// must be a data block of the map.
    pub fn read_blocks(&self, block: u64, buf: &mut [u8]) -> Result<(), LongTermError> {
        let offset = self.data_offset + block * BLOCK;
        self.file
            .read_exact_at(buf, offset)
            .map_err(io_err(&self.path, "read block", offset))?;
        let entry = self.map.entries.partition_point(|e| e.block < block);
        self.check_blocks(entry, block, buf)
    }

    /// Asks the kernel to start reading `count` data blocks from `block` on
    /// into the page cache, without waiting (a hint: errors are ignored).
    pub fn will_need(&self, block: u64, count: u64) {
        use std::os::fd::AsRawFd;
        let (offset, len) = (self.data_offset + block * BLOCK, count * BLOCK);
        // SAFETY: posix_fadvise reads only its integer arguments; the file
        // stays open for the call because `self` borrows it.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
    }

    /// The file holding the block data and where block 0 lies in it, for a
    /// reader that reads blocks its own way (`served`'s page-cache reads)
    /// and then checks them with [`Layer::check_blocks`].
    pub(crate) fn data_file(&self) -> (&File, u64) {
        (&self.file, self.data_offset)
    }

    /// Checks `count` consecutive data blocks read from `block` on (`buf`
    /// is `count * BLOCK` bytes) against their CRCs in the map, where
    /// `entry` is the index of `block`'s entry (the blocks are consecutive,
    /// and so are their entries).
    pub(crate) fn check_blocks(
        &self,
        entry: usize,
        block: u64,
        buf: &[u8],
    ) -> Result<(), LongTermError> {
        let entries = self.map.entries();
        for (i, data) in buf.chunks_exact(BLOCK as usize).enumerate() {
            let block = block + i as u64;
            let stored = match entries.get(entry + i) {
                Some(MapEntry {
                    block: b,
                    state: BlockState::Data { crc },
                }) if *b == block => *crc,
                _ => unreachable!("only data blocks of the map are read"),
            };
            let computed = crc32c::crc32c(data);
            if computed != stored {
                return Err(LongTermError::BlockCrc {
                    path: self.path.clone(),
                    block,
                    stored,
                    computed,
                });
            }
        }
        Ok(())
    }
}

/// Reads and checks an image header of `kind` and the block map it names.
fn read_header_and_map(
    file: &File,
    path: &Path,
    kind: ImageKind,
) -> Result<(ImageHeader, BlockMap), LongTermError> {
    let format = |source| LongTermError::Format {
        path: path.to_path_buf(),
        source,
    };
    let mut raw = [0u8; IMAGE_HEADER_LEN];
    file.read_exact_at(&mut raw, 0)
        .map_err(io_err(path, "read image header", 0))?;
    let header = ImageHeader::decode(&raw).map_err(format)?;
    if header.kind != kind {
        return Err(LongTermError::Mismatch {
            path: path.to_path_buf(),
            what: "image kind",
        });
    }
    let len = usize::try_from(header.map_entries)
        .ok()
        .and_then(|n| n.checked_mul(crate::format::longterm::MAP_ENTRY_LEN))
        .ok_or(LongTermError::Mismatch {
            path: path.to_path_buf(),
            what: "map size",
        })?;
    let mut raw_map = vec![0u8; len];
    file.read_exact_at(&mut raw_map, header.map_offset)
        .map_err(io_err(path, "read block map", header.map_offset))?;
    let computed = crc32c::crc32c(&raw_map);
    if computed != header.map_crc {
        return Err(LongTermError::MapCrc {
            path: path.to_path_buf(),
            stored: header.map_crc,
            computed,
        });
    }
    let blocks = header.disk_size.div_ceil(BLOCK);
    let entries = decode_map(&raw_map, blocks).map_err(format)?;
    Ok((header, BlockMap::new(entries)))
}
