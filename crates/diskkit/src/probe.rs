//! Format detection from magic numbers.
//!
//! Detection is a convenience for images you made or trust. A guest can write any bytes to
//! the start of a RAW disk, including another format's header; detection would then misread
//! the disk and may follow file names the guest chose. Pass the format explicitly
//! ([`crate::OpenOptions::format`]) for images guests have written to.

use crate::error::Result;
use crate::options::ImageFormat;
use crate::storage::Storage;

/// The qcow2 magic, `QFI\xfb`.
pub const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Guess the format of `storage` from its first bytes: ASIF and qcow2 by magic, RAW otherwise.
pub fn detect(storage: &dyn Storage) -> Result<ImageFormat> {
    let len = storage.len()?;
    if len < 4 {
        return Ok(ImageFormat::Raw);
    }
    let mut magic = [0u8; 4];
    storage.read_at(&mut magic, 0)?;
    Ok(match &magic {
        m if m == crate::formats::asif::MAGIC => ImageFormat::Asif,
        m if m == QCOW2_MAGIC => ImageFormat::Qcow2,
        _ => ImageFormat::Raw,
    })
}
