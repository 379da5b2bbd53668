//! What `tests/clients.rs` runs its clients with: running a client and
//! reporting what it did, qemu-io workloads with a model of what the disk
//! must hold afterwards, libnbd scripts, and checks with nbdcopy, fio,
//! qemu-img and nbdinfo.

use std::ffi::OsStr;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::process::{Command, ExitStatus, Output};

use serde_json::Value;

use crate::common::*;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// Running clients and reporting what they did
// ---------------------------------------------------------------------------

/// What a client process did.
pub struct Seen {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Seen {
    pub fn new(command: String, output: Output) -> Seen {
        Seen {
            command,
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// stdout and stderr together.
    pub fn text(&self) -> String {
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
pub fn command_line(cmd: &Command) -> String {
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
pub fn run_client(cmd: &mut Command) -> Seen {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", command_line(cmd)));
    Seen::new(command_line(cmd), output)
}

/// Where panic messages get the filter's log: the running filter, or the
/// log `stop_ok` returned.
pub trait FilterLog {
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
pub fn ensure(log: &(impl FilterLog + ?Sized), ok: bool, what: &str, seen: &Seen) {
    if !ok {
        panic!("{what}\n{seen}\n--- filter log ---\n{}", log.filter_log());
    }
}

/// Runs a client that must exit 0.
pub fn run_ok(log: &(impl FilterLog + ?Sized), cmd: &mut Command) -> Seen {
    let seen = run_client(cmd);
    ensure(log, seen.status.success(), "the client failed", &seen);
    seen
}

/// Panics, naming the first differing byte and showing the filter's log,
/// unless `actual` equals `expected`.
pub fn assert_bytes(log: &(impl FilterLog + ?Sized), what: &str, actual: &[u8], expected: &[u8]) {
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
pub fn assert_backing_holds(log: &(impl FilterLog + ?Sized), backing: &Path, expected: &[u8]) {
    let what = format!("{} does not hold the expected bytes", backing.display());
    assert_bytes(log, &what, &read_all(backing), expected);
}

// ---------------------------------------------------------------------------
// qemu-io workloads, with a model of what the disk must hold afterwards
// ---------------------------------------------------------------------------

/// One qemu-io request.
#[derive(Debug, Clone, Copy)]
pub enum Op {
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
    pub fn qemu_io_command(&self) -> String {
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
    pub fn apply(&self, image: &mut [u8]) {
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
pub const MIXED_WORKLOAD: &[Op] = &[
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
pub fn qemu_io(
    target: &str,
    options: &[&str],
    commands: impl IntoIterator<Item = String>,
) -> Command {
    let mut cmd = Command::new("qemu-io");
    cmd.args(options).args(["-f", "raw", target]);
    for command in commands {
        cmd.arg("-c").arg(command);
    }
    cmd
}

/// Runs qemu-io commands that must all succeed: no failed request and no
/// "Pattern verification failed".
pub fn qemu_io_ok(filter: &Filter, options: &[&str], commands: impl IntoIterator<Item = String>) {
    let seen = run_client(&mut qemu_io(&filter.uri, options, commands));
    let ok = seen.status.success() && !seen.text().contains("failed");
    ensure(filter, ok, "qemu-io reported a failure", &seen);
}

/// `read -P byte` commands covering the whole image, one per run of equal bytes.
pub fn pattern_reads(image: &[u8]) -> Vec<String> {
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
pub fn check_qemu_io(filter: &Filter, backing: &Path) -> Vec<u8> {
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

/// argv: URI BACKING MODE START LENGTH SEED. Request i puts from 4 KiB up
/// to a slot of seeded random bytes (whole pages for every other request) at
/// a seeded offset in the i-th of 256 slots of [START, START+LENGTH). MODE
/// "write": issue the 256 aio_pwrites at once (in shuffled order), then
/// check. Both modes check: 256 aio_preads at once, each compared with what
/// was written, then the backing (after a flush). Exits 1 after printing
/// every mismatch.
pub const AIO_SCRIPT: &str = r#"
import os, random, sys
import nbd

uri, backing, mode = sys.argv[1:4]
start, length, seed = (int(arg) for arg in sys.argv[4:7])
COUNT = 256
slot = length // COUNT
assert slot >= 65536 and start % 4096 == 0, "the region must start on a page and hold 256 slots of 64 KiB"
requests = []
for i in range(COUNT):
    rng = random.Random(seed * 1000003 + i)
    size = rng.randint(4096, slot)
    offset = start + i * slot + rng.randrange(slot - size + 1)
    if i % 2 == 0:
        # Whole pages: the server writes these into the page cache itself,
        # and answers the large ones at once, beside the other replies.
        size &= ~4095
        offset &= ~4095
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
pub fn aio_script(
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
pub fn check_aio(filter: &Filter, backing: &Path, region: Range<u64>, seed: u64) {
    run_ok(
        filter,
        &mut aio_script(filter, backing, "write", &region, seed),
    );
}

/// Runs probes on one connection; every outcome must be as expected.
pub fn check_probes(filter: &Filter, probes: &[&str]) {
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
pub fn check_nbdcopy(filter: &Filter, backing: &Path, size: u64) {
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
pub fn check_fio(filter: &Filter) {
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
pub fn qemu_img_compare(a: impl AsRef<OsStr>, b: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b);
    cmd
}

/// What nbdinfo printed with `--json`.
pub fn nbdinfo_json(filter: &Filter, seen: &Seen) -> Value {
    let json = serde_json::from_str(&seen.stdout);
    ensure(filter, json.is_ok(), "nbdinfo printed invalid JSON", seen);
    json.unwrap_or_default()
}

/// `nbdinfo --json URI`: the one export's properties.
pub fn nbdinfo_export(filter: &Filter, uri: &str) -> (Value, Seen) {
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
pub fn blank_disk(size: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    sparse_file(&disk, size);
    (dir, disk)
}
