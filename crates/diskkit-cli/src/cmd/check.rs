//! `diskkit check`: consistency check (and repair) of one image file.
//!
//! qcow2 images get the full check of `diskkit::formats::qcow2::check`. RAW and ASIF images are
//! opened (without their parents) and their whole allocation map is walked, which runs every
//! consistency rule their drivers have; they have no refcounts to repair.
//!
//! Exit status, like `qemu-img check`: 0 consistent, 1 the check could not be completed (an
//! error, printed on stderr), 2 corruptions are left, 3 leaked clusters are left (and no
//! corruptions).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use diskkit::formats::qcow2::{self, CheckReport, Problem, Repair};
use diskkit::storage::{FileStorage, Permissions, Storage};
use diskkit::{DiskImage, ImageFormat, OpenOptions};
use serde::Serialize;

use crate::args::{Format, Output, RepairMode};

/// Exit status: the check itself failed.
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

pub(crate) fn run(
    format: Option<Format>,
    repair: Option<RepairMode>,
    output: Output,
    path: &Path,
) -> Result<u8> {
    match check(format, repair, path) {
        Ok(json) => {
            let code = if json.corruptions > 0 || json.check_errors > 0 {
                EXIT_CORRUPT
            } else if json.leaks > 0 {
                EXIT_LEAKS
            } else {
                0
            };
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&json)?),
                Output::Human => print_human(&json),
            }
            Ok(code)
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "diskkit: error: {e:#}");
            Ok(EXIT_CHECK_FAILED)
        }
    }
}

fn check(format: Option<Format>, repair: Option<RepairMode>, path: &Path) -> Result<Json> {
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
        FileStorage::open_locked(path, writable, Some(lock_for(writable)))
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
    let options = OpenOptions::new().format(format).detached(true);
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

/// The lock `check` takes: a reader's, or a writer's when repairing.
fn lock_for(writable: bool) -> Permissions {
    if writable {
        Permissions::writer()
    } else {
        Permissions::reader()
    }
}
