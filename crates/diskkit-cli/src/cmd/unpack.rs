//! `diskkit unpack`: OCI image → merged ext4 root filesystem.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{bail, Context, Result};
use diskkit_oci::{unpack, unpack_to_store, Platform, Progress, UnpackOptions};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::args::Format;
use crate::size::{human, parse_size};

/// Split `SRC[:REF]`: the longest prefix that exists as a path is the source.
fn split_source(src: &str) -> (PathBuf, Option<String>) {
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
struct Bars {
    multi: MultiProgress,
    current: Option<ProgressBar>,
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

/// Options of `diskkit unpack`.
#[derive(Clone, Copy)]
pub(crate) struct Args<'a> {
    pub(crate) format: Format,
    pub(crate) platform: Option<&'a str>,
    pub(crate) size: Option<&'a str>,
    pub(crate) reproducible: bool,
    pub(crate) metadata_csum: bool,
    pub(crate) force: bool,
    pub(crate) store: Option<&'a Path>,
    pub(crate) registry: &'a super::pull::RegistryArgs,
}

pub(crate) fn run(args: Args<'_>, src: &str, dst: Option<&Path>) -> Result<u8> {
    let format = args.format.into();
    let size = args.size.map(parse_size).transpose()?;
    let platform = args.platform.map(str::parse::<Platform>).transpose()?;
    let (path, reference) = if diskkit_deliver::registry::looks_like_reference(src) {
        // A registry reference: pull what the shared layout lacks, then unpack from it.
        let r = diskkit_deliver::registry::Reference::parse(src)?;
        let bars = super::pull::TransferBars::new("pulling", 0, false);
        let (layout, digest) = diskkit_deliver::registry::pull_to_layout(
            &r,
            None,
            &args.registry.options(None)?,
            platform.clone(),
            &|ev| bars.event(ev),
        )
        .with_context(|| format!("cannot pull {r}"))?;
        bars.finish();
        (layout, Some(digest))
    } else {
        split_source(src)
    };
    let options = UnpackOptions {
        reference,
        platform,
        format,
        size,
        reproducible: args.reproducible,
        overwrite: args.force,
        metadata_csum: args.metadata_csum,
    };
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let mut bars = Bars {
        multi: MultiProgress::with_draw_target(target),
        current: None,
    };
    if let Some(store) = args.store {
        let entry = unpack_to_store(&path, store, &options, &mut bars)
            .with_context(|| format!("cannot unpack '{src}' into the store '{}'", store.display()))?;
        if entry.cache_hit {
            println!("cached: '{}'", entry.snapshot.display());
        } else {
            println!("stored: '{}'", entry.snapshot.display());
        }
        return Ok(0);
    }
    let Some(dst) = dst else {
        bail!("give DST or --store DIR");
    };
    let report = unpack(&path, dst, &options, &mut bars)
        .with_context(|| format!("cannot unpack '{src}' into '{}'", dst.display()))?;
    println!(
        "unpacked {} ({} layers) into '{}': ext4 of {}, {} used, {} inodes",
        report.manifest_digest,
        report.layers,
        dst.display(),
        human(report.fs_size),
        human(report.bytes_used),
        report.inodes
    );
    Ok(0)
}
