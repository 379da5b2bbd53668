//! The target's side of the long-term tier: rolling journal entries into a
//! long-term point, merging the oldest delta into the base, and recovering
//! from a crash in the middle of either.
//!
//! Every step leaves each retained point restorable:
//! - a roll writes its image under a temporary name, fsyncs, renames it into
//!   place, and only then adds the point to the catalog (atomic replace);
//! - a merge first marks the delta in the catalog as merging (from then on
//!   the base's own point is gone: it is the one expiring), copies the
//!   delta's blocks into `base.img` (a crash here leaves blocks that the
//!   delta, still present, covers), writes a new base map, switches the
//!   catalog to it, and only then removes the delta and the old map.
//!
//! [`LongTermStore::open`] redoes an interrupted merge and removes files the
//! catalog does not name (what an interrupted roll or removal leaves).
//! Crash points (`CDP_CRASH_AT`, see [`crash_point`]) let tests kill the
//! process between any two steps.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use pipeline::key::Key;

use super::builder::{punch_hole, seal_image, ImageBuilder};
use super::chain::PointImage;
use super::error::{io_err, LongTermError};
use super::files::{create_pin, pin_exclusive, Dir, Pin};
use super::image::{BlockMap, Layer, BLOCK};
use crate::format::longterm::{
    base_map_file_name, delta_file_name, parse_image_file_name, BlockState, Catalog, ImageHeader,
    ImageKind, LongTermPoint, MapEntry, PointStamp, BASE_IMAGE_FILE, BLOCK_SIZE, CATALOG_FILE,
    IMAGE_HEADER_LEN, LONGTERM_DIR, PIN_FILE,
};
use crate::journal::{Journal, RestorePoint};
use crate::restore::read_batch;

/// Kills the process with SIGKILL at the named step when the environment
/// variable `CDP_CRASH_AT` names it: a test hook, so crash tests can kill -9
/// the target between any two durable steps and check recovery (steps:
/// `docs/LONGTERM.md`; `seed:digests-sent` in a seed session).
pub fn crash_point(step: &str) {
    static CRASH_AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = CRASH_AT.get_or_init(|| std::env::var("CDP_CRASH_AT").ok());
    if at.as_deref() == Some(step) {
        eprintln!("CDP_CRASH_AT={step}: kill -9 here");
        // SAFETY: kill(2) on our own pid with a signal number; no memory is
        // involved.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// The long-term tier of one disk, open for writing by the target.
#[derive(Debug)]
pub struct LongTermStore {
    dir: Dir,
    catalog: Catalog,
}

impl LongTermStore {
    /// Opens (creating it if missing) the long-term tier in `target_dir`
    /// for the disk `disk_id` of `disk_size` bytes, and recovers from an
    /// interrupted roll or merge.
    pub fn open(
        target_dir: &Path,
        disk_id: [u8; 16],
        disk_size: u64,
    ) -> Result<LongTermStore, LongTermError> {
        let dir = Dir::open(&target_dir.join(LONGTERM_DIR))?;
        dir.lock()?;
        create_pin(&dir.path)?;
        let catalog = match dir.load_catalog()? {
            Some(catalog) => catalog,
            None => Catalog {
                disk_id,
                disk_size,
                generation: 0,
                merging: None,
                base: None,
                deltas: Vec::new(),
            },
        };
        if (catalog.disk_id, catalog.disk_size) != (disk_id, disk_size) {
            return Err(LongTermError::Mismatch {
                path: dir.join(CATALOG_FILE),
                what: "disk id or size",
            });
        }
        let mut store = LongTermStore { dir, catalog };
        store.remove_orphans()?;
        if let Some(number) = store.catalog.merging {
            tracing::warn!(delta = number, "finishing a merge a crash interrupted");
            // Deferred (and retried by retention) while a reader holds the pin.
            store.merge_oldest()?;
        }
        Ok(store)
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The newest long-term point: the newest delta, or the base.
    pub fn newest(&self) -> Option<&LongTermPoint> {
        self.catalog.deltas.last().or(self.catalog.base.as_ref())
    }

    /// Removes what no catalog names: temporary files, images of an
    /// interrupted roll, the files of a finished merge.
    fn remove_orphans(&mut self) -> Result<(), LongTermError> {
        let named = |kind, number| match kind {
            ImageKind::Delta => self.catalog.deltas.iter().any(|d| d.number == number),
            ImageKind::BaseMap => self
                .catalog
                .base
                .as_ref()
                .is_some_and(|b| b.number == number),
        };
        let mut removed = false;
        let entries = std::fs::read_dir(&self.dir.path).map_err(io_err(
            &self.dir.path,
            "list directory",
            0,
        ))?;
        for entry in entries {
            let entry = entry.map_err(io_err(&self.dir.path, "list directory", 0))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let orphan = match parse_image_file_name(&name) {
                Some((kind, number)) => !named(kind, number),
                None if name == BASE_IMAGE_FILE => self.catalog.base.is_none(),
                None => name.ends_with(".tmp"),
            };
            if orphan && name != PIN_FILE && name != CATALOG_FILE {
                tracing::info!(file = %name, "removing what an interrupted step left");
                self.dir.remove(&entry.path())?;
                removed = true;
            }
        }
        if removed {
            self.dir.sync()?;
        }
        Ok(())
    }

    fn next_number(&self) -> u64 {
        let numbers = self.catalog.base.iter().chain(&self.catalog.deltas);
        numbers.map(|p| p.number).max().unwrap_or(0) + 1
    }

    /// The newest long-term point as layers (the base and every delta).
    pub fn newest_image(&self) -> Result<PointImage, LongTermError> {
        let mut layers = Vec::new();
        if let Some(base) = &self.catalog.base {
            layers.push(Layer::open_base(
                &self.dir.join(BASE_IMAGE_FILE),
                &self.dir.join(&base_map_file_name(base.number)),
            )?);
        }
        for delta in &self.catalog.deltas {
            layers.push(Layer::open_delta(
                &self.dir.join(&delta_file_name(delta.number)),
            )?);
        }
        Ok(PointImage::new(self.catalog.disk_size, layers))
    }

    fn store(&mut self, catalog: Catalog) -> Result<(), LongTermError> {
        let catalog = Catalog {
            generation: self.catalog.generation + 1,
            ..catalog
        };
        self.dir.store_catalog(&catalog)?;
        self.catalog = catalog;
        Ok(())
    }

    fn header(
        &self,
        kind: ImageKind,
        number: u64,
        point: PointStamp,
        tag: Option<String>,
    ) -> ImageHeader {
        ImageHeader {
            kind,
            disk_id: self.catalog.disk_id,
            disk_size: self.catalog.disk_size,
            block_size: BLOCK_SIZE,
            number,
            point,
            map_offset: 0,
            map_entries: 0,
            map_crc: 0,
            tag,
        }
    }

    /// Rolls the journal entries after the newest long-term point, up to and
    /// including `to`, into a new long-term point: the base if there is none
    /// yet, a delta otherwise. `journal` may be a slice holding just those
    /// entries; `tag` names a tagged point.
    pub fn roll(
        &mut self,
        journal: &Journal,
        key: &Key,
        to: &RestorePoint,
        tag: Option<String>,
    ) -> Result<(), LongTermError> {
        let from = self.newest().map_or(1, |p| p.point.entry_id + 1);
        let entries: Vec<RestorePoint> = journal
            .points()
            .iter()
            .filter(|p| (from..=to.id).contains(&p.id))
            .copied()
            .collect();
        if entries.first().map(|p| p.id) != Some(from) {
            return Err(LongTermError::EntryGone { id: from });
        }
        let below = self.newest_image()?;
        let number = self.next_number();
        let first_roll = self.catalog.base.is_none();
        let (tmp, data_offset) = if first_roll {
            (self.dir.join(&format!("{BASE_IMAGE_FILE}.tmp")), 0)
        } else {
            let tmp = self.dir.join(&format!("{}.tmp", delta_file_name(number)));
            (tmp, IMAGE_HEADER_LEN as u64)
        };
        let mut builder = ImageBuilder::create(&below, &tmp, data_offset)?;
        for entry in &entries {
            let batch = read_batch(journal, key, entry).map_err(Box::new)?;
            builder.apply(&batch)?;
        }
        let (file, map) = builder.finish()?;
        crash_point("roll:image-written");
        let stamp = PointStamp {
            entry_id: to.id,
            last_seq: to.last_seq,
            point_time_ns: to.point_time_ns,
            received_time_ns: to.received_time_ns,
        };
        let point = if first_roll {
            file.sync_all().map_err(io_err(&tmp, "fsync image", 0))?;
            let map = BlockMap::new(without_zeros(map.entries()));
            let header = self.header(ImageKind::BaseMap, number, stamp, tag.clone());
            self.write_base_map(number, header, &map)?;
            self.dir.rename(&tmp, &self.dir.join(BASE_IMAGE_FILE))?;
            LongTermPoint {
                number,
                point: stamp,
                bytes: map.data_bytes(),
                tag,
                ends_on_barrier: to.ends_on_barrier,
            }
        } else {
            let header = self.header(ImageKind::Delta, number, stamp, tag.clone());
            let data_end = IMAGE_HEADER_LEN as u64 + self.catalog.disk_size.div_ceil(BLOCK) * BLOCK;
            seal_image(&file, &tmp, header, &map, data_end)?;
            self.dir
                .rename(&tmp, &self.dir.join(&delta_file_name(number)))?;
            LongTermPoint {
                number,
                point: stamp,
                bytes: map.data_bytes(),
                tag,
                ends_on_barrier: to.ends_on_barrier,
            }
        };
        crash_point("roll:image-in-place");
        let mut catalog = self.catalog.clone();
        if first_roll {
            catalog.base = Some(point);
        } else {
            catalog.deltas.push(point);
        }
        self.store(catalog)?;
        crash_point("roll:done");
        Ok(())
    }

    /// Writes the base map `number` durably.
    fn write_base_map(
        &self,
        number: u64,
        header: ImageHeader,
        map: &BlockMap,
    ) -> Result<(), LongTermError> {
        let path = self.dir.join(&base_map_file_name(number));
        let tmp = self
            .dir
            .join(&format!("{}.tmp", base_map_file_name(number)));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(&tmp, "create base map", 0))?;
        seal_image(&file, &tmp, header, map, 0)?;
        self.dir.rename(&tmp, &path)
    }

    /// Merges the oldest delta into the base; the base's point expires and
    /// the delta's point becomes the base's. Returns `false` (and does
    /// nothing) when there is no delta, or when a reader holds the pin (the
    /// merge is deferred).
    pub fn merge_oldest(&mut self) -> Result<bool, LongTermError> {
        let Some(_pin) = self.pin()? else {
            return Ok(false);
        };
        let (Some(base), Some(delta)) = (
            self.catalog.base.clone(),
            self.catalog.deltas.first().cloned(),
        ) else {
            return Ok(false);
        };
        if self.catalog.merging != Some(delta.number) {
            let catalog = Catalog {
                merging: Some(delta.number),
                ..self.catalog.clone()
            };
            self.store(catalog)?;
        }
        crash_point("merge:marked");
        let delta_layer = Layer::open_delta(&self.dir.join(&delta_file_name(delta.number)))?;
        let base_map_path = self.dir.join(&base_map_file_name(base.number));
        let base_layer = Layer::open_base(&self.dir.join(BASE_IMAGE_FILE), &base_map_path)?;
        self.copy_into_base(&delta_layer)?;
        crash_point("merge:base-written");
        let merged = merge_maps(base_layer.map(), delta_layer.map());
        let number = self.next_number();
        let header = self.header(ImageKind::BaseMap, number, delta.point, delta.tag.clone());
        self.write_base_map(number, header, &merged)?;
        crash_point("merge:map-written");
        let mut catalog = self.catalog.clone();
        catalog.merging = None;
        catalog.deltas.remove(0);
        catalog.base = Some(LongTermPoint {
            number,
            bytes: merged.data_bytes(),
            ..delta
        });
        self.store(catalog)?;
        crash_point("merge:catalog-switched");
        self.dir.remove(delta_layer.path())?;
        self.dir.remove(&base_map_path)?;
        self.dir.sync()?;
        Ok(true)
    }

    /// Writes the delta's data blocks into `base.img` and frees its zero
    /// blocks there; fdatasyncs.
    fn copy_into_base(&self, delta: &Layer) -> Result<(), LongTermError> {
        let path = self.dir.join(BASE_IMAGE_FILE);
        let base = OpenOptions::new().write(true).open(&path).map_err(io_err(
            &path,
            "open base image",
            0,
        ))?;
        let mut buf = Vec::new();
        for (first_block, blocks, data) in delta.map().runs() {
            let (offset, len) = (first_block * BLOCK, blocks * BLOCK);
            if !data {
                punch_hole(&base, offset, len);
                continue;
            }
            buf.resize(len as usize, 0);
            delta.read_blocks(first_block, &mut buf)?;
            base.write_all_at(&buf, offset)
                .map_err(io_err(&path, "write base block", offset))?;
        }
        base.sync_data()
            .map_err(io_err(&path, "fdatasync base image", 0))
    }

    /// Takes the exclusive pin, or logs that a reader defers this step.
    pub(crate) fn pin(&self) -> Result<Option<Pin>, LongTermError> {
        let pin = pin_exclusive(&self.dir.path)?;
        if pin.is_none() {
            tracing::info!("a restore or serve-point is reading; retention waits for it");
        }
        Ok(pin)
    }
}

/// The entries of `entries` that hold data.
fn without_zeros(entries: &[MapEntry]) -> Vec<MapEntry> {
    entries
        .iter()
        .filter(|e| matches!(e.state, BlockState::Data { .. }))
        .copied()
        .collect()
}

/// The base map after merging `delta` into the base: the delta's entries
/// win, zero blocks drop out (the base reads as zeros where it holds nothing).
fn merge_maps(base: &BlockMap, delta: &BlockMap) -> BlockMap {
    let mut merged = Vec::with_capacity(base.entries().len() + delta.entries().len());
    let (mut b, mut d) = (
        base.entries().iter().peekable(),
        delta.entries().iter().peekable(),
    );
    loop {
        let next = match (b.peek(), d.peek()) {
            (None, None) => break,
            (Some(_), None) => b.next(),
            (None, Some(_)) => d.next(),
            (Some(x), Some(y)) if x.block < y.block => b.next(),
            (Some(x), Some(y)) => {
                if x.block == y.block {
                    b.next();
                }
                d.next()
            }
        };
        merged.push(*next.expect("peeked"));
    }
    BlockMap::new(without_zeros(&merged))
}
