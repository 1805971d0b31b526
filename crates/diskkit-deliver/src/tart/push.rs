//! Pushing a disk: slices compressed in parallel, uploaded unless the registry has them.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use diskkit::{CreateOptions, DiskImage, ImageFormat, OpenOptions};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{
    lz4, zero_digest, DiskFormat, BUF, CONFIG_MEDIA_TYPE, DISK_FORMAT_LABEL, DISK_MEDIA_TYPE,
    NVRAM_MEDIA_TYPE, SLICE, UNCOMPRESSED_CONTENT_DIGEST, UNCOMPRESSED_DISK_SIZE, UNCOMPRESSED_SIZE,
    UPLOAD_TIME,
};
use crate::error::{Error, ErrorKind, Result};
use crate::fsutil::{self, Cleanup};
use crate::registry::manifest::{self, Descriptor, Manifest, OCI_CONFIG, OCI_MANIFEST};
use crate::registry::{BlobEvent, Payload, Registry};

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
pub(super) fn zero_slice_encoding(len: u64) -> Vec<u8> {
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
pub(super) fn now_iso() -> String {
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
