//! `cdp point` against protect's control socket, for the tagged-point tests.
use std::path::Path;
use std::process::Output;

use super::*;

/// What one `cdp point` run did.
#[derive(Debug)]
pub struct PointRun {
    /// The exit status (`None` if killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl PointRun {
    /// The journal sequence number of a point it made durable; panics with
    /// what it printed otherwise.
    pub fn durable_seq(&self) -> u64 {
        let seq = self
            .stdout
            .split("durable on the target: seq ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|seq| seq.parse().ok());
        match (self.code, seq) {
            (Some(0), Some(seq)) => seq,
            _ => panic!("cdp point did not make a durable point:\n{self}"),
        }
    }

    /// Asserts the exit status and that stderr mentions `needle`.
    pub fn assert_failed(&self, code: i32, needle: &str) {
        assert!(
            self.code == Some(code) && self.stderr.contains(needle),
            "expected cdp point to exit with {code} saying {needle:?}:\n{self}"
        );
    }
}

impl std::fmt::Display for PointRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit status {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// `cdp point --control CONTROL --tag TAG ARGS...`.
pub fn cdp_point(control: &Path, tag: &str, args: &[&str]) -> PointRun {
    let mut cmd = cdp();
    cmd.arg("point")
        .arg("--control")
        .arg(control)
        .arg("--tag")
        .arg(tag)
        .args(args)
        .env("RUST_BACKTRACE", "0");
    let Output {
        status,
        stdout,
        stderr,
    } = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    PointRun {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// A shell command appending `word` to the file `marks` (a quiesce or thaw
/// hook that leaves a trace), followed by `then`.
pub fn mark(marks: &Path, word: &str, then: &str) -> String {
    format!("echo {word} >> '{}'{then}", marks.display())
}

/// The words hooks appended to `marks`, in order (none if it is missing).
pub fn marks(marks: &Path) -> Vec<String> {
    std::fs::read_to_string(marks)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The newest point tagged `tag`; panics with the table if there is none.
pub fn tagged<'a>(points: &'a [Point], tag: &str) -> &'a Point {
    points
        .iter()
        .rev()
        .find(|p| p.tag.as_deref() == Some(tag))
        .unwrap_or_else(|| panic!("no point is tagged {tag:?}:\n{points:#?}"))
}
