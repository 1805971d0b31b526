//! In-memory ASIF metadata and the crash-safe commit.
//!
//! The directory, the tables that have been touched and the bitmap slices of partially written
//! chunks live in memory; writes change them there, and a commit makes them durable. Nothing
//! here does I/O while the state is locked: [`State::prepare_commit`] takes a snapshot of what
//! changed (under the lock, in memory), [`CommitPlan::write`] writes it (without the lock, while
//! readers and writers go on), and [`State::finish_commit`] records the outcome:
//!
//! 1. sync the file, so every data write (and hole punch) the snapshot's metadata refers to is
//!    durable (data is written before the mapping that refers to it is recorded, and the
//!    snapshot is taken before this sync);
//! 2. write dirty bitmap slices in place (their changes are safe in either order once the data is
//!    durable) and dirty tables copy-on-write (a table the on-disk directory refers to is never
//!    overwritten; it is written to a new chunk);
//! 3. write the new directory's entries over the *inactive* directory, sync;
//! 4. write the inactive directory's sequence number (active + 1) and sync: the new directory is
//!    now the active one.
//!
//! A crash before step 4 completes leaves the previous directory active, and everything it refers
//! to untouched. Chunks freed during an epoch are reused only after the commit that stops
//! referring to them has completed, and only once they have been punched out (so a reused chunk
//! reads as zeroes where it is not written). A failed commit puts everything it took back, so the
//! next one writes it again.

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
    /// Being written by a commit: not evicted until the commit has finished.
    pub(super) in_flight: bool,
}

/// Metadata a lookup or change needs that is not in memory yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    /// Table `t`.
    Table(u64),
    /// The bitmap slice of global chunk `gc`.
    Bitmap(u64),
}

/// An answer, or the metadata to load before asking again.
pub(super) type Step<T> = std::result::Result<T, Need>;

/// A chunk reserved for writes that have not been committed yet.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reserved {
    pub(super) chunk: u64,
    /// Writes holding the reservation.
    pub(super) holders: u32,
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
    pub(super) reserved: HashMap<u64, Reserved>,
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
    /// Changes whenever metadata held in memory is dropped (a bitmap slice evicted or
    /// discarded): a load that read from disk before such a change must not be used.
    pub(super) generation: u64,
}

impl State {
    /// One past the last chunk a valid entry may name.
    pub(super) fn chunk_limit(&self) -> u64 {
        self.file_len.div_ceil(self.geo.chunk_size)
    }

    pub(super) fn size(&self) -> u64 {
        self.header.sector_count() * self.geo.block_size
    }

    /// Read and validate table `t` (whose directory entry is non-zero), under the lock: only
    /// while the image is being opened, before it is shared.
    pub(super) fn load_table(&mut self, storage: &dyn Storage, t: u64) -> Result<()> {
        if self.tables.contains_key(&t) {
            return Ok(());
        }
        let (at, len) = self.table_location(t)?;
        let mut bytes = vec![0u8; len];
        read_padded(storage, &mut bytes, at, self.file_len)?;
        self.insert_table(t, at, &bytes)
    }

    /// Where table `t` is stored (byte offset and length).
    pub(super) fn table_location(&self, t: u64) -> Result<(u64, usize)> {
        let host = self.dir[t as usize];
        if host < self.first_chunk || host >= self.chunk_limit() {
            return Err(Error::corrupt(format!(
                "directory entry {t} names table chunk {host}, outside the file's chunks [{}, {})",
                self.first_chunk,
                self.chunk_limit()
            )));
        }
        Ok((host * self.geo.chunk_size, self.geo.table_bytes()))
    }

    /// Keep table `t`, read from `at`, unless it is in memory already or has moved since.
    pub(super) fn insert_table(&mut self, t: u64, at: u64, bytes: &[u8]) -> Result<()> {
        let host = self.dir[t as usize];
        if self.tables.contains_key(&t) || host * self.geo.chunk_size != at {
            return Ok(());
        }
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

    /// Where the bitmap slice of global chunk `gc` (in state Partial, its table in memory)
    /// is stored (byte offset and length).
    pub(super) fn bitmap_location(&self, gc: u64) -> Result<(u64, usize)> {
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
        Ok((
            bc * self.geo.chunk_size + self.geo.bitmap_slice_offset(c),
            self.geo.bitmap_bytes_per_chunk() as usize,
        ))
    }

    /// Keep the bitmap slice of `gc`, read from disk, unless one is in memory already.
    pub(super) fn insert_bitmap(&mut self, gc: u64, bits: Vec<u8>) {
        if self.bitmaps.contains_key(&gc) {
            return;
        }
        if self.bitmaps.len() >= MAX_CLEAN_BITMAPS {
            self.bitmaps.retain(|_, b| b.dirty || b.in_flight);
            self.generation += 1;
        }
        self.bitmaps.insert(
            gc,
            ChunkBitmap {
                bits,
                dirty: false,
                in_flight: false,
            },
        );
    }

    /// Drop the bitmap slice of `gc` (its chunk is no longer partially written).
    pub(super) fn drop_bitmap(&mut self, gc: u64) {
        if self.bitmaps.remove(&gc).is_some() {
            self.generation += 1;
        }
    }

    /// The table a change at `gc` needs in memory first, if it is not.
    pub(super) fn need_table(&self, gc: u64) -> Option<Need> {
        let (t, _) = self.locate_chunk(gc);
        (self.dir[t as usize] != 0 && !self.tables.contains_key(&t)).then_some(Need::Table(t))
    }

    /// The table, and for a partially written chunk the bitmap, that a change at `gc` needs.
    pub(super) fn need_for(&self, gc: u64) -> Option<Need> {
        if let Some(n) = self.need_table(gc) {
            return Some(n);
        }
        let (t, c) = self.locate_chunk(gc);
        match self.entry(t, c) {
            Some(e) if e.state() == ChunkState::Partial && !self.bitmaps.contains_key(&gc) => {
                Some(Need::Bitmap(gc))
            }
            _ => None,
        }
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

    /// Make sure table `t` exists, creating an empty one. A table that exists must be in
    /// memory already ([`State::need_table`]).
    pub(super) fn ensure_table(&mut self, t: u64) -> Result<()> {
        if self.dir[t as usize] != 0 {
            return if self.tables.contains_key(&t) {
                Ok(())
            } else {
                Err(Error::corrupt("an ASIF table was used before it was loaded"))
            };
        }
        let host = self.alloc_chunk()?;
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

    /// A chunk that reads as zeroes and that nothing on disk refers to: a free one (punched
    /// out when it was freed) or one past the end of the file (which the caller grows before
    /// writing into it).
    pub(super) fn alloc_chunk(&mut self) -> Result<u64> {
        let k = self.geo.chunk_size;
        let chunk = if let Some(range) = self.free.last_mut() {
            let c = range.0;
            range.0 += 1;
            if range.0 == range.1 {
                self.free.pop();
            }
            c
        } else {
            let c = self.chunk_limit();
            if c > CHUNK_MASK {
                return Err(Error::new(crate::ErrorKind::OutOfBounds, "no chunk numbers left"));
            }
            let new_len = (c + 1)
                .checked_mul(k)
                .ok_or_else(|| Error::new(crate::ErrorKind::OutOfBounds, "file size overflows"))?;
            self.file_len = new_len;
            c
        };
        self.fresh.insert(chunk);
        Ok(chunk)
    }

    /// Release a chunk that the current metadata no longer refers to.
    pub(super) fn free_chunk(&mut self, chunk: u64) {
        // The chunk's content must stay until the commit that stops referring to it is on
        // disk: the active directory may still point at it (a metadata block, say), and a
        // crash before the commit would otherwise leave it pointing at a hole. It is punched
        // after that commit, and reused only once punched.
        self.pending_free.push(chunk);
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
    pub(super) fn reset_bitmap(&mut self, gc: u64) -> Result<()> {
        let (t, c) = self.locate_chunk(gc);
        let idx = self.geo.bitmap_entry_index(c);
        let has = self
            .tables
            .get(&t)
            .is_some_and(|tab| tab.entries[idx] & CHUNK_MASK != 0);
        if !has {
            let bc = self.alloc_chunk()?;
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
                in_flight: false,
            },
        );
        self.dirty = true;
        Ok(())
    }

    /// Whether so many bitmap slices are waiting to be written that a commit should run.
    pub(super) fn wants_commit(&self) -> bool {
        self.bitmaps.len() >= MAX_DIRTY_BITMAPS
            && self.bitmaps.values().filter(|b| b.dirty).count() >= MAX_DIRTY_BITMAPS
    }

    /// Take what a commit must write (see the module documentation), or `None` when nothing
    /// changed. The state is changed as if the commit had succeeded; [`State::finish_commit`]
    /// undoes that if it fails.
    pub(super) fn prepare_commit(&mut self) -> Result<Option<CommitPlan>> {
        if !self.dirty {
            return Ok(None);
        }
        let k = self.geo.chunk_size;
        let per = self.geo.chunks_per_table();
        let mut plan = CommitPlan::default();
        // Bitmap slices, in place.
        for (&gc, bm) in self.bitmaps.iter_mut().filter(|(_, b)| b.dirty) {
            let (t, c) = (gc / per, gc % per);
            let Some(tab) = self.tables.get(&t) else { continue };
            let bc = tab.entries[self.geo.bitmap_entry_index(c)] & CHUNK_MASK;
            if bc == 0 {
                continue;
            }
            plan.writes
                .push((bc * k + self.geo.bitmap_slice_offset(c), bm.bits.clone()));
            bm.dirty = false;
            bm.in_flight = true;
            plan.bitmaps.push(gc);
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
                let new = self.alloc_chunk()?;
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
            plan.writes.push((host * k, bytes));
            plan.tables.push(t);
        }
        // The new directory over the inactive one: changed entries first, then (after a sync)
        // the sequence number.
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
            plan.directory.push((dir_offset + 8 + 8 * start as u64, bytes));
        }
        plan.slot = slot;
        plan.seq_at = dir_offset;
        plan.seq = self.disk_dirs[self.active].seq.wrapping_add(1);
        plan.dir = self.dir.clone();
        plan.freed = std::mem::take(&mut self.pending_free);
        plan.fresh = std::mem::take(&mut self.fresh);
        plan.file_len = self.file_len;
        plan.chunk_size = k;
        self.dirty = false;
        Ok(Some(plan))
    }

    /// Record the outcome of writing `plan`: on success the new directory is the active one and
    /// the freed chunks that were punched out can be reused; on failure everything the plan
    /// took is put back, to be written by the next commit.
    pub(super) fn finish_commit(&mut self, plan: CommitPlan, written: &Result<Vec<u64>>) {
        for gc in &plan.bitmaps {
            if let Some(bm) = self.bitmaps.get_mut(gc) {
                bm.in_flight = false;
                if written.is_err() {
                    bm.dirty = true;
                }
            }
        }
        match written {
            Ok(punched) => {
                self.disk_dirs[plan.slot] = Directory {
                    seq: plan.seq,
                    entries: plan.dir,
                };
                self.active = plan.slot;
                for &c in punched {
                    self.free.push((c, c + 1));
                }
                // Freed chunks that could not be punched out are not reused (they would not
                // read as zeroes); they are found free again when the image is next opened.
            }
            Err(_) => {
                for t in &plan.tables {
                    if let Some(tab) = self.tables.get_mut(t) {
                        tab.dirty = true;
                    }
                }
                self.pending_free.extend(plan.freed);
                self.fresh.extend(plan.fresh);
                // The inactive directory may be half written: write all of it next time.
                self.disk_dirs[plan.slot].entries.fill(u64::MAX);
                self.dirty = true;
            }
        }
    }

    /// Every chunk the current metadata refers to, checking that none is used twice. Loads
    /// every table (only while the image is being opened).
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

    /// Build the free list from the chunks in use. The free chunks' contents are unknown: the
    /// caller punches them out before any is used.
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

/// What one commit writes, taken by [`State::prepare_commit`].
#[derive(Debug, Default)]
pub(super) struct CommitPlan {
    /// Bitmap slices and tables: (byte offset, bytes).
    writes: Vec<(u64, Vec<u8>)>,
    /// Changed entries of the inactive directory: (byte offset, bytes).
    directory: Vec<(u64, Vec<u8>)>,
    seq_at: u64,
    seq: u64,
    slot: usize,
    dir: Vec<u64>,
    /// Chunks to punch out and reuse once the new directory is active.
    freed: Vec<u64>,
    /// Chunks no on-disk structure referred to before this commit.
    fresh: HashSet<u64>,
    bitmaps: Vec<u64>,
    tables: Vec<u64>,
    /// The file length every written chunk lies within.
    pub(super) file_len: u64,
    chunk_size: u64,
}

impl CommitPlan {
    /// Steps 1 to 4 of the module documentation, then punch out the freed chunks. The caller
    /// has grown the file to `file_len`. Returns the chunks punched out.
    pub(super) fn write(&self, storage: &dyn Storage) -> Result<Vec<u64>> {
        storage.sync()?;
        for (at, bytes) in self.writes.iter().chain(&self.directory) {
            storage.write_at(bytes, *at)?;
        }
        storage.sync()?;
        storage.write_at(&self.seq.to_be_bytes(), self.seq_at)?;
        storage.sync()?;
        let k = self.chunk_size;
        Ok(self
            .freed
            .iter()
            .copied()
            .filter(|&c| storage.punch_hole(c * k, k).is_ok())
            .collect())
    }
}

/// Read `buf` at `at`, treating bytes past `file_len` as zeroes.
pub(super) fn read_padded(storage: &dyn Storage, buf: &mut [u8], at: u64, file_len: u64) -> Result<()> {
    let avail = file_len.saturating_sub(at).min(buf.len() as u64) as usize;
    storage.read_at(&mut buf[..avail], at)?;
    buf[avail..].fill(0);
    Ok(())
}
