//! `diskkit read`, `write`, `discard` and `resize`: raw access to the virtual disk.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;

use super::open_image;
use crate::args::{DetachedArg, OpenArgs, QuietArg, RepairArg};
use crate::messages::{self, done};
use crate::size::{self, human, human_exact, whole_blocks, Bytes, SizeChange};

const PIECE: usize = 1 << 20;

/// Change an image's virtual size.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Change the virtual size of an image (the top layer of a stack sets the \
                  stack's size). Shrinking drops the data past the new end; the filesystem \
                  inside is not touched (grow it with resize2fs, shrink it first).",
    after_help = "\
Examples:
  # Grow by 10 GiB
  diskkit resize disk.qcow2 +10G
  # Set the size to 40 GiB
  diskkit resize disk.asif 40G
  # Shrink by 1 GiB
  diskkit resize disk.raw -1G"
)]
pub(crate) struct ResizeArgs {
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    repair: RepairArg,
    #[command(flatten)]
    quiet: QuietArg,
    /// The image.
    path: PathBuf,
    /// New size (40G), or a change (+10G, -1G).
    #[arg(allow_hyphen_values = true, value_parser = size::size_change, value_name = "SIZE|+SIZE|-SIZE")]
    size: SizeChange,
}

/// Write a file (or stdin) into the virtual disk at an offset.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Write a file's bytes (stdin by default) into the virtual disk at an offset, \
                  like `dd conv=notrunc`. Input that would run past the end of the disk is \
                  refused.",
    after_help = "\
Examples:
  # A file at 1 MiB
  diskkit write disk.qcow2 --offset 1M --from boot.bin
  # Stdin at byte 1024
  printf 'hello' | diskkit write disk.asif --offset 0x400"
)]
pub(crate) struct WriteArgs {
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    repair: RepairArg,
    #[command(flatten)]
    quiet: QuietArg,
    /// The image.
    path: PathBuf,
    /// Where to write in the virtual disk: bytes, 0x hex, or with a unit (1M).
    #[arg(long, default_value = "0", value_parser = size::bytes, allow_hyphen_values = true, value_name = "OFFSET")]
    offset: Bytes,
    /// Input file; stdin when omitted.
    #[arg(long, value_name = "FILE")]
    from: Option<PathBuf>,
}

/// Read from the virtual disk to a file (or stdout).
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Read bytes from the virtual disk (through the whole stack) to a file, or to \
                  stdout.",
    after_help = "\
Examples:
  # The first sector
  diskkit read disk.qcow2 --length 512 | xxd
  # 1 MiB at 1 MiB
  diskkit read vm.asif --offset 0x100000 --length 1M --to part.bin"
)]
pub(crate) struct ReadArgs {
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    detached: DetachedArg,
    /// The image.
    path: PathBuf,
    /// Where to start in the virtual disk: bytes, 0x hex, or with a unit (1M).
    #[arg(long, default_value = "0", value_parser = size::bytes, allow_hyphen_values = true, value_name = "OFFSET")]
    offset: Bytes,
    /// Number of bytes (default: to the end of the disk).
    #[arg(long, value_parser = size::bytes, allow_hyphen_values = true, value_name = "LENGTH")]
    length: Option<Bytes>,
    /// Output file; stdout when omitted.
    #[arg(long, value_name = "FILE")]
    to: Option<PathBuf>,
}

/// Discard a range of the virtual disk (it reads as zeroes afterwards).
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Discard a range of the virtual disk: it reads as zeroes afterwards and its \
                  space is released where the format allows (in an overlay, the range hides \
                  what lies beneath).",
    after_help = "\
Examples:
  diskkit discard disk.asif --offset 1G --length 512M
  diskkit discard vm.qcow2 --offset 0x100000 --length 0x100000"
)]
pub(crate) struct DiscardArgs {
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    repair: RepairArg,
    #[command(flatten)]
    quiet: QuietArg,
    /// The image.
    path: PathBuf,
    /// Start of the range: bytes, 0x hex, or with a unit.
    #[arg(long, value_parser = size::bytes, allow_hyphen_values = true, value_name = "OFFSET")]
    offset: Bytes,
    /// Length of the range.
    #[arg(long, value_parser = size::bytes, allow_hyphen_values = true, value_name = "LENGTH")]
    length: Bytes,
}

pub(crate) fn resize(a: &ResizeArgs) -> Result<u8> {
    let path = &a.path;
    let image = open_image(path, &a.open.options(true).repair(a.repair.repair))?;
    let old = image.size();
    let new = match a.size {
        SizeChange::Absolute(n) => n.value,
        SizeChange::Grow(n) => old.checked_add(n.value).context("the new size is too large")?,
        SizeChange::Shrink(n) => match old.checked_sub(n.value).filter(|&v| v > 0) {
            Some(v) => v,
            None => bail!(
                "cannot shrink '{}' by {}: it is only {old} bytes ({})",
                path.display(),
                human(n.value),
                human(old)
            ),
        },
    };
    let new = whole_blocks(new, image.block_size(), "the new size")?;
    image
        .resize(new)
        .with_context(|| format!("cannot resize '{}'", path.display()))?;
    image
        .flush()
        .with_context(|| format!("cannot resize '{}'", path.display()))?;
    done(
        a.quiet.quiet,
        format_args!(
            "resized '{}' ({}) from {} ({old} bytes) to {} ({new} bytes)",
            path.display(),
            image.format(),
            human(old),
            human(new)
        ),
    );
    Ok(crate::exit::SUCCESS)
}

pub(crate) fn write(a: &WriteArgs) -> Result<u8> {
    let path = &a.path;
    let offset = a.offset.value;
    let image = open_image(path, &a.open.options(true).repair(a.repair.repair))?;
    let mut input: Box<dyn Read> = match &a.from {
        Some(p) => {
            let f = File::open(p).with_context(|| format!("cannot open '{}'", p.display()))?;
            // A file's length is known: refuse before writing anything when it does not fit.
            let meta = f
                .metadata()
                .with_context(|| format!("cannot open '{}'", p.display()))?;
            if meta.is_file()
                && offset
                    .checked_add(meta.len())
                    .is_none_or(|end| end > image.size())
            {
                bail!(
                    "'{}' ({} bytes) does not fit in '{}' at offset {offset:#x}: the disk is {} \
                     bytes",
                    p.display(),
                    meta.len(),
                    path.display(),
                    image.size()
                );
            }
            Box::new(f)
        }
        None => Box::new(io::stdin().lock()),
    };
    let mut buf = vec![0u8; PIECE];
    let mut pos = offset;
    loop {
        let n = read_full(&mut input, &mut buf)?;
        if n == 0 {
            break;
        }
        if pos.checked_add(n as u64).is_none_or(|end| end > image.size()) {
            image.flush()?;
            bail!(
                "the input runs past the end of '{}' ({} bytes); the first {} bytes were written",
                path.display(),
                image.size(),
                pos - offset
            );
        }
        image
            .write_at(&buf[..n], pos)
            .with_context(|| format!("cannot write to '{}'", path.display()))?;
        pos += n as u64;
    }
    image
        .flush()
        .with_context(|| format!("cannot write to '{}'", path.display()))?;
    let n = pos - offset;
    done(
        a.quiet.quiet,
        format_args!(
            "wrote {} at offset {offset:#x} into {}",
            human_exact(n),
            messages::open_image(path, &image)
        ),
    );
    Ok(crate::exit::SUCCESS)
}

pub(crate) fn read(a: &ReadArgs) -> Result<u8> {
    let path = &a.path;
    let offset = a.offset.value;
    let image = open_image(path, &a.open.options(false).detached(a.detached.detached))?;
    let size = image.size();
    if offset > size {
        bail!(
            "offset {offset} is past the end of '{}' ({size} bytes)",
            path.display()
        );
    }
    let length = match a.length {
        Some(l) => l.value,
        None => size - offset,
    };
    if offset.checked_add(length).is_none_or(|end| end > size) {
        bail!(
            "offset {offset} + length {length} runs past the end of '{}' ({size} bytes)",
            path.display()
        );
    }
    let mut output: Box<dyn Write> = match &a.to {
        Some(p) => Box::new(File::create(p).with_context(|| format!("cannot create '{}'", p.display()))?),
        None => Box::new(io::stdout().lock()),
    };
    let mut buf = vec![0u8; PIECE];
    let mut pos = offset;
    let end = offset + length;
    while pos < end {
        let n = ((end - pos) as usize).min(PIECE);
        image
            .read_at(&mut buf[..n], pos)
            .with_context(|| format!("cannot read '{}'", path.display()))?;
        output.write_all(&buf[..n])?;
        pos += n as u64;
    }
    output.flush()?;
    Ok(crate::exit::SUCCESS)
}

pub(crate) fn discard(a: &DiscardArgs) -> Result<u8> {
    let path = &a.path;
    let (offset, length) = (a.offset.value, a.length.value);
    let image = open_image(path, &a.open.options(true).repair(a.repair.repair))?;
    image
        .discard(offset, length)
        .with_context(|| format!("cannot discard in '{}'", path.display()))?;
    image
        .flush()
        .with_context(|| format!("cannot discard in '{}'", path.display()))?;
    done(
        a.quiet.quiet,
        format_args!(
            "discarded {} at offset {offset:#x} in {}",
            human_exact(length),
            messages::open_image(path, &image)
        ),
    );
    Ok(crate::exit::SUCCESS)
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}
