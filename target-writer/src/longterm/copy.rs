//! Writing a rebuilt image fast. [`copy_layers`]: reader threads each take
//! every [`READERS`]th 4 MiB window of the disk and read its runs of blocks
//! (newest layer winning, CRCs checked) into page-aligned buffers; the
//! calling thread writes them with O_DIRECT. So reading and writing overlap,
//! the written data is not copied into the page cache first, and when the
//! layers are not in the page cache several reads are in flight at once
//! (the runs of a long chain of deltas are short and scattered: one reader
//! thread left the disk waiting on each, so each reader also asks the kernel
//! to start every read of its window at once); blocks no layer holds are
//! skipped (the image is sparse).
//! [`apply_direct`] applies a journal batch the same way: the whole blocks
//! of large writes with O_DIRECT, the rest through the page cache. Where the
//! file system refuses O_DIRECT everything goes through the page cache.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use filter::backing::aligned::AlignedBuf;
use filter::capture::log::zero_range;
use pipeline::batch::{Batch, Extent};

use super::chain::PointImage;
use super::error::{io_err, LongTermError};
use super::image::BLOCK;

/// The largest write, and the window of the disk a reader takes at a time:
/// 4 MiB.
pub(super) const CHUNK: u64 = 4 << 20;
/// Reader threads of [`copy_layers`].
const READERS: usize = 4;
/// Buffers of each reader: one it fills while the writer has the other.
const BUFFERS_PER_READER: usize = 2;

/// One filled buffer: `len` bytes for the disk at `offset`, from `reader`.
struct Filled {
    offset: u64,
    len: u64,
    buf: AlignedBuf,
    reader: usize,
}

/// Opens `path` again for O_DIRECT writes, if its file system allows them.
pub fn open_direct(path: &Path) -> Option<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Writes at most this much of a large data extent per O_DIRECT write, and
/// sends smaller extents through the page cache.
const DIRECT_MIN: usize = 64 << 10;

/// Applies `batch` to the image `out` (at `path`): as [`Batch::apply`], but
/// the whole blocks of data extents of 64 KiB or more are copied into an
/// aligned buffer and written with O_DIRECT (`direct`, from `open_direct`).
pub fn apply_direct(
    batch: &Batch,
    out: &File,
    direct: Option<&File>,
    buf: &mut AlignedBuf,
    path: &Path,
) -> Result<(), LongTermError> {
    for extent in &batch.extents {
        let (offset, data) = match (extent, direct) {
            (Extent::Data { offset, data }, Some(_)) if data.len() >= DIRECT_MIN => (*offset, data),
            (Extent::Zero { offset, len }, _) => {
                zero_range(out, *offset, *len).map_err(io_err(path, "zero", *offset))?;
                continue;
            }
            (Extent::Data { offset, data }, _) => {
                out.write_all_at(data, *offset)
                    .map_err(io_err(path, "write image", *offset))?;
                continue;
            }
        };
        let direct = direct.expect("matched above");
        let end = offset + data.len() as u64;
        let (first, last) = (offset.div_ceil(BLOCK) * BLOCK, end / BLOCK * BLOCK);
        let head = (first - offset) as usize;
        out.write_all_at(&data[..head], offset)
            .map_err(io_err(path, "write image", offset))?;
        let mut at = first;
        while at < last {
            let n = (last - at).min(CHUNK) as usize;
            let from = (at - offset) as usize;
            buf.as_mut_slice()[..n].copy_from_slice(&data[from..from + n]);
            direct
                .write_all_at(&buf.as_slice()[..n], at)
                .map_err(io_err(path, "write image", at))?;
            at += n as u64;
        }
        let tail = (last.max(first) - offset) as usize;
        out.write_all_at(&data[tail..], offset + tail as u64)
            .map_err(io_err(path, "write image", offset + tail as u64))?;
    }
    Ok(())
}

/// An aligned buffer for [`apply_direct`].
pub fn direct_buffer() -> AlignedBuf {
    AlignedBuf::zeroed(CHUNK as usize)
}

/// Writes every data block of `image` into `out` (at `path`, already
/// sized to the disk), calling `progress(bytes_written)` after each write.
pub fn copy_layers(
    image: &PointImage,
    out: &File,
    path: &Path,
    progress: impl FnMut(u64),
) -> Result<(), LongTermError> {
    copy_in_windows(image, out, path, CHUNK, READERS, progress)
}

/// [`copy_layers`] with `readers` threads taking windows of `window` bytes
/// (a whole number of blocks) in turn.
pub(super) fn copy_in_windows(
    image: &PointImage,
    out: &File,
    path: &Path,
    window: u64,
    readers: usize,
    mut progress: impl FnMut(u64),
) -> Result<(), LongTermError> {
    debug_assert!(window > 0 && window % BLOCK == 0 && readers > 0);
    let direct = open_direct(path);
    let windows = image.disk_size().div_ceil(window);
    let (filled_tx, filled_rx) = mpsc::sync_channel::<Filled>(readers);
    // Set by a reader that failed, so that the others stop at their next
    // window instead of reading the rest of the disk for nothing.
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let mut empties = Vec::with_capacity(readers);
        let mut threads = Vec::with_capacity(readers);
        for reader in 0..readers {
            let (empty_tx, empty_rx) = mpsc::channel::<AlignedBuf>();
            for _ in 0..BUFFERS_PER_READER {
                empty_tx
                    .send(AlignedBuf::zeroed(window as usize))
                    .expect("receiver alive");
            }
            empties.push(empty_tx);
            let filled = filled_tx.clone();
            let failed = &failed;
            threads.push(scope.spawn(move || {
                for w in (reader as u64..windows).step_by(readers) {
                    if failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let blocks = w * window / BLOCK..((w + 1) * window / BLOCK);
                    match read_window(image, blocks, reader, &filled, &empty_rx) {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                }
                Ok(())
            }));
        }
        drop(filled_tx);
        let mut written = 0;
        let mut result = Ok(());
        for filled in filled_rx {
            if result.is_ok() {
                result = write_chunk(&filled, image.disk_size(), direct.as_ref(), out, path);
                written += filled.len;
                progress(written);
            }
            // A reader stops once it finds no buffer to fill.
            let _ = empties[filled.reader].send(filled.buf);
            if result.is_err() {
                break;
            }
        }
        drop(empties);
        let mut read = Ok(());
        for thread in threads {
            let outcome = thread.join().expect("the copy's readers do not panic");
            read = read.and(outcome);
        }
        result.and(read)
    })
}

/// Fills buffers with the data blocks of `blocks`, contiguous ones
/// together, and hands them to the writer. `false` if the writer is gone.
fn read_window(
    image: &PointImage,
    blocks: Range<u64>,
    reader: usize,
    filled: &mpsc::SyncSender<Filled>,
    empty: &mpsc::Receiver<AlignedBuf>,
) -> Result<bool, LongTermError> {
    let mut current: Option<Filled> = None;
    let runs: Vec<_> = image.runs(blocks).filter(|r| r.layer.is_some()).collect();
    // Every run's read is started at once, so a chain of short scattered
    // runs keeps the disk's queue full instead of waiting on one at a time.
    for run in &runs {
        image.layers()[run.layer.expect("filtered")].will_need(run.first_block, run.blocks);
    }
    for run in runs {
        let Some(layer) = run.layer else { continue };
        let (offset, len) = (run.first_block * BLOCK, run.blocks * BLOCK);
        let joins = current.as_ref().is_some_and(|c| c.offset + c.len == offset);
        if !joins {
            if let Some(done) = current.take() {
                if filled.send(done).is_err() {
                    return Ok(false);
                }
            }
            let Ok(buf) = empty.recv() else {
                return Ok(false);
            };
            current = Some(Filled {
                offset,
                len: 0,
                buf,
                reader,
            });
        }
        let chunk = current.as_mut().expect("set above");
        let at = chunk.len as usize;
        let target = &mut chunk.buf.as_mut_slice()[at..at + len as usize];
        image.layers()[layer].read_blocks(run.first_block, target)?;
        chunk.len += len;
    }
    match current {
        Some(done) => Ok(filled.send(done).is_ok()),
        None => Ok(true),
    }
}

/// Writes one chunk: with O_DIRECT where possible; the part past the end of
/// the disk (the last block of a disk whose size is not a whole number of
/// blocks) is never written.
fn write_chunk(
    chunk: &Filled,
    disk_size: u64,
    direct: Option<&File>,
    buffered: &File,
    path: &Path,
) -> Result<(), LongTermError> {
    let len = chunk.len.min(disk_size - chunk.offset);
    let data = &chunk.buf.as_slice()[..len as usize];
    let whole = len - len % BLOCK;
    let (aligned, rest) = data.split_at(whole as usize);
    let file = direct.unwrap_or(buffered);
    file.write_all_at(aligned, chunk.offset)
        .map_err(io_err(path, "write image", chunk.offset))?;
    buffered
        .write_all_at(rest, chunk.offset + whole)
        .map_err(io_err(path, "write image", chunk.offset + whole))
}
