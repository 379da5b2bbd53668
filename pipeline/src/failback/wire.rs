//! The failback session's bytes: the handshake (the replication session's
//! mutual key proof, `crate::session`, under a magic of its own so neither
//! protocol can be mistaken for the other) and the plaintexts of its frames. Specified in
//! `docs/FORMATS.md` ("Failback session, version 1"). Integers big-endian.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{FailbackError, DIGEST_LEN};
use crate::codec::{FrameKind, FrameMeta};
use crate::key::Key;
use crate::session::{self, Hello, Protocol, Session};

/// Failback: `cdp failback --send` (the sender, on the failover side) to
/// `cdp failback --receive` (the receiver, on the original side).
pub const FAILBACK: Protocol = Protocol {
    name: "failback",
    magic: *b"CDPFBAK1",
    version: 1,
    initiator: "sender",
    responder: "receiver",
};

/// The sender's side: announces the original disk (id and size, from the
/// failover marker), checks the receiver's proof and proves ours. Frames
/// it seals travel sender to receiver (`SourceToTarget`).
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &Key,
    hello: Hello,
) -> Result<Session, FailbackError> {
    Ok(session::connect_with(stream, key, &FAILBACK, hello).await?)
}

/// The receiver's side: reads the hello, proves our key, checks the
/// sender's proof, and only then asks `admit` whether the announced disk is
/// ours (an error is the reason to turn the sender away).
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &Key,
    admit: impl FnOnce(&Hello) -> Result<(), String>,
) -> Result<Session, FailbackError> {
    let (session, _) = session::accept_with(stream, key, &FAILBACK, admit).await?;
    Ok(session)
}

/// The header fields of a failback or seed frame: the disk's id, a chunk
/// range (digests and chunks frames), the sequence number asked for (a seed
/// request), or 0, 0; no point time.
pub fn meta(kind: FrameKind, disk_id: [u8; 16], first: u64, last: u64) -> FrameMeta {
    FrameMeta {
        kind,
        disk_id,
        first_seq: first,
        last_seq: last,
        point_time_ns: 0,
    }
}

/// Refuses a frame of another kind than the one the session expects next.
pub fn expect_kind(got: FrameKind, want: FrameKind) -> Result<(), FailbackError> {
    if got == want {
        Ok(())
    } else {
        Err(FailbackError::Protocol(format!(
            "a {got:?} frame arrived where a {want:?} frame belongs"
        )))
    }
}

/// What one side counted over a pass; the plaintext of a done frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Digest windows compared.
    pub windows: u64,
    /// Chunks compared: every chunk of the disk.
    pub chunks: u64,
    /// Chunks whose digests differed, shipped and written.
    pub differing: u64,
    /// Bytes of those chunks (before compression).
    pub bytes: u64,
}

impl Totals {
    pub const LEN: usize = 32;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        for (i, n) in [self.windows, self.chunks, self.differing, self.bytes]
            .into_iter()
            .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&n.to_be_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Totals, FailbackError> {
        if b.len() != Self::LEN {
            return Err(FailbackError::Protocol(format!(
                "a done frame carries {} bytes, not {}",
                b.len(),
                Self::LEN
            )));
        }
        let at = |i: usize| u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Ok(Totals {
            windows: at(0),
            chunks: at(1),
            differing: at(2),
            bytes: at(3),
        })
    }
}

/// Splits a digests frame's plaintext into its `count` digests.
pub fn decode_digests(b: &[u8], count: u64) -> Result<Vec<[u8; DIGEST_LEN]>, FailbackError> {
    if b.len() as u64 != count * DIGEST_LEN as u64 {
        return Err(FailbackError::Protocol(format!(
            "a digests frame for {count} chunks carries {} bytes",
            b.len()
        )));
    }
    Ok(b.chunks_exact(DIGEST_LEN)
        .map(|d| d.try_into().expect("DIGEST_LEN bytes"))
        .collect())
}

/// Appends one entry of a chunks frame: the chunk's index, then its bytes.
pub fn push_chunk(payload: &mut Vec<u8>, index: u64, data: &[u8]) {
    payload.extend_from_slice(&index.to_be_bytes());
    payload.extend_from_slice(data);
}

/// Parses a chunks frame's plaintext for chunks `first..=last`: entries of
/// an index (strictly increasing, within the range) and exactly
/// `chunk_len(index)` bytes. Returns each index with its bytes' range in
/// `b`.
pub fn decode_chunks(
    b: &[u8],
    first: u64,
    last: u64,
    chunk_len: impl Fn(u64) -> u64,
) -> Result<Vec<(u64, std::ops::Range<usize>)>, FailbackError> {
    let bad = |at: usize, what: String| {
        FailbackError::Protocol(format!(
            "chunks frame for {first}..={last}, byte {at}: {what}"
        ))
    };
    let mut entries = Vec::new();
    let mut at = 0;
    while at < b.len() {
        let index_bytes = b
            .get(at..at + 8)
            .ok_or_else(|| bad(at, "cut short in a chunk index".into()))?;
        let index = u64::from_be_bytes(index_bytes.try_into().expect("8 bytes"));
        let after_previous = entries.last().is_none_or(|(p, _)| index > *p);
        if index < first || index > last || !after_previous {
            return Err(bad(at, format!("chunk {index} is out of range or order")));
        }
        let len = chunk_len(index) as usize;
        let data = at + 8..at + 8 + len;
        if data.end > b.len() {
            return Err(bad(at, format!("chunk {index} is cut short")));
        }
        at = data.end;
        entries.push((index, data));
    }
    Ok(entries)
}
