//! `cdp`: continuous data protection for Linux block devices. This file
//! parses the command line and dispatches; each command lives in
//! `commands/`.

mod commands;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::io::IsTerminal;

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
    /// Serve a disk over NBD, capturing every change (no replication).
    Filter(commands::filter::FilterArgs),
    /// Apply a capture log to an image.
    Replay(commands::filter::ReplayArgs),
    /// Write a new 256-bit key file (mode 0600).
    Keygen(commands::replication::KeygenArgs),
    /// Receive replicated batches into a journal of restore points.
    Target(commands::replication::TargetArgs),
    /// Serve a disk over NBD and replicate every change to a target.
    Protect(commands::replication::ProtectArgs),
    /// List the restore points a target holds.
    Points(commands::points::PointsArgs),
    /// Make an application-consistent (tagged) point through protect's control socket.
    Point(commands::point::PointArgs),
    /// Rebuild the disk image at a restore point.
    Restore(commands::points::RestoreArgs),
    /// Make a disk from a restore point to run production on (and protect
    /// back toward the original side).
    Failover(commands::failover::FailoverArgs),
    /// Make the original disk equal to the failover disk again, shipping
    /// only the chunks that differ.
    Failback(commands::failover::FailbackArgs),
    /// Serve a restore point over NBD at once, without rebuilding it.
    ServePoint(commands::serve_point::ServePointArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Filter(args) => commands::filter::filter(args),
        Command::Replay(args) => commands::filter::replay(args),
        Command::Keygen(args) => commands::replication::keygen(args),
        Command::Target(args) => commands::replication::target(args),
        Command::Protect(args) => commands::replication::protect(args),
        Command::Points(args) => commands::points::points(args),
        Command::Point(args) => commands::point::point(args),
        Command::Restore(args) => commands::points::restore(args),
        Command::Failover(args) => commands::failover::failover(args),
        Command::Failback(args) => commands::failover::failback(args),
        Command::ServePoint(args) => commands::serve_point::serve_point(args),
    }
}
