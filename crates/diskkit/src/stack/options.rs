//! How to open an image or a stack, and how to make a new layer on one.

use crate::formats::DEFAULT_CHUNK_SIZE;
use crate::layer::{ImageFormat, LayerType, OpenMode};
use crate::stack::ParentPolicy;
use crate::storage::Permissions;

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub(crate) mode: OpenMode,
    pub(crate) format: Option<ImageFormat>,
    pub(crate) block_size: Option<u32>,
    pub(crate) parents: ParentPolicy,
    pub(crate) detached: bool,
    pub(crate) repair: bool,
    pub(crate) force_share: bool,
    pub(crate) unlocked: bool,
    pub(crate) max_cache_size: Option<u64>,
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

    /// Read the image even while another process (QEMU, `diskkit serve`) has it open for
    /// writing, like `qemu-img -U`: only read-only opens; the lock taken shares everything, so
    /// writers are not stopped, and the content may change while it is read.
    pub fn force_share(mut self, force_share: bool) -> Self {
        self.force_share = force_share;
        self
    }

    /// Whether to take and honour image locks (on by default). Locks are QEMU's: a writer
    /// excludes other writers and readers, readers exclude writers (see
    /// [`crate::storage::Permissions`]). Off, nothing is locked or checked (QEMU's
    /// `locking=off`): only for images nothing else can open at the same time.
    pub fn locking(mut self, locking: bool) -> Self {
        self.unlocked = !locking;
        self
    }

    /// Bound the stack's cache layer (ASIF) to about `bytes`: when fills take it past that, the
    /// least recently used units are evicted (absent again, their space released) and read
    /// from beneath again when needed. Opening a stack without a cache layer with a bound
    /// fails.
    pub fn max_cache_size(mut self, bytes: Option<u64>) -> Self {
        self.max_cache_size = bytes;
        self
    }

    /// The lock an open of a file for `writable` access takes, if any.
    pub(crate) fn lock_for(&self, writable: bool) -> Option<Permissions> {
        if self.unlocked {
            None
        } else if self.force_share {
            Some(Permissions::force_share())
        } else if writable {
            Some(Permissions::writer())
        } else {
            Some(Permissions::reader())
        }
    }

    /// The options for opening a parent of a layer opened with these: the same locking, no
    /// repair, read-only, the format recorded by the child (if any).
    pub(crate) fn for_parent(&self, format: Option<ImageFormat>, raw_block_size: u32) -> OpenOptions {
        OpenOptions {
            mode: OpenMode::ReadOnly,
            format,
            block_size: Some(self.block_size.unwrap_or(raw_block_size)),
            parents: self.parents.clone(),
            detached: false,
            repair: false,
            force_share: self.force_share,
            unlocked: self.unlocked,
            max_cache_size: None,
        }
    }
}

/// How to make a new layer on top of a stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerOptions {
    pub(crate) layer_type: LayerType,
    pub(crate) format: ImageFormat,
    pub(crate) chunk_size: u32,
    pub(crate) overwrite: bool,
}

impl LayerOptions {
    /// A copy-on-write overlay (ASIF unless [`LayerOptions::format`] says otherwise).
    pub fn overlay() -> Self {
        LayerOptions::new(LayerType::Overlay)
    }

    /// A cache layer: keeps the blocks read from beneath it.
    pub fn cache() -> Self {
        LayerOptions::new(LayerType::Cache)
    }

    /// A layer of the given type.
    pub fn new(layer_type: LayerType) -> Self {
        LayerOptions {
            layer_type,
            format: ImageFormat::Asif,
            chunk_size: DEFAULT_CHUNK_SIZE,
            overwrite: false,
        }
    }

    /// The new layer's format (ASIF or qcow2).
    pub fn format(mut self, format: ImageFormat) -> Self {
        self.format = format;
        self
    }

    /// The ASIF chunk size of the new layer.
    pub fn chunk_size(mut self, chunk_size: u32) -> Self {
        self.chunk_size = chunk_size;
        self
    }

    /// Replace an existing file at the new layer's path.
    pub fn overwrite(mut self, overwrite: bool) -> Self {
        self.overwrite = overwrite;
        self
    }
}
