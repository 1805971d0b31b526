//! diskkit: create, open, stack, convert and inspect virtual-machine disk images.
//!
//! The core idea: a format driver ([`Layer`]) only answers *what is at this offset*
//! ([`Mapping`]: data stored here, zeroes, or absent from this layer), and one generic layer
//! ([`DiskImage`]) does the I/O and walks a stack of layers. The same answers feed allocation
//! maps ([`DiskImage::extents`]), sparse conversion and NBD block status.
//!
//! The modules form layers, each using only those before it: [`storage`] (and [`output`]) →
//! [`mapping`] → [`layer`] (the driver trait) → [`formats`] (one folder per format, one
//! registration) → [`stack`] → [`DiskImage`] → [`operations`] (whole-image operations).
//!
//! ```no_run
//! use diskkit::{CreateOptions, DiskImage, OpenOptions};
//!
//! # fn main() -> diskkit::Result<()> {
//! let image = DiskImage::create("disk.asif", &CreateOptions::asif(81920, 512))?;
//! image.write_at(b"hello", 0)?;
//! image.flush()?;
//! let image = DiskImage::open("disk.asif", &OpenOptions::new())?;
//! let mut buf = [0u8; 5];
//! image.read_at(&mut buf, 0)?;
//! assert_eq!(&buf, b"hello");
//! # Ok(())
//! # }
//! ```

#![deny(unsafe_code)]

pub mod error;
pub mod formats;
#[doc(hidden)]
pub mod fuzzing;
mod image;
pub mod layer;
pub mod mapping;
pub mod operations;
pub mod output;
pub mod stack;
pub mod storage;

pub use error::{Error, ErrorKind, Result};
pub use formats::{probe, CreateOptions};
pub use image::{DiskImage, PendingImage};
pub use layer::{ImageFormat, Layer, LayerInfo, LayerType, OpenMode};
pub use mapping::{Extent, ExtentKind, Mapping};
pub use operations::copy;
pub use stack::open::open_layer;
pub use stack::{LayerDescription, LayerOptions, OpenOptions, ParentPolicy, RebaseMode};
