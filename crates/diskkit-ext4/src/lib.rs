//! ext4 (and ext2/3) filesystems inside diskkit images.
#![forbid(unsafe_code)]

mod crc;
pub mod read;
pub mod writer;
