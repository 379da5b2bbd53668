//! The target writer: what the target does with the batches the pipeline
//! ships. For now, the journal: [`journal`] appends each received batch
//! durably as a restore point in segment files (layout in
//! [`format`](mod@format)) and recovers them after a crash. Delta images
//! (long-term points under retention) and rebuilding disks from any point
//! come later; see `docs/ARCHITECTURE.md`.
pub mod format;
pub mod journal;

pub use journal::{
    BatchMeta, Journal, JournalError, JournalOptions, RecoveryMode, RecoveryReport, RestorePoint,
    TornCause, TornTail,
};
