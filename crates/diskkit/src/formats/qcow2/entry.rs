//! L1 and L2 table entries.

use crate::error::{Error, Result};

/// Set on L1 and standard L2 entries whose cluster has refcount 1 (may be written in place).
pub(super) const COPIED: u64 = 1 << 63;
/// Set on L2 entries of compressed clusters.
pub(super) const COMPRESSED: u64 = 1 << 62;
/// Set on version 3 L2 entries that read as zeroes.
pub(super) const ZERO: u64 = 1;
/// Host offset bits of L1 entries and standard L2 entries (9..=55).
pub(super) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits that must be zero in an L1 entry.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits that must be zero in a standard L2 entry.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// What an L2 entry says about one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum L2Entry {
    /// Not allocated: the cluster falls through to the backing file (zeroes without one).
    Unallocated,
    /// Reads as zeroes; `host` is kept (preallocated) when non-zero.
    Zero { host: u64, copied: bool },
    /// Stored at `host`; written in place only when `copied`.
    Data { host: u64, copied: bool },
    /// Compressed: `len` bytes from `host` hold the compressed cluster (at most; the end may
    /// be sector padding).
    Compressed { host: u64, len: u64 },
}

/// The geometry needed to decode entries.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub(super) cluster_bits: u32,
    pub(super) v3: bool,
}

impl Geometry {
    pub(super) fn cluster_size(self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table (one cluster).
    pub(super) fn l2_entries(self) -> u64 {
        self.cluster_size() / 8
    }

    /// Guest bytes covered by one L2 table.
    pub(super) fn l2_span(self) -> u64 {
        self.cluster_size() * self.l2_entries()
    }

    /// Decode an L2 entry (for guest cluster `guest`, named in errors).
    pub(super) fn decode(self, raw: u64, guest: u64) -> Result<L2Entry> {
        let cs = self.cluster_size();
        if raw & COMPRESSED != 0 {
            // x = 62 - (cluster_bits - 8): offset bits below, sector count above.
            let x = 62 - (self.cluster_bits - 8);
            let host = raw & ((1u64 << x) - 1);
            let sectors = ((raw & !COMPRESSED & !COPIED) >> x) + 1;
            if raw & COPIED != 0 {
                return Err(self.bad(raw, guest, "compressed entry with the copied flag"));
            }
            let len = (sectors * 512).saturating_sub(host & 511);
            return Ok(L2Entry::Compressed { host, len });
        }
        if raw & L2_RESERVED != 0 {
            return Err(self.bad(raw, guest, "reserved bits set"));
        }
        let host = raw & OFFSET_MASK;
        let copied = raw & COPIED != 0;
        if host % cs != 0 {
            return Err(self.bad(raw, guest, "host offset is not cluster aligned"));
        }
        if raw & ZERO != 0 {
            if !self.v3 {
                return Err(self.bad(raw, guest, "zero flag in a version 2 image"));
            }
            return Ok(L2Entry::Zero { host, copied });
        }
        if host == 0 {
            return Ok(L2Entry::Unallocated);
        }
        Ok(L2Entry::Data { host, copied })
    }

    /// Decode an L1 entry: the L2 table's host offset, or 0.
    pub(super) fn l2_offset(self, raw: u64, index: u64) -> Result<u64> {
        if raw & L1_RESERVED != 0 {
            return Err(Error::corrupt(format!(
                "qcow2 L1 entry {index} ({raw:#018x}) has reserved bits set"
            )));
        }
        let host = raw & OFFSET_MASK;
        if host % self.cluster_size() != 0 {
            return Err(Error::corrupt(format!(
                "qcow2 L1 entry {index} points to unaligned offset {host:#x}"
            )));
        }
        Ok(host)
    }

    fn bad(self, raw: u64, guest: u64, why: &str) -> Error {
        Error::corrupt(format!(
            "qcow2 L2 entry {raw:#018x} for guest cluster {guest}: {why}"
        ))
        .with_offset(guest.saturating_mul(self.cluster_size()))
    }
}

impl L2Entry {
    /// Host clusters (first, count) this entry holds a reference to.
    pub(super) fn host_clusters(self, cluster_bits: u32) -> Option<(u64, u64)> {
        match self {
            L2Entry::Data { host, .. } | L2Entry::Zero { host, .. } if host != 0 => {
                Some((host >> cluster_bits, 1))
            }
            L2Entry::Compressed { host, len } => {
                let first = host >> cluster_bits;
                let last = (host + len.max(1) - 1) >> cluster_bits;
                Some((first, last - first + 1))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        cluster_bits: 16,
        v3: true,
    };

    #[test]
    fn decodes_each_kind() {
        assert_eq!(G.decode(0, 0).unwrap(), L2Entry::Unallocated);
        assert_eq!(
            G.decode(COPIED | 0x30000, 0).unwrap(),
            L2Entry::Data {
                host: 0x30000,
                copied: true
            }
        );
        assert_eq!(
            G.decode(ZERO, 0).unwrap(),
            L2Entry::Zero {
                host: 0,
                copied: false
            }
        );
        // Compressed: x = 54; offset 0x30200, 2 sectors.
        let raw = COMPRESSED | (1 << 54) | 0x30200;
        assert_eq!(
            G.decode(raw, 0).unwrap(),
            L2Entry::Compressed {
                host: 0x30200,
                len: 1024
            }
        );
    }

    #[test]
    fn rejects_bad_entries() {
        assert!(G.decode(0x30100, 0).is_err()); // unaligned
        assert!(G.decode(1 << 57, 0).is_err()); // reserved
        let v2 = Geometry {
            cluster_bits: 16,
            v3: false,
        };
        assert!(v2.decode(ZERO, 0).is_err());
        assert!(G.l2_offset(0x1234, 0).is_err());
    }
}
