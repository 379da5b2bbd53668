//! The target writer: what the target does with the batches the pipeline
//! ships. [`server`] accepts a source and appends each verified batch durably
//! to the [`journal`] (segment layout in [`format`](mod@format)), which
//! recovers after a crash; [`restore`] rebuilds the disk at any restore
//! point through the [`history`] of both tiers: the journal's short-term
//! points and the long-term base and delta images ([`longterm`], rolled and
//! expired by the [`roller`]); [`failover`] makes a point into a disk
//! production can run on; [`served`] exports a point over NBD in place,
//! without rebuilding it (`cdp serve-point`); [`seed`] digests our copy for
//! a new source's full sync. See `docs/ARCHITECTURE.md`,
//! `docs/REPLICATION.md` and `docs/LONGTERM.md`.
pub mod failover;
pub mod format;
pub mod history;
pub mod journal;
pub mod longterm;
pub mod restore;
pub mod roller;
pub mod seed;
pub mod served;
pub mod server;

pub use journal::{
    BatchMeta, Journal, JournalError, JournalOptions, RecoveryMode, RecoveryReport, RestorePoint,
    TornCause, TornTail,
};
