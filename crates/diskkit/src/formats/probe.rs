//! Format detection from signatures.
//!
//! The formats diskkit reads are recognised by their drivers ([`super::DRIVERS`]); the formats
//! it does not read (VMDK, VHDX, VHD, VDI, QED, Parallels, bochs, cloop, DMG, LUKS) are
//! recognised here, so that they are refused by name instead of being read as RAW (which would
//! hand out the container's bytes, not the disk). Anything else is RAW.
//!
//! Detection is a convenience for images you made or trust. A guest can write any bytes to
//! the start of a RAW disk, including another format's header; detection would then misread
//! the disk and may follow file names the guest chose. Pass the format explicitly
//! (`OpenOptions::format`) for images guests have written to; `ImageFormat::Raw` given that
//! way reads any of the formats above as plain bytes.

use std::fmt;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::layer::ImageFormat;
use crate::storage::Storage;

/// The qcow2 magic, `QFI\xfb`.
pub const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// How many bytes from the start (and from the end) of a file detection looks at.
pub(crate) const HEAD_LEN: usize = 512;

/// An image format diskkit recognises but does not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ForeignFormat {
    /// VMware VMDK, hosted sparse extent (`KDMV`).
    VmdkSparse,
    /// VMware VMDK, stream-optimised (compressed grains).
    VmdkStreamOptimized,
    /// VMware VMDK text descriptor (its extents are other files).
    VmdkDescriptor,
    /// VMware VMDK version 3 (`COWD`).
    Vmdk3,
    /// Microsoft VHDX.
    Vhdx,
    /// Microsoft VHD (Virtual PC), dynamic or differencing (footer copy at the start).
    Vhd,
    /// Microsoft VHD, fixed (the disk followed by a footer).
    VhdFixed,
    /// VirtualBox VDI.
    Vdi,
    /// QEMU Enhanced Disk.
    Qed,
    /// Parallels disk.
    Parallels,
    /// Bochs growing image.
    Bochs,
    /// Compressed loop (cloop).
    Cloop,
    /// Apple Universal Disk Image Format (UDIF, a `.dmg` with a `koly` trailer).
    Dmg,
    /// LUKS encrypted volume.
    Luks,
}

impl ForeignFormat {
    /// The format's name as diskkit reports it.
    pub fn name(self) -> &'static str {
        match self {
            ForeignFormat::VmdkSparse => "VMDK (sparse)",
            ForeignFormat::VmdkStreamOptimized => "VMDK (stream-optimized)",
            ForeignFormat::VmdkDescriptor => "VMDK (descriptor)",
            ForeignFormat::Vmdk3 => "VMDK (version 3)",
            ForeignFormat::Vhdx => "VHDX",
            ForeignFormat::Vhd => "VHD",
            ForeignFormat::VhdFixed => "VHD (fixed)",
            ForeignFormat::Vdi => "VDI",
            ForeignFormat::Qed => "QED",
            ForeignFormat::Parallels => "Parallels",
            ForeignFormat::Bochs => "bochs",
            ForeignFormat::Cloop => "cloop",
            ForeignFormat::Dmg => "DMG (UDIF)",
            ForeignFormat::Luks => "LUKS",
        }
    }

    /// The name `qemu-img` knows the format by.
    pub fn qemu_name(self) -> &'static str {
        match self {
            ForeignFormat::VmdkSparse
            | ForeignFormat::VmdkStreamOptimized
            | ForeignFormat::VmdkDescriptor
            | ForeignFormat::Vmdk3 => "vmdk",
            ForeignFormat::Vhdx => "vhdx",
            ForeignFormat::Vhd | ForeignFormat::VhdFixed => "vpc",
            ForeignFormat::Vdi => "vdi",
            ForeignFormat::Qed => "qed",
            ForeignFormat::Parallels => "parallels",
            ForeignFormat::Bochs => "bochs",
            ForeignFormat::Cloop => "cloop",
            ForeignFormat::Dmg => "dmg",
            ForeignFormat::Luks => "luks",
        }
    }

    /// The error for an image of this format.
    pub fn refusal(self) -> Error {
        Error::new(
            ErrorKind::UnsupportedFormat,
            format!(
                "unsupported format: {}; convert it with qemu-img first (qemu-img convert -f {} \
                 -O qcow2 IN OUT), or give the format as raw (-f raw) to read its bytes as they are",
                self.name(),
                self.qemu_name()
            ),
        )
    }
}

impl fmt::Display for ForeignFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What detection found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// A format diskkit reads (RAW when nothing else matched).
    Format(ImageFormat),
    /// A format diskkit recognises and refuses.
    Foreign(ForeignFormat),
}

/// The format of `storage` from its signatures: a registered format, a foreign one, or RAW.
pub fn identify(storage: &dyn Storage) -> Result<Detected> {
    let len = storage.len()?;
    let n = usize::try_from(len).map_or(HEAD_LEN, |l| l.min(HEAD_LEN));
    let mut head = vec![0u8; n];
    storage.read_at(&mut head, 0)?;
    if let Some(f) = super::recognise(&head) {
        return Ok(Detected::Format(f));
    }
    let mut tail = Vec::new();
    if len >= 2 * HEAD_LEN as u64 {
        tail.resize(HEAD_LEN, 0);
        storage.read_at(&mut tail, len - HEAD_LEN as u64)?;
    }
    Ok(match foreign(&head, &tail) {
        Some(f) => Detected::Foreign(f),
        None => Detected::Format(ImageFormat::Raw),
    })
}

/// The format of `storage`: a registered format by its signature, RAW when nothing matches,
/// and an [`ErrorKind::UnsupportedFormat`] error naming the format for the foreign formats
/// diskkit recognises but does not read.
pub fn detect(storage: &dyn Storage) -> Result<ImageFormat> {
    match identify(storage)? {
        Detected::Format(f) => Ok(f),
        Detected::Foreign(f) => Err(f.refusal()),
    }
}

/// The foreign format whose signature `head` (the first bytes) or `tail` (the last 512 bytes
/// of a file of at least 1 KiB, else empty) carries.
pub fn foreign(head: &[u8], tail: &[u8]) -> Option<ForeignFormat> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0, b"KDMV") {
        // Flags (little-endian, offset 8): bit 16 says the grains are compressed.
        let flags = head
            .get(8..12)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        return Some(if flags & (1 << 16) != 0 {
            ForeignFormat::VmdkStreamOptimized
        } else {
            ForeignFormat::VmdkSparse
        });
    }
    if at(0, b"COWD") {
        return Some(ForeignFormat::Vmdk3);
    }
    if is_vmdk_descriptor(head) {
        return Some(ForeignFormat::VmdkDescriptor);
    }
    if at(0, b"vhdxfile") {
        return Some(ForeignFormat::Vhdx);
    }
    if at(0, b"conectix") {
        return Some(ForeignFormat::Vhd);
    }
    // VDI: the signature 0xbeda107f (little-endian) at 0x40.
    if at(0x40, &0xbeda_107f_u32.to_le_bytes()) {
        return Some(ForeignFormat::Vdi);
    }
    if at(0, b"QED\0") {
        return Some(ForeignFormat::Qed);
    }
    if at(0, b"WithoutFreeSpace") || at(0, b"WithouFreSpacExt") {
        return Some(ForeignFormat::Parallels);
    }
    if at(0, b"Bochs Virtual HD Image") {
        return Some(ForeignFormat::Bochs);
    }
    if at(0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop") {
        return Some(ForeignFormat::Cloop);
    }
    if at(0, b"LUKS\xba\xbe") {
        return Some(ForeignFormat::Luks);
    }
    if tail.starts_with(b"koly") {
        return Some(ForeignFormat::Dmg);
    }
    if tail.starts_with(b"conectix") {
        return Some(ForeignFormat::VhdFixed);
    }
    None
}

/// Whether `head` is the start of a VMDK text descriptor: the comment VMware writes first,
/// or a `createType=` line near the start of otherwise printable text.
fn is_vmdk_descriptor(head: &[u8]) -> bool {
    if head.starts_with(b"# Disk DescriptorFile") {
        return true;
    }
    let text_len = head
        .iter()
        .position(|&b| !(b.is_ascii_graphic() || b.is_ascii_whitespace()))
        .unwrap_or(head.len());
    let text = &head[..text_len];
    text_len >= 32
        && text
            .split(|&b| b == b'\n')
            .any(|line| line.trim_ascii_start().starts_with(b"createType="))
}

/// The format a file's extension names, when it names one that RAW detection contradicts.
pub fn extension_format(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "qcow2" | "qcow" => "qcow2",
        "asif" => "ASIF",
        "vmdk" => "VMDK",
        "vhdx" => "VHDX",
        "vhd" | "vpc" => "VHD",
        "vdi" => "VDI",
        "qed" => "QED",
        "hdd" | "hds" => "Parallels",
        "dmg" => "DMG",
        "luks" => "LUKS",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_with(off: usize, magic: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; HEAD_LEN];
        h[off..off + magic.len()].copy_from_slice(magic);
        h
    }

    #[test]
    fn signatures() {
        let none: &[u8] = &[];
        let cases: Vec<(Vec<u8>, ForeignFormat)> = vec![
            (
                head_with(0, b"KDMV\x01\0\0\0\x03\0\0\0"),
                ForeignFormat::VmdkSparse,
            ),
            (
                head_with(0, b"KDMV\x03\0\0\0\x03\0\x03\0"),
                ForeignFormat::VmdkStreamOptimized,
            ),
            (head_with(0, b"vhdxfile"), ForeignFormat::Vhdx),
            (head_with(0, b"conectix"), ForeignFormat::Vhd),
            (head_with(0x40, &[0x7f, 0x10, 0xda, 0xbe]), ForeignFormat::Vdi),
            (head_with(0, b"QED\0"), ForeignFormat::Qed),
            (head_with(0, b"WithoutFreeSpace"), ForeignFormat::Parallels),
            (head_with(0, b"WithouFreSpacExt"), ForeignFormat::Parallels),
            (head_with(0, b"Bochs Virtual HD Image"), ForeignFormat::Bochs),
            (head_with(0, b"LUKS\xba\xbe\0\x01"), ForeignFormat::Luks),
            (
                b"# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n".to_vec(),
                ForeignFormat::VmdkDescriptor,
            ),
        ];
        for (head, want) in cases {
            assert_eq!(foreign(&head, none), Some(want), "{want}");
        }
        assert_eq!(
            foreign(&[0u8; 512], &head_with(0, b"koly")),
            Some(ForeignFormat::Dmg)
        );
        assert_eq!(
            foreign(&[0u8; 512], &head_with(0, b"conectix")),
            Some(ForeignFormat::VhdFixed)
        );
        assert_eq!(foreign(&[0u8; 512], &[0u8; 512]), None);
        assert_eq!(foreign(b"just some text without the key\n", none), None);
        assert_eq!(foreign(b"", none), None);
    }

    #[test]
    fn refusals_name_the_format() {
        let e = ForeignFormat::VmdkStreamOptimized.refusal();
        assert_eq!(e.kind(), ErrorKind::UnsupportedFormat);
        assert!(
            e.to_string()
                .starts_with("unsupported format: VMDK (stream-optimized);"),
            "{e}"
        );
        assert!(e.to_string().contains("qemu-img"), "{e}");
    }

    #[test]
    fn extensions() {
        assert_eq!(extension_format(Path::new("/x/disk.VMDK")), Some("VMDK"));
        assert_eq!(extension_format(Path::new("disk.img")), None);
        assert_eq!(extension_format(Path::new("disk")), None);
    }
}
