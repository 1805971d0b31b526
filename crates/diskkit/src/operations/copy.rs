//! Whole-image operations built on extents: sparse copy (convert) and compare.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::image::DiskImage;
use crate::mapping::Extent;
pub use crate::storage::is_zero;

/// Bytes read per request while copying or comparing.
const BUFFER: usize = 4 << 20;
/// Runs of zeroes at least this long (and aligned to it) are not written by [`copy`].
const ZERO_GRANULE: usize = 4096;

/// What [`copy`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes of the source that were read.
    pub bytes_read: u64,
    /// Bytes written to the destination.
    pub bytes_written: u64,
}

/// Bytes of the disk one worker of [`copy`] handles at a time.
const STRIPE: u64 = 32 << 20;
/// The most worker threads [`copy`] uses.
const MAX_WORKERS: usize = 4;

/// Copy the virtual disk of `src` into `dst` (at least as large), skipping every range that
/// reads as zeroes: ranges the source maps as zero or absent are never read, and data that turns
/// out to be zero is not written. `dst` must read as zeroes everywhere beforehand (a new image).
/// `progress` is called with the number of source bytes done so far.
///
/// The disk is split into stripes that a few worker threads copy in parallel (both images are
/// shared across threads); memory use is one buffer per worker.
pub fn copy(src: &DiskImage, dst: &DiskImage, progress: &mut dyn FnMut(u64)) -> Result<CopyStats> {
    let size = src.size();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_WORKERS)
        .min(size.div_ceil(STRIPE).max(1) as usize);
    if workers <= 1 {
        let mut buf = vec![0u8; BUFFER];
        return copy_range(src, dst, 0, size, &mut buf, &mut |n| progress(n));
    }
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let read = AtomicU64::new(0);
    let written = AtomicU64::new(0);
    let running = AtomicUsize::new(workers);
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut buf = vec![0u8; BUFFER];
                loop {
                    let start = next.fetch_add(STRIPE, Ordering::Relaxed);
                    if start >= size || lock(&failed).is_some() {
                        break;
                    }
                    let end = (start + STRIPE).min(size);
                    let mut last = start;
                    let r = copy_range(src, dst, start, end, &mut buf, &mut |pos| {
                        done.fetch_add(pos - last, Ordering::Relaxed);
                        last = pos;
                    });
                    match r {
                        Ok(stats) => {
                            read.fetch_add(stats.bytes_read, Ordering::Relaxed);
                            written.fetch_add(stats.bytes_written, Ordering::Relaxed);
                        }
                        Err(e) => {
                            lock(&failed).get_or_insert(e);
                            break;
                        }
                    }
                }
                running.fetch_sub(1, Ordering::Release);
            });
        }
        while running.load(Ordering::Acquire) > 0 {
            progress(done.load(Ordering::Relaxed));
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });
    if let Some(e) = lock(&failed).take() {
        return Err(e);
    }
    progress(size);
    Ok(CopyStats {
        bytes_read: read.into_inner(),
        bytes_written: written.into_inner(),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Copy `[start, end)` of `src` into `dst` (see [`copy`]); `progress` gets the offset reached.
fn copy_range(
    src: &DiskImage,
    dst: &DiskImage,
    start: u64,
    end: u64,
    buf: &mut [u8],
    progress: &mut dyn FnMut(u64),
) -> Result<CopyStats> {
    let mut stats = CopyStats::default();
    src.for_each_extent(start, end - start, |e: Extent| {
        if !e.reads_as_zero() {
            let mut pos = e.offset;
            while pos < e.end() {
                let n = ((e.end() - pos) as usize).min(buf.len());
                let piece = &mut buf[..n];
                src.read_at(piece, pos)?;
                stats.bytes_read += n as u64;
                stats.bytes_written += write_nonzero(dst, piece, pos)?;
                pos += n as u64;
                progress(pos);
            }
        }
        progress(e.end());
        Ok(())
    })?;
    Ok(stats)
}

/// Write the parts of `buf` that are not zero granules; returns the bytes written.
fn write_nonzero(dst: &DiskImage, buf: &[u8], offset: u64) -> Result<u64> {
    let mut written = 0;
    let mut run_start: Option<usize> = None;
    let mut i = 0;
    while i < buf.len() {
        // Granules are aligned to the guest offset so that holes line up with blocks.
        let to_boundary = ZERO_GRANULE - ((offset as usize + i) % ZERO_GRANULE);
        let end = (i + to_boundary).min(buf.len());
        let zero = is_zero(&buf[i..end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                dst.write_at(&buf[s..i], offset + s as u64)?;
                written += (i - s) as u64;
                run_start = None;
            }
            _ => {}
        }
        i = end;
    }
    if let Some(s) = run_start {
        dst.write_at(&buf[s..], offset + s as u64)?;
        written += (buf.len() - s) as u64;
    }
    Ok(written)
}

/// Compare two virtual disks byte for byte, like `qemu-img compare`: the common part must be
/// equal, and the part of the larger disk past the smaller one's end must read as zeroes.
/// Returns the first differing offset, or `None` when the disks read the same.
pub fn compare(a: &DiskImage, b: &DiskImage, progress: &mut dyn FnMut(u64)) -> Result<Option<u64>> {
    let common = a.size().min(b.size());
    let mut ba = vec![0u8; BUFFER];
    let mut bb = vec![0u8; BUFFER];
    let mut pos = 0u64;
    while pos < common {
        let ea = a.status(pos, (common - pos).min(BUFFER as u64))?;
        let eb = b.status(pos, ea.length)?;
        let n = eb.length as usize;
        if !(ea.reads_as_zero() && eb.reads_as_zero()) {
            let (x, y) = (&mut ba[..n], &mut bb[..n]);
            if ea.reads_as_zero() {
                x.fill(0);
            } else {
                a.read_at(x, pos)?;
            }
            if eb.reads_as_zero() {
                y.fill(0);
            } else {
                b.read_at(y, pos)?;
            }
            if let Some(i) = x.iter().zip(y.iter()).position(|(p, q)| p != q) {
                return Ok(Some(pos + i as u64));
            }
        }
        pos += n as u64;
        progress(pos);
    }
    let longer = if a.size() > b.size() { a } else { b };
    while pos < longer.size() {
        let e = longer.status(pos, (longer.size() - pos).min(BUFFER as u64))?;
        let n = e.length as usize;
        if !e.reads_as_zero() {
            longer.read_at(&mut ba[..n], pos)?;
            if let Some(i) = ba[..n].iter().position(|&p| p != 0) {
                return Ok(Some(pos + i as u64));
            }
        }
        pos += n as u64;
        progress(pos);
    }
    Ok(None)
}
