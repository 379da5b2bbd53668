//! Helpers for `tests/faults.rs`: a lab (temp dir, key, target dir, every
//! daemon's log) and daemons run as real processes and killed by PID on
//! drop. The workload, the proxy and the journal reader have files of their
//! own beside this one.

use std::cell::RefCell;
use std::fmt::Display;
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::common::{
    cdp, first_difference, pseudo_random, read_all, scratch, sparse_file, stdout_lines,
};
use crate::journal::{check_contiguous, journal_entries};
use crate::workload::{Workload, Writer};

pub const MIB: u64 = 1 << 20;
pub const DISK_SIZE: u64 = 32 * MIB;
/// Every workload write is one block of this size...
pub const BLOCK: u64 = 64 << 10;
/// ...in the first `REGION` bytes of the disk.
pub const REGION: u64 = 4 * MIB;
/// Workload operations per qemu-io process.
pub const OPS_PER_RUN: usize = 6;
pub const RPO: &str = "200ms";

pub fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// A port nothing listens on right now (bound to 127.0.0.1:0, then released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// stdout and stderr of a finished command.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// One test's world: a temp dir with a key, a target directory, disks, and
/// the logs of every daemon started, which every failure message shows.
pub struct Lab {
    pub dir: TempDir,
    pub key: PathBuf,
    pub target_dir: PathBuf,
    pub workload: Arc<Workload>,
    logs: RefCell<Vec<PathBuf>>,
}

impl Lab {
    pub fn new() -> Lab {
        let dir = scratch();
        let key = dir.path().join("key");
        crate::common::run(cdp().arg("keygen").arg(&key));
        let workload = Arc::new(Workload::new(dir.path()));
        Lab {
            target_dir: dir.path().join("target"),
            key,
            workload,
            logs: RefCell::new(Vec::new()),
            dir,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A sparse disk of `DISK_SIZE` bytes with two MiB of data (one inside
    /// the workload's region), so a full sync has something to carry.
    pub fn disk(&self, name: &str, seed: u64) -> PathBuf {
        let path = self.path(name);
        sparse_file(&path, DISK_SIZE);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open disk");
        for (i, at) in [MIB, 5 * MIB].into_iter().enumerate() {
            let data = pseudo_random(MIB as usize, seed + i as u64);
            file.write_all_at(&data, at).expect("fill disk");
        }
        path
    }

    /// Every daemon log so far, for failure messages.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for path in self.logs.borrow().iter() {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let log = std::fs::read_to_string(path).unwrap_or_default();
            all.push_str(&format!("\n--- {name} (NBD disconnects left out) ---\n"));
            for line in log.lines().filter(|l| !l.contains("(NBD_CMD_DISC)")) {
                all.push_str(line);
                all.push('\n');
            }
        }
        all
    }

    pub fn fail(&self, what: impl Display) -> ! {
        panic!("{what}\n=== daemon logs ==={}", self.logs())
    }

    /// Starts `cdp ARGS` and waits for its `listening on` line.
    pub fn start(&self, name: &str, args: &[&str]) -> Daemon {
        self.spawn(name, args)
            .unwrap_or_else(|e| self.fail(format!("cdp {name} did not start: {e}")))
    }

    /// Starts `cdp ARGS`; `Err` (with its log) if it exits before it listens.
    pub fn spawn(&self, name: &str, args: &[&str]) -> Result<Daemon, String> {
        let log = self.path(&format!("{name}-{}.log", self.logs.borrow().len() + 1));
        self.logs.borrow_mut().push(log.clone());
        let mut cmd = cdp();
        cmd.arg(name)
            .args(args)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("create log"));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let rx = stdout_lines(&mut child);
        let mut daemon = Daemon {
            child,
            addr: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(50)) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    daemon.addr = addr.to_string();
                    return Ok(daemon);
                }
            }
            if let Ok(Some(status)) = daemon.child.try_wait() {
                return Err(format!("it exited with {status}:\n{}", daemon.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("no `listening on` within 20 s:\n{}", daemon.log()));
            }
        }
    }

    pub fn target(&self, listen: &str) -> Daemon {
        self.try_target(listen)
            .unwrap_or_else(|e| self.fail(format!("cdp target did not start: {e}")))
    }

    pub fn try_target(&self, listen: &str) -> Result<Daemon, String> {
        let dir = self.target_dir.to_str().expect("UTF-8 path");
        let key = self.key.to_str().expect("UTF-8 path");
        self.spawn("target", &["--listen", listen, "--dir", dir, "--key", key])
    }

    pub fn protect_args<'a>(&self, disk: &'a Path, target: &'a str, key: &'a Path) -> Vec<&'a str> {
        let disk = disk.to_str().expect("UTF-8 path");
        let key = key.to_str().expect("UTF-8 path");
        let listen = "127.0.0.1:0";
        vec![
            "--disk", disk, "--listen", listen, "--target", target, "--key", key, "--rpo", RPO,
        ]
    }

    pub fn protect(&self, disk: &Path, target: &str) -> Daemon {
        self.start("protect", &self.protect_args(disk, target, &self.key))
    }

    /// Stops a daemon with SIGTERM, asserts it exited 0, and returns all it
    /// logged.
    pub fn stop_ok(&self, mut daemon: Daemon) -> String {
        let status = daemon.stop();
        if !status.success() {
            self.fail(format!("{} exited with {status}", daemon.log.display()));
        }
        daemon.log()
    }

    /// Runs `cdp ARGS` to completion (killing it after 60 s).
    pub fn cdp(&self, args: &[&str]) -> Output {
        let child = cdp()
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cdp");
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(child.wait_with_output()));
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(output) => output.expect("wait for cdp"),
            Err(_) => {
                // SAFETY: kill(2) on our child's PID; its waiter has not
                // returned, so it is not reaped.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                self.fail(format!("cdp {args:?} ran for more than 60 s; killed it"))
            }
        }
    }

    /// Runs `cdp ARGS`, which must succeed.
    pub fn cdp_ok(&self, args: &[&str]) -> Output {
        let output = self.cdp(args);
        if !output.status.success() {
            self.fail(format!(
                "cdp {args:?} failed with {}:\n{}",
                output.status,
                text(&output)
            ));
        }
        output
    }

    /// `cdp points --dir TARGET --json`.
    pub fn points(&self) -> Vec<Point> {
        let dir = self.target_dir.to_str().expect("UTF-8 path");
        let output = self.cdp_ok(&["points", "--dir", dir, "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| self.fail(format!("cdp points --json: {e}:\n{}", text(&output))));
        let field = |p: &serde_json::Value, name: &str| {
            p[name]
                .as_u64()
                .unwrap_or_else(|| self.fail(format!("cdp points --json: no {name} in {p}")))
        };
        json["points"]
            .as_array()
            .unwrap_or_else(|| self.fail(format!("cdp points --json printed {json}")))
            .iter()
            .map(|p| Point {
                id: field(p, "id"),
                first_seq: field(p, "first_seq"),
                last_seq: field(p, "last_seq"),
            })
            .collect()
    }

    /// Waits (up to 30 s) until the target holds `n` restore points.
    pub fn wait_for_points(&self, n: usize) -> Vec<Point> {
        let dir = self.target_dir.to_str().expect("UTF-8 path");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.cdp(&["points", "--dir", dir]).status.success() && self.points().len() >= n {
                return self.points();
            }
            sleep_ms(100);
        }
        self.fail(format!(
            "the target did not reach {n} restore points in 30 s"
        ))
    }

    /// `cdp restore --at AT`; the output file is removed again.
    pub fn try_restore(&self, at: &str) -> (Output, Option<Vec<u8>>) {
        let out = self.path("restore.img");
        let _ = std::fs::remove_file(&out);
        let output = self.cdp(&[
            "restore",
            "--dir",
            self.target_dir.to_str().expect("UTF-8 path"),
            "--at",
            at,
            "--out",
            out.to_str().expect("UTF-8 path"),
            "--key",
            self.key.to_str().expect("UTF-8 path"),
        ]);
        let image = out.exists().then(|| read_all(&out));
        let _ = std::fs::remove_file(&out);
        (output, image)
    }

    /// The image of restore point `id`.
    pub fn restore(&self, id: u64) -> Vec<u8> {
        match self.try_restore(&id.to_string()) {
            (output, Some(image)) if output.status.success() => image,
            (output, _) => self.fail(format!(
                "cdp restore --at {id} failed with {}:\n{}",
                output.status,
                text(&output)
            )),
        }
    }

    /// One protect process from start to a clean stop, writing `runs` qemu-io
    /// runs of the workload from op `first` with a pause longer than the RPO
    /// after each (so each lands in its own batch). Returns the next op.
    pub fn protect_run(&self, target: &str, disk: &Path, first: usize, runs: usize) -> usize {
        let mut op = first;
        let mut protect = self.protect(disk, target);
        for _ in 0..runs {
            if let Err(e) = self.workload.run(&protect.uri(), op) {
                match protect.wait(Duration::from_millis(200)) {
                    Some(status) => self.fail(format!(
                        "protect exited with {status} while qemu-io wrote to it: {e}"
                    )),
                    None => self.fail(e),
                }
            }
            op += OPS_PER_RUN;
            sleep_ms(400);
        }
        self.stop_ok(protect);
        op
    }

    /// Ends a writer, which must not have failed; returns the next op.
    pub fn finish(&self, writer: Writer) -> usize {
        match writer.finish() {
            (next, None) => next,
            (_, Some(e)) => self.fail(e),
        }
    }

    /// The checks after every fault: the journal is one gap-free run of
    /// entries (ids from 1, each batch's first seq one past the previous
    /// one's last), `cdp points` lists exactly its entries outside full
    /// syncs, every point restores, and the newest equals `disk`. With a
    /// `model` (the disk before op 0 and the number of ops written), each
    /// point must also equal the disk after some prefix of the ops, later
    /// points after longer ones, the newest after all of them.
    pub fn check_replica(&self, disk: &Path, model: Option<(&[u8], usize)>) -> Vec<Point> {
        let entries = journal_entries(&self.target_dir);
        check_contiguous(&entries).unwrap_or_else(|e| self.fail(e));
        let points = self.points();
        let expected: Vec<Point> = entries
            .iter()
            .filter(|e| !e.in_sync)
            .map(|e| Point {
                id: e.id,
                first_seq: e.first_seq,
                last_seq: e.last_seq,
            })
            .collect();
        if points != expected {
            self.fail(format!(
                "cdp points lists {points:?}\nbut the journal's entries outside full syncs are {expected:?}"
            ));
        }
        let Some(newest) = points.last() else {
            self.fail("the target holds no restore point")
        };
        let mut prefix = model.map(|(initial, ops)| (initial.to_vec(), 0usize, ops));
        let mut image = Vec::new();
        for point in &points {
            image = self.restore(point.id);
            if let Some((state, done, ops)) = &mut prefix {
                let before = *done;
                let region = REGION as usize;
                while image[..region] != state[..region] {
                    if *done == *ops {
                        let mut at_before = model.expect("a model").0.to_vec();
                        self.workload.model(&mut at_before, 0..before);
                        let i = first_difference(&image, &at_before).unwrap_or(0);
                        self.fail(format!(
                            "restore point {} is not the disk after any of ops {before}..{ops} \
                             (the previous point was the disk after op {before}); it differs \
                             from the disk after op {before} first at byte {i}\npoints: {points:?}",
                            point.id
                        ));
                    }
                    self.workload.model(state, *done..*done + 1);
                    *done += 1;
                }
                if let Some(i) = first_difference(&image, state) {
                    self.fail(format!(
                        "restore point {} differs outside the workload's region at byte {i}",
                        point.id
                    ));
                }
            }
        }
        if let Some((mut state, done, ops)) = prefix {
            self.workload.model(&mut state, done..ops);
            if let Some(i) = first_difference(&image, &state) {
                self.fail(format!(
                    "the newest point {} is not the disk after all {ops} ops written: \
                     first difference at byte {i}",
                    newest.id
                ));
            }
        }
        eprintln!(
            "{} restore points checked (journal: {} entries; model: {:?} ops)",
            points.len(),
            entries.len(),
            model.map(|(_, ops)| ops)
        );
        if let Some(i) = first_difference(&image, &read_all(disk)) {
            self.fail(format!(
                "the newest restore point {} differs from {} first at byte {i}\npoints: {points:?}",
                newest.id,
                disk.display()
            ));
        }
        points
    }
}

/// A restore point as `cdp points --json` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub id: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// A running `cdp` daemon; killed (SIGKILL, by PID) when dropped.
pub struct Daemon {
    child: Child,
    /// What it printed after `listening on `.
    pub addr: String,
    pub log: PathBuf,
}

impl Daemon {
    pub fn port(&self) -> u16 {
        let port = self.addr.rsplit(':').next().and_then(|p| p.parse().ok());
        port.unwrap_or_else(|| panic!("no port in {:?}", self.addr))
    }

    /// The NBD URI of a `cdp protect`.
    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/", self.port())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to 60 s (protect may spend 30 s delivering).
    pub fn stop(&mut self) -> ExitStatus {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on the PID of our child, which try_wait just
            // found running, so it has not been reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        self.wait(Duration::from_secs(60)).unwrap_or_else(|| {
            self.kill9();
            panic!(
                "{} did not exit within 60 s of SIGTERM:\n{}",
                self.log.display(),
                self.log()
            )
        })
    }

    /// Its exit status, if it exits within `patience`.
    pub fn wait(&mut self, patience: Duration) -> Option<ExitStatus> {
        wait_timeout(&mut self.child, patience)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn wait_timeout(child: &mut Child, patience: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + patience;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        sleep_ms(20);
    }
}

/// Runs a command that must fail within `patience`; returns its output
/// (killing it and panicking if it keeps running or succeeds).
pub fn expect_failure(cmd: &mut Command, patience: Duration) -> String {
    let mut child = cmd
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let status = wait_timeout(&mut child, patience);
    if status.is_none() {
        let _ = child.kill();
    }
    let output = child.wait_with_output().expect("collect output");
    let seen = text(&output);
    match status {
        None => panic!("{cmd:?} was still running after {patience:?}:\n{seen}"),
        Some(s) if s.success() => panic!("{cmd:?} succeeded:\n{seen}"),
        Some(_) => seen,
    }
}
