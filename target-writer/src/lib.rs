//! The target writer: what the target does with the batches the pipeline
//! ships. [`server`] accepts a source and appends each verified batch durably
//! to the [`journal`] (segment layout in [`format`](mod@format)), which
//! recovers after a crash; [`restore`] rebuilds the disk at any restore
//! point. Delta images (long-term points under retention) come later; see
//! `docs/ARCHITECTURE.md` and `docs/REPLICATION.md`. [`served`] exports a
//! point over NBD in place, without rebuilding it (`cdp serve-point`).
pub mod format;
pub mod history;
pub mod journal;
pub mod longterm;
pub mod restore;
pub mod roller;
pub mod served;
pub mod server;

pub use journal::{
    BatchMeta, Journal, JournalError, JournalOptions, RecoveryMode, RecoveryReport, RestorePoint,
    TornCause, TornTail,
};
