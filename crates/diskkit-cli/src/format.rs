//! Which format a new image gets: `-O/--format`, else the file name's extension, else RAW.
//!
//! The same rule for every command that writes an image (`create`, `convert`, `flatten`,
//! `layer create`, `unpack`), as `qemu-img` and `diskutil` users expect:
//!
//! | extension | format |
//! |---|---|
//! | `.qcow2` | qcow2 |
//! | `.asif` | ASIF |
//! | `.raw` | RAW |
//! | `.img` | RAW, unless `-O` says otherwise (`.img` is a generic disk-image name: Ubuntu's cloud images are qcow2 files named `.img`) |
//! | anything else, or none | RAW (`-O` to choose) |
//!
//! `-O` that contradicts `.qcow2`, `.asif` or `.raw` is an error: the file would be misnamed.

use std::path::Path;

use anyhow::{bail, Result};
use clap::ValueEnum;
use diskkit::ImageFormat;

/// An image format as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    // Undocumented variants: help lists them as `[possible values: raw, asif, qcow2]`.
    Raw,
    Asif,
    Qcow2,
}

impl From<Format> for ImageFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Raw => ImageFormat::Raw,
            Format::Asif => ImageFormat::Asif,
            Format::Qcow2 => ImageFormat::Qcow2,
        }
    }
}

/// The format when neither `-O` nor the extension names one.
pub(crate) const DEFAULT: ImageFormat = ImageFormat::Raw;

/// What a file name's extension says about its format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Named {
    /// `.qcow2`, `.asif`, `.raw`: this format and no other.
    Exactly(ImageFormat),
    /// `.img`: RAW by default, any format on request.
    Generic,
    /// No extension diskkit knows.
    Unknown,
}

fn named(path: &Path) -> Named {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("qcow2") => Named::Exactly(ImageFormat::Qcow2),
        Some("asif") => Named::Exactly(ImageFormat::Asif),
        Some("raw") => Named::Exactly(ImageFormat::Raw),
        Some("img") => Named::Generic,
        _ => Named::Unknown,
    }
}

/// The format of a new image at `path`: `flag` (`-O`), else the extension, else [`DEFAULT`].
pub(crate) fn for_output(flag: Option<Format>, path: &Path) -> Result<ImageFormat> {
    let flag: Option<ImageFormat> = flag.map(Into::into);
    match (flag, named(path)) {
        (Some(f), Named::Exactly(e)) if f != e => {
            let name = path.display();
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default();
            bail!(
                "'-O {f}' contradicts the name '{name}' (a .{ext} file is {e}); name the file \
                 .{f}, or leave out -O"
            )
        }
        (Some(f), _) => Ok(f),
        (None, Named::Exactly(e)) => Ok(e),
        (None, Named::Generic | Named::Unknown) => Ok(DEFAULT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_decides() {
        let f = |p: &str| for_output(None, Path::new(p)).unwrap();
        assert_eq!(f("a.qcow2"), ImageFormat::Qcow2);
        assert_eq!(f("dir/a.QCOW2"), ImageFormat::Qcow2);
        assert_eq!(f("a.asif"), ImageFormat::Asif);
        assert_eq!(f("a.raw"), ImageFormat::Raw);
        assert_eq!(f("a.img"), ImageFormat::Raw);
        assert_eq!(f("a"), ImageFormat::Raw);
        assert_eq!(f("a.ext4"), ImageFormat::Raw);
    }

    #[test]
    fn flag_decides_where_the_name_does_not() {
        let f = |o, p: &str| for_output(Some(o), Path::new(p));
        assert_eq!(f(Format::Qcow2, "a.img").unwrap(), ImageFormat::Qcow2);
        assert_eq!(f(Format::Asif, "a").unwrap(), ImageFormat::Asif);
        assert_eq!(f(Format::Qcow2, "a.qcow2").unwrap(), ImageFormat::Qcow2);
        let e = f(Format::Qcow2, "a.asif").unwrap_err().to_string();
        assert_eq!(
            e,
            "'-O qcow2' contradicts the name 'a.asif' (a .asif file is asif); name the file \
             .qcow2, or leave out -O"
        );
        assert!(f(Format::Raw, "a.qcow2").is_err());
    }
}
