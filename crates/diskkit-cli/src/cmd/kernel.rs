//! `diskkit kernel`: find the bootable kernel in an image and extract it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use diskkit_ext4::read::kernel::{
    discover, discover_disk, extract, select, ExtractOptions, KernelCandidate, SEARCHED,
};
use serde::Serialize;

use super::fs::{open_fs, parse_target, FsArgs};
use crate::args::{Output, OutputArg, QuietArg};
use crate::messages::note;

/// Find the bootable kernel in an image, and extract it.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Find the bootable kernel in an image: a unified kernel image (UKI), else \
                  /usr/lib/modules/<v>/vmlinuz, Debian's or Fedora's /boot; the highest version \
                  wins unless --kernel-version. With --out DIR, write vmlinuz and initramfs (or \
                  uki.efi) and the kernel command line (cmdline) into DIR, for \
                  `qemu-system-x86_64 -kernel ... -initrd ... -append ...` or Virtualization.framework's \
                  Linux boot loader.",
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
    /// Write the kernel, initramfs (or UKI) and cmdline into this directory; without it,
    /// only show what would be extracted.
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
    let written = match &req.out {
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
