//! `diskkit pull`: a container image from a registry into an OCI layout or an Apple
//! `container`-style store, or a VM disk in tart's layout into a disk image.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args as ClapArgs, ValueEnum};
use diskkit::ImageFormat;
use diskkit_deliver::http::{ClientOptions, RetryPolicy};
use diskkit_deliver::registry::{
    self, BlobEvent, Credentials, Destination, PullOptions, Reference, Registry, RegistryOptions,
};
use diskkit_deliver::tart::{self, DiskPullOptions};
use diskkit_oci::Platform;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::size::{human, parse_size};

/// How to reach registries: shared by `pull`, `push` and `unpack`.
#[derive(Debug, Clone, ClapArgs)]
pub(crate) struct RegistryArgs {
    /// Credentials for the registry (otherwise looked up in
    /// $XDG_RUNTIME_DIR/containers/auth.json and ~/.docker/config.json).
    #[arg(long, value_name = "USER:PASSWORD")]
    pub(crate) creds: Option<String>,
    /// Allow plain HTTP (and registries whose TLS fails) for any registry; registries on
    /// this machine (localhost, 127.0.0.1, [::1]) are always allowed it.
    #[arg(long)]
    pub(crate) insecure: bool,
    /// Trust the CA certificates in this PEM file too (repeatable).
    #[arg(long = "ca-file", value_name = "FILE")]
    pub(crate) ca_files: Vec<PathBuf>,
    /// Blobs (or disk slices) transferred at once.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub(crate) jobs: usize,
    /// Attempts in a row without progress before a transfer gives up.
    #[arg(long, value_name = "N", default_value_t = 7)]
    pub(crate) retries: u32,
    /// Seconds without data before a transfer counts as stalled.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub(crate) timeout: u64,
}

impl RegistryArgs {
    /// The library's options for these arguments (and an upload chunk size).
    pub(crate) fn options(&self, chunk_size: Option<u64>) -> Result<RegistryOptions> {
        let credentials = self.creds.as_deref().map(Credentials::parse).transpose()?;
        Ok(RegistryOptions {
            http: ClientOptions {
                read_timeout: Duration::from_secs(self.timeout.max(1)),
                extra_ca_files: self.ca_files.clone(),
                retry: RetryPolicy {
                    attempts: self.retries.max(1),
                    ..RetryPolicy::default()
                },
                ..ClientOptions::default()
            },
            credentials,
            insecure: self.insecure,
            jobs: self.jobs.max(1),
            chunk_size,
            ..RegistryOptions::default()
        })
    }
}

/// Output format of `pull --disk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DiskFormatArg {
    Raw,
    Asif,
    Qcow2,
}

impl From<DiskFormatArg> for ImageFormat {
    fn from(f: DiskFormatArg) -> Self {
        match f {
            DiskFormatArg::Raw => ImageFormat::Raw,
            DiskFormatArg::Asif => ImageFormat::Asif,
            DiskFormatArg::Qcow2 => ImageFormat::Qcow2,
        }
    }
}

/// Pull an image from an OCI registry: a container image into an OCI layout or an Apple
/// `container` store, or a VM disk (tart's layout) into a disk image.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Pull from an OCI registry (the distribution API: Docker Hub, GHCR, Quay, \
                  the CNCF registry, ...). REF is written as docker writes it: \
                  HOST[:PORT]/REPO[:TAG][@sha256:...], with an optional docker:// prefix; names \
                  without a registry are Docker Hub's (alpine = docker.io/library/alpine:latest).\n\n\
                  A container image goes into an OCI image layout (--layout, as `skopeo copy` \
                  writes one; default: the shared layout in $XDG_CACHE_HOME/diskkit/oci) or an \
                  Apple `container`-style content store (--store: content/blobs/sha256 and \
                  state.json). From an index, the manifest for --platform is chosen as `unpack` \
                  chooses (default linux and this machine's CPU). Blobs already there are not \
                  downloaded; the others are downloaded in parallel, resumed after a break, and \
                  checked against their digests before they appear.\n\n\
                  A VM disk in tart's layout (disk.v2 layers: Apple-LZ4-compressed slices) is \
                  rebuilt with --disk OUT, sparse, in the format of -O or OUT's extension (.raw, \
                  .img, .asif, .qcow2), else the artifact's own (raw or asif). All-zero slices \
                  are not downloaded, and no zero data is written.\n\n\
                  Credentials come from --creds, else from $XDG_RUNTIME_DIR/containers/auth.json \
                  or ~/.docker/config.json (docker login / podman login); anonymous otherwise. \
                  Plain HTTP is used only for registries on this machine or with --insecure.",
    after_help = "\
Examples:
  # An image into an OCI layout (like skopeo copy docker://alpine:3.20 oci:alpine)
  diskkit pull --layout alpine alpine:3.20
  # Into an Apple container-style store, for arm64
  diskkit pull --store ~/store --platform linux/arm64 quay.io/fedora/fedora:41
  # A tart VM disk as a qcow2 image
  diskkit pull --disk vm.qcow2 ghcr.io/cirruslabs/ubuntu:latest"
)]
pub(crate) struct Args {
    /// The OCI image layout to pull into (created if missing).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["store", "disk"])]
    layout: Option<PathBuf>,
    /// The Apple `container`-style content store to pull into.
    #[arg(long, value_name = "DIR", conflicts_with = "disk")]
    store: Option<PathBuf>,
    /// Rebuild a VM disk (tart's layout) as the image OUT.
    #[arg(long, value_name = "OUT")]
    disk: Option<PathBuf>,
    /// The format of --disk's image (default: OUT's extension, else the artifact's).
    #[arg(short = 'O', long = "format", value_enum, requires = "disk")]
    format: Option<DiskFormatArg>,
    /// With --disk: also write the artifact's nvram (EFI variables) here.
    #[arg(long, value_name = "FILE", requires = "disk")]
    nvram: Option<PathBuf>,
    /// With --disk: also write the VM's tart config.json here.
    #[arg(long, value_name = "FILE", requires = "disk")]
    vm_config: Option<PathBuf>,
    /// With --disk: replace OUT if it exists.
    #[arg(long, requires = "disk")]
    force: bool,
    /// Platform OS/ARCH[/VARIANT] to choose from an index (default: linux and this CPU).
    #[arg(long)]
    platform: Option<String>,
    /// Print nothing on success.
    #[arg(short, long)]
    quiet: bool,
    #[command(flatten)]
    registry: RegistryArgs,
    /// The image: [docker://]HOST[:PORT]/REPO[:TAG][@sha256:DIGEST], or a Docker Hub name.
    reference: String,
}

/// Progress bars for parallel transfers: one per blob in flight and one for the total,
/// on a terminal; nothing otherwise.
pub(crate) struct TransferBars {
    multi: MultiProgress,
    total: ProgressBar,
    bars: Mutex<HashMap<String, (ProgressBar, u64)>>,
    verb: &'static str,
}

impl TransferBars {
    pub(crate) fn new(verb: &'static str, total: u64, quiet: bool) -> TransferBars {
        let target = if std::io::stderr().is_terminal() && !quiet {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let t = multi.add(ProgressBar::new(total));
        t.set_style(
            ProgressStyle::with_template(
                "{msg:>14} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        t.set_message(verb);
        TransferBars {
            multi,
            total: t,
            bars: Mutex::new(HashMap::new()),
            verb,
        }
    }

    // The registry client hands events by value to its callback, which passes them on here.
    #[allow(clippy::needless_pass_by_value)]
    pub(crate) fn event(&self, ev: BlobEvent<'_>) {
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        let short = |d: &str| -> String {
            let d = d.trim_start_matches("sha256:");
            if d.len() > 12 && d.bytes().all(|c| c.is_ascii_hexdigit()) {
                d[..12].to_string()
            } else {
                d.to_string()
            }
        };
        match ev {
            BlobEvent::Start { digest, size, from } => {
                let b = self.multi.insert_before(&self.total, ProgressBar::new(size));
                b.set_style(
                    ProgressStyle::with_template("{msg:>14} [{bar:30}] {bytes}/{total_bytes}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                b.set_message(short(digest));
                b.set_position(from);
                let again = bars.contains_key(digest);
                let before = bars
                    .insert(digest.to_string(), (b, from))
                    .map_or(0, |(old, done)| {
                        old.finish_and_clear();
                        done
                    });
                if !again {
                    self.total.inc_length(size);
                }
                self.total.inc(from.saturating_sub(before));
            }
            BlobEvent::Progress { digest, done, .. } => {
                if let Some((b, last)) = bars.get_mut(digest) {
                    b.set_position(done);
                    self.total.inc(done.saturating_sub(*last));
                    *last = done;
                }
            }
            BlobEvent::Done { digest, size, .. } => {
                let last = match bars.remove(digest) {
                    Some((b, last)) => {
                        b.finish_and_clear();
                        last
                    }
                    None => {
                        self.total.inc_length(size);
                        0
                    }
                };
                self.total.inc(size.saturating_sub(last));
            }
            BlobEvent::Retry { digest, error, wait } => {
                let _ = self.multi.println(format!(
                    "diskkit: {} {}: {error:#}; retrying in {:.1} s",
                    self.verb,
                    short(digest),
                    wait.as_secs_f64()
                ));
            }
        }
    }

    pub(crate) fn finish(&self) {
        for (_, (b, _)) in self.bars.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            b.finish_and_clear();
        }
        self.total.finish_and_clear();
    }
}

/// `--platform` as the library wants it.
pub(crate) fn parse_platform(p: Option<&str>) -> Result<Option<Platform>> {
    Ok(p.map(str::parse::<Platform>).transpose()?)
}

pub(crate) fn run(args: &Args) -> Result<u8> {
    let reference = Reference::parse(&args.reference)?;
    let options = args.registry.options(None)?;
    let platform = parse_platform(args.platform.as_deref())?;
    let registry =
        Registry::connect(&reference, &options, false).with_context(|| format!("cannot pull {reference}"))?;
    if let Some(out) = &args.disk {
        let bars = TransferBars::new("pulling", 0, args.quiet);
        let report = tart::pull_disk(
            &registry,
            out,
            &DiskPullOptions {
                format: args.format.map(Into::into),
                overwrite: args.force,
                nvram: args.nvram.clone(),
                vm_config: args.vm_config.clone(),
            },
            &|ev| bars.event(ev),
        )
        .with_context(|| format!("cannot pull {reference} into '{}'", out.display()))?;
        bars.finish();
        if !args.quiet {
            println!(
                "pulled {reference} ({}) into '{}': {} disk of {}, {} slices ({} all zero), {} downloaded, {} written",
                report.digest,
                out.display(),
                report.format.map_or("?", |f| f.name()),
                human(report.disk_size),
                report.slices,
                report.zero_slices,
                human(report.bytes_downloaded),
                human(report.bytes_written),
            );
        }
        return Ok(0);
    }
    let (dest, ref_name) = match (&args.layout, &args.store) {
        (Some(l), _) => (Destination::Layout(l.clone()), reference.tag.clone()),
        (None, Some(s)) => (Destination::Store(s.clone()), None),
        (None, None) => (
            Destination::Layout(registry::default_layout_cache()),
            Some(reference.to_string()),
        ),
    };
    let bars = TransferBars::new("pulling", 0, args.quiet);
    let report = registry::pull(
        &registry,
        &dest,
        &PullOptions {
            platform,
            ref_name: ref_name.clone(),
        },
        &|ev| bars.event(ev),
    )
    .with_context(|| format!("cannot pull {reference}"))?;
    bars.finish();
    if !args.quiet {
        println!(
            "pulled {reference} ({}{}) into '{}': {} blobs, {} fetched ({})",
            report.manifest_digest,
            report
                .platform
                .as_deref()
                .map(|p| format!(", {p}"))
                .unwrap_or_default(),
            report.path.display(),
            report.blobs,
            report.fetched,
            human(report.bytes_fetched),
        );
    }
    Ok(0)
}

/// Parse `--chunk-size` (0 or absent: monolithic).
pub(crate) fn chunk_size(text: Option<&str>) -> Result<Option<u64>> {
    match text {
        None => Ok(None),
        Some(t) => {
            let n = parse_size(t)?;
            if n != 0 && n < 1024 {
                bail!("--chunk-size {t} is too small (at least 1 KiB, or 0 for one request per blob)");
            }
            Ok((n > 0).then_some(n))
        }
    }
}
