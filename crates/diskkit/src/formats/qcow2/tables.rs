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
        }
    }

    pub(super) fn refs(&mut self) -> Result<&mut Refcounts> {
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

    /// Load the L2 table for guest cluster `gc` (if it has one).
    pub(super) fn load(&mut self, storage: &dyn Storage, gc: u64) -> Result<()> {
        let i = self.l1_index(gc);
        let Some(&raw_l1) = self.l1.get(i as usize) else {
            return Ok(());
        };
        if raw_l1 == 0 || self.l2.contains_key(&i) {
            return Ok(());
        }
        let off = self.geo.l2_offset(raw_l1, i)?;
        let cs = self.geo.cluster_size();
        if self.l2.len() >= MAX_CLEAN_L2 {
            self.l2.retain(|_, t| t.dirty);
        }
        let mut bytes = vec![0u8; cs as usize];
        storage
            .read_at(&mut bytes, off)
            .map_err(|e| e.with_operation("reading a qcow2 L2 table").with_offset(off))?;
        let entries = bytes
            .chunks_exact(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
            .collect();
        self.l2.insert(
            i,
            L2Table {
                entries,
                dirty: false,
            },
        );
        Ok(())
    }

    /// The entry for `gc`, loading its table if needed.
    pub(super) fn entry(&mut self, storage: &dyn Storage, gc: u64) -> Result<L2Entry> {
        if let Some(e) = self.cached_entry(gc) {
            return e;
        }
        self.load(storage, gc)?;
        self.cached_entry(gc)
            .unwrap_or_else(|| Err(Error::corrupt("qcow2 L2 table failed to load")))
    }

    /// The raw entry for `gc` (0 where there is no table).
    fn raw_entry(&mut self, storage: &dyn Storage, gc: u64) -> Result<u64> {
        self.load(storage, gc)?;
        let i = self.l1_index(gc);
        Ok(self
            .l2
            .get(&i)
            .map_or(0, |t| t.entries[(gc % self.geo.l2_entries()) as usize]))
    }

    /// Set the raw L2 entry of `gc`, creating its L2 table if needed. Does not touch
    /// refcounts of data clusters.
    pub(super) fn set_entry(&mut self, storage: &dyn Storage, gc: u64, raw: u64) -> Result<()> {
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
                },
            );
        } else {
            self.load(storage, gc)?;
        }
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
    pub(super) fn replace_entry(
        &mut self,
        storage: &dyn Storage,
        gc: u64,
        raw: u64,
        keep_host: Option<u64>,
    ) -> Result<()> {
        let old_raw = self.raw_entry(storage, gc)?;
        if old_raw == raw {
            return Ok(());
        }
        let old = self.geo.decode(old_raw, gc)?;
        self.set_entry(storage, gc, raw)?;
        if let Some((first, count)) = old.host_clusters(self.geo.cluster_bits) {
            if keep_host != Some(first) || count != 1 {
                self.refs()?.defer_free(first, count);
            }
        }
        Ok(())
    }

    /// Drop every L2 entry at or past guest cluster `from` (shrinking), releasing clusters and
    /// L2 tables that fall wholly past it.
    pub(super) fn truncate(&mut self, storage: &dyn Storage, from: u64) -> Result<()> {
        let n = self.geo.l2_entries();
        for i in 0..self.l1.len() as u64 {
            if self.l1[i as usize] == 0 || (i + 1) * n <= from {
                continue;
            }
            let first = (i * n).max(from);
            for gc in first..(i + 1) * n {
                self.replace_entry(storage, gc, 0, None)?;
            }
            if i * n >= from {
                let host = self.geo.l2_offset(self.l1[i as usize], i)?;
                self.l1[i as usize] = 0;
                self.l1_dirty = true;
                self.l2.remove(&i);
                let cb = self.geo.cluster_bits;
                self.refs()?.defer_free(host >> cb, 1);
            }
        }
        Ok(())
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
        Ok(())
    }

    /// Whether a flush has metadata to write.
    pub(super) fn is_dirty(&self) -> bool {
        self.l1_dirty
            || self.header_dirty
            || self.l2.values().any(|t| t.dirty)
            || self.refs.as_ref().is_some_and(|r| !r.deferred.is_empty())
    }

    /// Write every change, in the order described in the module documentation.
    pub(super) fn flush(&mut self, storage: &dyn Storage) -> Result<()> {
        let cs = self.geo.cluster_size();
        let Some(refs) = self.refs.as_mut() else {
            return Ok(());
        };
        // 1. Refcount increments (and the data written so far).
        let end = refs.end_cluster() * cs;
        if storage.len()? < end {
            storage.set_len(end)?;
        }
        refs.write_blocks(storage)?;
        storage.sync()?;
        // 2. The refcount table.
        if refs.write_table(storage)? {
            storage.sync()?;
        }
        if refs.table_moved {
            let mut f = [0u8; 12];
            f[..8].copy_from_slice(&refs.table_offset.to_be_bytes());
            f[8..].copy_from_slice(&(refs.table_clusters as u32).to_be_bytes());
            storage.write_at(&f, OFF_REFTABLE)?;
            storage.sync()?;
            refs.table_moved = false;
        }
        // 3. L2 tables.
        let mut wrote = false;
        for (&i, t) in self.l2.iter_mut().filter(|(_, t)| t.dirty) {
            let off = self.geo.l2_offset(self.l1[i as usize], i)?;
            let bytes: Vec<u8> = t.entries.iter().flat_map(|e| e.to_be_bytes()).collect();
            storage.write_at(&bytes, off)?;
            t.dirty = false;
            wrote = true;
        }
        if wrote {
            storage.sync()?;
        }
        // 4. The L1 table and the header fields that describe it.
        if self.l1_dirty {
            let mut bytes: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            bytes.resize(bytes.len().next_multiple_of(cs as usize).max(cs as usize), 0);
            storage.write_at(&bytes, self.l1_offset)?;
            storage.sync()?;
            self.l1_dirty = false;
        }
        if self.header_dirty {
            let mut f = [0u8; 24];
            f[..8].copy_from_slice(&self.size.to_be_bytes());
            f[12..16].copy_from_slice(&(self.l1.len() as u32).to_be_bytes());
            f[16..].copy_from_slice(&self.l1_offset.to_be_bytes());
            storage.write_at(&f, OFF_SIZE)?;
            storage.sync()?;
            self.header_dirty = false;
        }
        // 5. Release clusters nothing durable refers to any more.
        let Some(refs) = self.refs.as_mut() else {
            return Ok(());
        };
        if !refs.deferred.is_empty() {
            let freed = refs.apply_deferred()?;
            refs.write_blocks(storage)?;
            storage.sync()?;
            for &c in &freed {
                storage.punch_hole(c * cs, cs)?;
            }
            refs.release(&freed);
        }
        Ok(())
    }
}
