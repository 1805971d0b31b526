//! One module per command (or per family of commands), each with its clap `Args` next to its
//! implementation; helpers shared by several commands.

pub(crate) mod access;
pub(crate) mod boot;
pub(crate) mod bundle;
pub(crate) mod cache;
pub(crate) mod check;
pub(crate) mod compare;
pub(crate) mod completions;
pub(crate) mod convert;
pub(crate) mod create;
pub(crate) mod fs;
pub(crate) mod info;
pub(crate) mod kernel;
pub(crate) mod manpages;
pub(crate) mod map;
pub(crate) mod partitions;
pub(crate) mod prefetch;
pub(crate) mod pull;
pub(crate) mod push;
pub(crate) mod serve;
pub(crate) mod stack;
pub(crate) mod unpack;

use std::path::{Path, PathBuf};

use anyhow::Result;
use diskkit::{DiskImage, ErrorKind, OpenOptions};

use crate::messages::Hint;

/// Open an image (and the stack beneath it). A parent refused by the policy gets the
/// `--allow-parent-dir` that would follow it as the error's fix.
pub(crate) fn open_image(path: &Path, options: &OpenOptions) -> Result<DiskImage> {
    let image = DiskImage::open(path, options).map_err(|e| {
        let hint = (e.kind() == ErrorKind::PolicyDenied)
            .then(|| e.path().and_then(allow_parent_hint))
            .flatten();
        let e = anyhow::Error::new(e);
        let e = match hint {
            Some(h) => e.context(h),
            None => e,
        };
        e.context(format!("cannot open '{}'", path.display()))
    })?;
    print_warnings(&image);
    Ok(image)
}

/// Tell the user what opening the image noticed (a file read as RAW whose name says otherwise).
pub(crate) fn print_warnings(image: &DiskImage) {
    for w in image.warnings() {
        crate::messages::warn(format_args!("{w}"));
    }
}

/// Where the parent named by the layer at `child` lies, when it is a relative path that leads
/// outside the layer's directory: the directory to allow.
pub(crate) fn parent_outside(child: &Path) -> Option<(String, PathBuf)> {
    let options = OpenOptions::new().detached(true);
    let layer = DiskImage::open(child, &options).ok()?;
    let hint = layer.describe_layers().ok()?.remove(0).info.parent_path?;
    if Path::new(&hint).is_absolute() {
        return None;
    }
    let dir = child
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let target = dir.join(&hint).canonicalize().ok()?;
    let parent_dir = target.parent()?.to_path_buf();
    let child_dir = dir.canonicalize().ok()?;
    (parent_dir != child_dir).then_some((hint, parent_dir))
}

/// The fix for a parent refused by the default policy.
fn allow_parent_hint(child: &Path) -> Option<Hint> {
    let (_, dir) = parent_outside(child)?;
    Some(Hint(format!(
        "to follow it, add --allow-parent-dir {}",
        shell_path(&dir)
    )))
}

/// `dir` as the user would type it: relative to the working directory when inside it, quoted
/// for the shell when needed.
pub(crate) fn shell_path(dir: &Path) -> String {
    let cwd = std::env::current_dir().ok().and_then(|c| c.canonicalize().ok());
    let shown = match cwd.as_deref().and_then(|c| dir.strip_prefix(c).ok()) {
        Some(rel) if rel.as_os_str().is_empty() => ".".to_owned(),
        Some(rel) => rel.display().to_string(),
        None => dir.display().to_string(),
    };
    if shown
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+,:@".contains(&b))
    {
        shown
    } else {
        format!("'{}'", shown.replace('\'', r"'\''"))
    }
}
