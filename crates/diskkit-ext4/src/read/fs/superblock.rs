//! The ext2/3/4 superblock (1024 bytes at byte 1024): geometry, features, and its checks.

use diskkit::{Error, Result};

use super::bytes::{hilo, le16, le32};
use crate::crc::crc32c;

pub(crate) const SUPERBLOCK_OFFSET: u64 = 1024;
pub(crate) const SUPERBLOCK_SIZE: usize = 1024;
const MAGIC: u16 = 0xEF53;

// s_feature_compat
pub(crate) const COMPAT_HAS_JOURNAL: u32 = 0x4;
pub(crate) const COMPAT_EXT_ATTR: u32 = 0x8;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;

// s_feature_incompat
const INCOMPAT_COMPRESSION: u32 = 0x1;
pub(crate) const INCOMPAT_FILETYPE: u32 = 0x2;
pub(crate) const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
pub(crate) const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
pub(crate) const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_MMP: u32 = 0x100;
const INCOMPAT_FLEX_BG: u32 = 0x200;
pub(crate) const INCOMPAT_EA_INODE: u32 = 0x400;
const INCOMPAT_DIRDATA: u32 = 0x1000;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
pub(crate) const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
pub(crate) const INCOMPAT_CASEFOLD: u32 = 0x20000;

/// Incompatible features this reader understands.
const KNOWN_INCOMPAT: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD;

// s_feature_ro_compat
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
pub(crate) const RO_COMPAT_HUGE_FILE: u32 = 0x8;
pub(crate) const RO_COMPAT_GDT_CSUM: u32 = 0x10;
pub(crate) const RO_COMPAT_BIGALLOC: u32 = 0x200;
pub(crate) const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

fn incompat_name(bit: u32) -> String {
    match bit {
        INCOMPAT_COMPRESSION => "compression".into(),
        INCOMPAT_JOURNAL_DEV => "journal_dev".into(),
        INCOMPAT_DIRDATA => "dirdata".into(),
        0x20 => "incompat 0x20 (unassigned)".into(),
        other => format!("an unknown incompatible feature (0x{other:x})"),
    }
}

/// The superblock fields the reader uses.
#[derive(Debug, Clone)]
pub(crate) struct Superblock {
    pub(crate) inodes_count: u32,
    pub(crate) blocks_count: u64,
    pub(crate) first_data_block: u32,
    pub(crate) log_block_size: u32,
    pub(crate) log_cluster_size: u32,
    pub(crate) blocks_per_group: u32,
    pub(crate) inodes_per_group: u32,
    pub(crate) rev_level: u32,
    pub(crate) first_ino: u32,
    pub(crate) inode_size: u16,
    pub(crate) compat: u32,
    pub(crate) incompat: u32,
    pub(crate) ro_compat: u32,
    pub(crate) uuid: [u8; 16],
    pub(crate) label: [u8; 16],
    pub(crate) journal_inum: u32,
    pub(crate) jnl_backup_type: u8,
    pub(crate) jnl_blocks: [u32; 17],
    pub(crate) desc_size: u16,
    pub(crate) first_meta_bg: u32,
    pub(crate) backup_bgs: [u32; 2],
    pub(crate) checksum_seed: u32,
    pub(crate) group_count: u32,
}

fn bad(what: impl Into<String>) -> Error {
    Error::corrupt(what).with_operation("checking the superblock")
}

impl Superblock {
    /// Parse and check the 1024 superblock bytes.
    pub(crate) fn parse(b: &[u8]) -> Result<Superblock> {
        if b.len() < SUPERBLOCK_SIZE || le16(b, 0x38) != MAGIC {
            return Err(Error::invalid_format(
                "no ext2/3/4 superblock (magic number 0xEF53 missing at byte 1080)",
            ));
        }
        let rev_level = le32(b, 0x4C);
        let (first_ino, inode_size) = if rev_level == 0 {
            (11, 128)
        } else {
            (le32(b, 0x54), le16(b, 0x58))
        };
        let (compat, incompat, ro_compat) = if rev_level == 0 {
            (0, 0, 0)
        } else {
            (le32(b, 0x5C), le32(b, 0x60), le32(b, 0x64))
        };
        let arr16 = |off: usize| {
            let mut a = [0u8; 16];
            if let Some(s) = super::bytes::slice(b, off, 16) {
                a.copy_from_slice(s);
            }
            a
        };
        let mut jnl_blocks = [0u32; 17];
        for (i, v) in jnl_blocks.iter_mut().enumerate() {
            *v = le32(b, 0x10C_usize.saturating_add(i.saturating_mul(4)));
        }
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let mut sb = Superblock {
            inodes_count: le32(b, 0x0),
            blocks_count: hilo(le32(b, 0x4), if is64 { le32(b, 0x150) } else { 0 }),
            first_data_block: le32(b, 0x14),
            log_block_size: le32(b, 0x18),
            log_cluster_size: le32(b, 0x1C),
            blocks_per_group: le32(b, 0x20),
            inodes_per_group: le32(b, 0x28),
            rev_level,
            first_ino,
            inode_size,
            compat,
            incompat,
            ro_compat,
            uuid: arr16(0x68),
            label: arr16(0x78),
            journal_inum: le32(b, 0xE0),
            jnl_backup_type: b.get(0xFD).copied().unwrap_or(0),
            jnl_blocks,
            desc_size: if is64 { le16(b, 0xFE) } else { 32 },
            first_meta_bg: le32(b, 0x104),
            backup_bgs: [le32(b, 0x24C), le32(b, 0x250)],
            checksum_seed: le32(b, 0x270),
            group_count: 0,
        };
        let unknown = incompat & !KNOWN_INCOMPAT;
        if unknown != 0 {
            if incompat & INCOMPAT_JOURNAL_DEV != 0 {
                return Err(Error::unsupported(
                    "this is an external journal device, not a filesystem",
                ));
            }
            let names: Vec<String> = (0..32)
                .map(|i| 1u32 << i)
                .filter(|bit| unknown & bit != 0)
                .map(incompat_name)
                .collect();
            return Err(Error::unsupported(format!(
                "the filesystem uses features this reader does not implement: {}",
                names.join(", ")
            )));
        }
        if sb.has_ro(RO_COMPAT_METADATA_CSUM) {
            let kind = b.get(0x175).copied().unwrap_or(0);
            if kind != 1 {
                return Err(bad(format!(
                    "unknown metadata checksum type {kind} (only crc32c, 1, exists)"
                )));
            }
            let stored = le32(b, 0x3FC);
            let computed = crc32c(!0, b.get(..0x3FC).unwrap_or_default());
            if stored != computed {
                return Err(bad(format!(
                    "superblock checksum mismatch (stored 0x{stored:08x}, computed 0x{computed:08x})"
                )));
            }
        }
        sb.check()?;
        Ok(sb)
    }

    fn check(&mut self) -> Result<()> {
        if self.log_block_size > 6 {
            return Err(bad(format!(
                "block size 2^{} KiB is larger than 64 KiB",
                self.log_block_size
            )));
        }
        let bs = self.block_size() as u64;
        if self.has_ro(RO_COMPAT_BIGALLOC) {
            if self.log_cluster_size < self.log_block_size || self.log_cluster_size > 29 {
                return Err(bad(format!(
                    "cluster size 2^{} KiB is impossible with 2^{} KiB blocks",
                    self.log_cluster_size, self.log_block_size
                )));
            }
        } else {
            self.log_cluster_size = self.log_block_size;
        }
        if self.inode_size < 128 || !self.inode_size.is_power_of_two() || u64::from(self.inode_size) > bs {
            return Err(bad(format!(
                "inode size {} is not a power of two between 128 and the block size",
                self.inode_size
            )));
        }
        if self.blocks_per_group == 0 || self.inodes_per_group == 0 {
            return Err(bad("zero blocks or inodes per group"));
        }
        let max_per_group = bs.saturating_mul(8).saturating_mul(self.cluster_ratio());
        if u64::from(self.blocks_per_group) > max_per_group {
            return Err(bad(format!(
                "{} blocks per group, more than one bitmap block can describe",
                self.blocks_per_group
            )));
        }
        let inodes_per_block = bs.checked_div(u64::from(self.inode_size)).unwrap_or(1);
        if u64::from(self.inodes_per_group) > bs.saturating_mul(8)
            || u64::from(self.inodes_per_group) < inodes_per_block
        {
            return Err(bad(format!(
                "{} inodes per group: fewer than one table block holds, or more than one bitmap block describes",
                self.inodes_per_group
            )));
        }
        if u64::from(self.first_data_block) >= self.blocks_count {
            return Err(bad(format!(
                "first data block {} is past the {} blocks of the filesystem",
                self.first_data_block, self.blocks_count
            )));
        }
        let data_blocks = self.blocks_count.saturating_sub(u64::from(self.first_data_block));
        let groups = data_blocks.div_ceil(u64::from(self.blocks_per_group));
        self.group_count = u32::try_from(groups)
            .map_err(|_| bad(format!("{groups} block groups are more than ext4 allows")))?;
        let max_inodes = groups.saturating_mul(u64::from(self.inodes_per_group));
        if self.inodes_count == 0 || u64::from(self.inodes_count) > max_inodes {
            return Err(bad(format!(
                "{} inodes, but the groups hold {max_inodes}",
                self.inodes_count
            )));
        }
        if self.rev_level > 0 && (self.first_ino < 11 || self.first_ino > self.inodes_count) {
            return Err(bad(format!(
                "first ordinary inode {} is out of range",
                self.first_ino
            )));
        }
        if self.is_64bit() {
            let d = self.desc_size;
            if !(64..=1024).contains(&d) || !d.is_power_of_two() {
                return Err(bad(format!(
                    "group descriptor size {d} (64-bit) is not a power of two from 64 to 1024"
                )));
            }
        }
        if self.has_incompat(INCOMPAT_META_BG) {
            let per_block = bs.checked_div(u64::from(self.desc_size)).unwrap_or(1).max(1);
            let desc_blocks = u64::from(self.group_count).div_ceil(per_block);
            if u64::from(self.first_meta_bg) > desc_blocks {
                return Err(bad(format!(
                    "first meta block group {} is past the {desc_blocks} descriptor blocks",
                    self.first_meta_bg
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn block_size(&self) -> usize {
        1024usize << self.log_block_size.min(6)
    }

    /// Blocks per cluster (1 without `bigalloc`).
    pub(crate) fn cluster_ratio(&self) -> u64 {
        1u64 << self.log_cluster_size.saturating_sub(self.log_block_size).min(30)
    }

    pub(crate) fn has_incompat(&self, f: u32) -> bool {
        self.incompat & f != 0
    }

    pub(crate) fn has_ro(&self, f: u32) -> bool {
        self.ro_compat & f != 0
    }

    pub(crate) fn has_compat(&self, f: u32) -> bool {
        self.compat & f != 0
    }

    pub(crate) fn is_64bit(&self) -> bool {
        self.has_incompat(INCOMPAT_64BIT)
    }

    pub(crate) fn metadata_csum(&self) -> bool {
        self.has_ro(RO_COMPAT_METADATA_CSUM)
    }

    pub(crate) fn filetype(&self) -> bool {
        self.has_incompat(INCOMPAT_FILETYPE)
    }

    /// The seed of every `metadata_csum` checksum.
    pub(crate) fn csum_seed(&self) -> u32 {
        if self.has_incompat(INCOMPAT_CSUM_SEED) {
            self.checksum_seed
        } else {
            crc32c(!0, &self.uuid)
        }
    }

    /// Whether group `g` holds a superblock backup (and so, with `meta_bg`, its descriptor
    /// block follows one).
    pub(crate) fn group_has_super(&self, g: u32) -> bool {
        if g == 0 {
            return true;
        }
        if self.has_compat(COMPAT_SPARSE_SUPER2) {
            return g == self.backup_bgs[0] || g == self.backup_bgs[1];
        }
        if g <= 1 || !self.has_ro(RO_COMPAT_SPARSE_SUPER) {
            return true;
        }
        if g % 2 == 0 {
            return false;
        }
        [3u32, 5, 7].iter().any(|&base| {
            let mut n = base;
            while n < g {
                match n.checked_mul(base) {
                    Some(m) => n = m,
                    None => return false,
                }
            }
            n == g
        })
    }

    /// The largest logical block a file can have plus one.
    pub(crate) fn max_file_blocks(&self) -> u64 {
        1u64 << 32
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn minimal() -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        let put = |b: &mut Vec<u8>, off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
        put(&mut b, 0x0, 128); // inodes
        put(&mut b, 0x4, 1024); // blocks
        put(&mut b, 0x14, 1); // first data block
        put(&mut b, 0x20, 8192); // blocks per group
        put(&mut b, 0x28, 128); // inodes per group
        b[0x38..0x3A].copy_from_slice(&MAGIC.to_le_bytes());
        put(&mut b, 0x4C, 1); // dynamic revision
        put(&mut b, 0x54, 11);
        b[0x58..0x5A].copy_from_slice(&128u16.to_le_bytes());
        b
    }

    #[test]
    fn accepts_a_minimal_superblock() {
        let sb = Superblock::parse(&minimal()).unwrap();
        assert_eq!(sb.block_size(), 1024);
        assert_eq!(sb.group_count, 1);
    }

    #[test]
    fn rejects_each_broken_rule() {
        let cases: &[(usize, &[u8], &str)] = &[
            (0x38, &[0, 0], "magic"),
            (0x18, &[7, 0, 0, 0], "64 KiB"),
            (0x20, &[0, 0, 0, 0], "per group"),
            (0x28, &[0, 0, 0, 0], "per group"),
            (0x58, &[100, 0], "inode size"),
            (0x0, &[0, 2, 0, 0], "inodes"),
            (0x14, &[0, 4, 0, 0], "first data block"),
            (0x60, &[1, 0, 0, 0], "compression"),
            (0x60, &[8, 0, 0, 0], "external journal"),
        ];
        for (off, bytes, words) in cases {
            let mut b = minimal();
            b[*off..*off + bytes.len()].copy_from_slice(bytes);
            let e = Superblock::parse(&b).unwrap_err().to_string();
            assert!(e.contains(words), "{off:#x}: {e}");
        }
    }

    #[test]
    fn checks_the_superblock_checksum() {
        let mut b = minimal();
        b[0x64] = 0x04; // metadata_csum
        b[0x65] = 0x04;
        b[0x175] = 1;
        let c = crc32c(!0, &b[..0x3FC]);
        b[0x3FC..].copy_from_slice(&c.to_le_bytes());
        Superblock::parse(&b).unwrap();
        b[0x78] = b'x';
        let e = Superblock::parse(&b).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
    }

    #[test]
    fn backup_groups() {
        let mut b = minimal();
        b[0x64] = 1; // sparse_super
        let sb = Superblock::parse(&b).unwrap();
        let with: Vec<u32> = (0..60).filter(|&g| sb.group_has_super(g)).collect();
        assert_eq!(with, [0, 1, 3, 5, 7, 9, 25, 27, 49]);
    }
}
