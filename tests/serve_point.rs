//! `cdp serve-point` against real NBD clients: points of every tier read
//! byte for byte as `cdp restore` rebuilds them and as the disk was at the
//! workload's pauses; the read-only export answers nbdinfo, qemu-io,
//! qemu-img, qemu-nbd, nbdcopy, fio and libnbd as the filter's read-only
//! export does; ext4 from a served point checks clean and mounts; a writable
//! serve reads its changes back and leaves the target's directory exactly as
//! it was; bad input gets clear errors.
mod common;
#[path = "serve_point/support.rs"]
mod support;

use std::path::Path;
use std::process::Command;

use common::replication::*;
use common::*;
use support::*;

// ---------------------------------------------------------------------------
// (a) Every tier, byte for byte
// ---------------------------------------------------------------------------

/// A long-term point, a journal point after one, the newest point, and the
/// point of every pause: each served point equals its restore (and the
/// pause's copy of the disk). Then retention removes the journal under the
/// long-term points, and the points still listed serve the same bytes.
#[test]
fn points_of_every_tier_serve_what_restore_and_the_pauses_hold() {
    require_tools(&["qemu-img"]);
    let (repl, tmp, pauses) = exactness_with_target(
        &[41],
        &[],
        &[
            "--long-term-every",
            "1s",
            "--short-term-retention",
            "forever",
            "--segment-size",
            "256KiB",
        ],
    );
    let (key, dir) = repl.stop_target();
    let tiers = tiers(&dir);
    let long_term: Vec<u64> = tiers
        .iter()
        .filter(|(_, tier)| *tier != "journal")
        .map(|(id, _)| *id)
        .collect();
    assert!(long_term.len() >= 2, "too few long-term points: {tiers:?}");
    let after_long_term = tiers
        .iter()
        .find(|(id, tier)| **id > long_term[0] && *tier == "journal")
        .map(|(id, _)| *id)
        .unwrap_or_else(|| panic!("no journal point after a long-term point: {tiers:?}"));
    let newest = *tiers.keys().last().expect("points");
    let chosen = [long_term[long_term.len() / 2], after_long_term, newest];
    for id in chosen {
        let image = tmp.path().join(format!("point-{id}.img"));
        restore(&dir, &id.to_string(), &image, &key);
        let served = serve_tcp(&dir, &key, &id.to_string(), &[]);
        served.compare(&image, &format!("point {id} ({})", tiers[&id]));
        let log = served.daemon.stop_ok();
        assert!(
            log.contains(&format!("point={id}")),
            "serve-point did not log the point it served:\n{log}"
        );
    }
    for (k, pause) in pauses.iter().enumerate().skip(1) {
        let at = if k % 2 == 0 {
            epoch_seconds(pause.time)
        } else {
            rfc3339(pause.time)
        };
        let served = serve_tcp(&dir, &key, &at, &[]);
        served.compare(&pause.image, &format!("pause {k}, served --at {at}"));
        served.daemon.stop_ok();
    }

    // Retention: journal segments under the long-term points go.
    let target = start_target(
        &dir,
        &key,
        "127.0.0.1:0",
        &[
            "--long-term-every",
            "1h",
            "--short-term-retention",
            "0s",
            "--segment-size",
            "256KiB",
        ]
        .map(String::from),
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    target.stop_ok();
    let after = common::replication::tiers(&dir);
    assert!(
        after.values().any(|tier| tier == "long-term"),
        "retention left no point in the long-term tier alone: {after:?}"
    );
    let mut served_again = Vec::new();
    for id in chosen.into_iter().filter(|id| after.contains_key(id)) {
        let image = tmp.path().join(format!("point-{id}.img"));
        let served = serve_tcp(&dir, &key, &id.to_string(), &[]);
        served.compare(
            &image,
            &format!("point {id} ({}) after retention", after[&id]),
        );
        served.daemon.stop_ok();
        served_again.push(format!("{id} ({})", after[&id]));
    }
    eprintln!("served again after retention: {served_again:?}; tiers {after:?}");
    assert!(
        !served_again.is_empty(),
        "no chosen point survived retention"
    );
}

// ---------------------------------------------------------------------------
// (b) The read-only export and NBD clients
// ---------------------------------------------------------------------------

/// `write -P 0xab 1M 1M` → (1 MiB, 1 MiB); sizes with k or M.
fn op_range(op: &str) -> (u64, u64) {
    let size = |s: &str| {
        let (digits, unit) = s.split_at(s.trim_end_matches(['k', 'M']).len());
        let n: u64 = digits.parse().expect("a size in ROUNDS");
        n * match unit {
            "k" => 1 << 10,
            "M" => 1 << 20,
            _ => 1,
        }
    };
    let words: Vec<&str> = op.split_whitespace().collect();
    (size(words[words.len() - 2]), size(words[words.len() - 1]))
}

/// `read -P BYTE OFFSET LEN` commands covering `range` of `image`, one per
/// run of equal bytes.
fn pattern_reads(image: &[u8], (offset, len): (u64, u64)) -> Vec<String> {
    let mut reads = Vec::new();
    let mut at = offset as usize;
    let end = (offset + len) as usize;
    while at < end {
        let byte = image[at];
        let run = image[at..end].iter().take_while(|&&b| b == byte).count();
        reads.push(format!("read -P {byte:#04x} {at} {run}"));
        at += run;
    }
    assert!(reads.len() < 64, "{offset}+{len} is not a patterned range");
    reads
}

/// nbdinfo sees a read-only export of the disk's size with the
/// `base:allocation` context, under its name and the default one; its map
/// says "hole" for exactly the 4 KiB blocks that read as zeros.
#[test]
fn nbdinfo_shows_a_read_only_export_and_a_map_of_its_holes() {
    require_tools(&["nbdinfo"]);
    let known = known_history(42);
    let newest = known.points.last().expect("points").id.to_string();
    let served = serve_tcp(&known.dir, &known.key, &newest, &["--export", "point"]);
    let out = served.run_ok(Command::new("nbdinfo").args(["--json", &served.uri]));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let export = &json["exports"][0];
    let mut problems = Vec::new();
    if export["export-size"] != EXACT_DISK {
        problems.push(format!("export-size {}", export["export-size"]));
    }
    for (flag, want) in [
        ("is_read_only", true),
        ("can_trim", false),
        ("can_zero", false),
        ("can_fua", false),
        ("can_multi_conn", true),
    ] {
        if export[flag] != want {
            problems.push(format!("{flag} is {}, not {want}", export[flag]));
        }
    }
    let contexts = export["contexts"].as_array().cloned().unwrap_or_default();
    if !contexts.iter().any(|c| c == "base:allocation") {
        problems.push(format!("contexts {contexts:?} lack base:allocation"));
    }
    if !problems.is_empty() {
        served.fail(&problems.join("; "), Some(&out));
    }
    let port = served.daemon.port();
    let out = served.run_ok(Command::new("nbdinfo").args(["--list", "--json", &served.uri]));
    let listed = String::from_utf8_lossy(&out.stdout);
    if !listed.contains("\"export-name\": \"point\"") {
        served.fail("nbdinfo --list does not show the export", Some(&out));
    }
    let named = format!("nbd://127.0.0.1:{port}/point");
    served.run_ok(Command::new("nbdinfo").args(["--size", &named]));

    let out = served.run_ok(Command::new("nbdinfo").args(["--map", "--json", &served.uri]));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let disk = read_all(&known.disk);
    let mut hole_at = vec![None; disk.len() / 4096];
    for extent in map.as_array().cloned().unwrap_or_default() {
        let (offset, length) = (extent["offset"].as_u64(), extent["length"].as_u64());
        let (Some(offset), Some(length), Some(kind)) = (offset, length, extent["type"].as_u64())
        else {
            served.fail(
                &format!("a map extent without fields: {extent}"),
                Some(&out),
            );
        };
        for block in offset / 4096..(offset + length).div_ceil(4096) {
            hole_at[block as usize] = Some(kind & 1 == 1);
        }
    }
    let wrong: Vec<String> = disk
        .chunks(4096)
        .zip(&hole_at)
        .enumerate()
        .filter(|(_, (data, hole))| **hole != Some(data.iter().all(|&b| b == 0)))
        .map(|(block, (_, hole))| format!("block {block}: map says hole={hole:?}"))
        .collect();
    if !wrong.is_empty() {
        let first: Vec<&String> = wrong.iter().take(8).collect();
        served.fail(
            &format!(
                "{} blocks are mapped wrong (a hole must be exactly a block of zeros): {first:?}",
                wrong.len()
            ),
            Some(&out),
        );
    }
    served.daemon.stop_ok();
}

/// Changes are refused with EPERM (qemu-io cannot even open it for
/// writing); reads answer every client exactly: qemu-io patterns, 64
/// parallel libnbd reads, nbdcopy, qemu-img compare, fio, and qemu-nbd
/// lists it; out-of-range requests fail and the connection goes on. Over a
/// Unix socket.
#[test]
fn read_only_export_refuses_changes_and_serves_every_client() {
    require_tools(&["qemu-io", "qemu-img", "qemu-nbd", "nbdcopy", "fio"]);
    let known = known_history(43);
    let newest = known.points.last().expect("points").id.to_string();
    let socket = known.tmp.path().join("served.sock");
    let socket_arg = socket.to_str().expect("UTF-8 path");
    let served = serve(
        &known.dir,
        &known.key,
        &newest,
        &["--socket", socket_arg],
        &[],
    );
    let before = fingerprint(&known.dir);

    let out = output(Command::new("qemu-io").args([
        "-f",
        "raw",
        &served.uri,
        "-c",
        "write -P 0xff 0 4k",
    ]));
    let text = text(&out);
    let refused = ["Operation not permitted", "Permission denied", "read-only"]
        .iter()
        .any(|reason| text.contains(reason));
    if out.status.success() || !refused {
        served.fail("a qemu-io write was not refused", Some(&out));
    }
    let mut probe = python(PROBES);
    probe.arg(&served.uri).args([
        "pwrite:0:4096:EPERM",
        "zero:0:4096:EPERM",
        "trim:0:4096:EPERM",
        "pread:0:4096:ok",
        "pread:size:4096:EINVAL",
        "pread:size-2048:4096:EINVAL",
        "pwrite:size-2048:4096:EPERM",
        "pread:size-1:1:ok",
    ]);
    served.run_ok(&mut probe);

    let disk = read_all(&known.disk);
    let mut qemu_io = Command::new("qemu-io");
    qemu_io.args(["-r", "-f", "raw", &served.uri]);
    for op in ROUNDS.iter().flat_map(|round| round.iter()) {
        for read in pattern_reads(&disk, op_range(op)) {
            qemu_io.arg("-c").arg(read);
        }
    }
    let out = served.run_ok(&mut qemu_io);
    if String::from_utf8_lossy(&out.stdout).contains("failed") {
        served.fail("qemu-io read back a wrong pattern", Some(&out));
    }

    let mut reads = python(PARALLEL_READS);
    reads.arg(&served.uri).arg(&known.disk).arg("7");
    served.run_ok(&mut reads);

    let copy = known.tmp.path().join("copy.img");
    served.run_ok(Command::new("nbdcopy").arg(&served.uri).arg(&copy));
    if let Some(difference) = files_differ(&copy, &known.disk) {
        served.fail(&format!("nbdcopy's copy: {difference}"), None);
    }
    served.compare(&known.disk, "qemu-img compare with the disk");

    let fio_dir = scratch();
    let out = served.run_ok(
        Command::new("fio")
            .current_dir(fio_dir.path())
            .args(["--name=r", "--ioengine=nbd", "--readonly"])
            .arg(format!("--uri={}", served.uri))
            .args(["--rw=randread", "--bs=4k", "--iodepth=16", "--size=64M"])
            .args(["--time_based", "--runtime=2"]),
    );
    if !String::from_utf8_lossy(&out.stdout).contains("err= 0") {
        served.fail("fio reported errors", Some(&out));
    }
    let out = served.run_ok(Command::new("qemu-nbd").args(["-L", "-k", socket_arg]));
    if !String::from_utf8_lossy(&out.stdout).contains("export: 'cdp'") {
        served.fail("qemu-nbd -L does not list the export", Some(&out));
    }
    let log = served.daemon.stop_ok();
    assert_eq!(
        fingerprint(&known.dir),
        before,
        "serving read-only changed the target directory\n{log}"
    );
    assert!(!socket.exists(), "the Unix socket was left behind");
}

// ---------------------------------------------------------------------------
// (c) ext4
// ---------------------------------------------------------------------------

/// ext4 made and filled through protect; the newest point, served and
/// attached read-only (nbdfuse, `losetup -r`), is a clean file system that
/// mounts read-only with every file.
#[test]
fn ext4_from_a_served_point_checks_clean_and_mounts_read_only() {
    require_tools(&[
        "nbdfuse",
        "fusermount3",
        "losetup",
        "blockdev",
        "mkfs.ext4",
        "fsck.ext4",
        "mount",
        "umount",
    ]);
    // `dir` first: dropped last, after everything running in it.
    let OnSocket {
        dir: tmp,
        mut repl,
        fuse_dir,
        mount_dir,
        ..
    } = OnSocket::start(&["--rpo", RPO], &["--long-term-every", "1s"]);
    let fuse = FuseMount::nbdfuse(&fuse_dir, &repl.uri(), FS_DISK);
    let device = LoopDevice::attach(&fuse.file, true);
    run(Command::new("mkfs.ext4")
        .args(["-F", "-q"])
        .arg(&device.path));
    let mount = Mount::new(&device.path, &mount_dir, &[]);
    let mut files = write_files(&mount_dir, 0, 24, 512 << 10);
    std::thread::sleep(PAUSE);
    files.extend(write_files(&mount_dir, 24, 24, 256 << 10));
    run(Command::new("sync").arg("-f").arg(&mount_dir));
    verify_files(&mount_dir, &files);
    take_down(mount, device, fuse);
    repl.stop_protect();
    let (key, dir) = repl.stop_target();

    let newest = points(&dir).last().expect("points").id.to_string();
    let served_socket = tmp.path().join("served.sock");
    let served_arg = served_socket.to_str().expect("UTF-8 path");
    let served = serve(&dir, &key, &newest, &["--socket", served_arg], &[]);
    let fuse = FuseMount::nbdfuse(&fuse_dir, &served.uri, FS_DISK);
    let attached = run_stdout(
        Command::new("losetup")
            .args(["--find", "--show", "-r"])
            .arg(&fuse.file),
    );
    let device = LoopDevice {
        path: attached.trim().into(),
    };
    let fsck = output(
        Command::new("fsck.ext4")
            .args(["-n", "-f"])
            .arg(&device.path),
    );
    if !fsck.status.success() {
        served.fail("fsck.ext4 -n -f of the served point", Some(&fsck));
    }
    let mount = Mount::new(&device.path, &mount_dir, &["-o", "ro,noload"]);
    verify_files(&mount_dir, &files);
    mount.unmount();
    device.detach();
    fuse.unmount();
    served.daemon.stop_ok();
    eprintln!(
        "ext4: point {newest} served, clean, {} files verified",
        files.len()
    );
}

// ---------------------------------------------------------------------------
// (d) Writable: test failover
// ---------------------------------------------------------------------------

/// Writes of every shape (unaligned, at the end of the disk, 64 at once into
/// shared blocks), trims and zeroes read back; the overlay is an unlinked
/// file in --scratch; after SIGTERM the target directory is byte for byte
/// what it was and the scratch directory is empty, and the point serves its
/// own bytes again.
#[test]
fn writable_serve_reads_changes_back_and_leaves_the_target_untouched() {
    require_tools(&["qemu-io", "nbdcopy", "nbdinfo"]);
    let known = known_history(44);
    let newest = known.points.last().expect("points").id.to_string();
    let before = fingerprint(&known.dir);
    let scratch_dir = make_dir(known.tmp.path(), "scratch");
    let scratch_arg = scratch_dir.to_str().expect("UTF-8 path");
    let served = serve_tcp(
        &known.dir,
        &known.key,
        &newest,
        &["--writable", "--scratch", scratch_arg],
    );
    check_overlay_is_unlinked(&served, &scratch_dir);

    let mut model = read_all(&known.disk);
    let size = model.len() as u64;
    let qemu_ops = [
        ("write -P 0x5a 1000 10000", 1000, 10000, 0x5a),
        ("write -P 0x6b 12k 8k", 12 << 10, 8 << 10, 0x6b),
        ("discard 2M 1M", 2 << 20, 1 << 20, 0),
        ("write -z 3145828 5000", 3_145_828, 5000, 0),
        ("write -P 0x7c 67105864 3000", size - 3000, 3000, 0x7c),
    ];
    let mut qemu_io = Command::new("qemu-io");
    qemu_io.args(["-f", "raw", &served.uri]);
    for (op, offset, len, byte) in qemu_ops {
        qemu_io.arg("-c").arg(op);
        model[offset as usize..(offset + len) as usize].fill(byte);
    }
    served.run_ok(&mut qemu_io);

    // Seven sectors of each of 8 blocks no earlier write touched, and 8
    // more 4 KiB blocks, all in flight at once.
    let mut writes = Vec::new();
    for i in 0..8u64 {
        let block = 5 * MIB + i * 12 * 1024;
        for sector in 1..8u64 {
            writes.push((block + sector * 512, 512, (i * 8 + sector) as u8 | 1));
        }
        writes.push((30 * MIB + i * 8192, 4096, 0xe0 | i as u8));
    }
    let mut python_writes = python(PARALLEL_WRITES);
    python_writes.arg(&served.uri);
    for &(offset, len, byte) in &writes {
        python_writes.arg(format!("{offset}:{len}:{byte}"));
        model[offset as usize..(offset + len) as usize].fill(byte);
    }
    served.run_ok(&mut python_writes);

    let expected = known.tmp.path().join("expected.img");
    std::fs::write(&expected, &model).expect("write the model");
    let mut reads = python(PARALLEL_READS);
    reads.arg(&served.uri).arg(&expected).arg("8");
    served.run_ok(&mut reads);
    let copy = known.tmp.path().join("copy.img");
    served.run_ok(Command::new("nbdcopy").arg(&served.uri).arg(&copy));
    if let Some(difference) = files_differ(&copy, &expected) {
        served.fail(&format!("the changed export: {difference}"), None);
    }
    let out = served.run_ok(Command::new("nbdinfo").args(["--map", "--json", &served.uri]));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let trimmed_is_hole = map.as_array().into_iter().flatten().any(|e| {
        e["offset"].as_u64() <= Some(2 * MIB)
            && e["offset"]
                .as_u64()
                .zip(e["length"].as_u64())
                .map(|(o, l)| o + l)
                >= Some(3 * MIB)
            && e["type"].as_u64().is_some_and(|t| t & 1 == 1)
    });
    if !trimmed_is_hole {
        served.fail(
            "the trimmed MiB at 2 MiB is not a hole in the map",
            Some(&out),
        );
    }
    let log = served.daemon.stop_ok();
    assert!(
        log.contains("overlay_blocks="),
        "no overlay summary in the log:\n{log}"
    );
    assert_eq!(
        fingerprint(&known.dir),
        before,
        "a writable serve changed the target directory\n{log}"
    );
    let left: Vec<_> = std::fs::read_dir(&scratch_dir)
        .expect("list the scratch dir")
        .collect();
    assert!(left.is_empty(), "the scratch directory keeps {left:?}");

    let again = serve_tcp(&known.dir, &known.key, &newest, &[]);
    again.compare(&known.disk, "the point served again after a writable serve");
    again.daemon.stop_ok();
}

/// The overlay is open in serve-point, unlinked, in the scratch directory,
/// and nothing there has a name.
fn check_overlay_is_unlinked(served: &Served, scratch_dir: &Path) {
    let fds = Path::new("/proc")
        .join(served.daemon.pid().to_string())
        .join("fd");
    let targets: Vec<String> = std::fs::read_dir(&fds)
        .expect("list the daemon's descriptors")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .map(|target| target.display().to_string())
        .collect();
    let in_scratch = format!("{}/", scratch_dir.display());
    if !targets
        .iter()
        .any(|t| t.starts_with(&in_scratch) && t.ends_with(" (deleted)"))
    {
        served.fail(
            &format!(
                "no unlinked overlay file from {in_scratch} among its descriptors: {targets:?}"
            ),
            None,
        );
    }
    let named = std::fs::read_dir(scratch_dir)
        .expect("list scratch")
        .count();
    assert_eq!(
        named, 0,
        "the scratch directory holds named files while serving"
    );
}

// ---------------------------------------------------------------------------
// (e) Bad input
// ---------------------------------------------------------------------------

/// Each refused with an error that says what is wrong, no `listening on`,
/// and the target directory untouched.
#[test]
fn bad_input_is_refused_with_clear_errors() {
    let known = known_history(45);
    let before = fingerprint(&known.dir);
    let other_key = keygen(&make_dir(known.tmp.path(), "other"));
    let not_a_target = make_dir(known.tmp.path(), "empty");
    let inside = known.dir.join("journal");
    let newest = known.points.last().expect("points").id.to_string();
    let cases: [(&Path, &Path, &str, Vec<&str>, &str); 7] = [
        (
            &known.dir,
            &known.key,
            "999999",
            vec![],
            "there is no restore point 999999",
        ),
        (
            &known.dir,
            &known.key,
            "2001-01-01T00:00:00Z",
            vec![],
            "is before the first restore point",
        ),
        (
            &known.dir,
            &known.key,
            "soon",
            vec![],
            "neither a point id nor a time",
        ),
        (&known.dir, &other_key, &newest, vec![], "wrong key file"),
        (
            &not_a_target,
            &known.key,
            &newest,
            vec![],
            "is not a target directory",
        ),
        (
            &known.dir,
            &known.key,
            &newest,
            vec!["--writable", "--scratch", inside.to_str().expect("UTF-8")],
            "is inside the target directory",
        ),
        (
            &known.dir,
            &known.key,
            &newest,
            vec!["--scratch", "/nonexistent/scratch"],
            "scratch directory /nonexistent/scratch",
        ),
    ];
    for (dir, key, at, args, want) in cases {
        let mut cmd = serve_point_command(dir, key, at);
        cmd.args(["--listen", "127.0.0.1:0"]).args(&args);
        let out = output(&mut cmd);
        let seen = text(&out);
        assert!(
            !out.status.success() && seen.contains(want) && !seen.contains("listening on"),
            "serve-point --at {at} {args:?} on {} should fail saying {want:?}:\n{seen}",
            dir.display()
        );
    }
    assert_eq!(
        fingerprint(&known.dir),
        before,
        "refused runs changed the target"
    );
}
