//! `cdp target` and `cdp protect` run together for the replication tests.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::collections::BTreeMap;

use super::*;

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
        let log = self.target.kill();
        self.crashed_target_logs.push_str(&log);
        std::thread::sleep(down);
        let addr = self.target.addr.clone();
        self.target = start_target(&self.journal, &self.key, &addr, &self.target_args);
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

    /// SIGTERM to protect: it must exit 0 having synced fully and delivered
    /// everything.
    pub fn stop_protect(&mut self) {
        let protect = self.protect.take().expect("protect running");
        self.protect_log = protect.stop_ok();
        for line in [
            "full sync complete",
            "protect stopped; every captured batch is on the target",
        ] {
            if !self.protect_log.contains(line) {
                self.fail(&format!("cdp protect did not log {line:?}"));
            }
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

/// `cdp target --listen ADDR --dir JOURNAL --key KEY ARGS...`.
pub fn start_target(journal: &Path, key: &Path, addr: &str, args: &[String]) -> Daemon {
    let mut cmd = cdp();
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
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
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
// The seeded workloads
// ---------------------------------------------------------------------------

/// The disk a seeded workload starts from: 64 MiB, already holding data in
/// a pattern of 1 MiB regions (random data, holes, written zeros, partial
/// data at unaligned offsets), so that the full sync matters.
pub const EXACT_DISK: u64 = 64 * MIB;

pub fn prefilled_disk(path: &Path, seed: u64) {
    sparse_file(path, EXACT_DISK);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open disk");
    for region in 0..EXACT_DISK / MIB {
        let at = region * MIB;
        let data = pseudo_random(MIB as usize, seed * 1000 + region);
        match region % 4 {
            0 => file.write_all_at(&data, at),
            1 => Ok(()), // a hole
            2 => file.write_all_at(&vec![0; MIB as usize], at),
            _ => file.write_all_at(&data[..300_000], at + 12_345),
        }
        .expect("prefill the disk");
    }
}

/// Runs one workload per seed (each on its share of the disk, all at once)
/// through `cdp protect PROTECT_ARGS`, then checks a restore at every pause.
pub fn exactness(seeds: &[u64], protect_args: &[&str]) {
    let _ = exactness_with_target(seeds, protect_args, &[]);
}

/// As [`exactness`], with `target_args` for `cdp target`; returns the
/// replication (stopped protect) and its directory for further checks.
pub fn exactness_with_target(
    seeds: &[u64],
    protect_args: &[&str],
    target_args: &[&str],
) -> (Replication, tempfile::TempDir, Vec<Pause>) {
    require_tools(&["python3"]);
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    prefilled_disk(&disk, seeds[0]);
    let mut args = vec!["--rpo", RPO];
    args.extend_from_slice(protect_args);
    let listen = ["--listen", "127.0.0.1:0"];
    let mut repl = Replication::start_full(dir.path(), &disk, &listen, &args, target_args);
    let pauses = workloads(&mut repl, dir.path(), seeds, PAUSES, "", |_, _| {});
    repl.stop_protect();
    check_pauses(&repl, dir.path(), &pauses);
    check_newest_point(&repl, dir.path(), &disk);
    (repl, dir, pauses)
}

/// Runs one WORKLOAD per seed on protect's export (each on its share of
/// the disk, all at once) until they are done, calling `after(k, repl)`
/// once they were told to go on after pause k; returns the pauses (their
/// disk copies named `{TAG}pause-{K}.img` in `dir`).
pub fn workloads(
    repl: &mut Replication,
    dir: &Path,
    seeds: &[u64],
    pauses: u64,
    tag: &str,
    mut after: impl FnMut(usize, &mut Replication),
) -> Vec<Pause> {
    let share = EXACT_DISK / seeds.len() as u64;
    let mut clients: Vec<Client> = seeds
        .iter()
        .enumerate()
        .map(|(i, &seed)| {
            let start = i as u64 * share;
            let mut cmd = python(WORKLOAD);
            cmd.arg(repl.uri())
                .args([seed, start, share, pauses].map(|n| n.to_string()));
            let name = format!("workload seed {seed} on [{start}, {})", start + share);
            Client::spawn(cmd, name, dir)
        })
        .collect();
    let wanted = pauses;
    let mut pauses = Vec::new();
    loop {
        let lines: Vec<String> = clients
            .iter_mut()
            .map(|c| c.next_line().unwrap_or_else(|e| repl.fail(&e)))
            .collect();
        let want = format!("pause {}", pauses.len());
        if lines.iter().all(|l| l.starts_with("done")) {
            break;
        }
        if !lines.iter().all(|l| *l == want) {
            repl.fail(&format!(
                "the clients are out of step: they printed {lines:?}, expected {want:?}"
            ));
        }
        let k = pauses.len();
        let pause = quiet_moment(repl, &dir.join(format!("{tag}pause-{k}.img")), k == 0);
        for client in clients.iter_mut() {
            client.go().unwrap_or_else(|e| repl.fail(&e));
        }
        pauses.push(pause);
        after(k, repl);
    }
    let summaries: Vec<String> = clients
        .into_iter()
        .map(|c| c.finish().unwrap_or_else(|e| repl.fail(&e)))
        .collect();
    eprintln!(
        "seeds {seeds:?}: {} pauses; {}",
        pauses.len(),
        summaries.join("; ")
    );
    assert_eq!(
        pauses.len() as u64,
        wanted,
        "the workloads paused too few times"
    );
    pauses
}

/// While the clients are paused: copies the disk to `image`, (if `first`)
/// waits for protect's full sync, and returns once PAUSE has passed, with
/// the time in its middle. The middle is at least PAUSE/2 after the last
/// write and after the sync completed, so the batches before it are cut
/// and stamped by then.
pub fn quiet_moment(repl: &mut Replication, image: &Path, first: bool) -> Pause {
    let started = Instant::now();
    copy_sparse(&repl.disk, image);
    let mut quiet_since = started;
    if first {
        repl.protect().wait_for_log("full sync complete", PATIENCE);
        quiet_since = Instant::now();
    }
    let middle = (quiet_since + PAUSE / 2).max(Instant::now());
    sleep_until(middle);
    let time = SystemTime::now();
    sleep_until(middle + PAUSE / 2);
    Pause {
        time,
        image: image.to_path_buf(),
    }
}

/// Pauses each workload makes (after a flush); it flushes once more at its end.
pub const PAUSES: u64 = 10;

/// argv: URI SEED START LENGTH PAUSES. Random requests within
/// [START, START+LENGTH): writes (a few bytes to 256 KiB, aligned or not,
/// some with FUA), trims, write-zeroes (some with NO_HOLE), singly or as
/// bursts of concurrent asynchronous requests, often overlapping. After each
/// segment of 10 to 40 steps it flushes, prints `pause N` and waits for
/// `go` on stdin; after the last segment it flushes and prints `done ...`.
pub const WORKLOAD: &str = r#"
import random, sys
import nbd

uri = sys.argv[1]
seed, start, length, pauses = (int(x) for x in sys.argv[2:6])
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
for what in ("can_flush", "can_fua", "can_trim", "can_zero"):
    if not getattr(h, what)():
        sys.exit(f"the export does not {what}")
counts = {"write": 0, "fua": 0, "trim": 0, "zero": 0, "aio": 0, "flush": 0}

def extent(lo, hi, max_len):
    """A random range within [lo, hi): aligned to 4 KiB or not."""
    if rng.random() < 0.5:
        n = min(4096 * rng.randint(1, max_len // 4096), hi - lo)
        return lo + 4096 * rng.randrange((hi - lo - n) // 4096 + 1), n
    n = min(rng.choice([rng.randint(1, 4095), rng.randint(1, max_len)]), hi - lo)
    return lo + rng.randrange(hi - lo - n + 1), n

def request(lo, hi, aio, keep):
    r = rng.random()
    if r < 0.6:
        off, n = extent(lo, hi, 256 << 10)
        fua = rng.random() < 0.15
        flags = nbd.CMD_FLAG_FUA if fua else 0
        counts["write"] += 1
        counts["fua"] += fua
        data = rng.randbytes(n)
        if aio:
            buf = nbd.Buffer.from_bytearray(bytearray(data))
            keep.append(buf)
            return h.aio_pwrite(buf, off, flags=flags)
        h.pwrite(data, off, flags)
    elif r < 0.8:
        off, n = extent(lo, hi, 1 << 20)
        counts["trim"] += 1
        if aio:
            return h.aio_trim(n, off)
        h.trim(n, off)
    else:
        off, n = extent(lo, hi, 1 << 20)
        flags = nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0
        counts["zero"] += 1
        if aio:
            return h.aio_zero(n, off, flags=flags)
        h.zero(n, off, flags)

def burst():
    """2 to 16 concurrent requests, in a 1 MiB window half the time."""
    lo, hi = start, start + length
    if rng.random() < 0.5:
        lo = start + rng.randrange(length - (1 << 20) + 1)
        hi = lo + (1 << 20)
    keep, cookies = [], []
    for _ in range(rng.randint(2, 16)):
        cookies.append(request(lo, hi, True, keep))
        counts["aio"] += 1
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie in cookies:
        h.aio_command_completed(cookie)  # raises if the request failed

def segment():
    for _ in range(rng.randint(10, 40)):
        if rng.random() < 0.2:
            burst()
        else:
            request(start, start + length, False, None)
    h.flush()
    counts["flush"] += 1

for p in range(pauses):
    segment()
    print(f"pause {p}", flush=True)
    line = sys.stdin.readline().strip()
    if line != "go":
        sys.exit(f"expected go after pause {p}, got {line!r}")
segment()
h.shutdown()
print("done " + " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
"#;

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
