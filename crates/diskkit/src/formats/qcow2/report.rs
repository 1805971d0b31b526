//! What the consistency check reports, and how much a repair may change.

/// How much [`check()`](super::check()) may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Repair {
    /// Only look (`qemu-img check`).
    #[default]
    None,
    /// Lower refcounts that are higher than the use (`-r leaks`); nothing else changes.
    Leaks,
    /// Also raise refcounts that are too low, fix copied flags, and make table entries that
    /// point outside the file, are unaligned or point at metadata read as zeroes (`-r all`).
    All,
}

/// The kind of a [`Problem`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// A cluster's refcount is lower than the number of references to it (corruption).
    RefcountTooLow,
    /// A cluster's refcount is higher than its use (a leak).
    Leak,
    /// An entry's copied flag disagrees with its cluster's refcount.
    CopiedFlag,
    /// A reference to space one cluster or more past the end of the file.
    BeyondEnd,
    /// An offset that is not aligned as the format requires.
    Unaligned,
    /// A data cluster that is also metadata (header, L1 or L2 table, snapshot table).
    Overlap,
    /// A bad refcount table entry or a refcount block used for something else too.
    RefcountStructure,
    /// A table entry with reserved bits set.
    ReservedBits,
    /// More references than the image's refcount width can count.
    Overflow,
    /// A structure that could not be read or parsed (a check error, not a corruption).
    Unreadable,
}

impl ProblemKind {
    /// A stable lowercase name (used in JSON output).
    pub fn name(self) -> &'static str {
        match self {
            ProblemKind::RefcountTooLow => "refcount-too-low",
            ProblemKind::Leak => "leak",
            ProblemKind::CopiedFlag => "copied-flag",
            ProblemKind::BeyondEnd => "beyond-end",
            ProblemKind::Unaligned => "unaligned",
            ProblemKind::Overlap => "overlap",
            ProblemKind::RefcountStructure => "refcount-structure",
            ProblemKind::ReservedBits => "reserved-bits",
            ProblemKind::Overflow => "overflow",
            ProblemKind::Unreadable => "unreadable",
        }
    }
}

/// One inconsistency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What is wrong.
    pub kind: ProblemKind,
    /// The host (file) offset concerned.
    pub offset: u64,
    /// A sentence naming the structure, offsets and values.
    pub message: String,
}

impl Problem {
    /// Whether this is a leak (wasted space) rather than a corruption.
    pub fn is_leak(&self) -> bool {
        self.kind == ProblemKind::Leak
    }

    /// Whether this is a part that could not be checked rather than a corruption.
    pub fn is_check_error(&self) -> bool {
        self.kind == ProblemKind::Unreadable
    }
}

/// The outcome of a consistency check, with what a repair changed. Counts after a repair
/// describe the image as it is afterwards (the check runs again), like `qemu-img check -r`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruptions (in the image as it is now).
    pub corruptions: u64,
    /// Leaked clusters (in the image as it is now).
    pub leaks: u64,
    /// Parts that could not be checked (unreadable tables).
    pub check_errors: u64,
    /// Corruptions a repair fixed.
    pub corruptions_fixed: u64,
    /// Leaked clusters a repair freed.
    pub leaks_fixed: u64,
    /// The offset just past the last cluster in use or counted.
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters the active L1 table maps to host clusters (data, preallocated zero
    /// and compressed clusters).
    pub allocated_clusters: u64,
    /// Of those, compressed.
    pub compressed_clusters: u64,
    /// Of those, not directly after the previous allocated one of the same L2 table in the
    /// file, plus every compressed cluster (QEMU's definition).
    pub fragmented_clusters: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Whether the dirty bit is set (after any repair).
    pub dirty: bool,
    /// Whether the corrupt bit is set (after any repair).
    pub corrupt: bool,
    /// The problems found (the first 10,000), before any repair.
    pub problems: Vec<Problem>,
    /// Problems found but not kept in `problems`.
    pub problems_omitted: u64,
    /// The problems still there after a repair (empty without one).
    pub remaining: Vec<Problem>,
    /// What a repair changed, one sentence each.
    pub changes: Vec<String>,
}

impl CheckReport {
    /// No corruptions, no leaks, nothing unchecked.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
}
