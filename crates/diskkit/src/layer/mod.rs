//! The driver trait each format implements.
//!
//! A [`Layer`] is one image file (RAW, ASIF, qcow2) as one level of a stack. It answers mapping
//! questions (reads are done by the stack from those answers, through [`Layer::storage`]) and
//! owns its write path: [`Layer::write`] and [`Layer::zero`] are single calls, in which the
//! driver allocates, writes and records the new mapping ([`write`] has the protocol and the
//! helper drivers use).
//!
//! All methods take `&self`: drivers are shared across threads and synchronise internally,
//! without holding a lock that readers need across disk I/O.

pub mod health;
mod kind;
pub mod write;

use std::fmt::Debug;
use std::sync::Arc;

use uuid::Uuid;

use crate::error::{Error, ErrorKind, Result};
use crate::mapping::Mapping;
use crate::storage::Storage;

pub use self::health::Health;
pub use self::kind::{ImageFormat, LayerType, OpenMode};
pub use self::write::{Write, WriteMode, Zeroing};

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

    /// The unit in which the layer allocates and marks data present (a block or a cluster);
    /// cache fills are widened to it.
    fn allocation_granularity(&self) -> u64 {
        u64::from(self.block_size())
    }

    /// Store `request.data` at `request.offset` (see [`write`] for the protocol and for
    /// [`WriteMode::FillAbsent`]). The range lies inside the disk.
    fn write(&self, request: &Write<'_>) -> Result<()> {
        let _ = request;
        Err(Error::from_kind(ErrorKind::ReadOnly))
    }

    /// The unit [`Layer::zero`] works in. With `hide_below`, zeroed ranges must hide
    /// the layers below (the layer is part of a stack).
    fn zero_granularity(&self, hide_below: bool) -> u64 {
        let _ = hide_below;
        u64::from(self.block_size())
    }

    /// Forget what the layer holds in `[offset, offset + len)` (aligned to
    /// [`Layer::cluster_size`], or ending at the end of the disk), so that the range is absent
    /// again and reads from beneath, releasing its space: how a size-bounded cache layer evicts.
    /// Only layers that can record "absent" again do this (ASIF); the default is unsupported.
    fn evict(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(Error::unsupported(format!(
            "a {} layer cannot forget data (a size-bounded cache layer needs ASIF)",
            self.format()
        )))
    }

    /// Make `[offset, offset + len)` (aligned to [`Layer::zero_granularity`]) read as zeroes.
    fn zero(&self, request: &Zeroing) -> Result<()> {
        let _ = request;
        Err(Error::from_kind(ErrorKind::ReadOnly))
    }

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
