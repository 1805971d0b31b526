//! In-memory storage with fault injection and power-loss simulation, for tests.
//!
//! [`MemStorage`] keeps the bytes a reader sees now, plus what would survive a power loss: the
//! state at the last [`Storage::sync`] and the writes since then, in order. [`MemStorage::crash`]
//! builds a storage holding the synced state plus any chosen subset of the later writes, split
//! into 512-byte sectors, which models torn and reordered writes.

use std::sync::{Mutex, MutexGuard};

use super::{Storage, StorageExtent};
use crate::error::{Error, ErrorKind, Result};

/// A fault to inject into [`MemStorage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fail every write (and set_len, hole punch, zeroing) after this many more succeed.
    WritesAfter(u64),
    /// Fail every read after this many more succeed.
    ReadsAfter(u64),
    /// Fail every sync after this many more succeed (a power cut in the middle of a flush,
    /// when combined with [`MemStorage::crash`]).
    SyncsAfter(u64),
    /// Panic in the write after this many more succeed (a bug in the middle of a change).
    PanicAfterWrites(u64),
}

#[derive(Debug, Clone)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct State {
    data: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Pending>,
    track_crash: bool,
    faults: Vec<Fault>,
    writes: u64,
    reads: u64,
    read_bytes: u64,
    syncs: u64,
}

/// Storage in memory. See the module documentation.
#[derive(Debug, Default)]
pub struct MemStorage {
    state: Mutex<State>,
}

const SECTOR: u64 = 512;
/// Refuse to grow memory storage beyond this (a guard against absurd offsets in tests).
const MAX_LEN: u64 = 1 << 34;

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        MemStorage::default()
    }

    /// A storage holding `data`, all of it durable.
    pub fn from_bytes(data: Vec<u8>) -> Self {
        let s = MemStorage::new();
        {
            let mut st = s.lock();
            st.durable = data.clone();
            st.data = data;
        }
        s
    }

    /// Record writes so that [`MemStorage::crash`] can replay subsets of them.
    pub fn track_crashes(&self) {
        let mut st = self.lock();
        st.track_crash = true;
        st.durable = st.data.clone();
        st.pending.clear();
    }

    /// Add a fault.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// Remove all faults.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// A copy of the current bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    /// Counters: (reads, bytes read, writes, syncs).
    pub fn counters(&self) -> (u64, u64, u64, u64) {
        let st = self.lock();
        (st.reads, st.read_bytes, st.writes, st.syncs)
    }

    /// The number of unsynced sector writes a crash could keep or drop.
    pub fn pending_sectors(&self) -> usize {
        let st = self.lock();
        st.pending.iter().map(|p| sectors(p).len()).sum()
    }

    /// A new storage as it would be after a power loss now: the last synced state, plus the
    /// unsynced sector writes for which `keep(index)` returns true, applied in order.
    pub fn crash(&self, mut keep: impl FnMut(usize) -> bool) -> MemStorage {
        let st = self.lock();
        let mut image = st.durable.clone();
        let mut index = 0;
        for p in &st.pending {
            match p {
                Pending::SetLen(len) => {
                    // A size change is metadata: model it as all-or-nothing.
                    if keep(index) {
                        image.resize(*len as usize, 0);
                    }
                    index += 1;
                }
                Pending::Write { .. } => {
                    for (off, bytes) in sectors(p) {
                        if keep(index) {
                            let end = off as usize + bytes.len();
                            if image.len() < end {
                                image.resize(end, 0);
                            }
                            image[off as usize..end].copy_from_slice(bytes);
                        }
                        index += 1;
                    }
                }
            }
        }
        MemStorage::from_bytes(image)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain bytes behind; keep using them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_locked(st: &mut State, offset: u64, buf: &[u8]) -> Result<()> {
        check_fault_write(st)?;
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= MAX_LEN)
            .ok_or_else(|| Error::out_of_bounds("memory storage offset too large"))?;
        if (st.data.len() as u64) < end {
            st.data.resize(end as usize, 0);
        }
        st.data[offset as usize..end as usize].copy_from_slice(buf);
        if st.track_crash {
            st.pending.push(Pending::Write {
                offset,
                data: buf.to_vec(),
            });
        }
        Ok(())
    }
}

fn sectors(p: &Pending) -> Vec<(u64, &[u8])> {
    let Pending::Write { offset, data } = p else {
        return vec![(0, &[][..])];
    };
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let abs = offset + pos as u64;
        let room = (SECTOR - abs % SECTOR) as usize;
        let n = room.min(data.len() - pos);
        out.push((abs, &data[pos..pos + n]));
        pos += n;
    }
    out
}

fn check_fault_write(st: &mut State) -> Result<()> {
    st.writes += 1;
    let mut panic_now = false;
    for f in &mut st.faults {
        match f {
            Fault::WritesAfter(0) => return Err(Error::new(ErrorKind::Io, "injected write fault")),
            Fault::WritesAfter(n) => *n -= 1,
            Fault::PanicAfterWrites(0) => {
                *f = Fault::PanicAfterWrites(u64::MAX);
                panic_now = true;
            }
            Fault::PanicAfterWrites(n) => *n -= 1,
            _ => {}
        }
    }
    if panic_now {
        return Err(Error::new(ErrorKind::Failed, "panic"));
    }
    Ok(())
}

/// Panic (outside the storage's own lock) if `r` asks for it.
fn panic_if_asked(r: Result<()>) -> Result<()> {
    match r {
        Err(e) if e.kind() == ErrorKind::Failed => panic!("injected panic in a storage write"),
        r => r,
    }
}

impl Storage for MemStorage {
    fn len(&self) -> Result<u64> {
        Ok(self.lock().data.len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut st = self.lock();
        st.reads += 1;
        st.read_bytes += buf.len() as u64;
        for f in &mut st.faults {
            if let Fault::ReadsAfter(n) = f {
                if *n == 0 {
                    return Err(Error::new(ErrorKind::Io, "injected read fault").with_offset(offset));
                }
                *n -= 1;
            }
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::out_of_bounds("offset overflow"))?;
        if end > st.data.len() as u64 {
            return Err(Error::corrupt("storage is truncated").with_offset(offset));
        }
        buf.copy_from_slice(&st.data[offset as usize..end as usize]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let r = {
            let mut st = self.lock();
            MemStorage::write_locked(&mut st, offset, buf)
        };
        panic_if_asked(r)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        let mut st = self.lock();
        check_fault_write(&mut st)?;
        if len > MAX_LEN {
            return Err(Error::out_of_bounds("memory storage too large"));
        }
        st.data.resize(len as usize, 0);
        if st.track_crash {
            st.pending.push(Pending::SetLen(len));
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let mut st = self.lock();
        let cur = st.data.len() as u64;
        let end = offset.saturating_add(len).min(cur);
        if offset >= end {
            return Ok(());
        }
        let zeroes = vec![0u8; (end - offset) as usize];
        MemStorage::write_locked(&mut st, offset, &zeroes)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let mut st = self.lock();
        let zeroes = vec![0u8; usize::try_from(len).map_err(|_| Error::out_of_bounds("length too large"))?];
        MemStorage::write_locked(&mut st, offset, &zeroes)
    }

    fn sync(&self) -> Result<()> {
        let mut st = self.lock();
        st.syncs += 1;
        for f in &mut st.faults {
            if let Fault::SyncsAfter(n) = f {
                if *n == 0 {
                    return Err(Error::new(ErrorKind::Io, "injected sync fault"));
                }
                *n -= 1;
            }
        }
        if st.track_crash {
            st.durable = st.data.clone();
            st.pending.clear();
        }
        Ok(())
    }

    fn extent(&self, offset: u64) -> Result<StorageExtent> {
        Ok(StorageExtent {
            hole: false,
            end: self.len()?.max(offset),
        })
    }

    fn allocated_bytes(&self) -> Result<Option<u64>> {
        Ok(Some(self.len()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_keeps_synced_state_and_chosen_sectors() {
        let s = MemStorage::new();
        s.track_crashes();
        s.write_at(&[1; 1024], 0).unwrap();
        s.sync().unwrap();
        s.write_at(&[2; 1024], 0).unwrap();
        assert_eq!(s.pending_sectors(), 2);
        let none = s.crash(|_| false).to_bytes();
        assert_eq!(none, vec![1; 1024]);
        let first = s.crash(|i| i == 0).to_bytes();
        assert_eq!(&first[..512], &[2; 512][..]);
        assert_eq!(&first[512..], &[1; 512][..]);
    }

    #[test]
    fn faults_fire_after_count() {
        let s = MemStorage::new();
        s.inject(Fault::WritesAfter(1));
        s.write_at(&[1], 0).unwrap();
        assert_eq!(s.write_at(&[1], 0).unwrap_err().kind(), ErrorKind::Io);
        s.clear_faults();
        s.write_at(&[1], 0).unwrap();
    }

    #[test]
    fn read_past_end_is_truncation() {
        let s = MemStorage::from_bytes(vec![0; 10]);
        let mut b = [0u8; 4];
        assert_eq!(s.read_at(&mut b, 8).unwrap_err().kind(), ErrorKind::Corrupt);
    }
}
