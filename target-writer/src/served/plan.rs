//! Where each block of a request comes from: the newest of the overlay (if
//! writable) and the point's layers that holds it, or zeros. A request is
//! planned as runs of consecutive blocks from one source, so a run of blocks
//! one layer holds is read with one `pread`, and block status reports the
//! runs as data or holes. Planning looks only at the layers that hold
//! something in the request's chunks (`index.rs`), however long the history.

use std::collections::BTreeMap;

use super::index::ChunkTable;
use crate::format::longterm::{BlockState, BLOCK_SIZE};
use crate::longterm::PointImage;

pub(crate) const BLOCK: u64 = BLOCK_SIZE as u64;

/// What the overlay holds for a block it owns. Either way the overlay file
/// holds the block's whole content (a `Zero` block is a hole in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kept {
    Data,
    Zero,
}

/// Where a run's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Zeros: no layer holds the blocks, or the newest one that does holds
    /// them as zero blocks.
    Zero,
    /// Data blocks of the point's layer `layer` (base first), the first of
    /// them at index `entry` of its map.
    Layer { layer: usize, entry: usize },
    /// Data in the writable overlay.
    Overlay,
}

/// Consecutive blocks from one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub first_block: u64,
    pub blocks: u64,
    pub source: Source,
}

/// The runs covering blocks `first..first + count`, in order; `table` says
/// which layers hold anything in which chunk; `overlay` (the blocks a
/// writable serve owns) wins over every layer.
pub(crate) fn plan(
    image: &PointImage,
    table: &ChunkTable,
    overlay: Option<&BTreeMap<u64, Kept>>,
    first: u64,
    count: u64,
) -> Vec<Run> {
    let end = first + count;
    let mut sources = vec![Source::Zero; count as usize];
    let chunk_blocks = 1u64 << table.shift();
    for chunk in table.chunks(first, end) {
        let start = chunk << table.shift();
        let (from, to) = (first.max(start), end.min(start + chunk_blocks));
        for piece in table.pieces(chunk) {
            let (lo, hi) = piece.entries;
            let entries = &image.layers()[piece.layer].map().entries()[lo..hi];
            let (a, b) = if (hi - lo) as u64 == chunk_blocks {
                // Every block of the chunk has an entry, in order.
                ((from - start) as usize, (to - start) as usize)
            } else {
                let at = |block: u64| entries.partition_point(|e| e.block < block);
                (at(from), at(to))
            };
            for (i, e) in entries[a..b].iter().enumerate() {
                sources[(e.block - first) as usize] = match e.state {
                    BlockState::Data { .. } => Source::Layer {
                        layer: piece.layer,
                        entry: lo + a + i,
                    },
                    BlockState::Zero => Source::Zero,
                };
            }
        }
    }
    if let Some(overlay) = overlay {
        for (&block, kept) in overlay.range(first..end) {
            sources[(block - first) as usize] = match kept {
                Kept::Data => Source::Overlay,
                Kept::Zero => Source::Zero,
            };
        }
    }
    coalesce(first, &sources)
}

/// Whether a block from `next` continues `run`: the same source, and for a
/// layer, the next entry of its map.
fn continues(run: &Run, next: Source) -> bool {
    match (run.source, next) {
        (Source::Layer { layer, entry }, Source::Layer { layer: l, entry: e }) => {
            layer == l && entry + run.blocks as usize == e
        }
        (source, next) => source == next,
    }
}

fn coalesce(first: u64, sources: &[Source]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (i, &source) in sources.iter().enumerate() {
        match runs.last_mut() {
            Some(run) if continues(run, source) => run.blocks += 1,
            _ => runs.push(Run {
                first_block: first + i as u64,
                blocks: 1,
                source,
            }),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_neighbours_from_the_same_source_only() {
        use Source::*;
        let layer = |layer, entry| Layer { layer, entry };
        let sources = [
            Zero,
            Zero,
            layer(0, 5),
            layer(0, 6),
            layer(0, 8),
            layer(1, 9),
            Overlay,
            Zero,
        ];
        let runs = coalesce(10, &sources);
        let got: Vec<(u64, u64, Source)> = runs
            .iter()
            .map(|r| (r.first_block, r.blocks, r.source))
            .collect();
        assert_eq!(
            got,
            [
                (10, 2, Zero),
                (12, 2, layer(0, 5)),
                (14, 1, layer(0, 8)),
                (15, 1, layer(1, 9)),
                (16, 1, Overlay),
                (17, 1, Zero)
            ]
        );
    }
}
