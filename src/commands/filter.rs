//! `cdp filter` and `cdp replay`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::ValueEnum;

use filter::backing::{BackingOptions, EngineKind};
use filter::nbd::ExportConfig;
use filter::server::ListenAddr;
use filter::service::{self, FilterConfig};

/// How the protected disk is served; shared by `filter` and `protect`.
#[derive(clap::Args, Debug)]
pub struct DiskArgs {
    /// The backing disk: a regular file or a block device.
    #[arg(long)]
    disk: PathBuf,
    #[command(flatten)]
    serve: ListenArgs,
    /// Refuse writes (EPERM).
    #[arg(long)]
    read_only: bool,
    /// Open the backing disk with O_DIRECT.
    #[arg(long)]
    direct: bool,
    /// Backing I/O engine.
    #[arg(long, value_enum, default_value_t = Engine::Uring)]
    io_engine: Engine,
    /// Send every backing I/O to the engine, even page-cache hits (by default
    /// cached reads and whole-page writes of a buffered disk are done inline).
    #[arg(long)]
    no_fast_path: bool,
    /// MiB of captured data the rings hold before clients wait.
    #[arg(long, default_value_t = 256)]
    ring_mib: usize,
}

/// Where an NBD export listens and what it is called; shared by every
/// command that serves one (`filter`, `protect`, `serve-point`).
#[derive(clap::Args, Debug)]
pub struct ListenArgs {
    /// TCP address to listen on [default: 127.0.0.1:10809, unless --socket is given].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Unix socket to listen on.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Export name (clients may also use the empty, default name).
    #[arg(long, default_value = "cdp")]
    pub export: String,
}

impl ListenArgs {
    /// The addresses to listen on: those given, or 127.0.0.1:10809.
    pub fn addresses(&self) -> Vec<ListenAddr> {
        let mut listen: Vec<ListenAddr> = self.listen.into_iter().map(ListenAddr::Tcp).collect();
        listen.extend(self.socket.clone().map(ListenAddr::Unix));
        if listen.is_empty() {
            listen.push(ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 10809))));
        }
        listen
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Engine {
    Uring,
    Sync,
}

impl DiskArgs {
    pub fn into_config(self, capture_log: Option<PathBuf>) -> FilterConfig {
        let listen = self.serve.addresses();
        FilterConfig {
            export: ExportConfig {
                description: format!("cdp protected disk {}", self.disk.display()),
                name: self.serve.export,
                read_only: self.read_only,
            },
            disk: self.disk,
            listen,
            backing: BackingOptions {
                read_only: self.read_only,
                direct: self.direct,
                no_fast_path: self.no_fast_path,
                engine: match self.io_engine {
                    Engine::Uring => EngineKind::Uring,
                    Engine::Sync => EngineKind::Sync,
                },
            },
            capture_log,
            ring_budget: self.ring_mib << 20,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct FilterArgs {
    #[command(flatten)]
    disk: DiskArgs,
    /// Write the captured stream to this file (appending to an existing log
    /// of the same disk). Without it the stream is drained and dropped.
    #[arg(long)]
    capture_log: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// The capture log written by `cdp filter --capture-log`.
    #[arg(long)]
    capture_log: PathBuf,
    /// The image to apply it to (created if missing).
    #[arg(long)]
    onto: PathBuf,
}

pub fn filter(args: FilterArgs) -> Result<()> {
    let config = args.disk.into_config(args.capture_log);
    super::run_until_signal(|shutdown| async move {
        let summary = service::run(config, shutdown, super::announce)
            .await
            .context("filter failed")?;
        tracing::info!(
            records = summary.capture.records,
            data_bytes = summary.capture.data_bytes,
            next_seq = summary.capture.next_seq,
            "filter stopped; capture drained"
        );
        Ok(())
    })
}

pub fn replay(args: ReplayArgs) -> Result<()> {
    let summary = filter::capture::log::replay(&args.capture_log, &args.onto)?;
    println!(
        "applied {} records (seq {}..{}), {} bytes of data, onto {}",
        summary.records,
        summary.first_seq,
        summary.next_seq,
        summary.data_bytes,
        args.onto.display()
    );
    if let Some(offset) = summary.torn_tail {
        eprintln!("warning: the log ends in a torn record at offset {offset}; it was not applied");
    }
    Ok(())
}
