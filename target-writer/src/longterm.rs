//! The long-term tier: restore points kept beyond the journal, bounded in
//! space. The target rolls journal entries into a point on a schedule and
//! for every tagged point: the first roll makes `base.img` (the whole disk at
//! that point, a sparse raw image), each later one a delta image holding only
//! the blocks changed since the previous long-term point. Retention merges
//! the oldest delta into the base. Layout in [`crate::format::longterm`];
//! design in `docs/LONGTERM.md`.
//!
//! Inside: `store` is the target's writer (roll, merge, recovery), `image`
//! one layer read back, `builder` writes a layer, `chain` reads a point
//! through its layers, `copy` writes a point's layers into an image, `files` the durable file-system steps and the pin that
//! keeps readers safe from removals, `error` the errors.

mod builder;
mod chain;
mod copy;
mod error;
mod files;
mod image;
mod store;
#[cfg(test)]
mod tests;

pub(crate) use builder::ImageBuilder;
pub use chain::{PointImage, Run};
pub use copy::{apply_direct, copy_layers, direct_buffer, open_direct};
pub use error::LongTermError;
pub use files::{load_catalog, pin_shared, Pin};
pub use image::{BlockMap, Layer};
pub use store::{crash_point, LongTermStore};
