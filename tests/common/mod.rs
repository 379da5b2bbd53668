//! Shared harness for the integration tests: start and stop `cdp filter`,
//! `cdp target` and `cdp protect` as real processes, run real clients, make files and loop devices, and clean up
//! everything on drop. Every helper panics with what it saw.
#![allow(dead_code)] // each test binary uses its own subset of the harness

mod daemon;
mod devices;
mod probes;
pub mod replication;
mod restore;
pub mod tagged;

// Each test binary uses its own subset of these too.
#[allow(unused_imports)]
pub use {daemon::*, devices::*, probes::*, restore::*};

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The `cdp` binary under test.
pub fn cdp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cdp"))
}

/// Panics with an install hint unless every tool is on PATH.
pub fn require_tools(tools: &[&str]) {
    for tool in tools {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{tool} is not installed: run scripts/install-deps.sh (the README's test command does)"
        );
    }
}

/// Runs a command to completion and returns its output; panics with the
/// command line, status, stdout and stderr if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The lines a child prints on its piped stdout, as they come. A thread
/// reads to the end, so the child never blocks on a full pipe.
pub fn stdout_lines(child: &mut Child) -> Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    lines
}

/// Runs a command and returns its stdout as text (asserting success).
pub fn run_stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// A scratch directory for one test.
pub fn scratch() -> TempDir {
    tempfile::Builder::new()
        .prefix("cdp-test-")
        .tempdir()
        .expect("create temp dir")
}

/// A sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let file = std::fs::File::create(path).expect("create disk file");
    file.set_len(size).expect("size disk file");
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Calls `attempt` every 100 ms until it succeeds or `patience` has passed;
/// returns its last error.
pub fn retry<T>(
    patience: Duration,
    mut attempt: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + patience;
    loop {
        match attempt() {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Reads a whole file or device.
pub fn read_all(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut out))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    out
}

/// Where two byte strings first differ (a length difference counts at the
/// end of the shorter); `None` if they are equal.
pub fn first_difference(x: &[u8], y: &[u8]) -> Option<usize> {
    if x == y {
        return None; // memcmp: fast even in debug builds
    }
    Some(
        x.iter()
            .zip(y)
            .position(|(p, q)| p != q)
            .unwrap_or(x.len().min(y.len())),
    )
}

/// `cdp replay` of the capture log at `capture` onto a new image in `dir`
/// must give `disk` byte for byte.
pub fn assert_replays_to(capture: &Path, disk: &Path, dir: &Path) {
    let replayed = dir.join("replayed.img");
    run(&mut replay(capture, &replayed));
    assert_same_bytes(disk, &replayed);
}

/// `cdp replay --capture-log CAPTURE --onto IMAGE`.
pub fn replay(capture: &Path, image: &Path) -> Command {
    let mut cmd = cdp();
    cmd.arg("replay")
        .arg("--capture-log")
        .arg(capture)
        .arg("--onto")
        .arg(image);
    cmd
}

/// Asserts two files or devices hold the same bytes, naming the first difference.
pub fn assert_same_bytes(a: &Path, b: &Path) {
    if let Some(difference) = files_differ(a, b) {
        panic!("{difference}");
    }
}

/// Where two files or devices differ first (or their sizes), as a sentence;
/// `None` if they hold the same bytes. Streams both in 1 MiB chunks and
/// compares with memcmp, so it stays fast (and small) on images of hundreds
/// of MiB even in debug builds.
pub fn files_differ(a: &Path, b: &Path) -> Option<String> {
    let open = |p: &Path| {
        let mut file =
            std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
        // Seeking finds the size of block devices too (their metadata says 0).
        let len = file
            .seek(SeekFrom::End(0))
            .and_then(|len| file.rewind().map(|()| len))
            .unwrap_or_else(|e| panic!("seek {}: {e}", p.display()));
        (file, len)
    };
    let ((mut fa, la), (mut fb, lb)) = (open(a), open(b));
    if la != lb {
        return Some(format!(
            "{} is {la} bytes, {} is {lb} bytes",
            a.display(),
            b.display()
        ));
    }
    const CHUNK: usize = 1 << 20;
    let (mut x, mut y) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut at = 0u64;
    while at < la {
        let n = (la - at).min(CHUNK as u64) as usize;
        fa.read_exact(&mut x[..n])
            .unwrap_or_else(|e| panic!("read {} at {at}: {e}", a.display()));
        fb.read_exact(&mut y[..n])
            .unwrap_or_else(|e| panic!("read {} at {at}: {e}", b.display()));
        if let Some(i) = first_difference(&x[..n], &y[..n]) {
            return Some(format!(
                "{} and {} differ first at byte {} ({:#04x} vs {:#04x})",
                a.display(),
                b.display(),
                at + i as u64,
                x[i],
                y[i]
            ));
        }
        at += n as u64;
    }
    None
}
