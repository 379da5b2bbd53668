//! File-system steps of the long-term tier: the catalog's atomic
//! replacement, renames made durable, the writer's lock on the directory and
//! the readers' pin.
//!
//! The pin: a reader (a restore, `serve-point`) holds a shared `flock` on
//! `longterm/pin` for as long as it reads, and the target takes it
//! exclusively, without waiting, around every step that removes what a
//! reader may use (merging a delta into the base, removing journal
//! segments). A busy pin defers that step; ingest and rolls never wait on it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::error::{io_err, LongTermError};
use crate::format::longterm::{Catalog, CATALOG_FILE, PIN_FILE};

/// The directory's handle, used to make renames and removals durable.
#[derive(Debug)]
pub(crate) struct Dir {
    pub path: PathBuf,
    handle: File,
}

impl Dir {
    /// Opens (creating it if missing) the directory at `path`.
    pub(crate) fn open(path: &Path) -> Result<Dir, LongTermError> {
        if !path.is_dir() {
            std::fs::create_dir_all(path).map_err(io_err(path, "create directory", 0))?;
            if let Some(parent) = path.parent() {
                let parent_handle =
                    File::open(parent).map_err(io_err(parent, "open directory", 0))?;
                parent_handle
                    .sync_all()
                    .map_err(io_err(parent, "fsync directory", 0))?;
            }
        }
        let handle = File::open(path).map_err(io_err(path, "open directory", 0))?;
        Ok(Dir {
            path: path.to_path_buf(),
            handle,
        })
    }

    /// Takes the writer's exclusive lock on the directory, or says who holds it.
    pub(crate) fn lock(&self) -> Result<(), LongTermError> {
        if flock(&self.handle, libc::LOCK_EX | libc::LOCK_NB).map_err(io_err(
            &self.path,
            "lock directory",
            0,
        ))? {
            Ok(())
        } else {
            Err(LongTermError::Locked {
                path: self.path.clone(),
            })
        }
    }

    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub(crate) fn sync(&self) -> Result<(), LongTermError> {
        self.handle
            .sync_all()
            .map_err(io_err(&self.path, "fsync directory", 0))
    }

    /// Renames `from` to `to` (both in this directory), durably.
    pub(crate) fn rename(&self, from: &Path, to: &Path) -> Result<(), LongTermError> {
        std::fs::rename(from, to).map_err(io_err(to, "rename into place", 0))?;
        self.sync()
    }

    /// Removes `path` if it exists (not durable until the next [`Dir::sync`]).
    pub(crate) fn remove(&self, path: &Path) -> Result<(), LongTermError> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path, "remove", 0)(e)),
            _ => Ok(()),
        }
    }

    pub(crate) fn load_catalog(&self) -> Result<Option<Catalog>, LongTermError> {
        load_catalog(&self.path)
    }

    /// Replaces the catalog atomically: a crash leaves the old one or the new one.
    pub(crate) fn store_catalog(&self, catalog: &Catalog) -> Result<(), LongTermError> {
        let path = self.join(CATALOG_FILE);
        let tmp = self.join(&format!("{CATALOG_FILE}.tmp"));
        let raw = catalog.encode().map_err(|source| LongTermError::Format {
            path: path.clone(),
            source,
        })?;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp, "create catalog", 0))?;
        file.write_all_at(&raw, 0)
            .map_err(io_err(&tmp, "write catalog", 0))?;
        file.sync_all().map_err(io_err(&tmp, "fsync catalog", 0))?;
        self.rename(&tmp, &path)
    }
}

/// The catalog in the long-term directory `dir`, if one was ever stored.
pub fn load_catalog(dir: &Path) -> Result<Option<Catalog>, LongTermError> {
    let path = dir.join(CATALOG_FILE);
    match std::fs::read(&path) {
        Ok(raw) => Catalog::decode(&raw)
            .map(Some)
            .map_err(|source| LongTermError::Format { path, source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path, "read catalog", 0)(e)),
    }
}

/// A held pin (shared for readers, exclusive for the target's removals);
/// released when dropped.
#[derive(Debug)]
pub struct Pin {
    _file: File,
}

/// Takes the readers' shared pin on the long-term directory `dir`, waiting
/// for a removal step in progress to finish. `None` if there is no pin file
/// (no target has opened the tier: nothing there to remove). Creates nothing.
pub fn pin_shared(dir: &Path) -> Result<Option<Pin>, LongTermError> {
    let path = dir.join(PIN_FILE);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path, "open pin", 0)(e)),
    };
    flock(&file, libc::LOCK_SH).map_err(io_err(&path, "pin", 0))?;
    Ok(Some(Pin { _file: file }))
}

/// Creates the pin file if missing (the writer does, when it opens the tier).
pub(crate) fn create_pin(dir: &Path) -> Result<(), LongTermError> {
    let path = dir.join(PIN_FILE);
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map(drop)
        .map_err(io_err(&path, "create pin", 0))
}

/// Takes the exclusive pin without waiting; `None` while a reader holds it.
pub(crate) fn pin_exclusive(dir: &Path) -> Result<Option<Pin>, LongTermError> {
    let path = dir.join(PIN_FILE);
    let file = File::open(&path).map_err(io_err(&path, "open pin", 0))?;
    let held = flock(&file, libc::LOCK_EX | libc::LOCK_NB).map_err(io_err(&path, "pin", 0))?;
    Ok(held.then_some(Pin { _file: file }))
}

/// `flock(2)`; `Ok(false)` when a non-blocking lock is held elsewhere.
fn flock(file: &File, operation: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock reads only its integer arguments; `file` stays open for
    // the call because it is borrowed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), operation) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}
