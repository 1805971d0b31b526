//! Pulling a container image into an OCI image layout or an Apple `container`-style
//! content store.
//!
//! The manifest is resolved (an index is followed to the manifest for the platform, chosen
//! as `unpack` chooses), the documents are stored, the config and layers are downloaded
//! in parallel (at most [`RegistryOptions::jobs`](super::RegistryOptions) at once; blobs
//! already present are skipped), and only when every blob is in place is the image named:
//! `index.json` of a layout (with `org.opencontainers.image.ref.name`), or `state.json` of
//! a store (keyed by the full reference, as the container tool keys it).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use diskkit_oci::Platform;
use serde_json::{json, Value};

use super::blob::{fetch_blob, store_bytes, BlobEvent};
use super::client::Registry;
use super::manifest::{Descriptor, Document, Fetched, Manifest};
use crate::error::{Error, ErrorKind, Result};
use crate::fsutil;

/// Where a pull puts the image.
#[derive(Debug, Clone)]
pub enum Destination {
    /// An OCI image layout directory (created if missing).
    Layout(PathBuf),
    /// An Apple `container`-style store root: `content/blobs/sha256/…` and `state.json`.
    Store(PathBuf),
}

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// The platform to choose from an index; `None` for the host's (linux and its CPU).
    pub platform: Option<Platform>,
    /// The `org.opencontainers.image.ref.name` to give the image in a layout's
    /// `index.json` (an entry with the same name is replaced). `None` for none.
    pub ref_name: Option<String>,
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullReport {
    /// The digest of the image manifest chosen.
    pub manifest_digest: String,
    /// The descriptor of the manifest chosen.
    pub manifest: Descriptor,
    /// The digest the reference resolved to (an index, or the manifest itself).
    pub root_digest: String,
    /// The platform of the manifest chosen, when an index named it.
    pub platform: Option<String>,
    /// Blobs of the image (config and layers).
    pub blobs: usize,
    /// Of those, how many were downloaded (the rest were present).
    pub fetched: usize,
    /// Bytes of the blobs downloaded.
    pub bytes_fetched: u64,
    /// Bytes of all the image's blobs.
    pub bytes_total: u64,
    /// The layout or store root.
    pub path: PathBuf,
}

/// The manifest an index leads to for `platform`, as `unpack` chooses: attestation
/// manifests are skipped, entries that name another platform are skipped, nested indexes
/// are followed, and among several candidates the only one that names its platform wins.
/// Returns the manifest and the documents on the way (the root first).
pub fn resolve(
    registry: &Registry,
    root: Fetched,
    platform: &Platform,
) -> Result<(Vec<Fetched>, Option<String>)> {
    let mut docs = vec![root];
    let mut chosen_platform = None;
    for _depth in 0..8 {
        let Some(Document::Index(index)) = docs.last().map(|d| &d.document) else {
            return Ok((docs, chosen_platform));
        };
        let mut candidates: Vec<&Descriptor> = index
            .manifests
            .iter()
            .filter(|d| {
                d.annotations.get("vnd.docker.reference.type").map(String::as_str)
                    != Some("attestation-manifest")
            })
            .filter(|d| {
                d.platform
                    .as_ref()
                    .is_none_or(|p| platform.matches(&p.os, &p.architecture, p.variant.as_deref()))
            })
            .collect();
        let available = || {
            let mut v: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .filter(|p| p.os != "unknown")
                .map(|p| match &p.variant {
                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                    None => format!("{}/{}", p.os, p.architecture),
                })
                .collect();
            v.dedup();
            v.join(", ")
        };
        if candidates.len() > 1 {
            let explicit: Vec<&Descriptor> = candidates
                .iter()
                .copied()
                .filter(|d| d.platform.is_some())
                .collect();
            if explicit.len() == 1 {
                candidates = explicit;
            } else {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "{} manifests of {} match {platform}; name one by digest (platforms: {})",
                        candidates.len(),
                        registry.reference(),
                        available()
                    ),
                ));
            }
        }
        let Some(d) = candidates.first() else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "{} has no image for {platform} (it has: {})",
                    registry.reference(),
                    available()
                ),
            ));
        };
        if let Some(p) = &d.platform {
            chosen_platform = Some(match &p.variant {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            });
        }
        let next = registry.get_manifest(&d.digest, Some(&d.media_type))?;
        if next.bytes.len() as u64 != d.size {
            return Err(Error::new(
                ErrorKind::InvalidManifest,
                format!(
                    "manifest {} is {} bytes, not the {} its index says",
                    d.digest,
                    next.bytes.len(),
                    d.size
                ),
            ));
        }
        docs.push(next);
    }
    Err(Error::new(
        ErrorKind::InvalidManifest,
        "indexes nested more than 8 deep",
    ))
}

/// Download `blobs` into `blobs_dir` through `ingest`, `jobs` at a time. Returns (blobs
/// fetched, bytes fetched).
pub(crate) fn fetch_all(
    registry: &Registry,
    blobs: &[Descriptor],
    blobs_dir: &Path,
    ingest: &Path,
    events: &(dyn Fn(BlobEvent<'_>) + Sync),
) -> Result<(usize, u64)> {
    let queue: Mutex<VecDeque<&Descriptor>> = Mutex::new(blobs.iter().collect());
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let fetched = Mutex::new((0usize, 0u64));
    let workers = registry.options().jobs.clamp(1, 64).min(blobs.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Some(d) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else {
                    break;
                };
                match fetch_blob(registry, d, blobs_dir, ingest, events, &|| {
                    stop.load(Ordering::Relaxed)
                }) {
                    Ok(true) => {
                        let mut f = fetched.lock().unwrap_or_else(|e| e.into_inner());
                        f.0 += 1;
                        f.1 += d.size;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        failed.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                        stop.store(true, Ordering::Relaxed);
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    Ok(fetched.into_inner().unwrap_or_else(|e| e.into_inner()))
}

fn create_dir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| Error::io_while(e, "creating a directory").with_path(p))
}

/// Check the config of a single-manifest image against an explicitly asked platform.
fn check_config_platform(config_path: &Path, platform: &Platform) -> Result<()> {
    let bytes = std::fs::read(config_path)
        .map_err(|e| Error::io_while(e, "reading the config").with_path(config_path))?;
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if let (Some(os), Some(arch)) = (
        v.get("os").and_then(Value::as_str),
        v.get("architecture").and_then(Value::as_str),
    ) {
        let variant = v.get("variant").and_then(Value::as_str);
        if !platform.matches(os, arch, variant.or(platform.variant.as_deref())) {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("the image is for {os}/{arch}, not {platform}"),
            ));
        }
    }
    Ok(())
}

/// Pull the image `registry` was connected for into `dest`.
pub fn pull(
    registry: &Registry,
    dest: &Destination,
    options: &PullOptions,
    events: &(dyn Fn(BlobEvent<'_>) + Sync),
) -> Result<PullReport> {
    let reference = registry.reference().clone();
    let platform = options.platform.clone().unwrap_or_else(Platform::host);
    let root = registry.get_manifest(reference.manifest_reference(), None)?;
    let root_digest = root.digest.clone();
    let root_desc = root.descriptor();
    let (docs, chosen_platform) = resolve(registry, root, &platform)?;
    // OK to unwrap-free: resolve always returns the root at least.
    let Some(last) = docs.last() else {
        return Err(Error::new(ErrorKind::InvalidManifest, "nothing resolved"));
    };
    let Document::Manifest(manifest) = &last.document else {
        return Err(Error::new(
            ErrorKind::InvalidManifest,
            "the reference does not lead to an image manifest",
        ));
    };
    let manifest: Manifest = manifest.clone();
    let manifest_desc = last.descriptor();
    let (root_dir, blobs_dir, ingest) = match dest {
        Destination::Layout(d) => (d.clone(), d.join("blobs/sha256"), d.join(".diskkit-ingest")),
        Destination::Store(d) => (
            d.clone(),
            d.join("content/blobs/sha256"),
            d.join("content/ingest"),
        ),
    };
    create_dir(&blobs_dir)?;
    create_dir(&ingest)?;
    if let Destination::Layout(d) = dest {
        let marker = d.join("oci-layout");
        if !marker.exists() {
            fsutil::write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#, false)?;
        }
    }
    // Documents: a layout holds the chosen manifest (as skopeo writes one); a store holds
    // the whole chain from the root, which its state.json names.
    match dest {
        Destination::Layout(_) => {
            store_bytes(&blobs_dir, &last.digest, &last.bytes)?;
        }
        Destination::Store(_) => {
            for d in &docs {
                store_bytes(&blobs_dir, &d.digest, &d.bytes)?;
            }
        }
    }
    let mut blobs: Vec<Descriptor> = Vec::new();
    for d in std::iter::once(&manifest.config).chain(manifest.layers.iter()) {
        if !blobs.iter().any(|b| b.digest == d.digest) {
            blobs.push(d.clone());
        }
    }
    let (fetched, bytes_fetched) = fetch_all(registry, &blobs, &blobs_dir, &ingest, events)?;
    if options.platform.is_some() && docs.len() == 1 {
        check_config_platform(&blobs_dir.join(manifest.config.hex()), &platform)?;
    }
    match dest {
        Destination::Layout(d) => {
            let _ = std::fs::remove_dir(&ingest);
            add_to_index(d, &manifest_desc, options.ref_name.as_deref())?;
        }
        Destination::Store(d) => {
            add_to_state(
                d,
                &reference
                    .with_manifest(reference.tag.as_deref(), reference.digest.as_deref())
                    .to_string(),
                &root_desc,
            )?;
        }
    }
    Ok(PullReport {
        manifest_digest: manifest_desc.digest.clone(),
        manifest: manifest_desc,
        root_digest,
        platform: chosen_platform,
        blobs: blobs.len(),
        fetched,
        bytes_fetched,
        bytes_total: blobs.iter().map(|b| b.size).sum(),
        path: root_dir,
    })
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Name `desc` in the layout's `index.json` (replacing an entry of the same name, or the
/// same unnamed digest), keeping whatever else the file holds.
pub fn add_to_index(layout: &Path, desc: &Descriptor, ref_name: Option<&str>) -> Result<()> {
    let path = layout.join("index.json");
    let mut index: Value = match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            Error::new(ErrorKind::InvalidArgument, "index.json of the layout is not JSON")
                .with_path(&path)
                .with_source(e)
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => json!({"schemaVersion": 2, "manifests": []}),
        Err(e) => return Err(Error::io_while(e, "reading index.json").with_path(&path)),
    };
    let Some(obj) = index.as_object_mut() else {
        return Err(
            Error::new(ErrorKind::InvalidArgument, "index.json is not a JSON object").with_path(&path),
        );
    };
    obj.entry("schemaVersion").or_insert(json!(2));
    let manifests = obj.entry("manifests").or_insert(json!([]));
    let Some(list) = manifests.as_array_mut() else {
        return Err(
            Error::new(ErrorKind::InvalidArgument, "index.json's manifests is not a list").with_path(&path),
        );
    };
    list.retain(|m| {
        let name = m
            .pointer("/annotations/org.opencontainers.image.ref.name")
            .and_then(Value::as_str);
        match ref_name {
            Some(r) => name != Some(r),
            None => !(name.is_none() && m.get("digest").and_then(Value::as_str) == Some(&desc.digest)),
        }
    });
    let mut entry = desc.clone();
    entry.annotations.clear();
    if let Some(r) = ref_name {
        entry.annotations.insert(REF_NAME.to_string(), r.to_string());
    }
    list.push(serde_json::to_value(&entry).map_err(|e| Error::invalid_argument(e.to_string()))?);
    let bytes = serde_json::to_vec(&index).map_err(|e| Error::invalid_argument(e.to_string()))?;
    fsutil::write_atomic(&path, &bytes, false)
}

/// Record `reference` → `desc` in a store's `state.json`, keeping the other entries.
pub fn add_to_state(store: &Path, reference: &str, desc: &Descriptor) -> Result<()> {
    let path = store.join("state.json");
    let mut state: Value = match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            Error::new(ErrorKind::InvalidArgument, "state.json of the store is not JSON")
                .with_path(&path)
                .with_source(e)
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => json!({}),
        Err(e) => return Err(Error::io_while(e, "reading state.json").with_path(&path)),
    };
    let Some(obj) = state.as_object_mut() else {
        return Err(
            Error::new(ErrorKind::InvalidArgument, "state.json is not a JSON object").with_path(&path),
        );
    };
    let mut d = desc.clone();
    d.annotations.clear();
    obj.insert(
        reference.to_string(),
        serde_json::to_value(&d).map_err(|e| Error::invalid_argument(e.to_string()))?,
    );
    let bytes = serde_json::to_vec(&state).map_err(|e| Error::invalid_argument(e.to_string()))?;
    fsutil::write_atomic(&path, &bytes, false)
}
