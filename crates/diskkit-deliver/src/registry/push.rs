//! Pushing an image from an OCI layout to a registry: blobs first (in parallel, skipped
//! when the registry has them), then the manifests by digest, then the root by tag.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde_json::Value;

use super::blob::BlobEvent;
use super::client::{Payload, Registry};
use super::manifest::{self, Descriptor, Document};
use crate::error::{Error, ErrorKind, Result};

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushReport {
    /// The digest of the manifest (or index) pushed under the tag.
    pub digest: String,
    /// Blobs of the image.
    pub blobs: usize,
    /// Of those, how many were uploaded (the registry had the rest).
    pub uploaded: usize,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
    /// Bytes of all blobs.
    pub bytes_total: u64,
}

fn read_doc(layout: &Path, d: &Descriptor) -> Result<(Vec<u8>, Document)> {
    d.validate("manifest")?;
    let path = layout.join("blobs/sha256").join(d.hex());
    let bytes =
        std::fs::read(&path).map_err(|e| Error::io_while(e, "reading a manifest").with_path(&path))?;
    if manifest::sha256_digest(&bytes) != d.digest {
        return Err(Error::new(
            ErrorKind::DigestMismatch,
            format!("blob {} of the layout is damaged", d.digest),
        )
        .with_path(&path));
    }
    let (_, doc) = manifest::parse(&bytes, None, Some(&d.media_type))?;
    Ok((bytes, doc))
}

/// Choose the image of the layout named `name` (a `ref.name` annotation or a digest), or
/// its only image.
fn choose(layout: &Path, name: Option<&str>) -> Result<Descriptor> {
    let path = layout.join("index.json");
    let bytes =
        std::fs::read(&path).map_err(|e| Error::io_while(e, "reading index.json").with_path(&path))?;
    let index: Value = serde_json::from_slice(&bytes).map_err(|e| {
        Error::new(ErrorKind::InvalidArgument, "index.json is not JSON")
            .with_path(&path)
            .with_source(e)
    })?;
    let list: Vec<Descriptor> = index
        .get("manifests")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| Error::new(ErrorKind::InvalidArgument, format!("index.json: {e}")).with_path(&path))?
        .unwrap_or_default();
    let names = || {
        list.iter()
            .filter_map(|d| d.annotations.get("org.opencontainers.image.ref.name").cloned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let found: Vec<&Descriptor> = match name {
        Some(n) if n.starts_with("sha256:") => list.iter().filter(|d| d.digest == n).collect(),
        Some(n) => list
            .iter()
            .filter(|d| {
                d.annotations
                    .get("org.opencontainers.image.ref.name")
                    .map(String::as_str)
                    == Some(n)
            })
            .collect(),
        None => list.iter().collect(),
    };
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "no image {} in the layout (names: {})",
                name.unwrap_or(""),
                names()
            ),
        )
        .with_path(layout)),
        _ => Err(Error::invalid_argument(format!(
            "the layout holds several images; name one as LAYOUT:NAME (names: {})",
            names()
        ))
        .with_path(layout)),
    }
}

/// Upload `blobs` (files of the layout) `jobs` at a time.
pub(crate) fn upload_all(
    registry: &Registry,
    blobs: &[(Descriptor, PathBuf)],
    events: &(dyn Fn(BlobEvent<'_>) + Sync),
) -> Result<(usize, u64)> {
    let queue: Mutex<VecDeque<&(Descriptor, PathBuf)>> = Mutex::new(blobs.iter().collect());
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let done = Mutex::new((0usize, 0u64));
    let workers = registry.options().jobs.clamp(1, 64).min(blobs.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Some((d, path)) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else {
                    break;
                };
                events(BlobEvent::Start {
                    digest: &d.digest,
                    size: d.size,
                    from: 0,
                });
                let r = registry.upload_blob(
                    &d.digest,
                    d.size,
                    Payload::File {
                        path,
                        offset: 0,
                        len: d.size,
                    },
                );
                match r {
                    Ok(uploaded) => {
                        if uploaded {
                            let mut g = done.lock().unwrap_or_else(|e| e.into_inner());
                            g.0 += 1;
                            g.1 += d.size;
                        }
                        events(BlobEvent::Done {
                            digest: &d.digest,
                            size: d.size,
                            fetched: uploaded,
                        });
                    }
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
    Ok(done.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// Push the image of `layout` named `name` (or its only image) to the repository and tag
/// `registry` was connected for.
pub fn push_layout(
    registry: &Registry,
    layout: &Path,
    name: Option<&str>,
    events: &(dyn Fn(BlobEvent<'_>) + Sync),
) -> Result<PushReport> {
    let root = choose(layout, name)?;
    // Walk the documents: the root, and every manifest an index lists.
    let mut docs: Vec<(Descriptor, Vec<u8>)> = Vec::new();
    let mut blobs: Vec<(Descriptor, PathBuf)> = Vec::new();
    let mut todo = vec![root.clone()];
    while let Some(d) = todo.pop() {
        if docs.len() > 4096 {
            return Err(Error::new(
                ErrorKind::InvalidManifest,
                "the layout's index lists too many manifests",
            ));
        }
        let (bytes, doc) = read_doc(layout, &d)?;
        match doc {
            Document::Index(i) => todo.extend(i.manifests),
            Document::Manifest(m) => {
                for b in std::iter::once(&m.config).chain(m.layers.iter()) {
                    if blobs.iter().any(|(x, _)| x.digest == b.digest) {
                        continue;
                    }
                    let path = layout.join("blobs/sha256").join(b.hex());
                    let len = std::fs::metadata(&path)
                        .map_err(|e| Error::io_while(e, "reading a blob of the layout").with_path(&path))?
                        .len();
                    if len != b.size {
                        return Err(Error::new(
                            ErrorKind::DigestMismatch,
                            format!("blob {} of the layout is {len} bytes, not {}", b.digest, b.size),
                        )
                        .with_path(&path));
                    }
                    blobs.push((b.clone(), path));
                }
            }
        }
        docs.push((d, bytes));
    }
    let (uploaded, bytes_uploaded) = upload_all(registry, &blobs, events)?;
    // Children before parents: the root goes last, under the tag.
    for (d, bytes) in docs.iter().skip(1).rev() {
        registry.put_manifest(&d.digest, &d.media_type, bytes)?;
    }
    let reference = registry.reference();
    let target = reference.tag_or_latest().unwrap_or(&root.digest).to_string();
    let digest = registry.put_manifest(&target, &root.media_type, &docs[0].1)?;
    if let Some(d) = &reference.digest {
        if *d != digest {
            return Err(Error::new(
                ErrorKind::DigestMismatch,
                format!("the image's manifest is {digest}, not the {d} named"),
            ));
        }
    }
    Ok(PushReport {
        digest,
        blobs: blobs.len(),
        uploaded,
        bytes_uploaded,
        bytes_total: blobs.iter().map(|(d, _)| d.size).sum(),
    })
}
