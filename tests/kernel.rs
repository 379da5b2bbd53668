//! A real Linux kernel's NBD client on protected disks. This machine has no
//! nbd module (and nested KVM does not work here), so Debian's cloud kernel
//! boots under `qemu-system-x86_64 -accel tcg` with a small initramfs
//! (scripts/kernel-initramfs.sh, cached). Its /init (tests/kernel/init)
//! reaches the host's 127.0.0.1 as 10.0.2.2 and, through scripts/attach.sh
//! and detach.sh run by busybox sh, attaches two exports with nbd-client:
//! `cdp filter --capture-log` (defaults: the first free device, one
//! connection) and `cdp protect` replicating to `cdp target` (/dev/nbd3, two
//! connections, 4 KiB blocks). On each it writes a pattern with O_DIRECT,
//! fsyncs, discards and zeroes ranges, reads back, checks that detach.sh
//! refuses while the device is open, detaches and powers off. Then, on the
//! host: both backing disks hold exactly that layout, the capture log
//! replays to the filter's disk, and the newest restore point equals the
//! protected disk. See docs/KERNEL.md.
mod common;

use std::fs::File;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::replication::*;
use common::*;

const SIZE: u64 = 64 * MIB;
/// How long the guest may take from boot to power-off. It takes about ten
/// seconds here; the margin is for a machine busy with other builds.
const GUEST_PATIENCE: Duration = Duration::from_secs(180);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// qemu-system-x86_64 running the guest, its serial console in a file.
/// Killed (SIGKILL to its PID) and reaped if dropped while running.
struct Qemu {
    child: Option<Child>,
    console: PathBuf,
    stderr: PathBuf,
}

impl Qemu {
    fn boot(qemu: &str, kernel: &str, initrd: &str, append: &str, dir: &Path) -> Qemu {
        let console = dir.join("console.txt");
        let stderr = dir.join("qemu.stderr");
        let mut cmd = Command::new(qemu);
        cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1"])
            .args(["-nographic", "-no-reboot"])
            .args(["-kernel", kernel, "-initrd", initrd, "-append", append])
            // The host's 127.0.0.1 is 10.0.2.2 to the guest; no option ROM.
            .args([
                "-netdev",
                "user,id=n",
                "-device",
                "virtio-net-pci,netdev=n,romfile=",
            ])
            .stdin(Stdio::null())
            .stdout(File::create(&console).expect("create the console file"))
            .stderr(File::create(&stderr).expect("create qemu's stderr file"));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Qemu {
            child: Some(child),
            console,
            stderr,
        }
    }

    /// Waits for qemu to exit (the guest powers off); kills it after
    /// `patience`.
    fn wait(&mut self, patience: Duration) -> Result<ExitStatus, String> {
        let child = self.child.as_mut().expect("qemu running");
        let status = retry(patience, || match child.try_wait() {
            Ok(Some(status)) => Ok(status),
            Ok(None) => Err(format!("the guest did not power off within {patience:?}")),
            Err(e) => Err(format!("cannot wait for qemu: {e}")),
        });
        if status.is_err() {
            self.kill();
        }
        self.child = None;
        status
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL to this child's PID.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// The guest's own lines, the console's last lines and qemu's stderr.
    fn report(&self) -> String {
        let console = self.console();
        let lines: Vec<&str> = console.lines().collect();
        let guest: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("cdp-guest:") || l.starts_with("CDP-KERNEL-RESULT"))
            .collect();
        let tail = &lines[lines.len().saturating_sub(60)..];
        format!(
            "--- guest lines ---\n{}\n--- console tail ---\n{}\n--- qemu stderr ---\n{}",
            guest.join("\n"),
            tail.join("\n"),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What tests/kernel/init leaves on each export (its header has the layout).
fn expected_disk(pattern: &[u8]) -> Vec<u8> {
    const KIB: usize = 1024;
    const M: usize = MIB as usize;
    let mut disk = vec![0u8; SIZE as usize];
    disk[..M].copy_from_slice(pattern);
    disk[8 * M..8 * M + 256 * KIB].copy_from_slice(&pattern[256 * KIB..512 * KIB]);
    disk[8 * M + 64 * KIB..8 * M + 128 * KIB].fill(0);
    disk[60 * M..61 * M].copy_from_slice(pattern);
    disk[60 * M + 256 * KIB..60 * M + 384 * KIB].fill(0);
    disk
}

/// Where a disk first differs from `expected`, as a sentence.
fn differs_from(disk: &Path, expected: &[u8]) -> Option<String> {
    let file = File::open(disk).unwrap_or_else(|e| panic!("open {}: {e}", disk.display()));
    let len = file.metadata().expect("stat the disk").len();
    if len != expected.len() as u64 {
        return Some(format!("{} has {len} bytes", disk.display()));
    }
    let mut held = vec![0u8; expected.len()];
    file.read_exact_at(&mut held, 0)
        .unwrap_or_else(|e| panic!("read {}: {e}", disk.display()));
    first_difference(&held, expected).map(|i| {
        format!(
            "{} differs from what the guest wrote first at byte {i} ({:#04x}, expected {:#04x})",
            disk.display(),
            held[i],
            expected[i]
        )
    })
}

#[test]
fn the_kernel_nbd_client_attaches_protected_disks() {
    let started = Instant::now();
    let dir = scratch();

    // The guest's own files, laid over the cached initramfs.
    let overlay = make_dir(dir.path(), "overlay");
    for (from, to) in [
        ("tests/kernel/init", "init"),
        ("scripts/attach.sh", "attach.sh"),
        ("scripts/detach.sh", "detach.sh"),
    ] {
        let path = overlay.join(to);
        std::fs::copy(repo(from), &path).unwrap_or_else(|e| panic!("copy {from}: {e}"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("make it executable");
    }
    let pattern = pseudo_random(MIB as usize, 0x6b65726e656c);
    std::fs::write(overlay.join("pattern"), &pattern).expect("write the pattern");
    let boot = make_dir(dir.path(), "boot");
    let prepared = run_stdout(
        Command::new("bash")
            .arg(repo("scripts/kernel-initramfs.sh"))
            .arg(&boot)
            .arg(&overlay),
    );
    let field = |name: &str| {
        prepared
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("kernel-initramfs.sh printed no {name} line:\n{prepared}"))
            .to_string()
    };
    let (kernel, initrd, qemu) = (field("kernel"), field("initrd"), field("qemu"));
    let prepare_time = started.elapsed();

    // Export 1: the filter with a capture log. Export 2: protect, replicating.
    let disk = dir.path().join("filter-disk.img");
    let capture = dir.path().join("capture.log");
    sparse_file(&disk, SIZE);
    let filter = Filter::tcp(&disk, &["--capture-log", capture.to_str().expect("UTF-8")]);
    let repl_dir = make_dir(dir.path(), "replication");
    let protected = repl_dir.join("protected-disk.img");
    sparse_file(&protected, SIZE);
    let mut repl = Replication::start(&repl_dir, &protected, &["--rpo", RPO]);
    let ports = format!(
        "{},{}",
        filter.port.expect("TCP port"),
        repl.protect().port()
    );

    let booted = Instant::now();
    let mut guest = Qemu::boot(
        &qemu,
        &kernel,
        &initrd,
        &format!("console=ttyS0 panic=-1 cdp.ports={ports}"),
        dir.path(),
    );
    let status = guest.wait(GUEST_PATIENCE);
    let guest_time = booted.elapsed();
    let console = guest.console();
    let result = console
        .lines()
        .find(|l| l.starts_with("CDP-KERNEL-RESULT"))
        .map(str::trim);
    match (&status, result) {
        (Ok(_), Some("CDP-KERNEL-RESULT ok")) => {}
        (Ok(status), result) => repl.fail(&format!(
            "the guest powered off (qemu {status}) with {result:?}, not \
             \"CDP-KERNEL-RESULT ok\"\n{}\n--- filter log ---\n{}",
            guest.report(),
            filter.log()
        )),
        (Err(e), _) => repl.fail(&format!(
            "{e} (killed qemu)\n{}\n--- filter log ---\n{}",
            guest.report(),
            filter.log()
        )),
    }
    eprintln!(
        "kernel test: kernel and initramfs ready in {prepare_time:.1?}, guest booted, \
         worked and powered off in {guest_time:.1?}"
    );
    for line in console.lines().filter(|l| l.starts_with("cdp-guest:")) {
        eprintln!("  {line}");
    }

    // The filter's disk and its capture stream.
    let expected = expected_disk(&pattern);
    let filter_log = filter.stop_ok();
    if let Some(difference) = differs_from(&disk, &expected) {
        panic!(
            "{difference}\n{}\n--- filter log ---\n{filter_log}",
            guest.report()
        );
    }
    let counts = count_records(&capture);
    eprintln!("  captured from the kernel: {counts:?}");
    assert!(
        counts.writes > 0 && counts.trims > 0 && counts.flushes > 0,
        "the kernel's writes, discard and flushes should all be captured: {counts:?}"
    );
    assert_replays_to(&capture, &disk, dir.path());

    // The protected disk, its two connections, and its newest restore point.
    repl.stop_protect();
    if let Some(difference) = differs_from(&protected, &expected) {
        repl.fail(&format!("{difference}\n{}", guest.report()));
    }
    let connections = repl
        .protect_log
        .lines()
        .filter(|l| l.contains("connection closed"))
        .count();
    if connections < 2 {
        repl.fail(&format!(
            "nbd-client -C 2 should have made two connections to protect; its log closed \
             {connections}"
        ));
    }
    check_newest_point(&repl, &repl_dir, &protected);
    eprintln!("kernel test: {:.1?} in all", started.elapsed());
}
