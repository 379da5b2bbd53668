//! Temporary stub; replaced by the real engine.
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

use super::aligned::AlignedBuf;
use super::engine::{FallocateMode, IoEngine};

#[derive(Debug)]
pub struct SyncEngine {
    file: Arc<File>,
}

impl SyncEngine {
    pub fn new(file: Arc<File>) -> Self {
        Self { file }
    }
}

impl IoEngine for SyncEngine {
    async fn read_at(&self, mut buf: AlignedBuf, offset: u64) -> (AlignedBuf, io::Result<()>) {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let mut done = 0;
            let res = loop {
                if done == buf.len() {
                    break Ok(());
                }
                match file.read_at(&mut buf.as_mut_slice()[done..], offset + done as u64) {
                    Ok(0) => break Ok(()),
                    Ok(n) => done += n,
                    Err(e) => break Err(e),
                }
            };
            (buf, res)
        })
        .await
        .expect("blocking task")
    }
    async fn write_at(&self, data: Bytes, offset: u64, durable: bool) -> io::Result<()> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            file.write_all_at(&data, offset)?;
            if durable {
                file.sync_data()?;
            }
            Ok(())
        })
        .await
        .expect("blocking task")
    }
    async fn sync_data(&self) -> io::Result<()> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .expect("blocking task")
    }
    async fn fallocate(&self, mode: FallocateMode, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            // SAFETY: stub.
            let rc = unsafe {
                libc::fallocate(file.as_raw_fd(), mode.flags(), offset as i64, len as i64)
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        })
        .await
        .expect("blocking task")
    }
}
