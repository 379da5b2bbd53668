//! A point of three layers built from seeded batches, served read-only and
//! writable, checked against a model of the disk (a byte vector the same
//! batches and changes were applied to).

use std::path::Path;

use bytes::Bytes;
use filter::device::{BlockDevice, Extent as Status, ZeroMode};
use pipeline::batch::{Batch, Extent};

use super::*;
use crate::format::longterm::PointStamp;
use crate::longterm::{ImageBuilder, Layer};

/// 65 chunks of the layers' table, the last one partial, and the last block
/// partial too.
const SIZE: u64 = (4 << 20) + 1000;

/// xorshift, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// A batch of disjoint extents (data and zeros), sorted, applied to `model` too.
fn random_batch(rng: &mut Rng, model: &mut [u8]) -> Batch {
    let mut extents: Vec<Extent> = Vec::new();
    let mut at = rng.below(20_000);
    while at < SIZE - 1 {
        let len = (1 + rng.below(150_000)).min(SIZE - at);
        let range = at as usize..(at + len) as usize;
        if rng.below(3) == 0 {
            model[range].fill(0);
            extents.push(Extent::Zero { offset: at, len });
        } else {
            let data = rng.bytes(len as usize);
            model[range].copy_from_slice(&data);
            extents.push(Extent::Data {
                offset: at,
                data: Bytes::from(data),
            });
        }
        at += len + rng.below(100_000);
    }
    Batch {
        first_seq: 0,
        last_seq: 0,
        ends_on_barrier: true,
        in_sync: false,
        tag: None,
        extents,
    }
}

/// Three layers of random batches over an empty disk, and the model. Long
/// extents fill whole chunks (found directly), short ones and gaps leave
/// others sparse (searched).
fn three_layers(dir: &Path, seed: u64) -> (PointImage, Vec<u8>) {
    let mut rng = Rng(seed);
    let mut model = vec![0u8; SIZE as usize];
    let mut image = PointImage::new(SIZE, Vec::new());
    for n in 0..3 {
        let path = dir.join(format!("layer-{n}"));
        let mut builder = ImageBuilder::create(&image, &path, 0).expect("create a layer");
        for _ in 0..2 {
            builder
                .apply(&random_batch(&mut rng, &mut model))
                .expect("apply a batch");
        }
        let (file, map) = builder.finish().expect("finish a layer");
        image.push(Layer::in_memory(
            path,
            file,
            map,
            SIZE,
            PointStamp::default(),
        ));
    }
    (image, model)
}

fn served(image: PointImage, overlay: Option<&Path>) -> ServedPoint {
    let overlay = overlay.map(|dir| Overlay::create(dir, SIZE).expect("create the overlay"));
    ServedPoint {
        stack: Arc::new(Stack::new(image, overlay)),
        changes: RangeLock::default(),
        nowait: Arc::new(AtomicBool::new(true)),
    }
}

/// Reads of every size and alignment, and the whole disk, equal the model.
async fn check_reads(device: &ServedPoint, model: &[u8], rng: &mut Rng) {
    let whole_blocks = device.read(0, SIZE as u32).await.expect("read all");
    assert!(whole_blocks[..] == *model, "the whole disk differs");
    for i in 0..300 {
        let len = 1 + rng.below(if i % 2 == 0 { 9000 } else { 300_000 });
        let offset = rng.below(SIZE - len + 1);
        let got = device.read(offset, len as u32).await.expect("read");
        let want = &model[offset as usize..(offset + len) as usize];
        assert!(&got[..] == want, "read of {len} bytes at {offset} differs");
    }
}

/// Holes read as zeros, every extent list covers what it says, and a block
/// holding anything but zeros is data.
async fn check_status(device: &ServedPoint, model: &[u8]) {
    let mut at = 0;
    let mut holes = 0;
    while at < SIZE {
        let extents: Vec<Status> = device.extents(at, SIZE - at).await.expect("status");
        assert!(!extents.is_empty(), "no extent at {at}");
        for e in extents {
            let range = at as usize..(at + e.length) as usize;
            if e.hole {
                holes += 1;
                assert!(
                    model[range].iter().all(|&b| b == 0),
                    "hole at {at}+{} holds data",
                    e.length
                );
            }
            at += e.length;
        }
    }
    assert_eq!(at, SIZE, "the extents overrun the disk");
    assert!(holes > 0, "the map reports no hole at all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_block_status_follow_the_newest_layer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (image, model) = three_layers(dir.path(), 7);
    let device = served(image, None);
    check_reads(&device, &model, &mut Rng(11)).await;
    check_status(&device, &model).await;
    let refused = device.write(0, Bytes::from_static(b"x"), false).await;
    assert!(
        matches!(&refused, Err(DeviceError::Io { source, .. }) if source.raw_os_error() == Some(libc::EPERM)),
        "a write to a read-only point gave {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writable_overlay_changes_read_back_and_leave_the_layers_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let scratch = tempfile::tempdir().expect("scratch dir");
    let (image, mut model) = three_layers(dir.path(), 8);
    let layers_before = model.clone();
    let device = served(image, Some(scratch.path()));
    let mut rng = Rng(12);
    for _ in 0..200 {
        let max = if rng.below(2) == 0 { 5000 } else { 200_000 };
        let len = 1 + rng.below(max);
        let offset = rng.below(SIZE - len + 1);
        let range = offset as usize..(offset + len) as usize;
        match rng.below(4) {
            0 => {
                device.trim(offset, len, false).await.expect("trim");
                model[range].fill(0);
            }
            1 => {
                let mode = ZeroMode {
                    keep_allocated: rng.below(2) == 0,
                    fast_only: false,
                };
                device
                    .write_zeroes(offset, len, mode, true)
                    .await
                    .expect("zero");
                model[range].fill(0);
            }
            _ => {
                let data = rng.bytes(len as usize);
                model[range.clone()].copy_from_slice(&data);
                device
                    .write(offset, Bytes::from(data), false)
                    .await
                    .expect("write");
            }
        }
    }
    device.flush().await.expect("flush");
    check_reads(&device, &model, &mut rng).await;
    check_status(&device, &model).await;
    assert!(device.overlay_blocks() > 0);
    let below = &device.stack.image;
    let mut back = vec![0u8; SIZE as usize];
    below.read_at(&mut back, 0).expect("read the layers");
    assert!(
        back == layers_before,
        "the layers changed under the overlay"
    );
    assert_eq!(
        std::fs::read_dir(scratch.path())
            .expect("list scratch")
            .count(),
        0,
        "the overlay file has a name in the scratch directory"
    );
}

/// 512-byte writes at once into seven of the eight sectors of each of 64
/// blocks the overlay does not own yet: the first write to a block copies it
/// up from the layers, and no write may undo another. (The race the range
/// lock prevents, a copy-up landing after another write's sector, has a
/// window of microseconds; this run seldom hits it without the lock.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_partial_writes_to_shared_blocks_all_survive() {
    let dir = tempfile::tempdir().expect("temp dir");
    let scratch = tempfile::tempdir().expect("scratch dir");
    let (image, mut model) = three_layers(dir.path(), 9);
    let device = Arc::new(served(image, Some(scratch.path())));
    let mut tasks = Vec::new();
    for block in (0..64u64).map(|i| i * 3) {
        for sector in 1..8u64 {
            let offset = block * BLOCK + sector * 512;
            let data = vec![(block * 8 + sector) as u8 | 1; 512];
            model[offset as usize..offset as usize + 512].copy_from_slice(&data);
            let device = device.clone();
            tasks.push(tokio::spawn(async move {
                device.write(offset, Bytes::from(data), false).await
            }));
        }
    }
    for task in tasks {
        task.await.expect("join").expect("write");
    }
    check_reads(&device, &model, &mut Rng(13)).await;
}

/// Every map entry of every layer lies in exactly one piece, in its own
/// chunk, and each chunk lists its layers oldest first.
#[test]
fn chunk_table_lists_every_entry_once_oldest_layer_first() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (image, _) = three_layers(dir.path(), 10);
    let table = super::index::ChunkTable::new(&image);
    let chunks = SIZE.div_ceil(BLOCK) >> table.shift();
    let mut seen = vec![0usize; image.layers().len()];
    for chunk in 0..=chunks + 1 {
        let pieces = table.pieces(chunk);
        assert!(
            pieces.windows(2).all(|w| w[0].layer < w[1].layer),
            "chunk {chunk}: {pieces:?}"
        );
        for piece in pieces {
            let entries = image.layers()[piece.layer].map().entries();
            let (lo, hi) = piece.entries;
            assert!(lo < hi, "chunk {chunk}: empty piece {piece:?}");
            assert!(
                entries[lo..hi]
                    .iter()
                    .all(|e| e.block >> table.shift() == chunk),
                "chunk {chunk}: {piece:?} holds entries of other chunks"
            );
            seen[piece.layer] += hi - lo;
        }
    }
    let want: Vec<usize> = image
        .layers()
        .iter()
        .map(|l| l.map().entries().len())
        .collect();
    assert_eq!(seen, want, "entries listed per layer");
}
