//! An NBD (Network Block Device) server for diskkit images and stacks.
//!
//! [`Server`] listens on a Unix socket or a TCP address and serves [`Export`]s, each a shared
//! [`diskkit::DiskImage`]. The protocol engine is split by phase: [`handshake`] (fixed
//! newstyle option haggling), [`request`] (decoding and validating transmission requests,
//! free of I/O) and [`transmission`] (executing requests with a pool of workers, replies out of
//! order under one writer lock). Block status comes from the image's own mapping answers:
//! `base:allocation` and `qemu:allocation-depth`.

#![forbid(unsafe_code)]

mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod proto;
pub mod request;
mod server;
pub mod tls;
pub mod transmission;

pub use export::{CacheMode, Export, ServerConfig, SyncMode};
pub use server::{Address, Server, ShutdownHandle, Stream, HANDSHAKE_TIMEOUT};
pub use tls::TlsSettings;
