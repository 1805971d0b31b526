//! Partition tables: GPT (with its protective MBR) and MBR (with extended/logical partitions).
//!
//! The bytes are hostile: every count is bounded, every offset is checked against the disk,
//! checksums are verified, and extended-partition chains are walked with loop detection.

use diskkit::{Error, Result};
use uuid::Uuid;

/// Something partition tables can be read from: a disk image or a byte slice (fuzzing).
pub trait SectorSource {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Read exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

impl SectorSource for diskkit::DiskImage {
    fn size(&self) -> u64 {
        diskkit::DiskImage::size(self)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_at(buf, offset)
    }
}

impl SectorSource for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
}

impl SectorSource for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let start = usize::try_from(offset).ok();
        let end = start.and_then(|s| s.checked_add(buf.len()));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.len() => {
                buf.copy_from_slice(&self[s..e]);
                Ok(())
            }
            _ => Err(Error::out_of_bounds(format!(
                "read {offset}+{} past the end ({} bytes)",
                buf.len(),
                self.len()
            ))),
        }
    }
}

/// The kind of partition table found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// GUID partition table.
    Gpt,
    /// DOS/MBR partition table.
    Mbr,
}

impl std::fmt::Display for TableKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TableKind::Gpt => "gpt",
            TableKind::Mbr => "mbr",
        })
    }
}

/// The type of a partition: a GPT type GUID or an MBR type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionType {
    /// GPT partition type GUID.
    Guid(Uuid),
    /// MBR system id.
    Mbr(u8),
}

impl PartitionType {
    /// A short human name for well-known types.
    pub fn name(&self) -> &'static str {
        match self {
            PartitionType::Guid(g) => match g.to_string().as_str() {
                "c12a7328-f81f-11d2-ba4b-00a0c93ec93b" => "EFI System",
                "21686148-6449-6e6f-744e-656564454649" => "BIOS boot",
                "0fc63daf-8483-4772-8e79-3d69d8477de4" => "Linux filesystem",
                "4f68bce3-e8cd-4db1-96e7-fbcaf984b709" => "Linux root (x86-64)",
                "b921b045-1df0-41c3-af44-4c6f280d3fae" => "Linux root (ARM64)",
                "bc13c2ff-59e6-4262-a352-b275fd6f7172" => "Linux extended boot",
                "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f" => "Linux swap",
                "e6d6d379-f507-44c2-a23c-238f2a3df928" => "Linux LVM",
                "a19d880f-05fc-4d3b-a006-743f0f84911e" => "Linux RAID",
                "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7" => "Microsoft basic data",
                _ => "unknown",
            },
            PartitionType::Mbr(t) => match t {
                0x83 => "Linux",
                0x82 => "Linux swap",
                0x8e => "Linux LVM",
                0xfd => "Linux RAID",
                0xef => "EFI System",
                0x0b | 0x0c => "FAT32",
                0x07 => "NTFS/exFAT",
                0x05 | 0x0f | 0x85 => "Extended",
                _ => "unknown",
            },
        }
    }
}

impl std::fmt::Display for PartitionType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartitionType::Guid(g) => write!(f, "{g}"),
            PartitionType::Mbr(t) => write!(f, "0x{t:02x}"),
        }
    }
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Partition number as Linux numbers it (GPT: entry index + 1; MBR: 1–4 primary, 5+ logical).
    pub number: u32,
    /// Byte offset of the first byte on the disk.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type.
    pub kind: PartitionType,
    /// GPT partition name (label); empty for MBR.
    pub name: String,
    /// GPT unique partition GUID; for MBR, `None`.
    pub uuid: Option<Uuid>,
    /// GPT attribute bits, or the MBR status byte.
    pub attributes: u64,
}

/// A parsed partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionTable {
    /// GPT or MBR.
    pub kind: TableKind,
    /// Logical sector size the table was found with.
    pub sector_size: u32,
    /// GPT disk GUID, or the MBR disk signature as `0x…`.
    pub disk_id: String,
    /// Partitions in number order.
    pub partitions: Vec<Partition>,
}

/// Most GPT entries accepted (the spec's minimum array holds 128; tools stay well below 1024).
pub const MAX_GPT_ENTRIES: u32 = 1024;
/// Most logical partitions followed in an MBR extended chain.
pub const MAX_LOGICAL: u32 = 256;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// Read the partition table of `disk`. `Ok(None)` when there is none (no MBR signature and
/// no GPT). `preferred_sector` (the image's block size) is tried first for GPT, then the
/// other common size.
pub fn read_partition_table(
    disk: &(impl SectorSource + ?Sized),
    preferred_sector: u32,
) -> Result<Option<PartitionTable>> {
    let mut sectors = vec![preferred_sector];
    for s in [512, 4096] {
        if !sectors.contains(&s) {
            sectors.push(s);
        }
    }
    if disk.size() < 512 {
        return Ok(None);
    }
    let mut mbr = [0u8; 512];
    disk.read_exact_at(&mut mbr, 0)?;
    let has_mbr_sig = mbr[510] == 0x55 && mbr[511] == 0xaa;
    let protective = has_mbr_sig && (0..4).any(|i| mbr[446 + i * 16 + 4] == 0xee);
    let mut gpt_error = None;
    for &sector in &sectors {
        match read_gpt(disk, sector) {
            Ok(Some(t)) => return Ok(Some(t)),
            Ok(None) => {}
            Err(e) => gpt_error = Some(e),
        }
    }
    if protective {
        // A protective MBR promises a GPT; a broken one is an error, not "no table".
        return Err(gpt_error.unwrap_or_else(|| {
            Error::corrupt("protective MBR found but no valid GPT header").with_offset(0)
        }));
    }
    if has_mbr_sig && looks_like_mbr(&mbr) {
        return read_mbr(disk, &mbr).map(Some);
    }
    Ok(None)
}

/// A boot sector with 0x55AA could also be a FAT/NTFS boot record; accept it as an MBR only
/// when each entry is empty or plausible (boot flag 0 or 0x80).
fn looks_like_mbr(mbr: &[u8; 512]) -> bool {
    let mut any = false;
    for i in 0..4 {
        let e = &mbr[446 + i * 16..446 + i * 16 + 16];
        if e[0] != 0 && e[0] != 0x80 {
            return false;
        }
        if e[4] != 0 {
            any = true;
        }
    }
    any
}

fn read_gpt(disk: &(impl SectorSource + ?Sized), sector: u32) -> Result<Option<PartitionTable>> {
    let ss = u64::from(sector);
    if disk.size() < ss * 2 {
        return Ok(None);
    }
    let mut hdr = vec![0u8; sector as usize];
    disk.read_exact_at(&mut hdr, ss)?;
    if &hdr[0..8] != b"EFI PART" {
        return Ok(None);
    }
    let bad = |msg: String| Err(Error::corrupt(format!("GPT header: {msg}")).with_offset(ss));
    let header_size = le32(&hdr, 12);
    if !(92..=sector).contains(&header_size) {
        return bad(format!("header size {header_size} out of range"));
    }
    let stored_crc = le32(&hdr, 16);
    let mut check = hdr[..header_size as usize].to_vec();
    check[16..20].fill(0);
    let crc = CRC32.checksum(&check);
    if crc != stored_crc {
        return bad(format!(
            "header CRC {stored_crc:#010x} does not match {crc:#010x}"
        ));
    }
    let disk_sectors = disk.size() / ss;
    let first_usable = le64(&hdr, 40);
    let last_usable = le64(&hdr, 48);
    let disk_guid = guid(&hdr[56..72]);
    let entries_lba = le64(&hdr, 72);
    let count = le32(&hdr, 80);
    let entry_size = le32(&hdr, 84);
    let entries_crc = le32(&hdr, 88);
    if count > MAX_GPT_ENTRIES {
        return bad(format!("{count} entries (at most {MAX_GPT_ENTRIES} accepted)"));
    }
    if !(128..=4096).contains(&entry_size) || entry_size % 8 != 0 {
        return bad(format!("entry size {entry_size} invalid"));
    }
    if first_usable > last_usable || last_usable >= disk_sectors {
        return bad(format!(
            "usable range {first_usable}..={last_usable} outside the disk ({disk_sectors} sectors)"
        ));
    }
    let array_len = u64::from(count) * u64::from(entry_size);
    let array_off = entries_lba
        .checked_mul(ss)
        .filter(|o| o.checked_add(array_len).is_some_and(|end| end <= disk.size()))
        .ok_or_else(|| {
            Error::corrupt(format!(
                "GPT entry array at LBA {entries_lba} lies outside the disk"
            ))
            .with_offset(ss)
        })?;
    let mut array = vec![0u8; array_len as usize];
    disk.read_exact_at(&mut array, array_off)?;
    let crc = CRC32.checksum(&array);
    if crc != entries_crc {
        return Err(Error::corrupt(format!(
            "GPT entry array CRC {entries_crc:#010x} does not match {crc:#010x}"
        ))
        .with_offset(array_off));
    }
    let mut partitions = Vec::new();
    for i in 0..count {
        let e = &array[(i * entry_size) as usize..((i + 1) * entry_size) as usize];
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let first = le64(e, 32);
        let last = le64(e, 40);
        if first > last || last >= disk_sectors {
            return Err(Error::corrupt(format!(
                "GPT partition {}: sectors {first}..={last} outside the disk ({disk_sectors} sectors)",
                i + 1
            ))
            .with_offset(array_off + u64::from(i * entry_size)));
        }
        let units: Vec<u16> = (0..36).map(|k| le16(e, 56 + k * 2)).collect();
        let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
        let name = String::from_utf16_lossy(&units[..end]);
        partitions.push(Partition {
            number: i + 1,
            offset: first * ss,
            size: (last - first + 1) * ss,
            kind: PartitionType::Guid(guid(&e[0..16])),
            name,
            uuid: Some(guid(&e[16..32])),
            attributes: le64(e, 48),
        });
    }
    Ok(Some(PartitionTable {
        kind: TableKind::Gpt,
        sector_size: sector,
        disk_id: disk_guid.to_string(),
        partitions,
    }))
}

/// GPT GUIDs are mixed-endian: the first three fields little-endian.
fn guid(b: &[u8]) -> Uuid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    Uuid::from_bytes_le(a)
}

fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0f | 0x85)
}

fn read_mbr(disk: &(impl SectorSource + ?Sized), mbr: &[u8; 512]) -> Result<PartitionTable> {
    const SS: u64 = 512;
    let disk_size = disk.size();
    let check = |what: String, start: u64, count: u64, at: u64| -> Result<(u64, u64)> {
        let off = start * SS;
        let len = count * SS;
        if count == 0 || off.checked_add(len).is_none_or(|end| end > disk_size) {
            return Err(Error::corrupt(format!(
                "MBR {what}: sectors {start}+{count} outside the disk ({disk_size} bytes)"
            ))
            .with_offset(at));
        }
        Ok((off, len))
    };
    let mut partitions = Vec::new();
    let mut extended = None;
    for i in 0..4u32 {
        let at = 446 + i as usize * 16;
        let e = &mbr[at..at + 16];
        let t = e[4];
        if t == 0 {
            continue;
        }
        let start = u64::from(le32(e, 8));
        let count = u64::from(le32(e, 12));
        let (off, len) = check(format!("partition {}", i + 1), start, count, at as u64)?;
        if is_extended(t) {
            if extended.is_some() {
                return Err(Error::corrupt("MBR has more than one extended partition").with_offset(at as u64));
            }
            extended = Some((start, count));
        }
        partitions.push(Partition {
            number: i + 1,
            offset: off,
            size: len,
            kind: PartitionType::Mbr(t),
            name: String::new(),
            uuid: None,
            attributes: u64::from(e[0]),
        });
    }
    if let Some((ext_start, ext_count)) = extended {
        // Each EBR holds a logical partition (relative to this EBR) and a link to the next
        // EBR (relative to the extended partition's start).
        let mut ebr_lba = ext_start;
        let mut seen = std::collections::HashSet::new();
        let mut number = 5u32;
        let mut steps = 0u32;
        loop {
            steps += 1;
            if !seen.insert(ebr_lba) {
                return Err(Error::corrupt("MBR extended partition chain loops").with_offset(ebr_lba * SS));
            }
            if steps > MAX_LOGICAL {
                return Err(
                    Error::corrupt(format!("more than {MAX_LOGICAL} extended boot records"))
                        .with_offset(ebr_lba * SS),
                );
            }
            if ebr_lba < ext_start || ebr_lba >= ext_start + ext_count {
                return Err(Error::corrupt("EBR outside the extended partition").with_offset(ebr_lba * SS));
            }
            let mut ebr = [0u8; 512];
            let at = ebr_lba * SS;
            disk.read_exact_at(&mut ebr, at)?;
            if ebr[510] != 0x55 || ebr[511] != 0xaa {
                return Err(Error::corrupt("EBR without boot signature").with_offset(at));
            }
            let e = &ebr[446..462];
            if e[4] != 0 {
                let start = ebr_lba + u64::from(le32(e, 8));
                let count = u64::from(le32(e, 12));
                let (off, len) = check(format!("logical partition {number}"), start, count, at)?;
                partitions.push(Partition {
                    number,
                    offset: off,
                    size: len,
                    kind: PartitionType::Mbr(e[4]),
                    name: String::new(),
                    uuid: None,
                    attributes: u64::from(e[0]),
                });
                number += 1;
            }
            let link = &ebr[462..478];
            if link[4] == 0 || le32(link, 8) == 0 {
                break;
            }
            ebr_lba = ext_start + u64::from(le32(link, 8));
        }
    }
    Ok(PartitionTable {
        kind: TableKind::Mbr,
        sector_size: 512,
        disk_id: format!("0x{:08x}", le32(mbr, 440)),
        partitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskkit::ErrorKind;

    fn mbr_with(entries: &[(u8, u32, u32)], size: usize) -> Vec<u8> {
        let mut d = vec![0u8; size];
        for (i, &(t, start, count)) in entries.iter().enumerate() {
            let at = 446 + i * 16;
            d[at + 4] = t;
            d[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
            d[at + 12..at + 16].copy_from_slice(&count.to_le_bytes());
        }
        d[510] = 0x55;
        d[511] = 0xaa;
        d
    }

    #[test]
    fn empty_disk_has_no_table() {
        assert_eq!(read_partition_table(&[0u8; 4096][..], 512).unwrap(), None);
    }

    #[test]
    fn mbr_primary() {
        let d = mbr_with(&[(0x83, 2048, 2048)], 4096 * 512);
        let t = read_partition_table(&d[..], 512).unwrap().unwrap();
        assert_eq!(t.kind, TableKind::Mbr);
        assert_eq!(t.partitions.len(), 1);
        assert_eq!(t.partitions[0].offset, 2048 * 512);
        assert_eq!(t.partitions[0].size, 2048 * 512);
    }

    #[test]
    fn mbr_partition_past_end_is_corrupt() {
        let d = mbr_with(&[(0x83, 2048, 1 << 30)], 4096 * 512);
        let e = read_partition_table(&d[..], 512).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn mbr_extended_loop_is_detected() {
        let mut d = mbr_with(&[(0x05, 100, 1000)], 2048 * 512);
        // EBR at 100 links to itself (relative offset 0 ends the chain, so use a 2-cycle).
        let e1 = 100 * 512;
        d[e1 + 510] = 0x55;
        d[e1 + 511] = 0xaa;
        d[e1 + 462 + 4] = 0x05;
        d[e1 + 462 + 8..e1 + 462 + 12].copy_from_slice(&10u32.to_le_bytes());
        let e2 = 110 * 512;
        d[e2 + 510] = 0x55;
        d[e2 + 511] = 0xaa;
        d[e2 + 462 + 4] = 0x05;
        // Back to the first EBR, which is relative offset 0: use a 3-cycle via 5.
        d[e2 + 462 + 8..e2 + 462 + 12].copy_from_slice(&5u32.to_le_bytes());
        let e3 = 105 * 512;
        d[e3 + 510] = 0x55;
        d[e3 + 511] = 0xaa;
        d[e3 + 462 + 4] = 0x05;
        d[e3 + 462 + 8..e3 + 462 + 12].copy_from_slice(&10u32.to_le_bytes());
        let e = read_partition_table(&d[..], 512).unwrap_err();
        assert!(e.to_string().contains("loops"), "{e}");
    }

    #[test]
    fn protective_mbr_without_gpt_is_corrupt() {
        let d = mbr_with(&[(0xee, 1, 4000)], 4096 * 512);
        let e = read_partition_table(&d[..], 512).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
    }
}
