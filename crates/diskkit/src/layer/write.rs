//! The typed write path.
//!
//! A write reaches a layer as one call, [`crate::Layer::write`], and the driver owns
//! everything that happens inside it: finding where the bytes go, allocating space,
//! completing partly written allocation units with the current content, and recording the
//! new mapping. Drivers that allocate in units (ASIF chunks and blocks, qcow2 clusters)
//! implement [`Allocator`] and call [`write_through`], which runs the protocol in the one
//! order that is safe:
//!
//! 1. [`Allocator::plan`] says whether the range is already backed ([`WritePlan::InPlace`])
//!    or needs space ([`WritePlan::Allocate`]);
//! 2. an in-place write holds a *shared* [`RangeLocks`] guard over its range (so nothing
//!    releases the space under it); an allocating write holds an *exclusive* guard over the
//!    allocation units it touches, plans again under it, and then
//! 3. [`Allocator::reserve`] returns a [`Reservation`], a token that must be given back to
//!    [`Allocator::commit`] (the data is written) or [`Allocator::release`] (it failed).
//!
//! The range guard is held from the plan to the commit, so a cache fill
//! ([`WriteMode::FillAbsent`]) that finds a range absent stores its data only if no other
//! write has stored anything there meanwhile: a fill never overwrites a guest write. No lock
//! that readers take is held across any of it; readers see the old mapping until the commit.

use std::sync::{Condvar, Mutex, MutexGuard};

use super::health::Health;
use crate::error::{Error, Result};
use crate::storage::Storage;

/// How a write treats what the layer already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// A guest write: the bytes replace whatever the range held.
    Replace,
    /// A cache fill: the bytes (read from beneath) are stored only where the layer holds
    /// nothing yet, atomically with respect to every other write. Ranges that hold data or
    /// zeroes are left alone.
    FillAbsent,
}

/// The content of the stack as seen from the layer being written (the layer itself and
/// everything beneath it), used to complete allocation units that a write covers only partly.
pub trait CurrentContent {
    /// Read `buf.len()` bytes at guest `offset`; bytes past the end of the disk read as zeroes.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

/// No content beneath: everything reads as zeroes (a standalone image).
#[derive(Debug, Clone, Copy, Default)]
pub struct Zeroes;

impl CurrentContent for Zeroes {
    fn read(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
}

/// One write into a layer.
#[derive(Clone, Copy)]
pub struct Write<'a> {
    /// Guest offset of the first byte.
    pub offset: u64,
    /// The bytes.
    pub data: &'a [u8],
    /// Replace, or fill only where absent.
    pub mode: WriteMode,
    /// What partly written allocation units are completed with.
    pub current: &'a dyn CurrentContent,
}

impl std::fmt::Debug for Write<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Write")
            .field("offset", &self.offset)
            .field("len", &self.data.len())
            .field("mode", &self.mode)
            .finish()
    }
}

/// Making a range of a layer read as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Zeroing {
    /// Guest offset, aligned to [`crate::Layer::zero_granularity`].
    pub offset: u64,
    /// Length, aligned likewise.
    pub len: u64,
    /// Storage may be released.
    pub unmap: bool,
    /// The zeroes must hide the layers below (the layer is part of a stack).
    pub hide_below: bool,
    /// [`WriteMode::FillAbsent`]: only the parts the layer does not hold yet (a cache
    /// recording that a range beneath reads as zeroes).
    pub mode: WriteMode,
}

/// Where a write can go, as [`Allocator::plan`] sees it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePlan {
    /// The range is backed by `[host_offset, host_offset + len)` of the data storage, which
    /// may be overwritten in place.
    InPlace {
        /// Host offset of the first byte.
        host_offset: u64,
        /// How many bytes from the guest offset this covers (at least 1).
        len: u64,
    },
    /// Space must be allocated.
    Allocate {
        /// How many bytes from the guest offset this covers (at least 1).
        len: u64,
        /// The layer holds nothing there (a cache fill may store data). `false` when it holds
        /// something that cannot be overwritten in place (zeroes, compressed or shared data).
        absent: bool,
    },
}

/// Space reserved by [`Allocator::reserve`] for a write that has not been committed yet.
/// It must be handed to [`Allocator::commit`] or [`Allocator::release`].
#[derive(Debug)]
#[must_use = "a reservation must be committed or released"]
pub struct Reservation {
    offset: u64,
    len: u64,
    host_offset: u64,
}

impl Reservation {
    /// Guest range `[offset, offset + len)` (whole allocation units) backed from
    /// `host_offset` of the data storage.
    pub fn new(offset: u64, len: u64, host_offset: u64) -> Reservation {
        Reservation {
            offset,
            len,
            host_offset,
        }
    }

    /// Guest offset of the first reserved byte.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Reserved guest bytes (a multiple of the allocation unit).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing is reserved.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the first reserved byte goes in the data storage.
    pub fn host_offset(&self) -> u64 {
        self.host_offset
    }
}

/// The allocation protocol of a driver that stores data in units, driven by
/// [`write_through`].
pub trait Allocator {
    /// The layer's health (checked before every write).
    fn health(&self) -> &Health;

    /// The allocation unit: writes are widened to it with the current content.
    fn granularity(&self) -> u64;

    /// Where the data goes.
    fn data_storage(&self) -> &dyn Storage;

    /// The driver's range locks.
    fn range_locks(&self) -> &RangeLocks;

    /// Where a write at `offset` (at most `len` bytes) can go now.
    fn plan(&self, offset: u64, len: u64) -> Result<WritePlan>;

    /// Reserve space for `[offset, offset + len)` (aligned to the granularity, absent or not
    /// writable in place). Called under an exclusive range guard covering the range. The
    /// reservation may cover less than asked (at least one unit).
    fn reserve(&self, offset: u64, len: u64) -> Result<Reservation>;

    /// Record that the reserved range, now written, holds data.
    fn commit(&self, reservation: Reservation) -> Result<()>;

    /// Give back space reserved for a write that failed.
    fn release(&self, reservation: Reservation);
}

pub(crate) fn align_down(v: u64, g: u64) -> u64 {
    v - v % g
}

pub(crate) fn align_up(v: u64, g: u64) -> Result<u64> {
    v.checked_next_multiple_of(g)
        .ok_or_else(|| Error::out_of_bounds("write past the largest offset"))
}

/// Run the write protocol (see the module documentation) for `w`.
pub fn write_through<A: Allocator + ?Sized>(a: &A, w: &Write<'_>) -> Result<()> {
    // A panic anywhere in here marks the layer failed.
    let _changing = a.health().changing()?;
    let g = a.granularity().max(1);
    let len = w.data.len() as u64;
    let mut pos = 0u64;
    while pos < len {
        let at = w.offset + pos;
        let rem = len - pos;
        pos += match a.plan(at, rem)? {
            WritePlan::InPlace { len: n, .. }
            | WritePlan::Allocate {
                len: n,
                absent: false,
            } if w.mode == WriteMode::FillAbsent => n.clamp(1, rem),
            WritePlan::InPlace { len: n, .. } => {
                let n = n.clamp(1, rem);
                let _guard = a.range_locks().shared(at, at + n);
                // Planned again under the guard: a discard may have released the space.
                match a.plan(at, n)? {
                    WritePlan::InPlace { host_offset, len: m } => {
                        let m = m.clamp(1, n);
                        let start = (at - w.offset) as usize;
                        a.data_storage()
                            .write_at(&w.data[start..start + m as usize], host_offset)?;
                        m
                    }
                    WritePlan::Allocate { .. } => 0,
                }
            }
            WritePlan::Allocate { len: n, .. } => {
                let n = n.clamp(1, rem);
                let u0 = align_down(at, g);
                let u1 = align_up(at + n, g)?;
                let _guard = a.range_locks().exclusive(u0, u1);
                allocating_piece(a, w, at, n, g)?
            }
        };
    }
    Ok(())
}

/// Write (a prefix of) `[at, at + n)` of `w` under an exclusive guard over its allocation
/// units. Returns how many bytes were dealt with (written or, for a fill, skipped).
fn allocating_piece<A: Allocator + ?Sized>(a: &A, w: &Write<'_>, at: u64, n: u64, g: u64) -> Result<u64> {
    let start = (at - w.offset) as usize;
    let (m, absent) = match a.plan(at, n)? {
        WritePlan::InPlace { len: m, .. } if w.mode == WriteMode::FillAbsent => return Ok(m.clamp(1, n)),
        WritePlan::InPlace { host_offset, len: m } => {
            let m = m.clamp(1, n);
            a.data_storage()
                .write_at(&w.data[start..start + m as usize], host_offset)?;
            return Ok(m);
        }
        WritePlan::Allocate { len: m, absent } => (m.clamp(1, n), absent),
    };
    if w.mode == WriteMode::FillAbsent && !absent {
        return Ok(m);
    }
    let end = at + m;
    let u0 = align_down(at, g);
    let u1 = align_up(end, g)?;
    let r = a.reserve(u0, u1 - u0)?;
    if r.offset() != u0 || r.is_empty() || r.len() % g != 0 || r.len() > u1 - u0 {
        let got = (r.offset(), r.len());
        a.release(r);
        return Err(Error::corrupt(format!(
            "layer reserved {}+{} for the allocation units {u0}+{}",
            got.0,
            got.1,
            u1 - u0
        )));
    }
    let covered = u0 + r.len();
    let written = (|| {
        let storage = a.data_storage();
        if at > u0 {
            let mut head = vec![0u8; (at - u0) as usize];
            w.current.read(&mut head, u0)?;
            storage.write_at(&head, r.host_offset())?;
        }
        let k = covered.min(end) - at;
        storage.write_at(&w.data[start..start + k as usize], r.host_offset() + (at - u0))?;
        if covered > end {
            let mut tail = vec![0u8; (covered - end) as usize];
            w.current.read(&mut tail, end)?;
            storage.write_at(&tail, r.host_offset() + (end - u0))?;
        }
        Ok(k)
    })();
    match written {
        Ok(k) => {
            a.commit(r)?;
            Ok(k)
        }
        Err(e) => {
            a.release(r);
            Err(e)
        }
    }
}

/// Locks on guest ranges of one layer: shared for writes in place, exclusive for allocation,
/// zeroing and anything else that changes where a range is stored. Waiters are served in
/// arrival order among those that conflict, so a stream of shared holders cannot starve an
/// exclusive one.
#[derive(Debug, Default)]
pub struct RangeLocks {
    state: Mutex<RangeState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct RangeState {
    next_ticket: u64,
    /// Holders and waiters, in arrival order.
    entries: Vec<RangeEntry>,
}

#[derive(Debug, Clone, Copy)]
struct RangeEntry {
    ticket: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

impl RangeEntry {
    fn conflicts(&self, other: &RangeEntry) -> bool {
        (self.exclusive || other.exclusive) && self.start < other.end && other.start < self.end
    }
}

/// A held range lock; released when dropped.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    ticket: u64,
}

impl RangeLocks {
    /// No ranges locked.
    pub fn new() -> RangeLocks {
        RangeLocks::default()
    }

    /// Lock `[start, end)` shared.
    pub fn shared(&self, start: u64, end: u64) -> RangeGuard<'_> {
        self.acquire(start, end, false)
    }

    /// Lock `[start, end)` exclusively.
    pub fn exclusive(&self, start: u64, end: u64) -> RangeGuard<'_> {
        self.acquire(start, end, true)
    }

    fn state(&self) -> MutexGuard<'_, RangeState> {
        // Nothing panics while this mutex is held (it guards a list).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn acquire(&self, start: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        let mut st = self.state();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        let me = RangeEntry {
            ticket,
            start,
            end: end.max(start + 1),
            exclusive,
        };
        st.entries.push(me);
        // Wait for every earlier entry (held or waiting) that conflicts.
        while st
            .entries
            .iter()
            .take_while(|e| e.ticket != ticket)
            .any(|e| e.conflicts(&me))
        {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        RangeGuard { locks: self, ticket }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.locks.state();
        st.entries.retain(|e| e.ticket != self.ticket);
        drop(st);
        self.locks.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn shared_ranges_overlap_and_exclusive_ones_wait() {
        let locks = Arc::new(RangeLocks::new());
        let a = locks.shared(0, 100);
        let b = locks.shared(50, 150);
        let c = locks.exclusive(200, 300);
        let inside = Arc::new(AtomicUsize::new(0));
        let t = {
            let (locks, inside) = (locks.clone(), inside.clone());
            std::thread::spawn(move || {
                let _g = locks.exclusive(90, 210);
                inside.store(1, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            inside.load(Ordering::SeqCst),
            0,
            "exclusive entered over shared holders"
        );
        drop((a, b));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            inside.load(Ordering::SeqCst),
            0,
            "exclusive entered over another exclusive"
        );
        drop(c);
        t.join().unwrap();
        assert_eq!(inside.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_waiting_exclusive_holds_back_later_shared_ones() {
        let locks = Arc::new(RangeLocks::new());
        let first = locks.shared(0, 10);
        let order = Arc::new(Mutex::new(Vec::new()));
        let ex = {
            let (locks, order) = (locks.clone(), order.clone());
            std::thread::spawn(move || {
                let _g = locks.exclusive(0, 10);
                order.lock().unwrap().push("exclusive");
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let sh = {
            let (locks, order) = (locks.clone(), order.clone());
            std::thread::spawn(move || {
                let _g = locks.shared(5, 6);
                order.lock().unwrap().push("shared");
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        drop(first);
        ex.join().unwrap();
        sh.join().unwrap();
        assert_eq!(*order.lock().unwrap(), vec!["exclusive", "shared"]);
    }
}
