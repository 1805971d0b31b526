//! Persistent dirty bitmaps, as far as the consistency check needs them: which clusters the
//! bitmap directory, the bitmap tables and the bitmap data use.
//!
//! The bitmaps header extension (QEMU `docs/interop/qcow2.txt`, "Bitmaps extension") holds
//! `nb_bitmaps` (4), reserved (4), `bitmap_directory_size` (8), `bitmap_directory_offset` (8).
//! Each directory entry: `bitmap_table_offset` (8), `bitmap_table_size` in entries (4), flags
//! (4), type (1), granularity bits (1), name size (2), extra data size (4), the extra data, the
//! name, padding to 8 bytes. A bitmap table entry holds a cluster offset in bits 9..=55, or 0.
//! The extension is valid only while the `bitmaps` autoclear bit is set.

use crate::error::{Error, Result};

/// The extension's type.
pub(super) const EXT_BITMAPS: u32 = 0x2385_2875;
/// QEMU's limits (`QCOW2_MAX_BITMAPS`, `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
const MAX_BITMAPS: u64 = 65535;
const MAX_DIRECTORY: u64 = 64 << 20;
/// The largest bitmap table QEMU writes (`BME_MAX_TABLE_SIZE`).
const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// A byte range the bitmaps use: (offset, length, what).
pub(super) type Range = (u64, u64, &'static str);

fn be(b: &[u8], at: usize, n: usize) -> u64 {
    b[at..at + n].iter().fold(0, |a, &x| (a << 8) | u64::from(x))
}

/// The ranges used by the bitmaps the extension `ext` describes. `read(offset, len)` reads
/// metadata (charged to the caller's budget). A malformed directory or table, or one that
/// does not lie inside the file (`file_len` bytes), is an error; so are more ranges than the
/// file has clusters (valid bitmaps use a cluster of their own for each), which bounds the list.
pub(super) fn ranges(
    ext: &[u8],
    cluster_size: u64,
    file_len: u64,
    read: &mut dyn FnMut(u64, u64) -> Result<Vec<u8>>,
) -> Result<Vec<Range>> {
    let inside = |off: u64, len: u64, what: &str| -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= file_len => Ok(()),
            _ => Err(Error::corrupt(format!(
                "qcow2 {what} ({len} bytes at {off:#x}) lies past the end of the file"
            ))),
        }
    };
    if ext.len() < 24 {
        return Err(Error::corrupt("qcow2 bitmaps extension is truncated"));
    }
    let nb = be(ext, 0, 4);
    let dir_size = be(ext, 8, 8);
    let dir_offset = be(ext, 16, 8);
    if nb == 0 || nb > MAX_BITMAPS || dir_size > MAX_DIRECTORY || dir_offset % cluster_size != 0 {
        return Err(Error::corrupt(format!(
            "qcow2 bitmaps extension is invalid ({nb} bitmaps, directory of {dir_size} bytes at {dir_offset:#x})"
        )));
    }
    inside(dir_offset, dir_size, "bitmap directory")?;
    let dir = read(dir_offset, dir_size)?;
    let max_ranges = file_len.div_ceil(cluster_size);
    let too_many = || Error::corrupt("qcow2 bitmaps name more clusters than the file holds");
    let mut out = vec![(dir_offset, dir_size, "the bitmap directory")];
    let mut pos = 0usize;
    for i in 0..nb {
        let fixed = dir
            .get(pos..pos + 24)
            .ok_or_else(|| Error::corrupt(format!("qcow2 bitmap directory entry {i} is truncated")))?;
        let table_offset = be(fixed, 0, 8);
        let table_size = be(fixed, 8, 4);
        let name_size = be(fixed, 18, 2);
        let extra = be(fixed, 20, 4);
        if table_offset % cluster_size != 0 || table_size > MAX_TABLE_ENTRIES {
            return Err(Error::corrupt(format!(
                "qcow2 bitmap {i}: table of {table_size} entries at {table_offset:#x} is invalid"
            )));
        }
        inside(table_offset, table_size * 8, "bitmap table")?;
        let table = read(table_offset, table_size * 8)?;
        if out.len() as u64 >= max_ranges {
            return Err(too_many());
        }
        out.push((table_offset, table_size * 8, "a bitmap table"));
        for e in table.chunks_exact(8) {
            let off = be(e, 0, 8) & ENTRY_OFFSET_MASK;
            if off != 0 {
                if out.len() as u64 >= max_ranges {
                    return Err(too_many());
                }
                out.push((off, cluster_size, "a bitmap data cluster"));
            }
        }
        let len = 24u64
            .checked_add(name_size)
            .and_then(|l| l.checked_add(extra))
            .ok_or_else(|| Error::corrupt("qcow2 bitmap directory entry is too long"))?;
        pos = pos
            .checked_add(len.next_multiple_of(8) as usize)
            .filter(|&p| p as u64 <= dir_size)
            .ok_or_else(|| {
                Error::corrupt(format!("qcow2 bitmap directory entry {i} overruns the directory"))
            })?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(nb: u32, dir_size: u64, dir_offset: u64) -> Vec<u8> {
        let mut e = vec![0u8; 24];
        e[..4].copy_from_slice(&nb.to_be_bytes());
        e[8..16].copy_from_slice(&dir_size.to_be_bytes());
        e[16..24].copy_from_slice(&dir_offset.to_be_bytes());
        e
    }

    /// One directory entry: a table of 2 entries at 8192, name "b0".
    fn directory() -> Vec<u8> {
        let mut d = vec![0u8; 32];
        d[..8].copy_from_slice(&8192u64.to_be_bytes());
        d[8..12].copy_from_slice(&2u32.to_be_bytes());
        d[18..20].copy_from_slice(&2u16.to_be_bytes());
        d[24..26].copy_from_slice(b"b0");
        d
    }

    #[test]
    fn lists_directory_tables_and_data() {
        let mut read = |off: u64, len: u64| -> Result<Vec<u8>> {
            Ok(match off {
                4096 => directory(),
                8192 => {
                    let mut t = vec![0u8; len as usize];
                    t[..8].copy_from_slice(&12288u64.to_be_bytes());
                    t[8..].copy_from_slice(&1u64.to_be_bytes()); // all ones, no cluster
                    t
                }
                _ => panic!("unexpected read at {off}"),
            })
        };
        let r = ranges(&ext(1, 32, 4096), 4096, 16384, &mut read).unwrap();
        assert_eq!(
            r.iter().map(|(o, l, _)| (*o, *l)).collect::<Vec<_>>(),
            vec![(4096, 32), (8192, 16), (12288, 4096)]
        );
    }

    /// Bitmaps that name more clusters than the file has (here two directory entries sharing
    /// one table of 512 set entries, in a 4-cluster file) cannot be valid: an error, not a list
    /// that grows with every entry that names the same table again.
    #[test]
    fn more_ranges_than_clusters_are_refused() {
        let mut dir = directory();
        dir[8..12].copy_from_slice(&512u32.to_be_bytes());
        dir.extend_from_within(..32);
        let mut read = |off: u64, len: u64| -> Result<Vec<u8>> {
            Ok(match off {
                4096 => dir.clone(),
                8192 => (0..len / 8).flat_map(|_| 12288u64.to_be_bytes()).collect(),
                _ => panic!("unexpected read at {off}"),
            })
        };
        let e = ranges(&ext(2, 64, 4096), 4096, 16384, &mut read).unwrap_err();
        assert!(e.to_string().contains("more clusters"), "{e}");
    }

    #[test]
    fn rejects_bad_extensions() {
        let mut read = |_: u64, _: u64| -> Result<Vec<u8>> { Ok(directory()) };
        assert!(ranges(&[0u8; 8], 4096, 16384, &mut read).is_err()); // truncated
        assert!(ranges(&ext(0, 32, 4096), 4096, 16384, &mut read).is_err()); // no bitmaps
        assert!(ranges(&ext(1, 32, 4100), 4096, 16384, &mut read).is_err()); // unaligned
        assert!(ranges(&ext(1, 32, 16384), 4096, 16384, &mut read).is_err()); // past the end
        assert!(ranges(&ext(2, 32, 4096), 4096, 16384, &mut read).is_err()); // overruns
    }
}
