//! The client side of the control socket (`cdp point`): connect, send a
//! request, read replies with a deadline, and say clearly what went wrong.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::protocol::{ProtocolError, Reply, Request, MAX_LINE};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{}: no such control socket (is cdp protect running with --control {}?)", .path.display(), .path.display())]
    Missing { path: PathBuf },
    #[error("{}: permission denied (the control socket is mode 0600: run as the user that runs cdp protect)", .path.display())]
    PermissionDenied { path: PathBuf },
    #[error("{}: nothing listens there (cdp protect is not running, or this is not its control socket)", .path.display())]
    NotRunning { path: PathBuf },
    #[error("{}: {op}: {source}", .path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cdp protect closed the connection before it answered (did it stop?)")]
    Closed,
    #[error("cdp protect did not answer within {0:?}")]
    NoReply(Duration),
    #[error("cdp protect sent something that is not a reply of this protocol: {0}")]
    BadReply(ProtocolError),
}

/// A connection to protect's control socket.
#[derive(Debug)]
pub struct ControlClient {
    path: PathBuf,
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

impl ControlClient {
    pub async fn connect(path: &Path) -> Result<ControlClient, ClientError> {
        let path_buf = path.to_path_buf();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| match source.kind() {
                ErrorKind::NotFound => ClientError::Missing { path: path_buf },
                ErrorKind::PermissionDenied => ClientError::PermissionDenied { path: path_buf },
                ErrorKind::ConnectionRefused => ClientError::NotRunning { path: path_buf },
                _ => ClientError::Io {
                    path: path_buf,
                    op: "connect",
                    source,
                },
            })?;
        let (read, write) = stream.into_split();
        Ok(ControlClient {
            path: path.to_path_buf(),
            read: BufReader::new(read),
            write,
        })
    }

    pub async fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        self.write
            .write_all(request.to_line().as_bytes())
            .await
            .map_err(|source| match source.kind() {
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => ClientError::Closed,
                _ => ClientError::Io {
                    path: self.path.clone(),
                    op: "send a request",
                    source,
                },
            })
    }

    /// The next reply, waiting at most `within`.
    pub async fn reply(&mut self, within: Duration) -> Result<Reply, ClientError> {
        let mut line = Vec::new();
        let mut limited = (&mut self.read).take(MAX_LINE as u64);
        let read = tokio::time::timeout(within, limited.read_until(b'\n', &mut line))
            .await
            .map_err(|_| ClientError::NoReply(within))?;
        match read {
            Ok(0) => Err(ClientError::Closed),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Err(ClientError::Closed),
            Err(source) => Err(ClientError::Io {
                path: self.path.clone(),
                op: "read a reply",
                source,
            }),
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                Reply::parse(&text).map_err(ClientError::BadReply)
            }
        }
    }
}
