//! Failover: a restore point made into a disk that production can run on
//! (and `cdp protect` can serve and protect back toward the original side),
//! with a marker beside it ([`marker`]) saying which disk it stands in for
//! and from which point. This is the one place a failover rebuilds a point,
//! so a new way of rebuilding (base and delta images) is swapped in here.
//! The procedure is in `docs/FAILOVER.md`.

pub mod marker;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use pipeline::key::Key;

use crate::history::{History, Point};
use crate::restore::RestoreError;
use marker::{Marker, MarkerError, State};

#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error(
        "{0} exists: cdp failover makes a new disk file and never writes over an existing one"
    )]
    Exists(PathBuf),
    #[error(
        "a failover marker {0} exists without its disk: remove it if it is left from an earlier failover"
    )]
    MarkerExists(PathBuf),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Marker(#[from] MarkerError),
}

/// The marker that goes with failover disk `disk`: `DISK.failover`.
pub fn marker_path(disk: &Path) -> PathBuf {
    let mut path = disk.as_os_str().to_owned();
    path.push(".failover");
    PathBuf::from(path)
}

/// Makes `out` (a new file) the disk at `point`, then writes its marker.
/// Nothing is left behind if either step fails.
pub fn failover(
    history: &History,
    key: &Key,
    point: &Point,
    out: &Path,
    progress: impl FnMut(u64, u64),
) -> Result<Marker, FailoverError> {
    let marker_path = marker_path(out);
    if out.symlink_metadata().is_ok() {
        return Err(FailoverError::Exists(out.to_path_buf()));
    }
    if marker_path.symlink_metadata().is_ok() {
        return Err(FailoverError::MarkerExists(marker_path));
    }
    history.restore(key, point, out, progress)?;
    let marker = Marker {
        disk_id: history.disk_id(),
        disk_size: history.disk_size(),
        point_id: point.id,
        point_time_ns: point.point_time_ns,
        point_last_seq: point.last_seq,
        failed_over_ns: now_ns(),
        state: State::FailedOver,
    };
    if let Err(e) = marker.store(&marker_path) {
        let _ = std::fs::remove_file(out);
        return Err(e.into());
    }
    Ok(marker)
}

/// Records in the marker of `disk` that a failback pass shipped `chunks`
/// chunks (`bytes` bytes) and completed now.
pub fn record_failback(disk: &Path, chunks: u64, bytes: u64) -> Result<Marker, MarkerError> {
    let path = marker_path(disk);
    let mut marker = Marker::load(&path)?;
    marker.state = State::FailedBack {
        at_ns: now_ns(),
        chunks,
        bytes,
    };
    marker.store(&path)?;
    Ok(marker)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
