//! Inodes: the 128-byte base and the `extra_isize` area, their checksum, times with extra
//! precision and epoch bits, device numbers.

use diskkit::{Error, Result};

use super::bytes::{hilo, le16, le32, slice};
use super::superblock::RO_COMPAT_HUGE_FILE;
use super::Fs;
use crate::crc::crc32c;

/// Base inode size (every field before `i_extra_isize`).
const GOOD_OLD_SIZE: usize = 128;

// i_flags
pub(crate) const FLAG_ENCRYPT: u32 = 0x800;
pub(crate) const FLAG_INDEX: u32 = 0x1000;
const FLAG_HUGE_FILE: u32 = 0x40000;
pub(crate) const FLAG_EXTENTS: u32 = 0x80000;
pub(crate) const FLAG_EA_INODE: u32 = 0x20_0000;
pub(crate) const FLAG_INLINE_DATA: u32 = 0x1000_0000;
pub(crate) const FLAG_CASEFOLD: u32 = 0x4000_0000;

/// The kind of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
}

impl FileType {
    fn from_mode(mode: u16) -> Option<FileType> {
        Some(match mode & 0xF000 {
            0x1000 => FileType::Fifo,
            0x2000 => FileType::CharDevice,
            0x4000 => FileType::Directory,
            0x6000 => FileType::BlockDevice,
            0x8000 => FileType::Regular,
            0xA000 => FileType::Symlink,
            0xC000 => FileType::Socket,
            _ => return None,
        })
    }

    /// The type a directory entry records (`filetype` feature), if it names one.
    pub(crate) fn from_dirent(t: u8) -> Option<FileType> {
        Some(match t {
            1 => FileType::Regular,
            2 => FileType::Directory,
            3 => FileType::CharDevice,
            4 => FileType::BlockDevice,
            5 => FileType::Fifo,
            6 => FileType::Socket,
            7 => FileType::Symlink,
            _ => return None,
        })
    }
}

/// A point in time as ext4 stores it: seconds (negative before 1970) and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp {
    /// Seconds since 1970-01-01 UTC.
    pub secs: i64,
    /// Nanoseconds (0 when the inode has no room for them).
    pub nsec: u32,
}

impl Timestamp {
    /// A 32-bit signed seconds field plus, when the inode has room for it, the extra field:
    /// two epoch bits above bit 31 and 30 bits of nanoseconds.
    fn decode(base: u32, extra: Option<u32>) -> Timestamp {
        let mut secs = i64::from(base as i32);
        let mut nsec = 0;
        if let Some(x) = extra {
            secs = secs.saturating_add(i64::from(x & 3) << 32);
            nsec = x >> 2;
        }
        Timestamp { secs, nsec }
    }
}

/// One inode, parsed and checked.
#[derive(Debug, Clone)]
pub struct Inode {
    pub(crate) ino: u32,
    pub(crate) mode: u16,
    pub(crate) file_type: FileType,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) size: u64,
    pub(crate) links: u16,
    pub(crate) atime: Timestamp,
    pub(crate) ctime: Timestamp,
    pub(crate) mtime: Timestamp,
    pub(crate) crtime: Option<Timestamp>,
    pub(crate) flags: u32,
    pub(crate) generation: u32,
    pub(crate) file_acl: u64,
    /// `i_blocks` in 512-byte units.
    pub(crate) blocks: u64,
    /// `i_block`: extent root, block pointers, inline data, fast symlink or device number.
    pub(crate) block: [u8; 60],
    /// The in-inode extended attribute area (after `i_extra_isize`), possibly empty.
    pub(crate) xattr_area: Vec<u8>,
}

impl Inode {
    /// Inode number.
    pub fn ino(&self) -> u32 {
        self.ino
    }
    /// The kind of file.
    pub fn file_type(&self) -> FileType {
        self.file_type
    }
    /// Permission bits with setuid, setgid and sticky (`mode & 0o7777`).
    pub fn mode(&self) -> u16 {
        self.mode & 0o7777
    }
    /// Owner.
    pub fn uid(&self) -> u32 {
        self.uid
    }
    /// Group.
    pub fn gid(&self) -> u32 {
        self.gid
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Hard link count.
    pub fn links(&self) -> u16 {
        self.links
    }
    /// Last access.
    pub fn atime(&self) -> Timestamp {
        self.atime
    }
    /// Last status change.
    pub fn ctime(&self) -> Timestamp {
        self.ctime
    }
    /// Last modification.
    pub fn mtime(&self) -> Timestamp {
        self.mtime
    }
    /// Creation, when the inode has room for it.
    pub fn crtime(&self) -> Option<Timestamp> {
        self.crtime
    }
    /// Inode flags (`i_flags`).
    pub fn flags(&self) -> u32 {
        self.flags
    }
    /// Whether the contents (or, for a directory, its names) are encrypted with fscrypt.
    pub fn is_encrypted(&self) -> bool {
        self.flags & FLAG_ENCRYPT != 0
    }
    /// Whether a directory's names are looked up case-insensitively.
    pub fn is_casefolded(&self) -> bool {
        self.flags & FLAG_CASEFOLD != 0
    }
    /// Whether the data lives inside the inode (`inline_data`).
    pub fn has_inline_data(&self) -> bool {
        self.flags & FLAG_INLINE_DATA != 0
    }
    /// Device number (major, minor) of a character or block device.
    pub fn device(&self) -> Option<(u32, u32)> {
        if !matches!(self.file_type, FileType::CharDevice | FileType::BlockDevice) {
            return None;
        }
        let old = le32(&self.block, 0);
        if old != 0 {
            Some(((old >> 8) & 0xff, old & 0xff))
        } else {
            let new = le32(&self.block, 4);
            Some(((new & 0xfff00) >> 8, (new & 0xff) | ((new >> 12) & 0xfff00)))
        }
    }

    pub(crate) fn uses_extents(&self) -> bool {
        self.flags & FLAG_EXTENTS != 0
    }

    /// `i_block` as fifteen block pointers.
    pub(crate) fn block_pointers(&self) -> [u32; 15] {
        let mut p = [0u32; 15];
        for (i, v) in p.iter_mut().enumerate() {
            *v = le32(&self.block, i.saturating_mul(4));
        }
        p
    }
}

impl Fs {
    /// Read and check inode `ino`.
    pub fn inode(&self, ino: u32) -> Result<Inode> {
        self.inode_inner(ino)
            .map_err(|e| e.with_operation("reading an inode"))
    }

    fn inode_inner(&self, ino: u32) -> Result<Inode> {
        let sb = self.sb();
        if ino == 0 || ino > sb.inodes_count {
            return Err(Error::corrupt(format!(
                "inode number {ino} is out of range (1 to {})",
                sb.inodes_count
            )));
        }
        // ino >= 1 was checked above; inodes_per_group > 0 when the superblock was.
        let index = ino.saturating_sub(1);
        let group = index.checked_div(sb.inodes_per_group).unwrap_or(0);
        let in_group = index.checked_rem(sb.inodes_per_group).unwrap_or(0);
        let desc = self.group_desc(group)?;
        let isz = usize::from(sb.inode_size);
        let bs = sb.block_size();
        let byte = (in_group as usize).saturating_mul(isz);
        let block = desc
            .inode_table
            .saturating_add(byte.checked_div(bs).unwrap_or(0) as u64);
        let data = self.dev().block(block).map_err(|e| {
            Error::new(
                e.kind(),
                format!("cannot read inode {ino} (inode table block {block})"),
            )
            .with_source(e)
        })?;
        let raw = slice(&data, byte.checked_rem(bs).unwrap_or(0), isz)
            .ok_or_else(|| Error::corrupt(format!("inode {ino} does not fit its table block")))?;
        self.parse_inode(ino, raw)
    }

    fn parse_inode(&self, ino: u32, raw: &[u8]) -> Result<Inode> {
        let sb = self.sb();
        let isz = raw.len();
        let extra_isize = if isz > GOOD_OLD_SIZE {
            usize::from(le16(raw, 0x80))
        } else {
            0
        };
        if isz > GOOD_OLD_SIZE && (GOOD_OLD_SIZE.saturating_add(extra_isize) > isz || extra_isize % 4 != 0) {
            return Err(Error::corrupt(format!(
                "inode {ino}: extra size {extra_isize} does not fit a {isz}-byte inode"
            )));
        }
        if sb.metadata_csum() {
            self.check_inode_csum(ino, raw, extra_isize)?;
        }
        let mode = le16(raw, 0x0);
        let file_type = FileType::from_mode(mode).ok_or_else(|| {
            if mode == 0 {
                Error::corrupt(format!("inode {ino} is not in use (mode 0) but is referenced"))
            } else {
                Error::corrupt(format!("inode {ino} has an unknown file type (mode 0o{mode:o})"))
            }
        })?;
        let fits = |field_end: usize| extra_isize >= field_end.saturating_sub(GOOD_OLD_SIZE);
        let extra = |off: usize| fits(off.saturating_add(4)).then(|| le32(raw, off));
        let flags = le32(raw, 0x20);
        let huge = sb.has_ro(RO_COMPAT_HUGE_FILE);
        let mut blocks = hilo(le32(raw, 0x1C), if huge { u32::from(le16(raw, 0x74)) } else { 0 });
        if huge && flags & FLAG_HUGE_FILE != 0 {
            blocks = blocks.saturating_mul((sb.block_size() / 512) as u64);
        }
        let mut block = [0u8; 60];
        if let Some(s) = slice(raw, 0x28, 60) {
            block.copy_from_slice(s);
        }
        let area_start = GOOD_OLD_SIZE.saturating_add(extra_isize);
        // No in-inode attributes without room for i_extra_isize itself (as e2fsprogs reads it).
        let xattr_area = if isz > GOOD_OLD_SIZE && extra_isize >= 2 {
            raw.get(area_start..).unwrap_or_default().to_vec()
        } else {
            Vec::new()
        };
        Ok(Inode {
            ino,
            mode,
            file_type,
            uid: u32::from(le16(raw, 0x2)) | (u32::from(le16(raw, 0x78)) << 16),
            gid: u32::from(le16(raw, 0x18)) | (u32::from(le16(raw, 0x7A)) << 16),
            size: hilo(le32(raw, 0x4), le32(raw, 0x6C)),
            links: le16(raw, 0x1A),
            atime: Timestamp::decode(le32(raw, 0x8), extra(0x8C)),
            ctime: Timestamp::decode(le32(raw, 0xC), extra(0x84)),
            mtime: Timestamp::decode(le32(raw, 0x10), extra(0x88)),
            crtime: extra(0x90).map(|c| Timestamp::decode(c, extra(0x94))),
            flags,
            generation: le32(raw, 0x64),
            file_acl: hilo(le32(raw, 0x68), u32::from(le16(raw, 0x76))),
            blocks,
            block,
            xattr_area,
        })
    }

    /// `metadata_csum`: crc32c over the inode (with its checksum fields zeroed), seeded with
    /// the inode number and generation. 128-byte inodes (or ones too small for `i_checksum_hi`)
    /// keep only the low 16 bits. An inode whose base is all zeros passes, as in e2fsprogs.
    fn check_inode_csum(&self, ino: u32, raw: &[u8], extra_isize: usize) -> Result<()> {
        let has_hi = raw.len() > GOOD_OLD_SIZE && extra_isize >= 4;
        let mut copy = raw.to_vec();
        if let Some(f) = copy.get_mut(0x7C..0x7E) {
            f.fill(0);
        }
        if has_hi {
            if let Some(f) = copy.get_mut(0x82..0x84) {
                f.fill(0);
            }
        }
        let seed = self.inode_seed(ino, le32(raw, 0x64));
        let computed = crc32c(seed, &copy);
        let lo = u32::from(le16(raw, 0x7C));
        let (stored, computed) = if has_hi {
            (lo | (u32::from(le16(raw, 0x82)) << 16), computed)
        } else {
            (lo, computed & 0xFFFF)
        };
        if stored == computed || raw.iter().take(GOOD_OLD_SIZE).all(|&b| b == 0) {
            return Ok(());
        }
        Err(Error::corrupt(format!(
            "inode {ino} checksum mismatch (stored 0x{stored:x}, computed 0x{computed:x})"
        )))
    }

    /// The seed of an inode's own checksums (inode, extent blocks, directory blocks).
    pub(crate) fn inode_seed(&self, ino: u32, generation: u32) -> u32 {
        let c = crc32c(self.csum_seed(), &ino.to_le_bytes());
        crc32c(c, &generation.to_le_bytes())
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn times_decode_epoch_bits_and_negative_seconds() {
        assert_eq!(Timestamp::decode(0xFFFF_FFFF, None).secs, -1);
        assert_eq!(Timestamp::decode(0xFFFF_FFFF, Some(0)).secs, -1);
        assert_eq!(Timestamp::decode(0x8000_0000, Some(1)).secs, 1 << 31);
        let t = Timestamp::decode(5, Some((123 << 2) | 1));
        assert_eq!((t.secs, t.nsec), ((1 << 32) + 5, 123));
    }
}
