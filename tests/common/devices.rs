//! Block devices and file systems the tests make and always take down:
//! loop devices, mounts and nbdfuse mounts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::{retry, run, run_stdout, scratch};

pub struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    pub fn attach(file: &Path, direct_io: bool) -> LoopDevice {
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show"]);
        if direct_io {
            cmd.arg("--direct-io=on");
        }
        let path = run_stdout(cmd.arg(file)).trim().to_string();
        assert!(path.starts_with("/dev/loop"), "losetup printed {path:?}");
        LoopDevice {
            path: PathBuf::from(path),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

impl LoopDevice {
    /// Detaches the device and waits until the kernel has let go of the
    /// backing file; panics if it does not.
    pub fn detach(mut self) {
        if let Err(e) = self.release() {
            panic!("{e}");
        }
    }

    /// `losetup -d` (retried while it fails), then waits up to 10 s for the
    /// binding to go: the kernel clears it only on the last close, so a
    /// short-lived opener (udev, blkid) can delay it. Idempotent.
    fn release(&mut self) -> Result<(), String> {
        let path = std::mem::take(&mut self.path);
        if path.as_os_str().is_empty() {
            return Ok(());
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let bound = PathBuf::from(format!("/sys/block/{name}/loop"));
        let result = retry(Duration::from_secs(10), || {
            if !bound.exists() {
                return Ok(());
            }
            let output = Command::new("losetup").arg("-d").arg(&path).output();
            match output {
                Ok(_) if !bound.exists() => Ok(()),
                Ok(o) if !o.status.success() => Err(format!(
                    "losetup -d {} failed with {}: {}",
                    path.display(),
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Ok(_) => Err(format!("{} is still bound", path.display())),
                Err(e) => Err(format!("cannot run losetup: {e}")),
            }
        });
        result.map_err(|e| format!("cannot detach {}: {e}", path.display()))
    }
}
/// A mounted file system; unmounted when dropped: `umount`, retried while
/// busy, and as a last resort `umount -l`.
pub struct Mount {
    pub target: PathBuf,
    mounted: bool,
}

impl Mount {
    /// Runs `mount ARGS SOURCE TARGET` (e.g. `args = &["-o", "ro"]`).
    pub fn new(source: &Path, target: &Path, args: &[&str]) -> Mount {
        run(Command::new("mount").args(args).arg(source).arg(target));
        Mount {
            target: target.to_path_buf(),
            mounted: true,
        }
    }

    /// A tmpfs of `size` (as `mount -o size=` takes it, e.g. `1m`) at
    /// `target`, made if missing: a file system that fills up on cue.
    pub fn tmpfs(target: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(target).expect("create the mount point");
        let options = format!("size={size}");
        Mount::new(Path::new("tmpfs"), target, &["-t", "tmpfs", "-o", &options])
    }

    /// Gives a tmpfs a new size (`mount -o remount,size=SIZE`): room again.
    pub fn resize_tmpfs(&self, size: &str) {
        let options = format!("remount,size={size}");
        run(Command::new("mount")
            .args(["-o", &options])
            .arg(&self.target));
    }

    /// Unmounts, asserting that a plain `umount` worked (within 10 s).
    pub fn unmount(mut self) {
        if let Err(e) = self.release() {
            panic!("{e}");
        }
    }

    fn release(&mut self) -> Result<(), String> {
        if !std::mem::take(&mut self.mounted) {
            return Ok(());
        }
        let target = &self.target;
        retry(Duration::from_secs(10), || {
            succeeds(Command::new("umount").arg(target))
        })
        .map_err(|e| {
            let _ = Command::new("umount").arg("-l").arg(target).status();
            format!(
                "umount {} kept failing ({e}); detached it lazily",
                target.display()
            )
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// An NBD export presented as a file by `nbdfuse`, which runs in the
/// foreground as our child. Unmounted when dropped: `fusermount3 -u`
/// (retried while busy), which makes nbdfuse exit; if that does not work,
/// a lazy unmount and SIGKILL.
pub struct FuseMount {
    child: Option<Child>,
    pub dir: PathBuf,
    /// The export as a file: `DIR/nbd`.
    pub file: PathBuf,
    log: PathBuf,
    _log_dir: TempDir,
}

impl FuseMount {
    /// Runs `nbdfuse DIR URI` and waits (up to 20 s) until `DIR/nbd` has
    /// `size` bytes.
    pub fn nbdfuse(dir: &Path, uri: &str, size: u64) -> FuseMount {
        let log_dir = scratch();
        let log = log_dir.path().join("nbdfuse.log");
        let out = std::fs::File::create(&log).expect("create nbdfuse log");
        let mut cmd = Command::new("nbdfuse");
        cmd.arg(dir)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup nbdfuse log"))
            .stderr(out);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut mount = FuseMount {
            child: Some(child),
            dir: dir.to_path_buf(),
            file: dir.join("nbd"),
            log,
            _log_dir: log_dir,
        };
        let appeared = retry(Duration::from_secs(20), || {
            let child = mount.child.as_mut().expect("running");
            if let Ok(Some(status)) = child.try_wait() {
                mount.child = None;
                return Ok(Err(format!("nbdfuse exited with {status}")));
            }
            match std::fs::metadata(&mount.file) {
                Ok(meta) if meta.len() == size => Ok(Ok(())),
                Ok(meta) => Err(format!("it has {} bytes, not {size}", meta.len())),
                Err(e) => Err(format!("{e}")),
            }
        });
        match appeared {
            Ok(Ok(())) => mount,
            Ok(Err(e)) | Err(e) => panic!(
                "{cmd:?}: {} did not appear: {e}\nlog:\n{}",
                mount.file.display(),
                mount.log()
            ),
        }
    }

    /// What nbdfuse has printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Unmounts and asserts nbdfuse exited cleanly.
    pub fn unmount(mut self) {
        if let Err(e) = self.release() {
            panic!("{e}\nnbdfuse log:\n{}", self.log());
        }
    }

    fn release(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            // Not running (it exited during start-up): just make sure
            // nothing is left mounted.
            let _ = Command::new("fusermount3")
                .args(["-u", "-q", "-z"])
                .arg(&self.dir)
                .status();
            return Ok(());
        };
        let dir = &self.dir;
        let unmounted = retry(Duration::from_secs(10), || {
            succeeds(Command::new("fusermount3").arg("-u").arg(dir))
        });
        let exited = unmounted.and_then(|()| {
            retry(Duration::from_secs(10), || match child.try_wait() {
                Ok(Some(status)) => Ok(status),
                Ok(None) => Err("nbdfuse did not exit after fusermount3 -u".to_string()),
                Err(e) => Err(format!("cannot wait for nbdfuse: {e}")),
            })
        });
        match exited {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(format!("nbdfuse exited with {status}")),
            Err(e) => {
                let _ = Command::new("fusermount3")
                    .args(["-u", "-q", "-z"])
                    .arg(dir)
                    .status();
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "unmounting {} failed ({e}); detached it lazily and killed nbdfuse",
                    dir.display()
                ))
            }
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// Runs `cmd`; its stderr is the error if it fails (for [`retry`]).
fn succeeds(cmd: &mut Command) -> Result<(), String> {
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
    }
}
