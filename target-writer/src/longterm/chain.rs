//! A restore point as a stack of layers: the base, the deltas up to the
//! point, and (for a point in the journal) a layer built from the journal
//! entries after the newest long-term point below it. A block reads from the
//! newest layer that holds it, or as zeros. [`PointImage::runs`] walks every
//! held block of a range once, newest layer winning, for a full restore.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::Range;

use super::error::LongTermError;
use super::image::{Layer, BLOCK};
use crate::format::longterm::BlockState;

/// The longest run [`PointImage::runs`] yields: 1 MiB.
pub const MAX_RUN_BLOCKS: u64 = 256;

/// The disk at one point, read through its layers (oldest first).
#[derive(Debug)]
pub struct PointImage {
    disk_size: u64,
    layers: Vec<Layer>,
}

/// Where the content of a run of consecutive blocks comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first_block: u64,
    pub blocks: u64,
    /// The layer holding them, or `None` for zeros.
    pub layer: Option<usize>,
}

impl PointImage {
    pub fn new(disk_size: u64, layers: Vec<Layer>) -> Self {
        PointImage { disk_size, layers }
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Adds a layer on top.
    pub fn push(&mut self, layer: Layer) {
        self.layers.push(layer);
    }

    /// The newest layer holding `block` and what it holds, if any does.
    fn lookup(&self, block: u64) -> Option<(usize, BlockState)> {
        self.layers
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, layer)| layer.map().get(block).map(|state| (i, state)))
    }

    /// Reads one whole block (`buf` is one block long).
    pub fn read_block(&self, block: u64, buf: &mut [u8]) -> Result<(), LongTermError> {
        match self.lookup(block) {
            Some((layer, BlockState::Data { .. })) => self.layers[layer].read_blocks(block, buf),
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset`; the range must lie within the disk.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), LongTermError> {
        let mut block_buf = vec![0u8; BLOCK as usize];
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (block, within) = (at / BLOCK, (at % BLOCK) as usize);
            let n = (BLOCK as usize - within).min(buf.len() - done);
            self.read_block(block, &mut block_buf)?;
            buf[done..done + n].copy_from_slice(&block_buf[within..within + n]);
            done += n;
        }
        Ok(())
    }

    /// Every block of `blocks` some layer holds, once, in block order, as
    /// runs of consecutive blocks from the same layer (zero blocks as
    /// `layer: None`); blocks no layer holds are left out (they read as
    /// zeros).
    pub fn runs(&self, blocks: Range<u64>) -> impl Iterator<Item = Run> + '_ {
        let mut heap: BinaryHeap<Reverse<(u64, Reverse<usize>, usize)>> = BinaryHeap::new();
        for (layer, l) in self.layers.iter().enumerate() {
            let entries = l.map().entries();
            let index = entries.partition_point(|e| e.block < blocks.start);
            if let Some(first) = entries.get(index) {
                heap.push(Reverse((first.block, Reverse(layer), index)));
            }
        }
        let mut current: Option<Run> = None;
        std::iter::from_fn(move || loop {
            let Some(Reverse((block, Reverse(layer), index))) = heap.pop() else {
                return current.take();
            };
            if block >= blocks.end {
                return current.take();
            }
            // The same block in older layers is hidden by this one.
            while let Some(Reverse((b, _, _))) = heap.peek() {
                if *b != block {
                    break;
                }
                let Reverse((_, Reverse(older), i)) = heap.pop().expect("peeked");
                self.advance(&mut heap, older, i);
            }
            self.advance(&mut heap, layer, index);
            let source = match self.layers[layer].map().entries()[index].state {
                BlockState::Data { .. } => Some(layer),
                BlockState::Zero => None,
            };
            match &mut current {
                Some(run)
                    if run.layer == source
                        && run.first_block + run.blocks == block
                        && run.blocks < MAX_RUN_BLOCKS =>
                {
                    run.blocks += 1;
                }
                _ => {
                    let next = Run {
                        first_block: block,
                        blocks: 1,
                        layer: source,
                    };
                    if let Some(done) = current.replace(next) {
                        return Some(done);
                    }
                }
            }
        })
    }

    fn advance(
        &self,
        heap: &mut BinaryHeap<Reverse<(u64, Reverse<usize>, usize)>>,
        layer: usize,
        index: usize,
    ) {
        if let Some(next) = self.layers[layer].map().entries().get(index + 1) {
            heap.push(Reverse((next.block, Reverse(layer), index + 1)));
        }
    }
}
