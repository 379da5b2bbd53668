//! The protected disk: the [`BlockDevice`] the filter exports. Every change
//! goes to the backing disk first and then into the capture ring, and only
//! then is it acknowledged, so an acknowledged change is never missing from
//! the captured stream. Overlapping changes take turns (see
//! [`crate::range_lock`]), so the stream replays to the disk's exact bytes.

use bytes::Bytes;

use crate::backing::Backing;
use crate::capture::{CaptureSender, RecordKind};
use crate::device::{BlockDevice, BlockSizes, DeviceError, Extent, ZeroMode};
use crate::range_lock::RangeLock;

/// Largest read or write payload we accept (the protocol's recommended floor
/// for servers that want every client to work is 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 << 20;

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

    pub fn backing(&self) -> &Backing {
        &self.backing
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
        match self
            .backing
            .zero(offset, len, mode.keep_allocated, mode.fast_only)
            .await
        {
            Err(e) if mode.fast_only && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                return Err(DeviceError::SlowZero { offset, len });
            }
            result => result.map_err(|source| DeviceError::Io {
                op,
                offset,
                len,
                source,
            })?,
        }
        if fua {
            self.backing
                .flush()
                .await
                .map_err(|source| DeviceError::Io {
                    op: "flush",
                    offset,
                    len,
                    source,
                })?;
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

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DeviceError> {
        self.backing
            .read(offset, len as usize)
            .await
            .map_err(|source| DeviceError::Io {
                op: "read",
                offset,
                len: len.into(),
                source,
            })
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        let len = data.len() as u64;
        let (start, end) = self.backing.touched_range(offset, len);
        let _turn = self.changes.lock(start, end).await;
        self.backing
            .write(offset, data.clone(), fua)
            .await
            .map_err(|source| DeviceError::Io {
                op: "write",
                offset,
                len,
                source,
            })?;
        self.capture(RecordKind::Write, fua, offset, len, data)
            .await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.backing
            .flush()
            .await
            .map_err(|source| DeviceError::Io {
                op: "flush",
                offset: 0,
                len: 0,
                source,
            })?;
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
            .map_err(|source| DeviceError::Io {
                op: "cache",
                offset,
                len,
                source,
            })
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        self.backing
            .extents(offset, len)
            .await
            .map_err(|source| DeviceError::Io {
                op: "block status",
                offset,
                len,
                source,
            })
    }
}
