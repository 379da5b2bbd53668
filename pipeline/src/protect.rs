//! `cdp protect`: the filter and the pipeline in one process. The filter
//! serves the disk; a cutter thread turns the capture ring into a batch every
//! RPO interval; the shipper carries batches to the target; a full sync
//! brings the target's copy up to the disk through the capture stream first
//! (every new source process does one, and says so): only the chunks that
//! differ from the target's copy if it holds one ([`crate::seed`]), the
//! whole disk otherwise. After it, batches are restore points.
//! With a control socket, `cdp point` can ask for tagged points.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use filter::backing::{Backing, BackingError};
use filter::capture::capture_ring;
use filter::device::{BlockDevice, DeviceError};
use filter::nbd::Export;
use filter::protected::ProtectedDisk;
use filter::service::{self, FilterConfig, FilterError};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::control::{ControlContext, ControlError, ControlServer};
use crate::cutter::Cutter;
use crate::key::Key;
use crate::seed::SeedError;
use crate::session::Hello;
use crate::shipper::{self, Acknowledged, ShipError, ShipStats, ShipperConfig, SyncProgress};

/// Bytes of disk the full sync copies per step.
const SYNC_CHUNK: u64 = 4 << 20;
/// Largest batch the cutter builds before cutting early.
const MAX_BATCH_BYTES: usize = 64 << 20;
/// Bytes of unacknowledged batches the shipper holds before clients wait.
const MAX_UNACKED: usize = 256 << 20;

/// Everything `cdp protect` is told.
#[derive(Debug)]
pub struct ProtectConfig {
    pub filter: FilterConfig,
    /// `HOST:PORT` of `cdp target`.
    pub target: String,
    pub key: Key,
    pub rpo: Duration,
    /// Bytes per second on the wire, if throttled.
    pub throttle: Option<u64>,
    /// Where to serve the control socket (`cdp point`), if anywhere.
    pub control: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Backing(#[from] BackingError),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("replication: {0}")]
    Ship(#[from] ShipError),
    #[error("full sync: {0}")]
    Sync(#[from] DeviceError),
    #[error("a pipeline task died: {0}")]
    Task(String),
}

/// What a protect run did.
#[derive(Debug, Clone, Copy)]
pub struct ProtectSummary {
    pub shipped: ShipStats,
    pub full_sync_complete: bool,
}

/// The disk's identity on the target: from its canonical path and size, so a
/// restarted source finds its journal again.
pub fn disk_id(path: &Path, size: u64) -> [u8; 16] {
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut input = b"cdp disk id v1\0".to_vec();
    input.extend_from_slice(canonical.as_os_str().as_encoded_bytes());
    input.extend_from_slice(&size.to_be_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    digest.as_ref()[..16].try_into().expect("16 bytes")
}

/// Runs until `shutdown` is cancelled (or replication fails for good, which
/// cancels it), then delivers what was captured and stops.
pub async fn run(
    config: ProtectConfig,
    shutdown: CancellationToken,
    ready: impl FnOnce(&[String]),
) -> Result<ProtectSummary, ProtectError> {
    let control = config
        .control
        .as_deref()
        .map(ControlServer::bind)
        .transpose()?;
    let backing = Backing::open(&config.filter.disk, config.filter.backing)?;
    let hello = Hello {
        disk_id: disk_id(&config.filter.disk, backing.size()),
        disk_size: backing.size(),
    };
    let (capture, receiver) = capture_ring(config.filter.ring_budget, 0);
    let filter = service::start(&config.filter, backing, capture).await?;

    let (batches_tx, batches_rx) = mpsc::channel(4);
    let rpo = config.rpo;
    let cutter = std::thread::Builder::new()
        .name("cdp-cutter".into())
        .spawn(move || {
            let mut cutter = Cutter::new(receiver, rpo, MAX_BATCH_BYTES);
            while let Some(batch) = cutter.next_batch() {
                // The point's time: when it was cut, to the millisecond
                // (`cdp points` shows milliseconds, and `restore --at` a
                // shown time must find that very point).
                if batches_tx
                    .blocking_send((batch, shipper::now_ms_as_ns()))
                    .is_err()
                {
                    break;
                }
            }
        })
        .map_err(|e| ProtectError::Task(format!("cannot start the cutter thread: {e}")))?;

    let sync = SyncProgress::new();
    let (acknowledged, acknowledged_rx) = watch::channel(Acknowledged::default());
    let shipper_config = ShipperConfig {
        target: config.target.clone(),
        key: config.key.clone(),
        hello,
        throttle: config.throttle,
        max_unacked: MAX_UNACKED,
        drain_timeout: Duration::from_secs(30),
        acknowledged,
    };
    let ship_shutdown = shutdown.clone();
    let shipper = tokio::spawn({
        let sync = sync.clone();
        async move {
            let result = shipper::run(shipper_config, batches_rx, sync).await;
            if let Err(e) = &result {
                tracing::error!("replication failed: {e}; stopping");
                ship_shutdown.cancel();
            }
            result
        }
    });
    let syncer = tokio::spawn(full_sync(
        filter.export.clone(),
        Seed {
            target: config.target.clone(),
            key: config.key.clone(),
            hello,
            acknowledged: acknowledged_rx.clone(),
        },
        sync.clone(),
        shutdown.clone(),
    ));

    let control = control.map(|server| {
        let context = ControlContext {
            disk: Arc::downgrade(&filter.export),
            sync: sync.clone(),
            acknowledged: acknowledged_rx,
        };
        tokio::spawn(server.serve(context, shutdown.clone()))
    });
    if let Some(path) = &config.control {
        tracing::info!(path = %path.display(), "control socket listening (mode 0600)");
    }

    ready(&filter.addresses());
    filter.serve(shutdown.clone()).await;
    let full_sync_complete = syncer
        .await
        .map_err(|e| ProtectError::Task(e.to_string()))??;
    // The export is gone now, so the capture stream closes; the cutter cuts
    // what is left and the shipper delivers it.
    let shipped = shipper.await.map_err(|e| ProtectError::Task(e.to_string()));
    // The shipper has ended, so requests waiting for the target get their
    // answer and the control server finishes.
    if let Some(control) = control {
        control
            .await
            .map_err(|e| ProtectError::Task(e.to_string()))?;
    }
    let shipped = shipped??;
    cutter
        .join()
        .map_err(|_| ProtectError::Task("the cutter thread panicked".into()))?;
    Ok(ProtectSummary {
        shipped,
        full_sync_complete,
    })
}

/// What the full sync needs to seed itself from the target's copy.
struct Seed {
    target: String,
    key: Key,
    hello: Hello,
    /// Where the shipper publishes the base the target gave it.
    acknowledged: watch::Receiver<Acknowledged>,
}

/// Brings the target's copy up to the disk through the capture stream;
/// returns whether it finished. Once the shipper knows the target's base:
/// if the target holds records of this disk, only the chunks that differ
/// from its copy are captured ([`crate::seed`]); otherwise, or if that
/// comparison fails, the whole disk is.
async fn full_sync(
    export: Arc<Export<ProtectedDisk>>,
    mut seed: Seed,
    sync: Arc<SyncProgress>,
    shutdown: CancellationToken,
) -> Result<bool, DeviceError> {
    let disk = &export.device;
    let base = tokio::select! {
        () = shutdown.cancelled() => None,
        base = seed.acknowledged.wait_for(|a| a.base.is_some()) => base.ok().and_then(|a| a.base),
    };
    let Some(base) = base else {
        tracing::warn!("full sync not started: the target was never reached; the next start syncs");
        return Ok(false);
    };
    let compared = if base > 0 {
        compare_with_target(disk, &seed, base, &sync, &shutdown).await?
    } else {
        None
    };
    match compared {
        Some(finished) => Ok(finished),
        None => copy_whole_disk(disk, &sync, &shutdown).await,
    }
}

/// Captures the chunks that differ from the target's copy as it stood before
/// `base`; whether it finished, or `None` if the comparison failed (the
/// caller then copies the whole disk).
async fn compare_with_target(
    disk: &ProtectedDisk,
    seed: &Seed,
    base: u64,
    sync: &SyncProgress,
    shutdown: &CancellationToken,
) -> Result<Option<bool>, DeviceError> {
    let size = disk.size();
    tracing::info!(
        size,
        before_seq = base,
        "full sync: comparing the disk with the target's copy, chunk by chunk \
         (a new source always syncs; only chunks that differ are copied)"
    );
    let (bar, started) = (progress_bar(size, "compare"), Instant::now());
    let mut logged = Instant::now();
    let compared = crate::seed::sync(
        &seed.target,
        &seed.key,
        seed.hello,
        base,
        disk,
        shutdown,
        |done| report(&bar, &mut logged, done, size),
    )
    .await;
    bar.finish_and_clear();
    match compared {
        Ok(Some(totals)) => {
            complete(disk, sync).await?;
            tracing::info!(
                size,
                chunks = totals.chunks,
                differing = totals.differing,
                bytes = totals.bytes,
                seconds = started.elapsed().as_secs_f64(),
                "full sync complete: restore points from here on"
            );
            Ok(Some(true))
        }
        Ok(None) => Ok(Some(interrupted())),
        Err(SeedError::Disk(e)) => Err(e),
        Err(e) => {
            tracing::warn!("full sync: cannot compare with the target's copy ({e})");
            Ok(None)
        }
    }
}

/// Captures the whole disk, [`SYNC_CHUNK`] at a time; whether it finished.
async fn copy_whole_disk(
    disk: &ProtectedDisk,
    sync: &SyncProgress,
    shutdown: &CancellationToken,
) -> Result<bool, DeviceError> {
    let size = disk.size();
    tracing::info!(size, "full sync: copying the whole disk to the target");
    let (bar, started) = (progress_bar(size, "copy"), Instant::now());
    let mut logged = Instant::now();
    let mut offset = 0;
    while offset < size {
        if shutdown.is_cancelled() {
            return Ok(interrupted());
        }
        let len = SYNC_CHUNK.min(size - offset);
        disk.capture_contents(offset, len).await?;
        offset += len;
        report(&bar, &mut logged, offset, size);
    }
    bar.finish_and_clear();
    complete(disk, sync).await?;
    tracing::info!(
        size,
        seconds = started.elapsed().as_secs_f64(),
        "full sync complete: restore points from here on"
    );
    Ok(true)
}

/// Marks the sync complete, then captures a flush barrier (fdatasync and a
/// `Flush` record, as an NBD FLUSH does). The cutter may have cut the batch
/// holding the sync's last record before it was marked complete, and that
/// batch then went out flagged `in_sync`; the barrier's batch comes after
/// it, so there is a first restore point even if no client writes again.
async fn complete(disk: &ProtectedDisk, sync: &SyncProgress) -> Result<(), DeviceError> {
    sync.complete(disk.next_seq());
    disk.flush().await
}

/// Logs a full sync cut short by shutdown; returns false (not finished).
fn interrupted() -> bool {
    tracing::warn!("full sync interrupted by shutdown; the next start syncs again");
    false
}

/// Moves the bar on a terminal; otherwise logs progress every 5 s.
fn report(bar: &indicatif::ProgressBar, logged: &mut Instant, done: u64, size: u64) {
    bar.set_position(done);
    if bar.is_hidden() && logged.elapsed() > Duration::from_secs(5) {
        tracing::info!(done, size, "full sync progress");
        *logged = Instant::now();
    }
}

/// A progress bar on a terminal; hidden otherwise (the log reports instead).
fn progress_bar(size: u64, verb: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(size);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "full sync ({verb}) {{bar:40}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
