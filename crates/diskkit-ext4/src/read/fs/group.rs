//! Block group descriptors: where each group's inode table lives, with the descriptor
//! checksums (`metadata_csum`: crc32c; `uninit_bg`/`gdt_csum`: crc16).

use diskkit::{Error, Result};

use super::bytes::{hilo, le16, le32, slice};
use super::superblock::{Superblock, INCOMPAT_META_BG, RO_COMPAT_GDT_CSUM};
use super::Fs;
use crate::crc::{crc16, crc32c};

/// The descriptor fields the reader uses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupDesc {
    pub(crate) inode_table: u64,
}

/// Block and byte offset of group `g`'s descriptor.
pub(crate) fn desc_location(sb: &Superblock, g: u32) -> (u64, usize) {
    let bs = sb.block_size();
    let size = usize::from(sb.desc_size);
    let per_block = bs.checked_div(size).unwrap_or(1).max(1);
    let g = g as usize;
    // Descriptor block number within the table, and the byte offset in it.
    let index = g.checked_div(per_block).unwrap_or(0) as u64;
    let offset = g.checked_rem(per_block).unwrap_or(0).saturating_mul(size);
    let first = u64::from(sb.first_data_block);
    // With 1 KiB blocks and bigalloc, block 0 holds only the boot sector; the superblock
    // (and so the table after it) starts one block later.
    let zero_adjust = u64::from(index == 0 && bs == 1024 && sb.cluster_ratio() > 1);
    let block = if !sb.has_incompat(INCOMPAT_META_BG) || index < u64::from(sb.first_meta_bg) {
        first
            .saturating_add(index)
            .saturating_add(1)
            .saturating_add(zero_adjust)
    } else {
        // meta_bg: the descriptor block of each meta group sits in the meta group's first
        // group, after that group's superblock backup if it has one.
        let bg = index.saturating_mul(per_block as u64);
        let has_super = u32::try_from(bg).is_ok_and(|bg| sb.group_has_super(bg));
        first
            .saturating_add(bg.saturating_mul(u64::from(sb.blocks_per_group)))
            .saturating_add(u64::from(has_super))
            .saturating_add(zero_adjust)
    };
    (block, offset)
}

impl Fs {
    /// Group `g`'s descriptor, checksum verified.
    pub(crate) fn group_desc(&self, g: u32) -> Result<GroupDesc> {
        let sb = self.sb();
        if g >= sb.group_count {
            return Err(Error::corrupt(format!(
                "block group {g} does not exist ({} groups)",
                sb.group_count
            )));
        }
        let (block, offset) = desc_location(sb, g);
        let data = self.dev().block(block).map_err(|e| {
            Error::new(e.kind(), format!("cannot read the descriptor of block group {g}")).with_source(e)
        })?;
        let size = usize::from(sb.desc_size);
        let d = slice(&data, offset, size)
            .ok_or_else(|| Error::corrupt(format!("descriptor of block group {g} does not fit its block")))?;
        let stored = le16(d, 0x1E);
        let computed = if sb.metadata_csum() {
            let mut c = crc32c(self.csum_seed(), &g.to_le_bytes());
            c = crc32c(c, d.get(..0x1E).unwrap_or_default());
            c = crc32c(c, &[0, 0]);
            c = crc32c(c, d.get(0x20..).unwrap_or_default());
            Some((c & 0xFFFF) as u16)
        } else if sb.has_ro(RO_COMPAT_GDT_CSUM) {
            let head = d.get(..0x1E).unwrap_or_default();
            let tail = if sb.is_64bit() {
                d.get(0x20..).unwrap_or_default()
            } else {
                &[]
            };
            Some(crc16(&[&sb.uuid, &g.to_le_bytes(), head, tail]))
        } else {
            None
        };
        if let Some(c) = computed {
            if c != stored {
                return Err(Error::corrupt(format!(
                    "block group {g} descriptor checksum mismatch (stored 0x{stored:04x}, computed 0x{c:04x})"
                ))
                .with_operation("checking group descriptors"));
            }
        }
        let hi = if size >= 64 { le32(d, 0x28) } else { 0 };
        Ok(GroupDesc {
            inode_table: hilo(le32(d, 0x8), hi),
        })
    }
}
