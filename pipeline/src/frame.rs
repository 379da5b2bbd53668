//! Layout of the replication frame, version 1: the unit the pipeline sends
//! over the wire and the target keeps at rest. Specified in
//! `docs/FORMATS.md`; this module owns every offset, constant and length rule.
//! Sealing and opening (compression, encryption, order) live in
//! [`crate::codec`].
//!
//! ```text
//! header (64 bytes, big-endian; all of it is the AEAD associated data)
//!   0  [u8; 4]  magic "CDPF"
//!   4  u8       version (1)
//!   5  u8       body format: 0 stored, 1 zstd
//!   6  u8       kind: 1 batch, 2 ack; failback: 3 digests, 4 chunks, 5 done;
//!               seed: 6 request, 7 refusal (and 3 digests, 5 done)
//!   7  u8       reserved, zero
//!   8  [u8; 16] disk id
//!  24  u64      first sequence number
//!  32  u64      last sequence number
//!  40  u64      point in time, nanoseconds since the Unix epoch
//!  48  u64      counter; the AES-256-GCM nonce is 4 zero bytes + counter
//!  56  u32      plain_len: length of the plaintext
//!  60  u32      body_len: length of the body
//! body (body_len bytes)
//!   AES-256-GCM ciphertext of the plaintext (format 0) or of its zstd frame
//!   (format 1), then the 16-byte tag
//! ```

/// Length of the frame header.
pub const FRAME_HEADER_LEN: usize = 64;
/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"CDPF";
/// The frame version this build writes and reads.
pub const VERSION: u8 = 1;
/// Length of the AES-256-GCM tag at the end of the body.
pub const TAG_LEN: usize = 16;
/// Length of the AES-256-GCM nonce built from the counter.
pub const NONCE_LEN: usize = 12;
/// Largest plaintext a frame may carry (256 MiB); a reader refuses larger
/// lengths before allocating anything.
pub const MAX_PLAIN_LEN: usize = 256 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// A batch of captured changes, source to target.
    Batch = 1,
    /// An acknowledgement, target to source.
    Ack = 2,
    /// Failback: chunk digests of the original disk, receiver to sender.
    /// Seed: chunk digests of the replica, target to source.
    Digests = 3,
    /// Failback: the chunks whose digests differ, sender to receiver.
    Chunks = 4,
    /// Failback: the end of a pass and its totals, both ways. Seed: the
    /// end of the digests, target to source.
    Done = 5,
    /// Seed: which state of the replica to digest, source to target.
    Request = 6,
    /// Seed: why the target cannot digest that state, target to source.
    Refusal = 7,
}

/// How the plaintext is encoded before encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BodyFormat {
    /// The plaintext as is (it did not get smaller under zstd).
    Stored = 0,
    /// One zstd frame that decompresses to exactly `plain_len` bytes.
    Zstd = 1,
}

/// The header fields the pipeline chooses; authenticated but not encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameMeta {
    pub kind: FrameKind,
    pub disk_id: [u8; 16],
    pub first_seq: u64,
    pub last_seq: u64,
    pub point_time_ns: u64,
}

/// A whole frame header: the metadata plus what the codec fills in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub meta: FrameMeta,
    pub format: BodyFormat,
    /// Frame number within one sealing key; the nonce is derived from it.
    pub counter: u64,
    pub plain_len: u32,
    pub body_len: u32,
}

/// Why 64 bytes are not a valid frame header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("bad magic {0:02x?} (a frame starts with \"CDPF\")")]
    Magic([u8; 4]),
    #[error("unsupported frame version {0} (this build reads version {VERSION})")]
    Version(u8),
    #[error("unknown body format {0} (0 stored, 1 zstd)")]
    Format(u8),
    #[error("unknown frame kind {0} (1 batch, 2 ack, 3 digests, 4 chunks, 5 done)")]
    Kind(u8),
    #[error("reserved byte is {0:#04x}, not zero")]
    Reserved(u8),
    #[error("plaintext length {plain_len} exceeds the limit of {MAX_PLAIN_LEN} bytes")]
    PlainTooLong { plain_len: u32 },
    #[error(
        "body length {body_len} does not fit a {format:?} body of {plain_len} plaintext bytes \
         (stored: plaintext + {TAG_LEN}; zstd: more than {TAG_LEN}, less than plaintext + {TAG_LEN})"
    )]
    BodyLength {
        format: BodyFormat,
        plain_len: u32,
        body_len: u32,
    },
}

impl FrameKind {
    fn from_code(code: u8) -> Result<Self, HeaderError> {
        match code {
            1 => Ok(FrameKind::Batch),
            2 => Ok(FrameKind::Ack),
            3 => Ok(FrameKind::Digests),
            4 => Ok(FrameKind::Chunks),
            5 => Ok(FrameKind::Done),
            6 => Ok(FrameKind::Request),
            7 => Ok(FrameKind::Refusal),
            other => Err(HeaderError::Kind(other)),
        }
    }
}

impl BodyFormat {
    fn from_code(code: u8) -> Result<Self, HeaderError> {
        match code {
            0 => Ok(BodyFormat::Stored),
            1 => Ok(BodyFormat::Zstd),
            other => Err(HeaderError::Format(other)),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Whether `body_len` is a possible body length for `plain_len` bytes in
/// `format`. A zstd body is only written when it is smaller than the
/// plaintext, so both forms are at most `plain_len + TAG_LEN` long.
fn body_len_fits(format: BodyFormat, plain_len: u32, body_len: u32) -> bool {
    let (plain, body) = (u64::from(plain_len), u64::from(body_len));
    let tag = TAG_LEN as u64;
    match format {
        BodyFormat::Stored => body == plain + tag,
        BodyFormat::Zstd => body > tag && body < plain + tag,
    }
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = self.format as u8;
        b[6] = self.meta.kind as u8;
        b[8..24].copy_from_slice(&self.meta.disk_id);
        b[24..32].copy_from_slice(&self.meta.first_seq.to_be_bytes());
        b[32..40].copy_from_slice(&self.meta.last_seq.to_be_bytes());
        b[40..48].copy_from_slice(&self.meta.point_time_ns.to_be_bytes());
        b[48..56].copy_from_slice(&self.counter.to_be_bytes());
        b[56..60].copy_from_slice(&self.plain_len.to_be_bytes());
        b[60..64].copy_from_slice(&self.body_len.to_be_bytes());
        b
    }

    /// Parses and checks a header: magic, version, format, kind, reserved
    /// byte and both lengths. Nothing here is authenticated yet.
    pub fn decode(b: &[u8; FRAME_HEADER_LEN]) -> Result<Self, HeaderError> {
        let magic: [u8; 4] = b[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(HeaderError::Magic(magic));
        }
        if b[4] != VERSION {
            return Err(HeaderError::Version(b[4]));
        }
        let format = BodyFormat::from_code(b[5])?;
        let kind = FrameKind::from_code(b[6])?;
        if b[7] != 0 {
            return Err(HeaderError::Reserved(b[7]));
        }
        let plain_len = u32_at(b, 56);
        let body_len = u32_at(b, 60);
        if plain_len as usize > MAX_PLAIN_LEN {
            return Err(HeaderError::PlainTooLong { plain_len });
        }
        if !body_len_fits(format, plain_len, body_len) {
            return Err(HeaderError::BodyLength {
                format,
                plain_len,
                body_len,
            });
        }
        Ok(FrameHeader {
            meta: FrameMeta {
                kind,
                disk_id: b[8..24].try_into().expect("16 bytes"),
                first_seq: u64_at(b, 24),
                last_seq: u64_at(b, 32),
                point_time_ns: u64_at(b, 40),
            },
            format,
            counter: u64_at(b, 48),
            plain_len,
            body_len,
        })
    }

    /// Length of the whole frame, header included.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + self.body_len as usize
    }

    /// The AES-256-GCM nonce: 4 zero bytes, then the counter big-endian.
    pub fn nonce(&self) -> [u8; NONCE_LEN] {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[4..].copy_from_slice(&self.counter.to_be_bytes());
        nonce
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FrameHeader {
        FrameHeader {
            meta: FrameMeta {
                kind: FrameKind::Batch,
                disk_id: *b"0123456789abcdef",
                first_seq: 10,
                last_seq: 20,
                point_time_ns: 1_700_000_000_000_000_000,
            },
            format: BodyFormat::Zstd,
            counter: 3,
            plain_len: 4096,
            body_len: 100,
        }
    }

    #[test]
    fn header_round_trips_and_is_big_endian() {
        let header = sample();
        let b = header.encode();
        assert_eq!(&b[0..4], b"CDPF");
        assert_eq!(b[4..8], [1, 1, 1, 0]);
        assert_eq!(b[24..32], [0, 0, 0, 0, 0, 0, 0, 10]);
        assert_eq!(b[56..64], [0, 0, 0x10, 0, 0, 0, 0, 100]);
        assert_eq!(FrameHeader::decode(&b), Ok(header));
        assert_eq!(header.frame_len(), 164);
        assert_eq!(header.nonce(), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3]);
    }

    #[test]
    fn bad_fields_are_named() {
        let good = sample().encode();
        let with = |at: usize, value: u8| {
            let mut b = good;
            b[at] = value;
            FrameHeader::decode(&b)
        };
        assert_eq!(with(0, b'X'), Err(HeaderError::Magic(*b"XDPF")));
        assert_eq!(with(4, 2), Err(HeaderError::Version(2)));
        assert_eq!(with(5, 7), Err(HeaderError::Format(7)));
        assert_eq!(with(6, 0), Err(HeaderError::Kind(0)));
        assert_eq!(with(6, 8), Err(HeaderError::Kind(8)));
        assert_eq!(with(7, 1), Err(HeaderError::Reserved(1)));
        assert_eq!(
            with(56, 0x10),
            Err(HeaderError::PlainTooLong {
                plain_len: 0x1000_1000
            })
        );
    }

    #[test]
    fn body_lengths_follow_the_format() {
        let mut header = sample();
        header.format = BodyFormat::Stored;
        let err = FrameHeader::decode(&header.encode()).unwrap_err();
        assert_eq!(
            err,
            HeaderError::BodyLength {
                format: BodyFormat::Stored,
                plain_len: 4096,
                body_len: 100
            }
        );
        header.body_len = 4096 + 16;
        assert!(FrameHeader::decode(&header.encode()).is_ok());
        header.format = BodyFormat::Zstd;
        assert!(FrameHeader::decode(&header.encode()).is_err());
        header.body_len = 16;
        assert!(FrameHeader::decode(&header.encode()).is_err());
        header.body_len = 17;
        assert!(FrameHeader::decode(&header.encode()).is_ok());
    }
}
