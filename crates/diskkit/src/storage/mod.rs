//! Byte storage under an image: a file, or memory in tests.
//!
//! Everything is positional (`read_at`/`write_at` on `&self`), so one storage can be shared by
//! many threads without a seek position.

mod file;
mod lock;
mod mem;

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

pub use file::FileStorage;
pub use lock::{Perm, Permissions};
pub use mem::{Fault, MemStorage};

use crate::error::Result;

/// What a range of storage holds, as far as the storage knows (`SEEK_DATA`/`SEEK_HOLE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageExtent {
    /// `true` for a hole (reads as zeroes, no space allocated).
    pub hole: bool,
    /// Where this extent ends (exclusive), at most the storage length.
    pub end: u64,
}

/// Positional byte storage. Implementations must be safe to share across threads.
pub trait Storage: Send + Sync + Debug {
    /// The current length in bytes.
    fn len(&self) -> Result<u64>;

    /// Whether the storage is empty.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Fill `buf` from `offset`. Reading past the end is an error (`Corrupt`: truncated).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Write all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Set the length; growing adds a hole that reads as zeroes.
    fn set_len(&self, len: u64) -> Result<()>;

    /// Make `[offset, offset + len)` read as zeroes and release its space where possible.
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()>;

    /// Make `[offset, offset + len)` read as zeroes, keeping (or allocating) its space.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    /// Make every write completed so far durable.
    fn sync(&self) -> Result<()>;

    /// The data or hole extent that starts at `offset` (which must be below `len()`).
    /// The default reports everything as data.
    fn extent(&self, offset: u64) -> Result<StorageExtent> {
        let _ = offset;
        Ok(StorageExtent {
            hole: false,
            end: self.len()?,
        })
    }

    /// The first offset at or after `offset` that may hold data (`SEEK_DATA`), or `None` when
    /// no data follows. Cheaper than [`Storage::extent`] because it does not look for where the
    /// data ends. The default says data starts at `offset`.
    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        Ok(Some(offset))
    }

    /// Bytes of space allocated to the storage, if the backend knows.
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// The size of the pieces in which this storage is best read, when reading it costs far
    /// more than reading a local file (a remote object: one request per piece). A cache layer
    /// above such a storage fills in whole pieces, so that one small read fetches and keeps a
    /// useful amount. `None` (the default) for local storage.
    fn fetch_unit(&self) -> Option<u64> {
        None
    }

    /// The path of the file behind this storage, if there is one.
    fn path(&self) -> Option<&Path> {
        None
    }

    /// Whether writes are refused.
    fn read_only(&self) -> bool {
        false
    }

    /// Change what this storage's image lock holds and shares (QEMU's lock bytes on files,
    /// see [`Permissions`]); fails with [`crate::ErrorKind::Locked`] when another open
    /// conflicts, keeping the old permissions. Storages without locks accept anything.
    fn set_permissions(&self, perms: Permissions) -> Result<()> {
        let _ = perms;
        Ok(())
    }

    /// The permissions this storage's image lock holds, if it has one.
    fn permissions(&self) -> Option<Permissions> {
        None
    }

    /// The same storage opened again, writable or read-only, sharing this one's lock. Used to
    /// make a parent writable (a cache layer, the target of a commit) and a top read-only (a
    /// frozen snapshot) without ever letting go of the lock.
    fn reopen(&self, writable: bool) -> Result<Arc<dyn Storage>> {
        let _ = writable;
        Err(crate::error::Error::unsupported(
            "this storage cannot be opened again",
        ))
    }
}

/// Writes `len` zero bytes at `offset` with plain writes, in bounded pieces.
pub(crate) fn write_zero_bytes(storage: &dyn Storage, mut offset: u64, len: u64) -> Result<()> {
    const PIECE: usize = 1 << 20;
    let zeroes = vec![0u8; PIECE.min(usize::try_from(len).unwrap_or(PIECE))];
    let end = offset.saturating_add(len);
    while offset < end {
        let n = usize::try_from(end - offset).map_or(zeroes.len(), |r| r.min(zeroes.len()));
        storage.write_at(&zeroes[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

/// Whether every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(64);
    let all_blocks = blocks.by_ref().all(|block| {
        // OR eight words at a time; the compiler vectorises this.
        block.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
        }) == 0
    });
    all_blocks && blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 1000]));
        for i in 0..200 {
            let mut v = vec![0u8; 200];
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
        }
    }
}
