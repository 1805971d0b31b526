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
mod pull;
mod push;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

pub use self::pull::{format_from_extension, pull_disk, DiskPullOptions, DiskPullReport};
pub use self::push::{push_disk, DiskPushOptions, DiskPushReport};

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

#[cfg(test)]
mod tests {
    use super::push::{now_iso, zero_slice_encoding};
    use super::*;
    use crate::registry::manifest;

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
