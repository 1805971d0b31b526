//! [`DiskImage`]: an open image or stack of layers, in the spirit of Apple's DiskImageKit.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use crate::error::{Error, ErrorKind, Result};
use crate::formats::asif::AsifImage;
use crate::formats::qcow2::{Qcow2CreateOptions, Qcow2Image};
use crate::formats::raw::RawImage;
use crate::io::{self, Level};
use crate::layer::{Access, Layer, LayerInfo};
use crate::mapping::Extent;
use crate::options::{CreateOptions, ImageFormat, LayerType, OpenMode, OpenOptions};
use crate::output::PendingFile;
use crate::probe;
use crate::storage::{FileStorage, Storage};

/// An open disk image: one layer, or a stack of layers read bottom to top.
///
/// All I/O methods take `&self` and may be called from many threads at once.
#[derive(Debug)]
pub struct DiskImage {
    pub(crate) levels: Vec<Level>,
    pub(crate) paths: Vec<Option<PathBuf>>,
    pub(crate) mode: OpenMode,
}

/// How [`DiskImage::alone`] treats a layer that records a parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alone {
    /// Refused: such a layer is opened as part of its stack.
    Standalone,
    /// Allowed read-only: the layer is seen without its parent.
    Detached,
}

/// Refuse a writable open of a layer that was opened read-only.
pub(crate) fn check_layer_writable(layer: &dyn Layer, mode: OpenMode) -> Result<()> {
    if mode.is_writable() && !layer.writable() {
        return Err(Error::from_kind(ErrorKind::ReadOnly));
    }
    Ok(())
}

/// A description of one layer of an open image, for `info`.
#[derive(Debug, Clone)]
pub struct LayerDescription {
    /// Path of the layer's file, if it has one.
    pub path: Option<PathBuf>,
    /// Format.
    pub format: ImageFormat,
    /// Virtual size in bytes.
    pub size: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Allocation unit (chunk or cluster) in bytes.
    pub cluster_size: u64,
    /// Layer information stored in the image.
    pub info: LayerInfo,
    /// Whether the layer is open for writing.
    pub writable: bool,
    /// Host file length in bytes.
    pub file_size: u64,
    /// Host bytes allocated, if known.
    pub allocated_bytes: Option<u64>,
    /// Format-specific details (name, value), see [`Layer::details`].
    pub details: Vec<(&'static str, String)>,
}

impl DiskImage {
    /// Create a new standalone image at `path`. The file is built under a temporary name and
    /// renamed into place when complete; an existing file is only replaced with
    /// [`CreateOptions::overwrite`]. Returns the image opened read-write.
    pub fn create(path: impl AsRef<Path>, options: &CreateOptions) -> Result<DiskImage> {
        let path = path.as_ref();
        DiskImage::create_pending(path, options)?.persist()?;
        let mut open = OpenOptions::new().writable(true).format(options.format);
        if options.format == ImageFormat::Raw {
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
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::create_new(pending.temp_path())?);
        let layer = create_layer(storage, options).map_err(|e| e.with_path(path))?;
        let mut image = DiskImage::from_layer(layer, OpenMode::ReadWrite)?;
        image.paths[0] = Some(pending.temp_path().to_path_buf());
        Ok(PendingImage {
            image: Some(image),
            pending,
        })
    }

    /// Open the image at `path`. A layer that names a parent is opened with its whole chain,
    /// as far as [`OpenOptions::parents`] allows (by default no parent is followed and opening
    /// such a layer fails with [`ErrorKind::PolicyDenied`]).
    pub fn open(path: impl AsRef<Path>, options: &OpenOptions) -> Result<DiskImage> {
        let path = path.as_ref();
        if options.detached {
            let layer = DiskImage::open_file_layer(path, options, options.mode.is_writable())?;
            let mut image =
                DiskImage::alone(layer, options.mode, Alone::Detached).map_err(|e| e.with_path(path))?;
            image.paths[0] = Some(path.to_path_buf());
            return Ok(image);
        }
        crate::stack::open_chain(path, options)
    }

    /// Open one image file as a layer, without following its parent.
    pub(crate) fn open_file_layer(
        path: &Path,
        options: &OpenOptions,
        writable: bool,
    ) -> Result<Arc<dyn Layer>> {
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(path, writable)?);
        let options = options.clone().writable(writable);
        open_layer(storage, &options).map_err(|e| e.with_path(path))
    }

    /// Open a parent layer read-only, or, when it records that it is a cache layer, for
    /// writing where its file allows: a cache keeps what is read beneath it, which never
    /// changes what the stack reads, so it fills even in a read-only stack (a read-only cache
    /// file simply stops filling). The layer is parsed once either way.
    pub(crate) fn open_parent_layer(path: &Path, options: &OpenOptions) -> Result<Arc<dyn Layer>> {
        let file = Arc::new(FileStorage::open(path, false)?);
        let reopen = || {
            file.reopen_writable()
                .ok()
                .map(|rw| Arc::new(rw) as Arc<dyn Storage>)
        };
        let storage: Arc<dyn Storage> = file.clone();
        open_layer_with(storage, options, &Access::Parent(&reopen)).map_err(|e| e.with_path(path))
    }

    /// Create a new image file at `path` (under a temporary name, renamed when complete)
    /// without opening it; unlike [`DiskImage::create`] this also makes layers that record a
    /// parent (a qcow2 image with a backing file), whose parent is not opened.
    pub fn create_file(path: impl AsRef<Path>, options: &CreateOptions) -> Result<()> {
        options.validate()?;
        let path = path.as_ref();
        let pending = PendingFile::new(path, options.overwrite)?;
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::create_new(pending.temp_path())?);
        let layer = create_layer(storage, options).map_err(|e| e.with_path(path))?;
        layer.flush().map_err(|e| e.with_path(path))?;
        drop(layer);
        pending.persist()
    }

    /// One layer as a whole image. A layer that records a parent is refused as a standalone
    /// image ([`ErrorKind::PolicyDenied`], checked after writability) and detached only
    /// read-only ([`ErrorKind::InvalidArgument`], checked before writability).
    fn alone(layer: Arc<dyn Layer>, mode: OpenMode, how: Alone) -> Result<DiskImage> {
        let info = layer.layer_info();
        let parent_refused = match how {
            Alone::Standalone if info.has_parent() => Some(Error::new(
                ErrorKind::PolicyDenied,
                "this layer has a parent; open it as part of a stack",
            )),
            Alone::Detached if info.has_parent() && mode.is_writable() => Some(Error::new(
                ErrorKind::InvalidArgument,
                "a layer with a parent can only be opened detached read-only",
            )),
            _ => None,
        };
        match parent_refused {
            Some(err) if how == Alone::Detached => return Err(err),
            Some(err) => {
                check_layer_writable(&*layer, mode)?;
                return Err(err);
            }
            None => check_layer_writable(&*layer, mode)?,
        }
        Ok(DiskImage {
            levels: vec![Level::new(layer, info.layer_type)],
            paths: vec![None],
            mode,
        })
    }

    /// Open an image on any storage (memory, a custom backend).
    pub fn open_storage(storage: Arc<dyn Storage>, options: &OpenOptions) -> Result<DiskImage> {
        let layer = open_layer(storage, options)?;
        DiskImage::from_layer(layer, options.mode)
    }

    /// Create a standalone image on empty `storage`.
    pub fn create_on(storage: Arc<dyn Storage>, options: &CreateOptions) -> Result<DiskImage> {
        options.validate()?;
        let layer = create_layer(storage, options)?;
        DiskImage::from_layer(layer, OpenMode::ReadWrite)
    }

    /// Wrap one opened layer as a standalone image.
    pub fn from_layer(layer: Arc<dyn Layer>, mode: OpenMode) -> Result<DiskImage> {
        DiskImage::alone(layer, mode, Alone::Standalone)
    }

    fn top(&self) -> &Arc<dyn Layer> {
        &self.levels[self.levels.len() - 1].layer
    }

    /// The format of the top layer.
    pub fn format(&self) -> ImageFormat {
        self.top().format()
    }

    /// Virtual size in bytes (the top layer's).
    pub fn size(&self) -> u64 {
        self.top().size()
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.top().block_size()
    }

    /// Number of blocks.
    pub fn block_count(&self) -> u64 {
        self.size() / u64::from(self.block_size())
    }

    /// How the image was opened.
    pub fn open_mode(&self) -> OpenMode {
        self.mode
    }

    /// The top layer's type; `None` for a standalone image.
    pub fn layer_type(&self) -> Option<LayerType> {
        self.levels[self.levels.len() - 1].layer_type
    }

    /// The top layer's UUID (changes whenever it is written); `None` for RAW.
    pub fn layer_uuid(&self) -> Option<Uuid> {
        self.top().layer_info().layer_uuid
    }

    /// The parent UUID the top layer recorded; `None` for standalone images and over RAW.
    pub fn parent_uuid(&self) -> Option<Uuid> {
        self.top().layer_info().parent_uuid
    }

    /// The path of the top layer's file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.paths.last().and_then(|p| p.as_deref())
    }

    /// Number of layers (1 for a standalone image).
    pub fn layer_count(&self) -> usize {
        self.levels.len()
    }

    /// The ASIF chunk size of the top layer, if it is ASIF.
    pub(crate) fn top_layer_chunk_size(&self) -> Option<u32> {
        match self.format() {
            ImageFormat::Asif => u32::try_from(self.top().cluster_size()).ok(),
            _ => None,
        }
    }

    /// The top layer's driver.
    pub fn top_layer(&self) -> &Arc<dyn Layer> {
        self.top()
    }

    /// Describe every layer, top first.
    pub fn describe_layers(&self) -> Result<Vec<LayerDescription>> {
        let mut out = Vec::new();
        for (level, path) in self.levels.iter().zip(&self.paths).rev() {
            let layer = &level.layer;
            out.push(LayerDescription {
                path: path.clone(),
                format: layer.format(),
                size: layer.size(),
                block_size: layer.block_size(),
                cluster_size: layer.cluster_size(),
                info: layer.layer_info(),
                writable: layer.writable(),
                file_size: layer.storage().len()?,
                allocated_bytes: layer.allocated_bytes()?,
                details: layer.details(),
            });
        }
        Ok(out)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::out_of_bounds(format!(
                "range {offset}+{len} is past the end of the disk ({} bytes)",
                self.size()
            ))),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.mode.is_writable() {
            Ok(())
        } else {
            Err(Error::from_kind(ErrorKind::ReadOnly))
        }
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        io::read_level(&self.levels, self.levels.len() - 1, buf, offset, true)
            .map_err(|e| e.with_operation("reading").with_offset(offset))
    }

    /// Write `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.top().begin_modification()?;
        io::write_level(&self.levels, self.levels.len() - 1, buf, offset)
            .map_err(|e| e.with_operation("writing").with_offset(offset))
    }

    /// Make `[offset, offset + len)` read as zeroes. With `unmap`, storage may be released;
    /// without it, the range stays allocated where the format can keep it so.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.top().begin_modification()?;
        io::zero_top(&self.levels, offset, len, unmap)
            .map_err(|e| e.with_operation("writing zeroes").with_offset(offset))
    }

    /// Discard `[offset, offset + len)`: it reads as zeroes afterwards and its storage is
    /// released where possible.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    /// Make every completed write durable.
    pub fn flush(&self) -> Result<()> {
        for level in self.levels.iter().filter(|l| l.layer.writable()) {
            level.layer.flush().map_err(|e| e.with_operation("flushing"))?;
        }
        Ok(())
    }

    /// Change the virtual size. Shrinking drops data past the new end; growing makes the new
    /// range read as zeroes (even over a larger parent). The filesystem inside is not touched.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let bs = u64::from(self.block_size());
        if new_size == 0 || new_size % bs != 0 {
            return Err(Error::invalid_argument(format!(
                "size must be a non-zero multiple of the block size {bs}"
            )));
        }
        let old = self.size();
        if new_size == old {
            return Ok(());
        }
        self.top().begin_modification()?;
        self.top().resize(new_size)?;
        if new_size > old && self.levels.len() > 1 {
            let below = self.levels[..self.levels.len() - 1]
                .iter()
                .map(|l| l.layer.size())
                .max()
                .unwrap_or(0);
            let end = new_size.min(below);
            if end > old {
                io::zero_top(&self.levels, old, end - old, true)?;
            }
        }
        Ok(())
    }

    /// The status of the run that starts at `offset`, at most `len` bytes long.
    pub fn status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Err(Error::invalid_argument("status of an empty range"));
        }
        io::status(&self.levels, offset, len)
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
    pub fn for_each_extent(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(Extent) -> Result<()>,
    ) -> Result<()> {
        self.check_range(offset, len)?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let e = io::status(&self.levels, pos, end - pos)?;
            pos += e.length;
            f(e)?;
        }
        Ok(())
    }
}

impl Drop for DiskImage {
    /// Closing an image flushes it (best effort; call [`DiskImage::flush`] to see errors).
    fn drop(&mut self) {
        // Cache layers fill even in read-only stacks, so every writable layer is flushed.
        if self.levels.iter().any(|l| l.layer.writable()) {
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

pub(crate) fn create_layer(storage: Arc<dyn Storage>, options: &CreateOptions) -> Result<Arc<dyn Layer>> {
    Ok(match options.format {
        ImageFormat::Raw => Arc::new(RawImage::create(storage, options.size, options.block_size)?),
        ImageFormat::Asif => Arc::new(AsifImage::create(
            storage,
            options.size,
            options.block_size,
            options.chunk_size,
        )?),
        ImageFormat::Qcow2 => Arc::new(Qcow2Image::create(
            storage,
            &Qcow2CreateOptions {
                size: options.size,
                cluster_size: options
                    .cluster_size
                    .unwrap_or(crate::formats::qcow2::DEFAULT_CLUSTER_SIZE),
                backing_file: options.backing.as_ref().map(|b| b.0.clone()),
                backing_format: options.backing.as_ref().and_then(|b| b.1),
            },
        )?),
    })
}

/// Open one layer on `storage`, detecting its format unless one is given.
pub fn open_layer(storage: Arc<dyn Storage>, options: &OpenOptions) -> Result<Arc<dyn Layer>> {
    open_layer_with(
        storage,
        options,
        &Access::from_writable(options.mode.is_writable()),
    )
}

/// [`open_layer`], writable as `access` decides (`options.mode` is not looked at).
pub(crate) fn open_layer_with(
    storage: Arc<dyn Storage>,
    options: &OpenOptions,
    access: &Access<'_>,
) -> Result<Arc<dyn Layer>> {
    let format = match options.format {
        Some(f) => f,
        None => probe::detect(&*storage)?,
    };
    Ok(match format {
        // A RAW file records no layer type, so it is never a cache layer.
        ImageFormat::Raw => {
            let block_size = options.block_size.unwrap_or(512);
            Arc::new(match access {
                Access::Parent(_) => RawImage::open_parent(storage, block_size)?,
                _ => RawImage::open(storage, block_size, matches!(access, Access::ReadWrite))?,
            })
        }
        ImageFormat::Asif => Arc::new(AsifImage::open_with(storage, access)?),
        ImageFormat::Qcow2 => Arc::new(Qcow2Image::open_with(storage, access, options.repair)?),
    })
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::storage::MemStorage;

    /// A new image of `format` on memory storage recording `layer_type` (and a parent UUID, as a
    /// layer in a stack does).
    fn layer_on_memory(format: ImageFormat, layer_type: LayerType) -> Arc<dyn Storage> {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let layer = create_layer(storage.clone(), &CreateOptions::new(format, 4 << 20)).unwrap();
        layer
            .set_layer_info(&LayerInfo {
                layer_type: Some(layer_type),
                parent_uuid: Some(Uuid::new_v4()),
                ..LayerInfo::default()
            })
            .unwrap();
        layer.flush().unwrap();
        storage
    }

    /// Open `storage` as a parent is opened; returns whether the layer is writable and how many
    /// times the storage was reopened for writing.
    fn open_as_parent(storage: &Arc<dyn Storage>, allow_writing: bool) -> (bool, u32) {
        let reopened = Cell::new(0);
        let reopen = || {
            reopened.set(reopened.get() + 1);
            allow_writing.then(|| storage.clone())
        };
        let layer = open_layer_with(storage.clone(), &OpenOptions::new(), &Access::Parent(&reopen)).unwrap();
        (layer.writable(), reopened.get())
    }

    #[test]
    fn one_layer_images_check_parents_and_writability_in_their_order() {
        use OpenMode::{ReadOnly, ReadWrite};
        let with_parent = layer_on_memory(ImageFormat::Asif, LayerType::Overlay);
        let open = |storage: &Arc<dyn Storage>, writable: bool| {
            open_layer(storage.clone(), &OpenOptions::new().writable(writable)).unwrap()
        };
        let kind = |r: Result<DiskImage>| r.map(|_| ()).map_err(|e| e.kind());
        // Standalone: writability first, then the parent.
        assert_eq!(
            kind(DiskImage::from_layer(open(&with_parent, false), ReadWrite)),
            Err(ErrorKind::ReadOnly)
        );
        for (writable, mode) in [(true, ReadWrite), (false, ReadOnly)] {
            assert_eq!(
                kind(DiskImage::from_layer(open(&with_parent, writable), mode)),
                Err(ErrorKind::PolicyDenied)
            );
        }
        // Detached: the parent first, then writability; read-only is allowed.
        assert_eq!(
            kind(DiskImage::alone(
                open(&with_parent, false),
                ReadWrite,
                Alone::Detached
            )),
            Err(ErrorKind::InvalidArgument)
        );
        let image = DiskImage::alone(open(&with_parent, false), ReadOnly, Alone::Detached).unwrap();
        assert_eq!(image.layer_type(), Some(LayerType::Overlay));
        let plain: Arc<dyn Storage> = Arc::new(MemStorage::new());
        create_layer(plain.clone(), &CreateOptions::new(ImageFormat::Asif, 4 << 20)).unwrap();
        assert_eq!(
            kind(DiskImage::alone(open(&plain, false), ReadWrite, Alone::Detached)),
            Err(ErrorKind::ReadOnly)
        );
        assert!(DiskImage::from_layer(open(&plain, true), ReadWrite).is_ok());
    }

    #[test]
    fn parents_are_writable_only_when_they_are_cache_layers() {
        for format in [ImageFormat::Asif, ImageFormat::Qcow2] {
            let cache = layer_on_memory(format, LayerType::Cache);
            assert_eq!(open_as_parent(&cache, true), (true, 1), "{format} cache");
            assert_eq!(
                open_as_parent(&cache, false),
                (false, 1),
                "{format} read-only cache file"
            );
            let overlay = layer_on_memory(format, LayerType::Overlay);
            assert_eq!(open_as_parent(&overlay, true), (false, 0), "{format} overlay");
        }
    }
}
