//! `diskkit prefetch`: fill a cache layer over a remote base ahead of use.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;

use super::open_image;
use crate::args::{OpenArgs, QuietArg};
use crate::messages::done;
use crate::size;

/// Fill the cache layer of a stack with everything it does not hold yet.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Read everything the cache layer of IMAGE's stack does not hold yet from \
                  beneath it (a remote base, usually) and keep it, so that later reads are \
                  local, and keep working while the server is unreachable. IMAGE is the cache \
                  layer or a layer on top of it. Resumable: what is cached is not fetched \
                  again, so an interrupted prefetch continues where it stopped. Shows a \
                  progress bar on a terminal.",
    after_help = "\
Examples:
  # Fetch the whole remote base into its cache layer
  diskkit prefetch --allow-remote images.example.com cache.asif
  # Through the overlay a VM runs on, with 8 parallel readers
  diskkit prefetch --allow-remote images.example.com --threads 8 vm.qcow2"
)]
pub(crate) struct Args {
    /// Readers working at the same time.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    quiet: QuietArg,
    /// The cache layer, or a layer on top of it.
    image: PathBuf,
}

pub(crate) fn run(a: &Args) -> Result<u8> {
    // Opened read-only: a cache layer in the stack (the top included) is opened for filling
    // all the same, and an overlay on top stays untouched.
    let image = open_image(&a.image, &a.open.options(false))?;
    let bar = crate::progress::bytes_bar(0, "prefetching");
    let stats = diskkit_deliver::remote::prefetch(&image, usize::from(a.threads), &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let stats = stats.with_context(|| format!("cannot prefetch '{}'", a.image.display()))?;
    drop(image);
    let fetched = if stats.filled == 0 {
        "nothing to fetch".to_owned()
    } else {
        format!("{} fetched into the cache", size::human(stats.filled))
    };
    done(
        a.quiet.quiet,
        format_args!(
            "prefetched '{}' ({} disk): {fetched}, {} already there",
            a.image.display(),
            size::human(stats.filled + stats.skipped),
            size::human(stats.skipped)
        ),
    );
    Ok(crate::exit::SUCCESS)
}
