//! `cdp points` and `cdp restore`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use pipeline::key::Key;
use target_writer::restore::{self, format_time, parse_time, PointSelector};
use target_writer::Journal;

#[derive(clap::Args, Debug)]
pub struct PointsArgs {
    /// The target's directory.
    #[arg(long)]
    dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The target's directory.
    #[arg(long)]
    dir: PathBuf,
    /// A point id from `cdp points`, a time (RFC 3339 such as
    /// 2026-11-23T04:13:00.123Z, or seconds since the epoch): the newest point
    /// at or before it, or tag:NAME: the newest point tagged NAME (`cdp
    /// point`). Numbers below 1000000000 are point ids.
    #[arg(long)]
    at: String,
    /// The image to create (sparse; must not exist).
    #[arg(long)]
    out: PathBuf,
    /// The key file the data was replicated with.
    #[arg(long)]
    key: PathBuf,
}

pub fn points(args: PointsArgs) -> Result<()> {
    let (journal, _) = Journal::open_read_only(&args.dir)
        .with_context(|| format!("reading {}", args.dir.display()))?;
    let points = restore::restore_points(&journal);
    // RPO achieved at a point: how old the newest unprotected write could be
    // just before the point became durable — from the previous cut to now.
    let rows: Vec<_> = points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let since = if i == 0 {
                p.point_time_ns
            } else {
                points[i - 1].point_time_ns
            };
            let rpo_ms = p.received_time_ns.saturating_sub(since) as f64 / 1e6;
            (p, rpo_ms)
        })
        .collect();
    if args.json {
        let json: Vec<_> = rows
            .iter()
            .map(|(p, rpo_ms)| {
                serde_json::json!({
                    "id": p.id,
                    "time": format_time(p.point_time_ns),
                    "time_ns": p.point_time_ns,
                    "first_seq": p.first_seq,
                    "last_seq": p.last_seq,
                    "bytes": p.body_len,
                    "ends_on_barrier": p.ends_on_barrier,
                    "rpo_ms": rpo_ms,
                    "tag": journal.tag(p.id),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    println!(
        "{:>6}  {:<24}  {:>21}  {:>10}  {:>9}  {:<7}  tag",
        "id", "time", "sequence", "bytes", "rpo ms", "barrier"
    );
    for (p, rpo_ms) in &rows {
        println!(
            "{:>6}  {:<24}  {:>21}  {:>10}  {:>9.1}  {:<7}  {}",
            p.id,
            format_time(p.point_time_ns),
            format!("{}..{}", p.first_seq, p.last_seq),
            p.body_len,
            rpo_ms,
            if p.ends_on_barrier { "yes" } else { "" },
            journal.tag(p.id).unwrap_or_default()
        );
    }
    let oldest = rows
        .first()
        .map_or("none".to_string(), |(p, _)| format_time(p.point_time_ns));
    println!(
        "{} restore points; oldest {oldest}; journal {} bytes",
        rows.len(),
        journal.bytes_on_disk()
    );
    Ok(())
}

pub fn restore(args: RestoreArgs) -> Result<()> {
    let key = Key::load(&args.key)?;
    let (journal, _) = Journal::open_read_only(&args.dir)
        .with_context(|| format!("reading {}", args.dir.display()))?;
    let selector = match (args.at.strip_prefix("tag:"), args.at.parse::<u64>()) {
        (Some(name), _) => PointSelector::Tag(name.to_string()),
        (None, Ok(id)) if id < 1_000_000_000 => PointSelector::Id(id),
        (None, _) => match parse_time(&args.at) {
            Some(ns) => PointSelector::AtOrBefore(ns),
            None => bail!(
                "--at {:?} is neither a point id nor a time (RFC 3339 or seconds since the \
                 epoch), nor tag:NAME",
                args.at
            ),
        },
    };
    let point = restore::select(&journal, selector)?;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    restore::restore(&journal, &key, &point, &args.out, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    let tag = journal
        .tag(point.id)
        .map(|tag| format!(", tag {tag:?}"))
        .unwrap_or_default();
    println!(
        "restored point {} ({}, seq {}..{}{tag}) to {}",
        point.id,
        format_time(point.point_time_ns),
        point.first_seq,
        point.last_seq,
        args.out.display()
    );
    Ok(())
}
