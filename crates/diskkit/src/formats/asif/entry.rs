//! Table entries: a 55-bit chunk number and a 2-bit state.

use crate::error::{Error, Result};

/// Mask of the chunk number.
pub(super) const CHUNK_MASK: u64 = 0x007F_FFFF_FFFF_FFFF;
const STATE_SHIFT: u32 = 62;
const STATE_MASK: u64 = 0b11 << STATE_SHIFT;

/// The state of a data chunk (bits 63..62 of its entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChunkState {
    /// 00: never written; not present in this layer.
    Unwritten,
    /// 01: the whole chunk is data.
    Full,
    /// 10: unmapped (discarded); reads as zeroes.
    Zero,
    /// 11: only the blocks marked in the group's bitmap are data.
    Partial,
}

impl ChunkState {
    /// The state as messages name it.
    fn describe(self) -> &'static str {
        match self {
            ChunkState::Unwritten => "never written (00)",
            ChunkState::Full => "fully written (01)",
            ChunkState::Zero => "discarded (10)",
            ChunkState::Partial => "partially written (11)",
        }
    }
}

/// A data entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry(pub(super) u64);

impl Entry {
    pub(super) fn state(self) -> ChunkState {
        match self.0 >> STATE_SHIFT {
            0 => ChunkState::Unwritten,
            1 => ChunkState::Full,
            2 => ChunkState::Zero,
            _ => ChunkState::Partial,
        }
    }

    pub(super) fn chunk(self) -> u64 {
        self.0 & CHUNK_MASK
    }

    /// The same entry with a new state and chunk; reserved bits are kept.
    pub(super) fn with(self, state: ChunkState, chunk: u64) -> Entry {
        let bits = match state {
            ChunkState::Unwritten => 0u64,
            ChunkState::Full => 1,
            ChunkState::Zero => 2,
            ChunkState::Partial => 3,
        };
        Entry((self.0 & !(STATE_MASK | CHUNK_MASK)) | (bits << STATE_SHIFT) | (chunk & CHUNK_MASK))
    }

    /// Check the state/chunk combination and that the chunk lies in `[first, limit)`.
    pub(super) fn validate(self, first: u64, limit: u64) -> Result<()> {
        let chunk = self.chunk();
        match self.state() {
            ChunkState::Unwritten | ChunkState::Zero if chunk != 0 => Err(Error::corrupt(format!(
                "entry {:#018x} has state {} but names chunk {chunk}",
                self.0,
                self.state().describe()
            ))),
            ChunkState::Unwritten | ChunkState::Zero => Ok(()),
            ChunkState::Full | ChunkState::Partial if chunk < first || chunk >= limit => {
                Err(Error::corrupt(format!(
                    "entry {:#018x} names chunk {chunk}, outside the file's data chunks [{first}, {limit})",
                    self.0
                )))
            }
            ChunkState::Full | ChunkState::Partial => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_bits() {
        assert_eq!(Entry(0).state(), ChunkState::Unwritten);
        assert_eq!(Entry(1 << 62 | 5).state(), ChunkState::Full);
        assert_eq!(Entry(2 << 62).state(), ChunkState::Zero);
        assert_eq!(Entry(3 << 62 | 7).state(), ChunkState::Partial);
        assert_eq!(Entry(3 << 62 | 7).chunk(), 7);
    }

    #[test]
    fn with_keeps_reserved_bits() {
        let e = Entry(1 << 56).with(ChunkState::Full, 9);
        assert_eq!(e.0, 1 << 56 | 1 << 62 | 9);
    }

    #[test]
    fn validation() {
        assert!(Entry(0).validate(3, 10).is_ok());
        assert!(Entry(5).validate(3, 10).is_err()); // unwritten with a chunk
        assert!(Entry(2 << 62 | 4).validate(3, 10).is_err()); // zero with a chunk
        assert!(Entry(1 << 62 | 10).validate(3, 10).is_err()); // past the end
        assert!(Entry(1 << 62 | 2).validate(3, 10).is_err()); // inside chunk 0 area
        assert!(Entry(3 << 62).validate(3, 10).is_err()); // partial without chunk
        assert!(Entry(3 << 62 | 9).validate(3, 10).is_ok());
    }
}
