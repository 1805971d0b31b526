//! Making a cache layer over a remote base, and filling it ahead of use.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use diskkit::{CreateOptions, DiskImage, ExtentKind, ImageFormat, LayerInfo, LayerType, OpenOptions};
use sha2::{Digest, Sha256};

use super::identity::{Identity, RemoteHint};
use super::object::RemoteObject;
use super::{open_object, RemoteOptions, RemoteStorage};
use crate::error::{Error, ErrorKind, Result};

/// The chunk size of ASIF cache layers over remote bases, and so their unit of filling (see
/// [`super::RemoteOptions::fetch_unit`]): a cold 4 KiB read fetches and stores 64 KiB. With
/// 1 MiB chunks a cold random read took 3.3x as long (the whole chunk is fetched, copied,
/// checked for zeroes and written before the read is answered) and a first sequential read
/// 1.4x as long; smaller fills into 1 MiB chunks would leave chunks partly filled, their
/// zeroes stored as punched data rather than as zero chunks (warm reads 1.8x slower).
/// Measured in `docs/benchmarks.md`.
pub const CACHE_CHUNK_SIZE: u32 = 64 << 10;

/// The largest disk whose cache layer gets [`CACHE_CHUNK_SIZE`] chunks.
pub const SMALL_CHUNKS_UP_TO: u64 = 1 << 40;

/// How to make a cache layer over a remote base.
#[derive(Debug, Clone)]
pub struct CacheLayerOptions {
    /// The cache layer's format (ASIF or qcow2; ASIF by default).
    pub format: ImageFormat,
    /// The ASIF chunk size; `None`: [`CACHE_CHUNK_SIZE`], or the format's default (1 MiB)
    /// for disks over [`SMALL_CHUNKS_UP_TO`] (an ASIF with 64 KiB chunks holds at most
    /// about 1.5 TiB).
    pub chunk_size: Option<u32>,
    /// The base's format, when it should not be detected.
    pub base_format: Option<ImageFormat>,
    /// The SHA-256 the remote object must have (64 hex digits): checked now by reading the
    /// whole object once, and recorded.
    pub sha256: Option<String>,
    /// Replace an existing file.
    pub overwrite: bool,
}

impl Default for CacheLayerOptions {
    fn default() -> Self {
        CacheLayerOptions {
            format: ImageFormat::Asif,
            chunk_size: None,
            base_format: None,
            sha256: None,
            overwrite: false,
        }
    }
}

/// What [`create_cache_layer`] made.
#[derive(Debug, Clone)]
pub struct CreatedCache {
    /// The remote object's identity, as recorded.
    pub identity: Identity,
    /// The base image's format.
    pub base_format: ImageFormat,
    /// The virtual disk's size.
    pub size: u64,
}

/// Make a cache layer at `path` over the image at `url`, recording the URL and the object's
/// identity. The file appears complete or not at all.
pub fn create_cache_layer(
    path: &Path,
    url: &str,
    options: &RemoteOptions,
    layer: &CacheLayerOptions,
) -> Result<CreatedCache> {
    if url.contains('#') {
        return Err(Error::invalid_argument(format!(
            "'{url}': a remote base URL cannot have a fragment"
        )));
    }
    let object = open_object(url, options)?;
    let mut identity = object.stat()?;
    if let Some(want) = &layer.sha256 {
        let want = want.to_ascii_lowercase();
        if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid_argument(format!(
                "'{want}' is not a SHA-256 (64 hex digits)"
            )));
        }
        let got = hash_object(&object, options.max_request, &identity)?;
        if got != want {
            return Err(Error::new(
                ErrorKind::DigestMismatch,
                format!("{url} has SHA-256 {got}, not the {want} given"),
            ));
        }
        identity.sha256 = Some(want);
    } else if !identity.has_validator() {
        return Err(Error::invalid_argument(format!(
            "{url}: the server sends neither a strong ETag nor Last-Modified, so a changed object \
             could not be told apart; give its SHA-256 (--parent-sha256) to pin the content"
        )));
    }
    let storage = Arc::new(RemoteStorage::new(object, identity.clone(), options));
    let mut open = OpenOptions::new();
    if let Some(f) = layer.base_format {
        open = open.format(f);
    }
    let base = DiskImage::open_storage(storage, &open)
        .map_err(|e| Error::image(e, format!("{url} cannot be opened as a disk image")))?;
    let create = CreateOptions::new(layer.format, base.size())
        .block_size(base.block_size())
        .chunk_size(layer.chunk_size.unwrap_or(if base.size() <= SMALL_CHUNKS_UP_TO {
            CACHE_CHUNK_SIZE
        } else {
            diskkit::formats::DEFAULT_CHUNK_SIZE
        }))
        .overwrite(layer.overwrite);
    let pending = DiskImage::create_pending(path, &create)
        .map_err(|e| Error::image(e, "cannot create the cache layer").with_path(path))?;
    let hint = RemoteHint {
        url: url.to_string(),
        identity: identity.clone(),
    };
    let info = LayerInfo {
        layer_type: Some(LayerType::Cache),
        parent_uuid: base.layer_uuid(),
        parent_path: Some(hint.to_hint()),
        parent_format: Some(base.format()),
        ..LayerInfo::default()
    };
    pending
        .image()
        .top_layer()
        .set_layer_info(&info)
        .and_then(|()| pending.persist())
        .map_err(|e| Error::image(e, "cannot write the cache layer").with_path(path))?;
    Ok(CreatedCache {
        identity,
        base_format: base.format(),
        size: base.size(),
    })
}

/// Read the whole object (the version `identity` names) and return its SHA-256 in hex.
///
/// One pass of range requests, so S3 signing, retries and the version check apply.
fn hash_object(object: &RemoteObject, max_request: u64, identity: &Identity) -> Result<String> {
    let mut hasher = Sha256::new();
    let piece = max_request.max(1 << 20);
    let mut buf = vec![0u8; piece as usize];
    let mut pos = 0u64;
    while pos < identity.size {
        let n = piece.min(identity.size - pos) as usize;
        object.read_range(&mut buf[..n], pos, identity)?;
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// What [`prefetch`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefetchStats {
    /// Bytes of the virtual disk that were not in the cache and were read into it.
    pub filled: u64,
    /// Bytes that were already cached (or above the cache, or known zero).
    pub skipped: u64,
}

/// Fill the cache layer of `image` with everything it does not hold yet, in disk order, with
/// `threads` readers; `progress(done, total)` is called as pieces complete. Resumable: what is
/// cached is never read again, so an interrupted prefetch continues where it stopped. The cache
/// layer must be open for writing (it is, as a parent, unless another process uses it; as the
/// top, open the image writable).
pub fn prefetch(
    image: &DiskImage,
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<PrefetchStats> {
    let types = image.layer_types();
    let cache = types
        .iter()
        .position(|t| *t == Some(LayerType::Cache))
        .ok_or_else(|| Error::invalid_argument("the image has no cache layer to fill"))?;
    let layers = image
        .describe_layers()
        .map_err(|e| Error::image(e, "cannot describe the layers"))?;
    // `describe_layers` is top first.
    if !layers[layers.len() - 1 - cache].writable {
        return Err(Error::new(
            ErrorKind::InUse,
            "the cache layer cannot be filled: it is open read-only (another process may be using it)",
        ));
    }
    let cache_depth = (types.len() - cache) as u32;
    let size = image.size();
    let mut todo: Vec<(u64, u64)> = Vec::new();
    let mut skipped = 0u64;
    image
        .for_each_extent(0, size, |e| {
            if e.kind == ExtentKind::Data && e.depth > cache_depth {
                match todo.last_mut() {
                    Some((s, l)) if *s + *l == e.offset => *l += e.length,
                    _ => todo.push((e.offset, e.length)),
                }
            } else {
                skipped += e.length;
            }
            Ok(())
        })
        .map_err(|e| Error::image(e, "cannot map the image"))?;
    const PIECE: u64 = 4 << 20;
    let pieces: Vec<(u64, u64)> = todo
        .iter()
        .flat_map(|&(s, l)| {
            let end = s + l;
            let mut v = Vec::new();
            let mut p = s;
            while p < end {
                let next = ((p / PIECE) + 1) * PIECE;
                let n = next.min(end) - p;
                v.push((p, n));
                p += n;
            }
            v
        })
        .collect();
    let total: u64 = pieces.iter().map(|p| p.1).sum();
    let done = AtomicU64::new(0);
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    progress(0, total);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, 64) {
            s.spawn(|| {
                let mut buf = vec![0u8; PIECE as usize];
                loop {
                    if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(off, len)) = pieces.get(i) else { return };
                    if let Err(e) = image.read_at(&mut buf[..len as usize], off) {
                        if let Ok(mut f) = failure.lock() {
                            f.get_or_insert(Error::image(e, "prefetch failed"));
                        }
                        return;
                    }
                    let d = done.fetch_add(len, Ordering::Relaxed) + len;
                    // Record progress durably now and then, so an interrupted prefetch keeps it.
                    if d / (256 << 20) != (d - len) / (256 << 20) {
                        let _ = image.flush();
                    }
                    progress(d, total);
                }
            });
        }
    });
    let flushed = image
        .flush()
        .map_err(|e| Error::image(e, "cannot flush the cache layer"));
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    flushed?;
    Ok(PrefetchStats {
        filled: done.into_inner(),
        skipped,
    })
}
