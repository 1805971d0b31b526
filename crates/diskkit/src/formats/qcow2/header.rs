//! The qcow2 header (offset 0, big-endian) and its extensions.
//!
//! Field names follow QEMU's `docs/interop/qcow2.txt`. Every field is checked against the file
//! length before anything is sized by it.

use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;

/// `QFI\xfb`.
pub(super) const MAGIC: u32 = 0x5146_49fb;
/// Smallest and largest cluster sizes QEMU accepts (512 B .. 2 MiB).
pub(super) const MIN_CLUSTER_BITS: u32 = 9;
pub(super) const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on the L1 table (`QCOW_MAX_L1_SIZE`, 32 MiB).
pub(super) const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (`QCOW_MAX_REFTABLE_SIZE`, 8 MiB).
pub(super) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// The longest backing file name QEMU accepts.
pub(super) const MAX_BACKING_NAME: u32 = 1023;
/// Length of the version 3 header diskkit writes (with the compression type byte, padded).
pub(super) const V3_HEADER_LEN: u32 = 112;

/// Incompatible feature bits.
pub(super) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(super) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(super) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(super) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(super) const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature bit: lazy refcounts.
pub(super) const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// diskkit's layer extension (see `layer_ext.rs`); QEMU keeps extensions it does not know.
pub(super) const EXT_DISKKIT_LAYER: u32 = 0x646b_6c79;

/// Byte offsets of fields rewritten in place.
pub(super) const OFF_SIZE: u64 = 24;
pub(super) const OFF_REFTABLE: u64 = 48;
pub(super) const OFF_AUTOCLEAR: u64 = 88;
pub(super) const OFF_INCOMPATIBLE: u64 = 72;

/// The fixed fields of a version 2 header (72 bytes).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct RawHeaderV2 {
    pub(super) magic: U32,
    pub(super) version: U32,
    pub(super) backing_file_offset: U64,
    pub(super) backing_file_size: U32,
    pub(super) cluster_bits: U32,
    pub(super) size: U64,
    pub(super) crypt_method: U32,
    pub(super) l1_size: U32,
    pub(super) l1_table_offset: U64,
    pub(super) refcount_table_offset: U64,
    pub(super) refcount_table_clusters: U32,
    pub(super) nb_snapshots: U32,
    pub(super) snapshots_offset: U64,
}

/// The version 3 additions (bytes 72..104).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct RawHeaderV3 {
    pub(super) incompatible_features: U64,
    pub(super) compatible_features: U64,
    pub(super) autoclear_features: U64,
    pub(super) refcount_order: U32,
    pub(super) header_length: U32,
}

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (QEMU's default).
    Zlib,
    /// Zstandard.
    Zstd,
}

impl CompressionType {
    /// `"zlib"` or `"zstd"`.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// A parsed and validated header.
#[derive(Debug, Clone)]
pub(super) struct Header {
    pub(super) version: u32,
    pub(super) cluster_bits: u32,
    pub(super) size: u64,
    pub(super) l1_size: u64,
    pub(super) l1_table_offset: u64,
    pub(super) refcount_table_offset: u64,
    pub(super) refcount_table_clusters: u64,
    pub(super) nb_snapshots: u32,
    /// Where the snapshot table starts (checked by the consistency check, not here).
    pub(super) snapshots_offset: u64,
    pub(super) incompatible: u64,
    pub(super) compatible: u64,
    pub(super) autoclear: u64,
    pub(super) refcount_order: u32,
    pub(super) compression: CompressionType,
    pub(super) backing_file: Option<String>,
    pub(super) backing_format: Option<String>,
    /// Bytes of the fixed header (72 or `header_length`).
    pub(super) header_length: u32,
    /// Every header extension but the end marker, in order: (type, offset of its data, data).
    pub(super) extensions: Vec<(u32, u64, Vec<u8>)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(w)
}

impl Header {
    /// Parse the first cluster of a file (`bytes` holds at least the first cluster or the
    /// whole file, zero-padded to 2 MiB at most). `file_len` bounds every offset. Images with
    /// the dirty or corrupt bit are refused (see [`Header::parse_for_check`]).
    pub(super) fn parse(bytes: &[u8], file_len: u64) -> Result<Header> {
        let h = Header::parse_for_check(bytes, file_len)?;
        if h.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(Error::corrupt(
                "qcow2 image is marked corrupt; check and repair it with `diskkit check --repair all` first",
            ));
        }
        if h.incompatible & INCOMPAT_DIRTY != 0 {
            return Err(Error::corrupt(
                "qcow2 image has the dirty bit set (it was not closed cleanly and its refcounts may be \
                 stale); repair it with `diskkit check --repair all` first (library: `OpenOptions::repair`)",
            ));
        }
        Ok(h)
    }

    /// Like [`Header::parse`], but images with the dirty or corrupt bit parse too: for the
    /// consistency check, which is how they are repaired.
    pub(super) fn parse_for_check(bytes: &[u8], file_len: u64) -> Result<Header> {
        let (v2, rest) = RawHeaderV2::ref_from_prefix(bytes)
            .map_err(|_| Error::invalid_format("file too short for a qcow2 header"))?;
        if v2.magic.get() != MAGIC {
            return Err(Error::invalid_format("not a qcow2 image (bad magic)"));
        }
        let version = v2.version.get();
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!(
                "qcow2 version {version} (only 2 and 3)"
            )));
        }
        let cluster_bits = v2.cluster_bits.get();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::corrupt(format!(
                "qcow2 cluster_bits {cluster_bits} is outside 9..=21"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        if file_len < 72 {
            return Err(Error::corrupt(format!(
                "qcow2 file is truncated ({file_len} bytes)"
            )));
        }
        let (mut incompatible, mut compatible, mut autoclear, mut refcount_order, mut header_length) =
            (0, 0, 0, 4, 72u32);
        let mut compression = CompressionType::Zlib;
        if version == 3 {
            let v3 = RawHeaderV3::ref_from_prefix(rest)
                .map_err(|_| Error::corrupt("qcow2 version 3 header is truncated"))?
                .0;
            incompatible = v3.incompatible_features.get();
            compatible = v3.compatible_features.get();
            autoclear = v3.autoclear_features.get();
            refcount_order = v3.refcount_order.get();
            header_length = v3.header_length.get();
            if header_length < 104 || u64::from(header_length) > cluster_size || header_length % 8 != 0 {
                return Err(Error::corrupt(format!(
                    "qcow2 header_length {header_length} is invalid"
                )));
            }
            if refcount_order > 6 {
                return Err(Error::corrupt(format!(
                    "qcow2 refcount_order {refcount_order} is above 6"
                )));
            }
            if header_length > 104 {
                compression = match bytes.get(104).copied().unwrap_or(0) {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    t => return Err(Error::unsupported(format!("qcow2 compression type {t}"))),
                };
            }
            if (compression != CompressionType::Zlib) != (incompatible & INCOMPAT_COMPRESSION != 0) {
                return Err(Error::corrupt(
                    "qcow2 compression type and its incompatible feature bit disagree",
                ));
            }
        }
        let header_length_u = header_length as usize;
        let mut backing_format = None;
        let mut data_file = None;
        let mut feature_names = Vec::new();
        let mut extensions = Vec::new();
        // Header extensions follow the header, each 8-byte aligned, until the end marker.
        let limit = (cluster_size as usize).min(bytes.len());
        let mut pos = header_length_u;
        while pos + 8 <= limit {
            let ty = be32(bytes, pos);
            let len = be32(bytes, pos + 4) as usize;
            if ty == EXT_END {
                break;
            }
            let data_start = pos + 8;
            let data_end = data_start
                .checked_add(len)
                .filter(|&e| e <= limit)
                .ok_or_else(|| {
                    Error::corrupt(format!(
                        "qcow2 header extension {ty:#x} overruns the header cluster"
                    ))
                })?;
            let data = &bytes[data_start..data_end];
            extensions.push((ty, data_start as u64, data.to_vec()));
            match ty {
                EXT_BACKING_FORMAT => backing_format = Some(String::from_utf8_lossy(data).into_owned()),
                EXT_DATA_FILE => data_file = Some(String::from_utf8_lossy(data).into_owned()),
                EXT_FEATURE_NAMES => {
                    for e in data.chunks_exact(48) {
                        let name = e[2..].split(|&b| b == 0).next().unwrap_or(&[]);
                        feature_names.push((e[0], e[1], String::from_utf8_lossy(name).into_owned()));
                    }
                }
                _ => {}
            }
            pos = data_start + len.next_multiple_of(8);
        }
        // Refuse what diskkit must not or cannot open (the dirty and corrupt bits: in `parse`).
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            let name = data_file.unwrap_or_else(|| "(unnamed)".to_string());
            return Err(Error::new(
                ErrorKind::PolicyDenied,
                format!("qcow2 image keeps its data in the external data file '{name}', which diskkit does not open"),
            ));
        }
        if incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(Error::unsupported(
                "qcow2 images with extended L2 entries (subclusters)",
            ));
        }
        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| {
                    feature_names
                        .iter()
                        .find(|(t, bit, _)| *t == 0 && u32::from(*bit) == b)
                        .map_or_else(|| format!("bit {b}"), |(_, _, n)| format!("'{n}' (bit {b})"))
                })
                .collect();
            return Err(Error::unsupported(format!(
                "qcow2 incompatible features {}",
                names.join(", ")
            )));
        }
        if v2.crypt_method.get() != 0 {
            return Err(Error::unsupported("encrypted qcow2 images"));
        }
        let cluster_aligned = |what: &str, off: u64| -> Result<()> {
            if off % cluster_size != 0 || off == 0 {
                return Err(Error::corrupt(format!(
                    "qcow2 {what} offset {off:#x} is not a cluster offset"
                )));
            }
            Ok(())
        };
        let within = |what: &str, off: u64, len: u64| -> Result<()> {
            match off.checked_add(len) {
                Some(end) if end <= file_len => Ok(()),
                _ => Err(Error::corrupt(format!(
                    "qcow2 {what} ({len} bytes at {off:#x}) lies past the end of the file ({file_len} bytes)"
                ))),
            }
        };
        let size = v2.size.get();
        let l1_size = u64::from(v2.l1_size.get());
        let l1_table_offset = v2.l1_table_offset.get();
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(Error::corrupt(format!(
                "qcow2 L1 table of {l1_size} entries is too large"
            )));
        }
        let per_l1 = cluster_size * (cluster_size / 8);
        let needed = size.div_ceil(per_l1);
        if l1_size < needed {
            return Err(Error::corrupt(format!(
                "qcow2 L1 table has {l1_size} entries, {needed} are needed for {size} bytes"
            )));
        }
        if l1_size > 0 {
            cluster_aligned("L1 table", l1_table_offset)?;
            within("L1 table", l1_table_offset, l1_size * 8)?;
        }
        let refcount_table_offset = v2.refcount_table_offset.get();
        let refcount_table_clusters = u64::from(v2.refcount_table_clusters.get());
        cluster_aligned("refcount table", refcount_table_offset)?;
        if refcount_table_clusters == 0
            || refcount_table_clusters * cluster_size > MAX_REFTABLE_BYTES.max(cluster_size)
        {
            return Err(Error::corrupt(format!(
                "qcow2 refcount table of {refcount_table_clusters} clusters is invalid"
            )));
        }
        within(
            "refcount table",
            refcount_table_offset,
            refcount_table_clusters * cluster_size,
        )?;
        let backing_file = if v2.backing_file_offset.get() != 0 {
            let off = v2.backing_file_offset.get();
            let len = v2.backing_file_size.get();
            if len == 0 || len > MAX_BACKING_NAME {
                return Err(Error::corrupt(format!(
                    "qcow2 backing file name length {len} is invalid"
                )));
            }
            let end = off
                .checked_add(u64::from(len))
                .filter(|&e| e <= cluster_size && e <= bytes.len() as u64)
                .ok_or_else(|| Error::corrupt("qcow2 backing file name lies outside the header cluster"))?;
            let raw = &bytes[off as usize..end as usize];
            Some(
                String::from_utf8(raw.to_vec())
                    .map_err(|_| Error::corrupt("qcow2 backing file name is not UTF-8"))?,
            )
        } else {
            None
        };
        Ok(Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots: v2.nb_snapshots.get(),
            snapshots_offset: v2.snapshots_offset.get(),
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            compression,
            backing_file,
            header_length,
            extensions,
            backing_format: if v2.backing_file_offset.get() != 0 {
                backing_format
            } else {
                None
            },
        })
    }
}

/// What [`build`] writes into a new image's first cluster.
pub(super) struct NewHeader<'a> {
    pub(super) cluster_bits: u32,
    pub(super) size: u64,
    pub(super) l1_size: u32,
    pub(super) l1_table_offset: u64,
    pub(super) refcount_table_offset: u64,
    pub(super) refcount_table_clusters: u32,
    pub(super) backing: Option<(&'a str, Option<&'a str>)>,
    /// diskkit's layer extension data.
    pub(super) layer_ext: Option<Vec<u8>>,
}

/// The bytes of a new version 3 header with its extensions (at most one cluster).
pub(super) fn build(h: &NewHeader<'_>) -> Result<Vec<u8>> {
    let mut out = vec![0u8; V3_HEADER_LEN as usize];
    let v2 = RawHeaderV2 {
        magic: MAGIC.into(),
        version: 3.into(),
        backing_file_offset: 0.into(),
        backing_file_size: 0.into(),
        cluster_bits: h.cluster_bits.into(),
        size: h.size.into(),
        crypt_method: 0.into(),
        l1_size: h.l1_size.into(),
        l1_table_offset: h.l1_table_offset.into(),
        refcount_table_offset: h.refcount_table_offset.into(),
        refcount_table_clusters: h.refcount_table_clusters.into(),
        nb_snapshots: 0.into(),
        snapshots_offset: 0.into(),
    };
    out[..72].copy_from_slice(v2.as_bytes());
    let v3 = RawHeaderV3 {
        incompatible_features: 0.into(),
        compatible_features: 0.into(),
        autoclear_features: 0.into(),
        refcount_order: 4.into(),
        header_length: V3_HEADER_LEN.into(),
    };
    out[72..104].copy_from_slice(v3.as_bytes());
    let push_ext = |out: &mut Vec<u8>, ty: u32, data: &[u8]| {
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(8), 0);
    };
    if let Some((_, Some(fmt))) = h.backing {
        push_ext(&mut out, EXT_BACKING_FORMAT, fmt.as_bytes());
    }
    // The feature name table, as QEMU writes it, so tools can name the bits.
    let mut names = Vec::new();
    for (ty, bit, name) in [
        (0u8, 0u8, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ] {
        let mut e = [0u8; 48];
        e[0] = ty;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        names.extend_from_slice(&e);
    }
    // The table does not fit next to the other extensions in a 512-byte cluster: leave it out
    // there (it only names bits for error messages).
    if h.cluster_bits >= 10 {
        push_ext(&mut out, EXT_FEATURE_NAMES, &names);
    }
    if let Some(d) = &h.layer_ext {
        push_ext(&mut out, EXT_DISKKIT_LAYER, d);
    }
    push_ext(&mut out, EXT_END, &[]);
    if let Some((name, _)) = h.backing {
        if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
            return Err(Error::invalid_argument(format!(
                "backing file name must be 1 to {MAX_BACKING_NAME} bytes"
            )));
        }
        let off = out.len() as u64;
        out.extend_from_slice(name.as_bytes());
        out[8..16].copy_from_slice(&off.to_be_bytes());
        out[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    }
    if out.len() as u64 > 1u64 << h.cluster_bits {
        return Err(Error::invalid_argument(
            "the qcow2 header and backing file name do not fit in one cluster",
        ));
    }
    Ok(out)
}

/// The header cluster's bytes rewritten with a new backing file and extension set: the fixed
/// fields of `fixed` (the first `header_length` bytes of the current header) are kept, except
/// the backing file fields; extensions of type `replace` are dropped and `add` appended.
pub(super) fn rebuild(
    fixed: &[u8],
    extensions: &[(u32, Vec<u8>)],
    backing: Option<&str>,
    cluster_size: u64,
) -> Result<Vec<u8>> {
    let mut out = fixed.to_vec();
    for (ty, data) in extensions {
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out.extend_from_slice(&[0u8; 8]);
    let (off, len) = match backing {
        Some(name) => {
            if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
                return Err(Error::invalid_argument(format!(
                    "backing file name must be 1 to {MAX_BACKING_NAME} bytes"
                )));
            }
            let off = out.len() as u64;
            out.extend_from_slice(name.as_bytes());
            (off, name.len() as u32)
        }
        None => (0, 0),
    };
    out[8..16].copy_from_slice(&off.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    if out.len() as u64 > cluster_size {
        return Err(Error::invalid_argument(
            "the qcow2 header, its extensions and the backing file name do not fit in one cluster",
        ));
    }
    Ok(out)
}

/// The feature name table extension's type.
pub(super) fn feature_names_ext() -> u32 {
    EXT_FEATURE_NAMES
}

/// The backing format extension's type.
pub(super) fn backing_format_ext() -> u32 {
    EXT_BACKING_FORMAT
}

/// The file's length and its first bytes: up to the largest cluster, which holds the header
/// and every extension.
pub(super) fn read_head(storage: &dyn Storage) -> Result<(Vec<u8>, u64)> {
    let file_len = storage.len()?;
    let mut head = vec![0u8; file_len.min(1 << MAX_CLUSTER_BITS) as usize];
    storage.read_at(&mut head, 0)?;
    Ok((head, file_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> Vec<u8> {
        let mut b = build(&NewHeader {
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            backing: Some(("base.raw", Some("raw"))),
            layer_ext: None,
        })
        .unwrap();
        b.resize(1 << 16, 0);
        b
    }

    fn set(b: &mut [u8], at: usize, v: &[u8]) {
        b[at..at + v.len()].copy_from_slice(v);
    }

    const LEN: u64 = 4 << 16;

    #[test]
    fn parses_what_it_builds() {
        let h = Header::parse(&fresh(), LEN).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.size, 1 << 30);
        assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert_eq!(h.compression, CompressionType::Zlib);
    }

    #[test]
    fn rejects_bad_magic() {
        let mut b = fresh();
        b[0] = b'X';
        assert_eq!(
            Header::parse(&b, LEN).unwrap_err().kind(),
            ErrorKind::InvalidFormat
        );
    }

    #[test]
    fn rejects_dirty_and_corrupt_bits() {
        for bit in [INCOMPAT_DIRTY, INCOMPAT_CORRUPT] {
            let mut b = fresh();
            set(&mut b, 72, &bit.to_be_bytes());
            let e = Header::parse(&b, LEN).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt);
            assert!(e.to_string().contains("diskkit check --repair all"), "{e}");
            let h = Header::parse_for_check(&b, LEN).unwrap();
            assert_eq!(h.incompatible, bit);
        }
    }

    #[test]
    fn rejects_external_data_file() {
        let mut b = fresh();
        set(&mut b, 72, &INCOMPAT_DATA_FILE.to_be_bytes());
        assert_eq!(
            Header::parse(&b, LEN).unwrap_err().kind(),
            ErrorKind::PolicyDenied
        );
    }

    #[test]
    fn rejects_unknown_incompatible_feature() {
        let mut b = fresh();
        set(&mut b, 72, &(1u64 << 40).to_be_bytes());
        let e = Header::parse(&b, LEN).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("bit 40"), "{e}");
    }

    #[test]
    fn rejects_extended_l2_and_encryption() {
        let mut b = fresh();
        set(&mut b, 72, &INCOMPAT_EXTL2.to_be_bytes());
        assert_eq!(Header::parse(&b, LEN).unwrap_err().kind(), ErrorKind::Unsupported);
        let mut b = fresh();
        set(&mut b, 32, &1u32.to_be_bytes());
        assert_eq!(Header::parse(&b, LEN).unwrap_err().kind(), ErrorKind::Unsupported);
    }

    #[test]
    fn rejects_bad_geometry() {
        let mut b = fresh();
        set(&mut b, 20, &22u32.to_be_bytes());
        assert_eq!(Header::parse(&b, LEN).unwrap_err().kind(), ErrorKind::Corrupt);
        let mut b = fresh();
        set(&mut b, 36, &1u32.to_be_bytes()); // L1 too small for 1 GiB at 64 KiB clusters
        assert_eq!(Header::parse(&b, LEN).unwrap_err().kind(), ErrorKind::Corrupt);
        let mut b = fresh();
        set(&mut b, 40, &(100u64 << 16).to_be_bytes()); // L1 past the end of the file
        assert_eq!(Header::parse(&b, LEN).unwrap_err().kind(), ErrorKind::Corrupt);
        let mut b = fresh();
        set(&mut b, 48, &12345u64.to_be_bytes()); // unaligned refcount table
        assert_eq!(Header::parse(&b, LEN).unwrap_err().kind(), ErrorKind::Corrupt);
        let mut b = fresh();
        set(&mut b, 96, &7u32.to_be_bytes());
        assert_eq!(Header::parse(&b, LEN).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn rejects_overlong_extension_and_backing_name() {
        let mut b = fresh();
        set(&mut b, 116, &0xffff_fff0u32.to_be_bytes());
        assert_eq!(Header::parse(&b, LEN).unwrap_err().kind(), ErrorKind::Corrupt);
        let mut b = fresh();
        set(&mut b, 16, &2000u32.to_be_bytes());
        assert_eq!(Header::parse(&b, LEN).unwrap_err().kind(), ErrorKind::Corrupt);
    }
}
