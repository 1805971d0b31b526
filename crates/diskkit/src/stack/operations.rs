//! Whole-stack operations on an open stack: snapshot, restore, commit and rebase.

/// What a commit or rebase did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Bytes of data copied.
    pub data_bytes: u64,
    /// Bytes made to read as zeroes.
    pub zero_bytes: u64,
}
