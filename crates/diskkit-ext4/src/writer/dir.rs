//! Linear directory blocks.

use super::BLOCK_SIZE;

/// One directory entry: name, inode number, file type code.
pub(crate) type DirEntry = (Vec<u8>, u32, u8);

fn rec_len(name_len: usize) -> usize {
    (8 + name_len + 3) & !3
}

/// Bytes of a block available to entries: all of it, or all but the 12-byte checksum tail.
pub(crate) fn usable(checksums: bool) -> usize {
    if checksums {
        BLOCK_SIZE - 12
    } else {
        BLOCK_SIZE
    }
}

/// Number of blocks the entries (including `.` and `..`) take with `usable` bytes per block.
pub(crate) fn block_count(names: impl Iterator<Item = usize>, usable: usize) -> u64 {
    let mut blocks = 1u64;
    let mut used = rec_len(1) + rec_len(2);
    for n in names {
        let r = rec_len(n);
        if used + r > usable {
            blocks += 1;
            used = 0;
        }
        used += r;
    }
    blocks
}

/// Encode `entries` (with `.` and `..` first) into `blocks` blocks of which `usable` bytes
/// hold entries; extra blocks are empty. A checksum tail, if any, is filled in later.
pub(crate) fn encode(entries: &[DirEntry], blocks: u64, usable: usize) -> Vec<u8> {
    let mut out = vec![0u8; blocks as usize * BLOCK_SIZE];
    let mut block_start = 0usize;
    let mut pos = 0usize;
    let mut last: Option<usize> = None;
    for (name, ino, ftype) in entries {
        let r = rec_len(name.len());
        if pos - block_start + r > usable {
            if let Some(l) = last {
                let len = (block_start + usable - l) as u16;
                out[l + 4..l + 6].copy_from_slice(&len.to_le_bytes());
            }
            block_start += BLOCK_SIZE;
            pos = block_start;
        }
        let e = &mut out[pos..pos + r];
        e[0..4].copy_from_slice(&ino.to_le_bytes());
        e[4..6].copy_from_slice(&(r as u16).to_le_bytes());
        e[6] = name.len() as u8;
        e[7] = *ftype;
        e[8..8 + name.len()].copy_from_slice(name);
        last = Some(pos);
        pos += r;
    }
    if let Some(l) = last {
        let len = (block_start + usable - l) as u16;
        out[l + 4..l + 6].copy_from_slice(&len.to_le_bytes());
    }
    // Remaining empty blocks: one unused entry spanning the block.
    let mut b = block_start + BLOCK_SIZE;
    while b < out.len() {
        out[b + 4..b + 6].copy_from_slice(&(usable as u16).to_le_bytes());
        b += BLOCK_SIZE;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_matches_count() {
        let names: Vec<Vec<u8>> = (0..1000).map(|i| format!("entry-{i}").into_bytes()).collect();
        let n = block_count(names.iter().map(|n| n.len()), BLOCK_SIZE);
        let mut entries = vec![(b".".to_vec(), 2, 2), (b"..".to_vec(), 2, 2)];
        entries.extend(names.iter().map(|n| (n.clone(), 12, 1)));
        let enc = encode(&entries, n, BLOCK_SIZE);
        assert_eq!(enc.len() as u64, n * BLOCK_SIZE as u64);
        // Every block's rec_len chain ends exactly at the block end.
        for blk in enc.chunks(BLOCK_SIZE) {
            let mut p = 0;
            while p < BLOCK_SIZE {
                let r = u16::from_le_bytes([blk[p + 4], blk[p + 5]]) as usize;
                assert!(r >= 8);
                p += r;
            }
            assert_eq!(p, BLOCK_SIZE);
        }
    }
}
