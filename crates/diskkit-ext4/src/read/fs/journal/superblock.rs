//! The jbd2 journal superblock (big-endian, journal block 0).

use diskkit::{Error, Result};

use super::super::bytes::{be32, slice};
use super::{BLOCK_COMMIT, BLOCK_DESCRIPTOR, BLOCK_REVOKE, JBD2_MAGIC};
use crate::crc::crc32c;

const SB_V1: u32 = 3;
const SB_V2: u32 = 4;

pub(crate) const COMPAT_CHECKSUM: u32 = 0x1;
pub(crate) const INCOMPAT_REVOKE: u32 = 0x1;
pub(crate) const INCOMPAT_64BIT: u32 = 0x2;
pub(crate) const INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
pub(crate) const INCOMPAT_CSUM_V2: u32 = 0x8;
pub(crate) const INCOMPAT_CSUM_V3: u32 = 0x10;
pub(crate) const INCOMPAT_FAST_COMMIT: u32 = 0x20;
const KNOWN_INCOMPAT: u32 = INCOMPAT_REVOKE
    | INCOMPAT_64BIT
    | INCOMPAT_ASYNC_COMMIT
    | INCOMPAT_CSUM_V2
    | INCOMPAT_CSUM_V3
    | INCOMPAT_FAST_COMMIT;
const CRC32C_CHKSUM: u8 = 4;
const DEFAULT_FAST_COMMIT_BLOCKS: u32 = 256;
pub(crate) const MIN_JOURNAL_BLOCKS: u32 = 1024;

#[derive(Debug, Clone)]
pub(crate) struct JournalSuperblock {
    pub(crate) block_size: u32,
    pub(crate) maxlen: u32,
    pub(crate) first: u32,
    pub(crate) sequence: u32,
    pub(crate) start: u32,
    pub(crate) compat: u32,
    pub(crate) incompat: u32,
    pub(crate) num_fc_blocks: u32,
    /// `crc32c(~0, uuid)` when csum v2/v3 is on.
    pub(crate) csum_seed: u32,
}

fn bad(what: impl Into<String>) -> Error {
    Error::corrupt(what).with_operation("loading the journal")
}

impl JournalSuperblock {
    /// Parse and check the journal superblock the way e2fsck loads it.
    pub(crate) fn parse(b: &[u8]) -> Result<JournalSuperblock> {
        if be32(b, 0) != JBD2_MAGIC {
            return Err(bad("the journal superblock has no jbd2 magic number"));
        }
        let version = be32(b, 4);
        let v2 = match version {
            SB_V1 => false,
            SB_V2 => true,
            BLOCK_DESCRIPTOR | BLOCK_COMMIT | BLOCK_REVOKE => {
                return Err(bad("the journal superblock is a log block"))
            }
            other => {
                return Err(Error::unsupported(format!(
                    "unknown journal superblock version {other}"
                )))
            }
        };
        let (compat, incompat, ro) = if v2 {
            (be32(b, 0x24), be32(b, 0x28), be32(b, 0x2C))
        } else {
            (0, 0, 0)
        };
        if v2 && be32(b, 0x40) > 1 {
            return Err(Error::unsupported("the journal is shared by several filesystems"));
        }
        if incompat & !KNOWN_INCOMPAT != 0 || ro != 0 {
            return Err(Error::unsupported(format!(
                "the journal uses unknown features (incompatible 0x{:x}, read-only 0x{ro:x})",
                incompat & !KNOWN_INCOMPAT
            )));
        }
        let v2or3 = incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0;
        if incompat & INCOMPAT_CSUM_V2 != 0 && incompat & INCOMPAT_CSUM_V3 != 0 {
            return Err(bad("the journal claims both checksum versions 2 and 3"));
        }
        if v2or3 && compat & COMPAT_CHECKSUM != 0 {
            return Err(bad("the journal claims both checksum versions 1 and 2/3"));
        }
        let mut csum_seed = 0;
        if v2or3 {
            let kind = b.get(0x50).copied().unwrap_or(0);
            if kind != CRC32C_CHKSUM {
                return Err(bad(format!("journal checksum type {kind} is not crc32c (4)")));
            }
            let mut copy = b.get(..1024).unwrap_or_default().to_vec();
            if let Some(f) = copy.get_mut(0xFC..0x100) {
                f.fill(0);
            }
            let computed = crc32c(!0, &copy);
            let stored = be32(b, 0xFC);
            if computed != stored {
                return Err(bad(format!(
                    "journal superblock checksum mismatch (stored 0x{stored:08x}, computed 0x{computed:08x})"
                )));
            }
            csum_seed = crc32c(!0, slice(b, 0x30, 16).unwrap_or_default());
        }
        let num_fc = be32(b, 0x54);
        Ok(JournalSuperblock {
            block_size: be32(b, 0xC),
            maxlen: be32(b, 0x10),
            first: be32(b, 0x14),
            sequence: be32(b, 0x18),
            start: be32(b, 0x1C),
            compat,
            incompat,
            num_fc_blocks: if num_fc == 0 {
                DEFAULT_FAST_COMMIT_BLOCKS
            } else {
                num_fc
            },
            csum_seed,
        })
    }

    pub(crate) fn has(&self, f: u32) -> bool {
        self.incompat & f != 0
    }

    pub(crate) fn csum_v2or3(&self) -> bool {
        self.has(INCOMPAT_CSUM_V2) || self.has(INCOMPAT_CSUM_V3)
    }

    /// Bytes of a descriptor block tag.
    pub(crate) fn tag_bytes(&self) -> usize {
        if self.has(INCOMPAT_CSUM_V3) {
            return 16;
        }
        let mut sz = 12;
        if self.has(INCOMPAT_CSUM_V2) {
            sz = 14;
        }
        if self.has(INCOMPAT_64BIT) {
            sz
        } else {
            sz.saturating_sub(4)
        }
    }
}
