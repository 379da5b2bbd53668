//! Real NBD clients against a running filter: libnbd's nbdinfo, nbdcopy and
//! Python bindings, QEMU's qemu-io, qemu-img and qemu-nbd, and fio. Each test
//! has its own disk, filter and temp dir; every check that fails says what the
//! client printed and what the filter logged.
mod common;
#[path = "clients/support.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use common::*;
use support::*;

// ---------------------------------------------------------------------------
// 1. nbdinfo
// ---------------------------------------------------------------------------

#[test]
fn nbdinfo_json_reports_size_flags_block_sizes_and_contexts() {
    require_tools(&["nbdinfo"]);
    let (_dir, disk) = blank_disk(64 * MIB);
    let filter = Filter::tcp(&disk, &[]);
    let (export, seen) = nbdinfo_export(&filter, &filter.uri);
    let mut problems = Vec::new();
    if export["export-size"] != 64 * MIB {
        problems.push(format!("export-size {}", export["export-size"]));
    }
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        if export[flag] != true {
            problems.push(format!("{flag} is {}", export[flag]));
        }
    }
    if export["is_read_only"] != false {
        problems.push(format!("is_read_only is {}", export["is_read_only"]));
    }
    if export["block_size_maximum"]
        .as_u64()
        .is_none_or(|max| max < 32 * MIB)
    {
        problems.push(format!(
            "block_size_maximum {} is under 32 MiB",
            export["block_size_maximum"]
        ));
    }
    let contexts = export["contexts"].as_array().cloned().unwrap_or_default();
    if !contexts.iter().any(|c| c == "base:allocation") {
        problems.push(format!("contexts {contexts:?} lack base:allocation"));
    }
    ensure(&filter, problems.is_empty(), &problems.join("; "), &seen);
    filter.stop_ok();
}

#[test]
fn nbdinfo_can_flush_fua_trim_zero() {
    require_tools(&["nbdinfo"]);
    let (_dir, disk) = blank_disk(16 * MIB);
    let filter = Filter::tcp(&disk, &[]);
    for capability in ["flush", "fua", "trim", "zero"] {
        let seen = run_client(Command::new("nbdinfo").args(["--can", capability, &filter.uri]));
        let what = format!("nbdinfo --can {capability} did not exit 0 (true)");
        ensure(&filter, seen.status.code() == Some(0), &what, &seen);
    }
    filter.stop_ok();
}

#[test]
fn nbdinfo_list_shows_export_name_and_only_known_names_connect() {
    require_tools(&["nbdinfo"]);
    let (_dir, disk) = blank_disk(16 * MIB);
    let filter = Filter::tcp(&disk, &["--export", "myname"]);
    let port = filter.port.expect("TCP filter");

    let seen = run_ok(
        &filter,
        Command::new("nbdinfo").args(["--list", "--json", &filter.uri]),
    );
    let json = nbdinfo_json(&filter, &seen);
    let names: Vec<&Value> = json["exports"]
        .as_array()
        .map(|exports| exports.iter().map(|e| &e["export-name"]).collect())
        .unwrap_or_default();
    ensure(
        &filter,
        names == [&Value::from("myname")],
        "nbdinfo --list does not show exactly the export \"myname\"",
        &seen,
    );

    for name in ["", "myname"] {
        let uri = format!("nbd://127.0.0.1:{port}/{name}");
        let seen = run_ok(&filter, Command::new("nbdinfo").args(["--size", &uri]));
        let what = format!("wrong size through {uri}");
        ensure(&filter, seen.stdout.trim() == "16777216", &what, &seen);
    }
    let other = format!("nbd://127.0.0.1:{port}/other");
    let seen = run_client(Command::new("nbdinfo").args(["--size", &other]));
    let what = "an unknown export name was accepted";
    ensure(&filter, !seen.status.success(), what, &seen);
    filter.stop_ok();
}

#[test]
fn nbdinfo_map_shows_data_and_holes_where_written_and_trimmed() {
    require_tools(&["nbdinfo", "qemu-io"]);
    let (_dir, disk) = blank_disk(64 * MIB);
    let filter = Filter::tcp(&disk, &[]);
    let workload = [
        Op::Write {
            byte: 0xab,
            offset: MIB,
            len: MIB,
            fua: false,
        },
        Op::Discard {
            offset: MIB,
            len: 512 * KIB,
        },
        Op::Write {
            byte: 0xcd,
            offset: 8 * MIB,
            len: 64 * KIB,
            fua: false,
        },
        Op::Zero {
            offset: 8 * MIB,
            len: 4 * KIB,
            unmap: true,
        },
        Op::Flush,
    ];
    qemu_io_ok(&filter, &[], workload.iter().map(Op::qemu_io_command));

    let seen = run_ok(
        &filter,
        Command::new("nbdinfo").args(["--map", "--json", &filter.uri]),
    );
    let map = nbdinfo_json(&filter, &seen);
    let map = map.as_array().cloned().unwrap_or_default();
    let type_at = |offset: u64| {
        map.iter().find_map(|extent| {
            let start = extent["offset"].as_u64()?;
            let len = extent["length"].as_u64()?;
            (start..start + len)
                .contains(&offset)
                .then(|| extent["type"].as_u64())?
        })
    };
    // (offset, is a hole); type bit 0 is NBD_STATE_HOLE.
    let probes = [
        (0, true),
        (MIB + 4 * KIB, true),
        (MIB + 512 * KIB, false),
        (2 * MIB - 1, false),
        (2 * MIB + 4 * KIB, true),
        (8 * MIB, true),
        (8 * MIB + 4 * KIB, false),
        (8 * MIB + 64 * KIB - 1, false),
        (32 * MIB, true),
        (64 * MIB - 1, true),
    ];
    let wrong: Vec<String> = probes
        .iter()
        .filter(|&&(offset, hole)| type_at(offset).map(|t| t & 1 == 1) != Some(hole))
        .map(|&(offset, hole)| {
            let want = if hole { "hole" } else { "data" };
            format!(
                "offset {offset} should be {want}, map says type {:?}",
                type_at(offset)
            )
        })
        .collect();
    ensure(&filter, wrong.is_empty(), &wrong.join("; "), &seen);
    filter.stop_ok();
}

// ---------------------------------------------------------------------------
// 2. qemu-nbd
// ---------------------------------------------------------------------------

#[test]
fn qemu_nbd_lists_the_export() {
    require_tools(&["qemu-nbd"]);
    let (_dir, disk) = blank_disk(16 * MIB);
    let filter = Filter::tcp(&disk, &["--export", "myname"]);
    let port = filter.port.expect("TCP filter").to_string();
    let seen = run_ok(
        &filter,
        Command::new("qemu-nbd").args(["-L", "-b", "127.0.0.1", "-p", &port]),
    );
    let ok = seen.stdout.contains("export: 'myname'") && seen.stdout.contains("16777216");
    ensure(
        &filter,
        ok,
        "qemu-nbd -L does not list myname (16 MiB)",
        &seen,
    );
    filter.stop_ok();
}

// ---------------------------------------------------------------------------
// 3. qemu-io, 5. qemu-img compare
// ---------------------------------------------------------------------------

#[test]
fn qemu_io_writes_zeroes_discards_and_flushes_read_back() {
    require_tools(&["qemu-io"]);
    let (_dir, disk) = blank_disk(64 * MIB);
    let filter = Filter::tcp(&disk, &[]);
    let expected = check_qemu_io(&filter, &disk);
    let log = filter.stop_ok();
    assert_backing_holds(log.as_str(), &disk, &expected);
}

#[test]
fn qemu_img_compare_matches_export_backing_and_expected() {
    require_tools(&["qemu-io", "qemu-img"]);
    let (dir, disk) = blank_disk(64 * MIB);
    let filter = Filter::tcp(&disk, &[]);
    let expected = check_qemu_io(&filter, &disk);
    let expected_img = dir.path().join("expected.img");
    std::fs::write(&expected_img, &expected).expect("write expected.img");
    let blank = dir.path().join("blank.img");
    sparse_file(&blank, 64 * MIB);

    let seen = run_ok(&filter, &mut qemu_img_compare(&filter.uri, &disk));
    let what = "qemu-img compare: export vs backing";
    ensure(
        &filter,
        seen.stdout.contains("Images are identical"),
        what,
        &seen,
    );
    let seen = run_client(&mut qemu_img_compare(&filter.uri, &blank));
    let what = "qemu-img compare did not find the export differs from a blank image";
    ensure(&filter, seen.status.code() == Some(1), what, &seen);

    let log = filter.stop_ok();
    let seen = run_ok(log.as_str(), &mut qemu_img_compare(&disk, &expected_img));
    let what = "qemu-img compare: backing vs expected after stop";
    ensure(
        log.as_str(),
        seen.stdout.contains("Images are identical"),
        what,
        &seen,
    );
}

// ---------------------------------------------------------------------------
// 4. libnbd asynchronous I/O, 8. two connections
// ---------------------------------------------------------------------------

#[test]
fn libnbd_256_async_writes_then_reads_over_unix_socket() {
    let (_dir, disk) = blank_disk(64 * MIB);
    let filter = Filter::unix(&disk, &[]);
    check_aio(&filter, &disk, 0..64 * MIB, 4);
    filter.stop_ok();
}

#[test]
fn two_connections_write_disjoint_halves_concurrently() {
    let (_dir, disk) = blank_disk(64 * MIB);
    let filter = Filter::tcp(&disk, &[]);
    let halves = [(0..32 * MIB, 81), (32 * MIB..64 * MIB, 82)];
    let writers: Vec<_> = halves
        .iter()
        .map(|(half, seed)| {
            let mut cmd = aio_script(&filter, &disk, "write", half, *seed);
            let command = command_line(&cmd);
            let child = cmd
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
            (command, child)
        })
        .collect();
    for (command, child) in writers {
        let output = child.wait_with_output().expect("wait for a writer");
        let seen = Seen::new(command, output);
        ensure(
            &filter,
            seen.status.success(),
            "a concurrent writer failed",
            &seen,
        );
    }
    // Both halves again, now that neither writer is running.
    for (half, seed) in &halves {
        run_ok(
            &filter,
            &mut aio_script(&filter, &disk, "verify", half, *seed),
        );
    }
    // Without a capture log the connections' threads consume the ring
    // themselves, taking turns: every record must have been handed out once,
    // in order. Each writer made 256 writes and a flush, each verifier a
    // flush.
    let log = filter.stop_ok();
    let records = 2 * (256 + 1) + 2;
    assert!(
        log.contains(&format!("records={records} "))
            && log.contains(&format!("next_seq={records}")),
        "the filter's summary should count {records} records, numbered from 0:\n{log}"
    );
}

// ---------------------------------------------------------------------------
// 6. nbdcopy, 7. fio
// ---------------------------------------------------------------------------

#[test]
fn nbdcopy_256_mib_round_trip() {
    require_tools(&["nbdcopy", "cmp"]);
    let (_dir, disk) = blank_disk(256 * MIB);
    let filter = Filter::tcp(&disk, &[]);
    check_nbdcopy(&filter, &disk, 256 * MIB);
    filter.stop_ok();
}

#[test]
fn fio_random_writes_verify_crc32c() {
    require_tools(&["fio"]);
    let (_dir, disk) = blank_disk(64 * MIB);
    let filter = Filter::tcp(&disk, &[]);
    check_fio(&filter);
    filter.stop_ok();
}

// ---------------------------------------------------------------------------
// 9. out of range, 11. read-only
// ---------------------------------------------------------------------------

#[test]
fn out_of_range_requests_fail_and_the_connection_keeps_working() {
    let (_dir, disk) = blank_disk(16 * MIB);
    let filter = Filter::tcp(&disk, &[]);
    check_probes(
        &filter,
        &[
            "pread:size:4096:EINVAL",
            "pread:0:4096:ok",
            "pread:size-2048:4096:EINVAL",
            "pread:2**64-2048:4096:EINVAL",
            "pwrite:size-2048:4096:ENOSPC",
            "zero:size:4096:ENOSPC",
            "trim:size-512:4096:EINVAL",
            "pread:size-4096:4096:ok",
            "pwrite:size-4096:4096:ok",
        ],
    );
    let log = filter.stop_ok();
    let mut expected = vec![0; 16 * MIB as usize];
    expected[16 * MIB as usize - 4096..].fill(0x5a);
    assert_backing_holds(log.as_str(), &disk, &expected);
}

#[test]
fn read_only_export_refuses_changes_and_serves_reads() {
    require_tools(&["nbdinfo", "qemu-io"]);
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    let mut image = vec![0; 16 * MIB as usize];
    image[..MIB as usize].fill(0x3c);
    std::fs::write(&disk, &image).expect("write disk.img");
    let filter = Filter::tcp(&disk, &["--read-only"]);

    let (export, seen) = nbdinfo_export(&filter, &filter.uri);
    let what = "nbdinfo does not say is_read_only";
    ensure(&filter, export["is_read_only"] == true, what, &seen);

    let seen = run_client(&mut qemu_io(
        &filter.uri,
        &[],
        [Op::Write {
            byte: 0xff,
            offset: 0,
            len: 4096,
            fua: false,
        }
        .qemu_io_command()],
    ));
    let text = seen.text();
    let refused = ["Operation not permitted", "Permission denied", "read-only"]
        .iter()
        .any(|reason| text.contains(reason));
    let what = "a qemu-io write to a read-only export did not fail with EPERM";
    ensure(&filter, !seen.status.success() && refused, what, &seen);

    qemu_io_ok(&filter, &["-r"], pattern_reads(&image));
    check_probes(
        &filter,
        &[
            "pwrite:0:4096:EPERM",
            "zero:0:4096:EPERM",
            "trim:0:4096:EPERM",
            "pread:0:4096:ok",
        ],
    );
    let log = filter.stop_ok();
    assert_backing_holds(log.as_str(), &disk, &image);
}

// ---------------------------------------------------------------------------
// 10. capture and replay
// ---------------------------------------------------------------------------

#[test]
fn capture_log_replays_onto_a_blank_image_to_the_same_bytes() {
    require_tools(&["qemu-io"]);
    let (dir, disk) = blank_disk(64 * MIB);
    let capture = dir.path().join("capture.log");
    let capture_arg = capture.to_str().expect("UTF-8 temp path");
    let filter = Filter::tcp(&disk, &["--capture-log", capture_arg]);
    let expected = check_qemu_io(&filter, &disk);
    let log = filter.stop_ok();

    let fresh = dir.path().join("fresh.img");
    sparse_file(&fresh, 64 * MIB);
    let replay = run_ok(log.as_str(), &mut replay(&capture, &fresh));
    let what = "replay found a torn record in a log the filter closed cleanly";
    ensure(log.as_str(), !replay.stderr.contains("torn"), what, &replay);
    let what = format!(
        "the replayed image differs from the disk (replay said {:?})",
        replay.stdout.trim()
    );
    assert_bytes(log.as_str(), &what, &read_all(&fresh), &read_all(&disk));
    assert_backing_holds(log.as_str(), &fresh, &expected);
}

// ---------------------------------------------------------------------------
// 12. a loop device as the backing disk
// ---------------------------------------------------------------------------

/// Serves a 64 MiB loop device (with the loop driver's direct I/O or not)
/// through a filter started with `filter_args`, and runs `check` on it.
fn on_loop_device(loop_direct_io: bool, filter_args: &[&str], check: impl FnOnce(&Filter, &Path)) {
    require_tools(&["losetup"]);
    let (_dir, file) = blank_disk(64 * MIB);
    let device = LoopDevice::attach(&file, loop_direct_io);
    // Declared after the device, so dropped (stopped) before it is detached.
    let filter = Filter::tcp(&device.path, filter_args);
    check(&filter, &device.path);
    filter.stop_ok();
}

/// One module of tests per way of serving a loop device, one test per check.
macro_rules! loop_device_tests {
    ($($variant:ident: loop_direct_io = $loop_direct_io:expr, filter_args = $args:expr;)*) => {$(
        mod $variant {
            use super::*;

            #[test]
            fn qemu_io() {
                require_tools(&["qemu-io"]);
                on_loop_device($loop_direct_io, $args, |filter, device| {
                    check_qemu_io(filter, device);
                });
            }

            #[test]
            fn libnbd_aio() {
                on_loop_device($loop_direct_io, $args, |filter, device| {
                    check_aio(filter, device, 0..64 * MIB, 12);
                });
            }

            #[test]
            fn nbdcopy() {
                require_tools(&["nbdcopy", "cmp"]);
                on_loop_device($loop_direct_io, $args, |filter, device| {
                    check_nbdcopy(filter, device, 64 * MIB);
                });
            }

            #[test]
            fn fio() {
                require_tools(&["fio"]);
                on_loop_device($loop_direct_io, $args, |filter, _| check_fio(filter));
            }
        }
    )*};
}

loop_device_tests! {
    loop_device_buffered: loop_direct_io = false, filter_args = &[];
    loop_device_direct: loop_direct_io = true, filter_args = &["--direct"];
    loop_device_sync_engine: loop_direct_io = false, filter_args = &["--io-engine", "sync"];
    loop_device_no_fast_path: loop_direct_io = false, filter_args = &["--no-fast-path"];
}

// ---------------------------------------------------------------------------
// 13. a full backing file system
// ---------------------------------------------------------------------------

#[test]
fn a_full_backing_file_system_fails_writes_and_the_log_still_replays() {
    full_backing_file_system(&[]);
}

#[test]
fn a_full_backing_file_system_through_io_uring() {
    full_backing_file_system(&["--no-fast-path"]);
}

/// A 16 MiB sparse disk on a 4 MiB tmpfs. A write that finds no room fails
/// with ENOSPC on a connection that keeps working, writes into allocated
/// blocks still succeed, and the capture log still replays to the disk's
/// exact bytes, including the part of the failed write that did land.
fn full_backing_file_system(filter_args: &[&str]) {
    require_tools(&["qemu-io", "mount", "umount"]);
    let dir = scratch();
    let small = dir.path().join("small");
    let mount = Mount::tmpfs(&small, "4m");
    let disk = small.join("disk.img");
    sparse_file(&disk, 16 * MIB);
    let capture = dir.path().join("capture.log");
    let mut args = vec!["--capture-log", capture.to_str().expect("UTF-8 temp path")];
    args.extend_from_slice(filter_args);
    let filter = Filter::tcp(&disk, &args);

    qemu_io_ok(&filter, &[], ["write -P 0x11 0 2M".to_string()]);
    let seen = run_client(&mut qemu_io(
        &filter.uri,
        &[],
        ["write -P 0x22 4M 8M".to_string()],
    ));
    let what = "a write larger than the room left did not fail with ENOSPC";
    ensure(
        &filter,
        seen.text().contains("No space left on device"),
        what,
        &seen,
    );
    qemu_io_ok(
        &filter,
        &[],
        [
            "write -P 0x33 0 1M".to_string(),
            "read -P 0x33 0 1M".to_string(),
            "read -P 0x11 1M 1M".to_string(),
        ],
    );
    let log = filter.stop_ok();
    assert!(
        log.contains("No space left on device"),
        "the filter did not log the failed write:\n{log}"
    );
    let landed = read_all(&disk)[4 * MIB as usize..12 * MIB as usize]
        .iter()
        .filter(|&&b| b == 0x22)
        .count();
    assert!(
        landed > 0,
        "no byte of the failed write reached the disk, so this test shows nothing"
    );
    assert_replays_to(&capture, &disk, dir.path());
    mount.unmount();
}

/// The capture log on a 1 MiB tmpfs. When it fills, the filter stops with
/// the log's path and the error in its log and a failed exit status; what
/// the log holds still replays (a clean prefix of the stream), and the
/// backing disk holds every write the client saw acknowledged.
#[test]
fn a_full_capture_log_file_system_stops_the_filter_with_a_clear_error() {
    require_tools(&["qemu-io", "mount", "umount"]);
    let (dir, disk) = blank_disk(16 * MIB);
    let small = dir.path().join("small");
    let mount = Mount::tmpfs(&small, "1m");
    let capture = small.join("capture.log");
    let filter = Filter::tcp(
        &disk,
        &["--capture-log", capture.to_str().expect("UTF-8 temp path")],
    );
    let writes: Vec<String> = (0..8)
        .map(|i| format!("write -P {} {}M 1M", 0x41 + i, i))
        .collect();
    let seen = run_client(&mut qemu_io(&filter.uri, &[], writes));
    let stopped = retry(Duration::from_secs(30), || {
        let log = filter.log();
        log.contains("capture sink failed")
            .then_some(log)
            .ok_or_else(String::new)
    });
    let Ok(log) = stopped else {
        panic!(
            "the filter did not say its capture log failed\n{seen}\n--- filter log ---\n{}",
            filter.log()
        )
    };
    assert!(
        log.contains(capture.to_str().expect("UTF-8 temp path"))
            && log.contains("No space left on device"),
        "the failure does not name the capture log and the error:\n{log}"
    );
    let (status, log) = filter.stop();
    assert!(
        !status.success(),
        "the filter exited 0 after its capture log failed:\n{log}"
    );
    let backing = read_all(&disk);
    let acknowledged: Vec<usize> = seen
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("wrote "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .map(|offset| (offset / MIB) as usize)
        .collect();
    for &i in &acknowledged {
        let region = &backing[i * MIB as usize..(i + 1) * MIB as usize];
        let what = format!("write {i} was acknowledged but the backing disk does not hold it");
        ensure(
            log.as_str(),
            region.iter().all(|&b| b == 0x41 + i as u8),
            &what,
            &seen,
        );
    }
    let replayed = dir.path().join("replayed.img");
    let replay = run_client(&mut replay(&capture, &replayed));
    let what = "the capture log the filter left does not replay";
    ensure(log.as_str(), replay.status.success(), what, &replay);
    let image = read_all(&replayed);
    for i in 0..8 {
        let region = &image[i * MIB as usize..(i + 1) * MIB as usize];
        let whole = region.iter().all(|&b| b == 0x41 + i as u8) || region.iter().all(|&b| b == 0);
        let what =
            format!("the replayed image holds part of write {i}: not a prefix of the stream");
        ensure(log.as_str(), whole, &what, &replay);
    }
    mount.unmount();
}
