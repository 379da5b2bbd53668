//! The control socket's file: bound with mode 0600 before anyone can
//! connect, never over anything but a stale socket, and removed on exit.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

use super::ControlError;

/// Connections that may wait to be accepted.
const BACKLOG: i32 = 16;

/// The socket file this process bound; removed when dropped, unless
/// something else has taken its place meanwhile.
#[derive(Debug)]
pub(super) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| meta.dev() == self.dev && meta.ino() == self.ino);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), "cannot remove the control socket: {e}");
            }
        }
    }
}

/// Binds a listening Unix socket at `path`, mode 0600. An existing socket
/// nobody listens on (left by a crash) is replaced; anything else at
/// `path` is refused.
pub(super) fn bind(path: &Path) -> Result<(UnixListener, SocketFile), ControlError> {
    let io = |op: &'static str| {
        let path = path.to_path_buf();
        move |source| ControlError::Io { path, op, source }
    };
    remove_stale(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(io("create socket"))?;
    let address = SockAddr::unix(path).map_err(io("socket address"))?;
    socket.bind(&address).map_err(io("bind"))?;
    // Not listening yet, so nobody can connect before the mode is 0600.
    let restricted = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::symlink_metadata(path));
    let meta = match restricted {
        Ok(meta) => meta,
        Err(e) => {
            let _ = std::fs::remove_file(path);
            return Err(io("chmod 0600")(e));
        }
    };
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    socket.listen(BACKLOG).map_err(io("listen"))?;
    socket
        .set_nonblocking(true)
        .map_err(io("set non-blocking"))?;
    Ok((UnixListener::from(socket), file))
}

/// Removes a socket at `path` that nobody listens on; refuses a live socket
/// or anything that is not a socket.
fn remove_stale(path: &Path) -> Result<(), ControlError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ControlError::Io {
                path: path.to_path_buf(),
                op: "stat",
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ControlError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            tracing::warn!(path = %path.display(), "replacing a stale control socket nobody listens on");
            std::fs::remove_file(path).map_err(|source| ControlError::Io {
                path: path.to_path_buf(),
                op: "remove stale socket",
                source,
            })
        }
        Err(source) => Err(ControlError::Io {
            path: path.to_path_buf(),
            op: "probe existing socket",
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_private_replaces_a_stale_one_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let (listener, file) = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A live socket is not taken over.
        assert!(matches!(bind(&path), Err(ControlError::InUse { .. })));
        // A crash leaves the file but nobody listening: it is replaced.
        drop(listener);
        std::mem::forget(file);
        let (_listener, file) = bind(&path).unwrap();
        drop(file);
        assert!(!path.exists(), "the socket file was left behind");
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(bind(&path), Err(ControlError::NotASocket { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }
}
