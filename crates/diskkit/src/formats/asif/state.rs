//! In-memory ASIF metadata and the crash-safe commit.
//!
//! The directory, the tables that have been touched and the bitmap slices of partially written
//! chunks live in memory; writes change them there, and [`State::commit`] makes them durable:
//!
//! 1. sync the file, so every data write (and hole punch) the new metadata refers to is durable;
//! 2. write dirty bitmap slices in place (their changes are safe in either order once the data is
//!    durable) and dirty tables copy-on-write (a table the on-disk directory refers to is never
//!    overwritten; it is written to a new chunk);
//! 3. write the new directory's entries over the *inactive* directory, sync;
//! 4. write the inactive directory's sequence number (active + 1) and sync: the new directory is
//!    now the active one.
//!
//! A crash before step 4 completes leaves the previous directory active, and everything it refers
//! to untouched. Chunks freed during an epoch are reused only after the commit that stops
//! referring to them.

use std::collections::{HashMap, HashSet};

use super::entry::{ChunkState, Entry, CHUNK_MASK};
use super::geometry::Geometry;
use super::header::Header;
use super::metadata::Metadata;
use crate::error::{Error, Result};
use crate::storage::Storage;

/// Clean bitmap slices kept in memory at most (each is `K / (4B)` bytes).
const MAX_CLEAN_BITMAPS: usize = 1 << 16;
/// Dirty bitmap slices that trigger a commit on their own.
pub(super) const MAX_DIRTY_BITMAPS: usize = 1 << 16;

/// One directory as stored on disk.
#[derive(Debug, Clone)]
pub(super) struct Directory {
    pub(super) seq: u64,
    pub(super) entries: Vec<u64>,
}

/// A loaded table.
#[derive(Debug)]
pub(super) struct Table {
    pub(super) entries: Vec<u64>,
    /// Chunk the table is stored in.
    pub(super) host: u64,
    pub(super) dirty: bool,
}

/// The bitmap of one chunk (2 bits per block).
#[derive(Debug)]
pub(super) struct ChunkBitmap {
    pub(super) bits: Vec<u8>,
    pub(super) dirty: bool,
}

/// Present/not-present value of a block's bit pair.
const PRESENT: u8 = 0b01;

/// Mutable metadata of an open image.
#[derive(Debug)]
pub(super) struct State {
    pub(super) header: Header,
    pub(super) geo: Geometry,
    /// Both on-disk directories as last written.
    pub(super) disk_dirs: [Directory; 2],
    /// Index of the active on-disk directory.
    pub(super) active: usize,
    /// The current directory, possibly ahead of disk.
    pub(super) dir: Vec<u64>,
    pub(super) tables: HashMap<u64, Table>,
    /// Bitmap slices by global chunk index (guest offset / chunk size).
    pub(super) bitmaps: HashMap<u64, ChunkBitmap>,
    /// Chunks allocated for writes that have not been committed yet, by global chunk index.
    pub(super) reserved: HashMap<u64, u64>,
    /// The file's length, always a multiple of the chunk size once written to.
    pub(super) file_len: u64,
    /// First chunk past chunk 0's header and directories.
    pub(super) first_chunk: u64,
    /// Ranges `[start, end)` of free chunks that may be reused now.
    pub(super) free: Vec<(u64, u64)>,
    /// Chunks freed since the last commit.
    pub(super) pending_free: Vec<u64>,
    /// Chunks allocated since the last commit (no on-disk structure refers to them yet).
    pub(super) fresh: HashSet<u64>,
    pub(super) metadata: Option<Metadata>,
    /// Set when something needs a commit.
    pub(super) dirty: bool,
}

impl State {
    /// One past the last chunk a valid entry may name.
    pub(super) fn chunk_limit(&self) -> u64 {
        self.file_len.div_ceil(self.geo.chunk_size)
    }

    pub(super) fn size(&self) -> u64 {
        self.header.sector_count() * self.geo.block_size
    }

    /// Read and validate table `t` (whose directory entry is non-zero).
    pub(super) fn load_table(&mut self, storage: &dyn Storage, t: u64) -> Result<()> {
        if self.tables.contains_key(&t) {
            return Ok(());
        }
        let host = self.dir[t as usize];
        if host < self.first_chunk || host >= self.chunk_limit() {
            return Err(Error::corrupt(format!(
                "directory entry {t} names table chunk {host}, outside the file's chunks [{}, {})",
                self.first_chunk,
                self.chunk_limit()
            )));
        }
        let mut bytes = vec![0u8; self.geo.table_bytes()];
        let at = host * self.geo.chunk_size;
        read_padded(storage, &mut bytes, at, self.file_len)?;
        let entries: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
            .collect();
        let n = self.geo.chunks_per_group;
        let limit = self.chunk_limit();
        for (i, &raw) in entries.iter().enumerate() {
            let is_bitmap = (i as u64 + 1) % (n + 1) == 0;
            let e = Entry(raw);
            let check = if is_bitmap {
                let c = e.chunk();
                if c != 0 && (c < self.first_chunk || c >= limit) {
                    Err(Error::corrupt(format!(
                        "bitmap entry names chunk {c}, outside the file"
                    )))
                } else {
                    Ok(())
                }
            } else {
                e.validate(self.first_chunk, limit)
            };
            check.map_err(|err| {
                err.with_offset(at + 8 * i as u64)
                    .with_operation("loading a table")
            })?;
        }
        self.tables.insert(
            t,
            Table {
                entries,
                host,
                dirty: false,
            },
        );
        Ok(())
    }

    /// Read the bitmap slice of global chunk `gc` (which is in state Partial).
    pub(super) fn load_bitmap(&mut self, storage: &dyn Storage, gc: u64) -> Result<()> {
        if self.bitmaps.contains_key(&gc) {
            return Ok(());
        }
        let (t, c) = self.locate_chunk(gc);
        let table = self
            .tables
            .get(&t)
            .ok_or_else(|| Error::corrupt("bitmap requested for an unloaded table"))?;
        let bc = table.entries[self.geo.bitmap_entry_index(c)] & CHUNK_MASK;
        if bc == 0 {
            return Err(Error::corrupt(format!(
                "chunk at guest offset {} is partially written but its group has no bitmap",
                gc * self.geo.chunk_size
            )));
        }
        let mut bits = vec![0u8; self.geo.bitmap_bytes_per_chunk() as usize];
        read_padded(
            storage,
            &mut bits,
            bc * self.geo.chunk_size + self.geo.bitmap_slice_offset(c),
            self.file_len,
        )?;
        if self.bitmaps.len() >= MAX_CLEAN_BITMAPS {
            self.bitmaps.retain(|_, b| b.dirty);
        }
        self.bitmaps.insert(gc, ChunkBitmap { bits, dirty: false });
        Ok(())
    }

    /// Table index and chunk-in-table of global chunk `gc`.
    pub(super) fn locate_chunk(&self, gc: u64) -> (u64, u64) {
        let per = self.geo.chunks_per_table();
        (gc / per, gc % per)
    }

    pub(super) fn entry(&self, t: u64, c: u64) -> Option<Entry> {
        self.tables
            .get(&t)
            .map(|tab| Entry(tab.entries[self.geo.data_entry_index(c)]))
    }

    pub(super) fn set_entry(&mut self, t: u64, c: u64, e: Entry) {
        let idx = self.geo.data_entry_index(c);
        if let Some(tab) = self.tables.get_mut(&t) {
            tab.entries[idx] = e.0;
            tab.dirty = true;
            self.dirty = true;
        }
    }

    /// Make sure table `t` exists (creating an empty one) and is loaded.
    pub(super) fn ensure_table(&mut self, storage: &dyn Storage, t: u64) -> Result<()> {
        if self.dir[t as usize] != 0 {
            return self.load_table(storage, t);
        }
        let host = self.alloc_chunk(storage)?;
        self.dir[t as usize] = host;
        self.tables.insert(
            t,
            Table {
                entries: vec![0; self.geo.table_entries()],
                host,
                dirty: true,
            },
        );
        self.dirty = true;
        Ok(())
    }

    /// A chunk that reads as zeroes and that nothing on disk refers to.
    pub(super) fn alloc_chunk(&mut self, storage: &dyn Storage) -> Result<u64> {
        let k = self.geo.chunk_size;
        let chunk = if let Some(range) = self.free.last_mut() {
            let c = range.0;
            range.0 += 1;
            if range.0 == range.1 {
                self.free.pop();
            }
            storage.punch_hole(c * k, k)?;
            c
        } else {
            let c = self.chunk_limit();
            if c > CHUNK_MASK {
                return Err(Error::new(crate::ErrorKind::OutOfBounds, "no chunk numbers left"));
            }
            let new_len = (c + 1)
                .checked_mul(k)
                .ok_or_else(|| Error::new(crate::ErrorKind::OutOfBounds, "file size overflows"))?;
            storage.set_len(new_len)?;
            self.file_len = new_len;
            c
        };
        self.fresh.insert(chunk);
        Ok(chunk)
    }

    /// Release a chunk that the current metadata no longer refers to.
    pub(super) fn free_chunk(&mut self, storage: &dyn Storage, chunk: u64) -> Result<()> {
        // The chunk's content must stay until the commit that stops referring to it is on
        // disk: the active directory may still point at it (a metadata block, say), and a
        // crash before the commit would otherwise leave it pointing at a hole. It is punched
        // after that commit, and again when it is reused.
        let _ = storage;
        self.pending_free.push(chunk);
        Ok(())
    }

    /// Whether block `b` of global chunk `gc` is present (bitmap loaded).
    pub(super) fn block_present(&self, gc: u64, b: u64) -> Result<bool> {
        let bm = &self.bitmaps[&gc];
        match (bm.bits[(b / 4) as usize] >> ((b % 4) * 2)) & 0b11 {
            0b00 => Ok(false),
            0b01 => Ok(true),
            other => Err(Error::corrupt(format!(
                "unknown block state {other:#04b} in a chunk bitmap"
            ))),
        }
    }

    /// Mark blocks `[b0, b1)` of global chunk `gc` present. Returns whether the whole chunk is.
    pub(super) fn mark_present(&mut self, gc: u64, b0: u64, b1: u64) -> bool {
        let Some(bm) = self.bitmaps.get_mut(&gc) else {
            return false;
        };
        for b in b0..b1 {
            let byte = &mut bm.bits[(b / 4) as usize];
            let shift = (b % 4) * 2;
            *byte = (*byte & !(0b11 << shift)) | (PRESENT << shift);
        }
        bm.dirty = true;
        self.dirty = true;
        bm.bits.iter().all(|&x| x == 0x55)
    }

    /// Start a fresh, all-absent bitmap for global chunk `gc`, giving its group a bitmap chunk
    /// if it has none.
    pub(super) fn reset_bitmap(&mut self, storage: &dyn Storage, gc: u64) -> Result<()> {
        let (t, c) = self.locate_chunk(gc);
        let idx = self.geo.bitmap_entry_index(c);
        let has = self
            .tables
            .get(&t)
            .is_some_and(|tab| tab.entries[idx] & CHUNK_MASK != 0);
        if !has {
            let bc = self.alloc_chunk(storage)?;
            if let Some(tab) = self.tables.get_mut(&t) {
                tab.entries[idx] = (tab.entries[idx] & !CHUNK_MASK) | bc;
                tab.dirty = true;
            }
        }
        self.bitmaps.insert(
            gc,
            ChunkBitmap {
                bits: vec![0; self.geo.bitmap_bytes_per_chunk() as usize],
                dirty: true,
            },
        );
        self.dirty = true;
        Ok(())
    }

    /// Make all metadata changes durable (see the module documentation).
    pub(super) fn commit(&mut self, storage: &dyn Storage) -> Result<()> {
        storage.sync()?;
        if !self.dirty {
            return Ok(());
        }
        let k = self.geo.chunk_size;
        // Bitmap slices, in place.
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        for (&gc, bm) in self.bitmaps.iter_mut().filter(|(_, b)| b.dirty) {
            let per = self.geo.chunks_per_table();
            let (t, c) = (gc / per, gc % per);
            let Some(tab) = self.tables.get(&t) else { continue };
            let bc = tab.entries[self.geo.bitmap_entry_index(c)] & CHUNK_MASK;
            if bc == 0 {
                continue;
            }
            writes.push((bc * k + self.geo.bitmap_slice_offset(c), bm.bits.clone()));
            bm.dirty = false;
        }
        // Tables, copy-on-write.
        let dirty_tables: Vec<u64> = self
            .tables
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&t, _)| t)
            .collect();
        for t in dirty_tables {
            let host = self.tables[&t].host;
            let host = if self.fresh.contains(&host) {
                host
            } else {
                let new = self.alloc_chunk(storage)?;
                self.pending_free.push(host);
                new
            };
            let tab = self.tables.get_mut(&t).expect("table listed as dirty exists");
            tab.host = host;
            tab.dirty = false;
            self.dir[t as usize] = host;
            let mut bytes = Vec::with_capacity(tab.entries.len() * 8);
            for e in &tab.entries {
                bytes.extend_from_slice(&e.to_be_bytes());
            }
            writes.push((host * k, bytes));
        }
        for (at, bytes) in &writes {
            storage.write_at(bytes, *at)?;
        }
        // The new directory over the inactive one: entries first, then the sequence number.
        let slot = 1 - self.active;
        let dir_offset = self.header.directory_offsets()[slot];
        let old = &self.disk_dirs[slot].entries;
        let mut i = 0;
        while i < self.dir.len() {
            if self.dir[i] == old[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < self.dir.len() && self.dir[i] != old[i] {
                i += 1;
            }
            let mut bytes = Vec::with_capacity((i - start) * 8);
            for e in &self.dir[start..i] {
                bytes.extend_from_slice(&e.to_be_bytes());
            }
            storage.write_at(&bytes, dir_offset + 8 + 8 * start as u64)?;
        }
        storage.sync()?;
        let seq = self.disk_dirs[self.active].seq.wrapping_add(1);
        storage.write_at(&seq.to_be_bytes(), dir_offset)?;
        storage.sync()?;
        self.disk_dirs[slot] = Directory {
            seq,
            entries: self.dir.clone(),
        };
        self.active = slot;
        let k = self.geo.chunk_size;
        for c in self.pending_free.drain(..) {
            // Releasing the space is best effort: a chunk that could not be punched is
            // punched again when it is reused.
            let _ = storage.punch_hole(c * k, k);
            self.free.push((c, c + 1));
        }
        self.fresh.clear();
        self.dirty = false;
        Ok(())
    }

    /// Write the header (offset 0) and sync.
    pub(super) fn write_header(&self, storage: &dyn Storage) -> Result<()> {
        storage.write_at(&self.header.bytes, 0)?;
        storage.sync()
    }

    /// Every chunk the current metadata refers to, checking that none is used twice. Loads
    /// every table.
    pub(super) fn scan_used(&mut self, storage: &dyn Storage) -> Result<Vec<u64>> {
        let mut used = Vec::new();
        for t in 0..self.dir.len() as u64 {
            if self.dir[t as usize] == 0 {
                continue;
            }
            self.load_table(storage, t)?;
            let tab = &self.tables[&t];
            used.push(tab.host);
            let n = self.geo.chunks_per_group;
            for (i, &raw) in tab.entries.iter().enumerate() {
                let is_bitmap = (i as u64 + 1) % (n + 1) == 0;
                let c = raw & CHUNK_MASK;
                if c == 0 {
                    continue;
                }
                if is_bitmap || matches!(Entry(raw).state(), ChunkState::Full | ChunkState::Partial) {
                    used.push(c);
                }
            }
        }
        used.sort_unstable();
        if let Some(w) = used.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::corrupt(format!("chunk {} is referenced twice", w[0])));
        }
        Ok(used)
    }

    /// Build the free list from the chunks in use.
    pub(super) fn set_free_from_used(&mut self, used: &[u64]) {
        let mut free = Vec::new();
        let mut next = self.first_chunk;
        for &c in used {
            if c > next {
                free.push((next, c));
            }
            next = next.max(c + 1);
        }
        let limit = self.chunk_limit();
        if limit > next {
            free.push((next, limit));
        }
        // Allocation takes from the end of the list: reuse the lowest chunks first.
        free.reverse();
        self.free = free;
    }
}

/// Read `buf` at `at`, treating bytes past `file_len` as zeroes.
pub(super) fn read_padded(storage: &dyn Storage, buf: &mut [u8], at: u64, file_len: u64) -> Result<()> {
    let avail = file_len.saturating_sub(at).min(buf.len() as u64) as usize;
    storage.read_at(&mut buf[..avail], at)?;
    buf[avail..].fill(0);
    Ok(())
}
