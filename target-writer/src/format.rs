//! On-disk layout of the journal, version 1: segment file names, the segment
//! header and the entry header. Specified in `docs/FORMATS.md` ("Journal
//! segment, version 1"); everything is little-endian and every header carries
//! a CRC32C. Nothing else in the crate knows a byte offset.
//!
//! ```text
//! segment file DIR/journal/{number:016}.seg, numbered from 1
//! segment header (64 bytes)
//!   0  [u8; 8]  magic "CDPJSEG\0"
//!   8  u32      version (1)
//!  12  u32      header length (64)
//!  16  [u8; 16] disk id
//!  32  u64      disk size in bytes
//!  40  u64      segment number (the one in the file name)
//!  48  u64      id of the segment's first entry
//!  56  u32      reserved, zero
//!  60  u32      CRC32C of bytes 0..60
//! entry header (64 bytes), followed by `body length` bytes of body
//!   0  u32      magic "CJEN" (0x4e454a43 read as little-endian u32)
//!   4  u8       kind: 1 replicated batch
//!   5  u8       flags: bit 0 the batch ends on a barrier; bit 1 cut during a
//!               full sync; bit 2 tagged; others zero
//!   6  u16      reserved, zero
//!   8  u64      entry id (consecutive across segments, from 1)
//!  16  u64      first capture sequence number in the batch
//!  24  u64      last capture sequence number in the batch
//!  32  u64      point time, ns since the epoch, the source's clock
//!  40  u64      received time, ns since the epoch, the target's clock
//!  48  u32      body length
//!  52  u32      CRC32C of the body
//!  56  u32      tagged: CRC32C of the tag field; otherwise reserved, zero
//!  60  u32      CRC32C of bytes 0..60
//! entry body: if tagged, the tag field: u8 tag length (1..=255) and the
//!   tag (UTF-8); then the 64-byte session salt and the encrypted frame
//! ```

pub mod longterm;
use filter::capture::{Tag, TagError};

pub const SEGMENT_MAGIC: [u8; 8] = *b"CDPJSEG\0";
pub const VERSION: u32 = 1;
pub const SEGMENT_HEADER_LEN: usize = 64;
pub const ENTRY_MAGIC: u32 = u32::from_le_bytes(*b"CJEN");
pub const ENTRY_HEADER_LEN: usize = 64;
/// The only entry kind of version 1: one replicated batch, whose body is a
/// 64-byte session salt followed by an encrypted frame (opaque here), after
/// the tag field (see [`encode_tag_field`]) if the entry is tagged.
pub const KIND_BATCH: u8 = 1;
const FLAG_BARRIER: u8 = 1;
const FLAG_IN_SYNC: u8 = 2;
const FLAG_TAGGED: u8 = 4;
/// The most bytes a tagged body starts with before its salt: length and tag.
pub const TAG_FIELD_MAX: usize = 1 + filter::capture::MAX_TAG_LEN;
/// Both headers end in the CRC32C of everything before it.
const CRC_AT: usize = 60;

/// A segment's header: which disk it belongs to and where it sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub disk_id: [u8; 16],
    pub disk_size: u64,
    pub number: u64,
    pub first_entry_id: u64,
}

/// An entry header as stored; the body follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryHeader {
    pub ends_on_barrier: bool,
    /// Cut before the source's full sync completed: applied by restores of
    /// later points, but not a restore point itself.
    pub in_sync: bool,
    /// The body starts with a tag: an application-consistent point.
    pub tagged: bool,
    pub id: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub point_time_ns: u64,
    pub received_time_ns: u64,
    pub body_len: u32,
    pub body_crc: u32,
    /// CRC32C of the tag field of a tagged entry (0 otherwise), so that the
    /// tag can be verified without reading the whole body.
    pub tag_crc: u32,
}

/// Why bytes are not a valid header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("bad magic {0:02x?}")]
    Magic(Vec<u8>),
    #[error("header CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { stored: u32, computed: u32 },
    #[error("unsupported version {0} (this build reads version {VERSION})")]
    Version(u32),
    #[error("header length {0}, expected {SEGMENT_HEADER_LEN}")]
    Length(u32),
    #[error("unknown entry kind {0}")]
    Kind(u8),
    #[error("unknown flags {0:#04x}")]
    Flags(u8),
    #[error("sequence range {first_seq}..={last_seq} is reversed")]
    SeqRange { first_seq: u64, last_seq: u64 },
    #[error("block size {0}, expected {expected}", expected = longterm::BLOCK_SIZE)]
    BlockSize(u32),
    #[error("tag of {0} bytes (at most {max} allowed)", max = longterm::MAX_TAG_LEN)]
    TagLength(usize),
    #[error("tag is not UTF-8")]
    TagUtf8,
    #[error("cut short")]
    Truncated,
    #[error("{0} stray bytes at the end")]
    Trailing(usize),
    #[error("block map of {0} bytes is not a whole number of entries")]
    MapLength(usize),
    #[error("block map entry {index} is malformed, out of order or past the disk's end")]
    MapEntry { index: usize },
}

/// Why a tagged entry's body does not start with a valid tag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagFieldError {
    #[error("a tag of {len} bytes does not fit in a body of {body_len}")]
    Short { len: usize, body_len: usize },
    #[error("tag field CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { stored: u32, computed: u32 },
    #[error(transparent)]
    Invalid(#[from] TagError),
}

/// The start of a tagged entry's body: the tag's length, then the tag.
pub fn encode_tag_field(tag: &Tag) -> Vec<u8> {
    let mut field = Vec::with_capacity(1 + tag.as_str().len());
    field.push(tag.len_byte());
    field.extend_from_slice(tag.as_str().as_bytes());
    field
}

/// Reads the tag a tagged entry's body starts with and checks it against
/// `crc` (the header's tag CRC); `start` is the body, or at least its first
/// [`TAG_FIELD_MAX`] bytes. Returns the tag and the bytes its field takes.
pub fn decode_tag_field(start: &[u8], crc: u32) -> Result<(Tag, usize), TagFieldError> {
    let len = start.first().map_or(0, |&len| usize::from(len));
    let field = start.get(..1 + len).ok_or(TagFieldError::Short {
        len,
        body_len: start.len(),
    })?;
    let computed = crc32c::crc32c(field);
    if computed != crc {
        return Err(TagFieldError::Crc {
            stored: crc,
            computed,
        });
    }
    Ok((Tag::from_bytes(&field[1..])?, field.len()))
}

impl HeaderError {
    /// Whether the header's bytes are damaged (as a torn write leaves them),
    /// rather than intact but not understood.
    pub fn is_damage(&self) -> bool {
        matches!(self, HeaderError::Magic(_) | HeaderError::Crc { .. })
    }
}

/// The file name of segment `number`.
pub fn segment_file_name(number: u64) -> String {
    format!("{number:016}.seg")
}

/// The segment number a file name stands for, if it names a segment.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() == 16 && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()
    } else {
        None
    }
}

/// The file naming the journal's oldest retained segment, written before
/// short-term retention removes segments, so that a segment missing at the
/// start of the journal is still told from one retention removed.
pub const FIRST_SEGMENT_FILE: &str = "first-segment";
const FIRST_SEGMENT_MAGIC: [u8; 8] = *b"CDPJFRST";
pub const FIRST_SEGMENT_LEN: usize = 32;

/// `first-segment` (32 bytes): magic "CDPJFRST", u32 version (1), u32
/// reserved (zero), u64 the oldest retained segment's number, u32 reserved
/// (zero), u32 CRC32C of bytes 0..28.
pub fn encode_first_segment(number: u64) -> [u8; FIRST_SEGMENT_LEN] {
    let mut b = [0u8; FIRST_SEGMENT_LEN];
    put(&mut b, 0, &FIRST_SEGMENT_MAGIC);
    put(&mut b, 8, &VERSION.to_le_bytes());
    put(&mut b, 16, &number.to_le_bytes());
    let crc = crc32c::crc32c(&b[..28]);
    put(&mut b, 28, &crc.to_le_bytes());
    b
}

pub fn decode_first_segment(b: &[u8]) -> Result<u64, HeaderError> {
    if b.len() != FIRST_SEGMENT_LEN {
        return Err(HeaderError::Truncated);
    }
    if b[0..8] != FIRST_SEGMENT_MAGIC {
        return Err(HeaderError::Magic(b[0..8].to_vec()));
    }
    let (stored, computed) = (u32_at(b, 28), crc32c::crc32c(&b[..28]));
    if stored != computed {
        return Err(HeaderError::Crc { stored, computed });
    }
    match u32_at(b, 8) {
        VERSION => Ok(u64_at(b, 16)),
        other => Err(HeaderError::Version(other)),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
    b[at..at + bytes.len()].copy_from_slice(bytes);
}

fn seal(b: &mut [u8; 64]) {
    let crc = crc32c::crc32c(&b[..CRC_AT]);
    put(b, CRC_AT, &crc.to_le_bytes());
}

fn check_crc(b: &[u8; 64]) -> Result<(), HeaderError> {
    let stored = u32_at(b, CRC_AT);
    let computed = crc32c::crc32c(&b[..CRC_AT]);
    if stored == computed {
        Ok(())
    } else {
        Err(HeaderError::Crc { stored, computed })
    }
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        put(&mut b, 0, &SEGMENT_MAGIC);
        put(&mut b, 8, &VERSION.to_le_bytes());
        put(&mut b, 12, &(SEGMENT_HEADER_LEN as u32).to_le_bytes());
        put(&mut b, 16, &self.disk_id);
        put(&mut b, 32, &self.disk_size.to_le_bytes());
        put(&mut b, 40, &self.number.to_le_bytes());
        put(&mut b, 48, &self.first_entry_id.to_le_bytes());
        seal(&mut b);
        b
    }

    pub fn decode(b: &[u8; SEGMENT_HEADER_LEN]) -> Result<Self, HeaderError> {
        if b[0..8] != SEGMENT_MAGIC {
            return Err(HeaderError::Magic(b[0..8].to_vec()));
        }
        check_crc(b)?;
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        let len = u32_at(b, 12);
        if len as usize != SEGMENT_HEADER_LEN {
            return Err(HeaderError::Length(len));
        }
        Ok(SegmentHeader {
            disk_id: b[16..32].try_into().expect("16 bytes"),
            disk_size: u64_at(b, 32),
            number: u64_at(b, 40),
            first_entry_id: u64_at(b, 48),
        })
    }
}

impl EntryHeader {
    pub fn encode(&self) -> [u8; ENTRY_HEADER_LEN] {
        let mut b = [0u8; ENTRY_HEADER_LEN];
        put(&mut b, 0, &ENTRY_MAGIC.to_le_bytes());
        b[4] = KIND_BATCH;
        let flag = |set: bool, bit: u8| if set { bit } else { 0 };
        b[5] = flag(self.ends_on_barrier, FLAG_BARRIER)
            | flag(self.in_sync, FLAG_IN_SYNC)
            | flag(self.tagged, FLAG_TAGGED);
        put(&mut b, 8, &self.id.to_le_bytes());
        put(&mut b, 16, &self.first_seq.to_le_bytes());
        put(&mut b, 24, &self.last_seq.to_le_bytes());
        put(&mut b, 32, &self.point_time_ns.to_le_bytes());
        put(&mut b, 40, &self.received_time_ns.to_le_bytes());
        put(&mut b, 48, &self.body_len.to_le_bytes());
        put(&mut b, 52, &self.body_crc.to_le_bytes());
        put(&mut b, 56, &self.tag_crc.to_le_bytes());
        seal(&mut b);
        b
    }

    pub fn decode(b: &[u8; ENTRY_HEADER_LEN]) -> Result<Self, HeaderError> {
        if u32_at(b, 0) != ENTRY_MAGIC {
            return Err(HeaderError::Magic(b[0..4].to_vec()));
        }
        check_crc(b)?;
        if b[4] != KIND_BATCH {
            return Err(HeaderError::Kind(b[4]));
        }
        if b[5] & !(FLAG_BARRIER | FLAG_IN_SYNC | FLAG_TAGGED) != 0 {
            return Err(HeaderError::Flags(b[5]));
        }
        let header = EntryHeader {
            ends_on_barrier: b[5] & FLAG_BARRIER != 0,
            in_sync: b[5] & FLAG_IN_SYNC != 0,
            tagged: b[5] & FLAG_TAGGED != 0,
            id: u64_at(b, 8),
            first_seq: u64_at(b, 16),
            last_seq: u64_at(b, 24),
            point_time_ns: u64_at(b, 32),
            received_time_ns: u64_at(b, 40),
            body_len: u32_at(b, 48),
            body_crc: u32_at(b, 52),
            tag_crc: u32_at(b, 56),
        };
        if header.first_seq > header.last_seq {
            return Err(HeaderError::SeqRange {
                first_seq: header.first_seq,
                last_seq: header.last_seq,
            });
        }
        Ok(header)
    }

    /// Bytes the entry takes in its segment, header included.
    pub fn entry_len(&self) -> u64 {
        ENTRY_HEADER_LEN as u64 + u64::from(self.body_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_entry() -> EntryHeader {
        EntryHeader {
            ends_on_barrier: true,
            in_sync: false,
            tagged: true,
            id: 3,
            first_seq: 100,
            last_seq: 164,
            point_time_ns: 1_700_000_000_000_000_000,
            received_time_ns: 1_700_000_000_500_000_000,
            body_len: 4096,
            body_crc: crc32c::crc32c(b"body"),
            tag_crc: crc32c::crc32c(b"\x03tag"),
        }
    }

    fn sample_segment() -> SegmentHeader {
        SegmentHeader {
            disk_id: *b"0123456789abcdef",
            disk_size: 1 << 30,
            number: 7,
            first_entry_id: 12,
        }
    }

    proptest! {
        #[test]
        fn entry_headers_round_trip(
            barrier: bool, in_sync: bool, tagged: bool, id: u64, first_seq: u64, span: u64,
            point: u64, received: u64, body_len: u32, body_crc: u32, tag_crc: u32,
        ) {
            let header = EntryHeader {
                ends_on_barrier: barrier,
                in_sync,
                tagged,
                id,
                first_seq,
                last_seq: first_seq.saturating_add(span),
                point_time_ns: point,
                received_time_ns: received,
                body_len,
                body_crc,
                tag_crc,
            };
            prop_assert_eq!(EntryHeader::decode(&header.encode()), Ok(header));
        }

        #[test]
        fn segment_headers_round_trip(
            disk_id: [u8; 16], disk_size: u64, number: u64, first_entry_id: u64,
        ) {
            let header = SegmentHeader { disk_id, disk_size, number, first_entry_id };
            prop_assert_eq!(SegmentHeader::decode(&header.encode()), Ok(header));
        }
    }

    #[test]
    fn any_flipped_bit_is_damage() {
        let entry = sample_entry().encode();
        let segment = sample_segment().encode();
        for bit in 0..64 * 8 {
            let mut bad = entry;
            bad[bit / 8] ^= 1 << (bit % 8);
            let err = EntryHeader::decode(&bad).expect_err("flip went unnoticed");
            assert!(err.is_damage(), "entry bit {bit}: {err}");
            let mut bad = segment;
            bad[bit / 8] ^= 1 << (bit % 8);
            let err = SegmentHeader::decode(&bad).expect_err("flip went unnoticed");
            assert!(err.is_damage(), "segment bit {bit}: {err}");
        }
    }

    #[test]
    fn intact_headers_outside_version_1_are_refused_but_not_damage() {
        let mut b = sample_segment().encode();
        put(&mut b, 8, &2u32.to_le_bytes());
        seal(&mut b);
        assert_eq!(SegmentHeader::decode(&b), Err(HeaderError::Version(2)));
        let mut b = sample_entry().encode();
        b[4] = 9;
        seal(&mut b);
        assert_eq!(EntryHeader::decode(&b), Err(HeaderError::Kind(9)));
        let mut b = sample_entry().encode();
        b[5] = 0x81;
        seal(&mut b);
        assert_eq!(EntryHeader::decode(&b), Err(HeaderError::Flags(0x81)));
        let mut b = sample_entry().encode();
        put(&mut b, 24, &99u64.to_le_bytes());
        seal(&mut b);
        let err = EntryHeader::decode(&b).unwrap_err();
        assert_eq!(
            err,
            HeaderError::SeqRange {
                first_seq: 100,
                last_seq: 99
            }
        );
        assert!(!err.is_damage());
    }

    #[test]
    fn first_segment_records_round_trip_and_refuse_damage() {
        let b = encode_first_segment(42);
        assert_eq!(decode_first_segment(&b), Ok(42));
        for bit in 0..FIRST_SEGMENT_LEN * 8 {
            let mut bad = b;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_first_segment(&bad).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn tag_fields_round_trip_and_bad_ones_are_refused() {
        let tag = Tag::new("before-upgrade").unwrap();
        let field = encode_tag_field(&tag);
        assert_eq!(field[0], 14);
        let crc = crc32c::crc32c(&field);
        let mut body = field.clone();
        body.extend_from_slice(&[7; 64]);
        assert_eq!(decode_tag_field(&body, crc), Ok((tag, 15)));
        let short = TagFieldError::Short {
            len: 14,
            body_len: 10,
        };
        assert_eq!(decode_tag_field(&body[..10], crc), Err(short));
        let empty = TagFieldError::Short {
            len: 0,
            body_len: 0,
        };
        assert_eq!(decode_tag_field(&[], 0), Err(empty));
        let mut flipped = body.clone();
        flipped[3] ^= 0x20;
        assert!(matches!(
            decode_tag_field(&flipped, crc),
            Err(TagFieldError::Crc { stored, .. }) if stored == crc
        ));
        // Intact fields (their CRC checks out) that break the tag rules.
        for (bad, why) in [
            (&[0u8, 1, 2][..], TagError::Empty),
            (&[2, b'a', 0xff], TagError::NotUtf8(1)),
            (&[2, b'a', b'\n'], TagError::Control('\n', 1)),
        ] {
            let field_len = 1 + usize::from(bad[0]);
            let crc = crc32c::crc32c(&bad[..field_len]);
            assert_eq!(decode_tag_field(bad, crc), Err(TagFieldError::Invalid(why)));
        }
    }

    #[test]
    fn segment_file_names_are_fixed_width_and_parse_back() {
        assert_eq!(segment_file_name(1), "0000000000000001.seg");
        assert_eq!(parse_segment_file_name("0000000000000001.seg"), Some(1));
        assert_eq!(parse_segment_file_name("0000000000012345.seg"), Some(12345));
        for name in [
            "1.seg",
            "000000000000000a.seg",
            "0000000000000001.tmp",
            "+000000000000001.seg",
        ] {
            assert_eq!(parse_segment_file_name(name), None, "{name}");
        }
    }
}
