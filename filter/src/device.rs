//! The contract between the NBD protocol layer and what it exports. The
//! protocol layer validates every request (ranges, flags, read-only) before it
//! calls a [`BlockDevice`], so implementations only do the I/O.

use std::fs::File;
use std::future::Future;
use std::io;
use std::sync::Arc;

use bytes::Bytes;

/// One run of the `base:allocation` context: `length` bytes that are all
/// allocated data, or all a hole that reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub hole: bool,
}

/// Bytes a read is answered with straight from a file's page cache: the
/// protocol layer sends them to the socket with `sendfile(2)`, so they are
/// never copied through user memory.
#[derive(Debug, Clone)]
pub struct FileRange {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: usize,
}

/// Block-size constraints advertised through NBD_INFO_BLOCK_SIZE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum_payload: u32,
}

/// How WRITE_ZEROES may reach its zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroMode {
    /// NBD_CMD_FLAG_NO_HOLE: the range must stay allocated.
    pub keep_allocated: bool,
    /// NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP rather than write zeros slowly.
    pub fast_only: bool,
}

/// Why a device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{op} of {len} bytes at offset {offset}: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("zeroing {len} bytes at offset {offset} cannot be done fast on this backing")]
    SlowZero { offset: u64, len: u64 },
    #[error("capture has stopped: the change may be on the disk but cannot be protected")]
    CaptureStopped,
}

/// A disk as the NBD protocol layer sees it.
pub trait BlockDevice: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn block_sizes(&self) -> BlockSizes;

    /// Whether a write of `len` bytes at `offset` completes without waiting
    /// on a device (a copy into the page cache), so the protocol layer may
    /// run it in the connection's own task instead of a task of its own.
    fn write_is_quick(&self, _offset: u64, _len: u64, _fua: bool) -> bool {
        false
    }

    /// The file range a read of `len` bytes at `offset` can be sent from
    /// without waiting on a device (every page is in the page cache); `None`
    /// sends it through [`BlockDevice::read`]. The bytes are those of the file
    /// when the reply is sent, which is still within the read's lifetime.
    fn cached_range(&self, _offset: u64, _len: u32) -> Option<FileRange> {
        None
    }

    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, DeviceError>> + Send;
    /// Writes `data` at `offset`; with `fua` the data is durable on return.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Makes every write completed before the call durable.
    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Discards the range; it reads back as zeros afterwards.
    fn trim(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Hints that the range will be read soon.
    fn cache(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Allocation status from `offset` on, covering at most `len` bytes (at
    /// least one extent; fewer bytes than asked is allowed).
    fn extents(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<Extent>, DeviceError>> + Send;
}
