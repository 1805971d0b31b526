//! qcow2 (QEMU copy-on-write, versions 2 and 3) as a [`Layer`].
//!
//! The driver answers mapping questions from the L1/L2 tables: a standard cluster is
//! [`Mapping::Data`] at its host offset in this file, a zero cluster is [`Mapping::Zero`], an
//! unallocated cluster is [`Mapping::Absent`] (it falls through to whatever layer lies below,
//! which is how a backing file works), and a compressed cluster is [`Mapping::Special`], read
//! by [`Layer::read_special`]. The backing file named in the header is reported in
//! [`LayerInfo::parent_path`] but never opened here: stacks open parents through a policy.
//!
//! Writes allocate whole clusters through the typed write path ([`crate::layer::write`]:
//! reserve, write the whole cluster, commit the mapping, under a range guard); the
//! crash-consistency rules are in [`tables`]. No lock that readers need is held across I/O:
//! L2 tables are read without the state lock, and flushes write a snapshot of the metadata.

mod bitmaps;
mod check;
mod compressed;
mod create;
mod entry;
mod header;
mod layer_ext;
mod refcount;
mod repair;
mod report;
mod snapshots;
mod tables;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub use self::check::MAX_CHECK_CLUSTERS;
pub use self::create::{Qcow2CreateOptions, DEFAULT_CLUSTER_SIZE};
use self::entry::{Geometry, L2Entry, COPIED, ZERO};
pub use self::header::CompressionType;
use self::header::{Header, COMPAT_LAZY_REFCOUNTS, EXT_DISKKIT_LAYER, OFF_AUTOCLEAR};
use self::layer_ext::LayerExt;
use self::refcount::Refcounts;
pub use self::report::{CheckReport, Problem, ProblemKind, Repair};
use self::tables::{Reservation as Reserved, State};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::{CreateOptions, FormatDriver, LayerOpen};
use crate::layer::health::Held;
use crate::layer::write::{write_through, Allocator, RangeLocks, Reservation, WritePlan};
use crate::layer::ImageFormat;
use crate::layer::{Access, Health, Layer, LayerInfo, Write, WriteMode, Zeroing};
use crate::mapping::Mapping;
use crate::storage::Storage;

/// The magic at offset 0 of a qcow2 file.
pub const MAGIC: &[u8; 4] = b"QFI\xfb";

/// The qcow2 driver.
pub(crate) static DRIVER: Driver = Driver;

/// See [`DRIVER`].
pub(crate) struct Driver;

impl FormatDriver for Driver {
    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }

    fn recognises(&self, head: &[u8]) -> bool {
        head.starts_with(MAGIC)
    }

    fn open(&self, storage: Arc<dyn Storage>, how: &LayerOpen<'_>) -> Result<Arc<dyn Layer>> {
        Ok(Arc::new(Qcow2Image::open_with(storage, how.access, how.repair)?))
    }

    fn create(&self, storage: Arc<dyn Storage>, options: &CreateOptions) -> Result<Arc<dyn Layer>> {
        Ok(Arc::new(Qcow2Image::create(
            storage,
            &Qcow2CreateOptions {
                size: options.size,
                cluster_size: options.cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE),
                backing_file: options.backing.as_ref().map(|b| b.0.clone()),
                backing_format: options.backing.as_ref().and_then(|b| b.1),
            },
        )?))
    }
}

/// Format details shown by `info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Details {
    /// 2 or 3.
    pub version: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// How compressed clusters are compressed.
    pub compression: CompressionType,
    /// The backing file name recorded in the header.
    pub backing_file: Option<String>,
    /// The backing format recorded in the header.
    pub backing_format: Option<String>,
    /// Internal snapshots (diskkit reads the active image only).
    pub snapshots: u32,
    /// Lazy refcounts enabled.
    pub lazy_refcounts: bool,
    /// Dirty bit (always false for an image diskkit opened: dirty images are refused, or
    /// repaired first with `OpenOptions::repair`).
    pub dirty: bool,
    /// Corrupt bit (likewise).
    pub corrupt: bool,
}

/// A qcow2 image.
#[derive(Debug)]
pub struct Qcow2Image {
    storage: Arc<dyn Storage>,
    writable: bool,
    header: Header,
    geo: Geometry,
    state: RwLock<State>,
    size: AtomicU64,
    /// Autoclear bits have been cleared for this open.
    modified: AtomicBool,
    /// The last decompressed cluster.
    last_compressed: Mutex<Option<Decompressed>>,
    /// Header data that `set_layer_info` and `begin_modification` change.
    meta: Mutex<Meta>,
    health: Health,
    locks: RangeLocks,
    /// Serialises flushes, layer-information changes and resizes.
    flush_lock: Mutex<()>,
    /// Serialises growing the file.
    grow_lock: Mutex<()>,
    /// A length the file is known to have reached.
    grown: AtomicU64,
}

/// A decompressed cluster: (guest cluster, L2 entry key, bytes).
type Decompressed = (u64, u64, Arc<Vec<u8>>);

/// The parts of the header that change while the image is open.
#[derive(Debug, Clone)]
struct Meta {
    backing_file: Option<String>,
    backing_format: Option<String>,
    /// diskkit's layer extension and the file offset of its data.
    layer: Option<(LayerExt, u64)>,
}

impl Meta {
    fn from_header(h: &Header) -> Meta {
        let layer = h
            .extensions
            .iter()
            .filter(|(ty, _, _)| *ty == EXT_DISKKIT_LAYER)
            .find_map(|(_, at, d)| LayerExt::decode(d).map(|e| (e, *at)));
        Meta {
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            layer,
        }
    }
}

/// Check the qcow2 image on `storage` for consistency (like `qemu-img check`) and repair what
/// `repair` allows (like `qemu-img check -r leaks|all`). The image must not be open elsewhere.
///
/// Images with the dirty or corrupt bit are checked too (that is how they are repaired): a
/// repair that leaves no corruption clears the dirty bit, one that leaves nothing at all the
/// corrupt bit. Headers that cannot be parsed, unreadable snapshot tables and files of more
/// than [`MAX_CHECK_CLUSTERS`] clusters are errors.
pub fn check(storage: &dyn Storage, repair: Repair) -> Result<CheckReport> {
    repair::run(storage, repair).map_err(|e| e.with_operation("checking a qcow2 image"))
}

/// [`check`] on the file at `path` (opened for writing only when repairing).
pub fn check_file(path: impl AsRef<std::path::Path>, repair: Repair) -> Result<CheckReport> {
    let path = path.as_ref();
    let writable = repair != Repair::None;
    let lock = if writable {
        crate::storage::Permissions::writer()
    } else {
        crate::storage::Permissions::reader()
    };
    let storage = crate::storage::FileStorage::open_locked(path, writable, Some(lock))
        .map_err(|e| e.with_path(path))?;
    check(&storage, repair).map_err(|e| e.with_path(path))
}

/// Clusters looked at per mapping answer, at most.
const MAX_RUN_CLUSTERS: u64 = 1 << 16;

impl Qcow2Image {
    /// Open a qcow2 image on `storage`. Images with the dirty or corrupt bit, an external data
    /// file, unknown incompatible features or encryption are refused.
    pub fn open(storage: Arc<dyn Storage>, writable: bool) -> Result<Self> {
        Qcow2Image::open_with(storage, &Access::from_writable(writable), false)
    }

    /// Open a qcow2 image on `storage`, writable as `access` decides from its layer type. With
    /// `repair`, an image with the dirty or corrupt bit (left by a crash with lazy refcounts, or
    /// by QEMU finding a problem) is first checked and repaired ([`check`] with [`Repair::All`]),
    /// which needs read-write access, and opened only if the repair left no corruption.
    pub(crate) fn open_with(storage: Arc<dyn Storage>, access: &Access<'_>, repair: bool) -> Result<Self> {
        let writable = matches!(access, Access::ReadWrite) && !storage.read_only();
        let (mut head, mut file_len) = header::read_head(&*storage)?;
        let flagged = Header::parse_for_check(&head, file_len)
            .is_ok_and(|h| h.incompatible & (header::INCOMPAT_DIRTY | header::INCOMPAT_CORRUPT) != 0);
        if repair && flagged {
            if !writable {
                return Err(Error::new(
                    ErrorKind::ReadOnly,
                    "repairing a qcow2 image with the dirty or corrupt bit needs it opened for writing",
                ));
            }
            let report = check(&*storage, Repair::All)?;
            if report.corruptions > 0 || report.check_errors > 0 || report.dirty || report.corrupt {
                let first = report
                    .remaining
                    .first()
                    .map_or_else(String::new, |p| format!(" (first: {})", p.message));
                return Err(Error::corrupt(format!(
                    "qcow2 image still has {} corruptions after repair{first}",
                    report.corruptions
                )));
            }
            // The repair moved the refcount structure and may have grown the file.
            (head, file_len) = header::read_head(&*storage)?;
        }
        let header = Header::parse(&head, file_len)?;
        let meta = Meta::from_header(&header);
        let layer_type = meta.layer.and_then(|(e, _)| e.layer_type);
        let snapshots = header.nb_snapshots > 0;
        let if_cache = matches!(access, Access::Parent(_));
        let rw = match access {
            // A cache layer that cannot be written just stops filling.
            Access::Parent(_) if snapshots => None,
            _ => access.writable_storage(&storage, layer_type),
        };
        if rw.is_some() && snapshots {
            return Err(Error::unsupported(format!(
                "writing qcow2 images with internal snapshots ({} here); open it read-only",
                header.nb_snapshots
            )));
        }
        let geo = Geometry {
            cluster_bits: header.cluster_bits,
            v3: header.version == 3,
        };
        let mut l1_bytes = vec![0u8; (header.l1_size * 8) as usize];
        if header.l1_size > 0 {
            storage
                .read_at(&mut l1_bytes, header.l1_table_offset)
                .map_err(|e| e.with_operation("reading the qcow2 L1 table"))?;
        }
        let l1: Vec<u64> = l1_bytes
            .chunks_exact(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
            .collect();
        for (i, &e) in l1.iter().enumerate() {
            let off = geo.l2_offset(e, i as u64)?;
            if off != 0
                && off
                    .checked_add(geo.cluster_size())
                    .is_none_or(|end| end > file_len)
            {
                return Err(Error::corrupt(format!(
                    "qcow2 L1 entry {i} points to {off:#x}, past the end of the file"
                )));
            }
        }
        let refs = match &rw {
            Some(rw) => match Refcounts::load(
                &**rw,
                header.cluster_bits,
                header.refcount_order,
                header.refcount_table_offset,
                header.refcount_table_clusters,
                file_len,
            ) {
                Ok(refs) => Some(refs),
                // As above: a cache layer that cannot be written stays read-only.
                Err(_) if if_cache => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        let writable = refs.is_some();
        let storage = match rw {
            Some(rw) if writable => rw,
            _ => storage,
        };
        let state = State::new(geo, header.size, l1, header.l1_table_offset, refs);
        Ok(Qcow2Image {
            meta: Mutex::new(meta),
            storage,
            writable,
            size: AtomicU64::new(header.size),
            header,
            geo,
            state: RwLock::new(state),
            modified: AtomicBool::new(false),
            last_compressed: Mutex::new(None),
            health: Health::new(),
            locks: RangeLocks::new(),
            flush_lock: Mutex::new(()),
            grow_lock: Mutex::new(()),
            grown: AtomicU64::new(file_len),
        })
    }

    /// Create a qcow2 image on empty `storage`; the backing file, if any, is recorded only.
    pub fn create(storage: Arc<dyn Storage>, options: &Qcow2CreateOptions) -> Result<Self> {
        create::write_new(&*storage, options)?;
        Qcow2Image::open(storage, true)
    }

    /// Format details for `info`.
    pub fn qcow2_details(&self) -> Qcow2Details {
        let h = &self.header;
        let meta = self.peek_meta().clone();
        Qcow2Details {
            version: h.version,
            cluster_size: self.geo.cluster_size(),
            refcount_bits: 1 << h.refcount_order,
            compression: h.compression,
            backing_file: meta.backing_file,
            backing_format: meta.backing_format,
            snapshots: h.nb_snapshots,
            lazy_refcounts: h.compatible & COMPAT_LAZY_REFCOUNTS != 0,
            dirty: h.incompatible & header::INCOMPAT_DIRTY != 0,
            corrupt: h.incompatible & header::INCOMPAT_CORRUPT != 0,
        }
    }

    fn read_state(&self) -> Result<Held<'_, RwLockReadGuard<'_, State>>> {
        self.health.read(&self.state)
    }

    fn write_state(&self) -> Result<Held<'_, RwLockWriteGuard<'_, State>>> {
        self.health.write(&self.state)
    }

    fn check_writable(&self) -> Result<()> {
        self.health.check()?;
        if self.writable {
            Ok(())
        } else {
            Err(Error::from_kind(ErrorKind::ReadOnly))
        }
    }

    /// Read the L2 table holding guest cluster `gc` without the state lock, and keep it unless
    /// a table was dropped from memory meanwhile (the caller asks again either way).
    fn load(&self, gc: u64) -> Result<()> {
        let (loc, generation) = {
            let st = self.read_state()?;
            (st.l2_location(gc)?, st.generation())
        };
        let Some((i, off)) = loc else {
            return Ok(());
        };
        let mut bytes = vec![0u8; self.geo.cluster_size() as usize];
        self.storage
            .read_at(&mut bytes, off)
            .map_err(|e| e.with_operation("reading a qcow2 L2 table").with_offset(off))?;
        let mut st = self.write_state()?;
        if st.generation() == generation {
            st.insert_l2(i, off, &bytes)?;
        }
        Ok(())
    }

    /// Change the state with `f` once the L2 tables of guest clusters `[first, end)` are in
    /// memory (loaded without the lock). `f` runs again if one was dropped meanwhile.
    fn mutate<T>(&self, first: u64, end: u64, mut f: impl FnMut(&mut State) -> Result<T>) -> Result<T> {
        loop {
            let need = {
                let mut st = self.write_state()?;
                match st.need_range(first, end) {
                    None => return f(&mut st),
                    Some(gc) => gc,
                }
            };
            self.load(need)?;
        }
    }

    /// The L2 entry of guest cluster `gc`, its table loaded without the state lock.
    fn entry_of(&self, gc: u64) -> Result<L2Entry> {
        loop {
            {
                let st = self.read_state()?;
                if st.need(gc).is_none() {
                    return st.entry(gc);
                }
            }
            self.load(gc)?;
        }
    }

    /// Make sure the file is at least `end` bytes long before anything is written up to there
    /// (growing only under `grow_lock`, so it never cuts off what another thread wrote).
    fn ensure_len(&self, end: u64) -> Result<()> {
        if self.grown.load(Ordering::Acquire) >= end {
            return Ok(());
        }
        let _grow = self.health.lock(&self.grow_lock)?;
        let len = self.storage.len()?;
        if len < end {
            self.storage.set_len(end)?;
        }
        self.grown.fetch_max(len.max(end), Ordering::AcqRel);
        Ok(())
    }

    /// The entry at `offset` and how many bytes from `offset` (at most `len`) continue it,
    /// as judged by `same(first, next, k)` for the cluster `k` clusters after the first. Loads
    /// missing L2 tables without the state lock.
    fn scan(
        &self,
        offset: u64,
        len: u64,
        same: impl Fn(L2Entry, L2Entry, u64) -> bool,
    ) -> Result<(L2Entry, u64)> {
        let cs = self.geo.cluster_size();
        loop {
            {
                let st = self.read_state()?;
                if let Some(r) = self.scan_cached(&st, offset, len, &same) {
                    return r;
                }
            }
            self.load(offset / cs)?;
        }
    }

    /// `None` if the first cluster's table is not cached. Stops early at uncached tables.
    fn scan_cached(
        &self,
        st: &State,
        offset: u64,
        len: u64,
        same: &impl Fn(L2Entry, L2Entry, u64) -> bool,
    ) -> Option<Result<(L2Entry, u64)>> {
        let cs = self.geo.cluster_size();
        let per_table = self.geo.l2_entries();
        let end = offset.saturating_add(len);
        let gc0 = offset / cs;
        let first = match st.cached_entry(gc0)? {
            Ok(e) => e,
            Err(e) => return Some(Err(e)),
        };
        let mut gc = gc0 + 1;
        while gc * cs < end && gc - gc0 < MAX_RUN_CLUSTERS {
            // Whole unallocated L2 ranges in one step.
            if st.table_absent(gc) && same(first, L2Entry::Unallocated, gc - gc0) {
                gc = (gc / per_table + 1) * per_table;
                continue;
            }
            match st.cached_entry(gc) {
                Some(Ok(e)) if same(first, e, gc - gc0) => gc += 1,
                _ => break,
            }
        }
        Some(Ok((first, (gc * cs).min(end) - offset)))
    }

    /// The decompressed bytes of guest cluster `gc` (compressed at `host`, `len` bytes). The
    /// last one is kept; the cache is locked only to look and to store, never while reading.
    fn decompress_cluster(&self, gc: u64, host: u64, len: u64, raw_key: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((g, k, bytes)) = self.health.lock(&self.last_compressed)?.as_ref() {
            if *g == gc && *k == raw_key {
                return Ok(bytes.clone());
            }
        }
        let file_len = self.storage.len()?;
        let avail = file_len.saturating_sub(host).min(len);
        if avail == 0 {
            return Err(Error::corrupt(format!(
                "qcow2 compressed cluster at {host:#x} lies past the end of the file"
            ))
            .with_offset(gc * self.geo.cluster_size()));
        }
        let mut input = vec![0u8; avail as usize];
        self.storage.read_at(&mut input, host)?;
        let mut out = vec![0u8; self.geo.cluster_size() as usize];
        compressed::decompress(self.header.compression, &input, &mut out)
            .map_err(|e| e.with_offset(gc * self.geo.cluster_size()))?;
        let out = Arc::new(out);
        *self.health.lock(&self.last_compressed)? = Some((gc, raw_key, out.clone()));
        Ok(out)
    }

    fn meta(&self) -> Result<Held<'_, MutexGuard<'_, Meta>>> {
        self.health.lock(&self.meta)
    }

    /// The header data for accessors that cannot fail.
    fn peek_meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Before the first change after opening: clear autoclear feature bits (diskkit maintains
    /// none of the structures they vouch for, such as persistent bitmaps) and give the layer a
    /// new layer UUID, durably.
    fn first_modification(&self) -> Result<()> {
        if self.modified.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut meta = self.meta()?;
        if self.modified.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _changing = self.health.changing()?;
        let mut wrote = false;
        if self.header.version == 3 && self.header.autoclear != 0 {
            self.storage.write_at(&0u64.to_be_bytes(), OFF_AUTOCLEAR)?;
            wrote = true;
        }
        if let Some((ext, at)) = meta.layer.as_mut() {
            let new = uuid::Uuid::new_v4();
            self.storage
                .write_at(new.as_bytes(), *at + layer_ext::LAYER_UUID_AT)?;
            ext.layer_uuid = new;
            wrote = true;
        }
        if wrote {
            self.storage.sync()?;
        }
        self.modified.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Zero the bytes of guest cluster `gc` from `from` (shrinking to a size inside it). The
    /// caller holds an exclusive range guard over the cluster.
    fn zero_cluster_tail(&self, gc: u64, from: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let entry = self.mutate(gc, gc + 1, |st| st.entry(gc))?;
        let bytes = match entry {
            L2Entry::Data { host, copied: true } => return self.storage.write_zeroes(host + from, cs - from),
            L2Entry::Data { host, .. } => {
                let mut bytes = vec![0u8; cs as usize];
                self.storage.read_at(&mut bytes[..from as usize], host)?;
                bytes
            }
            L2Entry::Compressed { host, len } => {
                let raw_key = host ^ len;
                let mut bytes = self.decompress_cluster(gc, host, len, raw_key)?.to_vec();
                bytes[from as usize..].fill(0);
                bytes
            }
            L2Entry::Unallocated | L2Entry::Zero { .. } => return Ok(()),
        };
        // Stored in a new cluster: counted, written, then mapped.
        let c = self.write_state()?.refs()?.alloc_counted(1)?;
        self.ensure_len((c + 1) * cs)?;
        self.storage.write_at(&bytes, c * cs)?;
        self.mutate(gc, gc + 1, |st| st.replace_entry(gc, (c * cs) | COPIED, None))
    }

    /// Flush; the caller holds `flush_lock`.
    fn flush_locked(&self) -> Result<()> {
        let _changing = self.health.changing()?;
        // Clean metadata (writes in place, a FUA storm): only the data needs a sync, and
        // readers do not even see the state lock taken exclusively.
        if !self.read_state()?.is_dirty() {
            return self.storage.sync();
        }
        let plan = self.write_state()?.prepare_flush()?;
        let Some(plan) = plan else {
            return self.storage.sync();
        };
        let written = self
            .ensure_len(plan.end)
            .and_then(|()| plan.write(&*self.storage));
        let next = self.write_state()?.finish_flush(plan, written.is_ok());
        written.map_err(|e| e.with_operation("flushing qcow2 metadata"))?;
        // 5. Release clusters nothing durable refers to any more.
        let Some((freed, blocks)) = next? else {
            return Ok(());
        };
        let cs = self.geo.cluster_size();
        let blocks_written = (|| {
            for (_, off, bytes) in &blocks {
                self.storage.write_at(bytes, *off)?;
            }
            self.storage.sync()
        })();
        if let Err(e) = blocks_written {
            self.write_state()?.blocks_not_written(&blocks);
            return Err(e.with_operation("flushing qcow2 refcounts"));
        }
        let punched: Vec<u64> = freed
            .into_iter()
            .filter(|&c| self.storage.punch_hole(c * cs, cs).is_ok())
            .collect();
        self.write_state()?.release_freed(&punched);
        Ok(())
    }

    /// How a write at `offset` (at most `len` bytes) can go: in place over copied data, or
    /// allocating over a run of unallocated clusters (absent) or of anything else.
    fn plan_write(&self, offset: u64, len: u64) -> Result<WritePlan> {
        let cs = self.geo.cluster_size();
        let (first, n) = self.scan(offset, len, |first, next, k| match (first, next) {
            (
                L2Entry::Data {
                    host: h0,
                    copied: true,
                },
                L2Entry::Data { host, copied: true },
            ) => Some(host) == h0.checked_add(k * cs),
            (L2Entry::Unallocated, L2Entry::Unallocated) => true,
            (L2Entry::Data { copied: true, .. } | L2Entry::Unallocated, _)
            | (_, L2Entry::Data { copied: true, .. } | L2Entry::Unallocated) => false,
            _ => true,
        })?;
        Ok(match first {
            L2Entry::Data { host, copied: true } => WritePlan::InPlace {
                host_offset: host + offset % cs,
                len: n,
            },
            L2Entry::Unallocated => WritePlan::Allocate { len: n, absent: true },
            _ => WritePlan::Allocate {
                len: n,
                absent: false,
            },
        })
    }

    /// Make guest clusters `[offset, offset + len)` read as zeroes (see [`Layer::zero`]); the
    /// caller holds an exclusive range guard.
    fn zero_clusters(&self, offset: u64, len: u64, unmap: bool, hide: bool, only_absent: bool) -> Result<()> {
        let cs = self.geo.cluster_size();
        let end = (offset + len).min(self.size().next_multiple_of(cs));
        for gc in offset / cs..end / cs {
            if !self.geo.v3 {
                // Version 2 has no zero flag: deallocate, or store zeroes.
                let old = self.mutate(gc, gc + 1, |st| {
                    let old = st.entry(gc)?;
                    if only_absent && old != L2Entry::Unallocated {
                        return Ok(None);
                    }
                    if !hide && unmap {
                        st.replace_entry(gc, 0, None)?;
                        return Ok(None);
                    }
                    Ok(Some(old))
                })?;
                match old {
                    None => {}
                    Some(L2Entry::Data { host, copied: true }) => self.storage.write_zeroes(host, cs)?,
                    Some(_) => {
                        let c = self.write_state()?.refs()?.alloc_counted(1)?;
                        self.ensure_len((c + 1) * cs)?;
                        self.storage.write_zeroes(c * cs, cs)?;
                        self.mutate(gc, gc + 1, |st| st.replace_entry(gc, (c * cs) | COPIED, None))?;
                    }
                }
                continue;
            }
            self.mutate(gc, gc + 1, |st| {
                let old = st.entry(gc)?;
                if only_absent && old != L2Entry::Unallocated {
                    return Ok(());
                }
                let new: u64 = match old {
                    L2Entry::Data { host, copied: true } | L2Entry::Zero { host, copied: true }
                        if !unmap && host != 0 =>
                    {
                        host | COPIED | ZERO
                    }
                    _ if hide => ZERO,
                    _ if unmap => 0,
                    _ => ZERO,
                };
                let host = new & entry::OFFSET_MASK;
                let keep = (host != 0).then_some(host / cs);
                st.replace_entry(gc, new, keep)
            })?;
        }
        Ok(())
    }
}

impl Allocator for Qcow2Image {
    fn health(&self) -> &Health {
        &self.health
    }

    fn granularity(&self) -> u64 {
        self.geo.cluster_size()
    }

    fn data_storage(&self) -> &dyn Storage {
        &*self.storage
    }

    fn range_locks(&self) -> &RangeLocks {
        &self.locks
    }

    fn plan(&self, offset: u64, len: u64) -> Result<WritePlan> {
        self.plan_write(offset, len)
    }

    fn reserve(&self, offset: u64, len: u64) -> Result<Reservation> {
        let cs = self.geo.cluster_size();
        if offset % cs != 0 || len % cs != 0 || len == 0 {
            return Err(
                Error::invalid_argument("qcow2 allocation must be cluster aligned").with_offset(offset),
            );
        }
        let gc0 = offset / cs;
        let (host, count, reuse) = self.mutate(gc0, gc0 + len / cs, |st| {
            // A preallocated zero cluster is reused in place.
            if let L2Entry::Zero { host, copied: true } = st.entry(gc0)? {
                if host != 0 {
                    st.reserved.insert(
                        gc0,
                        Reserved {
                            host_cluster: host / cs,
                            reuse: true,
                        },
                    );
                    return Ok((host, 1, true));
                }
            }
            let mut count = 1;
            while count < len / cs {
                match st.entry(gc0 + count)? {
                    L2Entry::Zero { host, copied: true } if host != 0 => break,
                    L2Entry::Data { copied: true, .. } => break,
                    _ => count += 1,
                }
            }
            let start = st.refs()?.reserve(count, count == 1)?;
            for i in 0..count {
                st.reserved.insert(
                    gc0 + i,
                    Reserved {
                        host_cluster: start + i,
                        reuse: false,
                    },
                );
            }
            Ok((start * cs, count, false))
        })?;
        let reservation = Reservation::new(offset, count * cs, host);
        if !reuse {
            if let Err(e) = self.ensure_len(host + count * cs) {
                self.release(reservation);
                return Err(e);
            }
        }
        Ok(reservation)
    }

    fn commit(&self, reservation: Reservation) -> Result<()> {
        let cs = self.geo.cluster_size();
        let first = reservation.offset() / cs;
        let end = first + reservation.len() / cs;
        self.mutate(first, end, |st| {
            for gc in first..end {
                let r = st.reserved.remove(&gc).ok_or_else(|| {
                    Error::invalid_argument("qcow2 commit of a range that was not allocated")
                        .with_offset(gc * cs)
                })?;
                if !r.reuse {
                    st.refs()?.incref(r.host_cluster)?;
                }
                let host = r.host_cluster * cs;
                st.replace_entry(gc, host | COPIED, Some(r.host_cluster))?;
            }
            Ok(())
        })
    }

    fn release(&self, reservation: Reservation) {
        let cs = self.geo.cluster_size();
        let first = reservation.offset() / cs;
        if let Ok(mut st) = self.write_state() {
            for gc in first..first + reservation.len() / cs {
                // The clusters were never counted: at worst they are space at the end of the
                // file that nothing refers to.
                st.reserved.remove(&gc);
            }
        }
    }
}

impl Layer for Qcow2Image {
    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn block_size(&self) -> u32 {
        512
    }

    fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        let cs = self.geo.cluster_size();
        let (first, n) = self.scan(offset, len, |first, next, k| match (first, next) {
            (L2Entry::Data { host: h0, .. }, L2Entry::Data { host, .. }) => {
                Some(host) == h0.checked_add(k * cs)
            }
            (L2Entry::Unallocated, L2Entry::Unallocated)
            | (L2Entry::Zero { .. }, L2Entry::Zero { .. })
            | (L2Entry::Compressed { .. }, L2Entry::Compressed { .. }) => true,
            _ => false,
        })?;
        let m = match first {
            L2Entry::Data { host, .. } => Mapping::Data {
                host_offset: host + offset % cs,
            },
            L2Entry::Zero { .. } => Mapping::Zero,
            L2Entry::Unallocated => Mapping::Absent,
            L2Entry::Compressed { .. } => Mapping::Special,
        };
        Ok((m, n))
    }

    fn read_special(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.geo.cluster_size();
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let gc = at / cs;
            let entry = self.entry_of(gc)?;
            let L2Entry::Compressed { host, len } = entry else {
                return Err(Error::corrupt("qcow2 cluster is no longer compressed").with_offset(at));
            };
            let bytes = self.decompress_cluster(gc, host, len, host ^ len)?;
            let in_c = (at % cs) as usize;
            let n = (cs as usize - in_c).min(buf.len() - pos);
            buf[pos..pos + n].copy_from_slice(&bytes[in_c..in_c + n]);
            pos += n;
        }
        Ok(())
    }

    fn begin_modification(&self) -> Result<()> {
        self.check_writable()?;
        self.first_modification()
    }

    fn allocation_granularity(&self) -> u64 {
        self.geo.cluster_size()
    }

    fn write(&self, request: &Write<'_>) -> Result<()> {
        self.check_writable()?;
        write_through(self, request)
    }

    fn zero_granularity(&self, _hide_below: bool) -> u64 {
        self.geo.cluster_size()
    }

    fn zero(&self, z: &Zeroing) -> Result<()> {
        self.check_writable()?;
        let cs = self.geo.cluster_size();
        if z.offset % cs != 0 || z.len % cs != 0 {
            return Err(
                Error::invalid_argument("qcow2 zeroing must be cluster aligned").with_offset(z.offset)
            );
        }
        let hide = z.hide_below || self.header.backing_file.is_some();
        let _guard = self.locks.exclusive(z.offset, z.offset + z.len);
        let _changing = self.health.changing()?;
        if z.mode == WriteMode::FillAbsent {
            self.zero_clusters(z.offset, z.len, true, true, true)
        } else {
            self.zero_clusters(z.offset, z.len, z.unmap, hide, false)
        }
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _flush = self.health.lock(&self.flush_lock)?;
        self.flush_locked()
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        if new_size > self.max_size() {
            return Err(Error::out_of_bounds(format!(
                "{new_size} bytes is larger than this qcow2 image can grow ({} bytes)",
                self.max_size()
            )));
        }
        let cs = self.geo.cluster_size();
        let _flush = self.health.lock(&self.flush_lock)?;
        let old = self.size();
        if new_size < old {
            let _guard = self
                .locks
                .exclusive(new_size - new_size % cs, old.next_multiple_of(cs));
            let _changing = self.health.changing()?;
            if new_size % cs != 0 {
                self.zero_cluster_tail(new_size / cs, new_size % cs)?;
            }
            let from = new_size.div_ceil(cs);
            let per_table = self.geo.l2_entries();
            let tables = self.read_state()?.l1_len();
            for i in from / per_table..tables {
                let first = (i * per_table).max(from);
                self.mutate(first, first + 1, |st| st.truncate_table(i, from))?;
            }
        }
        self.write_state()?.set_size(new_size)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn max_size(&self) -> u64 {
        (header::MAX_L1_BYTES / 8)
            .saturating_mul(self.geo.l2_span())
            .min(1 << 56)
    }

    fn details(&self) -> Vec<(&'static str, String)> {
        let d = self.qcow2_details();
        let flag = |b: bool| if b { "yes" } else { "no" }.to_string();
        vec![
            ("qcow2 version", d.version.to_string()),
            ("cluster size", d.cluster_size.to_string()),
            ("refcount bits", d.refcount_bits.to_string()),
            ("compression type", d.compression.name().to_string()),
            ("backing file", d.backing_file.unwrap_or_else(|| "none".into())),
            (
                "backing format",
                d.backing_format.unwrap_or_else(|| "none".into()),
            ),
            ("internal snapshots", d.snapshots.to_string()),
            ("lazy refcounts", flag(d.lazy_refcounts)),
            ("dirty", flag(d.dirty)),
            ("corrupt", flag(d.corrupt)),
        ]
    }

    fn layer_info(&self) -> LayerInfo {
        let meta = self.peek_meta();
        let ext = meta.layer.map(|(e, _)| e);
        LayerInfo {
            layer_type: ext.and_then(|e| e.layer_type),
            layer_uuid: ext.map(|e| e.layer_uuid),
            stable_uuid: ext.map(|e| e.stable_uuid),
            parent_uuid: ext.and_then(|e| e.parent_uuid),
            parent_path: meta.backing_file.clone(),
            parent_format: meta.backing_format.as_deref().and_then(|f| f.parse().ok()),
        }
    }

    /// Records the parent as the qcow2 backing file (name and format) and the layer type and
    /// UUIDs in diskkit's layer extension, by rewriting the header cluster (one write, synced
    /// after the metadata is flushed). Like `qemu-img rebase -u`: the data is not changed.
    fn set_layer_info(&self, info: &LayerInfo) -> Result<()> {
        self.check_writable()?;
        let cs = self.geo.cluster_size();
        // Flush first, then read the fixed header fields as they are on disk now (no flush
        // can change them until this is done).
        let _flush = self.health.lock(&self.flush_lock)?;
        self.flush_locked()?;
        let mut meta = self.meta()?;
        let _changing = self.health.changing()?;
        let file_len = self.storage.len()?;
        let mut head = vec![0u8; file_len.min(cs) as usize];
        self.storage.read_at(&mut head, 0)?;
        let current = Header::parse(&head, file_len)?;
        let old = meta.layer.map(|(e, _)| e).unwrap_or_else(LayerExt::new);
        let ext = LayerExt {
            layer_type: info.layer_type,
            layer_uuid: info.layer_uuid.unwrap_or(old.layer_uuid),
            parent_uuid: info.parent_uuid,
            stable_uuid: old.stable_uuid,
        };
        let mut exts: Vec<(u32, Vec<u8>)> = current
            .extensions
            .iter()
            .filter(|(ty, _, _)| *ty != EXT_DISKKIT_LAYER && *ty != header::backing_format_ext())
            .map(|(ty, _, d)| (*ty, d.clone()))
            .collect();
        let format = info.parent_format.map(|f| f.name().to_string());
        if let (Some(_), Some(f)) = (&info.parent_path, &format) {
            exts.insert(0, (header::backing_format_ext(), f.as_bytes().to_vec()));
        }
        exts.push((EXT_DISKKIT_LAYER, ext.encode()));
        let fixed = &head[..current.header_length as usize];
        let bytes = match header::rebuild(fixed, &exts, info.parent_path.as_deref(), cs) {
            Ok(b) => b,
            Err(_) => {
                // Small clusters: drop the feature name table (it only names bits) and retry.
                exts.retain(|(ty, _)| *ty != header::feature_names_ext());
                header::rebuild(fixed, &exts, info.parent_path.as_deref(), cs)?
            }
        };
        self.storage.write_at(&bytes, 0)?;
        self.storage.sync()?;
        let written = Header::parse(&bytes, file_len.max(bytes.len() as u64))?;
        *meta = Meta::from_header(&written);
        Ok(())
    }
}
