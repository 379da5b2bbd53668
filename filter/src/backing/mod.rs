//! Backing I/O: the file or block device behind an export.
pub mod aligned;
pub mod engine;
pub mod sync;
pub mod uring;
