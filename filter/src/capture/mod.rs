//! Capture: every change the filter makes to its backing disk becomes a
//! [`Record`] in a bounded lock-free ring, in an order that respects
//! causality, before the client hears that the change is done. Consumers
//! drain the ring: the capture log (a local file of the stream) or, later,
//! the replication pipeline.
pub mod format;
pub mod log;
pub mod record;
pub mod ring;
pub mod sink;

pub use record::{Record, RecordKind};
pub use ring::{capture_ring, CaptureClosed, CaptureReceiver, CaptureSender};
