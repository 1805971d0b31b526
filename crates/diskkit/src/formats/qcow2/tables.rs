//! The L1 table, cached L2 tables, and how changes reach the disk.
//!
//! # Crash consistency
//!
//! Tables change only in memory until a flush, which writes in dependency order with a sync
//! between steps:
//!
//! 1. grow the file to cover every allocated cluster, write changed refcount blocks (they only
//!    hold increments at this point), sync (this also makes the data written so far durable);
//! 2. write the refcount table if it changed, sync; if it moved, point the header at it, sync;
//! 3. write changed L2 tables, sync;
//! 4. write the L1 table if it changed, sync; if it moved or the size changed, update the
//!    header, sync;
//! 5. apply the deferred refcount decrements of clusters no longer referenced, sync; only
//!    then are those clusters reused.
//!
//! A crash at any point leaves tables that only refer to clusters with durable refcounts and
//! durable contents; the worst case is a leaked cluster (`qemu-img check` reports leaks, not
//! errors). Clusters are never reused before the tables that dropped them are durable.
//!
//! No I/O happens under the state lock: [`State::prepare_flush`] takes a consistent snapshot of
//! every changed table and refcount block (in memory), the caller writes it in the order above
//! without the lock while other threads read and write, and [`State::finish_flush`] records the
//! outcome. The snapshot is consistent because every mapping in it was recorded after its data
//! was written and after its cluster's refcount was raised, and the first sync comes after the
//! snapshot. Tables being written cannot be evicted from memory, and a failed flush marks
//! everything it took dirty again. L2 tables are read from disk without the lock too
//! ([`State::l2_location`], [`State::insert_l2`]).

use std::collections::HashMap;

use super::entry::{Geometry, L2Entry, COPIED};
use super::header::{OFF_REFTABLE, OFF_SIZE};
use super::refcount::Refcounts;
use crate::error::{Error, Result};
use crate::storage::Storage;

/// Keep at most this many clean L2 tables cached.
const MAX_CLEAN_L2: usize = 4096;

/// One L2 table in memory.
#[derive(Debug)]
struct L2Table {
    entries: Vec<u64>,
    dirty: bool,
    /// Being written by a flush: not evicted until it has finished.
    in_flight: bool,
}

/// A cluster handed out by `allocate`, waiting for its `commit`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reservation {
    pub(super) host_cluster: u64,
    /// The guest cluster's own preallocated (zero) cluster, already counted.
    pub(super) reuse: bool,
}

/// Mutable image state.
#[derive(Debug)]
pub(super) struct State {
    pub(super) geo: Geometry,
    pub(super) size: u64,
    l1: Vec<u64>,
    l1_offset: u64,
    l1_dirty: bool,
    /// Size, L1 size or L1 offset changed: rewrite those header fields.
    header_dirty: bool,
    l2: HashMap<u64, L2Table>,
    /// Present when the image is writable.
    pub(super) refs: Option<Refcounts>,
    pub(super) reserved: HashMap<u64, Reservation>,
    /// Something changed since the last flush took its snapshot.
    dirty: bool,
    /// Changes whenever an L2 table is dropped from memory: a table read from disk before
    /// such a change must not be used.
    generation: u64,
}

impl State {
    pub(super) fn new(
        geo: Geometry,
        size: u64,
        l1: Vec<u64>,
        l1_offset: u64,
        refs: Option<Refcounts>,
    ) -> State {
        State {
            geo,
            size,
            l1,
            l1_offset,
            l1_dirty: false,
            header_dirty: false,
            l2: HashMap::new(),
            refs,
            reserved: HashMap::new(),
            dirty: false,
            generation: 0,
        }
    }

    /// The refcounts, to change them.
    pub(super) fn refs(&mut self) -> Result<&mut Refcounts> {
        self.dirty = true;
        self.refs
            .as_mut()
            .ok_or_else(|| Error::from_kind(crate::error::ErrorKind::ReadOnly))
    }

    fn l1_index(&self, gc: u64) -> u64 {
        gc / self.geo.l2_entries()
    }

    /// The entry for guest cluster `gc` if its L2 table is in memory (or none is needed);
    /// `None` when the table must be loaded first.
    pub(super) fn cached_entry(&self, gc: u64) -> Option<Result<L2Entry>> {
        let i = self.l1_index(gc);
        let Some(&raw_l1) = self.l1.get(i as usize) else {
            return Some(Ok(L2Entry::Unallocated));
        };
        if raw_l1 == 0 {
            return Some(Ok(L2Entry::Unallocated));
        }
        let t = self.l2.get(&i)?;
        let raw = t.entries[(gc % self.geo.l2_entries()) as usize];
        Some(self.geo.decode(raw, gc))
    }

    /// Whether the whole L2 range containing `gc` is unallocated (no table).
    pub(super) fn table_absent(&self, gc: u64) -> bool {
        self.l1.get(self.l1_index(gc) as usize).is_none_or(|&e| e == 0)
    }

    /// The L1 index and host offset of the L2 table holding guest cluster `gc`, when it has
    /// one that is not in memory.
    pub(super) fn l2_location(&self, gc: u64) -> Result<Option<(u64, u64)>> {
        let i = self.l1_index(gc);
        let Some(&raw_l1) = self.l1.get(i as usize) else {
            return Ok(None);
        };
        if raw_l1 == 0 || self.l2.contains_key(&i) {
            return Ok(None);
        }
        Ok(Some((i, self.geo.l2_offset(raw_l1, i)?)))
    }

    /// The L2 table a change at guest cluster `gc` needs in memory first, if it is not.
    pub(super) fn need(&self, gc: u64) -> Option<u64> {
        let i = self.l1_index(gc);
        match self.l1.get(i as usize) {
            Some(&raw) if raw != 0 && !self.l2.contains_key(&i) => Some(gc),
            _ => None,
        }
    }

    /// The first guest cluster in `[first, end)` whose L2 table must be loaded first.
    pub(super) fn need_range(&self, first: u64, end: u64) -> Option<u64> {
        let n = self.geo.l2_entries();
        let mut gc = first;
        while gc < end {
            if let Some(g) = self.need(gc) {
                return Some(g);
            }
            gc = (gc / n + 1) * n;
        }
        None
    }

    /// The generation (see the field) a load must still see when it inserts what it read.
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// Keep the L2 table `i`, read from `offset`, unless it is in memory already or the L1
    /// table no longer points there.
    pub(super) fn insert_l2(&mut self, i: u64, offset: u64, bytes: &[u8]) -> Result<()> {
        let Some(&raw_l1) = self.l1.get(i as usize) else {
            return Ok(());
        };
        if raw_l1 == 0 || self.l2.contains_key(&i) || self.geo.l2_offset(raw_l1, i)? != offset {
            return Ok(());
        }
        if self.l2.len() >= MAX_CLEAN_L2 {
            self.l2.retain(|_, t| t.dirty || t.in_flight);
            self.generation += 1;
        }
        let entries = bytes
            .chunks_exact(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
            .collect();
        self.l2.insert(
            i,
            L2Table {
                entries,
                dirty: false,
                in_flight: false,
            },
        );
        Ok(())
    }

    /// The entry for `gc`, whose table must be in memory ([`State::need`]).
    pub(super) fn entry(&self, gc: u64) -> Result<L2Entry> {
        self.cached_entry(gc)
            .unwrap_or_else(|| Err(Error::corrupt("a qcow2 L2 table was used before it was loaded")))
    }

    /// The raw entry for `gc` (0 where there is no table).
    fn raw_entry(&self, gc: u64) -> Result<u64> {
        if self.need(gc).is_some() {
            return Err(Error::corrupt("a qcow2 L2 table was used before it was loaded"));
        }
        let i = self.l1_index(gc);
        Ok(self
            .l2
            .get(&i)
            .map_or(0, |t| t.entries[(gc % self.geo.l2_entries()) as usize]))
    }

    /// Set the raw L2 entry of `gc`, creating its L2 table if needed. Does not touch
    /// refcounts of data clusters.
    pub(super) fn set_entry(&mut self, gc: u64, raw: u64) -> Result<()> {
        let i = self.l1_index(gc);
        if i >= self.l1.len() as u64 {
            return Err(Error::corrupt(format!(
                "qcow2 guest cluster {gc} is past the L1 table"
            )));
        }
        if self.l1[i as usize] == 0 {
            if raw == 0 {
                return Ok(());
            }
            let cs = self.geo.cluster_size();
            let c = self.refs()?.alloc_counted(1)?;
            self.l1[i as usize] = (c * cs) | COPIED;
            self.l1_dirty = true;
            self.l2.insert(
                i,
                L2Table {
                    entries: vec![0; self.geo.l2_entries() as usize],
                    dirty: true,
                    in_flight: false,
                },
            );
        } else if self.need(gc).is_some() {
            return Err(Error::corrupt("a qcow2 L2 table was used before it was loaded"));
        }
        self.dirty = true;
        let n = self.geo.l2_entries();
        let t = self
            .l2
            .get_mut(&i)
            .ok_or_else(|| Error::corrupt("qcow2 L2 table failed to load"))?;
        t.entries[(gc % n) as usize] = raw;
        t.dirty = true;
        Ok(())
    }

    /// Replace the entry of `gc` with `raw`, queueing the old entry's clusters for release
    /// unless `keep_host` names the cluster the new entry still uses.
    pub(super) fn replace_entry(&mut self, gc: u64, raw: u64, keep_host: Option<u64>) -> Result<()> {
        let old_raw = self.raw_entry(gc)?;
        if old_raw == raw {
            return Ok(());
        }
        let old = self.geo.decode(old_raw, gc)?;
        self.set_entry(gc, raw)?;
        if let Some((first, count)) = old.host_clusters(self.geo.cluster_bits) {
            if keep_host != Some(first) || count != 1 {
                self.refs()?.defer_free(first, count);
            }
        }
        Ok(())
    }

    /// Drop every L2 entry at or past guest cluster `from` (shrinking) in the L2 table of L1
    /// index `i` (which must be in memory if it exists), and the table itself when it lies
    /// wholly past `from`.
    pub(super) fn truncate_table(&mut self, i: u64, from: u64) -> Result<()> {
        let n = self.geo.l2_entries();
        if self.l1.get(i as usize).is_none_or(|&e| e == 0) || (i + 1) * n <= from {
            return Ok(());
        }
        let first = (i * n).max(from);
        for gc in first..(i + 1) * n {
            self.replace_entry(gc, 0, None)?;
        }
        if i * n >= from {
            let host = self.geo.l2_offset(self.l1[i as usize], i)?;
            self.l1[i as usize] = 0;
            self.l1_dirty = true;
            if self.l2.remove(&i).is_some() {
                self.generation += 1;
            }
            let cb = self.geo.cluster_bits;
            self.refs()?.defer_free(host >> cb, 1);
        }
        Ok(())
    }

    /// How many entries the L1 table has.
    pub(super) fn l1_len(&self) -> u64 {
        self.l1.len() as u64
    }

    /// Set a new virtual size, growing the L1 table (moved to new clusters) if needed.
    pub(super) fn set_size(&mut self, size: u64) -> Result<()> {
        let need = size.div_ceil(self.geo.l2_span());
        if need > self.l1.len() as u64 {
            let cs = self.geo.cluster_size();
            if need * 8 > super::header::MAX_L1_BYTES {
                return Err(Error::out_of_bounds("qcow2 L1 table would exceed 32 MiB"));
            }
            let clusters = (need * 8).div_ceil(cs);
            let old_clusters = (self.l1.len() as u64 * 8).div_ceil(cs);
            let old_first = self.l1_offset / cs;
            let old_offset = self.l1_offset;
            let refs = self.refs()?;
            let start = refs.alloc_counted(clusters)?;
            if old_clusters > 0 && old_offset != 0 {
                refs.defer_free(old_first, old_clusters);
            }
            self.l1.resize(need as usize, 0);
            self.l1_offset = start * cs;
            self.l1_dirty = true;
        }
        self.size = size;
        self.header_dirty = true;
        self.dirty = true;
        Ok(())
    }

    /// Whether a flush has metadata to write.
    pub(super) fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Take what a flush must write, in the order of the module documentation, or `None` when
    /// nothing changed. What is taken counts as written until [`State::finish_flush`] says
    /// otherwise.
    pub(super) fn prepare_flush(&mut self) -> Result<Option<FlushPlan>> {
        if !self.dirty {
            return Ok(None);
        }
        let cs = self.geo.cluster_size();
        let mut plan = FlushPlan::default();
        if let Some(refs) = self.refs.as_mut() {
            plan.end = refs.end_cluster() * cs;
            plan.blocks = refs.take_dirty_blocks();
            plan.reftable = refs.take_table();
            if refs.table_moved {
                let mut f = vec![0u8; 12];
                f[..8].copy_from_slice(&refs.table_offset.to_be_bytes());
                f[8..].copy_from_slice(&(refs.table_clusters as u32).to_be_bytes());
                plan.reftable_header = Some(f);
                refs.table_moved = false;
            }
            plan.deferred = std::mem::take(&mut refs.deferred);
        }
        for (&i, t) in self.l2.iter_mut().filter(|(_, t)| t.dirty) {
            let off = self.geo.l2_offset(self.l1[i as usize], i)?;
            plan.l2
                .push((i, off, t.entries.iter().flat_map(|e| e.to_be_bytes()).collect()));
            t.dirty = false;
            t.in_flight = true;
        }
        if self.l1_dirty {
            let mut bytes: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            bytes.resize(bytes.len().next_multiple_of(cs as usize).max(cs as usize), 0);
            plan.l1 = Some((self.l1_offset, bytes));
            self.l1_dirty = false;
        }
        if self.header_dirty {
            let mut f = vec![0u8; 24];
            f[..8].copy_from_slice(&self.size.to_be_bytes());
            f[12..16].copy_from_slice(&(self.l1.len() as u32).to_be_bytes());
            f[16..].copy_from_slice(&self.l1_offset.to_be_bytes());
            plan.header = Some(f);
            self.header_dirty = false;
        }
        self.dirty = false;
        Ok(Some(plan))
    }

    /// Record the outcome of writing `plan`'s tables: on success, apply its deferred
    /// decrements and return the refcount blocks to write next (then
    /// [`State::release_freed`]); on failure, mark everything it took dirty again.
    #[allow(clippy::type_complexity)]
    pub(super) fn finish_flush(
        &mut self,
        plan: FlushPlan,
        ok: bool,
    ) -> Result<Option<(Vec<u64>, Vec<(u64, u64, Vec<u8>)>)>> {
        for (i, _, _) in &plan.l2 {
            if let Some(t) = self.l2.get_mut(i) {
                t.in_flight = false;
                t.dirty |= !ok;
            }
        }
        if !ok {
            if let Some(refs) = self.refs.as_mut() {
                refs.mark_dirty(plan.blocks.iter().map(|(bi, _, _)| *bi));
                if plan.reftable.is_some() {
                    refs.mark_table_dirty();
                }
                if plan.reftable_header.is_some() {
                    refs.table_moved = true;
                }
                let mut deferred = plan.deferred;
                deferred.append(&mut refs.deferred);
                refs.deferred = deferred;
            }
            self.l1_dirty |= plan.l1.is_some();
            self.header_dirty |= plan.header.is_some();
            self.dirty = true;
            return Ok(None);
        }
        let Some(refs) = self.refs.as_mut() else {
            return Ok(None);
        };
        if plan.deferred.is_empty() {
            return Ok(None);
        }
        // Only the plan's decrements: those queued since wait for their own flush.
        let later = std::mem::replace(&mut refs.deferred, plan.deferred);
        let freed = refs.apply_deferred();
        refs.deferred = later;
        let freed = freed?;
        let blocks = refs.take_dirty_blocks();
        self.dirty = true;
        Ok(Some((freed, blocks)))
    }

    /// Mark refcount blocks dirty again after writing them failed.
    pub(super) fn blocks_not_written(&mut self, blocks: &[(u64, u64, Vec<u8>)]) {
        if let Some(refs) = self.refs.as_mut() {
            refs.mark_dirty(blocks.iter().map(|(bi, _, _)| *bi));
        }
        self.dirty = true;
    }

    /// Make clusters whose zero refcount is now durable (and punched out) reusable.
    pub(super) fn release_freed(&mut self, freed: &[u64]) {
        if let Some(refs) = self.refs.as_mut() {
            refs.release(freed);
        }
    }
}

/// What one flush writes, taken by [`State::prepare_flush`]: (offset, bytes) pieces.
#[derive(Debug, Default)]
pub(super) struct FlushPlan {
    /// The file must be at least this long before anything is written.
    pub(super) end: u64,
    blocks: Vec<(u64, u64, Vec<u8>)>,
    reftable: Option<(u64, Vec<u8>)>,
    reftable_header: Option<Vec<u8>>,
    l2: Vec<(u64, u64, Vec<u8>)>,
    l1: Option<(u64, Vec<u8>)>,
    header: Option<Vec<u8>>,
    deferred: Vec<(u64, u64)>,
}

impl FlushPlan {
    /// Steps 1 to 4 of the module documentation (the caller has grown the file to `end`).
    pub(super) fn write(&self, storage: &dyn Storage) -> Result<()> {
        for (_, off, bytes) in &self.blocks {
            storage.write_at(bytes, *off)?;
        }
        storage.sync()?;
        if let Some((off, bytes)) = &self.reftable {
            storage.write_at(bytes, *off)?;
            storage.sync()?;
        }
        if let Some(f) = &self.reftable_header {
            storage.write_at(f, OFF_REFTABLE)?;
            storage.sync()?;
        }
        if !self.l2.is_empty() {
            for (_, off, bytes) in &self.l2 {
                storage.write_at(bytes, *off)?;
            }
            storage.sync()?;
        }
        if let Some((off, bytes)) = &self.l1 {
            storage.write_at(bytes, *off)?;
            storage.sync()?;
        }
        if let Some(f) = &self.header {
            storage.write_at(f, OFF_SIZE)?;
            storage.sync()?;
        }
        Ok(())
    }
}
