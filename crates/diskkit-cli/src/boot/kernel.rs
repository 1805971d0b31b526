//! The kernel a root boots with: found as `diskkit kernel` finds it, its architecture read
//! from its header, written out for QEMU's direct kernel boot, and the command line.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use diskkit_ext4::read::kernel::{
    discover, discover_disk, extract, select, Discovery, ExtractOptions, KernelKind, Selection,
};
use diskkit_ext4::read::Filesystem;
use serde::{Deserialize, Serialize};

use super::root::RootFs;

/// CPU architectures diskkit boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Arch {
    /// x86-64: `qemu-system-x86_64`, console ttyS0.
    X86_64,
    /// 64-bit Arm: `qemu-system-aarch64`, console ttyAMA0.
    Aarch64,
}

impl Arch {
    /// The host's architecture, when diskkit boots it.
    pub(crate) fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            _ => None,
        }
    }

    /// Name as QEMU and `uname -m` spell it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The serial console the kernel command line names.
    pub(crate) fn console(self) -> &'static str {
        match self {
            Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
        }
    }

    /// Read the architecture from the first bytes of a kernel image: an x86 bzImage (`HdrS`
    /// at 0x202, 64-bit by `xloadflags`), an arm64 `Image` (`ARM\x64` at 0x38, with or
    /// without the EFI stub's `MZ`), or a PE file (an EFI zboot image or a UKI's stub) by its
    /// COFF machine type.
    pub(crate) fn of_kernel(head: &[u8]) -> Result<Arch> {
        let at = |o: usize, n: usize| head.get(o..o + n);
        if at(0x202, 4) == Some(b"HdrS") {
            // Boot protocol 2.12+ `xloadflags` bit 0: the kernel has a 64-bit entry point.
            let xloadflags = at(0x236, 2).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
            if xloadflags & 1 == 1 {
                return Ok(Arch::X86_64);
            }
            bail!("the kernel is a 32-bit x86 bzImage; diskkit boots x86_64 and aarch64 kernels");
        }
        if at(0x38, 4) == Some(b"ARM\x64") {
            return Ok(Arch::Aarch64);
        }
        if at(0, 2) == Some(b"MZ") {
            if let Some(machine) = pe_machine(head) {
                return match machine {
                    0x8664 => Ok(Arch::X86_64),
                    0xAA64 => Ok(Arch::Aarch64),
                    m => bail!("the kernel is a PE image for machine type {m:#06x}; diskkit boots x86_64 and aarch64"),
                };
            }
        }
        if head.starts_with(&[0x1f, 0x8b]) {
            // arm64 kernels are often shipped gzip-compressed (QEMU inflates them); the
            // header is inside the compressed stream.
            return Ok(Arch::Aarch64);
        }
        bail!("the kernel's format is not recognised (not an x86 bzImage, an arm64 Image or a PE file)")
    }
}

/// The COFF machine field of a PE file's header, if the header lies within `head`.
fn pe_machine(head: &[u8]) -> Option<u16> {
    let lfanew = u32::from_le_bytes(head.get(0x3C..0x40)?.try_into().ok()?) as usize;
    let sig = head.get(lfanew..lfanew.checked_add(6)?)?;
    (sig[..4] == *b"PE\0\0").then(|| u16::from_le_bytes([sig[4], sig[5]]))
}

/// A kernel found in the root image, not yet written out.
#[derive(Debug)]
pub(crate) struct Found {
    /// The filesystem holding it.
    pub(crate) fs: Filesystem,
    /// Everything `discover` found.
    pub(crate) discovery: Discovery,
    /// The chosen kernel.
    pub(crate) selection: Selection,
    /// Its architecture.
    pub(crate) arch: Arch,
    /// Notes to show (several versions, several partitions).
    pub(crate) notes: Vec<String>,
}

impl Found {
    /// Describe it: `6.1.0-28-cloud-amd64 (/boot/vmlinuz-... + /boot/initrd.img-...)`.
    pub(crate) fn describe(&self) -> String {
        let k = &self.selection.chosen;
        let mut s = format!(
            "{} ({}",
            k.version.as_deref().unwrap_or("unknown version"),
            k.kernel
        );
        if let Some(i) = &k.initramfs {
            s.push_str(&format!(" + {i}"));
        }
        s.push(')');
        s
    }
}

/// Find the kernel of the disk whose root filesystem is `root`: in the root filesystem
/// itself when a partition was named, otherwise as `diskkit kernel` searches a whole disk
/// (a separate /boot partition included).
pub(crate) fn find(root: &RootFs, version: Option<&str>) -> Result<Found> {
    let mut notes = Vec::new();
    let (fs, discovery) = if root.named_partition {
        let fs = root.filesystem()?;
        let d = discover(&fs)?;
        (fs, d)
    } else {
        let (fs, d, note) = discover_disk(root.disk.clone())?;
        notes.extend(note);
        (fs, d)
    };
    let selection = select(&discovery, version)?;
    notes.extend(selection.note.clone());
    let k = &selection.chosen;
    let mut head = Vec::with_capacity(4096);
    let len = fs.stat_follow(&k.kernel)?.size.min(4096);
    fs.copy_range_to(&k.kernel, 0, Some(len), &mut head)?;
    let arch = match k.kind {
        KernelKind::Kernel => Arch::of_kernel(&head),
        KernelKind::Uki => uki_arch(&fs, &k.kernel, &head),
    }
    .with_context(|| format!("kernel {} in the image", k.kernel))?;
    Ok(Found {
        fs,
        discovery,
        selection,
        arch,
        notes,
    })
}

/// A UKI's architecture: its `.linux` section's when readable, else the stub's.
fn uki_arch(fs: &Filesystem, path: &str, head: &[u8]) -> Result<Arch> {
    let pe = diskkit_ext4::read::kernel::read_pe(fs, path)?;
    if let Some(s) = pe.section(".linux") {
        let (off, len) = s.file_range();
        let mut linux = Vec::with_capacity(4096);
        fs.copy_range_to(path, off, Some(len.min(4096)), &mut linux)?;
        if let Ok(a) = Arch::of_kernel(&linux) {
            return Ok(a);
        }
    }
    Arch::of_kernel(head)
}

/// The kernel written out for QEMU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BootFiles {
    /// The kernel (`bzImage`, `Image`, a UKI's `.linux`).
    pub(crate) kernel: PathBuf,
    /// The initramfs, if the image has one.
    pub(crate) initramfs: Option<PathBuf>,
    /// The image's own command line (a UKI's `.cmdline`, `/etc/kernel/cmdline` or
    /// `/usr/lib/kernel/cmdline`) and where it came from.
    pub(crate) image_cmdline: Option<(String, String)>,
    /// Architecture.
    pub(crate) arch: Arch,
    /// Version, when known.
    pub(crate) version: Option<String>,
    /// Where the kernel is in the image.
    pub(crate) source: String,
}

/// Write the found kernel into `dir` (which must exist): `vmlinuz`, `initramfs`; a UKI is
/// split into its sections. Returns the files.
pub(crate) fn write_out(found: &Found, dir: &Path) -> Result<BootFiles> {
    let written = extract(
        &found.fs,
        &found.discovery,
        &found.selection,
        dir,
        ExtractOptions {
            split_uki: true,
            overwrite: true,
        },
    )?;
    let mut files = BootFiles {
        kernel: dir.join("vmlinuz"),
        initramfs: None,
        image_cmdline: None,
        arch: found.arch,
        version: found.selection.chosen.version.clone(),
        source: found.describe(),
    };
    for w in &written {
        match w.role {
            "initramfs" => files.initramfs = Some(w.path.clone()),
            "cmdline" => {
                let text =
                    fs::read_to_string(&w.path).with_context(|| format!("reading '{}'", w.path.display()))?;
                files.image_cmdline = Some((text.trim().to_owned(), w.source.clone()));
                fs::remove_file(&w.path).ok();
            }
            "uki" => {
                // Only its sections are booted.
                fs::remove_file(&w.path).ok();
            }
            _ => {}
        }
    }
    if !files.kernel.is_file() {
        bail!(
            "the UKI {} has no .linux section to boot",
            found.selection.chosen.kernel
        );
    }
    Ok(files)
}

/// Options in the image's command line that diskkit sets itself: the root device, its
/// mount mode, and (for `init=`) nothing (kept).
fn replaced_by_diskkit(arg: &str) -> bool {
    let key = arg.split('=').next().unwrap_or(arg);
    matches!(key, "root" | "rootflags" | "rootfstype") || arg == "ro" || arg == "rw"
}

/// The kernel command line: what the image says (without its `root=`, `ro`/`rw`), then
/// the root diskkit found (`root=UUID=` or `root=PARTUUID=`), `rw`, the serial console, then
/// `extra` (diskkit's own options and the user's `--karg`s, in that order).
pub(crate) fn compose_cmdline(image: Option<&str>, root_arg: &str, arch: Arch, extra: &[String]) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(text) = image {
        parts.extend(
            split_cmdline(text)
                .into_iter()
                .filter(|a| !replaced_by_diskkit(a)),
        );
    }
    parts.push(root_arg.to_owned());
    parts.push("rw".to_owned());
    parts.push(format!("console={}", arch.console()));
    parts.extend(extra.iter().cloned());
    parts.join(" ")
}

/// The command line `diskkit boot` gives the kernel whose first bytes are `head` on `disk`
/// (without COMMAND's options and `--karg`s): what `diskkit kernel --out` writes as
/// `cmdline`.
pub(crate) fn boot_cmdline(
    disk: std::sync::Arc<diskkit::DiskImage>,
    selector: &diskkit_ext4::read::PartitionSelector,
    image: Option<&str>,
    head: &[u8],
    has_initramfs: bool,
) -> Result<String> {
    let root = RootFs::open(disk, selector)?;
    let root_arg = root.root_arg(has_initramfs);
    match Arch::of_kernel(head) {
        Ok(arch) => Ok(compose_cmdline(image, &root_arg, arch, &[])),
        Err(e) => {
            crate::messages::warn(format_args!("{e:#}: the cmdline names no serial console"));
            let mut line = compose_cmdline(image, &root_arg, Arch::X86_64, &[]);
            let console = format!(" console={}", Arch::X86_64.console());
            line.truncate(line.len() - console.len());
            Ok(line)
        }
    }
}

/// Split a command line into arguments the way the kernel does: on spaces, except inside
/// double quotes.
pub(crate) fn split_cmdline(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_from_headers() {
        let mut bz = vec![0u8; 4096];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x236] = 1;
        assert_eq!(Arch::of_kernel(&bz).unwrap(), Arch::X86_64);
        bz[0x236] = 0;
        assert!(Arch::of_kernel(&bz).is_err());
        let mut arm = vec![0u8; 4096];
        arm[0..2].copy_from_slice(b"MZ");
        arm[0x38..0x3C].copy_from_slice(b"ARM\x64");
        assert_eq!(Arch::of_kernel(&arm).unwrap(), Arch::Aarch64);
        let mut zboot = vec![0u8; 4096];
        zboot[0..2].copy_from_slice(b"MZ");
        zboot[4..8].copy_from_slice(b"zimg");
        zboot[0x3C..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        zboot[0x80..0x84].copy_from_slice(b"PE\0\0");
        zboot[0x84..0x86].copy_from_slice(&0xAA64u16.to_le_bytes());
        assert_eq!(Arch::of_kernel(&zboot).unwrap(), Arch::Aarch64);
        zboot[0x84..0x86].copy_from_slice(&0x5064u16.to_le_bytes());
        assert!(Arch::of_kernel(&zboot).is_err());
        // A PE offset pointing outside the header is not a PE.
        zboot[0x3C..0x40].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        assert!(Arch::of_kernel(&zboot).is_err());
        assert!(Arch::of_kernel(b"garbage").is_err());
    }

    #[test]
    fn cmdline_composition() {
        let c = compose_cmdline(
            Some("root=UUID=old ro quiet  console=tty0 systemd.foo=\"a b\""),
            "root=UUID=new",
            Arch::X86_64,
            &["x=1".to_owned()],
        );
        assert_eq!(
            c,
            "quiet console=tty0 systemd.foo=\"a b\" root=UUID=new rw console=ttyS0 x=1"
        );
        assert_eq!(
            compose_cmdline(None, "root=PARTUUID=p", Arch::Aarch64, &[]),
            "root=PARTUUID=p rw console=ttyAMA0"
        );
    }
}
