//! What a layer holds at an offset: the one answer every format gives.
//!
//! A format driver does no data I/O of its own for plain data: asked about a guest offset it
//! answers with a [`Mapping`] and the length over which that answer holds. The generic code in
//! [`crate::DiskImage`] reads and writes the layer's storage from that answer, walks down a stack
//! of layers on [`Mapping::Absent`], and reports the same answers as allocation maps (the `map`
//! command, sparse conversion and NBD block status).

/// What one layer holds for a run of guest bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Stored in this layer's storage, starting at `host_offset`.
    Data {
        /// Byte offset in the layer's storage.
        host_offset: u64,
    },
    /// Reads as zeroes; in a stack, hides what lies below.
    Zero,
    /// Not present in this layer: reads fall through to the layer below (zeroes when there is
    /// none).
    Absent,
    /// Stored in a form only the driver can decode (compressed clusters): read it with
    /// [`crate::layer::Layer::read_special`].
    Special,
}

/// The status of a run of the virtual disk as seen through a whole stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset where the run starts.
    pub offset: u64,
    /// Length of the run in bytes.
    pub length: u64,
    /// What the run is.
    pub kind: ExtentKind,
    /// Which layer answered: 0 when no layer holds the run, 1 for the top layer, 2 for the
    /// layer below it, and so on (`qemu:allocation-depth`).
    pub depth: u32,
    /// Where the data starts in that layer's storage, for [`ExtentKind::Data`] runs stored
    /// plainly.
    pub host_offset: Option<u64>,
}

/// The kind of an [`Extent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Stored data (may still happen to contain zeroes).
    Data,
    /// Reads as zeroes because a layer says so.
    Zero,
    /// No layer holds it; reads as zeroes.
    Absent,
}

impl Extent {
    /// Whether the run is known to read as zeroes.
    pub fn reads_as_zero(&self) -> bool {
        !matches!(self.kind, ExtentKind::Data)
    }

    /// The end of the run (exclusive).
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// Whether `next` continues this run with the same status (and contiguous host offsets).
    pub fn can_merge(&self, next: &Extent) -> bool {
        self.end() == next.offset
            && self.kind == next.kind
            && self.depth == next.depth
            && match (self.host_offset, next.host_offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
                _ => false,
            }
    }
}
