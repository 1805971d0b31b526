//! Extent trees: leaves in the inode when they fit, otherwise index levels of any depth.

use super::BLOCK_SIZE;

const EXTENT_MAGIC: u16 = 0xF30A;
/// Entries in the inode's `i_block` root.
const ROOT_ENTRIES: usize = 4;
/// Entries in one 4 KiB tree block.
pub(crate) const BLOCK_ENTRIES: usize = (BLOCK_SIZE - 12) / 12;
/// Longest initialized extent, in blocks.
pub(crate) const MAX_EXTENT_LEN: u64 = 32768;

/// Number of extents for `blocks` contiguous blocks.
pub(crate) fn extent_count(blocks: u64) -> u64 {
    blocks.div_ceil(MAX_EXTENT_LEN)
}

/// Number of tree blocks needed for `extents` extents.
pub(crate) fn tree_blocks(extents: u64) -> u64 {
    let mut level = extents;
    let mut total = 0;
    while level > ROOT_ENTRIES as u64 {
        level = level.div_ceil(BLOCK_ENTRIES as u64);
        total += level;
    }
    total
}

fn header(buf: &mut [u8], entries: usize, max: usize, depth: u16) {
    buf[0..2].copy_from_slice(&EXTENT_MAGIC.to_le_bytes());
    buf[2..4].copy_from_slice(&(entries as u16).to_le_bytes());
    buf[4..6].copy_from_slice(&(max as u16).to_le_bytes());
    buf[6..8].copy_from_slice(&depth.to_le_bytes());
}

/// One 12-byte tree entry: (first logical block, encoded bytes).
type Entry = (u32, [u8; 12]);

fn leaf_entry(logical: u32, len: u16, phys: u64) -> Entry {
    let mut e = [0u8; 12];
    e[0..4].copy_from_slice(&logical.to_le_bytes());
    e[4..6].copy_from_slice(&len.to_le_bytes());
    e[6..8].copy_from_slice(&((phys >> 32) as u16).to_le_bytes());
    e[8..12].copy_from_slice(&(phys as u32).to_le_bytes());
    (logical, e)
}

fn index_entry(logical: u32, child: u64) -> Entry {
    let mut e = [0u8; 12];
    e[0..4].copy_from_slice(&logical.to_le_bytes());
    e[4..8].copy_from_slice(&(child as u32).to_le_bytes());
    e[8..10].copy_from_slice(&((child >> 32) as u16).to_le_bytes());
    (logical, e)
}

/// Number of extents for runs of blocks (logical start, length).
pub(crate) fn runs_extent_count(runs: &[(u64, u64)]) -> u64 {
    runs.iter().map(|&(_, n)| extent_count(n)).sum()
}

/// Build the extent tree of a file whose `blocks` data blocks start at `data` (contiguous),
/// with tree blocks from `tree` on. Returns `i_block` and the tree blocks to write.
pub(crate) fn build(blocks: u64, data: u64, tree: u64) -> ([u8; 60], Vec<(u64, Vec<u8>)>) {
    build_runs(&[(0, blocks)], data, tree)
}

/// Like [`build`] for a file with holes: `runs` are (first logical block, length), ascending;
/// their blocks are stored one after the other from `data`.
pub(crate) fn build_runs(runs: &[(u64, u64)], data: u64, tree: u64) -> ([u8; 60], Vec<(u64, Vec<u8>)>) {
    let mut phys = data;
    let mapped: Vec<(u64, u64, u64)> = runs
        .iter()
        .map(|&(logical, blocks)| {
            let at = phys;
            phys += blocks;
            (logical, at, blocks)
        })
        .collect();
    build_mapped(&mapped, tree)
}

/// The extent tree of a file made of `runs` (first logical block, first physical block,
/// length), ascending by logical block, with tree blocks from `tree` on.
pub(crate) fn build_mapped(runs: &[(u64, u64, u64)], tree: u64) -> ([u8; 60], Vec<(u64, Vec<u8>)>) {
    let count: u64 = runs.iter().map(|r| extent_count(r.2)).sum();
    let mut entries: Vec<Entry> = Vec::with_capacity(count as usize);
    for &(logical, mut phys, blocks) in runs {
        let mut done = 0u64;
        while done < blocks {
            let len = (blocks - done).min(MAX_EXTENT_LEN);
            entries.push(leaf_entry((logical + done) as u32, len as u16, phys));
            phys += len;
            done += len;
        }
    }
    let mut out = Vec::new();
    let mut next = tree;
    let mut depth = 0u16;
    while entries.len() > ROOT_ENTRIES {
        let mut parents = Vec::with_capacity(entries.len().div_ceil(BLOCK_ENTRIES));
        for chunk in entries.chunks(BLOCK_ENTRIES) {
            let mut blk = vec![0u8; BLOCK_SIZE];
            header(&mut blk, chunk.len(), BLOCK_ENTRIES, depth);
            for (i, (_, e)) in chunk.iter().enumerate() {
                blk[12 + i * 12..24 + i * 12].copy_from_slice(e);
            }
            parents.push(index_entry(chunk[0].0, next));
            out.push((next, blk));
            next += 1;
        }
        entries = parents;
        depth += 1;
    }
    let mut root = [0u8; 60];
    header(&mut root, entries.len(), ROOT_ENTRIES, depth);
    for (i, (_, e)) in entries.iter().enumerate() {
        root[12 + i * 12..24 + i * 12].copy_from_slice(e);
    }
    (root, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        assert_eq!(tree_blocks(0), 0);
        assert_eq!(tree_blocks(4), 0);
        assert_eq!(tree_blocks(5), 1);
        assert_eq!(tree_blocks(340 * 4), 4);
        assert_eq!(tree_blocks(340 * 4 + 1), 5 + 1);
        let (root, blocks) = build(MAX_EXTENT_LEN * 5, 1000, 50);
        assert_eq!(blocks.len() as u64, tree_blocks(5));
        assert_eq!(u16::from_le_bytes([root[6], root[7]]), 1);
        let (_, blocks) = build(MAX_EXTENT_LEN * 1361, 1000, 50);
        assert_eq!(blocks.len() as u64, tree_blocks(1361));
    }
}
