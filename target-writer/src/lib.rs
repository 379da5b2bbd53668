//! The target writer (not built yet): appends shipped batches to journal
//! segments (short-term, crash-consistent restore points), rolls them into delta
//! images (long-term points) under retention, and rebuilds disks from any point.
//! See `docs/ARCHITECTURE.md`.
