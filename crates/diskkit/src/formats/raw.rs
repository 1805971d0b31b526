//! RAW images: the file is the disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::layer::{Layer, LayerInfo, WritePlan};
use crate::mapping::Mapping;
use crate::options::ImageFormat;
use crate::storage::Storage;

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
