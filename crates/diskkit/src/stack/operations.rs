//! Whole-stack operations on an open stack: snapshot, restore, commit and rebase.
//!
//! Each keeps the top layer's path the *active* one, so a VM configured with it keeps working:
//!
//! - [`Stack::snapshot`] freezes the top under a new name (`<stem>.snapN.<ext>`) and puts a new
//!   empty overlay of the same format on it at the old path (refused for a RAW top: the overlay
//!   would sit under a `.raw` name that other tools read as a raw disk).
//! - [`Stack::restore`] throws away everything written since the last snapshot: the top is
//!   replaced by a new empty layer over the same parent.
//! - [`Stack::commit`] merges the top into the layer beneath it, then empties the top. Refused
//!   when other layers depend on either of the two (they would be left pointing at a layer whose
//!   UUID changed); a process using them holds a lock that refuses it too.
//! - [`Stack::rebase`] moves the top onto another parent; [`RebaseMode::Safe`] first copies into
//!   the top every range where the old and new parents differ, so the stack reads the same;
//!   [`RebaseMode::Unsafe`] only re-points it (`qemu-img rebase -u`), for when the new parent
//!   is known to hold the same data (a copy, a converted file) or the old one is gone.
//!
//! The stack must be open read-write: its lock on the top is what guarantees nobody else uses
//! it. Every step that replaces the top writes the new file under a temporary name and renames
//! it over the old one, so a crash leaves either the old top or the new one; the new file is
//! locked from the moment it exists. Parents change locks without ever letting go of them
//! (writer to reader and back on the same open file). If an operation fails halfway, the files
//! are consistent but the open stack may not be: open it again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use super::io::Level;
use super::{open, parent_hint, LayerOptions, OpenOptions, Stack};
use crate::error::{Error, ErrorKind, Result};
use crate::layer::{Access, ImageFormat, Layer, LayerInfo, LayerType, OpenMode};
use crate::mapping::{Extent, ExtentKind};
use crate::output::{containing_dir, Temporary};
use crate::storage::{FileStorage, Permissions, Storage};

/// Bytes moved per request by commit and rebase.
const PIECE: usize = 1 << 20;

/// What a commit or rebase did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Bytes of data copied.
    pub data_bytes: u64,
    /// Bytes made to read as zeroes.
    pub zero_bytes: u64,
}

/// How [`Stack::rebase`] treats the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebaseMode {
    /// Copy into the top every range where the old and new parents differ first, so the stack
    /// reads the same afterwards.
    Safe,
    /// Only record the new parent (`qemu-img rebase -u`): what the stack reads changes
    /// wherever the new parent differs from the old. For a new parent known to hold the same
    /// data, or an old one that is gone.
    Unsafe,
}

impl Stack {
    /// The options of a new layer like the top (type, format, ASIF chunk size), replacing it.
    fn layer_options_like_top(&self, layer_type: LayerType) -> LayerOptions {
        let format = match self.top().format() {
            ImageFormat::Raw => ImageFormat::Asif,
            f => f,
        };
        let mut options = LayerOptions::new(layer_type).format(format).overwrite(true);
        if let Some(chunk) = self.top_layer_chunk_size() {
            options = options.chunk_size(chunk);
        }
        options
    }

    fn top_path_for(&self, what: &str) -> Result<PathBuf> {
        self.path().map(Path::to_path_buf).ok_or_else(|| {
            Error::invalid_argument(format!(
                "{what} works on layers stored in files; the top layer is not"
            ))
        })
    }

    /// Replace the top with `layer` (at `path`), keeping the levels below `keep`.
    fn replace_above(&mut self, keep: usize, layer: Arc<dyn Layer>, path: PathBuf) -> Result<()> {
        let mut layers: Vec<(Arc<dyn Layer>, Option<PathBuf>)> = self.levels[..keep]
            .iter()
            .zip(&self.paths)
            .map(|(l, p)| (l.layer.clone(), p.clone()))
            .collect();
        layers.push((layer, Some(path)));
        let options = self.options.clone();
        *self = Stack::assemble(layers, OpenMode::ReadWrite)?;
        self.options = options.mode(OpenMode::ReadWrite);
        Ok(())
    }

    /// Freeze the top layer and put a new, empty overlay of the same format on it at the same
    /// path. The frozen layer moves to a new name next to it (`<stem>.snapN.<ext>`), which is
    /// returned; the stack goes on with the new overlay on top.
    pub(crate) fn snapshot(&mut self) -> Result<PathBuf> {
        self.check_writable()?;
        let top_path = self.top_path_for("snapshot")?;
        if self.top().format() == ImageFormat::Raw {
            return Err(Error::new(
                ErrorKind::StackRule,
                "a snapshot of a RAW image would put an overlay in another format under its \
                 name, which other tools would read as a raw disk; put an overlay on it under a \
                 name of its own instead (diskkit layer create --parent IMAGE NEW.asif)",
            )
            .with_path(&top_path));
        }
        let layer_options = self.layer_options_like_top(LayerType::Overlay);
        self.flush()?;
        let frozen = snapshot_name(&top_path)?;
        // Two names for the same file first; the rename below replaces only the active name.
        // Until then the extra name is a temporary (removed on error or interrupt).
        let link = Temporary::hard_link(&top_path, &frozen)?;
        let n = self.levels.len();
        let new_top = self.create_layer_file(&top_path, n - 1, Some(&frozen), &layer_options)?;
        link.keep();
        // The old top is now the frozen parent. Its lock becomes a reader's (nobody may write
        // it any more); then it is opened afresh under its new name.
        let old_top = self.levels[n - 1].layer.clone();
        let old_type = self.levels[n - 1].layer_type;
        let old_storage = old_top.storage();
        if old_storage.permissions().is_some() {
            old_storage.set_permissions(Permissions::reader())?;
        }
        let parent_options = self
            .options
            .for_parent(Some(old_top.format()), old_top.block_size());
        let mut parent = open::open_parent_layer(&frozen, &parent_options)?;
        let mut layers: Vec<(Arc<dyn Layer>, Option<PathBuf>)> = self.levels[..n - 1]
            .iter()
            .zip(&self.paths)
            .map(|(l, p)| (l.layer.clone(), p.clone()))
            .collect();
        drop(old_top);
        *self = Stack::empty();
        if old_type == Some(LayerType::Cache) && !parent.writable() {
            // The old open held it until now; as the only holder it can fill again.
            let again = open::open_parent_on(&parent.storage().reopen(false)?, &parent_options)?;
            if again.writable() {
                parent = again;
            }
        }
        layers.push((parent, Some(frozen.clone())));
        layers.push((new_top, Some(top_path)));
        let options = parent_options.clone();
        *self = Stack::assemble(layers, OpenMode::ReadWrite)?;
        self.options = OpenOptions {
            mode: OpenMode::ReadWrite,
            parents: options.parents,
            force_share: false,
            unlocked: options.unlocked,
            ..OpenOptions::new()
        };
        Ok(frozen)
    }

    /// Throw away everything written to the top layer: it is replaced by a new, empty layer of
    /// the same type and format over the same parent.
    pub(crate) fn restore(&mut self) -> Result<()> {
        self.check_writable()?;
        let n = self.levels.len();
        if n < 2 {
            return Err(Error::new(
                ErrorKind::StackRule,
                "this image has no parent: there is no snapshot to restore",
            ));
        }
        let top_path = self.top_path_for("restore")?;
        let layer_options = self.layer_options_like_top(self.layer_type().unwrap_or(LayerType::Overlay));
        let parent_path = self.paths[n - 2].clone();
        let layer = self.create_layer_file(&top_path, n - 2, parent_path.as_deref(), &layer_options)?;
        self.replace_above(n - 1, layer, top_path)
    }

    /// Merge the top layer into the layer beneath it, then empty the top.
    ///
    /// Crash safety: the top first stops checking its parent's UUID (the parent's UUID changes
    /// at its first write), then the parent takes the top's data and is flushed, and only then
    /// is the top replaced by an empty layer recording the parent's new UUID. At every point the
    /// stack reads the same; an interrupted commit is finished by running it again.
    pub(crate) fn commit(&mut self) -> Result<MergeStats> {
        self.check_writable()?;
        let n = self.levels.len();
        if n < 2 {
            return Err(Error::new(
                ErrorKind::StackRule,
                "this image has no parent to commit into",
            ));
        }
        if self.levels[n - 2].layer_type == Some(LayerType::Cache) {
            return Err(Error::new(
                ErrorKind::StackRule,
                "the layer beneath is a cache layer, which only keeps copies of its parent; \
                 commit into the layer beneath the cache instead",
            ));
        }
        let top_path = self.top_path_for("commit")?;
        let parent_path = self.paths[n - 2].clone();
        self.refuse_dependents(&top_path, parent_path.as_deref())?;
        let layer_options = self.layer_options_like_top(self.layer_type().unwrap_or(LayerType::Overlay));
        self.flush()?;

        // 0. The parent becomes writable: a writer's lock on the same open file (refused while
        //    another process uses it), and a fresh driver (the one in the stack has cached
        //    metadata that is about to go stale).
        let parent = self.levels[n - 2].layer.clone();
        let parent_storage = parent.storage().reopen(true)?;
        parent_storage.set_permissions(Permissions::writer())?;
        let open_rw = OpenOptions::new()
            .format(parent.format())
            .raw_block_size(parent.block_size());
        let parent_rw = open::open_layer_with(parent_storage.clone(), &open_rw, &Access::ReadWrite);
        let parent_rw = match parent_rw {
            Ok(p) => p,
            Err(e) => {
                let _ = parent_storage.set_permissions(Permissions::reader());
                return Err(e);
            }
        };

        // 1. The top stops pinning the parent's UUID while the parent changes.
        let top = self.top().clone();
        let mut info = top.layer_info();
        if info.parent_uuid.is_some() {
            info.parent_uuid = None;
            top.set_layer_info(&info)?;
            top.flush()?;
        }

        // 2. Copy what the top holds into the parent (through the parent's own chain, so
        //    partial allocations are filled from beneath it).
        let target = Stack {
            levels: self.levels[..n - 2]
                .iter()
                .map(|l| Level::new(l.layer.clone(), l.layer_type))
                .chain(std::iter::once(Level::new(
                    parent_rw.clone(),
                    self.levels[n - 2].layer_type,
                )))
                .collect(),
            paths: self.paths[..n - 1].to_vec(),
            mode: OpenMode::ReadWrite,
            options: OpenOptions::new(),
            warnings: Vec::new(),
        };
        if target.size() != self.size() {
            target.resize(self.size())?;
        }
        let mut stats = MergeStats::default();
        let mut buf = vec![0u8; PIECE];
        for e in extents_where(self, |e| e.depth == 1)? {
            if e.kind == ExtentKind::Zero {
                target.write_zeroes(e.offset, e.length, true)?;
                stats.zero_bytes += e.length;
                continue;
            }
            let mut pos = e.offset;
            while pos < e.end() {
                let len = ((e.end() - pos) as usize).min(PIECE);
                self.read_at(&mut buf[..len], pos)?;
                target.write_at(&buf[..len], pos)?;
                stats.data_bytes += len as u64;
                pos += len as u64;
            }
        }
        target.flush()?;

        // 3. The top becomes an empty layer over the updated parent, which goes back to being
        //    a reader, opened afresh.
        let new_top = target.create_layer_file(&top_path, n - 2, parent_path.as_deref(), &layer_options)?;
        parent_storage.set_permissions(Permissions::reader())?;
        let parent_options = self
            .options
            .for_parent(Some(parent.format()), parent.block_size());
        let parent_ro = open::open_parent_on(&parent_storage.reopen(false)?, &parent_options)?;
        drop(target);
        drop(parent_rw);
        let mut layers: Vec<(Arc<dyn Layer>, Option<PathBuf>)> = self.levels[..n - 2]
            .iter()
            .zip(&self.paths)
            .map(|(l, p)| (l.layer.clone(), p.clone()))
            .collect();
        layers.push((parent_ro, parent_path));
        layers.push((new_top, Some(top_path)));
        let options = self.options.clone();
        *self = Stack::assemble(layers, OpenMode::ReadWrite)?;
        self.options = options;
        Ok(stats)
    }

    /// Layers next to the top or its parent (in their directories) that depend on them, other
    /// than the top itself: the commit would leave them unusable.
    fn refuse_dependents(&self, top_path: &Path, parent_path: Option<&Path>) -> Result<()> {
        let n = self.levels.len();
        let mut found = dependents(top_path, self.levels[n - 1].layer.layer_info().layer_uuid, &[]);
        if let Some(parent_path) = parent_path {
            found.extend(dependents(
                parent_path,
                self.levels[n - 2].layer.layer_info().layer_uuid,
                &[top_path.to_path_buf()],
            ));
        }
        if found.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = found.iter().map(|p| format!("'{}'", p.display())).collect();
        Err(Error::new(
            ErrorKind::StackRule,
            format!(
                "other layers depend on the layers this commit changes: {}; committing would leave \
                 them unusable (commit or remove them first, or flatten the stack instead)",
                names.join(", ")
            ),
        )
        .with_path(top_path))
    }

    /// Move the top layer onto `new_parent` (a stack opened read-only, which becomes the
    /// stack below the top). See [`RebaseMode`].
    pub(crate) fn rebase(&mut self, new_parent: Stack, mode: RebaseMode) -> Result<MergeStats> {
        self.check_writable()?;
        let top_path = self.path().map(Path::to_path_buf);
        let mut stats = MergeStats::default();
        if mode == RebaseMode::Safe {
            if self.levels.len() < 2 {
                return Err(Error::new(
                    ErrorKind::StackRule,
                    "this image has no parent to rebase from (rebase -u records a parent without copying)",
                ));
            }
            let new_size = new_parent.size();
            let mut old_buf = vec![0u8; PIECE];
            let mut new_buf = vec![0u8; PIECE];
            // The ranges the top does not hold: they come from the old parents.
            for e in extents_where(self, |e| e.depth != 1)? {
                let mut pos = e.offset;
                while pos < e.end() {
                    let len = ((e.end() - pos) as usize).min(PIECE);
                    let old = &mut old_buf[..len];
                    let newb = &mut new_buf[..len];
                    if e.reads_as_zero() {
                        old.fill(0);
                    } else {
                        self.read_at(old, pos)?;
                    }
                    newb.fill(0);
                    if pos < new_size {
                        let n = ((new_size - pos) as usize).min(len);
                        new_parent.read_at(&mut newb[..n], pos)?;
                    }
                    if old != newb {
                        if crate::storage::is_zero(old) {
                            self.write_zeroes(pos, len as u64, true)?;
                            stats.zero_bytes += len as u64;
                        } else {
                            self.write_at(old, pos)?;
                            stats.data_bytes += len as u64;
                        }
                    }
                    pos += len as u64;
                }
            }
        }
        self.flush()?;
        let top = self.top().clone();
        let mut info = top.layer_info();
        let new_top_layer = new_parent.top();
        info.parent_path = match (&top_path, new_parent.path()) {
            (Some(child), Some(parent)) => Some(parent_hint(child, parent)?),
            _ => None,
        };
        info.parent_uuid = new_top_layer.layer_info().layer_uuid;
        info.parent_format = Some(new_top_layer.format());
        if info.layer_type.is_none() {
            info.layer_type = Some(LayerType::Overlay);
        }
        top.set_layer_info(&info)?;
        top.flush()?;
        let mut layers: Vec<(Arc<dyn Layer>, Option<PathBuf>)> = new_parent
            .levels
            .iter()
            .zip(&new_parent.paths)
            .map(|(l, p)| (l.layer.clone(), p.clone()))
            .collect();
        layers.push((top, top_path));
        let options = self.options.clone();
        drop(new_parent);
        *self = Stack::assemble(layers, OpenMode::ReadWrite)?;
        self.options = options;
        Ok(stats)
    }
}

/// The runs of `stack` for which `keep` holds, in order, adjacent runs merged.
fn extents_where(stack: &Stack, keep: impl Fn(&Extent) -> bool) -> Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    stack.for_each_extent(0, stack.size(), |e| {
        if keep(&e) {
            match out.last_mut() {
                Some(last) if Extent::can_merge(last, &e) => last.length += e.length,
                _ => out.push(e),
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// The first free `<stem>.snapN.<ext>` next to `top`.
pub(crate) fn snapshot_name(top: &Path) -> Result<PathBuf> {
    let stem = top
        .file_stem()
        .ok_or_else(|| Error::invalid_argument("the layer path has no file name").with_path(top))?
        .to_string_lossy()
        .into_owned();
    let ext = top.extension().map(|e| format!(".{}", e.to_string_lossy()));
    for n in 1..10_000u32 {
        let name = format!("{stem}.snap{n}{}", ext.as_deref().unwrap_or(""));
        let candidate = top.with_file_name(name);
        if std::fs::symlink_metadata(&candidate).is_err() {
            return Ok(candidate);
        }
    }
    Err(Error::new(ErrorKind::AlreadyExists, "no free snapshot name").with_path(top))
}

/// Layer files in the directory of `target` that name it as their parent (and still match its
/// layer UUID `uuid`, or record none, as QEMU's overlays do), other than those in `skip`.
///
/// Only that directory is looked at (where diskkit puts new layers); a layer elsewhere that
/// names `target` with a longer path is not found. A process using such a layer holds a lock
/// on `target` that refuses the change anyway.
pub(crate) fn dependents(target: &Path, uuid: Option<Uuid>, skip: &[PathBuf]) -> Vec<PathBuf> {
    let Ok(target_real) = target.canonicalize() else {
        return Vec::new();
    };
    let skip: Vec<PathBuf> = skip.iter().filter_map(|p| p.canonicalize().ok()).collect();
    let dir = containing_dir(target);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(real) = path.canonicalize() else { continue };
        if real == target_real || skip.contains(&real) || crate::output::is_temporary_name(&path) {
            continue;
        }
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        if let Some(info) = layer_info_of(&path) {
            let names_target = info.parent_path.as_deref().is_some_and(|hint| {
                containing_dir(&path)
                    .join(hint)
                    .canonicalize()
                    .is_ok_and(|p| p == target_real)
            });
            if names_target && (info.parent_uuid.is_none() || info.parent_uuid == uuid) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The layer information of the image at `path`, if it is an image that can be a layer
/// (read without locking: nothing is written, and a half-written file just does not count).
fn layer_info_of(path: &Path) -> Option<LayerInfo> {
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(path, false).ok()?);
    let format = crate::formats::probe::detect(&*storage).ok()?;
    if !matches!(format, ImageFormat::Asif | ImageFormat::Qcow2) {
        return None;
    }
    let layer = open::open_layer(storage, &OpenOptions::new().format(format)).ok()?;
    Some(layer.layer_info())
}
