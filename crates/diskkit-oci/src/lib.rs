//! OCI images unpacked, layer by layer, into one merged ext4 root filesystem.
//!
//! [`unpack`] reads an OCI layout directory, an OCI archive or a docker-archive, picks the
//! image by reference and platform (or takes a root filesystem tarball or a directory as the
//! one layer), streams each layer (gzip, zstd or plain, sniffed by magic)
//! while verifying its digest and diff_id, and merges the layers with whiteout semantics into an
//! in-memory tree ([`MergedTree`]). File contents go straight to their final blocks in the output
//! image (RAW, ASIF or qcow2, created under a temporary name) while the layer is decoded; what a
//! later layer deletes gives its blocks back and is discarded. diskkit's own ext4 writer then
//! lays out the metadata around the data, and the image is renamed into place. Nothing is left
//! behind on error.
#![forbid(unsafe_code)]

mod decode;
#[doc(hidden)]
pub mod fuzzing;
mod layer;
mod merge;
mod placement;
mod plain;
mod source;
mod store;
mod tree;

use std::path::Path;
use std::rc::Rc;

use diskkit::{CreateOptions, DiskImage, Error, ImageFormat, Result};
use diskkit_ext4::writer::{Options, Plan};
use sha2::{Digest, Sha256};

pub use merge::MergedTree;
pub use source::{select, Input, Platform, SelectedImage};
pub use store::{unpack_to_store, StoreEntry};

/// How to unpack.
#[derive(Clone, Debug)]
pub struct UnpackOptions {
    /// Image reference (tag, `ref.name` annotation) or manifest digest.
    pub reference: Option<String>,
    /// Platform; `None` means the host's.
    pub platform: Option<Platform>,
    /// Output container format (RAW or ASIF).
    pub format: ImageFormat,
    /// Filesystem size; `None` for compact.
    pub size: Option<u64>,
    /// Fixed UUID, hash seed and timestamps derived from the manifest digest.
    pub reproducible: bool,
    /// Replace an existing output.
    pub overwrite: bool,
    /// Write ext4 metadata checksums (`metadata_csum`).
    pub metadata_csum: bool,
    /// Add an internal ext4 journal (for roots that boot read-write; see
    /// [`diskkit_ext4::writer::Options::journal`]).
    pub journal: bool,
    /// Filesystem label (at most 16 bytes); none when empty.
    pub label: String,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            reference: None,
            platform: None,
            format: ImageFormat::Raw,
            size: None,
            reproducible: false,
            overwrite: false,
            metadata_csum: false,
            journal: false,
            label: String::new(),
        }
    }
}

/// Progress events.
pub trait Progress {
    /// Layer `index` (0-based) of `count` starts; `size` is its blob size if known. The
    /// returned callback, if any, is called with the bytes of the blob read so far.
    fn layer_start(
        &mut self,
        index: usize,
        count: usize,
        digest: &str,
        size: Option<u64>,
    ) -> Option<Rc<dyn Fn(u64)>>;
    /// The current layer is done.
    fn layer_done(&mut self);
}

/// A progress sink that reports nothing.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn layer_start(&mut self, _: usize, _: usize, _: &str, _: Option<u64>) -> Option<Rc<dyn Fn(u64)>> {
        None
    }
    fn layer_done(&mut self) {}
}

/// What [`unpack`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnpackReport {
    /// What the input was.
    pub input: Input,
    /// Digest of the manifest unpacked; for a tarball or a directory, of the (uncompressed)
    /// tar stream it was read as.
    pub manifest_digest: String,
    /// Layers applied.
    pub layers: usize,
    /// Filesystem size in bytes.
    pub fs_size: u64,
    /// Inodes used.
    pub inodes: u64,
    /// Bytes of file data in the final tree plus metadata (blocks used × 4096).
    pub bytes_used: u64,
}

/// Unpack the image at `src` into a new ext4 image at `dst`. `src` is an OCI layout
/// directory, an OCI archive, a docker-archive or an Apple `container` store; or a root
/// filesystem tarball (plain, gzip or zstd) or a directory, applied as one layer.
pub fn unpack(
    src: &Path,
    dst: &Path,
    options: &UnpackOptions,
    progress: &mut dyn Progress,
) -> Result<UnpackReport> {
    let image = select_for(src, options)?;
    unpack_selected(&image, dst, options, progress)
}

fn select_for(src: &Path, options: &UnpackOptions) -> Result<SelectedImage> {
    let platform = options.platform.clone().unwrap_or_else(Platform::host);
    source::select(
        src,
        options.reference.as_deref(),
        &platform,
        options.platform.is_some(),
    )
}

/// Unpack an image already chosen with [`select`] into a new ext4 image at `dst`.
pub fn unpack_selected(
    image: &SelectedImage,
    dst: &Path,
    options: &UnpackOptions,
    progress: &mut dyn Progress,
) -> Result<UnpackReport> {
    // The filesystem's block limit: the requested size, or what ext4 without `64bit` holds.
    let (limit, first_size) = match options.size {
        Some(s) => (s / 4096, s / 4096 * 4096),
        None => {
            let limit = u64::from(u32::MAX);
            (limit, placement::Placer::first_size(limit))
        }
    };
    if limit == 0 {
        return Err(Error::invalid_argument(
            "the requested size is below one 4 KiB block",
        ));
    }
    let create = match options.format {
        ImageFormat::Asif => CreateOptions::asif(first_size / 4096, 4096),
        f => CreateOptions::new(f, first_size),
    }
    .overwrite(options.overwrite);
    let pending = DiskImage::create_pending(dst, &create)?;
    let mut placer = placement::Placer::new(pending.image(), limit, options.size.is_some());
    let mut tree = MergedTree::new();
    let count = image.layers.len();
    let info = |i: usize| -> Result<layer::LayerInfo> {
        let l = &image.layers[i];
        Ok(layer::LayerInfo {
            digest: l.digest.clone(),
            size: l.size,
            diff_id: l.diff_id.clone(),
            media_type: l.media_type.clone(),
            name: l.digest.clone().unwrap_or_else(|| l.member.clone()),
            index: u32::try_from(i).map_err(|_| Error::unsupported("more than 2^32 layers"))?,
        })
    };
    let start = |i: usize| -> Result<(layer::LayerInfo, decode::Decoded)> {
        let info = info(i)?;
        let decoded = layer::start_layer(image.open_layer(&image.layers[i])?, &info)?;
        Ok((info, decoded))
    };
    let mut next = if count > 0 { Some(start(0)?) } else { None };
    let mut content_digest = None;
    for (i, l) in image.layers.iter().enumerate() {
        let Some((info, decoded)) = next.take() else {
            break;
        };
        let tick = progress.layer_start(i, count, &info.name, l.size);
        // The next layer starts decoding while this one is applied.
        if i + 1 < count {
            next = Some(start(i + 1)?);
        }
        let digests =
            layer::apply_layer(decoded, &info, &mut tree, &mut placer, tick).map_err(|e| e.with_path(dst))?;
        content_digest = Some(format!("sha256:{}", digests.diff));
        progress.layer_done();
    }
    placer.finish().map_err(|e| e.with_path(dst))?;
    let fs_tree = tree.to_tree()?;
    // A tarball or a directory is named by its content (the same tar stream, compressed or
    // not, gives the same digest).
    let manifest_digest = match image.input {
        source::Input::Image => image.manifest_digest.clone(),
        _ => content_digest.unwrap_or_default(),
    };
    let mut fs_options = Options {
        size: options.size,
        metadata_csum: options.metadata_csum,
        journal: options.journal,
        label: options.label.as_bytes().to_vec(),
        ..Options::default()
    };
    if options.reproducible {
        let d = Sha256::digest(manifest_digest.as_bytes());
        fs_options.uuid.copy_from_slice(&d[..16]);
        fs_options.uuid[6] = (fs_options.uuid[6] & 0x0f) | 0x40;
        fs_options.uuid[8] = (fs_options.uuid[8] & 0x3f) | 0x80;
        fs_options.hash_seed.copy_from_slice(&d[16..32]);
        fs_options.time = std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
    } else {
        fs_options.uuid = random16()?;
        fs_options.hash_seed = random16()?;
        fs_options.time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
    }
    let plan = Plan::new_sparse(&fs_tree, fs_options, &mut placer)?;
    let size = plan.size_bytes();
    if options.size.is_none() {
        // Compact: every placed block lies below the planned end.
        pending
            .image()
            .resize(size)
            .map_err(|e| e.with_path(dst).with_operation("sizing the image"))?;
    }
    plan.write(pending.image(), &mut placer)
        .map_err(|e| e.with_path(dst))?;
    drop(placer);
    pending.persist()?;
    Ok(UnpackReport {
        input: image.input,
        manifest_digest,
        layers: count,
        fs_size: size,
        inodes: plan.inodes_used(),
        bytes_used: plan.blocks_used() * 4096,
    })
}

fn random16() -> Result<[u8; 16]> {
    let mut b = [0u8; 16];
    let mut f = std::fs::File::open("/dev/urandom").map_err(Error::io)?;
    std::io::Read::read_exact(&mut f, &mut b).map_err(Error::io)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(b)
}
