//! `diskkit map`.

use std::io::{self, Write};
use std::path::Path;

use anyhow::Result;
use diskkit::{Extent, ExtentKind};
use serde::Serialize;

use super::open_image;
use crate::args::{OpenArgs, Output};

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

pub(crate) fn run(open: &OpenArgs, output: Output, path: &Path) -> Result<u8> {
    let image = open_image(open, path, false)?;
    let extents = image.extents(0, image.size())?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    match output {
        Output::Json => {
            let runs: Vec<Run> = extents.iter().map(to_run).collect();
            serde_json::to_writer_pretty(&mut out, &runs)?;
            writeln!(out)?;
        }
        Output::Human => {
            writeln!(
                out,
                "{:<20}{:<20}{:<8}{:<6}{:<20}",
                "Offset", "Length", "Kind", "Depth", "Mapped to"
            )?;
            for e in &extents {
                let kind = match e.kind {
                    ExtentKind::Data => "data",
                    ExtentKind::Zero => "zero",
                    ExtentKind::Absent => "absent",
                };
                let mapped = e.host_offset.map(|h| format!("{h:#x}")).unwrap_or_default();
                writeln!(
                    out,
                    "{:<20}{:<20}{:<8}{:<6}{}",
                    format!("{:#x}", e.offset),
                    format!("{:#x}", e.length),
                    kind,
                    e.depth,
                    mapped
                )?;
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
