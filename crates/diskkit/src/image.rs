//! [`DiskImage`]: an open image or stack of layers, in the spirit of Apple's DiskImageKit.
//!
//! The facade over [`crate::stack`]: opening by path (format detection, the parent policy),
//! creating images under a temporary name, and the public I/O and stack methods.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use crate::error::Result;
use crate::formats::CreateOptions;
use crate::layer::{ImageFormat, Layer, LayerType, OpenMode};
use crate::mapping::Extent;
use crate::output::PendingFile;
use crate::stack::open::{self, Alone};
use crate::stack::{LayerDescription, LayerOptions, MergeStats, OpenOptions, RebaseMode, Stack};
use crate::storage::{FileStorage, Storage};

/// An open disk image: one layer, or a stack of layers read bottom to top.
///
/// All I/O methods take `&self` and may be called from many threads at once.
#[derive(Debug)]
pub struct DiskImage {
    pub(crate) stack: Stack,
}

impl DiskImage {
    pub(crate) fn from_stack(stack: Stack) -> DiskImage {
        DiskImage { stack }
    }

    /// Create a new standalone image at `path`. The file is built under a temporary name and
    /// renamed into place when complete; an existing file is only replaced with
    /// [`CreateOptions::overwrite`]. Returns the image opened read-write.
    pub fn create(path: impl AsRef<Path>, options: &CreateOptions) -> Result<DiskImage> {
        let path = path.as_ref();
        DiskImage::create_pending(path, options)?.persist()?;
        let mut open = OpenOptions::new().writable(true).format(options.format());
        if options.format() == ImageFormat::Raw {
            open = open.raw_block_size(options.block_size);
        }
        DiskImage::open(path, &open)
    }

    /// Create a new standalone image under a temporary name next to `path`; it appears at
    /// `path` only when [`PendingImage::persist`] is called. Dropping the result removes it.
    pub fn create_pending(path: impl AsRef<Path>, options: &CreateOptions) -> Result<PendingImage> {
        options.validate()?;
        let path = path.as_ref();
        let pending = PendingFile::new(path, options.overwrite)?;
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::create_in(&pending)?);
        let layer = crate::formats::create(storage, options).map_err(|e| e.with_path(path))?;
        let mut image = DiskImage::from_layer(layer, OpenMode::ReadWrite)?;
        image.stack.paths[0] = Some(pending.temp_path().to_path_buf());
        Ok(PendingImage {
            image: Some(image),
            pending,
        })
    }

    /// Open the image at `path`. A layer that names a parent is opened with its whole chain,
    /// as far as [`OpenOptions::parents`] allows (by default no parent is followed and opening
    /// such a layer fails with [`crate::ErrorKind::PolicyDenied`]).
    pub fn open(path: impl AsRef<Path>, options: &OpenOptions) -> Result<DiskImage> {
        open::open_path(path.as_ref(), options).map(DiskImage::from_stack)
    }

    /// Create a new image file at `path` (under a temporary name, renamed when complete)
    /// without opening it; unlike [`DiskImage::create`] this also makes layers that record a
    /// parent (a qcow2 image with a backing file), whose parent is not opened.
    pub fn create_file(path: impl AsRef<Path>, options: &CreateOptions) -> Result<()> {
        options.validate()?;
        let path = path.as_ref();
        let pending = PendingFile::new(path, options.overwrite)?;
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::create_in(&pending)?);
        let layer = crate::formats::create(storage, options).map_err(|e| e.with_path(path))?;
        layer.flush().map_err(|e| e.with_path(path))?;
        drop(layer);
        pending.persist()
    }

    /// Open an image on any storage (memory, a custom backend).
    pub fn open_storage(storage: Arc<dyn Storage>, options: &OpenOptions) -> Result<DiskImage> {
        let layer = open::open_layer(storage, options)?;
        DiskImage::from_layer(layer, options.mode)
    }

    /// Create a standalone image on empty `storage`.
    pub fn create_on(storage: Arc<dyn Storage>, options: &CreateOptions) -> Result<DiskImage> {
        let layer = crate::formats::create(storage, options)?;
        DiskImage::from_layer(layer, OpenMode::ReadWrite)
    }

    /// Wrap one opened layer as a standalone image.
    pub fn from_layer(layer: Arc<dyn Layer>, mode: OpenMode) -> Result<DiskImage> {
        open::alone(layer, mode, Alone::Standalone).map(DiskImage::from_stack)
    }

    /// The format of the top layer.
    pub fn format(&self) -> ImageFormat {
        self.stack.top().format()
    }

    /// Virtual size in bytes (the top layer's).
    pub fn size(&self) -> u64 {
        self.stack.size()
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.stack.block_size()
    }

    /// Number of blocks.
    pub fn block_count(&self) -> u64 {
        self.size() / u64::from(self.block_size())
    }

    /// How the image was opened.
    pub fn open_mode(&self) -> OpenMode {
        self.stack.mode
    }

    /// The top layer's type; `None` for a standalone image.
    pub fn layer_type(&self) -> Option<LayerType> {
        self.stack.layer_type()
    }

    /// The top layer's UUID (changes whenever it is written); `None` for RAW.
    pub fn layer_uuid(&self) -> Option<Uuid> {
        self.stack.top().layer_info().layer_uuid
    }

    /// The parent UUID the top layer recorded; `None` for standalone images and over RAW.
    pub fn parent_uuid(&self) -> Option<Uuid> {
        self.stack.top().layer_info().parent_uuid
    }

    /// The path of the top layer's file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.stack.path()
    }

    /// Number of layers (1 for a standalone image).
    pub fn layer_count(&self) -> usize {
        self.stack.levels.len()
    }

    /// Things to tell the user about how the image was opened: a file read as RAW (its format
    /// detected) whose name says it is in another format.
    pub fn warnings(&self) -> &[String] {
        &self.stack.warnings
    }

    /// The top layer's driver.
    pub fn top_layer(&self) -> &Arc<dyn Layer> {
        self.stack.top()
    }

    /// Describe every layer, top first.
    pub fn describe_layers(&self) -> Result<Vec<LayerDescription>> {
        self.stack.describe_layers()
    }

    /// The path of each layer, bottom first.
    pub fn layer_paths(&self) -> Vec<Option<PathBuf>> {
        self.stack.paths.clone()
    }

    /// The type of each layer, bottom first (`None` for the base).
    pub fn layer_types(&self) -> Vec<Option<LayerType>> {
        self.stack.layer_types()
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.stack.read_at(buf, offset)
    }

    /// Write `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.stack.write_at(buf, offset)
    }

    /// Make `[offset, offset + len)` read as zeroes. With `unmap`, storage may be released;
    /// without it, the range stays allocated where the format can keep it so.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.stack.write_zeroes(offset, len, unmap)
    }

    /// Discard `[offset, offset + len)`: it reads as zeroes afterwards and its storage is
    /// released where possible.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    /// Make every completed write durable.
    pub fn flush(&self) -> Result<()> {
        self.stack.flush()
    }

    /// Change the virtual size. Shrinking drops data past the new end; growing makes the new
    /// range read as zeroes (even over a larger parent). The filesystem inside is not touched.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.stack.resize(new_size)
    }

    /// The status of the run that starts at `offset`, at most `len` bytes long.
    pub fn status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.stack.status(offset, len)
    }

    /// The allocation map of `[offset, offset + len)`, adjacent runs of the same status merged.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        self.for_each_extent(offset, len, |e| {
            match out.last_mut() {
                Some(last) if last.can_merge(&e) => last.length += e.length,
                _ => out.push(e),
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Call `f` for each run of `[offset, offset + len)` in order (not merged).
    pub fn for_each_extent(&self, offset: u64, len: u64, f: impl FnMut(Extent) -> Result<()>) -> Result<()> {
        self.stack.for_each_extent(offset, len, f)
    }

    /// Append a new, empty layer stored at `path` on top of this stack (DiskImageKit's
    /// `appending(.asifLayer(url:, type:))` for a layer that does not exist yet). The layer
    /// records the current top's layer UUID and a path to it relative to the new file.
    /// The stack is open read-write afterwards; on error it is unchanged.
    pub fn append_new(&mut self, path: impl AsRef<Path>, options: &LayerOptions) -> Result<()> {
        self.stack.append_new(path.as_ref(), options)
    }

    /// Append a new, empty layer on any storage (memory, a custom backend). The layer records
    /// the parent's UUID but no parent path.
    pub fn append_new_on(&mut self, storage: Arc<dyn Storage>, options: &LayerOptions) -> Result<()> {
        self.stack.append_new_on(storage, options)
    }

    /// Bound the size of the stack's cache layer (an ASIF layer open for writing) to `limit`
    /// bytes, as [`OpenOptions::max_cache_size`] does when opening a file: least recently used
    /// units are evicted as fills add new ones, and what is over the bound now goes at once.
    /// For stacks built from storages; fails when the stack has no cache layer.
    pub fn bound_cache(&mut self, limit: u64) -> Result<()> {
        self.stack.bound_cache(limit)
    }

    /// Append an existing layer file on top of this stack (DiskImageKit's `appending` for a
    /// layer that exists). Its recorded parent UUID must match the current top's layer UUID.
    pub fn append_existing(&mut self, path: impl AsRef<Path>, options: &OpenOptions) -> Result<()> {
        let path = path.as_ref();
        let layer = open::open_file_layer(path, options, options.mode.is_writable())?;
        self.stack
            .append_layer(layer, Some(path.to_path_buf()), options.mode)
    }

    /// Append an opened layer on top of this stack, checking the stack rules.
    pub fn append_layer(
        &mut self,
        layer: Arc<dyn Layer>,
        path: Option<PathBuf>,
        mode: OpenMode,
    ) -> Result<()> {
        self.stack.append_layer(layer, path, mode)
    }

    /// Freeze the top layer and put a new, empty overlay of the same format on it at the same
    /// path; the frozen layer moves to a new name next to it (`<stem>.snapN.<ext>`), which is
    /// returned. The image goes on with the new overlay on top, so a server can take snapshots
    /// of what it serves. Needs the image open for writing (its lock is what guarantees that
    /// nobody else writes the top); refused for a RAW top (see
    /// [`crate::stack::operations`]).
    pub fn snapshot(&mut self) -> Result<PathBuf> {
        self.stack.snapshot()
    }

    /// Throw away everything written since the last snapshot: the top layer is replaced by an
    /// empty layer over the same parent.
    pub fn restore(&mut self) -> Result<()> {
        self.stack.restore()
    }

    /// Merge the top layer into the layer beneath it, then empty the top (crash-safely; see
    /// [`crate::stack::operations`]). Refused when other layers depend on the top or on the
    /// layer beneath (they would be left unusable), and when another process uses the layer
    /// beneath.
    pub fn commit(&mut self) -> Result<MergeStats> {
        self.stack.commit()
    }

    /// Move the top layer onto `new_parent` (an image opened read-only, which becomes the stack
    /// beneath). [`RebaseMode::Safe`] keeps what the stack reads by copying the differences
    /// into the top first; [`RebaseMode::Unsafe`] only records the new parent.
    pub fn rebase(&mut self, new_parent: DiskImage, mode: RebaseMode) -> Result<MergeStats> {
        self.stack.rebase(new_parent.into_stack(), mode)
    }

    /// The stack, leaving an empty one behind (dropping an empty image does nothing).
    pub(crate) fn into_stack(mut self) -> Stack {
        std::mem::replace(&mut self.stack, Stack::empty())
    }
}

impl Drop for DiskImage {
    /// Closing an image flushes it (best effort; call [`DiskImage::flush`] to see errors).
    fn drop(&mut self) {
        // Cache layers fill even in read-only stacks, so every writable layer is flushed.
        if self.stack.levels.iter().any(|l| l.layer.writable()) {
            let _ = self.flush();
        }
    }
}

/// A new image under a temporary name; see [`DiskImage::create_pending`].
#[derive(Debug)]
pub struct PendingImage {
    image: Option<DiskImage>,
    pending: PendingFile,
}

impl PendingImage {
    /// The image, open read-write.
    pub fn image(&self) -> &DiskImage {
        // OK to unwrap: `image` is only taken by `persist`, which consumes `self`.
        self.image
            .as_ref()
            .expect("pending image is present until persisted")
    }

    /// Flush the image, close it and rename it into place.
    pub fn persist(mut self) -> Result<()> {
        if let Some(image) = self.image.take() {
            image.flush()?;
        }
        let pending = std::mem::replace(&mut self.pending, PendingFile::placeholder());
        pending.persist()
    }
}
