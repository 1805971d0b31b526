//! `diskkit bundle create|extract|verify|info`: taskcluster-worker's `image.tar.zst` bundles.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use diskkit::{ImageFormat, ParentPolicy};
use diskkit_deliver::bundle::{self, BundleInfo, CreateOptions, ExtractOptions, Machine};

use crate::args::{FileParentArgs, Output};
use crate::progress::bytes_bar;
use crate::size::{self, human, Bytes};

/// Examples for `diskkit bundle --help`.
pub(crate) const EXAMPLES: &str = "\
Examples:
  # A bundle of a VM's overlay and its base
  diskkit bundle create vm.qcow2 image.tar.zst
  # Check one, then extract it (disk.img sparse)
  diskkit bundle verify image.tar.zst
  diskkit bundle extract image.tar.zst vm/";

/// Make, extract, check and describe VM image bundles (taskcluster-worker's image.tar.zst)
///
/// A bundle is a zstd-compressed GNU tar of exactly `disk.img` (RAW, sparse), `layer.qcow2` (a
/// qcow2 overlay backed by disk.img) and `machine.json` (taskcluster's machine definition,
/// version 1). Every read checks every rule; see docs/bundles.md.
#[derive(Debug, Clone, Subcommand)]
pub(crate) enum BundleCommand {
    /// Make a bundle from an image
    ///
    /// From a stack whose top is an overlay, disk.img is the base flattened to RAW and
    /// layer.qcow2 holds the top; from any other image, disk.img is the whole disk and
    /// layer.qcow2 an empty overlay. Holes are never read or compressed.
    #[command(
        after_help = "Examples:\n  # A bundle of an overlay and its base, with a machine definition\n  diskkit bundle create --machine machine.json vm.qcow2 image.tar.zst"
    )]
    Create {
        /// The machine definition (machine.json, version 1); without it a default with a
        /// random locally administered MAC address.
        #[arg(long, value_name = "FILE")]
        machine: Option<PathBuf>,
        /// zstd compression level.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
        /// zstd worker threads (default: one per core).
        #[arg(long)]
        threads: Option<u32>,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
        /// Make the bundle durable (fsync) before it appears; without it, like tar | zstd,
        /// data may be lost to a power failure soon after.
        #[arg(long)]
        sync: bool,
        /// Print nothing on success.
        #[arg(short, long)]
        quiet: bool,
        #[command(flatten)]
        parents: FileParentArgs,
        /// The image (or the top of a stack).
        image: PathBuf,
        /// The bundle to write (image.tar.zst).
        out: PathBuf,
    },
    /// Extract a bundle into a new directory, checking every rule
    ///
    /// disk.img stays sparse (or becomes disk.asif with --format asif, layer.qcow2 re-pointed
    /// at it). Nothing is left behind on error.
    #[command(
        after_help = "Examples:\n  # Extract into vm/ (disk.img sparse)\n  diskkit bundle extract image.tar.zst vm/\n  # Or as an ASIF disk, layer.qcow2 re-pointed at it\n  diskkit bundle extract --format asif image.tar.zst vm-asif/"
    )]
    Extract {
        /// The base disk's format.
        #[arg(long, value_enum, default_value = "raw")]
        format: BaseFormat,
        #[command(flatten)]
        limits: CheckArgs,
        /// Make the files durable (fsync) before the directory appears; without it, like
        /// tar -x, data may be lost to a power failure soon after.
        #[arg(long)]
        sync: bool,
        /// Print nothing on success.
        #[arg(short, long)]
        quiet: bool,
        /// The bundle (a file, or - for standard input).
        bundle: PathBuf,
        /// The directory to create.
        dir: PathBuf,
    },
    /// Check a bundle against every rule without extracting it
    ///
    /// Exit 0 valid, 2 invalid.
    #[command(
        after_help = "Examples:\n  # Check a bundle and its digest without extracting it\n  diskkit bundle verify --sha256 9f86d08... image.tar.zst\n  # From a pipe\n  curl -s https://example.com/image.tar.zst | diskkit bundle verify -"
    )]
    Verify {
        #[command(flatten)]
        limits: CheckArgs,
        /// Print nothing on success.
        #[arg(short, long)]
        quiet: bool,
        /// The bundle (a file, or - for standard input).
        bundle: PathBuf,
    },
    /// Describe a bundle (machine, disk and layer), checking it as verify does.
    #[command(
        after_help = "Examples:\n  # Machine, disk and layer of a bundle, as JSON\n  diskkit bundle info --output json image.tar.zst"
    )]
    Info {
        #[command(flatten)]
        limits: CheckArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// The bundle (a file, or - for standard input).
        bundle: PathBuf,
    },
}

/// The base disk's format after extraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BaseFormat {
    /// disk.img, a sparse RAW file.
    Raw,
    /// disk.asif, Apple's sparse image format.
    Asif,
}

/// Limits and digest checked when a bundle is read.
#[derive(Debug, Clone, Args)]
pub(crate) struct CheckArgs {
    /// The largest disk.img and layer.qcow2 accepted (e.g. 80G).
    #[arg(long, value_name = "SIZE", default_value = "50G", value_parser = size::bytes)]
    pub(crate) max_disk_size: Bytes,
    /// The SHA-256 the bundle file must have (64 hex digits).
    #[arg(long, value_name = "HEX")]
    pub(crate) sha256: Option<String>,
}

impl CheckArgs {
    pub(crate) fn options(&self, format: ImageFormat) -> Result<ExtractOptions> {
        Ok(ExtractOptions {
            format,
            max_disk_size: self.max_disk_size.value,
            sha256: self.sha256.as_deref().map(bundle::parse_sha256).transpose()?,
            digest: false,
            sync: false,
        })
    }
}

/// The parent policy `FileParentArgs` ask for (the same directory by default). Bundles hold
/// files, so no remote parents.
pub(crate) fn parent_policy(parents: &FileParentArgs) -> ParentPolicy {
    let mut policy = if parents.allow_any_parent {
        ParentPolicy::any()
    } else {
        ParentPolicy::same_directory()
    };
    for dir in &parents.allow_parent_dir {
        policy = policy.allow_directory(dir);
    }
    policy
}

pub(crate) fn run(command: BundleCommand) -> Result<u8> {
    match command {
        BundleCommand::Create {
            machine,
            level,
            threads,
            force,
            sync,
            quiet,
            parents,
            image,
            out,
        } => create(
            machine.as_deref(),
            level,
            threads,
            (force, sync, quiet),
            &parents,
            &image,
            &out,
        ),
        BundleCommand::Extract {
            format,
            limits,
            sync,
            quiet,
            bundle,
            dir,
        } => {
            let format = match format {
                BaseFormat::Raw => ImageFormat::Raw,
                BaseFormat::Asif => ImageFormat::Asif,
            };
            let mut options = limits.options(format)?;
            options.sync = sync;
            let info = with_input(&bundle, "extracting", |input, bar| {
                bundle::extract(input, &dir, &options, &mut |n| bar(n))
            })
            .with_context(|| format!("cannot extract '{}'", bundle.display()))?;
            if !quiet {
                let base = if format == ImageFormat::Asif {
                    bundle::ASIF_DISK
                } else {
                    bundle::DISK
                };
                println!(
                    "extracted {} to {}: {base} {} ({} stored), {} {}, {}",
                    bundle.display(),
                    dir.display(),
                    human(info.disk.size),
                    human(info.disk.stored),
                    bundle::LAYER,
                    human(info.layer.file_size),
                    bundle::MACHINE
                );
            }
            Ok(0)
        }
        BundleCommand::Verify {
            limits,
            quiet,
            bundle,
        } => {
            let options = limits.options(ImageFormat::Raw)?;
            let info = with_input(&bundle, "verifying", |input, bar| {
                bundle::verify(input, &options, &mut |n| bar(n))
            })
            .with_context(|| format!("'{}' is not a valid bundle", bundle.display()))?;
            if !quiet {
                println!(
                    "{}: valid bundle (disk.img {}, layer.qcow2 {}, sha256 {})",
                    bundle.display(),
                    human(info.disk.size),
                    human(info.layer.file_size),
                    info.sha256.as_deref().unwrap_or("-")
                );
            }
            Ok(0)
        }
        BundleCommand::Info {
            limits,
            output,
            bundle,
        } => {
            let options = limits.options(ImageFormat::Raw)?;
            let info = with_input(&bundle, "reading", |input, bar| {
                bundle::verify(input, &options, &mut |n| bar(n))
            })
            .with_context(|| format!("'{}' is not a valid bundle", bundle.display()))?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&info)?),
                Output::Human => print_info(&bundle, &info),
            }
            Ok(0)
        }
    }
}

/// Run `f` on the bundle file (or standard input for `-`) with a progress bar over its size.
fn with_input<T>(
    path: &Path,
    message: &str,
    f: impl FnOnce(&mut dyn std::io::Read, &dyn Fn(u64)) -> diskkit_deliver::Result<T>,
) -> diskkit_deliver::Result<T> {
    if path == Path::new("-") {
        let bar = bytes_bar(0, message);
        let mut stdin = std::io::stdin().lock();
        let r = f(&mut stdin, &|n| bar.set_position(n));
        bar.finish_and_clear();
        return r;
    }
    let mut file = bundle::open_bundle(path)?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = bytes_bar(size, message);
    let r = f(&mut file, &|n| bar.set_position(n));
    bar.finish_and_clear();
    r
}

fn create(
    machine: Option<&Path>,
    level: i32,
    threads: Option<u32>,
    (force, sync, quiet): (bool, bool, bool),
    parents: &FileParentArgs,
    image: &Path,
    out: &Path,
) -> Result<u8> {
    let machine = machine
        .map(|p| -> Result<Machine> {
            let bytes = std::fs::read(p).with_context(|| format!("cannot read '{}'", p.display()))?;
            Machine::parse(&bytes).with_context(|| format!("invalid machine definition '{}'", p.display()))
        })
        .transpose()?;
    let options = CreateOptions {
        machine,
        parents: parent_policy(parents),
        level,
        threads: threads.unwrap_or(0),
        overwrite: force,
        sync,
    };
    let bar = bytes_bar(0, "bundling");
    let report = bundle::create(image, out, &options, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("cannot bundle '{}'", image.display()))?;
    bar.finish_and_clear();
    if !quiet {
        println!(
            "created {}: disk.img {} ({} stored{}), layer.qcow2 {} stored, {} compressed",
            out.display(),
            human(report.disk_size),
            human(report.disk_stored),
            if report.split {
                ", the base of the stack"
            } else {
                ""
            },
            human(report.layer_stored),
            human(report.compressed_size)
        );
    }
    Ok(0)
}

fn print_info(path: &Path, info: &BundleInfo) {
    let m = &info.machine;
    println!("bundle: {}", path.display());
    println!("sha256: {}", info.sha256.as_deref().unwrap_or("-"));
    println!(
        "compressed size: {} ({} bytes); tar stream {}",
        human(info.compressed_size),
        info.compressed_size,
        human(info.tar_size)
    );
    println!("members: {}", info.members.join(", "));
    println!(
        "disk.img: {} ({} bytes), {} stored in {} region(s){}",
        human(info.disk.size),
        info.disk.size,
        human(info.disk.stored),
        info.disk.regions,
        if info.disk.sparse { ", sparse" } else { "" }
    );
    let l = &info.layer;
    println!(
        "layer.qcow2: {} file, virtual size {}, qcow2 v{}, cluster size {}, {} allocated cluster(s){}, backing {} ({})",
        human(l.file_size),
        human(l.virtual_size),
        l.version,
        human(l.cluster_size),
        l.allocated_clusters,
        if l.leaks > 0 {
            format!(", {} leaked", l.leaks)
        } else {
            String::new()
        },
        l.backing_file,
        l.backing_format
    );
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let num = |v: Option<u32>| v.map_or_else(|| "-".into(), |v| v.to_string());
    println!(
        "machine: memory {} MiB, threads {}, cores {}, sockets {}, mac {}, network {}, uuid {}",
        num(m.memory),
        num(m.threads),
        num(m.cores),
        num(m.sockets),
        opt(&m.mac),
        opt(&m.network),
        opt(&m.uuid)
    );
}
