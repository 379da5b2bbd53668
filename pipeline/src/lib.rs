//! The replication pipeline (not built yet): drains the filter's capture rings,
//! cuts a batch every RPO interval (newest data per block wins within a batch),
//! compresses with zstd, encrypts with AES-256-GCM and ships batches to the
//! target writer over TCP. See `docs/ARCHITECTURE.md`.
pub mod batch;
pub mod cutter;
