//! `diskkit kernel`: find the bootable kernel in an image and extract it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use diskkit::{DiskImage, ImageFormat, OpenOptions};
use diskkit_ext4::read::apple_store::{AppleStore, Platform};
use diskkit_ext4::read::kernel::{
    discover, discover_disk, extract, select, ExtractOptions, KernelCandidate, Written, SEARCHED,
};
use diskkit_ext4::read::PartitionSelector;
use serde::Serialize;

use super::fs::{open_fs, parse_target, FsArgs, Target};
use crate::args::{Output, OutputArg, QuietArg};
use crate::messages::note;

/// Find the bootable kernel in an image, and extract it.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Find the bootable kernel in an image: a unified kernel image (UKI), else \
                  /usr/lib/modules/<v>/vmlinuz, Debian's or Fedora's /boot; the highest version \
                  wins unless --kernel-version. With --out DIR, write vmlinuz and initramfs (or \
                  uki.efi) into DIR, and as cmdline the command line `diskkit boot` gives the \
                  kernel (the image's own, then root=, rw and the serial console), for \
                  `qemu-system-x86_64 -kernel ... -initrd ... -append \"$(cat cmdline)\"` or \
                  Virtualization.framework's Linux boot loader.",
    after_help = "\
Examples:
  # What would be extracted
  diskkit kernel debian.qcow2
  # vmlinuz, initramfs and cmdline into boot/
  diskkit kernel debian.qcow2 --out boot/
  # Every kernel on partition 2
  diskkit kernel --list disk.raw@2"
)]
pub(crate) struct Args {
    #[command(flatten)]
    fs: FsArgs,
    /// Write the kernel, initramfs (or UKI) and the boot command line (cmdline) into this
    /// directory; without it, only show what would be extracted.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// List every kernel found instead of choosing one.
    #[arg(long)]
    list: bool,
    /// Choose this kernel version instead of the highest.
    #[arg(long, value_name = "V")]
    kernel_version: Option<String>,
    /// For a UKI, also write its .linux, .initrd and .cmdline sections as vmlinuz,
    /// initramfs and cmdline.
    #[arg(long)]
    split_uki: bool,
    /// Replace existing files in the output directory.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    output: OutputArg,
    #[command(flatten)]
    quiet: QuietArg,
    /// IMAGE[@PART] (or an image reference with --apple-store).
    #[arg(value_name = "IMAGE[@PART]")]
    image: String,
}

#[derive(Serialize)]
struct Report<'a> {
    /// Partition number the filesystem was read from (`null`: the whole disk).
    partition: Option<u32>,
    searched: &'a [&'a str],
    candidates: &'a [KernelCandidate],
    chosen: Option<&'a KernelCandidate>,
    note: Option<&'a str>,
    cmdline: Option<&'a diskkit_ext4::read::kernel::Cmdline>,
    warnings: &'a [String],
    written: &'a [diskkit_ext4::read::kernel::Written],
}

fn describe(k: &KernelCandidate) -> String {
    let mut s = format!(
        "{} {} {}",
        match k.kind {
            diskkit_ext4::read::kernel::KernelKind::Uki => "uki   ",
            diskkit_ext4::read::kernel::KernelKind::Kernel => "kernel",
        },
        k.version.as_deref().unwrap_or("(unknown version)"),
        k.kernel
    );
    match &k.initramfs {
        Some(i) => s.push_str(&format!(" + {i}")),
        None if k.kind == diskkit_ext4::read::kernel::KernelKind::Kernel => s.push_str(" (no initramfs)"),
        None => {}
    }
    s
}

/// The whole disk a target names, and which of its filesystems is the root (for the
/// `cmdline` file's `root=`).
fn target_disk(args: &FsArgs, t: &Target) -> Result<(Arc<DiskImage>, PartitionSelector)> {
    if let Some(root) = &args.apple_store {
        let platform = match args.platform.as_deref() {
            Some(p) => Platform::parse(p)?,
            None => Platform::host(),
        };
        let snap = AppleStore::open(root)?.resolve(&t.image, &platform)?;
        let disk = DiskImage::open(&snap.snapshot, &OpenOptions::new().format(ImageFormat::Raw))
            .with_context(|| format!("cannot open snapshot '{}'", snap.snapshot.display()))?;
        return Ok((Arc::new(disk), PartitionSelector::WholeDisk));
    }
    let path = PathBuf::from(&t.image);
    let options = args.open.options(false).detached(args.detached.detached);
    let disk = Arc::new(super::open_image(&path, &options)?);
    let selector = t
        .partition
        .as_deref()
        .or(args.partition.as_deref())
        .map_or(PartitionSelector::Auto, PartitionSelector::parse);
    Ok((disk, selector))
}

pub(crate) fn run(req: &Args) -> Result<u8> {
    let args = &req.fs;
    let t = parse_target(&req.image, true, args.apple_store.is_some())?;
    let (fs, d) = if args.apple_store.is_none() && t.partition.is_none() && args.partition.is_none() {
        let path = std::path::PathBuf::from(&t.image);
        let options = args.open.options(false).detached(args.detached.detached);
        let disk = std::sync::Arc::new(super::open_image(&path, &options)?);
        let (fs, d, n) = discover_disk(disk).with_context(|| format!("in '{}'", path.display()))?;
        if let Some(n) = n {
            note(format_args!("{n}"));
        }
        (fs, d)
    } else {
        let fs = open_fs(args, &t)?;
        let d = discover(&fs)?;
        (fs, d)
    };
    for w in &d.warnings {
        eprintln!("diskkit: warning: {w}");
    }
    if req.list {
        match req.output.output {
            Output::Json => {
                let r = Report {
                    partition: fs.location().partition.as_ref().map(|p| p.number),
                    searched: &SEARCHED,
                    candidates: &d.candidates,
                    chosen: None,
                    note: None,
                    cmdline: d.cmdline.as_ref(),
                    warnings: &d.warnings,
                    written: &[],
                };
                super::fs::print_json(&r)?;
            }
            Output::Human => {
                if d.candidates.is_empty() {
                    println!("no kernel found; searched:");
                    for s in SEARCHED {
                        println!("  {s}");
                    }
                }
                for (i, k) in d.candidates.iter().enumerate() {
                    println!("{}{}", if i == 0 { "* " } else { "  " }, describe(k));
                }
                if let Some(c) = &d.cmdline {
                    println!("cmdline ({}): {}", c.path, c.text);
                }
            }
        }
        return Ok(0);
    }
    let sel = select(&d, req.kernel_version.as_deref())?;
    if let Some(n) = &sel.note {
        note(format_args!("{n}"));
    }
    let mut written = match &req.out {
        Some(dir) => extract(
            &fs,
            &d,
            &sel,
            dir,
            ExtractOptions {
                split_uki: req.split_uki,
                overwrite: req.force,
            },
        )?,
        None => Vec::new(),
    };
    if let Some(dir) = &req.out {
        // The command line `diskkit boot` gives this kernel (root, rw, console), replacing
        // the image's own that extract() copied.
        let (disk, selector) = target_disk(args, &t)?;
        write_boot_cmdline(disk, &selector, dir, req.force, &mut written)?;
    }
    match req.output.output {
        Output::Json => {
            let r = Report {
                partition: fs.location().partition.as_ref().map(|p| p.number),
                searched: &SEARCHED,
                candidates: &d.candidates,
                chosen: Some(&sel.chosen),
                note: sel.note.as_deref(),
                cmdline: d.cmdline.as_ref(),
                warnings: &d.warnings,
                written: &written,
            };
            super::fs::print_json(&r)?;
        }
        Output::Human if req.quiet.quiet && req.out.is_some() => {}
        Output::Human => {
            println!("{}", describe(&sel.chosen));
            if let Some(c) = &d.cmdline {
                println!("cmdline ({}): {}", c.path, c.text);
            }
            for w in &written {
                println!("wrote {} ({} bytes) from {}", w.path.display(), w.size, w.source);
            }
            if req.out.is_none() {
                note(format_args!("nothing written; give --out DIR to extract it"));
            }
        }
    }
    Ok(0)
}

/// Write `cmdline` in `dir`: the image's command line (read back from what `extract` wrote:
/// a split UKI's `.cmdline` or the image's cmdline file) plus the root, `rw` and the console,
/// as `diskkit boot` builds it. Replaces the entry in `written`.
fn write_boot_cmdline(
    disk: Arc<DiskImage>,
    selector: &PartitionSelector,
    dir: &Path,
    force: bool,
    written: &mut Vec<Written>,
) -> Result<()> {
    let image_cmdline = written
        .iter()
        .find(|w| w.role == "cmdline")
        .map(|w| w.path.clone());
    let image_text = match &image_cmdline {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("reading '{}'", p.display()))?),
        None => None,
    };
    let kernel = written
        .iter()
        .find(|w| w.role == "vmlinuz")
        .or_else(|| written.iter().find(|w| w.role == "uki"))
        .context("no kernel was written")?;
    // The kernel's header (its architecture, for the console).
    let mut head = Vec::with_capacity(4096);
    std::fs::File::open(&kernel.path)
        .and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, 4096), &mut head))
        .with_context(|| format!("reading '{}'", kernel.path.display()))?;
    let has_initramfs = written.iter().any(|w| w.role == "initramfs") || kernel.role == "uki";
    let text =
        crate::boot::kernel::boot_cmdline(disk, selector, image_text.as_deref(), &head, has_initramfs)?;
    let dest = dir.join("cmdline");
    let pending = diskkit::output::PendingFile::new(&dest, force || image_cmdline.is_some())?;
    std::fs::write(pending.temp_path(), format!("{text}\n"))
        .with_context(|| format!("writing '{}'", dest.display()))?;
    pending.persist()?;
    let source = match written.iter().position(|w| w.role == "cmdline") {
        Some(i) => format!("{} + diskkit", written.remove(i).source),
        None => "diskkit".to_owned(),
    };
    written.push(Written {
        role: "cmdline",
        path: dest,
        size: text.len() as u64 + 1,
        source,
    });
    Ok(())
}
