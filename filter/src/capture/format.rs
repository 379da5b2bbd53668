//! On-disk layout of the capture log, version 2 (version 1 is read too: it
//! is version 2 without tag records). Specified in `docs/FORMATS.md`;
//! everything is little-endian and every header carries a CRC32C.
//!
//! ```text
//! file header (64 bytes)
//!   0  [u8; 8]  magic "CDPCAPLG"
//!   8  u32      version (2; 1 in older logs)
//!  12  u32      header length (64)
//!  16  u64      size of the captured disk in bytes
//!  24  u64      sequence number of the first record
//!  32  [u8; 28] reserved, zero
//!  60  u32      CRC32C of bytes 0..60
//! record header (48 bytes), followed by `payload length` bytes of data
//!   0  u32      magic "CREC" (0x43455243 read as little-endian u32)
//!   4  u8       kind: 1 write, 2 trim, 3 zero, 4 flush, 5 tag (version 2)
//!   5  u8       flags: bit 0 FUA
//!   6  u16      reserved, zero
//!   8  u64      sequence number
//!  16  u64      offset on the disk
//!  24  u64      length on the disk
//!  32  u32      payload length (the length for writes, the tag's length
//!               (1..=255) for tags, 0 otherwise)
//!  36  u32      CRC32C of the payload
//!  40  u32      reserved, zero
//!  44  u32      CRC32C of bytes 0..44
//! ```

use super::record::RecordKind;
use super::tag::MAX_TAG_LEN;

pub const FILE_MAGIC: [u8; 8] = *b"CDPCAPLG";
/// The version this code writes; it reads this one and every earlier one.
pub const VERSION: u32 = 2;
/// The first version that may hold tag records.
pub const TAG_VERSION: u32 = 2;
pub const FILE_HEADER_LEN: usize = 64;
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"CREC");
pub const RECORD_HEADER_LEN: usize = 48;
const FLAG_FUA: u8 = 1;

/// The capture log's file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    pub version: u32,
    pub disk_size: u64,
    pub first_seq: u64,
}

/// A record header as stored; the payload follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub fua: bool,
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
    pub payload_len: u32,
    pub payload_crc: u32,
}

/// Why bytes are not a valid header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("bad magic {0:02x?}")]
    Magic(Vec<u8>),
    #[error("unsupported version {0} (this build reads versions 1 to {VERSION})")]
    Version(u32),
    #[error("header CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { stored: u32, computed: u32 },
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("payload length {payload_len} does not fit a {kind:?} record of length {len}")]
    PayloadLength {
        kind: RecordKind,
        len: u64,
        payload_len: u32,
    },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn check_crc(b: &[u8], crc_at: usize) -> Result<(), HeaderError> {
    let stored = u32_at(b, crc_at);
    let computed = crc32c::crc32c(&b[..crc_at]);
    if stored == computed {
        Ok(())
    } else {
        Err(HeaderError::Crc { stored, computed })
    }
}

impl FileHeader {
    pub fn encode(&self) -> [u8; FILE_HEADER_LEN] {
        let mut b = [0u8; FILE_HEADER_LEN];
        b[0..8].copy_from_slice(&FILE_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&(FILE_HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.disk_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_seq.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; FILE_HEADER_LEN]) -> Result<Self, HeaderError> {
        if b[0..8] != FILE_MAGIC {
            return Err(HeaderError::Magic(b[0..8].to_vec()));
        }
        check_crc(b, 60)?;
        let version = u32_at(b, 8);
        if !(1..=VERSION).contains(&version) {
            return Err(HeaderError::Version(version));
        }
        Ok(FileHeader {
            version,
            disk_size: u64_at(b, 16),
            first_seq: u64_at(b, 24),
        })
    }
}

impl RecordKind {
    fn code(self) -> u8 {
        match self {
            RecordKind::Write => 1,
            RecordKind::Trim => 2,
            RecordKind::Zero => 3,
            RecordKind::Flush => 4,
            RecordKind::Tag => 5,
        }
    }

    fn from_code(code: u8) -> Result<Self, HeaderError> {
        Ok(match code {
            1 => RecordKind::Write,
            2 => RecordKind::Trim,
            3 => RecordKind::Zero,
            4 => RecordKind::Flush,
            5 => RecordKind::Tag,
            other => return Err(HeaderError::Kind(other)),
        })
    }
}

impl RecordHeader {
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[4] = self.kind.code();
        b[5] = if self.fua { FLAG_FUA } else { 0 };
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b[32..36].copy_from_slice(&self.payload_len.to_le_bytes());
        b[36..40].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; RECORD_HEADER_LEN]) -> Result<Self, HeaderError> {
        let magic = u32_at(b, 0);
        if magic != RECORD_MAGIC {
            return Err(HeaderError::Magic(b[0..4].to_vec()));
        }
        check_crc(b, 44)?;
        let header = RecordHeader {
            kind: RecordKind::from_code(b[4])?,
            fua: b[5] & FLAG_FUA != 0,
            seq: u64_at(b, 8),
            offset: u64_at(b, 16),
            len: u64_at(b, 24),
            payload_len: u32_at(b, 32),
            payload_crc: u32_at(b, 36),
        };
        let fits = match header.kind {
            RecordKind::Write => u64::from(header.payload_len) == header.len,
            RecordKind::Tag => {
                header.len == 0 && (1..=MAX_TAG_LEN as u32).contains(&header.payload_len)
            }
            RecordKind::Trim | RecordKind::Zero | RecordKind::Flush => header.payload_len == 0,
        };
        if !fits {
            return Err(HeaderError::PayloadLength {
                kind: header.kind,
                len: header.len,
                payload_len: header.payload_len,
            });
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let file = FileHeader {
            version: VERSION,
            disk_size: 1 << 30,
            first_seq: 77,
        };
        assert_eq!(FileHeader::decode(&file.encode()), Ok(file));
        let record = RecordHeader {
            kind: RecordKind::Write,
            fua: true,
            seq: 5,
            offset: 4096,
            len: 3,
            payload_len: 3,
            payload_crc: crc32c::crc32c(b"abc"),
        };
        assert_eq!(RecordHeader::decode(&record.encode()), Ok(record));
    }

    #[test]
    fn tag_records_round_trip_and_their_lengths_are_checked() {
        let tag = RecordHeader {
            kind: RecordKind::Tag,
            fua: false,
            seq: 8,
            offset: 0,
            len: 0,
            payload_len: 14,
            payload_crc: crc32c::crc32c(b"before-upgrade"),
        };
        assert_eq!(RecordHeader::decode(&tag.encode()), Ok(tag));
        for (len, payload_len) in [(0, 0), (0, 256), (14, 14)] {
            let bad = RecordHeader {
                len,
                payload_len,
                ..tag
            };
            assert_eq!(
                RecordHeader::decode(&bad.encode()),
                Err(HeaderError::PayloadLength {
                    kind: RecordKind::Tag,
                    len,
                    payload_len
                })
            );
        }
        let v1 = FileHeader {
            version: 1,
            disk_size: 4096,
            first_seq: 0,
        };
        assert_eq!(FileHeader::decode(&v1.encode()), Ok(v1));
        let v3 = FileHeader { version: 3, ..v1 };
        assert_eq!(
            FileHeader::decode(&v3.encode()),
            Err(HeaderError::Version(3))
        );
    }

    #[test]
    fn any_flipped_bit_is_detected() {
        let record = RecordHeader {
            kind: RecordKind::Trim,
            fua: false,
            seq: 9,
            offset: 0,
            len: 1 << 20,
            payload_len: 0,
            payload_crc: 0,
        };
        let good = record.encode();
        for bit in 0..RECORD_HEADER_LEN * 8 {
            let mut bad = good;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                RecordHeader::decode(&bad).is_err(),
                "flip of bit {bit} went unnoticed"
            );
        }
    }
}
