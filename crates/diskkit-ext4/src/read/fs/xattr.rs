//! Extended attributes: in the inode (after `i_extra_isize`), in one attribute block
//! (`i_file_acl`, checksummed with `metadata_csum`), and values stored in their own inode
//! (`ea_inode`). POSIX ACLs are returned in the kernel's `getxattr` format.

use diskkit::{Error, Result};

use super::bytes::{le16, le32, slice};
use super::inode::{Inode, FLAG_EA_INODE};
use super::superblock::{COMPAT_EXT_ATTR, INCOMPAT_EA_INODE, INCOMPAT_INLINE_DATA};
use super::Fs;
use crate::crc::crc32c;

const MAGIC: u32 = 0xEA02_0000;
const BLOCK_HEADER: usize = 32;
const ENTRY_HEADER: usize = 16;
/// Largest value read from an `ea_inode`.
const MAX_VALUE: u64 = 16 << 20;
/// The inline-data attribute (`system.data`).
pub(crate) const INDEX_SYSTEM: u8 = 7;

/// One extended attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xattr {
    /// Full name, prefix included (`user.mime_type`, `security.selinux`, ...).
    pub name: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
}

/// An entry as stored: name index, name suffix and value.
#[derive(Debug, Clone)]
pub(crate) struct RawXattr {
    pub(crate) index: u8,
    pub(crate) name: Vec<u8>,
    pub(crate) value: Vec<u8>,
}

fn prefix(index: u8) -> &'static [u8] {
    match index {
        1 => b"user.",
        2 => b"system.posix_acl_access",
        3 => b"system.posix_acl_default",
        4 => b"trusted.",
        6 => b"security.",
        7 => b"system.",
        8 => b"system.richacl",
        _ => b"",
    }
}

impl Fs {
    /// Every extended attribute of `inode`, in-inode ones first, in on-disk order. The
    /// `system.data` attribute that holds inline data is internal and left out.
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<Xattr>> {
        // Without ext_attr (or inline_data) the attribute areas mean nothing (e2fsprogs
        // ignores them; e2fsck clears them).
        let sb = self.sb();
        if !sb.has_compat(COMPAT_EXT_ATTR) && !sb.has_incompat(INCOMPAT_INLINE_DATA) {
            return Ok(Vec::new());
        }
        let mut raw = self.inode_xattrs(inode)?;
        raw.extend(self.block_xattrs(inode)?);
        let mut out = Vec::with_capacity(raw.len());
        for x in raw {
            if x.index == INDEX_SYSTEM && x.name == b"data" {
                continue;
            }
            let mut name = prefix(x.index).to_vec();
            name.extend_from_slice(&x.name);
            let value = if matches!(x.index, 2 | 3) && x.name.is_empty() {
                acl_to_xattr(&x.value).ok_or_else(|| {
                    Error::corrupt(format!(
                        "inode {}: {} is not a valid ACL",
                        inode.ino,
                        String::from_utf8_lossy(&name)
                    ))
                })?
            } else {
                x.value
            };
            out.push(Xattr { name, value });
        }
        Ok(out)
    }

    /// The attributes stored inside the inode.
    pub(crate) fn inode_xattrs(&self, inode: &Inode) -> Result<Vec<RawXattr>> {
        let area = &inode.xattr_area;
        // Room for the magic number and at least something after it, as e2fsprogs requires.
        if area.len() <= 4 || le32(area, 0) != MAGIC {
            return Ok(Vec::new());
        }
        let body = &area[4..];
        self.parse_entries(inode, "in-inode attributes", body, 0, 0)
    }

    fn block_xattrs(&self, inode: &Inode) -> Result<Vec<RawXattr>> {
        let blk = inode.file_acl;
        if blk == 0 {
            return Ok(Vec::new());
        }
        let sb = self.sb();
        if blk < u64::from(sb.first_data_block) || blk >= sb.blocks_count {
            return Err(Error::corrupt(format!(
                "inode {}: attribute block {blk} lies outside the filesystem",
                inode.ino
            )));
        }
        let data = self.dev().block(blk)?;
        let what = format!("attribute block {blk}");
        if sb.metadata_csum() {
            let mut copy = data.to_vec();
            copy[0x10..0x14].fill(0);
            let c = crc32c(crc32c(self.csum_seed(), &blk.to_le_bytes()), &copy);
            let stored = le32(&data, 0x10);
            if c != stored {
                return Err(Error::corrupt(format!(
                    "inode {}: {what} checksum mismatch (stored 0x{stored:08x}, computed 0x{c:08x})",
                    inode.ino
                )));
            }
        }
        if le32(&data, 0) != MAGIC {
            return Err(Error::corrupt(format!(
                "inode {}: {what} has a bad magic number",
                inode.ino
            )));
        }
        self.parse_entries(inode, &what, &data, BLOCK_HEADER, 0)
    }

    /// Entries from `start` in `area` (values at `value_base + e_value_offs`, or in an
    /// `ea_inode`), with the checks e2fsprogs makes: names and values inside the area and
    /// after the entry list, value inodes marked as such and of the right size, and each
    /// entry's hash (when not 0) matching its name and value.
    fn parse_entries(
        &self,
        owner: &Inode,
        what: &str,
        area: &[u8],
        start: usize,
        value_base: usize,
    ) -> Result<Vec<RawXattr>> {
        let ino = owner.ino;
        let bad = |m: String| Error::corrupt(format!("inode {ino}: {what}: {m}"));
        let storage = area.len().saturating_sub(start);
        let is_last = |pos: usize| le32(area, pos) == 0;
        let name_room = |len: usize| (len.saturating_add(3)) & !3;
        // First pass: where the entry list ends.
        let mut end = start;
        let mut remain = storage;
        while remain >= ENTRY_HEADER && !is_last(end) {
            remain = remain.saturating_sub(ENTRY_HEADER);
            let nl = name_room(usize::from(area[end]));
            if nl > remain {
                return Err(bad("an attribute name runs past the end".into()));
            }
            remain = remain.saturating_sub(nl);
            end = end.saturating_add(ENTRY_HEADER).saturating_add(nl);
        }
        let values_size = area.len().saturating_sub(value_base);
        let mut out = Vec::new();
        let mut pos = start;
        let mut remain = storage;
        while remain >= ENTRY_HEADER && !is_last(pos) {
            remain = remain.saturating_sub(ENTRY_HEADER);
            let name_len = usize::from(area[pos]);
            remain = remain.saturating_sub(name_room(name_len));
            let index = area.get(pos.saturating_add(1)).copied().unwrap_or(0);
            let value_offs = usize::from(le16(area, pos.saturating_add(2)));
            let value_inum = le32(area, pos.saturating_add(4));
            let value_size = le32(area, pos.saturating_add(8)) as usize;
            let hash = le32(area, pos.saturating_add(12));
            let name = slice(area, pos.saturating_add(ENTRY_HEADER), name_len)
                .unwrap_or_default()
                .to_vec();
            let shown = || String::from_utf8_lossy(&name).into_owned();
            let (value, value_hash) = if value_inum == 0 {
                if value_size > remain {
                    return Err(bad(format!(
                        "the value of {} is larger than the space left",
                        shown()
                    )));
                }
                if value_offs.saturating_add(value_size) > values_size
                    || (value_size > 0 && value_base.saturating_add(value_offs) < end.saturating_add(4))
                {
                    return Err(bad(format!(
                        "the value of {} lies outside the value area",
                        shown()
                    )));
                }
                remain = remain.saturating_sub(value_size);
                let at = value_base.saturating_add(value_offs);
                let v = slice(area, at, value_size).unwrap_or_default().to_vec();
                // The hash covers the value padded to whole 4-byte words.
                let words = slice(area, at, name_room(value_size)).map(<[u8]>::to_vec);
                (v, ValueHash::Words(words.unwrap_or_default()))
            } else {
                if !self.sb().has_incompat(INCOMPAT_EA_INODE) {
                    return Err(bad(
                        "a value lives in an inode but the ea_inode feature is off".into()
                    ));
                }
                if value_offs != 0 || value_size > 65536 {
                    return Err(bad(format!("the value inode entry of {} is malformed", shown())));
                }
                let (v, ea) = self.ea_inode_value(ino, value_inum, value_size)?;
                (v, ValueHash::Inode(ea.atime.secs as u32, ea))
            };
            if hash != 0 {
                let (h, signed) = entry_hashes(&name, &value_hash);
                if hash != h && hash != signed {
                    // An old Lustre-style value inode records its owner instead.
                    let lustre = match &value_hash {
                        ValueHash::Inode(_, ea) => {
                            ea.mtime.secs as u32 == ino && ea.generation == owner.generation
                        }
                        ValueHash::Words(_) => false,
                    };
                    if !lustre {
                        return Err(bad(format!(
                            "the hash of attribute {} does not match it",
                            shown()
                        )));
                    }
                }
            }
            out.push(RawXattr { index, name, value });
            pos = pos
                .saturating_add(ENTRY_HEADER)
                .saturating_add(name_room(name_len));
        }
        Ok(out)
    }

    fn ea_inode_value(&self, owner: u32, ino: u32, size: usize) -> Result<(Vec<u8>, Inode)> {
        let inode = self.inode(ino)?;
        if inode.flags & FLAG_EA_INODE == 0 || inode.has_inline_data() || inode.links == 0 {
            return Err(Error::corrupt(format!(
                "inode {owner}: attribute value inode {ino} is not a valid value inode"
            )));
        }
        if inode.size != size as u64 || inode.size > MAX_VALUE {
            return Err(Error::corrupt(format!(
                "inode {owner}: attribute value inode {ino} holds {} bytes, the entry says {size}",
                inode.size
            )));
        }
        let mut value = vec![0u8; size];
        let mut r = self.open_file(&inode)?;
        r.read_at(0, &mut value)?;
        Ok((value, inode))
    }
}

/// What an entry's hash covers after its name.
enum ValueHash {
    /// The value's bytes, padded to whole words.
    Words(Vec<u8>),
    /// A value inode's own hash (kept in its `i_atime`).
    Inode(u32, Inode),
}

/// The entry hash with name bytes taken unsigned and signed (old kernels on signed-char
/// architectures); e2fsprogs accepts either.
fn entry_hashes(name: &[u8], value: &ValueHash) -> (u32, u32) {
    let name_hash = |signed: bool| {
        name.iter().fold(0u32, |h, &b| {
            let c = if signed {
                i32::from(b as i8) as u32
            } else {
                u32::from(b)
            };
            (h << 5) ^ (h >> 27) ^ c
        })
    };
    let with_value = |mut h: u32| {
        match value {
            ValueHash::Words(w) => {
                for c in w.chunks_exact(4) {
                    h = (h << 16) ^ (h >> 16) ^ le32(c, 0);
                }
            }
            ValueHash::Inode(ea_hash, _) => h = (h << 16) ^ (h >> 16) ^ ea_hash,
        }
        h
    };
    (with_value(name_hash(false)), with_value(name_hash(true)))
}

/// ext4's compact ACL format (version 1; short entries for owner, group, mask and other)
/// to the kernel's xattr format (version 2; every entry 8 bytes, undefined ids as !0).
fn acl_to_xattr(v: &[u8]) -> Option<Vec<u8>> {
    if v.len() < 4 || le32(v, 0) != 1 {
        return None;
    }
    let mut out = 2u32.to_le_bytes().to_vec();
    let mut pos = 4usize;
    while pos < v.len() {
        let tag = le16(v, pos);
        let perm = le16(v, pos.saturating_add(2));
        let (id, len) = match tag {
            0x01 | 0x04 | 0x10 | 0x20 => (u32::MAX, 4usize),
            0x02 | 0x08 => (le32(v, pos.saturating_add(4)), 8),
            _ => return None,
        };
        if pos.saturating_add(len) > v.len() {
            return None;
        }
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
        pos = pos.saturating_add(len);
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn acl_conversion() {
        let mut disk = 1u32.to_le_bytes().to_vec();
        disk.extend_from_slice(&[1, 0, 6, 0]); // user::rw-
        disk.extend_from_slice(&[2, 0, 4, 0, 0xe8, 3, 0, 0]); // user:1000:r--
        disk.extend_from_slice(&[0x20, 0, 0, 0]); // other::---
        let x = acl_to_xattr(&disk).unwrap();
        assert_eq!(x.len(), 4 + 3 * 8);
        assert_eq!(&x[4..12], &[1, 0, 6, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(&x[12..20], &[2, 0, 4, 0, 0xe8, 3, 0, 0]);
        assert!(acl_to_xattr(&disk[..disk.len() - 2]).is_none());
        assert!(acl_to_xattr(&[2, 0, 0, 0]).is_none());
    }
}
