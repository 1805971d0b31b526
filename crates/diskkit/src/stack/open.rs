//! Opening stacks: one layer file, its parents through the policy, and the checks that make
//! them a stack.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{check_layer_writable, LayerLocation, OpenOptions, Stack, MAX_CHAIN_DEPTH};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::LayerOpen;
use crate::layer::{Access, Layer, OpenMode};
use crate::storage::{FileStorage, Storage};

/// How [`alone`] treats a layer that records a parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alone {
    /// Refused: such a layer is opened as part of its stack.
    Standalone,
    /// Allowed read-only: the layer is seen without its parent.
    Detached,
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
    let how = LayerOpen {
        access,
        raw_block_size: options.block_size.unwrap_or(512),
        repair: options.repair,
    };
    crate::formats::open(storage, options.format, &how)
}

/// Open one image file as a layer, without following its parent, locked as `options` ask.
pub(crate) fn open_file_layer(path: &Path, options: &OpenOptions, writable: bool) -> Result<Arc<dyn Layer>> {
    if writable && options.force_share {
        return Err(Error::invalid_argument(
            "force-share (-U) can only be used to read an image, not to change it",
        )
        .with_path(path));
    }
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open_locked(
        path,
        writable,
        options.lock_for(writable),
    )?);
    let options = options.clone().writable(writable);
    open_layer(storage, &options).map_err(|e| e.with_path(path))
}

/// Open a parent layer read-only, or, when it records that it is a cache layer, for writing
/// where its file allows: a cache keeps what is read beneath it, which never changes what the
/// stack reads, so it fills even in a read-only stack (a read-only cache file simply stops
/// filling). The layer is parsed once either way.
///
/// The parent is locked as a reader (nobody may write it while its children depend on it); a
/// cache layer that fills is locked as a writer, and stays read-only (without filling) when
/// another open holds it.
pub(crate) fn open_parent_layer(path: &Path, options: &OpenOptions) -> Result<Arc<dyn Layer>> {
    let file: Arc<dyn Storage> = Arc::new(FileStorage::open_locked(path, false, options.lock_for(false))?);
    open_parent_on(&file, options).map_err(|e| e.with_path(path))
}

/// Open the parent layer on `storage` (see [`open_parent_layer`]).
pub(crate) fn open_parent_on(storage: &Arc<dyn Storage>, options: &OpenOptions) -> Result<Arc<dyn Layer>> {
    let force_share = options.force_share;
    let reopen = || {
        if force_share {
            return None;
        }
        let rw = storage.reopen(true).ok()?;
        match rw.set_permissions(crate::storage::Permissions::writer()) {
            Ok(()) => Some(rw),
            Err(_) => None,
        }
    };
    open_layer_with(storage.clone(), options, &Access::Parent(&reopen))
}

/// One layer as a whole stack. A layer that records a parent is refused as a standalone
/// image ([`ErrorKind::PolicyDenied`], checked after writability) and detached only
/// read-only ([`ErrorKind::InvalidArgument`], checked before writability).
pub(crate) fn alone(layer: Arc<dyn Layer>, mode: OpenMode, how: Alone) -> Result<Stack> {
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
    let layer_type = info.layer_type;
    Ok(Stack {
        levels: vec![super::io::Level::new(layer, layer_type)],
        paths: vec![None],
        mode,
        options: OpenOptions::new().mode(mode),
        warnings: Vec::new(),
    })
}

/// Open the image at `path`: one layer, or (following its parents through the policy) a stack.
pub(crate) fn open_path(path: &Path, options: &OpenOptions) -> Result<Stack> {
    if options.detached {
        let layer = open_file_layer(path, options, options.mode.is_writable())?;
        let warning = raw_by_detection(&*layer, path, options.format.is_none());
        let mut stack = alone(layer, options.mode, Alone::Detached).map_err(|e| e.with_path(path))?;
        stack.paths[0] = Some(path.to_path_buf());
        stack.warnings.extend(warning);
        stack.options = options.clone();
        return Ok(stack);
    }
    let mut stack = open_chain(path, options)?;
    stack.options = options.clone();
    if let Some(limit) = options.max_cache_size {
        stack
            .bound_cache(limit)
            .map_err(|e| e.with_operation("bounding the cache"))?;
    }
    Ok(stack)
}

/// A warning when the layer at `path`, whose format was detected, reads as RAW although its
/// name says it is in another format.
fn raw_by_detection(layer: &dyn Layer, path: &Path, detected: bool) -> Option<String> {
    if !detected || layer.format() != crate::layer::ImageFormat::Raw {
        return None;
    }
    let named = crate::formats::probe::extension_format(path)?;
    Some(format!(
        "'{}' is named like a {named} image but has no {named} signature: it is read as a RAW disk (give the format with -f to say which)",
        path.display()
    ))
}

/// Open the layer at `path` and, through the policy, every parent beneath it: files by the
/// policy's rules, anything else through its resolver.
fn open_chain(path: &Path, options: &OpenOptions) -> Result<Stack> {
    let writable = options.mode.is_writable();
    // Read-only, the top is opened as parents are: a cache layer still fills (what it keeps
    // never changes what the stack reads), so `serve --read-only cache.asif` or `convert`
    // of a cache layer keeps what they read.
    let top = if writable || options.force_share {
        open_file_layer(path, options, writable)?
    } else {
        open_parent_layer(path, options)?
    };
    let mut warnings: Vec<String> = raw_by_detection(&*top, path, options.format.is_none())
        .into_iter()
        .collect();
    let mut chain: Vec<(Arc<dyn Layer>, Option<PathBuf>)> = vec![(top, Some(path.to_path_buf()))];
    let mut location = LayerLocation::File(path.to_path_buf());
    let mut seen = HashSet::new();
    seen.insert(match path.canonicalize() {
        Ok(p) => LayerLocation::File(p),
        Err(_) => location.clone(),
    });
    loop {
        let child = &chain[chain.len() - 1].0;
        let info = child.layer_info();
        let Some(hint) = info.parent_path.clone() else {
            if info.parent_uuid.is_some() && chain.len() > 1 {
                return Err(
                    Error::corrupt("the layer records a parent UUID but no parent path")
                        .with_path(location.to_string()),
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
        let parent_options = options.for_parent(info.parent_format, child.block_size());
        let resolved = match options.parents.resolver() {
            Some(r) => r.resolve(&location, &hint)?,
            None => None,
        };
        let (parent, parent_location) = match (resolved, &location) {
            (Some(p), _) => {
                let parent = open_parent_on(&p.storage, &parent_options)
                    .map_err(|e| e.with_path(p.location.to_string()))?;
                warnings.extend(p.warning);
                (parent, p.location)
            }
            (None, LayerLocation::File(child_path)) => {
                let parent_path = options.parents.resolve(child_path, &hint)?;
                let parent = open_parent_layer(&parent_path, &parent_options)?;
                warnings.extend(raw_by_detection(
                    &*parent,
                    &parent_path,
                    info.parent_format.is_none(),
                ));
                (parent, LayerLocation::File(parent_path))
            }
            (None, LayerLocation::Other(child)) => {
                return Err(Error::new(
                    ErrorKind::PolicyDenied,
                    format!("parent '{hint}' named by the layer at '{child}' was not opened by the resolver"),
                ));
            }
        };
        if !seen.insert(parent_location.clone()) {
            return Err(Error::new(ErrorKind::StackRule, "the chain of parents loops")
                .with_path(parent_location.to_string()));
        }
        let file = match &parent_location {
            LayerLocation::File(p) => Some(p.clone()),
            LayerLocation::Other(_) => None,
        };
        chain.push((parent, file));
        location = parent_location;
    }
    chain.reverse();
    let mut stack = Stack::assemble(chain, options.mode)?;
    stack.warnings = warnings;
    Ok(stack)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use uuid::Uuid;

    use super::*;
    use crate::formats::CreateOptions;
    use crate::layer::{ImageFormat, LayerInfo, LayerType};
    use crate::storage::MemStorage;

    fn alone_standalone(layer: Arc<dyn Layer>, mode: OpenMode) -> Result<Stack> {
        alone(layer, mode, Alone::Standalone)
    }

    /// A new image of `format` on memory storage recording `layer_type` (and a parent UUID, as a
    /// layer in a stack does).
    fn layer_on_memory(format: ImageFormat, layer_type: LayerType) -> Arc<dyn Storage> {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let layer = crate::formats::create(storage.clone(), &CreateOptions::new(format, 4 << 20)).unwrap();
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
        let kind = |r: Result<Stack>| r.map(|_| ()).map_err(|e| e.kind());
        // Standalone: writability first, then the parent.
        assert_eq!(
            kind(alone_standalone(open(&with_parent, false), ReadWrite)),
            Err(ErrorKind::ReadOnly)
        );
        for (writable, mode) in [(true, ReadWrite), (false, ReadOnly)] {
            assert_eq!(
                kind(alone_standalone(open(&with_parent, writable), mode)),
                Err(ErrorKind::PolicyDenied)
            );
        }
        // Detached: the parent first, then writability; read-only is allowed.
        assert_eq!(
            kind(alone(open(&with_parent, false), ReadWrite, Alone::Detached)),
            Err(ErrorKind::InvalidArgument)
        );
        let image = alone(open(&with_parent, false), ReadOnly, Alone::Detached).unwrap();
        assert_eq!(image.layer_type(), Some(LayerType::Overlay));
        let plain: Arc<dyn Storage> = Arc::new(MemStorage::new());
        crate::formats::create(plain.clone(), &CreateOptions::new(ImageFormat::Asif, 4 << 20)).unwrap();
        assert_eq!(
            kind(alone(open(&plain, false), ReadWrite, Alone::Detached)),
            Err(ErrorKind::ReadOnly)
        );
        assert!(alone_standalone(open(&plain, true), ReadWrite).is_ok());
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
