//! The transmission phase of one connection. A reader loop parses requests
//! (taking write payloads straight out of the receive buffer) and spawns a
//! task per request; tasks reply in any order through one writer task
//! ([`super::outbound`]). Requests that wait on no device are done in the
//! reader loop itself: a write into the page cache, and a read the page cache
//! holds, which is answered with the file range to send. A large write done
//! there is answered at once by the reader itself ([`REPLY_AT_ONCE`]). A
//! budget of in-flight bytes bounds the memory one connection can pin; a
//! request's share is returned only once its reply is written.
//!
//! A malformed request that still lets us find the next one gets an error
//! reply; one that does not (wrong magic, a write payload we cannot buffer)
//! ends this connection only, after the requests already in flight are done.

use std::io;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncRead;
use tokio::sync::{mpsc, Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

use super::handshake::Session;
use super::inbound::Inbound;
use super::outbound::{write_replies, write_reply_now, Reply, ReplyData, ReplySink};
use super::wire::*;
use super::Export;
use crate::device::{BlockDevice, DeviceError, FileRange, ZeroMode};

/// Bytes of payload (reads and writes) one connection may have in flight.
const INFLIGHT_BUDGET: u32 = 256 << 20;
/// What a request without payload counts against the budget.
const MIN_REQUEST_COST: u32 = 4096;
/// Writes at least this long that the reader did itself are answered at
/// once, not through the writer task. A reply of its own costs a system call
/// and wakes the client, worth it only where the client would otherwise sit
/// idle: with 1 MiB writes' replies batched behind their successors, the
/// client waited so often that the machine was idle 13–14% of the time,
/// against 8–9% with nbdkit and 6% with replies at once
/// (`docs/BENCHMARKS.md`, "1 MiB writes"). For small writes, batching the
/// replies is cheaper.
const REPLY_AT_ONCE: u32 = 128 << 10;

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
    W: ReplySink,
    D: BlockDevice,
{
    let (replies, queue) = mpsc::unbounded_channel();
    let out = Arc::new(Mutex::new(out));
    let writer = tokio::spawn(write_replies(out.clone(), queue, shutdown.clone()));
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
        // A request that waits on no device costs less than a task and a
        // cross-thread wake-up: do it right here, in order.
        let quick_write = request.command == CMD_WRITE
            && export.device.write_is_quick(
                request.offset,
                u64::from(request.length),
                request.flags & CMD_FLAG_FUA != 0,
            );
        let (head, data) = if let Some(range) = cached_read(&export, session, &request) {
            encode_reply(session, &request, Ok(Done::File(range)))
        } else if quick_write {
            let (head, data) = handle(&export, session, request, payload).await;
            if request.length >= REPLY_AT_ONCE && data.is_empty() {
                match write_reply_now(&out, head.clone(), &shutdown).await {
                    Some(Ok(())) => continue,
                    Some(Err(e)) => break TransmissionEnd::Io(e),
                    None => {}
                }
            }
            (head, data)
        } else {
            let export = export.clone();
            let replies = replies.clone();
            tokio::spawn(async move {
                let (head, data) = handle(&export, session, request, payload).await;
                // A send fails only if the writer is gone (client hung up).
                let _ = replies.send(Reply {
                    head,
                    data,
                    budget: permit,
                });
            });
            continue;
        };
        let _ = replies.send(Reply {
            head,
            data,
            budget: permit,
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

/// A request refused before it reaches the device.
type Refusal = (NbdError, String);

/// The file range that answers `request` if it is a valid read of bytes the
/// page cache holds.
fn cached_read<D: BlockDevice>(
    export: &Export<D>,
    session: Session,
    request: &RequestHeader,
) -> Option<FileRange> {
    if request.command != CMD_READ || validate(export, session, request).is_err() {
        return None;
    }
    export.device.cached_range(request.offset, request.length)
}

/// Performs one request and encodes its reply (header, and data if any).
async fn handle<D: BlockDevice>(
    export: &Export<D>,
    session: Session,
    request: RequestHeader,
    payload: Bytes,
) -> (Bytes, ReplyData) {
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
    File(FileRange),
    Extents(Bytes),
}

impl Done {
    /// What follows the reply's header.
    fn into_data(self) -> ReplyData {
        match self {
            Done::Nothing => ReplyData::Bytes(Bytes::new()),
            Done::Data(bytes) | Done::Extents(bytes) => ReplyData::Bytes(bytes),
            Done::File(range) => ReplyData::File(range),
        }
    }
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
) -> (Bytes, ReplyData) {
    let mut head = BytesMut::with_capacity(64);
    let handle = request.handle;
    let nothing = || ReplyData::Bytes(Bytes::new());
    if !session.structured_replies {
        let (error, data) = match outcome {
            Ok(done) => (0, done.into_data()),
            Err((error, _)) => (error as u32, nothing()),
        };
        put_simple_reply(&mut head, error, handle);
        return (head.freeze(), data);
    }
    let data = match outcome {
        Ok(done @ (Done::Data(_) | Done::File(_))) => {
            let data = done.into_data();
            let length = 8 + data.len() as u32;
            put_chunk_header(
                &mut head,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                handle,
                length,
            );
            head.put_u64(request.offset);
            data
        }
        Ok(Done::Extents(payload)) => {
            let length = payload.len() as u32;
            put_chunk_header(
                &mut head,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                handle,
                length,
            );
            ReplyData::Bytes(payload)
        }
        // A success without data is a simple reply, which the spec allows
        // for every command but READ (which always has data). Like nbdkit
        // and qemu-nbd: libnbd reads a simple reply in one `recv`, a chunk
        // header in two (16 bytes, then the 4 that differ).
        Ok(Done::Nothing) => {
            put_simple_reply(&mut head, 0, handle);
            nothing()
        }
        Err((error, message)) => {
            put_error_chunk(&mut head, handle, error, &message);
            nothing()
        }
    };
    (head.freeze(), data)
}
