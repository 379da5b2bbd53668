//! The receiving side of a connection. Small messages (headers, small write
//! payloads) are split off one buffer that the socket is read into a chunk at
//! a time, so several arrive per read. A message longer than a chunk (a large
//! write payload) is read into a buffer of its own, sized exactly and filled
//! with exactly its bytes, so it becomes a `Bytes` without a copy beyond the
//! one from the socket, and nothing read past its end has to be moved when
//! the next one starts (growing a shared buffer would copy that tail: 5% of
//! our cycles at 1 MiB writes).

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
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
    /// peer closes first. Cancel-safe for `n <= READ_CHUNK` (bytes read so
    /// far stay buffered); a cancelled longer take loses what it read, so
    /// callers cancel only header-sized takes, and a longer one only when
    /// the connection ends.
    pub async fn take(&mut self, n: usize) -> io::Result<Bytes> {
        if n > READ_CHUNK {
            return self.take_long(n).await;
        }
        while self.buf.len() < n {
            self.buf.reserve(READ_CHUNK);
            if self.reader.read_buf(&mut self.buf).await? == 0 {
                return Err(closed_early(self.buf.len(), n));
            }
        }
        Ok(self.buf.split_to(n).freeze())
    }

    /// A message longer than a chunk, in a buffer of its own: what is
    /// already buffered (about a chunk at most), then exactly the rest.
    async fn take_long(&mut self, n: usize) -> io::Result<Bytes> {
        let mut message = BytesMut::with_capacity(n);
        let buffered = self.buf.len().min(n);
        message.extend_from_slice(&self.buf[..buffered]);
        self.buf.advance(buffered);
        while message.len() < n {
            let want = n - message.len();
            let read = self
                .reader
                .read_buf(&mut (&mut message).limit(want))
                .await?;
            if read == 0 {
                return Err(closed_early(message.len(), n));
            }
        }
        Ok(message.freeze())
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

fn closed_early(received: usize, n: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("peer closed the connection {received} bytes into a {n} byte message"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[tokio::test]
    async fn messages_of_every_size_come_out_whole_and_in_order() {
        let (reader, mut writer) = UnixStream::pair().unwrap();
        let sizes = [
            28,
            5,
            READ_CHUNK,
            READ_CHUNK + 1,
            28,
            1 << 20,
            28,
            3 << 20,
            28,
        ];
        let messages: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| pattern(len, i as u8))
            .collect();
        let stream: Vec<u8> = messages.concat();
        let sender = tokio::spawn(async move {
            // Odd-sized pieces, so messages straddle reads.
            for piece in stream.chunks(7919) {
                writer.write_all(piece).await.unwrap();
            }
        });
        let mut inbound = Inbound::new(reader);
        for (i, expected) in messages.iter().enumerate() {
            let got = inbound.take(expected.len()).await.unwrap();
            assert!(
                got[..] == expected[..],
                "message {i} ({} bytes) differs",
                expected.len()
            );
            if expected.len() > READ_CHUNK {
                assert_eq!(inbound.buffered(), 0, "a long message read past its end");
            }
        }
        sender.await.unwrap();
    }

    #[tokio::test]
    async fn a_peer_closing_inside_a_long_message_is_an_unexpected_eof() {
        let (reader, mut writer) = UnixStream::pair().unwrap();
        writer.write_all(&pattern(100_000, 1)).await.unwrap();
        drop(writer);
        let mut inbound = Inbound::new(reader);
        let err = inbound.take(1 << 20).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(
            err.to_string(),
            "peer closed the connection 100000 bytes into a 1048576 byte message"
        );
    }
}
