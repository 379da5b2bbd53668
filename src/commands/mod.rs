//! The commands, and what they share: the tokio runtime, signal handling,
//! and the "listening on" lines scripts wait for.
pub mod failover;
pub mod filter;
pub mod point;
pub mod points;
pub mod replication;
pub mod serve_point;

use std::future::Future;
use std::io::Write;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

/// Runs `body` on a multi-threaded runtime with SIGTERM/SIGINT cancelling the
/// token it gets. Signal handlers are installed before `body` starts, so a
/// signal sent right after "listening on" is never lost.
pub fn run_until_signal<F, Fut>(body: F) -> Result<()>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        cancel_on_signal(shutdown.clone())?;
        body(shutdown).await
    })
}

fn cancel_on_signal(shutdown: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
    });
    Ok(())
}

/// Prints one `listening on ADDR` line per address; scripts and tests wait
/// for these.
pub fn announce(addrs: &[String]) {
    let mut out = std::io::stdout().lock();
    for addr in addrs {
        let _ = writeln!(out, "listening on {addr}");
    }
    let _ = out.flush();
}
