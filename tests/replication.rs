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
use std::process::Command;
use std::time::Duration;

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
/// process compares the disk with the target's copy while the workload
/// writes (which carries a change made while no protect ran), and the
/// points of both runs restore exactly.
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
    change_behind_protects_back(&disk, 66);
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

/// A restarted protect copies only the chunks that differ from the target's
/// copy: a change of 1 MiB + 777 bytes made while no protect ran touches
/// exactly 17 chunks of 64 KiB, and that is all the second full sync ships.
#[test]
fn a_restarted_protect_copies_only_the_chunks_that_differ() {
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    prefilled_disk(&disk, 9);
    let mut repl = Replication::synced_then_changed(dir.path(), &disk, 67);
    repl.expect_protect_logged(
        "full sync: copying the whole disk",
        "the first protect run did not copy the whole disk",
    );
    repl.start_protect();
    let synced = repl.protect().wait_for_log("full sync complete", PATIENCE);
    repl.stop_protect();
    repl.expect_protect_logged(
        "full sync: comparing the disk with the target's copy",
        "the second protect run did not compare with the target's copy",
    );
    let chunks = EXACT_DISK / (64 << 10);
    let expected = format!("chunks={chunks} differing=17 bytes={}", 17 << 16);
    if !synced.contains(&expected) {
        repl.fail(&format!(
            "the second full sync should report {expected:?}; it logged {synced:?}"
        ));
    }
    check_newest_point(&repl, dir.path(), &disk);
}

/// The target dies (kill -9) in the middle of a restarted protect's
/// comparison, after its first window of digests, and comes back: protect
/// says why it cannot compare, copies the whole disk instead, and the
/// newest point equals the disk.
#[test]
fn a_comparison_the_target_breaks_off_falls_back_to_copying_the_whole_disk() {
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    prefilled_disk(&disk, 10);
    let mut repl = Replication::synced_then_changed(dir.path(), &disk, 69);
    repl.crash_target_into(Duration::ZERO, &[("CDP_CRASH_AT", "seed:digests-sent")]);
    repl.start_protect();
    repl.protect()
        .wait_for_log("cannot compare with the target's copy", PATIENCE);
    repl.crash_target(Duration::from_millis(200));
    let synced = repl.protect().wait_for_log("full sync complete", PATIENCE);
    repl.stop_protect();
    let no_copy = "protect did not copy the whole disk after the comparison broke off";
    repl.expect_protect_logged("full sync: copying the whole disk", no_copy);
    if synced.contains("differing=") {
        repl.fail(no_copy);
    }
    if !repl
        .crashed_target_logs
        .contains("CDP_CRASH_AT=seed:digests-sent")
    {
        repl.fail("the target did not die where the test asked");
    }
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
