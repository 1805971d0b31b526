//! `diskkit convert`.

use std::path::Path;

use anyhow::{Context, Result};
use diskkit::copy::copy;
use diskkit::{CreateOptions, DiskImage, ImageFormat};

use super::open_image;
use crate::args::{Format, OpenArgs};
use crate::progress::bytes_bar;
use crate::size::parse_size;

pub(crate) fn run(
    open: &OpenArgs,
    output_format: Option<Format>,
    block_size: Option<u32>,
    (chunk_size, cluster_size): (Option<&str>, Option<&str>),
    force: bool,
    src: &Path,
    dst: &Path,
) -> Result<u8> {
    let source = open_image(open, src, false)?;
    let format: ImageFormat = output_format.map(Into::into).unwrap_or(source.format());
    let block_size = block_size.unwrap_or(source.block_size());
    let size = source
        .size()
        .checked_next_multiple_of(u64::from(block_size))
        .context("size too large")?;
    let mut options = CreateOptions::new(format, size)
        .block_size(block_size)
        .overwrite(force);
    if let Some(c) = chunk_size {
        options = options.chunk_size(u32::try_from(parse_size(c)?).context("chunk size too large")?);
    }
    if let Some(c) = cluster_size {
        options = options.cluster_size(u32::try_from(parse_size(c)?).context("cluster size too large")?);
    }
    let pending = DiskImage::create_pending(dst, &options)
        .with_context(|| format!("cannot create '{}'", dst.display()))?;
    let bar = bytes_bar(source.size(), "converting");
    copy(&source, pending.image(), &mut |done| bar.set_position(done))
        .with_context(|| format!("cannot convert '{}' to '{}'", src.display(), dst.display()))?;
    pending
        .persist()
        .with_context(|| format!("cannot finish '{}'", dst.display()))?;
    bar.finish_and_clear();
    Ok(0)
}
