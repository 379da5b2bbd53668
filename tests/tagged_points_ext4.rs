//! An application-consistent point of a mounted ext4 through `cdp protect`:
//! `cdp point` freezes the file system (fsfreeze), inserts the tagged point,
//! thaws; writing goes on; the restored point is a clean file system as it
//! is (no journal to replay) holding every file written before the point.
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::replication::*;
use common::tagged::*;
use common::*;

#[test]
fn a_frozen_ext4_point_is_clean_without_journal_replay_and_holds_every_file() {
    require_tools(&[
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "fsck.ext4",
        "fsfreeze",
        "mount",
        "umount",
    ]);
    // `dir` first: dropped last, after everything running in it.
    let OnSocket {
        dir,
        mut repl,
        disk,
        fuse_dir,
        mount_dir,
    } = OnSocket::start(&["--rpo", RPO, "--control", "{dir}/control.sock"], &[]);
    let control = dir.path().join("control.sock");
    repl.protect().wait_for_log("full sync complete", PATIENCE);

    let fuse = FuseMount::nbdfuse(&fuse_dir, &repl.uri(), FS_DISK);
    let device = LoopDevice::attach(&fuse.file, true);
    run(Command::new("mkfs.ext4")
        .args(["-F", "-q"])
        .arg(&device.path));
    let mount = Mount::new(&device.path, &mount_dir, &[]);
    let mut files = write_files(&mount_dir, 0, 24, 256 << 10);
    // Not synced on purpose: freezing must bring everything to the disk.
    let hooks = dir.path().join("hooks");
    let mnt = mount_dir.display();
    let frozen = cdp_point(
        &control,
        "frozen",
        &[
            "--quiesce",
            &format!("{} && fsfreeze -f '{mnt}'", mark(&hooks, "quiesce", "")),
            "--thaw",
            &format!("fsfreeze -u '{mnt}' && {}", mark(&hooks, "thaw", "")),
        ],
    );
    let seq = frozen.durable_seq();
    assert_eq!(marks(&hooks), ["quiesce", "thaw"], "{frozen}");
    let at_point = files.clone();

    // Writing goes on after the thaw: replace files, delete some.
    let started = Instant::now();
    let mut round = 3;
    while started.elapsed() < Duration::from_secs(3) {
        files.extend(write_files(&mount_dir, round * 8, 8, 256 << 10));
        let name = files.keys().nth(round as usize % files.len()).cloned();
        if let Some(name) = name {
            std::fs::remove_file(mount_dir.join(&name)).expect("delete a file");
            files.remove(&name);
        }
        round += 1;
    }
    run(Command::new("sync").arg("-f").arg(&mount_dir));
    verify_files(&mount_dir, &files);
    take_down(mount, device, fuse);
    repl.stop_protect();

    let points = points(&repl.journal);
    let point = tagged(&points, "frozen");
    assert_eq!(point.last_seq, seq, "points:\n{}", table(&points));
    assert!(
        points.last().expect("points").id > point.id,
        "no point after the tagged one:\n{}",
        table(&points)
    );
    let image = dir.path().join("frozen.img");
    restore(&repl.journal, "tag:frozen", &image, &repl.key);
    let device = LoopDevice::attach(&image, false);
    // No journal replay first: a frozen file system is clean as it is.
    fsck(&device.path, "the tagged point");
    let mount = Mount::new(&device.path, &mount_dir, &["-o", "ro,noload"]);
    verify_files(&mount_dir, &at_point);
    mount.unmount();
    device.detach();
    eprintln!(
        "ext4: {} files at the tagged point (seq {seq}), {} at the end; {} points",
        at_point.len(),
        files.len(),
        points.len()
    );
    check_newest_point(&repl, dir.path(), &disk);
}
