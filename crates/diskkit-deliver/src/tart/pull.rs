//! Pulling a disk: slices downloaded and decoded in parallel into the new image, zero
//! slices skipped, both digests of every slice checked.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use diskkit::{CreateOptions, DiskImage, ImageFormat, OpenOptions};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{
    is_zero, lz4, zero_digest, DiskFormat, BUF, CONFIG_MEDIA_TYPE, DISK_FORMAT_LABEL, DISK_MEDIA_TYPE,
    LEGACY_DISK_MEDIA_TYPE, MAX_DISK, MAX_SLICE, NVRAM_MEDIA_TYPE, UNCOMPRESSED_CONTENT_DIGEST,
    UNCOMPRESSED_DISK_SIZE, UNCOMPRESSED_SIZE, ZERO_GRANULE,
};
use crate::error::{Error, ErrorKind, Result};
use crate::fsutil::{self, Cleanup};
use crate::registry::manifest::{self, Descriptor, Document, Manifest};
use crate::registry::{BlobEvent, Registry};

/// How to pull a disk.
#[derive(Debug, Clone, Default)]
pub struct DiskPullOptions {
    /// The output's format; `None`: from the extension of the output (`.asif`, `.qcow2`,
    /// `.raw`, `.img`), else the artifact's own (`raw` or `asif`).
    pub format: Option<ImageFormat>,
    /// Replace an existing output.
    pub overwrite: bool,
    /// Also write the nvram layer here, when the artifact has one.
    pub nvram: Option<PathBuf>,
    /// Also write the VM's tart config.json here.
    pub vm_config: Option<PathBuf>,
}

/// What a disk pull did.
#[derive(Debug, Clone, Default)]
pub struct DiskPullReport {
    /// The manifest digest.
    pub digest: String,
    /// The artifact's disk format.
    pub disk_format: Option<DiskFormat>,
    /// The output's format.
    pub format: Option<ImageFormat>,
    /// The disk (file) size the artifact describes.
    pub disk_size: u64,
    /// Slices.
    pub slices: usize,
    /// All-zero slices (not downloaded).
    pub zero_slices: usize,
    /// Compressed bytes downloaded.
    pub bytes_downloaded: u64,
    /// Bytes written to the output (no zero data is written).
    pub bytes_written: u64,
}

/// One slice to fetch.
struct SliceRef {
    desc: Descriptor,
    offset: u64,
    len: u64,
    content: String,
}

/// An artifact's layout: disk format, slices, disk size, config and nvram descriptors.
type Layout = (
    DiskFormat,
    Vec<SliceRef>,
    u64,
    Option<Descriptor>,
    Option<Descriptor>,
);

/// Read the artifact's layout: disk format, slices with their offsets, config and nvram.
fn read_layout(registry: &Registry, m: &Manifest) -> Result<Layout> {
    let bad = |msg: String| Error::new(ErrorKind::InvalidArtifact, msg);
    if m.layers.iter().any(|l| l.media_type == LEGACY_DISK_MEDIA_TYPE) {
        return Err(bad(format!(
            "{} uses tart's old disk layer type ({LEGACY_DISK_MEDIA_TYPE}), which tart itself no longer reads; re-push it with a current tart",
            registry.reference()
        )));
    }
    let configs: Vec<&Descriptor> = m
        .layers
        .iter()
        .filter(|l| l.media_type == CONFIG_MEDIA_TYPE)
        .collect();
    let nvrams: Vec<&Descriptor> = m
        .layers
        .iter()
        .filter(|l| l.media_type == NVRAM_MEDIA_TYPE)
        .collect();
    let disks: Vec<&Descriptor> = m
        .layers
        .iter()
        .filter(|l| l.media_type == DISK_MEDIA_TYPE)
        .collect();
    if disks.is_empty() {
        return Err(bad(format!(
            "{} is not a VM disk in tart's layout (no {DISK_MEDIA_TYPE} layers); use --layout or --store for container images",
            registry.reference()
        )));
    }
    if configs.len() > 1 || nvrams.len() > 1 {
        return Err(bad("the artifact has more than one config or nvram layer".into()));
    }
    // The disk format: the stub config's label, else the VM config's diskFormat.
    let mut format = None;
    if m.config.size <= 1 << 20 {
        let cfg = fetch_small(registry, &m.config)?;
        let v: Value = serde_json::from_slice(&cfg).unwrap_or(Value::Null);
        format = v
            .pointer(&format!(
                "/config/Labels/{}",
                DISK_FORMAT_LABEL.replace('/', "~1")
            ))
            .and_then(Value::as_str)
            .map(str::to_string);
    }
    if format.is_none() {
        if let Some(c) = configs.first() {
            if c.size <= 1 << 20 {
                let v: Value = serde_json::from_slice(&fetch_small(registry, c)?).unwrap_or(Value::Null);
                format = v.get("diskFormat").and_then(Value::as_str).map(str::to_string);
            }
        }
    }
    let format = match format.as_deref() {
        None | Some("raw") => DiskFormat::Raw,
        Some("asif") => DiskFormat::Asif,
        Some(other) => {
            return Err(bad(format!(
                "unknown disk format '{}' (tart knows raw and asif)",
                other.chars().take(40).collect::<String>().escape_default()
            )))
        }
    };
    let mut slices = Vec::new();
    let mut offset = 0u64;
    for (i, d) in disks.iter().enumerate() {
        let len: u64 = d
            .annotations
            .get(UNCOMPRESSED_SIZE)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                bad(format!(
                    "disk layer {} lacks a valid {UNCOMPRESSED_SIZE} annotation",
                    i + 1
                ))
            })?;
        let content = d
            .annotations
            .get(UNCOMPRESSED_CONTENT_DIGEST)
            .cloned()
            .ok_or_else(|| {
                bad(format!(
                    "disk layer {} lacks its {UNCOMPRESSED_CONTENT_DIGEST} annotation",
                    i + 1
                ))
            })?;
        crate::registry::reference::check_digest(&content)
            .map_err(|e| bad(format!("disk layer {}: {}", i + 1, e.message().unwrap_or(""))))?;
        if len == 0 || len > MAX_SLICE {
            return Err(bad(format!("disk layer {} claims {len} bytes", i + 1)));
        }
        slices.push(SliceRef {
            desc: (*d).clone(),
            offset,
            len,
            content,
        });
        offset = offset
            .checked_add(len)
            .filter(|t| *t <= MAX_DISK)
            .ok_or_else(|| bad("the disk is larger than 64 TiB".into()))?;
    }
    if let Some(s) = m.annotations.get(UNCOMPRESSED_DISK_SIZE) {
        if s.parse::<u64>().ok() != Some(offset) {
            return Err(bad(format!(
                "the slices add up to {offset} bytes, but the manifest says the disk is {} bytes",
                s.chars().take(30).collect::<String>().escape_default()
            )));
        }
    }
    Ok((
        format,
        slices,
        offset,
        configs.first().map(|d| (*d).clone()),
        nvrams.first().map(|d| (*d).clone()),
    ))
}

/// Fetch a small blob into memory and check it.
fn fetch_small(registry: &Registry, d: &Descriptor) -> Result<Vec<u8>> {
    d.validate("blob")?;
    let mut resp = registry.open_blob(&d.digest, 0)?;
    let url = registry.blob_url(&d.digest);
    let bytes = resp.read_limited(d.size.min(64 << 20), &url)?;
    if manifest::sha256_digest(&bytes) != d.digest {
        return Err(Error::new(
            ErrorKind::DigestMismatch,
            format!("blob {} is refused: its bytes do not match its digest", d.digest),
        ));
    }
    Ok(bytes)
}

/// A blob as a stream that resumes with a ranged GET when the connection breaks, and
/// hashes what it passes on.
struct ResumingBlob<'a> {
    registry: &'a Registry,
    digest: String,
    size: u64,
    resp: Option<crate::http::Response>,
    pos: u64,
    hash: Sha256,
    failures: u32,
}

impl Read for ResumingBlob<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.pos >= self.size {
                return Ok(0);
            }
            if self.resp.is_none() {
                match self.registry.open_blob(&self.digest, self.pos) {
                    Ok(r) => self.resp = Some(r),
                    Err(e)
                        if e.kind() == ErrorKind::Network
                            && self.failures + 1 < self.registry.options().http.retry.attempts =>
                    {
                        self.failures += 1;
                        std::thread::sleep(self.registry.options().http.retry.backoff(self.failures));
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let want = buf
                .len()
                .min((self.size - self.pos).min(usize::MAX as u64) as usize);
            let r = self.resp.as_mut().map(|r| r.body().read(&mut buf[..want]));
            match r {
                Some(Ok(0)) | Some(Err(_)) => {
                    // Cut short: resume from here.
                    self.resp = None;
                    self.failures += 1;
                    if self.failures >= self.registry.options().http.retry.attempts.max(1) {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            format!(
                                "blob {}: transfer interrupted {} times",
                                self.digest, self.failures
                            ),
                        ));
                    }
                }
                Some(Ok(n)) => {
                    self.hash.update(&buf[..n]);
                    self.pos += n as u64;
                    self.failures = 0;
                    return Ok(n);
                }
                None => {}
            }
        }
    }
}

/// Where decoded slices go.
enum Sink {
    /// A disk image being built (RAW, ASIF or qcow2 of the virtual disk).
    Image(DiskImage),
    /// The ASIF file itself (an `asif` artifact).
    File(File),
}

impl Sink {
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Sink::Image(i) => i
                .write_at(buf, offset)
                .map_err(|e| Error::image(e, "writing the disk")),
            Sink::File(f) => f
                .write_all_at(buf, offset)
                .map_err(|e| Error::io_while(e, "writing the disk")),
        }
    }
}

/// Decode slice `s` into `sink`, writing only non-zero 4 KiB runs; checks both digests.
/// Returns (compressed bytes downloaded, bytes written).
fn pull_slice(registry: &Registry, s: &SliceRef, sink: &Sink, progress: &dyn Fn(u64)) -> Result<(u64, u64)> {
    let blob = ResumingBlob {
        registry,
        digest: s.desc.digest.clone(),
        size: s.desc.size,
        resp: None,
        pos: 0,
        hash: Sha256::new(),
        failures: 0,
    };
    let mut dec = lz4::Decoder::new(blob);
    let mut content = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let mut done = 0u64;
    let mut written = 0u64;
    let corrupt = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            Error::new(
                ErrorKind::InvalidArtifact,
                format!("disk layer {} does not decompress: {e}", s.desc.digest),
            )
        } else {
            Error::new(ErrorKind::Network, format!("disk layer {}: {e}", s.desc.digest)).with_source(e)
        }
    };
    loop {
        // Fill the buffer (blocks are small; a full buffer keeps writes large).
        let mut n = 0;
        while n < BUF {
            let k = dec.read(&mut buf[n..]).map_err(corrupt)?;
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            break;
        }
        if done + n as u64 > s.len {
            return Err(Error::new(
                ErrorKind::InvalidArtifact,
                format!(
                    "disk layer {} decompresses to more than its {} bytes",
                    s.desc.digest, s.len
                ),
            ));
        }
        content.update(&buf[..n]);
        // Write the non-zero runs, at 4 KiB granularity.
        let mut i = 0;
        while i < n {
            let g = ZERO_GRANULE.min(n - i);
            if is_zero(&buf[i..i + g]) {
                i += g;
                continue;
            }
            let start = i;
            while i < n {
                let g = ZERO_GRANULE.min(n - i);
                if is_zero(&buf[i..i + g]) {
                    break;
                }
                i += g;
            }
            sink.write_at(&buf[start..i], s.offset + done + start as u64)?;
            written += (i - start) as u64;
        }
        done += n as u64;
        progress(done);
    }
    let blob = dec.finish().map_err(corrupt)?;
    let got = format!("sha256:{:x}", blob.hash.clone().finalize());
    if blob.pos != s.desc.size || got != s.desc.digest {
        return Err(Error::new(
            ErrorKind::DigestMismatch,
            format!(
                "disk layer {} is refused: the bytes received do not match its digest ({got})",
                s.desc.digest
            ),
        ));
    }
    let content = format!("sha256:{:x}", content.finalize());
    if done != s.len || content != s.content {
        return Err(Error::new(
            ErrorKind::DigestMismatch,
            format!(
                "disk layer {} decompresses to {done} bytes with digest {content}, not the {} bytes and {} its annotations give",
                s.desc.digest, s.len, s.content
            ),
        ));
    }
    Ok((s.desc.size, written))
}

/// The format an output path asks for by its extension.
pub fn format_from_extension(path: &Path) -> Option<ImageFormat> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("asif") => Some(ImageFormat::Asif),
        Some("qcow2") => Some(ImageFormat::Qcow2),
        Some("raw") | Some("img") => Some(ImageFormat::Raw),
        _ => None,
    }
}

/// Pull the VM disk `registry`'s reference names into a new image at `out`.
pub fn pull_disk(
    registry: &Registry,
    out: &Path,
    options: &DiskPullOptions,
    events: &(dyn Fn(BlobEvent<'_>) + Sync),
) -> Result<DiskPullReport> {
    let reference = registry.reference().clone();
    let fetched = registry.get_manifest(reference.manifest_reference(), None)?;
    let m = match &fetched.document {
        Document::Manifest(m) => m.clone(),
        Document::Index(_) => {
            return Err(Error::new(
                ErrorKind::InvalidArtifact,
                format!("{reference} is an index of container images, not a VM disk in tart's layout"),
            ))
        }
    };
    let (disk_format, slices, size, vm_config, nvram) = read_layout(registry, &m)?;
    let native = match disk_format {
        DiskFormat::Raw => ImageFormat::Raw,
        DiskFormat::Asif => ImageFormat::Asif,
    };
    let format = options
        .format
        .or_else(|| format_from_extension(out))
        .unwrap_or(native);
    if !options.overwrite && out.exists() {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!("'{}' exists (--force replaces it)", out.display()),
        ));
    }
    // Build under a temporary name next to the output.
    let tmp = fsutil::temp_sibling(out)?;
    let guard = Cleanup::new(&tmp);
    let direct_file = disk_format == DiskFormat::Asif;
    let sink = if direct_file {
        // The slices are an ASIF file: reassemble it as a sparse file first.
        let target = if format == ImageFormat::Asif {
            tmp.clone()
        } else {
            tmp.with_extension("asif-part")
        };
        let f = FsOpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(|e| Error::io_while(e, "creating the disk").with_path(&target))?;
        f.set_len(size)
            .map_err(|e| Error::io_while(e, "sizing the disk").with_path(&target))?;
        Sink::File(f)
    } else {
        let vsize = if format == ImageFormat::Raw {
            size
        } else {
            size.div_ceil(512) * 512
        };
        let create = match format {
            ImageFormat::Asif => CreateOptions::asif(vsize / 512, 512),
            f => CreateOptions::new(f, vsize),
        };
        let img = DiskImage::create(&tmp, &create)
            .map_err(|e| Error::image(e, "creating the disk").with_path(&tmp))?;
        Sink::Image(img)
    };
    let part_guard =
        (direct_file && format != ImageFormat::Asif).then(|| Cleanup::new(tmp.with_extension("asif-part")));
    let zero_slices = slices.iter().filter(|s| s.content == zero_digest(s.len)).count();
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let next = AtomicU64::new(0);
    let downloaded = AtomicU64::new(0);
    let written = AtomicU64::new(0);
    let workers = registry.options().jobs.clamp(1, 16).min(slices.len());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(s) = slices.get(i) else { break };
                let name = format!("slice {}/{}", i + 1, slices.len());
                if s.content == zero_digest(s.len) {
                    events(BlobEvent::Done {
                        digest: &name,
                        size: s.len,
                        fetched: false,
                    });
                    continue;
                }
                events(BlobEvent::Start {
                    digest: &name,
                    size: s.len,
                    from: 0,
                });
                match pull_slice(registry, s, &sink, &|done| {
                    events(BlobEvent::Progress {
                        digest: &name,
                        done,
                        size: s.len,
                    })
                }) {
                    Ok((d, w)) => {
                        downloaded.fetch_add(d, Ordering::Relaxed);
                        written.fetch_add(w, Ordering::Relaxed);
                        events(BlobEvent::Done {
                            digest: &name,
                            size: s.len,
                            fetched: true,
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
    match sink {
        Sink::Image(img) => {
            img.flush().map_err(|e| Error::image(e, "writing the disk"))?;
        }
        Sink::File(f) => {
            drop(f);
            let part = if format == ImageFormat::Asif {
                tmp.clone()
            } else {
                tmp.with_extension("asif-part")
            };
            // It must be a valid ASIF image.
            let asif =
                DiskImage::open(&part, &OpenOptions::new().format(ImageFormat::Asif)).map_err(|e| {
                    Error::new(
                        ErrorKind::InvalidArtifact,
                        "the reassembled disk is not a valid ASIF image",
                    )
                    .with_source(e)
                })?;
            if format != ImageFormat::Asif {
                let create = match format {
                    ImageFormat::Raw => CreateOptions::raw(asif.size()),
                    f => CreateOptions::new(f, asif.size()),
                };
                let img = DiskImage::create(&tmp, &create)
                    .map_err(|e| Error::image(e, "creating the disk").with_path(&tmp))?;
                diskkit::copy::copy(&asif, &img, &mut |_| {})
                    .map_err(|e| Error::image(e, "converting the disk"))?;
                img.flush().map_err(|e| Error::image(e, "writing the disk"))?;
            }
        }
    }
    drop(part_guard);
    let side = |d: &Option<Descriptor>, to: &Option<PathBuf>| -> Result<()> {
        if let (Some(d), Some(to)) = (d, to) {
            let bytes = fetch_small(registry, d)?;
            fsutil::write_atomic(to, &bytes, false)?;
        }
        Ok(())
    };
    side(&nvram, &options.nvram)?;
    side(&vm_config, &options.vm_config)?;
    if options.nvram.is_some() && nvram.is_none() {
        return Err(Error::new(ErrorKind::NotFound, "the artifact has no nvram layer"));
    }
    std::fs::rename(&tmp, out)
        .map_err(|e| Error::io_while(e, "renaming the disk into place").with_path(out))?;
    guard.keep();
    Ok(DiskPullReport {
        digest: fetched.digest,
        disk_format: Some(disk_format),
        format: Some(format),
        disk_size: size,
        slices: slices.len(),
        zero_slices,
        bytes_downloaded: downloaded.into_inner(),
        bytes_written: written.into_inner(),
    })
}
