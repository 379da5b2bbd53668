//! Copying the blocks of a point's layers into an image file, fast: one
//! thread reads runs of blocks (newest layer winning, CRCs checked) into
//! page-aligned buffers of up to 4 MiB, the calling thread writes them with
//! O_DIRECT, so reading and writing overlap and the written data is not
//! copied into the page cache first. Where the file system refuses O_DIRECT
//! the writes go through the page cache. Blocks no layer holds are skipped:
//! the image is sparse.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::mpsc;

use filter::backing::aligned::AlignedBuf;

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

/// Writes every data block of `image` into `out` (at `path`, already
/// sized to the disk), calling `progress(bytes_written)` after each write.
pub fn copy_layers(
    image: &PointImage,
    out: &File,
    path: &Path,
    mut progress: impl FnMut(u64),
) -> Result<(), LongTermError> {
    let direct = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok();
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
