//! On-disk layout of the long-term tier, version 1: the catalog, and the
//! image header and block map shared by delta images and the base map.
//! Specified in `docs/FORMATS.md` ("Long-term tier, version 1"); everything
//! is little-endian and every header and record carries a CRC32C.
//!
//! ```text
//! DIR/longterm/catalog                 the long-term points (replaced atomically)
//! DIR/longterm/base.img                the disk at the base point, a raw sparse image
//! DIR/longterm/{number:016}.basemap    image header + block map of base.img
//! DIR/longterm/{number:016}.delta      image header + data region + block map
//! DIR/longterm/pin                     readers hold a shared flock on it
//!
//! image header (4096 bytes)
//!    0  [u8; 8]  magic "CDPIMAGE"
//!    8  u32      version (1)
//!   12  u32      header length (4096)
//!   16  u8       kind: 1 delta image, 2 base map
//!   17  u8       flags: bit 0 the point is tagged; others zero
//!   18  u16      tag length (at most 255)
//!   20  u32      block size (4096)
//!   24  [u8; 16] disk id
//!   40  u64      disk size in bytes
//!   48  u64      file number (the one in the file name)
//!   56  u64      point: journal entry id
//!   64  u64      point: last capture sequence number
//!   72  u64      point: time, ns since the epoch (the source's clock)
//!   80  u64      point: received time, ns since the epoch (the target's clock)
//!   88  u64      map offset in the file
//!   96  u64      map entry count
//!  104  u32      CRC32C of the map
//!  108  [u8; n]  tag, UTF-8, n = tag length
//! 4092  u32      CRC32C of bytes 0..4092
//! data region (delta images only): block b at offset 4096 + b * block size
//! block map: entries sorted by block, strictly ascending, 16 bytes each
//!    0  u64      block number
//!    8  u32      CRC32C of the block's data (zero for a zero block)
//!   12  u8       state: 1 data, 2 zeros
//!   13  [u8; 3]  reserved, zero
//!
//! catalog header (64 bytes), followed by `count` point records
//!    0  [u8; 8]  magic "CDPCATLG"
//!    8  u32      version (1)
//!   12  u32      header length (64)
//!   16  [u8; 16] disk id
//!   32  u64      disk size in bytes
//!   40  u64      generation (one more at every replacement)
//!   48  u64      number of the delta being merged into the base, 0 if none
//!   56  u32      point record count
//!   60  u32      CRC32C of bytes 0..60
//! point record (64 bytes + tag)
//!    0  u32      magic "CLTP"
//!    4  u8       kind: 1 base (its base map's number), 2 delta
//!    5  u8       flags: bit 0 tagged, bit 1 the point ends on a barrier
//!    6  u16      tag length (at most 255)
//!    8  u64      file number
//!   16  u64      point: journal entry id
//!   24  u64      point: last capture sequence number
//!   32  u64      point: time, ns since the epoch
//!   40  u64      point: received time, ns since the epoch
//!   48  u64      bytes of data the file holds for the point
//!   56  u32      reserved, zero
//!   60  u32      CRC32C of bytes 0..60 and the tag
//!   64  [u8; n]  tag, UTF-8
//! ```

use super::{put, u32_at, u64_at, HeaderError, VERSION};

pub const LONGTERM_DIR: &str = "longterm";
pub const CATALOG_FILE: &str = "catalog";
pub const BASE_IMAGE_FILE: &str = "base.img";
pub const PIN_FILE: &str = "pin";
/// The granularity of the long-term tier.
pub const BLOCK_SIZE: u32 = 4096;
pub const IMAGE_HEADER_LEN: usize = 4096;
pub const MAP_ENTRY_LEN: usize = 16;
pub const MAX_TAG_LEN: usize = 255;

const IMAGE_MAGIC: [u8; 8] = *b"CDPIMAGE";
const CATALOG_MAGIC: [u8; 8] = *b"CDPCATLG";
const POINT_MAGIC: u32 = u32::from_le_bytes(*b"CLTP");
const CATALOG_HEADER_LEN: usize = 64;
const POINT_RECORD_LEN: usize = 64;
const IMAGE_CRC_AT: usize = IMAGE_HEADER_LEN - 4;
const IMAGE_TAG_AT: usize = 108;
const FLAG_TAGGED: u8 = 1;
const FLAG_BARRIER: u8 = 2;
const STATE_DATA: u8 = 1;
const STATE_ZERO: u8 = 2;

/// Which file an image header heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// A delta image: the blocks changed since the previous long-term point.
    Delta = 1,
    /// The block map of `base.img`.
    BaseMap = 2,
}

/// The restore point a long-term image stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PointStamp {
    /// The journal entry id of the point; long-term points share the
    /// journal's ids.
    pub entry_id: u64,
    pub last_seq: u64,
    pub point_time_ns: u64,
    pub received_time_ns: u64,
}

/// What a block map says about one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// The block holds data with this CRC32C.
    Data { crc: u32 },
    /// The block reads as zeros; nothing is stored.
    Zero,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    pub block: u64,
    pub state: BlockState,
}

/// The header of a delta image or base map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHeader {
    pub kind: ImageKind,
    pub disk_id: [u8; 16],
    pub disk_size: u64,
    pub block_size: u32,
    pub number: u64,
    pub point: PointStamp,
    pub map_offset: u64,
    pub map_entries: u64,
    pub map_crc: u32,
    pub tag: Option<String>,
}

/// One long-term point in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongTermPoint {
    /// The number of the point's file: its delta image, or for the base its
    /// base map.
    pub number: u64,
    pub point: PointStamp,
    /// Bytes of block data stored for the point.
    pub bytes: u64,
    pub tag: Option<String>,
    /// The point ends on a barrier (a flush or FUA write).
    pub ends_on_barrier: bool,
}

/// The long-term points of one disk: the base (if a roll has made one) and
/// the deltas after it, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    pub disk_id: [u8; 16],
    pub disk_size: u64,
    pub generation: u64,
    /// A delta whose merge into the base was started and not finished: its
    /// blocks may be in `base.img` already, so the base's own point is gone.
    pub merging: Option<u64>,
    pub base: Option<LongTermPoint>,
    pub deltas: Vec<LongTermPoint>,
}

pub fn delta_file_name(number: u64) -> String {
    format!("{number:016}.delta")
}

pub fn base_map_file_name(number: u64) -> String {
    format!("{number:016}.basemap")
}

/// The number of a delta image or base map file name.
pub fn parse_image_file_name(name: &str) -> Option<(ImageKind, u64)> {
    let (digits, kind) = if let Some(d) = name.strip_suffix(".delta") {
        (d, ImageKind::Delta)
    } else {
        (name.strip_suffix(".basemap")?, ImageKind::BaseMap)
    };
    if digits.len() == 16 && digits.bytes().all(|b| b.is_ascii_digit()) {
        Some((kind, digits.parse().ok()?))
    } else {
        None
    }
}

fn check_tag(tag: Option<&str>) -> Result<(u8, &[u8]), HeaderError> {
    match tag {
        None => Ok((0, &[])),
        Some(t) if t.len() <= MAX_TAG_LEN => Ok((FLAG_TAGGED, t.as_bytes())),
        Some(t) => Err(HeaderError::TagLength(t.len())),
    }
}

fn decode_tag(flags: u8, bytes: &[u8]) -> Result<Option<String>, HeaderError> {
    if flags & FLAG_TAGGED == 0 {
        return if bytes.is_empty() {
            Ok(None)
        } else {
            Err(HeaderError::TagLength(bytes.len()))
        };
    }
    String::from_utf8(bytes.to_vec())
        .map(Some)
        .map_err(|_| HeaderError::TagUtf8)
}

fn put_stamp(b: &mut [u8], at: usize, p: &PointStamp) {
    put(b, at, &p.entry_id.to_le_bytes());
    put(b, at + 8, &p.last_seq.to_le_bytes());
    put(b, at + 16, &p.point_time_ns.to_le_bytes());
    put(b, at + 24, &p.received_time_ns.to_le_bytes());
}

fn stamp_at(b: &[u8], at: usize) -> PointStamp {
    PointStamp {
        entry_id: u64_at(b, at),
        last_seq: u64_at(b, at + 8),
        point_time_ns: u64_at(b, at + 16),
        received_time_ns: u64_at(b, at + 24),
    }
}

fn check_crc_at(b: &[u8], at: usize) -> Result<(), HeaderError> {
    let stored = u32_at(b, at);
    let computed = crc32c::crc32c(&b[..at]);
    if stored == computed {
        Ok(())
    } else {
        Err(HeaderError::Crc { stored, computed })
    }
}

fn check_version(b: &[u8], header_len: usize) -> Result<(), HeaderError> {
    let version = u32_at(b, 8);
    if version != VERSION {
        return Err(HeaderError::Version(version));
    }
    let len = u32_at(b, 12);
    if len as usize != header_len {
        return Err(HeaderError::Length(len));
    }
    Ok(())
}

impl ImageHeader {
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        let (flags, tag) = check_tag(self.tag.as_deref())?;
        let mut b = vec![0u8; IMAGE_HEADER_LEN];
        put(&mut b, 0, &IMAGE_MAGIC);
        put(&mut b, 8, &VERSION.to_le_bytes());
        put(&mut b, 12, &(IMAGE_HEADER_LEN as u32).to_le_bytes());
        b[16] = self.kind as u8;
        b[17] = flags;
        put(&mut b, 18, &(tag.len() as u16).to_le_bytes());
        put(&mut b, 20, &self.block_size.to_le_bytes());
        put(&mut b, 24, &self.disk_id);
        put(&mut b, 40, &self.disk_size.to_le_bytes());
        put(&mut b, 48, &self.number.to_le_bytes());
        put_stamp(&mut b, 56, &self.point);
        put(&mut b, 88, &self.map_offset.to_le_bytes());
        put(&mut b, 96, &self.map_entries.to_le_bytes());
        put(&mut b, 104, &self.map_crc.to_le_bytes());
        put(&mut b, IMAGE_TAG_AT, tag);
        let crc = crc32c::crc32c(&b[..IMAGE_CRC_AT]);
        put(&mut b, IMAGE_CRC_AT, &crc.to_le_bytes());
        Ok(b)
    }

    pub fn decode(b: &[u8; IMAGE_HEADER_LEN]) -> Result<Self, HeaderError> {
        if b[0..8] != IMAGE_MAGIC {
            return Err(HeaderError::Magic(b[0..8].to_vec()));
        }
        check_crc_at(b, IMAGE_CRC_AT)?;
        check_version(b, IMAGE_HEADER_LEN)?;
        let kind = match b[16] {
            1 => ImageKind::Delta,
            2 => ImageKind::BaseMap,
            other => return Err(HeaderError::Kind(other)),
        };
        if b[17] & !FLAG_TAGGED != 0 {
            return Err(HeaderError::Flags(b[17]));
        }
        let tag_len = usize::from(u16::from_le_bytes([b[18], b[19]]));
        if tag_len > MAX_TAG_LEN {
            return Err(HeaderError::TagLength(tag_len));
        }
        let block_size = u32_at(b, 20);
        if block_size != BLOCK_SIZE {
            return Err(HeaderError::BlockSize(block_size));
        }
        Ok(ImageHeader {
            kind,
            disk_id: b[24..40].try_into().expect("16 bytes"),
            disk_size: u64_at(b, 40),
            block_size,
            number: u64_at(b, 48),
            point: stamp_at(b, 56),
            map_offset: u64_at(b, 88),
            map_entries: u64_at(b, 96),
            map_crc: u32_at(b, 104),
            tag: decode_tag(b[17], &b[IMAGE_TAG_AT..IMAGE_TAG_AT + tag_len])?,
        })
    }
}

/// The bytes of a block map; `entries` must be sorted by block.
pub fn encode_map(entries: &[MapEntry]) -> Vec<u8> {
    let mut b = vec![0u8; entries.len() * MAP_ENTRY_LEN];
    for (entry, raw) in entries.iter().zip(b.chunks_exact_mut(MAP_ENTRY_LEN)) {
        put(raw, 0, &entry.block.to_le_bytes());
        let (crc, state) = match entry.state {
            BlockState::Data { crc } => (crc, STATE_DATA),
            BlockState::Zero => (0, STATE_ZERO),
        };
        put(raw, 8, &crc.to_le_bytes());
        raw[12] = state;
    }
    b
}

/// Decodes a block map of `disk_blocks` blocks, checking its order. The
/// caller checks its CRC against the header first.
pub fn decode_map(b: &[u8], disk_blocks: u64) -> Result<Vec<MapEntry>, HeaderError> {
    if b.len() % MAP_ENTRY_LEN != 0 {
        return Err(HeaderError::MapLength(b.len()));
    }
    let mut entries = Vec::with_capacity(b.len() / MAP_ENTRY_LEN);
    for (i, raw) in b.chunks_exact(MAP_ENTRY_LEN).enumerate() {
        let block = u64_at(raw, 0);
        let crc = u32_at(raw, 8);
        let state = match (raw[12], crc) {
            (STATE_DATA, crc) => BlockState::Data { crc },
            (STATE_ZERO, 0) => BlockState::Zero,
            _ => return Err(HeaderError::MapEntry { index: i }),
        };
        let ordered = entries.last().is_none_or(|e: &MapEntry| e.block < block);
        if raw[13..16] != [0, 0, 0] || block >= disk_blocks || !ordered {
            return Err(HeaderError::MapEntry { index: i });
        }
        entries.push(MapEntry { block, state });
    }
    Ok(entries)
}

impl LongTermPoint {
    fn encode_into(&self, kind: u8, out: &mut Vec<u8>) -> Result<(), HeaderError> {
        let (flags, tag) = check_tag(self.tag.as_deref())?;
        let mut b = [0u8; POINT_RECORD_LEN];
        put(&mut b, 0, &POINT_MAGIC.to_le_bytes());
        b[4] = kind;
        b[5] = flags
            | if self.ends_on_barrier {
                FLAG_BARRIER
            } else {
                0
            };
        put(&mut b, 6, &(tag.len() as u16).to_le_bytes());
        put(&mut b, 8, &self.number.to_le_bytes());
        put_stamp(&mut b, 16, &self.point);
        put(&mut b, 48, &self.bytes.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..60]), tag);
        put(&mut b, 60, &crc.to_le_bytes());
        out.extend_from_slice(&b);
        out.extend_from_slice(tag);
        Ok(())
    }

    /// Decodes the record at the start of `b`; returns it, its kind and its length.
    fn decode(b: &[u8]) -> Result<(Self, u8, usize), HeaderError> {
        if b.len() < POINT_RECORD_LEN {
            return Err(HeaderError::Truncated);
        }
        if u32_at(b, 0) != POINT_MAGIC {
            return Err(HeaderError::Magic(b[0..4].to_vec()));
        }
        let tag_len = usize::from(u16::from_le_bytes([b[6], b[7]]));
        if tag_len > MAX_TAG_LEN {
            return Err(HeaderError::TagLength(tag_len));
        }
        let tag = b
            .get(POINT_RECORD_LEN..POINT_RECORD_LEN + tag_len)
            .ok_or(HeaderError::Truncated)?;
        let stored = u32_at(b, 60);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&b[..60]), tag);
        if stored != computed {
            return Err(HeaderError::Crc { stored, computed });
        }
        if b[5] & !(FLAG_TAGGED | FLAG_BARRIER) != 0 {
            return Err(HeaderError::Flags(b[5]));
        }
        let point = LongTermPoint {
            number: u64_at(b, 8),
            point: stamp_at(b, 16),
            bytes: u64_at(b, 48),
            tag: decode_tag(b[5] & FLAG_TAGGED, tag)?,
            ends_on_barrier: b[5] & FLAG_BARRIER != 0,
        };
        Ok((point, b[4], POINT_RECORD_LEN + tag_len))
    }
}

const KIND_BASE: u8 = 1;
const KIND_DELTA: u8 = 2;

impl Catalog {
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        let count = self.deltas.len() + usize::from(self.base.is_some());
        let mut b = vec![0u8; CATALOG_HEADER_LEN];
        put(&mut b, 0, &CATALOG_MAGIC);
        put(&mut b, 8, &VERSION.to_le_bytes());
        put(&mut b, 12, &(CATALOG_HEADER_LEN as u32).to_le_bytes());
        put(&mut b, 16, &self.disk_id);
        put(&mut b, 32, &self.disk_size.to_le_bytes());
        put(&mut b, 40, &self.generation.to_le_bytes());
        put(&mut b, 48, &self.merging.unwrap_or(0).to_le_bytes());
        put(&mut b, 56, &(count as u32).to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        put(&mut b, 60, &crc.to_le_bytes());
        if let Some(base) = &self.base {
            base.encode_into(KIND_BASE, &mut b)?;
        }
        for delta in &self.deltas {
            delta.encode_into(KIND_DELTA, &mut b)?;
        }
        Ok(b)
    }

    pub fn decode(b: &[u8]) -> Result<Self, HeaderError> {
        if b.len() < CATALOG_HEADER_LEN {
            return Err(HeaderError::Truncated);
        }
        if b[0..8] != CATALOG_MAGIC {
            return Err(HeaderError::Magic(b[0..8].to_vec()));
        }
        check_crc_at(b, 60)?;
        check_version(b, CATALOG_HEADER_LEN)?;
        let merging = u64_at(b, 48);
        let mut catalog = Catalog {
            disk_id: b[16..32].try_into().expect("16 bytes"),
            disk_size: u64_at(b, 32),
            generation: u64_at(b, 40),
            merging: (merging != 0).then_some(merging),
            base: None,
            deltas: Vec::new(),
        };
        let mut at = CATALOG_HEADER_LEN;
        for index in 0..u32_at(b, 56) as usize {
            let (point, kind, len) = LongTermPoint::decode(&b[at..])?;
            match kind {
                KIND_BASE if index == 0 => catalog.base = Some(point),
                KIND_DELTA => catalog.deltas.push(point),
                other => return Err(HeaderError::Kind(other)),
            }
            at += len;
        }
        if at != b.len() {
            return Err(HeaderError::Trailing(b.len() - at));
        }
        Ok(catalog)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stamp(id: u64) -> PointStamp {
        PointStamp {
            entry_id: id,
            last_seq: id * 10,
            point_time_ns: 1_700_000_000_000_000_000 + id,
            received_time_ns: 1_700_000_000_100_000_000 + id,
        }
    }

    fn sample_catalog() -> Catalog {
        Catalog {
            disk_id: *b"0123456789abcdef",
            disk_size: 1 << 30,
            generation: 9,
            merging: Some(4),
            base: Some(LongTermPoint {
                number: 3,
                point: stamp(12),
                bytes: 1 << 20,
                tag: None,
                ends_on_barrier: false,
            }),
            deltas: vec![LongTermPoint {
                number: 4,
                point: stamp(40),
                bytes: 8192,
                tag: Some("before-upgrade".into()),
                ends_on_barrier: true,
            }],
        }
    }

    fn sample_header() -> ImageHeader {
        ImageHeader {
            kind: ImageKind::Delta,
            disk_id: *b"0123456789abcdef",
            disk_size: 1 << 30,
            block_size: BLOCK_SIZE,
            number: 4,
            point: stamp(40),
            map_offset: 4096 + (1 << 30),
            map_entries: 2,
            map_crc: 0xdead_beef,
            tag: Some("nightly".into()),
        }
    }

    #[test]
    fn catalogs_and_image_headers_round_trip() {
        let catalog = sample_catalog();
        assert_eq!(Catalog::decode(&catalog.encode().unwrap()), Ok(catalog));
        let header = sample_header();
        let raw: [u8; IMAGE_HEADER_LEN] = header.encode().unwrap().try_into().unwrap();
        assert_eq!(ImageHeader::decode(&raw), Ok(header));
    }

    #[test]
    fn any_flipped_bit_is_refused() {
        let catalog = sample_catalog().encode().unwrap();
        for bit in 0..catalog.len() * 8 {
            let mut bad = catalog.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(Catalog::decode(&bad).is_err(), "catalog bit {bit}");
        }
        let header = sample_header().encode().unwrap();
        for bit in (0..200 * 8).chain((IMAGE_HEADER_LEN - 8) * 8..IMAGE_HEADER_LEN * 8) {
            let mut bad: [u8; IMAGE_HEADER_LEN] = header.clone().try_into().unwrap();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(ImageHeader::decode(&bad).is_err(), "header bit {bit}");
        }
    }

    #[test]
    fn maps_must_be_sorted_and_inside_the_disk() {
        let entries = [
            MapEntry {
                block: 1,
                state: BlockState::Data { crc: 7 },
            },
            MapEntry {
                block: 5,
                state: BlockState::Zero,
            },
        ];
        let raw = encode_map(&entries);
        assert_eq!(decode_map(&raw, 6).unwrap(), entries);
        assert_eq!(decode_map(&raw, 5), Err(HeaderError::MapEntry { index: 1 }));
        let mut reversed = raw[16..].to_vec();
        reversed.extend_from_slice(&raw[..16]);
        assert_eq!(
            decode_map(&reversed, 6),
            Err(HeaderError::MapEntry { index: 1 })
        );
        assert_eq!(decode_map(&raw[..15], 6), Err(HeaderError::MapLength(15)));
    }

    #[test]
    fn tags_longer_than_255_bytes_are_refused() {
        let mut header = sample_header();
        header.tag = Some("x".repeat(256));
        assert_eq!(header.encode(), Err(HeaderError::TagLength(256)));
    }

    #[test]
    fn image_file_names_parse_back() {
        assert_eq!(
            parse_image_file_name(&delta_file_name(7)),
            Some((ImageKind::Delta, 7))
        );
        assert_eq!(
            parse_image_file_name(&base_map_file_name(12)),
            Some((ImageKind::BaseMap, 12))
        );
        assert_eq!(parse_image_file_name("7.delta"), None);
        assert_eq!(parse_image_file_name("base.img"), None);
    }

    proptest! {
        #[test]
        fn maps_round_trip(blocks in proptest::collection::btree_set(0u64..1 << 20, 0..64), crc: u32) {
            let entries: Vec<MapEntry> = blocks
                .into_iter()
                .enumerate()
                .map(|(i, block)| MapEntry {
                    block,
                    state: if i % 3 == 0 { BlockState::Zero } else { BlockState::Data { crc } },
                })
                .collect();
            prop_assert_eq!(decode_map(&encode_map(&entries), 1 << 20), Ok(entries));
        }
    }
}
