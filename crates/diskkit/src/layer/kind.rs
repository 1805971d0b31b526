//! What kind of thing a layer is: its format, its role in a stack, how it is opened.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// An image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ImageFormat {
    /// A plain file holding the disk's bytes.
    Raw,
    /// Apple Sparse Image Format.
    Asif,
    /// QEMU copy-on-write version 2/3.
    Qcow2,
}

impl ImageFormat {
    /// The lowercase name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Asif => "asif",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ImageFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => Ok(ImageFormat::Raw),
            "asif" => Ok(ImageFormat::Asif),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(Error::invalid_argument(format!(
                "unknown image format '{other}' (expected raw, asif or qcow2)"
            ))),
        }
    }
}

/// How an image is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OpenMode {
    /// Reads only.
    #[default]
    ReadOnly,
    /// Reads and writes.
    ReadWrite,
}

impl OpenMode {
    /// `"read-only"` or `"read-write"`.
    pub fn name(self) -> &'static str {
        match self {
            OpenMode::ReadOnly => "read-only",
            OpenMode::ReadWrite => "read-write",
        }
    }

    /// Whether writes are allowed.
    pub fn is_writable(self) -> bool {
        self == OpenMode::ReadWrite
    }
}

impl fmt::Display for OpenMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The role of a layer in a stack (DiskImageKit's layer types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerType {
    /// Keeps blocks read from the layers beneath it.
    Cache,
    /// Keeps modifications (copy-on-write).
    Overlay,
}

impl LayerType {
    /// `"cache"` or `"overlay"`.
    pub fn name(self) -> &'static str {
        match self {
            LayerType::Cache => "cache",
            LayerType::Overlay => "overlay",
        }
    }
}

impl fmt::Display for LayerType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LayerType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cache" => Ok(LayerType::Cache),
            "overlay" => Ok(LayerType::Overlay),
            other => Err(Error::invalid_argument(format!(
                "unknown layer type '{other}' (expected cache or overlay)"
            ))),
        }
    }
}
