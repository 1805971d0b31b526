//! The rules for `layer.qcow2`: a consistent qcow2 image whose backing file is exactly
//! `disk.img` in RAW format, with no external data file, no dirty or corrupt bit and no
//! internal snapshots.

use std::path::Path;
use std::sync::Arc;

use diskkit::formats::qcow2::{self, Qcow2Image, Repair};
use diskkit::storage::FileStorage;
use diskkit::{ImageFormat, Layer, LayerInfo, LayerType};
use serde::Serialize;

use crate::bundle::{DISK, LAYER};
use crate::error::{Error, Result};

/// What the layer holds, for `bundle info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerDetails {
    /// The qcow2 file's length.
    pub file_size: u64,
    /// Its virtual size.
    pub virtual_size: u64,
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Guest clusters mapped to host clusters (0 for an empty overlay).
    pub allocated_clusters: u64,
    /// Leaked clusters (wasted space; not an error, as in `qemu-img check`).
    pub leaks: u64,
    /// The backing file name (always `disk.img` after validation).
    pub backing_file: String,
    /// The backing format (always `raw` after validation).
    pub backing_format: String,
    /// Lazy refcounts enabled.
    pub lazy_refcounts: bool,
}

fn rule(message: impl Into<String>) -> Error {
    Error::bundle(format!("{LAYER}: {}", message.into()))
}

/// Check the layer at `path` against the bundle rules; `max_size` bounds its virtual size.
pub(crate) fn check_layer(path: &Path, max_size: u64) -> Result<LayerDetails> {
    let file_size = std::fs::metadata(path)
        .map_err(|e| Error::io_while(e, format!("reading {LAYER}")))?
        .len();
    let report = qcow2::check_file(path, Repair::None).map_err(core_rule)?;
    if report.dirty {
        return Err(rule(
            "the dirty bit is set (it was not closed cleanly and its refcounts may be wrong); \
             run `qemu-img check -r all` or `diskkit check --repair all` on it before bundling",
        ));
    }
    if report.corrupt {
        return Err(rule("the corrupt bit is set (QEMU found it inconsistent)"));
    }
    if report.corruptions > 0 || report.check_errors > 0 {
        let first = report
            .problems
            .iter()
            .find(|p| !p.is_leak())
            .map_or_else(String::new, |p| format!("; first: {}", p.message));
        return Err(rule(format!(
            "inconsistent: {} corruptions and {} check errors{first}",
            report.corruptions, report.check_errors
        )));
    }
    let storage: Arc<FileStorage> = Arc::new(FileStorage::open(path, false).map_err(core_rule)?);
    let image = Qcow2Image::open(storage, false).map_err(core_rule)?;
    let d = image.qcow2_details();
    match d.backing_file.as_deref() {
        Some(DISK) => {}
        Some(other) => {
            return Err(rule(format!(
                "its backing file is '{other}'; it must be exactly '{DISK}'"
            )))
        }
        None => {
            return Err(rule(format!(
                "it has no backing file; it must be backed by '{DISK}'"
            )))
        }
    }
    match d.backing_format.as_deref() {
        Some("raw") => {}
        Some(other) => return Err(rule(format!("its backing format is '{other}'; it must be 'raw'"))),
        None => {
            return Err(rule(
                "it records no backing format; it must record 'raw' (qemu-img create -F raw)",
            ))
        }
    }
    if d.snapshots > 0 {
        return Err(rule(format!(
            "it has {} internal snapshots; a bundle's layer must have none",
            d.snapshots
        )));
    }
    let virtual_size = image.size();
    if virtual_size > max_size {
        return Err(rule(format!(
            "its virtual size {virtual_size} is larger than the limit {max_size} (--max-disk-size)"
        )));
    }
    Ok(LayerDetails {
        file_size,
        virtual_size,
        version: d.version,
        cluster_size: d.cluster_size,
        allocated_clusters: report.allocated_clusters,
        leaks: report.leaks,
        backing_file: DISK.into(),
        backing_format: "raw".into(),
        lazy_refcounts: d.lazy_refcounts,
    })
}

/// A core error about the layer as a bundle-rule error naming the member.
fn core_rule(e: diskkit::Error) -> Error {
    let what = match e.kind() {
        diskkit::ErrorKind::Io => {
            return Error::new(crate::ErrorKind::Io, format!("reading {LAYER}")).with_source(e)
        }
        diskkit::ErrorKind::InvalidFormat => "not a qcow2 image",
        _ => "unusable",
    };
    // The core's message names the rule (external data file, encryption, ...); the path
    // is the staging file's, which means nothing to the user, so only the message is kept.
    let msg = e.to_string();
    let msg = msg.split(" (").next().unwrap_or(&msg).to_string();
    rule(format!("{what}: {msg}")).with_source(e)
}

/// Point the layer at `parent` (its new backing file name) in `format` instead of
/// `disk.img` in RAW, as when the base is converted to ASIF; `parent_uuid` is the new
/// parent's layer UUID, recorded so that a later change to it is noticed.
pub(crate) fn repoint(
    path: &Path,
    parent: &str,
    format: ImageFormat,
    parent_uuid: Option<uuid::Uuid>,
) -> Result<()> {
    let storage =
        Arc::new(FileStorage::open(path, true).map_err(|e| Error::image(e, format!("opening {LAYER}")))?);
    let image = Qcow2Image::open(storage, true).map_err(|e| Error::image(e, format!("opening {LAYER}")))?;
    let old = image.layer_info();
    let info = LayerInfo {
        layer_type: Some(old.layer_type.unwrap_or(LayerType::Overlay)),
        parent_path: Some(parent.to_string()),
        parent_format: Some(format),
        parent_uuid,
        ..old
    };
    image
        .set_layer_info(&info)
        .and_then(|()| image.flush())
        .map_err(|e| Error::image(e, format!("pointing {LAYER} at {parent}")))
}
