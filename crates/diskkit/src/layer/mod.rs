//! The driver trait each format implements.
//!
//! A [`Layer`] is one image file (RAW, ASIF, qcow2) as one level of a stack. It answers mapping
//! questions and performs the metadata changes that writes need (allocation, zeroing); the data
//! itself is read and written by [`crate::DiskImage`] through [`Layer::storage`].
//!
//! All methods take `&self`: drivers are shared across threads and synchronise internally.

mod kind;

use std::fmt::Debug;
use std::sync::Arc;

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::mapping::Mapping;
use crate::storage::Storage;

pub use self::kind::{ImageFormat, LayerType, OpenMode};

/// Where a write can go, as decided by [`Layer::prepare_write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePlan {
    /// The guest range is already backed by `[host_offset, host_offset + len)`: write in place.
    InPlace {
        /// Host offset of the write's first byte.
        host_offset: u64,
        /// How many bytes of the write this covers.
        len: u64,
    },
    /// Space must be allocated first: call [`Layer::allocate`] under the layer's allocation
    /// lock, with the range widened to [`Layer::allocation_granularity`].
    Allocate {
        /// How many bytes of the write this answer covers.
        len: u64,
    },
}

/// Space allocated by [`Layer::allocate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Host offset of the first allocated guest byte.
    pub host_offset: u64,
    /// Allocated guest bytes from the requested offset (a multiple of the granularity).
    pub len: u64,
}

/// Whether a layer being opened is to be writable. Drivers decide once they have read the layer
/// information, so a layer is parsed (and, for writing, scanned) once.
pub(crate) enum Access<'a> {
    /// Read-only.
    ReadOnly,
    /// Writable, unless the storage refuses writes.
    ReadWrite,
    /// A parent in a stack, which nothing writes while the stack is open (its children
    /// depend on its content). Read-only, unless the layer records that it is a cache layer:
    /// then writable through the storage this returns (the same file, opened for writing), or
    /// read-only when it returns `None` (the file cannot be written).
    Parent(&'a dyn Fn() -> Option<Arc<dyn Storage>>),
}

impl Access<'_> {
    /// The access `writable` asks for.
    pub(crate) fn from_writable(writable: bool) -> Access<'static> {
        if writable {
            Access::ReadWrite
        } else {
            Access::ReadOnly
        }
    }

    /// The storage to write through, or `None` to stay read-only, for a layer on `storage`
    /// that records `layer_type`.
    pub(crate) fn writable_storage(
        &self,
        storage: &Arc<dyn Storage>,
        layer_type: Option<LayerType>,
    ) -> Option<Arc<dyn Storage>> {
        match self {
            Access::ReadOnly => None,
            Access::ReadWrite => (!storage.read_only()).then(|| Arc::clone(storage)),
            Access::Parent(reopen) if layer_type == Some(LayerType::Cache) => {
                reopen().filter(|s| !s.read_only())
            }
            Access::Parent(_) => None,
        }
    }
}

/// Layer information stored inside an image (DiskImageKit's layer properties).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerInfo {
    /// The layer's role in a stack; `None` for a standalone image or a base.
    pub layer_type: Option<LayerType>,
    /// The layer UUID (changes whenever the layer is written); `None` where the format cannot
    /// store one (RAW).
    pub layer_uuid: Option<Uuid>,
    /// A UUID that never changes for the life of the image, where the format has one.
    pub stable_uuid: Option<Uuid>,
    /// The parent's layer UUID as it was when this layer was made; `None` for standalone
    /// images and layers over RAW.
    pub parent_uuid: Option<Uuid>,
    /// Where to find the parent, relative to this layer's file.
    pub parent_path: Option<String>,
    /// The parent's format, as recorded when the layer was made.
    pub parent_format: Option<ImageFormat>,
}

impl LayerInfo {
    /// Whether the layer records a parent (a parent UUID or a parent path).
    pub fn has_parent(&self) -> bool {
        self.parent_uuid.is_some() || self.parent_path.is_some()
    }
}

/// One image file as a layer: the format driver interface.
pub trait Layer: Send + Sync + Debug {
    /// The format of this layer.
    fn format(&self) -> ImageFormat;

    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// Logical block size in bytes (512 or 4096).
    fn block_size(&self) -> u32;

    /// The unit in which this layer allocates (a chunk or cluster; the block size for RAW).
    fn cluster_size(&self) -> u64;

    /// The storage that [`Mapping::Data`] host offsets refer to.
    fn storage(&self) -> &dyn Storage;

    /// Whether the layer was opened for writing.
    fn writable(&self) -> bool;

    /// What the layer holds at `offset`, and for how many bytes (at least 1, at most `len`).
    /// `offset < size()` and `len > 0` are guaranteed by the caller. The answer is for I/O and
    /// may call a hole [`Mapping::Data`]; see [`Layer::map_status`].
    fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)>;

    /// Like [`Layer::map`], but as precise as the layer can be about holes (used for allocation
    /// maps, sparse conversion and NBD block status; may cost a system call).
    fn map_status(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        self.map(offset, len)
    }

    /// Read bytes that [`Layer::map`] reported as [`Mapping::Special`].
    fn read_special(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _ = buf;
        Err(Error::unsupported("this format has no special mappings").with_offset(offset))
    }

    /// Called before anything changes the guest-visible content of this layer. Formats with a
    /// layer UUID give themselves a new one here, durably, on the first call after opening.
    fn begin_modification(&self) -> Result<()> {
        Ok(())
    }

    /// The unit in which the layer allocates and marks data present (a block or a cluster).
    fn allocation_granularity(&self) -> u64 {
        u64::from(self.block_size())
    }

    /// Where a write of `len` bytes at `offset` can go.
    fn prepare_write(&self, offset: u64, len: u64) -> Result<WritePlan>;

    /// Allocate space for `[offset, offset + len)`, both aligned to
    /// [`Layer::allocation_granularity`]. Called with the layer's allocation lock held, for a range the
    /// layer does not hold yet. The caller writes the data, then calls [`Layer::commit`].
    fn allocate(&self, offset: u64, len: u64) -> Result<Allocation> {
        let _ = len;
        Err(Error::unsupported("this layer cannot allocate").with_offset(offset))
    }

    /// Mark `[offset, offset + len)`, returned by [`Layer::allocate`] and now written, present.
    fn commit(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// The unit [`Layer::set_zero`] works in. With `hide_below`, zeroed ranges must hide
    /// the layers below (the layer is part of a stack).
    fn zero_granularity(&self, hide_below: bool) -> u64;

    /// Make `[offset, offset + len)` (aligned to [`Layer::zero_granularity`]) read as
    /// zeroes. `unmap` allows releasing storage.
    fn set_zero(&self, offset: u64, len: u64, unmap: bool, hide_below: bool) -> Result<()>;

    /// Make every completed change durable.
    fn flush(&self) -> Result<()>;

    /// Change the virtual size. Shrinking drops data past the new end.
    fn resize(&self, new_size: u64) -> Result<()>;

    /// The largest size this layer can be resized to.
    fn max_size(&self) -> u64 {
        u64::MAX
    }

    /// Layer properties stored in the image.
    fn layer_info(&self) -> LayerInfo;

    /// Store new layer properties (type, parent UUID and path). Formats that cannot store them
    /// return `Unsupported`.
    fn set_layer_info(&self, info: &LayerInfo) -> Result<()> {
        let _ = info;
        Err(Error::unsupported(format!(
            "{} images cannot record layer information",
            self.format()
        )))
    }

    /// Format-specific details for `info`, as (name, value) pairs.
    fn details(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// Bytes of host storage the layer uses, if known.
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.storage().allocated_bytes()
    }
}
