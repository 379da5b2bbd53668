//! Failover and failback end to end, with real processes: `cdp protect`
//! replicates disk A to a target (site B); after the disaster `cdp failover`
//! makes disk B from the newest point; B runs production under `cdp protect`
//! toward a target on A's side (reverse protection) while qemu-io writes a
//! known set of chunks; then `cdp failback --receive` (on A) and
//! `cdp failback --send` (from B) make A equal to B again, shipping exactly
//! the chunks that differ, counted here; a second pass ships none.
mod common;
use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::Receiver;

use common::replication::*;
use common::*;

const CHUNK: u64 = 64 << 10;

#[test]
fn failover_then_failback_ships_only_the_changed_chunks() {
    require_tools(&["qemu-io"]);
    let dir = scratch();
    let a = dir.path().join("A.img");
    prefilled_disk(&a, 32 * MIB, 1);

    // Normal protection, A toward site B, under a seeded workload.
    let site_b = make_dir(dir.path(), "site-b");
    let mut forward = Replication::start(&site_b, &a, &["--rpo", RPO]);
    qemu_io(&forward.uri(), &seeded_workload(32 * MIB, 7));
    forward
        .protect()
        .wait_for_log("full sync complete", PATIENCE);
    // The disaster, once every write is in a point (stop_protect checks).
    forward.stop_protect();

    let b = site_b.join("B.img");
    let said = run_stdout(&mut failover(&forward.journal, &forward.key, &b));
    assert!(said.contains("failed over: "), "{said}");
    assert_same_bytes(&a, &b);
    // Writes A made after the newest point, which never reached the target:
    // failback must undo them too.
    let lost = [5, 300];
    for (i, &chunk) in lost.iter().enumerate() {
        let data = pseudo_random(4096 * (i + 1), 50 + i as u64);
        write_at(&a, chunk * CHUNK + 512, &data);
    }

    // Production on B, protected toward a target on A's side.
    let site_a = make_dir(dir.path(), "site-a");
    let mut reverse = Replication::start(&site_a, &b, &["--rpo", RPO]);
    let (commands, changed) = known_chunk_writes(32 * MIB, &lost);
    qemu_io(&reverse.uri(), &commands);
    reverse
        .protect()
        .wait_for_log("full sync complete", PATIENCE);
    reverse.stop_protect();
    check_newest_point(&reverse, &site_a, &b);

    // Failback: A receives, B sends; exactly the changed chunks travel.
    let want = changed.len() as u64 + lost.len() as u64;
    let (sent, received) = failback(&a, &b, &forward.key, &forward.key);
    let (sent, received) = (sent.expect("send"), received.expect("receive"));
    eprintln!("first pass: sent {sent}; received {received}");
    for summary in [&sent, &received] {
        assert_eq!(summary["differing_chunks"], want, "{summary}");
        assert_eq!(summary["chunks"], 32 * MIB / CHUNK, "{summary}");
    }
    assert!(
        sent["wire_bytes"].as_u64().unwrap() < want * CHUNK,
        "{sent}"
    );
    assert_same_bytes(&a, &b);

    // A second pass finds nothing to ship, and knows from B's marker that
    // the first one failed back.
    let receiver = FailbackReceiver::start(&a, &forward.key);
    let mut cmd = send(&b, &receiver.addr, &forward.key);
    let output = run(&mut cmd);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with("shipped 0 of 512 chunks (0 bytes;"),
        "{stdout}"
    );
    assert!(
        stdout.contains("B.img.failover marked failed back"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("B.img was failed back at "), "{stderr}");
    let received = receiver.finish().expect("receive");
    assert_eq!(received["differing_chunks"], 0, "{received}");
    assert_same_bytes(&a, &b);
}

#[test]
fn refusals_leave_both_disks_untouched() {
    require_tools(&["qemu-io"]);
    let dir = scratch();
    let a = dir.path().join("A.img");
    prefilled_disk(&a, 8 * MIB, 2);
    let mut forward = Replication::start(dir.path(), &a, &["--rpo", RPO]);
    forward
        .protect()
        .wait_for_log("full sync complete", PATIENCE);
    forward.stop_protect();
    let other_key = dir.path().join("other.key");
    run(cdp().arg("keygen").arg(&other_key));

    // Failover: with the wrong key nothing is left behind; an existing file
    // is never written over.
    let b = dir.path().join("B.img");
    let refused = fails(&mut failover(&forward.journal, &other_key, &b));
    assert!(refused.contains("wrong key file"), "{refused}");
    assert!(!b.exists() && !Path::new(&format!("{}.failover", b.display())).exists());
    let refused = fails(failover(&forward.journal, &forward.key, &b).args(["--at", "999"]));
    assert!(
        refused.contains("there is no restore point 999"),
        "{refused}"
    );
    assert!(!b.exists());
    let existing = dir.path().join("existing.img");
    std::fs::write(&existing, b"keep me").unwrap();
    let refused = fails(&mut failover(&forward.journal, &forward.key, &existing));
    assert!(refused.contains("exists"), "{refused}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
    run(&mut failover(&forward.journal, &forward.key, &b));
    write_at(&b, 3 * CHUNK, &[0x77; 4096]);
    let original = read_all(&a);

    // A wrong key: each side says the key files differ.
    let (sent, received) = failback(&a, &b, &forward.key, &other_key);
    let (sent, received) = (sent.unwrap_err(), received.unwrap_err());
    assert!(sent.contains("the key files differ"), "{sent}");
    assert!(received.contains("the key files differ"), "{received}");

    // Another disk on the original side: another size.
    let small = dir.path().join("small.img");
    sparse_file(&small, 4 * MIB);
    let (sent, received) = failback(&small, &b, &forward.key, &forward.key);
    let (sent, received) = (sent.unwrap_err(), received.unwrap_err());
    assert!(
        sent.contains("the sender's disk is 8388608 bytes"),
        "{sent}"
    );
    assert!(received.contains("turned the sender away"), "{received}");

    // Another disk on the original side: same size, another path.
    let copy = dir.path().join("copy.img");
    std::fs::copy(&a, &copy).unwrap();
    let (sent, _) = failback(&copy, &b, &forward.key, &forward.key);
    let sent = sent.unwrap_err();
    assert!(sent.contains("the sender fails back disk"), "{sent}");
    assert!(read_all(&copy) == original, "the copy was written to");

    // A disk cdp failover did not make has no marker to send from.
    let refused = fails(&mut send(&a, "127.0.0.1:9", &forward.key));
    assert!(refused.contains("needs its failover marker"), "{refused}");
    assert!(read_all(&a) == original, "the original disk was written to");
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

/// `cdp failover --dir JOURNAL --key KEY --out OUT`.
fn failover(journal: &Path, key: &Path, out: &Path) -> Command {
    let mut cmd = cdp();
    cmd.arg("failover")
        .arg("--dir")
        .arg(journal)
        .arg("--key")
        .arg(key)
        .arg("--out")
        .arg(out)
        .env("RUST_BACKTRACE", "0");
    cmd
}

/// `cdp failback --send --to TO --disk DISK --key KEY`.
fn send(disk: &Path, to: &str, key: &Path) -> Command {
    let mut cmd = cdp();
    cmd.args(["failback", "--send", "--to", to])
        .arg("--disk")
        .arg(disk)
        .arg("--key")
        .arg(key)
        .env("RUST_BACKTRACE", "0");
    cmd
}

/// Runs a command that must fail; returns its stderr.
fn fails(cmd: &mut Command) -> String {
    let output = cmd.output().expect("run cdp");
    assert!(
        !output.status.success(),
        "{cmd:?} succeeded:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

type Outcome = Result<serde_json::Value, String>;

/// One failback pass: `original` receives (with `receiver_key`), `failover`
/// sends (with `sender_key`). Each side's JSON summary, or its stderr.
fn failback(
    original: &Path,
    failover: &Path,
    receiver_key: &Path,
    sender_key: &Path,
) -> (Outcome, Outcome) {
    let receiver = FailbackReceiver::start(original, receiver_key);
    let sent = outcome(
        send(failover, &receiver.addr, sender_key)
            .arg("--json")
            .output()
            .expect("run cdp failback --send"),
    );
    (sent, receiver.finish())
}

fn outcome(output: Output) -> Outcome {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(stderr);
    }
    let line = stdout.lines().last().unwrap_or_default();
    Ok(serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("no JSON summary ({e}):\n{stdout}\n{stderr}")))
}

/// `cdp failback --receive --listen 127.0.0.1:0 --json` on a disk: started,
/// its address known; killed (by PID) if dropped while running.
struct FailbackReceiver {
    child: Option<Child>,
    addr: String,
    lines: Receiver<String>,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl FailbackReceiver {
    fn start(disk: &Path, key: &Path) -> FailbackReceiver {
        let dir = scratch();
        let stderr = dir.path().join("receive.log");
        let mut child = cdp()
            .args(["failback", "--receive", "--json", "--listen", "127.0.0.1:0"])
            .arg("--disk")
            .arg(disk)
            .arg("--key")
            .arg(key)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("create the receiver's log"))
            .spawn()
            .expect("start cdp failback --receive");
        let lines = stdout_lines(&mut child);
        let mut receiver = FailbackReceiver {
            child: Some(child),
            addr: String::new(),
            lines,
            stderr,
            _dir: dir,
        };
        let first = receiver
            .lines
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|e| panic!("the receiver said nothing ({e}):\n{}", receiver.log()));
        receiver.addr = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("the receiver printed {first:?}"))
            .to_string();
        receiver
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for it to exit: its JSON summary, or its stderr if it failed.
    fn finish(mut self) -> Outcome {
        let mut child = self.child.take().expect("running");
        let status = retry(PATIENCE, || match child.try_wait() {
            Ok(Some(status)) => Ok(status),
            _ => Err("the receiver is still running".to_string()),
        })
        .unwrap_or_else(|e| {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{e}\n{}", self.log())
        });
        if !status.success() {
            return Err(self.log());
        }
        let last = self.lines.recv_timeout(PATIENCE).expect("a summary line");
        Ok(serde_json::from_str(&last)
            .unwrap_or_else(|e| panic!("no JSON summary ({e}): {last}\n{}", self.log())))
    }
}

impl Drop for FailbackReceiver {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL to this child's PID only.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Disks and writes
// ---------------------------------------------------------------------------

/// A disk of 1 MiB regions in turn random data, a hole, written zeros.
fn prefilled_disk(path: &Path, size: u64, seed: u64) {
    sparse_file(path, size);
    for region in 0..size / MIB {
        match region % 3 {
            0 => write_at(
                path,
                region * MIB,
                &pseudo_random(MIB as usize, seed + region),
            ),
            1 => {}
            _ => write_at(path, region * MIB, &vec![0; MIB as usize]),
        }
    }
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.write_all_at(data, offset))
        .unwrap_or_else(|e| panic!("write {} at {offset}: {e}", path.display()));
}

/// Runs qemu-io commands against an NBD URI; every one must succeed.
fn qemu_io(uri: &str, commands: &[String]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for command in commands {
        cmd.arg("-c").arg(command);
    }
    let output = run(&mut cmd);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(!text.contains("failed"), "{cmd:?}:\n{text}");
}

/// A small xorshift stream, so the workloads reproduce.
fn numbers(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move |below| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % below
    }
}

/// Forty writes, zeroings and discards anywhere on the disk, then a flush.
fn seeded_workload(size: u64, seed: u64) -> Vec<String> {
    let mut next = numbers(seed);
    let mut commands: Vec<String> = (0..40)
        .map(|_| {
            let len = 1 + next(256 << 10);
            let offset = next(size - len);
            match next(4) {
                0 => format!("discard {offset} {len}"),
                1 => format!("write -z {offset} {len}"),
                _ => format!("write -P {} {offset} {len}", 1 + next(255)),
            }
        })
        .collect();
    commands.push("flush".to_string());
    commands
}

/// qemu-io writes that change a known set of chunks of a disk prefilled by
/// [`prefilled_disk`], none of them in `avoid`: a 4 KiB write inside a
/// chunk, a write across two chunks, a discard of random data, a write into
/// the last chunk, and sixteen seeded writes of at least 512 bytes of a
/// non-zero pattern each inside one chunk. Returns the commands and the
/// chunks they change.
fn known_chunk_writes(size: u64, avoid: &[u64]) -> (Vec<String>, BTreeSet<u64>) {
    let last = size / CHUNK - 1;
    let mut commands = vec![
        format!("write -P 0x51 {} 4096", 10 * CHUNK + 4096),
        format!("write -P 0x52 {} 8192", 21 * CHUNK - 4096),
        // Region 0 holds random data: a discard makes its chunk zeros.
        format!("discard {} {CHUNK}", CHUNK),
        format!("write -P 0x53 {} 100", last * CHUNK + 1000),
    ];
    let mut changed: BTreeSet<u64> = [10, 20, 21, 1, last].into();
    let mut next = numbers(11);
    while changed.len() < 21 {
        let chunk = next(last);
        if changed.contains(&chunk) || avoid.contains(&chunk) {
            continue;
        }
        let len = 512 + next(CHUNK - 512);
        let offset = chunk * CHUNK + next(CHUNK - len + 1);
        commands.push(format!("write -P {} {offset} {len}", 1 + next(255)));
        changed.insert(chunk);
    }
    commands.push("flush".to_string());
    (commands, changed)
}
