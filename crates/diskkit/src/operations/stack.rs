//! Whole-stack operations on layer files: snapshot, restore, commit and rebase.
//!
//! Each works on the path of a stack's top layer and keeps that path the *active* one, so a VM
//! configured with it keeps working:
//!
//! - [`snapshot`] freezes the top under a new name (`<stem>.snapN.<ext>`) and puts a new empty
//!   overlay on it at the old path.
//! - [`restore`] throws away everything written since the last snapshot: the top is replaced
//!   by a new empty layer over the same parent.
//! - [`commit`] merges the top into the layer beneath it, then empties the top.
//! - [`rebase`] moves the top onto another parent, first copying into the top every range where
//!   the old and new parents differ, so the stack reads the same afterwards.
//!
//! Every step that replaces the top writes the new file under a temporary name and renames it
//! over the old one, so a crash leaves either the old top or the new one.

use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::image::DiskImage;
use crate::layer::{ImageFormat, LayerType};
use crate::mapping::{Extent, ExtentKind};
pub use crate::stack::MergeStats;
use crate::stack::{parent_hint, LayerOptions, OpenOptions};

/// Bytes moved per request by commit and rebase.
const PIECE: usize = 1 << 20;

fn layer_options_like(image: &DiskImage) -> LayerOptions {
    let kind = image.layer_type().unwrap_or(LayerType::Overlay);
    let format = match image.format() {
        ImageFormat::Raw => ImageFormat::Asif,
        f => f,
    };
    let mut options = LayerOptions::new(kind).format(format).overwrite(true);
    if let Some(chunk) = image.top_layer_chunk_size() {
        options = options.chunk_size(chunk);
    }
    options
}

fn read_only(options: &OpenOptions) -> OpenOptions {
    options.clone().writable(false)
}

/// Freeze the layer at `top` and put a new empty overlay on it, at the same path. The frozen
/// layer moves to a new name next to it, which is returned.
pub fn snapshot(top: &Path, options: &OpenOptions) -> Result<PathBuf> {
    let current = DiskImage::open(top, &read_only(options))?;
    let mut layer_options = layer_options_like(&current);
    layer_options.layer_type = LayerType::Overlay;
    drop(current);
    let frozen = snapshot_name(top)?;
    // Two names for the same file first; the rename below replaces only the active name.
    std::fs::hard_link(top, &frozen).map_err(|e| {
        Error::io(e)
            .with_path(&frozen)
            .with_operation("linking the frozen layer")
    })?;
    let result = DiskImage::open(&frozen, &read_only(options)).and_then(|mut stack| {
        stack.append_new(top, &layer_options)?;
        stack.flush()
    });
    match result {
        Ok(()) => Ok(frozen),
        Err(e) => {
            // The active name still holds the untouched top; drop the extra name.
            let _ = std::fs::remove_file(&frozen);
            Err(e)
        }
    }
}

/// The first free `<stem>.snapN.<ext>` next to `top`.
fn snapshot_name(top: &Path) -> Result<PathBuf> {
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

/// Discard everything written to the top layer at `top`: it is replaced by a new empty layer
/// of the same type and format over the same parent.
pub fn restore(top: &Path, options: &OpenOptions) -> Result<()> {
    let current = DiskImage::open(top, &read_only(options))?;
    if current.layer_count() < 2 {
        return Err(Error::new(
            ErrorKind::StackRule,
            "this image has no parent: there is no snapshot to restore",
        )
        .with_path(top));
    }
    let layer_options = layer_options_like(&current);
    let parent = parent_path(&current, top)?;
    drop(current);
    let mut image = DiskImage::open(&parent, &read_only(options))?;
    image.append_new(top, &layer_options)?;
    image.flush()
}

fn parent_path(stack: &DiskImage, top: &Path) -> Result<PathBuf> {
    let paths = stack.layer_paths();
    paths[paths.len() - 2]
        .clone()
        .ok_or_else(|| Error::invalid_argument("the parent layer has no path").with_path(top))
}

/// The runs of `stack` for which `keep` holds, in order, adjacent runs merged.
fn extents_where(stack: &DiskImage, keep: impl Fn(&Extent) -> bool) -> Result<Vec<Extent>> {
    let mut out = Vec::new();
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

/// Merge the top layer at `top` into the layer beneath it, then empty the top.
///
/// Crash safety: the top first stops checking its parent's UUID (the parent's UUID changes at
/// its first write), then the parent takes the top's data and is flushed, and only then is the
/// top replaced by an empty layer recording the parent's new UUID. At every point the stack
/// reads the same; an interrupted commit is finished by running it again.
pub fn commit(top: &Path, options: &OpenOptions) -> Result<MergeStats> {
    let rw = options.clone().writable(true);
    let stack = DiskImage::open(top, &rw)?;
    let n = stack.layer_count();
    if n < 2 {
        return Err(
            Error::new(ErrorKind::StackRule, "this image has no parent to commit into").with_path(top),
        );
    }
    if stack.layer_types()[n - 2] == Some(LayerType::Cache) {
        return Err(Error::new(
            ErrorKind::StackRule,
            "the layer beneath is a cache layer, which only keeps copies of its parent; \
             commit into the layer beneath the cache instead",
        )
        .with_path(top));
    }
    let layer_options = layer_options_like(&stack);
    let parent = parent_path(&stack, top)?;

    // 1. The top stops pinning the parent's UUID while the parent changes.
    let top_layer = stack.top_layer();
    let mut info = top_layer.layer_info();
    if info.parent_uuid.is_some() {
        info.parent_uuid = None;
        top_layer.set_layer_info(&info)?;
        top_layer.flush()?;
    }

    // 2. Copy what the top holds into the parent (through the parent's own chain, so partial
    //    allocations are filled from beneath it).
    let mut target = DiskImage::open(&parent, &rw)?;
    if target.size() != stack.size() {
        target.resize(stack.size())?;
    }
    let mut stats = MergeStats::default();
    let mut buf = vec![0u8; PIECE];
    // The ranges the top layer holds itself (depth 1).
    for e in extents_where(&stack, |e| e.depth == 1)? {
        if e.kind == ExtentKind::Zero {
            target.write_zeroes(e.offset, e.length, true)?;
            stats.zero_bytes += e.length;
            continue;
        }
        let mut pos = e.offset;
        while pos < e.end() {
            let len = ((e.end() - pos) as usize).min(PIECE);
            stack.read_at(&mut buf[..len], pos)?;
            target.write_at(&buf[..len], pos)?;
            stats.data_bytes += len as u64;
            pos += len as u64;
        }
    }
    target.flush()?;
    drop(stack);

    // 3. The top becomes an empty layer over the updated parent.
    target.append_new(top, &layer_options)?;
    target.flush()?;
    Ok(stats)
}

/// Move the top layer at `top` onto `new_parent`, keeping what the stack reads: every range the
/// top does not hold itself and where the old and new parents differ is copied into the top
/// first. Then the top records the new parent.
pub fn rebase(top: &Path, new_parent: &Path, options: &OpenOptions) -> Result<MergeStats> {
    let rw = options.clone().writable(true);
    let stack = DiskImage::open(top, &rw)?;
    if stack.layer_count() < 2 {
        return Err(
            Error::new(ErrorKind::StackRule, "this image has no parent to rebase from").with_path(top),
        );
    }
    let new = DiskImage::open(new_parent, &read_only(options))?;
    let new_size = new.size();
    let mut stats = MergeStats::default();
    let mut old_buf = vec![0u8; PIECE];
    let mut new_buf = vec![0u8; PIECE];
    // The ranges the top does not hold: they come from the old parents.
    for e in extents_where(&stack, |e| e.depth != 1)? {
        let mut pos = e.offset;
        while pos < e.end() {
            let len = ((e.end() - pos) as usize).min(PIECE);
            let old = &mut old_buf[..len];
            let newb = &mut new_buf[..len];
            if e.reads_as_zero() {
                old.fill(0);
            } else {
                stack.read_at(old, pos)?;
            }
            newb.fill(0);
            if pos < new_size {
                let n = ((new_size - pos) as usize).min(len);
                new.read_at(&mut newb[..n], pos)?;
            }
            if old != newb {
                if crate::copy::is_zero(old) {
                    stack.write_zeroes(pos, len as u64, true)?;
                    stats.zero_bytes += len as u64;
                } else {
                    stack.write_at(old, pos)?;
                    stats.data_bytes += len as u64;
                }
            }
            pos += len as u64;
        }
    }
    stack.flush()?;
    let top_layer = stack.top_layer();
    let mut info = top_layer.layer_info();
    info.parent_path = Some(parent_hint(top, new_parent)?);
    info.parent_uuid = new.layer_uuid();
    info.parent_format = Some(new.format());
    top_layer.set_layer_info(&info)?;
    top_layer.flush()?;
    Ok(stats)
}
