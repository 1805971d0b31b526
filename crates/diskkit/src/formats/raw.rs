//! RAW images: the file is the disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::layer::{Layer, LayerInfo, WritePlan};
use crate::mapping::Mapping;
use crate::options::ImageFormat;
use crate::storage::Storage;

/// Requests at least this long look for a hole where they start (see [`RawImage`]'s `map`).
const SPARSE_READ_MIN: u64 = 128 << 10;

/// A RAW image.
#[derive(Debug)]
pub struct RawImage {
    storage: Arc<dyn Storage>,
    size: AtomicU64,
    block_size: u32,
    writable: bool,
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
        })
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
        // Copying a hole out of the file costs as much as copying data; zeroing the caller's
        // buffer is cheaper. For a large request one `SEEK_DATA` costs far less than the copy it
        // may save, so holes at the start of large requests are reported as zeroes. Where the
        // data ends is not asked: on some filesystems (tmpfs) `SEEK_HOLE` walks every page of
        // the data extent, so a data answer covers the rest of the request.
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
        let ext = self.storage.extent(offset)?;
        let n = ext.end.saturating_sub(offset).clamp(1, len);
        if ext.hole {
            Ok((Mapping::Zero, n))
        } else {
            Ok((Mapping::Data { host_offset: offset }, n))
        }
    }

    fn prepare_write(&self, offset: u64, len: u64) -> Result<WritePlan> {
        Ok(WritePlan::InPlace {
            host_offset: offset,
            len,
        })
    }

    fn zero_granularity(&self, _hide_below: bool) -> u64 {
        1
    }

    fn set_zero(&self, offset: u64, len: u64, unmap: bool, _hide_below: bool) -> Result<()> {
        if unmap {
            self.storage.punch_hole(offset, len)
        } else {
            self.storage.write_zeroes(offset, len)
        }
    }

    fn flush(&self) -> Result<()> {
        self.storage.sync()
    }

    fn resize(&self, new_size: u64) -> Result<()> {
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
    fn small_reads_never_ask_for_holes() {
        let (_dir, raw) = sparse();
        let small = SPARSE_READ_MIN - 1;
        assert_eq!(
            raw.map(0, small).unwrap(),
            (Mapping::Data { host_offset: 0 }, small)
        );
    }
}
