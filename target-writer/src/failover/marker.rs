//! The failover marker, version 1: a 128-byte file beside a failover disk
//! (`DISK.failover`) that says which disk it stands in for, from which
//! point, since when, and whether it has been failed back. `cdp failback
//! --send` needs it: it announces the original disk's id and size from it,
//! so the receiver can refuse any other disk. This module owns the layout
//! (`docs/FORMATS.md`, "Failover marker") and writes the file atomically.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The first eight bytes of a marker.
pub const MAGIC: [u8; 8] = *b"CDPFOVR\0";
/// The marker version this build writes and reads.
pub const VERSION: u32 = 1;
/// Length of a marker file.
pub const LEN: usize = 128;
const CRC_AT: usize = LEN - 4;
const STATE_FAILED_OVER: u32 = 1;
const STATE_FAILED_BACK: u32 = 2;

/// Where a failover stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Production may run on the failover disk.
    FailedOver,
    /// A failback pass made the original disk equal to this one.
    FailedBack {
        /// When the pass completed, ns since the epoch.
        at_ns: u64,
        /// Chunks it shipped.
        chunks: u64,
        /// Bytes of those chunks.
        bytes: u64,
    },
}

/// What a failover marker records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// The original disk's id (the journal's).
    pub disk_id: [u8; 16],
    pub disk_size: u64,
    /// The restore point the failover disk was made from.
    pub point_id: u64,
    pub point_time_ns: u64,
    pub point_last_seq: u64,
    /// When the failover disk was made, ns since the epoch.
    pub failed_over_ns: u64,
    pub state: State,
}

#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    #[error("failover marker {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("failover marker {path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Marker {
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(LEN as u32).to_le_bytes());
        b[16..32].copy_from_slice(&self.disk_id);
        let (state, back) = match self.state {
            State::FailedOver => (STATE_FAILED_OVER, [0; 3]),
            State::FailedBack {
                at_ns,
                chunks,
                bytes,
            } => (STATE_FAILED_BACK, [at_ns, chunks, bytes]),
        };
        let fields = [
            (32, self.disk_size),
            (40, self.point_id),
            (48, self.point_time_ns),
            (56, self.point_last_seq),
            (64, self.failed_over_ns),
            (80, back[0]),
            (88, back[1]),
            (96, back[2]),
        ];
        for (at, value) in fields {
            b[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        b[72..76].copy_from_slice(&state.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks a marker; the error says which check failed.
    pub fn decode(b: &[u8]) -> Result<Marker, String> {
        if b.len() != LEN {
            return Err(format!("{} bytes long, not {LEN}", b.len()));
        }
        if b[0..8] != MAGIC {
            return Err(format!("bad magic {:02x?}", &b[0..8]));
        }
        let (stored, computed) = (u32_at(b, CRC_AT), crc32c::crc32c(&b[..CRC_AT]));
        if stored != computed {
            return Err(format!(
                "CRC32C is {computed:#010x}, the marker says {stored:#010x}: damaged"
            ));
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(format!(
                "version {version} (this build reads version {VERSION})"
            ));
        }
        if u32_at(b, 12) != LEN as u32 || u32_at(b, 76) != 0 || b[104..CRC_AT] != [0; 20] {
            return Err("a reserved field or the length is not as version 1 writes it".into());
        }
        let back = [u64_at(b, 80), u64_at(b, 88), u64_at(b, 96)];
        let state = match u32_at(b, 72) {
            STATE_FAILED_OVER if back == [0; 3] => State::FailedOver,
            STATE_FAILED_BACK => State::FailedBack {
                at_ns: back[0],
                chunks: back[1],
                bytes: back[2],
            },
            other => return Err(format!("state {other} (1 failed over, 2 failed back)")),
        };
        Ok(Marker {
            disk_id: b[16..32].try_into().expect("16 bytes"),
            disk_size: u64_at(b, 32),
            point_id: u64_at(b, 40),
            point_time_ns: u64_at(b, 48),
            point_last_seq: u64_at(b, 56),
            failed_over_ns: u64_at(b, 64),
            state,
        })
    }

    pub fn load(path: &Path) -> Result<Marker, MarkerError> {
        let bytes = std::fs::read(path).map_err(io_error(path, "read"))?;
        Marker::decode(&bytes).map_err(|what| MarkerError::Invalid {
            path: path.to_path_buf(),
            what,
        })
    }

    /// Writes the marker to `path` atomically: a temporary file beside it,
    /// fsynced, renamed over `path`, and the directory fsynced.
    pub fn store(&self, path: &Path) -> Result<(), MarkerError> {
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temporary)
            .map_err(io_error(&temporary, "create"))?;
        file.write_all(&self.encode())
            .and_then(|()| file.sync_all())
            .map_err(io_error(&temporary, "write"))?;
        std::fs::rename(&temporary, path).map_err(io_error(path, "rename into place"))?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(dir, "fsync the directory"))
    }
}

fn io_error(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> MarkerError {
    let path = path.to_path_buf();
    move |source| MarkerError::Io { path, op, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(state: State) -> Marker {
        Marker {
            disk_id: *b"0123456789abcdef",
            disk_size: 64 << 20,
            point_id: 42,
            point_time_ns: 1_763_871_180_123_000_000,
            point_last_seq: 9_999,
            failed_over_ns: 1_763_871_200_000_000_000,
            state,
        }
    }

    #[test]
    fn markers_round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img.failover");
        let back = State::FailedBack {
            at_ns: 1_763_900_000_000_000_000,
            chunks: 17,
            bytes: 17 << 16,
        };
        for marker in [sample(State::FailedOver), sample(back)] {
            marker.store(&path).unwrap();
            assert_eq!(Marker::load(&path).unwrap(), marker);
        }
        let b = sample(State::FailedOver).encode();
        assert_eq!(&b[0..8], b"CDPFOVR\0");
        assert_eq!(b[8..16], [1, 0, 0, 0, 128, 0, 0, 0]);
        assert_eq!(b[40], 42);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "the temporary file is gone: {names:?}");
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let good = sample(State::FailedOver).encode();
        for bit in 0..LEN * 8 {
            let mut b = good;
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                Marker::decode(&b).is_err(),
                "bit {bit} flipped went unnoticed"
            );
        }
    }

    #[test]
    fn other_versions_states_and_lengths_are_refused() {
        let reseal = |edit: &dyn Fn(&mut [u8; LEN])| {
            let mut b = sample(State::FailedOver).encode();
            edit(&mut b);
            let crc = crc32c::crc32c(&b[..CRC_AT]);
            b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
            Marker::decode(&b).unwrap_err()
        };
        assert!(reseal(&|b| b[8] = 2).contains("version 2"));
        assert!(reseal(&|b| b[72] = 3).contains("state 3"));
        assert!(reseal(&|b| b[88] = 1).contains("state 1"));
        assert!(reseal(&|b| b[110] = 1).contains("reserved"));
        let err = Marker::decode(&[0; 100]).unwrap_err();
        assert!(err.contains("100 bytes"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = Marker::load(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing: read"), "{err}");
    }
}
