//! `diskkit convert` and `diskkit flatten`: a whole image or stack written out as one new
//! standalone image, sparse.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use diskkit::copy::copy;
use diskkit::{CreateOptions, DiskImage, ImageFormat};

use super::open_image;
use crate::args::{block_size, DetachedArg, NewImageArgs, OpenArgs, QuietArg};
use crate::format;
use crate::messages::{self, done};
use crate::progress::bytes_bar;
use crate::size::whole_blocks;

/// Convert an image to another format, sparse (like qemu-img convert).
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Convert an image to another format (like `qemu-img convert`). Ranges that \
                  read as zeroes are never written, so the output is sparse. The output's \
                  format comes from -O, else from its extension (.qcow2, .asif, .raw/.img; \
                  anything else is raw). It is written under a temporary name and renamed when \
                  complete. A stack is converted whole, as it reads.",
    after_help = "\
Examples:
  # ASIF to qcow2 (format from the extension)
  diskkit convert disk.asif disk.qcow2
  # qcow2 output under a generic .img name
  diskkit convert -O qcow2 cloud.img vm.img
  # ASIF with 4 KiB blocks
  diskkit convert --block-size 4096 a.raw b.asif"
)]
pub(crate) struct Args {
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    detached: DetachedArg,
    #[command(flatten)]
    new: NewImageArgs,
    /// Output block size: 512 or 4096 (default: the source's).
    #[arg(long, value_parser = block_size, value_name = "BYTES")]
    block_size: Option<u32>,
    /// Replace the destination if it exists.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    quiet: QuietArg,
    /// Source image.
    src: PathBuf,
    /// Destination path.
    dst: PathBuf,
}

/// Write a whole stack out as one standalone image (sparse).
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Write a whole stack (the top layer and everything beneath it) out as one \
                  standalone image, sparse, like `convert`. The output's format comes from -O, \
                  else from its extension (.qcow2, .asif, .raw/.img; anything else is raw).",
    after_help = "\
Examples:
  # The stack as one qcow2 image
  diskkit flatten vm.qcow2 standalone.qcow2
  # The stack as a RAW disk
  diskkit flatten vm.asif disk.raw"
)]
pub(crate) struct FlattenArgs {
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    new: NewImageArgs,
    /// Replace the destination if it exists.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    quiet: QuietArg,
    /// The top layer of the stack.
    top: PathBuf,
    /// Destination path.
    dst: PathBuf,
}

pub(crate) fn run(a: &Args) -> Result<u8> {
    let options = a.open.options(false).detached(a.detached.detached);
    let source = open_image(&a.src, &options)?;
    let format = write_out(&source, &a.new, a.block_size, a.force, &a.dst)?;
    done(
        a.quiet.quiet,
        format_args!(
            "converted '{}' to {}",
            a.src.display(),
            messages::image(&a.dst, format, source.size())
        ),
    );
    Ok(crate::exit::SUCCESS)
}

pub(crate) fn flatten(a: &FlattenArgs) -> Result<u8> {
    let source = open_image(&a.top, &a.open.options(false))?;
    let format = write_out(&source, &a.new, None, a.force, &a.dst)?;
    let layers = source.describe_layers().map(|l| l.len()).unwrap_or(1);
    done(
        a.quiet.quiet,
        format_args!(
            "flattened '{}' ({layers} layer{}) into {}",
            a.top.display(),
            if layers == 1 { "" } else { "s" },
            messages::image(&a.dst, format, source.size())
        ),
    );
    Ok(crate::exit::SUCCESS)
}

fn write_out(
    source: &DiskImage,
    new: &NewImageArgs,
    block_size: Option<u32>,
    force: bool,
    dst: &Path,
) -> Result<ImageFormat> {
    let format = format::for_output(new.format, dst)?;
    let block_size = block_size.unwrap_or(source.block_size());
    let size = whole_blocks(source.size(), block_size, "the source's size")?;
    let options = CreateOptions::new(format, size)
        .block_size(block_size)
        .overwrite(force);
    let options = new.apply(options, format)?;
    let pending = DiskImage::create_pending(dst, &options)
        .with_context(|| format!("cannot create '{}'", dst.display()))?;
    let bar = bytes_bar(source.size(), "converting");
    copy(source, pending.image(), &mut |done| bar.set_position(done))
        .with_context(|| format!("cannot write '{}'", dst.display()))?;
    pending
        .persist()
        .with_context(|| format!("cannot finish '{}'", dst.display()))?;
    bar.finish_and_clear();
    Ok(format)
}
