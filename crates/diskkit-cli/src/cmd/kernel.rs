//! `diskkit kernel`: find the bootable kernel in an image and extract it.

use std::path::Path;

use anyhow::{Context, Result};
use diskkit_ext4::read::kernel::{
    discover, discover_disk, extract, select, ExtractOptions, KernelCandidate, SEARCHED,
};
use serde::Serialize;

use super::fs::{open_fs, parse_target};
use crate::args::{FsArgs, Output};

/// What `kernel` was asked to do.
pub(crate) struct Request<'a> {
    pub(crate) out: Option<&'a Path>,
    pub(crate) list: bool,
    pub(crate) version: Option<&'a str>,
    pub(crate) split_uki: bool,
    pub(crate) force: bool,
    pub(crate) output: Output,
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

pub(crate) fn run(args: &FsArgs, req: &Request<'_>, image: &str) -> Result<u8> {
    let t = parse_target(image, true, args.apple_store.is_some())?;
    let (fs, d) = if args.apple_store.is_none() && t.partition.is_none() && args.partition.is_none() {
        let path = std::path::PathBuf::from(&t.image);
        let disk = std::sync::Arc::new(super::open_image(&args.open, &path, false)?);
        let (fs, d, note) = discover_disk(disk).with_context(|| format!("'{}'", path.display()))?;
        if let Some(n) = note {
            eprintln!("diskkit: note: {n}");
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
        match req.output {
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
    let sel = select(&d, req.version)?;
    if let Some(n) = &sel.note {
        eprintln!("diskkit: note: {n}");
    }
    let written = match req.out {
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
    match req.output {
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
        Output::Human => {
            println!("{}", describe(&sel.chosen));
            if let Some(c) = &d.cmdline {
                println!("cmdline ({}): {}", c.path, c.text);
            }
            for w in &written {
                println!("wrote {} ({} bytes) from {}", w.path.display(), w.size, w.source);
            }
            if req.out.is_none() {
                eprintln!("diskkit: nothing written; give --out DIR to extract it");
            }
        }
    }
    Ok(0)
}
