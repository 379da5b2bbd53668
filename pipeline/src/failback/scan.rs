//! Reading a disk for failback: front to back, one 4 MiB window per read, on
//! a thread of its own, digesting its 64 KiB chunks with SHA-256 on up to
//! [`DIGEST_THREADS`] threads (ring uses the CPU's SHA extensions where it
//! has them). At most [`AHEAD`] windows wait for the session, and their
//! buffers come back for reuse once dropped, so memory stays small on any
//! disk and no buffer is zeroed twice.

use std::os::unix::fs::FileExt;
use std::sync::mpsc as recycling;

use ring::digest::{digest, SHA256};
use tokio::sync::mpsc;

use super::{Disk, FailbackError, Span, CHUNK_SIZE, DIGEST_LEN};

/// Windows read ahead of the session.
const AHEAD: usize = 4;
/// Most threads digesting one window.
const DIGEST_THREADS: usize = 4;

/// One window of the disk as read.
#[derive(Debug)]
pub struct Window {
    /// Index of its first chunk.
    pub first: u64,
    /// Its bytes: `CHUNK_SIZE` per chunk, the last chunk of the disk shorter.
    pub data: Vec<u8>,
    /// The SHA-256 digest of each of its chunks.
    pub digests: Vec<[u8; DIGEST_LEN]>,
    /// Takes `data` back to the scan thread.
    recycle: recycling::Sender<Vec<u8>>,
}

impl Drop for Window {
    fn drop(&mut self) {
        // The scan may be over; then the buffer is simply freed.
        let _ = self.recycle.send(std::mem::take(&mut self.data));
    }
}

impl Window {
    /// Index of its last chunk.
    pub fn last(&self) -> u64 {
        self.first + self.digests.len() as u64 - 1
    }

    /// The bytes of its chunk `i` (counted from the window's first).
    pub fn chunk(&self, i: usize) -> &[u8] {
        let start = i * CHUNK_SIZE as usize;
        let end = (start + CHUNK_SIZE as usize).min(self.data.len());
        &self.data[start..end]
    }
}

/// Starts reading `disk`; windows arrive in order on the channel, then it
/// closes. A read error arrives in place of the window and ends the scan.
/// The thread stops early when the receiver is dropped.
pub fn start(disk: &Disk) -> Result<mpsc::Receiver<Result<Window, FailbackError>>, FailbackError> {
    let (tx, rx) = mpsc::channel(AHEAD);
    let fail = disk.error("start the scan thread");
    let disk = disk.clone();
    std::thread::Builder::new()
        .name("cdp-failback-scan".into())
        .spawn(move || {
            let (recycle, spare) = recycling::channel();
            for index in 0..disk.windows() {
                let buffer = spare.try_recv().unwrap_or_default();
                let window = read_window(&disk, index, buffer, &recycle);
                let failed = window.is_err();
                if tx.blocking_send(window).is_err() || failed {
                    return;
                }
            }
        })
        .map_err(fail)?;
    Ok(rx)
}

fn read_window(
    disk: &Disk,
    index: u64,
    mut data: Vec<u8>,
    recycle: &recycling::Sender<Vec<u8>>,
) -> Result<Window, FailbackError> {
    let span = Span::of_window(disk.size, index);
    data.resize(span.len as usize, 0);
    disk.file
        .read_exact_at(&mut data, span.offset)
        .map_err(disk.error("read"))?;
    Ok(Window {
        first: span.first,
        digests: chunk_digests(&data),
        data,
        recycle: recycle.clone(),
    })
}

/// The SHA-256 digest of every chunk of `data`, computed by up to
/// [`DIGEST_THREADS`] threads (as many as the machine has) side by side.
pub fn chunk_digests(data: &[u8]) -> Vec<[u8; DIGEST_LEN]> {
    let chunks: Vec<&[u8]> = data.chunks(CHUNK_SIZE as usize).collect();
    let mut out = vec![[0u8; DIGEST_LEN]; chunks.len()];
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(DIGEST_THREADS);
    let per_thread = chunks.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for (ins, outs) in chunks.chunks(per_thread).zip(out.chunks_mut(per_thread)) {
            scope.spawn(move || {
                for (chunk, digest_out) in ins.iter().zip(outs) {
                    digest_out.copy_from_slice(digest(&SHA256, chunk).as_ref());
                }
            });
        }
    });
    out
}
