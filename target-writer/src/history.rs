//! The restore points a target directory holds, in both tiers, and the way
//! to each: which points are restorable, which layers and journal entries
//! rebuild one, the full rebuild ([`History::restore`]) and the layered view
//! that `serve-point` reads through ([`History::image`]).
//!
//! A point is the journal entry id it was cut at; a long-term point keeps
//! the id of the entry it was rolled up to. A journal point is restorable
//! when the journal still holds every entry from the newest long-term point
//! below it (or from the very first entry) up to it. The cheapest path is
//! always taken: the long-term layers up to the newest long-term point at or
//! below the point, then the journal entries after it.
//!
//! Opening takes the readers' pin (see `longterm/files.rs`), so retention
//! does not remove what this reads until the [`History`] is dropped.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use pipeline::key::Key;

use crate::format::longterm::{
    base_map_file_name, delta_file_name, Catalog, LongTermPoint, PointStamp, BASE_IMAGE_FILE,
    LONGTERM_DIR,
};
use crate::journal::{Journal, JournalError, JOURNAL_DIR};
use crate::longterm::{Layer, LongTermError, PointImage};
use crate::restore::{format_time, read_batch, PointSelector, RestoreError};

/// Which tier holds a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Journal,
    LongTerm,
    /// A long-term point whose journal entry is still retained too.
    Both,
}

/// One restorable point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    pub id: u64,
    /// The first capture sequence number of its journal entry, if the
    /// journal holds it.
    pub first_seq: Option<u64>,
    pub last_seq: u64,
    /// When the source cut it, ns since the epoch (the source's clock).
    pub point_time_ns: u64,
    /// When the target made it durable, ns since the epoch (its clock).
    pub received_time_ns: u64,
    pub tier: Tier,
    pub tag: Option<String>,
    /// Bytes of the journal entry, if the journal holds it.
    pub journal_bytes: Option<u64>,
    /// Bytes of block data of its long-term image, if it is a long-term point.
    pub long_term_bytes: Option<u64>,
    /// The point ends on a barrier (a flush or FUA write).
    pub ends_on_barrier: bool,
}

/// How much of the journal [`History::open`] verifies up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Everything,
    WhenRead,
}

/// A target directory's history, pinned against removal while open.
#[derive(Debug)]
pub struct History {
    dir: PathBuf,
    _pin: Option<crate::longterm::Pin>,
    catalog: Option<Catalog>,
    journal: Option<Journal>,
    disk_id: [u8; 16],
    disk_size: u64,
}

impl History {
    /// Opens the history in `dir` for reading; changes nothing. With
    /// [`Check::Everything`] every journal entry's body CRC is verified now
    /// (`cdp points`, an audit); with [`Check::WhenRead`] only headers are,
    /// and bodies when a rebuild reads them (fast however long the journal).
    pub fn open(dir: &Path, check: Check) -> Result<History, RestoreError> {
        let longterm = dir.join(LONGTERM_DIR);
        let pin = crate::longterm::pin_shared(&longterm)?;
        let catalog = crate::longterm::load_catalog(&longterm)?;
        let journal = if dir.join(JOURNAL_DIR).is_dir() || catalog.is_none() {
            let opened = match check {
                Check::Everything => Journal::open_read_only(dir),
                Check::WhenRead => Journal::open_index(dir),
            };
            match opened {
                Ok((journal, _)) => Some(journal),
                Err(JournalError::Empty { .. }) if catalog.is_some() => None,
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        let (disk_id, disk_size) = match (&catalog, &journal) {
            (Some(c), _) => (c.disk_id, c.disk_size),
            (None, Some(j)) => (j.disk_id(), j.disk_size()),
            (None, None) => unreachable!("a history without a catalog has a journal"),
        };
        Ok(History {
            dir: dir.to_path_buf(),
            _pin: pin,
            catalog,
            journal,
            disk_id,
            disk_size,
        })
    }

    pub fn disk_id(&self) -> [u8; 16] {
        self.disk_id
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    pub fn catalog(&self) -> Option<&Catalog> {
        self.catalog.as_ref()
    }

    /// The long-term points, oldest first, with the number of layers
    /// (base first) that make each.
    fn long_term(&self) -> Vec<(&LongTermPoint, usize)> {
        let Some(catalog) = &self.catalog else {
            return Vec::new();
        };
        let mut points = Vec::new();
        if let Some(base) = &catalog.base {
            // While a delta is being merged into it, the base's own point is gone.
            if catalog.merging.is_none() {
                points.push((base, 1));
            }
            for (i, delta) in catalog.deltas.iter().enumerate() {
                points.push((delta, i + 2));
            }
        }
        points
    }

    /// Where point `id` comes from: the layers of the newest long-term point
    /// at or below it (how many, and that point's id), and whether the
    /// journal holds every entry after that up to `id`.
    fn path_to(&self, id: u64) -> Option<(usize, u64)> {
        let below = self
            .long_term()
            .into_iter()
            .rev()
            .find(|(p, _)| p.point.entry_id <= id)
            .map_or((0, 0), |(p, layers)| (layers, p.point.entry_id));
        if below.1 == id {
            return Some(below);
        }
        let journal = self.journal.as_ref()?;
        let first = journal.points().first()?.id;
        let last = journal.points().last()?.id;
        (first <= below.1 + 1 && id <= last).then_some(below)
    }

    /// Every restorable point, oldest first.
    pub fn points(&self) -> Vec<Point> {
        let mut points: Vec<Point> = self
            .long_term()
            .into_iter()
            .map(|(p, _)| Point {
                id: p.point.entry_id,
                first_seq: None,
                last_seq: p.point.last_seq,
                point_time_ns: p.point.point_time_ns,
                received_time_ns: p.point.received_time_ns,
                tier: Tier::LongTerm,
                tag: p.tag.clone(),
                journal_bytes: None,
                long_term_bytes: Some(p.bytes),
                ends_on_barrier: p.ends_on_barrier,
            })
            .collect();
        if let Some(journal) = &self.journal {
            for entry in journal.points().iter().filter(|p| !p.in_sync) {
                let tag = journal.tag(entry.id).map(String::from);
                if let Some(long) = points.iter_mut().find(|p| p.id == entry.id) {
                    long.tier = Tier::Both;
                    long.tag = long.tag.take().or(tag);
                    long.journal_bytes = Some(u64::from(entry.body_len));
                    long.first_seq = Some(entry.first_seq);
                } else if self.path_to(entry.id).is_some() {
                    points.push(Point {
                        id: entry.id,
                        first_seq: Some(entry.first_seq),
                        last_seq: entry.last_seq,
                        point_time_ns: entry.point_time_ns,
                        received_time_ns: entry.received_time_ns,
                        tier: Tier::Journal,
                        tag,
                        journal_bytes: Some(u64::from(entry.body_len)),
                        long_term_bytes: None,
                        ends_on_barrier: entry.ends_on_barrier,
                    });
                }
            }
        }
        points.sort_by_key(|p| p.id);
        points
    }

    /// The disk as it stood just before sequence number `seq`: the journal
    /// entry (a restore point, or a batch of a full sync) or long-term point
    /// whose last record is `seq - 1`, if this history can rebuild it. What
    /// a new source's seeded full sync compares its disk with.
    pub fn state_before(&self, seq: u64) -> Option<Point> {
        let last_seq = seq.checked_sub(1)?;
        let in_journal = self.journal.as_ref().and_then(|j| {
            let entry = j.points().iter().find(|p| p.last_seq == last_seq)?;
            Some((entry.id, entry.point_time_ns, entry.received_time_ns))
        });
        let (id, point_time_ns, received_time_ns) = in_journal.or_else(|| {
            let (long, _) = self
                .long_term()
                .into_iter()
                .find(|(p, _)| p.point.last_seq == last_seq)?;
            let p = &long.point;
            Some((p.entry_id, p.point_time_ns, p.received_time_ns))
        })?;
        self.path_to(id)?;
        Some(Point {
            id,
            first_seq: None,
            last_seq,
            point_time_ns,
            received_time_ns,
            tier: Tier::Journal,
            tag: None,
            journal_bytes: None,
            long_term_bytes: None,
            ends_on_barrier: false,
        })
    }

    /// Finds the point a selector names.
    pub fn select(&self, selector: PointSelector) -> Result<Point, RestoreError> {
        let points = self.points();
        let first = points.first().ok_or(RestoreError::NoPoints)?;
        match selector {
            PointSelector::Id(id) => points
                .iter()
                .find(|p| p.id == id)
                .cloned()
                .ok_or(RestoreError::UnknownPoint(id)),
            PointSelector::AtOrBefore(time_ns) => points
                .iter()
                .rev()
                .find(|p| p.point_time_ns <= time_ns)
                .cloned()
                .ok_or_else(|| RestoreError::TooEarly {
                    requested: format_time(time_ns),
                    first: format_time(first.point_time_ns),
                }),
            PointSelector::Tag(name) => points
                .iter()
                .rev()
                .find(|p| p.tag.as_deref() == Some(name.as_str()))
                .cloned()
                .ok_or(RestoreError::UnknownTag(name)),
        }
    }

    /// The layers (base first) of the first `count` long-term layers.
    fn layers(&self, count: usize) -> Result<Vec<Layer>, LongTermError> {
        let Some(catalog) = &self.catalog else {
            return Ok(Vec::new());
        };
        let dir = self.dir.join(LONGTERM_DIR);
        let mut layers = Vec::with_capacity(count);
        if let (Some(base), true) = (&catalog.base, count > 0) {
            layers.push(Layer::open_base(
                &dir.join(BASE_IMAGE_FILE),
                &dir.join(base_map_file_name(base.number)),
            )?);
        }
        for delta in catalog.deltas.iter().take(count.saturating_sub(1)) {
            layers.push(Layer::open_delta(&dir.join(delta_file_name(delta.number)))?);
        }
        Ok(layers)
    }

    /// The journal entries after `after` up to and including `id`.
    fn tail(&self, after: u64, id: u64) -> Vec<crate::journal::RestorePoint> {
        self.journal.as_ref().map_or_else(Vec::new, |j| {
            j.points()
                .iter()
                .filter(|p| p.id > after && p.id <= id)
                .copied()
                .collect()
        })
    }

    /// The disk at `point` as layers, for reading in place: the long-term
    /// layers, and the journal entries after them built into one more layer
    /// in a file without a name (O_TMPFILE) in the directory `scratch`. How long this takes grows with
    /// those entries only (the roll schedule bounds them), not with the
    /// number of points.
    pub fn image(
        &self,
        key: &Key,
        point: &Point,
        scratch: &Path,
    ) -> Result<PointImage, RestoreError> {
        let (count, below) = self
            .path_to(point.id)
            .ok_or(RestoreError::UnknownPoint(point.id))?;
        let mut image = PointImage::new(self.disk_size, self.layers(count)?);
        let tail = self.tail(below, point.id);
        if tail.is_empty() {
            return Ok(image);
        }
        let journal = self
            .journal
            .as_ref()
            .expect("a tail comes from the journal");
        let mut builder = crate::longterm::ImageBuilder::create_unnamed(&image, scratch)?;
        for entry in &tail {
            builder.apply(&read_batch(journal, key, entry)?)?;
        }
        let (file, map) = builder.finish()?;
        let point_stamp = PointStamp {
            entry_id: point.id,
            last_seq: point.last_seq,
            point_time_ns: point.point_time_ns,
            received_time_ns: point.received_time_ns,
        };
        image.push(Layer::in_memory(
            scratch.to_path_buf(),
            file,
            map,
            self.disk_size,
            point_stamp,
        ));
        Ok(image)
    }

    /// Rebuilds the disk at `point` into a new sparse file at `out`, calling
    /// `progress(bytes_done, bytes_total)` as it goes. On failure the
    /// partial image is removed.
    pub fn restore(
        &self,
        key: &Key,
        point: &Point,
        out: &Path,
        progress: impl FnMut(u64, u64),
    ) -> Result<(), RestoreError> {
        let image = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(out)
            .map_err(output(out, "create"))?;
        let result = self
            .rebuild(key, point, &image, out, progress)
            .and_then(|()| image.sync_all().map_err(output(out, "fsync")));
        if result.is_err() {
            drop(image);
            let _ = std::fs::remove_file(out);
        }
        result
    }

    fn rebuild(
        &self,
        key: &Key,
        point: &Point,
        out_file: &std::fs::File,
        out: &Path,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(), RestoreError> {
        let (count, below) = self
            .path_to(point.id)
            .ok_or(RestoreError::UnknownPoint(point.id))?;
        out_file
            .set_len(self.disk_size)
            .map_err(output(out, "size"))?;
        let image = PointImage::new(self.disk_size, self.layers(count)?);
        let tail = self.tail(below, point.id);
        let layer_bytes: u64 = image.layers().iter().map(|l| l.map().data_bytes()).sum();
        let tail_bytes: u64 = tail.iter().map(|p| u64::from(p.body_len)).sum();
        let total = layer_bytes + tail_bytes;
        crate::longterm::copy_layers(&image, out_file, out, |done| {
            progress(done.min(layer_bytes), total)
        })?;
        let Some(journal) = self.journal.as_ref().filter(|_| !tail.is_empty()) else {
            return Ok(());
        };
        // One thread reads, decrypts and decodes the next entries while this
        // one applies the current; writeback starts after each entry, so the
        // final fsync does not wait for the whole image.
        let (batches_tx, batches_rx) = std::sync::mpsc::sync_channel(2);
        std::thread::scope(|scope| {
            let decoder = scope.spawn(move || {
                for entry in &tail {
                    let batch = read_batch(journal, key, entry);
                    let failed = batch.is_err();
                    if batches_tx.send((entry.body_len, batch)).is_err() || failed {
                        return;
                    }
                }
            });
            let mut done = layer_bytes;
            let direct = crate::longterm::open_direct(out);
            let mut buf = crate::longterm::direct_buffer();
            for (body_len, batch) in batches_rx {
                crate::longterm::apply_direct(&batch?, out_file, direct.as_ref(), &mut buf, out)?;
                start_writeback(out_file);
                done += u64::from(body_len);
                progress(done.min(total), total);
            }
            decoder.join().expect("the decoder does not panic");
            Ok(())
        })
    }
}

/// Starts writing the file's dirty pages back without waiting for them.
fn start_writeback(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range reads only its integer arguments; `file` stays
    // open for the call because it is borrowed. Offset 0 and length 0 mean
    // the whole file.
    unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

fn output(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> RestoreError {
    let path = path.to_path_buf();
    move |source| RestoreError::Output { path, op, source }
}
