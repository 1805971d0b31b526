//! Stack commands: `layer create`, `snapshot`, `restore`, `commit`, `rebase`.

use std::path::Path;

use anyhow::{Context, Result};
use diskkit::operations::stack as operations;
use diskkit::{ImageFormat, LayerOptions, LayerType};

use super::{open_image, open_options};
use crate::args::{Format, LayerKind, OpenArgs};
use crate::size::parse_size;

pub(crate) fn layer_create(
    open: &OpenArgs,
    kind: LayerKind,
    format: Format,
    chunk_size: Option<&str>,
    parent: &Path,
    force: bool,
    path: &Path,
) -> Result<u8> {
    let kind = match kind {
        LayerKind::Overlay => LayerType::Overlay,
        LayerKind::Cache => LayerType::Cache,
    };
    let format: ImageFormat = format.into();
    let mut options = LayerOptions::new(kind).format(format).overwrite(force);
    if let Some(c) = chunk_size {
        options = options.chunk_size(u32::try_from(parse_size(c)?).context("chunk size too large")?);
    }
    let mut stack = open_image(open, parent, false)?;
    stack
        .append_new(path, &options)
        .with_context(|| format!("cannot create the layer '{}'", path.display()))?;
    stack.flush()?;
    Ok(0)
}

pub(crate) fn snapshot(open: &OpenArgs, top: &Path) -> Result<u8> {
    let frozen = operations::snapshot(top, &open_options(open, false))
        .with_context(|| format!("cannot snapshot '{}'", top.display()))?;
    println!("{}", frozen.display());
    Ok(0)
}

pub(crate) fn restore(open: &OpenArgs, top: &Path) -> Result<u8> {
    operations::restore(top, &open_options(open, false))
        .with_context(|| format!("cannot restore '{}'", top.display()))?;
    Ok(0)
}

pub(crate) fn commit(open: &OpenArgs, top: &Path) -> Result<u8> {
    let stats = operations::commit(top, &open_options(open, true))
        .with_context(|| format!("cannot commit '{}'", top.display()))?;
    eprintln!(
        "committed {} bytes of data and {} bytes of zeroes",
        stats.data_bytes, stats.zero_bytes
    );
    Ok(0)
}

pub(crate) fn rebase(open: &OpenArgs, top: &Path, new_parent: &Path, unsafe_rebase: bool) -> Result<u8> {
    let mode = if unsafe_rebase {
        operations::RebaseMode::Unsafe
    } else {
        operations::RebaseMode::Safe
    };
    let stats = operations::rebase(top, new_parent, &open_options(open, true), mode).with_context(|| {
        format!(
            "cannot rebase '{}' onto '{}'",
            top.display(),
            new_parent.display()
        )
    })?;
    if unsafe_rebase {
        eprintln!("recorded the new parent; nothing was copied (unsafe rebase)");
    } else {
        eprintln!(
            "copied {} bytes of data and {} bytes of zeroes into the top layer",
            stats.data_bytes, stats.zero_bytes
        );
    }
    Ok(0)
}
