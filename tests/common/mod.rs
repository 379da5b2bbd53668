//! Shared harness for the integration tests: start and stop `cdp filter`,
//! `cdp target` and `cdp protect` as real processes, run real clients, make files and loop devices, and clean up
//! everything on drop. Every helper panics with what it saw.
#![allow(dead_code)] // each test binary uses its own subset of the harness

pub mod replication;
pub mod tagged;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
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

/// A running `cdp` subcommand that serves until told to stop (`filter`,
/// `target`, `protect`): started with its stderr logged to a file, ready once
/// it printed its first `listening on ADDR` line, stopped with SIGTERM by
/// [`Daemon::stop`] / [`Daemon::stop_ok`], and killed (SIGKILL, by its PID)
/// if dropped while still running.
pub struct Daemon {
    child: Option<Child>,
    /// `cdp SUBCOMMAND`, for messages.
    name: String,
    /// The address of its first `listening on` line (`127.0.0.1:PORT` or
    /// `unix:PATH`).
    pub addr: String,
    log: PathBuf,
    _log_dir: TempDir,
}

impl Daemon {
    /// Runs `cdp ARGS...` (the first argument is the subcommand) with
    /// `RUST_LOG=info` and waits up to 30 s for `listening on`.
    pub fn start<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Daemon {
        let mut cmd = cdp();
        cmd.args(args);
        Self::spawn(cmd)
    }

    /// Runs a prepared `cdp` command as a daemon (see [`Daemon::start`]).
    pub fn spawn(mut cmd: Command) -> Daemon {
        let subcommand = cmd
            .get_args()
            .next()
            .map(|a| a.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = format!("cdp {subcommand}");
        let log_dir = scratch();
        let log = log_dir.path().join(format!("{}.log", subcommand));
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("create daemon log"));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads stdout to its end, so the daemon never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut daemon = Daemon {
            child: Some(child),
            name,
            addr: String::new(),
            log,
            _log_dir: log_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        daemon.addr = addr.to_string();
                        return daemon;
                    }
                }
                Err(e) => {
                    // Stdout closed: it is exiting; give it a moment to be reaped.
                    let child = daemon.child.as_mut().expect("running");
                    let status = retry(Duration::from_secs(2), || match child.try_wait() {
                        Ok(Some(status)) => Ok(status),
                        _ => Err(String::new()),
                    });
                    let why = match (e, status) {
                        (_, Ok(status)) => format!("exited with {status}"),
                        (std::sync::mpsc::RecvTimeoutError::Timeout, _) => {
                            "did not report listening within 30 s".to_string()
                        }
                        (std::sync::mpsc::RecvTimeoutError::Disconnected, _) => {
                            "closed its stdout without reporting listening".to_string()
                        }
                    };
                    panic!("{cmd:?} {why}\nlog:\n{}", daemon.log());
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `cdp SUBCOMMAND`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TCP port of its first address (panics for a Unix socket).
    pub fn port(&self) -> u16 {
        self.addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{} listens on {:?}, not a TCP port", self.name, self.addr))
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `patience` for a log line containing `needle`; returns
    /// that line. Panics with the log if it does not come or the daemon
    /// exits first.
    pub fn wait_for_log(&mut self, needle: &str, patience: Duration) -> String {
        let deadline = Instant::now() + patience;
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            // Read after try_wait, so a line logged just before exiting counts.
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            if let Some(status) = exited {
                panic!(
                    "{} exited with {status} before logging {needle:?}\nlog:\n{}",
                    self.name,
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not log {needle:?} within {patience:?}\nlog:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits up to 60 s for it to exit; returns the
    /// status and the full log. Panics (after SIGKILL) if it hangs.
    pub fn stop(mut self) -> (ExitStatus, String) {
        let status = self.terminate();
        (status, self.log())
    }

    /// Stops it and asserts it exited cleanly; returns its log.
    pub fn stop_ok(self) -> String {
        let name = self.name.clone();
        let (status, log) = self.stop();
        assert!(status.success(), "{name} exited with {status}\nlog:\n{log}");
        log
    }

    /// Kills it with SIGKILL (a crash) and reaps it; returns its log. What
    /// is left keeps only the log.
    pub fn kill(&mut self) -> String {
        let mut child = self.child.take().expect("daemon running");
        // Child::kill sends SIGKILL to this child's PID.
        child.kill().expect("SIGKILL the daemon");
        child.wait().expect("reap the daemon");
        self.log()
    }

    fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: kill(2) with a pid we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait for daemon") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit within 60 s of SIGTERM\nlog:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL to this child's PID only.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running `cdp filter`; killed if dropped while running.
pub struct Filter {
    daemon: Daemon,
    /// Where the filter listens, as an NBD URI (`nbd://127.0.0.1:PORT/` or
    /// `nbd+unix:///?socket=PATH`).
    pub uri: String,
    /// TCP port, when listening on TCP.
    pub port: Option<u16>,
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
        let socket = dir.path().join("nbd.sock");
        let mut cmd = cdp();
        cmd.arg("filter").arg("--disk").arg(disk).args(listen);
        if listen.is_empty() {
            cmd.arg("--socket").arg(&socket);
        }
        cmd.args(args);
        let daemon = Daemon::spawn(cmd);
        let (uri, port) = nbd_uri(&daemon.addr);
        Filter {
            daemon,
            uri,
            port,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// What the filter has logged so far.
    pub fn log(&self) -> String {
        self.daemon.log()
    }

    /// Sends SIGTERM and waits for a clean exit; returns the status and the
    /// full log. Panics (after SIGKILL) if it hangs.
    pub fn stop(self) -> (ExitStatus, String) {
        self.daemon.stop()
    }

    /// Stops the filter and asserts it exited cleanly; returns its log.
    pub fn stop_ok(self) -> String {
        self.daemon.stop_ok()
    }
}

/// The NBD URI (and TCP port, if any) for a `listening on` address.
pub fn nbd_uri(addr: &str) -> (String, Option<u16>) {
    if let Some(path) = addr.strip_prefix("unix:") {
        return (format!("nbd+unix:///?socket={path}"), None);
    }
    let port: u16 = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in listening address {addr:?}"));
    (format!("nbd://127.0.0.1:{port}/"), Some(port))
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
        let _ = self.release();
    }
}

impl LoopDevice {
    /// Detaches the device and waits until the kernel has let go of the
    /// backing file; panics if it does not.
    pub fn detach(mut self) {
        if let Err(e) = self.release() {
            panic!("{e}");
        }
    }

    /// `losetup -d` (retried while it fails), then waits up to 10 s for the
    /// binding to go: the kernel clears it only on the last close, so a
    /// short-lived opener (udev, blkid) can delay it. Idempotent.
    fn release(&mut self) -> Result<(), String> {
        let path = std::mem::take(&mut self.path);
        if path.as_os_str().is_empty() {
            return Ok(());
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let bound = PathBuf::from(format!("/sys/block/{name}/loop"));
        let result = retry(Duration::from_secs(10), || {
            if !bound.exists() {
                return Ok(());
            }
            let output = Command::new("losetup").arg("-d").arg(&path).output();
            match output {
                Ok(_) if !bound.exists() => Ok(()),
                Ok(o) if !o.status.success() => Err(format!(
                    "losetup -d {} failed with {}: {}",
                    path.display(),
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Ok(_) => Err(format!("{} is still bound", path.display())),
                Err(e) => Err(format!("cannot run losetup: {e}")),
            }
        });
        result.map_err(|e| format!("cannot detach {}: {e}", path.display()))
    }
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

/// A mounted file system; unmounted when dropped: `umount`, retried while
/// busy, and as a last resort `umount -l`.
pub struct Mount {
    pub target: PathBuf,
    mounted: bool,
}

impl Mount {
    /// Runs `mount ARGS SOURCE TARGET` (e.g. `args = &["-o", "ro"]`).
    pub fn new(source: &Path, target: &Path, args: &[&str]) -> Mount {
        run(Command::new("mount").args(args).arg(source).arg(target));
        Mount {
            target: target.to_path_buf(),
            mounted: true,
        }
    }

    /// Unmounts, asserting that a plain `umount` worked (within 10 s).
    pub fn unmount(mut self) {
        if let Err(e) = self.release() {
            panic!("{e}");
        }
    }

    fn release(&mut self) -> Result<(), String> {
        if !std::mem::take(&mut self.mounted) {
            return Ok(());
        }
        let target = &self.target;
        retry(Duration::from_secs(10), || {
            let output = Command::new("umount")
                .arg(target)
                .output()
                .map_err(|e| format!("cannot run umount: {e}"))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
            }
        })
        .map_err(|e| {
            let _ = Command::new("umount").arg("-l").arg(target).status();
            format!(
                "umount {} kept failing ({e}); detached it lazily",
                target.display()
            )
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// An NBD export presented as a file by `nbdfuse`, which runs in the
/// foreground as our child. Unmounted when dropped: `fusermount3 -u`
/// (retried while busy), which makes nbdfuse exit; if that does not work,
/// a lazy unmount and SIGKILL.
pub struct FuseMount {
    child: Option<Child>,
    pub dir: PathBuf,
    /// The export as a file: `DIR/nbd`.
    pub file: PathBuf,
    log: PathBuf,
    _log_dir: TempDir,
}

impl FuseMount {
    /// Runs `nbdfuse DIR URI` and waits (up to 20 s) until `DIR/nbd` has
    /// `size` bytes.
    pub fn nbdfuse(dir: &Path, uri: &str, size: u64) -> FuseMount {
        let log_dir = scratch();
        let log = log_dir.path().join("nbdfuse.log");
        let out = std::fs::File::create(&log).expect("create nbdfuse log");
        let mut cmd = Command::new("nbdfuse");
        cmd.arg(dir)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup nbdfuse log"))
            .stderr(out);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut mount = FuseMount {
            child: Some(child),
            dir: dir.to_path_buf(),
            file: dir.join("nbd"),
            log,
            _log_dir: log_dir,
        };
        let appeared = retry(Duration::from_secs(20), || {
            let child = mount.child.as_mut().expect("running");
            if let Ok(Some(status)) = child.try_wait() {
                mount.child = None;
                return Ok(Err(format!("nbdfuse exited with {status}")));
            }
            match std::fs::metadata(&mount.file) {
                Ok(meta) if meta.len() == size => Ok(Ok(())),
                Ok(meta) => Err(format!("it has {} bytes, not {size}", meta.len())),
                Err(e) => Err(format!("{e}")),
            }
        });
        match appeared {
            Ok(Ok(())) => mount,
            Ok(Err(e)) | Err(e) => panic!(
                "{cmd:?}: {} did not appear: {e}\nlog:\n{}",
                mount.file.display(),
                mount.log()
            ),
        }
    }

    /// What nbdfuse has printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Unmounts and asserts nbdfuse exited cleanly.
    pub fn unmount(mut self) {
        if let Err(e) = self.release() {
            panic!("{e}\nnbdfuse log:\n{}", self.log());
        }
    }

    fn release(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            // Not running (it exited during start-up): just make sure
            // nothing is left mounted.
            let _ = Command::new("fusermount3")
                .args(["-u", "-q", "-z"])
                .arg(&self.dir)
                .status();
            return Ok(());
        };
        let dir = &self.dir;
        let unmounted = retry(Duration::from_secs(10), || {
            let output = Command::new("fusermount3")
                .arg("-u")
                .arg(dir)
                .output()
                .map_err(|e| format!("cannot run fusermount3: {e}"))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
            }
        });
        let exited = unmounted.and_then(|()| {
            retry(Duration::from_secs(10), || match child.try_wait() {
                Ok(Some(status)) => Ok(status),
                Ok(None) => Err("nbdfuse did not exit after fusermount3 -u".to_string()),
                Err(e) => Err(format!("cannot wait for nbdfuse: {e}")),
            })
        });
        match exited {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(format!("nbdfuse exited with {status}")),
            Err(e) => {
                let _ = Command::new("fusermount3")
                    .args(["-u", "-q", "-z"])
                    .arg(dir)
                    .status();
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "unmounting {} failed ({e}); detached it lazily and killed nbdfuse",
                    dir.display()
                ))
            }
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        let _ = self.release();
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
/// `cdp replay` of the capture log at `capture` onto a new image in `dir`
/// must give `disk` byte for byte.
pub fn assert_replays_to(capture: &Path, disk: &Path, dir: &Path) {
    let replayed = dir.join("replayed.img");
    run(cdp()
        .arg("replay")
        .arg("--capture-log")
        .arg(capture)
        .arg("--onto")
        .arg(&replayed));
    assert_same_bytes(disk, &replayed);
}

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

// ---------------------------------------------------------------------------
// Capture logs
// ---------------------------------------------------------------------------

/// Records in a capture log, by kind.
#[derive(Debug, Default)]
pub struct RecordCounts {
    pub writes: u64,
    pub trims: u64,
    pub zeroes: u64,
    pub flushes: u64,
}

impl RecordCounts {
    pub fn total(&self) -> u64 {
        self.writes + self.trims + self.zeroes + self.flushes
    }
}

/// Walks the capture log's record headers (layout in docs/FORMATS.md; CRCs
/// are left to `cdp replay`) and counts records by kind.
pub fn count_records(log: &Path) -> RecordCounts {
    const FILE_HEADER: usize = 64;
    const RECORD_HEADER: usize = 48;
    let bytes = read_all(log);
    assert_eq!(&bytes[..8], b"CDPCAPLG", "capture log magic");
    let mut counts = RecordCounts::default();
    let mut at = FILE_HEADER;
    while at < bytes.len() {
        let head = bytes
            .get(at..at + RECORD_HEADER)
            .unwrap_or_else(|| panic!("capture log ends inside a record header at {at}"));
        assert_eq!(&head[..4], b"CREC", "record magic at offset {at}");
        let payload = u32::from_le_bytes(head[32..36].try_into().expect("4 bytes")) as usize;
        match head[4] {
            1 => counts.writes += 1,
            2 => counts.trims += 1,
            3 => counts.zeroes += 1,
            4 => counts.flushes += 1,
            kind => panic!("unknown record kind {kind} at offset {at}"),
        }
        at += RECORD_HEADER + payload;
    }
    assert_eq!(at, bytes.len(), "capture log ends inside a record payload");
    counts
}

// ---------------------------------------------------------------------------
// Replication: keys, restore points, restores
// ---------------------------------------------------------------------------

/// `cdp keygen DIR/key`; returns the key's path.
pub fn keygen(dir: &Path) -> PathBuf {
    let key = dir.join("key");
    run(cdp().arg("keygen").arg(&key));
    key
}

/// One row of `cdp points --json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub id: u64,
    /// RFC 3339, milliseconds.
    pub time: String,
    pub time_ns: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub bytes: u64,
    pub ends_on_barrier: bool,
    pub rpo_ms: f64,
    /// The name of a tagged (application-consistent) point.
    pub tag: Option<String>,
}

/// `cdp points --dir DIR --json`, parsed; panics with the output if a row
/// lacks a field.
pub fn points(dir: &Path) -> Vec<Point> {
    let text = run_stdout(cdp().arg("points").arg("--dir").arg(dir).arg("--json"));
    let json: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("cdp points --json printed no JSON ({e}):\n{text}"));
    let rows = json["points"]
        .as_array()
        .unwrap_or_else(|| panic!("cdp points --json printed no \"points\" array:\n{text}"));
    rows.iter()
        .map(|row| {
            let u = |field: &str| {
                row[field]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no integer {field:?} in {row} of:\n{text}"))
            };
            Point {
                id: u("id"),
                time: row["time"]
                    .as_str()
                    .unwrap_or_else(|| panic!("no \"time\" in {row}"))
                    .to_string(),
                time_ns: u("time_ns"),
                first_seq: row["first_seq"].as_u64().unwrap_or(0),
                last_seq: u("last_seq"),
                bytes: u("bytes"),
                ends_on_barrier: row["ends_on_barrier"]
                    .as_bool()
                    .unwrap_or_else(|| panic!("no \"ends_on_barrier\" in {row}")),
                rpo_ms: row["rpo_ms"]
                    .as_f64()
                    .unwrap_or_else(|| panic!("no \"rpo_ms\" in {row}")),
                tag: match &row["tag"] {
                    serde_json::Value::Null if row.get("tag").is_some() => None,
                    serde_json::Value::String(tag) => Some(tag.clone()),
                    _ => panic!("no \"tag\" (a string or null) in {row}"),
                },
            }
        })
        .collect()
}

/// `cdp restore --dir DIR --at AT --out OUT --key KEY`: the id of the point
/// it restored (from its `restored point ID (...)` line), or its stderr if it
/// failed.
pub fn try_restore(dir: &Path, at: &str, out: &Path, key: &Path) -> Result<u64, String> {
    let mut cmd = cdp();
    cmd.arg("restore")
        .arg("--dir")
        .arg(dir)
        .arg("--at")
        .arg(at)
        .arg("--out")
        .arg(out)
        .arg("--key")
        .arg(key)
        .env("RUST_BACKTRACE", "0");
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "{cmd:?} exited with {}\n{}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let id = stdout
        .strip_prefix("restored point ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("{cmd:?} printed no `restored point ID`:\n{stdout}"));
    Ok(id)
}

/// Like [`try_restore`], panicking if the restore fails.
pub fn restore(dir: &Path, at: &str, out: &Path, key: &Path) -> u64 {
    try_restore(dir, at, out, key).unwrap_or_else(|e| panic!("{e}"))
}

/// A time as `cdp restore --at` takes it: seconds since the epoch with
/// nanoseconds (`1763871180.123456789`).
pub fn epoch_seconds(time: std::time::SystemTime) -> String {
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch");
    format!("{}.{:09}", since.as_secs(), since.subsec_nanos())
}

/// A time in RFC 3339, UTC, with nanoseconds (`2025-11-23T04:13:00.123456789Z`).
pub fn rfc3339(time: std::time::SystemTime) -> String {
    humantime::format_rfc3339_nanos(time).to_string()
}

/// Copies a file, leaving all-zero 4 KiB blocks as holes (so that many
/// copies of a mostly empty disk stay small).
pub fn copy_sparse(from: &Path, to: &Path) {
    use std::os::unix::fs::FileExt;
    const BLOCK: usize = 4096;
    const CHUNK: usize = 1 << 20;
    let src = std::fs::File::open(from).unwrap_or_else(|e| panic!("open {}: {e}", from.display()));
    let len = src.metadata().expect("stat source").len();
    let dst = std::fs::File::create(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    dst.set_len(len).expect("size the copy");
    let zeros = [0u8; BLOCK];
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(CHUNK as u64) as usize;
        src.read_exact_at(&mut buf[..n], at)
            .unwrap_or_else(|e| panic!("read {} at {at}: {e}", from.display()));
        for (i, block) in buf[..n].chunks(BLOCK).enumerate() {
            if block != &zeros[..block.len()] {
                let offset = at + (i * BLOCK) as u64;
                dst.write_all_at(block, offset)
                    .unwrap_or_else(|e| panic!("write {} at {offset}: {e}", to.display()));
            }
        }
        at += n as u64;
    }
}

// ---------------------------------------------------------------------------
// libnbd's Python bindings
// ---------------------------------------------------------------------------

/// A Python 3 that can `import nbd` (python3-libnbd). The first `python3` on
/// PATH may be a pyenv or virtualenv one without the system package, which
/// also breaks `nbdsh` (a `python3 -m nbd` wrapper); so the scripts run with
/// whichever interpreter has the module.
pub fn libnbd_python() -> &'static str {
    static FOUND: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    FOUND.get_or_init(|| {
        ["python3", "/usr/bin/python3"]
            .into_iter()
            .find(|python| {
                Command::new(python)
                    .args(["-c", "import nbd"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .expect("no python3 can import nbd: install python3-libnbd")
    })
}

/// `python3 -c SCRIPT` with libnbd's bindings, ready for the script's arguments.
pub fn python(script: &str) -> Command {
    let mut cmd = Command::new(libnbd_python());
    cmd.arg("-c").arg(script);
    cmd
}

/// argv: URI PROBE... where a probe is `OP:OFFSET:COUNT:EXPECTED`, OP one of
/// pread, pwrite, trim, zero; OFFSET and COUNT Python expressions in `size`;
/// EXPECTED `ok` or an errno name. Strict mode off, so libnbd sends what it
/// would refuse itself; all probes share one connection.
pub const PROBES: &str = r#"
import sys
import nbd

h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
size = h.get_size()
actions = {
    "pread": lambda offset, count: h.pread(count, offset),
    "pwrite": lambda offset, count: h.pwrite(b"\x5a" * count, offset),
    "trim": lambda offset, count: h.trim(count, offset),
    "zero": lambda offset, count: h.zero(count, offset),
}
unexpected = 0
for probe in sys.argv[2:]:
    op, offset, count, want = probe.split(":")
    offset, count = (eval(x, {"size": size}) for x in (offset, count))
    try:
        actions[op](offset, count)
        got = "ok"
    except nbd.Error as e:
        got = e.errno or str(e)
    verdict = "as expected" if got == want else f"UNEXPECTED, wanted {want}"
    print(f"{op} {count} bytes at {offset}: {got} ({verdict})")
    unexpected += got != want
sys.exit(1 if unexpected else 0)
"#;
