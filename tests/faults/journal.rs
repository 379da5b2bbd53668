//! A reader of the journal's entry headers, straight from the segment files
//! (`docs/FORMATS.md`, "Journal segment, version 1").

use std::path::{Path, PathBuf};

use crate::common::read_all;

/// One journal entry's header and where it lies.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Cut during a full sync (flags bit 1): not a restore point.
    pub in_sync: bool,
    pub segment: PathBuf,
    /// Of the entry header in the segment.
    pub offset: u64,
    pub body_len: u64,
}

/// The entries in `DIR/journal/*.seg`, segment by segment, read straight
/// from the files as `docs/FORMATS.md` lays them out (stopping at a tail
/// that is cut short). Empty if there is no journal.
pub fn journal_entries(dir: &Path) -> Vec<Entry> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir.join("journal"))
        .map(|list| list.map(|e| e.expect("list journal").path()).collect())
        .unwrap_or_default();
    segments.retain(|p| p.extension().is_some_and(|e| e == "seg"));
    segments.sort();
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
    let mut entries = Vec::new();
    for segment in segments {
        let bytes = read_all(&segment);
        assert!(
            bytes.len() >= 64 && &bytes[..8] == b"CDPJSEG\0",
            "{}: no segment header",
            segment.display()
        );
        let mut offset = 64;
        while offset + 64 <= bytes.len() {
            let h = &bytes[offset..offset + 64];
            assert_eq!(
                &h[..4],
                b"CJEN",
                "{}: no entry at {offset}",
                segment.display()
            );
            let body_len = u32::from_le_bytes(h[48..52].try_into().expect("4")) as usize;
            if offset + 64 + body_len > bytes.len() {
                break;
            }
            entries.push(Entry {
                id: u64_at(h, 8),
                first_seq: u64_at(h, 16),
                last_seq: u64_at(h, 24),
                in_sync: h[5] & 2 != 0,
                segment: segment.clone(),
                offset: offset as u64,
                body_len: body_len as u64,
            });
            offset += 64 + body_len;
        }
    }
    entries
}

/// Entry ids run 1, 2, 3...; sequence numbers from 0 without a gap or an
/// overlap, so no batch is missing or in the journal twice.
pub fn check_contiguous(entries: &[Entry]) -> Result<(), String> {
    let mut next_seq = 0;
    for (i, entry) in entries.iter().enumerate() {
        let ok = entry.id == i as u64 + 1
            && entry.first_seq == next_seq
            && entry.first_seq <= entry.last_seq;
        if !ok {
            return Err(format!(
                "journal entry {} is not the one expected (id {}, first seq {next_seq}):\n{entries:#?}",
                i + 1,
                i + 1
            ));
        }
        next_seq = entry.last_seq + 1;
    }
    Ok(())
}
