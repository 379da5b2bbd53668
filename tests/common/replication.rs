//! `cdp target` and `cdp protect` run together for the replication tests.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::collections::BTreeMap;

use super::*;

mod workloads;
#[allow(unused_imports)] // each test binary uses its own subset
pub use workloads::*;

pub const MIB: u64 = 1 << 20;
pub const RPO: &str = "200ms";
/// How long the workload stays quiet after each flush (five RPO intervals).
pub const PAUSE: Duration = Duration::from_millis(1000);
/// How long any single step may take before the test gives up on it.
pub const PATIENCE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// Target and protect
// ---------------------------------------------------------------------------

/// `cdp target` and `cdp protect` for one disk, with their key and journal.
/// Either can be stopped and started again; dropping it kills both.
pub struct Replication {
    pub key: PathBuf,
    pub journal: PathBuf,
    pub disk: PathBuf,
    /// Protect's arguments besides --disk, --target and --key.
    pub protect_args: Vec<String>,
    /// The target's arguments besides --listen, --dir and --key.
    pub target_args: Vec<String>,
    pub target: Daemon,
    pub protect: Option<Daemon>,
    /// The last protect's log, once it stopped.
    pub protect_log: String,
    /// What targets killed by `crash_target` logged.
    pub crashed_target_logs: String,
}

impl Replication {
    /// Protect listening on TCP (127.0.0.1:0).
    pub fn start(dir: &Path, disk: &Path, protect_args: &[&str]) -> Replication {
        Self::start_with(dir, disk, &["--listen", "127.0.0.1:0"], protect_args)
    }

    /// A new key, `cdp target` on 127.0.0.1:0 with its journal in
    /// DIR/journal, and `cdp protect --disk DISK LISTEN... --target ADDR
    /// --key KEY ARGS...`.
    pub fn start_with(dir: &Path, disk: &Path, listen: &[&str], args: &[&str]) -> Replication {
        Self::start_full(dir, disk, listen, args, &[])
    }

    /// As [`Replication::start_with`], the target run with `target_args` too.
    pub fn start_full(
        dir: &Path,
        disk: &Path,
        listen: &[&str],
        args: &[&str],
        target_args: &[&str],
    ) -> Replication {
        let key = keygen(dir);
        let journal = dir.join("journal");
        let target_args: Vec<String> = target_args.iter().map(|a| a.to_string()).collect();
        let target = start_target(&journal, &key, "127.0.0.1:0", &target_args);
        let mut repl = Replication {
            key,
            journal,
            disk: disk.to_path_buf(),
            target_args,
            protect_args: listen.iter().chain(args).map(|a| a.to_string()).collect(),
            target,
            protect: None,
            protect_log: String::new(),
            crashed_target_logs: String::new(),
        };
        repl.start_protect();
        repl
    }

    /// Starts a (new) protect process.
    pub fn start_protect(&mut self) {
        assert!(self.protect.is_none(), "protect is running already");
        let mut cmd = cdp();
        cmd.arg("protect")
            .arg("--disk")
            .arg(&self.disk)
            .arg("--target")
            .arg(&self.target.addr)
            .arg("--key")
            .arg(&self.key)
            .args(&self.protect_args);
        self.protect = Some(Daemon::spawn(cmd));
    }

    /// Kills the target (SIGKILL: a crash), waits `down`, and starts it
    /// again on the same address and journal.
    pub fn crash_target(&mut self, down: Duration) {
        self.crash_target_into(down, &[]);
    }

    /// As [`Replication::crash_target`], the new target run with `env` set
    /// (a `CDP_CRASH_AT` step, say).
    pub fn crash_target_into(&mut self, down: Duration, env: &[(&str, &str)]) {
        let log = self.target.kill();
        self.crashed_target_logs.push_str(&log);
        std::thread::sleep(down);
        let addr = self.target.addr.clone();
        self.target = start_target_with(&self.journal, &self.key, &addr, &self.target_args, env);
    }

    /// Protect run once to the end of its full sync and stopped; then the
    /// disk is changed behind its back with `seed`'s data (see
    /// [`change_behind_protects_back`]).
    pub fn synced_then_changed(dir: &Path, disk: &Path, seed: u64) -> Replication {
        let mut repl = Replication::start(dir, disk, &["--rpo", RPO]);
        repl.protect().wait_for_log("full sync complete", PATIENCE);
        repl.stop_protect();
        change_behind_protects_back(disk, seed);
        repl
    }

    pub fn protect(&mut self) -> &mut Daemon {
        self.protect.as_mut().expect("protect running")
    }

    /// The NBD URI of protect's export.
    pub fn uri(&self) -> String {
        nbd_uri(&self.protect.as_ref().expect("protect running").addr).0
    }

    /// Both daemons' logs, for failure messages.
    pub fn logs(&self) -> String {
        let protect = match &self.protect {
            Some(protect) => protect.log(),
            None => self.protect_log.clone(),
        };
        format!(
            "--- cdp protect log ---\n{protect}\n--- cdp target log ---\n{}{}",
            self.crashed_target_logs,
            self.target.log()
        )
    }

    pub fn fail(&self, what: &str) -> ! {
        panic!("{what}\n{}", self.logs())
    }

    /// Fails with `what` unless the last protect run logged `line`.
    pub fn expect_protect_logged(&self, line: &str, what: &str) {
        if !self.protect_log.contains(line) {
            self.fail(what);
        }
    }

    /// SIGTERM to protect: it must exit 0 having synced fully and delivered
    /// everything.
    pub fn stop_protect(&mut self) {
        let protect = self.protect.take().expect("protect running");
        self.protect_log = protect.stop_ok();
        for line in [
            "full sync complete",
            "protect stopped; every captured batch is on the target",
        ] {
            self.expect_protect_logged(line, &format!("cdp protect did not log {line:?}"));
        }
    }

    /// SIGTERM to the target, which must exit cleanly, once protect has
    /// stopped; returns the key and the journal directory, which are all a
    /// test reads from then on.
    pub fn stop_target(self) -> (PathBuf, PathBuf) {
        assert!(self.protect.is_none(), "stop protect before the target");
        self.target.stop_ok();
        (self.key, self.journal)
    }
}

/// Writes 1 MiB + 777 bytes of `seed`'s data at 5 MiB + 3 of `disk`, with
/// no protect running: only a full sync can carry it to the target.
pub fn change_behind_protects_back(disk: &Path, seed: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .and_then(|f| {
            std::os::unix::fs::FileExt::write_all_at(
                &f,
                &pseudo_random(MIB as usize + 777, seed),
                5 * MIB + 3,
            )
        })
        .expect("change the disk between runs");
}

/// `cdp target --listen ADDR --dir JOURNAL --key KEY ARGS...`.
pub fn start_target(journal: &Path, key: &Path, addr: &str, args: &[String]) -> Daemon {
    start_target_with(journal, key, addr, args, &[])
}

/// As [`start_target`], with `env` set in the target's environment.
pub fn start_target_with(
    journal: &Path,
    key: &Path,
    addr: &str,
    args: &[String],
    env: &[(&str, &str)],
) -> Daemon {
    let mut cmd = cdp();
    cmd.envs(env.iter().copied());
    cmd.arg("target")
        .arg("--listen")
        .arg(addr)
        .arg("--dir")
        .arg(journal)
        .arg("--key")
        .arg(key)
        .args(args);
    Daemon::spawn(cmd)
}

/// Restores the newest point; it must equal the disk as protect left it.
pub fn check_newest_point(repl: &Replication, dir: &Path, disk: &Path) {
    let points = points(&repl.journal);
    let newest = points
        .last()
        .unwrap_or_else(|| repl.fail("the journal has no restore point"));
    let image = dir.join("newest.img");
    restore(&repl.journal, &newest.id.to_string(), &image, &repl.key);
    if let Some(difference) = files_differ(&image, disk) {
        repl.fail(&format!(
            "the newest point ({}) does not equal the final disk: {difference}\npoints:\n{}",
            newest.id,
            table(&points)
        ));
    }
    std::fs::remove_file(&image).expect("remove the restored image");
}

/// Points as a compact table for messages.
pub fn table(points: &[Point]) -> String {
    points
        .iter()
        .map(|p| {
            format!(
                "  {:>4}  {} ({})  seq {}..{}  {} bytes{}{}",
                p.id,
                p.time,
                p.time_ns,
                p.first_seq,
                p.last_seq,
                p.bytes,
                if p.ends_on_barrier { "  barrier" } else { "" },
                p.tag
                    .as_ref()
                    .map(|tag| format!("  tag {tag:?}"))
                    .unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_nanos() as u64
}

/// The time at the start of a log line (`2026-11-23T05:54:39.188095Z  INFO ...`).
pub fn log_time(line: &str) -> u64 {
    let stamp = line.split_whitespace().next().unwrap_or_default();
    let time = humantime::parse_rfc3339(stamp)
        .unwrap_or_else(|e| panic!("no time at the start of {line:?}: {e}"));
    nanos(time)
}

// ---------------------------------------------------------------------------
// Workload clients and their pauses
// ---------------------------------------------------------------------------

/// A Python client that prints lines and reads `go` on its stdin. Killed
/// (by PID) if dropped while running.
pub struct Client {
    pub name: String,
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub lines: Receiver<String>,
    /// The last line it printed.
    pub last: String,
    pub stderr: PathBuf,
}

impl Client {
    pub fn spawn(mut cmd: Command, name: String, dir: &Path) -> Client {
        let stderr = dir.join(format!(
            "{}.stderr",
            name.replace(|c: char| !c.is_alphanumeric(), "-")
        ));
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("create a client's stderr file"));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let lines = stdout_lines(&mut child);
        Client {
            name,
            stdin: child.stdin.take(),
            child,
            lines,
            last: String::new(),
            stderr,
        }
    }

    /// Its next line of output.
    pub fn next_line(&mut self) -> Result<String, String> {
        match self.lines.recv_timeout(PATIENCE) {
            Ok(line) => {
                self.last.clone_from(&line);
                Ok(line)
            }
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "{} printed nothing for {PATIENCE:?}\nits stderr:\n{}",
                self.name,
                self.stderr()
            )),
            Err(RecvTimeoutError::Disconnected) => Err(format!(
                "{} ended its output early\nits stderr:\n{}",
                self.name,
                self.stderr()
            )),
        }
    }

    pub fn go(&mut self) -> Result<(), String> {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(b"go\n")
            .and_then(|()| stdin.flush())
            .map_err(|e| {
                format!(
                    "cannot tell {} to go on: {e}\nits stderr:\n{}",
                    self.name,
                    self.stderr()
                )
            })
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for its last line, which must start with `done`, and a clean
    /// exit; returns that line.
    pub fn finish(mut self) -> Result<String, String> {
        let mut last = std::mem::take(&mut self.last);
        while let Ok(line) = self.lines.recv_timeout(PATIENCE) {
            last = line;
        }
        drop(self.stdin.take());
        let status = self.child.wait().expect("wait for a client");
        if !status.success() || !last.starts_with("done") {
            return Err(format!(
                "{} exited with {status} after printing {last:?}\nits stderr:\n{}",
                self.name,
                self.stderr()
            ));
        }
        Ok(last)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this child's PID; harmless once reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One quiet moment of the workload: the disk copied then, and the time in
/// the middle of it.
pub struct Pause {
    pub time: SystemTime,
    pub image: PathBuf,
}

pub fn sleep_until(when: Instant) {
    std::thread::sleep(when.saturating_duration_since(Instant::now()));
}

/// For each pause, `cdp restore --at` its time (epoch seconds and RFC 3339
/// in turn) must give exactly the disk copied during it, from a point that
/// is newer than the previous pause's and (after pause 0) ends on a barrier,
/// the flush before the pause. Only the first pause may come before the first point
/// (the full sync may still have been running), and then the restore must
/// say so.
pub fn check_pauses(repl: &Replication, dir: &Path, pauses: &[Pause]) {
    let points = points(&repl.journal);
    let first = points
        .first()
        .unwrap_or_else(|| repl.fail("the journal has no restore point"));
    let mut previous: Option<u64> = None;
    let mut checked = 0;
    for (k, pause) in pauses.iter().enumerate() {
        let at = if k % 2 == 0 {
            epoch_seconds(pause.time)
        } else {
            rfc3339(pause.time)
        };
        let out = dir.join(format!("restored-{k}.img"));
        let context = || {
            format!(
                "pause {k} of {}, at {at} ({} ns)\npoints:\n{}",
                pauses.len(),
                nanos(pause.time),
                table(&points)
            )
        };
        let id = match try_restore(&repl.journal, &at, &out, &repl.key) {
            Ok(id) => id,
            Err(e)
                if k == 0
                    && e.contains("before the first restore point")
                    && nanos(pause.time) < first.time_ns =>
            {
                eprintln!("pause 0 came before the first restore point: not checked");
                continue;
            }
            Err(e) => repl.fail(&format!("{e}\n{}", context())),
        };
        if let Some(difference) = files_differ(&out, &pause.image) {
            let equal: Vec<usize> = (0..pauses.len())
                .filter(|&j| files_differ(&out, &pauses[j].image).is_none())
                .collect();
            repl.fail(&format!(
                "the restore chose point {id}, which is not the disk as it was during the \
                 pause: {difference}; it equals the copies made at pauses {equal:?}\n{}",
                context()
            ));
        }
        let point = points.iter().find(|p| p.id == id).unwrap_or_else(|| {
            repl.fail(&format!("restored point {id} is not listed\n{}", context()))
        });
        // The flush before a pause is the last change of its point, except
        // at pause 0, where the full sync may have ended after the flush.
        if k > 0 && !point.ends_on_barrier {
            repl.fail(&format!(
                "point {id} holds the flush before the pause as its last change, yet it is \
                 not marked ends_on_barrier\n{}",
                context()
            ));
        }
        if previous.is_some_and(|p| p >= id) {
            repl.fail(&format!(
                "point {id} is not newer than the previous pause's ({previous:?})\n{}",
                context()
            ));
        }
        previous = Some(id);
        checked += 1;
        std::fs::remove_file(&out).expect("remove a restored image");
    }
    assert!(
        checked + 1 >= pauses.len() && checked > 0,
        "only {checked} of {} pauses were checked",
        pauses.len()
    );
}

/// Writes files `first..first+count` of up to `max_len` pseudo-random bytes
/// each (file `i` is named after `i % 40`, replacing any earlier one),
/// fsyncing every other one; returns what they hold.
pub fn write_files(mount: &Path, first: u64, count: u64, max_len: usize) -> Files {
    let mut files = Files::new();
    for i in first..first + count {
        let len = 1 + (i as usize * 104_729 + 7919) % max_len;
        let data = pseudo_random(len, 1000 + i);
        // At most 40 names: later rounds replace earlier files.
        let name = PathBuf::from(format!("dir{}/file{}", i % 40 % 3, i % 40));
        let path = mount.join(&name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        let mut file = std::fs::File::create(&path).expect("create a file");
        file.write_all(&data).expect("write a file");
        if i % 2 == 0 {
            file.sync_all().expect("fsync a file");
        }
        files.insert(name, data);
    }
    files
}

pub fn verify_files(mount: &Path, files: &Files) {
    for (name, data) in files {
        let got = read_all(&mount.join(name));
        if let Some(i) = first_difference(&got, data) {
            panic!(
                "{} differs from what was written first at byte {i} ({} bytes, {} expected)",
                name.display(),
                got.len(),
                data.len()
            );
        }
    }
}

pub fn fsck(device: &Path, what: &str) {
    let output = Command::new("fsck.ext4")
        .args(["-n", "-f"])
        .arg(device)
        .output()
        .expect("run fsck.ext4");
    assert!(
        output.status.success(),
        "{what}: fsck.ext4 -n -f exited with {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

pub fn make_dir(parent: &Path, name: &str) -> PathBuf {
    let path = parent.join(name);
    std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    path
}

/// File name (relative to the mount) to the bytes it must hold.
pub type Files = BTreeMap<PathBuf, Vec<u8>>;

// ---------------------------------------------------------------------------
// A disk for a file system: protect serving it on a Unix socket
// ---------------------------------------------------------------------------

/// Unmounts, flushes the loop device's buffers, detaches it and unmounts
/// nbdfuse: everything written through them has reached the export.
pub fn take_down(mount: Mount, device: LoopDevice, fuse: FuseMount) {
    mount.unmount();
    run(Command::new("blockdev")
        .arg("--flushbufs")
        .arg(&device.path));
    device.detach();
    fuse.unmount();
}

/// Size of [`OnSocket`]'s disk.
pub const FS_DISK: u64 = 64 * MIB;

/// A sparse 64 MiB disk protected through a Unix socket, with empty `fuse`
/// and `mnt` directories beside it for nbdfuse and a mount.
pub struct OnSocket {
    pub repl: Replication,
    pub disk: PathBuf,
    pub fuse_dir: PathBuf,
    pub mount_dir: PathBuf,
    /// Bind it first when destructuring, so that it is dropped last.
    pub dir: tempfile::TempDir,
}

impl OnSocket {
    /// Starts target and protect (`--socket DIR/nbd.sock PROTECT_ARGS...`,
    /// the target with TARGET_ARGS...); `args` may name `{dir}`, replaced by
    /// the directory's path.
    pub fn start(protect_args: &[&str], target_args: &[&str]) -> OnSocket {
        let dir = scratch();
        let disk = dir.path().join("disk.img");
        sparse_file(&disk, FS_DISK);
        let fuse_dir = make_dir(dir.path(), "fuse");
        let mount_dir = make_dir(dir.path(), "mnt");
        let socket = dir.path().join("nbd.sock");
        let root = dir.path().to_str().expect("UTF-8 path");
        let args: Vec<String> = protect_args
            .iter()
            .map(|a| a.replace("{dir}", root))
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let socket_arg = socket.to_str().expect("UTF-8 path");
        let repl = Replication::start_full(
            dir.path(),
            &disk,
            &["--socket", socket_arg],
            &args,
            target_args,
        );
        OnSocket {
            repl,
            disk,
            fuse_dir,
            mount_dir,
            dir,
        }
    }
}

/// Point id → tier (`journal`, `long-term`, `both`), from `cdp points --json`.
pub fn tiers(dir: &Path) -> std::collections::BTreeMap<u64, String> {
    let text = run_stdout(cdp().arg("points").arg("--dir").arg(dir).arg("--json"));
    let json: serde_json::Value = serde_json::from_str(&text).expect("cdp points --json");
    json["points"]
        .as_array()
        .unwrap_or_else(|| panic!("no points array in {text}"))
        .iter()
        .map(|p| {
            let id = p["id"].as_u64().expect("id");
            (id, p["tier"].as_str().expect("tier").to_string())
        })
        .collect()
}
