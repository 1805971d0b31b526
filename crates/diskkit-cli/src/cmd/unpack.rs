//! `diskkit unpack`: an OCI image (layers merged), a root filesystem tarball or a directory →
//! an ext4 disk image.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use diskkit::ImageFormat;
use diskkit_oci::{unpack, unpack_to_store, Input, Platform, Progress, UnpackOptions};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::args::QuietArg;
use crate::format::{self, Format};
use crate::messages::{self, done};
use crate::size::{self, human, Bytes};

/// Split `SRC[:REF]`: the longest prefix that exists as a path is the source.
pub(crate) fn split_source(src: &str) -> (PathBuf, Option<String>) {
    if Path::new(src).exists() {
        return (PathBuf::from(src), None);
    }
    for (i, _) in src.match_indices(':') {
        let (path, reference) = (&src[..i], &src[i + 1..]);
        if !path.is_empty() && Path::new(path).exists() {
            return (PathBuf::from(path), Some(reference.to_owned()));
        }
    }
    (PathBuf::from(src), None)
}

/// One progress bar per layer on a terminal; nothing otherwise.
pub(crate) struct Bars {
    multi: MultiProgress,
    current: Option<ProgressBar>,
}

impl Bars {
    /// Bars on stderr when it is a terminal, hidden otherwise.
    pub(crate) fn on_stderr() -> Bars {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Bars {
            multi: MultiProgress::with_draw_target(target),
            current: None,
        }
    }
}

impl Progress for Bars {
    fn layer_start(
        &mut self,
        index: usize,
        count: usize,
        digest: &str,
        size: Option<u64>,
    ) -> Option<Rc<dyn Fn(u64)>> {
        let bar = self.multi.add(ProgressBar::new(size.unwrap_or(0)));
        bar.set_style(
            ProgressStyle::with_template("layer {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let short: String = digest.trim_start_matches("sha256:").chars().take(12).collect();
        bar.set_message(format!("{}/{count} {short}", index + 1));
        self.current = Some(bar.clone());
        Some(Rc::new(move |n| bar.set_position(n)))
    }

    fn layer_done(&mut self) {
        if let Some(b) = self.current.take() {
            b.finish();
        }
    }
}

/// Make an ext4 disk from an OCI image, a rootfs tarball or a directory.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Build a merged ext4 root filesystem image, rootless, with diskkit's own ext4 \
                  writer, from: an OCI image (layout directory, OCI archive, docker-archive, or \
                  Apple `container`'s image store), its layers merged with whiteouts; a plain \
                  root filesystem tarball (uncompressed, gzip or zstd), as one layer; or a \
                  directory, as one layer (like `mkfs.ext4 -d`). The image's format comes from \
                  -O, else from DST's extension (.qcow2, .asif, .raw/.img; anything else is \
                  raw). It is compact (its content plus about 10%) unless --size; grow it later \
                  with `diskkit resize` and resize2fs.",
    after_help = "\
Examples:
  # A root filesystem tarball (mmdebstrap, ...)
  diskkit unpack rootfs.tar.zst root.qcow2
  # A directory, like mkfs.ext4 -d, 8 GiB
  diskkit unpack --size 8G ./rootfs root.img
  # An OCI layout 'debian' (skopeo copy ... oci:debian:bookworm)
  diskkit unpack debian:bookworm root.asif"
)]
pub(crate) struct Args {
    /// Format of the new image: raw, asif or qcow2. Default: from DST's extension (.qcow2,
    /// .asif, .raw; .img and anything else: raw).
    #[arg(
        short = 'O',
        long = "format",
        id = "new_format",
        value_enum,
        value_name = "FORMAT"
    )]
    format: Option<Format>,
    /// Filesystem size (sparse); default: compact (content plus about 10%), with --store
    /// 64G.
    #[arg(long, value_name = "SIZE", value_parser = size::disk_size, allow_hyphen_values = true)]
    size: Option<Bytes>,
    /// OCI images: the platform OS/ARCH[/VARIANT] (default: the host's).
    #[arg(long, value_name = "OS/ARCH")]
    platform: Option<String>,
    /// Fixed UUID, hash seed and times, derived from the input's digest (and
    /// SOURCE_DATE_EPOCH), for byte-identical images.
    #[arg(long)]
    reproducible: bool,
    /// Write ext4 metadata checksums (metadata_csum; needs Linux 3.18 or later).
    #[arg(long)]
    metadata_csum: bool,
    /// Replace DST if it exists.
    #[arg(long)]
    force: bool,
    /// OCI images: write an Apple `container` snapshot store entry in DIR
    /// (snapshots/<manifest-hex>/snapshot + snapshot-info) instead of DST; reused if present.
    /// Entries are what `diskkit boot` boots: RAW, 64 GiB sparse unless --size, with a journal
    /// and the label `root`.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["dst", "new_format"])]
    store: Option<PathBuf>,
    #[command(flatten)]
    quiet: QuietArg,
    /// The input: an OCI image as PATH or PATH:REF (REF: a tag, a ref.name annotation or
    /// sha256:DIGEST), a root filesystem tarball, or a directory.
    #[arg(value_name = "SRC[:REF]")]
    src: String,
    /// The ext4 image to create.
    #[arg(required_unless_present = "store")]
    dst: Option<PathBuf>,
}

/// A filesystem size from `--size` (of `unpack` and `boot`), with a warning when it is not a
/// whole number of ext4 blocks (the filesystem ends at the last whole block).
pub(crate) fn fs_size(size: u64) -> u64 {
    let rounded = size / 4096 * 4096;
    if rounded != size {
        crate::messages::warn(format_args!(
            "--size {size} is not a whole number of 4 KiB ext4 blocks; the filesystem is \
             {rounded} bytes ({})",
            human(rounded)
        ));
    }
    size
}

pub(crate) fn run(args: &Args) -> Result<u8> {
    let src = args.src.as_str();
    let (path, reference) = split_source(src);
    let platform = args.platform.as_deref().map(str::parse::<Platform>).transpose()?;
    let format = match &args.dst {
        Some(dst) => format::for_output(args.format, dst)?,
        None => ImageFormat::Raw,
    };
    let size = args.size.map(|s| fs_size(s.value));
    let options = UnpackOptions {
        reference,
        platform,
        format,
        size,
        reproducible: args.reproducible,
        overwrite: args.force,
        metadata_csum: args.metadata_csum,
        ..UnpackOptions::default()
    };
    let mut bars = Bars::on_stderr();
    if let Some(store) = &args.store {
        // Store entries are what `diskkit boot` boots: sized for use, with a journal.
        let mut options = options.clone();
        crate::boot::store::entry_options(&mut options, size);
        let entry = unpack_to_store(&path, store, &options, &mut bars)
            .with_context(|| format!("cannot unpack '{src}' into the store '{}'", store.display()))?;
        let what = if entry.cache_hit { "reused" } else { "stored" };
        done(
            args.quiet.quiet,
            format_args!("{what} '{src}' as '{}'", entry.snapshot.display()),
        );
        return Ok(crate::exit::SUCCESS);
    }
    let Some(dst) = &args.dst else {
        bail!("give DST or --store DIR");
    };
    let report = unpack(&path, dst, &options, &mut bars)
        .with_context(|| format!("cannot unpack '{src}' into '{}'", dst.display()))?;
    let input = match report.input {
        Input::Image => format!(
            "'{src}' ({} layer{})",
            report.layers,
            if report.layers == 1 { "" } else { "s" }
        ),
        Input::Tarball => format!("the tarball '{src}'"),
        Input::Directory => format!("the directory '{src}'"),
    };
    done(
        args.quiet.quiet,
        format_args!(
            "unpacked {input} into {}: ext4, {} used, {} inodes",
            messages::image(dst, format, report.fs_size),
            human(report.bytes_used),
            report.inodes
        ),
    );
    Ok(crate::exit::SUCCESS)
}
