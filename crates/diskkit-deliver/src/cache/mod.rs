//! A local cache of VM images that downloads each image once, hands out instances and can
//! be killed at any moment.
//!
//! Layout of the cache directory (default `$XDG_CACHE_HOME/diskkit/images`):
//!
//! ```text
//! entries/<ID>/            a complete entry (only ever appears whole, by rename)
//!     disk.img             the shared base (RAW, sparse, read-only)
//!     layer.qcow2          the bundle's overlay over disk.img (read-only)
//!     machine.json         the machine definition (read-only)
//!     entry.json           where it came from, its digest, when it was made
//!     last-use             its modification time is the entry's last use
//!     instance-<NAME>.qcow2, instance-<NAME>.json   instances: a writable overlay over
//!                          layer.qcow2 (same directory, so QEMU and diskkit find it) and a
//!                          copy of the machine definition
//! refs/<NAME>.json         a reference: instance NAME of entry ID, held by a process (and
//!                          the process of the VM booted from it while that runs)
//! locks/<ID>.lock          flock: exclusive while fetching, removing or repairing ID, shared
//!                          while making an instance of it
//! locks/<ID>.failed        the error of the last failed fetch, for the fetches waiting on it
//! partial/<ID>.part, .json a download in progress and what is needed to resume it
//! tmp/<ID>.<random>/       an entry being extracted (renamed to entries/<ID> when complete)
//! trash/<random>/          an entry being removed (renamed out of entries/ first)
//! ```
//!
//! Every state change is a rename of a complete file or directory (synced first), so a
//! process killed at any moment leaves either the old or the new state plus leftovers that
//! the next command removes: [`Cache::open`] empties `trash/` and removes staging directories
//! nobody holds; [`Cache::repair`] (run by every command that changes the cache) also removes
//! references whose holder died, instance files no reference names, and failed-fetch
//! records. A download interrupted by a kill is resumed by the next fetch of the same ID.
//!
//! Concurrency: any number of processes fetching one ID cause one download. The first takes
//! the ID's lock; the others wait on it and then find the entry, or, if that fetch failed,
//! return its error (written to `locks/<ID>.failed` before the lock is released). `gc` and
//! `rm` take the lock exclusively and never wait for it (an entry being fetched or given an
//! instance is skipped, or refused), and check references only while holding it; making an
//! instance holds it shared until its reference is written, so no entry is removed between
//! "it exists" and "it is referenced".

mod fetch;
mod follow;
mod gc;
mod instance;
mod inuse;
mod lock;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use self::fetch::{FetchEvent, FetchOptions, Source};
pub use self::gc::{GcOptions, GcReport};
pub use self::instance::{Instance, Reference};
pub use self::inuse::InstanceUse;
pub use self::lock::Holder;
use self::lock::{IdLock, Mode};
use crate::bundle::{Machine, DISK, LAYER, MACHINE};
use crate::error::{Error, ErrorKind, Result};
use crate::fsutil;

const ENTRY_JSON: &str = "entry.json";
const LAST_USE: &str = "last-use";

/// What `entry.json` records about an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRecord {
    /// The entry's ID.
    pub id: String,
    /// Where it came from (a URL or a path).
    pub source: String,
    /// What the source was: `bundle` or `image`.
    pub kind: String,
    /// The SHA-256 of the source file, in hex.
    pub sha256: String,
    /// The base disk's size.
    pub disk_size: u64,
    /// When it was made (seconds since the epoch).
    pub created: u64,
}

/// An entry as `ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryStatus {
    /// What entry.json records.
    #[serde(flatten)]
    pub record: EntryRecord,
    /// The entry's directory.
    pub path: PathBuf,
    /// Bytes of disk space it uses (instances included).
    pub size: u64,
    /// Live references (instances whose holder, or the VM booted from them, is alive), by
    /// name.
    pub references: Vec<String>,
    /// The instances a running VM uses now (`diskkit boot --instance`), by name.
    pub in_use: Vec<String>,
    /// Last use (seconds since the epoch).
    pub last_use: u64,
    /// Whether another process holds its lock exclusively right now (being fetched again,
    /// removed or repaired).
    pub busy: bool,
}

/// A complete cache entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its ID.
    pub id: String,
    /// Its directory.
    pub dir: PathBuf,
    /// What entry.json records.
    pub record: EntryRecord,
}

impl Entry {
    /// The shared base disk.
    pub fn disk(&self) -> PathBuf {
        self.dir.join(DISK)
    }

    /// The bundle's overlay over the base.
    pub fn layer(&self) -> PathBuf {
        self.dir.join(LAYER)
    }

    /// The machine definition.
    pub fn machine(&self) -> Result<Machine> {
        read_machine(&self.dir.join(MACHINE))
    }
}

pub(crate) fn read_machine(path: &Path) -> Result<Machine> {
    let bytes =
        fs::read(path).map_err(|e| Error::io_while(e, "reading the machine definition").with_path(path))?;
    Machine::parse(&bytes).map_err(|e| e.with_path(path))
}

/// A cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// Check a cache ID or instance name: 1 to 128 characters from `A-Z a-z 0-9 . _ - + = @ :`,
/// starting with a letter or digit.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+=@:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_argument(format!(
            "invalid {what} '{name}': use 1 to 128 letters, digits and . _ - + = @ :, starting with a letter or digit"
        )))
    }
}

/// Whether `name` is a temporary file (`.NAME.tmp-PID-RANDOM`, see `fsutil::temp_sibling`)
/// whose writer has exited.
fn stale_temp(name: &str) -> bool {
    let Some((_, suffix)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp-")) else {
        return false;
    };
    let Some(pid) = suffix.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    Holder::process(pid).is_none()
}

/// Seconds since the epoch.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn mtime_secs(path: &Path) -> Option<u64> {
    let m = fs::metadata(path).ok()?.modified().ok()?;
    Some(m.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

impl Cache {
    /// The default cache directory: `$XDG_CACHE_HOME/diskkit/images`, or
    /// `~/.cache/diskkit/images`.
    pub fn default_dir() -> Result<PathBuf> {
        if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
            return Ok(PathBuf::from(x).join("diskkit/images"));
        }
        match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            Some(h) => Ok(PathBuf::from(h).join(".cache/diskkit/images")),
            None => Err(Error::invalid_argument(
                "neither XDG_CACHE_HOME nor HOME is set; give the cache directory with --dir",
            )),
        }
    }

    /// Open (creating if needed) the cache at `root`, and clear what interrupted commands
    /// left: `trash/`, and staging directories nobody is using.
    pub fn open(root: impl Into<PathBuf>) -> Result<Cache> {
        let root: PathBuf = root.into();
        for d in ["entries", "refs", "locks", "partial", "tmp", "trash"] {
            let p = root.join(d);
            fs::create_dir_all(&p)
                .map_err(|e| Error::io_while(e, "creating the cache directory").with_path(&p))?;
        }
        // Absolute, so that the paths handed out (instances) work from anywhere.
        let root =
            fs::canonicalize(&root).map_err(|e| Error::io_while(e, "opening the cache").with_path(&root))?;
        let cache = Cache { root };
        cache.sweep();
        Ok(cache)
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn entry_dir(&self, id: &str) -> PathBuf {
        self.root.join("entries").join(id)
    }

    pub(crate) fn lock_path(&self, id: &str) -> PathBuf {
        self.root.join("locks").join(format!("{id}.lock"))
    }

    pub(crate) fn failed_path(&self, id: &str) -> PathBuf {
        self.root.join("locks").join(format!("{id}.failed"))
    }

    pub(crate) fn partial_path(&self, id: &str) -> PathBuf {
        self.root.join("partial").join(format!("{id}.part"))
    }

    pub(crate) fn partial_state_path(&self, id: &str) -> PathBuf {
        self.root.join("partial").join(format!("{id}.part.json"))
    }

    pub(crate) fn ref_path(&self, name: &str) -> PathBuf {
        self.root.join("refs").join(format!("{name}.json"))
    }

    pub(crate) fn lock(&self, id: &str, mode: Mode, wait: bool) -> Result<Option<IdLock>> {
        IdLock::acquire(&self.lock_path(id), mode, wait)
    }

    /// The complete entry `id`, if the cache has it.
    pub fn entry(&self, id: &str) -> Result<Option<Entry>> {
        check_name("cache ID", id)?;
        let dir = self.entry_dir(id);
        let record_path = dir.join(ENTRY_JSON);
        let bytes = match fs::read(&record_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io_while(e, "reading a cache entry").with_path(&record_path)),
        };
        let record: EntryRecord = serde_json::from_slice(&bytes).map_err(|e| {
            Error::new(ErrorKind::Io, format!("damaged entry record: {e}")).with_path(&record_path)
        })?;
        Ok(Some(Entry {
            id: id.to_string(),
            dir,
            record,
        }))
    }

    /// Record a use of entry `id` now.
    pub(crate) fn touch(&self, id: &str) {
        let p = self.entry_dir(id).join(LAST_USE);
        if let Ok(f) = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
        {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// Every complete entry, with its size, live references and last use.
    pub fn list(&self) -> Result<Vec<EntryStatus>> {
        let refs = self.references()?;
        let mut out = Vec::new();
        for id in self.entry_ids()? {
            let Some(entry) = self.entry(&id)? else {
                continue;
            };
            let busy = self.lock(&id, Mode::Shared, false)?.is_none();
            let references = refs
                .iter()
                .filter(|r| r.id == id && r.live())
                .map(|r| r.name.clone())
                .collect();
            let in_use = refs
                .iter()
                .filter(|r| r.id == id && r.live() && r.in_use_by().is_some())
                .map(|r| r.name.clone())
                .collect();
            out.push(EntryStatus {
                size: fsutil::disk_usage(&entry.dir),
                last_use: mtime_secs(&entry.dir.join(LAST_USE)).unwrap_or(entry.record.created),
                path: entry.dir,
                record: entry.record,
                references,
                in_use,
                busy,
            });
        }
        out.sort_by(|a, b| a.record.id.cmp(&b.record.id));
        Ok(out)
    }

    fn entry_ids(&self) -> Result<Vec<String>> {
        let dir = self.root.join("entries");
        let rd = fs::read_dir(&dir).map_err(|e| Error::io_while(e, "listing the cache").with_path(&dir))?;
        Ok(rd
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| check_name("cache ID", n).is_ok())
            .collect())
    }

    /// Remove entry `id`. Refused while an instance references it (a live holder) or while
    /// another process holds its lock (a fetch or an instance being made).
    pub fn remove(&self, id: &str) -> Result<u64> {
        check_name("cache ID", id)?;
        let Some(lock) = self.lock(id, Mode::Exclusive, false)? else {
            return Err(Error::new(
                ErrorKind::InUse,
                format!("cache entry '{id}' is being fetched or given an instance right now; try again"),
            ));
        };
        if self.entry(id)?.is_none() {
            let partial = self.partial_path(id).exists();
            self.remove_partial(id);
            let _ = fs::remove_file(self.failed_path(id));
            lock.unlink();
            if partial {
                return Ok(0);
            }
            return Err(Error::new(ErrorKind::NotFound, format!("no cache entry '{id}'")));
        }
        let live = self.release_dead_references(id)?;
        if !live.is_empty() {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "cache entry '{id}' is referenced by instance(s) {}; release them first (diskkit cache release NAME)",
                    live.join(", ")
                ),
            ));
        }
        let freed = self.remove_locked(id, &lock)?;
        Ok(freed)
    }

    /// Remove entry `id` while holding its lock exclusively (references already checked);
    /// returns the bytes freed. The lock file is unlinked last.
    fn remove_locked(&self, id: &str, lock: &IdLock) -> Result<u64> {
        let dir = self.entry_dir(id);
        let size = fsutil::disk_usage(&dir);
        let trash = self.root.join("trash").join(fsutil::random_suffix());
        fs::rename(&dir, &trash).map_err(|e| Error::io_while(e, "removing a cache entry").with_path(&dir))?;
        fsutil::sync_dir(&self.root.join("entries"))?;
        fsutil::remove_any(&trash);
        self.remove_partial(id);
        let _ = fs::remove_file(self.failed_path(id));
        lock.unlink();
        Ok(size)
    }

    fn remove_partial(&self, id: &str) {
        let _ = fs::remove_file(self.partial_state_path(id));
        let _ = fs::remove_file(self.partial_path(id));
    }

    /// Clear what needs no lock: everything in `trash/`, staging directories in `tmp/` whose
    /// ID nobody holds, and temporary files of processes that died before renaming them.
    fn sweep(&self) {
        for d in ["refs", "locks", "partial"] {
            if let Ok(rd) = fs::read_dir(self.root.join(d)) {
                for e in rd.flatten() {
                    if stale_temp(&e.file_name().to_string_lossy()) {
                        let _ = fs::remove_file(e.path());
                    }
                }
            }
        }
        if let Ok(rd) = fs::read_dir(self.root.join("trash")) {
            for e in rd.flatten() {
                fsutil::remove_any(&e.path());
            }
        }
        if let Ok(rd) = fs::read_dir(self.root.join("tmp")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some((id, _)) = name.rsplit_once('.') else {
                    fsutil::remove_any(&e.path());
                    continue;
                };
                if check_name("cache ID", id).is_err() {
                    fsutil::remove_any(&e.path());
                    continue;
                }
                if let Ok(Some(lock)) = self.lock(id, Mode::Exclusive, false) {
                    fsutil::remove_any(&e.path());
                    self.unlink_lock_if_unused(id, &lock);
                }
            }
        }
    }

    /// Unlink `id`'s lock file if nothing needs it any more (no entry, no partial download,
    /// no failure record); called with the lock held exclusively.
    fn unlink_lock_if_unused(&self, id: &str, lock: &IdLock) {
        if !self.entry_dir(id).exists() && !self.partial_path(id).exists() && !self.failed_path(id).exists() {
            lock.unlink();
        }
    }

    /// Repair what interrupted commands can leave, for every entry nobody holds: references
    /// whose holder died (and their instance files), instance files no reference names,
    /// partial downloads of entries that are complete, stale staging directories, lock files
    /// of removed entries; and empty `trash/`.
    pub fn repair(&self) -> Result<()> {
        self.sweep();
        for id in self.entry_ids()? {
            if let Some(_lock) = self.lock(&id, Mode::Exclusive, false)? {
                self.release_dead_references(&id)?;
                // A fetch killed between adding its entry and removing its download leaves
                // the partial file behind; with the entry there (and its lock held) it is
                // only a leftover.
                self.remove_partial(&id);
            }
        }
        // References to entries that no longer exist (their removal was interrupted after
        // the entry went to the trash, or the cache was edited by hand).
        for r in self.references()? {
            if !self.entry_dir(&r.id).exists() {
                if let Some(_lock) = self.lock(&r.id, Mode::Exclusive, false)? {
                    if !self.entry_dir(&r.id).exists() {
                        let _ = fs::remove_file(self.ref_path(&r.name));
                    }
                }
            }
        }
        // Lock and failure files of IDs that have nothing else.
        if let Ok(rd) = fs::read_dir(self.root.join("locks")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(id) = name.strip_suffix(".lock") else {
                    continue;
                };
                if check_name("cache ID", id).is_err()
                    || self.entry_dir(id).exists()
                    || self.partial_path(id).exists()
                {
                    continue;
                }
                if let Some(lock) = self.lock(id, Mode::Exclusive, false)? {
                    let failed_age = fs::metadata(self.failed_path(id))
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok());
                    // A failure record is kept a while for fetches still waiting on it.
                    if failed_age.is_some_and(|a| a > Duration::from_secs(600)) {
                        let _ = fs::remove_file(self.failed_path(id));
                    }
                    self.unlink_lock_if_unused(id, &lock);
                }
            }
        }
        Ok(())
    }

    /// Free space on the cache's file system, in bytes.
    pub fn free_space(&self) -> Result<u64> {
        let st = rustix::fs::statvfs(&self.root)
            .map_err(|e| Error::io_while(e.into(), "reading the free space").with_path(&self.root))?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }
}
