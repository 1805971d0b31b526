//! `diskkit ls`, `cat`, `stat` and `cp`: files inside an image's ext2/3/4 filesystem.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use diskkit::{DiskImage, ImageFormat, OpenOptions};
use diskkit_ext4::read::apple_store::{AppleStore, Platform};
use diskkit_ext4::read::entry::{mode_string, Entry};
use diskkit_ext4::read::extract::copy_out;
use diskkit_ext4::read::{Filesystem, PartitionSelector};

use super::open_image;
use crate::args::{DetachedArg, OpenArgs, Output, OutputArg, QuietArg};
use crate::messages::{count, done};

/// Where to find a filesystem: an image (with its partition) or an Apple `container` store.
#[derive(Debug, Clone, ClapArgs)]
pub(crate) struct FsArgs {
    #[command(flatten)]
    pub(crate) open: OpenArgs,
    #[command(flatten)]
    pub(crate) detached: DetachedArg,
    /// Partition to read: a number, a GPT partition name or UUID, an ext label or UUID, or
    /// `disk` for the whole disk (default: the whole disk if it holds ext, else the only ext
    /// partition). Same as IMAGE@PART.
    #[arg(long, value_name = "PART")]
    pub(crate) partition: Option<String>,
    /// Read from the Apple `container` image store at ROOT: the image argument is then an
    /// image reference (e.g. `alpine:latest`), resolved to its unpacked ext4 snapshot.
    #[arg(long, value_name = "ROOT")]
    pub(crate) apple_store: Option<PathBuf>,
    /// Platform for --apple-store as OS/ARCH[/VARIANT] (default: linux and the host's CPU).
    #[arg(long, requires = "apple_store", value_name = "OS/ARCH")]
    pub(crate) platform: Option<String>,
}

/// List a directory of the ext2/3/4 filesystem inside an image.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "List a directory of the ext2/3/4 filesystem inside any image diskkit opens \
                  (a stack too), without mounting, root or a VM. IMAGE@PART picks a partition; \
                  the path defaults to the root.",
    after_help = "\
Examples:
  # A long listing of /etc
  diskkit ls -l debian.qcow2:/etc
  # /boot on partition 2
  diskkit ls disk.raw@2:/boot
  # The root directory as JSON
  diskkit ls --output json root.asif:/"
)]
pub(crate) struct LsArgs {
    #[command(flatten)]
    fs: FsArgs,
    /// Long listing: type, mode, owner, size, modification time, symlink target.
    #[arg(short = 'l', long)]
    long: bool,
    #[command(flatten)]
    output: OutputArg,
    /// IMAGE[@PART][:/path] (the root when no path is given).
    #[arg(value_name = "IMAGE[@PART][:/PATH]")]
    target: String,
}

/// Write a file inside an image to stdout.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Write a file from the ext2/3/4 filesystem inside an image to stdout \
                  (symlinks are followed inside the image, never out of it).",
    after_help = "\
Examples:
  diskkit cat debian.qcow2:/etc/os-release
  diskkit cat disk.raw@2:/etc/fstab"
)]
pub(crate) struct CatArgs {
    #[command(flatten)]
    fs: FsArgs,
    /// IMAGE[@PART]:/path.
    #[arg(value_name = "IMAGE[@PART]:/PATH")]
    target: String,
}

/// Show the metadata of a file inside an image.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Show the type, mode, owner, size, times and symlink target of a file in the \
                  ext2/3/4 filesystem inside an image (a final symlink is not followed).",
    after_help = "\
Examples:
  diskkit stat debian.qcow2:/usr/bin/perl
  diskkit stat --output json root.asif:/etc/passwd"
)]
pub(crate) struct StatArgs {
    #[command(flatten)]
    fs: FsArgs,
    #[command(flatten)]
    output: OutputArg,
    /// IMAGE[@PART]:/path.
    #[arg(value_name = "IMAGE[@PART]:/PATH")]
    target: String,
}

/// Copy a file or a directory tree out of an image.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Copy a file or a whole directory tree out of the ext2/3/4 filesystem inside \
                  an image: modes (without setuid/setgid), symlinks as symlinks, modification \
                  times; holes stay holes. Built under a temporary name and renamed; never \
                  replaces anything and never writes outside DEST. An existing directory DEST \
                  receives the copy under its own name.",
    after_help = "\
Examples:
  # One file into the current directory
  diskkit cp debian.qcow2:/etc/os-release .
  # A whole tree
  diskkit cp root.asif:/etc etc-copy"
)]
pub(crate) struct CpArgs {
    #[command(flatten)]
    fs: FsArgs,
    #[command(flatten)]
    output: OutputArg,
    #[command(flatten)]
    quiet: QuietArg,
    /// IMAGE[@PART]:/path.
    #[arg(value_name = "IMAGE[@PART]:/PATH")]
    src: String,
    /// Destination on the host.
    dest: PathBuf,
}

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
    let options = args.open.options(false).detached(args.detached.detached);
    let image = Arc::new(open_image(&path, &options)?);
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

pub(crate) fn ls(a: &LsArgs) -> Result<u8> {
    let args = &a.fs;
    let t = parse_target(&a.target, true, args.apple_store.is_some())?;
    let fs = open_fs(args, &t)?;
    let entries = fs.list(&t.path).with_context(|| format!("in '{}'", t.image))?;
    match a.output.output {
        Output::Json => super::fs::print_json(&entries)?,
        Output::Human => {
            let mut out = io::stdout().lock();
            for e in &entries {
                if a.long {
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

pub(crate) fn cat(a: &CatArgs) -> Result<u8> {
    let args = &a.fs;
    let t = parse_target(&a.target, false, args.apple_store.is_some())?;
    let fs = open_fs(args, &t)?;
    let mut out = io::BufWriter::with_capacity(1 << 20, io::stdout().lock());
    fs.copy_file_to(&t.path, &mut out)
        .with_context(|| format!("in '{}'", t.image))?;
    out.flush()?;
    Ok(0)
}

pub(crate) fn stat(a: &StatArgs) -> Result<u8> {
    let args = &a.fs;
    let t = parse_target(&a.target, false, args.apple_store.is_some())?;
    let fs = open_fs(args, &t)?;
    let e = fs.stat(&t.path).with_context(|| format!("in '{}'", t.image))?;
    match a.output.output {
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

pub(crate) fn cp(a: &CpArgs) -> Result<u8> {
    let (args, src, dest) = (&a.fs, &a.src, &a.dest);
    let t = parse_target(src, false, args.apple_store.is_some())?;
    let fs = open_fs(args, &t)?;
    let report = copy_out(&fs, &t.path, dest)
        .with_context(|| format!("cannot copy '{}' to '{}'", t.path, dest.display()))?;
    for s in &report.skipped {
        eprintln!("diskkit: warning: skipped special file {s}");
    }
    match a.output.output {
        Output::Json => super::fs::print_json(&report)?,
        Output::Human => done(
            a.quiet.quiet,
            format_args!(
                "copied '{src}' to '{}': {}, {}, {}, {}",
                report.dest.display(),
                count(report.files, "file", "files"),
                count(report.dirs, "directory", "directories"),
                count(report.symlinks, "symlink", "symlinks"),
                crate::size::human_exact(report.bytes)
            ),
        ),
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
