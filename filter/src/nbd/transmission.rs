//! The transmission phase of one connection. A reader loop parses requests
//! (taking write payloads straight out of the receive buffer) and spawns a
//! task per request; tasks reply in any order through one writer task, which
//! batches replies into vectored writes. A budget of in-flight bytes bounds
//! the memory one connection can pin; a request's share is returned only once
//! its reply is written.
//!
//! A malformed request that still lets us find the next one gets an error
//! reply; one that does not (wrong magic, a write payload we cannot buffer)
//! ends this connection only, after the requests already in flight are done.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::handshake::Session;
use super::inbound::Inbound;
use super::wire::*;
use super::{grace_after, Export};
use crate::device::{BlockDevice, DeviceError, ZeroMode};

/// Bytes of payload (reads and writes) one connection may have in flight.
const INFLIGHT_BUDGET: u32 = 256 << 20;
/// What a request without payload counts against the budget.
const MIN_REQUEST_COST: u32 = 4096;

/// Why the transmission phase ended.
#[derive(Debug, thiserror::Error)]
pub enum TransmissionEnd {
    #[error("client disconnected (NBD_CMD_DISC)")]
    Disconnect,
    #[error("client closed the connection between requests")]
    Hangup,
    #[error("server is shutting down")]
    Shutdown,
    #[error(transparent)]
    BadMagic(#[from] BadRequestMagic),
    #[error("write of {length} bytes exceeds the {max} byte maximum payload")]
    PayloadTooBig { length: u32, max: u32 },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One reply, ready to send; the permit returns its budget once sent.
struct Reply {
    head: Bytes,
    data: Bytes,
    _budget: OwnedSemaphorePermit,
}

/// Serves requests until the client disconnects, breaks the protocol, or the
/// server shuts down. Requests in flight are always finished and answered.
pub async fn serve<R, W, D>(
    mut inbound: Inbound<R>,
    out: W,
    export: Arc<Export<D>>,
    session: Session,
    shutdown: CancellationToken,
) -> TransmissionEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    D: BlockDevice,
{
    let (replies, queue) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_replies(out, queue, shutdown.clone()));
    let budget = Arc::new(Semaphore::new(INFLIGHT_BUDGET as usize));
    let end = loop {
        let head = tokio::select! {
            biased;
            () = shutdown.cancelled() => break TransmissionEnd::Shutdown,
            head = inbound.take(REQUEST_LEN) => match head {
                Ok(head) => head,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && inbound.buffered() == 0 => {
                    break TransmissionEnd::Hangup;
                }
                Err(e) => break TransmissionEnd::Io(e),
            },
        };
        let raw: &[u8; REQUEST_LEN] = head[..].try_into().expect("REQUEST_LEN bytes");
        let request = match RequestHeader::parse(raw) {
            Ok(request) => request,
            Err(bad) => break bad.into(),
        };
        if request.command == CMD_DISC {
            break TransmissionEnd::Disconnect;
        }
        let max = export.device.block_sizes().maximum_payload;
        let payload = if request.command == CMD_WRITE {
            if request.length > max {
                break TransmissionEnd::PayloadTooBig {
                    length: request.length,
                    max,
                };
            }
            match inbound.take(request.length as usize).await {
                Ok(payload) => payload,
                Err(e) => break TransmissionEnd::Io(e),
            }
        } else {
            Bytes::new()
        };
        let carries_data = matches!(request.command, CMD_READ | CMD_WRITE) && request.length <= max;
        let cost = if carries_data {
            request.length.max(MIN_REQUEST_COST)
        } else {
            MIN_REQUEST_COST
        };
        let Ok(permit) = budget.clone().acquire_many_owned(cost).await else {
            unreachable!("the budget semaphore is never closed");
        };
        // A write that waits on no device (a page-cache copy) costs less than
        // a task and a cross-thread wake-up: do it right here, in order.
        if request.command == CMD_WRITE
            && export.device.write_is_quick(
                request.offset,
                u64::from(request.length),
                request.flags & CMD_FLAG_FUA != 0,
            )
        {
            let (head, data) = handle(&export, session, request, payload).await;
            let _ = replies.send(Reply {
                head,
                data,
                _budget: permit,
            });
            continue;
        }
        let export = export.clone();
        let replies = replies.clone();
        tokio::spawn(async move {
            let (head, data) = handle(&export, session, request, payload).await;
            // A send fails only if the writer is gone (client hung up).
            let _ = replies.send(Reply {
                head,
                data,
                _budget: permit,
            });
        });
    };
    // Tasks still running hold clones of `replies`; the writer drains them
    // all and finishes once the last one has replied.
    drop(replies);
    if let Ok(Err(e)) = writer.await {
        tracing::debug!(error = %e, "sending replies failed");
    }
    end
}

/// Writes replies as they come, several per system call. Once the server is
/// shutting down, a client that accepts no reply bytes for
/// [`super::SHUTDOWN_GRACE`] is given up on (its requests still complete).
async fn write_replies<W: AsyncWrite + Unpin>(
    mut out: W,
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
        for reply in &sent {
            bufs.push_back(reply.head.clone());
            if !reply.data.is_empty() {
                bufs.push_back(reply.data.clone());
            }
        }
        write_all_vectored(&mut out, &mut bufs, &shutdown).await?;
        sent.clear();
    }
    out.shutdown().await
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
            () = grace_after(shutdown) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "client accepts no replies during shutdown"));
            }
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

/// A request refused before it reaches the device.
type Refusal = (NbdError, String);

/// Performs one request and encodes its reply (header, and data if any).
async fn handle<D: BlockDevice>(
    export: &Export<D>,
    session: Session,
    request: RequestHeader,
    payload: Bytes,
) -> (Bytes, Bytes) {
    let outcome = match validate(export, session, &request) {
        Err(refusal) => Err(refusal),
        Ok(()) => perform(&export.device, request, payload)
            .await
            .map_err(|e| {
                tracing::warn!(handle = request.handle, error = %e, "request failed");
                (nbd_error(&e), e.to_string())
            }),
    };
    encode_reply(session, &request, outcome)
}

/// Checks a request against the export and the protocol before any I/O.
fn validate<D: BlockDevice>(
    export: &Export<D>,
    session: Session,
    request: &RequestHeader,
) -> Result<(), Refusal> {
    let refuse = |error, message: String| Err((error, message));
    let size = export.device.size();
    let max = export.device.block_sizes().maximum_payload;
    let end = request.offset.checked_add(u64::from(request.length));
    let in_range = end.is_some_and(|end| end <= size);
    let allowed_flags = match request.command {
        CMD_READ if session.structured_replies => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => CMD_FLAG_FUA,
    };
    if request.flags & !allowed_flags != 0 {
        return refuse(
            NbdError::Inval,
            format!(
                "flags {:#x} are not valid for command {}",
                request.flags, request.command
            ),
        );
    }
    let writes = matches!(request.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && export.config.read_only {
        return refuse(NbdError::Perm, "the export is read-only".into());
    }
    match request.command {
        CMD_FLUSH => return Ok(()),
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE | CMD_BLOCK_STATUS => {}
        other => return refuse(NbdError::Inval, format!("unknown command {other}")),
    }
    if request.length == 0 {
        return refuse(NbdError::Inval, "zero-length request".into());
    }
    if !in_range {
        let error = if writes && request.command != CMD_TRIM {
            NbdError::NoSpc
        } else {
            NbdError::Inval
        };
        return refuse(
            error,
            format!(
                "{} bytes at offset {} reach past the end of the {size} byte export",
                request.length, request.offset
            ),
        );
    }
    if request.command == CMD_READ && request.length > max {
        let error = if request.flags & CMD_FLAG_DF != 0 {
            NbdError::Overflow
        } else {
            NbdError::Inval
        };
        return refuse(
            error,
            format!(
                "read of {} bytes exceeds the {max} byte maximum payload",
                request.length
            ),
        );
    }
    if request.command == CMD_BLOCK_STATUS && !session.base_allocation {
        return refuse(NbdError::Inval, "no metadata context was selected".into());
    }
    Ok(())
}

/// What a successful request sends back beyond the header.
enum Done {
    Nothing,
    Data(Bytes),
    Extents(Bytes),
}

async fn perform<D: BlockDevice>(
    device: &D,
    request: RequestHeader,
    payload: Bytes,
) -> Result<Done, DeviceError> {
    let fua = request.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (request.offset, u64::from(request.length));
    match request.command {
        CMD_READ => Ok(Done::Data(device.read(offset, request.length).await?)),
        CMD_WRITE => device
            .write(offset, payload, fua)
            .await
            .map(|()| Done::Nothing),
        CMD_FLUSH => device.flush().await.map(|()| Done::Nothing),
        CMD_TRIM => device.trim(offset, len, fua).await.map(|()| Done::Nothing),
        CMD_WRITE_ZEROES => {
            let mode = ZeroMode {
                keep_allocated: request.flags & CMD_FLAG_NO_HOLE != 0,
                fast_only: request.flags & CMD_FLAG_FAST_ZERO != 0,
            };
            device
                .write_zeroes(offset, len, mode, fua)
                .await
                .map(|()| Done::Nothing)
        }
        CMD_CACHE => device.cache(offset, len).await.map(|()| Done::Nothing),
        CMD_BLOCK_STATUS => {
            let mut extents = device.extents(offset, len).await?;
            if request.flags & CMD_FLAG_REQ_ONE != 0 {
                extents.truncate(1);
            }
            let mut payload = BytesMut::with_capacity(4 + 8 * extents.len());
            payload.put_u32(BASE_ALLOCATION_ID);
            for extent in extents {
                // Extent lengths are 32-bit on the wire; a longer run is
                // reported in part, which the protocol allows.
                let length = extent.length.min(u64::from(u32::MAX) & !0xfff) as u32;
                payload.put_u32(length);
                payload.put_u32(if extent.hole {
                    STATE_HOLE | STATE_ZERO
                } else {
                    0
                });
                if u64::from(length) < extent.length {
                    break;
                }
            }
            Ok(Done::Extents(payload.freeze()))
        }
        other => unreachable!("validate() refuses command {other}"),
    }
}

fn nbd_error(e: &DeviceError) -> NbdError {
    match e {
        DeviceError::Io { source, .. } => NbdError::from_io(source),
        DeviceError::SlowZero { .. } => NbdError::NotSup,
        DeviceError::CaptureStopped => NbdError::Io,
    }
}

fn encode_reply(
    session: Session,
    request: &RequestHeader,
    outcome: Result<Done, Refusal>,
) -> (Bytes, Bytes) {
    let mut head = BytesMut::with_capacity(64);
    let handle = request.handle;
    if !session.structured_replies {
        return match outcome {
            Ok(Done::Data(data)) => {
                put_simple_reply(&mut head, 0, handle);
                (head.freeze(), data)
            }
            Ok(_) => {
                put_simple_reply(&mut head, 0, handle);
                (head.freeze(), Bytes::new())
            }
            Err((error, _)) => {
                put_simple_reply(&mut head, error as u32, handle);
                (head.freeze(), Bytes::new())
            }
        };
    }
    match outcome {
        Ok(Done::Data(data)) => {
            put_chunk_header(
                &mut head,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                handle,
                8 + data.len() as u32,
            );
            head.put_u64(request.offset);
            (head.freeze(), data)
        }
        Ok(Done::Extents(payload)) => {
            put_chunk_header(
                &mut head,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                handle,
                payload.len() as u32,
            );
            (head.freeze(), payload)
        }
        Ok(Done::Nothing) => {
            put_chunk_header(&mut head, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0);
            (head.freeze(), Bytes::new())
        }
        Err((error, message)) => {
            put_error_chunk(&mut head, handle, error, &message);
            (head.freeze(), Bytes::new())
        }
    }
}
