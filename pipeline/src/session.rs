//! The replication session between a source (`cdp protect`) and a target
//! (`cdp target`), on any byte stream (TCP in practice). Specified in
//! `docs/FORMATS.md` ("Replication session, version 1").
//!
//! Handshake: the source says which disk it protects and sends a random
//! nonce; the target answers with its own nonce and proves it holds the key
//! (an HMAC over the transcript with a key derived from the key file and both
//! nonces); the source checks that proof and proves the same in return. Only
//! then does the target accept frames, so a wrong key on either side is found
//! before anything is written, and each side says so. Both nonces salt the
//! session keys, so frames of two sessions never share a key and nonce.
//!
//! After the handshake the source sends sealed batch frames and the target
//! answers each with a sealed acknowledgment frame once the batch is durable.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{
    frame_len, handshake_proof, verify_proof, Direction, FrameKind, FrameMeta, Opener, Sealer,
    SessionSalt, FRAME_HEADER_LEN,
};
use crate::key::Key;

/// A protocol that opens with this module's handshake: its magic and
/// version, and what each side is called in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocol {
    pub name: &'static str,
    pub magic: [u8; 8],
    pub version: u16,
    /// The side that connects and announces the disk.
    pub initiator: &'static str,
    /// The side that accepts and admits it.
    pub responder: &'static str,
}

/// Replication: `cdp protect` (the source) to `cdp target`.
pub const REPLICATION: Protocol = Protocol {
    name: "replication",
    magic: *b"CDPREPL1",
    version: 1,
    initiator: "source",
    responder: "target",
};
/// Largest frame a peer may send (a batch is cut well below this).
pub const MAX_FRAME: usize = 512 << 20;

const HELLO_LEN: usize = 8 + 2 + 2 + 16 + 8 + 32;
/// What a source sends instead of its proof when the target's proof failed.
const PROOF_REJECTED: [u8; 32] = [0; 32];
const STATUS_OK: u16 = 0;
const STATUS_VERSION: u16 = 1;
const STATUS_OTHER_DISK: u16 = 2;
const STATUS_WRONG_KEY: u16 = 3;

/// What the source announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub disk_id: [u8; 16],
    pub disk_size: u64,
}

/// Where the target's journal stands for this disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetState {
    /// The sequence number of the next record the target expects; 0 when it
    /// holds nothing for this disk yet.
    pub next_seq: u64,
}

/// Why the target turns a source away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    OtherDisk(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer does not speak the cdp {protocol} protocol (bad magic {magic:02x?})")]
    BadMagic {
        protocol: &'static str,
        magic: [u8; 8],
    },
    #[error("{protocol} protocol version mismatch: we speak {ours}, the peer {theirs}")]
    Version {
        protocol: &'static str,
        ours: u16,
        theirs: u16,
    },
    #[error("the {peer} failed to prove it holds our key: the key files differ")]
    PeerWrongKey { peer: &'static str },
    #[error("the {peer} refused us: {message}")]
    Refused { peer: &'static str, message: String },
    #[error("the {peer} rejected our key proof: the key files differ")]
    OurProofRejected { peer: &'static str },
    #[error("turned the {peer} away: {message}")]
    TurnedAway { peer: &'static str, message: String },
    #[error("frame of {0} bytes exceeds the {MAX_FRAME} byte limit")]
    FrameTooBig(usize),
    #[error("frame: {0}")]
    Codec(#[from] crate::codec::CodecError),
    #[error("unexpected {0:?} frame")]
    UnexpectedFrame(FrameKind),
    #[error("malformed acknowledgment of {0} bytes")]
    MalformedAck(usize),
}

/// An established session: seals what we send, opens what we receive.
#[derive(Debug)]
pub struct Session {
    pub salt: SessionSalt,
    pub sealer: Sealer,
    pub opener: Opener,
}

fn encode_hello(protocol: &Protocol, hello: &Hello, nonce: &[u8; 32]) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[0..8].copy_from_slice(&protocol.magic);
    b[8..10].copy_from_slice(&protocol.version.to_be_bytes());
    b[12..28].copy_from_slice(&hello.disk_id);
    b[28..36].copy_from_slice(&hello.disk_size.to_be_bytes());
    b[36..68].copy_from_slice(nonce);
    b
}

/// The bytes both proofs cover: the hello and the target's nonce.
fn transcript(hello: &[u8; HELLO_LEN], target_nonce: &[u8; 32]) -> Vec<u8> {
    [&hello[..], &target_nonce[..]].concat()
}

fn check_magic_and_version(
    protocol: &Protocol,
    magic: [u8; 8],
    version: u16,
) -> Result<(), SessionError> {
    if magic != protocol.magic {
        return Err(SessionError::BadMagic {
            protocol: protocol.name,
            magic,
        });
    }
    if version != protocol.version {
        return Err(SessionError::Version {
            protocol: protocol.name,
            ours: protocol.version,
            theirs: version,
        });
    }
    Ok(())
}

async fn write_status<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    message: &str,
) -> std::io::Result<()> {
    let message = &message.as_bytes()[..message.len().min(1024)];
    let mut b = Vec::with_capacity(4 + message.len());
    b.extend_from_slice(&status.to_be_bytes());
    b.extend_from_slice(&(message.len() as u16).to_be_bytes());
    b.extend_from_slice(message);
    stream.write_all(&b).await
}

async fn read_status<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(u16, String), SessionError> {
    let status = stream.read_u16().await?;
    let len = stream.read_u16().await? as usize;
    let mut message = vec![0u8; len];
    stream.read_exact(&mut message).await?;
    Ok((status, String::from_utf8_lossy(&message).into_owned()))
}

/// What a status other than OK from the responder means to the initiator.
fn error_for_status(protocol: &Protocol, status: u16, message: String) -> SessionError {
    match status {
        STATUS_WRONG_KEY => SessionError::OurProofRejected {
            peer: protocol.responder,
        },
        _ => SessionError::Refused {
            peer: protocol.responder,
            message,
        },
    }
}

async fn read_ok<S: AsyncRead + Unpin>(
    stream: &mut S,
    protocol: &Protocol,
) -> Result<(), SessionError> {
    match read_status(stream).await? {
        (STATUS_OK, _) => Ok(()),
        (status, message) => Err(error_for_status(protocol, status, message)),
    }
}

/// The source's side: announces the disk, checks the target's proof, proves
/// ours, and learns where the target stands.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &Key,
    hello: Hello,
) -> Result<(Session, TargetState), SessionError> {
    let mut session = connect_with(stream, key, &REPLICATION, hello).await?;
    let (meta, body) = session.receive(stream).await?;
    if meta.kind != FrameKind::Ack {
        return Err(SessionError::UnexpectedFrame(meta.kind));
    }
    let next_seq = decode_ack(&body)?;
    Ok((session, TargetState { next_seq }))
}

/// The initiator's side of `protocol`'s handshake: announces the disk,
/// checks the responder's proof and proves ours. Frames it seals travel
/// `SourceToTarget`.
pub async fn connect_with<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &Key,
    protocol: &Protocol,
    hello: Hello,
) -> Result<Session, SessionError> {
    let source_nonce = SessionSalt::random_half();
    let hello_bytes = encode_hello(protocol, &hello, &source_nonce);
    stream.write_all(&hello_bytes).await?;
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic).await?;
    let version = stream.read_u16().await?;
    check_magic_and_version(protocol, magic, version)?;
    read_ok(stream, protocol).await?;
    let mut target_nonce = [0u8; 32];
    stream.read_exact(&mut target_nonce).await?;
    let mut target_proof = [0u8; 32];
    stream.read_exact(&mut target_proof).await?;
    let salt = SessionSalt {
        source_nonce,
        target_nonce,
    };
    let transcript = transcript(&hello_bytes, &target_nonce);
    let responder = Direction::TargetToSource;
    if !verify_proof(key, &salt, responder, &transcript, &target_proof) {
        // Tell the responder why we hang up, so its log can say so too.
        let _ = stream.write_all(&PROOF_REJECTED).await;
        return Err(SessionError::PeerWrongKey {
            peer: protocol.responder,
        });
    }
    let proof = handshake_proof(key, &salt, Direction::SourceToTarget, &transcript);
    stream.write_all(&proof).await?;
    read_ok(stream, protocol).await?;
    Ok(Session {
        sealer: Sealer::new(key, &salt, Direction::SourceToTarget),
        opener: Opener::new(key, &salt, Direction::TargetToSource),
        salt,
    })
}

/// The target's side: reads the hello, proves our key, checks the source's
/// proof, asks `admit` whether to take this disk (and where its journal
/// stands), and tells the source where we stand.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &Key,
    admit: impl FnOnce(&Hello) -> Result<TargetState, Refusal>,
) -> Result<(Session, Hello), SessionError> {
    let mut state = None;
    let (mut session, hello) = accept_with(stream, key, &REPLICATION, |hello| {
        let admitted = admit(hello).map_err(|Refusal::OtherDisk(message)| message)?;
        state = Some(admitted);
        Ok(())
    })
    .await?;
    let next_seq = state.expect("admitted").next_seq;
    session.send_ack(stream, hello.disk_id, next_seq).await?;
    Ok((session, hello))
}

/// The responder's side of `protocol`'s handshake: reads the hello, proves
/// our key, checks the initiator's proof, and only then asks `admit`
/// whether to take the announced disk (an error is the reason to turn the
/// initiator away). Frames it seals travel `TargetToSource`.
pub async fn accept_with<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &Key,
    protocol: &Protocol,
    admit: impl FnOnce(&Hello) -> Result<(), String>,
) -> Result<(Session, Hello), SessionError> {
    let mut hello_bytes = [0u8; HELLO_LEN];
    stream.read_exact(&mut hello_bytes).await?;
    let magic: [u8; 8] = hello_bytes[0..8].try_into().expect("8 bytes");
    let version = u16::from_be_bytes([hello_bytes[8], hello_bytes[9]]);
    stream.write_all(&protocol.magic).await?;
    stream.write_all(&protocol.version.to_be_bytes()).await?;
    if let Err(e) = check_magic_and_version(protocol, magic, version) {
        if matches!(e, SessionError::Version { .. }) {
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
    let transcript = transcript(&hello_bytes, &salt.target_nonce);
    stream.write_all(&salt.target_nonce).await?;
    let proof = handshake_proof(key, &salt, Direction::TargetToSource, &transcript);
    stream.write_all(&proof).await?;
    let mut source_proof = [0u8; 32];
    stream.read_exact(&mut source_proof).await?;
    if source_proof == PROOF_REJECTED {
        return Err(SessionError::OurProofRejected {
            peer: protocol.initiator,
        });
    }
    if !verify_proof(
        key,
        &salt,
        Direction::SourceToTarget,
        &transcript,
        &source_proof,
    ) {
        let message = format!(
            "the {} failed to prove it holds our key",
            protocol.initiator
        );
        write_status(stream, STATUS_WRONG_KEY, &message).await?;
        return Err(SessionError::PeerWrongKey {
            peer: protocol.initiator,
        });
    }
    // Only an authenticated initiator may claim anything of ours, or learn
    // anything about it.
    if let Err(message) = admit(&hello) {
        write_status(stream, STATUS_OTHER_DISK, &message).await?;
        return Err(SessionError::TurnedAway {
            peer: protocol.initiator,
            message,
        });
    }
    write_status(stream, STATUS_OK, "").await?;
    let session = Session {
        sealer: Sealer::new(key, &salt, Direction::TargetToSource),
        opener: Opener::new(key, &salt, Direction::SourceToTarget),
        salt,
    };
    Ok((session, hello))
}

/// An acknowledgment's plaintext: the next sequence number the target expects.
pub fn encode_ack(next_seq: u64) -> [u8; 8] {
    next_seq.to_be_bytes()
}

pub fn decode_ack(body: &[u8]) -> Result<u64, SessionError> {
    let b: [u8; 8] = body
        .try_into()
        .map_err(|_| SessionError::MalformedAck(body.len()))?;
    Ok(u64::from_be_bytes(b))
}

/// Reads one raw frame (header and body) off a stream; not cancel-safe
/// (see [`read_frame_into`]).
pub async fn read_frame<R: AsyncRead + Unpin>(stream: &mut R) -> Result<Vec<u8>, SessionError> {
    let mut frame = Vec::new();
    read_frame_into(stream, &mut frame).await?;
    Ok(frame)
}

/// Reads one whole frame onto the end of `buf`, into memory it does not
/// zero first (a frame is up to a batch long). Not cancel-safe: a cancelled
/// read leaves the stream mid-frame.
pub async fn read_frame_into<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(), SessionError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    stream.read_exact(&mut header).await?;
    let len = frame_len(&header)?;
    if len > MAX_FRAME {
        return Err(SessionError::FrameTooBig(len));
    }
    buf.reserve(len);
    buf.extend_from_slice(&header);
    let rest = (len - FRAME_HEADER_LEN) as u64;
    if (&mut *stream).take(rest).read_to_end(buf).await? as u64 != rest {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(())
}

impl Session {
    /// Tells the source which sequence number the target expects next (which
    /// acknowledges everything before it as durable).
    pub async fn send_ack<W: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut W,
        disk_id: [u8; 16],
        next_seq: u64,
    ) -> Result<(), SessionError> {
        let meta = FrameMeta {
            kind: FrameKind::Ack,
            disk_id,
            first_seq: 0,
            last_seq: 0,
            point_time_ns: 0,
        };
        self.send(stream, &meta, &encode_ack(next_seq)).await
    }

    /// Seals and sends one frame.
    pub async fn send<W: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut W,
        meta: &FrameMeta,
        plaintext: &[u8],
    ) -> Result<(), SessionError> {
        let frame = self.sealer.seal(meta, plaintext);
        stream.write_all(&frame).await?;
        Ok(())
    }

    /// Receives and opens one frame.
    pub async fn receive<R: AsyncRead + Unpin>(
        &mut self,
        stream: &mut R,
    ) -> Result<(FrameMeta, Vec<u8>), SessionError> {
        let frame = read_frame(stream).await?;
        Ok(self.opener.open(&frame)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dir: &std::path::Path, name: &str) -> Key {
        Key::generate(dir.join(name)).unwrap()
    }

    const HELLO: Hello = Hello {
        disk_id: *b"disk-0123456789a",
        disk_size: 1 << 30,
    };

    async fn handshake(
        source_key: &Key,
        target_key: &Key,
        admit: impl FnOnce(&Hello) -> Result<TargetState, Refusal>,
    ) -> (
        Result<(Session, TargetState), SessionError>,
        Result<(Session, Hello), SessionError>,
    ) {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        // Each side owns its end, so a side that gives up closes it.
        let source = async move { connect(&mut a, source_key, HELLO).await };
        let target = async move { accept(&mut b, target_key, admit).await };
        tokio::join!(source, target)
    }

    #[tokio::test]
    async fn both_sides_agree_and_frames_flow() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(dir.path(), "k");
        let (source, target) = handshake(&k, &k, |hello| {
            assert_eq!(*hello, HELLO);
            Ok(TargetState { next_seq: 42 })
        })
        .await;
        let (mut source, state) = source.unwrap();
        let (mut target, hello) = target.unwrap();
        assert_eq!(state, TargetState { next_seq: 42 });
        assert_eq!(hello, HELLO);
        assert_eq!(source.salt.to_bytes(), target.salt.to_bytes());
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let meta = FrameMeta {
            kind: FrameKind::Batch,
            disk_id: HELLO.disk_id,
            first_seq: 42,
            last_seq: 50,
            point_time_ns: 7,
        };
        source.send(&mut a, &meta, b"payload").await.unwrap();
        let (got, body) = target.receive(&mut b).await.unwrap();
        assert_eq!((got, body.as_slice()), (meta, &b"payload"[..]));
    }

    #[tokio::test]
    async fn a_wrong_key_is_caught_by_each_side() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs) = (key(dir.path(), "a"), key(dir.path(), "b"));
        let (source, target) = handshake(&ours, &theirs, |_| Ok(TargetState { next_seq: 0 })).await;
        assert!(
            matches!(source, Err(SessionError::PeerWrongKey { peer: "target" })),
            "{source:?}"
        );
        // The source says it rejected our proof, so the target's log can too.
        assert!(
            matches!(
                target,
                Err(SessionError::OurProofRejected { peer: "source" })
            ),
            "{target:?}"
        );
    }

    #[tokio::test]
    async fn a_refusal_reaches_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(dir.path(), "k");
        let (source, target) = handshake(&k, &k, |_| {
            Err(Refusal::OtherDisk("holds another disk".into()))
        })
        .await;
        assert!(
            matches!(source, Err(SessionError::Refused { ref message, .. }) if message.contains("another disk")),
            "{source:?}"
        );
        assert!(target.is_err());
    }

    #[tokio::test]
    async fn garbage_is_not_taken_for_a_hello() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(dir.path(), "k");
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&[0x55; HELLO_LEN]).await.unwrap();
        let target = accept(&mut b, &k, |_| Ok(TargetState { next_seq: 0 })).await;
        assert!(
            matches!(target, Err(SessionError::BadMagic { .. })),
            "{target:?}"
        );
    }
}
