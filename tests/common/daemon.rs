//! `cdp` subcommands that serve until told to stop, run as real processes:
//! [`Daemon`] for any of them, [`Filter`] for `cdp filter`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{cdp, retry, scratch, stdout_lines};

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
        let rx = stdout_lines(&mut child);
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
