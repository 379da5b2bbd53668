//! Shared harness for the integration tests: start and stop `cdp filter` as a
//! real process, run real clients, make files and loop devices, and clean up
//! everything on drop. Every helper panics with what it saw.
#![allow(dead_code)] // each test binary uses its own subset of the harness

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
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

/// A running `cdp filter`; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Filter {
    child: Option<Child>,
    /// Where the filter listens, as an NBD URI (`nbd://127.0.0.1:PORT/` or
    /// `nbd+unix:///?socket=PATH`).
    pub uri: String,
    /// TCP port, when listening on TCP.
    pub port: Option<u16>,
    log: PathBuf,
    _dir: TempDir,
}

impl Filter {
    /// Starts `cdp filter --disk DISK --listen 127.0.0.1:0 ARGS...`.
    pub fn tcp(disk: &Path, args: &[&str]) -> Filter {
        Self::start(disk, &["--listen", "127.0.0.1:0"], args)
    }

    /// Starts `cdp filter --disk DISK --socket <temp>/nbd.sock ARGS...`.
    pub fn unix(disk: &Path, args: &[&str]) -> Filter {
        Self::start(disk, &[], args)
    }

    fn start(disk: &Path, listen: &[&str], args: &[&str]) -> Filter {
        let dir = scratch();
        let log = dir.path().join("filter.log");
        let socket = dir.path().join("nbd.sock");
        let mut cmd = cdp();
        cmd.arg("filter").arg("--disk").arg(disk).args(listen);
        if listen.is_empty() {
            cmd.arg("--socket").arg(&socket);
        }
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("create filter log"));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut filter = Filter {
            child: Some(child),
            uri: String::new(),
            port: None,
            log,
            _dir: dir,
        };
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                panic!(
                    "{cmd:?} did not report listening within 20 s\nlog:\n{}",
                    filter.log()
                )
            });
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        if let Some(path) = addr.strip_prefix("unix:") {
            filter.uri = format!("nbd+unix:///?socket={path}");
        } else {
            let port: u16 = addr
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("port in listening line");
            filter.port = Some(port);
            filter.uri = format!("nbd://127.0.0.1:{port}/");
        }
        filter
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// What the filter has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits up to 30 s for a clean exit; returns the
    /// status and the full log. Panics (after SIGKILL) if it hangs.
    pub fn stop(mut self) -> (ExitStatus, String) {
        let status = self.terminate();
        (status, self.log())
    }

    /// Stops the filter and asserts it exited cleanly; returns its log.
    pub fn stop_ok(self) -> String {
        let (status, log) = self.stop();
        assert!(status.success(), "filter exited with {status}\nlog:\n{log}");
        log
    }

    fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("filter running");
        // SAFETY: kill(2) with a pid we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait for filter") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "filter did not exit within 30 s of SIGTERM\nlog:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A loop device over a file; detached when dropped.
pub struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    pub fn attach(file: &Path, direct_io: bool) -> LoopDevice {
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show"]);
        if direct_io {
            cmd.arg("--direct-io=on");
        }
        let path = run_stdout(cmd.arg(file)).trim().to_string();
        assert!(path.starts_with("/dev/loop"), "losetup printed {path:?}");
        LoopDevice {
            path: PathBuf::from(path),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
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

/// Asserts two files or devices hold the same bytes, naming the first difference.
pub fn assert_same_bytes(a: &Path, b: &Path) {
    let (x, y) = (read_all(a), read_all(b));
    assert_eq!(
        x.len(),
        y.len(),
        "{} is {} bytes, {} is {} bytes",
        a.display(),
        x.len(),
        b.display(),
        y.len()
    );
    if let Some(i) = first_difference(&x, &y) {
        panic!(
            "{} and {} differ first at byte {i} ({:#04x} vs {:#04x})",
            a.display(),
            b.display(),
            x[i],
            y[i]
        );
    }
}
