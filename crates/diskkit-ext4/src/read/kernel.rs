//! Finding the bootable kernel in a filesystem, and writing it out.
//!
//! Places searched, in order of preference (see [`SEARCHED`]):
//! 1. Unified kernel images (UKIs): `/boot/EFI/Linux/**/*.efi` (recursive, case-insensitive
//!    extension) and `/usr/lib/modules/<v>/*.efi`. UKIs win over separate kernels, as in bcvk.
//! 2. `/usr/lib/modules/<v>/vmlinuz` with `initramfs.img` beside it (or, failing that, the
//!    `/boot` initramfs of the same version).
//! 3. `/boot/vmlinuz-<v>` with `/boot/initrd.img-<v>` (Debian) or `/boot/initramfs-<v>.img`
//!    (Fedora); unversioned `/boot/vmlinuz` with `/boot/initrd.img` or `/boot/initramfs.img`.
//!
//! Kernels and initramfs images are paired by version; among several versions the highest
//! (by [`compare_versions`]) is chosen and the choice is reported. Symlinks are followed inside
//! the image only (`ext4-view` resolves absolute links against the image's root).

use std::cell::RefCell;
use std::cmp::Ordering;
use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use diskkit::output::PendingFile;
use diskkit::{Error, ErrorKind, Result};
use serde::Serialize;

use super::partition::SectorSource;
use super::pe::{parse_pe, PeFile};
use super::version::compare_versions;
use super::volume::{ext4_error, Filesystem};

/// Where kernels are looked for, for error messages and `--list`.
pub const SEARCHED: [&str; 7] = [
    "/boot/EFI/Linux/**/*.efi (UKI)",
    "/usr/lib/modules/<version>/*.efi (UKI)",
    "/usr/lib/modules/<version>/vmlinuz + initramfs.img",
    "/boot/vmlinuz-<version> + /boot/initrd.img-<version> or /boot/initramfs-<version>.img",
    "/boot/vmlinuz + /boot/initrd.img or /boot/initramfs.img",
    "/EFI/Linux/**/*.efi (UKI, separate /boot partition)",
    "/vmlinuz-<version> + /initrd.img-<version> or /initramfs-<version>.img (separate /boot partition)",
];

/// Kernel command line files, the first found wins (as for kernel-install).
pub const CMDLINE_FILES: [&str; 2] = ["/etc/kernel/cmdline", "/usr/lib/kernel/cmdline"];

const MAX_UKI_DEPTH: usize = 4;
const MAX_DIR_ENTRIES: usize = 100_000;
const MAX_CMDLINE: u64 = 64 << 10;
const MAX_UNAME: u64 = 256;
/// Largest kernel, initramfs or UKI extracted: far above any real one, far below what a
/// corrupt size field can claim.
pub const MAX_KERNEL_FILE: u64 = 4 << 30;

fn check_size(fs: &Filesystem, path: &str) -> Result<()> {
    let len = fs.stat_follow(path)?.size;
    if len > MAX_KERNEL_FILE {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("{len} bytes, more than any kernel or initramfs ({MAX_KERNEL_FILE} accepted)"),
        )
        .with_path(path));
    }
    Ok(())
}

/// What kind of kernel a candidate is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelKind {
    /// A unified kernel image (PE with `.linux`, `.initrd`, `.cmdline`).
    Uki,
    /// A separate kernel, possibly with an initramfs.
    Kernel,
}

/// One bootable kernel found in the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelCandidate {
    /// UKI or separate kernel.
    pub kind: KernelKind,
    /// Kernel version, when known (directory name, file name, or a UKI's `.uname`).
    pub version: Option<String>,
    /// Path of the kernel or UKI in the image.
    pub kernel: String,
    /// Path of the matching initramfs, if any (never for a UKI).
    pub initramfs: Option<String>,
    /// Which layout it was found in.
    pub layout: &'static str,
    #[serde(skip)]
    rank: u8,
}

/// The kernel command line found in the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cmdline {
    /// File it came from.
    pub path: String,
    /// Its text, whitespace-trimmed and joined onto one line.
    pub text: String,
}

/// Everything found in an image.
#[derive(Debug, Clone, Serialize)]
pub struct Discovery {
    /// Candidates, best first.
    pub candidates: Vec<KernelCandidate>,
    /// The command line file, if any.
    pub cmdline: Option<Cmdline>,
    /// Oddities met while searching (dangling links, unreadable UKIs).
    pub warnings: Vec<String>,
}

/// The chosen kernel and why.
#[derive(Debug, Clone, Serialize)]
pub struct Selection {
    /// The candidate.
    pub chosen: KernelCandidate,
    /// Set when there was a choice to make (several versions or places).
    pub note: Option<String>,
}

fn order(a: &KernelCandidate, b: &KernelCandidate) -> Ordering {
    // UKIs first; then highest version; then those with an initramfs; then by layout.
    (b.kind == KernelKind::Uki)
        .cmp(&(a.kind == KernelKind::Uki))
        .then_with(|| match (&a.version, &b.version) {
            (Some(x), Some(y)) => compare_versions(y, x),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        })
        .then_with(|| b.initramfs.is_some().cmp(&a.initramfs.is_some()))
        .then_with(|| a.rank.cmp(&b.rank))
        .then_with(|| a.kernel.cmp(&b.kernel))
}

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
    file: RefCell<ext4_view::File>,
}

impl<'a> FileSource<'a> {
    fn open(fs: &'a Filesystem, path: &'a str) -> Result<FileSource<'a>> {
        let file = fs.ext4().open(path).map_err(|e| ext4_error(&e, path))?;
        Ok(FileSource {
            path,
            size: file.metadata().len(),
            file: RefCell::new(file),
        })
    }
}

impl SectorSource for FileSource<'_> {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut f = self.file.borrow_mut();
        f.seek_to(offset).map_err(|e| ext4_error(&e, self.path))?;
        let mut done = 0;
        while done < buf.len() {
            let n = f
                .read_bytes(&mut buf[done..])
                .map_err(|e| ext4_error(&e, self.path))?;
            if n == 0 {
                return Err(Error::corrupt("unexpected end of file").with_path(self.path));
            }
            done += n;
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
    match fs.ext4().metadata(path) {
        Ok(m) => Ok(m.file_type().is_regular_file()),
        Err(ext4_view::Ext4Error::NotFound) => {
            if fs.ext4().symlink_metadata(path).is_ok() {
                warnings.push(format!("{path}: dangling symlink"));
            }
            Ok(false)
        }
        Err(ext4_view::Ext4Error::TooManySymlinks) => {
            warnings.push(format!("{path}: symlink loop"));
            Ok(false)
        }
        Err(e) => Err(ext4_error(&e, path)),
    }
}

fn is_dir(fs: &Filesystem, path: &str) -> Result<bool> {
    match fs.ext4().metadata(path) {
        Ok(m) => Ok(m.is_dir()),
        Err(ext4_view::Ext4Error::NotFound | ext4_view::Ext4Error::TooManySymlinks) => Ok(false),
        Err(e) => Err(ext4_error(&e, path)),
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
            let target = fs
                .ext4()
                .canonicalize("/boot/vmlinuz")
                .map_err(|e| ext4_error(&e, "/boot/vmlinuz"))?;
            let target = String::from_utf8_lossy(target.as_ref()).into_owned();
            let already = c.iter().any(|k| {
                fs.ext4()
                    .canonicalize(k.kernel.as_str())
                    .is_ok_and(|p| String::from_utf8_lossy(p.as_ref()) == target)
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
    use super::volume::{ext_locations, PartitionSelector};
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

/// Choose a kernel: the best candidate, or the best one of `version`.
pub fn select(d: &Discovery, version: Option<&str>) -> Result<Selection> {
    if d.candidates.is_empty() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("no kernel found; searched: {}", SEARCHED.join("; ")),
        ));
    }
    let versions = |list: &[&KernelCandidate]| {
        let mut v: Vec<String> = list
            .iter()
            .map(|k| k.version.clone().unwrap_or_else(|| "(unknown)".to_owned()))
            .collect();
        v.dedup();
        v
    };
    if let Some(want) = version {
        let chosen = d
            .candidates
            .iter()
            .find(|k| k.version.as_deref() == Some(want))
            .ok_or_else(|| {
                let all: Vec<&KernelCandidate> = d.candidates.iter().collect();
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "no kernel version '{want}' (found: {})",
                        versions(&all).join(", ")
                    ),
                )
            })?;
        return Ok(Selection {
            chosen: chosen.clone(),
            note: None,
        });
    }
    let chosen = &d.candidates[0];
    let same_kind: Vec<&KernelCandidate> = d.candidates.iter().filter(|k| k.kind == chosen.kind).collect();
    let vs = versions(&same_kind);
    let note = if vs.len() > 1 {
        Some(format!(
            "found {} kernel versions ({}); using the highest, {}; choose another with --kernel-version",
            vs.len(),
            vs.join(", "),
            chosen.version.as_deref().unwrap_or("(unknown)")
        ))
    } else if same_kind.len() > 1 {
        Some(format!(
            "found {} copies of {}; using {}",
            same_kind.len(),
            chosen.version.as_deref().unwrap_or("the kernel"),
            chosen.kernel
        ))
    } else {
        None
    };
    let note = match (
        note,
        chosen.kind,
        d.candidates.iter().any(|k| k.kind == KernelKind::Kernel),
    ) {
        (n, KernelKind::Uki, true) => Some(
            [
                n.as_deref(),
                Some("UKIs take precedence over separate kernel + initramfs files"),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("; "),
        ),
        (n, _, _) => n,
    };
    Ok(Selection {
        chosen: chosen.clone(),
        note,
    })
}

/// One file written by [`extract`].
#[derive(Debug, Clone, Serialize)]
pub struct Written {
    /// What it is: `uki`, `vmlinuz`, `initramfs` or `cmdline`.
    pub role: &'static str,
    /// Host path.
    pub path: PathBuf,
    /// Bytes.
    pub size: u64,
    /// Where it came from (an image path, possibly with `[section]`).
    pub source: String,
}

/// Options for [`extract`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtractOptions {
    /// Also write a UKI's `.linux`, `.initrd` and `.cmdline` sections as `vmlinuz`,
    /// `initramfs` and `cmdline`.
    pub split_uki: bool,
    /// Replace existing files in the output directory.
    pub overwrite: bool,
}

fn write_output(
    dir: &Path,
    name: &str,
    overwrite: bool,
    f: impl FnOnce(&mut dyn std::io::Write) -> Result<u64>,
) -> Result<(PathBuf, u64)> {
    let dest = dir.join(name);
    let pending = PendingFile::new(&dest, overwrite)?;
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(pending.temp_path())
        .map_err(|e| Error::io(e).with_path(pending.temp_path()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let n = f(&mut w)?;
    let file = w
        .into_inner()
        .map_err(|e| Error::io(e.into_error()).with_path(&dest))?;
    file.sync_all().map_err(|e| Error::io(e).with_path(&dest))?;
    drop(file);
    pending.persist()?;
    Ok((dest, n))
}

/// Write the selected kernel to `dir`: `vmlinuz` and `initramfs` (or `uki.efi`, plus the
/// split sections when asked) and `cmdline`. Each file appears only when complete.
pub fn extract(
    fs: &Filesystem,
    discovery: &Discovery,
    selection: &Selection,
    dir: &Path,
    options: ExtractOptions,
) -> Result<Vec<Written>> {
    check_size(fs, &selection.chosen.kernel)?;
    if let Some(i) = &selection.chosen.initramfs {
        check_size(fs, i)?;
    }
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(Error::invalid_argument("output is not a directory").with_path(dir)),
        Err(_) => fs::create_dir_all(dir).map_err(|e| Error::io(e).with_path(dir))?,
    }
    let k = &selection.chosen;
    let mut out = Vec::new();
    let ow = options.overwrite;
    let mut cmdline_written = false;
    match k.kind {
        KernelKind::Kernel => {
            let (p, n) = write_output(dir, "vmlinuz", ow, |w| fs.copy_file_to(&k.kernel, w))?;
            out.push(Written {
                role: "vmlinuz",
                path: p,
                size: n,
                source: k.kernel.clone(),
            });
            if let Some(i) = &k.initramfs {
                let (p, n) = write_output(dir, "initramfs", ow, |w| fs.copy_file_to(i, w))?;
                out.push(Written {
                    role: "initramfs",
                    path: p,
                    size: n,
                    source: i.clone(),
                });
            }
        }
        KernelKind::Uki => {
            let (p, n) = write_output(dir, "uki.efi", ow, |w| fs.copy_file_to(&k.kernel, w))?;
            out.push(Written {
                role: "uki",
                path: p,
                size: n,
                source: k.kernel.clone(),
            });
            if options.split_uki {
                let pe = read_pe(fs, &k.kernel)?;
                for (section, name, role) in [
                    (".linux", "vmlinuz", "vmlinuz"),
                    (".initrd", "initramfs", "initramfs"),
                    (".cmdline", "cmdline", "cmdline"),
                ] {
                    let Some(s) = pe.section(section) else {
                        continue;
                    };
                    let (off, len) = s.file_range();
                    let (p, n) = if section == ".cmdline" {
                        let mut v = Vec::new();
                        fs.copy_range_to(&k.kernel, off, Some(len.min(MAX_CMDLINE)), &mut v)?;
                        let text = String::from_utf8_lossy(&v);
                        let text = text.trim_matches(|c: char| c == '\0' || c.is_whitespace());
                        cmdline_written = true;
                        write_output(dir, name, ow, |w| {
                            w.write_all(text.as_bytes())
                                .and_then(|()| w.write_all(b"\n"))
                                .map_err(Error::io)?;
                            Ok(text.len() as u64 + 1)
                        })?
                    } else {
                        write_output(dir, name, ow, |w| fs.copy_range_to(&k.kernel, off, Some(len), w))?
                    };
                    out.push(Written {
                        role,
                        path: p,
                        size: n,
                        source: format!("{}[{section}]", k.kernel),
                    });
                }
            }
        }
    }
    if !cmdline_written {
        if let Some(c) = &discovery.cmdline {
            let (p, n) = write_output(dir, "cmdline", ow, |w| {
                w.write_all(c.text.as_bytes())
                    .and_then(|()| w.write_all(b"\n"))
                    .map_err(Error::io)?;
                Ok(c.text.len() as u64 + 1)
            })?;
            out.push(Written {
                role: "cmdline",
                path: p,
                size: n,
                source: c.path.clone(),
            });
        }
    }
    Ok(out)
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
