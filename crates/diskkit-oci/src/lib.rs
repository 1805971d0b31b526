//! OCI images unpacked, layer by layer, into one merged ext4 root filesystem.
#![forbid(unsafe_code)]
