//! One captured change to the disk.

use bytes::Bytes;

use super::tag::Tag;

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
    /// A tagged barrier: a flush that also names an application-consistent
    /// point. `data` holds the tag's UTF-8 bytes (a valid [`Tag`]); `offset`
    /// and `len` are 0. The tag travels in `data` so that a record stays
    /// as cheap to move as before and the ring accounts for it like data.
    Tag,
}

impl RecordKind {
    /// Whether records of this kind are barriers whatever their flags.
    pub fn is_barrier(self) -> bool {
        matches!(self, RecordKind::Flush | RecordKind::Tag)
    }
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
    /// The written bytes for [`RecordKind::Write`], the tag for
    /// [`RecordKind::Tag`]; empty otherwise.
    pub data: Bytes,
}

impl Record {
    /// Whether a crash-consistent restore point may be cut right after this record.
    pub fn is_barrier(&self) -> bool {
        self.kind.is_barrier() || self.fua
    }

    /// The tag of a [`RecordKind::Tag`] record; `None` for other kinds (and
    /// for a tag record whose data is not a valid tag, which the filter never
    /// makes and the capture log reader refuses).
    pub fn tag(&self) -> Option<Tag> {
        if self.kind != RecordKind::Tag {
            return None;
        }
        Tag::from_bytes(&self.data).ok()
    }
}
