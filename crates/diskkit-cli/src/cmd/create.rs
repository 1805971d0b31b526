//! `diskkit create`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use diskkit::{CreateOptions, DiskImage, ImageFormat};

use crate::args::Format;
use crate::size::{human, parse_size};

/// What to create.
pub(crate) struct Request<'a> {
    pub(crate) format: Format,
    pub(crate) size: &'a str,
    pub(crate) block_size: u32,
    pub(crate) chunk_size: Option<&'a str>,
    pub(crate) cluster_size: Option<&'a str>,
    pub(crate) backing: Option<&'a str>,
    pub(crate) backing_format: Option<Format>,
    pub(crate) force: bool,
}

pub(crate) fn run(r: &Request<'_>, path: &Path) -> Result<u8> {
    let bytes = parse_size(r.size)?;
    if bytes == 0 {
        bail!("size must be greater than zero");
    }
    // Round up to whole blocks, as diskutil and qemu-img do.
    let bytes = bytes
        .checked_next_multiple_of(u64::from(r.block_size))
        .context("size too large")?;
    let format: ImageFormat = r.format.into();
    let mut options = CreateOptions::new(format, bytes)
        .block_size(r.block_size)
        .overwrite(r.force);
    if let Some(c) = r.chunk_size {
        let c = parse_size(c)?;
        options = options.chunk_size(u32::try_from(c).context("chunk size too large")?);
    }
    if let Some(c) = r.cluster_size {
        if format != ImageFormat::Qcow2 {
            bail!("--cluster-size is for qcow2 images");
        }
        let c = parse_size(c)?;
        options = options.cluster_size(u32::try_from(c).context("cluster size too large")?);
    }
    if let Some(b) = r.backing {
        if format != ImageFormat::Qcow2 {
            bail!("--backing is for qcow2 images");
        }
        options = options.backing_file(b, r.backing_format.map(Into::into));
        DiskImage::create_file(path, &options)
            .with_context(|| format!("cannot create '{}'", path.display()))?;
        println!(
            "created {format} image '{}': {} over backing file '{b}' (not opened)",
            path.display(),
            human(bytes)
        );
        return Ok(0);
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
