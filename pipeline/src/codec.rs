//! The frame codec: turns a plaintext plus its [`FrameMeta`] into a sealed
//! frame and back. This module owns the session keys (HKDF-SHA256 from the
//! pre-shared [`Key`] and the [`SessionSalt`] both sides contribute), the
//! handshake proof, sealing (zstd level 1, kept only if smaller, then
//! AES-256-GCM with the whole header as associated data) and opening
//! (header checks, order check, authentication, decryption, decompression).
//! The byte layout is in [`crate::frame`] and `docs/FORMATS.md`.
//!
//! Nonces never repeat under a key: each direction of each session has its
//! own AES key (the salt holds fresh random halves from both sides), and
//! each [`Sealer`] numbers its frames from 0 upwards.

use std::fmt;
use std::io;

use bytes::{Bytes, BytesMut};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use ring::hkdf::{self, HKDF_SHA256};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::frame::{BodyFormat, FrameHeader, HeaderError, MAX_PLAIN_LEN, TAG_LEN};
pub use crate::frame::{FrameKind, FrameMeta, FRAME_HEADER_LEN};
use crate::key::Key;

/// zstd level used for every frame: fast enough to keep up with the disk.
const ZSTD_LEVEL: i32 = 1;
const SOURCE_TO_TARGET_INFO: &[u8] = b"cdp v1 source-to-target";
const TARGET_TO_SOURCE_INFO: &[u8] = b"cdp v1 target-to-source";
const AUTH_INFO: &[u8] = b"cdp v1 auth";

/// Length of a handshake proof (an HMAC-SHA256 tag).
pub const PROOF_LEN: usize = 32;

/// The per-session salt: a fresh random half from each side, exchanged in
/// the clear at connection time. It makes every session's keys new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionSalt {
    pub source_nonce: [u8; 32],
    pub target_nonce: [u8; 32],
}

impl SessionSalt {
    /// A fresh random half for one side to send.
    ///
    /// # Panics
    /// If the operating system's random source fails (`getrandom`), as no
    /// session can be made safe without it.
    pub fn random_half() -> [u8; 32] {
        let mut half = [0u8; 32];
        SystemRandom::new()
            .fill(&mut half)
            .expect("the operating system's random source failed");
        half
    }

    /// The 64 salt bytes: source half, then target half.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut bytes = [0u8; 64];
        bytes[..32].copy_from_slice(&self.source_nonce);
        bytes[32..].copy_from_slice(&self.target_nonce);
        bytes
    }

    pub fn from_bytes(bytes: &[u8; 64]) -> Self {
        SessionSalt {
            source_nonce: bytes[..32].try_into().expect("32 bytes"),
            target_nonce: bytes[32..].try_into().expect("32 bytes"),
        }
    }
}

/// Which way frames travel; each direction has its own key. Also names the
/// side giving a handshake proof (the source proves with `SourceToTarget`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    SourceToTarget,
    TargetToSource,
}

impl Direction {
    fn hkdf_info(self) -> &'static [u8] {
        match self {
            Direction::SourceToTarget => SOURCE_TO_TARGET_INFO,
            Direction::TargetToSource => TARGET_TO_SOURCE_INFO,
        }
    }

    /// The byte that opens a handshake proof's message.
    fn role_byte(self) -> u8 {
        match self {
            Direction::SourceToTarget => 1,
            Direction::TargetToSource => 2,
        }
    }
}

/// Why a frame was refused. Every variant names the check that failed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes is shorter than the {FRAME_HEADER_LEN}-byte header")]
    Truncated { len: usize },
    #[error("bad frame header: {0}")]
    Header(#[from] HeaderError),
    #[error("frame {counter} is {actual} bytes long but its header says {expected}")]
    FrameLength {
        counter: u64,
        expected: usize,
        actual: usize,
    },
    #[error(
        "frame {counter} is not newer than the last frame opened ({last}): replayed or reordered frame refused"
    )]
    Replayed { counter: u64, last: u64 },
    #[error(
        "frame {counter} ({body_len}-byte body) failed authentication: wrong key, session or direction, or altered bytes"
    )]
    Authentication { counter: u64, body_len: u32 },
    #[error("frame {counter}: zstd body does not decompress into {plain_len} bytes: {source}")]
    Decompress {
        counter: u64,
        plain_len: u32,
        #[source]
        source: io::Error,
    },
    #[error("frame {counter}: zstd body decompressed to {actual} bytes, header says {expected}")]
    PlainLength {
        counter: u64,
        expected: u32,
        actual: usize,
    },
}

fn session_prk(key: &Key, salt: &SessionSalt) -> hkdf::Prk {
    hkdf::Salt::new(HKDF_SHA256, &salt.to_bytes()).extract(key.as_bytes())
}

fn frame_key(key: &Key, salt: &SessionSalt, dir: Direction) -> LessSafeKey {
    let prk = session_prk(key, salt);
    let info = [dir.hkdf_info()];
    let okm = prk
        .expand(&info, &AES_256_GCM)
        .expect("32 bytes are within HKDF-SHA256's output limit");
    LessSafeKey::new(UnboundKey::from(okm))
}

fn auth_key(key: &Key, salt: &SessionSalt) -> hmac::Key {
    let prk = session_prk(key, salt);
    let okm = prk
        .expand(&[AUTH_INFO], hmac::HMAC_SHA256)
        .expect("32 bytes are within HKDF-SHA256's output limit");
    hmac::Key::from(okm)
}

/// Proof that the side playing `role` holds the key: HMAC-SHA256, under the
/// session's auth key, of the role byte followed by `transcript` (the bytes
/// both sides exchanged so far, salt included). Reveals nothing about the key.
pub fn handshake_proof(
    key: &Key,
    salt: &SessionSalt,
    role: Direction,
    transcript: &[u8],
) -> [u8; PROOF_LEN] {
    let mut context = hmac::Context::with_key(&auth_key(key, salt));
    context.update(&[role.role_byte()]);
    context.update(transcript);
    context
        .sign()
        .as_ref()
        .try_into()
        .expect("HMAC-SHA256 tags are 32 bytes")
}

/// Checks a peer's [`handshake_proof`] in constant time.
pub fn verify_proof(
    key: &Key,
    salt: &SessionSalt,
    role: Direction,
    transcript: &[u8],
    proof: &[u8],
) -> bool {
    let mut message = Vec::with_capacity(1 + transcript.len());
    message.push(role.role_byte());
    message.extend_from_slice(transcript);
    hmac::verify(&auth_key(key, salt), &message, proof).is_ok()
}

/// Seals the frames of one direction of one session, numbering them from 0.
pub struct Sealer {
    key: LessSafeKey,
    direction: Direction,
    next_counter: u64,
    compressor: zstd::bulk::Compressor<'static>,
}

impl Sealer {
    pub fn new(key: &Key, salt: &SessionSalt, dir: Direction) -> Sealer {
        Sealer {
            key: frame_key(key, salt, dir),
            direction: dir,
            next_counter: 0,
            compressor: zstd::bulk::Compressor::new(ZSTD_LEVEL)
                .expect("zstd accepts compression level 1"),
        }
    }

    /// Seals `plaintext` into a frame: zstd level 1 if that makes it smaller
    /// (format 1), else the plaintext as is (format 0); then AES-256-GCM
    /// with the 64-byte header as associated data. One allocation, the
    /// frame itself; compression and encryption both work in it.
    ///
    /// # Panics
    /// If `plaintext` is longer than [`MAX_PLAIN_LEN`] (callers cut batches
    /// smaller), or after 2^64 frames (the counter would repeat a nonce).
    pub fn seal(&mut self, meta: &FrameMeta, plaintext: &[u8]) -> Vec<u8> {
        assert!(
            plaintext.len() <= MAX_PLAIN_LEN,
            "a frame carries at most {MAX_PLAIN_LEN} bytes, not {}",
            plaintext.len()
        );
        let counter = self.next_counter;
        self.next_counter = counter
            .checked_add(1)
            .expect("2^64 frames sealed under one key; the nonce would repeat");

        // Room for the stored form; zstd output that does not fit is not
        // smaller than the plaintext anyway.
        let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + plaintext.len() + TAG_LEN);
        frame.resize(FRAME_HEADER_LEN, 0);
        let format = self.compress_after_header(plaintext, &mut frame);
        let header = FrameHeader {
            meta: *meta,
            format,
            counter,
            plain_len: plaintext.len() as u32,
            body_len: (frame.len() - FRAME_HEADER_LEN + TAG_LEN) as u32,
        };
        let header_bytes = header.encode();
        frame[..FRAME_HEADER_LEN].copy_from_slice(&header_bytes);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(header.nonce()),
                Aad::from(header_bytes),
                &mut frame[FRAME_HEADER_LEN..],
            )
            .expect("AES-256-GCM seals up to 64 GiB; frames are at most 256 MiB");
        frame.extend_from_slice(tag.as_ref());
        frame
    }

    /// Appends the body's plaintext to `frame` (which holds the header so
    /// far): zstd's output written straight into the frame's spare capacity
    /// if it is smaller than `plaintext`, else `plaintext` itself.
    fn compress_after_header(&mut self, plaintext: &[u8], frame: &mut Vec<u8>) -> BodyFormat {
        let mut after_header = io::Cursor::new(&mut *frame);
        after_header.set_position(FRAME_HEADER_LEN as u64);
        // An error here means the output did not fit in the room left, which
        // is no smaller than the plaintext; storing is always a valid choice.
        match self
            .compressor
            .compress_to_buffer(plaintext, &mut after_header)
        {
            Ok(compressed_len) if compressed_len < plaintext.len() => BodyFormat::Zstd,
            _ => {
                frame.truncate(FRAME_HEADER_LEN);
                frame.extend_from_slice(plaintext);
                BodyFormat::Stored
            }
        }
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("direction", &self.direction)
            .field("next_counter", &self.next_counter)
            .finish_non_exhaustive()
    }
}

/// Opens the frames of one direction of one session, in order: each frame's
/// counter must be greater than the last one opened, so a replayed or
/// reordered frame is refused.
pub struct Opener {
    key: LessSafeKey,
    direction: Direction,
    last_counter: Option<u64>,
    decompressor: zstd::bulk::Decompressor<'static>,
    /// The decrypted zstd body, reused from frame to frame.
    compressed: Vec<u8>,
}

impl Opener {
    pub fn new(key: &Key, salt: &SessionSalt, dir: Direction) -> Opener {
        Opener {
            key: frame_key(key, salt, dir),
            direction: dir,
            last_counter: None,
            decompressor: zstd::bulk::Decompressor::new()
                .expect("a zstd decompression context needs no parameters"),
            compressed: Vec::new(),
        }
    }

    /// Checks, authenticates, decrypts and decompresses one whole frame and
    /// returns its metadata and plaintext. A frame whose counter is not
    /// greater than the last one opened is refused before decryption; a
    /// refused frame leaves the order state as it was.
    pub fn open(&mut self, frame: &[u8]) -> Result<(FrameMeta, Vec<u8>), CodecError> {
        let header = parse_header(frame)?;
        if let Some(last) = self.last_counter {
            if header.counter <= last {
                return Err(CodecError::Replayed {
                    counter: header.counter,
                    last,
                });
            }
        }
        let plaintext = self.open_body(&header, frame)?;
        self.last_counter = Some(header.counter);
        Ok((header.meta, plaintext))
    }

    /// Authenticates and decrypts the body of `frame` (whose header has been
    /// checked), then decompresses it if it is a zstd body.
    fn open_body(&mut self, header: &FrameHeader, frame: &[u8]) -> Result<Vec<u8>, CodecError> {
        let (header_bytes, body) = frame.split_at(FRAME_HEADER_LEN);
        let (ciphertext, tag) = body.split_at(body.len() - TAG_LEN);
        match header.format {
            BodyFormat::Stored => {
                let mut plaintext = ciphertext.to_vec();
                self.decrypt(header, header_bytes, tag, &mut plaintext)?;
                Ok(plaintext)
            }
            BodyFormat::Zstd => {
                let mut compressed = std::mem::take(&mut self.compressed);
                compressed.clear();
                compressed.extend_from_slice(ciphertext);
                let plaintext = self
                    .decrypt(header, header_bytes, tag, &mut compressed)
                    .and_then(|()| self.decompress(header, &compressed));
                self.compressed = compressed;
                plaintext
            }
        }
    }

    /// As [`Opener::open_body`], but decrypts in the frame's own buffer: a
    /// stored body's plaintext is then a slice of it, with nothing copied;
    /// a zstd body is decompressed into a buffer of its own.
    fn open_body_in_place(
        &mut self,
        header: &FrameHeader,
        mut frame: BytesMut,
    ) -> Result<Bytes, CodecError> {
        let (header_bytes, body) = frame.split_at_mut(FRAME_HEADER_LEN);
        let (ciphertext, tag) = body.split_at_mut(body.len() - TAG_LEN);
        self.decrypt(header, header_bytes, tag, ciphertext)?;
        let plaintext = FRAME_HEADER_LEN..frame.len() - TAG_LEN;
        match header.format {
            BodyFormat::Stored => Ok(frame.freeze().slice(plaintext)),
            BodyFormat::Zstd => Ok(self.decompress(header, &frame[plaintext])?.into()),
        }
    }

    /// Authenticates and decrypts `in_out` (the ciphertext) in place.
    fn decrypt(
        &self,
        header: &FrameHeader,
        header_bytes: &[u8],
        tag: &[u8],
        in_out: &mut [u8],
    ) -> Result<(), CodecError> {
        let tag = Tag::try_from(tag).expect("the header check leaves room for the tag");
        self.key
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(header.nonce()),
                Aad::from(header_bytes),
                tag,
                in_out,
                0..,
            )
            .map(|_| ())
            .map_err(|ring::error::Unspecified| CodecError::Authentication {
                counter: header.counter,
                body_len: header.body_len,
            })
    }

    /// Decompresses a decrypted zstd body to exactly `plain_len` bytes.
    fn decompress(
        &mut self,
        header: &FrameHeader,
        compressed: &[u8],
    ) -> Result<Vec<u8>, CodecError> {
        let plaintext = self
            .decompressor
            .decompress(compressed, header.plain_len as usize)
            .map_err(|source| CodecError::Decompress {
                counter: header.counter,
                plain_len: header.plain_len,
                source,
            })?;
        if plaintext.len() != header.plain_len as usize {
            return Err(CodecError::PlainLength {
                counter: header.counter,
                expected: header.plain_len,
                actual: plaintext.len(),
            });
        }
        Ok(plaintext)
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("direction", &self.direction)
            .field("last_counter", &self.last_counter)
            .finish_non_exhaustive()
    }
}

/// Opens one frame kept at rest (restore reads frames the target stored),
/// with every check of [`Opener::open`] except the order check. Decrypts in
/// `frame`'s own buffer, which it takes: a stored body comes back as a slice
/// of it, without a copy.
pub fn open_at_rest(
    key: &Key,
    salt: &SessionSalt,
    dir: Direction,
    frame: BytesMut,
) -> Result<(FrameMeta, Bytes), CodecError> {
    let header = parse_header(&frame)?;
    let plaintext = Opener::new(key, salt, dir).open_body_in_place(&header, frame)?;
    Ok((header.meta, plaintext))
}

/// Total length of the frame that starts with `header`, so a reader can
/// pull exactly one frame off a stream. Checks the header first, so the
/// length is bounded (at most 64 + 256 MiB + 16 bytes).
pub fn frame_len(header: &[u8; FRAME_HEADER_LEN]) -> Result<usize, CodecError> {
    Ok(FrameHeader::decode(header)?.frame_len())
}

/// Checks the header of a whole frame and that the frame has the length the
/// header gives.
fn parse_header(frame: &[u8]) -> Result<FrameHeader, CodecError> {
    let header_bytes: &[u8; FRAME_HEADER_LEN] = frame
        .get(..FRAME_HEADER_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or(CodecError::Truncated { len: frame.len() })?;
    let header = FrameHeader::decode(header_bytes)?;
    if frame.len() != header.frame_len() {
        return Err(CodecError::FrameLength {
            counter: header.counter,
            expected: header.frame_len(),
            actual: frame.len(),
        });
    }
    Ok(header)
}

#[cfg(test)]
mod tests;
