//! `cdp failover` and `cdp failback`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use tokio::net::{TcpListener, TcpStream};

use pipeline::failback::{self, Disk, Summary};
use pipeline::key::Key;
use target_writer::failover::{self, marker::Marker, marker::State};
use target_writer::history::{Check, History};
use target_writer::restore::{format_time, RestoreError};

use super::points::parse_at;

#[derive(clap::Args, Debug)]
pub struct FailoverArgs {
    /// The target's directory.
    #[arg(long)]
    dir: PathBuf,
    /// A point id or a time, as `cdp restore --at` takes it [default: the
    /// newest point].
    #[arg(long)]
    at: Option<String>,
    /// The key file the data was replicated with.
    #[arg(long)]
    key: PathBuf,
    /// The failover disk to create: a new file (its marker goes beside it,
    /// DISK.failover).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("role").required(true).args(["send", "receive"])))]
pub struct FailbackArgs {
    /// On the original side: wait for one sender, take the chunks that
    /// differ, fsync, and exit.
    #[arg(long, requires = "listen")]
    receive: bool,
    /// On the failover side: ship the chunks that differ to the receiver.
    #[arg(long, requires = "to")]
    send: bool,
    /// TCP address to listen on (with --receive).
    #[arg(long, conflicts_with = "send")]
    listen: Option<SocketAddr>,
    /// `HOST:PORT` of the receiver (with --send).
    #[arg(long, conflicts_with = "receive")]
    to: Option<String>,
    /// With --receive the original disk; with --send the failover disk
    /// (made by `cdp failover`, its marker beside it).
    #[arg(long)]
    disk: PathBuf,
    /// The key file (the same on both sides, as for replication).
    #[arg(long)]
    key: PathBuf,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn failover(args: FailoverArgs) -> Result<()> {
    let key = Key::load(&args.key)?;
    let history = History::open(&args.dir, Check::WhenRead)
        .with_context(|| format!("reading {}", args.dir.display()))?;
    let point = match &args.at {
        Some(at) => history.select(parse_at(at)?)?,
        None => history.points().pop().ok_or(RestoreError::NoPoints)?,
    };
    let bar = progress_bar();
    let marker = failover::failover(&history, &key, &point, &args.out, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    let out = args.out.display();
    println!(
        "failed over: {out} holds point {} ({}, seq ..{}) of a {}-byte disk; marker {}",
        marker.point_id,
        format_time(marker.point_time_ns),
        marker.point_last_seq,
        marker.disk_size,
        failover::marker_path(&args.out).display()
    );
    println!(
        "next: run production on {out}, protected toward the original side \
         (cdp protect --disk {out} --target HOST:PORT --key KEY); to fail back, stop the \
         workload, run `cdp failback --receive --listen HOST:PORT --disk ORIGINAL --key KEY` \
         on the original side, then `cdp failback --send --to HOST:PORT --disk {out} --key KEY` here"
    );
    Ok(())
}

pub fn failback(args: FailbackArgs) -> Result<()> {
    let key = Key::load(&args.key)?;
    match (args.listen, args.to.clone()) {
        (Some(listen), None) => receive(&args, key, listen),
        (None, Some(to)) => send(&args, key, to),
        _ => bail!("give --receive --listen HOST:PORT or --send --to HOST:PORT"),
    }
}

fn receive(args: &FailbackArgs, key: Key, listen: SocketAddr) -> Result<()> {
    let disk = Disk::open(&args.disk, true)?;
    super::run_until_signal(|shutdown| async move {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        super::announce(&[listener.local_addr()?.to_string()]);
        let (mut stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted.context("accepting the sender")?,
            () = shutdown.cancelled() => bail!("stopped before a sender connected"),
        };
        stream.set_nodelay(true)?;
        let started = Instant::now();
        let bar = progress_bar();
        let summary = tokio::select! {
            done = failback::receive(&mut stream, &key, &disk, |d, t| show(&bar, d, t)) => {
                done.with_context(|| format!("failback from {peer} into {}", disk.path.display()))?
            }
            () = shutdown.cancelled() => bail!(
                "stopped during the failback from {peer}: {} may be partly updated; run the failback again",
                disk.path.display()
            ),
        };
        bar.finish_and_clear();
        let t = summary.totals;
        report(args.json, "receive", &summary, started, || {
            format!(
                "received {} of {} chunks ({} bytes) from {peer} into {}; fsynced",
                t.differing,
                t.chunks,
                t.bytes,
                disk.path.display()
            )
        });
        Ok(())
    })
}

fn send(args: &FailbackArgs, key: Key, to: String) -> Result<()> {
    let marker_path = failover::marker_path(&args.disk);
    let marker = Marker::load(&marker_path).with_context(|| {
        format!(
            "{} needs its failover marker: was it made by cdp failover?",
            args.disk.display()
        )
    })?;
    let disk = Disk::open(&args.disk, false)?;
    if disk.size != marker.disk_size {
        bail!(
            "{} is {} bytes, but its marker says the original disk is {} bytes",
            disk.path.display(),
            disk.size,
            marker.disk_size
        );
    }
    if let State::FailedBack { at_ns, .. } = marker.state {
        eprintln!(
            "note: {} was failed back at {}; this pass ships what changed since",
            disk.path.display(),
            format_time(at_ns)
        );
    }
    super::run_until_signal(|shutdown| async move {
        let mut stream = TcpStream::connect(&to)
            .await
            .with_context(|| format!("connecting to the receiver at {to}"))?;
        stream.set_nodelay(true)?;
        let started = Instant::now();
        let bar = progress_bar();
        let id = marker.disk_id;
        let summary = tokio::select! {
            done = failback::send(&mut stream, &key, &disk, id, |d, t| show(&bar, d, t)) => {
                done.with_context(|| format!("failback of {} to {to}", disk.path.display()))?
            }
            () = shutdown.cancelled() => bail!("stopped during the failback; run it again"),
        };
        bar.finish_and_clear();
        let t = summary.totals;
        failover::record_failback(&disk.path, t.differing, t.bytes)?;
        report(args.json, "send", &summary, started, || {
            format!(
                "shipped {} of {} chunks ({} bytes; {} bytes on the wire) to {to}; {} marked failed back",
                t.differing,
                t.chunks,
                t.bytes,
                summary.wire_bytes,
                marker_path.display()
            )
        });
        Ok(())
    })
}

/// Prints a pass's summary: one line of text, or JSON.
fn report(
    json: bool,
    role: &str,
    summary: &Summary,
    started: Instant,
    text: impl FnOnce() -> String,
) {
    let seconds = started.elapsed().as_secs_f64();
    let t = summary.totals;
    if json {
        let value = serde_json::json!({
            "role": role,
            "chunks": t.chunks,
            "differing_chunks": t.differing,
            "differing_bytes": t.bytes,
            "wire_bytes": summary.wire_bytes,
            "seconds": seconds,
        });
        println!("{value}");
    } else {
        println!("{} in {seconds:.1} s", text());
    }
}

fn progress_bar() -> ProgressBar {
    if std::io::stderr().is_terminal() {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    }
}

fn show(bar: &ProgressBar, done: u64, total: u64) {
    bar.set_length(total);
    bar.set_position(done);
}
