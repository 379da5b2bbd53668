//! Fixed newstyle negotiation: from the greeting to the start of the
//! transmission phase (or the end of the connection).

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::inbound::Inbound;
use super::wire::*;
use super::Export;
use crate::device::BlockDevice;

/// What the client and server agreed on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Session {
    pub structured_replies: bool,
    /// `base:allocation` was selected with NBD_OPT_SET_META_CONTEXT.
    pub base_allocation: bool,
}

/// Why negotiation ended without entering transmission.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeEnd {
    #[error("client aborted the negotiation")]
    Aborted,
    #[error("client flags {0:#x} include unknown bits")]
    BadClientFlags(u32),
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error(
        "option {option} carries {length} bytes of data, more than the {MAX_OPTION_DATA} allowed"
    )]
    OptionTooBig { option: u32, length: u32 },
    #[error("NBD_OPT_EXPORT_NAME asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("server is shutting down")]
    Shutdown,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Largest option payload we read (names and queries are at most 4 KiB each).
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Largest option payload we read past to stay in step with the client.
pub const MAX_SKIPPED_OPTION_DATA: u32 = 32 << 20;

/// Runs the negotiation. On success the connection is in the transmission
/// phase with the returned session.
pub async fn negotiate<R, W, D>(
    inbound: &mut Inbound<R>,
    out: &mut W,
    export: &Export<D>,
    shutdown: &CancellationToken,
) -> Result<Session, HandshakeEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    D: BlockDevice,
{
    let mut greeting = BytesMut::with_capacity(18);
    greeting.put_u64(NBDMAGIC);
    greeting.put_u64(IHAVEOPT);
    greeting.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    out.write_all(&greeting).await?;

    let client_flags = inbound.take_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeEnd::BadClientFlags(client_flags));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut session = Session::default();

    loop {
        let head = inbound.take(16).await?;
        let magic = u64::from_be_bytes(head[0..8].try_into().expect("8 bytes"));
        if magic != IHAVEOPT {
            return Err(HandshakeEnd::BadOptionMagic(magic));
        }
        let option = u32::from_be_bytes(head[8..12].try_into().expect("4 bytes"));
        let length = u32::from_be_bytes(head[12..16].try_into().expect("4 bytes"));
        if length > MAX_OPTION_DATA {
            // Skip what we can afford to read and answer; beyond that,
            // reading on would only serve a denial of service.
            let known = matches!(
                option,
                OPT_EXPORT_NAME
                    | OPT_ABORT
                    | OPT_LIST
                    | OPT_INFO
                    | OPT_GO
                    | OPT_STRUCTURED_REPLY
                    | OPT_LIST_META_CONTEXT
                    | OPT_SET_META_CONTEXT
            );
            let skippable = length <= MAX_SKIPPED_OPTION_DATA && option != OPT_EXPORT_NAME;
            if skippable {
                inbound.skip(u64::from(length)).await?;
            }
            if option != OPT_EXPORT_NAME {
                let (reply_type, message) = if known || !skippable {
                    (REP_ERR_TOO_BIG, "option data too large")
                } else {
                    (REP_ERR_UNSUP, "option not supported by this server")
                };
                let mut reply = BytesMut::new();
                put_option_reply(&mut reply, option, reply_type, message.as_bytes());
                out.write_all(&reply).await?;
            }
            if skippable {
                continue;
            }
            return Err(HandshakeEnd::OptionTooBig { option, length });
        }
        let data = inbound.take(length as usize).await?;
        let mut reply = BytesMut::new();
        if shutdown.is_cancelled() && option != OPT_ABORT {
            put_option_reply(
                &mut reply,
                option,
                REP_ERR_SHUTDOWN,
                b"server is shutting down",
            );
            out.write_all(&reply).await?;
            return Err(HandshakeEnd::Shutdown);
        }
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                if !export.answers_to(&name) {
                    return Err(HandshakeEnd::UnknownExport(name));
                }
                reply.put_u64(export.device.size());
                reply.put_u16(export.transmission_flags(session));
                if !no_zeroes {
                    reply.put_bytes(0, 124);
                }
                out.write_all(&reply).await?;
                return Ok(session);
            }
            OPT_ABORT => {
                put_option_reply(&mut reply, option, REP_ACK, &[]);
                // The client may already have gone; that is fine.
                let _ = out.write_all(&reply).await;
                return Err(HandshakeEnd::Aborted);
            }
            OPT_LIST if !data.is_empty() => {
                invalid(&mut reply, option, "NBD_OPT_LIST takes no data")
            }
            OPT_LIST => {
                let mut server = BytesMut::new();
                server.put_u32(export.config.name.len() as u32);
                server.put_slice(export.config.name.as_bytes());
                server.put_slice(export.config.description.as_bytes());
                put_option_reply(&mut reply, option, REP_SERVER, &server);
                put_option_reply(&mut reply, option, REP_ACK, &[]);
            }
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                invalid(&mut reply, option, "NBD_OPT_STRUCTURED_REPLY takes no data")
            }
            OPT_STRUCTURED_REPLY => {
                session.structured_replies = true;
                put_option_reply(&mut reply, option, REP_ACK, &[]);
            }
            OPT_INFO | OPT_GO => {
                let entered = info_or_go(&mut reply, option, data, export, session);
                out.write_all(&reply).await?;
                if entered && option == OPT_GO {
                    return Ok(session);
                }
                continue;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(&mut reply, option, data, export, &mut session)
            }
            _ => {
                let message = format!("option {option} is not supported by this server");
                put_option_reply(&mut reply, option, REP_ERR_UNSUP, message.as_bytes());
            }
        }
        out.write_all(&reply).await?;
    }
}

fn invalid(reply: &mut BytesMut, option: u32, message: &str) {
    put_option_reply(reply, option, REP_ERR_INVALID, message.as_bytes());
}

/// Reads a u32-length-prefixed string; `None` if the data is too short or
/// the string too long.
fn take_string(data: &mut Bytes) -> Option<String> {
    if data.remaining() < 4 {
        return None;
    }
    let len = data.get_u32() as usize;
    if len > MAX_STRING || data.remaining() < len {
        return None;
    }
    let raw = data.split_to(len);
    String::from_utf8(raw.to_vec()).ok()
}

/// Answers NBD_OPT_INFO or NBD_OPT_GO; returns whether the export was found.
fn info_or_go<D: BlockDevice>(
    reply: &mut BytesMut,
    option: u32,
    mut data: Bytes,
    export: &Export<D>,
    session: Session,
) -> bool {
    let Some(name) = take_string(&mut data) else {
        invalid(reply, option, "malformed export name");
        return false;
    };
    if data.remaining() < 2 {
        invalid(reply, option, "missing information request count");
        return false;
    }
    let count = data.get_u16() as usize;
    if data.remaining() != count * 2 {
        invalid(
            reply,
            option,
            "information request count does not match the data length",
        );
        return false;
    }
    let requests: Vec<u16> = (0..count).map(|_| data.get_u16()).collect();
    if !export.answers_to(&name) {
        let message = format!("no export named {name:?}");
        put_option_reply(reply, option, REP_ERR_UNKNOWN, message.as_bytes());
        return false;
    }
    let mut info = BytesMut::new();
    info.put_u16(INFO_EXPORT);
    info.put_u64(export.device.size());
    info.put_u16(export.transmission_flags(session));
    put_option_reply(reply, option, REP_INFO, &info);
    if requests.contains(&INFO_NAME) {
        let mut info = BytesMut::new();
        info.put_u16(INFO_NAME);
        info.put_slice(export.config.name.as_bytes());
        put_option_reply(reply, option, REP_INFO, &info);
    }
    if requests.contains(&INFO_DESCRIPTION) {
        let mut info = BytesMut::new();
        info.put_u16(INFO_DESCRIPTION);
        info.put_slice(export.config.description.as_bytes());
        put_option_reply(reply, option, REP_INFO, &info);
    }
    let sizes = export.device.block_sizes();
    let mut info = BytesMut::new();
    info.put_u16(INFO_BLOCK_SIZE);
    info.put_u32(sizes.minimum);
    info.put_u32(sizes.preferred);
    info.put_u32(sizes.maximum_payload);
    put_option_reply(reply, option, REP_INFO, &info);
    put_option_reply(reply, option, REP_ACK, &[]);
    true
}

/// Answers NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT. The only
/// context is `base:allocation`, matched by itself or by the `base:` namespace.
fn meta_context<D: BlockDevice>(
    reply: &mut BytesMut,
    option: u32,
    mut data: Bytes,
    export: &Export<D>,
    session: &mut Session,
) {
    if !session.structured_replies {
        invalid(
            reply,
            option,
            "metadata contexts need structured replies first",
        );
        return;
    }
    let Some(name) = take_string(&mut data) else {
        invalid(reply, option, "malformed export name");
        return;
    };
    if data.remaining() < 4 {
        invalid(reply, option, "missing query count");
        return;
    }
    let count = data.get_u32();
    let mut queries = Vec::new();
    for _ in 0..count {
        let Some(query) = take_string(&mut data) else {
            invalid(reply, option, "malformed query");
            return;
        };
        queries.push(query);
    }
    if data.has_remaining() {
        invalid(reply, option, "trailing data after the queries");
        return;
    }
    if !export.answers_to(&name) {
        let message = format!("no export named {name:?}");
        put_option_reply(reply, option, REP_ERR_UNKNOWN, message.as_bytes());
        return;
    }
    let listing = option == OPT_LIST_META_CONTEXT;
    let selected = (listing && queries.is_empty())
        || queries
            .iter()
            .any(|q| q == BASE_ALLOCATION || (listing && q == "base:"));
    if !listing {
        session.base_allocation = selected;
    }
    if selected {
        let mut context = BytesMut::new();
        context.put_u32(if listing { 0 } else { BASE_ALLOCATION_ID });
        context.put_slice(BASE_ALLOCATION.as_bytes());
        put_option_reply(reply, option, REP_META_CONTEXT, &context);
    }
    put_option_reply(reply, option, REP_ACK, &[]);
}
