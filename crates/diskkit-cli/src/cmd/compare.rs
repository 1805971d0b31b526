//! `diskkit compare`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args as ClapArgs;
use diskkit::copy::compare;

use super::open_image;
use crate::args::{OpenArgs, ParentArgs};
use crate::exit;
use crate::format::Format;
use crate::progress::bytes_bar;

/// Compare two images' contents: exit 0 identical, 1 different.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Compare what two images (or stacks) read, byte for byte, whatever their \
                  formats (like `qemu-img compare`). Exit status 0 when identical, 1 when \
                  different (`Content mismatch at offset N!`), 2 on an error. Images of \
                  different sizes are equal when the excess reads as zeroes, unless --strict.",
    after_help = "\
Examples:
  # Same content in two formats?
  diskkit compare disk.asif disk.qcow2
  # Also require the same size
  diskkit compare -s vm.qcow2 flat.raw && echo same"
)]
pub(crate) struct Args {
    /// The format of the first image (detected when omitted).
    #[arg(short = 'f', long = "image-format", value_enum, value_name = "FORMAT")]
    format_a: Option<Format>,
    /// The format of the second image (detected when omitted).
    #[arg(short = 'F', long = "second-format", value_enum, value_name = "FORMAT")]
    format_b: Option<Format>,
    /// Differ when the sizes differ (otherwise the excess must read as zeroes).
    #[arg(short = 's', long)]
    strict: bool,
    /// Open both images even while another process has them open for writing, like
    /// `qemu-img compare -U` (what is read may change meanwhile).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    parents: ParentArgs,
    /// First image.
    a: PathBuf,
    /// Second image.
    b: PathBuf,
}

pub(crate) fn run(args: &Args) -> Result<u8> {
    let open = |format, path| {
        let open = OpenArgs {
            format,
            force_share: args.force_share,
            max_cache_size: None,
            parents: args.parents.clone(),
        };
        open_image(path, &open.options(false))
    };
    let ia = open(args.format_a, &args.a)?;
    let ib = open(args.format_b, &args.b)?;
    if ia.size() != ib.size() {
        if args.strict {
            println!("Strict mode: Image size mismatch!");
            return Ok(exit::NEGATIVE);
        }
        eprintln!("Warning: Image size mismatch!");
    }
    let bar = bytes_bar(ia.size().max(ib.size()), "comparing");
    let result = compare(&ia, &ib, &mut |p| bar.set_position(p))?;
    bar.finish_and_clear();
    match result {
        None => {
            println!("Images are identical.");
            Ok(exit::SUCCESS)
        }
        Some(offset) => {
            println!("Content mismatch at offset {offset}!");
            Ok(exit::NEGATIVE)
        }
    }
}
