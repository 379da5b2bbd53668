//! The long-term tier end to end: `cdp target` rolling the journal into a
//! base image and delta images on a shortened schedule, retention merging
//! and removing, crashes (the `CDP_CRASH_AT` hook kill -9s the target between
//! two durable steps) in the middle of rolls and merges, and restores from
//! every tier compared byte for byte with copies of the disk made while the
//! seeded workload paused.
mod common;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::replication::*;
use common::*;

/// Rolls every second, nothing expires: each pause restores exactly, some
/// through long-term layers alone. Then retention runs (journal segments
/// removed, long-term points merged into the base, each merge step crashed
/// once and recovered): every point still listed restores exactly.
#[test]
fn restores_from_every_tier_and_through_crashed_merges_are_exact() {
    let (repl, dir, pauses) = exactness_with_target(
        &[21],
        &[],
        &[
            "--long-term-every",
            "1s",
            "--short-term-retention",
            "forever",
            "--long-term-retention",
            "forever",
            "--segment-size",
            "256KiB",
        ],
    );
    let expected = pause_points(&repl, dir.path(), &pauses);
    let long_term = tiers(&repl.journal)
        .into_iter()
        .filter(|(_, tier)| tier != "journal")
        .count();
    assert!(
        long_term >= 3,
        "only {long_term} long-term points after the workload\n{}",
        repl.logs()
    );
    let (key, dir_path) = repl.stop_target();
    let mut keep = long_term;
    for step in [
        "merge:marked",
        "merge:base-written",
        "merge:map-written",
        "merge:catalog-switched",
    ] {
        keep -= 1;
        let keep_arg = keep.to_string();
        let args = [
            "--long-term-every",
            "1h",
            "--short-term-retention",
            "0s",
            "--keep-long-term",
            &keep_arg,
            "--segment-size",
            "256KiB",
        ];
        crash_at(&dir_path, &key, step, &args);
        check_expected(&dir_path, &key, dir.path(), &expected, step);
        let target = target_with(&dir_path, &key, &args, None);
        std::thread::sleep(Duration::from_secs(2));
        let log = target.stop_ok();
        check_expected(
            &dir_path,
            &key,
            dir.path(),
            &expected,
            &format!("{step}, recovered\n{log}"),
        );
    }
    let tiers = tiers(&dir_path);
    let only_long_term = tiers.values().filter(|t| *t == "long-term").count();
    assert!(
        only_long_term >= 1 && tiers.values().filter(|t| *t != "journal").count() <= keep,
        "after retention with --keep-long-term {keep}: {tiers:?}"
    );
}

/// The target crashes at each step of a roll in turn; after each crash,
/// and after the restart that recovers, every pause restores exactly.
#[test]
fn crashes_during_a_roll_keep_every_point_exact() {
    let (repl, dir, pauses) = exactness_with_target(&[22], &[], &["--long-term-every", "1h"]);
    let expected = pause_points(&repl, dir.path(), &pauses);
    let (key, dir_path) = repl.stop_target();
    let args = ["--long-term-every", "1s"];
    for step in ["roll:image-written", "roll:image-in-place", "roll:done"] {
        crash_at(&dir_path, &key, step, &args);
        check_expected(&dir_path, &key, dir.path(), &expected, step);
    }
    let target = target_with(&dir_path, &key, &args, None);
    std::thread::sleep(Duration::from_secs(2));
    target.stop_ok();
    check_expected(&dir_path, &key, dir.path(), &expected, "recovered");
    let tiers = tiers(&dir_path);
    assert!(
        tiers.values().any(|t| t == "both"),
        "the roll made no long-term point: {tiers:?}"
    );
}

/// For each pause, the point a restore at its time picks, and the copy of
/// the disk it must equal.
fn pause_points(
    repl: &Replication,
    scratch: &Path,
    pauses: &[Pause],
) -> BTreeMap<u64, std::path::PathBuf> {
    let mut expected = BTreeMap::new();
    for (k, pause) in pauses.iter().enumerate() {
        let out = scratch.join(format!("pick-{k}.img"));
        if let Ok(id) = try_restore(&repl.journal, &epoch_seconds(pause.time), &out, &repl.key) {
            expected.insert(id, pause.image.clone());
        }
        let _ = std::fs::remove_file(&out);
    }
    assert!(
        expected.len() >= 5,
        "too few pauses had a point: {expected:?}"
    );
    expected
}

/// Every point of `expected` still listed restores to its copy of the disk.
fn check_expected(
    dir: &Path,
    key: &Path,
    scratch: &Path,
    expected: &BTreeMap<u64, std::path::PathBuf>,
    context: &str,
) {
    let listed = tiers(dir);
    let mut checked = Vec::new();
    for (id, image) in expected {
        let Some(tier) = listed.get(id) else { continue };
        let out = scratch.join(format!("check-{id}.img"));
        let restored = try_restore(dir, &id.to_string(), &out, key)
            .unwrap_or_else(|e| panic!("{context}: point {id} ({tier}) is listed but: {e}"));
        assert_eq!(restored, *id);
        if let Some(difference) = files_differ(&out, image) {
            panic!("{context}: point {id} ({tier}) restores wrong: {difference}\n{listed:?}");
        }
        std::fs::remove_file(&out).expect("remove a restored image");
        checked.push(format!("{id} ({tier})"));
    }
    assert!(
        !checked.is_empty(),
        "{context}: no expected point is listed any more: {listed:?}"
    );
    eprintln!(
        "{}: restored exactly: {}",
        context.lines().next().unwrap_or(""),
        checked.join(", ")
    );
}

/// `cdp target` on the directory, with `CDP_CRASH_AT=crash` if given.
fn target_with(dir: &Path, key: &Path, args: &[&str], crash: Option<&str>) -> Daemon {
    let mut cmd = cdp();
    cmd.args(["target", "--listen", "127.0.0.1:0", "--dir"])
        .arg(dir)
        .arg("--key")
        .arg(key)
        .args(args);
    if let Some(step) = crash {
        cmd.env("CDP_CRASH_AT", step);
    }
    Daemon::spawn(cmd)
}

/// Runs the target until it kills itself (SIGKILL) at `step`.
fn crash_at(dir: &Path, key: &Path, step: &str, args: &[&str]) {
    let mut target = target_with(dir, key, args, Some(step));
    target.wait_for_log(&format!("CDP_CRASH_AT={step}"), Duration::from_secs(60));
    target.kill();
}

/// argv: URI SEED BLOCKS. Writes BLOCKS random 4 KiB blocks of random data
/// at random block offsets, then flushes.
const ROUND: &str = r#"
import os, random, sys
import nbd
uri, seed, blocks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
count = h.get_size() // 4096
for _ in range(blocks):
    h.pwrite(os.urandom(4096), 4096 * rng.randrange(count))
h.flush()
h.shutdown()
"#;

/// A long run with a short schedule and tight retention: 40 rounds of 2 MiB
/// of random writes to a 16 MiB disk (80 MiB in all) while the target rolls
/// every second, keeps 3 long-term points and 1 s of journal. The space the
/// target uses must level off far below what was written, and at the end
/// the newest point equals the disk and every long-term point restores.
#[test]
fn retention_keeps_space_bounded_over_a_long_run() {
    require_tools(&["python3"]);
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    sparse_file(&disk, 16 * MIB);
    let mut repl = Replication::start_full(
        dir.path(),
        &disk,
        &["--listen", "127.0.0.1:0"],
        &["--rpo", RPO],
        &[
            "--long-term-every",
            "1s",
            "--short-term-retention",
            "1s",
            "--keep-long-term",
            "3",
            "--segment-size",
            "256KiB",
        ],
    );
    repl.protect().wait_for_log("full sync complete", PATIENCE);
    let mut samples = Vec::new();
    for round in 0..40u64 {
        let mut cmd = python(ROUND);
        cmd.arg(repl.uri()).arg(round.to_string()).arg("512");
        run(&mut cmd);
        std::thread::sleep(Duration::from_millis(700));
        let (journal, long_term, points) = space(&repl.journal);
        samples.push((round, journal, long_term, points));
    }
    repl.stop_protect();
    let table: Vec<String> = samples
        .iter()
        .map(|(r, j, l, p)| format!("round {r}: journal {j} B, long-term {l} B, {p} points"))
        .collect();
    eprintln!("{}", table.join("\n"));
    let worst = samples[20..]
        .iter()
        .map(|(_, j, l, _)| j + l)
        .max()
        .expect("samples");
    // Base (16 MiB) + 3 deltas and the retained journal, each a few MiB.
    assert!(
        worst < 48 * MIB,
        "space did not level off: at worst {worst} bytes after round 20 (80 MiB written)\n{}\n{}",
        table.join("\n"),
        repl.logs()
    );
    check_newest_point(&repl, dir.path(), &disk);
    // A roll adds its point before the merge that retention then asks for
    // takes the oldest away, so for a moment there is one more than kept
    // (docs/LONGTERM.md, crash safety): wait for the merge.
    let long_term = retry(PATIENCE, || {
        let listed = tiers(&repl.journal);
        let long_term: Vec<u64> = listed
            .iter()
            .filter(|(_, t)| *t != "journal")
            .map(|(id, _)| *id)
            .collect();
        match long_term.len() {
            1..=3 => Ok(long_term),
            n => Err(format!(
                "--keep-long-term 3, yet {n} long-term points: {listed:?}"
            )),
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", repl.logs()));
    for id in long_term {
        let out = dir.path().join(format!("lt-{id}.img"));
        restore(&repl.journal, &id.to_string(), &out, &repl.key);
        std::fs::remove_file(&out).expect("remove a restored image");
    }
}

/// Journal bytes, long-term bytes and point count from `cdp points --json`.
fn space(dir: &Path) -> (u64, u64, usize) {
    let text = run_stdout(cdp().arg("points").arg("--dir").arg(dir).arg("--json"));
    let json: serde_json::Value = serde_json::from_str(&text).expect("cdp points --json");
    let bytes = |field: &str| {
        json[field]
            .as_u64()
            .unwrap_or_else(|| panic!("no {field} in {text}"))
    };
    let points = json["points"].as_array().map_or(0, Vec::len);
    (bytes("journal_bytes"), bytes("long_term_bytes"), points)
}
