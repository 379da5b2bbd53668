//! One captured change to the disk.

use bytes::Bytes;

/// What a record did to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// `len` bytes of `data` written at `offset`.
    Write,
    /// The range was discarded; it reads back as zeros (the filter guarantees it).
    Trim,
    /// The range was zeroed.
    Zero,
    /// A barrier: every record before it was made durable on the backing disk.
    Flush,
}

/// One entry of the capture stream. Sequence numbers start where the ring was
/// told to start and have no gaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub kind: RecordKind,
    /// The write was FUA: durable by itself, and a barrier for itself.
    pub fua: bool,
    pub offset: u64,
    pub len: u64,
    /// The written bytes for [`RecordKind::Write`]; empty otherwise.
    pub data: Bytes,
}

impl Record {
    /// Whether a crash-consistent restore point may be cut right after this record.
    pub fn is_barrier(&self) -> bool {
        self.kind == RecordKind::Flush || self.fua
    }
}
