//! File-system steps of the journal, each durable before it returns: the
//! writer's lock on the journal directory, creating a segment, and cutting a
//! torn tail off.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::JournalError;
use crate::format::{encode_first_segment, segment_file_name, SegmentHeader, FIRST_SEGMENT_FILE};

/// Maps an I/O error to a [`JournalError::Io`] naming `path` and `offset`.
pub(super) fn io_err(
    path: &Path,
    op: &'static str,
    offset: u64,
) -> impl FnOnce(io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Io {
        path,
        op,
        offset,
        source,
    }
}

/// The journal directory, opened and locked for one writer. The lock lasts as
/// long as the returned handle; the handle also fsyncs the directory.
pub(super) fn lock_dir(dir: &Path) -> Result<File, JournalError> {
    let handle = File::open(dir).map_err(io_err(dir, "open directory", 0))?;
    // SAFETY: flock only reads its integer arguments; the descriptor stays
    // open for the call because `handle` is borrowed.
    let rc = unsafe { libc::flock(handle.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(handle);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(JournalError::Locked {
            path: dir.to_path_buf(),
        })
    } else {
        Err(io_err(dir, "lock directory", 0)(err))
    }
}

/// Makes the directory's entries (created or removed files) durable.
pub(super) fn sync_dir(dir: &Path, handle: &File) -> Result<(), JournalError> {
    handle.sync_all().map_err(io_err(dir, "fsync directory", 0))
}

/// Creates segment `header.number` in `dir` holding just its header, and
/// makes it durable (file and directory). Returns its path and a handle for
/// appending.
pub(super) fn create_segment(
    dir: &Path,
    dir_handle: &File,
    header: &SegmentHeader,
) -> Result<(PathBuf, File), JournalError> {
    let path = dir.join(segment_file_name(header.number));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err(&path, "create segment", 0))?;
    file.write_all_at(&header.encode(), 0)
        .map_err(io_err(&path, "write segment header", 0))?;
    file.sync_all().map_err(io_err(&path, "fsync segment", 0))?;
    sync_dir(dir, dir_handle)?;
    Ok((path, file))
}

/// Opens an existing segment for appending.
pub(super) fn open_for_append(path: &Path) -> Result<File, JournalError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path, "open segment", 0))
}

/// Cuts the segment at `path` to `len` bytes, durably.
pub(super) fn truncate(path: &Path, len: u64) -> Result<(), JournalError> {
    let file = open_for_append(path)?;
    file.set_len(len).map_err(io_err(path, "truncate", len))?;
    file.sync_all().map_err(io_err(path, "fsync segment", len))
}

/// Records, durably, that the journal's segments now start at `number`.
pub(super) fn record_first_segment(
    dir: &Path,
    dir_handle: &File,
    number: u64,
) -> Result<(), JournalError> {
    let path = dir.join(FIRST_SEGMENT_FILE);
    let tmp = dir.join(format!("{FIRST_SEGMENT_FILE}.tmp"));
    let file = File::create(&tmp).map_err(io_err(&tmp, "create", 0))?;
    file.write_all_at(&encode_first_segment(number), 0)
        .map_err(io_err(&tmp, "write", 0))?;
    file.sync_all().map_err(io_err(&tmp, "fsync", 0))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path, "rename into place", 0))?;
    sync_dir(dir, dir_handle)
}

/// Removes the segment files at `paths`, durably.
pub(super) fn remove<'a>(
    dir: &Path,
    dir_handle: &File,
    paths: impl IntoIterator<Item = &'a Path>,
) -> Result<(), JournalError> {
    for path in paths {
        std::fs::remove_file(path).map_err(io_err(path, "remove segment", 0))?;
    }
    sync_dir(dir, dir_handle)
}
