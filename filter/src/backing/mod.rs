//! Backing I/O: the file or block device behind an export. [`Backing`] owns
//! the open descriptor and the engine, and turns the protocol's byte-granular
//! requests into what the descriptor accepts: with O_DIRECT it widens reads
//! and writes to the alignment and does read-modify-write at the edges; for
//! TRIM and WRITE_ZEROES it tries fallocate modes and falls back to writing
//! zeros, so a discarded range always reads back as zeros.
pub mod aligned;
pub mod engine;
pub mod fast_path;
pub mod sync;
pub mod uring;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use aligned::{AlignedBuf, ALIGNMENT};
use engine::{FallocateMode, IoEngine};
use fast_path::FastPath;
use sync::SyncEngine;
use uring::UringEngine;

use crate::device::{Extent, FileRange};

/// Which engine performs the backing I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring; falls back to [`EngineKind::Sync`] with a warning where the
    /// kernel refuses io_uring.
    #[default]
    Uring,
    /// pread/pwrite on a thread pool.
    Sync,
}

/// How to open the backing disk.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackingOptions {
    pub read_only: bool,
    /// O_DIRECT: bypass the page cache.
    pub direct: bool,
    pub engine: EngineKind,
    /// Send every I/O to the engine, even page-cache hits (see [`fast_path`]).
    pub no_fast_path: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a regular file or block device")]
    NotADisk { path: PathBuf },
    #[error(
        "{path}: size {size} is not a multiple of the {alignment} byte alignment O_DIRECT needs"
    )]
    UnalignedSize {
        path: PathBuf,
        size: u64,
        alignment: u64,
    },
    #[error("{path}: the disk is empty")]
    Empty { path: PathBuf },
}

enum AnyEngine {
    Uring(UringEngine),
    Sync(SyncEngine),
}

/// Dispatches to whichever engine is in use.
macro_rules! with_engine {
    ($self:expr, $e:ident => $body:expr) => {
        match &$self.engine {
            AnyEngine::Uring($e) => $body,
            AnyEngine::Sync($e) => $body,
        }
    };
}

/// An open backing disk.
pub struct Backing {
    file: Arc<File>,
    engine: AnyEngine,
    /// Present for buffered I/O unless disabled.
    fast_path: Option<FastPath>,
    size: u64,
    /// 1 for buffered I/O; the O_DIRECT alignment otherwise.
    alignment: u64,
    /// Granularity of fallocate: the logical block size of a block device, 1 for a file.
    zero_granularity: u64,
    block_device: bool,
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backing")
            .field("size", &self.size)
            .field("alignment", &self.alignment)
            .field("block_device", &self.block_device)
            .field("engine", &self.engine_name())
            .finish()
    }
}

/// Queue depth of the io_uring engine.
const URING_DEPTH: u32 = 256;

impl Backing {
    pub fn open(path: &Path, options: BackingOptions) -> Result<Self, BackingError> {
        let err = |op| {
            let path = path.to_path_buf();
            move |source| BackingError::Io { path, op, source }
        };
        let mut open = OpenOptions::new();
        open.read(true).write(!options.read_only);
        if options.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let file = open.open(path).map_err(err("open"))?;
        let metadata = file.metadata().map_err(err("stat"))?;
        let block_device = metadata.file_type().is_block_device();
        if !block_device && !metadata.is_file() {
            return Err(BackingError::NotADisk {
                path: path.to_path_buf(),
            });
        }
        let size = if block_device {
            block_device_size(&file).map_err(err("BLKGETSIZE64"))?
        } else {
            metadata.len()
        };
        if size == 0 {
            return Err(BackingError::Empty {
                path: path.to_path_buf(),
            });
        }
        let logical_block = if block_device {
            logical_block_size(&file).map_err(err("BLKSSZGET"))?
        } else {
            1
        };
        let alignment = match (options.direct, block_device) {
            (false, _) => 1,
            (true, true) => logical_block,
            (true, false) => ALIGNMENT as u64,
        };
        if size % alignment != 0 {
            return Err(BackingError::UnalignedSize {
                path: path.to_path_buf(),
                size,
                alignment,
            });
        }
        let file = Arc::new(file);
        let engine = match options.engine {
            EngineKind::Sync => AnyEngine::Sync(SyncEngine::new(file.clone())),
            EngineKind::Uring => match UringEngine::new(file.clone(), URING_DEPTH) {
                Ok(engine) => AnyEngine::Uring(engine),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring unavailable; using the pread/pwrite engine");
                    AnyEngine::Sync(SyncEngine::new(file.clone()))
                }
            },
        };
        let fast_path =
            (!options.direct && !options.no_fast_path).then(|| FastPath::new(file.clone()));
        Ok(Backing {
            file,
            engine,
            fast_path,
            size,
            alignment,
            zero_granularity: logical_block,
            block_device,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// 1 for buffered I/O, else the alignment O_DIRECT requires.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    pub fn engine_name(&self) -> &'static str {
        match self.engine {
            AnyEngine::Uring(_) => "io_uring",
            AnyEngine::Sync(_) => "pread/pwrite",
        }
    }

    /// The range a change of `[offset, offset + len)` really touches: the
    /// aligned blocks around it under O_DIRECT (read-modify-write), else itself.
    pub fn touched_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let a = self.alignment;
        (offset / a * a, (offset + len).div_ceil(a) * a)
    }

    /// The file range to send a read from, if the page cache holds all of it
    /// (buffered I/O with the fast path only).
    pub fn cached_range(&self, offset: u64, len: usize) -> Option<FileRange> {
        let fast = self.fast_path.as_ref()?;
        fast.is_cached(offset, len as u64).then(|| FileRange {
            file: self.file.clone(),
            offset,
            len,
        })
    }

    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let (start, end) = self.touched_range(offset, len as u64);
        let mut buf = AlignedBuf::zeroed((end - start) as usize);
        let cached = self
            .fast_path
            .as_ref()
            .is_some_and(|fast| fast.try_read(buf.as_mut_slice(), start));
        if !cached {
            let (read, result) = with_engine!(self, e => e.read_at(buf, start).await);
            result?;
            buf = read;
        }
        let head = (offset - start) as usize;
        Ok(Bytes::from_owner(buf).slice(head..head + len))
    }

    /// Whether a write goes through the page-cache fast path (inline).
    pub fn writes_via_fast_path(&self, offset: u64, len: u64, durable: bool) -> bool {
        self.fast_path.is_some() && FastPath::takes_write(offset, len, durable)
    }

    pub async fn write(&self, offset: u64, data: Bytes, durable: bool) -> io::Result<()> {
        let len = data.len() as u64;
        if let Some(fast) = &self.fast_path {
            if FastPath::takes_write(offset, len, durable) {
                return fast.write(&data, offset).await;
            }
        }
        let (start, end) = self.touched_range(offset, len);
        let aligned =
            start == offset && end == offset + len && data.as_ptr() as usize % ALIGNMENT == 0;
        if self.alignment == 1 || aligned {
            return with_engine!(self, e => e.write_at(data, offset, durable).await);
        }
        // O_DIRECT with an unaligned range or buffer: build the aligned blocks
        // (the caller holds the range lock over the whole touched range).
        let a = self.alignment;
        let mut buf = AlignedBuf::zeroed((end - start) as usize);
        let head_partial = offset != start;
        let tail_partial = offset + len != end;
        if head_partial {
            self.read_block_into(&mut buf, 0, start).await?;
        }
        if tail_partial && !(head_partial && end - start == a) {
            self.read_block_into(&mut buf, (end - start - a) as usize, end - a)
                .await?;
        }
        let head = (offset - start) as usize;
        buf.as_mut_slice()[head..head + data.len()].copy_from_slice(&data);
        with_engine!(self, e => e.write_at(Bytes::from_owner(buf), start, durable).await)
    }

    /// Reads the aligned block at `disk_offset` into `buf[at..]`.
    async fn read_block_into(
        &self,
        buf: &mut AlignedBuf,
        at: usize,
        disk_offset: u64,
    ) -> io::Result<()> {
        let block = AlignedBuf::zeroed(self.alignment as usize);
        let (block, result) = with_engine!(self, e => e.read_at(block, disk_offset).await);
        result?;
        buf.as_mut_slice()[at..at + block.len()].copy_from_slice(block.as_slice());
        Ok(())
    }

    pub async fn flush(&self) -> io::Result<()> {
        with_engine!(self, e => e.sync_data().await)
    }

    /// Makes the range read as zeros. With `keep_allocated` it is not
    /// deallocated; with `fast_only` it fails with `EOPNOTSUPP` rather than
    /// writing zeros (a block device's unaligned edges, less than a block at
    /// each end, are written either way).
    pub async fn zero(
        &self,
        offset: u64,
        len: u64,
        keep_allocated: bool,
        fast_only: bool,
    ) -> io::Result<()> {
        // Block devices deallocate whole logical blocks only.
        let g = self.zero_granularity;
        let end = offset + len;
        let (middle_start, middle_end) = (offset.div_ceil(g) * g, end / g * g);
        if middle_start >= middle_end {
            return self.write_zeros(offset, len).await;
        }
        self.write_zeros(offset, middle_start - offset).await?;
        self.write_zeros(middle_end, end - middle_end).await?;
        let modes: &[FallocateMode] = if keep_allocated {
            &[FallocateMode::ZeroRange]
        } else {
            &[FallocateMode::PunchHole, FallocateMode::ZeroRange]
        };
        for &mode in modes {
            match with_engine!(self, e => e.fallocate(mode, middle_start, middle_end - middle_start).await)
            {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        if fast_only {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        self.write_zeros(middle_start, middle_end - middle_start)
            .await
    }

    async fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        if len == 0 {
            return Ok(());
        }
        let zeros = Bytes::from_owner(AlignedBuf::zeroed(len.min(CHUNK) as usize));
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write(offset + done, zeros.slice(..n as usize), false)
                .await?;
            done += n;
        }
        Ok(())
    }

    /// Asks the kernel to read the range ahead (posix_fadvise WILLNEED).
    pub fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: posix_fadvise only reads its integer arguments; the fd stays
        // open because self owns it.
        let rc = unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as i64,
                len as i64,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    /// Allocation runs from `offset`, covering at most `len` bytes, from
    /// SEEK_DATA/SEEK_HOLE. Where those are not supported everything is data.
    pub async fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let file = self.file.clone();
        let end = offset.saturating_add(len).min(self.size);
        tokio::task::spawn_blocking(move || allocation_map(&file, offset, end))
            .await
            .map_err(io::Error::other)?
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENODEV)
    )
}

/// Longest list of extents one reply carries.
const MAX_EXTENTS: usize = 1024;

/// Allocation runs of `file` from `offset` to `end` (at most 1024 of them),
/// from SEEK_DATA/SEEK_HOLE; everything is data where those are unsupported.
pub fn allocation_map(file: &File, offset: u64, end: u64) -> io::Result<Vec<Extent>> {
    let fd = file.as_raw_fd();
    let seek = |pos: u64, whence| -> io::Result<Option<u64>> {
        // SAFETY: lseek only reads its arguments. The file position it moves
        // is never used: all I/O is positional.
        let r = unsafe { libc::lseek(fd, pos as i64, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    };
    let mut extents = Vec::new();
    let mut pos = offset;
    while pos < end && extents.len() < MAX_EXTENTS {
        let data = match seek(pos, libc::SEEK_DATA) {
            Ok(found) => found.unwrap_or(end).min(end),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
                ) =>
            {
                return Ok(vec![Extent {
                    length: end - offset,
                    hole: false,
                }]);
            }
            Err(e) => return Err(e),
        };
        if data > pos {
            extents.push(Extent {
                length: data - pos,
                hole: true,
            });
            pos = data;
            continue;
        }
        let hole = seek(pos, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        extents.push(Extent {
            length: hole - pos,
            hole: false,
        });
        pos = hole;
    }
    Ok(extents)
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at a live local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
    if rc == 0 {
        Ok(size)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn logical_block_size(file: &File) -> io::Result<u64> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at a
    // live local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut size) };
    if rc == 0 {
        Ok(size as u64)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `_IOR(0x12, 114, size_t)`
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 104)`
const BLKSSZGET: libc::c_ulong = 0x1268;
