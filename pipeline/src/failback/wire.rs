//! The failback session's bytes: the handshake (the replication session's
//! mutual key proof, under a magic of its own so neither protocol can be
//! mistaken for the other) and the plaintexts of its frames. Specified in
//! `docs/FORMATS.md` ("Failback session, version 1"). Integers big-endian.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{FailbackError, DIGEST_LEN};
use crate::codec::{
    handshake_proof, verify_proof, Direction, FrameKind, FrameMeta, Opener, Sealer, SessionSalt,
};
use crate::key::Key;
use crate::session::{read_status, write_status, Hello, Session};

/// Opens every failback handshake message.
pub const MAGIC: [u8; 8] = *b"CDPFBAK1";
/// The failback protocol version this build speaks.
pub const VERSION: u16 = 1;

const HELLO_LEN: usize = 8 + 2 + 2 + 16 + 8 + 32;
/// What a sender sends instead of its proof when the receiver's failed.
const PROOF_REJECTED: [u8; 32] = [0; 32];
const STATUS_OK: u16 = 0;
const STATUS_VERSION: u16 = 1;
const STATUS_OTHER_DISK: u16 = 2;
const STATUS_WRONG_KEY: u16 = 3;

fn encode_hello(hello: &Hello, nonce: &[u8; 32]) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..10].copy_from_slice(&VERSION.to_be_bytes());
    b[12..28].copy_from_slice(&hello.disk_id);
    b[28..36].copy_from_slice(&hello.disk_size.to_be_bytes());
    b[36..68].copy_from_slice(nonce);
    b
}

fn check_magic_and_version(magic: [u8; 8], version: u16) -> Result<(), FailbackError> {
    if magic != MAGIC {
        return Err(FailbackError::BadMagic(magic));
    }
    if version != VERSION {
        return Err(FailbackError::Version {
            ours: VERSION,
            theirs: version,
        });
    }
    Ok(())
}

async fn read_ok<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(), FailbackError> {
    match read_status(stream).await? {
        (STATUS_OK, _) => Ok(()),
        (STATUS_WRONG_KEY, _) => Err(FailbackError::SenderWrongKey),
        (_, message) => Err(FailbackError::Refused(message)),
    }
}

/// The sender's side: announces the original disk (id and size, from the
/// failover marker), checks the receiver's proof and proves ours. Frames
/// it seals travel sender to receiver (`SourceToTarget`).
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &Key,
    hello: Hello,
) -> Result<Session, FailbackError> {
    let sender_nonce = SessionSalt::random_half();
    let hello_bytes = encode_hello(&hello, &sender_nonce);
    stream.write_all(&hello_bytes).await?;
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic).await?;
    let version = stream.read_u16().await?;
    check_magic_and_version(magic, version)?;
    read_ok(stream).await?;
    let mut receiver_nonce = [0u8; 32];
    stream.read_exact(&mut receiver_nonce).await?;
    let mut receiver_proof = [0u8; 32];
    stream.read_exact(&mut receiver_proof).await?;
    let salt = SessionSalt {
        source_nonce: sender_nonce,
        target_nonce: receiver_nonce,
    };
    let transcript = [&hello_bytes[..], &receiver_nonce[..]].concat();
    let receiver = Direction::TargetToSource;
    if !verify_proof(key, &salt, receiver, &transcript, &receiver_proof) {
        // Tell the receiver why we hang up, so it can say so too.
        let _ = stream.write_all(&PROOF_REJECTED).await;
        return Err(FailbackError::ReceiverWrongKey);
    }
    let proof = handshake_proof(key, &salt, Direction::SourceToTarget, &transcript);
    stream.write_all(&proof).await?;
    read_ok(stream).await?;
    Ok(Session {
        sealer: Sealer::new(key, &salt, Direction::SourceToTarget),
        opener: Opener::new(key, &salt, Direction::TargetToSource),
        salt,
    })
}

/// The receiver's side: reads the hello, proves our key, checks the
/// sender's proof, and only then asks `admit` whether the announced disk is
/// ours (an error is the reason to turn the sender away).
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &Key,
    admit: impl FnOnce(&Hello) -> Result<(), String>,
) -> Result<Session, FailbackError> {
    let mut hello_bytes = [0u8; HELLO_LEN];
    stream.read_exact(&mut hello_bytes).await?;
    let magic: [u8; 8] = hello_bytes[0..8].try_into().expect("8 bytes");
    let version = u16::from_be_bytes([hello_bytes[8], hello_bytes[9]]);
    stream.write_all(&MAGIC).await?;
    stream.write_all(&VERSION.to_be_bytes()).await?;
    if let Err(e) = check_magic_and_version(magic, version) {
        if matches!(e, FailbackError::Version { .. }) {
            write_status(stream, STATUS_VERSION, &e.to_string()).await?;
        }
        return Err(e);
    }
    let hello = Hello {
        disk_id: hello_bytes[12..28].try_into().expect("16 bytes"),
        disk_size: u64::from_be_bytes(hello_bytes[28..36].try_into().expect("8 bytes")),
    };
    write_status(stream, STATUS_OK, "").await?;
    let salt = SessionSalt {
        source_nonce: hello_bytes[36..68].try_into().expect("32 bytes"),
        target_nonce: SessionSalt::random_half(),
    };
    let transcript = [&hello_bytes[..], &salt.target_nonce[..]].concat();
    stream.write_all(&salt.target_nonce).await?;
    let proof = handshake_proof(key, &salt, Direction::TargetToSource, &transcript);
    stream.write_all(&proof).await?;
    let mut sender_proof = [0u8; 32];
    stream.read_exact(&mut sender_proof).await?;
    if sender_proof == PROOF_REJECTED {
        return Err(FailbackError::OurProofRejected);
    }
    let sender = Direction::SourceToTarget;
    if !verify_proof(key, &salt, sender, &transcript, &sender_proof) {
        let message = "the sender failed to prove it holds our key";
        write_status(stream, STATUS_WRONG_KEY, message).await?;
        return Err(FailbackError::SenderWrongKey);
    }
    // Only an authenticated sender learns whether the disk is ours.
    if let Err(message) = admit(&hello) {
        write_status(stream, STATUS_OTHER_DISK, &message).await?;
        return Err(FailbackError::TurnedAway(message));
    }
    write_status(stream, STATUS_OK, "").await?;
    Ok(Session {
        sealer: Sealer::new(key, &salt, Direction::TargetToSource),
        opener: Opener::new(key, &salt, Direction::SourceToTarget),
        salt,
    })
}

/// The header fields of a failback frame: the original disk's id, a chunk
/// range (digests and chunks frames) or 0, 0 (done frames), no point time.
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
