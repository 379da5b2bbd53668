//! The filter: an NBD server standing in front of a backing disk. Every write
//! reaches the backing disk and is captured into lock-free rings.
pub mod backing;
