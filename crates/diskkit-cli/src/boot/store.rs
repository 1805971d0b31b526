//! The store: unpacked OCI roots (the Apple `container` snapshot layout `unpack --store`
//! writes, `snapshots/<manifest-hex>/snapshot`) and the kernels extracted from them
//! (`diskkit/kernels/<manifest-hex>/`).
//!
//! Store entries are written once, by `unpack_to_store` (built aside and renamed into
//! place), and only read afterwards: every boot gets its own overlay. The kernel cache is
//! derived data: an entry whose files do not match the sizes and SHA-256 digests recorded
//! beside them is extracted again.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use diskkit::ImageFormat;
use diskkit_oci::UnpackOptions;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::kernel::{self, BootFiles};

/// Size of a root filesystem unpacked for booting, unless `--size` says otherwise: room for
/// a distribution to install packages and build software. The image is sparse: only what is
/// written takes space.
pub(crate) const DEFAULT_ROOT_SIZE: u64 = 64 << 30;
/// Label of unpacked roots (the kernel command line names them by UUID).
pub(crate) const ROOT_LABEL: &str = "root";

/// Make `options` produce a store entry that boots: RAW (Apple's snapshot format), sized
/// `size` (default [`DEFAULT_ROOT_SIZE`]), with a journal and a label. `unpack --store` and
/// `boot` share this, so both make the same entries.
pub(crate) fn entry_options(options: &mut UnpackOptions, size: Option<u64>) {
    options.size = Some(size.unwrap_or(DEFAULT_ROOT_SIZE));
    options.journal = true;
    options.label = ROOT_LABEL.to_owned();
}

/// The default store: `$XDG_CACHE_HOME/diskkit`, else `~/.cache/diskkit`.
pub(crate) fn default_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        if d.is_absolute() {
            return Ok(d.join("diskkit"));
        }
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache/diskkit")),
        None => bail!("neither XDG_CACHE_HOME nor HOME is set: give --store DIR"),
    }
}

/// A kernel cache entry's description, `kernel.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    files: BootFiles,
    /// (file name, size, sha256 hex) of every file.
    digests: Vec<(String, u64, String)>,
}

fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut f = fs::File::open(path).with_context(|| format!("reading '{}'", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f
            .read(&mut buf)
            .with_context(|| format!("reading '{}'", path.display()))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, format!("{:x}", h.finalize())))
}

/// The kernel cache of store entry `hex` (a manifest digest's hex).
pub(crate) struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    pub(crate) fn new(store: &Path, hex: &str) -> Result<KernelCache> {
        if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            bail!("'{hex}' is not a SHA-256 digest");
        }
        Ok(KernelCache {
            dir: store.join("diskkit/kernels").join(hex),
        })
    }

    /// The cached files, if the entry is complete and undamaged.
    pub(crate) fn get(&self) -> Option<BootFiles> {
        let json = fs::read(self.dir.join("kernel.json")).ok()?;
        let mut record: Record = serde_json::from_slice(&json).ok()?;
        for (name, size, digest) in &record.digests {
            if name.contains('/') || sha256_file(&self.dir.join(name)).ok()? != (*size, digest.clone()) {
                return None;
            }
        }
        // Paths are recorded relative to the entry, which may have moved with the store.
        record.files.kernel = self.dir.join("vmlinuz");
        if record.files.initramfs.is_some() {
            record.files.initramfs = Some(self.dir.join("initramfs"));
        }
        Some(record.files)
    }

    /// Write `found` into the cache (aside, then renamed into place) and return its files.
    /// A damaged entry is replaced; a concurrent writer's complete entry is used.
    pub(crate) fn put(&self, found: &kernel::Found) -> Result<BootFiles> {
        let parent = self.dir.parent().context("kernel cache path")?;
        fs::create_dir_all(parent).with_context(|| format!("creating '{}'", parent.display()))?;
        let temp = tempfile::Builder::new()
            .prefix(".ingest-")
            .tempdir_in(parent)
            .with_context(|| format!("creating a directory in '{}'", parent.display()))?;
        let files = kernel::write_out(found, temp.path())?;
        let mut digests = Vec::new();
        for name in ["vmlinuz", "initramfs"] {
            let p = temp.path().join(name);
            if p.is_file() {
                let (size, digest) = sha256_file(&p)?;
                digests.push((name.to_owned(), size, digest));
            }
        }
        let record = Record {
            files: files.clone(),
            digests,
        };
        let json = temp.path().join("kernel.json");
        fs::write(&json, serde_json::to_vec_pretty(&record)?)
            .with_context(|| format!("writing '{}'", json.display()))?;
        if self.dir.exists() {
            // Damaged (get() refused it): replace it.
            fs::remove_dir_all(&self.dir)
                .with_context(|| format!("removing the damaged kernel cache '{}'", self.dir.display()))?;
        }
        let kept = temp.keep();
        if let Err(e) = fs::rename(&kept, &self.dir) {
            let _ = fs::remove_dir_all(&kept);
            if let Some(f) = self.get() {
                return Ok(f);
            }
            return Err(e).with_context(|| format!("renaming into '{}'", self.dir.display()));
        }
        self.get()
            .with_context(|| format!("the kernel cache '{}' does not read back", self.dir.display()))
    }
}

/// Options for unpacking an OCI image into the store for booting.
pub(crate) fn unpack_options(
    reference: Option<String>,
    platform: Option<diskkit_oci::Platform>,
    size: Option<u64>,
) -> UnpackOptions {
    let mut options = UnpackOptions {
        reference,
        platform,
        format: ImageFormat::Raw,
        ..UnpackOptions::default()
    };
    entry_options(&mut options, size);
    options
}
