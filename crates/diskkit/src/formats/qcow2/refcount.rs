//! Refcounts and cluster allocation.
//!
//! The whole refcount structure is loaded when an image is opened for writing (it is small: a
//! 16-bit refcount per cluster). Increments are made in memory as clusters are put to use;
//! decrements are deferred until the tables that stopped referring to a cluster are durable
//! (see `State::flush`), so a crash can only ever leak clusters, never free one in use.
//!
//! New clusters come from the end of the file (`next_free`), or from clusters whose refcount
//! went to zero, once that zero is durable.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::storage::Storage;

/// A refcount block in memory.
#[derive(Debug)]
struct Block {
    bytes: Vec<u8>,
    dirty: bool,
}

/// The refcount table, its blocks, and the allocator.
#[derive(Debug)]
pub(super) struct Refcounts {
    cluster_bits: u32,
    order: u32,
    table: Vec<u64>,
    pub(super) table_offset: u64,
    pub(super) table_clusters: u64,
    table_dirty: bool,
    /// The table moved: the header must be updated after the new table is durable.
    pub(super) table_moved: bool,
    blocks: BTreeMap<u64, Block>,
    /// First cluster index at or past every used cluster and the file end.
    next_free: u64,
    /// Clusters whose zero refcount is durable, reusable.
    free: Vec<u64>,
    /// Clusters to decrement once the metadata that dropped them is durable.
    pub(super) deferred: Vec<(u64, u64)>,
}

/// Refuse to track more free clusters than this (the rest is simply not reused).
const MAX_FREE: usize = 1 << 20;

impl Refcounts {
    /// Load the table and every block it names. Offsets are checked against `file_len`.
    pub(super) fn load(
        storage: &dyn Storage,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u64,
        file_len: u64,
    ) -> Result<Refcounts> {
        let cs = 1u64 << cluster_bits;
        let mut raw = vec![0u8; (table_clusters * cs) as usize];
        storage.read_at(&mut raw, table_offset)?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
            .collect();
        let mut r = Refcounts {
            cluster_bits,
            order,
            table,
            table_offset,
            table_clusters,
            table_dirty: false,
            table_moved: false,
            blocks: BTreeMap::new(),
            next_free: file_len.div_ceil(cs),
            free: Vec::new(),
            deferred: Vec::new(),
        };
        for i in 0..r.table.len() {
            let off = r.table[i];
            if off == 0 {
                continue;
            }
            if off & 0x1ff != 0 || off % cs != 0 || off.checked_add(cs).is_none_or(|e| e > file_len) {
                return Err(Error::corrupt(format!(
                    "qcow2 refcount table entry {i} points to {off:#x}, not a cluster inside the file"
                )));
            }
            let mut bytes = vec![0u8; cs as usize];
            storage.read_at(&mut bytes, off)?;
            r.blocks.insert(i as u64, Block { bytes, dirty: false });
        }
        let limit = r.next_free;
        let mut used_end = 0;
        for c in 0..limit {
            if r.get(c) != 0 {
                used_end = c + 1;
            }
        }
        for c in (0..used_end).rev() {
            if r.free.len() >= MAX_FREE {
                break;
            }
            if r.get(c) == 0 && c != 0 {
                r.free.push(c);
            }
        }
        // Clusters between the last used one and the file end are free too, but the file
        // end is where new runs start; nothing past it is referenced.
        Ok(r)
    }

    /// The refcount table of a new image: `used` clusters from 0, with the table at cluster
    /// `table_cluster` and one block at `block_cluster` (both among the used ones).
    pub(super) fn new_image(
        cluster_bits: u32,
        table_cluster: u64,
        block_cluster: u64,
        used: u64,
    ) -> Refcounts {
        let cs = 1u64 << cluster_bits;
        let mut table = vec![0u64; (cs / 8) as usize];
        table[0] = block_cluster * cs;
        let mut blocks = BTreeMap::new();
        blocks.insert(
            0,
            Block {
                bytes: vec![0u8; cs as usize],
                dirty: true,
            },
        );
        let mut r = Refcounts {
            cluster_bits,
            order: 4,
            table,
            table_offset: table_cluster * cs,
            table_clusters: 1,
            table_dirty: true,
            table_moved: false,
            blocks,
            next_free: used,
            free: Vec::new(),
            deferred: Vec::new(),
        };
        for c in 0..used {
            r.put(c, 1);
        }
        r
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount entries per block.
    fn per_block(&self) -> u64 {
        (self.cs() * 8) >> self.order
    }

    /// The largest refcount value.
    fn max_value(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    /// The refcount of cluster `c` (0 where no block covers it).
    pub(super) fn get(&self, c: u64) -> u64 {
        let pb = self.per_block();
        let Some(b) = self.blocks.get(&(c / pb)) else {
            return 0;
        };
        read_entry(&b.bytes, self.order, c % pb)
    }

    /// Set the refcount of `c` where its block exists (used for new images only).
    fn put(&mut self, c: u64, v: u64) {
        let pb = self.per_block();
        let order = self.order;
        if let Some(b) = self.blocks.get_mut(&(c / pb)) {
            write_entry(&mut b.bytes, order, c % pb, v);
            b.dirty = true;
        }
    }

    /// Reserve `n` contiguous clusters (not yet counted): a single cluster may be a reused
    /// one, runs come from the end of the file. Returns the first cluster index.
    pub(super) fn reserve(&mut self, n: u64, reuse: bool) -> Result<u64> {
        if n == 1 && reuse {
            if let Some(c) = self.free.pop() {
                return Ok(c);
            }
        }
        let start = self.next_free;
        let end = start
            .checked_add(n)
            .filter(|&e| e.checked_mul(self.cs()).is_some_and(|b| b < 1 << 56))
            .ok_or_else(|| Error::out_of_bounds("qcow2 image would grow past 2^56 bytes"))?;
        self.next_free = end;
        Ok(start)
    }

    /// Allocate `n` contiguous clusters from the end of the file and count them.
    pub(super) fn alloc_counted(&mut self, n: u64) -> Result<u64> {
        let start = self.reserve(n, false)?;
        for c in start..start + n {
            self.incref(c)?;
        }
        Ok(start)
    }

    /// Add one reference to `c`, creating refcount blocks (and growing the table) as needed.
    pub(super) fn incref(&mut self, c: u64) -> Result<()> {
        let pb = self.per_block();
        let bi = c / pb;
        self.ensure_block(bi)?;
        let max = self.max_value();
        let order = self.order;
        let b = self
            .blocks
            .get_mut(&bi)
            .ok_or_else(|| Error::corrupt("qcow2 refcount block vanished"))?;
        let v = read_entry(&b.bytes, order, c % pb);
        if v >= max {
            return Err(Error::corrupt(format!(
                "qcow2 refcount of cluster {c} would overflow"
            )));
        }
        write_entry(&mut b.bytes, order, c % pb, v + 1);
        b.dirty = true;
        Ok(())
    }

    /// Remove one reference from `c` now. Returns the new refcount.
    fn decref_now(&mut self, c: u64) -> Result<u64> {
        let pb = self.per_block();
        let order = self.order;
        let b = self.blocks.get_mut(&(c / pb)).ok_or_else(|| {
            Error::corrupt(format!("qcow2 cluster {c} is in use but has no refcount block"))
        })?;
        let v = read_entry(&b.bytes, order, c % pb);
        if v == 0 {
            return Err(Error::corrupt(format!(
                "qcow2 cluster {c} is in use but its refcount is 0"
            )));
        }
        write_entry(&mut b.bytes, order, c % pb, v - 1);
        b.dirty = true;
        Ok(v - 1)
    }

    /// Queue `count` clusters from `first` to lose one reference at the next flush.
    pub(super) fn defer_free(&mut self, first: u64, count: u64) {
        self.deferred.push((first, count));
    }

    /// Apply the deferred decrements. Returns the clusters that became free (to be written
    /// out and then made reusable with [`Refcounts::release`]).
    pub(super) fn apply_deferred(&mut self) -> Result<Vec<u64>> {
        let mut freed = Vec::new();
        for (first, count) in std::mem::take(&mut self.deferred) {
            for c in first..first + count {
                if self.decref_now(c)? == 0 {
                    freed.push(c);
                }
            }
        }
        Ok(freed)
    }

    /// Make clusters whose zero refcount is durable reusable.
    pub(super) fn release(&mut self, clusters: &[u64]) {
        for &c in clusters {
            if self.free.len() < MAX_FREE {
                self.free.push(c);
            }
        }
    }

    fn ensure_block(&mut self, bi: u64) -> Result<()> {
        if bi >= self.table.len() as u64 {
            self.grow_table(bi + 1)?;
        }
        if self.table[bi as usize] != 0 {
            return Ok(());
        }
        let c = self.reserve(1, false)?;
        self.table[bi as usize] = c * self.cs();
        self.table_dirty = true;
        self.blocks.insert(
            bi,
            Block {
                bytes: vec![0u8; self.cs() as usize],
                dirty: true,
            },
        );
        self.incref(c)
    }

    fn grow_table(&mut self, min_entries: u64) -> Result<()> {
        let per_cluster = self.cs() / 8;
        let want = min_entries.max(self.table.len() as u64 * 2).max(per_cluster);
        let clusters = want.div_ceil(per_cluster);
        if clusters * self.cs() > super::header::MAX_REFTABLE_BYTES.max(self.cs()) {
            return Err(Error::out_of_bounds("qcow2 refcount table would exceed 8 MiB"));
        }
        let start = self.reserve(clusters, false)?;
        let old = (self.table_offset >> self.cluster_bits, self.table_clusters);
        self.table.resize((clusters * per_cluster) as usize, 0);
        self.table_offset = start * self.cs();
        self.table_clusters = clusters;
        self.table_dirty = true;
        self.table_moved = true;
        self.defer_free(old.0, old.1);
        for c in start..start + clusters {
            self.incref(c)?;
        }
        Ok(())
    }

    /// The first cluster past everything allocated so far.
    pub(super) fn end_cluster(&self) -> u64 {
        self.next_free
    }

    /// The dirty blocks as (block index, file offset, bytes), now counted as written.
    pub(super) fn take_dirty_blocks(&mut self) -> Vec<(u64, u64, Vec<u8>)> {
        let mut out = Vec::new();
        for (bi, b) in self.blocks.iter_mut().filter(|(_, b)| b.dirty) {
            out.push((*bi, self.table[*bi as usize], b.bytes.clone()));
            b.dirty = false;
        }
        out
    }

    /// The table as (file offset, bytes) if it changed, now counted as written.
    pub(super) fn take_table(&mut self) -> Option<(u64, Vec<u8>)> {
        if !self.table_dirty {
            return None;
        }
        self.table_dirty = false;
        Some((
            self.table_offset,
            self.table.iter().flat_map(|e| e.to_be_bytes()).collect(),
        ))
    }

    /// Mark blocks dirty again (writing them failed).
    pub(super) fn mark_dirty(&mut self, blocks: impl Iterator<Item = u64>) {
        for bi in blocks {
            if let Some(b) = self.blocks.get_mut(&bi) {
                b.dirty = true;
            }
        }
    }

    /// Mark the table dirty again (writing it failed).
    pub(super) fn mark_table_dirty(&mut self) {
        self.table_dirty = true;
    }

    /// Write dirty blocks (repairs and new images, where nothing else runs). Returns whether
    /// anything was written.
    pub(super) fn write_blocks(&mut self, storage: &dyn Storage) -> Result<bool> {
        let blocks = self.take_dirty_blocks();
        for (_, off, bytes) in &blocks {
            storage.write_at(bytes, *off)?;
        }
        Ok(!blocks.is_empty())
    }

    /// Write the table if it changed (repairs and new images). Returns whether it was written.
    pub(super) fn write_table(&mut self, storage: &dyn Storage) -> Result<bool> {
        match self.take_table() {
            Some((off, bytes)) => {
                storage.write_at(&bytes, off)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

pub(super) fn read_entry(bytes: &[u8], order: u32, i: u64) -> u64 {
    let i = i as usize;
    match order {
        0 => u64::from((bytes[i / 8] >> (i % 8)) & 1),
        1 => u64::from((bytes[i / 4] >> (2 * (i % 4))) & 3),
        2 => u64::from((bytes[i / 2] >> (4 * (i % 2))) & 15),
        3 => u64::from(bytes[i]),
        4 => u64::from(u16::from_be_bytes([bytes[2 * i], bytes[2 * i + 1]])),
        5 => {
            let mut w = [0u8; 4];
            w.copy_from_slice(&bytes[4 * i..4 * i + 4]);
            u64::from(u32::from_be_bytes(w))
        }
        _ => {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[8 * i..8 * i + 8]);
            u64::from_be_bytes(w)
        }
    }
}

pub(super) fn write_entry(bytes: &mut [u8], order: u32, i: u64, v: u64) {
    let i = i as usize;
    let sub = |b: &mut u8, shift: usize, mask: u8| {
        *b = (*b & !(mask << shift)) | (((v as u8) & mask) << shift);
    };
    match order {
        0 => sub(&mut bytes[i / 8], i % 8, 1),
        1 => sub(&mut bytes[i / 4], 2 * (i % 4), 3),
        2 => sub(&mut bytes[i / 2], 4 * (i % 2), 15),
        3 => bytes[i] = v as u8,
        4 => bytes[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => bytes[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => bytes[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_at_every_width() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 64];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            for i in 0..8 {
                write_entry(&mut b, order, i, max.min(i + 1));
            }
            for i in 0..8 {
                assert_eq!(
                    read_entry(&b, order, i),
                    max.min(i + 1),
                    "order {order} entry {i}"
                );
            }
        }
    }

    #[test]
    fn allocation_grows_blocks_and_table() {
        // 512-byte clusters: 256 refcounts per block, 64 blocks per table cluster.
        let mut r = Refcounts::new_image(9, 1, 2, 4);
        let start = r.alloc_counted(256 * 70).unwrap();
        assert_eq!(start, 4);
        for c in start..start + 256 * 70 {
            assert_eq!(r.get(c), 1);
        }
        assert!(r.table_moved);
        assert_eq!(r.deferred, vec![(1, 1)]);
        // Blocks and the new table are counted too.
        let counted = (0..r.end_cluster()).filter(|&c| r.get(c) == 1).count() as u64;
        assert_eq!(counted, r.end_cluster());
    }
}
