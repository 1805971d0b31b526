//! Finding the bootable kernel in a filesystem, and writing it out.
//!
//! Places searched, in order of preference (see [`SEARCHED`]):
//! 1. Unified kernel images (UKIs): `/boot/EFI/Linux/**/*.efi` (recursive, case-insensitive
//!    extension) and `/usr/lib/modules/<v>/*.efi`. UKIs win over separate kernels, as in bcvk.
//! 2. `/usr/lib/modules/<v>/vmlinuz` with `initramfs.img` beside it (or, failing that, the
//!    `/boot` initramfs of the same version).
//! 3. `/boot/vmlinuz-<v>` with `/boot/initrd.img-<v>` (Debian) or `/boot/initramfs-<v>.img`
//!    (Fedora); unversioned `/boot/vmlinuz` with `/boot/initrd.img` or `/boot/initramfs.img`.
//! 4. On a filesystem without `/boot` (a separate boot partition): `/EFI/Linux/**/*.efi` and
//!    `/vmlinuz-<v>` with its initramfs at the root.
//!
//! Kernels and initramfs images are paired by version; among several versions the highest
//! (by [`compare_versions`]) is chosen and the choice is reported. Symlinks are followed inside
//! the image only (the reader resolves absolute links against the image's root).

use std::cmp::Ordering;

use diskkit::{Error, ErrorKind, Result};
use serde::Serialize;

use super::version::compare_versions;

mod discovery;
mod extract;

pub use discovery::{discover, discover_disk, read_pe};
pub use extract::{extract, ExtractOptions, Written, MAX_KERNEL_FILE};

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
