//! Replication end to end: `cdp target` and `cdp protect` as real processes,
//! real NBD clients writing through protect, then `cdp points` and
//! `cdp restore` rebuilding the disk as it was at given moments.
//!
//! The core check is exactness: a seeded random workload pauses after each
//! flush; while nothing writes, the test copies the backing disk and notes
//! the wall-clock time in the middle of the pause. The batch holding the
//! writes before a pause is cut within one RPO (200 ms) of the flush, and no
//! later write exists before the pause ends, so a restore at that time must
//! give exactly the copy. Every failure says which pause, which point the
//! restore chose, the first differing byte, and what the daemons logged.
mod common;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::replication::*;
use common::*;
// ---------------------------------------------------------------------------
// The seeded workloads
// ---------------------------------------------------------------------------

#[test]
fn restores_at_each_pause_equal_the_disk_seed_1() {
    exactness(&[1], &[]);
}

#[test]
fn restores_at_each_pause_equal_the_disk_seed_2() {
    exactness(&[2], &[]);
}

#[test]
fn restores_at_each_pause_equal_the_disk_seed_3() {
    exactness(&[3], &[]);
}

/// Two connections write at once, each to its half of the disk; the pauses
/// are common to both (the test waits until both are quiet). Replication is
/// throttled, which must not change any restore.
#[test]
fn restores_at_each_pause_equal_the_disk_two_connections_throttled() {
    exactness(&[4, 5], &["--throttle", "50MiB/s"]);
}

/// Protect stopped and started again on the same disk and target: the new
/// process syncs the whole disk again (which carries a change made while no
/// protect ran), and the points of both runs restore exactly.
#[test]
fn protect_restart_resyncs_and_keeps_earlier_points() {
    require_tools(&["python3"]);
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    prefilled_disk(&disk, 6);
    let mut repl = Replication::start(dir.path(), &disk, &["--rpo", RPO]);
    let first = workloads(&mut repl, dir.path(), &[6], 4, "run1-", |_, _| {});
    repl.stop_protect();
    let before = points(&repl.journal);
    // Behind protect's back: only a full sync can carry this.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .and_then(|f| f.write_all_at(&pseudo_random(MIB as usize + 777, 66), 5 * MIB + 3))
        .expect("change the disk between runs");
    repl.start_protect();
    let second = workloads(&mut repl, dir.path(), &[7], 4, "run2-", |_, _| {});
    repl.stop_protect();
    let after = points(&repl.journal);
    if after.get(..before.len()) != Some(&before[..]) {
        repl.fail(&format!(
            "the points of the first run changed\nbefore:\n{}\nafter:\n{}",
            table(&before),
            table(&after)
        ));
    }
    check_pauses(&repl, dir.path(), &first);
    check_pauses(&repl, dir.path(), &second);
    check_newest_point(&repl, dir.path(), &disk);
}

/// The target crashes (SIGKILL) while the workload writes and comes back on
/// the same address half a second later: protect reconnects, resends what
/// was not acknowledged, and every restore is still exact.
#[test]
fn target_crash_mid_workload_loses_nothing() {
    require_tools(&["python3"]);
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    prefilled_disk(&disk, 8);
    let mut repl = Replication::start(dir.path(), &disk, &["--rpo", RPO]);
    let pauses = workloads(&mut repl, dir.path(), &[8], 5, "", |k, repl| {
        if k == 2 {
            std::thread::sleep(Duration::from_millis(100));
            repl.crash_target(Duration::from_millis(500));
        }
    });
    repl.stop_protect();
    let connects = repl.protect_log.matches("connected to the target").count();
    for line in repl.protect_log.lines() {
        if line.contains("target") && !line.contains("batch is on the target") {
            eprintln!("protect: {line}");
        }
    }
    if connects < 2 {
        repl.fail(&format!(
            "protect connected to the target {connects} times: the crash was not noticed"
        ));
    }
    check_pauses(&repl, dir.path(), &pauses);
    check_newest_point(&repl, dir.path(), &disk);
}

/// `cdp points` lists each point's time; `cdp restore --at` that very
/// time, as listed, must restore that point (the newest at or before it);
/// so must its exact `time_ns` as epoch seconds, while one nanosecond
/// earlier gives the point before (or, for the first, a refusal).
#[test]
fn restore_at_a_listed_time_gives_that_point() {
    require_tools(&["python3"]);
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    prefilled_disk(&disk, 9);
    let mut repl = Replication::start(dir.path(), &disk, &["--rpo", RPO]);
    workloads(&mut repl, dir.path(), &[9], 3, "", |_, _| {});
    repl.stop_protect();
    let points = points(&repl.journal);
    let epoch = |ns: u64| format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000);
    let mut wrong = Vec::new();
    for (i, point) in points.iter().enumerate() {
        let before = i.checked_sub(1).map(|j| points[j].id);
        for (at, want) in [
            (point.time.clone(), Some(point.id)),
            (epoch(point.time_ns), Some(point.id)),
            (epoch(point.time_ns - 1), before),
        ] {
            let out = dir.path().join("restored.img");
            let got = try_restore(&repl.journal, &at, &out, &repl.key);
            let _ = std::fs::remove_file(&out);
            let ok = match (&got, want) {
                (Ok(id), Some(want)) => *id == want,
                (Err(e), None) => e.contains("before the first restore point"),
                _ => false,
            };
            if !ok {
                wrong.push(format!(
                    "  --at {at}: wanted {}, got {}",
                    want.map_or("a refusal".to_string(), |id| format!("point {id}")),
                    match got {
                        Ok(id) => format!("point {id}"),
                        Err(e) => e.lines().last().unwrap_or_default().to_string(),
                    }
                ));
            }
        }
    }
    if !wrong.is_empty() {
        repl.fail(&format!(
            "{} of {} restores by time chose the wrong point:\n{}\npoints:\n{}",
            wrong.len(),
            points.len() * 3,
            wrong.join("\n"),
            table(&points)
        ));
    }
}

/// The disk a seeded workload starts from: 64 MiB, already holding data in
/// a pattern of 1 MiB regions (random data, holes, written zeros, partial
/// data at unaligned offsets), so that the full sync matters.
const EXACT_DISK: u64 = 64 * MIB;

fn prefilled_disk(path: &Path, seed: u64) {
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
fn exactness(seeds: &[u64], protect_args: &[&str]) {
    require_tools(&["python3"]);
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    prefilled_disk(&disk, seeds[0]);
    let mut args = vec!["--rpo", RPO];
    args.extend_from_slice(protect_args);
    let mut repl = Replication::start(dir.path(), &disk, &args);
    let pauses = workloads(&mut repl, dir.path(), seeds, PAUSES, "", |_, _| {});
    repl.stop_protect();
    check_pauses(&repl, dir.path(), &pauses);
    check_newest_point(&repl, dir.path(), &disk);
}

/// Runs one WORKLOAD per seed on protect's export (each on its share of
/// the disk, all at once) until they are done, calling `after(k, repl)`
/// once they were told to go on after pause k; returns the pauses (their
/// disk copies named `{TAG}pause-{K}.img` in `dir`).
fn workloads(
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
fn quiet_moment(repl: &mut Replication, image: &Path, first: bool) -> Pause {
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
const PAUSES: u64 = 10;

/// argv: URI SEED START LENGTH PAUSES. Random requests within
/// [START, START+LENGTH): writes (a few bytes to 256 KiB, aligned or not,
/// some with FUA), trims, write-zeroes (some with NO_HOLE), singly or as
/// bursts of concurrent asynchronous requests, often overlapping. After each
/// segment of 10 to 40 steps it flushes, prints `pause N` and waits for
/// `go` on stdin; after the last segment it flushes and prints `done ...`.
const WORKLOAD: &str = r#"
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
// Initial sync under load
// ---------------------------------------------------------------------------

/// A disk holding a cleanly unmounted ext4 file system (first half) and
/// random data (second half). Protect starts while a writer is already
/// waiting for its socket, so the full sync runs under load; the writer
/// writes self-describing 64 KiB blocks to the second half, one at a time.
/// The first restore point must hold the file system unchanged (fsck clean,
/// same bytes) and, in the second half, exactly the writer's first G writes
/// for some G (a prefix of the stream); the last point must equal the disk.
#[test]
fn initial_sync_under_load_gives_a_consistent_first_point() {
    require_tools(&["python3", "losetup", "mkfs.ext4", "fsck.ext4", "mount"]);
    const SIZE: u64 = 128 * MIB;
    const HALF: u64 = SIZE / 2;
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    sparse_file(&disk, SIZE);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .and_then(|f| f.write_all_at(&pseudo_random(HALF as usize, 77), HALF))
        .expect("fill the second half");
    let mount_dir = make_dir(dir.path(), "mnt");
    {
        let device = LoopDevice::attach(&disk, false);
        run(Command::new("mkfs.ext4")
            .args(["-F", "-q"])
            .arg(&device.path)
            .arg(format!("{}k", HALF / 1024)));
        let mount = Mount::new(&device.path, &mount_dir, &[]);
        write_files(&mount_dir, 0, 24, 2 << 20);
        mount.unmount();
        fsck(&device.path, "the source file system before protect");
        device.detach();
    }
    let original = dir.path().join("original.img");
    copy_sparse(&disk, &original);

    let socket = dir.path().join("nbd.sock");
    let writes = dir.path().join("writes.txt");
    let mut cmd = python(SYNC_WRITER);
    cmd.arg(&socket)
        .args([HALF, HALF, 3].map(|n| n.to_string()))
        .arg(&writes);
    let writer = Client::spawn(cmd, "block writer".into(), dir.path());
    let socket_arg = socket.to_str().expect("UTF-8 path");
    let mut repl = Replication::start_with(
        dir.path(),
        &disk,
        &["--socket", socket_arg],
        &["--rpo", RPO],
    );
    let synced_line = repl.protect().wait_for_log("full sync complete", PATIENCE);
    let summary = writer.finish().unwrap_or_else(|e| repl.fail(&e));
    repl.stop_protect();

    // The writer must have been writing while the sync ran.
    let synced_at = log_time(&synced_line);
    let first_write: u64 = summary
        .split_whitespace()
        .find_map(|w| w.strip_prefix("first_ns="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no first_ns= in the writer's summary {summary:?}"));
    eprintln!(
        "writer: {summary}; full sync complete {} ms after its first write",
        (synced_at as i128 - first_write as i128) / 1_000_000
    );
    assert!(
        first_write < synced_at,
        "the writer's first write completed at {first_write} ns, after the full sync \
         completed ({synced_line}): the sync did not run under load\n{}",
        repl.logs()
    );
    let slots: Vec<u64> = std::fs::read_to_string(&writes)
        .expect("read the writer's log")
        .split_whitespace()
        .map(|s| s.parse().expect("slot number"))
        .collect();

    let points = points(&repl.journal);
    let first = points
        .first()
        .unwrap_or_else(|| repl.fail("no restore point after the full sync"));
    let image = dir.path().join("first.img");
    restore(&repl.journal, &first.id.to_string(), &image, &repl.key);
    let restored = read_all(&image);
    let source = read_all(&original);
    if let Some(i) = first_difference(&restored[..HALF as usize], &source[..HALF as usize]) {
        repl.fail(&format!(
            "the first point's file system half differs from the file system protect \
             started with, first at byte {i}"
        ));
    }
    check_prefix(
        &repl,
        &restored[HALF as usize..],
        &source[HALF as usize..],
        HALF,
        &slots,
    );
    let device = LoopDevice::attach(&image, false);
    fsck(&device.path, "the first restore point");
    device.detach();

    check_newest_point(&repl, dir.path(), &disk);
}

/// Bytes per block of the writers below.
const SLOT: usize = 64 << 10;

/// argv: SOCKET START LENGTH SECONDS LOG. Connects as soon as the socket
/// accepts, then for SECONDS writes 64 KiB blocks to random slots of
/// [START, START+LENGTH), one at a time; block number G is the 16 bytes
/// `CDPW` + G (u32 LE) + its offset (u64 LE), repeated. Writes the slot of
/// every block, in order, to LOG; prints `done writes=N first_ns=T`.
const SYNC_WRITER: &str = r#"
import random, struct, sys, time
import nbd

sock, start, length, seconds, log = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
SLOT = 64 << 10
give_up = time.monotonic() + 60
while True:
    h = nbd.NBD()
    try:
        h.connect_unix(sock)
        break
    except nbd.Error:
        if time.monotonic() > give_up:
            raise
        time.sleep(0.002)
rng = random.Random(7)
slots, first_ns = [], None
end = time.monotonic() + seconds
while time.monotonic() < end:
    slot = rng.randrange(length // SLOT)
    offset = start + slot * SLOT
    h.pwrite(struct.pack("<4sIQ", b"CDPW", len(slots), offset) * (SLOT // 16), offset)
    if first_ns is None:
        first_ns = time.time_ns()
    slots.append(slot)
h.flush()
h.shutdown()
with open(log, "w") as f:
    f.write("\n".join(map(str, slots)))
print(f"done writes={len(slots)} first_ns={first_ns}", flush=True)
"#;

/// Checks that `restored` (a region starting at `base`) holds what the
/// writer's first G blocks made of `original`, for some G: every slot
/// holds its original bytes or a whole block of the writer, and the newest
/// block seen, G - 1, fixes what every slot must hold.
fn check_prefix(repl: &Replication, restored: &[u8], original: &[u8], base: u64, slots: &[u64]) {
    let seen: Vec<Option<u32>> = restored
        .chunks(SLOT)
        .zip(original.chunks(SLOT))
        .enumerate()
        .map(|(slot, (block, before))| {
            if block == before {
                return None;
            }
            let offset = base + (slot * SLOT) as u64;
            let unit = &block[..16];
            let number = u32::from_le_bytes(unit[4..8].try_into().expect("4 bytes"));
            let whole = &unit[..4] == b"CDPW"
                && u64::from_le_bytes(unit[8..].try_into().expect("8 bytes")) == offset
                && block.chunks(16).all(|u| u == unit);
            if !whole {
                repl.fail(&format!(
                    "slot {slot} (offset {offset}) of the first point holds neither its \
                     original bytes nor a whole block of the writer (starts {:02x?})",
                    &block[..32]
                ));
            }
            Some(number)
        })
        .collect();
    let newest = seen.iter().flatten().max().map_or(0, |&g| g as usize + 1);
    let mut expected: Vec<Option<u32>> = vec![None; seen.len()];
    for (number, &slot) in slots.iter().enumerate().take(newest) {
        expected[slot as usize] = Some(number as u32);
    }
    for (slot, (got, want)) in seen.iter().zip(&expected).enumerate() {
        if got != want {
            repl.fail(&format!(
                "the first point holds block {} of the writer's {} up to block {}, which is \
                 not a prefix of its writes: slot {slot} holds {got:?} where the first {newest} \
                 blocks leave {want:?} (None: the original bytes)",
                newest.saturating_sub(1),
                slots.len(),
                newest.saturating_sub(1),
            ));
        }
    }
    eprintln!(
        "first point: the writer's first {newest} of {} blocks, in {} slots",
        slots.len(),
        seen.iter().flatten().count()
    );
}
