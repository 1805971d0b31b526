//! Format drivers, and the one place that registers them.
//!
//! Each format lives in its own folder and provides a [`FormatDriver`]; [`DRIVERS`] lists them.
//! Everything else (detection, opening, creating) goes through that list, so adding a format
//! is a folder, its [`ImageFormat`] variant and one line in [`DRIVERS`].

pub mod asif;
mod options;
pub mod probe;
pub mod qcow2;
pub mod raw;

use std::sync::Arc;

pub use self::options::{CreateOptions, DEFAULT_CHUNK_SIZE};
use crate::error::Result;
use crate::layer::{Access, ImageFormat, Layer};
use crate::storage::Storage;

/// How to open one layer, beyond its storage.
pub(crate) struct LayerOpen<'a> {
    /// Whether the layer is to be writable (see [`Access`]).
    pub(crate) access: &'a Access<'a>,
    /// The block size a RAW image reports (RAW files do not record one).
    pub(crate) raw_block_size: u32,
    /// Repair a qcow2 image with the dirty or corrupt bit before opening it.
    pub(crate) repair: bool,
}

/// One format: how to recognise, open and create it.
pub(crate) trait FormatDriver: Sync {
    /// The format this driver handles.
    fn format(&self) -> ImageFormat;

    /// Whether `head` (the first bytes of a file, at least 512 where the file has them)
    /// carries this format's signature. RAW has none and never matches.
    fn recognises(&self, head: &[u8]) -> bool;

    /// Open the image on `storage`.
    fn open(&self, storage: Arc<dyn Storage>, how: &LayerOpen<'_>) -> Result<Arc<dyn Layer>>;

    /// Create a new image on empty `storage`.
    fn create(&self, storage: Arc<dyn Storage>, options: &CreateOptions) -> Result<Arc<dyn Layer>>;
}

/// Every format diskkit reads and writes, in detection order.
static DRIVERS: [&dyn FormatDriver; 3] = [&asif::DRIVER, &qcow2::DRIVER, &raw::DRIVER];

/// The driver of `format`.
pub(crate) fn driver(format: ImageFormat) -> &'static dyn FormatDriver {
    DRIVERS
        .iter()
        .copied()
        .find(|d| d.format() == format)
        .unwrap_or(&raw::DRIVER)
}

/// The registered format whose signature `head` carries.
pub(crate) fn recognise(head: &[u8]) -> Option<ImageFormat> {
    DRIVERS.iter().find(|d| d.recognises(head)).map(|d| d.format())
}

/// Open the layer on `storage` as `format`, or as the format detected from its contents.
pub(crate) fn open(
    storage: Arc<dyn Storage>,
    format: Option<ImageFormat>,
    how: &LayerOpen<'_>,
) -> Result<Arc<dyn Layer>> {
    let format = match format {
        Some(f) => f,
        None => probe::detect(&*storage)?,
    };
    driver(format).open(storage, how)
}

/// Create a new image on empty `storage`.
pub(crate) fn create(storage: Arc<dyn Storage>, options: &CreateOptions) -> Result<Arc<dyn Layer>> {
    options.validate()?;
    driver(options.format).create(storage, options)
}
