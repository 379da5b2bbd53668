//! The raw NBD client of `tests/bad_input.rs`: protocol constants, a client
//! that sends exactly the bytes a test gives it and reads replies apart, and
//! the checks every case shares (the filter still serves, its log explains
//! every connection it closed).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::*;

// Protocol constants (doc/proto.md; the server's are in filter/src/nbd/wire.rs).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_DF: u16 = 1 << 7;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

pub const INFO_EXPORT: u16 = 0;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;

pub const DISK_SIZE: u64 = 16 << 20;
/// A hang fails the test after this long instead of blocking it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// A raw NBD client.

pub struct Client {
    pub sock: TcpStream,
    pub structured: bool,
    pub next_handle: u64,
}

/// One complete reply to a request.
#[derive(Debug)]
pub struct Reply {
    pub error: u32,
    pub data: Vec<u8>,
    /// (flags, type, payload) of each structured chunk; empty for a simple reply.
    pub chunks: Vec<(u16, u16, Vec<u8>)>,
}

impl Client {
    /// Connects and reads nothing.
    pub fn connect(filter: &Filter) -> Client {
        let port = filter.port.expect("filter listens on TCP");
        let sock = TcpStream::connect(("127.0.0.1", port)).expect("connect to the filter");
        sock.set_read_timeout(Some(IO_TIMEOUT))
            .expect("read timeout");
        sock.set_write_timeout(Some(IO_TIMEOUT))
            .expect("write timeout");
        sock.set_nodelay(true).expect("nodelay");
        Client {
            sock,
            structured: false,
            next_handle: 1,
        }
    }

    /// Connects and checks the greeting.
    pub fn greeted(filter: &Filter) -> Client {
        let mut c = Client::connect(filter);
        assert_eq!(c.u64(), NBDMAGIC, "greeting magic");
        assert_eq!(c.u64(), IHAVEOPT, "greeting IHAVEOPT");
        assert_eq!(
            c.u16(),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
            "handshake flags"
        );
        c
    }

    /// Connects, checks the greeting and sends `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub fn negotiating(filter: &Filter) -> Client {
        let mut c = Client::greeted(filter);
        c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
        c
    }

    /// In transmission on the default export, with or without structured replies.
    pub fn transmitting(filter: &Filter, structured: bool) -> Client {
        let mut c = Client::negotiating(filter);
        if structured {
            c.structured_replies();
        }
        let (size, flags) = c.go("").expect("NBD_OPT_GO on the default export");
        assert!(size > 0);
        assert_eq!(flags & FLAG_SEND_DF != 0, structured, "DF iff structured");
        c
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.sock
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("sending {} bytes: {e}", bytes.len()));
    }

    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        self.sock
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("receiving {n} bytes: {e}"));
        buf
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.recv(2).try_into().unwrap())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.recv(4).try_into().unwrap())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.recv(8).try_into().unwrap())
    }

    /// Sends an option header announcing `length` bytes, then `data`.
    pub fn send_option_raw(&mut self, option: u32, length: u32, data: &[u8]) {
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&length.to_be_bytes());
        msg.extend_from_slice(data);
        self.send(&msg);
    }

    /// Reads one option reply to `option`: (reply type, payload).
    pub fn option_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.u64(), OPTION_REPLY_MAGIC, "option reply magic");
        assert_eq!(self.u32(), option, "option reply names the option");
        let kind = self.u32();
        let len = self.u32() as usize;
        (kind, self.recv(len))
    }

    /// Sends an option and reads its replies up to the final one (ACK or an error).
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.send_option_raw(option, data.len() as u32, data);
        let mut replies = Vec::new();
        loop {
            let reply = self.option_reply(option);
            let last = reply.0 == REP_ACK || reply.0 & REP_ERR != 0;
            replies.push(reply);
            if last {
                return replies;
            }
        }
    }

    /// Sends an option that must fail; returns its one (error) reply type.
    pub fn option_error(&mut self, option: u32, data: &[u8]) -> u32 {
        let replies = self.option(option, data);
        let kinds: Vec<u32> = replies.iter().map(|r| r.0).collect();
        assert_eq!(
            kinds.len(),
            1,
            "option {option}: expected one error reply, got {kinds:#x?}"
        );
        assert_ne!(kinds[0] & REP_ERR, 0, "option {option} succeeded");
        kinds[0]
    }

    pub fn structured_replies(&mut self) {
        let replies = self.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].0, REP_ACK, "NBD_OPT_STRUCTURED_REPLY");
        self.structured = true;
    }

    /// NBD_OPT_GO: Ok((size, transmission flags)) once in transmission, or
    /// Err(the error reply type) with negotiation still going on.
    pub fn go(&mut self, name: &str) -> Result<(u64, u16), u32> {
        let replies = self.option(OPT_GO, &go_data(name));
        let (last, _) = replies.last().expect("at least one reply");
        if *last != REP_ACK {
            assert_eq!(replies.len(), 1, "NBD_REP_INFO sent before error {last:#x}");
            return Err(*last);
        }
        let export = replies
            .iter()
            .find(|(kind, p)| *kind == REP_INFO && p[..2] == INFO_EXPORT.to_be_bytes())
            .expect("NBD_INFO_EXPORT in a successful NBD_OPT_GO");
        let size = u64::from_be_bytes(export.1[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(export.1[10..12].try_into().unwrap());
        assert_ne!(flags & FLAG_HAS_FLAGS, 0, "NBD_FLAG_HAS_FLAGS");
        Ok((size, flags))
    }

    /// Reads the whole reply to `handle`; `read_len` is the data a
    /// successful simple reply carries.
    pub fn reply(&mut self, handle: u64, read_len: usize) -> Reply {
        let mut reply = Reply {
            error: 0,
            data: Vec::new(),
            chunks: Vec::new(),
        };
        match self.u32() {
            SIMPLE_REPLY_MAGIC => {
                reply.error = self.u32();
                assert_eq!(self.u64(), handle, "simple reply handle");
                if reply.error == 0 {
                    reply.data = self.recv(read_len);
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                assert!(self.structured, "structured reply that was not negotiated");
                loop {
                    let flags = self.u16();
                    let kind = self.u16();
                    assert_eq!(self.u64(), handle, "chunk handle");
                    let len = self.u32() as usize;
                    let payload = self.recv(len);
                    if kind == REPLY_TYPE_OFFSET_DATA {
                        reply.data.extend_from_slice(&payload[8..]);
                    } else if kind & (1 << 15) != 0 {
                        let error = u32::from_be_bytes(payload[..4].try_into().unwrap());
                        let msg_len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
                        assert_eq!(payload.len(), 6 + msg_len, "error chunk message length");
                        assert_ne!(error, 0, "error chunk with error 0");
                        reply.error = error;
                    }
                    reply.chunks.push((flags, kind, payload));
                    if flags & REPLY_FLAG_DONE != 0 {
                        break;
                    }
                    assert_eq!(self.u32(), STRUCTURED_REPLY_MAGIC, "next chunk magic");
                }
            }
            other => panic!("bad reply magic {other:#010x}"),
        }
        reply
    }

    /// Sends a well-formed request and reads its reply.
    pub fn cmd(&mut self, flags: u16, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> Reply {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut msg = header(REQUEST_MAGIC, flags, cmd, handle, offset, len);
        msg.extend_from_slice(payload);
        self.send(&msg);
        let read_len = if cmd == CMD_READ { len as usize } else { 0 };
        let reply = self.reply(handle, read_len);
        if self.structured && cmd == CMD_READ {
            assert!(
                !reply.chunks.is_empty(),
                "simple reply to a structured READ"
            );
        }
        reply
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Reply {
        self.cmd(0, CMD_READ, offset, len, &[])
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Reply {
        self.cmd(0, CMD_WRITE, offset, data.len() as u32, data)
    }

    /// A read of 4 KiB at the start succeeds: the connection still works.
    pub fn assert_works(&mut self) {
        let reply = self.read(0, 4096);
        assert_eq!(reply.error, 0, "read after the bad request: {reply:?}");
        assert_eq!(reply.data.len(), 4096);
    }

    /// Asserts the server closes the connection without sending anything more.
    pub fn expect_closed(mut self, what: &str) {
        let mut buf = [0u8; 256];
        match self.sock.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("{what}: expected a close, got {n} bytes {:02x?}", &buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the connection is still open after {IO_TIMEOUT:?}")
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }

    /// NBD_CMD_DISC, then the server closes.
    pub fn disconnect(mut self) {
        self.send(&header(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0));
        self.expect_closed("after NBD_CMD_DISC");
    }
}

/// A request header, with any magic; a WRITE's payload follows it.
pub fn header(magic: u32, flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(28);
    msg.extend_from_slice(&magic.to_be_bytes());
    msg.extend_from_slice(&flags.to_be_bytes());
    msg.extend_from_slice(&cmd.to_be_bytes());
    msg.extend_from_slice(&handle.to_be_bytes());
    msg.extend_from_slice(&offset.to_be_bytes());
    msg.extend_from_slice(&len.to_be_bytes());
    msg
}

/// Data of NBD_OPT_GO: the name and no information requests.
pub fn go_data(name: &str) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    data
}

/// Data of NBD_OPT_{LIST,SET}_META_CONTEXT.
pub fn meta_context_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        data.extend_from_slice(&(q.len() as u32).to_be_bytes());
        data.extend_from_slice(q.as_bytes());
    }
    data
}

/// Asserts a failed reply carries `error`, in structured mode as a final
/// NBD_REPLY_TYPE_ERROR chunk and nothing else.
pub fn assert_error(reply: &Reply, error: u32, what: &str) {
    assert_eq!(reply.error, error, "{what}: {reply:?}");
    assert!(reply.data.is_empty(), "{what}: data with an error");
    if let Some((flags, kind, _)) = reply.chunks.last() {
        assert_eq!(reply.chunks.len(), 1, "{what}: {reply:?}");
        assert_eq!(*kind, REPLY_TYPE_ERROR, "{what}: chunk type");
        assert_eq!(*flags, REPLY_FLAG_DONE, "{what}: chunk flags");
    }
}

/// A fresh, well-behaved client is served: GO, write and read back (or only
/// read, on a read-only export), disconnect.
pub fn assert_serves(filter: &Filter) {
    let mut c = Client::negotiating(filter);
    let (size, flags) = c.go("").expect("a fresh client gets NBD_OPT_GO");
    let offset = size - 8192;
    if flags & FLAG_READ_ONLY == 0 {
        let data = pseudo_random(4096, offset ^ 0x5eed);
        assert_eq!(c.write(offset, &data).error, 0, "fresh client write");
        assert_eq!(c.read(offset, 4096).data, data, "fresh client reads back");
    } else {
        assert_eq!(c.read(offset, 4096).error, 0, "fresh client read");
    }
    c.disconnect();
}

/// A filter on a new sparse disk of `size` bytes.
pub fn filter_with(size: u64, args: &[&str]) -> (Filter, tempfile::TempDir) {
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    sparse_file(&disk, size);
    (Filter::tcp(&disk, args), dir)
}

pub fn start() -> (Filter, tempfile::TempDir) {
    filter_with(DISK_SIZE, &[])
}

/// Stops the filter (asserting a clean exit) and checks its log explains
/// each connection it closed; see [`check_log`].
pub fn stop_and_check_log(filter: Filter, closes: &[&str]) {
    check_log(&filter.stop_ok(), closes, &[]);
}

/// Each of `closes` appears in the log, and every connection the filter
/// closed other than in an orderly way (abort, disconnect, shutdown) is
/// explained by one of `closes` or `also_allowed`.
pub fn check_log(log: &str, closes: &[&str], also_allowed: &[&str]) {
    for words in closes {
        assert!(log.contains(words), "no {words:?} in the log:\n{log}");
    }
    for line in log.lines() {
        assert!(!line.contains(" ERROR "), "error in the log:\n{log}");
        if line.contains(" WARN ") && line.contains("connection closed") {
            assert!(
                closes.iter().chain(also_allowed).any(|w| line.contains(w)),
                "unexpected close {line:?} in the log:\n{log}"
            );
        }
    }
}

/// Sends SIGTERM and waits until the filter has stopped accepting, that is,
/// until its shutdown has begun.
pub fn begin_shutdown(filter: &Filter) {
    // SAFETY: kill(2) with the pid of the filter, which is not reaped yet.
    unsafe { libc::kill(filter.pid() as i32, libc::SIGTERM) };
    let port = filter.port.expect("filter listens on TCP");
    let deadline = Instant::now() + IO_TIMEOUT;
    // A probe accepted before the shutdown reads the greeting (so as not to
    // close with unread data, a reset) and closes before the client flags.
    while let Ok(mut probe) = TcpStream::connect(("127.0.0.1", port)) {
        assert!(
            Instant::now() < deadline,
            "still accepting {IO_TIMEOUT:?} after SIGTERM"
        );
        probe
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("read timeout");
        let _ = probe.read_exact(&mut [0; 18]);
        drop(probe);
        std::thread::sleep(Duration::from_millis(5));
    }
}
