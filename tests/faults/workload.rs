//! The qemu-io workload of `tests/faults.rs`, with a model of what the disk
//! holds after each write, and a writer running it in the background.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::common::pseudo_random;
use crate::support::*;

/// Writes through qemu-io: op `i` writes one block in the first `REGION`
/// bytes — usually random data from one of 16 pattern files (`write -s`, so
/// batches do not compress to nothing), sometimes with FUA, sometimes
/// WRITE_ZEROES or a discard — and every run ends with a flush.
#[derive(Debug)]
pub struct Workload {
    sources: Vec<(PathBuf, Vec<u8>)>,
}

impl Workload {
    pub fn new(dir: &Path) -> Workload {
        let sources = (0..16)
            .map(|n| {
                let path = dir.join(format!("pattern-{n}"));
                let data = pseudo_random(BLOCK as usize, 1000 + n);
                std::fs::write(&path, &data).expect("write pattern file");
                (path, data)
            })
            .collect();
        Workload { sources }
    }

    /// Offset of op `i` and what it writes: `Some(pattern)` or zeros.
    fn op(&self, i: usize) -> (u64, Option<usize>) {
        let offset = (i as u64 * 37 % (REGION / BLOCK)) * BLOCK;
        let zero = i % 11 == 10 || i % 13 == 12;
        // Each visit to a block (every 64 ops) brings another pattern.
        let pattern = (i * 7 + i / 64) % self.sources.len();
        (offset, (!zero).then_some(pattern))
    }

    fn command(&self, i: usize) -> String {
        let (offset, pattern) = self.op(i);
        match pattern {
            Some(n) => {
                let fua = if i % 5 == 4 { "-f " } else { "" };
                let path = self.sources[n].0.display();
                format!("write -q {fua}-s {path} {offset} {BLOCK}")
            }
            None if i % 2 == 0 => format!("write -q -z {offset} {BLOCK}"),
            None => format!("discard -q {offset} {BLOCK}"),
        }
    }

    /// Applies ops `range` to a model of the disk.
    pub fn model(&self, image: &mut [u8], range: std::ops::Range<usize>) {
        for i in range {
            let (offset, pattern) = self.op(i);
            let block = &mut image[offset as usize..(offset + BLOCK) as usize];
            match pattern {
                Some(n) => block.copy_from_slice(&self.sources[n].1),
                None => block.fill(0),
            }
        }
    }

    /// Ops `first..first + OPS_PER_RUN` and a flush, in one qemu-io process.
    pub fn run(&self, uri: &str, first: usize) -> Result<(), String> {
        let mut child = self.spawn(uri, first);
        if wait_timeout(&mut child, Duration::from_secs(60)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "qemu-io (ops from {first}) ran for 60 s; killed it"
            ));
        }
        check_qemu_io(&child.wait_with_output().expect("qemu-io output"))
    }

    fn spawn(&self, uri: &str, first: usize) -> Child {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", uri]);
        for i in first..first + OPS_PER_RUN {
            cmd.arg("-c").arg(self.command(i));
        }
        cmd.args(["-c", "flush"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run qemu-io")
    }
}

fn check_qemu_io(output: &Output) -> Result<(), String> {
    let seen = text(output);
    if output.status.success() && !seen.contains("failed") && !seen.contains("rror") {
        Ok(())
    } else {
        Err(format!("qemu-io exited with {}:\n{seen}", output.status))
    }
}

/// Runs the workload in qemu-io processes, one after another, until
/// stopped; the qemu-io running when it is dropped is killed by PID.
pub struct Writer {
    stop: Arc<AtomicBool>,
    current: Arc<Mutex<Option<Child>>>,
    thread: Option<JoinHandle<(usize, Option<String>)>>,
}

impl Writer {
    pub fn start(workload: &Arc<Workload>, uri: String, first: usize) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let current: Arc<Mutex<Option<Child>>> = Arc::default();
        let (workload, flag, slot) = (workload.clone(), stop.clone(), current.clone());
        let thread = std::thread::spawn(move || {
            let mut next = first;
            while !flag.load(Ordering::Relaxed) {
                *slot.lock().expect("lock") = Some(workload.spawn(&uri, next));
                let status = loop {
                    let mut guard = slot.lock().expect("lock");
                    let child = guard.as_mut().expect("running");
                    if let Ok(Some(status)) = child.try_wait() {
                        break status;
                    }
                    drop(guard);
                    sleep_ms(5);
                };
                let child = slot.lock().expect("lock").take().expect("running");
                let mut output = child.wait_with_output().expect("qemu-io output");
                output.status = status;
                if let Err(e) = check_qemu_io(&output) {
                    return (next, Some(format!("the writer failed at op {next}: {e}")));
                }
                next += OPS_PER_RUN;
                sleep_ms(30);
            }
            (next, None)
        });
        Writer {
            stop,
            current,
            thread: Some(thread),
        }
    }

    /// Lets the running qemu-io finish and stops; returns the next op and
    /// the failure, if a qemu-io failed.
    pub fn finish(mut self) -> (usize, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("running");
        thread.join().expect("writer thread")
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(child) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            let _ = child.kill();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
