//! Reading a bundle: decompress, parse the tar stream, apply every rule, and write the
//! members into a staging directory (or only check them).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use diskkit::{CreateOptions, DiskImage, ImageFormat};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::bundle::layer::{self, LayerDetails};
use crate::bundle::machine::{Machine, MAX_MACHINE_JSON};
use crate::bundle::sink::{copy_regions, with_file_sink, Discard, ImageSink, Sink};
use crate::bundle::tar::{Header, TarReader};
use crate::bundle::{ExtractOptions, ASIF_DISK, DISK, LAYER, MACHINE};
use crate::error::{Error, Result};

/// The zstd frame magic number.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Zero bytes accepted after the end-of-archive marker (GNU tar pads to 10 KiB records;
/// larger blocking factors are allowed up to this).
const MAX_TRAILING: u64 = 1 << 20;

/// Where `disk.img` goes while a bundle is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DiskTarget {
    /// A sparse RAW file `disk.img`.
    Raw,
    /// An ASIF image `disk.asif` (the layer is re-pointed at it).
    Asif,
    /// Nowhere: the data is only read (verify, info).
    Discard,
}

/// What `disk.img` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskDetails {
    /// The disk's size in bytes.
    pub size: u64,
    /// Bytes of data stored in the bundle (the rest are holes).
    pub stored: u64,
    /// Data regions in the sparse map (1 for a member stored without holes).
    pub regions: u64,
    /// Whether it is stored as a GNU sparse member.
    pub sparse: bool,
}

/// Everything a valid bundle says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BundleInfo {
    /// The machine definition.
    pub machine: Machine,
    /// The base disk.
    pub disk: DiskDetails,
    /// The overlay.
    pub layer: LayerDetails,
    /// The members in the order they are stored.
    pub members: Vec<String>,
    /// Bytes of the compressed bundle.
    pub compressed_size: u64,
    /// Bytes of the tar stream inside it.
    pub tar_size: u64,
    /// The SHA-256 of the compressed bundle, in hex, when it was computed (an expected
    /// digest was given, or [`super::ExtractOptions::digest`]).
    pub sha256: Option<String>,
}

/// Counts (and, when asked, hashes) the bytes read through it.
struct Tap<R> {
    inner: R,
    count: Arc<AtomicU64>,
    hash: Option<Sha256>,
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hash {
            h.update(&buf[..n]);
        }
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The three members, by position.
const NAMES: [&str; 3] = [MACHINE, LAYER, DISK];

/// Read a whole bundle from `input`, writing `layer.qcow2`, `machine.json` and (per
/// `target`) the disk into `staging`, an existing empty directory. Every rule is checked;
/// on error `staging` may hold partial files (the caller removes it). `progress` gets the
/// compressed bytes read so far. `options` gives the size limit, the expected digest, whether
/// to compute the digest anyway for [`BundleInfo::sha256`] (hashing costs the decompressing
/// thread time, so it is skipped when nobody wants it) and whether to sync what is written.
pub(crate) fn read_bundle(
    input: &mut dyn Read,
    staging: &Path,
    target: DiskTarget,
    options: &ExtractOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<BundleInfo> {
    let max_disk_size = options.max_disk_size;
    let sha256 = options.sha256.as_ref();
    let digest = options.digest;
    let durable = options.sync;
    let count = Arc::new(AtomicU64::new(0));
    let mut tap = Tap {
        inner: input,
        count: count.clone(),
        hash: (digest || sha256.is_some()).then(Sha256::new),
    };
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match tap.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io_while(e, "reading the bundle")),
        }
    }
    if got < 4 || magic != ZSTD_MAGIC {
        return Err(Error::bundle(
            "not a zstd-compressed stream (a bundle is a zstd-compressed GNU tar: image.tar.zst)",
        ));
    }
    let decoder = zstd::stream::read::Decoder::new(io::Cursor::new(magic).chain(&mut tap))
        .map_err(|e| Error::io_while(e, "starting the zstd decoder"))?;
    let mut tar = TarReader::new(decoder);
    let mut seen: [Option<Header>; 3] = [None, None, None];
    let mut members = Vec::new();
    let mut machine_bytes = Vec::new();
    let mut asif: Option<DiskImage> = None;
    while let Some(h) = tar.next_header()? {
        let idx = member_index(&h)?;
        let name = NAMES[idx];
        if seen[idx].is_some() {
            return Err(Error::bundle(format!("member '{name}' appears twice")));
        }
        let size = h.file_size();
        let limit = if idx == 0 { MAX_MACHINE_JSON } else { max_disk_size };
        if size > limit {
            let hint = if idx == 0 { "" } else { " (--max-disk-size)" };
            return Err(Error::bundle(format!(
                "member '{name}' is {size} bytes, larger than the limit of {limit} bytes{hint}"
            )));
        }
        let regions = h.regions();
        let mut tick = || progress(count.load(Ordering::Relaxed));
        match idx {
            0 => {
                let mut buf = vec![0u8; size as usize];
                for r in &regions {
                    let dst = &mut buf[r.offset as usize..r.end() as usize];
                    tar.data()
                        .read_exact(dst)
                        .map_err(|e| Error::bundle("the stream ends inside machine.json").with_source(e))?;
                }
                machine_bytes = buf;
            }
            1 => {
                let file = new_sparse_file(&staging.join(LAYER), size)?;
                with_file_sink(&file, LAYER, durable, |sink| {
                    copy_regions(&mut tar.data(), &regions, sink, &mut tick)
                })?;
            }
            _ => match target {
                DiskTarget::Raw => {
                    let file = new_sparse_file(&staging.join(DISK), size)?;
                    with_file_sink(&file, DISK, durable, |sink| {
                        copy_regions(&mut tar.data(), &regions, sink, &mut tick)
                    })?;
                }
                DiskTarget::Asif => {
                    if size % 512 != 0 || size == 0 {
                        return Err(Error::invalid_argument(format!(
                            "{DISK} is {size} bytes, not a positive multiple of 512, so it \
                                 cannot become an ASIF image; extract it as RAW"
                        )));
                    }
                    let image =
                        DiskImage::create(staging.join(ASIF_DISK), &CreateOptions::asif(size / 512, 512))
                            .map_err(|e| Error::image(e, format!("creating {ASIF_DISK}")))?;
                    copy_regions(
                        &mut tar.data(),
                        &regions,
                        &ImageSink {
                            image: &image,
                            what: ASIF_DISK,
                        },
                        &mut tick,
                    )?;
                    image
                        .flush()
                        .map_err(|e| Error::image(e, format!("writing {ASIF_DISK}")))?;
                    asif = Some(image);
                }
                DiskTarget::Discard => {
                    copy_regions(&mut tar.data(), &regions, &Discard as &dyn Sink, &mut tick)?;
                }
            },
        }
        tar.finish_member()?;
        members.push(name.to_string());
        seen[idx] = Some(h);
    }
    let tar_size = tar.position();
    let decoder = tar.finish_archive(MAX_TRAILING)?;
    // The decoder read its input to the end; anything after the last frame was refused.
    drop(decoder);
    let mut rest = [0u8; 1];
    if tap
        .read(&mut rest)
        .map_err(|e| Error::io_while(e, "reading the bundle"))?
        != 0
    {
        return Err(Error::bundle("data after the end of the compressed stream"));
    }
    progress(count.load(Ordering::Relaxed));
    let [Some(_), Some(_), Some(disk_header)] = &seen else {
        let i = seen.iter().position(Option::is_none).unwrap_or(0);
        return Err(Error::bundle(format!(
            "member '{}' is missing (a bundle holds disk.img, layer.qcow2 and machine.json)",
            NAMES[i]
        )));
    };
    let disk = DiskDetails {
        size: disk_header.file_size(),
        stored: disk_header.stored,
        regions: disk_header.regions().len() as u64,
        sparse: disk_header.sparse.is_some(),
    };
    let digest: Option<[u8; 32]> = tap.hash.map(|h| h.finalize().into());
    if let (Some(want), Some(digest)) = (sha256, digest) {
        if &digest != want {
            return Err(Error::new(
                crate::ErrorKind::DigestMismatch,
                format!(
                    "the bundle's SHA-256 is {}, not the expected {}",
                    hex(&digest),
                    hex(want)
                ),
            ));
        }
    }
    let machine = Machine::parse(&machine_bytes)?;
    let layer = layer::check_layer(&staging.join(LAYER), max_disk_size)?;
    if let Some(image) = asif {
        let uuid = image.layer_uuid();
        drop(image);
        layer::repoint(&staging.join(LAYER), ASIF_DISK, ImageFormat::Asif, uuid)?;
    }
    std::fs::write(staging.join(MACHINE), &machine_bytes)
        .map_err(|e| Error::io_while(e, format!("writing {MACHINE}")))?;
    Ok(BundleInfo {
        machine,
        disk,
        layer,
        members,
        compressed_size: count.load(Ordering::Relaxed),
        tar_size,
        sha256: digest.map(|d| hex(&d)),
    })
}

/// Which of the three members a header is, checking its name and type.
fn member_index(h: &Header) -> Result<usize> {
    let shown = String::from_utf8_lossy(&h.name).into_owned();
    let Some(idx) = NAMES.iter().position(|n| n.as_bytes() == h.name.as_slice()) else {
        let why = if h.name.starts_with(b"/") {
            "absolute names are not allowed"
        } else if h.name.split(|&b| b == b'/').any(|c| c == b"..") {
            "names with '..' are not allowed"
        } else if h.name.contains(&b'/') {
            "names with '/' are not allowed"
        } else {
            "not one of disk.img, layer.qcow2, machine.json"
        };
        return Err(Error::bundle(format!(
            "member '{shown}' ({}): {why}",
            h.type_name()
        )));
    };
    if !matches!(h.typeflag, b'0' | 0 | b'S') {
        return Err(Error::bundle(format!(
            "member '{shown}' is a {}; it must be a regular file",
            h.type_name()
        )));
    }
    if h.has_link_name {
        return Err(Error::bundle(format!(
            "member '{shown}' has a link name; it must be a regular file"
        )));
    }
    Ok(idx)
}

fn new_sparse_file(path: &Path, size: u64) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io_while(e, format!("creating {}", path.display())))?;
    file.set_len(size)
        .map_err(|e| Error::io_while(e, format!("sizing {}", path.display())))?;
    Ok(file)
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parse 64 hex digits.
pub fn parse_sha256(text: &str) -> Result<[u8; 32]> {
    let t = text.trim();
    let t = t.strip_prefix("sha256:").unwrap_or(t);
    if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid_argument(format!(
            "'{text}' is not a SHA-256 digest (64 hex digits)"
        )));
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    Ok(out)
}
