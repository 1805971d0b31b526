//! An internal jbd2 journal (inode 8), for filesystems a system will mount read-write.
//!
//! The journal is one contiguous run of blocks described by inode 8 (one extent: at most
//! 16,384 blocks, so the extent root fits in the inode) and by the superblock's backup copy
//! of that inode's block map (`s_jnl_blocks`). Its first block is a version-2 journal
//! superblock with `s_start = 0`: the journal is empty and nothing is replayed. The other
//! blocks are not written: in a new image they read as zeroes, which is what `mke2fs` leaves
//! there, and in a sparse image they take no space until the kernel writes transactions.
//! No journal feature (checksums, 64-bit block numbers, fast commits) is set: the kernel
//! enables what it needs when it mounts the filesystem.

use super::BLOCK_SIZE;

/// The journal's inode number.
pub(crate) const JOURNAL_INO: u32 = 8;
/// jbd2 magic number (big-endian on disk, as all jbd2 fields).
const JBD2_MAGIC: u32 = 0xC03B_3998;
/// Block type of a version-2 journal superblock.
const JBD2_SUPERBLOCK_V2: u32 = 4;

/// Journal size in blocks for a filesystem of `total_blocks` 4 KiB blocks: 4 MiB below
/// 128 MiB, 16 MiB below 1 GiB, 64 MiB from there on (the sizes `mke2fs` picks for small
/// filesystems; larger journals only take more of a VM's writes, never more throughput for
/// one guest).
pub(crate) fn blocks_for(total_blocks: u64) -> u64 {
    const MIB: u64 = (1 << 20) / BLOCK_SIZE as u64;
    if total_blocks < 128 * MIB {
        4 * MIB
    } else if total_blocks < 1024 * MIB {
        16 * MIB
    } else {
        64 * MIB
    }
}

/// The journal superblock: a 4 KiB block for the first block of a journal of `blocks`
/// blocks in a filesystem with `uuid`.
pub(crate) fn superblock(blocks: u64, uuid: &[u8; 16]) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    let mut put = |at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    put(0x00, JBD2_MAGIC);
    put(0x04, JBD2_SUPERBLOCK_V2);
    put(0x08, 0); // header sequence
    put(0x0C, BLOCK_SIZE as u32); // s_blocksize
    put(0x10, blocks as u32); // s_maxlen
    put(0x14, 1); // s_first: the first log block
    put(0x18, 1); // s_sequence: first transaction expected
    put(0x1C, 0); // s_start: 0 = empty, nothing to replay
    put(0x40, 1); // s_nr_users: the one filesystem it belongs to
    b[0x30..0x40].copy_from_slice(uuid);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(blocks_for(1000), 1024);
        assert_eq!(blocks_for(32768), 4096);
        assert_eq!(blocks_for(16 << 18), 16384);
    }

    #[test]
    fn superblock_fields() {
        let b = superblock(4096, &[7; 16]);
        assert_eq!(&b[..4], &[0xC0, 0x3B, 0x39, 0x98]);
        assert_eq!(u32::from_be_bytes(b[0x10..0x14].try_into().unwrap()), 4096);
        assert_eq!(&b[0x30..0x40], &[7; 16]);
        assert_eq!(b.len(), BLOCK_SIZE);
    }
}
