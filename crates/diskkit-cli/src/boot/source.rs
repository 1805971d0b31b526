//! Turning SOURCE into a root disk: a disk image or stack as given, an OCI image unpacked
//! into the store (once), or an Apple `container` store entry.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use diskkit::{DiskImage, ImageFormat, OpenOptions, ParentPolicy};
use diskkit_ext4::read::apple_store::{AppleStore, Platform as StorePlatform};

use super::{store, BootRequest, SourceSpec};
use crate::cmd::unpack::{split_source, Bars};
use crate::messages::{note, warn};

/// The disk the guest boots from.
#[derive(Debug)]
pub(crate) struct Root {
    /// The image (its whole stack), read-only.
    pub(crate) disk: Arc<DiskImage>,
    /// Its layers' files and formats, bottom first (`None` path: no file).
    pub(crate) layers: Vec<(Option<PathBuf>, ImageFormat)>,
    /// What to call it in messages.
    pub(crate) name: String,
    /// For roots from a store: the manifest digest's hex, keying the kernel cache.
    pub(crate) digest: Option<String>,
    /// For roots unpacked into diskkit's store: the entry directory.
    pub(crate) entry: Option<PathBuf>,
    /// For a cache instance: its qcow2 overlay, the top of `disk` but not in `layers`; QEMU
    /// opens it as the writable layer, so the guest's writes stay in it.
    pub(crate) overlay: Option<PathBuf>,
}

/// What kind of thing a SOURCE path is.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Disk,
    Oci,
}

/// A disk image, or something for `diskkit-oci` (a directory; a tar: an OCI archive, a
/// docker-archive, or a root filesystem tarball; a gzip or zstd file), which tells images from
/// plain inputs.
fn classify(path: &Path, format: Option<ImageFormat>) -> Result<Kind> {
    let md = std::fs::metadata(path).with_context(|| format!("cannot open '{}'", path.display()))?;
    if md.is_dir() {
        return Ok(Kind::Oci);
    }
    if format.is_some() {
        return Ok(Kind::Disk);
    }
    let mut head = [0u8; 512];
    let mut f = File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read '{}'", path.display())),
        }
    }
    // POSIX and GNU tar headers carry "ustar" at offset 257; gzip and zstd streams start
    // with their magic numbers. Disk images (RAW holds a boot sector or a filesystem, ASIF
    // and qcow2 their own magic) do not.
    let tar = n == 512 && &head[257..262] == b"ustar";
    let compressed = head[..n].starts_with(&[0x1f, 0x8b]) || head[..n].starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
    Ok(if tar || compressed { Kind::Oci } else { Kind::Disk })
}

/// For an input `diskkit-oci` could not unpack into the store: what it is when it is a root
/// filesystem tarball or directory (which have no manifest digest to name a store entry).
fn plain_input(path: &Path) -> Option<&'static str> {
    let platform = diskkit_oci::Platform::host();
    match diskkit_oci::select(path, None, &platform, false).ok()?.input {
        diskkit_oci::Input::Image => None,
        diskkit_oci::Input::Tarball => Some("a root filesystem tarball"),
        diskkit_oci::Input::Directory => Some("a directory"),
    }
}

/// Open a disk image or stack (read-only unless `writable`) and describe its layers. With
/// `max_cache_size`, the stack's cache layer (over a remote base) is kept under that bound.
pub(crate) fn open_disk(
    path: &Path,
    format: Option<ImageFormat>,
    policy: ParentPolicy,
    writable: bool,
    max_cache_size: Option<u64>,
) -> Result<Root> {
    let mut options = OpenOptions::new()
        .writable(writable)
        .parents(policy)
        .max_cache_size(max_cache_size);
    if let Some(f) = format {
        options = options.format(f);
    }
    let disk = crate::cmd::open_image(path, &options)?;
    let layers = disk
        .describe_layers()
        .with_context(|| format!("'{}'", path.display()))?
        .into_iter()
        .rev()
        .map(|l| (l.path, l.format))
        .collect();
    Ok(Root {
        disk: Arc::new(disk),
        layers,
        name: format!("'{}'", path.display()),
        digest: None,
        entry: None,
        overlay: None,
    })
}

/// A store entry's snapshot, opened RAW; a missing or unreadable one is reported as a
/// damaged entry.
fn open_snapshot(snapshot: &Path, entry_dir: &Path) -> Result<Arc<DiskImage>> {
    let damaged = |why: String| {
        anyhow!(
            "the store entry '{}' is damaged ({why}): remove that directory and boot again to unpack it afresh",
            entry_dir.display()
        )
    };
    let md = std::fs::metadata(snapshot).map_err(|e| damaged(format!("snapshot: {e}")))?;
    if md.len() < 2048 {
        return Err(damaged(format!("the snapshot is only {} bytes", md.len())));
    }
    let disk = DiskImage::open(snapshot, &OpenOptions::new().format(ImageFormat::Raw))
        .map_err(|e| damaged(format!("snapshot: {e}")))?;
    let mut magic = [0u8; 2];
    disk.read_at(&mut magic, 1024 + 0x38)
        .map_err(|e| damaged(format!("snapshot: {e}")))?;
    if magic != [0x53, 0xEF] {
        return Err(damaged("the snapshot holds no ext4 filesystem".to_owned()));
    }
    Ok(Arc::new(disk))
}

/// Resolve the request's SOURCE into the root disk. `store_dir` is diskkit's store. (Cache
/// instances are opened by [`super::instance`].)
pub(crate) fn resolve(req: &BootRequest, store_dir: &Path) -> Result<Root> {
    match &req.source {
        SourceSpec::Instance { name, .. } => {
            bail!("instance '{name}' is opened from the image cache, not resolved as a source")
        }
        SourceSpec::AppleStore { root, reference } => {
            if req.max_cache_size.is_some() {
                bail!("--max-cache-size applies to disk images with a cache layer, not to --apple-store references");
            }
            let platform = match &req.platform {
                Some(p) => StorePlatform::parse(p)?,
                None => StorePlatform::host(),
            };
            let apple = AppleStore::open(root)
                .with_context(|| format!("cannot read the container store at '{}'", root.display()))?;
            let snap = apple
                .resolve(reference, &platform)
                .with_context(|| format!("cannot resolve '{reference}' for {platform}"))?;
            for w in &snap.warnings {
                warn(format_args!("{w}"));
            }
            let entry_dir = snap.snapshot.parent().unwrap_or(root).to_path_buf();
            let disk = open_snapshot(&snap.snapshot, &entry_dir)?;
            let hex = snap.manifest_digest.trim_start_matches("sha256:").to_owned();
            Ok(Root {
                disk,
                layers: vec![(Some(snap.snapshot.clone()), ImageFormat::Raw)],
                name: format!("{reference} in '{}'", root.display()),
                digest: Some(hex),
                entry: None,
                overlay: None,
            })
        }
        SourceSpec::Path(src) => {
            let (path, reference) = split_source(src);
            let kind = if reference.is_some() {
                Kind::Oci
            } else {
                classify(&path, req.format)?
            };
            if kind == Kind::Disk {
                return open_disk(&path, req.format, req.parents.policy(), false, req.max_cache_size);
            }
            if req.max_cache_size.is_some() {
                bail!("--max-cache-size applies to disk images with a cache layer; '{src}' is an OCI image");
            }
            if req.format.is_some() {
                bail!("--image-format applies to disk images; '{src}' is an OCI image");
            }
            let platform = req
                .platform
                .as_deref()
                .map(str::parse::<diskkit_oci::Platform>)
                .transpose()?;
            let options = store::unpack_options(reference, platform, req.size);
            let mut bars = Bars::on_stderr();
            let entry = match diskkit_oci::unpack_to_store(&path, store_dir, &options, &mut bars) {
                Ok(entry) => entry,
                Err(e) => {
                    if let Some(what) = options.reference.is_none().then(|| plain_input(&path)).flatten() {
                        bail!(
                            "'{src}' is {what}, not a disk or an OCI image; make a disk of it \
                             first (diskkit unpack {} root.raw) and boot that",
                            crate::cmd::shell_path(&path)
                        );
                    }
                    return Err(e).with_context(|| {
                        format!("cannot unpack '{src}' into the store '{}'", store_dir.display())
                    });
                }
            };
            let hex = entry
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if entry.cache_hit && !req.quiet {
                if let (Some(want), Ok(md)) = (req.size, std::fs::metadata(&entry.snapshot)) {
                    if md.len() != want {
                        note(format_args!(
                            "'{src}' is already in the store with a {} root; --size applies to \
                             new entries only",
                            crate::size::human(md.len())
                        ));
                    }
                }
            }
            let disk = open_snapshot(&entry.snapshot, &entry.dir)?;
            Ok(Root {
                disk,
                layers: vec![(Some(entry.snapshot.clone()), ImageFormat::Raw)],
                name: format!("'{src}'"),
                digest: Some(hex),
                entry: Some(entry.dir),
                overlay: None,
            })
        }
    }
}
