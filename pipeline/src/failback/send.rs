//! The sender: runs on the failover side, answers each window of the
//! receiver's digests with the chunks of its own disk whose digests differ.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::scan;
use super::wire::{self, expect_kind, Totals};
use super::{Disk, FailbackError, Summary};
use crate::codec::FrameKind;
use crate::key::Key;
use crate::session::{Hello, Session};

/// Makes the receiver's disk equal to `disk`: authenticates as the sender
/// of `original_id` (the disk that was failed over), ships the chunks that
/// differ and waits until the receiver confirms them durable.
/// `progress(chunks_done, chunks_total)` is called after every window.
pub async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &Key,
    disk: &Disk,
    original_id: [u8; 16],
    mut progress: impl FnMut(u64, u64),
) -> Result<Summary, FailbackError> {
    let hello = Hello {
        disk_id: original_id,
        disk_size: disk.size,
    };
    let mut session = wire::connect(stream, key, hello).await?;
    let mut windows = scan::start(disk)?;
    let mut summary = Summary::default();
    let meta = |kind, first, last| wire::meta(kind, original_id, first, last);
    while summary.totals.windows < disk.windows() {
        let (got, body) = session.receive(stream).await?;
        expect_kind(got.kind, FrameKind::Digests)?;
        let ours = windows.recv().await.ok_or_else(|| {
            FailbackError::Protocol("the scan of our disk ended early".to_string())
        })??;
        if (got.first_seq, got.last_seq) != (ours.first, ours.last()) {
            return Err(FailbackError::Protocol(format!(
                "digests for chunks {}..={} arrived where we expected {}..={}",
                got.first_seq,
                got.last_seq,
                ours.first,
                ours.last()
            )));
        }
        let theirs = wire::decode_digests(&body, ours.digests.len() as u64)?;
        let mut payload = Vec::new();
        for (i, (mine, theirs)) in ours.digests.iter().zip(&theirs).enumerate() {
            if mine != theirs {
                let chunk = ours.chunk(i);
                wire::push_chunk(&mut payload, ours.first + i as u64, chunk);
                summary.totals.differing += 1;
                summary.totals.bytes += chunk.len() as u64;
            }
        }
        let frame = session
            .sealer
            .seal(&meta(FrameKind::Chunks, ours.first, ours.last()), &payload);
        stream.write_all(&frame).await?;
        summary.wire_bytes += frame.len() as u64;
        summary.totals.windows += 1;
        summary.totals.chunks += ours.digests.len() as u64;
        progress(summary.totals.chunks, disk.chunks());
    }
    let done = session
        .sealer
        .seal(&meta(FrameKind::Done, 0, 0), &summary.totals.encode());
    stream.write_all(&done).await?;
    summary.wire_bytes += done.len() as u64;
    let confirmed = receive_done(&mut session, stream).await?;
    if confirmed != summary.totals {
        return Err(FailbackError::Protocol(format!(
            "the receiver confirmed {confirmed:?}, but we sent {:?}",
            summary.totals
        )));
    }
    Ok(summary)
}

async fn receive_done<S: AsyncRead + Unpin>(
    session: &mut Session,
    stream: &mut S,
) -> Result<Totals, FailbackError> {
    let (got, body) = session.receive(stream).await?;
    expect_kind(got.kind, FrameKind::Done)?;
    Totals::decode(&body)
}
