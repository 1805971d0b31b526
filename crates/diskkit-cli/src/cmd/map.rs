//! `diskkit map`.

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Args as ClapArgs;
use diskkit::{Extent, ExtentKind};
use serde::Serialize;

use super::open_image;
use crate::args::{DetachedArg, OpenArgs, Output, OutputArg};

/// Show which ranges hold data, zeroes or nothing (like qemu-img map).
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Show the allocation map of the virtual disk: runs of data, zeroes and absent \
                  ranges, with the layer that holds each (depth: 0 absent, 1 the top layer, 2 the \
                  one beneath, ...) and, for data, its offset in that layer's file. Offsets and \
                  lengths are printed in hex, which every --offset and --length accepts.",
    after_help = "\
Examples:
  # Data, zero and absent runs of the stack
  diskkit map vm.qcow2
  # The same as JSON (like qemu-img map)
  diskkit map --output json disk.asif
  # Read a run map printed
  diskkit read disk.raw --offset 0x400 --length 0x200 | xxd"
)]
pub(crate) struct Args {
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    detached: DetachedArg,
    #[command(flatten)]
    output: OutputArg,
    /// The image.
    path: PathBuf,
}

/// One run, in the spirit of `qemu-img map --output=json`, except that `depth` counts as NBD's
/// `qemu:allocation-depth` does: 0 = no layer holds it, 1 = the top layer, 2 = the one below...
#[derive(Serialize)]
struct Run {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
}

pub(crate) fn run(a: &Args) -> Result<u8> {
    let image = open_image(&a.path, &a.open.options(false).detached(a.detached.detached))?;
    let extents = image.extents(0, image.size())?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    match a.output.output {
        Output::Json => {
            let runs: Vec<Run> = extents.iter().map(to_run).collect();
            serde_json::to_writer_pretty(&mut out, &runs)?;
            writeln!(out)?;
        }
        Output::Human => {
            writeln!(
                out,
                "{:<20}{:<20}{:<8}{:<6}Mapped to",
                "Offset", "Length", "Kind", "Depth"
            )?;
            for e in &extents {
                let kind = match e.kind {
                    ExtentKind::Data => "data",
                    ExtentKind::Zero => "zero",
                    ExtentKind::Absent => "absent",
                };
                let mapped = e.host_offset.map(|h| format!("{h:#x}")).unwrap_or_default();
                let line = format!(
                    "{:<20}{:<20}{:<8}{:<6}{}",
                    format!("{:#x}", e.offset),
                    format!("{:#x}", e.length),
                    kind,
                    e.depth,
                    mapped
                );
                writeln!(out, "{}", line.trim_end())?;
            }
        }
    }
    out.flush()?;
    Ok(0)
}

fn to_run(e: &Extent) -> Run {
    Run {
        start: e.offset,
        length: e.length,
        depth: e.depth,
        present: e.depth > 0,
        zero: e.reads_as_zero(),
        data: e.kind == ExtentKind::Data,
        offset: e.host_offset,
    }
}
