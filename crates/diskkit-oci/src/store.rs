//! An Apple `container`-compatible snapshot store: `snapshots/<manifest-hex>/snapshot` (the
//! ext4 image) and `snapshot-info` (the JSON `Filesystem` description `container` reads),
//! built in `snapshots/ingest/<random>/` and renamed into place.

use std::path::{Path, PathBuf};

use diskkit::{Error, Result};

use crate::{select_for, unpack_selected, Progress, UnpackOptions, UnpackReport};

/// The store entry of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreEntry {
    /// `snapshots/<manifest-hex>`.
    pub dir: PathBuf,
    /// The ext4 image inside it.
    pub snapshot: PathBuf,
    /// True when the entry already existed and nothing was unpacked.
    pub cache_hit: bool,
    /// What was unpacked (`None` on a cache hit).
    pub report: Option<UnpackReport>,
}

/// JSON for `snapshot-info`: Swift's synthesized `Codable` form of
/// `Filesystem.block(format: "ext4", source:, destination: "/", options: [])` (cache `.on`,
/// sync `.fsync`, the defaults).
fn snapshot_info(source: &Path) -> Result<String> {
    let source = source
        .to_str()
        .ok_or_else(|| Error::invalid_argument("store path is not UTF-8"))?;
    let value = serde_json::json!({
        "type": {"block": {"format": "ext4", "cache": {"on": {}}, "sync": {"fsync": {}}}},
        "source": source,
        "destination": "/",
        "options": [],
    });
    serde_json::to_string(&value).map_err(|e| Error::invalid_argument(format!("snapshot-info: {e}")))
}

fn io(e: std::io::Error, path: &Path, op: &'static str) -> Error {
    Error::io(e).with_path(path).with_operation(op)
}

/// Unpack the image at `src` into the snapshot store at `store` unless its entry exists.
pub fn unpack_to_store(
    src: &Path,
    store: &Path,
    options: &UnpackOptions,
    progress: &mut dyn Progress,
) -> Result<StoreEntry> {
    let image = select_for(src, options)?;
    if image.input != crate::Input::Image {
        return Err(Error::invalid_argument(
            "a store entry is named by its OCI image's manifest digest: give an OCI image, not \
             a tarball or a directory",
        )
        .with_path(src));
    }
    let hex = image
        .manifest_digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| Error::invalid_format(format!("manifest digest {}", image.manifest_digest)))?
        .to_owned();
    let snapshots = store.join("snapshots");
    let ingest = snapshots.join("ingest");
    std::fs::create_dir_all(&ingest).map_err(|e| io(e, &ingest, "creating the store"))?;
    let snapshots = snapshots
        .canonicalize()
        .map_err(|e| io(e, &snapshots, "resolving the store path"))?;
    let dir = snapshots.join(&hex);
    let snapshot = dir.join("snapshot");
    if dir.join("snapshot-info").is_file() && snapshot.is_file() {
        return Ok(StoreEntry {
            dir,
            snapshot,
            cache_hit: true,
            report: None,
        });
    }
    // Built in `ingest/` under a diskkit temporary name (removed on failure, on SIGINT/SIGTERM
    // when the caller asked for that, and by a later run if this one is killed), then renamed
    // into place.
    let temp = diskkit::output::PendingDir::new_in(&dir, &ingest)?;
    let report = unpack_selected(&image, &temp.temp_path().join("snapshot"), options, progress)?;
    let info = temp.temp_path().join("snapshot-info");
    std::fs::write(&info, snapshot_info(&snapshot)?).map_err(|e| io(e, &info, "writing"))?;
    match temp.persist() {
        Ok(()) => Ok(StoreEntry {
            dir,
            snapshot,
            cache_hit: false,
            report: Some(report),
        }),
        // Another writer won the race: its entry is as good as ours.
        Err(_) if dir.join("snapshot-info").is_file() => Ok(StoreEntry {
            dir,
            snapshot,
            cache_hit: true,
            report: None,
        }),
        Err(e) => Err(e.with_operation("renaming the snapshot into place")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_json() {
        let j = snapshot_info(Path::new("/s/snapshots/ab/snapshot")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["type"]["block"]["format"], "ext4");
        assert_eq!(v["source"], "/s/snapshots/ab/snapshot");
        assert_eq!(v["destination"], "/");
    }
}
