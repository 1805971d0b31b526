//! VM image bundles in taskcluster-worker's format, compatible both ways with
//! `tar -cS --format=gnu disk.img layer.qcow2 machine.json | zstd` and `zstd -dc | tar -xS`.
//!
//! A bundle (`image.tar.zst`) is a zstd-compressed GNU tar holding exactly three regular
//! files: `disk.img` (a RAW disk, stored as a GNU sparse member), `layer.qcow2` (a qcow2
//! overlay whose backing file is exactly `disk.img`, format `raw`) and `machine.json`
//! (taskcluster's machine definition, version 1; see [`Machine`]).
//!
//! Every read checks every rule, more strictly than taskcluster did: only those three names,
//! each once and a regular (plain or sparse) file, nothing else in the archive (no links,
//! devices, directories, extra or duplicate members, data after the end marker or after the
//! compressed stream); `disk.img` and `layer.qcow2` at most [`DEFAULT_MAX_DISK_SIZE`] (or the
//! limit given), `machine.json` at most 1 MiB and valid against version 1; `layer.qcow2`
//! consistent by `check`, without the dirty or corrupt bit, an external data file or internal
//! snapshots, backed by exactly `disk.img` in RAW. A sparse map must be sorted, inside the
//! file and add up to the stored bytes, so a map claiming 10 TiB is refused before anything
//! is written. Outputs are built in a temporary directory and renamed into place only when
//! everything checked out; on any error nothing is left behind.
//!
//! ```no_run
//! use diskkit_deliver::bundle::{self, ExtractOptions};
//!
//! # fn main() -> diskkit_deliver::Result<()> {
//! let info = bundle::extract_file("image.tar.zst".as_ref(), "vm".as_ref(), &ExtractOptions::default(), &mut |_| {})?;
//! println!("{} bytes of disk, MAC {:?}", info.disk.size, info.machine.mac);
//! # Ok(())
//! # }
//! ```

mod create;
mod layer;
mod machine;
mod read;
mod sink;
pub(crate) mod tar;

use std::fs::File;
use std::io::Read;
use std::path::Path;

use diskkit::ImageFormat;

pub use self::create::{create, CreateOptions, CreateReport};
pub use self::layer::LayerDetails;
pub use self::machine::{Machine, MAX_MACHINE_JSON};
pub(crate) use self::read::hex;
pub use self::read::{parse_sha256, BundleInfo, DiskDetails};
use self::read::{read_bundle, DiskTarget};
use crate::error::{Error, PathContext, Result};
use crate::fsutil::{self, Cleanup};

/// The base disk's member name.
pub const DISK: &str = "disk.img";
/// The overlay's member name.
pub const LAYER: &str = "layer.qcow2";
/// The machine definition's member name.
pub const MACHINE: &str = "machine.json";
/// The base disk's file name when it is extracted as ASIF.
pub const ASIF_DISK: &str = "disk.asif";
/// The default limit on `disk.img`'s and `layer.qcow2`'s sizes (taskcluster's).
pub const DEFAULT_MAX_DISK_SIZE: u64 = 50 << 30;

/// How to read a bundle.
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// The base disk's format: [`ImageFormat::Raw`] (`disk.img`, sparse) or
    /// [`ImageFormat::Asif`] (`disk.asif`, with `layer.qcow2` re-pointed at it).
    pub format: ImageFormat,
    /// The largest `disk.img` and `layer.qcow2` accepted.
    pub max_disk_size: u64,
    /// The SHA-256 the compressed bundle must have.
    pub sha256: Option<[u8; 32]>,
    /// Compute the bundle's SHA-256 (for [`BundleInfo::sha256`]) even when no digest is
    /// expected. `verify` always computes it.
    pub digest: bool,
    /// Make the extracted files durable (synced) before the directory is renamed into
    /// place. Without it, as with `tar -x`, the files are complete for every process at
    /// once but a power failure soon after may lose data.
    pub sync: bool,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            format: ImageFormat::Raw,
            max_disk_size: DEFAULT_MAX_DISK_SIZE,
            sha256: None,
            digest: false,
            sync: false,
        }
    }
}

fn target(options: &ExtractOptions) -> Result<DiskTarget> {
    match options.format {
        ImageFormat::Raw => Ok(DiskTarget::Raw),
        ImageFormat::Asif => Ok(DiskTarget::Asif),
        other => Err(Error::invalid_argument(format!(
            "a bundle's disk can be extracted as raw or asif, not {other}"
        ))),
    }
}

/// Extract the bundle read from `input` into the new directory `dir` (which must not exist):
/// `disk.img` (or `disk.asif`), `layer.qcow2` and `machine.json`. The directory is built
/// under a temporary name next to `dir` and renamed when every rule has been checked.
/// `progress` gets the compressed bytes read so far.
pub fn extract(
    input: &mut dyn Read,
    dir: &Path,
    options: &ExtractOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<BundleInfo> {
    if dir.exists() {
        return Err(Error::new(
            crate::ErrorKind::AlreadyExists,
            format!("'{}' already exists; extract into a new directory", dir.display()),
        ));
    }
    let staging = Cleanup::new(fsutil::temp_sibling(dir)?);
    let info = extract_into(input, staging.path(), options, progress)?;
    create::persist(staging.path(), dir, false, options.sync)?;
    staging.keep();
    Ok(info)
}

/// [`extract`] from the bundle file at `bundle`.
pub fn extract_file(
    bundle: &Path,
    dir: &Path,
    options: &ExtractOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<BundleInfo> {
    let mut file = open_bundle(bundle)?;
    extract(&mut file, dir, options, progress).at_path(bundle)
}

/// Open a bundle file, which must be a regular file.
pub fn open_bundle(bundle: &Path) -> Result<File> {
    let file = File::open(bundle).map_err(|e| Error::io_while(e, "opening the bundle").with_path(bundle))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io_while(e, "opening the bundle").with_path(bundle))?;
    if !meta.is_file() {
        return Err(Error::invalid_argument("a bundle must be a regular file").with_path(bundle));
    }
    Ok(file)
}

/// Extract into `staging`, a directory that does not exist yet (created here); with
/// `options.sync` the files and `staging` are synced. On error it is removed.
pub(crate) fn extract_into(
    input: &mut dyn Read,
    staging: &Path,
    options: &ExtractOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<BundleInfo> {
    let target = target(options)?;
    std::fs::create_dir(staging)
        .map_err(|e| Error::io_while(e, format!("creating {}", staging.display())))?;
    let guard = Cleanup::new(staging);
    let info = read_bundle(input, staging, target, options, progress)?;
    if options.sync {
        File::open(staging.join(MACHINE))
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io_while(e, format!("syncing {MACHINE}")))?;
        fsutil::sync_dir(staging)?;
    }
    guard.keep();
    Ok(info)
}

/// Read the whole bundle and check every rule without keeping anything (`layer.qcow2` is
/// checked in a temporary directory, removed afterwards). Returns what it holds.
pub fn verify(
    input: &mut dyn Read,
    options: &ExtractOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<BundleInfo> {
    let staging =
        Cleanup::new(std::env::temp_dir().join(format!(".diskkit-bundle-{}", fsutil::random_suffix())));
    std::fs::create_dir(staging.path())
        .map_err(|e| Error::io_while(e, format!("creating {}", staging.path().display())))?;
    let options = ExtractOptions {
        digest: true,
        sync: false,
        ..options.clone()
    };
    read_bundle(input, staging.path(), DiskTarget::Discard, &options, progress)
}

/// [`verify`] the bundle file at `bundle`.
pub fn verify_file(
    bundle: &Path,
    options: &ExtractOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<BundleInfo> {
    let mut file = open_bundle(bundle)?;
    verify(&mut file, options, progress).at_path(bundle)
}
