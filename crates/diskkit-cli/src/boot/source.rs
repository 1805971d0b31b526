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
}

/// What kind of thing a SOURCE path is.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Disk,
    Oci,
}

/// OCI (a layout directory, or a tar: an OCI archive or docker-archive) or a disk image.
fn classify(path: &Path, format: Option<ImageFormat>) -> Result<Kind> {
    let md = std::fs::metadata(path).with_context(|| format!("cannot open '{}'", path.display()))?;
    if md.is_dir() {
        if path.join("index.json").is_file() || path.join("oci-layout").is_file() {
            return Ok(Kind::Oci);
        }
        bail!(
            "'{}' is a directory but not an OCI image layout (no index.json)",
            path.display()
        );
    }
    if format.is_some() {
        return Ok(Kind::Disk);
    }
    let mut head = [0u8; 512];
    let mut f = File::open(path).with_context(|| format!("opening '{}'", path.display()))?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(e).with_context(|| format!("reading '{}'", path.display())),
        }
    }
    // POSIX and GNU tar headers carry "ustar" at offset 257; disk images do not.
    if n == 512 && &head[257..262] == b"ustar" {
        return Ok(Kind::Oci);
    }
    Ok(Kind::Disk)
}

/// Open a disk image or stack read-only and describe its layers.
pub(crate) fn open_disk(
    path: &Path,
    format: Option<ImageFormat>,
    policy: ParentPolicy,
    writable: bool,
) -> Result<Root> {
    let mut options = OpenOptions::new().writable(writable).parents(policy);
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

/// Resolve the request's SOURCE into the root disk. `store_dir` is diskkit's store.
pub(crate) fn resolve(req: &BootRequest, store_dir: &Path) -> Result<Root> {
    match &req.source {
        SourceSpec::AppleStore { root, reference } => {
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
                return open_disk(&path, req.format, req.parents.policy(), false);
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
            let entry = diskkit_oci::unpack_to_store(&path, store_dir, &options, &mut bars)
                .with_context(|| format!("cannot unpack '{src}' into the store '{}'", store_dir.display()))?;
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
            })
        }
    }
}
