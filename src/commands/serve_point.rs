//! `cdp serve-point`: a restore point exported over NBD at once, read in
//! place through its layers (instant recovery); `--writable` keeps changes
//! in a scratch overlay thrown away on exit (test failover).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use filter::nbd::{Export, ExportConfig};
use filter::server::{self, Listener};
use pipeline::key::Key;
use target_writer::format::longterm::LONGTERM_DIR;
use target_writer::history::{Check, History};
use target_writer::journal::JOURNAL_DIR;
use target_writer::restore::format_time;
use target_writer::served::{check_key, ServeOptions, ServedPoint};

use super::filter::ListenArgs;
use super::points::parse_at;

#[derive(clap::Args, Debug)]
pub struct ServePointArgs {
    /// The target's directory.
    #[arg(long)]
    dir: PathBuf,
    /// A point id from `cdp points`, or a time (RFC 3339, or seconds since
    /// the epoch): the newest point at or before it.
    #[arg(long)]
    at: String,
    /// The key file the data was replicated with.
    #[arg(long)]
    key: PathBuf,
    #[command(flatten)]
    serve: ListenArgs,
    /// Accept writes into a scratch overlay that is thrown away on exit (the
    /// target's directory is never written).
    #[arg(long)]
    writable: bool,
    /// Where the point's journal layer and the overlay live, both unlinked
    /// [default: the system's temporary directory]. Not inside --dir.
    #[arg(long)]
    scratch: Option<PathBuf>,
}

pub fn serve_point(args: ServePointArgs) -> Result<()> {
    let started = Instant::now();
    let key = Key::load(&args.key)?;
    ensure_target_dir(&args.dir)?;
    let history = History::open(&args.dir, Check::WhenRead)
        .with_context(|| format!("reading {}", args.dir.display()))?;
    let history_ms = started.elapsed().as_secs_f64() * 1e3;
    let point = history.select(parse_at(&args.at)?)?;
    let key_checked =
        check_key(&history, &key).context("checking the key file against the journal")?;
    if !key_checked {
        tracing::warn!("the journal holds no entry to check the key file with");
    }
    let options = ServeOptions {
        writable: args.writable,
        scratch: args.scratch.unwrap_or_else(std::env::temp_dir),
    };
    let image_started = Instant::now();
    let device = ServedPoint::open(&history, &args.dir, &key, &point, &options)
        .with_context(|| format!("opening point {} of {}", point.id, args.dir.display()))?;
    let image = device.image();
    tracing::info!(
        point = point.id,
        time = %format_time(point.point_time_ns),
        tier = ?point.tier,
        dir = %args.dir.display(),
        layers = image.layers().len(),
        writable = args.writable,
        scratch = %options.scratch.display(),
        "serving restore point"
    );
    tracing::info!(
        total_ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
        history_ms = format!("{history_ms:.1}"),
        image_ms = format!("{:.1}", image_started.elapsed().as_secs_f64() * 1e3),
        journal_points = history.journal().map_or(0, |j| j.points().len()),
        journal_bytes = history.journal().map_or(0, |j| j.bytes_on_disk()),
        "point opened"
    );
    let export = Arc::new(Export {
        config: ExportConfig {
            name: args.serve.export.clone(),
            description: format!(
                "cdp restore point {} ({}) of {}",
                point.id,
                format_time(point.point_time_ns),
                args.dir.display()
            ),
            read_only: !args.writable,
        },
        device,
    });
    let listen = args.serve.addresses();
    super::run_until_signal(|shutdown| async move {
        let mut listeners = Vec::new();
        for addr in &listen {
            let listener = Listener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr:?}"))?;
            listeners.push(listener);
        }
        let addrs: Vec<String> = listeners.iter().map(Listener::describe).collect();
        super::announce(&addrs);
        server::serve(listeners, export.clone(), shutdown).await;
        tracing::info!(
            overlay_blocks = export.device.overlay_blocks(),
            "serve-point stopped; the overlay (if any) is discarded"
        );
        Ok(())
    })?;
    // Holding the history until here keeps retention off its files.
    drop(history);
    Ok(())
}

/// Refuses, in so many words, a directory `cdp target` did not make.
fn ensure_target_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    if !dir.join(JOURNAL_DIR).is_dir() && !dir.join(LONGTERM_DIR).is_dir() {
        bail!(
            "{} is not a target directory: it holds neither {JOURNAL_DIR}/ nor {LONGTERM_DIR}/",
            dir.display()
        );
    }
    Ok(())
}
