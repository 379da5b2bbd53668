//! Which layers hold anything where: the disk is cut into at most 65536
//! chunks of 2^shift blocks (at least 64 KiB), and for each chunk the table
//! lists, oldest layer first, the layers whose maps have entries in it and
//! where those entries lie in each map. A request then looks only at the
//! layers that hold something in its chunks — the base and, for a random
//! read, a delta or two — however many layers the point has; within a chunk
//! every block of which has an entry (most of a base) the entry is found
//! directly, in any other by a search over that chunk's entries alone.
//!
//! Built once when a point is opened, in two passes over the layers' maps
//! (which opening the layers has just read and decoded anyway).

use std::ops::Range;

use crate::longterm::PointImage;

/// The fewest blocks in a chunk (64 KiB).
const MIN_SHIFT: u32 = 4;
/// The most chunks a table has.
const MAX_CHUNKS: u64 = 1 << 16;

/// The entries of one layer's map that fall in one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub layer: usize,
    pub entries: (usize, usize),
}

#[derive(Debug)]
pub(crate) struct ChunkTable {
    shift: u32,
    /// The pieces of chunk `c` are `pieces[offsets[c]..offsets[c + 1]]`.
    offsets: Vec<usize>,
    pieces: Vec<Piece>,
}

impl ChunkTable {
    pub(crate) fn new(image: &PointImage) -> ChunkTable {
        let blocks = image.disk_size().div_ceil(super::plan::BLOCK);
        let mut shift = MIN_SHIFT;
        while blocks >> shift >= MAX_CHUNKS {
            shift += 1;
        }
        let chunks = ((blocks >> shift) + 1) as usize;
        let mut counts = vec![0usize; chunks + 1];
        for_each_piece(image, shift, |chunk, _| counts[chunk] += 1);
        let mut offsets = Vec::with_capacity(chunks + 1);
        let mut total = 0;
        for count in &counts {
            offsets.push(total);
            total += count;
        }
        let empty = Piece {
            layer: 0,
            entries: (0, 0),
        };
        let mut pieces = vec![empty; total];
        let mut next = offsets.clone();
        for_each_piece(image, shift, |chunk, piece| {
            pieces[next[chunk]] = piece;
            next[chunk] += 1;
        });
        ChunkTable {
            shift,
            offsets,
            pieces,
        }
    }

    /// Blocks per chunk, as a shift.
    pub(crate) fn shift(&self) -> u32 {
        self.shift
    }

    /// The chunks holding blocks `first..end`.
    pub(crate) fn chunks(&self, first: u64, end: u64) -> Range<u64> {
        first >> self.shift..((end - 1) >> self.shift) + 1
    }

    /// The pieces of `chunk`, oldest layer first.
    pub(crate) fn pieces(&self, chunk: u64) -> &[Piece] {
        let at = |c: u64| {
            usize::try_from(c)
                .ok()
                .and_then(|c| self.offsets.get(c))
                .copied()
        };
        match (at(chunk), at(chunk + 1)) {
            (Some(lo), Some(hi)) => &self.pieces[lo..hi],
            _ => &[],
        }
    }
}

/// Calls `f(chunk, piece)` for every run of a layer's entries within one
/// chunk, layer by layer from the oldest.
fn for_each_piece(image: &PointImage, shift: u32, mut f: impl FnMut(usize, Piece)) {
    for (layer, l) in image.layers().iter().enumerate() {
        let entries = l.map().entries();
        let mut lo = 0;
        while lo < entries.len() {
            let chunk = entries[lo].block >> shift;
            let hi = lo + entries[lo..].partition_point(|e| e.block >> shift == chunk);
            let piece = Piece {
                layer,
                entries: (lo, hi),
            };
            f(chunk as usize, piece);
            lo = hi;
        }
    }
}
