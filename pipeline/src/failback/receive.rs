//! The receiver: runs on the original side, streams the digests of its disk
//! and writes the chunks the sender answers with, then fsyncs and confirms.
//! Digests go out and chunks come in at the same time (the two halves of
//! the connection), so neither side waits on the other's socket buffer.

use std::os::unix::fs::FileExt;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::scan::{self, Window};
use super::wire::{self, expect_kind, meta, Totals};
use super::{Disk, FailbackError, Span, Summary, CHUNK_SIZE};
use crate::codec::{FrameKind, Opener, Sealer};
use crate::key::Key;
use crate::protect::disk_id;
use crate::session::{read_frame, Hello, Session};

/// Makes `disk` equal to the sender's: authenticates the sender, admits it
/// only if it fails back this very disk (same id and size), streams our
/// digests, writes the chunks that come back, fsyncs and confirms.
/// `progress(chunks_done, chunks_total)` is called after every window.
pub async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &Key,
    disk: &Disk,
    progress: impl FnMut(u64, u64),
) -> Result<Summary, FailbackError> {
    let ours = Hello {
        disk_id: disk_id(&disk.path, disk.size),
        disk_size: disk.size,
    };
    let Session { sealer, opener, .. } =
        wire::accept(stream, key, |hello| admit(hello, &ours, disk)).await?;
    let scan = scan::start(disk)?;
    let (reader, writer) = tokio::io::split(&mut *stream);
    let ((mut writer, mut sealer, mut wire_bytes), totals) = tokio::try_join!(
        send_digests(writer, sealer, scan, ours.disk_id),
        receive_chunks(reader, opener, disk, progress),
    )?;
    let file = disk.file.clone();
    tokio::task::spawn_blocking(move || file.sync_all())
        .await
        .map_err(|e| FailbackError::Task(e.to_string()))?
        .map_err(disk.error("fsync"))?;
    let done = sealer.seal(&meta(FrameKind::Done, ours.disk_id, 0, 0), &totals.encode());
    writer.write_all(&done).await?;
    writer.flush().await?;
    wire_bytes += done.len() as u64;
    Ok(Summary { totals, wire_bytes })
}

fn admit(hello: &Hello, ours: &Hello, disk: &Disk) -> Result<(), String> {
    let hex = |id: &[u8; 16]| id.iter().map(|b| format!("{b:02x}")).collect::<String>();
    if hello.disk_size != ours.disk_size {
        return Err(format!(
            "the sender's disk is {} bytes, but {} here is {} bytes",
            hello.disk_size,
            disk.path.display(),
            ours.disk_size
        ));
    }
    if hello.disk_id != ours.disk_id {
        return Err(format!(
            "the sender fails back disk {}, but {} here is disk {} (a disk's id comes from \
             the path and size it was protected under)",
            hex(&hello.disk_id),
            disk.path.display(),
            hex(&ours.disk_id)
        ));
    }
    Ok(())
}

/// Seals and sends one digests frame per window of our disk; returns the
/// writing half, the sealer and the bytes sent.
async fn send_digests<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut sealer: Sealer,
    mut scan: mpsc::Receiver<Result<Window, FailbackError>>,
    disk_id: [u8; 16],
) -> Result<(W, Sealer, u64), FailbackError> {
    let mut wire_bytes = 0;
    while let Some(window) = scan.recv().await {
        let window = window?;
        let kind = FrameKind::Digests;
        let frame = sealer.seal(
            &meta(kind, disk_id, window.first, window.last()),
            &window.digests.concat(),
        );
        writer.write_all(&frame).await?;
        wire_bytes += frame.len() as u64;
    }
    Ok((writer, sealer, wire_bytes))
}

/// Receives the sender's answer to every window, in order, and writes the
/// chunks; returns the totals once the sender's done frame agrees with them.
async fn receive_chunks<R: AsyncRead + Unpin>(
    mut reader: R,
    mut opener: Opener,
    disk: &Disk,
    mut progress: impl FnMut(u64, u64),
) -> Result<Totals, FailbackError> {
    let mut totals = Totals::default();
    loop {
        let frame = read_frame(&mut reader).await?;
        let (got, body) = opener.open(&frame)?;
        if got.kind == FrameKind::Done {
            let theirs = Totals::decode(&body)?;
            if theirs != totals || totals.windows != disk.windows() {
                return Err(FailbackError::Protocol(format!(
                    "the sender's totals {theirs:?} do not match what arrived, {totals:?} of {} windows",
                    disk.windows()
                )));
            }
            return Ok(totals);
        }
        expect_kind(got.kind, FrameKind::Chunks)?;
        if totals.windows >= disk.windows() {
            return Err(FailbackError::Protocol(format!(
                "chunks for {}..={} arrived after the last window",
                got.first_seq, got.last_seq
            )));
        }
        let Span { first, last, .. } = Span::of_window(disk.size, totals.windows);
        if (got.first_seq, got.last_seq) != (first, last) {
            return Err(FailbackError::Protocol(format!(
                "chunks for {}..={} arrived where we expected {first}..={last}",
                got.first_seq, got.last_seq
            )));
        }
        let entries = wire::decode_chunks(&body, first, last, |i| disk.chunk_len(i))?;
        totals.differing += entries.len() as u64;
        totals.bytes += entries.iter().map(|(_, r)| r.len() as u64).sum::<u64>();
        if !entries.is_empty() {
            let (file, fail) = (disk.file.clone(), disk.error("write"));
            tokio::task::spawn_blocking(move || {
                entries
                    .iter()
                    .try_for_each(|(i, r)| file.write_all_at(&body[r.clone()], i * CHUNK_SIZE))
            })
            .await
            .map_err(|e| FailbackError::Task(e.to_string()))?
            .map_err(fail)?;
        }
        totals.windows += 1;
        totals.chunks += last - first + 1;
        progress(totals.chunks, disk.chunks());
    }
}
