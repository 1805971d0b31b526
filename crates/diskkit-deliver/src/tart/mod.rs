//! VM disks in OCI registries, in tart's layout, so that what diskkit pushes tart can pull
//! and the other way round.
//!
//! Checked against tart's source (cirruslabs/tart `Sources/tart/OCI/Manifest.swift`,
//! `Layerizer/DiskV2.swift`, `VMDirectory+OCI.swift`, 2026-05):
//! - an OCI image manifest whose config blob (`application/vnd.oci.image.config.v1+json`)
//!   is a stub image config with `architecture`, `os` and the label
//!   `org.cirruslabs.tart.disk.format` (`raw` or `asif`) in `config.Labels`; manifest
//!   annotations `org.cirruslabs.tart.uncompressed-disk-size` and
//!   `org.cirruslabs.tart.upload-time`;
//! - layers: one `application/vnd.cirruslabs.tart.config.v1` (the VM's `config.json`),
//!   then one `application/vnd.cirruslabs.tart.disk.v2` per 512 MiB slice of the disk
//!   *file* (the last one shorter), each compressed on its own with Apple's LZ4 framing
//!   ([`lz4`]) and annotated with `org.cirruslabs.tart.uncompressed-size` and
//!   `org.cirruslabs.tart.uncompressed-content-digest` (sha256 of the plain slice), then
//!   one `application/vnd.cirruslabs.tart.nvram.v1` (the EFI variable store). tart
//!   itself refuses the old `disk.v1` type, and needs exactly one config and one nvram
//!   layer to pull.
//! - With disk format `asif` the concatenated slices are an ASIF image file.
//!
//! diskkit pushes any image or stack: for `raw` the flattened virtual disk, for `asif` a
//! standalone ASIF file (the image itself when it is one, else the stack flattened into a
//! temporary one). It pulls into any format. All-zero slices cost almost nothing: they
//! are never read on push (the image's allocation map says they are holes), always encode
//! to the same small blob (so the registry stores and receives it once), and are not
//! downloaded on pull (their content digest is the digest of zeroes). A pull writes no zero
//! data, and checks every slice against both its digests before the disk appears under its
//! name.

pub mod lz4;

use std::collections::HashMap;
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use diskkit::{CreateOptions, DiskImage, ImageFormat, OpenOptions};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorKind, Result};
use crate::fsutil::{self, Cleanup};
use crate::registry::manifest::{self, Descriptor, Document, Manifest, OCI_CONFIG, OCI_MANIFEST};
use crate::registry::{BlobEvent, Payload, Registry};

/// The VM's config.json layer.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.cirruslabs.tart.config.v1";
/// A compressed disk slice.
pub const DISK_MEDIA_TYPE: &str = "application/vnd.cirruslabs.tart.disk.v2";
/// The old disk layer type, refused (as tart refuses it).
pub const LEGACY_DISK_MEDIA_TYPE: &str = "application/vnd.cirruslabs.tart.disk.v1";
/// The EFI variable store.
pub const NVRAM_MEDIA_TYPE: &str = "application/vnd.cirruslabs.tart.nvram.v1";
/// Manifest annotation: the disk's size.
pub const UNCOMPRESSED_DISK_SIZE: &str = "org.cirruslabs.tart.uncompressed-disk-size";
/// Manifest annotation: when it was pushed.
pub const UPLOAD_TIME: &str = "org.cirruslabs.tart.upload-time";
/// Config label: `raw` or `asif`.
pub const DISK_FORMAT_LABEL: &str = "org.cirruslabs.tart.disk.format";
/// Layer annotation: the slice's size.
pub const UNCOMPRESSED_SIZE: &str = "org.cirruslabs.tart.uncompressed-size";
/// Layer annotation: sha256 of the plain slice.
pub const UNCOMPRESSED_CONTENT_DIGEST: &str = "org.cirruslabs.tart.uncompressed-content-digest";
/// tart's slice size.
pub const SLICE: u64 = 512 << 20;
/// The largest slice accepted on pull.
const MAX_SLICE: u64 = 4 << 30;
/// The largest disk accepted on pull (64 TiB).
const MAX_DISK: u64 = 64 << 40;
/// Bytes read or written at a time.
const BUF: usize = 4 << 20;
/// Zero runs at least this long are not written.
const ZERO_GRANULE: usize = 4096;

/// Whether every byte of `b` is zero.
pub(crate) fn is_zero(b: &[u8]) -> bool {
    diskkit::copy::is_zero(b)
}

/// The disk format tart records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// A raw disk.
    Raw,
    /// An ASIF image file.
    Asif,
}

impl DiskFormat {
    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Asif => "asif",
        }
    }
}

/// `sha256:` of `len` zero bytes (memoised: most slices have the same size).
pub fn zero_digest(len: u64) -> String {
    static MEMO: OnceLock<Mutex<HashMap<u64, String>>> = OnceLock::new();
    let memo = MEMO.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(d) = memo.lock().unwrap_or_else(|e| e.into_inner()).get(&len) {
        return d.clone();
    }
    let zeros = vec![0u8; BUF];
    let mut h = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(BUF as u64) as usize;
        h.update(&zeros[..n]);
        left -= n as u64;
    }
    let d = format!("sha256:{:x}", h.finalize());
    memo.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(len, d.clone());
    d
}

/// How to push a disk.
#[derive(Debug, Clone)]
pub struct DiskPushOptions {
    /// `raw` or `asif`; `None`: `asif` when the image's top layer is ASIF, else `raw`.
    pub disk_format: Option<DiskFormat>,
    /// The VM's tart `config.json`; `None` writes a minimal Linux one.
    pub vm_config: Option<Vec<u8>>,
    /// The EFI variable store to push as the nvram layer (tart needs one to pull).
    pub nvram: Option<PathBuf>,
    /// OS and architecture for the stub config (`linux`, `arm64`).
    pub os: String,
    /// Architecture in OCI spelling.
    pub architecture: String,
    /// Slice size (tart's is 512 MiB; only tests change it).
    pub slice_size: u64,
    /// Where compressed slices wait for their upload.
    pub temp_dir: PathBuf,
}

impl Default for DiskPushOptions {
    fn default() -> Self {
        let arch = match std::env::consts::ARCH {
            "aarch64" => "arm64",
            _ => "amd64",
        };
        DiskPushOptions {
            disk_format: None,
            vm_config: None,
            nvram: None,
            os: "linux".into(),
            architecture: arch.into(),
            slice_size: SLICE,
            temp_dir: std::env::temp_dir(),
        }
    }
}

/// What a disk push did.
#[derive(Debug, Clone, Default)]
pub struct DiskPushReport {
    /// The manifest digest.
    pub digest: String,
    /// The disk format recorded.
    pub disk_format: Option<DiskFormat>,
    /// Bytes of the disk (file) pushed.
    pub disk_size: u64,
    /// Slices.
    pub slices: usize,
    /// Slices that were all zero.
    pub zero_slices: usize,
    /// Slices uploaded (the registry lacked them).
    pub uploaded: usize,
    /// Bytes uploaded (compressed), manifest and config included.
    pub bytes_uploaded: u64,
    /// Compressed bytes of all slices.
    pub bytes_compressed: u64,
}

/// Where slice bytes come from.
trait Source: Sync {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Whether `[offset, offset+len)` is known to read as zeroes.
    fn is_hole(&self, offset: u64, len: u64) -> Result<bool>;
    /// The data runs of `[offset, offset+len)` (others read as zeroes).
    fn data_runs(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>>;
}

struct ImageSource<'a>(&'a DiskImage);

impl Source for ImageSource<'_> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0
            .read_at(buf, offset)
            .map_err(|e| Error::image(e, "reading the disk"))
    }
    fn is_hole(&self, offset: u64, len: u64) -> Result<bool> {
        let mut hole = true;
        self.0
            .for_each_extent(offset, len, |e| {
                if !e.reads_as_zero() {
                    hole = false;
                }
                Ok(())
            })
            .map_err(|e| Error::image(e, "mapping the disk"))?;
        Ok(hole)
    }
    fn data_runs(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        self.0
            .for_each_extent(offset, len, |e| {
                if !e.reads_as_zero() {
                    match runs.last_mut() {
                        Some(l) if l.0 + l.1 == e.offset => l.1 += e.length,
                        _ => runs.push((e.offset, e.length)),
                    }
                }
                Ok(())
            })
            .map_err(|e| Error::image(e, "mapping the disk"))?;
        Ok(runs)
    }
}

struct FileSource {
    file: File,
    size: u64,
}

impl Source for FileSource {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io_while(e, "reading the disk"))
    }
    fn is_hole(&self, _offset: u64, _len: u64) -> Result<bool> {
        Ok(false)
    }
    fn data_runs(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        Ok(vec![(offset, len)])
    }
}

/// Compress one slice: returns (compressed digest, compressed length, content digest,
/// where the compressed bytes are).
enum Compressed {
    Memory(Vec<u8>),
    File(tempfile::NamedTempFile),
}

fn compress_slice(
    src: &dyn Source,
    offset: u64,
    len: u64,
    temp_dir: &Path,
    progress: &dyn Fn(u64),
) -> Result<(String, u64, String, Compressed, bool)> {
    if src.is_hole(offset, len)? {
        let bytes = zero_slice_encoding(len);
        progress(len);
        let digest = manifest::sha256_digest(&bytes);
        let n = bytes.len() as u64;
        return Ok((digest, n, zero_digest(len), Compressed::Memory(bytes), true));
    }
    let tmp = tempfile::Builder::new()
        .prefix(".diskkit-slice-")
        .tempfile_in(temp_dir)
        .map_err(|e| Error::io_while(e, "creating a temporary file for a slice").with_path(temp_dir))?;
    struct Hashing<W> {
        inner: W,
        hash: Sha256,
        len: u64,
    }
    impl<W: Write> Write for Hashing<W> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(b)?;
            self.hash.update(&b[..n]);
            self.len += n as u64;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
    let out = Hashing {
        inner: std::io::BufWriter::with_capacity(
            1 << 20,
            tmp.reopen()
                .map_err(|e| Error::io_while(e, "opening a temporary file"))?,
        ),
        hash: Sha256::new(),
        len: 0,
    };
    let mut enc = lz4::Encoder::new(out);
    let mut content = Sha256::new();
    let zeros = vec![0u8; BUF];
    let mut buf = vec![0u8; BUF];
    let io = |e: std::io::Error| Error::io_while(e, "compressing a slice");
    let runs = src.data_runs(offset, len)?;
    let mut pos = offset;
    let end = offset + len;
    let feed_zeros = |enc: &mut lz4::Encoder<_>, content: &mut Sha256, mut n: u64| -> Result<()> {
        while n > 0 {
            let k = n.min(BUF as u64) as usize;
            enc.write_all(&zeros[..k]).map_err(io)?;
            content.update(&zeros[..k]);
            n -= k as u64;
        }
        Ok(())
    };
    for (run_start, run_len) in runs {
        let run_end = (run_start + run_len).min(end);
        let run_start = run_start.max(pos);
        if run_start > pos {
            feed_zeros(&mut enc, &mut content, run_start - pos)?;
            pos = run_start;
            progress(pos - offset);
        }
        while pos < run_end {
            let k = (run_end - pos).min(BUF as u64) as usize;
            src.read_at(&mut buf[..k], pos)?;
            enc.write_all(&buf[..k]).map_err(io)?;
            content.update(&buf[..k]);
            pos += k as u64;
            progress(pos - offset);
        }
    }
    if pos < end {
        feed_zeros(&mut enc, &mut content, end - pos)?;
        progress(len);
    }
    let out = enc.finish().map_err(io)?;
    let digest = format!("sha256:{:x}", out.hash.finalize());
    let n = out.len;
    out.inner.into_inner().map_err(|e| io(e.into_error()))?;
    Ok((
        digest,
        n,
        format!("sha256:{:x}", content.finalize()),
        Compressed::File(tmp),
        false,
    ))
}

/// The encoding of an all-zero slice of `len` bytes (memoised).
fn zero_slice_encoding(len: u64) -> Vec<u8> {
    static MEMO: OnceLock<Mutex<HashMap<u64, Arc<Vec<u8>>>>> = OnceLock::new();
    let memo = MEMO.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(v) = memo.lock().unwrap_or_else(|e| e.into_inner()).get(&len) {
        return v.as_ref().clone();
    }
    let mut enc = lz4::Encoder::new(Vec::new());
    let zeros = vec![0u8; BUF];
    let mut left = len;
    while left > 0 {
        let k = left.min(BUF as u64) as usize;
        let _ = enc.write_all(&zeros[..k]);
        left -= k as u64;
    }
    let v = enc.finish().unwrap_or_default();
    memo.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(len, Arc::new(v.clone()));
    v
}

/// A random locally administered unicast MAC address.
fn random_mac() -> String {
    let b = uuid::Uuid::new_v4().into_bytes();
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        (b[0] & 0xfe) | 0x02,
        b[1],
        b[2],
        b[3],
        b[4],
        b[5]
    )
}

/// A minimal tart `config.json` for a Linux VM.
fn default_vm_config(os: &str, arch: &str, format: DiskFormat) -> Vec<u8> {
    let v = json!({
        "version": 1,
        "os": os,
        "arch": arch,
        "cpuCountMin": 2,
        "cpuCount": 2,
        "memorySizeMin": 4u64 << 30,
        "memorySize": 4u64 << 30,
        "macAddress": random_mac(),
        "display": {"width": 1024, "height": 768},
        "diskFormat": format.name(),
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

/// An RFC 3339 UTC time stamp of now (`2026-12-07T03:10:37Z`), as tart writes it.
fn now_iso() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Push the disk image (or stack) at `image` to the repository and tag `registry` was
/// connected for, in tart's layout.
pub fn push_disk(
    registry: &Registry,
    image: &Path,
    open: &OpenOptions,
    options: &DiskPushOptions,
    events: &(dyn Fn(BlobEvent<'_>) + Sync),
) -> Result<DiskPushReport> {
    let disk =
        DiskImage::open(image, open).map_err(|e| Error::image(e, "opening the disk").with_path(image))?;
    let format = options
        .disk_format
        .unwrap_or(if disk.format() == ImageFormat::Asif {
            DiskFormat::Asif
        } else {
            DiskFormat::Raw
        });
    let mut flattened: Option<Cleanup> = None;
    let file_source;
    let image_source;
    let src: &dyn Source = match format {
        DiskFormat::Raw => {
            image_source = ImageSource(&disk);
            &image_source
        }
        DiskFormat::Asif => {
            let standalone = disk.layer_count() == 1 && disk.format() == ImageFormat::Asif;
            let path = if standalone {
                image.to_path_buf()
            } else {
                // A stack (or another format): flatten into a standalone ASIF first.
                let tmp = options
                    .temp_dir
                    .join(format!(".diskkit-push-{}.asif", fsutil::random_suffix()));
                let guard = Cleanup::new(&tmp);
                let bs = disk.block_size();
                let out = DiskImage::create(
                    &tmp,
                    &CreateOptions::asif(disk.size().div_ceil(u64::from(bs)), bs),
                )
                .map_err(|e| Error::image(e, "creating a flattened ASIF").with_path(&tmp))?;
                diskkit::copy::copy(&disk, &out, &mut |_| {})
                    .map_err(|e| Error::image(e, "flattening the disk"))?;
                out.flush().map_err(|e| Error::image(e, "flattening the disk"))?;
                drop(out);
                flattened = Some(guard);
                tmp
            };
            let file =
                File::open(&path).map_err(|e| Error::io_while(e, "opening the disk").with_path(&path))?;
            let size = file
                .metadata()
                .map_err(|e| Error::io_while(e, "reading the disk").with_path(&path))?
                .len();
            file_source = FileSource { file, size };
            &file_source
        }
    };
    let size = src.size();
    let slice = options.slice_size.max(1 << 20);
    let count = size.div_ceil(slice).max(1) as usize;
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let next = AtomicU64::new(0);
    let layers: Mutex<Vec<Option<(Descriptor, bool, bool)>>> = Mutex::new(vec![None; count]);
    let uploaded_bytes = AtomicU64::new(0);
    let workers = registry.options().jobs.clamp(1, 16).min(count);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= count {
                    break;
                }
                let offset = i as u64 * slice;
                let len = slice.min(size - offset);
                let name = format!("slice {}/{count}", i + 1);
                events(BlobEvent::Start {
                    digest: &name,
                    size: len,
                    from: 0,
                });
                let r = (|| -> Result<(Descriptor, bool, bool)> {
                    let (digest, clen, content, bytes, zero) =
                        compress_slice(src, offset, len, &options.temp_dir, &|done| {
                            events(BlobEvent::Progress {
                                digest: &name,
                                done,
                                size: len,
                            })
                        })?;
                    let payload = match &bytes {
                        Compressed::Memory(v) => Payload::Bytes(v),
                        Compressed::File(f) => Payload::File {
                            path: f.path(),
                            offset: 0,
                            len: clen,
                        },
                    };
                    let up = registry.upload_blob(&digest, clen, payload)?;
                    if up {
                        uploaded_bytes.fetch_add(clen, Ordering::Relaxed);
                    }
                    let mut d = Descriptor::new(DISK_MEDIA_TYPE, &digest, clen);
                    d.annotations.insert(UNCOMPRESSED_SIZE.into(), len.to_string());
                    d.annotations.insert(UNCOMPRESSED_CONTENT_DIGEST.into(), content);
                    Ok((d, up, zero))
                })();
                match r {
                    Ok(v) => {
                        events(BlobEvent::Done {
                            digest: &name,
                            size: len,
                            fetched: v.1,
                        });
                        layers.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(v);
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
    drop(flattened);
    let slices: Vec<(Descriptor, bool, bool)> = layers
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::new(ErrorKind::Io, "a slice was not pushed"))?;
    let mut report = DiskPushReport {
        disk_format: Some(format),
        disk_size: size,
        slices: slices.len(),
        zero_slices: slices.iter().filter(|s| s.2).count(),
        uploaded: slices.iter().filter(|s| s.1).count(),
        bytes_compressed: slices.iter().map(|s| s.0.size).sum(),
        ..DiskPushReport::default()
    };
    let mut push_small = |media_type: &str, bytes: &[u8]| -> Result<Descriptor> {
        let digest = manifest::sha256_digest(bytes);
        if registry.upload_blob(&digest, bytes.len() as u64, Payload::Bytes(bytes))? {
            report.bytes_uploaded += bytes.len() as u64;
        }
        Ok(Descriptor::new(media_type, &digest, bytes.len() as u64))
    };
    let vm_config = match &options.vm_config {
        Some(c) => {
            let mut v: Value = serde_json::from_slice(c)
                .map_err(|e| Error::invalid_argument(format!("the VM config is not JSON: {e}")))?;
            if let Some(o) = v.as_object_mut() {
                o.insert("diskFormat".into(), json!(format.name()));
            }
            serde_json::to_vec(&v).unwrap_or_default()
        }
        None => default_vm_config(&options.os, &options.architecture, format),
    };
    let mut layer_list = vec![push_small(CONFIG_MEDIA_TYPE, &vm_config)?];
    layer_list.extend(slices.into_iter().map(|s| s.0));
    if let Some(n) = &options.nvram {
        let bytes = std::fs::read(n).map_err(|e| Error::io_while(e, "reading the nvram").with_path(n))?;
        layer_list.push(push_small(NVRAM_MEDIA_TYPE, &bytes)?);
    }
    let config = json!({
        "architecture": options.architecture,
        "os": options.os,
        "config": {"Labels": {DISK_FORMAT_LABEL: format.name()}},
    });
    let config_bytes = serde_json::to_vec(&config).unwrap_or_default();
    let config_desc = push_small(OCI_CONFIG, &config_bytes)?;
    let mut annotations = std::collections::BTreeMap::new();
    annotations.insert(UNCOMPRESSED_DISK_SIZE.to_string(), size.to_string());
    annotations.insert(UPLOAD_TIME.to_string(), now_iso());
    let m = Manifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        artifact_type: None,
        config: config_desc,
        layers: layer_list,
        annotations,
    };
    let bytes = serde_json::to_vec(&m).map_err(|e| Error::invalid_argument(e.to_string()))?;
    let reference = registry.reference();
    let target = reference.tag_or_latest().unwrap_or("latest").to_string();
    report.digest = registry.put_manifest(&target, OCI_MANIFEST, &bytes)?;
    report.bytes_uploaded += bytes.len() as u64 + uploaded_bytes.into_inner();
    Ok(report)
}

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

/// Read the artifact's layout: disk format, slices with their offsets, config and nvram.
fn read_layout(
    registry: &Registry,
    m: &Manifest,
) -> Result<(
    DiskFormat,
    Vec<SliceRef>,
    u64,
    Option<Descriptor>,
    Option<Descriptor>,
)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_time_is_well_formed() {
        let t = now_iso();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T');
    }

    #[test]
    fn zero_digest_is_the_digest_of_zeroes() {
        assert_eq!(zero_digest(3), manifest::sha256_digest(&[0, 0, 0]));
        assert_eq!(
            zero_digest(BUF as u64 + 5),
            manifest::sha256_digest(&vec![0; BUF + 5])
        );
    }

    #[test]
    fn zero_slices_encode_small_and_the_same() {
        let a = zero_slice_encoding(64 << 20);
        assert!(a.len() < (64 << 20) / 200, "{}", a.len());
        assert_eq!(a, zero_slice_encoding(64 << 20));
        assert_eq!(lz4::decode(&a, 64 << 20).unwrap(), vec![0u8; 64 << 20]);
        // The same bytes as the encoder gives zeroes it was fed.
        assert_eq!(a, lz4::encode(&vec![0u8; 64 << 20]));
    }
}
