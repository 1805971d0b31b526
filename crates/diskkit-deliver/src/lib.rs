//! diskkit-deliver: getting VM images to where they run.
//!
//! - [`bundle`]: taskcluster-worker's `image.tar.zst` bundles (a sparse RAW base, a qcow2
//!   overlay and a machine definition), made and read compatibly with GNU tar and zstd, and
//!   validated strictly on every read.
//! - [`http`]: a small synchronous HTTP(S) client with keep-alive, timeouts, retries with
//!   backoff, ranged and resumable downloads and progress callbacks, for every part of diskkit
//!   that fetches over the network.
//! - [`cache`]: a local cache of images that downloads each image once however many processes
//!   ask for it at the same time, hands out instances (a writable overlay on the shared base),
//!   tracks references and survives being killed at any moment.

pub mod bundle;
pub mod cache;
pub mod error;
mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod registry;
pub mod remote;
pub mod tart;

pub use error::{Error, ErrorKind, Result};
