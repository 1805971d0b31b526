//! Stack commands: `layer create`, `snapshot`, `restore`, `commit`, `rebase`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args as ClapArgs, ValueEnum};
use diskkit::operations::stack as operations;
use diskkit::{DiskImage, ImageFormat, LayerOptions, LayerType, OpenOptions};
use diskkit_deliver::remote::{self, CacheLayerOptions};

use super::{open_image, parent_outside, shell_path};
use crate::args::{OpenArgs, QuietArg, RepairArg};
use crate::format::{self, Format};
use crate::messages::{self, done};
use crate::size;

/// The role of a new layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LayerKind {
    /// Copy-on-write: stores what is written to the stack.
    Overlay,
    /// Keeps the blocks read from beneath it (for slow or remote bases).
    Cache,
}

/// The formats a layer can have (RAW records no parent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LayerFormat {
    Asif,
    Qcow2,
}

impl From<LayerFormat> for Format {
    fn from(f: LayerFormat) -> Self {
        match f {
            LayerFormat::Asif => Format::Asif,
            LayerFormat::Qcow2 => Format::Qcow2,
        }
    }
}

/// Create a new empty layer on top of PARENT (an image or the top of a stack).
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Create a new empty layer on top of PARENT (an image, or the top layer of a \
                  stack). The layer records PARENT's layer UUID, its format, and the path to it \
                  relative to the new file. The new layer's format comes from -O, else from its \
                  extension: .qcow2 or .asif (RAW cannot record a parent). -f is PARENT's \
                  format. A parent outside the new layer's directory is only followed with \
                  --allow-parent-dir: the command warns when that will be needed. PARENT may \
                  be a remote image (an http://, https:// or s3:// URL of a RAW, ASIF or \
                  qcow2 image) under a cache layer: the layer records the URL and the object's \
                  version (size and ETag or Last-Modified, or --parent-sha256), keeps every \
                  block read through it, and refuses a changed object later. Remote hosts are \
                  opened only when --allow-remote names them, here and in every command that \
                  opens the stack.",
    after_help = "\
Examples:
  # A qcow2 overlay on a qcow2 base
  diskkit layer create --parent base.qcow2 vm.qcow2
  # An ASIF overlay (for macOS VMs too)
  diskkit layer create --parent root.asif vm.asif
  # A read cache
  diskkit layer create --type cache --parent nfs/base.raw cache.qcow2
  # A cache over a remote base, and an overlay to run a VM on
  diskkit layer create --type cache --allow-remote images.example.com \\
      --parent https://images.example.com/debian-12.qcow2 cache.asif
  diskkit layer create --allow-remote images.example.com --parent cache.asif vm.qcow2"
)]
pub(crate) struct LayerCreateArgs {
    /// The parent: an image, the top layer of a stack, or (under a cache layer) the URL of a
    /// remote image.
    #[arg(long, value_name = "PARENT")]
    parent: String,
    /// A remote PARENT's SHA-256 (64 hex digits): checked now (the whole object is read once)
    /// and recorded, for servers that send neither a strong ETag nor Last-Modified.
    #[arg(long, value_name = "HEX")]
    parent_sha256: Option<String>,
    /// Format of the new layer: qcow2 or asif. Default: from the file name's extension.
    #[arg(
        short = 'O',
        long = "format",
        id = "new_format",
        value_enum,
        value_name = "FORMAT"
    )]
    format: Option<LayerFormat>,
    /// The layer's role.
    #[arg(long = "type", value_enum, default_value = "overlay")]
    kind: LayerKind,
    /// ASIF: chunk size, the unit of allocation (default 1M; for a cache layer over a remote
    /// base 64K, its unit of fetching, or 1M for disks over 1 TiB).
    #[arg(long, value_name = "SIZE", value_parser = size::unit_size)]
    chunk_size: Option<u32>,
    /// Replace the file if it exists.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    quiet: QuietArg,
    /// Where to create the layer.
    path: PathBuf,
}

/// Freeze the top layer; a new empty overlay takes its path.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Freeze the top layer under a new name (`<stem>.snapN.<ext>`, printed) and put \
                  a new empty overlay on it at the top's path, so the VM's disk path stays the \
                  same. `restore` goes back to the snapshot; `commit` merges the top into it.",
    after_help = "\
Examples:
  # vm.qcow2 -> vm.snap1.qcow2 + new vm.qcow2
  diskkit snapshot vm.qcow2
  diskkit snapshot -q vm.asif"
)]
pub(crate) struct SnapshotArgs {
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    quiet: QuietArg,
    /// The top layer of the stack.
    top: PathBuf,
}

/// Empty the top layer: back to the last snapshot.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Throw away everything written to the top layer: it becomes an empty layer \
                  over the same parent (after `snapshot`, that is going back to the snapshot).",
    after_help = "\
Examples:
  # Back to the last snapshot
  diskkit restore vm.qcow2"
)]
pub(crate) struct RestoreArgs {
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    quiet: QuietArg,
    /// The top layer of the stack.
    top: PathBuf,
}

/// Merge the top layer into the layer beneath it, then empty the top.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Merge the top layer's data and zeroes into the layer beneath it (crash-safely: \
                  an interrupted commit is finished by running it again), then empty the top. \
                  The stack reads the same before and after.",
    after_help = "\
Examples:
  # Fold vm.qcow2 into its parent
  diskkit commit vm.qcow2"
)]
pub(crate) struct CommitArgs {
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    repair: RepairArg,
    #[command(flatten)]
    quiet: QuietArg,
    /// The top layer of the stack.
    top: PathBuf,
}

/// Move the top layer onto another parent; the stack reads the same.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Move the top layer onto another parent. Ranges where the old and the new \
                  parent differ are first copied into the top, so the stack reads the same \
                  afterwards. With -u (unsafe, like `qemu-img rebase -u`) only the new parent is \
                  recorded: nothing is copied and the old parents are not opened.",
    after_help = "\
Examples:
  # vm.qcow2 now over new-base.qcow2
  diskkit rebase -b new-base.qcow2 vm.qcow2
  # base.qcow2 was moved to /images: point the layer at it, copying nothing
  diskkit rebase -u -b /images/base.qcow2 --allow-parent-dir /images vm.qcow2"
)]
pub(crate) struct RebaseArgs {
    /// The new parent image.
    #[arg(short = 'b', long = "backing", value_name = "NEW_PARENT")]
    new_parent: PathBuf,
    /// Unsafe: only record the new parent, copying nothing (like `qemu-img rebase -u`); the
    /// old parents are not opened. What the stack reads changes wherever the new parent
    /// differs from the old one: use it when the new parent is a copy of the old (moved,
    /// renamed, converted) or the old one is gone.
    #[arg(short = 'u', long = "unsafe")]
    unsafe_rebase: bool,
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    repair: RepairArg,
    #[command(flatten)]
    quiet: QuietArg,
    /// The top layer of the stack.
    top: PathBuf,
}

pub(crate) fn layer_create(a: &LayerCreateArgs) -> Result<u8> {
    let path = &a.path;
    let format = format::for_output(a.format.map(Into::into), path)?;
    if format == ImageFormat::Raw {
        bail!(
            "'{}' would be a RAW file, and RAW cannot record a parent: name the layer .qcow2 or \
             .asif, or give -O qcow2 or -O asif",
            path.display()
        );
    }
    let kind = match a.kind {
        LayerKind::Overlay => LayerType::Overlay,
        LayerKind::Cache => LayerType::Cache,
    };
    let mut options = LayerOptions::new(kind).format(format).overwrite(a.force);
    if let Some(c) = a.chunk_size {
        if format != ImageFormat::Asif {
            bail!(
                "--chunk-size is for ASIF layers; '{}' is {format}",
                path.display()
            );
        }
        options = options.chunk_size(c);
    }
    if remote::is_remote(&a.parent) {
        return remote_cache_create(a, format);
    }
    if a.parent_sha256.is_some() {
        bail!("--parent-sha256 is for remote parents (http://, https://, s3:// URLs)");
    }
    let parent = Path::new(&a.parent);
    let mut stack = open_image(parent, &a.open.options(false))?;
    stack
        .append_new(path, &options)
        .with_context(|| format!("cannot create the layer '{}'", path.display()))?;
    stack
        .flush()
        .with_context(|| format!("cannot create the layer '{}'", path.display()))?;
    done(
        a.quiet.quiet,
        format_args!(
            "created {} layer {} on '{}'",
            a.kind
                .to_possible_value()
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default(),
            messages::image(path, format, stack.size()),
            parent.display()
        ),
    );
    // Let go of the stack first: the check opens the new layer again, which the stack's
    // own lock on it would refuse.
    drop(stack);
    warn_if_parent_refused(path);
    Ok(crate::exit::SUCCESS)
}

/// `layer create` over a remote base: only a cache layer, only on an allowed host.
fn remote_cache_create(a: &LayerCreateArgs, format: ImageFormat) -> Result<u8> {
    let path = &a.path;
    let url = &a.parent;
    if a.kind != LayerKind::Cache {
        bail!(
            "a remote parent ({url}) can only be beneath a cache layer: add --type cache, then \
             put overlays on the cache layer"
        );
    }
    let host = remote::remote_host(url)?;
    if !a.open.parents.allow_remote().allows(&host) {
        bail!(
            "{url} is on host '{host}', which is not allowed: add --allow-remote {host} (or \
             --allow-any-parent)"
        );
    }
    let options = CacheLayerOptions {
        format,
        chunk_size: a.chunk_size,
        base_format: a.open.format.map(Into::into),
        sha256: a.parent_sha256.clone(),
        overwrite: a.force,
    };
    let created = remote::create_cache_layer(path, url, &a.open.parents.remote_options(), &options)
        .with_context(|| format!("cannot create the cache layer '{}'", path.display()))?;
    let identity = &created.identity;
    let version = match (&identity.sha256, identity.strong_etag(), &identity.last_modified) {
        (Some(sha), _, _) => format!("SHA-256 {sha}"),
        (None, Some(etag), _) => format!("ETag {etag}"),
        (None, None, Some(date)) => format!("Last-Modified {date}"),
        (None, None, None) => "no validator".to_owned(),
    };
    done(
        a.quiet.quiet,
        format_args!(
            "created cache layer {} over {url} ({}, {version})",
            messages::image(path, format, created.size),
            created.base_format
        ),
    );
    Ok(crate::exit::SUCCESS)
}

/// Warn, now, when the default parent policy would refuse the new layer's parent later.
fn warn_if_parent_refused(layer: &Path) {
    let Some((hint, dir)) = parent_outside(layer) else {
        return;
    };
    // Exactly what later commands will do by default: is the parent followed?
    let options = OpenOptions::new().parents(diskkit::ParentPolicy::same_directory());
    if DiskImage::open(layer, &options).is_ok() {
        return;
    }
    crate::messages::warn(format_args!(
        "'{}' finds its parent as '{hint}', outside its own directory, which commands follow \
         only when told: add --allow-parent-dir {} when opening it (or create the layer next to \
         its parent)",
        layer.display(),
        shell_path(&dir)
    ));
}

/// `'vm.qcow2' (qcow2, 4 GiB)` for the top of a stack after an operation.
fn describe_top(top: &Path, open: &OpenArgs) -> String {
    match DiskImage::open(top, &open.options(false)) {
        Ok(image) => messages::open_image(top, &image),
        Err(_) => format!("'{}'", top.display()),
    }
}

pub(crate) fn snapshot(a: &SnapshotArgs) -> Result<u8> {
    let frozen = operations::snapshot(&a.top, &a.open.options(false))
        .with_context(|| format!("cannot snapshot '{}'", a.top.display()))?;
    done(
        a.quiet.quiet,
        format_args!(
            "froze '{}' as {}; '{}' is a new empty overlay on it",
            a.top.display(),
            describe_top(&frozen, &a.open),
            a.top.display()
        ),
    );
    Ok(crate::exit::SUCCESS)
}

pub(crate) fn restore(a: &RestoreArgs) -> Result<u8> {
    operations::restore(&a.top, &a.open.options(false))
        .with_context(|| format!("cannot restore '{}'", a.top.display()))?;
    done(
        a.quiet.quiet,
        format_args!("restored {}: an empty layer again", describe_top(&a.top, &a.open)),
    );
    Ok(crate::exit::SUCCESS)
}

pub(crate) fn commit(a: &CommitArgs) -> Result<u8> {
    let stats = operations::commit(&a.top, &a.open.options(true).repair(a.repair.repair))
        .with_context(|| format!("cannot commit '{}'", a.top.display()))?;
    done(
        a.quiet.quiet,
        format_args!(
            "committed {} into its parent: {} of data and {} of zeroes",
            describe_top(&a.top, &a.open),
            size::human(stats.data_bytes),
            size::human(stats.zero_bytes)
        ),
    );
    Ok(crate::exit::SUCCESS)
}

pub(crate) fn rebase(a: &RebaseArgs) -> Result<u8> {
    let options = a.open.options(true).repair(a.repair.repair);
    let mode = if a.unsafe_rebase {
        operations::RebaseMode::Unsafe
    } else {
        operations::RebaseMode::Safe
    };
    let stats = operations::rebase(&a.top, &a.new_parent, &options, mode).with_context(|| {
        format!(
            "cannot rebase '{}' onto '{}'",
            a.top.display(),
            a.new_parent.display()
        )
    })?;
    if a.unsafe_rebase {
        done(
            a.quiet.quiet,
            format_args!(
                "rebased {} onto '{}' without copying anything (unsafe: it reads what the new \
                 parent holds)",
                describe_top(&a.top, &a.open),
                a.new_parent.display()
            ),
        );
        return Ok(crate::exit::SUCCESS);
    }
    done(
        a.quiet.quiet,
        format_args!(
            "rebased {} onto '{}': copied {} of data and {} of zeroes into it",
            describe_top(&a.top, &a.open),
            a.new_parent.display(),
            size::human(stats.data_bytes),
            size::human(stats.zero_bytes)
        ),
    );
    Ok(crate::exit::SUCCESS)
}
