//! Block access for the reader: bounds against the filesystem's size, a small cache of
//! metadata blocks, and the journal overlay (blocks a replayed journal supersedes are read from
//! the journal instead of their home location; the image itself is never written).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use diskkit::{Error, Result};

use crate::read::partition::SectorSource;

/// Where the newest copy of a block lives after journal replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Replayed {
    /// Filesystem block that holds the journal's copy.
    pub(crate) from: u64,
    /// The copy's first four bytes were escaped (they were jbd2's magic number).
    pub(crate) escaped: bool,
}

/// Bytes of metadata blocks kept in the cache.
const CACHE_BYTES: usize = 16 << 20;

struct Cache {
    map: HashMap<u64, Arc<[u8]>>,
    order: VecDeque<u64>,
    cap: usize,
}

/// The filesystem's blocks over a byte source.
pub(crate) struct Device {
    src: Arc<dyn SectorSource + Send + Sync>,
    block_size: usize,
    blocks: u64,
    overlay: BTreeMap<u64, Replayed>,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("block_size", &self.block_size)
            .field("blocks", &self.blocks)
            .field("replayed_blocks", &self.overlay.len())
            .finish_non_exhaustive()
    }
}

impl Device {
    /// `blocks` blocks of `block_size` bytes (a power of two, 1 KiB to 64 KiB).
    pub(crate) fn new(
        src: Arc<dyn SectorSource + Send + Sync>,
        block_size: usize,
        blocks: u64,
        overlay: BTreeMap<u64, Replayed>,
    ) -> Device {
        let cap = CACHE_BYTES.checked_div(block_size).unwrap_or(0).max(16);
        Device {
            src,
            block_size,
            blocks,
            overlay,
            cache: Mutex::new(Cache {
                map: HashMap::new(),
                order: VecDeque::new(),
                cap,
            }),
        }
    }

    pub(crate) fn overlay(&self) -> &BTreeMap<u64, Replayed> {
        &self.overlay
    }

    fn check(&self, block: u64, count: u64) -> Result<()> {
        match block.checked_add(count) {
            Some(end) if end <= self.blocks => Ok(()),
            _ => Err(Error::corrupt(format!(
                "block {block} (+{count}) lies past the end of the filesystem ({} blocks)",
                self.blocks
            ))),
        }
    }

    fn byte_offset(&self, block: u64) -> Result<u64> {
        block
            .checked_mul(self.block_size as u64)
            .ok_or_else(|| Error::corrupt(format!("block number {block} is out of range")))
    }

    /// Read `block` from its home location, ignoring the overlay.
    fn read_home(&self, block: u64, buf: &mut [u8]) -> Result<()> {
        let off = self.byte_offset(block)?;
        if off.saturating_add(buf.len() as u64) > self.src.size() {
            return Err(Error::out_of_bounds(format!(
                "block {block} is past its end: the image holds {} bytes, but the filesystem claims {} blocks of {} bytes (is the image cut short?)",
                self.src.size(),
                self.blocks,
                self.block_size
            ))
            .with_offset(off));
        }
        self.src.read_exact_at(buf, off).map_err(|e| {
            Error::new(e.kind(), format!("cannot read block {block} of the filesystem"))
                .with_offset(off)
                .with_source(e)
        })
    }

    fn read_replayed(&self, r: Replayed, buf: &mut [u8]) -> Result<()> {
        self.read_home(r.from, buf)?;
        if r.escaped {
            if let Some(head) = buf.get_mut(..4) {
                head.copy_from_slice(&super::journal::JBD2_MAGIC.to_be_bytes());
            }
        }
        Ok(())
    }

    /// One metadata block, through the cache and the journal overlay.
    pub(crate) fn block(&self, block: u64) -> Result<Arc<[u8]>> {
        self.check(block, 1)?;
        if let Some(b) = self.lock().map.get(&block) {
            return Ok(Arc::clone(b));
        }
        let mut buf = vec![0u8; self.block_size];
        match self.overlay.get(&block) {
            Some(&r) => self.read_replayed(r, &mut buf)?,
            None => self.read_home(block, &mut buf)?,
        }
        let data: Arc<[u8]> = buf.into();
        let mut c = self.lock();
        if c.map.len() >= c.cap {
            if let Some(old) = c.order.pop_front() {
                c.map.remove(&old);
            }
        }
        if c.map.insert(block, Arc::clone(&data)).is_none() {
            c.order.push_back(block);
        }
        Ok(data)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding the lock cannot leave the map inconsistent (every update is
        // one insert or remove), so a poisoned lock is still usable.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// File data: `buf.len() / block_size` whole blocks from `block`, uncached, through the
    /// journal overlay.
    pub(crate) fn read_blocks(&self, block: u64, buf: &mut [u8]) -> Result<()> {
        let bs = self.block_size;
        let count = buf.len().checked_div(bs).unwrap_or(0) as u64;
        self.check(block, count)?;
        let end = block.saturating_add(count);
        let mut pos = block;
        let mut done = 0usize;
        for (&b, &r) in self.overlay.range(block..end) {
            let len = usize::try_from(b.saturating_sub(pos))
                .ok()
                .and_then(|n| n.checked_mul(bs))
                .unwrap_or(0);
            let stop = done.saturating_add(len);
            if let Some(part) = buf.get_mut(done..stop) {
                if !part.is_empty() {
                    self.read_home(pos, part)?;
                }
            }
            let next = stop.saturating_add(bs);
            if let Some(part) = buf.get_mut(stop..next) {
                self.read_replayed(r, part)?;
            }
            done = next;
            pos = b.saturating_add(1);
        }
        if let Some(part) = buf.get_mut(done..) {
            if !part.is_empty() {
                self.read_home(pos, part)?;
            }
        }
        Ok(())
    }
}
