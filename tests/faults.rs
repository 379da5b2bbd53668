//! Faults and bad input for replication, with real processes: `cdp target`
//! and `cdp protect` killed with SIGKILL and restarted, connections cut by a
//! proxy, wrong and exposed keys, damaged journal segments, garbage on the
//! replication port, and restores of points that do not exist. Writes come
//! from qemu-io over NBD. After every fault the journal must be one gap-free
//! run of entries, every point must restore, and the newest must equal the
//! source disk byte for byte (`Lab::check_replica`).
mod common;
#[path = "faults/journal.rs"]
mod journal;
#[path = "faults/proxy.rs"]
mod proxy;
#[path = "faults/support.rs"]
mod support;
#[path = "faults/workload.rs"]
mod workload;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use journal::*;
use proxy::*;
use support::*;
use workload::*;

/// Waits up to `patience` for `log()` to contain `needle`; returns the log.
fn wait_for_log(lab: &Lab, patience: Duration, needle: &str, log: impl Fn() -> String) -> String {
    let found = retry(patience, || {
        let text = log();
        text.contains(needle)
            .then_some(text)
            .ok_or_else(String::new)
    });
    found.unwrap_or_else(|_| lab.fail(format!("no {needle:?} in the log within {patience:?}")))
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// Case 1: the target dies (SIGKILL) three times while a writer keeps
/// writing, and comes back on the same port; protect reconnects and
/// catches up.
#[test]
fn target_killed_mid_stream_and_restarted_loses_nothing() {
    require_tools(&["qemu-io"]);
    let lab = Lab::new();
    let disk = lab.disk("disk.img", 1);
    let initial = read_all(&disk);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut target = lab.target(&listen);
    let protect = lab.protect(&disk, &listen);
    let writer = Writer::start(&lab.workload, protect.uri(), 0);
    lab.wait_for_points(1);
    for _ in 0..3 {
        sleep_ms(700);
        target.kill9();
        sleep_ms(300);
        target = lab.target(&listen);
    }
    sleep_ms(700);
    let ops = lab.finish(writer);
    let protect_log = protect.log();
    lab.stop_ok(protect);
    if count(&protect_log, "connected to the target") < 4 {
        lab.fail("protect did not reconnect after each of the 3 target restarts");
    }
    lab.check_replica(&disk, Some((&initial, ops)));
    drop(target);
}

/// Case 1b: the target's file system fills up during the full sync. The
/// target says so (segment path, offset, "No space left on device") and
/// acknowledges nothing it could not journal; protect keeps its batches and
/// retries, backing off, while a writer keeps writing. Once the file system
/// has room, the target reopens its journal at the next attempt (cutting the
/// torn entry off) and goes on; the replica equals the disk.
#[test]
fn a_full_journal_file_system_loses_nothing() {
    let run = FillingTarget::start("1m", &[], 11);
    run.wait_for_target_log("No space left on device");
    sleep_ms(1500);
    if !run.lab.points().is_empty() {
        run.lab
            .fail("a point was listed although the full sync could not be journaled");
    }
    let attempts = count(&run.target.log(), "source connection ended");
    if attempts > 10 {
        run.lab.fail(format!(
            "protect came back {attempts} times in 1.5 s to a target that fails every append; \
             it should back off"
        ));
    }
    run.mount.resize_tmpfs("64m");
    run.lab.wait_for_points(1);
    run.wait_for_target_log("reopening the journal after a failed append");
    run.finish();
}

/// Case 1c: the first long-term roll runs out of room halfway through its
/// image. The target logs it and keeps journaling; once the file system has
/// room, the next attempt succeeds without a restart (a failed roll must not
/// leave its half-written image in the way), and every point, long-term ones
/// included, restores exactly.
#[test]
fn a_roll_that_runs_out_of_room_is_retried_once_there_is_room() {
    let run = FillingTarget::start("3m", &["--long-term-every", "1s"], 13);
    run.wait_for_target_log("long-term work failed");
    sleep_ms(1500);
    if run.target.log().contains("long-term point made") {
        run.lab
            .fail("a long-term point was made on a file system without room for it");
    }
    run.mount.resize_tmpfs("64m");
    run.wait_for_target_log("long-term point made");
    run.finish();
}

/// Cases 1b and 1c: protect replicating a disk, with a writer writing, to a
/// target whose directory is a tmpfs small enough to fill up. Fields drop in
/// order: the writer, protect, the target, then the mount, then the lab.
struct FillingTarget {
    writer: Writer,
    protect: support::Daemon,
    target: support::Daemon,
    mount: Mount,
    disk: std::path::PathBuf,
    initial: Vec<u8>,
    lab: Lab,
}

impl FillingTarget {
    /// A tmpfs of `size` for the target (started with `target_args` too), a
    /// disk seeded with `seed`, protect and a writer.
    fn start(size: &str, target_args: &[&str], seed: u64) -> FillingTarget {
        require_tools(&["qemu-io", "mount", "umount"]);
        let lab = Lab::new();
        let mount = Mount::tmpfs(&lab.target_dir, size);
        let disk = lab.disk("disk.img", seed);
        let initial = read_all(&disk);
        let listen = format!("127.0.0.1:{}", free_port());
        let dir = lab.target_dir.to_str().expect("UTF-8 path");
        let key = lab.key.to_str().expect("UTF-8 path");
        let mut args = vec!["--listen", &listen, "--dir", dir, "--key", key];
        args.extend_from_slice(target_args);
        let target = lab.start("target", &args);
        let protect = lab.protect(&disk, &listen);
        let writer = Writer::start(&lab.workload, protect.uri(), 0);
        FillingTarget {
            writer,
            protect,
            target,
            mount,
            disk,
            initial,
            lab,
        }
    }

    fn wait_for_target_log(&self, needle: &str) {
        wait_for_log(&self.lab, Duration::from_secs(60), needle, || {
            self.target.log()
        });
    }

    /// Stops the writer and protect, checks the replica against the disk
    /// and every point against the writer's model, and unmounts.
    fn finish(self) {
        sleep_ms(700);
        let lab = &self.lab;
        let ops = lab.finish(self.writer);
        lab.stop_ok(self.protect);
        lab.check_replica(&self.disk, Some((&self.initial, ops)));
        drop(self.target);
        self.mount.unmount();
    }
}

/// Case 2: a proxy between protect and target cuts the connection mid-frame,
/// and goes away and comes back, three times while a writer keeps writing.
#[test]
fn cut_connections_are_resumed_without_loss() {
    require_tools(&["qemu-io"]);
    let lab = Lab::new();
    let mut r = ProxiedReplication::start(&lab, 2, Proxy::start);
    lab.wait_for_points(1);
    for _ in 0..3 {
        sleep_ms(500);
        r.proxy.cut_mid_frame();
        sleep_ms(500);
        r.proxy.stop();
        sleep_ms(300);
        r.proxy = Proxy::start(r.port, r.upstream);
    }
    sleep_ms(700);
    let ops = lab.finish(r.writer);
    let protect_log = r.protect.log();
    lab.stop_ok(r.protect);
    if count(&protect_log, "connection to the target lost") < 6 {
        lab.fail("protect did not see all 6 lost connections");
    }
    lab.check_replica(&r.disk, Some((&r.initial, ops)));
}

/// Case 2b: the network fails without the target hearing of it (no FIN, no
/// RST: its side of the connection stays open and silent). The source must
/// get back in and deliver everything before its drain timeout
/// (docs/REPLICATION.md: after a reconnect it resends what is
/// unacknowledged; writes wait, nothing is dropped).
#[test]
fn a_connection_the_target_never_saw_close_does_not_lock_the_source_out() {
    require_tools(&["qemu-io"]);
    let lab = Lab::new();
    let mut r = ProxiedReplication::start(&lab, 3, Proxy::start);
    lab.wait_for_points(1);
    sleep_ms(500);
    r.proxy.abandon_connections();
    sleep_ms(1500);
    if let Some(status) = r.protect.wait(Duration::from_millis(1)) {
        lab.fail(format!(
            "protect gave up ({status}) after the connection failed silently"
        ));
    }
    let ops = lab.finish(r.writer);
    lab.stop_ok(r.protect);
    lab.check_replica(&r.disk, Some((&r.initial, ops)));
}

/// Case 2c: the target's acknowledgments come back a byte at a time, each
/// taking longer than an RPO interval (88 bytes at 3 ms), so new batches are
/// ready while one is half read. The source must read every one whole: no
/// connection is lost, up to and including the drain at shutdown, and the
/// replica equals the disk. (Before 5a46c6d the `select!` that took the
/// next batch dropped the half-read acknowledgment; the source then read on
/// from the middle of a frame, took no acknowledgment at all, and failed on
/// a bad frame header while draining.)
#[test]
fn acknowledgments_that_trickle_in_are_read_whole() {
    require_tools(&["qemu-io"]);
    let lab = Lab::new();
    let r = ProxiedReplication::start(&lab, 4, |port, upstream| {
        Proxy::start_trickling(port, upstream, Duration::from_millis(3))
    });
    lab.wait_for_points(3);
    sleep_ms(2000);
    let ops = lab.finish(r.writer);
    let protect_log = lab.stop_ok(r.protect);
    let lost = count(&protect_log, "connection to the target lost");
    if lost > 0 {
        lab.fail(format!(
            "protect lost its connection {lost} times to acknowledgments that came slowly"
        ));
    }
    lab.check_replica(&r.disk, Some((&r.initial, ops)));
}

/// Case 3: protect dies (SIGKILL) mid-stream; a new protect does a full
/// sync and its newest point equals the disk; points from before the crash
/// still restore to what the disk held then.
#[test]
fn protect_killed_and_restarted_syncs_fully_and_keeps_old_points() {
    require_tools(&["qemu-io"]);
    let lab = Lab::new();
    let disk = lab.disk("disk.img", 4);
    let target = lab.target("127.0.0.1:0");
    let mut protect = lab.protect(&disk, &target.addr);
    let writer = Writer::start(&lab.workload, protect.uri(), 0);
    sleep_ms(1000);
    let ops = lab.finish(writer);
    // Quiet: the disk as of now must become a restore point within a few RPOs.
    let snapshot = read_all(&disk);
    let early = retry(Duration::from_secs(10), || {
        let newest = *lab.points().last().ok_or("no point yet")?;
        match first_difference(&lab.restore(newest.id), &snapshot) {
            None => Ok(newest),
            Some(i) => Err(format!("point {} differs at byte {i}", newest.id)),
        }
    })
    .unwrap_or_else(|e| lab.fail(format!("the quiet disk never became a point: {e}")));

    let writer = Writer::start(&lab.workload, protect.uri(), ops);
    sleep_ms(800);
    protect.kill9();
    let (ops, _) = writer.finish(); // its last qemu-io may well fail
    let protect = lab.protect(&disk, &target.addr);
    let log = wait_for_log(&lab, Duration::from_secs(20), "full sync complete", || {
        protect.log()
    });
    if !log.contains("full sync: comparing the disk with the target's copy") {
        lab.fail("the restarted protect does not say it compares with the target's copy");
    }
    let writer = Writer::start(&lab.workload, protect.uri(), ops + 1000);
    sleep_ms(1000);
    lab.finish(writer);
    lab.stop_ok(protect);

    lab.check_replica(&disk, None);
    if let Some(i) = first_difference(&lab.restore(early.id), &snapshot) {
        lab.fail(format!(
            "point {} from before the crash no longer restores to the disk it was \
             (first difference at byte {i})",
            early.id
        ));
    }
}

/// Case 4: a source with another key is turned away before anything is
/// written, and both sides say which peer failed to prove the key.
#[test]
fn a_wrong_key_is_refused_before_anything_is_journaled() {
    let lab = Lab::new();
    let disk = lab.disk("disk.img", 5);
    let other_key = lab.path("other.key");
    run(cdp().arg("keygen").arg(&other_key));
    let target = lab.target("127.0.0.1:0");
    let args = lab.protect_args(&disk, &target.addr, &other_key);
    let mut protect = lab.spawn("protect", &args).unwrap_or_else(|e| lab.fail(e));
    let status = protect.wait(Duration::from_secs(15));
    match status {
        None => lab.fail("protect with the wrong key still runs after 15 s"),
        Some(s) if s.success() => lab.fail("protect with the wrong key exited 0"),
        Some(_) => {}
    }
    if !protect.log().contains("failed to prove it holds our key") {
        lab.fail("protect does not say the target failed to prove the key");
    }
    let entries = journal_entries(&lab.target_dir);
    if !entries.is_empty() {
        lab.fail(format!("the target journaled entries: {entries:?}"));
    }
    let dir = lab.target_dir.to_str().expect("UTF-8 path");
    let points = lab.cdp(&["points", "--dir", dir, "--json"]);
    if points.status.success() && !lab.points().is_empty() {
        lab.fail(format!("cdp points lists points:\n{}", text(&points)));
    }
    // Whichever side checks first, both say why: the key files differ.
    wait_for_log(&lab, Duration::from_secs(5), "the key files differ", || {
        target.log()
    });
}

/// Case 4b: a peer that never proved it holds the key must not decide which
/// disk the target directory holds: after a wrong-key source of one disk,
/// the real source of another disk is served.
#[test]
fn an_unauthenticated_source_does_not_claim_the_target_directory() {
    require_tools(&["qemu-io"]);
    let lab = Lab::new();
    let intruder_disk = lab.disk("intruder.img", 6);
    let disk = lab.disk("disk.img", 7);
    let other_key = lab.path("other.key");
    run(cdp().arg("keygen").arg(&other_key));
    let target = lab.target("127.0.0.1:0");
    let args = lab.protect_args(&intruder_disk, &target.addr, &other_key);
    let mut intruder = lab.spawn("protect", &args).unwrap_or_else(|e| lab.fail(e));
    if intruder.wait(Duration::from_secs(15)).is_none() {
        lab.fail("protect with the wrong key still runs after 15 s");
    }
    lab.protect_run(&target.addr, &disk, 0, 2);
    lab.check_replica(&disk, None);
}

/// Case 5: a key file others may read is refused, with the fix in the message.
#[test]
fn key_files_open_to_others_are_refused() {
    let lab = Lab::new();
    let disk = lab.disk("disk.img", 8);
    for mode in [0o644, 0o640] {
        std::fs::set_permissions(&lab.key, std::fs::Permissions::from_mode(mode))
            .expect("chmod key");
        let key = lab.key.to_str().expect("UTF-8 path");
        let dir = lab.target_dir.to_str().expect("UTF-8 path");
        let target_args = [
            "target",
            "--listen",
            "127.0.0.1:0",
            "--dir",
            dir,
            "--key",
            key,
        ];
        let mut protect_args = vec!["protect"];
        protect_args.extend(lab.protect_args(&disk, "127.0.0.1:9", &lab.key));
        let out = lab.path("restore.img");
        let out = out.to_str().expect("UTF-8 path");
        let restore_args = [
            "restore", "--dir", dir, "--at", "1", "--out", out, "--key", key,
        ];
        for args in [&target_args[..], &protect_args, &restore_args] {
            let seen = expect_failure(cdp().args(args), Duration::from_secs(10));
            assert!(
                seen.contains("chmod 600") && !seen.contains("listening on"),
                "cdp {} with a key of mode {mode:o}: no \"chmod 600\" in:\n{seen}",
                args[0]
            );
        }
    }
}

/// Case 6: a flipped bit in the body of an entry that is not the last is
/// corruption: restore and points name the segment and the offset; the
/// target refuses to start on it.
#[test]
fn a_flipped_bit_in_a_segment_is_reported_with_path_and_offset() {
    require_tools(&["qemu-io"]);
    let lab = Lab::new();
    let disk = lab.disk("disk.img", 9);
    let target = lab.target("127.0.0.1:0");
    lab.protect_run(&target.addr, &disk, 0, 3);
    lab.stop_ok(target);
    let points = lab.check_replica(&disk, None);
    let entries = journal_entries(&lab.target_dir);
    let victim = &entries[entries.len() - 2];
    let segment = lab.target_dir.join("journal/0000000000000001.seg");
    assert_eq!(victim.segment, segment, "{entries:#?}");
    let at = victim.offset + 64 + victim.body_len / 2;
    let mut bytes = read_all(&segment);
    bytes[at as usize] ^= 0x10;
    std::fs::write(&segment, &bytes).expect("write segment");

    let names_it = |seen: &str| {
        seen.contains(&segment.display().to_string())
            && (seen.contains(&format!("offset {}", victim.offset))
                || seen.contains(&format!("offset {at}")))
    };
    let last = points.last().expect("points").id.to_string();
    let (restore, image) = lab.try_restore(&last);
    if restore.status.success() || image.is_some() || !names_it(&text(&restore)) {
        lab.fail(format!(
            "cdp restore --at {last} over a flipped bit at {} offset {at} (entry at {}): {}\n{}",
            segment.display(),
            victim.offset,
            restore.status,
            text(&restore)
        ));
    }
    let dir = lab.target_dir.to_str().expect("UTF-8 path");
    let listed = lab.cdp(&["points", "--dir", dir]);
    if listed.status.success() || !names_it(&text(&listed)) {
        lab.fail(format!(
            "cdp points over a flipped bit at {} offset {at}: {}\n{}",
            segment.display(),
            listed.status,
            text(&listed)
        ));
    }
    match lab.try_target("127.0.0.1:0") {
        Ok(_) => lab.fail("cdp target started on a corrupt journal"),
        Err(e) if names_it(&e) => {}
        Err(e) => lab.fail(format!(
            "cdp target refused without naming path and offset: {e}"
        )),
    }
}

/// Case 7: a crash mid-append leaves the last entry cut short: the target
/// cuts it off when it starts (and says so), the earlier points stay, and a
/// new protect run continues the journal.
#[test]
fn a_torn_tail_is_cut_off_and_replication_continues() {
    require_tools(&["qemu-io"]);
    let lab = Lab::new();
    let disk = lab.disk("disk.img", 10);
    let mut target = lab.target("127.0.0.1:0");
    let ops = lab.protect_run(&target.addr, &disk, 0, 3);
    let before = lab.points();
    target.kill9();
    let entries = journal_entries(&lab.target_dir);
    let last = entries.last().expect("entries").clone();
    assert!(
        !last.in_sync,
        "the last entry is a full-sync batch: {entries:#?}"
    );
    let torn_at = last.offset + 64 + last.body_len / 2;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&last.segment)
        .expect("open segment");
    file.set_len(torn_at).expect("truncate segment");
    drop(file);

    let target = lab.target("127.0.0.1:0");
    let log = target.log();
    if !log.contains("torn tail") || !(log.contains("cut off") || log.contains("truncat")) {
        lab.fail("the target's log does not say it cut off the torn tail");
    }
    let len = std::fs::metadata(&last.segment)
        .expect("stat segment")
        .len();
    if len != last.offset {
        lab.fail(format!(
            "{} is {len} bytes after recovery; the torn entry started at {}",
            last.segment.display(),
            last.offset
        ));
    }
    let after = lab.points();
    if after[..] != before[..before.len() - 1] {
        lab.fail(format!(
            "points before the tear: {before:?}\nafter: {after:?}"
        ));
    }
    let syncs_before = count(&lab.logs(), "full sync: comparing");
    lab.protect_run(&target.addr, &disk, ops, 2);
    if count(&lab.logs(), "full sync: comparing") != syncs_before + 1 {
        lab.fail("the new protect run did not compare the disk with the target's copy");
    }
    lab.check_replica(&disk, None);
}

/// Connects, sends `bytes`, and reads until the target closes (10 s at most).
fn raw_client(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).expect("connect to the target");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(bytes).expect("send");
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    reply
}

/// Handshakes as the real source of `disk`, then sends a batch frame that
/// names another disk; returns what the target did then.
fn frame_for_another_disk(lab: &Lab, addr: &str, disk: &std::path::Path) -> String {
    use pipeline::codec::{FrameKind, FrameMeta};
    use pipeline::session::{self, Hello};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let exchange = async {
        let key = pipeline::key::Key::load(&lab.key).expect("key");
        let hello = Hello {
            disk_id: pipeline::protect::disk_id(disk, DISK_SIZE),
            disk_size: DISK_SIZE,
        };
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut session, state) = session::connect(&mut stream, &key, hello)
            .await
            .unwrap_or_else(|e| lab.fail(format!("handshake as the real source failed: {e}")));
        let meta = FrameMeta {
            kind: FrameKind::Batch,
            disk_id: [0xee; 16],
            first_seq: state.next_seq,
            last_seq: state.next_seq,
            point_time_ns: 1_800_000_000_000_000_000,
        };
        session
            .send(&mut stream, &meta, &[1, 0, 0, 0, 0, 0])
            .await
            .expect("send");
        format!("{:?}", session.receive(&mut stream).await)
    };
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .unwrap_or_else(|_| lab.fail("the forged-frame exchange took more than 20 s"))
    })
}

/// Case 8: garbage, a foreign protocol version and a frame for another disk
/// on the replication port are logged and dropped, and the target keeps
/// serving; a source of another disk is refused (one disk per directory).
#[test]
fn bad_clients_are_dropped_and_another_disk_is_refused() {
    require_tools(&["qemu-io"]);
    let lab = Lab::new();
    let disk = lab.disk("disk.img", 11);
    let other_disk = lab.disk("other.img", 12);
    let target = lab.target("127.0.0.1:0");

    raw_client(&target.addr, &pseudo_random(300, 99));
    wait_for_log(
        &lab,
        Duration::from_secs(5),
        "does not speak the cdp",
        || target.log(),
    );
    let mut hello = b"CDPREPL1\x00\x63".to_vec();
    hello.resize(68, 0);
    raw_client(&target.addr, &hello);
    wait_for_log(&lab, Duration::from_secs(5), "version mismatch", || {
        target.log()
    });

    let ops = lab.protect_run(&target.addr, &disk, 0, 2);
    let entries = journal_entries(&lab.target_dir).len();

    let reply = frame_for_another_disk(&lab, &target.addr, &disk);
    if reply.starts_with("Ok(Ok(") {
        lab.fail(format!(
            "the target acknowledged a frame for another disk: {reply}"
        ));
    }
    wait_for_log(&lab, Duration::from_secs(5), "frame for disk", || {
        target.log()
    });
    if journal_entries(&lab.target_dir).len() != entries {
        lab.fail("the target journaled a frame for another disk");
    }

    let args = lab.protect_args(&other_disk, &target.addr, &lab.key);
    let mut other = lab.spawn("protect", &args).unwrap_or_else(|e| lab.fail(e));
    match other.wait(Duration::from_secs(15)) {
        None => lab.fail("protect of another disk still runs after 15 s"),
        Some(s) if s.success() => lab.fail("protect of another disk exited 0"),
        Some(_) if !other.log().contains("another disk") => {
            lab.fail("protect of another disk does not say the target holds another disk")
        }
        Some(_) => {}
    }
    if journal_entries(&lab.target_dir).len() != entries {
        lab.fail("the target journaled batches of another disk");
    }

    lab.protect_run(&target.addr, &disk, ops, 1);
    lab.check_replica(&disk, None);
}

/// Case 9: restores of a time before the first point, of an unknown id and
/// of nonsense fail clearly and create no image.
#[test]
fn restores_before_the_first_point_or_of_unknown_points_fail_clearly() {
    require_tools(&["qemu-io"]);
    let lab = Lab::new();
    let disk = lab.disk("disk.img", 13);
    let target = lab.target("127.0.0.1:0");
    lab.protect_run(&target.addr, &disk, 0, 1);
    for (at, expected) in [
        ("1970-01-02T00:00:00Z", "before the first restore point"),
        ("86400.5", "before the first restore point"),
        ("424242", "no restore point 424242"),
        ("yesterday", "neither a point id nor a time"),
    ] {
        let (output, image) = lab.try_restore(at);
        let seen = text(&output);
        if output.status.success() || image.is_some() || !seen.contains(expected) {
            lab.fail(format!(
                "cdp restore --at {at}: {}, image left: {}; expected {expected:?} in:\n{seen}",
                output.status,
                image.is_some()
            ));
        }
    }
    lab.check_replica(&disk, None);
}

/// A restore onto a file system without room for the image fails with the
/// image's path and the cause, and leaves no partial image behind.
#[test]
fn a_restore_onto_a_full_file_system_fails_clearly_and_leaves_nothing() {
    require_tools(&["qemu-io", "mount", "umount"]);
    let lab = Lab::new();
    let disk = lab.disk("disk.img", 17);
    let target = lab.target("127.0.0.1:0");
    lab.protect_run(&target.addr, &disk, 0, 1);
    let newest = lab
        .points()
        .last()
        .unwrap_or_else(|| lab.fail("the target holds no restore point"))
        .id
        .to_string();
    let small = lab.path("small");
    let mount = Mount::tmpfs(&small, "1m");
    let out = small.join("restored.img");
    let out_arg = out.to_str().expect("UTF-8 path");
    let output = lab.cdp(&[
        "restore",
        "--dir",
        lab.target_dir.to_str().expect("UTF-8 path"),
        "--at",
        &newest,
        "--out",
        out_arg,
        "--key",
        lab.key.to_str().expect("UTF-8 path"),
    ]);
    let seen = text(&output);
    if output.status.success()
        || !seen.contains(out_arg)
        || !seen.contains("No space left on device")
    {
        lab.fail(format!(
            "cdp restore onto a full file system: {}; expected its path and the cause in:\n{seen}",
            output.status
        ));
    }
    if out.exists() {
        lab.fail("the failed restore left a partial image behind");
    }
    mount.unmount();
}
