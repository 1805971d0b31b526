//! Searching a filesystem for kernels, UKIs and the kernel command line.

use std::cell::RefCell;

use diskkit::{Error, ErrorKind, Result};

use super::{
    order, Cmdline, Discovery, KernelCandidate, KernelKind, CMDLINE_FILES, MAX_CMDLINE, MAX_DIR_ENTRIES,
    MAX_UKI_DEPTH, MAX_UNAME, SEARCHED,
};
use crate::read::fs::{FileReader, FileType, Lookup};
use crate::read::partition::SectorSource;
use crate::read::pe::{parse_pe, PeFile};
use crate::read::volume::Filesystem;

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// A file in the filesystem as a [`SectorSource`], for the PE parser.
struct FileSource<'a> {
    path: &'a str,
    size: u64,
    file: RefCell<FileReader>,
}

impl<'a> FileSource<'a> {
    fn open(fs: &'a Filesystem, path: &'a str) -> Result<FileSource<'a>> {
        let file = fs.open_file(path)?;
        Ok(FileSource {
            path,
            size: file.size(),
            file: RefCell::new(file),
        })
    }
}

impl SectorSource for FileSource<'_> {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self
            .file
            .borrow_mut()
            .read_at(offset, buf)
            .map_err(|e| e.with_path(self.path))?;
        if n < buf.len() {
            return Err(Error::corrupt("unexpected end of file").with_path(self.path));
        }
        Ok(())
    }
}

/// Parse the PE headers of a file in the image.
pub fn read_pe(fs: &Filesystem, path: &str) -> Result<PeFile> {
    let src = FileSource::open(fs, path)?;
    parse_pe(&src).map_err(|e| e.with_path(path))
}

/// Is `path` a regular file (following symlinks inside the image)? Dangling links and loops
/// are reported as warnings.
fn is_file(fs: &Filesystem, path: &str, warnings: &mut Vec<String>) -> Result<bool> {
    match fs.lookup(path, true)? {
        Lookup::Found(r) => Ok(r.inode.file_type() == FileType::Regular),
        Lookup::NotFound | Lookup::NotADirectory => {
            if matches!(fs.lookup(path, false)?, Lookup::Found(_)) {
                warnings.push(format!("{path}: dangling symlink"));
            }
            Ok(false)
        }
        Lookup::SymlinkLoop => {
            warnings.push(format!("{path}: symlink loop"));
            Ok(false)
        }
    }
}

fn is_dir(fs: &Filesystem, path: &str) -> Result<bool> {
    match fs.lookup(path, true)? {
        Lookup::Found(r) => Ok(r.inode.file_type() == FileType::Directory),
        _ => Ok(false),
    }
}

/// UTF-8 names of a directory (others are skipped: versions and kernel names are ASCII).
fn names(fs: &Filesystem, dir: &str) -> Result<Vec<String>> {
    let raw = fs.read_dir_names(dir)?;
    if raw.len() > MAX_DIR_ENTRIES {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("more than {MAX_DIR_ENTRIES} entries"),
        )
        .with_path(dir));
    }
    Ok(raw
        .into_iter()
        .filter_map(|n| String::from_utf8(n).ok())
        .collect())
}

/// `*.efi`, any case (byte-wise: names are not trusted to be split at char boundaries).
fn has_efi_extension(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() > 4 && b[b.len() - 4..].eq_ignore_ascii_case(b".efi")
}

/// The version in a UKI file name such as `fedora-6.8.5-301.fc40.x86_64.efi` (what follows
/// the first `-` that precedes a digit).
fn version_from_uki_name(name: &str) -> Option<String> {
    let stem = &name[..name.len().saturating_sub(4)];
    let head = stem.split('-').next().unwrap_or("");
    if head.starts_with(|c: char| c.is_ascii_digit()) && head.contains('.') {
        return Some(stem.to_owned());
    }
    let b = stem.as_bytes();
    (0..b.len().saturating_sub(1))
        .find(|&i| b[i] == b'-' && b[i + 1].is_ascii_digit())
        .map(|i| stem[i + 1..].to_owned())
}

fn uki_candidate(
    fs: &Filesystem,
    path: String,
    dir_version: Option<&str>,
    layout: &'static str,
    rank: u8,
    warnings: &mut Vec<String>,
) -> Result<Option<KernelCandidate>> {
    let pe = match read_pe(fs, &path) {
        Ok(pe) => pe,
        Err(e) if matches!(e.kind(), ErrorKind::InvalidFormat | ErrorKind::Corrupt) => {
            warnings.push(format!("{path}: not a usable PE file ({e})"));
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    if !pe.is_uki() {
        warnings.push(format!("{path}: PE file without a .linux section (not a UKI)"));
        return Ok(None);
    }
    let uname = match pe.section(".uname") {
        Some(s) => {
            let (off, len) = s.file_range();
            let mut v = Vec::new();
            fs.copy_range_to(&path, off, Some(len.min(MAX_UNAME)), &mut v)?;
            let t = String::from_utf8_lossy(&v)
                .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                .to_owned();
            (!t.is_empty()).then_some(t)
        }
        None => None,
    };
    let name = path.rsplit('/').next().unwrap_or("");
    let version = dir_version
        .map(str::to_owned)
        .or(uname)
        .or_else(|| version_from_uki_name(name));
    Ok(Some(KernelCandidate {
        kind: KernelKind::Uki,
        version,
        kernel: path,
        initramfs: None,
        layout,
        rank,
    }))
}

fn find_ukis_in(
    fs: &Filesystem,
    dir: &str,
    depth: usize,
    out: &mut Vec<KernelCandidate>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    for name in names(fs, dir)? {
        let path = join(dir, &name);
        if has_efi_extension(&name) && is_file(fs, &path, warnings)? {
            if let Some(c) = uki_candidate(fs, path, None, "boot-efi-linux", 0, warnings)? {
                out.push(c);
            }
        } else if is_dir(fs, &path)? {
            if depth >= MAX_UKI_DEPTH {
                warnings.push(format!(
                    "{path}: deeper than {MAX_UKI_DEPTH} levels; not searched"
                ));
            } else {
                find_ukis_in(fs, &path, depth + 1, out, warnings)?;
            }
        }
    }
    Ok(())
}

fn boot_initramfs(fs: &Filesystem, v: &str, warnings: &mut Vec<String>) -> Result<Option<String>> {
    initramfs_in(fs, "/boot", v, warnings)
}

fn initramfs_in(fs: &Filesystem, dir: &str, v: &str, warnings: &mut Vec<String>) -> Result<Option<String>> {
    for p in [
        join(dir, &format!("initrd.img-{v}")),
        join(dir, &format!("initramfs-{v}.img")),
    ] {
        if is_file(fs, &p, warnings)? {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// `vmlinuz-<v>` files in `dir` (named `names`), each with the same version's initramfs.
fn scan_versioned(
    fs: &Filesystem,
    dir: &str,
    names: &[String],
    layout: &'static str,
    rank: u8,
    c: &mut Vec<KernelCandidate>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    for name in names {
        let Some(v) = name.strip_prefix("vmlinuz-") else {
            continue;
        };
        if v.is_empty() {
            continue;
        }
        let path = join(dir, name);
        if !is_file(fs, &path, warnings)? {
            continue;
        }
        c.push(KernelCandidate {
            kind: KernelKind::Kernel,
            version: Some(v.to_owned()),
            kernel: path,
            initramfs: initramfs_in(fs, dir, v, warnings)?,
            layout,
            rank,
        });
    }
    Ok(())
}

/// Find every kernel in the filesystem.
pub fn discover(fs: &Filesystem) -> Result<Discovery> {
    let mut c = Vec::new();
    let mut warnings = Vec::new();
    if is_dir(fs, "/boot/EFI/Linux")? {
        find_ukis_in(fs, "/boot/EFI/Linux", 0, &mut c, &mut warnings)?;
    }
    let modules = "/usr/lib/modules";
    if is_dir(fs, modules)? {
        for v in names(fs, modules)? {
            let dir = join(modules, &v);
            if !is_dir(fs, &dir)? {
                continue;
            }
            for name in names(fs, &dir)? {
                let path = join(&dir, &name);
                if has_efi_extension(&name) && is_file(fs, &path, &mut warnings)? {
                    if let Some(k) = uki_candidate(fs, path, Some(&v), "modules-uki", 1, &mut warnings)? {
                        c.push(k);
                    }
                }
            }
            let vmlinuz = join(&dir, "vmlinuz");
            if is_file(fs, &vmlinuz, &mut warnings)? {
                let beside = join(&dir, "initramfs.img");
                let initramfs = if is_file(fs, &beside, &mut warnings)? {
                    Some(beside)
                } else {
                    boot_initramfs(fs, &v, &mut warnings)?
                };
                c.push(KernelCandidate {
                    kind: KernelKind::Kernel,
                    version: Some(v.clone()),
                    kernel: vmlinuz,
                    initramfs,
                    layout: "modules",
                    rank: 2,
                });
            }
        }
    }
    if is_dir(fs, "/boot")? {
        let boot_names = names(fs, "/boot")?;
        scan_versioned(fs, "/boot", &boot_names, "boot", 3, &mut c, &mut warnings)?;
        if boot_names.iter().any(|n| n == "vmlinuz") && is_file(fs, "/boot/vmlinuz", &mut warnings)? {
            // Unversioned name, usually a link to a versioned kernel listed above.
            let target = fs.canonicalize("/boot/vmlinuz")?;
            let target = String::from_utf8_lossy(&target).into_owned();
            let already = c.iter().any(|k| {
                fs.canonicalize(k.kernel.as_str())
                    .is_ok_and(|p| String::from_utf8_lossy(&p) == target)
            });
            if !already {
                let version = target
                    .rsplit('/')
                    .next()
                    .and_then(|n| n.strip_prefix("vmlinuz-"))
                    .map(str::to_owned);
                let mut initramfs = None;
                for p in ["/boot/initrd.img", "/boot/initramfs.img"] {
                    if is_file(fs, p, &mut warnings)? {
                        initramfs = Some(p.to_owned());
                        break;
                    }
                }
                c.push(KernelCandidate {
                    kind: KernelKind::Kernel,
                    version,
                    kernel: "/boot/vmlinuz".to_owned(),
                    initramfs,
                    layout: "boot-unversioned",
                    rank: 4,
                });
            }
        }
    }
    if !is_dir(fs, "/boot")? {
        // A separate /boot (XBOOTLDR) partition: its root is what the system mounts at /boot.
        if is_dir(fs, "/EFI/Linux")? {
            let mut ukis = Vec::new();
            find_ukis_in(fs, "/EFI/Linux", 0, &mut ukis, &mut warnings)?;
            for mut k in ukis {
                k.layout = "boot-partition-efi-linux";
                c.push(k);
            }
        }
        let root_names = names(fs, "/")?;
        scan_versioned(fs, "/", &root_names, "boot-partition", 5, &mut c, &mut warnings)?;
    }
    c.sort_by(order);
    let mut cmdline = None;
    for p in CMDLINE_FILES {
        if is_file(fs, p, &mut warnings)? {
            let bytes = fs.read_small(p, MAX_CMDLINE)?;
            let text = String::from_utf8_lossy(&bytes)
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .flat_map(str::split_whitespace)
                .collect::<Vec<_>>()
                .join(" ");
            cmdline = Some(Cmdline {
                path: p.to_owned(),
                text,
            });
            break;
        }
    }
    Ok(Discovery {
        candidates: c,
        cmdline,
        warnings,
    })
}

/// Discover kernels on a whole disk whose filesystem was not named: when several partitions
/// hold ext filesystems (a separate `/boot` next to the root, say), use the first one with a
/// kernel (boot partitions first), and take the command line from any of them.
/// Returns the filesystem the kernel is on, the discovery and a note naming the partition.
pub fn discover_disk(
    image: std::sync::Arc<diskkit::DiskImage>,
) -> Result<(Filesystem, Discovery, Option<String>)> {
    use crate::read::volume::{ext_locations, PartitionSelector};
    let locations = ext_locations(&image)?;
    if locations.len() <= 1 {
        let fs = Filesystem::open(image, &PartitionSelector::Auto)?;
        let d = discover(&fs)?;
        return Ok((fs, d, None));
    }
    let mut found: Option<(Filesystem, Discovery, u32)> = None;
    let mut cmdline = None;
    let mut warnings = Vec::new();
    for loc in locations {
        let number = loc.partition.as_ref().map_or(0, |p| p.number);
        let fs = Filesystem::open_at(image.clone(), loc)?;
        let d = discover(&fs)?;
        warnings.extend(d.warnings.iter().map(|w| format!("partition {number}: {w}")));
        if cmdline.is_none() {
            cmdline.clone_from(&d.cmdline);
        }
        if found.is_none() && !d.candidates.is_empty() {
            found = Some((fs, d, number));
        }
    }
    let Some((fs, mut d, number)) = found else {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "no kernel found in any ext partition; searched: {}",
                SEARCHED.join("; ")
            ),
        ));
    };
    if d.cmdline.is_none() {
        d.cmdline = cmdline;
    }
    d.warnings = warnings;
    Ok((
        fs,
        d,
        Some(format!(
            "several ext filesystems; using the kernel in partition {number}"
        )),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn efi_extension_is_byte_safe() {
        assert!(has_efi_extension("a.EFI"));
        assert!(!has_efi_extension(".efi"));
        assert!(!has_efi_extension("abé"));
        assert!(!has_efi_extension("x.éfi"));
    }

    #[test]
    fn uki_names() {
        assert_eq!(
            version_from_uki_name("fedora-6.8.5-301.fc40.x86_64.efi").as_deref(),
            Some("6.8.5-301.fc40.x86_64")
        );
        assert_eq!(version_from_uki_name("6.1.0.efi").as_deref(), Some("6.1.0"));
        assert_eq!(version_from_uki_name("linux.efi"), None);
        assert_eq!(
            version_from_uki_name("0123abcd-6.1.0-28-amd64.EFI").as_deref(),
            Some("6.1.0-28-amd64")
        );
    }
}
