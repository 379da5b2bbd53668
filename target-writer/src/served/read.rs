//! Reading the planned runs of one request into a block-aligned buffer: one
//! `pread` per run (a run of blocks one layer holds is contiguous in its
//! file), each layer block checked against its CRC. Runs are first tried
//! with `preadv2(RWF_NOWAIT)` on the calling worker, which never blocks and
//! succeeds only when the page cache holds the bytes; the rest go to tokio's
//! blocking pool, so an async worker never waits on a disk.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::plan::{Run, Source, BLOCK};
use super::Stack;

/// Requests up to this many blocks (256 KiB) try the page cache inline;
/// larger ones (copies and CRCs of megabytes) go to the blocking pool.
const INLINE_BLOCKS: u64 = 64;

/// Reads blocks `first..first + count` as `runs` plans them; zero runs are
/// left as zeros.
pub(super) async fn read_runs(
    stack: &Arc<Stack>,
    nowait: &Arc<AtomicBool>,
    runs: Vec<Run>,
    first: u64,
    count: u64,
) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; (count * BLOCK) as usize];
    // Relaxed: the flag only ever goes from true to false, and a stale
    // `true` costs one refused attempt.
    let inline = count <= INLINE_BLOCKS && nowait.load(Ordering::Relaxed);
    let mut pending = Vec::new();
    for run in runs.into_iter().filter(|r| r.source != Source::Zero) {
        let part = &mut buf[span(&run, first)];
        if inline && try_cached(stack, nowait, &run, part)? {
            continue;
        }
        pending.push(run);
    }
    if pending.is_empty() {
        return Ok(buf);
    }
    let stack = stack.clone();
    tokio::task::spawn_blocking(move || {
        for run in &pending {
            read_blocking(&stack, run, &mut buf[span(run, first)])?;
        }
        Ok(buf)
    })
    .await
    .map_err(io::Error::other)?
}

/// Where `run` lies in a buffer starting at block `first`.
fn span(run: &Run, first: u64) -> Range<usize> {
    let start = ((run.first_block - first) * BLOCK) as usize;
    start..start + (run.blocks * BLOCK) as usize
}

/// The file holding `run` and the run's offset in it.
fn location<'a>(stack: &'a Stack, run: &Run) -> (&'a File, u64) {
    match run.source {
        Source::Layer { layer, .. } => {
            let (file, data_offset) = stack.image.layers()[layer].data_file();
            (file, data_offset + run.first_block * BLOCK)
        }
        Source::Overlay => {
            let overlay = stack
                .overlay
                .as_ref()
                .expect("overlay runs need an overlay");
            (overlay.file(), run.first_block * BLOCK)
        }
        Source::Zero => unreachable!("zero runs are not read"),
    }
}

/// Checks the blocks of a layer run against their CRCs.
fn check(stack: &Stack, run: &Run, data: &[u8]) -> io::Result<()> {
    match run.source {
        Source::Layer { layer, entry } => stack.image.layers()[layer]
            .check_blocks(entry, run.first_block, data)
            .map_err(io::Error::other),
        _ => Ok(()),
    }
}

/// Fills `buf` with `run` if the page cache holds all of it; whether it did.
fn try_cached(stack: &Stack, nowait: &AtomicBool, run: &Run, buf: &mut [u8]) -> io::Result<bool> {
    let (file, offset) = location(stack, run);
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: the iovec points at `buf`, which is valid for writes of its
    // length and borrowed mutably for this synchronous call; `file` is open.
    let n = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    if n < 0 {
        if io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
            nowait.store(false, Ordering::Relaxed);
        }
        return Ok(false);
    }
    if n as usize != buf.len() {
        return Ok(false);
    }
    check(stack, run, buf)?;
    Ok(true)
}

fn read_blocking(stack: &Stack, run: &Run, buf: &mut [u8]) -> io::Result<()> {
    match run.source {
        Source::Layer { layer, .. } => stack.image.layers()[layer]
            .read_blocks(run.first_block, buf)
            .map_err(io::Error::other),
        _ => {
            let (file, offset) = location(stack, run);
            file.read_exact_at(buf, offset)
        }
    }
}
