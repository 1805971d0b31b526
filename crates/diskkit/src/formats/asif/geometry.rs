//! ASIF geometry: how guest offsets map onto directories, tables, chunk groups and bitmaps.
//!
//! With B = block size, K = chunk size and M = maximum sector count (see the format notes in
//! `shared/docs/asif-format.md`):
//!
//! ```text
//! N = 4 * B                 data chunks per chunk group
//! S = 8 * (N + 1)           bytes per chunk group (N data entries + 1 bitmap entry)
//! C = floor(K / S)          chunk groups per table
//! D = C * N * K             guest bytes one table maps
//! T = ceil(M * B / D)       entries in a directory
//! ```
//!
//! All arithmetic on header values is checked: the header comes from an untrusted file.

use crate::error::{Error, Result};

/// Largest chunk size accepted (tables are one chunk and are held in memory).
pub(super) const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// Largest directory accepted, in entries (each directory is read whole at open).
pub(super) const MAX_DIRECTORY_ENTRIES: u64 = 1 << 22;

/// Derived geometry of an ASIF image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Geometry {
    /// Block (sector) size in bytes.
    pub(super) block_size: u64,
    /// Chunk size in bytes.
    pub(super) chunk_size: u64,
    /// Data chunks per chunk group (N).
    pub(super) chunks_per_group: u64,
    /// Chunk groups per table (C).
    pub(super) groups_per_table: u64,
    /// Guest bytes mapped by one table (D).
    pub(super) bytes_per_table: u64,
    /// Entries in a directory (T).
    pub(super) directory_entries: u64,
    /// Maximum guest size in bytes (M * B).
    pub(super) max_bytes: u64,
}

impl Geometry {
    /// Compute and check the geometry for the given header values.
    pub(super) fn new(block_size: u64, chunk_size: u64, max_sectors: u64) -> Result<Self> {
        if block_size == 0 || block_size % 512 != 0 {
            return Err(Error::corrupt(format!(
                "block size {block_size} is not a non-zero multiple of 512"
            )));
        }
        if chunk_size == 0 || chunk_size % block_size != 0 {
            return Err(Error::corrupt(format!(
                "chunk size {chunk_size} is not a non-zero multiple of the block size {block_size}"
            )));
        }
        if chunk_size > MAX_CHUNK_SIZE {
            return Err(Error::unsupported(format!(
                "chunk size {chunk_size} is larger than {MAX_CHUNK_SIZE}"
            )));
        }
        if max_sectors == 0 {
            return Err(Error::corrupt("maximum sector count is zero"));
        }
        let chunks_per_group = 4 * block_size;
        let group_bytes = 8 * (chunks_per_group + 1);
        let groups_per_table = chunk_size / group_bytes;
        if groups_per_table == 0 {
            return Err(Error::corrupt(format!(
                "chunk size {chunk_size} cannot hold one chunk group ({group_bytes} bytes)"
            )));
        }
        let bytes_per_table = groups_per_table
            .checked_mul(chunks_per_group)
            .and_then(|v| v.checked_mul(chunk_size))
            .ok_or_else(|| Error::corrupt("table coverage overflows"))?;
        let max_bytes = max_sectors
            .checked_mul(block_size)
            .ok_or_else(|| Error::corrupt(format!("maximum sector count {max_sectors} overflows")))?;
        let directory_entries = max_bytes.div_ceil(bytes_per_table);
        if directory_entries > MAX_DIRECTORY_ENTRIES {
            return Err(Error::unsupported(format!(
                "directory of {directory_entries} entries is larger than {MAX_DIRECTORY_ENTRIES}"
            )));
        }
        Ok(Geometry {
            block_size,
            chunk_size,
            chunks_per_group,
            groups_per_table,
            bytes_per_table,
            directory_entries,
            max_bytes,
        })
    }

    /// Bytes of one directory: the sequence number and T entries.
    pub(super) fn directory_bytes(&self) -> u64 {
        8 * (self.directory_entries + 1)
    }

    /// Entries in one table (data and bitmap entries of all groups).
    pub(super) fn table_entries(&self) -> usize {
        // Bounded: groups_per_table * (N + 1) * 8 <= chunk_size <= MAX_CHUNK_SIZE.
        (self.groups_per_table * (self.chunks_per_group + 1)) as usize
    }

    /// Bytes of the used part of a table.
    pub(super) fn table_bytes(&self) -> usize {
        self.table_entries() * 8
    }

    /// Blocks per chunk.
    pub(super) fn blocks_per_chunk(&self) -> u64 {
        self.chunk_size / self.block_size
    }

    /// Bytes of bitmap that describe one chunk (2 bits per block).
    pub(super) fn bitmap_bytes_per_chunk(&self) -> u64 {
        self.blocks_per_chunk() / 4
    }

    /// Where guest `offset` lives: the table index and the chunk index inside the table.
    pub(super) fn locate(&self, offset: u64) -> (u64, u64) {
        (
            offset / self.bytes_per_table,
            (offset % self.bytes_per_table) / self.chunk_size,
        )
    }

    /// Index in the table's flat entry array of the data entry for chunk `c` of the table.
    pub(super) fn data_entry_index(&self, c: u64) -> usize {
        (c + c / self.chunks_per_group) as usize
    }

    /// Index in the table's flat entry array of the bitmap entry of chunk `c`'s group.
    pub(super) fn bitmap_entry_index(&self, c: u64) -> usize {
        ((c / self.chunks_per_group) * (self.chunks_per_group + 1) + self.chunks_per_group) as usize
    }

    /// Byte offset, inside the group's bitmap chunk, of the bitmap slice of chunk `c`.
    pub(super) fn bitmap_slice_offset(&self, c: u64) -> u64 {
        (c % self.chunks_per_group) * self.bitmap_bytes_per_chunk()
    }

    /// Chunks a table maps.
    pub(super) fn chunks_per_table(&self) -> u64 {
        self.groups_per_table * self.chunks_per_group
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apple_geometry_512() {
        let g = Geometry::new(512, 1 << 20, (1u64 << 52) / 512).unwrap();
        assert_eq!(g.chunks_per_group, 2048);
        assert_eq!(g.groups_per_table, 63);
        assert_eq!(g.bytes_per_table, 126 << 30);
        assert_eq!(g.directory_entries, 33289);
        assert_eq!(g.table_entries(), 63 * 2049);
        assert_eq!(g.bitmap_bytes_per_chunk(), 512);
    }

    #[test]
    fn apple_geometry_4096() {
        let g = Geometry::new(4096, 1 << 20, (1u64 << 52) / 4096).unwrap();
        assert_eq!(g.chunks_per_group, 16384);
        assert_eq!(g.groups_per_table, 7);
        assert_eq!(g.bytes_per_table, 112 << 30);
        assert_eq!(g.directory_entries, 37450);
        assert_eq!(g.bitmap_bytes_per_chunk(), 64);
    }

    #[test]
    fn entry_indexes_skip_bitmap_entries() {
        let g = Geometry::new(512, 1 << 20, 1 << 30).unwrap();
        assert_eq!(g.data_entry_index(0), 0);
        assert_eq!(g.data_entry_index(2047), 2047);
        assert_eq!(g.bitmap_entry_index(2047), 2048);
        assert_eq!(g.data_entry_index(2048), 2049);
        assert_eq!(g.bitmap_entry_index(2048), 4097);
    }

    #[test]
    fn rejects_bad_geometry() {
        assert!(Geometry::new(0, 1 << 20, 100).is_err());
        assert!(Geometry::new(500, 1 << 20, 100).is_err());
        assert!(Geometry::new(512, 1000, 100).is_err());
        assert!(Geometry::new(512, 1 << 20, 0).is_err());
        assert!(Geometry::new(4096, 4096, 100).is_err()); // no room for one chunk group
        assert!(Geometry::new(512, 1 << 30, 100).is_err()); // absurd chunk size
        assert!(Geometry::new(512, 1 << 20, u64::MAX).is_err()); // overflow
        assert!(Geometry::new(512, 16896, u64::MAX / 512).is_err()); // directory too large
    }
}
