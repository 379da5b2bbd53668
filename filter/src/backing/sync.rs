//! The fallback I/O engine: plain pread/pwrite/fdatasync/fallocate system
//! calls, each run on tokio's blocking pool. It owns nothing but a shared
//! handle to the file; used where io_uring is unavailable.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

use super::aligned::AlignedBuf;
use super::engine::{FallocateMode, IoEngine};

/// [`IoEngine`] over blocking system calls on tokio's blocking pool.
#[derive(Debug, Clone)]
pub struct SyncEngine {
    file: Arc<File>,
}

impl SyncEngine {
    pub fn new(file: Arc<File>) -> Self {
        Self { file }
    }

    /// Runs `f` on the blocking pool; fails only if the task panicked or the
    /// runtime is shutting down.
    async fn blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        F: FnOnce(&File) -> T + Send + 'static,
        T: Send + 'static,
    {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .map_err(io::Error::other)
    }
}

impl IoEngine for SyncEngine {
    async fn read_at(&self, buf: AlignedBuf, offset: u64) -> (AlignedBuf, io::Result<()>) {
        let len = buf.len();
        let read = self.blocking(move |file| {
            let mut buf = buf;
            let result = read_full(file, buf.as_mut_slice(), offset);
            (buf, result)
        });
        read.await
            .unwrap_or_else(|e| (AlignedBuf::zeroed(len), Err(e)))
    }

    /// A durable write is pwrite followed by fdatasync rather than
    /// pwritev2(RWF_DSYNC), which kernels older than 4.7 lack: this engine is
    /// the one that must work everywhere.
    async fn write_at(&self, data: Bytes, offset: u64, durable: bool) -> io::Result<()> {
        self.blocking(move |file| {
            file.write_all_at(&data, offset)?;
            if durable {
                file.sync_data()?;
            }
            Ok(())
        })
        .await?
    }

    async fn sync_data(&self) -> io::Result<()> {
        self.blocking(File::sync_data).await?
    }

    async fn fallocate(&self, mode: FallocateMode, offset: u64, len: u64) -> io::Result<()> {
        self.blocking(move |file| fallocate(file, mode, offset, len))
            .await?
    }
}

/// Fills `buf` from `offset`, stopping early at end of file: the rest of
/// `buf` keeps whatever it held (zeros, for a fresh [`AlignedBuf`]).
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn fallocate(file: &File, mode: FallocateMode, offset: u64, len: u64) -> io::Result<()> {
    let too_large = |_| io::Error::from(io::ErrorKind::InvalidInput);
    let offset = libc::off_t::try_from(offset).map_err(too_large)?;
    let len = libc::off_t::try_from(len).map_err(too_large)?;
    loop {
        // SAFETY: fallocate takes no pointers; `file` keeps the descriptor open.
        let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode.flags(), offset, len) };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Engine-independent tests, generic over [`IoEngine`] so that every engine
/// runs the same checks.
#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;
    use std::fs::OpenOptions;
    use std::os::unix::fs::OpenOptionsExt;

    use tokio::task::JoinSet;

    use super::*;
    use crate::backing::aligned::ALIGNMENT;

    /// A fresh, empty, anonymous temporary file.
    pub(crate) fn temp_file() -> Arc<File> {
        Arc::new(tempfile::tempfile().expect("create temp file"))
    }

    /// A tiny deterministic xorshift generator, so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Self(seed | 1)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.below(256) as u8).collect()
        }
    }

    pub(crate) fn pattern(len: usize, seed: u8) -> Bytes {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<_>>()
            .into()
    }

    pub(crate) async fn read<E: IoEngine>(engine: &E, offset: u64, len: usize) -> Vec<u8> {
        let (buf, result) = engine.read_at(AlignedBuf::zeroed(len), offset).await;
        result.expect("read");
        buf.as_slice().to_vec()
    }

    pub(crate) async fn round_trip_at_odd_offsets<E: IoEngine>(engine: &E) {
        let writes = [(1, 1), (4095, 513), (12_345, 70_001), (1 << 20, 4097)];
        for (i, &(offset, len)) in writes.iter().enumerate() {
            engine
                .write_at(pattern(len, i as u8), offset, false)
                .await
                .expect("write");
        }
        for (i, &(offset, len)) in writes.iter().enumerate() {
            assert_eq!(read(engine, offset, len).await, pattern(len, i as u8));
        }
    }

    pub(crate) async fn read_past_eof_gives_zeros<E: IoEngine>(engine: &E) {
        engine
            .write_at(pattern(100, 7), 0, false)
            .await
            .expect("write");
        let got = read(engine, 50, 8192).await;
        assert_eq!(got[..50], pattern(100, 7)[50..]);
        assert!(got[50..].iter().all(|&b| b == 0));
        assert!(read(engine, 1 << 30, 4096).await.iter().all(|&b| b == 0));
    }

    pub(crate) async fn durable_write_and_sync<E: IoEngine>(engine: &E) {
        engine
            .write_at(pattern(10_000, 3), 777, true)
            .await
            .expect("durable write");
        engine
            .write_at(pattern(5000, 4), 20_000, false)
            .await
            .expect("write");
        engine.sync_data().await.expect("sync_data");
        assert_eq!(read(engine, 777, 10_000).await, pattern(10_000, 3));
        assert_eq!(read(engine, 20_000, 5000).await, pattern(5000, 4));
    }

    pub(crate) async fn punch_hole_reads_zeros<E: IoEngine>(engine: &E) {
        let len = 64 * 1024;
        engine
            .write_at(Bytes::from(vec![0xab; len]), 0, false)
            .await
            .expect("write");
        engine
            .fallocate(FallocateMode::PunchHole, 4096, 8192)
            .await
            .expect("punch hole");
        let got = read(engine, 0, len).await;
        assert!(got[..4096].iter().all(|&b| b == 0xab));
        assert!(got[4096..12_288].iter().all(|&b| b == 0));
        assert!(got[12_288..].iter().all(|&b| b == 0xab));
    }

    /// 2000 concurrent writes, then concurrent reads checked against a model.
    /// Each write stays inside its own 2 KiB slot: concurrent overlapping
    /// writes have no defined order, so the model could not predict them.
    pub(crate) async fn concurrent_random_writes<E: IoEngine>(engine: Arc<E>) {
        const WRITES: u64 = 2000;
        const SLOT: u64 = 2048;
        let mut rng = Rng::new(0x5eed);
        let mut model = vec![0u8; (WRITES * SLOT) as usize];
        let mut tasks = JoinSet::new();
        for slot in 0..WRITES {
            let start = rng.below(SLOT);
            let len = 1 + rng.below(SLOT - start);
            let offset = slot * SLOT + start;
            let data = rng.bytes(len as usize);
            model[offset as usize..][..data.len()].copy_from_slice(&data);
            let engine = Arc::clone(&engine);
            tasks.spawn(async move { engine.write_at(data.into(), offset, false).await });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("write task").expect("write");
        }

        let mut reads = BTreeMap::new();
        let mut offset = 0;
        while offset < model.len() {
            let len = (1 + rng.below(8192) as usize).min(model.len() - offset);
            reads.insert(offset, len);
            offset += len;
        }
        let mut tasks = JoinSet::new();
        for (&offset, &len) in &reads {
            let engine = Arc::clone(&engine);
            tasks.spawn(async move { (offset, read(&*engine, offset as u64, len).await) });
        }
        while let Some(done) = tasks.join_next().await {
            let (offset, got) = done.expect("read task");
            assert_eq!(got, model[offset..][..got.len()], "at offset {offset}");
        }
    }

    /// Opens a temporary file with O_DIRECT, or `None` where the file system
    /// refuses it.
    pub(crate) fn direct_file() -> Option<Arc<File>> {
        let path = tempfile::NamedTempFile::new()
            .expect("create temp file")
            .into_temp_path();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path);
        match file {
            Ok(file) => Some(Arc::new(file)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
            Err(e) => panic!("open with O_DIRECT: {e}"),
        }
    }

    pub(crate) async fn direct_io_round_trip<E: IoEngine>(engine: &E) {
        for (i, (block, blocks)) in [(0, 1), (3, 16), (40, 2)].into_iter().enumerate() {
            let mut buf = AlignedBuf::zeroed(blocks * ALIGNMENT);
            buf.as_mut_slice()
                .copy_from_slice(&pattern(blocks * ALIGNMENT, i as u8));
            let offset = (block * ALIGNMENT) as u64;
            engine
                .write_at(Bytes::from_owner(buf), offset, i == 1)
                .await
                .expect("O_DIRECT write");
            let (buf, result) = engine
                .read_at(AlignedBuf::zeroed(blocks * ALIGNMENT), offset)
                .await;
            result.expect("O_DIRECT read");
            assert_eq!(buf.as_slice(), pattern(blocks * ALIGNMENT, i as u8));
        }
    }

    fn engine() -> SyncEngine {
        SyncEngine::new(temp_file())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_round_trip_at_odd_offsets() {
        round_trip_at_odd_offsets(&engine()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_read_past_eof_gives_zeros() {
        read_past_eof_gives_zeros(&engine()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_durable_write_and_sync() {
        durable_write_and_sync(&engine()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_punch_hole_reads_zeros() {
        punch_hole_reads_zeros(&engine()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_concurrent_random_writes() {
        concurrent_random_writes(Arc::new(engine())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_direct_io_round_trip() {
        match direct_file() {
            Some(file) => direct_io_round_trip(&SyncEngine::new(file)).await,
            None => eprintln!("skipped: file system refuses O_DIRECT"),
        }
    }
}
