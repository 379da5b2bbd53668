//! Temporary stub; replaced by the real engine.
use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;

use super::aligned::AlignedBuf;
use super::engine::{FallocateMode, IoEngine};

#[derive(Debug)]
pub struct UringEngine;

impl UringEngine {
    pub fn new(_file: Arc<File>, _depth: u32) -> io::Result<Self> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

impl IoEngine for UringEngine {
    async fn read_at(&self, buf: AlignedBuf, _offset: u64) -> (AlignedBuf, io::Result<()>) {
        (buf, Err(io::Error::from(io::ErrorKind::Unsupported)))
    }
    async fn write_at(&self, _data: Bytes, _offset: u64, _durable: bool) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    async fn sync_data(&self) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    async fn fallocate(&self, _mode: FallocateMode, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}
