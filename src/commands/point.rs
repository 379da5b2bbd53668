//! `cdp point`: an application-consistent (tagged) restore point. Connects
//! to protect's control socket, runs the quiesce command, asks protect to
//! insert a tagged barrier, runs the thaw command as soon as protect answers
//! (always, once quiesce ran, whatever happened), then waits until the
//! target holds the point.
//!
//! Exit status: 0 the point is durable on the target; 1 no point was
//! inserted, or none confirmed (protect unreachable, refused, or gone); 2
//! usage (a bad tag
//! too); 3 the quiesce command failed (no point; thaw ran); 4 the thaw
//! command failed (the message says what became of the point); 5 the point
//! was inserted but the target did not confirm it within --timeout (it
//! stays queued in protect).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Result;
use filter::capture::Tag;
use pipeline::control::{ControlClient, ErrorCode, Reply, Request};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct PointArgs {
    /// The control socket of `cdp protect --control PATH`.
    #[arg(long)]
    control: PathBuf,
    /// The point's name: 1 to 255 bytes of UTF-8 without control characters.
    #[arg(long)]
    tag: Tag,
    /// Run (with sh -c) before the point, e.g. 'fsfreeze -f /mnt'.
    #[arg(long)]
    quiesce: Option<String>,
    /// Run (with sh -c) as soon as the point is in the stream, and after any
    /// failure once quiesce ran, e.g. 'fsfreeze -u /mnt'.
    #[arg(long)]
    thaw: Option<String>,
    /// How long to wait for protect to insert the point, and then for the
    /// target to make it durable.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Why `cdp point` failed, and its exit status.
#[derive(Debug)]
struct Failure {
    code: i32,
    message: String,
}

const NO_POINT: i32 = 1;
const QUIESCE_FAILED: i32 = 3;
const THAW_FAILED: i32 = 4;
const NOT_DURABLE: i32 = 5;

impl Failure {
    fn new(code: i32, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

pub fn point(args: PointArgs) -> Result<()> {
    let mut outcome = Err(Failure::new(NO_POINT, "not run"));
    super::run_until_signal(|shutdown| {
        let outcome = &mut outcome;
        async move {
            *outcome = tagged_point(&args, &shutdown).await;
            Ok(())
        }
    })?;
    match outcome {
        Ok(line) => {
            println!("{line}");
            Ok(())
        }
        Err(failure) => {
            eprintln!("cdp point: {}", failure.message);
            std::process::exit(failure.code)
        }
    }
}

async fn tagged_point(args: &PointArgs, shutdown: &CancellationToken) -> Result<String, Failure> {
    let mut client = ControlClient::connect(&args.control).await.map_err(|e| {
        Failure::new(
            NO_POINT,
            format!("cannot reach cdp protect: {e}; no point, and no command was run"),
        )
    })?;
    if let Some(quiesce) = &args.quiesce {
        if let Err(e) = run_hook("quiesce", quiesce).await {
            return Err(match thaw(args).await {
                Ok(()) => Failure::new(QUIESCE_FAILED, format!("{e}; no point inserted; thaw ran")),
                Err(thaw) => Failure::new(THAW_FAILED, format!("{e}; no point inserted; {thaw}")),
            });
        }
    }
    let inserted = insert(&mut client, args, shutdown).await;
    let thawed = thaw(args).await;
    let durable = match inserted {
        Ok(()) => durable(&mut client, args, shutdown).await,
        Err(e) => Err(Failure::new(NO_POINT, e)),
    };
    match (durable, thawed) {
        (durable, Ok(())) => durable,
        (Ok(line), Err(thaw)) => Err(Failure::new(THAW_FAILED, format!("{thaw}; {line}"))),
        (Err(failure), Err(thaw)) => Err(Failure::new(
            THAW_FAILED,
            format!("{thaw}; {}", failure.message),
        )),
    }
}

/// Asks protect for the point and waits until it is in the capture stream;
/// the error is the whole message.
async fn insert(
    client: &mut ControlClient,
    args: &PointArgs,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let unconfirmed = |why: String| format!("{why}; the point was not confirmed inserted");
    let request = Request::Tag {
        tag: args.tag.clone(),
        timeout: args.timeout,
    };
    client
        .send(&request)
        .await
        .map_err(|e| unconfirmed(e.to_string()))?;
    let reply = tokio::select! {
        reply = client.reply(args.timeout) => reply.map_err(|e| unconfirmed(e.to_string()))?,
        () = shutdown.cancelled() => {
            return Err(unconfirmed("interrupted before cdp protect answered".into()))
        }
    };
    match reply {
        Reply::Inserted { capture_seq, .. } => {
            tracing::info!(tag = %args.tag, capture_seq, "point inserted; thawing");
            Ok(())
        }
        Reply::Error(e) => Err(format!(
            "cdp protect refused the point: {e}; no point inserted"
        )),
        Reply::Durable { .. } => Err(unconfirmed("cdp protect answered out of order".into())),
    }
}

/// Waits for the target to make the point durable; returns the line to print.
async fn durable(
    client: &mut ControlClient,
    args: &PointArgs,
    shutdown: &CancellationToken,
) -> Result<String, Failure> {
    let not_durable = |why: String| {
        Failure::new(
            NOT_DURABLE,
            format!(
                "point {:?} was inserted but is not confirmed durable: {why}",
                args.tag.as_str()
            ),
        )
    };
    // Protect gives up after `timeout`; allow for its answer to arrive.
    let patience = args.timeout + Duration::from_secs(5);
    let reply = tokio::select! {
        reply = client.reply(patience) => reply.map_err(|e| not_durable(e.to_string()))?,
        () = shutdown.cancelled() => {
            return Err(not_durable("interrupted; it stays queued in cdp protect".into()))
        }
    };
    match reply {
        Reply::Durable { tag, seq } => Ok(format!(
            "point {:?} is durable on the target: seq {seq} (restore it with --at {:?})",
            tag.as_str(),
            format!("tag:{tag}")
        )),
        Reply::Error(e) if e.code == ErrorCode::Timeout => Err(not_durable(e.message)),
        Reply::Error(e) => Err(not_durable(e.to_string())),
        Reply::Inserted { .. } => Err(not_durable("cdp protect answered out of order".into())),
    }
}

/// Runs the thaw command, if there is one.
async fn thaw(args: &PointArgs) -> Result<(), String> {
    match &args.thaw {
        Some(command) => run_hook("thaw", command).await,
        None => Ok(()),
    }
}

/// Runs `sh -c COMMAND`; what it prints goes to our stderr.
async fn run_hook(what: &'static str, command: &str) -> Result<(), String> {
    let owned = command.to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("sh")
            .arg("-c")
            .arg(&owned)
            .stdin(Stdio::null())
            .output()
    })
    .await
    .map_err(|e| format!("the {what} command did not finish: {e}"))?
    .map_err(|e| format!("cannot run sh for the {what} command: {e}"))?;
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_all(&output.stdout);
    let _ = stderr.write_all(&output.stderr);
    if output.status.success() {
        tracing::info!(command, "{what} command done");
        return Ok(());
    }
    let said = String::from_utf8_lossy(&output.stderr);
    let said = said.trim();
    let said = if said.is_empty() {
        String::new()
    } else {
        format!(": {}", said.chars().take(1000).collect::<String>())
    };
    Err(format!(
        "the {what} command {command:?} failed ({}){said}",
        output.status
    ))
}
