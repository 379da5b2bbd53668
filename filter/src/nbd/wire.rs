//! The NBD wire format: magics, flags, option and command numbers, error
//! values, and the encoding of requests and replies. Everything here follows
//! the NBD protocol document (`doc/proto.md` of NetworkBlockDevice/nbd); all
//! integers are big-endian on the wire.

use bytes::{BufMut, BytesMut};

/// "NBDMAGIC", the first thing the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation; also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// NBD_INFO types inside NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// base:allocation extent flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context we serve, and the id we give it.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Longest string (export name, query) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;

/// Error values carried in replies (the protocol's own numbering, which
/// happens to match Linux errno).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdError {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl NbdError {
    /// Maps an I/O error from the backing disk onto the protocol's values.
    pub fn from_io(err: &std::io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => NbdError::Perm,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => NbdError::NoSpc,
            Some(libc::ENOMEM) => NbdError::NoMem,
            Some(libc::EINVAL) => NbdError::Inval,
            Some(libc::EOPNOTSUPP) => NbdError::NotSup,
            _ => NbdError::Io,
        }
    }
}

/// A request header as read from the wire (payload not included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

/// Why a request header could not be parsed; the stream cannot continue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x} (expected {REQUEST_MAGIC:#010x})")]
pub struct BadRequestMagic(pub u32);

impl RequestHeader {
    pub fn parse(raw: &[u8; REQUEST_LEN]) -> Result<Self, BadRequestMagic> {
        let magic = u32::from_be_bytes(raw[0..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            return Err(BadRequestMagic(magic));
        }
        Ok(RequestHeader {
            flags: u16::from_be_bytes([raw[4], raw[5]]),
            command: u16::from_be_bytes([raw[6], raw[7]]),
            handle: u64::from_be_bytes(raw[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(raw[16..24].try_into().expect("8 bytes")),
            length: u32::from_be_bytes(raw[24..28].try_into().expect("4 bytes")),
        })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.command);
        out.put_u64(self.handle);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }
}

/// Appends an option reply header and its payload.
pub fn put_option_reply(out: &mut BytesMut, option: u32, reply_type: u32, payload: &[u8]) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
}

/// Appends a simple reply header (the caller appends read data, if any).
pub fn put_simple_reply(out: &mut BytesMut, error: u32, handle: u64) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(handle);
}

/// Appends a structured reply chunk header announcing `length` payload bytes.
pub fn put_chunk_header(out: &mut BytesMut, flags: u16, chunk_type: u16, handle: u64, length: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(chunk_type);
    out.put_u64(handle);
    out.put_u32(length);
}

/// Appends a final NBD_REPLY_TYPE_ERROR chunk with a human-readable message.
pub fn put_error_chunk(out: &mut BytesMut, handle: u64, error: NbdError, message: &str) {
    let message = &message.as_bytes()[..message.len().min(MAX_STRING)];
    put_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + message.len() as u32,
    );
    out.put_u32(error as u32);
    out.put_u16(message.len() as u16);
    out.put_slice(message);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trips() {
        let req = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        let mut buf = BytesMut::new();
        req.encode(&mut buf);
        let raw: [u8; REQUEST_LEN] = buf[..].try_into().unwrap();
        assert_eq!(RequestHeader::parse(&raw), Ok(req));
    }

    #[test]
    fn wrong_magic_is_refused() {
        let mut raw = [0u8; REQUEST_LEN];
        raw[0..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        assert_eq!(
            RequestHeader::parse(&raw),
            Err(BadRequestMagic(0xdead_beef))
        );
    }

    #[test]
    fn error_chunk_layout() {
        let mut buf = BytesMut::new();
        put_error_chunk(&mut buf, 9, NbdError::Inval, "bad");
        assert_eq!(buf.len(), 20 + 6 + 3);
        assert_eq!(&buf[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&buf[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&buf[16..20], &9u32.to_be_bytes());
        assert_eq!(&buf[20..24], &22u32.to_be_bytes());
    }
}
