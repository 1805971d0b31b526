//! diskkit: create, open, stack, convert and inspect virtual-machine disk images.
//!
//! The core idea: a format driver ([`Layer`]) only answers *what is at this offset*
//! ([`Mapping`]: data stored here, zeroes, or absent from this layer), and one generic layer
//! ([`DiskImage`]) does the I/O and walks a stack of layers. The same answers feed allocation
//! maps ([`DiskImage::extents`]), sparse conversion and NBD block status.
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

#![forbid(unsafe_code)]

pub mod copy;
pub mod error;
pub mod formats;
#[doc(hidden)]
pub mod fuzzing;
mod image;
mod io;
pub mod layer;
pub mod mapping;
pub mod options;
pub mod output;
pub mod probe;
pub mod stack;
pub mod storage;

pub use error::{Error, ErrorKind, Result};
pub use image::{open_layer, DiskImage, LayerDescription, PendingImage};
pub use layer::{Layer, LayerInfo};
pub use mapping::{Extent, ExtentKind, Mapping};
pub use options::{CreateOptions, ImageFormat, LayerType, OpenMode, OpenOptions};
pub use stack::{LayerOptions, ParentPolicy};
