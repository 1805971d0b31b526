//! A size bound for a cache layer: least recently used units are evicted.
//!
//! The cache layer is accounted in units (its fill unit rounded up to its chunk size). Each
//! unit the layer holds data in counts as a whole unit (an upper bound of its space). Reads
//! that find data in the cache mark its units used; fills add units; when the units held pass
//! the bound, the least recently used ones are evicted ([`crate::Layer::evict`]: absent again,
//! their space punched) until a tenth of the bound is free, and read from beneath again when
//! next needed. Recency lives in memory only: after an open, every unit already held counts as
//! older than anything used since, in disk order.
//!
//! Eviction and reads of cached data: a read pins the units it is about to map and read
//! ([`CacheBudget::pin`]) until its data has been copied out, and pinned units are never chosen
//! for eviction; a unit being evicted cannot be pinned until its eviction has finished (the
//! reader waits, then maps it again and finds it absent). Without this, a read that mapped a
//! unit just before another thread evicted it would read its punched space, or a chunk
//! already reused for another unit's data.

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex};

use crate::error::Result;
use crate::layer::Layer;
use crate::mapping::Mapping;

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct CacheBudget {
    limit_units: u64,
    unit: u64,
    state: Mutex<BudgetState>,
    /// Signalled when evictions finish.
    evicted: Condvar,
}

#[derive(Debug, Default)]
struct BudgetState {
    /// Unit index to the tick of its last use.
    units: HashMap<u64, u64>,
    tick: u64,
    /// Units being read, with the number of readers.
    pins: HashMap<u64, u32>,
    /// Units chosen for eviction whose eviction has not finished.
    evicting: HashSet<u64>,
}

/// Units pinned by a read; unpinned when dropped.
#[derive(Debug)]
pub(crate) struct Pin<'a> {
    budget: &'a CacheBudget,
    first: u64,
    last: u64,
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        let mut st = self.budget.lock();
        for u in self.first..=self.last {
            if let Some(n) = st.pins.get_mut(&u) {
                *n -= 1;
                if *n == 0 {
                    st.pins.remove(&u);
                }
            }
        }
    }
}

impl CacheBudget {
    /// A budget of `limit` bytes in units of `unit` for `layer`, counting what it holds now.
    pub(crate) fn scan(layer: &dyn Layer, limit: u64, unit: u64) -> Result<CacheBudget> {
        let mut state = BudgetState::default();
        let size = layer.size();
        let mut pos = 0;
        while pos < size {
            let (m, n) = layer.map_status(pos, size - pos)?;
            let n = n.clamp(1, size - pos);
            if matches!(m, Mapping::Data { .. } | Mapping::Special) {
                for u in pos / unit..=(pos + n - 1) / unit {
                    state.tick += 1;
                    state.units.entry(u).or_insert(state.tick);
                }
            }
            pos += n;
        }
        Ok(CacheBudget {
            limit_units: (limit / unit).max(1),
            unit,
            state: Mutex::new(state),
            evicted: Condvar::new(),
        })
    }

    /// The accounting unit in bytes.
    pub(crate) fn unit(&self) -> u64 {
        self.unit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn range(&self, offset: u64, len: u64) -> (u64, u64) {
        (offset / self.unit, (offset + len.max(1) - 1) / self.unit)
    }

    /// Pin the units of `[offset, offset + len)` before mapping and reading them: none of
    /// them is evicted until the pin is dropped, and those held are marked used (a read is
    /// their use). Waits for evictions of any of them that have begun to finish.
    pub(crate) fn pin(&self, offset: u64, len: u64) -> Pin<'_> {
        let (first, last) = self.range(offset, len);
        let mut st = self.lock();
        while (first..=last).any(|u| st.evicting.contains(&u)) {
            st = self.evicted.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.tick += 1;
        let tick = st.tick;
        for u in first..=last {
            *st.pins.entry(u).or_insert(0) += 1;
            if let Some(t) = st.units.get_mut(&u) {
                *t = tick;
            }
        }
        Pin {
            budget: self,
            first,
            last,
        }
    }

    /// The eviction of `units` (returned by [`CacheBudget::filled`] or
    /// [`CacheBudget::excess`]) has ended; `failed` are those still holding data (an error
    /// stopped their eviction), which are counted again, as least recently used.
    pub(crate) fn evicted(&self, units: &[u64], failed: &[u64]) {
        let mut st = self.lock();
        for u in units {
            st.evicting.remove(u);
        }
        for &u in failed {
            st.units.insert(u, 0);
        }
        drop(st);
        self.evicted.notify_all();
    }

    /// Record a fill of `[offset, offset + len)`; returns the units to evict (already taken
    /// out of the account), least recently used first, never one of those just filled nor
    /// one pinned by a read. The caller evicts them, then calls [`CacheBudget::evicted`].
    pub(crate) fn filled(&self, offset: u64, len: u64) -> Vec<u64> {
        let mut st = self.lock();
        st.tick += 1;
        let tick = st.tick;
        let (first, last) = (offset / self.unit, (offset + len.max(1) - 1) / self.unit);
        for u in first..=last {
            st.units.insert(u, tick);
        }
        self.trim(&mut st, Some((first, last)))
    }

    /// The units to evict now to come under the bound (after an open with a lower bound).
    pub(crate) fn excess(&self) -> Vec<u64> {
        let mut st = self.lock();
        self.trim(&mut st, None)
    }

    fn trim(&self, st: &mut BudgetState, keep: Option<(u64, u64)>) -> Vec<u64> {
        let held = st.units.len() as u64;
        if held <= self.limit_units {
            return Vec::new();
        }
        let target = self.limit_units - self.limit_units / 10;
        let mut by_age: Vec<(u64, u64)> = st
            .units
            .iter()
            .filter(|(&u, _)| keep.is_none_or(|(first, last)| u < first || u > last))
            .filter(|(u, _)| !st.pins.contains_key(u))
            .map(|(&u, &t)| (t, u))
            .collect();
        by_age.sort_unstable();
        let excess = (held - target) as usize;
        let victims: Vec<u64> = by_age.iter().take(excess).map(|&(_, u)| u).collect();
        for u in &victims {
            st.units.remove(u);
            st.evicting.insert(*u);
        }
        victims
    }

    /// Units currently accounted.
    #[cfg(test)]
    pub(crate) fn held(&self) -> u64 {
        self.lock().units.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::formats::CreateOptions;
    use crate::layer::ImageFormat;
    use crate::storage::{MemStorage, Storage};

    #[test]
    fn least_recently_used_units_go_first_and_fresh_fills_stay() {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let layer =
            crate::formats::create(storage, &CreateOptions::new(ImageFormat::Asif, 64 << 20)).unwrap();
        let b = CacheBudget::scan(&*layer, 10 << 20, 1 << 20).unwrap();
        assert_eq!(b.held(), 0);
        for u in 0..10 {
            assert!(b.filled(u << 20, 1 << 20).is_empty());
        }
        drop(b.pin(0, 4096));
        // The eleventh unit: down to 9 units, the oldest (1, 2) leave; 0 was used, 10 is new.
        assert_eq!(b.filled(10 << 20, 1 << 20), vec![1, 2]);
        assert_eq!(b.held(), 9);
        assert!(b.excess().is_empty());
    }

    #[test]
    fn asif_layers_forget_evicted_chunks() {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let layer = crate::formats::create(storage, &CreateOptions::new(ImageFormat::Asif, 8 << 20)).unwrap();
        let data = vec![7u8; 3 << 20];
        layer
            .write(&crate::layer::Write {
                offset: 0,
                data: &data,
                mode: crate::layer::WriteMode::Replace,
                current: &crate::layer::write::Zeroes,
            })
            .unwrap();
        layer
            .zero(&crate::layer::Zeroing {
                offset: 4 << 20,
                len: 1 << 20,
                unmap: true,
                hide_below: true,
                mode: crate::layer::WriteMode::Replace,
            })
            .unwrap();
        let b = CacheBudget::scan(&*layer, 1 << 20, 1 << 20).unwrap();
        assert_eq!(b.held(), 3, "data units are counted, zero ones are not");
        layer.evict(1 << 20, 1 << 20).unwrap();
        layer.evict(4 << 20, 1 << 20).unwrap();
        assert_eq!(layer.map_status(1 << 20, 1 << 20).unwrap().0, Mapping::Absent);
        assert_eq!(layer.map_status(4 << 20, 1 << 20).unwrap().0, Mapping::Absent);
        assert!(matches!(
            layer.map_status(0, 1 << 20).unwrap().0,
            Mapping::Data { .. }
        ));
        assert!(layer.evict(1, 1 << 20).is_err(), "unaligned");
    }
}
