//! `diskkit create`: a blank image.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use diskkit::{CreateOptions, DiskImage, ImageFormat};

use crate::args::{block_size, NewImageArgs, QuietArg};
use crate::format::{self, Format};
use crate::messages::{self, done};
use crate::size::{self, whole_blocks, Bytes};

/// Create a blank image (like qemu-img create).
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Create a blank image (like `qemu-img create` or `diskutil image create blank \
                  --fs none`). The format comes from -O, else from the file name's extension \
                  (.qcow2, .asif, .raw/.img; anything else is raw). The image is written under a \
                  temporary name and renamed into place; an existing file is only replaced with \
                  --force.",
    after_help = "\
Examples:
  # 20 GiB qcow2 (format from the extension)
  diskkit create --size 20G disk.qcow2
  # ASIF with 4 KiB blocks, for macOS VMs
  diskkit create --size 64G --block-size 4096 vm.asif
  # qcow2 over a backing file
  diskkit create --size 20G -b base.raw -F raw top.qcow2"
)]
pub(crate) struct Args {
    /// Virtual size: bytes (decimal or 0x hex) or a number with a unit (40G, 512M, 1.5T).
    #[arg(short, long, value_name = "SIZE", value_parser = size::disk_size, allow_hyphen_values = true)]
    size: Bytes,
    #[command(flatten)]
    new: NewImageArgs,
    /// Block (sector) size: 512 or 4096.
    #[arg(long, default_value_t = 512, value_parser = block_size, value_name = "BYTES")]
    block_size: u32,
    /// qcow2: record a backing file (the name the new image will find it by; not opened).
    #[arg(short = 'b', long, value_name = "FILE")]
    backing: Option<String>,
    /// qcow2: the backing file's format to record.
    #[arg(short = 'F', long, value_enum, requires = "backing", value_name = "FORMAT")]
    backing_format: Option<Format>,
    /// `-f` names the format of an image being opened; a new image's format is -O.
    #[arg(short = 'f', hide = true, value_parser = misplaced_f, value_name = "FORMAT")]
    misplaced_format: Option<String>,
    /// Replace the file if it exists.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    quiet: QuietArg,
    /// Where to create the image.
    path: PathBuf,
}

fn misplaced_f(_: &str) -> Result<String, String> {
    Err(
        "-f is the format of an image being opened; the new image's format is -O FORMAT (or its \
         file name's extension)"
            .into(),
    )
}

impl NewImageArgs {
    /// Apply the chunk and cluster sizes to `options` for a new image of `format`.
    pub(crate) fn apply(&self, mut options: CreateOptions, format: ImageFormat) -> Result<CreateOptions> {
        if let Some(c) = self.chunk_size {
            if format != ImageFormat::Asif {
                bail!("--chunk-size is for ASIF images; this one is {format}");
            }
            options = options.chunk_size(c);
        }
        if let Some(c) = self.cluster_size {
            if format != ImageFormat::Qcow2 {
                bail!("--cluster-size is for qcow2 images; this one is {format}");
            }
            options = options.cluster_size(c);
        }
        Ok(options)
    }
}

pub(crate) fn run(a: &Args) -> Result<u8> {
    let path = &a.path;
    let format = format::for_output(a.new.format, path)?;
    let bytes = whole_blocks(a.size.value, a.block_size, "size")?;
    let options = CreateOptions::new(format, bytes)
        .block_size(a.block_size)
        .overwrite(a.force);
    let mut options = a.new.apply(options, format)?;
    if let Some(b) = &a.backing {
        if format != ImageFormat::Qcow2 {
            bail!("--backing is for qcow2 images; '{}' is {format}", path.display());
        }
        options = options.backing_file(b, a.backing_format.map(Into::into));
        DiskImage::create_file(path, &options)
            .with_context(|| format!("cannot create '{}'", path.display()))?;
        done(
            a.quiet.quiet,
            format_args!(
                "created {} over backing file '{b}' (not opened)",
                messages::image(path, format, bytes)
            ),
        );
        return Ok(crate::exit::SUCCESS);
    }
    let image =
        DiskImage::create(path, &options).with_context(|| format!("cannot create '{}'", path.display()))?;
    done(
        a.quiet.quiet,
        format_args!("created {}", messages::open_image(path, &image)),
    );
    Ok(crate::exit::SUCCESS)
}
