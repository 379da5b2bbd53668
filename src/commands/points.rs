//! `cdp points` and `cdp restore`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use pipeline::key::Key;
use target_writer::format::longterm::LONGTERM_DIR;
use target_writer::history::{Check, History, Tier};
use target_writer::restore::{format_time, parse_time, PointSelector};

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
    let history = History::open(&args.dir, Check::Everything)
        .with_context(|| format!("reading {}", args.dir.display()))?;
    let points = history.points();
    // RPO achieved at a point: how old the newest unprotected write could be
    // just before the point became durable — from the previous cut to then.
    let rows: Vec<_> = points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let since = points[i.saturating_sub(1)].point_time_ns;
            let rpo_ms = p.received_time_ns.saturating_sub(since) as f64 / 1e6;
            (p, rpo_ms)
        })
        .collect();
    let journal_bytes = history.journal().map_or(0, |j| j.bytes_on_disk());
    let long_term_bytes = long_term_bytes_on_disk(&args.dir);
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
                    "bytes": p.long_term_bytes.or(p.journal_bytes),
                    "tier": tier_name(p.tier),
                    "tag": p.tag,
                    "journal_bytes": p.journal_bytes,
                    "long_term_bytes": p.long_term_bytes,
                    "ends_on_barrier": p.ends_on_barrier,
                    "rpo_ms": rpo_ms,
                })
            })
            .collect();
        let summary = serde_json::json!({
            "points": json,
            "journal_bytes": journal_bytes,
            "long_term_bytes": long_term_bytes,
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!(
        "{:>6}  {:<24}  {:<9}  {:>21}  {:>12}  {:>9}  {:<7}  tag",
        "id", "time", "tier", "sequence", "bytes", "rpo ms", "barrier"
    );
    for (p, rpo_ms) in &rows {
        let first = p.first_seq.map(|s| s.to_string()).unwrap_or_default();
        println!(
            "{:>6}  {:<24}  {:<9}  {:>21}  {:>12}  {:>9.1}  {:<7}  {}",
            p.id,
            format_time(p.point_time_ns),
            tier_name(p.tier),
            format!("{first}..{}", p.last_seq),
            p.long_term_bytes.or(p.journal_bytes).unwrap_or(0),
            rpo_ms,
            if p.ends_on_barrier { "yes" } else { "" },
            p.tag.as_deref().unwrap_or("")
        );
    }
    let count = |tier: Tier| points.iter().filter(|p| p.tier == tier).count();
    let oldest = points
        .first()
        .map_or("none".to_string(), |p| format_time(p.point_time_ns));
    println!(
        "{} restore points ({} journal, {} long-term, {} both); oldest {oldest}; \
         journal {journal_bytes} bytes, long-term {long_term_bytes} bytes",
        points.len(),
        count(Tier::Journal),
        count(Tier::LongTerm),
        count(Tier::Both),
    );
    Ok(())
}

fn tier_name(tier: Tier) -> &'static str {
    match tier {
        Tier::Journal => "journal",
        Tier::LongTerm => "long-term",
        Tier::Both => "both",
    }
}

/// Bytes the long-term tier's files take on disk (allocated, so sparse
/// images count only what they hold).
fn long_term_bytes_on_disk(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir.join(LONGTERM_DIR)) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Parses `--at`: a point id (below 1000000000), or a time (RFC 3339, or
/// seconds since the epoch) meaning the newest point at or before it, or
/// `tag:NAME`, the newest point tagged NAME.
pub fn parse_at(at: &str) -> Result<PointSelector> {
    Ok(match (at.strip_prefix("tag:"), at.parse::<u64>()) {
        (Some(name), _) => PointSelector::Tag(name.to_string()),
        (None, Ok(id)) if id < 1_000_000_000 => PointSelector::Id(id),
        (None, _) => match parse_time(at) {
            Some(ns) => PointSelector::AtOrBefore(ns),
            None => bail!(
                "--at {at:?} is neither a point id nor a time (RFC 3339 or seconds since the \
                 epoch), nor tag:NAME"
            ),
        },
    })
}

pub fn restore(args: RestoreArgs) -> Result<()> {
    let key = Key::load(&args.key)?;
    let history = History::open(&args.dir, Check::WhenRead)
        .with_context(|| format!("reading {}", args.dir.display()))?;
    let point = history.select(parse_at(&args.at)?)?;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    history.restore(&key, &point, &args.out, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    let tag = point
        .tag
        .as_ref()
        .map(|tag| format!(", tag {tag:?}"))
        .unwrap_or_default();
    println!(
        "restored point {} ({}, {}, seq ..{}{tag}) to {}",
        point.id,
        format_time(point.point_time_ns),
        tier_name(point.tier),
        point.last_seq,
        args.out.display()
    );
    Ok(())
}
