//! Apple Sparse Image Format (ASIF).
//!
//! See `shared/docs/asif-format.md` for what is known of the format; [`state`] explains how
//! diskkit keeps it crash-consistent. Layer information is kept in the metadata block's
//! `internal metadata` dictionary; the header UUID is the layer UUID and changes the first time
//! an opened image is modified.

mod entry;
mod geometry;
mod header;
pub(crate) mod metadata;
mod state;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use uuid::Uuid;

use self::entry::{ChunkState, Entry};
use self::geometry::Geometry;
use self::header::{Header, HEADER_SIZE};
use self::metadata::Metadata;
use self::state::{read_padded, Directory, State, MAX_DIRTY_BITMAPS};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::{CreateOptions, FormatDriver, LayerOpen};
use crate::layer::ImageFormat;
use crate::layer::{Access, Allocation, Layer, LayerInfo, WritePlan};
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
}

/// What a lookup could not answer without loading more metadata.
#[derive(Clone, Copy)]
enum Need {
    Table(u64),
    Bitmap(u64),
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
        };
        image.load_metadata()?;
        let layer_type = image.layer_info().layer_type;
        if let Some(storage) = access.writable_storage(&image.storage, layer_type) {
            // Writing needs the free chunks, found by scanning what the tables refer to.
            let st = image.state.get_mut().unwrap_or_else(|e| e.into_inner());
            match st.scan_used(&*storage) {
                Ok(used) => {
                    st.set_free_from_used(&used);
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

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::from_kind(ErrorKind::ReadOnly))
        }
    }

    /// Load whatever `need` names.
    fn load(&self, need: Need) -> Result<()> {
        let mut st = self.write_state();
        match need {
            Need::Table(t) => st.load_table(&*self.storage, t),
            Need::Bitmap(gc) => st.load_bitmap(&*self.storage, gc),
        }
    }

    /// Run `f` on the state, loading tables and bitmaps it asks for.
    fn with_loaded<T>(&self, mut f: impl FnMut(&State) -> Result<std::result::Result<T, Need>>) -> Result<T> {
        loop {
            let need = {
                let st = self.read_state();
                match f(&st)? {
                    Ok(v) => return Ok(v),
                    Err(need) => need,
                }
            };
            self.load(need)?;
        }
    }

    /// The logical (uncapped by the disk size) mapping at `offset`.
    fn lookup(st: &State, offset: u64, len: u64) -> Result<std::result::Result<(Mapping, u64), Need>> {
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
        let meta_chunk = self.read_state().header.metadata_chunk();
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
        self.write_state().metadata = Some(meta);
        Ok(())
    }

    /// The stable UUID from the metadata.
    pub fn stable_uuid(&self) -> Option<Uuid> {
        self.read_state()
            .metadata
            .as_ref()
            .and_then(|m| m.layer_info().ok())
            .and_then(|i| i.stable_uuid)
    }

    /// The maximum sector count from the header.
    pub fn max_sector_count(&self) -> u64 {
        self.read_state().header.max_sector_count()
    }

    /// The chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.geo.chunk_size
    }

    fn commit_if_large(&self, st: &mut State) -> Result<()> {
        if st.bitmaps.values().filter(|b| b.dirty).count() >= MAX_DIRTY_BITMAPS {
            st.commit(&*self.storage)?;
        }
        Ok(())
    }

    /// Zero whole or partial chunks of `[offset, offset + len)` (block-aligned).
    fn zero_locked(
        &self,
        st: &mut State,
        offset: u64,
        len: u64,
        unmap: bool,
        hide_below: bool,
    ) -> Result<()> {
        let k = self.geo.chunk_size;
        let b = self.geo.block_size;
        let storage = &*self.storage;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gc = pos / k;
            let within = pos % k;
            let n = (k - within).min(end - pos);
            let whole = within == 0 && n == k;
            let (t, c) = st.locate_chunk(gc);
            if st.dir[t as usize] == 0 && !hide_below {
                // No table: the whole table range is already absent, which reads as zeroes.
                pos += n;
                continue;
            }
            st.ensure_table(storage, t)?;
            let e = st.entry(t, c).unwrap_or(Entry(0));
            let host = e.chunk() * k + within;
            match (e.state(), whole) {
                (ChunkState::Zero, _) => {}
                (ChunkState::Unwritten, _) if !hide_below => {}
                (ChunkState::Unwritten, true) => st.set_entry(t, c, e.with(ChunkState::Zero, 0)),
                (ChunkState::Unwritten, false) => {
                    // Hide the parent for part of a chunk: a fresh (zero) chunk, those blocks present.
                    let chunk = st.alloc_chunk(storage)?;
                    st.reset_bitmap(storage, gc)?;
                    st.set_entry(t, c, e.with(ChunkState::Partial, chunk));
                    st.mark_present(gc, within / b, (within + n) / b);
                }
                (ChunkState::Full | ChunkState::Partial, true) if unmap => {
                    st.set_entry(t, c, e.with(ChunkState::Zero, 0));
                    st.bitmaps.remove(&gc);
                    st.free_chunk(storage, e.chunk())?;
                }
                (ChunkState::Full, _) => {
                    if unmap {
                        storage.punch_hole(host, n)?;
                    } else {
                        storage.write_zeroes(host, n)?;
                    }
                }
                (ChunkState::Partial, _) => {
                    if unmap {
                        storage.punch_hole(host, n)?;
                    } else {
                        storage.write_zeroes(host, n)?;
                    }
                    if hide_below || !unmap {
                        st.load_bitmap(storage, gc)?;
                        if st.mark_present(gc, within / b, (within + n) / b) {
                            st.set_entry(t, c, e.with(ChunkState::Full, e.chunk()));
                        }
                    }
                }
            }
            pos += n;
        }
        self.commit_if_large(st)
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
        let mut st = self.write_state();
        if self.modified.load(Ordering::Acquire) {
            return Ok(());
        }
        st.header.set_uuid(Uuid::new_v4());
        st.write_header(&*self.storage)?;
        self.modified.store(true, Ordering::Release);
        Ok(())
    }

    fn prepare_write(&self, offset: u64, len: u64) -> Result<WritePlan> {
        self.check_writable()?;
        let (m, n) = self.map(offset, len)?;
        Ok(match m {
            Mapping::Data { host_offset } => WritePlan::InPlace { host_offset, len: n },
            _ => WritePlan::Allocate { len: n },
        })
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<Allocation> {
        self.check_writable()?;
        let k = self.geo.chunk_size;
        let mut st = self.write_state();
        let storage = &*self.storage;
        let gc = offset / k;
        let within = offset % k;
        let len = len.min(k - within);
        let (t, c) = st.locate_chunk(gc);
        st.ensure_table(storage, t)?;
        let e = st.entry(t, c).unwrap_or(Entry(0));
        let chunk = match e.state() {
            ChunkState::Full | ChunkState::Partial => e.chunk(),
            ChunkState::Unwritten | ChunkState::Zero => match st.reserved.get(&gc) {
                Some(&chunk) => chunk,
                None => {
                    let chunk = st.alloc_chunk(storage)?;
                    st.reserved.insert(gc, chunk);
                    chunk
                }
            },
        };
        Ok(Allocation {
            host_offset: chunk * k + within,
            len,
        })
    }

    fn commit(&self, offset: u64, len: u64) -> Result<()> {
        let k = self.geo.chunk_size;
        let b = self.geo.block_size;
        let mut st = self.write_state();
        let storage = &*self.storage;
        let gc = offset / k;
        let within = offset % k;
        let (t, c) = st.locate_chunk(gc);
        st.ensure_table(storage, t)?;
        let e = st.entry(t, c).unwrap_or(Entry(0));
        let (b0, b1) = (within / b, (within + len) / b);
        match e.state() {
            ChunkState::Full => {}
            ChunkState::Zero => {
                // The fresh chunk reads as zeroes where it was not written: all of it is valid.
                let chunk = st
                    .reserved
                    .remove(&gc)
                    .ok_or_else(|| Error::corrupt("commit without allocation"))?;
                st.set_entry(t, c, e.with(ChunkState::Full, chunk));
            }
            ChunkState::Unwritten => {
                let chunk = st
                    .reserved
                    .remove(&gc)
                    .ok_or_else(|| Error::corrupt("commit without allocation"))?;
                if b0 == 0 && b1 == k / b {
                    st.set_entry(t, c, e.with(ChunkState::Full, chunk));
                } else {
                    st.reset_bitmap(storage, gc)?;
                    st.mark_present(gc, b0, b1);
                    st.set_entry(t, c, e.with(ChunkState::Partial, chunk));
                }
            }
            ChunkState::Partial => {
                st.load_bitmap(storage, gc)?;
                if st.mark_present(gc, b0, b1) {
                    st.set_entry(t, c, e.with(ChunkState::Full, e.chunk()));
                }
            }
        }
        self.commit_if_large(&mut st)
    }

    fn zero_granularity(&self, _hide_below: bool) -> u64 {
        self.geo.block_size
    }

    fn set_zero(&self, offset: u64, len: u64, unmap: bool, hide_below: bool) -> Result<()> {
        self.check_writable()?;
        let mut st = self.write_state();
        self.zero_locked(&mut st, offset, len, unmap, hide_below)
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.write_state().commit(&*self.storage)
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
        let mut st = self.write_state();
        let old = st.size();
        if new_size < old {
            // Drop everything past the new end: partial chunk zeroed, whole chunks unwritten.
            let k = self.geo.chunk_size;
            let boundary = new_size.next_multiple_of(k).min(old);
            if boundary > new_size {
                self.zero_locked(&mut st, new_size, boundary - new_size, true, false)?;
            }
            let mut pos = boundary;
            while pos < old {
                let gc = pos / k;
                let (t, c) = st.locate_chunk(gc);
                if st.dir[t as usize] == 0 {
                    pos = (t + 1) * self.geo.bytes_per_table;
                    continue;
                }
                st.load_table(&*self.storage, t)?;
                let e = st.entry(t, c).unwrap_or(Entry(0));
                if e.state() != ChunkState::Unwritten {
                    if matches!(e.state(), ChunkState::Full | ChunkState::Partial) {
                        st.free_chunk(&*self.storage, e.chunk())?;
                    }
                    st.bitmaps.remove(&gc);
                    st.set_entry(t, c, e.with(ChunkState::Unwritten, 0));
                }
                pos += k;
            }
            st.reserved.retain(|&gc, _| gc * k < new_size);
            st.commit(&*self.storage)?;
        }
        st.header.set_sector_count(new_size / b);
        st.write_header(&*self.storage)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn max_size(&self) -> u64 {
        let st = self.read_state();
        let meta = st.header.metadata_chunk();
        let max = st.geo.max_bytes;
        if meta == 0 {
            max
        } else {
            max.min(meta * st.geo.chunk_size)
        }
    }

    fn layer_info(&self) -> LayerInfo {
        let st = self.read_state();
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
        let mut st = self.write_state();
        let storage = &*self.storage;
        let meta_chunk = st.header.metadata_chunk();
        if meta_chunk == 0 {
            return Err(Error::unsupported("this ASIF image has no metadata block"));
        }
        let mut meta = st
            .metadata
            .clone()
            .unwrap_or_else(|| Metadata::new(Uuid::new_v4()));
        meta.set_layer_info(info);
        let block = meta.to_block(k as usize)?;
        // Copy-on-write: the new block goes to a fresh chunk, then the table points at it.
        let chunk = st.alloc_chunk(storage)?;
        storage.write_at(&block, chunk * k)?;
        let (t, c) = st.geo.locate(meta_chunk * k);
        st.ensure_table(storage, t)?;
        let e = st.entry(t, c).unwrap_or(Entry(0));
        if matches!(e.state(), ChunkState::Full | ChunkState::Partial) {
            st.free_chunk(storage, e.chunk())?;
        }
        st.bitmaps.remove(&(meta_chunk));
        st.set_entry(t, c, e.with(ChunkState::Full, chunk));
        st.metadata = Some(meta);
        st.commit(storage)
    }
}
