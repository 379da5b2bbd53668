//! Real NBD clients against a running filter: libnbd's nbdinfo, nbdcopy and
//! Python bindings, QEMU's qemu-io, qemu-img and qemu-nbd, and fio. Each test
//! has its own disk, filter and temp dir; every check that fails says what the
//! client printed and what the filter logged.
mod common;

use std::ffi::OsStr;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};

use serde_json::Value;

use common::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// Running clients and reporting what they did
// ---------------------------------------------------------------------------

/// What a client process did.
struct Seen {
    command: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Seen {
    fn new(command: String, output: Output) -> Seen {
        Seen {
            command,
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// stdout and stderr together.
    fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

/// A command line for messages, with inline scripts elided.
fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|arg| {
            let arg = arg.to_string_lossy();
            if arg.contains('\n') {
                "'<script>'".to_string()
            } else {
                format!("{arg:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a client to completion (whatever its exit status).
fn run_client(cmd: &mut Command) -> Seen {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", command_line(cmd)));
    Seen::new(command_line(cmd), output)
}

/// Where panic messages get the filter's log: the running filter, or the
/// log `stop_ok` returned.
trait FilterLog {
    fn filter_log(&self) -> String;
}

impl FilterLog for Filter {
    fn filter_log(&self) -> String {
        self.log()
    }
}

impl FilterLog for str {
    fn filter_log(&self) -> String {
        self.to_owned()
    }
}

/// Panics with `what`, the client's output and the filter's log unless `ok`.
fn ensure(log: &(impl FilterLog + ?Sized), ok: bool, what: &str, seen: &Seen) {
    if !ok {
        panic!("{what}\n{seen}\n--- filter log ---\n{}", log.filter_log());
    }
}

/// Runs a client that must exit 0.
fn run_ok(log: &(impl FilterLog + ?Sized), cmd: &mut Command) -> Seen {
    let seen = run_client(cmd);
    ensure(log, seen.status.success(), "the client failed", &seen);
    seen
}

/// Panics, naming the first differing byte and showing the filter's log,
/// unless `actual` equals `expected`.
fn assert_bytes(log: &(impl FilterLog + ?Sized), what: &str, actual: &[u8], expected: &[u8]) {
    if let Some(i) = first_difference(actual, expected) {
        panic!(
            "{what}: first difference at byte {i}: {:02x?} where {:02x?} was expected \
             (lengths {} and {})\n--- filter log ---\n{}",
            actual.get(i),
            expected.get(i),
            actual.len(),
            expected.len(),
            log.filter_log()
        );
    }
}

/// Asserts the backing file or device holds exactly `expected`.
fn assert_backing_holds(log: &(impl FilterLog + ?Sized), backing: &Path, expected: &[u8]) {
    let what = format!("{} does not hold the expected bytes", backing.display());
    assert_bytes(log, &what, &read_all(backing), expected);
}

// ---------------------------------------------------------------------------
// qemu-io workloads, with a model of what the disk must hold afterwards
// ---------------------------------------------------------------------------

/// One qemu-io request.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// `write [-f] -P byte`: `fua` is qemu-io's `-f` (Force Unit Access).
    Write {
        byte: u8,
        offset: u64,
        len: u64,
        fua: bool,
    },
    /// `write -z [-u]`: WRITE_ZEROES, allowed to deallocate with `unmap`.
    Zero {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    /// `discard`: TRIM. The filter promises trimmed ranges read as zeros.
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
}

impl Op {
    fn qemu_io_command(&self) -> String {
        match *self {
            Op::Write {
                byte,
                offset,
                len,
                fua,
            } => {
                let fua = if fua { "-f " } else { "" };
                format!("write {fua}-P {byte:#04x} {offset} {len}")
            }
            Op::Zero { offset, len, unmap } => {
                let unmap = if unmap { "-u " } else { "" };
                format!("write -z {unmap}{offset} {len}")
            }
            Op::Discard { offset, len } => format!("discard {offset} {len}"),
            Op::Flush => "flush".to_string(),
        }
    }

    /// Applies the request to a model of the disk.
    fn apply(&self, image: &mut [u8]) {
        let (offset, len, byte) = match *self {
            Op::Write {
                byte, offset, len, ..
            } => (offset, len, byte),
            Op::Zero { offset, len, .. } | Op::Discard { offset, len } => (offset, len, 0),
            Op::Flush => return,
        };
        image[offset as usize..(offset + len) as usize].fill(byte);
    }
}

/// Every kind of change qemu-io sends, aligned and not, overlapping, with and
/// without FUA, and a write larger than one 32 MiB request. Needs 64 MiB.
const MIXED_WORKLOAD: &[Op] = &[
    Op::Write {
        byte: 0xab,
        offset: 0,
        len: MIB,
        fua: false,
    },
    Op::Write {
        byte: 0xcd,
        offset: MIB,
        len: 256 * KIB,
        fua: true,
    },
    Op::Write {
        byte: 0x5a,
        offset: 3000,
        len: 5000,
        fua: false,
    },
    Op::Flush,
    Op::Write {
        byte: 0x11,
        offset: 2 * MIB,
        len: 2 * MIB,
        fua: false,
    },
    Op::Zero {
        offset: 2 * MIB + 4 * KIB,
        len: 512 * KIB,
        unmap: false,
    },
    Op::Zero {
        offset: 3 * MIB,
        len: 256 * KIB,
        unmap: true,
    },
    Op::Discard {
        offset: 3 * MIB + 512 * KIB,
        len: 512 * KIB,
    },
    Op::Write {
        byte: 0x22,
        offset: 3 * MIB + 600 * KIB + 123,
        len: 10_000,
        fua: true,
    },
    Op::Write {
        byte: 0x77,
        offset: 16 * MIB,
        len: 40 * MIB,
        fua: false,
    },
    Op::Discard {
        offset: 20 * MIB,
        len: 8 * MIB,
    },
    Op::Zero {
        offset: 40 * MIB + 100,
        len: MIB,
        unmap: true,
    },
    Op::Discard {
        offset: 44 * MIB + 1000,
        len: 70_000,
    },
    Op::Zero {
        offset: 48 * MIB + 7,
        len: 9_000,
        unmap: false,
    },
    Op::Write {
        byte: 0xee,
        offset: 64 * MIB - 1000,
        len: 1000,
        fua: true,
    },
    Op::Flush,
];

/// `qemu-io OPTIONS -f raw TARGET -c CMD...`
fn qemu_io(target: &str, options: &[&str], commands: impl IntoIterator<Item = String>) -> Command {
    let mut cmd = Command::new("qemu-io");
    cmd.args(options).args(["-f", "raw", target]);
    for command in commands {
        cmd.arg("-c").arg(command);
    }
    cmd
}

/// Runs qemu-io commands that must all succeed: no failed request and no
/// "Pattern verification failed".
fn qemu_io_ok(filter: &Filter, options: &[&str], commands: impl IntoIterator<Item = String>) {
    let seen = run_client(&mut qemu_io(&filter.uri, options, commands));
    let ok = seen.status.success() && !seen.text().contains("failed");
    ensure(filter, ok, "qemu-io reported a failure", &seen);
}

/// `read -P byte` commands covering the whole image, one per run of equal bytes.
fn pattern_reads(image: &[u8]) -> Vec<String> {
    let mut reads = Vec::new();
    let mut start = 0;
    while start < image.len() {
        let byte = image[start];
        let len = image[start..]
            .iter()
            .position(|&b| b != byte)
            .unwrap_or(image.len() - start);
        reads.push(format!("read -P {byte:#04x} {start} {len}"));
        start += len;
    }
    reads
}

/// Sends MIXED_WORKLOAD through qemu-io, reads every byte of the export back
/// with `read -P`, and checks the backing holds the same bytes. Returns what
/// the disk must hold.
fn check_qemu_io(filter: &Filter, backing: &Path) -> Vec<u8> {
    let mut expected = read_all(backing);
    assert!(
        expected.len() as u64 >= 64 * MIB,
        "the workload needs 64 MiB"
    );
    for op in MIXED_WORKLOAD {
        op.apply(&mut expected);
    }
    qemu_io_ok(filter, &[], MIXED_WORKLOAD.iter().map(Op::qemu_io_command));
    qemu_io_ok(filter, &[], pattern_reads(&expected));
    assert_backing_holds(filter, backing, &expected);
    expected
}

// ---------------------------------------------------------------------------
// libnbd (Python) scripts
// ---------------------------------------------------------------------------

/// argv: URI BACKING MODE START LENGTH SEED. Request i puts 4 KiB-64 KiB of
/// seeded random bytes at a seeded offset in the i-th of 256 slots of
/// [START, START+LENGTH). MODE "write": issue the 256 aio_pwrites at once (in
/// shuffled order), then check. Both modes check: 256 aio_preads at once, each
/// compared with what was written, then the backing (after a flush). Exits 1
/// after printing every mismatch.
const AIO_SCRIPT: &str = r#"
import os, random, sys
import nbd

uri, backing, mode = sys.argv[1:4]
start, length, seed = (int(arg) for arg in sys.argv[4:7])
COUNT = 256
slot = length // COUNT
assert slot >= 65536, "the region must hold 256 slots of 64 KiB"
requests = []
for i in range(COUNT):
    rng = random.Random(seed * 1000003 + i)
    size = rng.randint(4096, 65536)
    offset = start + i * slot + rng.randrange(slot - size + 1)
    requests.append((i, offset, rng.randbytes(size)))
order = list(requests)
random.Random(seed).shuffle(order)

h = nbd.NBD()
h.connect_uri(uri)
failures = []

def complete(what, issued):
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for (i, offset, data), _buf, cookie in issued:
        try:
            if not h.aio_command_completed(cookie):
                failures.append(f"{what} {i} ({len(data)} bytes at {offset}): not completed")
        except nbd.Error as e:
            failures.append(f"{what} {i} ({len(data)} bytes at {offset}): {e}")

def compare(what, i, offset, got, want):
    if got == want:
        return
    k = next((k for k, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
    failures.append(
        f"{what} of request {i} ({len(want)} bytes at {offset}) differs first at "
        f"offset {offset + k}: got {got[k:k + 1].hex() or 'nothing'}, wrote {want[k:k + 1].hex()}")

if mode == "write":
    issued = []
    for r in order:
        buf = nbd.Buffer.from_bytearray(r[2])
        issued.append((r, buf, h.aio_pwrite(buf, r[1])))
    complete("aio_pwrite", issued)

issued = []
for r in order:
    buf = nbd.Buffer(len(r[2]))
    issued.append((r, buf, h.aio_pread(buf, r[1])))
complete("aio_pread", issued)
for (i, offset, data), buf, _cookie in sorted(issued, key=lambda x: x[0][0]):
    compare("aio_pread", i, offset, bytes(buf.to_bytearray()), data)

h.flush()
fd = os.open(backing, os.O_RDONLY)
for i, offset, data in requests:
    compare("the backing", i, offset, os.pread(fd, len(data), offset), data)
os.close(fd)
h.shutdown()

print(f"{mode}: {COUNT} requests in [{start}, {start + length}), {len(failures)} failures")
for failure in failures:
    print("FAIL:", failure)
sys.exit(1 if failures else 0)
"#;

/// The AIO script on `region` of the export.
fn aio_script(
    filter: &Filter,
    backing: &Path,
    mode: &str,
    region: &Range<u64>,
    seed: u64,
) -> Command {
    let mut cmd = python(AIO_SCRIPT);
    cmd.arg(&filter.uri)
        .arg(backing)
        .arg(mode)
        .args([region.start, region.end - region.start, seed].map(|n| n.to_string()));
    cmd
}

/// 256 concurrent asynchronous writes, then 256 concurrent reads, each checked.
fn check_aio(filter: &Filter, backing: &Path, region: Range<u64>, seed: u64) {
    run_ok(
        filter,
        &mut aio_script(filter, backing, "write", &region, seed),
    );
}

/// Runs probes on one connection; every outcome must be as expected.
fn check_probes(filter: &Filter, probes: &[&str]) {
    let mut cmd = python(PROBES);
    cmd.arg(&filter.uri).args(probes);
    let seen = run_client(&mut cmd);
    let what = "an NBD request was not answered as the protocol requires";
    ensure(filter, seen.status.success(), what, &seen);
}

// ---------------------------------------------------------------------------
// Other shared checks
// ---------------------------------------------------------------------------

/// Copies `size` bytes of random data into the export with nbdcopy and back
/// out; both copies and the backing must equal the source.
fn check_nbdcopy(filter: &Filter, backing: &Path, size: u64) {
    let dir = scratch();
    let (src, out) = (dir.path().join("src.img"), dir.path().join("out.img"));
    let data = pseudo_random(size as usize, 6);
    std::fs::write(&src, &data).expect("write src.img");
    run_ok(filter, Command::new("nbdcopy").arg(&src).arg(&filter.uri));
    run_ok(filter, Command::new("nbdcopy").arg(&filter.uri).arg(&out));
    run_ok(filter, Command::new("cmp").arg(&out).arg(&src));
    assert_backing_holds(filter, backing, &data);
}

/// fio's nbd engine: 64 MiB of 4 KiB random writes at queue depth 64, each
/// block read back and checked against its crc32c.
fn check_fio(filter: &Filter) {
    let dir = scratch(); // fio's working directory: it may leave state files
    let seen = run_ok(
        filter,
        Command::new("fio")
            .current_dir(dir.path())
            .arg("--name=v")
            .arg("--ioengine=nbd")
            .arg(format!("--uri={}", filter.uri))
            .args(["--rw=randwrite", "--bs=4k", "--iodepth=64", "--size=64M"])
            .args(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1"]),
    );
    let text = seen.text();
    // 64 MiB / 4 KiB = 16384 writes, and as many verifying reads.
    let ok = text.contains("err= 0")
        && text.contains("total=16384,16384")
        && !text.to_lowercase().contains("verify");
    ensure(
        filter,
        ok,
        "fio reported errors or skipped verification",
        &seen,
    );
}

/// `qemu-img compare -f raw -F raw A B`: exit 0 identical, 1 different.
fn qemu_img_compare(a: impl AsRef<OsStr>, b: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b);
    cmd
}

/// What nbdinfo printed with `--json`.
fn nbdinfo_json(filter: &Filter, seen: &Seen) -> Value {
    let json = serde_json::from_str(&seen.stdout);
    ensure(filter, json.is_ok(), "nbdinfo printed invalid JSON", seen);
    json.unwrap_or_default()
}

/// `nbdinfo --json URI`: the one export's properties.
fn nbdinfo_export(filter: &Filter, uri: &str) -> (Value, Seen) {
    let seen = run_ok(filter, Command::new("nbdinfo").args(["--json", uri]));
    let export = nbdinfo_json(filter, &seen)["exports"][0].clone();
    ensure(
        filter,
        export.is_object(),
        "nbdinfo showed no export",
        &seen,
    );
    (export, seen)
}

/// A scratch dir with a sparse `disk.img` of `size` bytes.
fn blank_disk(size: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    sparse_file(&disk, size);
    (dir, disk)
}

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
    filter.stop_ok();
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
    let replay = run_ok(
        log.as_str(),
        cdp()
            .args(["replay", "--capture-log"])
            .arg(&capture)
            .arg("--onto")
            .arg(&fresh),
    );
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
