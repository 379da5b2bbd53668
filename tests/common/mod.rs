//! Shared harness for the integration tests: start and stop `cdp filter` as a
//! real process, run real clients, make files and loop devices, and clean up
//! everything on drop. Every helper panics with what it saw.
#![allow(dead_code)] // each test binary uses its own subset of the harness

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
/// Streams both in 1 MiB chunks and compares with memcmp, so it stays fast
/// (and small) on images of hundreds of MiB even in debug builds.
pub fn assert_same_bytes(a: &Path, b: &Path) {
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
    assert_eq!(
        la,
        lb,
        "{} is {la} bytes, {} is {lb} bytes",
        a.display(),
        b.display()
    );
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
            panic!(
                "{} and {} differ first at byte {} ({:#04x} vs {:#04x})",
                a.display(),
                b.display(),
                at + i as u64,
                x[i],
                y[i]
            );
        }
        at += n as u64;
    }
}
