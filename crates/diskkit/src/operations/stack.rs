//! The stack operations on layer files: thin wrappers that open the stack at a path and call
//! the method of the open stack ([`DiskImage::snapshot`], [`DiskImage::restore`],
//! [`DiskImage::commit`], [`DiskImage::rebase`]; see [`crate::stack::operations`]).
//!
//! Each opens the stack read-write, so it is refused (`ErrorKind::Locked`) while another
//! process (a VM, `qemu-nbd`, `diskkit serve`) uses the top layer.

use crate::error::Result;
use crate::image::DiskImage;
use crate::stack::{open, OpenOptions, Stack};
pub use crate::stack::{MergeStats, RebaseMode};
use std::path::{Path, PathBuf};

fn read_write(options: &OpenOptions) -> OpenOptions {
    options.clone().writable(true)
}

fn read_only(options: &OpenOptions) -> OpenOptions {
    options.clone().writable(false)
}

/// Freeze the layer at `top` and put a new empty overlay on it, at the same path. The frozen
/// layer moves to a new name next to it, which is returned.
pub fn snapshot(top: &Path, options: &OpenOptions) -> Result<PathBuf> {
    DiskImage::open(top, &read_write(options))?.snapshot()
}

/// Discard everything written to the top layer at `top`: it is replaced by a new empty layer
/// of the same type and format over the same parent.
pub fn restore(top: &Path, options: &OpenOptions) -> Result<()> {
    DiskImage::open(top, &read_write(options))?.restore()
}

/// Merge the top layer at `top` into the layer beneath it, then empty the top.
pub fn commit(top: &Path, options: &OpenOptions) -> Result<MergeStats> {
    DiskImage::open(top, &read_write(options))?.commit()
}

/// Move the top layer at `top` onto `new_parent`.
///
/// [`RebaseMode::Safe`] opens the whole stack and copies into the top every range where the
/// old and new parents differ, so the stack reads the same. [`RebaseMode::Unsafe`]
/// (`qemu-img rebase -u`) opens only the top layer, without its old parents (which may be gone
/// or no longer match), and records the new parent.
pub fn rebase(top: &Path, new_parent: &Path, options: &OpenOptions, mode: RebaseMode) -> Result<MergeStats> {
    let parent = DiskImage::open(new_parent, &read_only(options))?;
    match mode {
        RebaseMode::Safe => DiskImage::open(top, &read_write(options))?.rebase(parent, mode),
        RebaseMode::Unsafe => {
            let layer = open::open_file_layer(top, options, true)?;
            let info = layer.layer_info();
            let mut stack = Stack {
                levels: vec![crate::stack::io::Level::new(layer, info.layer_type)],
                paths: vec![Some(top.to_path_buf())],
                mode: crate::layer::OpenMode::ReadWrite,
                options: read_write(options),
                warnings: Vec::new(),
            };
            stack
                .rebase(parent.into_stack(), mode)
                .map_err(|e| e.with_path(top))
        }
    }
}
