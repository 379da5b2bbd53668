//! What the tests read back: capture logs, keys, restore points and
//! restored images.

use std::path::{Path, PathBuf};

use super::{cdp, read_all, run, run_stdout};

/// Records in a capture log, by kind.
#[derive(Debug, Default)]
pub struct RecordCounts {
    pub writes: u64,
    pub trims: u64,
    pub zeroes: u64,
    pub flushes: u64,
}

impl RecordCounts {
    pub fn total(&self) -> u64 {
        self.writes + self.trims + self.zeroes + self.flushes
    }
}

/// Walks the capture log's record headers (layout in docs/FORMATS.md; CRCs
/// are left to `cdp replay`) and counts records by kind.
pub fn count_records(log: &Path) -> RecordCounts {
    const FILE_HEADER: usize = 64;
    const RECORD_HEADER: usize = 48;
    let bytes = read_all(log);
    assert_eq!(&bytes[..8], b"CDPCAPLG", "capture log magic");
    let mut counts = RecordCounts::default();
    let mut at = FILE_HEADER;
    while at < bytes.len() {
        let head = bytes
            .get(at..at + RECORD_HEADER)
            .unwrap_or_else(|| panic!("capture log ends inside a record header at {at}"));
        assert_eq!(&head[..4], b"CREC", "record magic at offset {at}");
        let payload = u32::from_le_bytes(head[32..36].try_into().expect("4 bytes")) as usize;
        match head[4] {
            1 => counts.writes += 1,
            2 => counts.trims += 1,
            3 => counts.zeroes += 1,
            4 => counts.flushes += 1,
            kind => panic!("unknown record kind {kind} at offset {at}"),
        }
        at += RECORD_HEADER + payload;
    }
    assert_eq!(at, bytes.len(), "capture log ends inside a record payload");
    counts
}

// ---------------------------------------------------------------------------
// Replication: keys, restore points, restores
// ---------------------------------------------------------------------------

/// `cdp keygen DIR/key`; returns the key's path.
pub fn keygen(dir: &Path) -> PathBuf {
    let key = dir.join("key");
    run(cdp().arg("keygen").arg(&key));
    key
}

/// One row of `cdp points --json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub id: u64,
    /// RFC 3339, milliseconds.
    pub time: String,
    pub time_ns: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub bytes: u64,
    pub ends_on_barrier: bool,
    pub rpo_ms: f64,
    /// The name of a tagged (application-consistent) point.
    pub tag: Option<String>,
}

/// `cdp points --dir DIR --json`, parsed; panics with the output if a row
/// lacks a field.
pub fn points(dir: &Path) -> Vec<Point> {
    let text = run_stdout(cdp().arg("points").arg("--dir").arg(dir).arg("--json"));
    let json: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("cdp points --json printed no JSON ({e}):\n{text}"));
    let rows = json["points"]
        .as_array()
        .unwrap_or_else(|| panic!("cdp points --json printed no \"points\" array:\n{text}"));
    rows.iter()
        .map(|row| {
            let u = |field: &str| {
                row[field]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no integer {field:?} in {row} of:\n{text}"))
            };
            Point {
                id: u("id"),
                time: row["time"]
                    .as_str()
                    .unwrap_or_else(|| panic!("no \"time\" in {row}"))
                    .to_string(),
                time_ns: u("time_ns"),
                first_seq: row["first_seq"].as_u64().unwrap_or(0),
                last_seq: u("last_seq"),
                bytes: u("bytes"),
                ends_on_barrier: row["ends_on_barrier"]
                    .as_bool()
                    .unwrap_or_else(|| panic!("no \"ends_on_barrier\" in {row}")),
                rpo_ms: row["rpo_ms"]
                    .as_f64()
                    .unwrap_or_else(|| panic!("no \"rpo_ms\" in {row}")),
                tag: match &row["tag"] {
                    serde_json::Value::Null if row.get("tag").is_some() => None,
                    serde_json::Value::String(tag) => Some(tag.clone()),
                    _ => panic!("no \"tag\" (a string or null) in {row}"),
                },
            }
        })
        .collect()
}

/// `cdp restore --dir DIR --at AT --out OUT --key KEY`: the id of the point
/// it restored (from its `restored point ID (...)` line), or its stderr if it
/// failed.
pub fn try_restore(dir: &Path, at: &str, out: &Path, key: &Path) -> Result<u64, String> {
    let mut cmd = cdp();
    cmd.arg("restore")
        .arg("--dir")
        .arg(dir)
        .arg("--at")
        .arg(at)
        .arg("--out")
        .arg(out)
        .arg("--key")
        .arg(key)
        .env("RUST_BACKTRACE", "0");
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "{cmd:?} exited with {}\n{}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let id = stdout
        .strip_prefix("restored point ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("{cmd:?} printed no `restored point ID`:\n{stdout}"));
    Ok(id)
}

/// Like [`try_restore`], panicking if the restore fails.
pub fn restore(dir: &Path, at: &str, out: &Path, key: &Path) -> u64 {
    try_restore(dir, at, out, key).unwrap_or_else(|e| panic!("{e}"))
}

/// A time as `cdp restore --at` takes it: seconds since the epoch with
/// nanoseconds (`1763871180.123456789`).
pub fn epoch_seconds(time: std::time::SystemTime) -> String {
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch");
    format!("{}.{:09}", since.as_secs(), since.subsec_nanos())
}

/// A time in RFC 3339, UTC, with nanoseconds (`2025-11-23T04:13:00.123456789Z`).
pub fn rfc3339(time: std::time::SystemTime) -> String {
    humantime::format_rfc3339_nanos(time).to_string()
}

/// Copies a file, leaving all-zero 4 KiB blocks as holes (so that many
/// copies of a mostly empty disk stay small).
pub fn copy_sparse(from: &Path, to: &Path) {
    use std::os::unix::fs::FileExt;
    const BLOCK: usize = 4096;
    const CHUNK: usize = 1 << 20;
    let src = std::fs::File::open(from).unwrap_or_else(|e| panic!("open {}: {e}", from.display()));
    let len = src.metadata().expect("stat source").len();
    let dst = std::fs::File::create(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    dst.set_len(len).expect("size the copy");
    let zeros = [0u8; BLOCK];
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(CHUNK as u64) as usize;
        src.read_exact_at(&mut buf[..n], at)
            .unwrap_or_else(|e| panic!("read {} at {at}: {e}", from.display()));
        for (i, block) in buf[..n].chunks(BLOCK).enumerate() {
            if block != &zeros[..block.len()] {
                let offset = at + (i * BLOCK) as u64;
                dst.write_all_at(block, offset)
                    .unwrap_or_else(|e| panic!("write {} at {offset}: {e}", to.display()));
            }
        }
        at += n as u64;
    }
}
