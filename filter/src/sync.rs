//! The synchronisation primitives of our own lock-free code, routed through
//! one place so that `--cfg cdp_loom` swaps in loom's model-checked versions
//! (see `wake` and `combine`). A custom cfg name, because tokio changes its
//! own build under a plain `cfg(loom)`. Loom's locks report errors with
//! std's types.

pub(crate) use std::sync::TryLockError;

#[cfg(cdp_loom)]
pub(crate) use loom::sync::{atomic, Mutex, MutexGuard};
#[cfg(not(cdp_loom))]
pub(crate) use std::sync::{atomic, Mutex, MutexGuard};
