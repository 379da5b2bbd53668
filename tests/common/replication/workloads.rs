//! The seeded workloads of the replication tests: a prefilled disk, libnbd
//! writes with pauses, and the exactness check that every pause restores
//! byte for byte.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Instant, SystemTime};

use super::*;

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
