//! The internal snapshot table, as far as the consistency check needs it: each snapshot's L1
//! table, and how many bytes the table itself takes.
//!
//! Entry layout (QEMU `docs/interop/qcow2.txt`, "Snapshot table"): `l1_table_offset` (8),
//! `l1_size` (4), `id_str` length (2), name length (2), date (4 + 4), VM clock (8),
//! `vm_state_size` (4), extra data size (4), the extra data, the ID string, the name, then
//! padding to a multiple of 8 bytes.

use crate::error::{Error, Result};
use crate::storage::Storage;

/// QEMU's limit on the number of snapshots (`QCOW_MAX_SNAPSHOTS`).
const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU's limit on the whole table (`QCOW_MAX_SNAPSHOTS_SIZE`, 64 MiB).
const MAX_TABLE_BYTES: u64 = 64 << 20;
/// QEMU's limit on one entry's extra data (`QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
const MAX_EXTRA: u64 = 1024;
const FIXED_LEN: u64 = 40;

/// One snapshot's L1 table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SnapshotL1 {
    /// `id_str` and name, for messages.
    pub(super) label: String,
    pub(super) l1_offset: u64,
    pub(super) l1_size: u64,
}

fn be32(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u64::from(u32::from_be_bytes(w))
}

fn be16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

/// Read `count` entries from `offset`. Returns the snapshots and the table's length in bytes.
/// A table that cannot be read whole (past the end of the file, over QEMU's limits) is an
/// error: QEMU refuses to open such an image too.
pub(super) fn read_table(
    storage: &dyn Storage,
    offset: u64,
    count: u32,
    cluster_size: u64,
    file_len: u64,
) -> Result<(Vec<SnapshotL1>, u64)> {
    if count == 0 {
        return Ok((Vec::new(), 0));
    }
    let bad = |why: String| Error::corrupt(format!("qcow2 snapshot table at {offset:#x}: {why}"));
    if count > MAX_SNAPSHOTS {
        return Err(bad(format!("{count} snapshots is more than {MAX_SNAPSHOTS}")));
    }
    if offset == 0 || offset % cluster_size != 0 {
        return Err(bad("not cluster aligned".into()));
    }
    let mut out = Vec::new();
    let mut pos = offset;
    for i in 0..count {
        let used = pos - offset;
        let read = |len: u64, at: u64| -> Result<Vec<u8>> {
            if used.saturating_add(at - pos).saturating_add(len) > MAX_TABLE_BYTES {
                return Err(bad(format!("larger than {MAX_TABLE_BYTES} bytes")));
            }
            match at.checked_add(len) {
                Some(end) if end <= file_len => {}
                _ => return Err(bad(format!("entry {i} lies past the end of the file"))),
            }
            let mut b = vec![0u8; len as usize];
            storage.read_at(&mut b, at)?;
            Ok(b)
        };
        let fixed = read(FIXED_LEN, pos)?;
        let mut w = [0u8; 8];
        w.copy_from_slice(&fixed[..8]);
        let l1_offset = u64::from_be_bytes(w);
        let l1_size = be32(&fixed, 8);
        let id_len = be16(&fixed, 12);
        let name_len = be16(&fixed, 14);
        let extra = be32(&fixed, 36);
        if extra > MAX_EXTRA {
            return Err(bad(format!("entry {i} has {extra} bytes of extra data")));
        }
        let var = read(extra + id_len + name_len, pos + FIXED_LEN)?;
        let id = String::from_utf8_lossy(&var[extra as usize..(extra + id_len) as usize]).into_owned();
        let name = String::from_utf8_lossy(&var[(extra + id_len) as usize..]).into_owned();
        out.push(SnapshotL1 {
            label: format!("{id} ({name})"),
            l1_offset,
            l1_size,
        });
        pos = (pos + FIXED_LEN + extra + id_len + name_len).next_multiple_of(8);
    }
    Ok((out, pos - offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    /// A file with one snapshot entry at 4096 (L1 at 8192, 3 entries, `extra` extra bytes).
    fn image(extra: u32) -> MemStorage {
        let mut b = vec![0u8; 8192];
        let e = &mut b[4096..];
        e[..8].copy_from_slice(&8192u64.to_be_bytes());
        e[8..12].copy_from_slice(&3u32.to_be_bytes());
        e[12..14].copy_from_slice(&1u16.to_be_bytes());
        e[14..16].copy_from_slice(&4u16.to_be_bytes());
        e[36..40].copy_from_slice(&extra.to_be_bytes());
        let var = 40 + extra as usize;
        e[var] = b'1';
        e[var + 1..var + 5].copy_from_slice(b"snap");
        MemStorage::from_bytes(b)
    }

    #[test]
    fn reads_an_entry() {
        let s = image(16);
        let (snaps, len) = read_table(&s, 4096, 1, 4096, 8192).unwrap();
        assert_eq!(snaps[0].label, "1 (snap)");
        assert_eq!((snaps[0].l1_offset, snaps[0].l1_size), (8192, 3));
        assert_eq!(len, (40u64 + 16 + 5).next_multiple_of(8));
        assert_eq!(read_table(&s, 0, 0, 4096, 8192).unwrap().1, 0);
    }

    #[test]
    fn rejects_bad_tables() {
        let s = image(16);
        // Too many, unaligned, past the end of the file (200 entries), too much extra data.
        assert!(read_table(&s, 4096, MAX_SNAPSHOTS + 1, 4096, 8192).is_err());
        assert!(read_table(&s, 4100, 1, 4096, 8192).is_err());
        assert!(read_table(&s, 4096, 200, 4096, 8192).is_err());
        assert!(read_table(&image(2000), 4096, 1, 4096, 8192).is_err());
    }
}
