//! One running filter: opens the backing disk and the capture log, starts the
//! capture sink, serves the export, and shuts down in order: stop accepting,
//! finish requests in flight, drain the ring, close the log.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::backing::{Backing, BackingError, BackingOptions};
use crate::capture::log::{LogError, LogWriter};
use crate::capture::sink::CaptureSink;
use crate::capture::{CaptureSender, Delivered};
use crate::nbd::{Export, ExportConfig};
use crate::protected::ProtectedDisk;
use crate::server::{self, ListenAddr, Listener};

/// Everything `cdp filter` is told.
#[derive(Debug, Clone)]
pub struct FilterConfig {
    pub disk: PathBuf,
    pub listen: Vec<ListenAddr>,
    pub export: ExportConfig,
    pub backing: BackingOptions,
    pub capture_log: Option<PathBuf>,
    /// Bytes of captured data the ring may hold before clients wait.
    pub ring_budget: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error(transparent)]
    Backing(#[from] BackingError),
    #[error("capture log: {0}")]
    CaptureLog(#[from] LogError),
    #[error("cannot listen on {addr:?}: {source}")]
    Listen {
        addr: ListenAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the capture sink stopped unexpectedly")]
    SinkPanicked,
}

/// What a finished filter did.
#[derive(Debug, Clone, Copy)]
pub struct FilterSummary {
    pub capture: Delivered,
}

/// A filter whose disk is open and whose sockets are bound, not yet serving.
#[derive(Debug)]
pub struct StartedFilter {
    pub export: Arc<Export<ProtectedDisk>>,
    pub listeners: Vec<Listener>,
}

impl StartedFilter {
    /// The listening addresses as clients would name them.
    pub fn addresses(&self) -> Vec<String> {
        self.listeners.iter().map(Listener::describe).collect()
    }

    /// Serves until `shutdown` is cancelled and every connection is done.
    /// The capture stream closes once the last holder of the export (this
    /// and every connection) is gone.
    pub async fn serve(self, shutdown: CancellationToken) {
        server::serve(self.listeners, self.export, shutdown).await;
    }
}

/// Binds the listeners for `backing`, whose changes go to `capture` (the
/// caller consumes the ring).
pub async fn start(
    config: &FilterConfig,
    backing: Backing,
    capture: CaptureSender,
) -> Result<StartedFilter, FilterError> {
    tracing::info!(
        disk = %config.disk.display(),
        size = backing.size(),
        engine = backing.engine_name(),
        direct = config.backing.direct,
        first_seq = capture.next_seq(),
        "backing disk open"
    );
    let mut listeners = Vec::new();
    for addr in &config.listen {
        let listener = Listener::bind(addr)
            .await
            .map_err(|source| FilterError::Listen {
                addr: addr.clone(),
                source,
            })?;
        listeners.push(listener);
    }
    let export = Arc::new(Export {
        config: config.export.clone(),
        device: ProtectedDisk::new(backing, capture),
    });
    Ok(StartedFilter { export, listeners })
}

/// Runs the filter on its own (`cdp filter`) until `shutdown` is cancelled
/// (or the capture sink fails, which cancels it). `ready` is called with the
/// listening addresses once clients can connect.
pub async fn run(
    config: FilterConfig,
    shutdown: CancellationToken,
    ready: impl FnOnce(&[String]),
) -> Result<FilterSummary, FilterError> {
    let backing = Backing::open(&config.disk, config.backing)?;
    let (sink, first_seq) = match &config.capture_log {
        Some(path) => {
            let (log, next_seq) = LogWriter::open(path, backing.size())?;
            (CaptureSink::Log(log), next_seq)
        }
        None => (CaptureSink::Discard, 0),
    };
    let (capture, sink) = sink.start(config.ring_budget, first_seq);
    let filter = start(&config, backing, capture).await?;
    let sink_shutdown = shutdown.clone();
    let sink = tokio::task::spawn_blocking(move || {
        let result = sink.finish();
        if let Err(e) = &result {
            tracing::error!(error = %e, "capture sink failed; shutting down");
            sink_shutdown.cancel();
        }
        result
    });
    ready(&filter.addresses());
    filter.serve(shutdown).await;
    // The last connection task drops the export and with it the capture
    // sender; the sink then drains what is left and closes the log.
    let capture = sink.await.map_err(|_| FilterError::SinkPanicked)??;
    Ok(FilterSummary { capture })
}
