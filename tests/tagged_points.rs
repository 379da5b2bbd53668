//! Tagged (application-consistent) points end to end: `cdp target`,
//! `cdp protect --control`, qemu-io writing through protect, `cdp point`
//! with quiesce and thaw commands that leave marks, then `cdp points` and
//! `cdp restore --at tag:NAME`. Also: thaw runs whenever quiesce ran, the
//! exit statuses, and the control socket itself (mode 0600, bad requests,
//! stale and foreign files at its path).
mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::replication::*;
use common::tagged::*;
use common::*;

const SIZE: u64 = 64 * MIB;

/// `qemu-io -f raw URI -c CMD...`, asserting success.
fn qemu_io(uri: &str, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for command in commands {
        cmd.arg("-c").arg(command);
    }
    run(&mut cmd);
}

/// A disk with some random data, and protect (with a control socket at
/// DIR/control.sock) replicating it, its full sync done.
fn protected(dir: &Path) -> (Replication, std::path::PathBuf) {
    let disk = dir.join("disk.img");
    sparse_file(&disk, SIZE);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .and_then(|f| {
            use std::os::unix::fs::FileExt;
            f.write_all_at(&pseudo_random(3 * MIB as usize, 5), 7 * MIB + 11)
        })
        .expect("prefill the disk");
    let control = dir.join("control.sock");
    let control_arg = control.to_str().expect("UTF-8 path");
    let mut repl = Replication::start(dir, &disk, &["--rpo", RPO, "--control", control_arg]);
    repl.protect().wait_for_log("full sync complete", PATIENCE);
    (repl, control)
}

/// The tagged point restores exactly the disk as it was when `cdp point`
/// ran, though more was written after it; quiesce ran before the point and
/// thaw after; `cdp points` lists the tag on a barrier point ending at the
/// sequence number `cdp point` printed.
#[test]
fn a_tagged_point_restores_the_disk_as_it_was_at_the_point() {
    require_tools(&["qemu-io"]);
    let dir = scratch();
    let (mut repl, control) = protected(dir.path());
    let uri = repl.uri();
    qemu_io(
        &uri,
        &[
            "write -P 0x11 0 4M",
            "write -P 0x22 5242880 1M",
            "write -z 8M 1M",
            "write -P 0x23 9437285 77777",
        ],
    );
    let hooks = dir.path().join("hooks");
    let tag = "before upgrade ✓";
    let run = cdp_point(
        &control,
        tag,
        &[
            "--quiesce",
            &mark(&hooks, "quiesce", ""),
            "--thaw",
            &mark(&hooks, "thaw", ""),
        ],
    );
    let seq = run.durable_seq();
    assert_eq!(marks(&hooks), ["quiesce", "thaw"], "{run}");
    // Nothing has written since the point: this is the disk at the point.
    let at_point = dir.path().join("at-point.img");
    copy_sparse(&repl.disk, &at_point);
    qemu_io(
        &uri,
        &[
            "write -P 0x33 0 2M",
            "write -P 0x44 62914560 1M",
            "discard 5242880 1M",
            "flush",
        ],
    );
    let second = cdp_point(&control, "after", &[]).durable_seq();
    assert!(
        second > seq,
        "the second point ({second}) is not after the first ({seq})"
    );
    repl.stop_protect();

    let points = points(&repl.journal);
    let point = tagged(&points, tag);
    assert_eq!(point.last_seq, seq, "points:\n{}", table(&points));
    assert!(point.ends_on_barrier, "points:\n{}", table(&points));
    assert_eq!(
        points.iter().filter(|p| p.tag.is_some()).count(),
        2,
        "points:\n{}",
        table(&points)
    );
    let listing = run_stdout(cdp().arg("points").arg("--dir").arg(&repl.journal));
    assert!(
        listing
            .lines()
            .any(|l| l.ends_with(tag) && l.contains(&format!("..{seq}"))),
        "cdp points shows no tag column:\n{listing}"
    );
    // A tagged point is kept as a long-term point at once, whatever the
    // schedule (the target rolls every hour here).
    let kept = retry(Duration::from_secs(10), || {
        let text = run_stdout(cdp().args(["points", "--json", "--dir"]).arg(&repl.journal));
        let json: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let row = json["points"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["tag"] == tag))
            .cloned()
            .ok_or(format!("no point tagged {tag}:\n{text}"))?;
        match row["tier"].as_str() {
            Some("both" | "long-term") => Ok(row),
            _ => Err(format!("the tagged point is not long-term:\n{text}")),
        }
    })
    .unwrap_or_else(|e| repl.fail(&e));
    assert_eq!(kept["id"], point.id, "{kept}");
    let restored = dir.path().join("restored.img");
    let id = restore(&repl.journal, &format!("tag:{tag}"), &restored, &repl.key);
    assert_eq!(id, point.id);
    if let Some(difference) = files_differ(&restored, &at_point) {
        repl.fail(&format!(
            "the tagged point is not the disk as it was when it was taken: {difference}\npoints:\n{}",
            table(&points)
        ));
    }
    let err = try_restore(
        &repl.journal,
        "tag:no such tag",
        &dir.path().join("x.img"),
        &repl.key,
    )
    .expect_err("a restore of an unknown tag succeeded");
    assert!(err.contains("no restore point is tagged"), "{err}");
    check_newest_point(&repl, dir.path(), &repl.disk);
}

/// Thaw runs whenever quiesce ran, and each failure has its exit status:
/// no socket (nothing runs, 1), a failing quiesce (no point, thaw runs, 3),
/// a failing thaw (the point is still made, 4), the target down (the point
/// is inserted and thawed at once but not confirmed, 5, and lands once the
/// target is back), protect dying during the request (no point, thaw runs,
/// 1). A restarted protect replaces its stale socket and takes points again.
#[test]
fn thaw_runs_whenever_quiesce_ran_and_failures_are_told_apart() {
    let dir = scratch();
    let (mut repl, control) = protected(dir.path());
    let hooks = |name: &str| dir.path().join(format!("hooks-{name}"));
    let with_hooks = |marks: &Path, quiesce_then: &str, thaw_then: &str| {
        [
            "--quiesce".to_string(),
            mark(marks, "quiesce", quiesce_then),
            "--thaw".to_string(),
            mark(marks, "thaw", thaw_then),
        ]
    };

    let missing = hooks("missing");
    let run = cdp_point(
        &dir.path().join("no-such.sock"),
        "missing",
        &strs(&with_hooks(&missing, "", "")),
    );
    run.assert_failed(1, "no such control socket");
    assert_eq!(marks(&missing), Vec::<String>::new(), "{run}");

    let quiesce = hooks("quiesce");
    let failing = with_hooks(&quiesce, "; echo cannot freeze >&2; exit 7", "");
    let run = cdp_point(&control, "quiesce fails", &strs(&failing));
    run.assert_failed(3, "cannot freeze");
    assert!(run.stderr.contains("exit status: 7"), "{run}");
    assert_eq!(marks(&quiesce), ["quiesce", "thaw"], "{run}");

    let thaw = hooks("thaw");
    let failing = with_hooks(&thaw, "", "; exit 9");
    let run = cdp_point(&control, "thaw fails", &strs(&failing));
    run.assert_failed(4, "is durable on the target");
    assert_eq!(marks(&thaw), ["quiesce", "thaw"], "{run}");

    let late = hooks("late");
    let target_log = repl.target.kill();
    repl.crashed_target_logs.push_str(&target_log);
    let started = Instant::now();
    let mut timeout = with_hooks(&late, "", "").to_vec();
    timeout.extend(["--timeout".to_string(), "2s".to_string()]);
    let run = cdp_point(&control, "late", &strs(&timeout));
    run.assert_failed(5, "stays queued");
    assert_eq!(marks(&late), ["quiesce", "thaw"], "{run}");
    assert!(started.elapsed() < Duration::from_secs(20), "{run}");
    let addr = repl.target.addr.clone();
    repl.target = start_target(&repl.journal, &repl.key, &addr, &repl.target_args);
    // Protect reconnects and delivers the point it kept.
    let landed = retry(PATIENCE, || {
        let points = points(&repl.journal);
        match points.iter().any(|p| p.tag.as_deref() == Some("late")) {
            true => Ok(()),
            false => Err(table(&points)),
        }
    });
    if let Err(points) = landed {
        repl.fail(&format!(
            "the late point never reached the target:\n{points}"
        ));
    }

    let dying = hooks("dying");
    let pid = repl.protect().pid();
    let kill = with_hooks(&dying, &format!("; kill -9 {pid}; sleep 0.5"), "");
    let run = cdp_point(&control, "never", &strs(&kill));
    run.assert_failed(1, "closed the connection");
    assert_eq!(marks(&dying), ["quiesce", "thaw"], "{run}");
    let mut dead = repl.protect.take().expect("protect was running");
    repl.protect_log = dead.kill();
    assert!(
        control.exists(),
        "a killed protect cannot remove its socket"
    );

    repl.start_protect();
    repl.protect().wait_for_log("full sync complete", PATIENCE);
    cdp_point(&control, "after restart", &[]).durable_seq();
    repl.stop_protect();
    assert!(!control.exists(), "protect left its control socket behind");

    let points = points(&repl.journal);
    let tags: Vec<&str> = points.iter().filter_map(|p| p.tag.as_deref()).collect();
    assert_eq!(
        tags,
        ["thaw fails", "late", "after restart"],
        "points:\n{}",
        table(&points)
    );
}

/// The control socket is mode 0600 and ours (another user is denied); bad
/// requests get an error line and the connection goes on; an over-long line
/// gets an error and the connection ends; the socket keeps serving. A second
/// protect does not take a live socket over, and nothing but a socket is
/// ever replaced.
#[test]
fn the_control_socket_is_private_and_survives_bad_requests() {
    require_tools(&["setpriv"]);
    let dir = scratch();
    let (mut repl, control) = protected(dir.path());
    let meta = std::fs::metadata(&control).expect("stat the control socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // SAFETY: geteuid has no preconditions.
    assert_eq!(meta.uid(), unsafe { libc::geteuid() });
    // Another user may reach the directory but not connect: the mode says no.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
        .expect("open the test directory for traversal");
    let output = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_cdp"))
        .args(["point", "--tag", "intruder", "--control"])
        .arg(&control)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run cdp point as nobody");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.code() == Some(1) && stderr.contains("permission denied"),
        "cdp point as nobody: {}\n{stderr}",
        output.status
    );

    let mut raw = Raw::connect(&control);
    for (request, error) in [
        ("garbage", "bad_request"),
        (r#"{"v":1,"op":"drop everything"}"#, "bad_request"),
        (r#"{"v":2,"op":"tag","tag":"x"}"#, "version"),
        (r#"{"v":1,"op":"tag","tag":"bell\u0007"}"#, "bad_tag"),
        (r#"{"v":1,"op":"tag"}"#, "bad_request"),
    ] {
        let reply = raw.ask(request);
        assert_eq!(reply["ok"], false, "{request}: {reply}");
        assert_eq!(reply["error"], error, "{request}: {reply}");
        assert!(reply["message"].is_string(), "{request}: {reply}");
    }
    // The same connection still takes a good request.
    let inserted = raw.ask(r#"{"v":1,"op":"tag","tag":"raw","timeout_ms":60000}"#);
    assert_eq!(inserted["event"], "inserted", "{inserted}");
    assert_eq!(inserted["tag"], "raw", "{inserted}");
    let durable = raw.reply();
    assert_eq!(durable["event"], "durable", "{durable}");
    // An over-long line ends the connection, after an error.
    let long = raw.ask(&"x".repeat(5000));
    assert_eq!(long["error"], "bad_request", "{long}");
    assert!(
        raw.ended(),
        "the connection went on after an over-long line"
    );
    cdp_point(&control, "still serving", &[]).durable_seq();

    // Another protect refuses the live socket, and a file that is no socket.
    let other_disk = dir.path().join("other.img");
    sparse_file(&other_disk, MIB);
    let not_a_socket = dir.path().join("not-a-socket");
    std::fs::write(&not_a_socket, b"keep me").expect("write a file");
    for (path, said) in [
        (&control, "another process listens on it"),
        (&not_a_socket, "something other than a socket is there"),
    ] {
        let output = cdp()
            .arg("protect")
            .arg("--disk")
            .arg(&other_disk)
            .args(["--listen", "127.0.0.1:0", "--target", "127.0.0.1:9"])
            .arg("--key")
            .arg(&repl.key)
            .arg("--control")
            .arg(path)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run cdp protect");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(said),
            "a second protect with --control {}: {}\n{stderr}",
            path.display(),
            output.status
        );
    }
    assert_eq!(std::fs::read(&not_a_socket).expect("read"), b"keep me");
    cdp_point(&control, "served throughout", &[]).durable_seq();
    repl.stop_protect();
    let points = points(&repl.journal);
    let tags: Vec<&str> = points.iter().filter_map(|p| p.tag.as_deref()).collect();
    assert_eq!(tags, ["raw", "still serving", "served throughout"]);
}

/// A connection to the control socket speaking raw lines.
struct Raw {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).expect("connect to the control socket");
        stream
            .set_read_timeout(Some(PATIENCE))
            .expect("set a read timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone the stream"));
        Raw { stream, reader }
    }

    /// Sends `request` as a line and reads the reply.
    fn ask(&mut self, request: &str) -> Value {
        self.stream
            .write_all(format!("{request}\n").as_bytes())
            .expect("send a request");
        self.reply()
    }

    fn reply(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read a reply");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}"))
    }

    /// Whether the server has closed the connection.
    fn ended(&mut self) -> bool {
        let mut rest = String::new();
        matches!(self.reader.read_line(&mut rest), Ok(0) | Err(_))
    }
}

/// The strings of `args` as `&str`s.
fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}
