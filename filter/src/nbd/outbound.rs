//! The sending side of a connection: one task writes the replies of every
//! request in the order they are done, several per system call. Read data
//! that is a range of a file in the page cache goes out with `sendfile(2)`,
//! straight from the page cache into the socket, never through our memory.
//! The reader may also write a reply itself, at once, whenever that task is
//! not in the middle of a batch ([`write_reply_now`]): the socket is shared
//! behind an async mutex, held for a whole batch or a whole reply, so replies
//! never interleave.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{tcp, unix};
use tokio::sync::{mpsc, Mutex, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::grace_after;
use crate::device::FileRange;

/// What follows a reply's header.
#[derive(Debug)]
pub enum ReplyData {
    /// Bytes in memory (empty for none).
    Bytes(Bytes),
    /// A range of a file, sent from the page cache.
    File(FileRange),
}

impl ReplyData {
    pub fn len(&self) -> usize {
        match self {
            ReplyData::Bytes(bytes) => bytes.len(),
            ReplyData::File(range) => range.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One reply, ready to send; the permit returns the request's share of the
/// connection's budget once the reply is written.
#[derive(Debug)]
pub struct Reply {
    pub head: Bytes,
    pub data: ReplyData,
    pub budget: OwnedSemaphorePermit,
}

/// A socket replies are written to.
pub trait ReplySink: AsyncWrite + Unpin + Send + 'static {
    /// Writes the whole range to the socket from the file's page cache.
    fn send_file(&mut self, range: &FileRange) -> impl Future<Output = io::Result<()>> + Send;

    /// Holds back partial segments until `corked` is set false again, so a
    /// batch of headers and file ranges leaves in full segments (TCP_CORK;
    /// nothing on sockets without segments). Only an optimisation: a socket
    /// that refuses keeps sending as it did, and the refusal is logged.
    fn cork(&self, corked: bool);
}

/// Both socket types tokio splits into owned halves: the write half lends
/// its stream, whose readiness the `sendfile(2)` loop waits on.
macro_rules! reply_sink_for_write_half {
    ($half:ty, $segments:expr) => {
        impl ReplySink for $half {
            fn cork(&self, corked: bool) {
                if $segments {
                    if let Err(e) = set_cork(self.as_ref().as_raw_fd(), corked) {
                        tracing::debug!(error = %e, corked, "TCP_CORK refused");
                    }
                }
            }

            async fn send_file(&mut self, range: &FileRange) -> io::Result<()> {
                let stream = self.as_ref();
                let mut sent = 0;
                while sent < range.len {
                    stream.writable().await?;
                    let step = stream.try_io(Interest::WRITABLE, || {
                        sendfile(stream.as_raw_fd(), range, sent)
                    });
                    match step {
                        Ok(n) => sent += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
        }
    };
}
reply_sink_for_write_half!(tcp::OwnedWriteHalf, true);
reply_sink_for_write_half!(unix::OwnedWriteHalf, false);

fn set_cork(socket: RawFd, corked: bool) -> io::Result<()> {
    let value = libc::c_int::from(corked);
    // SAFETY: setsockopt reads a c_int that lives for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket,
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One `sendfile(2)` of what is left of `range` after its first `sent` bytes.
fn sendfile(socket: RawFd, range: &FileRange, sent: usize) -> io::Result<usize> {
    let mut offset = (range.offset + sent as u64) as libc::off_t;
    // SAFETY: sendfile takes two descriptors (both open: the socket is
    // borrowed from its stream, the file from `range`) and updates `offset`,
    // which lives on this stack frame; no user buffer is involved.
    let n = unsafe {
        libc::sendfile(
            socket,
            range.file.as_raw_fd(),
            &mut offset,
            range.len - sent,
        )
    };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        0 => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the disk ends at byte {offset}, inside a read being sent from it"),
        )),
        n => Ok(n as usize),
    }
}

/// Writes `head` (a reply without data) to the socket at once, unless the
/// writer task holds it for a batch: then `None`, and the reply goes through
/// the queue like any other.
pub async fn write_reply_now<W: ReplySink>(
    out: &Mutex<W>,
    head: Bytes,
    shutdown: &CancellationToken,
) -> Option<io::Result<()>> {
    let mut out = out.try_lock().ok()?;
    let mut bufs = VecDeque::from([head]);
    Some(write_all_vectored(&mut *out, &mut bufs, shutdown).await)
}

/// Writes replies as they come. Once the server is shutting down, a client
/// that accepts no reply bytes for [`super::SHUTDOWN_GRACE`] is given up on
/// (its requests still complete).
pub async fn write_replies<W: ReplySink>(
    out: Arc<Mutex<W>>,
    mut queue: mpsc::UnboundedReceiver<Reply>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    const BATCH: usize = 64;
    let mut sent = Vec::with_capacity(BATCH);
    let mut bufs = VecDeque::with_capacity(2 * BATCH);
    while let Some(first) = queue.recv().await {
        sent.push(first);
        while sent.len() < BATCH {
            match queue.try_recv() {
                Ok(reply) => sent.push(reply),
                Err(_) => break,
            }
        }
        let mut out = out.lock().await;
        let files = sent.iter().any(|r| matches!(r.data, ReplyData::File(_)));
        if files {
            out.cork(true);
        }
        for reply in &sent {
            bufs.push_back(reply.head.clone());
            match &reply.data {
                _ if reply.data.is_empty() => {}
                ReplyData::Bytes(data) => bufs.push_back(data.clone()),
                ReplyData::File(range) => {
                    write_all_vectored(&mut *out, &mut bufs, &shutdown).await?;
                    tokio::select! {
                        done = out.send_file(range) => done?,
                        () = grace_after(&shutdown) => return Err(refused_during_shutdown()),
                    }
                }
            }
        }
        write_all_vectored(&mut *out, &mut bufs, &shutdown).await?;
        if files {
            out.cork(false);
        }
        sent.clear();
    }
    out.lock().await.shutdown().await
}

fn refused_during_shutdown() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "client accepts no replies during shutdown",
    )
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    out: &mut W,
    bufs: &mut VecDeque<Bytes>,
    shutdown: &CancellationToken,
) -> io::Result<()> {
    while !bufs.is_empty() {
        let slices: Vec<IoSlice<'_>> = bufs.iter().take(256).map(|b| IoSlice::new(b)).collect();
        let mut written = tokio::select! {
            written = out.write_vectored(&slices) => written?,
            () = grace_after(shutdown) => return Err(refused_during_shutdown()),
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let front = bufs
                .front_mut()
                .expect("written bytes come from queued buffers");
            if written >= front.len() {
                written -= front.len();
                bufs.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncRead, AsyncReadExt};
    use tokio::net::{TcpListener, TcpStream, UnixStream};
    use tokio::sync::Semaphore;

    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    fn file_with(data: &[u8]) -> Arc<File> {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(data, 0).unwrap();
        Arc::new(file)
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    /// Reads everything until the peer closes, after a pause that lets the
    /// sender fill the socket buffers.
    fn read_all_later(
        mut peer: impl AsyncRead + Unpin + Send + 'static,
    ) -> tokio::task::JoinHandle<Vec<u8>> {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got
        })
    }

    #[tokio::test]
    async fn a_range_larger_than_the_socket_buffers_arrives_whole() {
        let data = pattern(8 << 20);
        let range = FileRange {
            file: file_with(&data),
            offset: 12345,
            len: 6 << 20,
        };
        let (client, server) = tcp_pair().await;
        let reader = read_all_later(client);
        let (_, mut out) = server.into_split();
        out.send_file(&range).await.unwrap();
        drop(out);
        let got = reader.await.unwrap();
        assert!(
            got == data[12345..12345 + (6 << 20)],
            "{} bytes arrived, not the range",
            got.len()
        );
    }

    #[tokio::test]
    async fn a_range_past_the_end_of_the_file_is_an_error() {
        let range = FileRange {
            file: file_with(&pattern(4096)),
            offset: 0,
            len: 8192,
        };
        let (client, server) = tcp_pair().await;
        let reader = read_all_later(client);
        let (_, mut out) = server.into_split();
        let err = out.send_file(&range).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        assert!(err.to_string().contains("byte 4096"), "{err}");
        drop(out);
        assert_eq!(reader.await.unwrap(), pattern(4096));
    }

    /// Forty replies of every kind, and the bytes they make on the wire.
    fn mixed_replies(data: &[u8], file: &Arc<File>) -> (Vec<Reply>, Vec<u8>) {
        let budget = Arc::new(Semaphore::new(64));
        let mut replies = Vec::new();
        let mut expected = Vec::new();
        for i in 0..40usize {
            let head = Bytes::from(format!("<{i}>"));
            expected.extend_from_slice(&head);
            let data = match i % 3 {
                0 => ReplyData::Bytes(Bytes::new()),
                1 => ReplyData::Bytes(Bytes::from(vec![i as u8; 100 + i])),
                _ => {
                    let (offset, len) = (i * 9999, 20000 + i);
                    expected.extend_from_slice(&data[offset..offset + len]);
                    let range = FileRange {
                        file: file.clone(),
                        offset: offset as u64,
                        len,
                    };
                    ReplyData::File(range)
                }
            };
            if let ReplyData::Bytes(bytes) = &data {
                expected.extend_from_slice(bytes);
            }
            let budget = budget.clone().try_acquire_owned().unwrap();
            replies.push(Reply { head, data, budget });
        }
        (replies, expected)
    }

    /// What `peer` receives when the writer task sends `replies` to `out`.
    async fn sent_through(
        out: impl ReplySink,
        peer: impl AsyncRead + Unpin + Send + 'static,
        replies: Vec<Reply>,
    ) -> Vec<u8> {
        let reader = read_all_later(peer);
        let (queue, received) = mpsc::unbounded_channel();
        for reply in replies {
            queue.send(reply).unwrap();
        }
        drop(queue);
        write_replies(
            Arc::new(Mutex::new(out)),
            received,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        reader.await.unwrap()
    }

    /// Replies of every kind, over TCP (corked) and a Unix socket, arrive
    /// in the order they were queued.
    #[tokio::test]
    async fn replies_mixing_bytes_and_file_ranges_keep_their_order() {
        let data = pattern(1 << 20);
        let file = file_with(&data);

        let (replies, expected) = mixed_replies(&data, &file);
        let (client, server) = tcp_pair().await;
        let got = sent_through(server.into_split().1, client, replies).await;
        assert!(got == expected, "TCP: replies out of order or damaged");

        let (replies, expected) = mixed_replies(&data, &file);
        let (client, server) = UnixStream::pair().unwrap();
        let got = sent_through(server.into_split().1, client, replies).await;
        assert!(
            got == expected,
            "Unix socket: replies out of order or damaged"
        );
    }
}
