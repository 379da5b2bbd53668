//! Capture: every change the filter makes to its backing disk becomes a
//! [`Record`] in a bounded lock-free ring, in an order that respects
//! causality, before the client hears that the change is done. Consumers
//! drain the ring: on a thread of their own, the capture log (a local file
//! of the stream) or the replication pipeline; inline, on the producers'
//! threads, a consumer as cheap as discarding ([`sink`]). A [`Tag`] names an
//! application-consistent point, captured as a tagged barrier.
pub mod format;
pub mod log;
pub mod record;
pub mod ring;
pub mod sink;
pub mod tag;

pub use record::{Record, RecordKind};
pub use ring::{
    capture_ring, capture_ring_inline, CaptureClosed, CaptureReceiver, CaptureSender, Delivered,
    InlineReceiver,
};
pub use tag::{Tag, TagError, MAX_TAG_LEN};
