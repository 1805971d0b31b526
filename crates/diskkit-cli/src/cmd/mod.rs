//! One module per command.

mod access;
pub(crate) mod bundle;
pub(crate) mod cache;
mod check;
mod compare;
mod convert;
mod create;
mod fs;
mod info;
mod kernel;
mod map;
mod partitions;
pub(crate) mod pull;
pub(crate) mod push;
pub(crate) mod serve;
mod stack;
mod unpack;

use std::path::Path;

use anyhow::{Context, Result};
use diskkit::{DiskImage, OpenOptions, ParentPolicy};

use crate::args::{Cli, Command, LayerCommand, OpenArgs};

/// Run a parsed command line; returns the exit status.
pub(crate) fn run(cli: Cli) -> Result<u8> {
    // SIGINT/SIGTERM remove the temporary outputs and exit 130/143 (serve handles them
    // itself: it stops accepting and shuts down cleanly).
    if !matches!(cli.command, Command::Serve(_)) {
        diskkit::output::remove_temporaries_on_signals()?;
    }
    match cli.command {
        Command::Create {
            format,
            size,
            block_size,
            chunk_size,
            cluster_size,
            backing,
            backing_format,
            force,
            path,
        } => create::run(
            &create::Request {
                format,
                size: &size,
                block_size,
                chunk_size: chunk_size.as_deref(),
                cluster_size: cluster_size.as_deref(),
                backing: backing.as_deref(),
                backing_format,
                force,
            },
            &path,
        ),
        Command::Info { open, output, path } => info::run(&open, output, &path),
        Command::Convert {
            open,
            output_format,
            block_size,
            chunk_size,
            cluster_size,
            force,
            src,
            dst,
        } => convert::run(
            &open,
            output_format,
            block_size,
            (chunk_size.as_deref(), cluster_size.as_deref()),
            force,
            &src,
            &dst,
        ),
        Command::Map { open, output, path } => map::run(&open, output, &path),
        Command::Check {
            format,
            repair,
            output,
            path,
        } => check::run(format, repair, output, &path),
        Command::Compare {
            format_a,
            format_b,
            parents,
            strict,
            a,
            b,
        } => compare::run(format_a, format_b, &parents, strict, &a, &b),
        Command::Layer(LayerCommand::Create {
            open,
            kind,
            format,
            chunk_size,
            parent,
            force,
            path,
        }) => stack::layer_create(&open, kind, format, chunk_size.as_deref(), &parent, force, &path),
        Command::Snapshot { open, top } => stack::snapshot(&open, &top),
        Command::Restore { open, top } => stack::restore(&open, &top),
        Command::Commit { open, top } => stack::commit(&open, &top),
        Command::Flatten {
            open,
            output_format,
            chunk_size,
            force,
            top,
            dst,
        } => convert::run(
            &open,
            output_format,
            None,
            (chunk_size.as_deref(), None),
            force,
            &top,
            &dst,
        ),
        Command::Rebase {
            open,
            new_parent,
            unsafe_rebase,
            top,
        } => stack::rebase(&open, &top, &new_parent, unsafe_rebase),
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
        Command::Serve(args) => serve::run(&args),
        Command::Bundle(command) => bundle::run(command),
        Command::Cache(args) => cache::run(args),
        Command::Pull(args) => pull::run(&args),
        Command::Push(args) => push::run(&args),
        Command::Partitions { open, output, path } => partitions::run(&open, output, &path),
        Command::Ls {
            fs,
            long,
            output,
            target,
        } => fs::ls(&fs, long, output, &target),
        Command::Cat { fs, target } => fs::cat(&fs, &target),
        Command::Stat { fs, output, target } => fs::stat(&fs, output, &target),
        Command::Cp {
            fs,
            output,
            src,
            dest,
        } => fs::cp(&fs, output, &src, &dest),
        Command::Kernel {
            fs,
            out,
            list,
            kernel_version,
            split_uki,
            force,
            output,
            image,
        } => kernel::run(
            &fs,
            &kernel::Request {
                out: out.as_deref(),
                list,
                version: kernel_version.as_deref(),
                split_uki,
                force,
                output,
            },
            &image,
        ),
        Command::Unpack {
            format,
            platform,
            size,
            reproducible,
            metadata_csum,
            force,
            store,
            registry,
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
                registry: &registry,
            },
            &src,
            dst.as_deref(),
        ),
    }
}

/// The open options the CLI's arguments ask for: the format, and the parent policy (the
/// same directory by default, plus `--allow-parent-dir`, or anything with
/// `--allow-any-parent`).
pub(crate) fn open_options(open: &OpenArgs, writable: bool) -> OpenOptions {
    let mut options = OpenOptions::new()
        .writable(writable)
        .detached(open.detached)
        .repair(open.repair)
        .force_share(open.force_share);
    if let Some(f) = open.format {
        options = options.format(f.into());
    }
    let mut policy = if open.parents.allow_any_parent {
        ParentPolicy::any()
    } else {
        ParentPolicy::same_directory()
    };
    for dir in &open.parents.allow_parent_dir {
        policy = policy.allow_directory(dir);
    }
    options.parents(policy)
}

/// Open an image (and the stack beneath it) for the CLI.
pub(crate) fn open_image(open: &OpenArgs, path: &Path, writable: bool) -> Result<DiskImage> {
    let options = open_options(open, writable);
    let image =
        DiskImage::open(path, &options).with_context(|| format!("cannot open '{}'", path.display()))?;
    print_warnings(&image);
    Ok(image)
}

/// Tell the user what opening the image noticed (a file read as RAW whose name says otherwise).
pub(crate) fn print_warnings(image: &DiskImage) {
    for w in image.warnings() {
        eprintln!("diskkit: warning: {w}");
    }
}
