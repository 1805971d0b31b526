//! `diskkit ls`, `cat`, `stat` and `cp`: files inside an image's ext2/3/4 filesystem.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use diskkit::{DiskImage, ImageFormat, OpenOptions};
use diskkit_ext4::read::apple_store::{AppleStore, Platform};
use diskkit_ext4::read::entry::{mode_string, Entry};
use diskkit_ext4::read::extract::copy_out;
use diskkit_ext4::read::{Filesystem, PartitionSelector};

use super::open_image;
use crate::args::{FsArgs, Output};

/// Print `value` as pretty JSON on stdout (a closed pipe is an error, not a panic).
pub(crate) fn print_json(value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    let mut out = io::stdout().lock();
    writeln!(out, "{text}")?;
    Ok(())
}

/// A parsed `IMAGE[@PART][:/path]` argument.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) image: String,
    pub(crate) partition: Option<String>,
    pub(crate) path: String,
}

/// Split `IMAGE[@PART]:/path`. The path starts at the first `:/`. `@PART` is only split off
/// when IMAGE itself does not name an existing file, and never for store references.
pub(crate) fn parse_target(s: &str, path_optional: bool, reference: bool) -> Result<Target> {
    let (image, path) = match s.find(":/") {
        Some(i) => (&s[..i], s[i + 1..].to_owned()),
        None if path_optional => (s, "/".to_owned()),
        None => bail!("expected IMAGE[@PART]:/path, got '{s}'"),
    };
    if image.is_empty() {
        bail!("no image before ':' in '{s}'");
    }
    if !reference && !Path::new(image).exists() {
        if let Some(at) = image.rfind('@') {
            let part = &image[at + 1..];
            if !part.is_empty() && !part.contains('/') {
                return Ok(Target {
                    image: image[..at].to_owned(),
                    partition: Some(part.to_owned()),
                    path,
                });
            }
        }
    }
    Ok(Target {
        image: image.to_owned(),
        partition: None,
        path,
    })
}

/// Open the filesystem a target names.
pub(crate) fn open_fs(args: &FsArgs, target: &Target) -> Result<Filesystem> {
    if let Some(root) = &args.apple_store {
        if args.partition.is_some() {
            bail!("--partition does not apply to --apple-store snapshots (they are whole-disk ext4)");
        }
        return open_store_snapshot(root, args.platform.as_deref(), &target.image);
    }
    let selector = match (&target.partition, &args.partition) {
        (Some(_), Some(_)) => bail!("give the partition either as IMAGE@N or with --partition, not both"),
        (Some(p), None) | (None, Some(p)) => PartitionSelector::parse(p),
        (None, None) => PartitionSelector::Auto,
    };
    let path = PathBuf::from(&target.image);
    let image = Arc::new(open_image(&args.open, &path, false)?);
    Filesystem::open(image, &selector).with_context(|| format!("'{}'", path.display()))
}

/// Resolve a reference in an Apple `container` store and open its snapshot read-only.
pub(crate) fn open_store_snapshot(
    root: &Path,
    platform: Option<&str>,
    reference: &str,
) -> Result<Filesystem> {
    let platform = match platform {
        Some(p) => Platform::parse(p)?,
        None => Platform::host(),
    };
    let store = AppleStore::open(root)
        .with_context(|| format!("cannot read the container store at '{}'", root.display()))?;
    let snap = store
        .resolve(reference, &platform)
        .with_context(|| format!("cannot resolve '{reference}' for {platform}"))?;
    for w in &snap.warnings {
        eprintln!("diskkit: warning: {w}");
    }
    let image = DiskImage::open(&snap.snapshot, &OpenOptions::new().format(ImageFormat::Raw))
        .with_context(|| format!("cannot open snapshot '{}'", snap.snapshot.display()))?;
    Filesystem::open(Arc::new(image), &PartitionSelector::WholeDisk)
        .with_context(|| format!("snapshot '{}'", snap.snapshot.display()))
}

pub(crate) fn ls(args: &FsArgs, long: bool, output: Output, target: &str) -> Result<u8> {
    let t = parse_target(target, true, args.apple_store.is_some())?;
    let fs = open_fs(args, &t)?;
    let entries = fs.list(&t.path).with_context(|| format!("in '{}'", t.image))?;
    match output {
        Output::Json => super::fs::print_json(&entries)?,
        Output::Human => {
            let mut out = io::stdout().lock();
            for e in &entries {
                if long {
                    writeln!(out, "{}", long_line(e))?;
                } else {
                    writeln!(out, "{}", e.name)?;
                }
            }
        }
    }
    Ok(0)
}

fn long_line(e: &Entry) -> String {
    let mut s = format!(
        "{} {:>5} {:>5} {:>12} {} {}",
        mode_string(e.file_type, e.mode),
        e.uid,
        e.gid,
        e.size,
        format_time(e.mtime),
        e.name
    );
    if let Some(t) = &e.target {
        s.push_str(" -> ");
        s.push_str(t);
    }
    s
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
pub(crate) fn format_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (proleptic Gregorian), after Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub(crate) fn cat(args: &FsArgs, target: &str) -> Result<u8> {
    let t = parse_target(target, false, args.apple_store.is_some())?;
    let fs = open_fs(args, &t)?;
    let mut out = io::BufWriter::with_capacity(1 << 20, io::stdout().lock());
    fs.copy_file_to(&t.path, &mut out)
        .with_context(|| format!("in '{}'", t.image))?;
    out.flush()?;
    Ok(0)
}

pub(crate) fn stat(args: &FsArgs, output: Output, target: &str) -> Result<u8> {
    let t = parse_target(target, false, args.apple_store.is_some())?;
    let fs = open_fs(args, &t)?;
    let e = fs.stat(&t.path).with_context(|| format!("in '{}'", t.image))?;
    match output {
        Output::Json => super::fs::print_json(&e)?,
        Output::Human => {
            println!("  path: {}", e.path);
            println!("  type: {}", e.file_type);
            println!("  mode: {:04o} ({})", e.mode, mode_string(e.file_type, e.mode));
            println!("   uid: {}", e.uid);
            println!("   gid: {}", e.gid);
            println!("  size: {}", e.size);
            println!(
                " mtime: {} UTC ({}.{:09})",
                format_time(e.mtime),
                e.mtime,
                e.mtime_nsec
            );
            println!(" atime: {} UTC ({})", format_time(e.atime), e.atime);
            if let Some(c) = e.crtime {
                println!(" btime: {} UTC ({c})", format_time(c));
            }
            if let Some(target) = &e.target {
                println!("target: {target}");
            }
        }
    }
    Ok(0)
}

pub(crate) fn cp(args: &FsArgs, output: Output, src: &str, dest: &Path) -> Result<u8> {
    let t = parse_target(src, false, args.apple_store.is_some())?;
    let fs = open_fs(args, &t)?;
    let report = copy_out(&fs, &t.path, dest)
        .with_context(|| format!("cannot copy '{}' to '{}'", t.path, dest.display()))?;
    for s in &report.skipped {
        eprintln!("diskkit: warning: skipped special file {s}");
    }
    match output {
        Output::Json => super::fs::print_json(&report)?,
        Output::Human => {
            if report.dirs > 0 {
                eprintln!(
                    "copied {} files, {} directories, {} symlinks ({} bytes) to {}",
                    report.files,
                    report.dirs,
                    report.symlinks,
                    report.bytes,
                    report.dest.display()
                );
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = parse_target("/nonexistent/disk.img@2:/etc", false, false).unwrap();
        assert_eq!(t.image, "/nonexistent/disk.img");
        assert_eq!(t.partition.as_deref(), Some("2"));
        assert_eq!(t.path, "/etc");
        let t = parse_target("docker.io/library/alpine:latest:/etc/os-release", false, true).unwrap();
        assert_eq!(t.image, "docker.io/library/alpine:latest");
        assert_eq!(t.path, "/etc/os-release");
        let t = parse_target("disk.img", true, false).unwrap();
        assert_eq!(t.path, "/");
        assert!(parse_target("disk.img", false, false).is_err());
    }

    #[test]
    fn times() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(format_time(1_700_000_000), "2023-11-14 22:13:20");
    }
}
