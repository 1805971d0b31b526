//! `diskkit check`: consistency check (and repair) of one image file.
//!
//! qcow2 images get the full check of `diskkit::formats::qcow2::check`. RAW and ASIF images are
//! opened (without their parents) and their whole allocation map is walked, which runs every
//! consistency rule their drivers have; they have no refcounts to repair.
//!
//! Exit status, like `qemu-img check`: 0 consistent, 1 the check could not be completed (an
//! error, printed on stderr), 2 corruptions are left, 3 leaked clusters are left (and no
//! corruptions). A file that cannot be opened at all (missing, unreadable) is an error like in
//! every other command: 2.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args as ClapArgs, ValueEnum};
use diskkit::formats::qcow2::{self, CheckReport, Problem, Repair};
use diskkit::storage::{FileStorage, Permissions, Storage};
use diskkit::{DiskImage, ImageFormat, OpenOptions};
use serde::Serialize;

use crate::args::{Output, OutputArg};
use crate::format::Format;

/// What `check --repair` may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum RepairMode {
    /// Free leaked clusters only.
    Leaks,
    /// Also fix refcounts that are too low, copied flags and bad table entries.
    All,
}

/// Check an image's consistency, and repair it (like qemu-img check).
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Check the consistency of one image file (its parents are not opened), like \
                  `qemu-img check`: for qcow2, every table is walked and the refcounts recomputed \
                  and compared (corruptions, leaks, image end offset, allocated, fragmented and \
                  compressed clusters); RAW and ASIF files are opened and their whole map walked. \
                  --repair leaks frees leaked clusters; --repair all also fixes corruptions and \
                  clears the dirty and corrupt bits.",
    after_help = "\
Exit status (as qemu-img check, the one exception to diskkit's 0/1/2):
  0  consistent (after the repair, with --repair)
  1  the check could not complete (an unreadable or unsupported image)
  2  corruptions are left, or the file could not be opened at all (missing, unreadable)
  3  leaked clusters are left, and no corruptions

Examples:
  # Report problems, change nothing
  diskkit check vm.qcow2
  # Repair after a crash (dirty image)
  diskkit check -r all vm.qcow2
  diskkit check --output json disk.qcow2 | jq .leaks"
)]
pub(crate) struct Args {
    /// The image's format; detected from its magic number when omitted.
    #[arg(short = 'f', long = "image-format", value_enum, value_name = "FORMAT")]
    format: Option<Format>,
    /// Repair: `leaks` frees leaked clusters, `all` also fixes corruptions (qcow2).
    #[arg(short = 'r', long, value_enum, value_name = "WHAT")]
    repair: Option<RepairMode>,
    /// Check the image even while another process (QEMU, diskkit serve) has it open for
    /// writing, like `qemu-img check -U`; what is read may be changing, so problems found may
    /// not be real. Not with --repair.
    #[arg(short = 'U', long = "force-share", conflicts_with = "repair")]
    force_share: bool,
    #[command(flatten)]
    output: OutputArg,
    /// The image file.
    path: PathBuf,
}

/// Exit status: the check itself could not complete.
const EXIT_CHECK_FAILED: u8 = 1;
/// Exit status: corruptions left.
const EXIT_CORRUPT: u8 = 2;
/// Exit status: leaks left, no corruptions.
const EXIT_LEAKS: u8 = 3;

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Json {
    filename: String,
    format: String,
    /// `none`, `leaks` or `all`.
    repair: &'static str,
    check_errors: u64,
    corruptions: u64,
    leaks: u64,
    corruptions_fixed: u64,
    leaks_fixed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_end_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_clusters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allocated_clusters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    compressed_clusters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fragmented_clusters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allocated_bytes: Option<u64>,
    dirty: bool,
    corrupt: bool,
    problems: Vec<ProblemJson>,
    problems_omitted: u64,
    remaining: Vec<ProblemJson>,
    changes: Vec<String>,
}

#[derive(Serialize)]
struct ProblemJson {
    kind: String,
    leak: bool,
    offset: u64,
    message: String,
}

fn problems(list: &[Problem]) -> Vec<ProblemJson> {
    list.iter()
        .map(|p| ProblemJson {
            kind: p.kind.name().to_string(),
            leak: p.is_leak(),
            offset: p.offset,
            message: p.message.clone(),
        })
        .collect()
}

pub(crate) fn run(a: &Args) -> Result<u8> {
    let path = &a.path;
    // A file that cannot be opened at all is an ordinary error (exit 2), as in every command.
    std::fs::File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
    match check(a.format, a.repair, a.force_share, path) {
        Ok(json) => {
            let code = if json.check_errors > 0 {
                EXIT_CHECK_FAILED
            } else if json.corruptions > 0 {
                EXIT_CORRUPT
            } else if json.leaks > 0 {
                EXIT_LEAKS
            } else {
                0
            };
            match a.output.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&json)?),
                Output::Human => print_human(&json),
            }
            Ok(code)
        }
        Err(e) => {
            crate::messages::error(&e);
            Ok(EXIT_CHECK_FAILED)
        }
    }
}

fn check(format: Option<Format>, repair: Option<RepairMode>, force_share: bool, path: &Path) -> Result<Json> {
    let repair = match repair {
        None => Repair::None,
        Some(RepairMode::Leaks) => Repair::Leaks,
        Some(RepairMode::All) => Repair::All,
    };
    let writable = repair != Repair::None;
    let repair_name = match repair {
        Repair::Leaks => "leaks",
        Repair::All => "all",
        _ => "none",
    };
    let storage: Arc<dyn Storage> = Arc::new(
        // Locked like `qemu-img check`: refused while another process writes the image.
        FileStorage::open_locked(path, writable, Some(lock_for(writable, force_share)))
            .with_context(|| format!("cannot open '{}'", path.display()))?,
    );
    let format = match format {
        Some(f) => f.into(),
        None => diskkit::probe::detect(&*storage)?,
    };
    let filename = path.display().to_string();
    if format == ImageFormat::Qcow2 {
        let r = qcow2::check(&*storage, repair)
            .map_err(|e| e.with_path(path))
            .with_context(|| format!("cannot check '{}'", path.display()))?;
        return Ok(qcow2_json(filename, repair_name, &r));
    }
    drop(storage);
    // RAW and ASIF: open the file alone and walk its whole map.
    let options = OpenOptions::new()
        .format(format)
        .detached(true)
        .force_share(force_share);
    let image =
        DiskImage::open(path, &options).with_context(|| format!("cannot open '{}'", path.display()))?;
    image
        .extents(0, image.size())
        .with_context(|| format!("cannot read the allocation map of '{}'", path.display()))?;
    let top = image.describe_layers()?.remove(0);
    let changes = if writable {
        vec![format!(
            "nothing to repair: {format} images have no reference counts"
        )]
    } else {
        Vec::new()
    };
    Ok(Json {
        filename,
        format: format.to_string(),
        repair: repair_name,
        check_errors: 0,
        corruptions: 0,
        leaks: 0,
        corruptions_fixed: 0,
        leaks_fixed: 0,
        image_end_offset: None,
        total_clusters: None,
        allocated_clusters: None,
        compressed_clusters: None,
        fragmented_clusters: None,
        allocated_bytes: top.allocated_bytes,
        dirty: false,
        corrupt: false,
        problems: Vec::new(),
        problems_omitted: 0,
        remaining: Vec::new(),
        changes,
    })
}

fn qcow2_json(filename: String, repair: &'static str, r: &CheckReport) -> Json {
    Json {
        filename,
        format: "qcow2".into(),
        repair,
        check_errors: r.check_errors,
        corruptions: r.corruptions,
        leaks: r.leaks,
        corruptions_fixed: r.corruptions_fixed,
        leaks_fixed: r.leaks_fixed,
        image_end_offset: Some(r.image_end_offset),
        total_clusters: Some(r.total_clusters),
        allocated_clusters: Some(r.allocated_clusters),
        compressed_clusters: Some(r.compressed_clusters),
        fragmented_clusters: Some(r.fragmented_clusters),
        allocated_bytes: None,
        dirty: r.dirty,
        corrupt: r.corrupt,
        problems: problems(&r.problems),
        problems_omitted: r.problems_omitted,
        remaining: problems(&r.remaining),
        changes: r.changes.clone(),
    }
}

fn print_human(j: &Json) {
    let repaired = j.repair != "none";
    for p in &j.problems {
        let tag = if j.repair == "all" || (j.repair == "leaks" && p.leak) {
            "Repairing"
        } else if p.leak {
            "Leaked"
        } else {
            "ERROR"
        };
        println!("{tag}: {}", p.message);
    }
    if j.problems_omitted > 0 {
        println!("({} more problems not listed)", j.problems_omitted);
    }
    if repaired {
        if j.changes.is_empty() {
            println!("Nothing was changed.");
        } else {
            println!("Changes made:");
        }
        for c in &j.changes {
            println!("  - {c}");
        }
        println!(
            "{} corruptions and {} leaked clusters were repaired; checked again:",
            j.corruptions_fixed, j.leaks_fixed
        );
        for p in &j.remaining {
            println!("{}: {}", if p.leak { "Leaked" } else { "ERROR" }, p.message);
        }
    }
    println!("image: {} ({})", j.filename, j.format);
    if j.corruptions == 0 && j.leaks == 0 && j.check_errors == 0 {
        println!("No errors were found on the image.");
    } else {
        if j.corruptions > 0 {
            println!("{} errors were found on the image.", j.corruptions);
        }
        if j.leaks > 0 {
            println!("{} leaked clusters were found on the image.", j.leaks);
        }
        if j.check_errors > 0 {
            println!("{} parts of the image could not be checked.", j.check_errors);
        }
    }
    if let (Some(a), Some(t)) = (j.allocated_clusters, j.total_clusters) {
        let pct = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 * 100.0 / d as f64 };
        println!(
            "{a}/{t} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            pct(a, t),
            pct(j.fragmented_clusters.unwrap_or(0), a),
            pct(j.compressed_clusters.unwrap_or(0), a)
        );
    }
    if let Some(e) = j.image_end_offset {
        println!("Image end offset: {e}");
    }
    if let Some(b) = j.allocated_bytes {
        println!("Allocated bytes: {b}");
    }
    if j.dirty {
        println!("The dirty bit is set.");
    }
    if j.corrupt {
        println!("The corrupt bit is set.");
    }
}

/// The lock `check` takes: a reader's, a writer's when repairing, or only the read
/// permission with `-U`.
fn lock_for(writable: bool, force_share: bool) -> Permissions {
    if writable {
        Permissions::writer()
    } else if force_share {
        Permissions::force_share()
    } else {
        Permissions::reader()
    }
}
