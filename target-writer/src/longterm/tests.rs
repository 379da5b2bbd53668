//! Layers built from random batches, stacked, read back: every byte must
//! equal a plain model of the disk with the same batches applied in order.

use bytes::Bytes;
use pipeline::batch::{Batch, Extent};
use proptest::prelude::*;

use super::builder::ImageBuilder;
use super::chain::PointImage;
use super::image::{Layer, BLOCK};
use crate::format::longterm::PointStamp;

/// 16 blocks and a bit: the last block is partial.
const DISK: u64 = 16 * BLOCK + 1000;

fn extent() -> impl Strategy<Value = (bool, u64, u64, u8)> {
    (any::<bool>(), 0..DISK, 1..3 * BLOCK, any::<u8>())
        .prop_map(|(data, start, len, fill)| (data, start, len.min(DISK - start), fill))
}

/// A batch of non-overlapping extents, sorted (what a batch holds).
fn batch(extents: Vec<(bool, u64, u64, u8)>) -> Batch {
    let mut sorted = extents;
    sorted.sort_by_key(|e| e.1);
    let mut kept: Vec<Extent> = Vec::new();
    let mut end = 0;
    for (data, start, len, fill) in sorted {
        if start < end || len == 0 {
            continue;
        }
        end = start + len;
        kept.push(if data {
            let bytes: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8) | 1).collect();
            Extent::Data {
                offset: start,
                data: Bytes::from(bytes),
            }
        } else {
            Extent::Zero { offset: start, len }
        });
    }
    Batch {
        first_seq: 0,
        last_seq: 0,
        ends_on_barrier: false,
        in_sync: false,
        tag: None,
        extents: kept,
    }
}

fn apply_to_model(model: &mut [u8], batch: &Batch) {
    for extent in &batch.extents {
        let range = extent.range();
        let (start, end) = (range.start as usize, range.end as usize);
        match extent {
            Extent::Data { data, .. } => model[start..end].copy_from_slice(data),
            Extent::Zero { .. } => model[start..end].fill(0),
        }
    }
}

proptest! {
    #[test]
    fn stacked_layers_read_like_the_model(
        layers in proptest::collection::vec(
            proptest::collection::vec(proptest::collection::vec(extent(), 1..6), 1..4),
            1..4,
        ),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut model = vec![0u8; DISK as usize];
        let mut image = PointImage::new(DISK, Vec::new());
        for (i, batches) in layers.into_iter().enumerate() {
            let path = dir.path().join(format!("{i}.layer"));
            let mut builder = ImageBuilder::create(&image, &path, 0).unwrap();
            for extents in batches {
                let batch = batch(extents);
                builder.apply(&batch).unwrap();
                apply_to_model(&mut model, &batch);
            }
            let (file, map) = builder.finish().unwrap();
            image.push(Layer::in_memory(path, file, map, DISK, PointStamp::default()));
            let mut read = vec![0u8; DISK as usize];
            image.read_at(&mut read, 0).unwrap();
            prop_assert!(read == model, "layer {} reads differ", i);
            // One window for the whole disk, and windows of 2 blocks taken in
            // turn by 3 reader threads.
            for (window, readers) in [(super::copy::CHUNK, 1), (2 * BLOCK, 3)] {
                let copy = dir.path().join(format!("{i}-{window}.copy"));
                let out = std::fs::File::create(&copy).unwrap();
                out.set_len(DISK).unwrap();
                super::copy::copy_in_windows(&image, &out, &copy, window, readers, |_| {}).unwrap();
                let copied = std::fs::read(&copy).unwrap();
                prop_assert!(copied == model, "layer {} copy in {}-byte windows differs", i, window);
            }
        }
    }
}

/// A damaged block fails the copy with its layer and block, whichever
/// reader thread finds it.
#[test]
fn a_damaged_block_fails_the_copy_and_names_itself() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer");
    let empty = PointImage::new(DISK, Vec::new());
    let mut builder = ImageBuilder::create(&empty, &path, 0).unwrap();
    builder
        .apply(&batch(vec![(true, 0, 16 * BLOCK, 7)]))
        .unwrap();
    let (file, map) = builder.finish().unwrap();
    let damaged = 11;
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, damaged * BLOCK + 5).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[byte[0] ^ 1], damaged * BLOCK + 5).unwrap();
    let layer = Layer::in_memory(path.clone(), file, map, DISK, PointStamp::default());
    let image = PointImage::new(DISK, vec![layer]);
    let copy = dir.path().join("copy");
    let out = std::fs::File::create(&copy).unwrap();
    out.set_len(DISK).unwrap();
    let err = super::copy::copy_in_windows(&image, &out, &copy, 2 * BLOCK, 3, |_| {}).unwrap_err();
    match err {
        super::LongTermError::BlockCrc { path: p, block, .. } => {
            assert_eq!((p, block), (path, damaged), "wrong place reported");
        }
        other => panic!("expected a block CRC error, got {other}"),
    }
}
