//! `diskkit push`: a disk image or stack as a VM disk in tart's layout, or an OCI layout's
//! container image, to an OCI registry.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args as ClapArgs, ValueEnum};
use diskkit::OpenOptions;
use diskkit_deliver::registry::{self, Reference, Registry};
use diskkit_deliver::tart::{self, DiskFormat, DiskPushOptions};

use super::pull::{chunk_size, parse_platform, RegistryArgs, TransferBars};
use crate::args::{Format, ParentArgs};
use crate::size::human;

/// The disk format recorded for tart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum TartFormat {
    /// The flattened virtual disk.
    Raw,
    /// A standalone ASIF image file (macOS 26's sparse format).
    Asif,
}

/// Push a disk image (as a VM disk in tart's layout) or an OCI layout's image to an OCI
/// registry.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Push to an OCI registry. SOURCE is either a disk image, or the top layer of \
                  a stack (RAW, ASIF, qcow2; the stack is flattened), pushed as a VM disk in \
                  tart's layout so that `tart pull` on a Mac can use it; or an OCI image layout \
                  directory (DIR, or DIR:NAME for one of several images), pushed as a container \
                  image.\n\n\
                  A disk is cut into 512 MiB slices, each compressed with Apple's LZ4 framing \
                  and pushed as a disk.v2 layer with its size and digest, after a config layer \
                  (the VM's config.json: --vm-config, else a minimal Linux one) and before the \
                  nvram layer (--nvram; tart needs one to pull). The disk format label is asif \
                  when the image is ASIF (tart on macOS 26 runs it as is), else raw \
                  (--disk-format chooses). All-zero slices are not read and cost a few KiB; \
                  blobs the registry has are not sent again, so pushing a changed disk uploads \
                  only the slices that changed.\n\n\
                  Uploads are one request per blob unless --chunk-size (some registries refuse \
                  chunks of 4 MiB or more); each chunk is retried on its own. Credentials and \
                  plain HTTP as for `diskkit pull`.",
    after_help = "\
Examples:
  # A VM disk to a local registry, as tart's layout
  diskkit push vm.qcow2 localhost:5000/vms/debian:12
  # An ASIF disk with its EFI variables, in chunks of 2 MiB
  diskkit push --nvram nvram.bin --chunk-size 2M disk.asif ghcr.io/me/vm:latest
  # An OCI layout's image (like skopeo copy oci:alpine docker://...)
  diskkit push alpine:3.20 registry.example.com/mirror/alpine:3.20"
)]
pub(crate) struct Args {
    /// The format of SOURCE when it is a disk image (detected when omitted).
    #[arg(short = 'f', long = "image-format", value_enum)]
    image_format: Option<Format>,
    #[command(flatten)]
    parents: ParentArgs,
    /// The disk format to record for tart (default: asif for an ASIF image, else raw).
    #[arg(long, value_enum)]
    disk_format: Option<TartFormat>,
    /// tart's config.json of the VM (default: a minimal Linux VM).
    #[arg(long, value_name = "FILE")]
    vm_config: Option<PathBuf>,
    /// The VM's EFI variable store, pushed as the nvram layer.
    #[arg(long, value_name = "FILE")]
    nvram: Option<PathBuf>,
    /// OS/ARCH recorded in the image config (default: linux and this CPU).
    #[arg(long)]
    platform: Option<String>,
    /// Upload in chunks of SIZE (e.g. 2M); 0 or absent: one request per blob.
    #[arg(long, value_name = "SIZE")]
    chunk_size: Option<String>,
    /// Where compressed slices wait for their upload (default: the temporary directory).
    #[arg(long, value_name = "DIR")]
    temp_dir: Option<PathBuf>,
    /// Print nothing on success.
    #[arg(short, long)]
    quiet: bool,
    #[command(flatten)]
    registry: RegistryArgs,
    /// A disk image (or the top of a stack), or an OCI layout DIR[:NAME].
    source: String,
    /// Where to: [docker://]HOST[:PORT]/REPO[:TAG].
    reference: String,
}

/// Split `DIR[:NAME]` when DIR is an OCI layout.
fn layout_source(src: &str) -> Option<(PathBuf, Option<String>)> {
    let is_layout = |p: &Path| p.is_dir() && p.join("index.json").is_file();
    if is_layout(Path::new(src)) {
        return Some((PathBuf::from(src), None));
    }
    for (i, _) in src.match_indices(':') {
        let (dir, name) = (&src[..i], &src[i + 1..]);
        if !dir.is_empty() && is_layout(Path::new(dir)) {
            return Some((PathBuf::from(dir), Some(name.to_string())));
        }
    }
    None
}

pub(crate) fn run(args: &Args) -> Result<u8> {
    let reference = Reference::parse(&args.reference)?;
    let options = args.registry.options(chunk_size(args.chunk_size.as_deref())?)?;
    let registry = Registry::connect(&reference, &options, true)
        .with_context(|| format!("cannot push to {reference}"))?;
    let bars = TransferBars::new("pushing", 0, args.quiet);
    if let Some((dir, name)) = layout_source(&args.source) {
        let report = registry::push_layout(&registry, &dir, name.as_deref(), &|ev| bars.event(ev))
            .with_context(|| format!("cannot push '{}' to {reference}", args.source))?;
        bars.finish();
        if !args.quiet {
            println!(
                "pushed '{}' to {reference} ({}): {} blobs, {} uploaded ({})",
                args.source,
                report.digest,
                report.blobs,
                report.uploaded,
                human(report.bytes_uploaded)
            );
        }
        return Ok(0);
    }
    let path = Path::new(&args.source);
    let mut open = OpenOptions::new();
    if let Some(f) = args.image_format {
        open = open.format(f.into());
    }
    let open = open.parents(if args.parents.allow_any_parent {
        diskkit::ParentPolicy::any()
    } else {
        args.parents
            .allow_parent_dir
            .iter()
            .fold(diskkit::ParentPolicy::same_directory(), |p, d| {
                p.allow_directory(d)
            })
    });
    let mut disk_options = DiskPushOptions {
        disk_format: args.disk_format.map(|f| match f {
            TartFormat::Raw => DiskFormat::Raw,
            TartFormat::Asif => DiskFormat::Asif,
        }),
        nvram: args.nvram.clone(),
        ..DiskPushOptions::default()
    };
    if let Some(c) = &args.vm_config {
        disk_options.vm_config =
            Some(std::fs::read(c).with_context(|| format!("cannot read '{}'", c.display()))?);
    }
    if let Some(p) = parse_platform(args.platform.as_deref())? {
        disk_options.os = p.os;
        disk_options.architecture = p.architecture;
    }
    if let Some(t) = &args.temp_dir {
        disk_options.temp_dir = t.clone();
    }
    let report = tart::push_disk(&registry, path, &open, &disk_options, &|ev| bars.event(ev))
        .with_context(|| format!("cannot push '{}' to {reference}", path.display()))?;
    bars.finish();
    if !args.quiet {
        println!(
            "pushed '{}' to {reference} ({}): {} disk of {}, {} slices ({} all zero), {} uploaded, {} sent",
            path.display(),
            report.digest,
            report.disk_format.map_or("?", DiskFormat::name),
            human(report.disk_size),
            report.slices,
            report.zero_slices,
            report.uploaded,
            human(report.bytes_uploaded),
        );
    }
    Ok(0)
}
