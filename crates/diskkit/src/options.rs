//! Configuration types: formats, open modes, layer types, create and open options.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::stack::ParentPolicy;

/// An image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ImageFormat {
    /// A plain file holding the disk's bytes.
    Raw,
    /// Apple Sparse Image Format.
    Asif,
    /// QEMU copy-on-write version 2/3.
    Qcow2,
}

impl ImageFormat {
    /// The lowercase name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Asif => "asif",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ImageFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => Ok(ImageFormat::Raw),
            "asif" => Ok(ImageFormat::Asif),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(Error::invalid_argument(format!(
                "unknown image format '{other}' (expected raw, asif or qcow2)"
            ))),
        }
    }
}

/// How an image is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OpenMode {
    /// Reads only.
    #[default]
    ReadOnly,
    /// Reads and writes.
    ReadWrite,
}

impl OpenMode {
    /// `"read-only"` or `"read-write"`.
    pub fn name(self) -> &'static str {
        match self {
            OpenMode::ReadOnly => "read-only",
            OpenMode::ReadWrite => "read-write",
        }
    }

    /// Whether writes are allowed.
    pub fn is_writable(self) -> bool {
        self == OpenMode::ReadWrite
    }
}

impl fmt::Display for OpenMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The role of a layer in a stack (DiskImageKit's layer types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerType {
    /// Keeps blocks read from the layers beneath it.
    Cache,
    /// Keeps modifications (copy-on-write).
    Overlay,
}

impl LayerType {
    /// `"cache"` or `"overlay"`.
    pub fn name(self) -> &'static str {
        match self {
            LayerType::Cache => "cache",
            LayerType::Overlay => "overlay",
        }
    }
}

impl fmt::Display for LayerType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LayerType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cache" => Ok(LayerType::Cache),
            "overlay" => Ok(LayerType::Overlay),
            other => Err(Error::invalid_argument(format!(
                "unknown layer type '{other}' (expected cache or overlay)"
            ))),
        }
    }
}

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

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub(crate) mode: OpenMode,
    pub(crate) format: Option<ImageFormat>,
    pub(crate) block_size: Option<u32>,
    pub(crate) parents: ParentPolicy,
    pub(crate) detached: bool,
    pub(crate) repair: bool,
}

impl OpenOptions {
    /// Read-only, format detected.
    pub fn new() -> Self {
        OpenOptions::default()
    }

    /// Open for writing too.
    pub fn writable(mut self, writable: bool) -> Self {
        self.mode = if writable {
            OpenMode::ReadWrite
        } else {
            OpenMode::ReadOnly
        };
        self
    }

    /// Set the open mode.
    pub fn mode(mut self, mode: OpenMode) -> Self {
        self.mode = mode;
        self
    }

    /// Skip detection and open as `format`. Detection looks at magic numbers, so a RAW disk
    /// whose guest wrote another format's header would be misread: pass the format for images
    /// that guests have written to.
    pub fn format(mut self, format: ImageFormat) -> Self {
        self.format = Some(format);
        self
    }

    /// Open only the named layer even if it records a parent (a qcow2 backing file): what the
    /// layer does not hold maps as absent and reads as zeroes. Read-only: writing without the
    /// parent would fill partly written clusters with zeroes instead of the parent's data.
    pub fn detached(mut self, detached: bool) -> Self {
        self.detached = detached;
        self
    }

    /// Repair a qcow2 image that has the dirty bit (the normal state after a crash with lazy
    /// refcounts) or the corrupt bit before opening it: its refcounts are rebuilt and its
    /// tables fixed as `diskkit check --repair all` does, and it opens if nothing is left.
    /// Needs the image opened for writing. Without this, such images are refused.
    pub fn repair(mut self, repair: bool) -> Self {
        self.repair = repair;
        self
    }

    /// Block size to report for RAW images (which do not record one); default 512.
    pub fn raw_block_size(mut self, block_size: u32) -> Self {
        self.block_size = Some(block_size);
        self
    }

    /// Which parent (backing) files may be followed when the image is a layer of a stack.
    /// The default, [`ParentPolicy::deny`], follows none.
    pub fn parents(mut self, policy: ParentPolicy) -> Self {
        self.parents = policy;
        self
    }

    /// The parent policy in effect.
    pub fn parent_policy(&self) -> &ParentPolicy {
        &self.parents
    }
}
