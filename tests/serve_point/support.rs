//! Helpers for `tests/serve_point.rs`: `cdp serve-point` as a daemon, a
//! target directory holding a known history (a prefilled disk changed by
//! aligned qemu-io rounds, rolled into long-term points every second), the
//! clients' scripts, and a fingerprint of a directory tree.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tempfile::TempDir;

use crate::common::replication::*;
use crate::common::*;

/// A running `cdp serve-point`; killed if dropped while running.
pub struct Served {
    pub daemon: Daemon,
    /// `nbd://127.0.0.1:PORT/` or `nbd+unix:///?socket=PATH`.
    pub uri: String,
}

/// `cdp serve-point --dir DIR --key KEY --at AT LISTEN... ARGS...`.
pub fn serve(dir: &Path, key: &Path, at: &str, listen: &[&str], args: &[&str]) -> Served {
    let mut cmd = serve_point_command(dir, key, at);
    cmd.args(listen).args(args);
    let daemon = Daemon::spawn(cmd);
    let (uri, _) = nbd_uri(&daemon.addr);
    Served { daemon, uri }
}

/// `cdp serve-point` on TCP, 127.0.0.1 and a free port.
pub fn serve_tcp(dir: &Path, key: &Path, at: &str, args: &[&str]) -> Served {
    serve(dir, key, at, &["--listen", "127.0.0.1:0"], args)
}

pub fn serve_point_command(dir: &Path, key: &Path, at: &str) -> Command {
    let mut cmd = cdp();
    cmd.arg("serve-point")
        .arg("--dir")
        .arg(dir)
        .arg("--key")
        .arg(key)
        .arg("--at")
        .arg(at)
        .env("RUST_BACKTRACE", "0");
    cmd
}

/// Runs a client to completion (whatever its exit status).
pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// stdout and stderr of a finished command, for messages.
pub fn text(output: &Output) -> String {
    format!(
        "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

impl Served {
    /// Panics with `what`, what the client did and the server's log.
    pub fn fail(&self, what: &str, output: Option<&Output>) -> ! {
        let client = output.map(text).unwrap_or_default();
        panic!(
            "{what}\n{client}\n--- serve-point log ---\n{}",
            self.daemon.log()
        )
    }

    /// Runs a client that must exit 0; returns its output.
    pub fn run_ok(&self, cmd: &mut Command) -> Output {
        let out = output(cmd);
        if !out.status.success() {
            self.fail(&format!("{cmd:?} failed"), Some(&out));
        }
        out
    }

    /// `qemu-img compare` of the export with `image` must find them identical.
    pub fn compare(&self, image: &Path, what: &str) {
        let out = output(
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(&self.uri)
                .arg(image),
        );
        if !out.status.success() {
            self.fail(
                &format!("{what}: the export differs from {}", image.display()),
                Some(&out),
            );
        }
    }
}

// ---------------------------------------------------------------------------
// A known history
// ---------------------------------------------------------------------------

/// qemu-io rounds written through protect, a flush after each, a pause
/// between: every change is 4 KiB aligned and every write's pattern is not
/// zero, so a block reads as zeros exactly where the point's layers hold it
/// as a zero block or not at all (where block status must say "hole").
pub const ROUNDS: [&[&str]; 3] = [
    &[
        "write -P 0xab 1M 1M",
        "write -P 0xcd 8M 64k",
        "discard 16M 4M",
        "write -z 4M 1M",
    ],
    &[
        "write -P 0x11 3M 12k",
        "write -z 1M 512k",
        "write -P 0x22 20M 4k",
    ],
    &[
        "write -P 0x33 33800k 256k",
        "discard 40M 64k",
        "write -P 0x44 63M 1M",
    ],
];

/// A target directory whose history is known, with both daemons stopped.
pub struct Known {
    pub tmp: TempDir,
    /// The target's directory.
    pub dir: PathBuf,
    pub key: PathBuf,
    /// The protected disk as protect left it: the newest point's bytes.
    pub disk: PathBuf,
    /// `cdp points --json`, at the end.
    pub points: Vec<Point>,
}

/// A 64 MiB prefilled disk protected into a target rolling a long-term
/// point every second, changed by [`ROUNDS`]; the newest point must restore
/// to the disk.
pub fn known_history(seed: u64) -> Known {
    require_tools(&["qemu-io", "python3"]);
    let tmp = scratch();
    let disk = tmp.path().join("disk.img");
    prefilled_disk(&disk, seed);
    let mut repl = Replication::start_full(
        tmp.path(),
        &disk,
        &["--listen", "127.0.0.1:0"],
        &["--rpo", RPO],
        &["--long-term-every", "1s"],
    );
    repl.protect().wait_for_log("full sync complete", PATIENCE);
    for round in ROUNDS {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", &repl.uri()]);
        for op in round.iter().chain(&["flush"]) {
            cmd.arg("-c").arg(op);
        }
        let out = output(&mut cmd);
        if !out.status.success() || String::from_utf8_lossy(&out.stdout).contains("failed") {
            repl.fail(&format!("qemu-io {round:?}\n{}", text(&out)));
        }
        std::thread::sleep(PAUSE);
    }
    repl.stop_protect();
    // Let the target roll what it holds, then stop it: nothing changes the
    // directory from here on but what a test does.
    std::thread::sleep(Duration::from_millis(1500));
    let (key, dir) = repl.stop_target();
    let points = points(&dir);
    let newest = points.last().expect("the target holds points").id;
    let image = tmp.path().join("newest.img");
    restore(&dir, &newest.to_string(), &image, &key);
    if let Some(difference) = files_differ(&image, &disk) {
        panic!("the newest point {newest} does not restore to the disk: {difference}");
    }
    std::fs::remove_file(&image).expect("remove the restored image");
    Known {
        tmp,
        dir,
        key,
        disk,
        points,
    }
}

/// Every file under `dir` with its size and SHA-256, sorted, one per line
/// (directories are listed too, so an added empty one shows).
pub fn fingerprint(dir: &Path) -> String {
    let out = run_stdout(
        Command::new("sh")
            .arg("-c")
            .arg("cd \"$1\" && find . -type d | sort && find . -type f -exec sha256sum {} + | sort -k2 && find . -type f -printf '%s %p\\n' | sort -k2")
            .arg("sh")
            .arg(dir),
    );
    assert!(
        out.contains("./journal"),
        "no journal in {}:\n{out}",
        dir.display()
    );
    out
}

// ---------------------------------------------------------------------------
// libnbd scripts
// ---------------------------------------------------------------------------

/// argv: URI IMAGE SEED. 64 reads (1 byte to 1 MiB, aligned or not) issued
/// at once on one connection (at least 32 must be in flight together), then
/// each compared with IMAGE; prints every mismatch and exits 1 if there was
/// one.
pub const PARALLEL_READS: &str = r#"
import random, sys
import nbd

uri, image, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
data = open(image, "rb").read()
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
if size != len(data):
    sys.exit(f"export is {size} bytes, {image} {len(data)}")
reads = []
for i in range(64):
    n = rng.choice([rng.randint(1, 4096), rng.randint(1, 1 << 20), 4096, 65536])
    off = rng.randrange(size - n + 1)
    if i % 2 == 0:
        off -= off % 4096
    buf = nbd.Buffer(n)
    reads.append((h.aio_pread(buf, off), buf, off, n))
most = h.aio_in_flight()
if most < 32:
    sys.exit(f"only {most} of the 64 reads were in flight at once")
while h.aio_in_flight() > 0:
    h.poll(-1)
wrong = 0
for cookie, buf, off, n in reads:
    h.aio_command_completed(cookie)
    if buf.to_bytearray() != data[off:off + n]:
        wrong += 1
        print(f"read of {n} bytes at {off} differs from the image")
h.shutdown()
print(f"done: 64 reads, up to {most} in flight, {wrong} wrong")
sys.exit(1 if wrong else 0)
"#;

/// argv: URI WRITE... where a write is `OFFSET:LEN:BYTE`: all issued at once
/// as asynchronous writes on one connection, then flushed.
pub const PARALLEL_WRITES: &str = r#"
import sys
import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
writes = []
for spec in sys.argv[2:]:
    off, n, byte = (int(x) for x in spec.split(":"))
    buf = nbd.Buffer.from_bytearray(bytearray([byte]) * n)
    writes.append((h.aio_pwrite(buf, off), buf))
most = h.aio_in_flight()
while h.aio_in_flight() > 0:
    h.poll(-1)
for cookie, _ in writes:
    h.aio_command_completed(cookie)
h.flush()
h.shutdown()
print(f"done: {len(writes)} writes, up to {most} in flight")
"#;
