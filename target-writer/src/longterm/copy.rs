//! Writing a rebuilt image fast. [`copy_layers`]: one thread reads runs of
//! blocks (newest layer winning, CRCs checked) into page-aligned buffers of
//! up to 4 MiB, the calling thread writes them with O_DIRECT, so reading and
//! writing overlap and the written data is not copied into the page cache
//! first; blocks no layer holds are skipped (the image is sparse).
//! [`apply_direct`] applies a journal batch the same way: the whole blocks
//! of large writes with O_DIRECT, the rest through the page cache. Where the
//! file system refuses O_DIRECT everything goes through the page cache.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::mpsc;

use filter::backing::aligned::AlignedBuf;
use filter::capture::log::zero_range;
use pipeline::batch::{Batch, Extent};

use super::chain::PointImage;
use super::error::{io_err, LongTermError};
use super::image::BLOCK;

/// The largest write: 4 MiB.
const CHUNK: u64 = 4 << 20;
/// Buffers in flight between the reader and the writer.
const BUFFERS: usize = 3;

/// One filled buffer: `len` bytes for the disk at `offset`.
struct Filled {
    offset: u64,
    len: u64,
    buf: AlignedBuf,
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
    mut progress: impl FnMut(u64),
) -> Result<(), LongTermError> {
    let direct = open_direct(path);
    let (filled_tx, filled_rx) = mpsc::sync_channel::<Filled>(BUFFERS);
    let (empty_tx, empty_rx) = mpsc::channel::<AlignedBuf>();
    for _ in 0..BUFFERS {
        empty_tx
            .send(AlignedBuf::zeroed(CHUNK as usize))
            .expect("receiver alive");
    }
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || read_chunks(image, &filled_tx, &empty_rx));
        let mut written = 0;
        let mut result = Ok(());
        for filled in filled_rx {
            if result.is_ok() {
                result = write_chunk(&filled, image.disk_size(), direct.as_ref(), out, path);
                written += filled.len;
                progress(written);
            }
            // The reader stops once it finds no buffer to fill.
            let _ = empty_tx.send(filled.buf);
            if result.is_err() {
                break;
            }
        }
        drop(empty_tx);
        let read = reader.join().expect("the copy's reader does not panic");
        result.and(read)
    })
}

/// Fills buffers with runs of data blocks, contiguous ones together.
fn read_chunks(
    image: &PointImage,
    filled: &mpsc::SyncSender<Filled>,
    empty: &mpsc::Receiver<AlignedBuf>,
) -> Result<(), LongTermError> {
    let mut current: Option<Filled> = None;
    for run in image.runs() {
        let Some(layer) = run.layer else { continue };
        let (offset, len) = (run.first_block * BLOCK, run.blocks * BLOCK);
        let joins = current
            .as_ref()
            .is_some_and(|c| c.offset + c.len == offset && c.len + len <= CHUNK);
        if !joins {
            if let Some(done) = current.take() {
                if filled.send(done).is_err() {
                    return Ok(());
                }
            }
            let Ok(buf) = empty.recv() else {
                return Ok(());
            };
            current = Some(Filled {
                offset,
                len: 0,
                buf,
            });
        }
        let chunk = current.as_mut().expect("set above");
        let at = chunk.len as usize;
        let target = &mut chunk.buf.as_mut_slice()[at..at + len as usize];
        image.layers()[layer].read_blocks(run.first_block, target)?;
        chunk.len += len;
    }
    if let Some(done) = current {
        let _ = filled.send(done);
    }
    Ok(())
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
