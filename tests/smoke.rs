//! The filter starts, serves a real client, and stops cleanly on SIGTERM.
mod common;

use common::*;

#[test]
fn serves_nbdinfo_and_stops_on_sigterm() {
    require_tools(&["nbdinfo"]);
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    sparse_file(&disk, 16 << 20);
    let filter = Filter::tcp(&disk, &[]);
    let size = run_stdout(
        std::process::Command::new("nbdinfo")
            .arg("--size")
            .arg(&filter.uri),
    );
    assert_eq!(size.trim(), (16u64 << 20).to_string());
    let log = filter.stop_ok();
    assert!(
        log.contains("filter stopped"),
        "no clean-stop line in log:\n{log}"
    );
}
