//! What opening found at the end of the journal, and what it did about it:
//! the [`RecoveryReport`] and its [`TornTail`].

use std::fmt;
use std::path::PathBuf;

use super::scan::Torn;

/// What kind of torn tail was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TornCause {
    /// The newest segment's header is cut short, or damaged with nothing
    /// after it: the whole file goes.
    SegmentHeader,
    /// An entry header cut short by the end of the file.
    EntryHeaderCut,
    /// A damaged entry header with no intact entry after it.
    EntryHeaderDamaged,
    /// An entry body cut short by the end of the file.
    BodyCut,
    /// The final entry, ending at the end of the file, fails its body CRC.
    BodyCrc,
}

impl fmt::Display for TornCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TornCause::SegmentHeader => "segment header torn",
            TornCause::EntryHeaderCut => "entry header cut short",
            TornCause::EntryHeaderDamaged => "damaged entry header with nothing intact after it",
            TornCause::BodyCut => "entry body cut short",
            TornCause::BodyCrc => "final entry fails its body CRC",
        })
    }
}

/// A torn tail found when opening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub path: PathBuf,
    /// Where it starts; 0 with [`TornCause::SegmentHeader`] (the whole file).
    pub offset: u64,
    pub dropped_bytes: u64,
    pub cause: TornCause,
    /// Whether it was cut off (truncated, or the segment file removed);
    /// `false` for a read-only journal.
    pub cut: bool,
}

/// What opening found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecoveryReport {
    /// Segments with a complete header.
    pub segments: usize,
    pub points: usize,
    pub torn_tail: Option<TornTail>,
    /// Segment files below the journal's first segment (an interrupted
    /// retention's leftovers) that opening for append deleted.
    pub leftover_segments_removed: usize,
}

/// Reports a torn tail, as a warning and for the [`RecoveryReport`].
pub(super) fn torn_tail(torn: Torn, cut: bool) -> TornTail {
    let dropped_bytes = torn.file_len - torn.offset;
    let action = if cut {
        "cut off"
    } else {
        "left in place (read-only)"
    };
    tracing::warn!(
        path = %torn.path.display(),
        offset = torn.offset,
        dropped_bytes,
        cause = %torn.cause,
        "journal ends in a torn tail; {action}"
    );
    TornTail {
        path: torn.path,
        offset: torn.offset,
        dropped_bytes,
        cause: torn.cause,
        cut,
    }
}
