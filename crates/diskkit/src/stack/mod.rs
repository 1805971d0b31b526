//! Stacked images: a read-only base, at most one cache layer, and copy-on-write overlays.
//!
//! A [`Stack`] is a list of layers read bottom to top ([`io`] does the walking). This module
//! builds stacks: it follows a layer's recorded parent through a [`ParentPolicy`] ([`open`]),
//! checks each layer's recorded parent UUID against its parent's layer UUID, enforces
//! DiskImageKit's rules (one cache layer at most, the top receives all writes), and appends
//! new or existing layers. Whole-stack operations on an open stack (snapshot, restore, commit,
//! rebase) are in [`operations`].

mod budget;
pub(crate) mod io;
pub(crate) mod open;
pub mod operations;
mod options;
mod policy;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use self::io::Level;
pub use self::operations::{MergeStats, RebaseMode};
pub use self::options::{LayerOptions, OpenOptions};
pub(crate) use self::policy::parent_hint;
pub use self::policy::{LayerLocation, ParentPolicy, ParentResolver, ResolvedParent};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::CreateOptions;
use crate::layer::{ImageFormat, Layer, LayerInfo, LayerType, OpenMode};
use crate::mapping::Extent;
use crate::output::PendingFile;
use crate::storage::{FileStorage, Storage};

/// The longest chain of parents followed (a guard against loops and hostile images).
pub const MAX_CHAIN_DEPTH: usize = 64;

/// An open stack of layers, bottom (the base, index 0) to top.
#[derive(Debug)]
pub(crate) struct Stack {
    pub(crate) levels: Vec<Level>,
    pub(crate) paths: Vec<Option<PathBuf>>,
    pub(crate) mode: OpenMode,
    /// How the stack was opened (locking, parent policy): layers opened later follow it.
    pub(crate) options: OpenOptions,
    /// Things the caller should be told (a file read as RAW whose name says otherwise).
    pub(crate) warnings: Vec<String>,
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

/// The role a layer plays in a stack: what it records, or `Overlay` for any layer with a
/// parent that records no type (a qcow2 with a backing file).
fn role(info: &LayerInfo, has_parent: bool) -> Option<LayerType> {
    match info.layer_type {
        Some(t) if has_parent => Some(t),
        _ if has_parent => Some(LayerType::Overlay),
        _ => None,
    }
}

/// Check that `child` may sit directly on `parent`: its recorded parent UUID must be the
/// parent's current layer UUID.
pub(crate) fn check_parent(child: &LayerInfo, parent: &LayerInfo, child_path: Option<&Path>) -> Result<()> {
    let Some(expected) = child.parent_uuid else {
        return Ok(());
    };
    if parent.layer_uuid == Some(expected) {
        return Ok(());
    }
    let found = parent.layer_uuid.map_or_else(|| "none".to_owned(), uuid_text);
    let mut err = Error::new(
        ErrorKind::LayerMismatch,
        format!(
            "the layer expects parent UUID {} but its parent's layer UUID is {found} \
             (the parent was written after this layer was made, or it is the wrong file)",
            uuid_text(expected)
        ),
    );
    if let Some(p) = child_path {
        err = err.with_path(p);
    }
    Err(err)
}

fn uuid_text(u: Uuid) -> String {
    u.hyphenated().to_string()
}

impl Stack {
    /// Build a stack from layers given bottom first, checking the stack rules.
    pub(crate) fn assemble(layers: Vec<(Arc<dyn Layer>, Option<PathBuf>)>, mode: OpenMode) -> Result<Stack> {
        let n = layers.len();
        if n == 0 {
            return Err(Error::invalid_argument("a stack needs at least one layer"));
        }
        let mut levels = Vec::with_capacity(n);
        let mut paths = Vec::with_capacity(n);
        let mut caches = 0;
        let mut below: Option<LayerInfo> = None;
        for (i, (layer, path)) in layers.into_iter().enumerate() {
            let info = layer.layer_info();
            if i == 0 && info.has_parent() {
                return Err(Error::new(
                    ErrorKind::PolicyDenied,
                    "this layer has a parent; open it as part of a stack",
                )
                .with_path(path.as_deref().unwrap_or(Path::new("?"))));
            }
            if let Some(parent) = &below {
                check_parent(&info, parent, path.as_deref())?;
            }
            let layer_type = role(&info, i > 0);
            if layer_type == Some(LayerType::Cache) {
                caches += 1;
                if caches > 1 {
                    return Err(
                        Error::new(ErrorKind::StackRule, "a stack can hold only one cache layer")
                            .with_path(path.as_deref().unwrap_or(Path::new("?"))),
                    );
                }
            }
            if i + 1 == n {
                check_layer_writable(&*layer, mode)?;
            }
            below = Some(info);
            levels.push(Level::new(layer, layer_type));
            paths.push(path);
        }
        Ok(Stack {
            levels,
            paths,
            mode,
            options: OpenOptions::new().mode(mode),
            warnings: Vec::new(),
        })
    }

    /// An empty stack, left behind when a stack is moved out of an image.
    pub(crate) fn empty() -> Stack {
        Stack {
            levels: Vec::new(),
            paths: Vec::new(),
            mode: OpenMode::ReadOnly,
            options: OpenOptions::new(),
            warnings: Vec::new(),
        }
    }

    pub(crate) fn top(&self) -> &Arc<dyn Layer> {
        &self.levels[self.levels.len() - 1].layer
    }

    /// The top layer's type; `None` for a standalone image.
    pub(crate) fn layer_type(&self) -> Option<LayerType> {
        self.levels[self.levels.len() - 1].layer_type
    }

    /// The path of the top layer's file, if any.
    pub(crate) fn path(&self) -> Option<&Path> {
        self.paths.last().and_then(|p| p.as_deref())
    }

    /// The size of the virtual disk (the top layer's).
    pub(crate) fn size(&self) -> u64 {
        self.top().size()
    }

    /// The block size (the top layer's).
    pub(crate) fn block_size(&self) -> u32 {
        self.top().block_size()
    }

    /// The ASIF chunk size of the top layer, if it is ASIF.
    pub(crate) fn top_layer_chunk_size(&self) -> Option<u32> {
        match self.top().format() {
            ImageFormat::Asif => u32::try_from(self.top().cluster_size()).ok(),
            _ => None,
        }
    }

    /// Describe every layer, top first.
    pub(crate) fn describe_layers(&self) -> Result<Vec<LayerDescription>> {
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

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.mode.is_writable() {
            Ok(())
        } else {
            Err(Error::from_kind(ErrorKind::ReadOnly))
        }
    }

    /// Read `buf.len()` bytes at `offset`.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        io::read_level(&self.levels, self.levels.len() - 1, buf, offset, true)
            .map_err(|e| e.with_operation("reading").with_offset(offset))
    }

    /// Write `buf` at `offset`.
    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.top().begin_modification()?;
        io::write_level(&self.levels, self.levels.len() - 1, buf, offset)
            .map_err(|e| e.with_operation("writing").with_offset(offset))
    }

    /// Make `[offset, offset + len)` read as zeroes.
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.top().begin_modification()?;
        io::zero_top(&self.levels, offset, len, unmap)
            .map_err(|e| e.with_operation("writing zeroes").with_offset(offset))
    }

    /// Make every completed write durable.
    pub(crate) fn flush(&self) -> Result<()> {
        for level in self.levels.iter().filter(|l| l.layer.writable()) {
            level.layer.flush().map_err(|e| e.with_operation("flushing"))?;
        }
        Ok(())
    }

    /// Change the virtual size (see `DiskImage::resize`).
    pub(crate) fn resize(&self, new_size: u64) -> Result<()> {
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
    pub(crate) fn status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Err(Error::invalid_argument("status of an empty range"));
        }
        io::status(&self.levels, offset, len)
    }

    /// Call `f` for each run of `[offset, offset + len)` in order (not merged).
    pub(crate) fn for_each_extent(
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

    /// Append a new, empty layer stored at `path` on top of this stack.
    pub(crate) fn append_new(&mut self, path: &Path, options: &LayerOptions) -> Result<()> {
        self.check_can_append(options.layer_type)?;
        self.flush()?;
        let top = self.levels.len() - 1;
        let parent_path = self.path().map(Path::to_path_buf);
        let layer = self.create_layer_file(path, top, parent_path.as_deref(), options)?;
        self.push_layer(layer, Some(path.to_path_buf()), OpenMode::ReadWrite)
    }

    /// Create a new, empty layer file at `path` (under a temporary name, renamed into place,
    /// replacing what is there only with [`LayerOptions::overwrite`]) over the layer at
    /// `parent` (found at `parent_path`), and open it for writing. The new file is locked from
    /// the moment it exists.
    pub(crate) fn create_layer_file(
        &self,
        path: &Path,
        parent: usize,
        parent_path: Option<&Path>,
        options: &LayerOptions,
    ) -> Result<Arc<dyn Layer>> {
        let below = &self.levels[parent].layer;
        let info = LayerInfo {
            layer_type: Some(options.layer_type),
            parent_uuid: below.layer_info().layer_uuid,
            parent_path: parent_path.map(|p| parent_hint(path, p)).transpose()?,
            parent_format: Some(below.format()),
            ..LayerInfo::default()
        };
        let pending = PendingFile::new(path, options.overwrite)?;
        let temp = Arc::new(FileStorage::create_in(&pending)?);
        {
            let layer = create_child_layer(temp.clone(), options, &info, below.size(), below.block_size())
                .map_err(|e| e.with_path(path))?;
            layer.flush()?;
        }
        pending.persist()?;
        let storage: Arc<dyn Storage> = Arc::new(temp.renamed_to(path)?);
        drop(temp);
        let open = OpenOptions::new().format(options.format);
        open::open_layer_with(storage, &open, &crate::layer::Access::ReadWrite).map_err(|e| e.with_path(path))
    }

    /// Append a new, empty layer on any storage; it records the parent's UUID but no path.
    pub(crate) fn append_new_on(&mut self, storage: Arc<dyn Storage>, options: &LayerOptions) -> Result<()> {
        self.check_can_append(options.layer_type)?;
        self.flush()?;
        let info = self.new_layer_info(options.layer_type, None)?;
        let top = self.top();
        let layer = create_child_layer(storage, options, &info, top.size(), top.block_size())?;
        layer.flush()?;
        self.push_layer(layer, None, OpenMode::ReadWrite)
    }

    /// Append an opened layer on top of this stack, checking the stack rules.
    pub(crate) fn append_layer(
        &mut self,
        layer: Arc<dyn Layer>,
        path: Option<PathBuf>,
        mode: OpenMode,
    ) -> Result<()> {
        let info = layer.layer_info();
        let kind = info.layer_type.unwrap_or(LayerType::Overlay);
        self.check_can_append(kind)?;
        check_parent(&info, &self.top().layer_info(), path.as_deref())?;
        self.push_layer(layer, path, mode)
    }

    fn check_can_append(&self, kind: LayerType) -> Result<()> {
        if kind == LayerType::Cache && self.levels.iter().any(|l| l.layer_type == Some(LayerType::Cache)) {
            return Err(Error::new(
                ErrorKind::StackRule,
                "the stack already has a cache layer; a stack can hold only one",
            ));
        }
        if self.levels.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::new(
                ErrorKind::StackRule,
                format!("a stack can hold at most {MAX_CHAIN_DEPTH} layers"),
            ));
        }
        Ok(())
    }

    /// The layer information a new child of the current top records.
    pub(crate) fn new_layer_info(
        &self,
        layer_type: LayerType,
        child_path: Option<&Path>,
    ) -> Result<LayerInfo> {
        let top = self.top();
        let parent_path = match (child_path, self.path()) {
            (Some(child), Some(parent)) => Some(parent_hint(child, parent)?),
            _ => None,
        };
        Ok(LayerInfo {
            layer_type: Some(layer_type),
            parent_uuid: top.layer_info().layer_uuid,
            parent_path,
            parent_format: Some(top.format()),
            ..LayerInfo::default()
        })
    }

    fn push_layer(&mut self, layer: Arc<dyn Layer>, path: Option<PathBuf>, mode: OpenMode) -> Result<()> {
        // The old top becomes a parent: nothing writes it any more (a cache still fills).
        let old_top = &self.levels[self.levels.len() - 1];
        let old_storage = old_top.layer.storage();
        if old_top.layer_type != Some(LayerType::Cache)
            && old_storage.permissions().is_some_and(|p| p.writes())
        {
            old_storage.set_permissions(crate::storage::Permissions::reader())?;
        }
        let mut layers: Vec<(Arc<dyn Layer>, Option<PathBuf>)> = self
            .levels
            .iter()
            .zip(&self.paths)
            .map(|(level, p)| (level.layer.clone(), p.clone()))
            .collect();
        layers.push((layer, path));
        let options = self.options.clone().mode(mode);
        let warnings = std::mem::take(&mut self.warnings);
        let budgets: Vec<_> = self.levels.iter().map(|l| l.budget.clone()).collect();
        *self = Stack::assemble(layers, mode)?;
        for (level, budget) in self.levels.iter_mut().zip(budgets) {
            level.budget = budget;
        }
        self.options = options;
        self.warnings = warnings;
        Ok(())
    }

    /// Bound the cache layer's size to `limit` bytes (see [`budget`]), evicting what is over
    /// it now.
    pub(crate) fn bound_cache(&mut self, limit: u64) -> Result<()> {
        let Some(c) = self
            .levels
            .iter()
            .position(|l| l.layer_type == Some(LayerType::Cache))
        else {
            return Err(Error::invalid_argument(
                "a maximum cache size was given, but the stack has no cache layer",
            ));
        };
        let layer = self.levels[c].layer.clone();
        if !layer.writable() {
            // It does not fill, so it does not grow.
            return Ok(());
        }
        if layer.format() != ImageFormat::Asif {
            return Err(Error::unsupported(format!(
                "a maximum cache size needs an ASIF cache layer; this one is {}",
                layer.format()
            ))
            .with_path(self.paths[c].as_deref().unwrap_or(Path::new("?"))));
        }
        let cluster = layer.cluster_size().max(1);
        let unit = io::align_up(io::fill_unit(&self.levels, c), cluster).unwrap_or(cluster);
        let budget = Arc::new(budget::CacheBudget::scan(&*layer, limit, unit)?);
        io::evict(&*layer, &budget, &budget.excess())?;
        self.levels[c].budget = Some(budget);
        Ok(())
    }

    /// The type of each layer, bottom first (`None` for the base).
    pub(crate) fn layer_types(&self) -> Vec<Option<LayerType>> {
        self.levels.iter().map(|l| l.layer_type).collect()
    }
}

/// A new layer on `storage` of `size` bytes in blocks of `block_size`, recording `info`.
fn create_child_layer(
    storage: Arc<dyn Storage>,
    options: &LayerOptions,
    info: &LayerInfo,
    size: u64,
    block_size: u32,
) -> Result<Arc<dyn Layer>> {
    if options.format == ImageFormat::Raw {
        return Err(Error::invalid_argument(
            "a RAW image cannot be a layer (it cannot tell absent blocks from zeroes)",
        ));
    }
    let create = CreateOptions::new(options.format, size)
        .block_size(block_size)
        .chunk_size(options.chunk_size);
    let layer = crate::formats::create(storage, &create)?;
    layer.set_layer_info(info)?;
    Ok(layer)
}
