//! Apple Sparse Image Format (ASIF).
//!
//! See `shared/docs/asif-format.md` for what is known of the format; [`state`] explains how
//! diskkit keeps it crash-consistent. Layer information is kept in the metadata block's
//! `internal metadata` dictionary; the header UUID is the layer UUID and changes the first time
//! an opened image is modified.
//!
//! # Concurrency
//!
//! The in-memory metadata ([`state::State`]) is behind one lock that is only ever held for
//! in-memory work: tables and bitmaps are read from disk without it (and kept only if nothing
//! changed meanwhile), commits write a snapshot taken under it, and data goes to the file under
//! [`RangeLocks`] guards (see [`crate::layer::write`]). Commits, layer-information changes and
//! resizes are serialised among themselves; header writes and growing the file likewise.

mod entry;
mod geometry;
mod header;
pub(crate) mod metadata;
mod state;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use uuid::Uuid;

use self::entry::{ChunkState, Entry};
use self::geometry::Geometry;
use self::header::{Header, HEADER_SIZE};
use self::metadata::Metadata;
use self::state::{read_padded, Directory, Need, Reserved, State, Step};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::{CreateOptions, FormatDriver, LayerOpen};
use crate::layer::health::Held;
use crate::layer::write::{write_through, Allocator, RangeLocks, Reservation, WritePlan};
use crate::layer::{Access, Health, ImageFormat, Layer, LayerInfo, Write, WriteMode, Zeroing};
use crate::mapping::Mapping;
use crate::storage::Storage;

/// The magic at offset 0 of an ASIF file.
pub const MAGIC: &[u8; 4] = b"shdw";

/// Apple's maximum virtual size: 4 PiB.
const APPLE_MAX_BYTES: u64 = 1 << 52;

/// The ASIF driver.
pub(crate) static DRIVER: Driver = Driver;

/// See [`DRIVER`].
pub(crate) struct Driver;

impl FormatDriver for Driver {
    fn format(&self) -> ImageFormat {
        ImageFormat::Asif
    }

    fn recognises(&self, head: &[u8]) -> bool {
        head.starts_with(MAGIC)
    }

    fn open(&self, storage: Arc<dyn Storage>, how: &LayerOpen<'_>) -> Result<Arc<dyn Layer>> {
        Ok(Arc::new(AsifImage::open_with(storage, how.access)?))
    }

    fn create(&self, storage: Arc<dyn Storage>, options: &CreateOptions) -> Result<Arc<dyn Layer>> {
        Ok(Arc::new(AsifImage::create(
            storage,
            options.size,
            options.block_size,
            options.chunk_size,
        )?))
    }
}

/// An ASIF image.
#[derive(Debug)]
pub struct AsifImage {
    storage: Arc<dyn Storage>,
    writable: bool,
    geo: Geometry,
    state: RwLock<State>,
    /// Set once the layer UUID has been renewed for this open.
    modified: AtomicBool,
    size: AtomicU64,
    health: Health,
    locks: RangeLocks,
    /// Serialises commits, layer-information changes and resizes.
    flush_lock: Mutex<()>,
    /// Serialises header writes.
    header_lock: Mutex<()>,
    /// Serialises growing the file.
    grow_lock: Mutex<()>,
    /// A length the file is known to have reached.
    grown: AtomicU64,
}

/// What a zeroing step does after changing the state.
enum ZeroStep {
    /// Nothing more.
    Done,
    /// Punch out (or write zeroes over) the bytes, in place.
    Storage { host: u64, len: u64, unmap: bool },
    /// Punch out the bytes, then mark blocks `[b0, b1)` of global chunk `gc` present.
    StorageThenMark {
        host: u64,
        len: u64,
        unmap: bool,
        gc: u64,
        blocks: (u64, u64),
    },
    /// Grow the file over `chunk`, then mark blocks `[b0, b1)` of global chunk `gc` present
    /// (a fresh chunk that hides the parent for part of a chunk).
    GrowThenMark { chunk: u64, gc: u64, blocks: (u64, u64) },
}

impl AsifImage {
    /// Open an ASIF image on `storage`.
    pub fn open(storage: Arc<dyn Storage>, writable: bool) -> Result<Self> {
        AsifImage::open_with(storage, &Access::from_writable(writable))
    }

    /// Open an ASIF image on `storage`, writable as `access` decides from its layer type.
    pub(crate) fn open_with(storage: Arc<dyn Storage>, access: &Access<'_>) -> Result<Self> {
        let file_len = storage.len()?;
        let mut head = vec![0u8; HEADER_SIZE as usize];
        read_padded(&*storage, &mut head, 0, file_len)?;
        if file_len < HEADER_SIZE as u64 {
            if head.starts_with(MAGIC) {
                return Err(Error::corrupt(format!(
                    "ASIF file is truncated ({file_len} bytes)"
                )));
            }
            return Err(Error::invalid_format("file too short for an ASIF header"));
        }
        let header = Header::parse(&head, file_len)?;
        let geo = header.geometry;
        if geo.blocks_per_chunk() % 4 != 0 {
            return Err(Error::unsupported(
                "chunks whose block count is not a multiple of 4",
            ));
        }
        let dir_len = geo.directory_entries as usize;
        let mut dirs = Vec::with_capacity(2);
        for off in header.directory_offsets() {
            let mut bytes = vec![0u8; geo.directory_bytes() as usize];
            storage.read_at(&mut bytes, off)?;
            let mut words = bytes
                .chunks_exact(8)
                .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()));
            let seq = words.next().unwrap_or(0);
            dirs.push(Directory {
                seq,
                entries: words.collect(),
            });
        }
        let active = usize::from(dirs[1].seq > dirs[0].seq);
        let dir_end = header
            .directory_offsets()
            .iter()
            .map(|o| o + geo.directory_bytes())
            .max()
            .unwrap_or(0);
        let first_chunk = dir_end.div_ceil(geo.chunk_size).max(1);
        let [a, b]: [Directory; 2] = dirs.try_into().map_err(|_| Error::corrupt("directories"))?;
        let dir = if active == 0 {
            a.entries.clone()
        } else {
            b.entries.clone()
        };
        debug_assert_eq!(dir.len(), dir_len);
        let st = State {
            header,
            geo,
            disk_dirs: [a, b],
            active,
            dir,
            tables: HashMap::new(),
            bitmaps: HashMap::new(),
            reserved: HashMap::new(),
            file_len,
            first_chunk,
            free: Vec::new(),
            pending_free: Vec::new(),
            fresh: HashSet::new(),
            metadata: None,
            dirty: false,
            generation: 0,
        };
        for (t, &host) in st.dir.iter().enumerate() {
            if host != 0 && (host < first_chunk || host >= st.chunk_limit()) {
                return Err(Error::corrupt(format!(
                    "directory entry {t} names chunk {host}, outside the file's chunks [{first_chunk}, {})",
                    st.chunk_limit()
                )));
            }
        }
        let size = st.size();
        let mut image = AsifImage {
            storage,
            writable: false,
            geo,
            state: RwLock::new(st),
            modified: AtomicBool::new(false),
            size: AtomicU64::new(size),
            health: Health::new(),
            locks: RangeLocks::new(),
            flush_lock: Mutex::new(()),
            header_lock: Mutex::new(()),
            grow_lock: Mutex::new(()),
            grown: AtomicU64::new(file_len),
        };
        image.load_metadata()?;
        let layer_type = image.layer_info().layer_type;
        if let Some(storage) = access.writable_storage(&image.storage, layer_type) {
            // Writing needs the free chunks, found by scanning what the tables refer to.
            let st = image.state.get_mut().unwrap_or_else(|e| e.into_inner());
            match st.scan_used(&*storage) {
                Ok(used) => {
                    st.set_free_from_used(&used);
                    // A free chunk is handed out as reading zeroes: punch them all out now
                    // (leaving out any that cannot be).
                    let k = geo.chunk_size;
                    st.free
                        .retain(|&(a, b)| storage.punch_hole(a * k, (b - a) * k).is_ok());
                    image.storage = storage;
                    image.writable = true;
                }
                // A cache layer that cannot be written stops filling; it still reads.
                Err(_) if matches!(access, Access::Parent(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(image)
    }

    /// Create an ASIF image of `size` bytes on empty `storage`.
    pub fn create(storage: Arc<dyn Storage>, size: u64, block_size: u32, chunk_size: u32) -> Result<Self> {
        let b = u64::from(block_size);
        let k = u64::from(chunk_size);
        if b != 512 && b != 4096 {
            return Err(Error::invalid_argument("ASIF block size must be 512 or 4096"));
        }
        let min_chunk = (8 * (4 * b + 1)).next_power_of_two().max(64 << 10);
        if !k.is_power_of_two() || k < min_chunk || k > geometry::MAX_CHUNK_SIZE {
            return Err(Error::invalid_argument(format!(
                "ASIF chunk size must be a power of two from {min_chunk} to {}, not {k}",
                geometry::MAX_CHUNK_SIZE
            )));
        }
        if size == 0 || size % b != 0 {
            return Err(Error::invalid_argument(format!(
                "size must be a non-zero multiple of {b} bytes"
            )));
        }
        // Apple's maximum, reduced when the chunk is too small for two directories that size.
        let dir_a = HEADER_SIZE as u64;
        let per_table = Geometry::new(b, k, 1)?.bytes_per_table;
        let fit_entries = ((k - dir_a - b) / 2) / 8 - 1;
        let max_bytes = if APPLE_MAX_BYTES.div_ceil(per_table) <= fit_entries {
            APPLE_MAX_BYTES
        } else {
            fit_entries * per_table
        };
        let geo = Geometry::new(b, k, max_bytes / b)?;
        if size > geo.max_bytes - k {
            return Err(Error::invalid_argument(format!(
                "size {size} exceeds the ASIF maximum of {} bytes for this chunk size",
                geo.max_bytes - k
            )));
        }
        let dir_b = (dir_a + geo.directory_bytes()).next_multiple_of(b);
        let meta_chunk = geo.max_bytes / k - 1;
        let (meta_t, meta_c) = geo.locate(meta_chunk * k);
        let header = Header::new(geo, size / b, [dir_a, dir_b], meta_chunk, Uuid::new_v4());
        // Chunk 0: header and directories; chunk 1: the table holding the metadata chunk;
        // chunk 2: the metadata block.
        storage.set_len(3 * k)?;
        storage.write_at(&header.bytes, 0)?;
        let mut dir = vec![0u64; geo.directory_entries as usize + 1];
        dir[0] = 1;
        dir[meta_t as usize + 1] = 1;
        let dir_bytes: Vec<u8> = dir.iter().flat_map(|e| e.to_be_bytes()).collect();
        storage.write_at(&dir_bytes, dir_a)?;
        let mut table = vec![0u8; geo.table_bytes()];
        let idx = geo.data_entry_index(meta_c) * 8;
        table[idx..idx + 8].copy_from_slice(&Entry(0).with(ChunkState::Full, 2).0.to_be_bytes());
        storage.write_at(&table, k)?;
        let block = Metadata::new(Uuid::new_v4()).to_block(k as usize)?;
        storage.write_at(&block, 2 * k)?;
        storage.sync()?;
        AsifImage::open(storage, true)
    }

    fn read_state(&self) -> Result<Held<'_, RwLockReadGuard<'_, State>>> {
        self.health.read(&self.state)
    }

    fn write_state(&self) -> Result<Held<'_, RwLockWriteGuard<'_, State>>> {
        self.health.write(&self.state)
    }

    /// The state for accessors that cannot fail (a failed image still answers them).
    fn peek_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn check_writable(&self) -> Result<()> {
        self.health.check()?;
        if self.writable {
            Ok(())
        } else {
            Err(Error::from_kind(ErrorKind::ReadOnly))
        }
    }

    /// Load what `need` names, reading without the state lock. The bytes are kept only if
    /// nothing was dropped from memory meanwhile (the caller asks again either way).
    fn load(&self, need: Need) -> Result<()> {
        let (at, len, generation) = {
            let st = self.read_state()?;
            let (at, len) = match need {
                Need::Table(t) if st.tables.contains_key(&t) => return Ok(()),
                Need::Bitmap(gc) if st.bitmaps.contains_key(&gc) => return Ok(()),
                Need::Table(t) => st.table_location(t)?,
                Need::Bitmap(gc) => st.bitmap_location(gc)?,
            };
            (at, len, st.generation)
        };
        let mut bytes = vec![0u8; len];
        read_padded(&*self.storage, &mut bytes, at, self.storage.len()?)?;
        let mut st = self.write_state()?;
        if st.generation != generation {
            return Ok(());
        }
        match need {
            Need::Table(t) => st
                .insert_table(t, at, &bytes)
                .map_err(|e| e.with_operation("loading a table")),
            Need::Bitmap(gc) => {
                st.insert_bitmap(gc, bytes);
                Ok(())
            }
        }
    }

    /// Run `f` on the state, loading tables and bitmaps it asks for.
    fn with_loaded<T>(&self, mut f: impl FnMut(&State) -> Result<Step<T>>) -> Result<T> {
        loop {
            let need = {
                let st = self.read_state()?;
                match f(&st)? {
                    Ok(v) => return Ok(v),
                    Err(need) => need,
                }
            };
            self.load(need)?;
        }
    }

    /// Change the state with `f`, loading tables and bitmaps it asks for first. `f` must ask
    /// for everything it needs before it changes anything (it runs again after a load).
    fn mutate<T>(&self, mut f: impl FnMut(&mut State) -> Result<Step<T>>) -> Result<T> {
        loop {
            let need = {
                let mut st = self.write_state()?;
                match f(&mut st)? {
                    Ok(v) => return Ok(v),
                    Err(need) => need,
                }
            };
            self.load(need)?;
        }
    }

    /// Make sure the file is at least `end` bytes long before anything is written up to there.
    /// Every write past the current end goes through here first, so growing never cuts off
    /// data another thread wrote.
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

    /// The logical (uncapped by the disk size) mapping at `offset`.
    fn lookup(st: &State, offset: u64, len: u64) -> Result<Step<(Mapping, u64)>> {
        let geo = &st.geo;
        let k = geo.chunk_size;
        let (t, c) = geo.locate(offset);
        let table_end = (t + 1) * geo.bytes_per_table;
        let len = len.min(table_end - offset);
        if st.dir[t as usize] == 0 {
            return Ok(Ok((Mapping::Absent, len)));
        }
        let Some(table) = st.tables.get(&t) else {
            return Ok(Err(Need::Table(t)));
        };
        let within = offset % k;
        let entry = Entry(table.entries[geo.data_entry_index(c)]);
        let first = k - within;
        let (mapping, mut n) = match entry.state() {
            ChunkState::Unwritten => (Mapping::Absent, first),
            ChunkState::Zero => (Mapping::Zero, first),
            ChunkState::Full => (
                Mapping::Data {
                    host_offset: entry.chunk() * k + within,
                },
                first,
            ),
            ChunkState::Partial => {
                let gc = offset / k;
                if !st.bitmaps.contains_key(&gc) {
                    return Ok(Err(Need::Bitmap(gc)));
                }
                let bs = geo.block_size;
                let b = within / bs;
                let present = st.block_present(gc, b)?;
                let last = ((within + len - 1) / bs).min(geo.blocks_per_chunk() - 1);
                let mut end = b + 1;
                while end <= last && st.block_present(gc, end)? == present {
                    end += 1;
                }
                let n = end * bs - within;
                let m = if present {
                    Mapping::Data {
                        host_offset: entry.chunk() * k + within,
                    }
                } else {
                    Mapping::Absent
                };
                return Ok(Ok((m, n.min(len))));
            }
        };
        // Extend over following chunks of the same kind (contiguous on the host for data).
        let mut next_c = c + 1;
        let mut prev_chunk = entry.chunk();
        while n < len && next_c < geo.chunks_per_table() {
            let e = Entry(table.entries[geo.data_entry_index(next_c)]);
            let same = match (mapping, e.state()) {
                (Mapping::Absent, ChunkState::Unwritten) | (Mapping::Zero, ChunkState::Zero) => true,
                (Mapping::Data { .. }, ChunkState::Full) => e.chunk() == prev_chunk + 1,
                _ => false,
            };
            if !same {
                break;
            }
            prev_chunk = e.chunk();
            n += k;
            next_c += 1;
        }
        let mut n = n.min(len);
        if let Mapping::Data { host_offset } = mapping {
            // A file that ends inside its last chunk reads as zeroes past its end.
            if host_offset >= st.file_len {
                return Ok(Ok((Mapping::Zero, n)));
            }
            n = n.min(st.file_len - host_offset);
        }
        Ok(Ok((mapping, n)))
    }

    /// Read guest bytes from the metadata area (past the disk size), through the tables.
    fn read_logical(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let (m, n) = self.with_loaded(|st| Self::lookup(st, at, (buf.len() - pos) as u64))?;
            let n = n as usize;
            match m {
                Mapping::Data { host_offset } => self.storage.read_at(&mut buf[pos..pos + n], host_offset)?,
                _ => buf[pos..pos + n].fill(0),
            }
            pos += n;
        }
        Ok(())
    }

    fn load_metadata(&self) -> Result<()> {
        let meta_chunk = self.read_state()?.header.metadata_chunk();
        if meta_chunk == 0 {
            return Ok(());
        }
        let k = self.geo.chunk_size;
        let present = self.with_loaded(|st| {
            Self::lookup(st, meta_chunk * k, k).map(|r| r.map(|(m, _)| matches!(m, Mapping::Data { .. })))
        })?;
        if !present {
            return Ok(());
        }
        let mut block = vec![0u8; k as usize];
        self.read_logical(meta_chunk * k, &mut block)?;
        let meta = Metadata::parse(&block)?;
        meta.layer_info()?;
        self.write_state()?.metadata = Some(meta);
        Ok(())
    }

    /// The stable UUID from the metadata.
    pub fn stable_uuid(&self) -> Option<Uuid> {
        self.peek_state()
            .metadata
            .as_ref()
            .and_then(|m| m.layer_info().ok())
            .and_then(|i| i.stable_uuid)
    }

    /// The maximum sector count from the header.
    pub fn max_sector_count(&self) -> u64 {
        self.peek_state().header.max_sector_count()
    }

    /// The chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.geo.chunk_size
    }

    /// Make `[offset, offset + len)` (block-aligned) read as zeroes. The caller holds an
    /// exclusive range guard over it. Returns whether enough metadata is waiting that a commit
    /// should run.
    fn zero_range(&self, offset: u64, len: u64, unmap: bool, hide_below: bool) -> Result<bool> {
        let k = self.geo.chunk_size;
        let b = self.geo.block_size;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gc = pos / k;
            let within = pos % k;
            let n = (k - within).min(end - pos);
            let whole = within == 0 && n == k;
            let step = self.mutate(|st| {
                let (t, c) = st.locate_chunk(gc);
                if st.dir[t as usize] == 0 && !hide_below {
                    // No table: the whole table range is absent, which reads as zeroes.
                    return Ok(Ok(ZeroStep::Done));
                }
                if let Some(need) = st.need_table(gc) {
                    return Ok(Err(need));
                }
                st.ensure_table(t)?;
                let e = st.entry(t, c).unwrap_or(Entry(0));
                let host = e.chunk() * k + within;
                let blocks = (within / b, (within + n) / b);
                Ok(Ok(match (e.state(), whole) {
                    (ChunkState::Zero, _) => ZeroStep::Done,
                    (ChunkState::Unwritten, _) if !hide_below => ZeroStep::Done,
                    (ChunkState::Unwritten, true) => {
                        st.set_entry(t, c, e.with(ChunkState::Zero, 0));
                        ZeroStep::Done
                    }
                    (ChunkState::Unwritten, false) => {
                        // Hide the parent for part of a chunk: a fresh (zero) chunk, those
                        // blocks present once the file covers it. A chunk reserved for writes
                        // in flight elsewhere in this chunk is that chunk.
                        let chunk = match st.reserved.get(&gc) {
                            Some(r) => r.chunk,
                            None => st.alloc_chunk()?,
                        };
                        st.reset_bitmap(gc)?;
                        st.set_entry(t, c, e.with(ChunkState::Partial, chunk));
                        ZeroStep::GrowThenMark { chunk, gc, blocks }
                    }
                    (ChunkState::Full | ChunkState::Partial, true) if unmap => {
                        st.set_entry(t, c, e.with(ChunkState::Zero, 0));
                        st.drop_bitmap(gc);
                        st.free_chunk(e.chunk());
                        ZeroStep::Done
                    }
                    (ChunkState::Full, _) => ZeroStep::Storage { host, len: n, unmap },
                    (ChunkState::Partial, _) if hide_below || !unmap => ZeroStep::StorageThenMark {
                        host,
                        len: n,
                        unmap,
                        gc,
                        blocks,
                    },
                    (ChunkState::Partial, _) => ZeroStep::Storage { host, len: n, unmap },
                }))
            })?;
            let mark = match step {
                ZeroStep::Done => None,
                ZeroStep::Storage { host, len, unmap } => {
                    self.zero_storage(host, len, unmap)?;
                    None
                }
                ZeroStep::StorageThenMark {
                    host,
                    len,
                    unmap,
                    gc,
                    blocks,
                } => {
                    self.zero_storage(host, len, unmap)?;
                    Some((gc, blocks))
                }
                ZeroStep::GrowThenMark { chunk, gc, blocks } => {
                    self.ensure_len((chunk + 1) * k)?;
                    Some((gc, blocks))
                }
            };
            if let Some((gc, (b0, b1))) = mark {
                self.mutate(|st| {
                    if let Some(need) = st.need_for(gc) {
                        return Ok(Err(need));
                    }
                    let (t, c) = st.locate_chunk(gc);
                    let e = st.entry(t, c).unwrap_or(Entry(0));
                    if e.state() == ChunkState::Partial && st.mark_present(gc, b0, b1) {
                        st.set_entry(t, c, e.with(ChunkState::Full, e.chunk()));
                    }
                    Ok(Ok(()))
                })?;
            }
            pos += n;
        }
        Ok(self.read_state()?.wants_commit())
    }

    fn zero_storage(&self, host: u64, len: u64, unmap: bool) -> Result<()> {
        if unmap {
            self.storage.punch_hole(host, len)
        } else {
            self.storage.write_zeroes(host, len)
        }
    }

    /// Commit the metadata (see [`state`]); the caller holds `flush_lock`.
    fn commit_locked(&self) -> Result<()> {
        let _changing = self.health.changing()?;
        // Clean metadata: only the data needs a sync, without the state lock taken exclusively.
        if !self.read_state()?.dirty {
            return self.storage.sync();
        }
        let plan = self.write_state()?.prepare_commit()?;
        let Some(plan) = plan else {
            // Nothing to record: only the data needs to be durable.
            return self.storage.sync();
        };
        let written = self
            .ensure_len(plan.file_len)
            .and_then(|()| plan.write(&*self.storage));
        self.write_state()?.finish_commit(plan, &written);
        written
            .map(|_| ())
            .map_err(|e| e.with_operation("committing ASIF metadata"))
    }

    /// Write the header after changing it with `f` (header writes are serialised).
    fn update_header(&self, f: impl FnOnce(&mut Header)) -> Result<()> {
        let _header = self.health.lock(&self.header_lock)?;
        let bytes = {
            let mut st = self.write_state()?;
            f(&mut st.header);
            st.header.bytes.clone()
        };
        let _changing = self.health.changing()?;
        self.storage.write_at(&bytes, 0)?;
        self.storage.sync()
    }
}

impl Allocator for AsifImage {
    fn health(&self) -> &Health {
        &self.health
    }

    fn granularity(&self) -> u64 {
        self.geo.block_size
    }

    fn data_storage(&self) -> &dyn Storage {
        &*self.storage
    }

    fn range_locks(&self) -> &RangeLocks {
        &self.locks
    }

    fn plan(&self, offset: u64, len: u64) -> Result<WritePlan> {
        let (m, n) = self.map(offset, len)?;
        Ok(match m {
            Mapping::Data { host_offset } => WritePlan::InPlace { host_offset, len: n },
            Mapping::Absent => WritePlan::Allocate { len: n, absent: true },
            Mapping::Zero | Mapping::Special => WritePlan::Allocate {
                len: n,
                absent: false,
            },
        })
    }

    fn reserve(&self, offset: u64, len: u64) -> Result<Reservation> {
        let k = self.geo.chunk_size;
        let gc = offset / k;
        let within = offset % k;
        let len = len.min(k - within);
        let (chunk, holder) = self.mutate(|st| {
            if let Some(need) = st.need_table(gc) {
                return Ok(Err(need));
            }
            let (t, c) = st.locate_chunk(gc);
            st.ensure_table(t)?;
            let e = st.entry(t, c).unwrap_or(Entry(0));
            Ok(Ok(match e.state() {
                ChunkState::Full | ChunkState::Partial => (e.chunk(), false),
                ChunkState::Unwritten | ChunkState::Zero => match st.reserved.get_mut(&gc) {
                    Some(r) => {
                        r.holders += 1;
                        (r.chunk, true)
                    }
                    None => {
                        let chunk = st.alloc_chunk()?;
                        st.reserved.insert(gc, Reserved { chunk, holders: 1 });
                        (chunk, true)
                    }
                },
            }))
        })?;
        let reservation = Reservation::new(offset, len, chunk * k + within);
        if holder {
            if let Err(e) = self.ensure_len((chunk + 1) * k) {
                self.release(Reservation::new(offset, len, chunk * k + within));
                return Err(e);
            }
        }
        Ok(reservation)
    }

    fn commit(&self, reservation: Reservation) -> Result<()> {
        let k = self.geo.chunk_size;
        let b = self.geo.block_size;
        let gc = reservation.offset() / k;
        let within = reservation.offset() % k;
        let chunk = reservation.host_offset() / k;
        let (b0, b1) = (within / b, (within + reservation.len()) / b);
        let wants_commit = self.mutate(|st| {
            if let Some(need) = st.need_for(gc) {
                return Ok(Err(need));
            }
            let (t, c) = st.locate_chunk(gc);
            st.ensure_table(t)?;
            let e = st.entry(t, c).unwrap_or(Entry(0));
            match e.state() {
                ChunkState::Full => {}
                // The fresh chunk reads as zeroes where it was not written: all of it is valid.
                ChunkState::Zero => st.set_entry(t, c, e.with(ChunkState::Full, chunk)),
                ChunkState::Unwritten if b0 == 0 && b1 == k / b => {
                    st.set_entry(t, c, e.with(ChunkState::Full, chunk))
                }
                ChunkState::Unwritten => {
                    st.reset_bitmap(gc)?;
                    st.mark_present(gc, b0, b1);
                    st.set_entry(t, c, e.with(ChunkState::Partial, chunk));
                }
                ChunkState::Partial => {
                    if st.mark_present(gc, b0, b1) {
                        st.set_entry(t, c, e.with(ChunkState::Full, e.chunk()));
                    }
                }
            }
            if let Some(r) = st.reserved.get_mut(&gc) {
                if r.chunk == chunk {
                    r.holders = r.holders.saturating_sub(1);
                    if r.holders == 0 {
                        st.reserved.remove(&gc);
                    }
                }
            }
            Ok(Ok(st.wants_commit()))
        })?;
        if wants_commit {
            self.flush()?;
        }
        Ok(())
    }

    fn release(&self, reservation: Reservation) {
        let k = self.geo.chunk_size;
        let gc = reservation.offset() / k;
        let chunk = reservation.host_offset() / k;
        if let Ok(mut st) = self.write_state() {
            let (t, c) = st.locate_chunk(gc);
            let mapped = st.entry(t, c).is_some_and(|e| {
                matches!(e.state(), ChunkState::Full | ChunkState::Partial) && e.chunk() == chunk
            });
            if let Some(r) = st.reserved.get_mut(&gc) {
                if r.chunk == chunk {
                    r.holders = r.holders.saturating_sub(1);
                    if r.holders == 0 {
                        st.reserved.remove(&gc);
                        if !mapped {
                            // Never mapped: punched out and reused after the next commit.
                            st.free_chunk(chunk);
                            st.dirty = true;
                        }
                    }
                }
            }
        }
    }
}

impl Layer for AsifImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Asif
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn block_size(&self) -> u32 {
        self.geo.block_size as u32
    }

    fn cluster_size(&self) -> u64 {
        self.geo.chunk_size
    }

    fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        self.with_loaded(|st| Self::lookup(st, offset, len))
    }

    fn begin_modification(&self) -> Result<()> {
        self.check_writable()?;
        if self.modified.load(Ordering::Acquire) {
            return Ok(());
        }
        let _header = self.health.lock(&self.header_lock)?;
        if self.modified.load(Ordering::Acquire) {
            return Ok(());
        }
        let bytes = {
            let mut st = self.write_state()?;
            st.header.set_uuid(Uuid::new_v4());
            st.header.bytes.clone()
        };
        let _changing = self.health.changing()?;
        self.storage.write_at(&bytes, 0)?;
        self.storage.sync()?;
        self.modified.store(true, Ordering::Release);
        Ok(())
    }

    fn write(&self, request: &Write<'_>) -> Result<()> {
        self.check_writable()?;
        write_through(self, request)
    }

    fn zero_granularity(&self, _hide_below: bool) -> u64 {
        self.geo.block_size
    }

    fn zero(&self, z: &Zeroing) -> Result<()> {
        self.check_writable()?;
        let end = z.offset + z.len;
        let _guard = self.locks.exclusive(z.offset, end);
        let _changing = self.health.changing()?;
        let mut wants_commit = false;
        if z.mode == WriteMode::FillAbsent {
            // Only the runs this layer holds nothing for (checked under the guard).
            let mut pos = z.offset;
            while pos < end {
                let (m, n) = self.map(pos, end - pos)?;
                let n = n.clamp(1, end - pos);
                if m == Mapping::Absent {
                    wants_commit |= self.zero_range(pos, n, true, true)?;
                }
                pos += n;
            }
        } else {
            wants_commit = self.zero_range(z.offset, z.len, z.unmap, z.hide_below)?;
        }
        if wants_commit {
            self.flush()?;
        }
        Ok(())
    }

    fn evict(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let k = self.geo.chunk_size;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size())
            .ok_or_else(|| Error::out_of_bounds(format!("eviction of {offset}+{len} is past the end")))?;
        if offset % k != 0 || (end % k != 0 && end != self.size()) {
            return Err(Error::invalid_argument(format!(
                "eviction of {offset}+{len} is not aligned to the chunk size {k}"
            )));
        }
        let _guard = self.locks.exclusive(offset, end);
        let _changing = self.health.changing()?;
        let mut pos = offset;
        while pos < end {
            let gc = pos / k;
            self.mutate(|st| {
                let (t, c) = st.locate_chunk(gc);
                if st.dir[t as usize] == 0 {
                    return Ok(Ok(()));
                }
                if let Some(need) = st.need_table(gc) {
                    return Ok(Err(need));
                }
                let e = st.entry(t, c).unwrap_or(Entry(0));
                match e.state() {
                    ChunkState::Unwritten => {}
                    ChunkState::Zero => st.set_entry(t, c, e.with(ChunkState::Unwritten, 0)),
                    ChunkState::Full | ChunkState::Partial => {
                        // Freed chunks are punched out after the commit that stops using them.
                        st.free_chunk(e.chunk());
                        st.drop_bitmap(gc);
                        st.set_entry(t, c, e.with(ChunkState::Unwritten, 0));
                    }
                }
                Ok(Ok(()))
            })?;
            pos += k;
        }
        // Committed at once, so the space is released now.
        let _flush = self.health.lock(&self.flush_lock)?;
        self.commit_locked()
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _flush = self.health.lock(&self.flush_lock)?;
        self.commit_locked()
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let b = self.geo.block_size;
        if new_size == 0 || new_size % b != 0 {
            return Err(Error::invalid_argument(format!(
                "ASIF size must be a non-zero multiple of {b}"
            )));
        }
        if new_size > self.max_size() {
            return Err(Error::invalid_argument(format!(
                "size {new_size} exceeds this image's maximum of {} bytes",
                self.max_size()
            )));
        }
        let _flush = self.health.lock(&self.flush_lock)?;
        let old = self.size();
        if new_size < old {
            // Drop everything past the new end: partial chunk zeroed, whole chunks unwritten.
            let k = self.geo.chunk_size;
            let boundary = new_size.next_multiple_of(k).min(old);
            let _guard = self.locks.exclusive(new_size, old.max(boundary));
            let _changing = self.health.changing()?;
            if boundary > new_size {
                self.zero_range(new_size, boundary - new_size, true, false)?;
            }
            let mut pos = boundary;
            while pos < old {
                let gc = pos / k;
                pos = self.mutate(|st| {
                    let (t, c) = st.locate_chunk(gc);
                    if st.dir[t as usize] == 0 {
                        return Ok(Ok((t + 1) * self.geo.bytes_per_table));
                    }
                    if let Some(need) = st.need_table(gc) {
                        return Ok(Err(need));
                    }
                    let e = st.entry(t, c).unwrap_or(Entry(0));
                    if e.state() != ChunkState::Unwritten {
                        if matches!(e.state(), ChunkState::Full | ChunkState::Partial) {
                            st.free_chunk(e.chunk());
                        }
                        st.drop_bitmap(gc);
                        st.set_entry(t, c, e.with(ChunkState::Unwritten, 0));
                    }
                    Ok(Ok(pos + k))
                })?;
            }
            self.write_state()?.reserved.retain(|&gc, _| gc * k < new_size);
            self.commit_locked()?;
        }
        self.update_header(|h| h.set_sector_count(new_size / b))?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn max_size(&self) -> u64 {
        let st = self.peek_state();
        let meta = st.header.metadata_chunk();
        let max = st.geo.max_bytes;
        if meta == 0 {
            max
        } else {
            max.min(meta * st.geo.chunk_size)
        }
    }

    fn layer_info(&self) -> LayerInfo {
        let st = self.peek_state();
        let mut info = st
            .metadata
            .as_ref()
            .and_then(|m| m.layer_info().ok())
            .unwrap_or_default();
        info.layer_uuid = Some(st.header.uuid());
        info
    }

    fn set_layer_info(&self, info: &LayerInfo) -> Result<()> {
        self.check_writable()?;
        let k = self.geo.chunk_size;
        let _flush = self.health.lock(&self.flush_lock)?;
        let (meta_chunk, mut meta) = {
            let st = self.read_state()?;
            let meta_chunk = st.header.metadata_chunk();
            if meta_chunk == 0 {
                return Err(Error::unsupported("this ASIF image has no metadata block"));
            }
            let meta = st
                .metadata
                .clone()
                .unwrap_or_else(|| Metadata::new(Uuid::new_v4()));
            (meta_chunk, meta)
        };
        meta.set_layer_info(info);
        let block = meta.to_block(k as usize)?;
        let _changing = self.health.changing()?;
        // Copy-on-write: the new block goes to a fresh chunk, then the table points at it.
        let chunk = self.write_state()?.alloc_chunk()?;
        self.ensure_len((chunk + 1) * k)?;
        self.storage.write_at(&block, chunk * k)?;
        let (t, c) = self.geo.locate(meta_chunk * k);
        self.mutate(|st| {
            if let Some(need) = st.need_table(meta_chunk) {
                return Ok(Err(need));
            }
            st.ensure_table(t)?;
            let e = st.entry(t, c).unwrap_or(Entry(0));
            if matches!(e.state(), ChunkState::Full | ChunkState::Partial) {
                st.free_chunk(e.chunk());
            }
            st.drop_bitmap(meta_chunk);
            st.set_entry(t, c, e.with(ChunkState::Full, chunk));
            st.metadata = Some(meta.clone());
            Ok(Ok(()))
        })?;
        self.commit_locked()
    }
}
