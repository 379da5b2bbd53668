//! The pre-shared replication key: 32 random bytes in a file that only its
//! owner may read or write. This module owns creating that file (fresh
//! random bytes, mode 0600 from the moment it exists, never overwriting) and
//! loading it (refusing loose permissions and wrong lengths). Per-session
//! keys are derived from it in [`crate::codec`]; the key itself never
//! leaves the machine and is never printed.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};

/// Length of a key (and of a key file) in bytes.
pub const KEY_LEN: usize = 32;

/// The pre-shared key. Its `Debug` output never shows the bytes.
#[derive(Clone)]
pub struct Key([u8; KEY_LEN]);

/// Why a key file could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("key file {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("key file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error(
        "key file {path} is accessible by group or others (mode {mode:04o}); run: chmod 600 {path}"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path} holds {len} bytes; a key file holds exactly {KEY_LEN}")]
    Length { path: PathBuf, len: u64 },
    #[error("the system's random number generator failed")]
    Random,
}

impl Key {
    /// Creates a new key file at `path` holding 32 random bytes, created with
    /// mode 0600 (so it is never readable by others, not even briefly), and
    /// returns the key. An existing file is never overwritten.
    pub fn generate(path: impl AsRef<Path>) -> Result<Key, KeyError> {
        let path = path.as_ref();
        let mut bytes = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| KeyError::Random)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => KeyError::Exists { path: path.into() },
                _ => KeyError::Io {
                    path: path.into(),
                    op: "create",
                    source,
                },
            })?;
        if let Err(source) = file.write_all(&bytes).and_then(|()| file.sync_all()) {
            // Leave no partial key behind: a later run could not tell it from
            // a good one. The write error is the one worth reporting.
            let _ = fs::remove_file(path);
            return Err(KeyError::Io {
                path: path.into(),
                op: "write",
                source,
            });
        }
        Ok(Key(bytes))
    }

    /// Loads the key file at `path`. Refuses a file that group or others may
    /// read or write, and a file that is not exactly 32 bytes long.
    pub fn load(path: impl AsRef<Path>) -> Result<Key, KeyError> {
        let path = path.as_ref();
        let io_error = |op| {
            move |source| KeyError::Io {
                path: path.into(),
                op,
                source,
            }
        };
        let mut file = File::open(path).map_err(io_error("open"))?;
        // Checked on the open file, so the file checked is the file read.
        let metadata = file.metadata().map_err(io_error("stat"))?;
        if !metadata.is_file() {
            return Err(KeyError::NotAFile { path: path.into() });
        }
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.into(),
                mode,
            });
        }
        if metadata.len() != KEY_LEN as u64 {
            return Err(KeyError::Length {
                path: path.into(),
                len: metadata.len(),
            });
        }
        let mut bytes = [0u8; KEY_LEN];
        file.read_exact(&mut bytes).map_err(io_error("read"))?;
        Ok(Key(bytes))
    }

    /// The raw key bytes; only key derivation should need them.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let key = Key::generate(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read(&path).unwrap(), key.as_bytes());
        assert_eq!(Key::load(&path).unwrap().as_bytes(), key.as_bytes());
        let other = Key::generate(dir.path().join("other")).unwrap();
        assert_ne!(other.as_bytes(), key.as_bytes());
    }

    #[test]
    fn debug_never_shows_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::generate(dir.path().join("key")).unwrap();
        assert_eq!(format!("{key:?}"), "Key(..)");
        assert_eq!(format!("{key:#?}"), "Key(..)");
    }

    #[test]
    fn existing_file_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        fs::write(&path, b"precious").unwrap();
        let err = Key::generate(&path).unwrap_err();
        assert!(matches!(err, KeyError::Exists { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "key file {} already exists; refusing to overwrite it",
                path.display()
            )
        );
        assert_eq!(fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        Key::generate(&path).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = Key::load(&path).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "key file {p} is accessible by group or others (mode {mode:04o}); run: chmod 600 {p}",
                    p = path.display()
                )
            );
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        Key::load(&path).unwrap();
    }

    #[test]
    fn wrong_length_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0, 31, 33, 64] {
            let path = dir.path().join(format!("key{len}"));
            fs::write(&path, vec![7u8; len]).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = Key::load(&path).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "key file {} holds {len} bytes; a key file holds exactly 32",
                    path.display()
                )
            );
        }
    }

    #[test]
    fn missing_file_and_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = Key::load(&missing).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("key file {}: open: ", missing.display())),
            "{err}"
        );
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let err = Key::load(dir.path()).unwrap_err();
        assert!(matches!(err, KeyError::NotAFile { .. }), "{err:?}");
    }
}
