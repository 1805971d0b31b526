//! Generic I/O over a stack of layers, driven only by the layers' mapping answers.
//!
//! Layers are ordered bottom (base, index 0) to top. Reads walk down on [`Mapping::Absent`];
//! a cache layer is filled with what was read beneath it; writes go to the top layer, widened
//! to the layer's allocation granularity with the current content where needed.

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::layer::LayerType;
use crate::layer::{Layer, WritePlan};
use crate::mapping::{Extent, ExtentKind, Mapping};

/// One level of a stack.
#[derive(Debug)]
pub(crate) struct Level {
    pub(crate) layer: Arc<dyn Layer>,
    pub(crate) layer_type: Option<LayerType>,
    /// Serialises allocations (and their read-modify-write fills) in this layer.
    pub(crate) alloc_lock: Mutex<()>,
}

impl Level {
    pub(crate) fn new(layer: Arc<dyn Layer>, layer_type: Option<LayerType>) -> Level {
        Level {
            layer,
            layer_type,
            alloc_lock: Mutex::new(()),
        }
    }
}

/// Largest buffer used for gap fills and zero writes.
const ZERO_PIECE: usize = 1 << 20;

pub(crate) fn align_down(v: u64, g: u64) -> u64 {
    v - v % g
}

pub(crate) fn align_up(v: u64, g: u64) -> Option<u64> {
    v.checked_next_multiple_of(g)
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
        let (m, n) = l.layer.map(at, want)?;
        let n = n.clamp(1, want) as usize;
        let piece = &mut buf[pos..pos + n];
        match m {
            Mapping::Data { host_offset } => l.layer.storage().read_at(piece, host_offset)?,
            Mapping::Zero => piece.fill(0),
            Mapping::Special => l.layer.read_special(at, piece)?,
            Mapping::Absent if level == 0 => piece.fill(0),
            Mapping::Absent => {
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
    let g = layer.allocation_granularity();
    let end = offset + buf.len() as u64;
    let a0 = align_down(offset, g);
    let a1 = align_up(end, g).unwrap_or(end).min(layer.size());
    if a0 == offset && a1 == end {
        read_level(levels, level - 1, buf, offset, true)?;
        return fill_cache(levels, level, buf, offset);
    }
    let mut wide = vec![0u8; (a1 - a0) as usize];
    read_level(levels, level - 1, &mut wide, a0, true)?;
    let start = (offset - a0) as usize;
    buf.copy_from_slice(&wide[start..start + buf.len()]);
    fill_cache(levels, level, &wide, a0)
}

/// Store `data`, read from beneath, into the cache layer at `level` where it is still absent.
/// Runs of zeroes are recorded as zeroes, not stored as data.
fn fill_cache(levels: &[Level], level: usize, data: &[u8], offset: u64) -> Result<()> {
    let mut pos = 0usize;
    let layer = &levels[level].layer;
    while pos < data.len() {
        let at = offset + pos as u64;
        let (m, n) = layer.map(at, (data.len() - pos) as u64)?;
        let n = n as usize;
        if m == Mapping::Absent {
            fill_absent(levels, level, &data[pos..pos + n], at)?;
        }
        pos += n;
    }
    Ok(())
}

/// Fill one run the cache layer at `level` does not hold yet.
fn fill_absent(levels: &[Level], level: usize, data: &[u8], offset: u64) -> Result<()> {
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
    for (start, stop, zero) in runs {
        let len = stop - start;
        if zero {
            let _guard = levels[level].alloc_lock.lock().unwrap_or_else(|e| e.into_inner());
            if layer.map(start, len)? == (Mapping::Absent, len) {
                layer.set_zero(start, len, true, true)?;
                continue;
            }
        }
        let piece = &data[(start - offset) as usize..(stop - offset) as usize];
        // Another reader may have filled part of this range meanwhile: write only what is
        // still absent.
        let mut q = 0usize;
        while q < piece.len() {
            let at = start + q as u64;
            let (m, k) = layer.map(at, (piece.len() - q) as u64)?;
            let k = k as usize;
            if m == Mapping::Absent {
                write_level(levels, level, &piece[q..q + k], at)?;
            }
            q += k;
        }
    }
    Ok(())
}

/// Write `buf` at `offset` into the layer at `level`.
pub(crate) fn write_level(levels: &[Level], level: usize, buf: &[u8], offset: u64) -> Result<()> {
    let layer = &levels[level].layer;
    let mut pos = 0usize;
    while pos < buf.len() {
        let at = offset + pos as u64;
        let rem = (buf.len() - pos) as u64;
        match layer.prepare_write(at, rem)? {
            WritePlan::InPlace { host_offset, len } => {
                let n = len.clamp(1, rem) as usize;
                layer.storage().write_at(&buf[pos..pos + n], host_offset)?;
                pos += n;
            }
            WritePlan::Allocate { len } => {
                let n = len.clamp(1, rem) as usize;
                pos += write_allocating(levels, level, &buf[pos..pos + n], at)?;
            }
        }
    }
    Ok(())
}

/// Allocate space for (a prefix of) `data` at `offset` and write it, filling the rest of the
/// granularity units with the current content. Returns how many bytes of `data` were written.
fn write_allocating(levels: &[Level], level: usize, data: &[u8], offset: u64) -> Result<usize> {
    let l = &levels[level];
    let layer = &l.layer;
    let g = layer.allocation_granularity();
    let _guard = l.alloc_lock.lock().unwrap_or_else(|e| e.into_inner());
    // Another writer may have allocated this range while we waited.
    if let WritePlan::InPlace { host_offset, len } = layer.prepare_write(offset, data.len() as u64)? {
        let n = (len as usize).clamp(1, data.len());
        layer.storage().write_at(&data[..n], host_offset)?;
        return Ok(n);
    }
    let end = offset + data.len() as u64;
    let a0 = align_down(offset, g);
    let a1 = align_up(end, g).ok_or_else(|| Error::out_of_bounds("write past the largest offset"))?;
    let alloc = layer.allocate(a0, a1 - a0)?;
    if alloc.len == 0 || alloc.len % g != 0 {
        return Err(Error::corrupt(format!(
            "layer allocated {} bytes, not a multiple of {g}",
            alloc.len
        )));
    }
    let covered = a0 + alloc.len;
    let storage = layer.storage();
    if offset > a0 {
        let mut head = vec![0u8; (offset - a0) as usize];
        read_level(levels, level, &mut head, a0, false)?;
        storage.write_at(&head, alloc.host_offset)?;
    }
    let n = (covered.min(end) - offset) as usize;
    storage.write_at(&data[..n], alloc.host_offset + (offset - a0))?;
    if covered > end {
        let mut tail = vec![0u8; (covered - end) as usize];
        read_level(levels, level, &mut tail, end, false)?;
        storage.write_at(&tail, alloc.host_offset + (end - a0))?;
    }
    layer.commit(a0, alloc.len)?;
    Ok(n)
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
        let _guard = levels[top].alloc_lock.lock().unwrap_or_else(|e| e.into_inner());
        layer.set_zero(a0, a1 - a0, unmap, hide)?;
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
