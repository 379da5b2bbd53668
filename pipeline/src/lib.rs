//! The replication pipeline: carries the filter's captured changes to the
//! target writer. The pre-shared key ([`key`]); batches, the net effect of a
//! run of records with the newest data per byte winning ([`batch`]), cut
//! every RPO interval from the capture ring ([`cutter`]); the frame codec
//! that seals batches for the wire and for storage at rest ([`codec`], byte
//! layout in [`frame`]); the control socket through which tagged points
//! are asked for ([`control`]). See `docs/REPLICATION.md`. After a
//! failover, [`failback`] ships back only the chunks in which the disks
//! differ. A new source process seeds its full sync from the replica
//! ([`seed`]): it copies only the chunks that differ from the target's copy.
pub mod batch;
pub mod codec;
pub mod control;
pub mod cutter;
pub mod failback;
pub mod frame;
pub mod key;
pub mod protect;
pub mod seed;
pub mod session;
pub mod shipper;
