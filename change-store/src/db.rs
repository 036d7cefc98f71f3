//! The RocksDB databases behind a store: one *generation* directory is live at a time, named
//! by the `ACTIVE` file, so an import can build a whole new generation beside it and swap it
//! in at once.
//!
//! Swap rules:
//! 1. A new generation is written and its WAL synced before anything names it.
//! 2. `ACTIVE` is replaced by writing `ACTIVE.tmp`, syncing it, renaming it over `ACTIVE`
//!    and syncing the directory: after a crash `ACTIVE` names the old or the new generation,
//!    each whole.
//! 3. The old generation's directory is removed when its last reader lets go of it, and at
//!    the next open if the process died first.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, DB};

use crate::error::{Error, Result};
use crate::layout::{self, cf, meta};

/// Names the live generation directory.
const ACTIVE: &str = "ACTIVE";
/// Prefix of generation directory names (`gen-000001`, …).
const GEN_PREFIX: &str = "gen-";

/// An open generation.
pub(crate) struct Db {
    pub db: DB,
    /// Oldest retained `_id`; the compaction filter of the list indexes drops entries below it.
    /// Raised only after the truncation that moved it is durable.
    pub floor: Arc<AtomicU64>,
    /// Declared after `db`, so the database is closed before the directory is removed.
    retire: Retire,
}

/// Removes a generation's directory on drop, once marked.
struct Retire {
    dir: PathBuf,
    remove: AtomicBool,
}

impl Drop for Retire {
    fn drop(&mut self) {
        if self.remove.load(Ordering::Acquire) {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove a replaced store generation");
            }
        }
    }
}

impl Db {
    /// A column family handle.
    pub fn cf(&self, name: &'static str) -> Result<&ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| Error::corrupt("column family", name))
    }

    /// Marks this generation for removal once its last handle is dropped.
    pub fn retire(&self) {
        self.retire.remove.store(true, Ordering::Release);
    }

    /// This generation's directory name.
    pub fn name(&self) -> String {
        self.retire
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Reads a `u64` scalar from `meta`.
    pub fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>> {
        match self.db.get_pinned_cf(self.cf(cf::META)?, key)? {
            None => Ok(None),
            Some(v) => layout::decode_u64(&v)
                .map(Some)
                .ok_or_else(|| Error::corrupt("meta", String::from_utf8_lossy(key))),
        }
    }
}

/// Opens (creating if needed) the generation in `dir`. `floor` is the first retained `_id`
/// as far as the caller knows it (0 when new); [`open_in`] raises it from the database.
fn open_dir(dir: &Path) -> Result<Db> {
    let floor = Arc::new(AtomicU64::new(0));
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let cfs = cf::ALL.iter().map(|name| {
        let mut cf_opts = Options::default();
        if cf::LIST_INDEXES.contains(name) {
            let floor = floor.clone();
            cf_opts.set_compaction_filter("below-first-index", move |_level, key, _value| {
                match layout::trailing_id(key) {
                    Some(id) if id < floor.load(Ordering::Acquire) => {
                        rocksdb::CompactionDecision::Remove
                    }
                    _ => rocksdb::CompactionDecision::Keep,
                }
            });
        }
        ColumnFamilyDescriptor::new(*name, cf_opts)
    });
    let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
    let db = Db {
        db,
        floor,
        retire: Retire {
            dir: dir.to_path_buf(),
            remove: AtomicBool::new(false),
        },
    };
    if let Some(first) = db.meta_u64(meta::FIRST_INDEX)? {
        db.floor.store(first, Ordering::Release);
    }
    Ok(db)
}

/// Opens the live generation under `root`, creating the first one in an empty directory,
/// and removes leftovers of interrupted imports. Refuses data of another format version.
pub(crate) fn open_live(root: &Path) -> Result<Db> {
    fs::create_dir_all(root)?;
    let name = match read_active(root)? {
        Some(name) => name,
        None => {
            // Format version 1 kept RocksDB's own files right in the store directory.
            if root.join("CURRENT").exists() {
                return Err(Error::UnsupportedFormat {
                    path: root.to_path_buf(),
                    found: 1,
                    supported: layout::FORMAT_VERSION,
                });
            }
            let db = create_generation(root)?;
            let name = db.name();
            write_active(root, &name)?;
            drop(db);
            name
        }
    };
    let db = open_dir(&root.join(&name))?;
    check_format(&db, root)?;
    remove_other_generations(root, &name)?;
    Ok(db)
}

/// Creates a new, empty generation under `root`, named after the newest one there. Nothing
/// names it until [`write_active`]; a crash leaves it to be removed at the next open.
pub(crate) fn create_generation(root: &Path) -> Result<Db> {
    let mut newest = 0u64;
    for entry in fs::read_dir(root)? {
        let name = entry?.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix(GEN_PREFIX))
            .and_then(|n| n.parse::<u64>().ok())
        {
            newest = newest.max(n);
        }
    }
    let dir = root.join(format!("{GEN_PREFIX}{:06}", newest + 1));
    let db = open_dir(&dir)?;
    db.db.put_cf(
        db.cf(cf::META)?,
        meta::FORMAT_VERSION,
        layout::FORMAT_VERSION.to_be_bytes(),
    )?;
    Ok(db)
}

fn check_format(db: &Db, root: &Path) -> Result<()> {
    let found = match db
        .db
        .get_pinned_cf(db.cf(cf::META)?, meta::FORMAT_VERSION)?
    {
        Some(v) => u32::from_be_bytes(
            v.as_ref()
                .try_into()
                .map_err(|_| Error::corrupt("meta", "format version"))?,
        ),
        None => 0,
    };
    if found != layout::FORMAT_VERSION {
        return Err(Error::UnsupportedFormat {
            path: root.to_path_buf(),
            found,
            supported: layout::FORMAT_VERSION,
        });
    }
    Ok(())
}

fn read_active(root: &Path) -> Result<Option<String>> {
    match fs::read_to_string(root.join(ACTIVE)) {
        Ok(s) => {
            let name = s.trim();
            if !name.starts_with(GEN_PREFIX) || name.contains('/') {
                return Err(Error::corrupt("ACTIVE", name));
            }
            Ok(Some(name.to_owned()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Makes `name` the live generation (rule 2).
pub(crate) fn write_active(root: &Path, name: &str) -> Result<()> {
    let tmp = root.join(format!("{ACTIVE}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(name.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    fs::rename(&tmp, root.join(ACTIVE))?;
    File::open(root)?.sync_all()?;
    Ok(())
}

fn remove_other_generations(root: &Path, live: &str) -> Result<()> {
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(GEN_PREFIX) && name != live {
            tracing::info!(generation = %name, "removing a store generation left by an interrupted import or swap");
            fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}

/// Compacts the given key ranges of a generation in a thread of its own, so a truncation's
/// space is reclaimed without holding up the writer. The store joins the thread when it is
/// dropped (the thread holds the generation open).
pub(crate) fn compact_in_background(
    db: Arc<Db>,
    ranges: Vec<(&'static str, Vec<u8>, Vec<u8>)>,
) -> Option<std::thread::JoinHandle<()>> {
    let spawned = std::thread::Builder::new()
        .name("store-compact".into())
        .spawn(move || {
            for (name, start, end) in ranges {
                match db.cf(name) {
                    Ok(cf) => db.db.compact_range_cf(cf, Some(&start), Some(&end)),
                    Err(e) => tracing::warn!(error = %e, "cannot compact after a truncation"),
                }
            }
        });
    match spawned {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the compaction after a truncation");
            None
        }
    }
}
