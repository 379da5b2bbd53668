//! `cdp keygen`, `cdp target` and `cdp protect`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use pipeline::key::Key;
use pipeline::protect::{self, ProtectConfig};
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
}

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
        journal: JournalOptions::default(),
        on_tagged_point: None,
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
    let amount = text.strip_suffix("/s").unwrap_or(text).trim();
    let split = amount
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(amount.len());
    let (number, unit) = amount.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a rate like 50MiB/s"))?;
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
    let rate = (number * scale as f64) as u64;
    if rate == 0 {
        bail!("a throttle of 0 would stop replication");
    }
    Ok(rate)
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
