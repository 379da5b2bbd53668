//! `cdp protect`: the filter and the pipeline in one process. The filter
//! serves the disk; a cutter thread turns the capture ring into a batch every
//! RPO interval; the shipper carries batches to the target; a full sync
//! copies the whole disk through the capture stream first (every new source
//! process does one, and says so), after which batches are restore points.
//! With a control socket, `cdp point` can ask for tagged points.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use filter::backing::{Backing, BackingError};
use filter::device::{BlockDevice, DeviceError};
use filter::nbd::Export;
use filter::protected::ProtectedDisk;
use filter::service::{self, FilterConfig, FilterError};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::control::{ControlContext, ControlError, ControlServer};
use crate::cutter::Cutter;
use crate::key::Key;
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
    let (filter, receiver) = service::start(&config.filter, backing, 0).await?;

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
        target: config.target,
        key: config.key,
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

/// Copies the whole disk into the capture stream; returns whether it finished.
async fn full_sync(
    export: Arc<Export<ProtectedDisk>>,
    sync: Arc<SyncProgress>,
    shutdown: CancellationToken,
) -> Result<bool, DeviceError> {
    let disk = &export.device;
    let size = disk.size();
    tracing::info!(
        size,
        "full sync: copying the whole disk to the target (a new source always does)"
    );
    let bar = progress_bar(size);
    let started = Instant::now();
    let mut logged = Instant::now();
    let mut offset = 0;
    while offset < size {
        if shutdown.is_cancelled() {
            tracing::warn!(
                done = offset,
                size,
                "full sync interrupted by shutdown; the next start syncs again"
            );
            return Ok(false);
        }
        let len = SYNC_CHUNK.min(size - offset);
        disk.capture_contents(offset, len).await?;
        offset += len;
        bar.set_position(offset);
        if bar.is_hidden() && logged.elapsed() > Duration::from_secs(5) {
            tracing::info!(done = offset, size, "full sync progress");
            logged = Instant::now();
        }
    }
    sync.complete(disk.next_seq());
    bar.finish_and_clear();
    tracing::info!(
        size,
        seconds = started.elapsed().as_secs_f64(),
        "full sync complete: restore points from here on"
    );
    Ok(true)
}

/// A progress bar on a terminal; hidden otherwise (the log reports instead).
fn progress_bar(size: u64) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(size);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "full sync {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
