//! Filling the `metadata_csum` checksum fields of the structures the writer produces (crc32c
//! itself lives in [`crate::crc`]).

pub(crate) use crate::crc::crc32c;

/// Checksum seeds of one filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seeds {
    /// `crc32c(~0, uuid)`.
    pub(crate) fs: u32,
}

impl Seeds {
    pub(crate) fn new(uuid: &[u8; 16]) -> Seeds {
        Seeds { fs: crc32c(!0, uuid) }
    }

    /// Seed of inode `ino` (generation 0): extent blocks and directory blocks use it.
    pub(crate) fn inode(&self, ino: u32) -> u32 {
        let c = crc32c(self.fs, &ino.to_le_bytes());
        crc32c(c, &0u32.to_le_bytes())
    }
}

/// Fill the checksum fields of a 256-byte inode.
pub(crate) fn inode_csum(seeds: &Seeds, ino: u32, inode: &mut [u8]) {
    inode[0x7C..0x7E].fill(0);
    inode[0x82..0x84].fill(0);
    let crc = crc32c(seeds.inode(ino), inode);
    inode[0x7C..0x7E].copy_from_slice(&(crc as u16).to_le_bytes());
    inode[0x82..0x84].copy_from_slice(&((crc >> 16) as u16).to_le_bytes());
}

/// Fill the tail of an extent-tree block (after `max` entries).
pub(crate) fn extent_block_csum(seeds: &Seeds, ino: u32, block: &mut [u8], max: usize) {
    let end = 12 + 12 * max;
    let crc = crc32c(seeds.inode(ino), &block[..end]);
    block[end..end + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Fill the 12-byte checksum tail of every directory leaf block.
pub(crate) fn dir_block_csums(seeds: &Seeds, ino: u32, blocks: &mut [u8], block_size: usize) {
    let seed = seeds.inode(ino);
    for b in blocks.chunks_mut(block_size) {
        let t = block_size - 12;
        b[t..t + 4].fill(0);
        b[t + 4..t + 6].copy_from_slice(&12u16.to_le_bytes());
        b[t + 6] = 0;
        b[t + 7] = 0xDE;
        let crc = crc32c(seed, &b[..t]);
        b[t + 8..t + 12].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Fill `h_checksum` of an xattr block at `block_nr`.
pub(crate) fn xattr_block_csum(seeds: &Seeds, block_nr: u64, block: &mut [u8]) {
    block[0x10..0x14].fill(0);
    let c = crc32c(seeds.fs, &block_nr.to_le_bytes());
    let crc = crc32c(c, block);
    block[0x10..0x14].copy_from_slice(&crc.to_le_bytes());
}
