//! Helpers for `tests/faults.rs`: a lab (temp dir, key, target dir, every
//! daemon's log), daemons run as real processes and killed by PID on drop, a
//! qemu-io workload with a model of what the disk holds after each write, a
//! TCP proxy that can fail, and a reader of the journal's entry headers
//! (`docs/FORMATS.md`, "Journal segment, version 1").

use std::cell::RefCell;
use std::fmt::Display;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::common::{cdp, first_difference, pseudo_random, read_all, scratch, sparse_file};

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
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
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

    /// Stops a daemon with SIGTERM and asserts it exited 0.
    pub fn stop_ok(&self, mut daemon: Daemon) {
        let status = daemon.stop();
        if !status.success() {
            self.fail(format!("{} exited with {status}", daemon.log.display()));
        }
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

fn wait_timeout(child: &mut Child, patience: Duration) -> Option<ExitStatus> {
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

/// Writes through qemu-io: op `i` writes one block in the first `REGION`
/// bytes — usually random data from one of 16 pattern files (`write -s`, so
/// batches do not compress to nothing), sometimes with FUA, sometimes
/// WRITE_ZEROES or a discard — and every run ends with a flush.
#[derive(Debug)]
pub struct Workload {
    sources: Vec<(PathBuf, Vec<u8>)>,
}

impl Workload {
    fn new(dir: &Path) -> Workload {
        let sources = (0..16)
            .map(|n| {
                let path = dir.join(format!("pattern-{n}"));
                let data = pseudo_random(BLOCK as usize, 1000 + n);
                std::fs::write(&path, &data).expect("write pattern file");
                (path, data)
            })
            .collect();
        Workload { sources }
    }

    /// Offset of op `i` and what it writes: `Some(pattern)` or zeros.
    fn op(&self, i: usize) -> (u64, Option<usize>) {
        let offset = (i as u64 * 37 % (REGION / BLOCK)) * BLOCK;
        let zero = i % 11 == 10 || i % 13 == 12;
        // Each visit to a block (every 64 ops) brings another pattern.
        let pattern = (i * 7 + i / 64) % self.sources.len();
        (offset, (!zero).then_some(pattern))
    }

    fn command(&self, i: usize) -> String {
        let (offset, pattern) = self.op(i);
        match pattern {
            Some(n) => {
                let fua = if i % 5 == 4 { "-f " } else { "" };
                let path = self.sources[n].0.display();
                format!("write -q {fua}-s {path} {offset} {BLOCK}")
            }
            None if i % 2 == 0 => format!("write -q -z {offset} {BLOCK}"),
            None => format!("discard -q {offset} {BLOCK}"),
        }
    }

    /// Applies ops `range` to a model of the disk.
    pub fn model(&self, image: &mut [u8], range: std::ops::Range<usize>) {
        for i in range {
            let (offset, pattern) = self.op(i);
            let block = &mut image[offset as usize..(offset + BLOCK) as usize];
            match pattern {
                Some(n) => block.copy_from_slice(&self.sources[n].1),
                None => block.fill(0),
            }
        }
    }

    /// Ops `first..first + OPS_PER_RUN` and a flush, in one qemu-io process.
    pub fn run(&self, uri: &str, first: usize) -> Result<(), String> {
        let mut child = self.spawn(uri, first);
        if wait_timeout(&mut child, Duration::from_secs(60)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "qemu-io (ops from {first}) ran for 60 s; killed it"
            ));
        }
        check_qemu_io(&child.wait_with_output().expect("qemu-io output"))
    }

    fn spawn(&self, uri: &str, first: usize) -> Child {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", uri]);
        for i in first..first + OPS_PER_RUN {
            cmd.arg("-c").arg(self.command(i));
        }
        cmd.args(["-c", "flush"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run qemu-io")
    }
}

fn check_qemu_io(output: &Output) -> Result<(), String> {
    let seen = text(output);
    if output.status.success() && !seen.contains("failed") && !seen.contains("rror") {
        Ok(())
    } else {
        Err(format!("qemu-io exited with {}:\n{seen}", output.status))
    }
}

/// Runs the workload in qemu-io processes, one after another, until
/// stopped; the qemu-io running when it is dropped is killed by PID.
pub struct Writer {
    stop: Arc<AtomicBool>,
    current: Arc<Mutex<Option<Child>>>,
    thread: Option<JoinHandle<(usize, Option<String>)>>,
}

impl Writer {
    pub fn start(workload: &Arc<Workload>, uri: String, first: usize) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let current: Arc<Mutex<Option<Child>>> = Arc::default();
        let (workload, flag, slot) = (workload.clone(), stop.clone(), current.clone());
        let thread = std::thread::spawn(move || {
            let mut next = first;
            while !flag.load(Ordering::Relaxed) {
                *slot.lock().expect("lock") = Some(workload.spawn(&uri, next));
                let status = loop {
                    let mut guard = slot.lock().expect("lock");
                    let child = guard.as_mut().expect("running");
                    if let Ok(Some(status)) = child.try_wait() {
                        break status;
                    }
                    drop(guard);
                    sleep_ms(5);
                };
                let child = slot.lock().expect("lock").take().expect("running");
                let mut output = child.wait_with_output().expect("qemu-io output");
                output.status = status;
                if let Err(e) = check_qemu_io(&output) {
                    return (next, Some(format!("the writer failed at op {next}: {e}")));
                }
                next += OPS_PER_RUN;
                sleep_ms(30);
            }
            (next, None)
        });
        Writer {
            stop,
            current,
            thread: Some(thread),
        }
    }

    /// Lets the running qemu-io finish and stops; returns the next op and
    /// the failure, if a qemu-io failed.
    pub fn finish(mut self) -> (usize, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("running");
        thread.join().expect("writer thread")
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(child) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            let _ = child.kill();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One proxied connection: client side, upstream side, abandoned.
type Conn = (TcpStream, TcpStream, Arc<AtomicBool>);

/// A TCP proxy on 127.0.0.1:`port` to `upstream`, which tests break.
pub struct Proxy {
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<Conn>>>,
    /// Set: the next read from a client forwards half its bytes, then that
    /// connection is cut (both sides).
    cut_mid_frame: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(port: u16, upstream: SocketAddr) -> Proxy {
        let listener = crate::common::retry(Duration::from_secs(5), || {
            TcpListener::bind(("127.0.0.1", port)).map_err(|e| e.to_string())
        })
        .unwrap_or_else(|e| panic!("the proxy cannot bind port {port}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<_>>> = Arc::default();
        let cut_mid_frame = Arc::new(AtomicBool::new(false));
        let (flag, list, cut) = (stop.clone(), conns.clone(), cut_mid_frame.clone());
        let accept = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    sleep_ms(5);
                    continue;
                };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue; // dropping the client closes it
                };
                client.set_nonblocking(false).expect("blocking");
                let abandoned = Arc::new(AtomicBool::new(false));
                let clone = |s: &TcpStream| s.try_clone().expect("clone socket");
                list.lock().expect("lock").push((
                    clone(&client),
                    clone(&server),
                    abandoned.clone(),
                ));
                let up = (clone(&client), clone(&server), abandoned.clone());
                let cut = cut.clone();
                std::thread::spawn(move || pump(up.0, up.1, up.2, Some(cut)));
                std::thread::spawn(move || pump(server, client, abandoned, None));
            }
        });
        Proxy {
            stop,
            conns,
            cut_mid_frame,
            accept: Some(accept),
        }
    }

    /// Cuts the connection in the middle of what the source is sending
    /// (waits up to 5 s for it to send something); keeps listening.
    pub fn cut_mid_frame(&self) {
        self.cut_mid_frame.store(true, Ordering::SeqCst);
        let cut = crate::common::retry(Duration::from_secs(5), || {
            match self.cut_mid_frame.load(Ordering::SeqCst) {
                false => Ok(()),
                true => Err("the source sent nothing for 5 s".to_string()),
            }
        });
        cut.unwrap_or_else(|e| panic!("cannot cut mid-frame: {e}"));
    }

    /// Closes the source's side of every connection but leaves the target's
    /// side open and silent, as a network that fails without a FIN or RST
    /// reaching the target would.
    pub fn abandon_connections(&self) {
        for (client, _, abandoned) in self.conns.lock().expect("lock").iter() {
            abandoned.store(true, Ordering::SeqCst);
            let _ = client.shutdown(Shutdown::Both);
        }
    }

    /// Stops listening and closes every connection (both sides).
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for (client, server, _) in self.conns.lock().expect("lock").drain(..) {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shut();
    }
}

/// Copies `from` to `to` until either fails; then closes both, except the
/// upstream side of an abandoned connection.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    abandoned: Arc<AtomicBool>,
    cut: Option<Arc<AtomicBool>>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.as_ref().is_some_and(|c| c.load(Ordering::SeqCst)) {
            let _ = to.write_all(&buf[..n.div_ceil(2)]);
            if let Some(cut) = &cut {
                cut.store(false, Ordering::SeqCst);
            }
            break;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    if !abandoned.load(Ordering::SeqCst) {
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    }
}

/// One journal entry's header and where it lies.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Cut during a full sync (flags bit 1): not a restore point.
    pub in_sync: bool,
    pub segment: PathBuf,
    /// Of the entry header in the segment.
    pub offset: u64,
    pub body_len: u64,
}

/// The entries in `DIR/journal/*.seg`, segment by segment, read straight
/// from the files as `docs/FORMATS.md` lays them out (stopping at a tail
/// that is cut short). Empty if there is no journal.
pub fn journal_entries(dir: &Path) -> Vec<Entry> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir.join("journal"))
        .map(|list| list.map(|e| e.expect("list journal").path()).collect())
        .unwrap_or_default();
    segments.retain(|p| p.extension().is_some_and(|e| e == "seg"));
    segments.sort();
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
    let mut entries = Vec::new();
    for segment in segments {
        let bytes = read_all(&segment);
        assert!(
            bytes.len() >= 64 && &bytes[..8] == b"CDPJSEG\0",
            "{}: no segment header",
            segment.display()
        );
        let mut offset = 64;
        while offset + 64 <= bytes.len() {
            let h = &bytes[offset..offset + 64];
            assert_eq!(
                &h[..4],
                b"CJEN",
                "{}: no entry at {offset}",
                segment.display()
            );
            let body_len = u32::from_le_bytes(h[48..52].try_into().expect("4")) as usize;
            if offset + 64 + body_len > bytes.len() {
                break;
            }
            entries.push(Entry {
                id: u64_at(h, 8),
                first_seq: u64_at(h, 16),
                last_seq: u64_at(h, 24),
                in_sync: h[5] & 2 != 0,
                segment: segment.clone(),
                offset: offset as u64,
                body_len: body_len as u64,
            });
            offset += 64 + body_len;
        }
    }
    entries
}

/// Entry ids run 1, 2, 3...; sequence numbers from 0 without a gap or an
/// overlap, so no batch is missing or in the journal twice.
pub fn check_contiguous(entries: &[Entry]) -> Result<(), String> {
    let mut next_seq = 0;
    for (i, entry) in entries.iter().enumerate() {
        let ok = entry.id == i as u64 + 1
            && entry.first_seq == next_seq
            && entry.first_seq <= entry.last_seq;
        if !ok {
            return Err(format!(
                "journal entry {} is not the one expected (id {}, first seq {next_seq}):\n{entries:#?}",
                i + 1,
                i + 1
            ));
        }
        next_seq = entry.last_seq + 1;
    }
    Ok(())
}
