//! A directory over one layer's block map, so that finding a block's entry
//! does not cost a binary search over the whole map (a dozen or more cache
//! misses over the megabytes of a full base map, for every layer, for every
//! request). The disk is cut into at most 65536 chunks of 2^shift blocks;
//! the directory holds the index of each chunk's first entry. A chunk whose
//! every block has an entry (most of a base) is indexed directly; in any
//! other, the search covers that chunk's entries only; a request whose
//! chunks have no entries (most requests, for most deltas) costs two looks
//! at the directory and none at the map. Small maps are searched as they
//! are. Built once when a point is opened, in one pass over each map.

use std::ops::Range;

use crate::format::longterm::MapEntry;

/// Maps with at most this many entries are searched directly.
const SMALL: usize = 256;
/// The fewest blocks in a chunk (1 MiB).
const MIN_SHIFT: u32 = 8;
/// The most chunks a directory has (256 KiB of directory per layer).
const MAX_CHUNKS: u64 = 1 << 16;

#[derive(Debug)]
pub(crate) struct MapIndex {
    shift: u32,
    /// `starts[c]`: the index of the first entry at or after block `c << shift`.
    starts: Vec<u32>,
}

impl MapIndex {
    /// The directory over `entries` (sorted by block) of a disk of
    /// `disk_blocks` blocks.
    pub(crate) fn new(entries: &[MapEntry], disk_blocks: u64) -> MapIndex {
        if entries.len() <= SMALL || u32::try_from(entries.len()).is_err() {
            return MapIndex {
                shift: 0,
                starts: Vec::new(),
            };
        }
        let mut shift = MIN_SHIFT;
        while disk_blocks >> shift >= MAX_CHUNKS {
            shift += 1;
        }
        let chunks = (disk_blocks >> shift) + 1;
        let mut starts = Vec::with_capacity(chunks as usize + 1);
        let mut i = 0;
        for chunk in 0..=chunks {
            let start = chunk << shift;
            while i < entries.len() && entries[i].block < start {
                i += 1;
            }
            starts.push(i as u32);
        }
        MapIndex { shift, starts }
    }

    /// The indexes of the entries of `entries` (the map this directory was
    /// built over) for blocks `first..end`. When the chunks holding those
    /// blocks have no entries, the map itself is not touched.
    pub(crate) fn range(&self, entries: &[MapEntry], first: u64, end: u64) -> Range<usize> {
        if !self.starts.is_empty() {
            let start = |chunk: u64| {
                usize::try_from(chunk)
                    .ok()
                    .and_then(|c| self.starts.get(c))
                    .map_or(entries.len(), |&i| i as usize)
            };
            let (lo, hi) = (
                start(first >> self.shift),
                start(((end - 1) >> self.shift) + 1),
            );
            if lo == hi {
                return lo..lo;
            }
        }
        self.seek(entries, first)..self.seek(entries, end)
    }

    /// The index of the first entry of `entries` (the map this directory
    /// was built over) at or after `block`.
    fn seek(&self, entries: &[MapEntry], block: u64) -> usize {
        if self.starts.is_empty() {
            return entries.partition_point(|e| e.block < block);
        }
        let chunk = (block >> self.shift) as usize;
        let Some(&lo) = self.starts.get(chunk) else {
            return entries.len();
        };
        let lo = lo as usize;
        let hi = self
            .starts
            .get(chunk + 1)
            .map_or(entries.len(), |&hi| hi as usize);
        let within = block - ((chunk as u64) << self.shift);
        if hi - lo == 1 << self.shift {
            // Every block of the chunk has an entry, in order.
            return lo + within as usize;
        }
        lo + entries[lo..hi].partition_point(|e| e.block < block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::longterm::BlockState;

    #[test]
    fn seek_and_range_agree_with_a_binary_search() {
        let disk_blocks = 100_000;
        // Dense runs, sparse stretches, and empty chunks.
        let blocks: Vec<u64> = (0..disk_blocks)
            .filter(|b| (b / 256) % 3 == 0 || (b % 7 == 0 && b / 256 % 3 == 1))
            .collect();
        let entries: Vec<MapEntry> = blocks
            .iter()
            .map(|&block| MapEntry {
                block,
                state: BlockState::Zero,
            })
            .collect();
        let index = MapIndex::new(&entries, disk_blocks);
        assert!(!index.starts.is_empty());
        let seek = |block| entries.partition_point(|e| e.block < block);
        for block in (0..disk_blocks + 300).step_by(3) {
            assert_eq!(index.seek(&entries, block), seek(block), "block {block}");
            for len in [1, 2, 255, 256, 257, 1000] {
                let got = index.range(&entries, block, block + len);
                let want = seek(block)..seek(block + len);
                // An empty range may start anywhere.
                if want.is_empty() {
                    assert!(got.is_empty(), "blocks {block}+{len}: {got:?}");
                } else {
                    assert_eq!(got, want, "blocks {block}+{len}");
                }
            }
        }
    }
}
