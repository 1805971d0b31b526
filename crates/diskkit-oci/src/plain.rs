//! Inputs that are one layer themselves, not an image: what a file's first bytes say about
//! it, and whether a compressed tarball is really a compressed image archive (which must not be
//! unpacked as if it were a root filesystem).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use diskkit::{Error, Result};

use crate::source::normalize;

/// What the first bytes of a file say.
pub(crate) enum Sniffed {
    /// gzip or zstd, which layers may be.
    Compressed(&'static str),
    /// A compression layers may not use.
    Unsupported(&'static str),
    /// Anything else (a tar archive, or not).
    Other,
}

pub(crate) fn sniff(path: &Path) -> Result<Sniffed> {
    let mut magic = [0u8; 6];
    let mut f =
        File::open(path).map_err(|e| Error::io(e).with_path(path).with_operation("opening the input"))?;
    let mut n = 0;
    while n < magic.len() {
        match f.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(e).with_path(path)),
        }
    }
    let m = &magic[..n];
    Ok(if m.starts_with(&[0x1f, 0x8b]) {
        Sniffed::Compressed("gzip")
    } else if m.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Sniffed::Compressed("zstd")
    } else if m.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Sniffed::Unsupported("xz")
    } else if m.starts_with(b"BZh") {
        Sniffed::Unsupported("bzip2")
    } else {
        Sniffed::Other
    })
}

/// Whether a compressed tarball is an image archive (a compressed `docker save` or OCI
/// archive) rather than a root filesystem: looks at the names of its first entries, within the
/// first 32 MiB of its content.
pub(crate) fn compressed_image_archive(path: &Path, what: &str) -> Result<bool> {
    let f = File::open(path).map_err(|e| Error::io(e).with_path(path))?;
    let f = std::io::BufReader::new(f);
    let decoded: Box<dyn Read> = if what == "gzip" {
        Box::new(flate2::bufread::MultiGzDecoder::new(f))
    } else {
        Box::new(zstd::stream::read::Decoder::with_buffer(f).map_err(|e| Error::io(e).with_path(path))?)
    };
    let mut archive = tar::Archive::new(decoded.take(32 << 20));
    let Ok(entries) = archive.entries() else {
        return Ok(false);
    };
    for entry in entries.take(16) {
        let Ok(entry) = entry else { break };
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some(name) = normalize(&name) else { continue };
        if matches!(
            name.as_str(),
            "index.json" | "manifest.json" | "oci-layout" | "repositories"
        ) || name.starts_with("blobs/")
        {
            return Ok(true);
        }
    }
    Ok(false)
}
