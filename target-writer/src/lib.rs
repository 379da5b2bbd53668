//! The target writer: what the target does with the batches the pipeline
//! ships. [`server`] accepts a source and appends each verified batch durably
//! to the [`journal`] (segment layout in [`format`](mod@format)), which
//! recovers after a crash; [`restore`] rebuilds the disk at any restore
//! point; [`failover`] makes a point into a disk production can run on.
//! Delta images (long-term points under retention) come later; see
//! `docs/ARCHITECTURE.md` and `docs/REPLICATION.md`.
pub mod failover;
pub mod format;
pub mod history;
pub mod journal;
pub mod longterm;
pub mod restore;
pub mod roller;
pub mod server;

pub use journal::{
    BatchMeta, Journal, JournalError, JournalOptions, RecoveryMode, RecoveryReport, RestorePoint,
    TornCause, TornTail,
};
