//! The page-cache fast path for buffered backing I/O.
//!
//! With a buffered (not O_DIRECT) backing disk, most reads are page-cache
//! hits and most writes are memory copies into the page cache. Handing those
//! to an engine costs more than doing them: io_uring cannot complete an ext4
//! buffered write inline (it passes it to an io-wq worker), so each one pays
//! several thread wake-ups, and on our 2-core machines that cut 4 KiB random
//! writes to about two thirds of what nbdkit does (`docs/BENCHMARKS.md`). So:
//!
//! - a read whose pages are all in the page cache (`cachestat(2)`) is not
//!   read at all: the protocol layer sends it from the file with
//!   `sendfile(2)`, which saves a copy through user memory;
//! - other reads are first tried with `preadv2(RWF_NOWAIT)` on the calling
//!   thread, which never blocks: it succeeds only if every byte is in the
//!   page cache; anything else goes to the engine;
//! - a write that covers whole pages and needs no durability is done with
//!   `pwrite` on the calling thread: it needs no read of the old page, so it
//!   waits only where the kernel throttles writers with too much dirty data,
//!   which is back-pressure we want anyway. FUA, partial pages, flushes,
//!   TRIM and zeroing go to the engine;
//! - writes take turns: two threads writing into one file contend on its
//!   inode lock, and the loser spins in the kernel; taking turns on an async
//!   lock instead lets the waiting worker receive and parse the next requests.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Page granularity of the write fast path.
const PAGE: u64 = 4096;

/// `cachestat(2)` (Linux 6.5), not yet in the libc crate for every target;
/// new system calls have one number on every architecture.
const SYS_CACHESTAT: libc::c_long = 451;

#[repr(C)]
struct CachestatRange {
    offset: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    /// Pages of the range in the page cache.
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

#[derive(Debug)]
pub struct FastPath {
    file: Arc<File>,
    /// Cleared for good once the file system refuses RWF_NOWAIT reads.
    /// Relaxed: it only ever goes from true to false, and a stale `true`
    /// costs one more refused attempt.
    nowait_reads: AtomicBool,
    /// Cleared for good once the kernel refuses `cachestat(2)`; relaxed, as
    /// `nowait_reads`.
    cachestat: AtomicBool,
    writes: tokio::sync::Mutex<()>,
}

impl FastPath {
    pub fn new(file: Arc<File>) -> Self {
        FastPath {
            file,
            nowait_reads: AtomicBool::new(true),
            cachestat: AtomicBool::new(true),
            writes: tokio::sync::Mutex::new(()),
        }
    }

    /// Fills `buf` from `offset` if the page cache holds all of it; returns
    /// whether it did. Never blocks.
    pub fn try_read(&self, buf: &mut [u8], offset: u64) -> bool {
        if !self.nowait_reads.load(Ordering::Relaxed) {
            return false;
        }
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the iovec points at `buf`, which is valid for writes of its
        // length and borrowed mutably for the duration of this synchronous call.
        let n = unsafe {
            libc::preadv2(
                self.file.as_raw_fd(),
                &iov,
                1,
                offset as i64,
                libc::RWF_NOWAIT,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
                self.nowait_reads.store(false, Ordering::Relaxed);
            }
            return false;
        }
        n as usize == buf.len()
    }

    /// Whether every page of `[offset, offset + len)` is in the page cache,
    /// so that sending the range from the file does not wait on the device.
    /// A page evicted right after the check is read back in by whoever
    /// sends it: rare, and only slower.
    pub fn is_cached(&self, offset: u64, len: u64) -> bool {
        if len == 0 || !self.cachestat.load(Ordering::Relaxed) {
            return false;
        }
        let range = CachestatRange { offset, len };
        let mut stat = Cachestat::default();
        // SAFETY: both pointers refer to live, properly laid out structs that
        // the kernel only accesses during this synchronous call.
        let rc = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                self.file.as_raw_fd(),
                &range as *const CachestatRange,
                &mut stat as *mut Cachestat,
                0,
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if matches!(err.raw_os_error(), Some(libc::ENOSYS | libc::EOPNOTSUPP)) {
                self.cachestat.store(false, Ordering::Relaxed);
            }
            return false;
        }
        let pages = (offset + len).div_ceil(PAGE) - offset / PAGE;
        stat.nr_cache >= pages
    }

    /// Whether a write of `len` bytes at `offset` belongs on the fast path.
    pub fn takes_write(offset: u64, len: u64, durable: bool) -> bool {
        !durable && len > 0 && offset % PAGE == 0 && len % PAGE == 0
    }

    /// Writes whole pages into the page cache on the calling thread.
    pub async fn write(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let _turn = self.writes.lock().await;
        self.file.write_all_at(data, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cached_reads_succeed_and_writes_round_trip() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        file.set_len(1 << 20).unwrap();
        let fast = FastPath::new(file.clone());
        let data = vec![0x5au8; 8192];
        assert!(FastPath::takes_write(4096, 8192, false));
        fast.write(&data, 4096).await.unwrap();
        let mut back = vec![0u8; 8192];
        // Just written, so cached (or the file system refuses NOWAIT reads).
        if fast.try_read(&mut back, 4096) {
            assert_eq!(back, data);
        }
        let mut direct = vec![0u8; 8192];
        file.read_exact_at(&mut direct, 4096).unwrap();
        assert_eq!(direct, data);
    }

    #[test]
    fn cachestat_tells_which_ranges_the_page_cache_holds() {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(&vec![7u8; 1 << 20], 0).unwrap();
        let fast = FastPath::new(Arc::new(file));
        assert!(fast.is_cached(0, 1 << 20), "just written");
        assert!(fast.is_cached(100, 5000), "unaligned range inside");
        fast.file.sync_all().unwrap();
        // SAFETY: plain integer arguments; the descriptor is open.
        let rc =
            unsafe { libc::posix_fadvise(fast.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        assert!(!fast.is_cached(0, 1 << 20), "clean pages were dropped");
        let mut page = vec![0u8; 4096];
        fast.file.read_exact_at(&mut page, 8192).unwrap();
        assert!(fast.is_cached(8192, 4096), "read back in");
        assert!(!fast.is_cached(8000, 4096), "the page before is still out");
        assert!(!fast.is_cached(8192, 0), "nothing to send");
    }

    #[test]
    fn only_whole_page_non_durable_writes_are_taken() {
        assert!(!FastPath::takes_write(4096, 8192, true));
        assert!(!FastPath::takes_write(4095, 4096, false));
        assert!(!FastPath::takes_write(4096, 4000, false));
        assert!(!FastPath::takes_write(0, 0, false));
    }
}
