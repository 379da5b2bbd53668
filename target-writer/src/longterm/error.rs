//! Everything that can go wrong in the long-term tier. Errors about bytes on
//! disk name the file and, where there is one, the block or offset.

use std::io;
use std::path::PathBuf;

use crate::format::HeaderError;
use crate::restore::RestoreError;

#[derive(Debug, thiserror::Error)]
pub enum LongTermError {
    #[error("{}: {op} at offset {offset}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("{}: {source}", path.display())]
    Format {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
    #[error("{}: block map CRC mismatch (stored {stored:#010x}, computed {computed:#010x})", path.display())]
    MapCrc {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    #[error("{}: block {block} fails its CRC (stored {stored:#010x}, computed {computed:#010x})", path.display())]
    BlockCrc {
        path: PathBuf,
        block: u64,
        stored: u32,
        computed: u32,
    },
    #[error("{}: belongs to another disk or point than the catalog says ({what})", path.display())]
    Mismatch { path: PathBuf, what: &'static str },
    #[error("{}: the catalog names {what}, which is missing", path.display())]
    Missing { path: PathBuf, what: String },
    #[error("{}: another target process is writing here", path.display())]
    Locked { path: PathBuf },
    #[error("journal entry {id} is needed for this but the journal no longer holds it")]
    EntryGone { id: u64 },
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error(transparent)]
    Restore(#[from] Box<RestoreError>),
}

/// Maps an I/O error to a [`LongTermError::Io`] naming `path` and `offset`.
pub(crate) fn io_err(
    path: &std::path::Path,
    op: &'static str,
    offset: u64,
) -> impl FnOnce(io::Error) -> LongTermError {
    let path = path.to_path_buf();
    move |source| LongTermError::Io {
        path,
        op,
        offset,
        source,
    }
}
