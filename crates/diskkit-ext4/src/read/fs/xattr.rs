//! Extended attributes: in the inode (after `i_extra_isize`), in one attribute block
//! (`i_file_acl`, checksummed with `metadata_csum`), and values stored in their own inode
//! (`ea_inode`). POSIX ACLs are returned in the kernel's `getxattr` format.

use diskkit::{Error, Result};

use super::bytes::{le16, le32, slice};
use super::inode::{Inode, FLAG_EA_INODE};
use super::superblock::INCOMPAT_EA_INODE;
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
        if area.len() < 4 || le32(area, 0) != MAGIC {
            return Ok(Vec::new());
        }
        let body = &area[4..];
        self.parse_entries(inode.ino, "in-inode attributes", body, 0, 0)
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
        if le32(&data, 0) != MAGIC {
            return Err(Error::corrupt(format!("inode {}: {what} has a bad magic number", inode.ino)));
        }
        if le32(&data, 8) != 1 {
            return Err(Error::corrupt(format!(
                "inode {}: {what} claims {} blocks (only 1 is possible)",
                inode.ino,
                le32(&data, 8)
            )));
        }
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
        self.parse_entries(inode.ino, &what, &data, BLOCK_HEADER, 0)
    }

    /// Entries from `start` in `area` until the four zero bytes that end them; values at
    /// `value_base + e_value_offs` in `area`, or in an `ea_inode`.
    fn parse_entries(&self, ino: u32, what: &str, area: &[u8], start: usize, value_base: usize) -> Result<Vec<RawXattr>> {
        let bad = |m: String| Error::corrupt(format!("inode {ino}: {what}: {m}"));
        let mut out = Vec::new();
        let mut pos = start;
        loop {
            if pos.checked_add(4).is_none_or(|e| e > area.len()) {
                return Err(bad("the entry list runs past its end".into()));
            }
            if le32(area, pos) == 0 {
                break;
            }
            let name_len = usize::from(area[pos]);
            let index = area.get(pos.saturating_add(1)).copied().unwrap_or(0);
            let value_offs = usize::from(le16(area, pos.saturating_add(2)));
            let value_inum = le32(area, pos.saturating_add(4));
            let value_size = le32(area, pos.saturating_add(8));
            let name = slice(area, pos.saturating_add(ENTRY_HEADER), name_len)
                .ok_or_else(|| bad("an attribute name runs past the end".into()))?
                .to_vec();
            let value = if value_inum != 0 {
                if !self.sb().has_incompat(INCOMPAT_EA_INODE) {
                    return Err(bad("a value lives in an inode but the ea_inode feature is off".into()));
                }
                self.ea_inode_value(ino, value_inum, value_size)?
            } else {
                slice(area, value_base.saturating_add(value_offs), value_size as usize)
                    .ok_or_else(|| {
                        bad(format!(
                            "the value of {} ({value_size} bytes at {value_offs}) runs past the end",
                            String::from_utf8_lossy(&name)
                        ))
                    })?
                    .to_vec()
            };
            out.push(RawXattr { index, name, value });
            let entry_len = (ENTRY_HEADER.saturating_add(name_len).saturating_add(3)) & !3;
            pos = pos.saturating_add(entry_len);
        }
        Ok(out)
    }

    fn ea_inode_value(&self, owner: u32, ino: u32, size: u32) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        if inode.flags & FLAG_EA_INODE == 0 {
            return Err(Error::corrupt(format!(
                "inode {owner}: attribute value inode {ino} is not marked as holding a value"
            )));
        }
        if inode.size != u64::from(size) || inode.size > MAX_VALUE {
            return Err(Error::corrupt(format!(
                "inode {owner}: attribute value inode {ino} holds {} bytes, the entry says {size}",
                inode.size
            )));
        }
        let mut value = vec![0u8; size as usize];
        let mut r = self.open_file(&inode)?;
        r.read_at(0, &mut value)?;
        Ok(value)
    }
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
