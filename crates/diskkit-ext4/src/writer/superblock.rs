//! Bitmaps, group descriptors and the superblock, written last.

use diskkit::{DiskImage, Result};

use super::checksum::{crc32c, Seeds};
use super::extent;
use super::journal::JOURNAL_INO;
use super::plan::{Layout, Source};
use super::{Options, BLOCKS_PER_GROUP, BLOCK_SIZE, FIRST_INO, INODE_SIZE};

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_EXT_ATTR: u32 = 0x8;
const COMPAT_DIR_INDEX: u32 = 0x20;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_DIR_NLINK: u32 = 0x20;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const FLAGS_SIGNED_HASH: u32 = 0x1;
const LOG_GROUPS_PER_FLEX: u8 = 4;

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Every used block as runs (start, length), ascending and merged.
fn used_runs(layout: &Layout) -> Vec<(u64, u64)> {
    let g = &layout.geometry;
    let mut runs = vec![
        (0, g.first_free()),
        (g.bitmap_start, 2 * g.groups),
        (g.itable_start, g.groups * g.itable_blocks),
    ];
    runs.extend(layout.journal);
    for p in &layout.inodes {
        if p.own_blocks() > 0 {
            runs.push((p.first_block, p.own_blocks()));
        }
        runs.extend(p.placed.iter().flatten().map(|r| (r.physical, r.len)));
    }
    runs.retain(|r| r.1 > 0);
    runs.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (s, n) in runs {
        match merged.last_mut() {
            Some(last) if s <= last.0 + last.1 => last.1 = last.1.max(s + n - last.0),
            _ => merged.push((s, n)),
        }
    }
    merged
}

/// Write bitmaps, descriptors and the superblock.
pub(crate) fn write_metadata(options: &Options, layout: &Layout, image: &DiskImage) -> Result<()> {
    let g = &layout.geometry;
    let used_runs = used_runs(layout);
    let mut run = 0usize;
    let ipg = u64::from(g.inodes_per_group);
    let last_ino = FIRST_INO as u64 + layout.inodes.len() as u64 - 2;
    // Directories per group.
    let mut dirs = vec![0u32; g.groups as usize];
    for p in &layout.inodes {
        let is_dir = p.source == Source::LostFound || !p.entries.is_empty();
        if is_dir {
            dirs[(u64::from(p.ino - 1) / ipg) as usize] += 1;
        }
    }
    let mut gdt = vec![0u8; g.gdt_blocks as usize * BLOCK_SIZE];
    let mut total_free_blocks = 0u64;
    let mut total_free_inodes = 0u64;
    let mut bitmap = vec![0u8; BLOCK_SIZE];
    let seeds = options.metadata_csum.then(|| Seeds::new(&options.uuid));
    for group in 0..g.groups {
        let mut block_csum = 0u32;
        let mut inode_csum = 0u32;
        // Block bitmap: the used runs; bits past the end of the filesystem are set.
        let first = group * BLOCKS_PER_GROUP;
        let in_fs = g.total_blocks.saturating_sub(first).min(BLOCKS_PER_GROUP);
        bitmap.fill(0);
        let mut used = 0u64;
        while let Some(&(s, n)) = used_runs.get(run) {
            if s >= first + in_fs {
                break;
            }
            let from = s.max(first) - first;
            let to = (s + n).min(first + in_fs) - first;
            set_bits(&mut bitmap, from, to);
            used += to - from;
            if s + n > first + in_fs {
                break; // continues in the next group
            }
            run += 1;
        }
        set_bits(&mut bitmap, in_fs, BLOCKS_PER_GROUP);
        let free_blocks = in_fs - used;
        if used > 0 || in_fs < BLOCKS_PER_GROUP {
            image.write_at(&bitmap, g.block_bitmap(group) * BLOCK_SIZE as u64)?;
        }
        if let Some(s) = &seeds {
            block_csum = crc32c(s.fs, &bitmap[..(BLOCKS_PER_GROUP / 8) as usize]);
        }
        // Inode bitmap: inodes 1..=last_ino are used; bits past inodes_per_group are set.
        let ifirst = group * ipg; // zero-based index of the group's first inode
        let iused = last_ino.saturating_sub(ifirst).min(ipg);
        if fill_bitmap(&mut bitmap, iused, ipg) {
            image.write_at(&bitmap, g.inode_bitmap(group) * BLOCK_SIZE as u64)?;
        }
        if let Some(s) = &seeds {
            inode_csum = crc32c(s.fs, &bitmap[..(ipg / 8) as usize]);
        }
        let free_inodes = ipg - iused;
        total_free_blocks += free_blocks;
        total_free_inodes += free_inodes;
        let d = &mut gdt[group as usize * 32..group as usize * 32 + 32];
        put32(d, 0, g.block_bitmap(group) as u32);
        put32(d, 4, g.inode_bitmap(group) as u32);
        put32(d, 8, g.inode_table(group) as u32);
        put16(d, 12, free_blocks as u16);
        put16(d, 14, free_inodes as u16);
        put16(d, 16, dirs[group as usize] as u16);
        if let Some(s) = &seeds {
            put16(d, 24, block_csum as u16);
            put16(d, 26, inode_csum as u16);
            let c = crc32c(s.fs, &(group as u32).to_le_bytes());
            // The whole descriptor, with the checksum field still zero.
            let c = crc32c(c, &d[..32]);
            put16(d, 30, c as u16);
        }
    }
    image.write_at(&gdt, BLOCK_SIZE as u64)?;

    let mut sb = vec![0u8; 1024];
    put32(&mut sb, 0, g.inode_count() as u32);
    put32(&mut sb, 4, g.total_blocks as u32);
    put32(&mut sb, 12, total_free_blocks as u32);
    put32(&mut sb, 16, total_free_inodes as u32);
    put32(&mut sb, 20, 0); // first data block
    put32(&mut sb, 24, 2); // log block size: 1024 << 2
    put32(&mut sb, 28, 2);
    put32(&mut sb, 32, BLOCKS_PER_GROUP as u32);
    put32(&mut sb, 36, BLOCKS_PER_GROUP as u32);
    put32(&mut sb, 40, g.inodes_per_group);
    let time = options.time.clamp(0, i64::from(u32::MAX)) as u32;
    put32(&mut sb, 48, time); // wtime
    put16(&mut sb, 54, 0xFFFF); // max mount count: -1
    put16(&mut sb, 56, 0xEF53);
    put16(&mut sb, 58, 1); // clean
    put16(&mut sb, 60, 1); // errors: continue
    put32(&mut sb, 64, time); // lastcheck
    put32(&mut sb, 72, 0); // creator OS: Linux
    put32(&mut sb, 76, 1); // dynamic revision
    put32(&mut sb, 84, FIRST_INO);
    put16(&mut sb, 88, INODE_SIZE as u16);
    let journal = if layout.journal.is_some() {
        COMPAT_HAS_JOURNAL
    } else {
        0
    };
    put32(
        &mut sb,
        92,
        COMPAT_EXT_ATTR | COMPAT_DIR_INDEX | COMPAT_SPARSE_SUPER2 | journal,
    );
    put32(
        &mut sb,
        96,
        INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_FLEX_BG,
    );
    put32(
        &mut sb,
        100,
        RO_COMPAT_SPARSE_SUPER
            | RO_COMPAT_LARGE_FILE
            | RO_COMPAT_HUGE_FILE
            | RO_COMPAT_DIR_NLINK
            | RO_COMPAT_EXTRA_ISIZE
            | if options.metadata_csum {
                RO_COMPAT_METADATA_CSUM
            } else {
                0
            },
    );
    sb[104..120].copy_from_slice(&options.uuid);
    let label = &options.label[..options.label.len().min(16)];
    sb[120..120 + label.len()].copy_from_slice(label);
    if let Some((first, blocks)) = layout.journal {
        put32(&mut sb, 0xE0, JOURNAL_INO); // s_journal_inum
        sb[0xFD] = 1; // s_jnl_backup_type: s_jnl_blocks holds a copy of the inode's block map
        let (i_block, _) = extent::build(blocks, first, first + blocks);
        sb[0x10C..0x10C + 60].copy_from_slice(&i_block);
        put32(
            &mut sb,
            0x10C + 15 * 4,
            ((blocks * BLOCK_SIZE as u64) >> 32) as u32,
        );
        put32(&mut sb, 0x10C + 16 * 4, (blocks * BLOCK_SIZE as u64) as u32);
    }
    sb[236..252].copy_from_slice(&options.hash_seed);
    sb[252] = 1; // half_md4
    put32(&mut sb, 264, time); // mkfs time
    put16(&mut sb, 348, 32); // min extra isize
    put16(&mut sb, 350, 32); // want extra isize
    put32(&mut sb, 352, FLAGS_SIGNED_HASH);
    sb[372] = LOG_GROUPS_PER_FLEX;
    // s_backup_bgs (588..596) stay 0: no backups.
    if options.metadata_csum {
        sb[373] = 1; // crc32c
        let c = crc32c(!0, &sb[..0x3FC]);
        sb[0x3FC..].copy_from_slice(&c.to_le_bytes());
    }
    image.write_at(&sb, 1024)
}

/// Set the first `used` bits, clear up to `valid`, set the rest (padding). Returns whether the
/// block has any bit set (an all-zero bitmap is left unwritten: the image reads as zeroes).
fn fill_bitmap(bitmap: &mut [u8], used: u64, valid: u64) -> bool {
    bitmap.fill(0);
    let total = bitmap.len() as u64 * 8;
    set_bits(bitmap, 0, used);
    set_bits(bitmap, valid, total);
    used > 0 || valid < total
}

/// Set bits `[from, to)`.
fn set_bits(bitmap: &mut [u8], from: u64, to: u64) {
    let mut bit = from;
    while bit < to {
        if bit % 8 == 0 && to - bit >= 8 {
            let bytes = ((to - bit) / 8) as usize;
            let at = (bit / 8) as usize;
            bitmap[at..at + bytes].fill(0xff);
            bit += bytes as u64 * 8;
        } else {
            bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
            bit += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps() {
        let mut b = vec![0u8; 8];
        assert!(fill_bitmap(&mut b, 13, 50));
        assert_eq!(b, [0xff, 0x1f, 0, 0, 0, 0, 0xfc, 0xff]);
        assert!(!fill_bitmap(&mut b, 0, 64));
        assert_eq!(b, [0; 8]);
    }
}
