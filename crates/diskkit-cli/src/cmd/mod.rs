//! One module per command.

mod access;
mod compare;
mod convert;
mod create;
mod info;
mod map;
mod unpack;

use std::path::Path;

use anyhow::{Context, Result};
use diskkit::{DiskImage, OpenOptions};

use crate::args::{Cli, Command, OpenArgs};

/// Run a parsed command line; returns the exit status.
pub(crate) fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Create {
            format,
            size,
            block_size,
            chunk_size,
            force,
            path,
        } => create::run(format, &size, block_size, chunk_size.as_deref(), force, &path),
        Command::Info { open, output, path } => info::run(&open, output, &path),
        Command::Convert {
            open,
            output_format,
            block_size,
            chunk_size,
            force,
            src,
            dst,
        } => convert::run(
            &open,
            output_format,
            block_size,
            chunk_size.as_deref(),
            force,
            &src,
            &dst,
        ),
        Command::Map { open, output, path } => map::run(&open, output, &path),
        Command::Compare {
            format_a,
            format_b,
            strict,
            a,
            b,
        } => compare::run(format_a, format_b, strict, &a, &b),
        Command::Resize { open, path, size } => access::resize(&open, &path, &size),
        Command::Write {
            open,
            path,
            offset,
            from,
        } => access::write(&open, &path, &offset, from.as_deref()),
        Command::Read {
            open,
            path,
            offset,
            length,
            to,
        } => access::read(&open, &path, &offset, length.as_deref(), to.as_deref()),
        Command::Discard {
            open,
            path,
            offset,
            length,
        } => access::discard(&open, &path, &offset, &length),
        Command::Unpack {
            format,
            platform,
            size,
            reproducible,
            metadata_csum,
            force,
            store,
            src,
            dst,
        } => unpack::run(
            unpack::Args {
                format,
                platform: platform.as_deref(),
                size: size.as_deref(),
                reproducible,
                metadata_csum,
                force,
                store: store.as_deref(),
            },
            &src,
            dst.as_deref(),
        ),
    }
}

/// Open an image for the CLI.
pub(crate) fn open_image(open: &OpenArgs, path: &Path, writable: bool) -> Result<DiskImage> {
    let mut options = OpenOptions::new().writable(writable);
    if let Some(f) = open.format {
        options = options.format(f.into());
    }
    DiskImage::open(path, &options).with_context(|| format!("cannot open '{}'", path.display()))
}
