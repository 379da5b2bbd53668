//! `cdp keygen`, `cdp target` and `cdp protect`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use pipeline::key::Key;
use pipeline::protect::{self, ProtectConfig};
use target_writer::roller::LongTermOptions;
use target_writer::server::{self, TargetConfig};
use target_writer::JournalOptions;

use super::filter::DiskArgs;

#[derive(clap::Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the key (must not exist).
    path: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct TargetArgs {
    /// TCP address to listen on for sources.
    #[arg(long)]
    listen: SocketAddr,
    /// Directory holding the journal (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// The key file shared with the source (`cdp keygen`).
    #[arg(long)]
    key: PathBuf,
    /// How often the journal is rolled into a long-term point (a delta image).
    #[arg(long, default_value = "1h", value_parser = parse_interval)]
    long_term_every: Duration,
    /// Journal segments rolled into a long-term point are removed once
    /// older than this; `forever` keeps them.
    #[arg(long, default_value = "4h", value_parser = parse_retention)]
    short_term_retention: Retention,
    /// Long-term points older than this merge into the base; `forever`
    /// keeps them.
    #[arg(long, default_value = "7d", value_parser = parse_retention)]
    long_term_retention: Retention,
    /// Keep at most this many long-term points (the base included).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    keep_long_term: Option<u64>,
    /// Size at which a journal segment file rolls over, e.g. 64MiB.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    segment_size: u64,
}

/// A retention period, or none (keep forever).
#[derive(Debug, Clone, Copy)]
struct Retention(Option<Duration>);

#[derive(clap::Args, Debug)]
pub struct ProtectArgs {
    #[command(flatten)]
    disk: DiskArgs,
    /// `HOST:PORT` of `cdp target`.
    #[arg(long)]
    target: String,
    /// The key file shared with the target.
    #[arg(long)]
    key: PathBuf,
    /// How often a batch is cut (at least 100ms).
    #[arg(long, default_value = "1s", value_parser = parse_rpo)]
    rpo: Duration,
    /// Limit on replication traffic, e.g. 50MiB/s.
    #[arg(long, value_parser = parse_rate)]
    throttle: Option<u64>,
    /// Serve a control socket here (mode 0600) for `cdp point`.
    #[arg(long)]
    control: Option<PathBuf>,
}

pub fn keygen(args: KeygenArgs) -> Result<()> {
    Key::generate(&args.path)?;
    println!(
        "wrote a new key to {} (mode 0600); copy it to the target and the source",
        args.path.display()
    );
    Ok(())
}

pub fn target(args: TargetArgs) -> Result<()> {
    let key = Key::load(&args.key)?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let config = TargetConfig {
        listen: args.listen,
        dir: args.dir,
        key,
        journal: JournalOptions {
            segment_size: args.segment_size,
            ..JournalOptions::default()
        },
        long_term: LongTermOptions {
            every: args.long_term_every,
            short_term: args.short_term_retention.0,
            long_term: args.long_term_retention.0,
            keep: args.keep_long_term.map(|n| n as usize),
        },
    };
    super::run_until_signal(|shutdown| async move {
        server::run(config, shutdown, |addr| {
            super::announce(&[addr.to_string()])
        })
        .await?;
        tracing::info!("target stopped");
        Ok(())
    })
}

pub fn protect(args: ProtectArgs) -> Result<()> {
    let key = Key::load(&args.key)?;
    let config = ProtectConfig {
        filter: args.disk.into_config(None),
        target: args.target,
        key,
        rpo: args.rpo,
        throttle: args.throttle,
        control: args.control,
    };
    super::run_until_signal(|shutdown| async move {
        let summary = protect::run(config, shutdown, super::announce).await?;
        tracing::info!(
            batches = summary.shipped.batches,
            bytes = summary.shipped.bytes,
            full_sync_complete = summary.full_sync_complete,
            "protect stopped; every captured batch is on the target"
        );
        Ok(())
    })
}

fn parse_interval(text: &str) -> Result<Duration> {
    let every = humantime::parse_duration(text)
        .with_context(|| format!("{text:?} is not a duration like 1h or 30m"))?;
    if every < Duration::from_secs(1) {
        bail!("long-term points more often than every second are not supported");
    }
    Ok(every)
}

fn parse_retention(text: &str) -> Result<Retention> {
    if text == "forever" {
        return Ok(Retention(None));
    }
    humantime::parse_duration(text)
        .map(|d| Retention(Some(d)))
        .with_context(|| format!("{text:?} is neither a duration like 4h or 7d nor `forever`"))
}

fn parse_size(text: &str) -> Result<u64> {
    let size = parse_bytes(text)?;
    if size < 1 << 12 {
        bail!("a segment size below 4KiB is not supported");
    }
    Ok(size)
}

fn parse_rpo(text: &str) -> Result<Duration> {
    let rpo = humantime::parse_duration(text)
        .with_context(|| format!("{text:?} is not a duration like 1s or 250ms"))?;
    if rpo < Duration::from_millis(100) {
        bail!("an RPO below 100ms is not supported");
    }
    Ok(rpo)
}

/// Parses `50MiB/s`, `10MB/s`, `1GiB` or a plain number of bytes per second.
fn parse_rate(text: &str) -> Result<u64> {
    let rate = parse_bytes(text.strip_suffix("/s").unwrap_or(text))?;
    if rate == 0 {
        bail!("a throttle of 0 would stop replication");
    }
    Ok(rate)
}

/// `50MiB`, `1.5GB`, `4096`: bytes.
fn parse_bytes(text: &str) -> Result<u64> {
    let amount = text.trim();
    let split = amount
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(amount.len());
    let (number, unit) = amount.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("{text:?} is not an amount like 50MiB"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => bail!("unknown unit {other:?} in {text:?} (use B, KB, KiB, MB, MiB, GB or GiB)"),
    };
    Ok((number * scale as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_rpos_parse() {
        assert_eq!(parse_rate("50MiB/s").unwrap(), 50 << 20);
        assert_eq!(parse_rate("10MB/s").unwrap(), 10_000_000);
        assert_eq!(parse_rate("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_rate("4096").unwrap(), 4096);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("5XB/s").is_err());
        assert_eq!(parse_rpo("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_rpo("10ms").is_err());
    }
}
