//! Sizing: group count, inodes per group and where metadata and data start.

use diskkit::{Error, Result};

use super::{BLOCKS_PER_GROUP, BLOCK_SIZE, INODES_PER_BLOCK};

/// The shape of the filesystem, in 4 KiB blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Number of block groups.
    pub(crate) groups: u64,
    /// Inodes per group (a multiple of 16).
    pub(crate) inodes_per_group: u32,
    /// Inode-table blocks per group.
    pub(crate) itable_blocks: u64,
    /// Blocks of group descriptors after the superblock block.
    pub(crate) gdt_blocks: u64,
    /// First of the bitmaps: every group's block bitmap, then every inode bitmap (set when
    /// the blocks are allocated).
    pub(crate) bitmap_start: u64,
    /// First block of the inode tables, one group's after the other (set when allocated).
    pub(crate) itable_start: u64,
    /// Blocks for bitmaps and inode tables.
    pub(crate) meta_blocks: u64,
    /// First block past all used blocks (at most; the allocation may end lower).
    pub(crate) used_end: u64,
    /// Total blocks in the filesystem.
    pub(crate) total_blocks: u64,
}

impl Geometry {
    /// Block bitmap of `group`.
    pub(crate) fn block_bitmap(&self, group: u64) -> u64 {
        self.bitmap_start + group
    }

    /// Inode bitmap of `group`.
    pub(crate) fn inode_bitmap(&self, group: u64) -> u64 {
        self.bitmap_start + self.groups + group
    }

    /// First inode-table block of `group`.
    pub(crate) fn inode_table(&self, group: u64) -> u64 {
        self.itable_start + group * self.itable_blocks
    }

    /// Total inodes.
    pub(crate) fn inode_count(&self) -> u64 {
        self.groups * u64::from(self.inodes_per_group)
    }

    /// First block after the superblock and the descriptors.
    pub(crate) fn first_free(&self) -> u64 {
        1 + self.gdt_blocks
    }
}

/// Group descriptor blocks for `groups` groups (32-byte descriptors).
pub(crate) fn gdt_blocks(groups: u64) -> u64 {
    (groups * 32).div_ceil(BLOCK_SIZE as u64)
}

/// Blocks a filesystem of `total_blocks` blocks keeps for the superblock and descriptors:
/// placed data may start there.
pub fn reserved_blocks(total_blocks: u64) -> u64 {
    1 + gdt_blocks(total_blocks.div_ceil(BLOCKS_PER_GROUP).max(1))
}

/// (inodes per group, inode-table blocks per group, descriptor blocks, bitmap and inode-table
/// blocks, end of the used blocks at most).
type Shape = (u32, u64, u64, u64, u64);

fn layout(groups: u64, want_inodes: u64, data_blocks: u64, placed_end: u64) -> Option<Shape> {
    let ipg = want_inodes
        .div_ceil(groups)
        .max(INODES_PER_BLOCK)
        .next_multiple_of(INODES_PER_BLOCK);
    if ipg > BLOCKS_PER_GROUP {
        return None;
    }
    let itb = ipg / INODES_PER_BLOCK;
    let gdt_blocks = gdt_blocks(groups);
    let meta = 2 * groups + groups * itb;
    // Worst case: nothing fits below the placed data.
    let used_end = (1 + gdt_blocks)
        .max(placed_end)
        .checked_add(meta)?
        .checked_add(data_blocks)?;
    Some((ipg as u32, itb, gdt_blocks, meta, used_end))
}

/// Compute the geometry for `inodes_used` inodes (including the reserved ones), `data_blocks`
/// blocks the writer allocates (data, directories, extent and xattr blocks) and placed data
/// ending before block `placed_end` (0 without). With `size`, the filesystem has exactly that
/// many bytes (rounded down to 4 KiB); otherwise it is compact: the content plus about 10%
/// headroom (at least 1 MiB), rounded to 1 MiB.
pub(crate) fn compute(
    inodes_used: u64,
    data_blocks: u64,
    placed_end: u64,
    size: Option<u64>,
) -> Result<Geometry> {
    let max_blocks = u64::from(u32::MAX);
    let geometry = |groups, (ipg, itb, gdt_blocks, meta_blocks, used_end): Shape, total| Geometry {
        groups,
        inodes_per_group: ipg,
        itable_blocks: itb,
        gdt_blocks,
        bitmap_start: 0,
        itable_start: 0,
        meta_blocks,
        used_end,
        total_blocks: total,
    };
    if let Some(size) = size {
        let total = size / BLOCK_SIZE as u64;
        if total > max_blocks {
            return Err(Error::unsupported(
                "filesystems over 16 TiB (needs the 64bit feature)",
            ));
        }
        let groups = total.div_ceil(BLOCKS_PER_GROUP).max(1);
        let want = (inodes_used + 16)
            .max(size / 16384)
            .min(groups * BLOCKS_PER_GROUP);
        let fit =
            layout(groups, want, data_blocks, placed_end).filter(|l| l.4 <= total && want >= inodes_used);
        let Some(shape) = fit else {
            return Err(Error::invalid_argument(format!(
                "the content needs more than the requested size of {size} bytes"
            )));
        };
        return Ok(geometry(groups, shape, total));
    }
    if data_blocks > max_blocks || placed_end > max_blocks || inodes_used > u64::from(u32::MAX) {
        return Err(Error::unsupported(
            "filesystems over 16 TiB or 2^32 inodes (needs the 64bit feature)",
        ));
    }
    let want = inodes_used + inodes_used / 10 + 64;
    let mut groups = want
        .div_ceil(BLOCKS_PER_GROUP)
        .max(placed_end.div_ceil(BLOCKS_PER_GROUP))
        .max(1);
    loop {
        if groups > max_blocks / BLOCKS_PER_GROUP + 1 {
            return Err(Error::unsupported(
                "filesystems over 16 TiB (needs the 64bit feature)",
            ));
        }
        let Some(shape) = layout(groups, want, data_blocks, placed_end) else {
            groups += 1;
            continue;
        };
        let used_end = shape.4;
        let mut total = (used_end + (used_end / 10).max(256)).next_multiple_of(256);
        let need = total.div_ceil(BLOCKS_PER_GROUP);
        if need > groups {
            groups = need;
            continue;
        }
        if need < groups {
            total = total.max((groups - 1) * BLOCKS_PER_GROUP + 256);
        }
        if total > max_blocks || groups * u64::from(shape.0) > u64::from(u32::MAX) {
            return Err(Error::unsupported(
                "filesystems over 16 TiB or 2^32 inodes (needs the 64bit feature)",
            ));
        }
        return Ok(geometry(groups, shape, total));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_is_consistent() {
        for (inodes, data) in [(12, 5), (100_000, 1_000_000), (12, 40_000), (70_000, 32_000)] {
            let g = compute(inodes, data, 0, None).unwrap();
            assert_eq!(g.groups, g.total_blocks.div_ceil(BLOCKS_PER_GROUP));
            assert!(g.inode_count() >= inodes);
            assert!(g.used_end <= g.total_blocks);
        }
    }

    #[test]
    fn fixed_size() {
        let g = compute(20, 10, 0, Some(1 << 30)).unwrap();
        assert_eq!(g.total_blocks, 262_144);
        assert_eq!(g.groups, 8);
        assert!(compute(20, 1_000_000, 0, Some(1 << 30)).is_err());
    }
}
