//! Format detection from signatures.
//!
//! Detection is a convenience for images you made or trust. A guest can write any bytes to
//! the start of a RAW disk, including another format's header; detection would then misread
//! the disk and may follow file names the guest chose. Pass the format explicitly
//! (`OpenOptions::format`) for images guests have written to.

use crate::error::Result;
use crate::layer::ImageFormat;
use crate::storage::Storage;

/// The qcow2 magic, `QFI\xfb`.
pub const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// How many bytes from the start of a file detection looks at.
pub(crate) const HEAD_LEN: usize = 512;

/// Guess the format of `storage` from its first bytes: a registered format by its signature,
/// RAW otherwise.
pub fn detect(storage: &dyn Storage) -> Result<ImageFormat> {
    let len = storage.len()?;
    let mut head = vec![0u8; HEAD_LEN.min(usize::try_from(len).unwrap_or(HEAD_LEN))];
    storage.read_at(&mut head, 0)?;
    Ok(super::recognise(&head).unwrap_or(ImageFormat::Raw))
}
