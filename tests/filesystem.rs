//! A real file system on the filter. The export is mounted as a file with
//! nbdfuse (this machine has no kernel nbd module), a loop device turns that
//! file into a block device, and ext4 is made, filled, trimmed, changed and
//! checked on it. Then the capture log must replay onto a blank image to the
//! backing disk's exact bytes, and the replayed image must hold every file.
mod common;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const DISK_SIZE: u64 = 256 << 20;

/// File name (relative to the mount) to the bytes it must hold.
type Files = BTreeMap<PathBuf, Vec<u8>>;

#[test]
fn ext4_on_the_filter_replays_exactly() {
    ext4_round_trip(&[]);
}

#[test]
fn ext4_on_the_filter_with_o_direct_replays_exactly() {
    ext4_round_trip(&["--direct"]);
}

/// The whole flow, with `filter_args` added to `cdp filter`. Every resource
/// is a guard declared after what it depends on, so a failed assertion
/// unwinds in the right order: umount, losetup -d, fusermount3 -u, filter.
fn ext4_round_trip(filter_args: &[&str]) {
    require_tools(&[
        "nbdfuse",
        "fusermount3",
        "losetup",
        "blockdev",
        "mkfs.ext4",
        "fsck.ext4",
        "fstrim",
        "mount",
        "umount",
        "sync",
    ]);
    let dir = scratch();
    let backing = dir.path().join("backing.img");
    let capture_log = dir.path().join("capture.log");
    let fuse_dir = make_dir(dir.path(), "fuse");
    let mount_dir = make_dir(dir.path(), "mnt");
    sparse_file(&backing, DISK_SIZE);

    let mut args = vec!["--capture-log", capture_log.to_str().expect("UTF-8 path")];
    args.extend_from_slice(filter_args);
    let filter = Filter::unix(&backing, &args);
    let fuse = FuseMount::nbdfuse(&fuse_dir, &filter.uri, DISK_SIZE);
    // Direct I/O keeps the FUSE file's page cache out of the way: every
    // block the file system writes or reads is a request to the filter.
    let device = LoopDevice::attach(&fuse.file, true);
    run(Command::new("mkfs.ext4")
        .args(["-F", "-q"])
        .arg(&device.path));
    let mount = Mount::new(&device.path, &mount_dir, &[]);
    let files = fill_trim_and_change(&mount_dir);
    verify_files(&mount_dir, &files);
    mount.unmount();
    // Drop the loop device's own cache so that fsck reads from the filter.
    run(Command::new("blockdev")
        .arg("--flushbufs")
        .arg(&device.path));
    fsck(&device.path);
    device.detach();
    fuse.unmount();
    let filter_log = filter.stop_ok();

    let counts = count_records(&capture_log);
    eprintln!("filter {filter_args:?}: captured {counts:?}");
    assert!(
        counts.writes > 0 && counts.trims > 0 && counts.flushes > 0,
        "the capture should hold writes, trims (mkfs discard, fstrim) and flushes: {counts:?}"
    );
    assert!(
        filter_log.contains(&format!("records={} ", counts.total())),
        "the filter's summary does not match the {} records in the log:\n{filter_log}",
        counts.total()
    );

    let replayed = dir.path().join("replayed.img");
    sparse_file(&replayed, DISK_SIZE);
    let summary = run_stdout(
        cdp()
            .arg("replay")
            .arg("--capture-log")
            .arg(&capture_log)
            .arg("--onto")
            .arg(&replayed),
    );
    assert!(
        summary.starts_with(&format!("applied {} records", counts.total())),
        "replay applied something else than the {} records in the log: {summary}",
        counts.total()
    );
    assert_same_bytes(&backing, &replayed);

    let device = LoopDevice::attach(&replayed, false);
    fsck(&device.path);
    let mount = Mount::new(&device.path, &mount_dir, &["-o", "ro,noload"]);
    verify_files(&mount_dir, &files);
    mount.unmount();
    device.detach();
}

fn make_dir(parent: &Path, name: &str) -> PathBuf {
    let path = parent.join(name);
    std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    path
}

fn fsck(device: &Path) {
    run(Command::new("fsck.ext4").args(["-n", "-f"]).arg(device));
}

/// Writes, fsyncs, deletes, trims, writes more, overwrites in place and
/// truncates; returns what every surviving file must hold.
fn fill_trim_and_change(root: &Path) -> Files {
    let mut files = Files::new();
    for sub in ["a", "b", "c"] {
        make_dir(root, sub);
    }
    // Round 1: 36 files of 4 KiB to ~400 KiB, most not a multiple of the
    // block size (about 7 MiB in all).
    for i in 0..36u64 {
        let len = ((i * 7919) % 97 + 1) as usize * 4099 + (i as usize * 13) % 4096;
        let name = PathBuf::from(["a", "b", "c"][i as usize % 3]).join(format!("one-{i:02}"));
        create(root, &name, pseudo_random(len, 1000 + i), &mut files);
    }
    syncfs(root);
    // Free a third of them and hand the space back to the filter.
    let doomed: Vec<PathBuf> = files.keys().step_by(3).cloned().collect();
    for name in doomed {
        remove(root, &name, &mut files);
    }
    syncfs(root);
    let report = run_stdout(Command::new("fstrim").arg("-v").arg(root));
    let trimmed = trimmed_bytes(&report);
    assert!(trimmed > 0, "fstrim trimmed nothing: {report}");
    eprintln!("fstrim: {}", report.trim());

    // Round 2: new files into the trimmed space, one of them large.
    for i in 0..12u64 {
        let len = if i == 0 {
            3 << 20
        } else {
            (i as usize * 33_331) % 300_000 + 1
        };
        let name = PathBuf::from(["b", "c"][i as usize % 2]).join(format!("two-{i:02}"));
        create(root, &name, pseudo_random(len, 2000 + i), &mut files);
    }
    // In-place overwrites (straddling block boundaries) and truncations of
    // survivors from round 1.
    let survivors: Vec<PathBuf> = files
        .keys()
        .filter(|name| name.to_string_lossy().contains("one-"))
        .cloned()
        .collect();
    for (n, name) in survivors.iter().enumerate().take(12) {
        let content = files.get_mut(name).expect("survivor");
        let file = OpenOptions::new()
            .write(true)
            .open(root.join(name))
            .expect("open survivor");
        if n % 3 == 2 {
            let len = content.len() / 2 + 1;
            file.set_len(len as u64).expect("truncate survivor");
            content.truncate(len);
        } else {
            let at = (content.len() / 3) & !0x7f;
            let patch = pseudo_random((content.len() / 4).max(1), 3000 + n as u64);
            let end = (at + patch.len()).min(content.len());
            file.write_all_at(&patch[..end - at], at as u64)
                .expect("overwrite survivor");
            content[at..end].copy_from_slice(&patch[..end - at]);
        }
        file.sync_all().expect("fsync survivor");
    }
    // A deletion that is never trimmed: stale blocks stay on the disk.
    let last = survivors.last().expect("survivors").clone();
    remove(root, &last, &mut files);
    syncfs(root);
    files
}

/// `sync -f`: syncs our file system only, not every one on the machine.
fn syncfs(root: &Path) {
    run(Command::new("sync").arg("-f").arg(root));
}

fn create(root: &Path, name: &Path, content: Vec<u8>, files: &mut Files) {
    let path = root.join(name);
    let mut file = File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.write_all(&content)
        .and_then(|()| file.sync_all())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    files.insert(name.to_path_buf(), content);
}

fn remove(root: &Path, name: &Path, files: &mut Files) {
    let path = root.join(name);
    std::fs::remove_file(&path).unwrap_or_else(|e| panic!("rm {}: {e}", path.display()));
    files.remove(name);
}

/// The byte count in `fstrim -v` output ("/mnt: 1.2 MiB (1249280 bytes) trimmed").
fn trimmed_bytes(report: &str) -> u64 {
    report
        .split_once('(')
        .and_then(|(_, rest)| rest.split_once(" bytes)"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected fstrim output {report:?}"))
}

/// Asserts the file system under `root` holds exactly `files` (besides
/// lost+found), byte for byte.
fn verify_files(root: &Path, files: &Files) {
    let mut found = Vec::new();
    list_files(root, Path::new(""), &mut found);
    let expected: Vec<&PathBuf> = files.keys().collect();
    let found_refs: Vec<&PathBuf> = found.iter().collect();
    assert_eq!(found_refs, expected, "files under {}", root.display());
    for (name, content) in files {
        let path = root.join(name);
        let actual = read_all(&path);
        assert_eq!(
            actual.len(),
            content.len(),
            "{} has the wrong length",
            path.display()
        );
        if let Some(i) = actual.iter().zip(content).position(|(a, b)| a != b) {
            panic!(
                "{} differs first at byte {i} ({:#04x}, expected {:#04x})",
                path.display(),
                actual[i],
                content[i]
            );
        }
    }
}

fn list_files(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    let dir = root.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry"))
        .collect();
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let name = rel.join(entry.file_name());
        if name == Path::new("lost+found") {
            continue;
        }
        if entry.file_type().expect("file type").is_dir() {
            list_files(root, &name, out);
        } else {
            out.push(name);
        }
    }
    out.sort();
}
