//! RAW images: the file is the disk.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};
use crate::formats::{CreateOptions, FormatDriver, LayerOpen};
use crate::layer::ImageFormat;
use crate::layer::{Access, Health, Layer, LayerInfo, Write, WriteMode, Zeroing};
use crate::mapping::Mapping;
use crate::storage::Storage;

/// Requests at least this long look for a hole where they start (see [`RawImage`]'s `map`).
const SPARSE_READ_MIN: u64 = 128 << 10;

/// Data and hole extents remembered for a RAW parent, at most.
const MAX_KNOWN_EXTENTS: usize = 1 << 16;
/// Extents learned on the way to the one a read asks about, at most.
const LEARN_WALK: usize = 16;

/// The RAW driver: no signature, the file is the disk.
pub(crate) static DRIVER: Driver = Driver;

/// See [`DRIVER`].
pub(crate) struct Driver;

impl FormatDriver for Driver {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn recognises(&self, _head: &[u8]) -> bool {
        false
    }

    fn open(&self, storage: Arc<dyn Storage>, how: &LayerOpen<'_>) -> Result<Arc<dyn Layer>> {
        // A RAW file records no layer type, so it is never a cache layer.
        Ok(Arc::new(match how.access {
            Access::Parent(_) => RawImage::open_parent(storage, how.raw_block_size)?,
            access => RawImage::open(storage, how.raw_block_size, matches!(access, Access::ReadWrite))?,
        }))
    }

    fn create(&self, storage: Arc<dyn Storage>, options: &CreateOptions) -> Result<Arc<dyn Layer>> {
        Ok(Arc::new(RawImage::create(
            storage,
            options.size,
            options.block_size,
        )?))
    }
}

/// A RAW image.
#[derive(Debug)]
pub struct RawImage {
    storage: Arc<dyn Storage>,
    size: AtomicU64,
    block_size: u32,
    writable: bool,
    /// For a parent in a stack (which nothing writes while it is open): the data and hole
    /// extents learned so far, so that reads of any size skip holes without a system call.
    known: Option<KnownExtents>,
    health: Health,
}

/// Extents of a file that does not change, learned with `SEEK_DATA`/`SEEK_HOLE` as reads ask.
#[derive(Debug)]
struct KnownExtents {
    /// Start -> (end, hole). Ranges may overlap only where they describe the same extent.
    map: RwLock<BTreeMap<u64, (u64, bool)>>,
    limit: usize,
}

impl KnownExtents {
    fn new(limit: usize) -> Self {
        KnownExtents {
            map: RwLock::new(BTreeMap::new()),
            limit,
        }
    }

    /// The known extent holding `offset`: (end, hole).
    fn get(&self, offset: u64) -> Option<(u64, bool)> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.range(..=offset)
            .next_back()
            .map(|(_, &v)| v)
            .filter(|&(end, _)| offset < end)
    }

    /// The end of the last known extent that starts at or before `offset`, if it ends at or
    /// before `offset`.
    fn end_before(&self, offset: u64) -> Option<u64> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.range(..=offset)
            .next_back()
            .map(|(_, &(end, _))| end)
            .filter(|&end| end <= offset)
    }

    /// Learn the extent `[start, end)` unless the limit is reached; returns whether there was
    /// room. Remembered ranges starting inside it describe the same extent and are dropped.
    fn learn(&self, start: u64, end: u64, hole: bool) -> bool {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.limit {
            return false;
        }
        let inside: Vec<u64> = map.range(start..end).map(|(&k, _)| k).collect();
        for k in inside {
            map.remove(&k);
        }
        map.insert(start, (end, hole));
        true
    }

    fn forget(&self) {
        self.map.write().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl RawImage {
    /// Open `storage` as a RAW image.
    pub fn open(storage: Arc<dyn Storage>, block_size: u32, writable: bool) -> Result<Self> {
        if block_size != 512 && block_size != 4096 {
            return Err(Error::invalid_argument("block size must be 512 or 4096"));
        }
        let size = storage.len()?;
        Ok(RawImage {
            writable: writable && !storage.read_only(),
            storage,
            size: AtomicU64::new(size),
            block_size,
            known: None,
            health: Health::new(),
        })
    }

    /// Open `storage` read-only as the parent of a stack: nothing may write it while it is
    /// open, so its holes are learned once and then skipped by reads of any size.
    pub(crate) fn open_parent(storage: Arc<dyn Storage>, block_size: u32) -> Result<Self> {
        let mut raw = RawImage::open(storage, block_size, false)?;
        raw.known = Some(KnownExtents::new(MAX_KNOWN_EXTENTS));
        Ok(raw)
    }

    /// The answer from the known extents, learning the one at `offset` if there is room.
    /// `None` when the limit is reached and the extent is not known.
    fn map_known(&self, known: &KnownExtents, offset: u64, len: u64) -> Result<Option<(Mapping, u64)>> {
        let (end, hole) = match known.get(offset) {
            Some(ext) => ext,
            None => match self.learn(known, offset)? {
                Some(ext) => ext,
                None => return Ok(None),
            },
        };
        let n = (end - offset).min(len);
        Ok(Some(if hole {
            (Mapping::Zero, n)
        } else {
            (Mapping::Data { host_offset: offset }, n)
        }))
    }

    /// Learn the extent holding `offset` (not known yet): (end, hole). `SEEK_DATA`/`SEEK_HOLE`
    /// only find where an extent ends, so extents are learned from the end of the nearest
    /// known one before `offset` (a true extent boundary), a few at most; an extent learned
    /// from `offset` itself would be learned again for every read before `offset` in it.
    fn learn(&self, known: &KnownExtents, offset: u64) -> Result<Option<(u64, bool)>> {
        let mut at = known.end_before(offset).unwrap_or(0);
        for step in 0..=LEARN_WALK {
            if step == LEARN_WALK {
                at = offset;
            }
            let ext = self.storage.extent(at)?;
            // Past the file's end (it shrank): leave it to the read to fail.
            if ext.end <= at || !known.learn(at, ext.end, ext.hole) {
                return Ok(None);
            }
            if ext.end > offset {
                return Ok(Some((ext.end, ext.hole)));
            }
            at = ext.end;
        }
        Ok(None)
    }

    /// Create a RAW image of `size` bytes on empty `storage`.
    pub fn create(storage: Arc<dyn Storage>, size: u64, block_size: u32) -> Result<Self> {
        storage.set_len(size)?;
        RawImage::open(storage, block_size, true)
    }
}

impl Layer for RawImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn cluster_size(&self) -> u64 {
        u64::from(self.block_size)
    }

    fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        self.health.check()?;
        // Copying a hole out of the file costs as much as copying data; zeroing the caller's
        // buffer is cheaper. For a large request one `SEEK_DATA` costs far less than the copy it
        // may save, so holes at the start of large requests are reported as zeroes. Where the
        // data ends is not asked: on some filesystems (tmpfs) `SEEK_HOLE` walks every page of
        // the data extent, so a data answer covers the rest of the request.
        if let Some(known) = &self.known {
            if let Some(answer) = self.map_known(known, offset, len)? {
                return Ok(answer);
            }
        }
        if len >= SPARSE_READ_MIN {
            match self.storage.next_data(offset)? {
                None => return Ok((Mapping::Zero, len)),
                Some(data) if data > offset => return Ok((Mapping::Zero, (data - offset).min(len))),
                Some(_) => {}
            }
        }
        Ok((Mapping::Data { host_offset: offset }, len))
    }

    fn map_status(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        // A parent answers from (and adds to) the extents its reads learn.
        if let Some(known) = &self.known {
            if let Some(answer) = self.map_known(known, offset, len)? {
                return Ok(answer);
            }
        }
        let ext = self.storage.extent(offset)?;
        let n = ext.end.saturating_sub(offset).clamp(1, len);
        if ext.hole {
            Ok((Mapping::Zero, n))
        } else {
            Ok((Mapping::Data { host_offset: offset }, n))
        }
    }

    fn write(&self, request: &Write<'_>) -> Result<()> {
        self.health.check()?;
        if !self.writable {
            return Err(Error::from_kind(crate::ErrorKind::ReadOnly));
        }
        // A RAW image holds every byte: a fill has nothing to store.
        if request.mode == WriteMode::FillAbsent {
            return Ok(());
        }
        let _changing = self.health.changing()?;
        self.storage.write_at(request.data, request.offset)
    }

    fn zero_granularity(&self, _hide_below: bool) -> u64 {
        1
    }

    fn zero(&self, request: &Zeroing) -> Result<()> {
        self.health.check()?;
        if !self.writable {
            return Err(Error::from_kind(crate::ErrorKind::ReadOnly));
        }
        if request.mode == WriteMode::FillAbsent {
            return Ok(());
        }
        if let Some(known) = &self.known {
            known.forget();
        }
        let _changing = self.health.changing()?;
        if request.unmap {
            self.storage.punch_hole(request.offset, request.len)
        } else {
            self.storage.write_zeroes(request.offset, request.len)
        }
    }

    fn flush(&self) -> Result<()> {
        self.health.check()?;
        self.storage.sync()
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        if let Some(known) = &self.known {
            known.forget();
        }
        self.storage.set_len(new_size)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn layer_info(&self) -> LayerInfo {
        LayerInfo::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::FileStorage;

    /// A sparse file: data in `[64K, 128K)` and `[1M, 1M + 4K)`, holes elsewhere, 2 MiB long.
    fn sparse() -> (tempfile::TempDir, RawImage) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.raw");
        let storage = FileStorage::create_new(&path).unwrap();
        storage.set_len(2 << 20).unwrap();
        storage.write_at(&[1; 64 << 10], 64 << 10).unwrap();
        storage.write_at(&[2; 4096], 1 << 20).unwrap();
        (dir, RawImage::open(Arc::new(storage), 512, false).unwrap())
    }

    #[test]
    fn large_reads_see_holes_where_they_start() {
        let (_dir, raw) = sparse();
        // Whether this filesystem reports holes at all (tmpfs and ext4 do); without it every
        // answer is data, which is also correct.
        let holes = raw.storage.extent(0).unwrap().hole;
        let zero_or_data = |offset: u64, zero_len: u64, len: u64| {
            if holes {
                (Mapping::Zero, zero_len)
            } else {
                (Mapping::Data { host_offset: offset }, len)
            }
        };
        // A hole at the start of a large request: zeroes up to the next data.
        assert_eq!(
            raw.map(0, 512 << 10).unwrap(),
            zero_or_data(0, 64 << 10, 512 << 10)
        );
        // From inside the hole.
        assert_eq!(
            raw.map(4096, SPARSE_READ_MIN).unwrap(),
            zero_or_data(4096, 60 << 10, SPARSE_READ_MIN)
        );
        // Data at the start: the rest of the request is data, holes after it included.
        assert_eq!(
            raw.map(64 << 10, 1 << 20).unwrap(),
            (
                Mapping::Data {
                    host_offset: 64 << 10
                },
                1 << 20
            )
        );
        // No data after the offset at all.
        let at = (1 << 20) + 8192;
        assert_eq!(
            raw.map(at, SPARSE_READ_MIN).unwrap(),
            zero_or_data(at, SPARSE_READ_MIN, SPARSE_READ_MIN)
        );
    }

    #[test]
    fn parents_learn_extents_and_answer_reads_of_any_size() {
        let (dir, standalone) = sparse();
        let holes = standalone.storage.extent(0).unwrap().hole;
        let storage = FileStorage::open(dir.path().join("sparse.raw"), false).unwrap();
        let raw = RawImage::open_parent(Arc::new(storage), 512).unwrap();
        let data = |at: u64, n: u64| (Mapping::Data { host_offset: at }, n);
        let zero_or_data = |at: u64, n: u64| if holes { (Mapping::Zero, n) } else { data(at, n) };
        let end = 2 << 20;
        // Small reads in holes, exact ends of data runs, whatever the order of the questions.
        assert_eq!(raw.map(4096, 512).unwrap(), zero_or_data(4096, 512));
        assert_eq!(
            raw.map(512, 1 << 20).unwrap(),
            zero_or_data(512, (64 << 10) - 512)
        );
        assert_eq!(
            raw.map(100 << 10, 1 << 20).unwrap(),
            if holes {
                data(100 << 10, 28 << 10)
            } else {
                data(100 << 10, 1 << 20)
            }
        );
        assert_eq!(raw.map(64 << 10, 4096).unwrap(), data(64 << 10, 4096));
        assert_eq!(raw.map(0, 4096).unwrap(), zero_or_data(0, 4096));
        assert_eq!(raw.map(end - 4096, 4096).unwrap(), zero_or_data(end - 4096, 4096));
        // What is remembered are the file's true extents, each once.
        let known = raw.known.as_ref().unwrap();
        let learned: Vec<(u64, (u64, bool))> =
            known.map.read().unwrap().iter().map(|(&k, &v)| (k, v)).collect();
        let mib = 1 << 20;
        let expect = if holes {
            vec![
                (0, (64 << 10, true)),
                (64 << 10, (128 << 10, false)),
                (128 << 10, (mib, true)),
                (mib, (mib + 4096, false)),
                (mib + 4096, (end, true)),
            ]
        } else {
            vec![(0, (end, false))]
        };
        assert_eq!(learned, expect);
        // Once the limit is reached, unknown extents are answered as a standalone image does.
        let full = RawImage {
            known: Some(KnownExtents::new(1)),
            ..RawImage::open(raw.storage.clone(), 512, false).unwrap()
        };
        // (The walk to 64K learns the hole before it, then finds no room.)
        assert_eq!(full.map(64 << 10, 512).unwrap(), data(64 << 10, 512));
        assert_eq!(full.map(4096, 512).unwrap(), zero_or_data(4096, 512));
        assert_eq!(full.map(70 << 10, 512).unwrap(), data(70 << 10, 512));
        assert_eq!(full.map(1 << 20, 4096).unwrap(), data(1 << 20, 4096));
    }

    #[test]
    fn parents_answer_block_status_from_the_extents_they_know() {
        let (dir, standalone) = sparse();
        let storage = FileStorage::open(dir.path().join("sparse.raw"), false).unwrap();
        let raw = RawImage::open_parent(Arc::new(storage), 512).unwrap();
        let end = 2 << 20;
        let mut at = 0;
        while at < end {
            let answer = raw.map_status(at, end - at).unwrap();
            assert_eq!(answer, standalone.map_status(at, end - at).unwrap(), "at {at}");
            at += answer.1;
        }
        // Block status learned the extents: reads of any size now skip the holes it found.
        let known = raw.known.as_ref().unwrap();
        let learned = known.map.read().unwrap().len();
        let holes = standalone.storage.extent(0).unwrap().hole;
        assert_eq!(learned, if holes { 5 } else { 1 });
    }

    #[test]
    fn known_extents_replace_the_ranges_they_cover() {
        let known = KnownExtents::new(8);
        assert!(known.learn(300, 400, false));
        assert!(known.learn(350, 400, false));
        assert!(known.learn(100, 400, false));
        assert_eq!(known.map.read().unwrap().len(), 1);
        assert!(known.learn(400, 500, true));
        assert_eq!(known.get(99), None);
        assert_eq!(known.get(100), Some((400, false)));
        assert_eq!(known.get(399), Some((400, false)));
        assert_eq!(known.get(400), Some((500, true)));
        assert_eq!(known.get(500), None);
        known.forget();
        assert_eq!(known.get(100), None);
    }

    #[test]
    fn small_reads_never_ask_for_holes() {
        let (_dir, raw) = sparse();
        let small = SPARSE_READ_MIN - 1;
        assert_eq!(
            raw.map(0, small).unwrap(),
            (Mapping::Data { host_offset: 0 }, small)
        );
    }
}
