//! Reading the planned runs of one request, in order, into a block-aligned
//! buffer: zeros for a zero run, one `pread` for any other (a run of blocks
//! one layer holds is contiguous in its file) straight into the buffer's
//! unused capacity, so no byte is written twice; each layer block is then
//! checked against its CRC. Runs are first read with
//! `preadv2(RWF_NOWAIT)` on the calling worker, which never blocks and
//! succeeds only when the page cache holds the bytes; from the first run it
//! cannot read that way, the rest of the request goes to tokio's blocking
//! pool, so an async worker never waits on a disk.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::plan::{Run, Source, BLOCK};
use super::Stack;

/// Requests up to this many blocks (256 KiB) try the page cache inline;
/// larger ones (copies and CRCs of megabytes) go to the blocking pool.
const INLINE_BLOCKS: u64 = 64;

/// Reads the `count` blocks `runs` plan (in order, covering them all).
pub(super) async fn read_runs(
    stack: &Arc<Stack>,
    nowait: &Arc<AtomicBool>,
    runs: Vec<Run>,
    count: u64,
) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity((count * BLOCK) as usize);
    let mut done = 0;
    // Relaxed: the flag only ever goes from true to false, and a stale
    // `true` costs one refused attempt.
    if count <= INLINE_BLOCKS && nowait.load(Ordering::Relaxed) {
        for run in &runs {
            if !append(stack, run, &mut buf, Some(nowait))? {
                break;
            }
            done += 1;
        }
    }
    if done == runs.len() {
        return Ok(buf);
    }
    let stack = stack.clone();
    tokio::task::spawn_blocking(move || {
        for run in &runs[done..] {
            append(&stack, run, &mut buf, None)?;
        }
        Ok(buf)
    })
    .await
    .map_err(io::Error::other)?
}

/// Appends `run`'s bytes to `buf`. With `nowait`, only from the page cache:
/// returns false (leaving `buf` as it was) if it holds less than the run.
fn append(
    stack: &Stack,
    run: &Run,
    buf: &mut Vec<u8>,
    nowait: Option<&AtomicBool>,
) -> io::Result<bool> {
    let len = (run.blocks * BLOCK) as usize;
    let at = buf.len();
    let (file, offset) = match run.source {
        Source::Zero => {
            buf.resize(at + len, 0);
            return Ok(true);
        }
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
    };
    buf.reserve(len);
    let mut filled = 0;
    while filled < len {
        let n = pread(file, buf, filled, len - filled, offset, nowait.is_some());
        match n {
            Ok(0) => {
                let short = format!("{} bytes short", len - filled);
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, short);
                return Err(with_path(stack, run, offset, e));
            }
            Ok(n) => filled += n,
            Err(e) if nowait.is_some() => {
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    nowait.expect("checked").store(false, Ordering::Relaxed);
                }
                return Ok(false);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(with_path(stack, run, offset, e)),
        }
        if nowait.is_some() && filled < len {
            return Ok(false);
        }
    }
    // SAFETY: `pread` wrote all `len` bytes after `at` (within the capacity
    // reserved above), so they are initialised.
    unsafe { buf.set_len(at + len) };
    if let Source::Layer { layer, entry } = run.source {
        let check = stack.image.layers()[layer].check_blocks(entry, run.first_block, &buf[at..]);
        if let Err(e) = check {
            buf.truncate(at);
            return Err(io::Error::other(e));
        }
    }
    Ok(true)
}

/// Reads up to `len` bytes of `file` at `offset + filled` into `buf`'s
/// unused capacity, `filled` bytes past its end; with `nowait`, only what
/// the page cache holds.
fn pread(
    file: &File,
    buf: &mut Vec<u8>,
    filled: usize,
    len: usize,
    offset: u64,
    nowait: bool,
) -> io::Result<usize> {
    let spare = &mut buf.spare_capacity_mut()[filled..filled + len];
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len(),
    };
    let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
    // SAFETY: the iovec points at `spare`, memory of `buf`'s allocation
    // valid for writes of its length and borrowed mutably for this
    // synchronous call (the kernel may write uninitialised memory); `file`
    // is open.
    let n = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &iov,
            1,
            (offset + filled as u64) as libc::off_t,
            flags,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `e` naming the file `run` is read from (the overlay is unlinked).
fn with_path(stack: &Stack, run: &Run, offset: u64, e: io::Error) -> io::Error {
    let file = match run.source {
        Source::Layer { layer, .. } => stack.image.layers()[layer].path().display().to_string(),
        _ => "the scratch overlay".to_string(),
    };
    io::Error::new(e.kind(), format!("{file}: read at offset {offset}: {e}"))
}
