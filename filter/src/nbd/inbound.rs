//! The receiving side of a connection: one growing buffer that the socket is
//! read into and that messages are split off, so a write payload becomes a
//! `Bytes` without a copy beyond the one from the socket.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// How much to ask the socket for at once when more bytes are needed. Small
/// requests still arrive several per read; a large write payload copies at
/// most this much (what was read past its header) when its buffer is made.
const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug)]
pub struct Inbound<R> {
    reader: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Inbound<R> {
    pub fn new(reader: R) -> Self {
        Inbound {
            reader,
            buf: BytesMut::new(),
        }
    }

    /// The next `n` bytes of the stream. Fails with `UnexpectedEof` if the
    /// peer closes first. Cancel-safe: bytes read so far stay buffered.
    pub async fn take(&mut self, n: usize) -> io::Result<Bytes> {
        while self.buf.len() < n {
            self.buf.reserve((n - self.buf.len()).max(READ_CHUNK));
            if self.reader.read_buf(&mut self.buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "peer closed the connection {} bytes into a {n} byte message",
                        self.buf.len()
                    ),
                ));
            }
        }
        Ok(self.buf.split_to(n).freeze())
    }

    /// Bytes received but not yet taken.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Reads and drops the next `n` bytes.
    pub async fn skip(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            let step = n.min(READ_CHUNK as u64) as usize;
            self.take(step).await?;
            n -= step as u64;
        }
        Ok(())
    }

    pub async fn take_u32(&mut self) -> io::Result<u32> {
        let b = self.take(4).await?;
        Ok(u32::from_be_bytes(b[..].try_into().expect("4 bytes")))
    }
}
