//! `cdp`: continuous data protection for Linux block devices.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use filter::backing::{BackingOptions, EngineKind};
use filter::nbd::ExportConfig;
use filter::server::ListenAddr;
use filter::service::{self, FilterConfig};

/// mimalloc keeps freed memory for reuse instead of returning large blocks to
/// the kernel at once as glibc does; with payloads of up to 32 MiB per request
/// that saves a page fault per 4 KiB of every large request.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "cdp",
    version,
    about = "Continuous data protection for Linux block devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve a disk over NBD, capturing every change.
    Filter(FilterArgs),
    /// Apply a capture log to an image.
    Replay {
        /// The capture log written by `cdp filter --capture-log`.
        #[arg(long)]
        capture_log: PathBuf,
        /// The image to apply it to (created if missing).
        #[arg(long)]
        onto: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct FilterArgs {
    /// The backing disk: a regular file or a block device.
    #[arg(long)]
    disk: PathBuf,
    /// TCP address to listen on [default: 127.0.0.1:10809, unless --socket is given].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Unix socket to listen on.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Export name (clients may also use the empty, default name).
    #[arg(long, default_value = "cdp")]
    export: String,
    /// Refuse writes (EPERM).
    #[arg(long)]
    read_only: bool,
    /// Open the backing disk with O_DIRECT.
    #[arg(long)]
    direct: bool,
    /// Write the captured stream to this file (appending to an existing log
    /// of the same disk). Without it the stream is drained and dropped.
    #[arg(long)]
    capture_log: Option<PathBuf>,
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

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Engine {
    Uring,
    Sync,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Filter(args) => run_filter(args),
        Command::Replay { capture_log, onto } => {
            let summary = filter::capture::log::replay(&capture_log, &onto)?;
            println!(
                "applied {} records (seq {}..{}), {} bytes of data, onto {}",
                summary.records,
                summary.first_seq,
                summary.next_seq,
                summary.data_bytes,
                onto.display()
            );
            if let Some(offset) = summary.torn_tail {
                eprintln!(
                    "warning: the log ends in a torn record at offset {offset}; it was not applied"
                );
            }
            Ok(())
        }
    }
}

fn run_filter(args: FilterArgs) -> Result<()> {
    let mut listen = Vec::new();
    if let Some(addr) = args.listen {
        listen.push(ListenAddr::Tcp(addr));
    }
    if let Some(path) = args.socket {
        listen.push(ListenAddr::Unix(path));
    }
    if listen.is_empty() {
        listen.push(ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 10809))));
    }
    let config = FilterConfig {
        export: ExportConfig {
            description: format!("cdp protected disk {}", args.disk.display()),
            name: args.export,
            read_only: args.read_only,
        },
        disk: args.disk,
        listen,
        backing: BackingOptions {
            read_only: args.read_only,
            direct: args.direct,
            no_fast_path: args.no_fast_path,
            engine: match args.io_engine {
                Engine::Uring => EngineKind::Uring,
                Engine::Sync => EngineKind::Sync,
            },
        },
        capture_log: args.capture_log,
        ring_budget: args.ring_mib << 20,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        cancel_on_signal(shutdown.clone())?;
        let summary = service::run(config, shutdown, |addrs| {
            let mut out = std::io::stdout().lock();
            for addr in addrs {
                // Scripts and tests wait for this line.
                let _ = writeln!(out, "listening on {addr}");
            }
            let _ = out.flush();
        })
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

/// Installs SIGTERM and SIGINT handlers now (before clients are told we are
/// listening) and cancels `shutdown` when either arrives.
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
