//! Writing the chosen kernel out of the image.

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use diskkit::output::PendingFile;
use diskkit::{Error, ErrorKind, Result};
use serde::Serialize;

use super::{read_pe, Discovery, KernelKind, Selection, MAX_CMDLINE};
use crate::read::volume::Filesystem;

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
    let file = pending.file()?;
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
