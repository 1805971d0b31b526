//! Extended attributes: name indexes, POSIX ACL conversion, and the in-inode and block layouts.

use diskkit::{Error, Result};

use super::BLOCK_SIZE;

/// Magic of the in-inode xattr area and of an xattr block.
const XATTR_MAGIC: u32 = 0xEA02_0000;
/// Bytes of in-inode xattr space after the magic (256-byte inode, extra_isize 32).
pub(crate) const INODE_XATTR_SPACE: usize = 256 - 128 - 32 - 4;
/// Size of an xattr block header.
const BLOCK_HEADER: usize = 32;

/// One attribute in on-disk form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Attr {
    index: u8,
    name: Vec<u8>,
    value: Vec<u8>,
}

impl Attr {
    fn entry_size(&self) -> usize {
        (16 + self.name.len() + 3) & !3
    }

    fn value_size(&self) -> usize {
        (self.value.len() + 3) & !3
    }
}

/// Attributes split between the inode body and an optional block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Placed {
    /// In-inode area (magic + entries + values), empty if there are no in-inode attributes.
    pub(crate) inline: Vec<u8>,
    /// Block contents, if some attributes spill.
    pub(crate) block: Option<Vec<u8>>,
}

/// Convert full names and values, then place them in the inode and, if needed, a block.
pub(crate) fn place(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<Placed> {
    let mut attrs = Vec::with_capacity(xattrs.len());
    for (name, value) in xattrs {
        let (index, suffix) = split_name(name)?;
        let value = if index == 2 || index == 3 {
            acl_to_disk(value)
                .map_err(|m| Error::invalid_argument(format!("{}: {m}", String::from_utf8_lossy(name))))?
        } else {
            value.clone()
        };
        if suffix.len() > 255 {
            return Err(Error::invalid_argument(format!(
                "xattr name too long: {}",
                String::from_utf8_lossy(name)
            )));
        }
        attrs.push(Attr {
            index,
            name: suffix.to_vec(),
            value,
        });
    }
    // Block entries must be sorted by (index, name length, name); use the same order inline.
    attrs.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));
    attrs.dedup_by(|a, b| a.index == b.index && a.name == b.name);

    let mut inline = Vec::new();
    let mut spill = Vec::new();
    let mut used = 4; // terminator
    for a in attrs {
        let need = a.entry_size() + a.value_size();
        if spill.is_empty() && used + need <= INODE_XATTR_SPACE {
            used += need;
            inline.push(a);
        } else {
            spill.push(a);
        }
    }
    let inline_bytes = if inline.is_empty() {
        Vec::new()
    } else {
        let mut area = vec![0u8; 4 + INODE_XATTR_SPACE];
        area[..4].copy_from_slice(&XATTR_MAGIC.to_le_bytes());
        layout_entries(&inline, &mut area[4..], 0)?;
        area
    };
    let block = if spill.is_empty() {
        None
    } else {
        let mut blk = vec![0u8; BLOCK_SIZE];
        let hashes = layout_entries(&spill, &mut blk, BLOCK_HEADER)?;
        let mut h: u32 = 0;
        for eh in hashes {
            h = (h << 16) ^ (h >> 16) ^ eh;
        }
        blk[0..4].copy_from_slice(&XATTR_MAGIC.to_le_bytes());
        blk[4..8].copy_from_slice(&1u32.to_le_bytes()); // refcount
        blk[8..12].copy_from_slice(&1u32.to_le_bytes()); // blocks
        blk[12..16].copy_from_slice(&h.to_le_bytes());
        Some(blk)
    };
    Ok(Placed {
        inline: inline_bytes,
        block,
    })
}

/// Lay out entries from `first` and values from the end of `area`; value offsets are relative
/// to the start of `area` (block) or to the first entry (inode, `first` = 0). Returns hashes.
fn layout_entries(attrs: &[Attr], area: &mut [u8], first: usize) -> Result<Vec<u32>> {
    let mut pos = first;
    let mut vend = area.len();
    let mut hashes = Vec::with_capacity(attrs.len());
    for a in attrs {
        let vsize = a.value_size();
        let entry_end = pos + a.entry_size();
        if vend < vsize || entry_end + 4 > vend - vsize {
            return Err(Error::unsupported(format!(
                "extended attributes do not fit in one {BLOCK_SIZE}-byte block (at {})",
                String::from_utf8_lossy(&a.name)
            )));
        }
        let voff = if a.value.is_empty() { 0 } else { vend - vsize };
        if !a.value.is_empty() {
            area[voff..voff + a.value.len()].copy_from_slice(&a.value);
            vend = voff;
        }
        let hash = entry_hash(&a.name, &a.value);
        let e = &mut area[pos..entry_end];
        e[0] = a.name.len() as u8;
        e[1] = a.index;
        e[2..4].copy_from_slice(&(voff as u16).to_le_bytes());
        e[4..8].copy_from_slice(&0u32.to_le_bytes());
        e[8..12].copy_from_slice(&(a.value.len() as u32).to_le_bytes());
        e[12..16].copy_from_slice(&hash.to_le_bytes());
        e[16..16 + a.name.len()].copy_from_slice(&a.name);
        hashes.push(hash);
        pos = entry_end;
    }
    Ok(hashes)
}

/// The ext4 entry hash (`ext4_xattr_hash_entry`, signed-char variant).
fn entry_hash(name: &[u8], value: &[u8]) -> u32 {
    let mut hash: u32 = 0;
    for &c in name {
        hash = (hash << 5) ^ (hash >> 27) ^ (c as i8 as i32 as u32);
    }
    for chunk in value.chunks(4) {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        hash = (hash << 16) ^ (hash >> 16) ^ u32::from_le_bytes(w);
    }
    hash
}

fn split_name(name: &[u8]) -> Result<(u8, &[u8])> {
    const PREFIXES: [(&[u8], u8); 4] = [
        (b"user.", 1),
        (b"trusted.", 4),
        (b"security.", 6),
        (b"system.", 7),
    ];
    if name == b"system.posix_acl_access" {
        return Ok((2, b""));
    }
    if name == b"system.posix_acl_default" {
        return Ok((3, b""));
    }
    for (p, idx) in PREFIXES {
        if let Some(rest) = name.strip_prefix(p) {
            if rest.is_empty() {
                break;
            }
            return Ok((idx, rest));
        }
    }
    Err(Error::unsupported(format!(
        "extended attribute namespace of {}",
        String::from_utf8_lossy(name)
    )))
}

/// Convert a POSIX ACL from the user-space xattr format (version 2, 8-byte entries) to ext4's
/// on-disk format (version 1, 4-byte entries for the `*_OBJ`, `MASK` and `OTHER` tags).
fn acl_to_disk(v: &[u8]) -> std::result::Result<Vec<u8>, String> {
    if v.len() < 4 || (v.len() - 4) % 8 != 0 || u32::from_le_bytes([v[0], v[1], v[2], v[3]]) != 2 {
        return Err("malformed POSIX ACL value".into());
    }
    let mut out = Vec::with_capacity(v.len());
    out.extend_from_slice(&1u32.to_le_bytes());
    for e in v[4..].chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        out.extend_from_slice(&e[0..4]);
        match tag {
            0x01 | 0x04 | 0x10 | 0x20 => {}
            0x02 | 0x08 => out.extend_from_slice(&e[4..8]),
            _ => return Err(format!("unknown POSIX ACL tag {tag:#x}")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_attrs_stay_inline() {
        let p = place(&[(b"user.a".to_vec(), b"1".to_vec())]).unwrap();
        assert_eq!(p.inline.len(), 96);
        assert!(p.block.is_none());
    }

    #[test]
    fn big_attrs_spill() {
        let p = place(&[
            (b"user.a".to_vec(), vec![1; 40]),
            (b"user.b".to_vec(), vec![2; 200]),
        ])
        .unwrap();
        assert!(!p.inline.is_empty());
        assert!(p.block.is_some());
        assert!(place(&[(b"user.big".to_vec(), vec![0; 5000])]).is_err());
    }

    #[test]
    fn acl_conversion() {
        let mut v = 2u32.to_le_bytes().to_vec();
        v.extend_from_slice(&[1, 0, 6, 0, 0xff, 0xff, 0xff, 0xff]);
        v.extend_from_slice(&[2, 0, 7, 0, 0xe8, 3, 0, 0]);
        let d = acl_to_disk(&v).unwrap();
        assert_eq!(d, [1, 0, 0, 0, 1, 0, 6, 0, 2, 0, 7, 0, 0xe8, 3, 0, 0]);
        assert!(acl_to_disk(b"xx").is_err());
        assert!(split_name(b"bogus.x").is_err());
    }
}
