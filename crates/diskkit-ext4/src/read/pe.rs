//! PE/COFF section tables, enough to split a unified kernel image (UKI): `.linux`, `.initrd`,
//! `.cmdline`, `.uname` and friends are plain sections of an EFI PE file.
//!
//! The file is hostile: header offsets, the section count and every section's file range are
//! checked before anything is read.

use diskkit::{Error, Result};

use super::partition::SectorSource;

/// Most sections accepted (the PE loader in EDK II and systemd-stub have similar limits).
pub const MAX_SECTIONS: u16 = 96;
/// Largest accepted `e_lfanew` (offset of the PE header).
const MAX_LFANEW: u32 = 1 << 20;

/// One section header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeSection {
    /// Name (up to 8 bytes, NUL padding removed; lossy UTF-8).
    pub name: String,
    /// `VirtualSize`: the section's real length in memory.
    pub virtual_size: u32,
    /// `VirtualAddress`.
    pub virtual_address: u32,
    /// `SizeOfRawData`: bytes stored in the file (rounded up to the file alignment).
    pub raw_size: u32,
    /// `PointerToRawData`: file offset of the data.
    pub raw_offset: u32,
}

impl PeSection {
    /// The file range holding the section's contents: `VirtualSize` bytes (the real length;
    /// the rest of `SizeOfRawData` is alignment padding), capped at what the file stores.
    pub fn file_range(&self) -> (u64, u64) {
        let len = if self.virtual_size == 0 {
            self.raw_size
        } else {
            self.virtual_size.min(self.raw_size)
        };
        (u64::from(self.raw_offset), u64::from(len))
    }
}

/// A parsed PE file: its machine type and section table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeFile {
    /// COFF `Machine` (0x8664 x86-64, 0xaa64 arm64, ...).
    pub machine: u16,
    /// Sections in table order.
    pub sections: Vec<PeSection>,
}

impl PeFile {
    /// The first section called `name`.
    pub fn section(&self, name: &str) -> Option<&PeSection> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// Whether this looks like a UKI (it carries a `.linux` section).
    pub fn is_uki(&self) -> bool {
        self.section(".linux").is_some()
    }

    /// Machine name for display.
    pub fn machine_name(&self) -> &'static str {
        match self.machine {
            0x8664 => "x86-64",
            0xaa64 => "arm64",
            0x014c => "i386",
            0x01c4 => "arm",
            0x5064 => "riscv64",
            0x6264 => "loongarch64",
            _ => "unknown",
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parse the PE headers and section table of `file`.
pub fn parse_pe(file: &(impl SectorSource + ?Sized)) -> Result<PeFile> {
    let len = file.size();
    if len < 64 {
        return Err(Error::invalid_format("too short for a PE file"));
    }
    let mut dos = [0u8; 64];
    file.read_exact_at(&mut dos, 0)?;
    if &dos[..2] != b"MZ" {
        return Err(Error::invalid_format("no MZ signature: not a PE file"));
    }
    let lfanew = u32_at(&dos, 0x3c);
    if lfanew > MAX_LFANEW || u64::from(lfanew) + 24 > len {
        return Err(
            Error::invalid_format(format!("PE header offset {lfanew} outside the file")).with_offset(0x3c),
        );
    }
    let mut coff = [0u8; 24];
    file.read_exact_at(&mut coff, u64::from(lfanew))?;
    if &coff[..4] != b"PE\0\0" {
        return Err(Error::invalid_format("no PE signature").with_offset(u64::from(lfanew)));
    }
    let machine = u16_at(&coff, 4);
    let count = u16_at(&coff, 6);
    let opt_size = u16_at(&coff, 20);
    if count > MAX_SECTIONS {
        return Err(
            Error::invalid_format(format!("{count} sections (at most {MAX_SECTIONS} accepted)"))
                .with_offset(u64::from(lfanew) + 6),
        );
    }
    let table = u64::from(lfanew) + 24 + u64::from(opt_size);
    let table_len = u64::from(count) * 40;
    if table + table_len > len {
        return Err(Error::corrupt("section table runs past the end of the file").with_offset(table));
    }
    let mut raw = vec![0u8; table_len as usize];
    file.read_exact_at(&mut raw, table)?;
    let mut sections = Vec::with_capacity(usize::from(count));
    for i in 0..usize::from(count) {
        let h = &raw[i * 40..(i + 1) * 40];
        let name_bytes = &h[..8];
        let end = name_bytes.iter().position(|&b| b == 0).unwrap_or(8);
        let s = PeSection {
            name: String::from_utf8_lossy(&name_bytes[..end]).into_owned(),
            virtual_size: u32_at(h, 8),
            virtual_address: u32_at(h, 12),
            raw_size: u32_at(h, 16),
            raw_offset: u32_at(h, 20),
        };
        let (off, n) = s.file_range();
        if n > 0 && off + n > len {
            return Err(Error::corrupt(format!(
                "section {} ({off}+{n}) runs past the end of the file ({len} bytes)",
                s.name
            ))
            .with_offset(table + i as u64 * 40));
        }
        sections.push(s);
    }
    Ok(PeFile { machine, sections })
}

/// Build a minimal PE32+ file with the given sections (for tests and fixtures): a DOS stub,
/// COFF and optional headers, the section table and the section data, file alignment 512.
pub fn build_test_pe(sections: &[(&str, &[u8])]) -> Vec<u8> {
    const ALIGN: usize = 512;
    let lfanew = 0x80usize;
    let opt_size = 240usize;
    let headers = lfanew + 24 + opt_size + 40 * sections.len();
    let mut data_off = headers.next_multiple_of(ALIGN);
    let mut out = vec![0u8; data_off];
    out[0..2].copy_from_slice(b"MZ");
    out[0x3c..0x40].copy_from_slice(&(lfanew as u32).to_le_bytes());
    out[lfanew..lfanew + 4].copy_from_slice(b"PE\0\0");
    out[lfanew + 4..lfanew + 6].copy_from_slice(&0x8664u16.to_le_bytes());
    out[lfanew + 6..lfanew + 8].copy_from_slice(&(sections.len() as u16).to_le_bytes());
    out[lfanew + 20..lfanew + 22].copy_from_slice(&(opt_size as u16).to_le_bytes());
    out[lfanew + 22..lfanew + 24].copy_from_slice(&0x0206u16.to_le_bytes());
    let opt = lfanew + 24;
    out[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes()); // PE32+
    out[opt + 32..opt + 36].copy_from_slice(&4096u32.to_le_bytes()); // SectionAlignment
    out[opt + 36..opt + 40].copy_from_slice(&(ALIGN as u32).to_le_bytes()); // FileAlignment
    out[opt + 68..opt + 70].copy_from_slice(&10u16.to_le_bytes()); // EFI application
    let mut va = 0x1000u32;
    for (i, (name, data)) in sections.iter().enumerate() {
        let h = opt + opt_size + i * 40;
        let nb = name.as_bytes();
        out[h..h + nb.len().min(8)].copy_from_slice(&nb[..nb.len().min(8)]);
        let raw_size = data.len().next_multiple_of(ALIGN);
        out[h + 8..h + 12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        out[h + 12..h + 16].copy_from_slice(&va.to_le_bytes());
        out[h + 16..h + 20].copy_from_slice(&(raw_size as u32).to_le_bytes());
        out[h + 20..h + 24].copy_from_slice(&(data_off as u32).to_le_bytes());
        out[h + 36..h + 40].copy_from_slice(&0x4000_0040u32.to_le_bytes()); // initialised, readable
        out.extend_from_slice(data);
        out.resize(data_off + raw_size, 0);
        data_off += raw_size;
        va += (data.len() as u32).next_multiple_of(4096).max(4096);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let pe = build_test_pe(&[
            (".linux", b"KERNEL"),
            (".initrd", &[7u8; 1000]),
            (".cmdline", b"quiet"),
        ]);
        let f = parse_pe(&pe[..]).unwrap();
        assert!(f.is_uki());
        let (off, len) = f.section(".initrd").unwrap().file_range();
        assert_eq!(&pe[off as usize..(off + len) as usize], &[7u8; 1000][..]);
        let (off, len) = f.section(".cmdline").unwrap().file_range();
        assert_eq!(&pe[off as usize..(off + len) as usize], b"quiet");
    }

    #[test]
    fn rejects_bad_input() {
        assert!(parse_pe(&b"MZ"[..]).is_err());
        let mut pe = build_test_pe(&[(".linux", b"K")]);
        pe[0x3c..0x40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_pe(&pe[..]).is_err());
        let mut pe = build_test_pe(&[(".linux", b"K")]);
        let h = 0x80 + 24 + 240;
        pe[h + 20..h + 24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_pe(&pe[..]).is_err());
        let mut pe = build_test_pe(&[(".linux", b"K")]);
        pe[0x80 + 6..0x80 + 8].copy_from_slice(&1000u16.to_le_bytes());
        assert!(parse_pe(&pe[..]).is_err());
    }
}
