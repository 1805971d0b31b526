//! `diskkit read`, `write`, `discard` and `resize`: raw access to the virtual disk.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::open_image;
use crate::args::OpenArgs;
use crate::size::{parse_size, parse_size_change, SizeChange};

const PIECE: usize = 1 << 20;

pub(crate) fn resize(open: &OpenArgs, path: &Path, size: &str) -> Result<u8> {
    let image = open_image(open, path, true)?;
    let old = image.size();
    let new = match parse_size_change(size)? {
        SizeChange::Absolute(n) => n,
        SizeChange::Grow(n) => old.checked_add(n).context("size too large")?,
        SizeChange::Shrink(n) => old
            .checked_sub(n)
            .filter(|&v| v > 0)
            .context("cannot shrink to zero or below")?,
    };
    image
        .resize(new)
        .with_context(|| format!("cannot resize '{}'", path.display()))?;
    image.flush()?;
    println!("Image resized.");
    Ok(0)
}

pub(crate) fn write(open: &OpenArgs, path: &Path, offset: &str, from: Option<&Path>) -> Result<u8> {
    let offset = parse_size(offset)?;
    let image = open_image(open, path, true)?;
    let mut input: Box<dyn Read> = match from {
        Some(p) => Box::new(File::open(p).with_context(|| format!("cannot open '{}'", p.display()))?),
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
                "input does not fit: it runs past the end of the disk ({} bytes)",
                image.size()
            );
        }
        image.write_at(&buf[..n], pos)?;
        pos += n as u64;
    }
    image.flush()?;
    Ok(0)
}

pub(crate) fn read(
    open: &OpenArgs,
    path: &Path,
    offset: &str,
    length: Option<&str>,
    to: Option<&Path>,
) -> Result<u8> {
    let offset = parse_size(offset)?;
    let image = open_image(open, path, false)?;
    let size = image.size();
    if offset > size {
        bail!("offset {offset} is past the end of the disk ({size} bytes)");
    }
    let length = match length {
        Some(l) => parse_size(l)?,
        None => size - offset,
    };
    if offset.checked_add(length).is_none_or(|end| end > size) {
        bail!("range {offset}+{length} runs past the end of the disk ({size} bytes)");
    }
    let mut output: Box<dyn Write> = match to {
        Some(p) => Box::new(File::create(p).with_context(|| format!("cannot create '{}'", p.display()))?),
        None => Box::new(io::stdout().lock()),
    };
    let mut buf = vec![0u8; PIECE];
    let mut pos = offset;
    let end = offset + length;
    while pos < end {
        let n = ((end - pos) as usize).min(PIECE);
        image.read_at(&mut buf[..n], pos)?;
        output.write_all(&buf[..n])?;
        pos += n as u64;
    }
    output.flush()?;
    Ok(0)
}

pub(crate) fn discard(open: &OpenArgs, path: &Path, offset: &str, length: &str) -> Result<u8> {
    let offset = parse_size(offset)?;
    let length = parse_size(length)?;
    let image = open_image(open, path, true)?;
    image.discard(offset, length)?;
    image.flush()?;
    Ok(0)
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
