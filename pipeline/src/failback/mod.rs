//! Failback: makes the original disk equal to the failover disk again by
//! shipping only the chunks in which they differ. This module owns the
//! failback session, in two roles on one connection: the receiver (on the
//! original side, [`receive()`]) streams the SHA-256 digest of every 64 KiB
//! chunk of its disk; the sender (on the failover side, [`send()`]) digests
//! its own disk in step, and answers each window of digests with the chunks
//! whose digests differ (zstd and AES-256-GCM, by the frame codec); the
//! receiver writes them, fsyncs, and confirms the totals. Both read their
//! disk once, front to back, in 4 MiB reads on a thread of their own
//! ([`scan`]). Handshake and plaintexts: [`wire`]; the format is in
//! `docs/FORMATS.md`, the design in `docs/FAILOVER.md`.
//!
//! Comparing digests rather than tracking writes on the failover side alone
//! also undoes what the original disk wrote after the failover point (writes
//! that never reached the target): those chunks differ too.

mod receive;
mod scan;
mod send;
pub mod wire;

#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use receive::receive;
pub use scan::chunk_digests;
pub use send::send;
pub use wire::Totals;

use crate::session::SessionError;

/// Bytes per chunk: the unit compared and shipped (the last chunk of a disk
/// whose size is not a multiple is shorter).
pub const CHUNK_SIZE: u64 = 64 << 10;
/// Chunks per digests frame, and per read of the disk (4 MiB).
pub const WINDOW_CHUNKS: u64 = 64;
/// Length of a chunk digest (SHA-256).
pub const DIGEST_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum FailbackError {
    #[error("{path}: {op}: {source}")]
    Disk {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{0} is neither a regular file nor a block device")]
    NotADisk(PathBuf),
    #[error("{0} is empty")]
    Empty(PathBuf),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("failback protocol: {0}")]
    Protocol(String),
    #[error("a failback task died: {0}")]
    Task(String),
}

impl From<io::Error> for FailbackError {
    fn from(e: io::Error) -> Self {
        FailbackError::Session(SessionError::Io(e))
    }
}

impl From<crate::codec::CodecError> for FailbackError {
    fn from(e: crate::codec::CodecError) -> Self {
        FailbackError::Session(SessionError::Codec(e))
    }
}

/// A disk taking part in a failback: a regular file or a block device.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub size: u64,
    file: Arc<File>,
}

impl Disk {
    /// Opens `path` (for writing too if `write`) and finds its size.
    pub fn open(path: &Path, write: bool) -> Result<Disk, FailbackError> {
        let err = |op| {
            let path = path.to_path_buf();
            move |source| FailbackError::Disk { path, op, source }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(err("open"))?;
        let kind = file.metadata().map_err(err("stat"))?.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(FailbackError::NotADisk(path.to_path_buf()));
        }
        // Seeking finds the size of block devices too (their metadata says 0).
        let size = file.seek(SeekFrom::End(0)).map_err(err("seek"))?;
        if size == 0 {
            return Err(FailbackError::Empty(path.to_path_buf()));
        }
        Ok(Disk {
            path: path.to_path_buf(),
            size,
            file: Arc::new(file),
        })
    }

    /// How many chunks the disk has.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(CHUNK_SIZE)
    }

    /// Length of chunk `index` (the last may be short).
    pub fn chunk_len(&self, index: u64) -> u64 {
        CHUNK_SIZE.min(self.size - index * CHUNK_SIZE)
    }

    /// How many digest windows the disk has.
    pub fn windows(&self) -> u64 {
        window_count(self.size)
    }

    fn error(&self, op: &'static str) -> impl FnOnce(io::Error) -> FailbackError {
        let path = self.path.clone();
        move |source| FailbackError::Disk { path, op, source }
    }
}

/// Where one window of a disk lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Its first chunk.
    pub first: u64,
    /// Its last chunk.
    pub last: u64,
    /// Its bytes are `offset..offset + len`.
    pub offset: u64,
    pub len: u64,
}

impl Span {
    /// Window `index` (below [`window_count`]) of a disk of `size` bytes.
    pub fn of_window(size: u64, index: u64) -> Span {
        let first = index * WINDOW_CHUNKS;
        let offset = first * CHUNK_SIZE;
        Span {
            first,
            last: (first + WINDOW_CHUNKS).min(size.div_ceil(CHUNK_SIZE)) - 1,
            offset,
            len: (WINDOW_CHUNKS * CHUNK_SIZE).min(size - offset),
        }
    }

    /// How many chunks it holds.
    pub fn chunks(&self) -> u64 {
        self.last - self.first + 1
    }
}

/// How many windows a disk of `size` bytes has.
pub fn window_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE).div_ceil(WINDOW_CHUNKS)
}

/// What a pass did, as the side reporting it saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub totals: Totals,
    /// Bytes of sealed frames this side sent (chunks for the sender,
    /// digests for the receiver), headers and tags included.
    pub wire_bytes: u64,
}
