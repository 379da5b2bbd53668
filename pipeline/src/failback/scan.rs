//! Reading a disk for failback: front to back, one 4 MiB window per read, on
//! a thread of its own, digesting each 64 KiB chunk with SHA-256 (ring uses
//! the CPU's SHA extensions where it has them). At most [`AHEAD`] windows
//! wait for the session, so memory stays small on any disk.

use std::os::unix::fs::FileExt;

use ring::digest::{digest, SHA256};
use tokio::sync::mpsc;

use super::{Disk, FailbackError, CHUNK_SIZE, DIGEST_LEN, WINDOW_CHUNKS};

/// Windows read ahead of the session.
const AHEAD: usize = 4;

/// One window of the disk as read.
#[derive(Debug)]
pub struct Window {
    /// Index of its first chunk.
    pub first: u64,
    /// Its bytes: `CHUNK_SIZE` per chunk, the last chunk of the disk shorter.
    pub data: Vec<u8>,
    /// The SHA-256 digest of each of its chunks.
    pub digests: Vec<[u8; DIGEST_LEN]>,
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
            for index in 0..disk.windows() {
                let window = read_window(&disk, index);
                let failed = window.is_err();
                if tx.blocking_send(window).is_err() || failed {
                    return;
                }
            }
        })
        .map_err(fail)?;
    Ok(rx)
}

fn read_window(disk: &Disk, index: u64) -> Result<Window, FailbackError> {
    let first = index * WINDOW_CHUNKS;
    let offset = first * CHUNK_SIZE;
    let len = (WINDOW_CHUNKS * CHUNK_SIZE).min(disk.size - offset) as usize;
    let mut data = vec![0u8; len];
    disk.file
        .read_exact_at(&mut data, offset)
        .map_err(disk.error("read"))?;
    let digests = data
        .chunks(CHUNK_SIZE as usize)
        .map(|chunk| {
            digest(&SHA256, chunk)
                .as_ref()
                .try_into()
                .expect("SHA-256 digests are 32 bytes")
        })
        .collect();
    Ok(Window {
        first,
        data,
        digests,
    })
}
