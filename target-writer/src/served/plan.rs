//! Where each block of a request comes from: the newest of the overlay (if
//! writable) and the point's layers that holds it, or zeros. A request is
//! planned as runs of consecutive blocks from one source, so a run of blocks
//! one layer holds is read with one `pread`, and block status reports the
//! runs as data or holes. Planning costs one binary search per layer plus
//! the map entries inside the request, never a walk of the whole history.

use std::collections::BTreeMap;

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
    /// Data blocks of the point's layer with this index (base first).
    Layer(usize),
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

/// The runs covering blocks `first..first + count`, in order; `overlay`
/// (the blocks a writable serve owns) wins over every layer.
pub(crate) fn plan(
    image: &PointImage,
    overlay: Option<&BTreeMap<u64, Kept>>,
    first: u64,
    count: u64,
) -> Vec<Run> {
    let end = first + count;
    let mut sources = vec![Source::Zero; count as usize];
    for (index, layer) in image.layers().iter().enumerate() {
        let entries = layer.map().entries();
        let start = entries.partition_point(|e| e.block < first);
        for entry in entries[start..].iter().take_while(|e| e.block < end) {
            sources[(entry.block - first) as usize] = match entry.state {
                BlockState::Data { .. } => Source::Layer(index),
                BlockState::Zero => Source::Zero,
            };
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

fn coalesce(first: u64, sources: &[Source]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (i, &source) in sources.iter().enumerate() {
        match runs.last_mut() {
            Some(run) if run.source == source => run.blocks += 1,
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
    fn runs_merge_equal_neighbours_only() {
        use Source::*;
        let runs = coalesce(
            10,
            &[Zero, Zero, Layer(0), Layer(0), Layer(1), Overlay, Zero],
        );
        let got: Vec<(u64, u64, Source)> = runs
            .iter()
            .map(|r| (r.first_block, r.blocks, r.source))
            .collect();
        assert_eq!(
            got,
            [
                (10, 2, Zero),
                (12, 2, Layer(0)),
                (14, 1, Layer(1)),
                (15, 1, Overlay),
                (16, 1, Zero)
            ]
        );
    }
}
