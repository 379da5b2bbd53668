//! ext4 made and used through `cdp protect`: every restore point is a clean
//! file system once its journal is replayed.
mod common;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::replication::*;
use common::*;

// ---------------------------------------------------------------------------
// ext4 over protect
// ---------------------------------------------------------------------------

/// ext4 made and used through protect (nbdfuse, a loop device): after the
/// journal is replayed, every restore point from after mkfs is a file system
/// `fsck.ext4 -n -f` finds clean, and the last one holds every file.
#[test]
fn ext4_over_protect_every_point_is_a_clean_file_system() {
    require_tools(&[
        "nbdfuse",
        "fusermount3",
        "losetup",
        "blockdev",
        "mkfs.ext4",
        "fsck.ext4",
        "e2fsck",
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
    } = OnSocket::start(&["--rpo", RPO], &[]);

    let fuse = FuseMount::nbdfuse(&fuse_dir, &repl.uri(), FS_DISK);
    let device = LoopDevice::attach(&fuse.file, true);
    run(Command::new("mkfs.ext4")
        .args(["-F", "-q"])
        .arg(&device.path));
    // Quiet for a while: the points from here on hold the whole mkfs.
    std::thread::sleep(PAUSE);
    let made = SystemTime::now();
    std::thread::sleep(PAUSE);
    let mount = Mount::new(&device.path, &mount_dir, &[]);
    let started = Instant::now();
    let mut files = Files::new();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(3) {
        files.extend(write_files(&mount_dir, round * 8, 8, 512 << 10));
        if round % 2 == 1 {
            // Replace and delete some, so later points free and reuse blocks.
            let name = files.keys().nth(round as usize % files.len()).cloned();
            if let Some(name) = name {
                std::fs::remove_file(mount_dir.join(&name)).expect("delete a file");
                files.remove(&name);
            }
        }
        run(Command::new("sync").arg("-f").arg(&mount_dir));
        round += 1;
    }
    verify_files(&mount_dir, &files);
    take_down(mount, device, fuse);
    repl.stop_protect();

    let points = points(&repl.journal);
    let after_mkfs: Vec<&Point> = points.iter().filter(|p| p.time_ns >= nanos(made)).collect();
    assert!(
        after_mkfs.len() >= 5,
        "only {} restore points after mkfs; points:\n{}\n{}",
        after_mkfs.len(),
        table(&points),
        repl.logs()
    );
    for point in &after_mkfs {
        let image = dir.path().join(format!("point-{}.img", point.id));
        restore(&repl.journal, &point.id.to_string(), &image, &repl.key);
        let device = LoopDevice::attach(&image, false);
        // A crash-consistent image may need its journal replayed; then it
        // must be clean.
        let replay = Command::new("e2fsck")
            .args(["-E", "journal_only", "-y"])
            .arg(&device.path)
            .output()
            .expect("run e2fsck");
        let fsck = Command::new("fsck.ext4")
            .args(["-n", "-f"])
            .arg(&device.path)
            .output()
            .expect("run fsck.ext4");
        if !fsck.status.success() {
            repl.fail(&format!(
                "restore point {} ({}) is not a clean file system after journal replay\n\
                 e2fsck -E journal_only: {}\n{}{}\nfsck.ext4 -n -f: {}\n{}{}\npoints:\n{}",
                point.id,
                point.time,
                replay.status,
                String::from_utf8_lossy(&replay.stdout),
                String::from_utf8_lossy(&replay.stderr),
                fsck.status,
                String::from_utf8_lossy(&fsck.stdout),
                String::from_utf8_lossy(&fsck.stderr),
                table(&points)
            ));
        }
        if point.id == points.last().expect("points").id {
            let mount = Mount::new(&device.path, &mount_dir, &["-o", "ro"]);
            verify_files(&mount_dir, &files);
            mount.unmount();
        }
        device.detach();
        std::fs::remove_file(&image).expect("remove a restored image");
    }
    eprintln!(
        "ext4: {} files; {} points, {} after mkfs, all clean",
        files.len(),
        points.len(),
        after_mkfs.len()
    );
    check_newest_point(&repl, dir.path(), &disk);
}
