//! The replication pipeline: carries the filter's captured changes to the
//! target writer. Built so far: the pre-shared key ([`key`]) and the frame
//! codec that seals batches for the wire and for storage at rest ([`codec`],
//! with the byte layout in [`frame`]). Still to come: draining the capture
//! rings, cutting a batch every RPO interval (newest data per block wins
//! within a batch) and the TCP transport. See `docs/ARCHITECTURE.md`.
pub mod codec;
pub mod frame;
pub mod key;
