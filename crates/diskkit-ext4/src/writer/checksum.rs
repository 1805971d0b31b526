//! crc32c as ext4 uses it (`metadata_csum`): the raw Castagnoli CRC with no final inversion,
//! chained from a seed.

/// Reflected Castagnoli polynomial.
const POLY: u32 = 0x82F6_3B78;

const fn table() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut s = 1;
    while s < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        s += 1;
    }
    t
}

static TABLE: [[u32; 256]; 8] = table();

/// Continue the CRC `crc` over `data` (slicing by 8).
pub(crate) fn crc32c(mut crc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = crc ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = TABLE[7][(lo & 0xff) as usize]
            ^ TABLE[6][((lo >> 8) & 0xff) as usize]
            ^ TABLE[5][((lo >> 16) & 0xff) as usize]
            ^ TABLE[4][(lo >> 24) as usize]
            ^ TABLE[3][(hi & 0xff) as usize]
            ^ TABLE[2][((hi >> 8) & 0xff) as usize]
            ^ TABLE[1][((hi >> 16) & 0xff) as usize]
            ^ TABLE[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ TABLE[0][((crc ^ u32::from(b)) & 0xff) as usize];
    }
    crc
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_value() {
        // Standard CRC-32C check value: crc32c("123456789") = 0xE3069283 (with the
        // conventional inversions applied around the raw function).
        assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
        let long: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut bytewise = !0u32;
        for &b in &long {
            bytewise = crc32c(bytewise, &[b]);
        }
        assert_eq!(crc32c(!0, &long), bytewise);
    }
}
