//! How to create an image.

use crate::error::{Error, Result};
use crate::layer::ImageFormat;

/// Default ASIF chunk size.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;

/// How to create an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    pub(crate) format: ImageFormat,
    pub(crate) size: u64,
    pub(crate) block_size: u32,
    pub(crate) chunk_size: u32,
    pub(crate) cluster_size: Option<u32>,
    pub(crate) backing: Option<(String, Option<ImageFormat>)>,
    pub(crate) overwrite: bool,
}

impl CreateOptions {
    /// A RAW image of `size` bytes.
    pub fn raw(size: u64) -> Self {
        CreateOptions::new(ImageFormat::Raw, size)
    }

    /// An ASIF image of `block_count` blocks of `block_size` bytes (512 or 4096).
    pub fn asif(block_count: u64, block_size: u32) -> Self {
        let mut o = CreateOptions::new(
            ImageFormat::Asif,
            block_count.saturating_mul(u64::from(block_size)),
        );
        o.block_size = block_size;
        o
    }

    /// An image of `format` and `size` bytes, with defaults for everything else.
    pub fn new(format: ImageFormat, size: u64) -> Self {
        CreateOptions {
            format,
            size,
            block_size: 512,
            chunk_size: DEFAULT_CHUNK_SIZE,
            cluster_size: None,
            backing: None,
            overwrite: false,
        }
    }

    /// Set the block size (512 or 4096).
    pub fn block_size(mut self, block_size: u32) -> Self {
        self.block_size = block_size;
        self
    }

    /// Set the ASIF chunk size.
    pub fn chunk_size(mut self, chunk_size: u32) -> Self {
        self.chunk_size = chunk_size;
        self
    }

    /// Set the qcow2 cluster size.
    pub fn cluster_size(mut self, cluster_size: u32) -> Self {
        self.cluster_size = Some(cluster_size);
        self
    }

    /// Record a backing file (qcow2 only): its name, as the new image will look it up, and
    /// optionally its format. The backing file is not opened.
    pub fn backing_file(mut self, name: impl Into<String>, format: Option<ImageFormat>) -> Self {
        self.backing = Some((name.into(), format));
        self
    }

    /// Replace an existing file instead of failing.
    pub fn overwrite(mut self, overwrite: bool) -> Self {
        self.overwrite = overwrite;
        self
    }

    /// The format to create.
    pub fn format(&self) -> ImageFormat {
        self.format
    }

    /// The virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.backing.is_some() && self.format != ImageFormat::Qcow2 {
            return Err(Error::invalid_argument(format!(
                "{} images cannot record a backing file",
                self.format
            )));
        }
        if self.block_size != 512 && self.block_size != 4096 {
            return Err(Error::invalid_argument(format!(
                "block size must be 512 or 4096, not {}",
                self.block_size
            )));
        }
        if self.size % u64::from(self.block_size) != 0 {
            return Err(Error::invalid_argument(format!(
                "size {} is not a multiple of the block size {}",
                self.size, self.block_size
            )));
        }
        Ok(())
    }
}
