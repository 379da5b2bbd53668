//! Protocol robustness: malformed, truncated and hostile input in the
//! handshake and in the transmission phase, through a raw NBD client. Each
//! case checks what `doc/proto.md` of NetworkBlockDevice/nbd prescribes, that
//! the connection goes on (or is closed) as it should, that the same filter
//! still serves a well-behaved client afterwards, and that it stops cleanly
//! with a log line explaining every connection it closed.
mod common;
#[path = "bad_input/support.rs"]
mod support;

use std::io::Read;
use std::time::{Duration, Instant};

use common::*;
use support::*;

// ---------------------------------------------------------------------------
// Handshake.

#[test]
fn unknown_client_flags_close_the_connection() {
    let (filter, _dir) = start();
    for flags in [1 << 2, FLAG_C_FIXED_NEWSTYLE | 1 << 31] {
        let mut c = Client::greeted(&filter);
        c.send(&u32::to_be_bytes(flags));
        c.expect_closed("unknown client flags");
        assert_serves(&filter);
    }
    stop_and_check_log(
        filter,
        &[
            "client flags 0x4 include unknown bits",
            "client flags 0x80000001",
        ],
    );
}

#[test]
fn wrong_option_magic_closes_the_connection() {
    let (filter, _dir) = start();
    let mut c = Client::negotiating(&filter);
    let mut msg = 0x1122_3344_5566_7788u64.to_be_bytes().to_vec();
    msg.extend_from_slice(&OPT_GO.to_be_bytes());
    msg.extend_from_slice(&0u32.to_be_bytes());
    c.send(&msg);
    c.expect_closed("wrong option magic");
    assert_serves(&filter);
    stop_and_check_log(filter, &["bad option magic 0x1122334455667788"]);
}

#[test]
fn truncated_handshake_leaves_the_server_running() {
    let (filter, _dir) = start();
    // Gone before the client flags, halfway through them, halfway through an
    // option header, and halfway through the option's data.
    drop(Client::greeted(&filter));
    Client::greeted(&filter).send(&[0, 0]);
    let mut c = Client::negotiating(&filter);
    c.send(&IHAVEOPT.to_be_bytes());
    drop(c);
    let mut c = Client::negotiating(&filter);
    c.send_option_raw(OPT_GO, 100, &[0; 10]);
    drop(c);
    assert_serves(&filter);
    stop_and_check_log(
        filter,
        &[
            "0 bytes into a 4 byte message",
            "2 bytes into a 4 byte message",
            "8 bytes into a 16 byte message",
            "10 bytes into a 100 byte message",
        ],
    );
}

#[test]
fn unsupported_options_are_err_unsup_and_negotiation_continues() {
    let (filter, _dir) = start();
    let mut c = Client::negotiating(&filter);
    for (option, data) in [
        (99, &b"some data the server must skip"[..]),
        (OPT_STARTTLS, &[][..]),
        (OPT_EXTENDED_HEADERS, &[][..]),
        (0xffff_ffff, &[0; 64][..]),
    ] {
        assert_eq!(
            c.option_error(option, data),
            REP_ERR_UNSUP,
            "option {option}"
        );
    }
    c.go("").expect("NBD_OPT_GO after unsupported options");
    c.assert_works();
    c.disconnect();
    assert_serves(&filter);
    stop_and_check_log(filter, &[]);
}

#[test]
fn list_with_data_is_err_invalid() {
    let (filter, _dir) = filter_with(DISK_SIZE, &["--export", "disk0"]);
    let mut c = Client::negotiating(&filter);
    assert_eq!(c.option_error(OPT_LIST, b"junk"), REP_ERR_INVALID);
    let replies = c.option(OPT_LIST, &[]);
    let kinds: Vec<u32> = replies.iter().map(|r| r.0).collect();
    assert_eq!(kinds, [REP_SERVER, REP_ACK]);
    assert_eq!(
        &replies[0].1[..9],
        b"\0\0\0\x05disk0",
        "NBD_REP_SERVER names the export"
    );
    c.go("disk0")
        .expect("NBD_OPT_GO after a refused NBD_OPT_LIST");
    c.assert_works();
    c.disconnect();
    stop_and_check_log(filter, &[]);
}

#[test]
fn go_for_an_unknown_export_is_err_unknown() {
    let (filter, _dir) = filter_with(DISK_SIZE, &["--export", "disk0"]);
    let mut c = Client::negotiating(&filter);
    assert_eq!(c.go("nope"), Err(REP_ERR_UNKNOWN));
    assert_eq!(
        c.go("cdp"),
        Err(REP_ERR_UNKNOWN),
        "the default name is gone"
    );
    let (size, _) = c.go("disk0").expect("NBD_OPT_GO for the real name");
    assert_eq!(size, DISK_SIZE);
    c.assert_works();
    c.disconnect();
    stop_and_check_log(filter, &[]);
}

#[test]
fn malformed_go_is_err_invalid() {
    let (filter, _dir) = start();
    let mut c = Client::negotiating(&filter);
    let cases: [(&str, &[u8]); 5] = [
        ("name longer than the data", b"\0\0\0\x64\0\0"),
        ("name length 4 GiB-1", b"\xff\xff\xff\xff\0\0"),
        ("no name length", b"\0\0"),
        ("no request count", b"\0\0\0\0"),
        ("more requests than data", b"\0\0\0\0\0\x03\0\0"),
    ];
    for (what, data) in cases {
        assert_eq!(c.option_error(OPT_GO, data), REP_ERR_INVALID, "{what}");
    }
    c.go("").expect("NBD_OPT_GO after malformed ones");
    c.assert_works();
    c.disconnect();
    stop_and_check_log(filter, &[]);
}

#[test]
fn set_meta_context_before_structured_replies_is_err_invalid() {
    let (filter, _dir) = start();
    let mut c = Client::negotiating(&filter);
    let data = meta_context_data("", &["base:allocation"]);
    assert_eq!(c.option_error(OPT_SET_META_CONTEXT, &data), REP_ERR_INVALID);
    // In the right order it works, and BLOCK_STATUS is then accepted.
    c.structured_replies();
    let replies = c.option(OPT_SET_META_CONTEXT, &data);
    let kinds: Vec<u32> = replies.iter().map(|r| r.0).collect();
    assert_eq!(kinds, [REP_META_CONTEXT, REP_ACK]);
    c.go("").expect("NBD_OPT_GO");
    let reply = c.cmd(0, CMD_BLOCK_STATUS, 0, 4096, &[]);
    assert_eq!(reply.error, 0, "{reply:?}");
    c.disconnect();
    stop_and_check_log(filter, &[]);
}

#[test]
fn huge_option_length_is_err_too_big_then_close() {
    let (filter, _dir) = start();
    let mut c = Client::negotiating(&filter);
    c.send_option_raw(OPT_GO, u32::MAX, &[]);
    let (kind, _) = c.option_reply(OPT_GO);
    assert_eq!(kind, REP_ERR_TOO_BIG);
    c.expect_closed("after NBD_REP_ERR_TOO_BIG");
    // NBD_OPT_EXPORT_NAME has no error reply: just the close.
    let mut c = Client::negotiating(&filter);
    c.send_option_raw(OPT_EXPORT_NAME, u32::MAX, &[]);
    c.expect_closed("oversized NBD_OPT_EXPORT_NAME");
    assert_serves(&filter);
    stop_and_check_log(
        filter,
        &[
            "option 7 carries 4294967295 bytes of data",
            "option 1 carries 4294967295 bytes of data",
        ],
    );
}

#[test]
fn export_name_for_an_unknown_export_closes() {
    let (filter, _dir) = start();
    let mut c = Client::negotiating(&filter);
    c.send_option_raw(OPT_EXPORT_NAME, 4, b"nope");
    c.expect_closed("NBD_OPT_EXPORT_NAME for an unknown export");
    assert_serves(&filter);
    stop_and_check_log(
        filter,
        &["NBD_OPT_EXPORT_NAME asked for unknown export \"nope\""],
    );
}

#[test]
fn abort_is_acked_then_closed() {
    let (filter, _dir) = start();
    // The server SHOULD ignore data sent with NBD_OPT_ABORT.
    for data in [&[][..], b"ignored"] {
        let mut c = Client::negotiating(&filter);
        let replies = c.option(OPT_ABORT, data);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].0, REP_ACK, "NBD_OPT_ABORT is acked");
        c.expect_closed("after NBD_OPT_ABORT");
    }
    assert_serves(&filter);
    stop_and_check_log(filter, &["client aborted the negotiation"]);
}

#[test]
fn no_zeroes_is_honoured_by_export_name() {
    let (filter, _dir) = start();
    for (client_flags, reply_len) in [
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 10),
        (FLAG_C_FIXED_NEWSTYLE, 134),
    ] {
        let mut c = Client::greeted(&filter);
        c.send(&client_flags.to_be_bytes());
        c.send_option_raw(OPT_EXPORT_NAME, 0, &[]);
        let reply = c.recv(reply_len);
        assert_eq!(reply[..8], DISK_SIZE.to_be_bytes(), "export size");
        assert_ne!(reply[9] & FLAG_HAS_FLAGS as u8, 0, "transmission flags");
        assert!(reply[10..].iter().all(|&b| b == 0), "reserved zeroes");
        // Nothing more: the next bytes are the reply to our first request.
        c.assert_works();
        c.disconnect();
    }
    stop_and_check_log(filter, &[]);
}

#[test]
fn options_during_shutdown_are_err_shutdown() {
    let (filter, _dir) = start();
    let mut listing = Client::negotiating(&filter);
    let mut aborting = Client::negotiating(&filter);
    let mut idle = Client::transmitting(&filter, true);
    idle.assert_works();
    begin_shutdown(&filter);
    // Nothing in flight: the transmission client is disconnected.
    idle.expect_closed("idle client in transmission at shutdown");
    // Options other than NBD_OPT_ABORT SHOULD get NBD_REP_ERR_SHUTDOWN.
    assert_eq!(listing.option_error(OPT_LIST, &[]), REP_ERR_SHUTDOWN);
    listing.expect_closed("after NBD_REP_ERR_SHUTDOWN");
    let replies = aborting.option(OPT_ABORT, &[]);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, REP_ACK, "NBD_OPT_ABORT during shutdown");
    aborting.expect_closed("after NBD_OPT_ABORT");
    let log = filter.stop_ok();
    check_log(
        &log,
        &[
            "negotiation: server is shutting down",
            "client aborted the negotiation",
        ],
        &["0 bytes into a 4 byte message"],
    );
}

/// Whether the filter process exits (is gone, or a zombie) within `limit`.
fn exits_within(filter: &Filter, limit: Duration) -> bool {
    let stat = format!("/proc/{}/stat", filter.pid());
    let deadline = Instant::now() + limit;
    loop {
        match std::fs::read_to_string(&stat) {
            Err(_) => return true,
            Ok(s)
                if s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z')) =>
            {
                return true
            }
            Ok(_) if Instant::now() > deadline => return false,
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

// Known server bugs: SIGTERM must stop the filter (docs/ARCHITECTURE.md,
// "Shutdown"), but a client that says nothing, or reads nothing, holds it up
// for as long as it likes. Run with `--ignored` to reproduce.

#[test]

fn shutdown_is_not_held_up_by_a_client_idle_in_negotiation() {
    let (filter, _dir) = start();
    let idle = Client::negotiating(&filter);
    begin_shutdown(&filter);
    let exited = exits_within(&filter, IO_TIMEOUT);
    drop(idle);
    assert!(
        exited,
        "still running {IO_TIMEOUT:?} after SIGTERM, held up by an idle client in negotiation"
    );
    filter.stop_ok();
}

#[test]

fn shutdown_is_not_held_up_by_a_client_that_reads_no_replies() {
    let (filter, _dir) = start();
    let mut c = Client::transmitting(&filter, false);
    // 64 MiB of replies, far more than the socket buffers hold.
    for handle in 0..64 {
        c.send(&header(REQUEST_MAGIC, 0, CMD_READ, handle, 0, 1 << 20));
    }
    begin_shutdown(&filter);
    let limit = 2 * IO_TIMEOUT;
    let exited = exits_within(&filter, limit);
    drop(c);
    assert!(
        exited,
        "still running {limit:?} after SIGTERM, held up by a client that reads no replies"
    );
    filter.stop_ok();
}

// ---------------------------------------------------------------------------
// Transmission, each with simple and with structured replies.

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let (filter, _dir) = start();
    for structured in [false, true] {
        let mut other = Client::transmitting(&filter, structured);
        other.assert_works();
        let mut c = Client::transmitting(&filter, structured);
        c.send(&header(0xdead_beef, 0, CMD_READ, 1, 0, 4096));
        c.expect_closed("bad request magic");
        other.assert_works();
        other.disconnect();
        assert_serves(&filter);
    }
    stop_and_check_log(filter, &["bad request magic 0xdeadbeef"]);
}

#[test]
fn truncated_request_leaves_the_server_running() {
    let (filter, _dir) = start();
    for structured in [false, true] {
        let mut c = Client::transmitting(&filter, structured);
        c.send(&header(REQUEST_MAGIC, 0, CMD_READ, 1, 0, 4096)[..10]);
        drop(c);
        // A write whose payload stops short.
        let mut c = Client::transmitting(&filter, structured);
        let mut msg = header(REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, 4096);
        msg.extend_from_slice(&[0xaa; 100]);
        c.send(&msg);
        drop(c);
        assert_serves(&filter);
    }
    stop_and_check_log(
        filter,
        &[
            "10 bytes into a 28 byte message",
            "100 bytes into a 4096 byte message",
        ],
    );
}

#[test]
fn oversized_write_closes_without_reading_the_payload() {
    let (filter, _dir) = start();
    for structured in [false, true] {
        let mut c = Client::transmitting(&filter, structured);
        let mut msg = header(REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, u32::MAX);
        msg.extend_from_slice(&[0xaa; 1024]);
        c.send(&msg);
        // Were the server waiting for 4 GiB of payload, this would time out.
        c.expect_closed("WRITE of 4 GiB-1");
        assert_serves(&filter);
    }
    stop_and_check_log(filter, &["write of 4294967295 bytes exceeds the"]);
}

#[test]
fn oversized_read_is_refused_and_the_connection_continues() {
    // 8 GiB (sparse), so a 4 GiB-1 read at offset 0 lies within the export
    // and is refused for its size alone.
    let size = 8 << 30;
    let (filter, _dir) = filter_with(size, &[]);
    for structured in [false, true] {
        let mut c = Client::transmitting(&filter, structured);
        let reply = c.read(0, u32::MAX);
        if structured {
            // Without DF a structured server may also refuse with EOVERFLOW.
            assert!(matches!(reply.error, EINVAL | EOVERFLOW), "{reply:?}");
            assert_error(&reply, reply.error, "READ of 4 GiB-1");
            let reply = c.cmd(CMD_FLAG_DF, CMD_READ, 0, u32::MAX, &[]);
            assert_error(&reply, EOVERFLOW, "READ of 4 GiB-1 with DF");
        } else {
            assert_error(&reply, EINVAL, "READ of 4 GiB-1");
        }
        // Past the end as well: EINVAL, with or without DF.
        let reply = c.read(size - 4096, u32::MAX);
        assert_error(&reply, EINVAL, "READ of 4 GiB-1 past the end");
        c.assert_works();
        c.disconnect();
    }
    // The same on a small export, where 4 GiB-1 from offset 0 is past the end.
    let (small, _dir2) = start();
    for structured in [false, true] {
        let mut c = Client::transmitting(&small, structured);
        assert_error(&c.read(0, u32::MAX), EINVAL, "READ of 4 GiB-1 on 16 MiB");
        c.assert_works();
        c.disconnect();
    }
    assert_serves(&small);
    stop_and_check_log(small, &[]);
    stop_and_check_log(filter, &[]);
}

#[test]
fn unknown_command_is_einval() {
    let (filter, _dir) = start();
    for structured in [false, true] {
        let mut c = Client::transmitting(&filter, structured);
        for cmd in [99, 8, 0xffff] {
            assert_error(
                &c.cmd(0, cmd, 0, 4096, &[]),
                EINVAL,
                &format!("command {cmd}"),
            );
            c.assert_works();
        }
        c.disconnect();
    }
    assert_serves(&filter);
    stop_and_check_log(filter, &[]);
}

#[test]
fn unknown_command_flags_are_einval() {
    let (filter, _dir) = start();
    for structured in [false, true] {
        let mut c = Client::transmitting(&filter, structured);
        let data = [0x55; 4096];
        let cases: [(u16, u16, &[u8]); 5] = [
            (1 << 15, CMD_READ, &[]),
            (CMD_FLAG_REQ_ONE, CMD_READ, &[]),
            (1 << 15, CMD_WRITE, &data),
            (CMD_FLAG_DF, CMD_WRITE, &data),
            (1 << 9, CMD_BLOCK_STATUS, &[]),
        ];
        for (flags, cmd, payload) in cases {
            let reply = c.cmd(flags, cmd, 0, 4096, payload);
            assert_error(
                &reply,
                EINVAL,
                &format!("flags {flags:#x} on command {cmd}"),
            );
            c.assert_works();
        }
        // DF is only valid once structured replies are negotiated.
        let reply = c.cmd(CMD_FLAG_DF, CMD_READ, 0, 4096, &[]);
        if structured {
            assert_eq!(reply.error, 0, "DF READ with structured replies: {reply:?}");
        } else {
            assert_error(&reply, EINVAL, "DF READ without structured replies");
        }
        // The refused writes did not reach the disk.
        assert!(
            c.read(0, 4096).data.iter().all(|&b| b == 0),
            "refused write applied"
        );
        c.disconnect();
    }
    stop_and_check_log(filter, &[]);
}

#[test]
fn read_past_the_end_is_einval() {
    let (filter, _dir) = start();
    for structured in [false, true] {
        let mut c = Client::transmitting(&filter, structured);
        for (offset, len) in [
            (DISK_SIZE - 4096, 8192),
            (DISK_SIZE, 1),
            (u64::MAX - 100, 4096),
        ] {
            let reply = c.read(offset, len);
            assert_error(&reply, EINVAL, &format!("READ {len} at {offset}"));
            c.assert_works();
        }
        assert_eq!(c.read(DISK_SIZE - 4096, 4096).error, 0, "last block");
        c.disconnect();
    }
    stop_and_check_log(filter, &[]);
}

#[test]
fn write_past_the_end_is_enospc_and_consumes_the_payload() {
    let (filter, _dir) = start();
    for structured in [false, true] {
        let mut c = Client::transmitting(&filter, structured);
        for (offset, len) in [
            (DISK_SIZE - 4096, 8192),
            (DISK_SIZE, 512),
            (u64::MAX - 100, 4096),
        ] {
            // The payload looks like a request: were it taken for one, the
            // next reply would not match.
            let mut payload = Vec::new();
            while payload.len() < len as usize {
                payload.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
                payload.extend_from_slice(&[0; 24]);
            }
            payload.truncate(len as usize);
            let reply = c.write(offset, &payload);
            assert_error(&reply, ENOSPC, &format!("WRITE {len} at {offset}"));
            c.assert_works();
        }
        let tail = c.read(DISK_SIZE - 4096, 4096);
        assert!(tail.data.iter().all(|&b| b == 0), "refused write applied");
        c.disconnect();
    }
    stop_and_check_log(filter, &[]);
}

/// With structured replies, a success without data is a simple reply (the
/// spec allows it for every command but READ; libnbd reads it with one
/// `recv`), and an error is still an error chunk that carries a message.
#[test]
fn structured_successes_without_data_are_simple_replies() {
    let (filter, _dir) = start();
    let mut c = Client::transmitting(&filter, true);
    let data = pseudo_random(4096, 7);
    let replies = [
        ("WRITE", c.write(0, &data)),
        (
            "WRITE+FUA",
            c.cmd(CMD_FLAG_FUA, CMD_WRITE, 4096, 4096, &data),
        ),
        ("FLUSH", c.cmd(0, CMD_FLUSH, 0, 0, &[])),
        ("TRIM", c.cmd(0, CMD_TRIM, 8192, 4096, &[])),
        ("WRITE_ZEROES", c.cmd(0, CMD_WRITE_ZEROES, 12288, 4096, &[])),
        ("CACHE", c.cmd(0, CMD_CACHE, 0, 4096, &[])),
    ];
    for (what, reply) in replies {
        assert_eq!(reply.error, 0, "{what}: {reply:?}");
        assert!(
            reply.chunks.is_empty(),
            "{what}: not a simple reply: {reply:?}"
        );
    }
    assert_eq!(c.read(0, 4096).data, data, "the write took effect");
    let refused = c.write(DISK_SIZE, &data);
    assert_error(&refused, ENOSPC, "WRITE past the end");
    let [(_, REPLY_TYPE_ERROR, payload)] = &refused.chunks[..] else {
        panic!("a refused write is one error chunk: {refused:?}");
    };
    assert!(
        payload.len() > 6,
        "the error chunk has no message: {refused:?}"
    );
    c.disconnect();
    stop_and_check_log(filter, &[]);
}

#[test]
fn block_status_without_a_context_is_einval() {
    let (filter, _dir) = start();
    for structured in [false, true] {
        let mut c = Client::transmitting(&filter, structured);
        let reply = c.cmd(0, CMD_BLOCK_STATUS, 0, 4096, &[]);
        assert_error(&reply, EINVAL, "BLOCK_STATUS without a context");
        c.assert_works();
        c.disconnect();
    }
    stop_and_check_log(filter, &[]);
}

#[test]
fn writes_to_a_read_only_export_are_eperm() {
    let (filter, _dir) = filter_with(DISK_SIZE, &["--read-only"]);
    for structured in [false, true] {
        let mut c = Client::negotiating(&filter);
        if structured {
            c.structured_replies();
        }
        let (_, flags) = c.go("").expect("NBD_OPT_GO");
        assert_ne!(flags & FLAG_READ_ONLY, 0, "NBD_FLAG_READ_ONLY");
        let reply = c.write(0, &[0xaa; 4096]);
        assert_error(&reply, EPERM, "WRITE");
        c.assert_works();
        assert_error(&c.cmd(0, CMD_TRIM, 0, 4096, &[]), EPERM, "TRIM");
        assert_error(
            &c.cmd(0, CMD_WRITE_ZEROES, 0, 4096, &[]),
            EPERM,
            "WRITE_ZEROES",
        );
        assert!(
            c.read(0, 4096).data.iter().all(|&b| b == 0),
            "refused write applied"
        );
        c.disconnect();
    }
    assert_serves(&filter);
    stop_and_check_log(filter, &[]);
}

#[test]
fn garbage_closes_the_connection() {
    let (filter, _dir) = start();
    let junk = pseudo_random(256, 0xbad);
    assert_ne!(
        u32::from_be_bytes(junk[..4].try_into().unwrap()) & !3,
        0,
        "the junk must not pass for client flags"
    );
    // Right after connecting, without even reading the greeting.
    let mut c = Client::connect(&filter);
    c.send(&junk);
    let mut seen = Vec::new();
    let _ = c.sock.read_to_end(&mut seen);
    let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    assert!(
        greeting.starts_with(&seen),
        "got {seen:02x?} instead of the greeting and a close"
    );
    c.expect_closed("junk instead of client flags");
    // And in place of requests.
    for structured in [false, true] {
        let mut c = Client::transmitting(&filter, structured);
        c.send(&junk);
        c.expect_closed("junk instead of a request");
    }
    assert_serves(&filter);
    stop_and_check_log(filter, &["client flags", "bad request magic"]);
}
