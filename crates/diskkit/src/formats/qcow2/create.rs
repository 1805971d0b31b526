//! Creating qcow2 images.

use super::header::{self, NewHeader, MAX_L1_BYTES};
use super::layer_ext::LayerExt;
use super::refcount::Refcounts;
use crate::error::{Error, Result};
use crate::layer::ImageFormat;
use crate::storage::Storage;

/// QEMU's default cluster size.
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 << 10;

/// How to create a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size: a power of two from 512 B to 2 MiB.
    pub cluster_size: u32,
    /// The backing file name to record (not opened), relative to the new image or absolute.
    pub backing_file: Option<String>,
    /// The backing file's format to record.
    pub backing_format: Option<ImageFormat>,
}

impl Qcow2CreateOptions {
    /// A standalone image of `size` bytes with 64 KiB clusters.
    pub fn new(size: u64) -> Self {
        Qcow2CreateOptions {
            size,
            cluster_size: DEFAULT_CLUSTER_SIZE,
            backing_file: None,
            backing_format: None,
        }
    }
}

/// Write a new, empty image to `storage` (which must be empty).
///
/// Layout: header in cluster 0, refcount table in cluster 1, its first block in cluster 2,
/// then the L1 table (zeroed), as `qemu-img create` lays it out.
pub(super) fn write_new(storage: &dyn Storage, o: &Qcow2CreateOptions) -> Result<()> {
    let cs = u64::from(o.cluster_size);
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::invalid_argument(format!(
            "qcow2 cluster size must be a power of two from 512 to 2097152 bytes, not {cs}"
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    if o.size == 0 {
        return Err(Error::invalid_argument("qcow2 size must be greater than zero"));
    }
    let l2_span = cs * (cs / 8);
    let l1_entries = o.size.div_ceil(l2_span);
    if l1_entries * 8 > MAX_L1_BYTES {
        return Err(Error::invalid_argument(format!(
            "{} bytes is too large for a qcow2 image with {cs}-byte clusters",
            o.size
        )));
    }
    if o.backing_format.is_some() && o.backing_file.is_none() {
        return Err(Error::invalid_argument("a backing format needs a backing file"));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let mut refs = Refcounts::new_image(cluster_bits, 1, 2, 3);
    let l1_start = refs.alloc_counted(l1_clusters)?;
    // A table that grew while counting the L1 leaves its first copy unused: release it.
    refs.apply_deferred()?;
    let fmt = o.backing_format.map(ImageFormat::name);
    let bytes = header::build(&NewHeader {
        cluster_bits,
        size: o.size,
        l1_size: l1_entries as u32,
        l1_table_offset: l1_start * cs,
        refcount_table_offset: refs.table_offset,
        refcount_table_clusters: refs.table_clusters as u32,
        backing: o.backing_file.as_deref().map(|b| (b, fmt)),
        layer_ext: Some(LayerExt::new().encode()),
    })?;
    storage.set_len(refs.end_cluster() * cs)?;
    refs.write_blocks(storage)?;
    refs.write_table(storage)?;
    storage.write_at(&bytes, 0)?;
    storage.sync()
}
