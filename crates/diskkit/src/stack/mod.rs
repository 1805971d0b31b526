//! Stacked images: a read-only base, at most one cache layer, and copy-on-write overlays.
//!
//! A stack is a list of layers read bottom to top ([`crate::io`] does the walking). This module
//! builds stacks: it follows a layer's recorded parent through a [`ParentPolicy`], checks each
//! layer's recorded parent UUID against its parent's layer UUID, enforces DiskImageKit's rules
//! (one cache layer at most, the top receives all writes), and appends new or existing layers.
//! Whole-stack operations (snapshot, restore, commit, rebase) live in [`operations`].

pub mod operations;
mod policy;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::image::{check_layer_writable, create_layer, DiskImage};
use crate::io::Level;
use crate::layer::{Layer, LayerInfo};
use crate::options::{CreateOptions, ImageFormat, LayerType, OpenMode, OpenOptions, DEFAULT_CHUNK_SIZE};
use crate::output::PendingFile;
use crate::storage::{FileStorage, Storage};

pub(crate) use policy::parent_hint;
pub use policy::ParentPolicy;

/// The longest chain of parents followed (a guard against loops and hostile images).
pub const MAX_CHAIN_DEPTH: usize = 64;

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
    let found = parent
        .layer_uuid
        .map_or_else(|| "none".to_owned(), |u| u.hyphenated().to_string());
    let mut err = Error::new(
        ErrorKind::LayerMismatch,
        format!(
            "the layer expects parent UUID {} but its parent's layer UUID is {found} \
             (the parent was written after this layer was made, or it is the wrong file)",
            expected.hyphenated()
        ),
    );
    if let Some(p) = child_path {
        err = err.with_path(p);
    }
    Err(err)
}

/// Build a stack from layers given bottom first, checking the stack rules.
pub(crate) fn assemble(layers: Vec<(Arc<dyn Layer>, Option<PathBuf>)>, mode: OpenMode) -> Result<DiskImage> {
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
    Ok(DiskImage { levels, paths, mode })
}

/// Open the layer at `path` and, through the policy, every parent beneath it.
pub(crate) fn open_chain(path: &Path, options: &OpenOptions) -> Result<DiskImage> {
    let writable = options.mode.is_writable();
    let top = DiskImage::open_file_layer(path, options, writable)?;
    let mut chain: Vec<(Arc<dyn Layer>, Option<PathBuf>)> = vec![(top, Some(path.to_path_buf()))];
    let mut seen = HashSet::new();
    if let Ok(p) = path.canonicalize() {
        seen.insert(p);
    }
    loop {
        let (child, child_path) = &chain[chain.len() - 1];
        let child_path = child_path.clone().unwrap_or_default();
        let info = child.layer_info();
        let Some(hint) = info.parent_path.clone() else {
            if info.parent_uuid.is_some() && chain.len() > 1 {
                return Err(
                    Error::corrupt("the layer records a parent UUID but no parent path")
                        .with_path(&child_path),
                );
            }
            break;
        };
        if chain.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::new(
                ErrorKind::StackRule,
                format!("the chain of parents is longer than {MAX_CHAIN_DEPTH} layers"),
            )
            .with_path(path));
        }
        let parent_path = options.parents.resolve(&child_path, &hint)?;
        if !seen.insert(parent_path.clone()) {
            return Err(
                Error::new(ErrorKind::StackRule, "the chain of parents loops").with_path(&parent_path)
            );
        }
        let mut parent_options = OpenOptions::new();
        if let Some(f) = info.parent_format {
            parent_options = parent_options.format(f);
        }
        if let Some(bs) = options.block_size {
            parent_options = parent_options.raw_block_size(bs);
        } else {
            parent_options = parent_options.raw_block_size(child.block_size());
        }
        let parent = DiskImage::open_parent_layer(&parent_path, &parent_options)?;
        chain.push((parent, Some(parent_path)));
    }
    chain.reverse();
    assemble(chain, options.mode)
}

impl DiskImage {
    /// Append a new, empty layer stored at `path` on top of this stack (DiskImageKit's
    /// `appending(.asifLayer(url:, type:))` for a layer that does not exist yet). The layer
    /// records the current top's layer UUID and a path to it relative to the new file.
    /// The stack is open read-write afterwards; on error it is unchanged.
    pub fn append_new(&mut self, path: impl AsRef<Path>, options: &LayerOptions) -> Result<()> {
        let path = path.as_ref();
        self.check_can_append(options.layer_type)?;
        self.flush()?;
        let info = self.new_layer_info(options.layer_type, Some(path))?;
        let pending = PendingFile::new(path, options.overwrite)?;
        {
            let storage: Arc<dyn Storage> = Arc::new(FileStorage::create_new(pending.temp_path())?);
            let layer = self
                .create_child_layer(storage, options, &info)
                .map_err(|e| e.with_path(path))?;
            layer.flush()?;
        }
        pending.persist()?;
        let layer = DiskImage::open_file_layer(path, &OpenOptions::new().format(options.format), true)?;
        self.push_layer(layer, Some(path.to_path_buf()), OpenMode::ReadWrite)
    }

    /// Append a new, empty layer on any storage (memory, a custom backend). The layer records
    /// the parent's UUID but no parent path.
    pub fn append_new_on(&mut self, storage: Arc<dyn Storage>, options: &LayerOptions) -> Result<()> {
        self.check_can_append(options.layer_type)?;
        self.flush()?;
        let info = self.new_layer_info(options.layer_type, None)?;
        let layer = self.create_child_layer(storage, options, &info)?;
        layer.flush()?;
        self.push_layer(layer, None, OpenMode::ReadWrite)
    }

    /// Append an existing layer file on top of this stack (DiskImageKit's `appending` for a
    /// layer that exists). Its recorded parent UUID must match the current top's layer UUID.
    pub fn append_existing(&mut self, path: impl AsRef<Path>, options: &OpenOptions) -> Result<()> {
        let path = path.as_ref();
        let layer = DiskImage::open_file_layer(path, options, options.mode.is_writable())?;
        self.append_layer(layer, Some(path.to_path_buf()), options.mode)
    }

    /// Append an opened layer on top of this stack, checking the stack rules.
    pub fn append_layer(
        &mut self,
        layer: Arc<dyn Layer>,
        path: Option<PathBuf>,
        mode: OpenMode,
    ) -> Result<()> {
        let info = layer.layer_info();
        let kind = info.layer_type.unwrap_or(LayerType::Overlay);
        self.check_can_append(kind)?;
        check_parent(&info, &self.top_layer().layer_info(), path.as_deref())?;
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
    fn new_layer_info(&self, layer_type: LayerType, child_path: Option<&Path>) -> Result<LayerInfo> {
        let top = self.top_layer();
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

    fn create_child_layer(
        &self,
        storage: Arc<dyn Storage>,
        options: &LayerOptions,
        info: &LayerInfo,
    ) -> Result<Arc<dyn Layer>> {
        if options.format == ImageFormat::Raw {
            return Err(Error::invalid_argument(
                "a RAW image cannot be a layer (it cannot tell absent blocks from zeroes)",
            ));
        }
        let create = CreateOptions::new(options.format, self.size())
            .block_size(self.block_size())
            .chunk_size(options.chunk_size);
        create.validate()?;
        let layer = create_layer(storage, &create)?;
        layer.set_layer_info(info)?;
        Ok(layer)
    }

    fn push_layer(&mut self, layer: Arc<dyn Layer>, path: Option<PathBuf>, mode: OpenMode) -> Result<()> {
        let mut layers: Vec<(Arc<dyn Layer>, Option<PathBuf>)> = self
            .levels
            .iter()
            .zip(&self.paths)
            .map(|(level, p)| (level.layer.clone(), p.clone()))
            .collect();
        layers.push((layer, path));
        *self = assemble(layers, mode)?;
        Ok(())
    }

    /// The path of each layer, bottom first.
    pub fn layer_paths(&self) -> Vec<Option<PathBuf>> {
        self.paths.clone()
    }

    /// The type of each layer, bottom first (`None` for the base).
    pub fn layer_types(&self) -> Vec<Option<LayerType>> {
        self.levels.iter().map(|l| l.layer_type).collect()
    }
}
