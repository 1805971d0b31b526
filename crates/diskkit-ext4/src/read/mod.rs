//! Reading images without mounting them: partition tables, ext2/3/4 filesystems (through
//! diskkit's own reader, `fs`), copying files out, finding the bootable kernel,
//! splitting UKIs, and resolving Apple `container` image stores.

pub mod apple_store;
pub mod entry;
pub mod extract;
pub mod fs;
#[doc(hidden)]
pub mod fuzzing;
pub mod kernel;
pub mod partition;
pub mod pe;
pub mod version;
pub mod volume;

pub use entry::Entry;
pub use partition::{read_partition_table, Partition, PartitionTable, PartitionType, TableKind};
pub use volume::{Filesystem, FsLocation, PartitionSelector};
