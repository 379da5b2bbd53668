//! A restore point served in place (`cdp serve-point`): the
//! [`filter::device::BlockDevice`] the NBD protocol layer exports, reading
//! through the point's layers ([`History::image`]: the base, the deltas, and
//! the journal entries after them built into one layer in the scratch
//! directory) without rebuilding the disk. Read-only by default (the
//! protocol layer refuses changes with EPERM); writable with a scratch
//! overlay that is thrown away on exit (`overlay.rs`), so the target's
//! directory is never written either way.
//!
//! Inside: `plan` says where each block of a request comes from (through
//! `index`, which layers hold anything in which chunk of the disk),
//! `overlay` is the writable scratch overlay, `read` reads the planned runs.

mod index;
mod overlay;
mod plan;
mod read;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use bytes::Bytes;
use filter::device::{BlockDevice, BlockSizes, DeviceError, Extent, ZeroMode};
use filter::protected::MAX_PAYLOAD;
use filter::range_lock::RangeLock;
use pipeline::key::Key;

use crate::history::{History, Point};
use crate::longterm::PointImage;
use crate::restore::{read_batch, RestoreError};
use index::ChunkTable;
use overlay::Overlay;
use plan::{plan, Source, BLOCK};

/// How a point is served.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Accept changes into a scratch overlay.
    pub writable: bool,
    /// Where the journal layer and the overlay are made (both unlinked).
    pub scratch: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(
        "the scratch directory {} is inside the target directory {}; \
         serving a point never writes there: choose another --scratch",
        scratch.display(), dir.display()
    )]
    ScratchInTarget { scratch: PathBuf, dir: PathBuf },
    #[error("scratch directory {}: {op}: {source}", path.display())]
    Scratch {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Longest span one block status reply describes (the protocol allows
/// fewer bytes than asked).
const MAX_STATUS_BLOCKS: u64 = 1 << 16;
/// Longest list of extents one block status reply carries.
const MAX_EXTENTS: usize = 1024;

/// What a served point reads from.
#[derive(Debug)]
struct Stack {
    image: PointImage,
    table: ChunkTable,
    overlay: Option<Overlay>,
}

impl Stack {
    fn new(image: PointImage, overlay: Option<Overlay>) -> Stack {
        Stack {
            table: ChunkTable::new(&image),
            image,
            overlay,
        }
    }
}

/// A restore point as a block device.
#[derive(Debug)]
pub struct ServedPoint {
    stack: Arc<Stack>,
    /// Overlapping changes take turns (read-modify-write of shared blocks).
    changes: RangeLock,
    /// Cleared for good once a file system refuses RWF_NOWAIT reads.
    nowait: Arc<AtomicBool>,
}

/// Checks `key` against the smallest entry the journal holds; whether
/// there was one to check it with (a history rolled entirely into the
/// long-term tier has none, and its images are not encrypted).
pub fn check_key(history: &History, key: &Key) -> Result<bool, RestoreError> {
    let Some(journal) = history.journal() else {
        return Ok(false);
    };
    let Some(entry) = journal.points().iter().min_by_key(|p| p.body_len) else {
        return Ok(false);
    };
    read_batch(journal, key, entry)?;
    Ok(true)
}

impl ServedPoint {
    /// Opens `point` of the history in `dir` for serving: builds its
    /// journal layer (if it has one) in `options.scratch`, and the overlay
    /// there too if writable.
    pub fn open(
        history: &History,
        dir: &Path,
        key: &Key,
        point: &Point,
        options: &ServeOptions,
    ) -> Result<ServedPoint, ServeError> {
        let scratch_err = |op| {
            let path = options.scratch.clone();
            move |source| ServeError::Scratch { path, op, source }
        };
        let scratch = options
            .scratch
            .canonicalize()
            .map_err(scratch_err("resolve"))?;
        if let Ok(dir) = dir.canonicalize() {
            if scratch.starts_with(&dir) {
                return Err(ServeError::ScratchInTarget { scratch, dir });
            }
        }
        let image = history.image(key, point, &scratch)?;
        let overlay = if options.writable {
            let overlay = Overlay::create(&scratch, image.disk_size())
                .map_err(scratch_err("create the overlay file"))?;
            Some(overlay)
        } else {
            None
        };
        Ok(ServedPoint::new(image, overlay))
    }

    /// Reads `image` (built by [`History::image`]) as a read-only device.
    pub fn read_only(image: PointImage) -> ServedPoint {
        ServedPoint::new(image, None)
    }

    fn new(image: PointImage, overlay: Option<Overlay>) -> ServedPoint {
        ServedPoint {
            stack: Arc::new(Stack::new(image, overlay)),
            changes: RangeLock::default(),
            nowait: Arc::new(AtomicBool::new(true)),
        }
    }

    pub fn image(&self) -> &PointImage {
        &self.stack.image
    }

    /// Blocks the overlay owns (0 when read-only).
    pub fn overlay_blocks(&self) -> usize {
        self.stack.overlay.as_ref().map_or(0, |o| o.kept().len())
    }

    /// The runs covering blocks `first..first + count`.
    fn plan(&self, first: u64, count: u64) -> Vec<plan::Run> {
        let overlay = self.stack.overlay.as_ref().map(|o| o.kept());
        let stack = &self.stack;
        plan(&stack.image, &stack.table, overlay.as_deref(), first, count)
    }

    /// Runs a change to `offset..offset + len` on the blocking pool, holding
    /// the range lock over the blocks it touches.
    async fn change(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        work: impl FnOnce(&Overlay, &PointImage) -> io::Result<()> + Send + 'static,
    ) -> Result<(), DeviceError> {
        let io_err = |source| DeviceError::Io {
            op,
            offset,
            len,
            source,
        };
        if self.stack.overlay.is_none() {
            return Err(io_err(io::Error::from_raw_os_error(libc::EPERM)));
        }
        let start = offset / BLOCK * BLOCK;
        let end = (offset + len).div_ceil(BLOCK) * BLOCK;
        let _turn = self.changes.lock(start, end).await;
        let stack = self.stack.clone();
        tokio::task::spawn_blocking(move || {
            let overlay = stack.overlay.as_ref().expect("checked above");
            work(overlay, &stack.image)
        })
        .await
        .map_err(io::Error::other)
        .and_then(|done| done)
        .map_err(io_err)
    }
}

impl BlockDevice for ServedPoint {
    fn size(&self) -> u64 {
        self.stack.image.disk_size()
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            minimum: 1,
            preferred: BLOCK as u32,
            maximum_payload: MAX_PAYLOAD,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DeviceError> {
        let first = offset / BLOCK;
        let count = (offset + u64::from(len)).div_ceil(BLOCK) - first;
        let runs = self.plan(first, count);
        let buf = read::read_runs(&self.stack, &self.nowait, runs, count)
            .await
            .map_err(|source| DeviceError::Io {
                op: "read",
                offset,
                len: u64::from(len),
                source,
            })?;
        let skip = (offset - first * BLOCK) as usize;
        Ok(Bytes::from(buf).slice(skip..skip + len as usize))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), DeviceError> {
        let len = data.len() as u64;
        self.change("write", offset, len, move |overlay, below| {
            overlay.write(below, offset, &data)
        })
        .await
    }

    /// Nothing to do: the overlay is thrown away on exit, and a read-only
    /// point has nothing to make durable.
    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), DeviceError> {
        self.change("trim", offset, len, move |overlay, below| {
            overlay.zero(below, offset, len, false)
        })
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
        _fua: bool,
    ) -> Result<(), DeviceError> {
        if mode.fast_only && mode.keep_allocated {
            return Err(DeviceError::SlowZero { offset, len });
        }
        self.change("write zeroes", offset, len, move |overlay, below| {
            overlay.zero(below, offset, len, mode.keep_allocated)
        })
        .await
    }

    /// A hint only; the layers are read on demand.
    async fn cache(&self, _offset: u64, _len: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        let end = offset.saturating_add(len).min(self.size());
        let first = offset / BLOCK;
        let count = (end.div_ceil(BLOCK) - first).min(MAX_STATUS_BLOCKS);
        let mut extents: Vec<Extent> = Vec::new();
        for run in self.plan(first, count) {
            let start = (run.first_block * BLOCK).max(offset);
            let stop = ((run.first_block + run.blocks) * BLOCK).min(end);
            let hole = run.source == Source::Zero;
            if let Some(last) = extents.last_mut().filter(|last| last.hole == hole) {
                last.length += stop - start;
            } else if extents.len() == MAX_EXTENTS {
                break;
            } else {
                extents.push(Extent {
                    length: stop - start,
                    hole,
                });
            }
        }
        Ok(extents)
    }
}
