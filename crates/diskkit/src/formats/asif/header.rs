//! The ASIF header (offset 0, big-endian).

use uuid::Uuid;
use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::geometry::Geometry;
use crate::error::{Error, Result};

/// `shdw`.
pub(super) const MAGIC: u32 = 0x7368_6477;
/// The only version seen.
pub(super) const VERSION: u32 = 1;
/// The header size Apple writes; the header occupies this many bytes at offset 0.
pub(super) const HEADER_SIZE: u32 = 0x200;

/// The fixed fields at the start of the header.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct RawHeader {
    pub(super) magic: U32,
    pub(super) version: U32,
    pub(super) header_size: U32,
    pub(super) flags: U32,
    pub(super) directory_offsets: [U64; 2],
    pub(super) uuid: [u8; 16],
    pub(super) sector_count: U64,
    pub(super) max_sector_count: U64,
    pub(super) chunk_size: U32,
    pub(super) block_size: U16,
    pub(super) total_segments: U16,
    pub(super) metadata_chunk: U64,
    pub(super) unknown_50: [u8; 16],
    pub(super) read_only_flags: U32,
    pub(super) metadata_flags: U32,
    pub(super) metadata_read_only_flags: U32,
}

/// Bytes of [`RawHeader`].
pub(super) const RAW_HEADER_LEN: usize = std::mem::size_of::<RawHeader>();

/// A parsed and validated header, with the bytes it came from (unknown fields are kept when
/// the header is rewritten).
#[derive(Debug, Clone)]
pub(super) struct Header {
    pub(super) bytes: Vec<u8>,
    pub(super) geometry: Geometry,
}

impl Header {
    /// Parse the first bytes of a file. `file_len` bounds every offset.
    pub(super) fn parse(bytes: &[u8], file_len: u64) -> Result<Header> {
        let raw = RawHeader::ref_from_prefix(bytes)
            .map_err(|_| Error::invalid_format("file too short for an ASIF header"))?
            .0;
        if raw.magic.get() != MAGIC {
            return Err(Error::invalid_format(format!(
                "bad ASIF magic {:#010x} (expected 'shdw')",
                raw.magic.get()
            )));
        }
        if raw.version.get() != VERSION {
            return Err(Error::unsupported(format!(
                "ASIF version {} (only version 1 is known)",
                raw.version.get()
            )));
        }
        let header_size = u64::from(raw.header_size.get());
        if header_size < RAW_HEADER_LEN as u64 || header_size > u64::from(HEADER_SIZE) {
            return Err(Error::corrupt(format!(
                "ASIF header size {header_size} is out of range"
            )));
        }
        if raw.total_segments.get() != 0 {
            return Err(Error::unsupported(format!(
                "ASIF image with {} segments (only single-segment images are known)",
                raw.total_segments.get()
            )));
        }
        let geometry = Geometry::new(
            u64::from(raw.block_size.get()),
            u64::from(raw.chunk_size.get()),
            raw.max_sector_count.get(),
        )?;
        let sectors = raw.sector_count.get();
        if sectors == 0 {
            return Err(Error::corrupt("ASIF sector count is zero"));
        }
        if sectors > raw.max_sector_count.get() {
            return Err(Error::corrupt(format!(
                "sector count {sectors} exceeds the maximum sector count {}",
                raw.max_sector_count.get()
            )));
        }
        // Directories: inside the file, past the header, not overlapping each other.
        let dir_bytes = geometry.directory_bytes();
        let mut ranges = [(0u64, 0u64); 2];
        for (i, off) in raw.directory_offsets.iter().enumerate() {
            let start = off.get();
            let end = start
                .checked_add(dir_bytes)
                .ok_or_else(|| Error::corrupt("directory offset overflows"))?;
            if start < header_size || start % 8 != 0 {
                return Err(Error::corrupt(format!(
                    "directory {i} at offset {start} overlaps the header or is misaligned"
                )));
            }
            if end > file_len {
                return Err(Error::corrupt(format!(
                    "directory {i} ends at {end}, past the end of the file ({file_len} bytes)"
                )));
            }
            ranges[i] = (start, end);
        }
        if ranges[0].0 < ranges[1].1 && ranges[1].0 < ranges[0].1 {
            return Err(Error::corrupt("the two directories overlap"));
        }
        let meta = raw.metadata_chunk.get();
        if meta != 0 {
            let logical = meta
                .checked_mul(geometry.chunk_size)
                .and_then(|v| v.checked_add(geometry.chunk_size))
                .ok_or_else(|| Error::corrupt("metadata chunk overflows"))?;
            if logical > geometry.max_bytes {
                return Err(Error::corrupt(format!(
                    "metadata chunk {meta} lies past the maximum size"
                )));
            }
            if meta * geometry.chunk_size < sectors * geometry.block_size {
                return Err(Error::corrupt(format!(
                    "metadata chunk {meta} lies inside the disk"
                )));
            }
        }
        Ok(Header {
            bytes: bytes[..HEADER_SIZE as usize].to_vec(),
            geometry,
        })
    }

    fn raw(&self) -> &RawHeader {
        // OK to unwrap: `bytes` is HEADER_SIZE long, more than RAW_HEADER_LEN.
        RawHeader::ref_from_prefix(&self.bytes)
            .map(|r| r.0)
            .expect("header buffer is long enough")
    }

    fn raw_mut(&mut self) -> &mut RawHeader {
        // OK to unwrap: `bytes` is HEADER_SIZE long, more than RAW_HEADER_LEN.
        RawHeader::mut_from_prefix(&mut self.bytes)
            .map(|r| r.0)
            .expect("header buffer is long enough")
    }

    /// A new header for a new image.
    pub(super) fn new(
        geometry: Geometry,
        sectors: u64,
        directory_offsets: [u64; 2],
        metadata_chunk: u64,
        uuid: Uuid,
    ) -> Header {
        let raw = RawHeader {
            magic: MAGIC.into(),
            version: VERSION.into(),
            header_size: HEADER_SIZE.into(),
            flags: 0.into(),
            directory_offsets: [directory_offsets[0].into(), directory_offsets[1].into()],
            uuid: *uuid.as_bytes(),
            sector_count: sectors.into(),
            max_sector_count: (geometry.max_bytes / geometry.block_size).into(),
            chunk_size: u32::try_from(geometry.chunk_size).unwrap_or(u32::MAX).into(),
            block_size: u16::try_from(geometry.block_size).unwrap_or(u16::MAX).into(),
            total_segments: 0.into(),
            metadata_chunk: metadata_chunk.into(),
            unknown_50: [0; 16],
            read_only_flags: 0.into(),
            metadata_flags: 0.into(),
            metadata_read_only_flags: 0.into(),
        };
        let mut bytes = vec![0u8; HEADER_SIZE as usize];
        bytes[..RAW_HEADER_LEN].copy_from_slice(raw.as_bytes());
        Header { bytes, geometry }
    }

    pub(super) fn sector_count(&self) -> u64 {
        self.raw().sector_count.get()
    }

    pub(super) fn set_sector_count(&mut self, sectors: u64) {
        self.raw_mut().sector_count = sectors.into();
    }

    pub(super) fn uuid(&self) -> Uuid {
        Uuid::from_bytes(self.raw().uuid)
    }

    pub(super) fn set_uuid(&mut self, uuid: Uuid) {
        self.raw_mut().uuid = *uuid.as_bytes();
    }

    pub(super) fn directory_offsets(&self) -> [u64; 2] {
        let r = self.raw();
        [r.directory_offsets[0].get(), r.directory_offsets[1].get()]
    }

    pub(super) fn metadata_chunk(&self) -> u64 {
        self.raw().metadata_chunk.get()
    }

    pub(super) fn max_sector_count(&self) -> u64 {
        self.raw().max_sector_count.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Vec<u8> {
        let g = Geometry::new(512, 1 << 20, (1u64 << 52) / 512).unwrap();
        let h = Header::new(g, 2048, [0x200, 0x41400], 0, Uuid::nil());
        h.bytes
    }

    fn parse(bytes: &[u8]) -> Result<Header> {
        Header::parse(bytes, 1 << 20)
    }

    fn set(bytes: &mut [u8], off: usize, val: &[u8]) {
        bytes[off..off + val.len()].copy_from_slice(val);
    }

    #[test]
    fn accepts_a_good_header() {
        let h = parse(&good()).unwrap();
        assert_eq!(h.sector_count(), 2048);
        assert_eq!(h.geometry.block_size, 512);
    }

    #[test]
    fn rejects_bad_magic() {
        let mut b = good();
        set(&mut b, 0, b"shdx");
        assert_eq!(parse(&b).unwrap_err().kind(), crate::ErrorKind::InvalidFormat);
    }

    #[test]
    fn rejects_wrong_version() {
        let mut b = good();
        set(&mut b, 4, &2u32.to_be_bytes());
        assert_eq!(parse(&b).unwrap_err().kind(), crate::ErrorKind::Unsupported);
    }

    #[test]
    fn rejects_short_file() {
        assert_eq!(
            parse(&good()[..50]).unwrap_err().kind(),
            crate::ErrorKind::InvalidFormat
        );
    }

    #[test]
    fn rejects_zero_block_size() {
        let mut b = good();
        set(&mut b, 0x44, &0u16.to_be_bytes());
        assert_eq!(parse(&b).unwrap_err().kind(), crate::ErrorKind::Corrupt);
    }

    #[test]
    fn rejects_chunk_not_multiple_of_block() {
        let mut b = good();
        set(&mut b, 0x40, &1000u32.to_be_bytes());
        assert!(parse(&b).is_err());
    }

    #[test]
    fn rejects_segments() {
        let mut b = good();
        set(&mut b, 0x46, &1u16.to_be_bytes());
        assert_eq!(parse(&b).unwrap_err().kind(), crate::ErrorKind::Unsupported);
    }

    #[test]
    fn rejects_zero_sectors_and_sectors_past_max() {
        let mut b = good();
        set(&mut b, 0x30, &0u64.to_be_bytes());
        assert_eq!(parse(&b).unwrap_err().kind(), crate::ErrorKind::Corrupt);
        let mut b = good();
        set(&mut b, 0x30, &u64::MAX.to_be_bytes());
        assert_eq!(parse(&b).unwrap_err().kind(), crate::ErrorKind::Corrupt);
    }

    #[test]
    fn rejects_absurd_max_sectors() {
        let mut b = good();
        set(&mut b, 0x38, &u64::MAX.to_be_bytes());
        assert!(parse(&b).is_err());
    }

    #[test]
    fn rejects_directory_past_end_of_file() {
        let b = good();
        assert_eq!(
            Header::parse(&b, 0x1000).unwrap_err().kind(),
            crate::ErrorKind::Corrupt
        );
    }

    #[test]
    fn rejects_overlapping_directories() {
        let mut b = good();
        set(&mut b, 0x18, &0x400u64.to_be_bytes());
        assert_eq!(parse(&b).unwrap_err().kind(), crate::ErrorKind::Corrupt);
    }

    #[test]
    fn rejects_directory_over_header() {
        let mut b = good();
        set(&mut b, 0x10, &0x8u64.to_be_bytes());
        assert_eq!(parse(&b).unwrap_err().kind(), crate::ErrorKind::Corrupt);
    }

    #[test]
    fn rejects_metadata_inside_disk_or_past_max() {
        let mut b = good();
        set(&mut b, 0x48, &0u64.to_be_bytes());
        assert!(parse(&b).is_ok());
        set(&mut b, 0x30, &(4096u64).to_be_bytes()); // 2 MiB disk
        set(&mut b, 0x48, &1u64.to_be_bytes()); // metadata at 1 MiB: inside
        assert_eq!(parse(&b).unwrap_err().kind(), crate::ErrorKind::Corrupt);
        set(&mut b, 0x48, &(1u64 << 40).to_be_bytes());
        assert_eq!(parse(&b).unwrap_err().kind(), crate::ErrorKind::Corrupt);
    }
}
