//! `diskkit create`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use diskkit::{CreateOptions, DiskImage};

use crate::args::Format;
use crate::size::{human, parse_size};

pub(crate) fn run(
    format: Format,
    size: &str,
    block_size: u32,
    chunk_size: Option<&str>,
    force: bool,
    path: &Path,
) -> Result<u8> {
    let bytes = parse_size(size)?;
    if bytes == 0 {
        bail!("size must be greater than zero");
    }
    // Round up to whole blocks, as diskutil and qemu-img do.
    let bytes = bytes
        .checked_next_multiple_of(u64::from(block_size))
        .context("size too large")?;
    let mut options = CreateOptions::new(format.into(), bytes)
        .block_size(block_size)
        .overwrite(force);
    if let Some(c) = chunk_size {
        let c = parse_size(c)?;
        options = options.chunk_size(u32::try_from(c).context("chunk size too large")?);
    }
    let image =
        DiskImage::create(path, &options).with_context(|| format!("cannot create '{}'", path.display()))?;
    println!(
        "created {} image '{}': {} ({} blocks of {} bytes)",
        image.format(),
        path.display(),
        human(image.size()),
        image.block_count(),
        image.block_size()
    );
    Ok(0)
}
