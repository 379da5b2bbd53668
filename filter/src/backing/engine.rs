//! The I/O engine contract: how the filter reaches its backing file or block
//! device. Two engines implement it: [`crate::backing::uring::UringEngine`]
//! (io_uring, the default) and [`crate::backing::sync::SyncEngine`] (plain
//! pread/pwrite on tokio's blocking pool).
//!
//! Engines take buffers by value and give read buffers back, so that a buffer
//! the kernel writes into is owned by the engine until its completion arrives,
//! even when the caller's future is dropped first.

use std::future::Future;
use std::io;

use bytes::Bytes;

use super::aligned::AlignedBuf;

/// How a range is deallocated or zeroed by [`IoEngine::fallocate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallocateMode {
    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: deallocate; reads return zeros.
    PunchHole,
    /// `FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE`: zero, keeping the range allocated.
    ZeroRange,
}

impl FallocateMode {
    pub fn flags(self) -> i32 {
        match self {
            FallocateMode::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            FallocateMode::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        }
    }
}

/// Asynchronous positional I/O on one open file descriptor.
///
/// Offsets and lengths are passed through unchanged: alignment for O_DIRECT
/// is the caller's business (see [`crate::backing::Backing`]).
pub trait IoEngine: Send + Sync + 'static {
    /// Fills `buf` from `offset`. Bytes past the end of the file read as zero.
    /// The buffer comes back whether or not the read succeeded.
    fn read_at(
        &self,
        buf: AlignedBuf,
        offset: u64,
    ) -> impl Future<Output = (AlignedBuf, io::Result<()>)> + Send;

    /// Writes all of `data` at `offset`; with `durable`, the data is on stable
    /// storage when this returns (RWF_DSYNC).
    fn write_at(
        &self,
        data: Bytes,
        offset: u64,
        durable: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// fdatasync: every write completed before this call is on stable storage.
    fn sync_data(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// fallocate(2) on the range; fails with `EOPNOTSUPP` where the file
    /// system or device does not support `mode`.
    fn fallocate(
        &self,
        mode: FallocateMode,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<()>> + Send;
}
