//! The filter: an NBD server standing where a hypervisor's I/O filter stands.
//! Every change a client makes reaches the backing disk ([`backing`]) and is
//! captured into lock-free rings ([`capture`]) before it is acknowledged; the
//! protocol layer ([`nbd`]) serves any [`device::BlockDevice`], and
//! [`service`] wires one protected disk, its listeners and its capture sink
//! together. The data path is drawn in `docs/ARCHITECTURE.md`.
pub mod backing;
pub mod capture;
pub mod combine;
pub mod device;
pub mod nbd;
pub mod protected;
pub mod range_lock;
pub mod server;
pub mod service;
mod sync;
pub mod wake;
