//! Generic I/O over a stack of layers, driven only by the layers' mapping answers.
//!
//! Layers are ordered bottom (base, index 0) to top. Reads walk down on [`Mapping::Absent`];
//! a cache layer is filled with what was read beneath it ([`WriteMode::FillAbsent`], which its
//! driver stores only where it still holds nothing); writes go to the top layer's write path,
//! which completes partly written allocation units from [`Below`].

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};

use super::budget::CacheBudget;
use crate::error::Result;
use crate::layer::write::CurrentContent;
use crate::layer::{Layer, LayerType, Write, WriteMode, Zeroing};
use crate::mapping::{Extent, ExtentKind, Mapping};

/// One level of a stack.
#[derive(Debug)]
pub(crate) struct Level {
    pub(crate) layer: Arc<dyn Layer>,
    pub(crate) layer_type: Option<LayerType>,
    /// The size bound of a cache layer, if it has one.
    pub(crate) budget: Option<Arc<CacheBudget>>,
    /// The units of a cache layer being filled now.
    filling: FillGate,
}

impl Level {
    pub(crate) fn new(layer: Arc<dyn Layer>, layer_type: Option<LayerType>) -> Level {
        Level {
            layer,
            layer_type,
            budget: None,
            filling: FillGate::default(),
        }
    }
}

/// The units of a cache layer that some thread is filling: a reader that needs one of them
/// waits for that fill and then reads the cache, instead of reading beneath and filling the
/// same unit again (many NBD requests in flight often ask for pieces of one unit at once).
#[derive(Debug, Default)]
struct FillGate {
    units: Mutex<HashSet<u64>>,
    done: Condvar,
}

impl FillGate {
    /// Claim the units `[first, last]`: `Some` when none was being filled (they are now this
    /// caller's until the guard drops), `None` after waiting for another thread's fill.
    fn claim(&self, first: u64, last: u64) -> Option<FillClaim<'_>> {
        let mut units = self.units.lock().unwrap_or_else(|p| p.into_inner());
        if (first..=last).any(|u| units.contains(&u)) {
            while (first..=last).any(|u| units.contains(&u)) {
                units = self.done.wait(units).unwrap_or_else(|p| p.into_inner());
            }
            return None;
        }
        units.extend(first..=last);
        Some(FillClaim {
            gate: self,
            first,
            last,
        })
    }
}

struct FillClaim<'a> {
    gate: &'a FillGate,
    first: u64,
    last: u64,
}

impl Drop for FillClaim<'_> {
    fn drop(&mut self) {
        let mut units = self.gate.units.lock().unwrap_or_else(|p| p.into_inner());
        for u in self.first..=self.last {
            units.remove(&u);
        }
        drop(units);
        self.gate.done.notify_all();
    }
}

/// Largest buffer used for zero writes.
const ZERO_PIECE: usize = 1 << 20;

pub(crate) fn align_down(v: u64, g: u64) -> u64 {
    v - v % g
}

pub(crate) fn align_up(v: u64, g: u64) -> Option<u64> {
    v.checked_next_multiple_of(g)
}

/// The stack as seen from one level down (that level included), without filling caches: what
/// a layer completes partly written allocation units with.
pub(crate) struct Below<'a> {
    pub(crate) levels: &'a [Level],
    pub(crate) level: usize,
}

impl CurrentContent for Below<'_> {
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_level(self.levels, self.level, buf, offset, false)
    }
}

/// Read `buf` at `offset` as seen from `level` downwards.
///
/// With `fill`, cache layers keep what is read beneath them.
pub(crate) fn read_level(
    levels: &[Level],
    level: usize,
    buf: &mut [u8],
    offset: u64,
    fill: bool,
) -> Result<()> {
    let mut pos = 0usize;
    let l = &levels[level];
    let size = l.layer.size();
    while pos < buf.len() {
        let at = offset + pos as u64;
        if at >= size {
            // Past this layer's end everything reads as zeroes.
            buf[pos..].fill(0);
            break;
        }
        let want = ((buf.len() - pos) as u64).min(size - at);
        // A bounded cache: what is mapped stays until it has been read, and counts as used
        // (see `budget`).
        let pin = l.budget.as_ref().map(|b| b.pin(at, want));
        let (m, n) = l.layer.map(at, want)?;
        let n = n.clamp(1, want) as usize;
        let piece = &mut buf[pos..pos + n];
        match m {
            Mapping::Data { host_offset } => {
                l.layer.storage().read_at(piece, host_offset)?;
                drop(pin);
            }
            Mapping::Zero => piece.fill(0),
            Mapping::Special => l.layer.read_special(at, piece)?,
            Mapping::Absent if level == 0 => piece.fill(0),
            Mapping::Absent => {
                drop(pin);
                if fill && l.layer_type == Some(LayerType::Cache) && l.layer.writable() {
                    read_through_cache(levels, level, piece, at)?;
                } else {
                    read_level(levels, level - 1, piece, at, fill)?;
                }
            }
        }
        pos += n;
    }
    Ok(())
}

/// Read from beneath the cache layer at `level`, and keep what was read in the cache.
fn read_through_cache(levels: &[Level], level: usize, buf: &mut [u8], offset: u64) -> Result<()> {
    let layer = &levels[level].layer;
    let g = fill_unit(levels, level);
    let end = offset + buf.len() as u64;
    let a0 = align_down(offset, g);
    let a1 = align_up(end, g).unwrap_or(end).min(layer.size());
    let Some(_claim) = levels[level].filling.claim(a0 / g, (a1 - 1) / g) else {
        // Another thread filled (or tried to fill) these units meanwhile: read again from
        // this level, which now finds them in the cache (or fills what is still absent).
        return read_level(levels, level, buf, offset, true);
    };
    if a0 == offset && a1 == end {
        read_level(levels, level - 1, buf, offset, true)?;
        fill_cache(levels, level, buf, offset)?;
    } else {
        let mut wide = vec![0u8; (a1 - a0) as usize];
        read_level(levels, level - 1, &mut wide, a0, true)?;
        let start = (offset - a0) as usize;
        buf.copy_from_slice(&wide[start..start + buf.len()]);
        fill_cache(levels, level, &wide, a0)?;
    }
    if let Some(budget) = &levels[level].budget {
        evict(&**layer, budget, &budget.filled(a0, a1 - a0))?;
    }
    Ok(())
}

/// Evict `units` of `budget` from the cache `layer` (chosen by the budget, which waits for
/// this to end before letting reads pin them again).
pub(crate) fn evict(layer: &dyn Layer, budget: &CacheBudget, units: &[u64]) -> Result<()> {
    let unit = budget.unit();
    let size = layer.size();
    for (i, &u) in units.iter().enumerate() {
        let start = u * unit;
        if start < size {
            if let Err(e) = layer.evict(start, unit.min(size - start)) {
                budget.evicted(units, &units[i..]);
                return Err(e);
            }
        }
    }
    budget.evicted(units, &[]);
    Ok(())
}

/// The unit in which the cache layer at `level` fills: its allocation granularity, or the
/// base storage's fetch unit (a remote object) rounded up to it when that is larger.
pub(crate) fn fill_unit(levels: &[Level], level: usize) -> u64 {
    let g = levels[level].layer.allocation_granularity().max(1);
    match levels[0].layer.storage().fetch_unit() {
        Some(unit) if unit > g => align_up(unit, g).unwrap_or(g),
        _ => g,
    }
}

/// Store `data`, read from beneath, into the cache layer at `level` where it holds nothing
/// yet (the driver checks that under its own locks, so a fill never overwrites a write that
/// landed meanwhile). Runs of zeroes are recorded as zeroes, not stored as data.
fn fill_cache(levels: &[Level], level: usize, data: &[u8], offset: u64) -> Result<()> {
    let layer = &levels[level].layer;
    let g = layer.zero_granularity(true);
    let end = offset + data.len() as u64;
    // Aligned pieces of the zero granularity are classified; the unaligned edges are data.
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut push = |start: u64, stop: u64, zero: bool| match runs.last_mut() {
        Some(last) if last.2 == zero && last.1 == start => last.1 = stop,
        _ => runs.push((start, stop, zero)),
    };
    let a0 = align_up(offset, g).unwrap_or(end).min(end);
    let a1 = align_down(end, g).max(a0);
    if a0 > offset {
        push(offset, a0, false);
    }
    let mut p = a0;
    while p < a1 {
        let piece = &data[(p - offset) as usize..(p - offset + g) as usize];
        push(p, p + g, crate::storage::is_zero(piece));
        p += g;
    }
    if end > a1.max(offset) {
        push(a1.max(offset), end, false);
    }
    let below = Below { levels, level };
    for (start, stop, zero) in runs {
        if zero {
            layer.zero(&Zeroing {
                offset: start,
                len: stop - start,
                unmap: true,
                hide_below: true,
                mode: WriteMode::FillAbsent,
            })?;
        } else {
            layer.write(&Write {
                offset: start,
                data: &data[(start - offset) as usize..(stop - offset) as usize],
                mode: WriteMode::FillAbsent,
                current: &below,
            })?;
        }
    }
    Ok(())
}

/// Write `buf` at `offset` into the layer at `level`.
pub(crate) fn write_level(levels: &[Level], level: usize, buf: &[u8], offset: u64) -> Result<()> {
    levels[level].layer.write(&Write {
        offset,
        data: buf,
        mode: WriteMode::Replace,
        current: &Below { levels, level },
    })
}

/// Make `[offset, offset + len)` of the top layer read as zeroes.
pub(crate) fn zero_top(levels: &[Level], offset: u64, len: u64, unmap: bool) -> Result<()> {
    let top = levels.len() - 1;
    let layer = &levels[top].layer;
    let hide = top > 0;
    let g = layer.zero_granularity(hide);
    let end = offset + len;
    let a0 = align_up(offset, g).unwrap_or(end).min(end);
    let a1 = align_down(end, g).max(a0);
    if a1 > a0 {
        layer.zero(&Zeroing {
            offset: a0,
            len: a1 - a0,
            unmap,
            hide_below: hide,
            mode: WriteMode::Replace,
        })?;
    }
    for (s, e) in [(offset, a0), (a1.max(offset), end)] {
        if e > s && !reads_as_zero(levels, s, e - s)? {
            let zeroes = vec![0u8; ((e - s) as usize).min(ZERO_PIECE)];
            let mut p = s;
            while p < e {
                let n = ((e - p) as usize).min(zeroes.len());
                write_level(levels, top, &zeroes[..n], p)?;
                p += n as u64;
            }
        }
    }
    Ok(())
}

/// Whether the whole range is known to read as zeroes (from mapping answers alone).
fn reads_as_zero(levels: &[Level], offset: u64, len: u64) -> Result<bool> {
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let e = status(levels, pos, end - pos)?;
        if !e.reads_as_zero() {
            return Ok(false);
        }
        pos += e.length;
    }
    Ok(true)
}

/// The status of the run starting at `offset` (at most `len` bytes) through the whole stack.
pub(crate) fn status(levels: &[Level], offset: u64, len: u64) -> Result<Extent> {
    let n_levels = levels.len();
    let mut len = len;
    for level in (0..n_levels).rev() {
        let depth = (n_levels - level) as u32;
        let layer = &levels[level].layer;
        let size = layer.size();
        if offset >= size {
            return Ok(Extent {
                offset,
                length: len,
                kind: ExtentKind::Zero,
                depth,
                host_offset: None,
            });
        }
        let (m, n) = layer.map_status(offset, len.min(size - offset))?;
        len = n.clamp(1, len);
        match m {
            Mapping::Data { host_offset } => {
                return Ok(Extent {
                    offset,
                    length: len,
                    kind: ExtentKind::Data,
                    depth,
                    host_offset: Some(host_offset),
                })
            }
            Mapping::Special => {
                return Ok(Extent {
                    offset,
                    length: len,
                    kind: ExtentKind::Data,
                    depth,
                    host_offset: None,
                })
            }
            Mapping::Zero => {
                return Ok(Extent {
                    offset,
                    length: len,
                    kind: ExtentKind::Zero,
                    depth,
                    host_offset: None,
                })
            }
            Mapping::Absent => {}
        }
    }
    Ok(Extent {
        offset,
        length: len,
        kind: ExtentKind::Absent,
        depth: 0,
        host_offset: None,
    })
}
