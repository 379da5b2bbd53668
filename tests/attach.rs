//! `scripts/attach.sh` and `scripts/detach.sh` against a running `cdp filter`,
//! run with `sh` (dash on Debian: the scripts are POSIX sh). This machine
//! has no nbd module, so they take the nbdfuse + loop device path; where
//! `/dev/nbd*` exists they take nbd-client's, and the tests hold either way.
//! The nbd-client path is exercised in a real kernel by tests/kernel.rs.
//!
//! Each test keeps attach.sh's state in its own directory
//! (`CDP_ATTACH_STATE`), so the tests run in parallel with each other and
//! with whatever else uses /run/cdp-attach.
mod common;

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const SIZE: u64 = 64 << 20;
const MIB: u64 = 1 << 20;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// `sh scripts/NAME ARGS...` with the test's state directory; its output,
/// whatever the status.
fn run_script(name: &str, state: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new("sh");
    cmd.arg(script(name))
        .args(args)
        .env("CDP_ATTACH_STATE", state);
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What the script said, for messages.
fn said(output: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}stderr:\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    )
}

/// Whether this machine has the kernel's nbd devices (then attach.sh uses
/// nbd-client rather than nbdfuse).
fn kernel_nbd() -> bool {
    std::fs::read_dir("/dev")
        .expect("list /dev")
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("nbd"))
}

/// A device made by attach.sh. Dropped while attached (a failed test), it
/// runs detach.sh; should that fail, it undoes by hand what the state file
/// records: losetup -d, a lazy unmount, and SIGKILL to that nbdfuse's PID.
struct Attached {
    device: String,
    state: PathBuf,
    attached: bool,
}

impl Attached {
    /// Runs attach.sh URI and returns the device it printed; panics with
    /// what it said if it fails.
    fn new(uri: &str, state: &Path) -> Attached {
        let output = run_script("attach.sh", state, &[uri]);
        assert!(
            output.status.success(),
            "attach.sh {uri} failed: {}",
            said(&output)
        );
        let device = text(&output.stdout).trim().to_string();
        assert!(
            device.starts_with("/dev/loop") || device.starts_with("/dev/nbd"),
            "attach.sh printed no device: {}",
            said(&output)
        );
        if !kernel_nbd() {
            assert!(
                device.starts_with("/dev/loop") && text(&output.stderr).contains("nbdfuse"),
                "without /dev/nbd* attach.sh should say it attaches through nbdfuse and a loop \
                 device: {}",
                said(&output)
            );
        }
        Attached {
            device,
            state: state.to_path_buf(),
            attached: true,
        }
    }

    fn path(&self) -> &Path {
        Path::new(&self.device)
    }

    /// `KEY=` of the state file attach.sh wrote for the device.
    fn recorded(&self, key: &str) -> Option<String> {
        let name = self.device.trim_start_matches("/dev/");
        let state = std::fs::read_to_string(self.state.join(name)).ok()?;
        state
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
    }

    /// detach.sh DEVICE; its output.
    fn try_detach(&self) -> Output {
        run_script("detach.sh", &self.state, &[&self.device])
    }

    /// detach.sh must succeed and leave nothing behind: no state, no loop
    /// binding, no FUSE mount, no nbdfuse.
    fn detach(mut self) {
        let pid = self.recorded("pid");
        let mountpoint = self.recorded("mountpoint");
        let output = self.try_detach();
        assert!(
            output.status.success(),
            "detach.sh {} failed: {}",
            self.device,
            said(&output)
        );
        self.attached = false;
        let name = self.device.trim_start_matches("/dev/");
        let left: Vec<_> = std::fs::read_dir(&self.state)
            .expect("list the state directory")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert!(
            left.is_empty(),
            "detach.sh left {left:?} in the state directory"
        );
        assert!(
            !Path::new(&format!("/sys/block/{name}/loop")).exists()
                && !Path::new(&format!("/sys/block/{name}/pid")).exists(),
            "{} is still attached after detach.sh",
            self.device
        );
        if let Some(mountpoint) = mountpoint {
            let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read mounts");
            assert!(
                !mounts.contains(&format!(" {mountpoint} ")),
                "{mountpoint} is still mounted after detach.sh"
            );
        }
        if let Some(pid) = pid {
            let gone = retry(Duration::from_secs(5), || {
                match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
                    Ok(comm) if comm.trim() == "nbdfuse" => Err(format!("nbdfuse {pid} runs")),
                    _ => Ok(()),
                }
            });
            assert!(
                gone.is_ok(),
                "nbdfuse (PID {pid}) still runs after detach.sh"
            );
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if !self.attached {
            return;
        }
        let pid = self.recorded("pid");
        let mountpoint = self.recorded("mountpoint");
        if self.try_detach().status.success() {
            return;
        }
        if self.device.starts_with("/dev/loop") {
            let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        }
        if let Some(mountpoint) = mountpoint {
            let _ = Command::new("fusermount3")
                .args(["-u", "-q", "-z"])
                .arg(&mountpoint)
                .status();
        }
        if let Some(pid) = pid.and_then(|p| p.parse::<i32>().ok()) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "nbdfuse" {
                // SAFETY: kill(2) on the PID attach.sh recorded, still nbdfuse.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn dd(args: &[&str]) {
    run(Command::new("dd").args(args).arg("status=none"));
}

/// attach.sh, O_DIRECT writes, a discard and an fsync through the device,
/// read back, detach.sh; then the backing disk holds what was written and the
/// capture log replays to it exactly.
#[test]
fn attach_write_read_detach() {
    require_tools(&[
        "nbdfuse",
        "nbdinfo",
        "losetup",
        "fusermount3",
        "setsid",
        "dd",
        "blkdiscard",
    ]);
    let dir = scratch();
    let state = dir.path().join("state");
    let disk = dir.path().join("disk.img");
    let capture = dir.path().join("capture.log");
    sparse_file(&disk, SIZE);
    let filter = Filter::tcp(&disk, &["--capture-log", capture.to_str().expect("UTF-8")]);

    let attached = Attached::new(&filter.uri, &state);
    let pattern = dir.path().join("pattern");
    let data = pseudo_random(MIB as usize, 7);
    std::fs::write(&pattern, &data).expect("write the pattern");
    let of = format!("of={}", attached.device);
    let pattern_if = format!("if={}", pattern.display());
    // 1 MiB at 0 in 64 KiB requests; 256 KiB at 8 MiB in 4 KiB requests.
    dd(&[&pattern_if, &of, "bs=64k", "oflag=direct", "conv=notrunc"]);
    dd(&[
        &pattern_if,
        &of,
        "bs=4k",
        "count=64",
        "seek=2048",
        "oflag=direct",
        "conv=notrunc,fsync",
    ]);
    run(Command::new("blkdiscard")
        .args(["-o", &(8 * MIB + 64 * 1024).to_string(), "-l", "65536"])
        .arg(attached.path()));
    run(Command::new("sync").arg(attached.path()));

    let device = File::open(attached.path()).expect("open the device");
    let mut back = vec![0u8; MIB as usize];
    device.read_exact_at(&mut back, 0).expect("read the device");
    assert!(
        first_difference(&back, &data).is_none(),
        "the first MiB does not read back as written"
    );
    drop(device);
    attached.detach();

    let log = filter.stop_ok();
    let backing = File::open(&disk).expect("open the backing disk");
    let mut expected = vec![0u8; 9 * MIB as usize];
    expected[..MIB as usize].copy_from_slice(&data);
    let at = 8 * MIB as usize;
    expected[at..at + 256 * 1024].copy_from_slice(&data[..256 * 1024]);
    expected[at + 64 * 1024..at + 128 * 1024].fill(0);
    let mut held = vec![0u8; expected.len()];
    backing
        .read_exact_at(&mut held, 0)
        .expect("read the backing disk");
    if let Some(i) = first_difference(&held, &expected) {
        panic!(
            "the backing disk differs from what was written first at byte {i}\nfilter log:\n{log}"
        );
    }

    let counts = count_records(&capture);
    assert!(
        counts.writes > 0 && counts.trims > 0 && counts.flushes > 0,
        "the capture should hold writes, the discard and flushes: {counts:?}"
    );
    assert_replays_to(&capture, &disk, dir.path());
}

/// An export nobody serves: attach.sh refuses, says why, and makes nothing.
#[test]
fn attach_refuses_an_unreachable_export() {
    require_tools(&["nbdinfo"]);
    let dir = scratch();
    let state = dir.path().join("state");
    // A port nobody listens on (bound, then closed again).
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port();
    let uri = format!("nbd://127.0.0.1:{port}/");
    let output = run_script("attach.sh", &state, &[&uri]);
    assert!(
        !output.status.success() && output.stdout.is_empty(),
        "attach.sh {uri} should fail and print no device: {}",
        said(&output)
    );
    assert!(
        text(&output.stderr).contains("unreachable"),
        "attach.sh should say the export is unreachable: {}",
        said(&output)
    );
    let left: Vec<_> = std::fs::read_dir(&state)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "a refused attach left {left:?} in its state directory"
    );

    let output = run_script("attach.sh", &state, &["http://127.0.0.1/"]);
    assert!(
        !output.status.success() && text(&output.stderr).contains("not an NBD URI"),
        "attach.sh should refuse a URI that is not NBD: {}",
        said(&output)
    );
}

/// detach.sh refuses, naming who uses it and changing nothing, while the
/// device is held open or mounted, and a loop device attach.sh did not make;
/// once the device is free it detaches.
#[test]
fn detach_refuses_a_busy_device() {
    require_tools(&[
        "nbdfuse",
        "nbdinfo",
        "losetup",
        "fusermount3",
        "setsid",
        "mkfs.ext4",
        "mount",
    ]);
    let dir = scratch();
    let state = dir.path().join("state");
    let disk = dir.path().join("disk.img");
    sparse_file(&disk, SIZE);
    // Over a Unix socket (nbd+unix:///?socket=PATH) this time.
    let filter = Filter::unix(&disk, &[]);
    let attached = Attached::new(&filter.uri, &state);

    // Held open by this process.
    let held = File::open(attached.path()).expect("open the device");
    let output = attached.try_detach();
    let me = format!("(PID {}) has it open", std::process::id());
    assert!(
        !output.status.success() && text(&output.stderr).contains(&me),
        "detach.sh should refuse a device this process holds open, saying {me:?}: {}",
        said(&output)
    );
    drop(held);

    // Mounted.
    run(Command::new("mkfs.ext4")
        .args(["-F", "-q"])
        .arg(attached.path()));
    let mount_dir = dir.path().join("mnt");
    std::fs::create_dir(&mount_dir).expect("mkdir mnt");
    let mount = Mount::new(attached.path(), &mount_dir, &[]);
    let output = attached.try_detach();
    assert!(
        !output.status.success()
            && text(&output.stderr).contains(&format!("is mounted on {}", mount_dir.display())),
        "detach.sh should refuse a mounted device, naming the mount: {}",
        said(&output)
    );
    std::fs::write(mount_dir.join("still-here"), b"the refusal changed nothing")
        .expect("write to the mounted file system");
    mount.unmount();

    // A loop device attach.sh did not make.
    if !kernel_nbd() {
        let other = dir.path().join("other.img");
        sparse_file(&other, MIB);
        let loop_device = LoopDevice::attach(&other, false);
        let device = loop_device.path.to_str().expect("UTF-8").to_string();
        let output = run_script("detach.sh", &state, &[&device]);
        assert!(
            !output.status.success() && text(&output.stderr).contains("not attached by attach.sh"),
            "detach.sh should refuse {device}, which attach.sh did not make: {}",
            said(&output)
        );
        loop_device.detach();
    }

    attached.detach();
    filter.stop_ok();
}
