//! A one-shot ext4 writer: a finished [`Tree`] in, a complete filesystem out.
//!
//! Layout (4 KiB blocks): block 0 holds the superblock, the group descriptors follow, then
//! every group's block bitmap, every inode bitmap and every inode table (`flex_bg` lets them
//! sit anywhere), then data: for each inode in number order its data blocks, its extent-tree
//! blocks and its xattr block. File data the caller already wrote into the image
//! ([`ContentSource::placed`], from [`reserved_blocks`] on) stays where it is, and the rest is
//! allocated first-fit around it. The block bitmaps record exactly the blocks used.
//! No backup superblocks (`sparse_super2` with no backup groups); an internal journal
//! ([`Options::journal`]) and checksums (`metadata_csum`) on request.
//!
//! Features: `ext_attr`, `dir_index` (directories stay linear), `sparse_super2`; `filetype`,
//! `extents`, `flex_bg`; `sparse_super`, `large_file`, `huge_file`, `dir_nlink`, `extra_isize`.

mod alloc;
mod checksum;
mod dir;
mod extent;
mod geometry;
mod inode;
mod journal;
mod plan;
mod superblock;
mod tree;
mod xattr;

use diskkit::{DiskImage, Error, Result};

pub use geometry::reserved_blocks;
pub use tree::{ContentSource, Metadata, Node, NodeId, NodeKind, PlacedRun, Timestamp, Tree};

/// Filesystem block size.
pub const BLOCK_SIZE: usize = 4096;
/// On-disk inode size.
pub(crate) const INODE_SIZE: usize = 256;
pub(crate) const INODES_PER_BLOCK: u64 = (BLOCK_SIZE / INODE_SIZE) as u64;
pub(crate) const BLOCKS_PER_GROUP: u64 = 32768;
pub(crate) const ROOT_INO: u32 = 2;
pub(crate) const FIRST_INO: u32 = 11;

/// How to build the filesystem.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Exact filesystem size in bytes (rounded down to 4 KiB); `None` for compact.
    pub size: Option<u64>,
    /// Filesystem UUID.
    pub uuid: [u8; 16],
    /// Seed of the directory-hash function.
    pub hash_seed: [u8; 16],
    /// Creation/write time recorded in the superblock and on the added `lost+found`.
    pub time: i64,
    /// Volume label (at most 16 bytes are kept).
    pub label: Vec<u8>,
    /// Enable `metadata_csum`: crc32c over the superblock, descriptors, bitmaps, inodes,
    /// extent, directory and xattr blocks.
    pub metadata_csum: bool,
    /// Add an internal journal (inode 8, `has_journal`): 4 MiB below 128 MiB, 16 MiB below
    /// 1 GiB, 64 MiB above, in one contiguous run that stays a hole until the kernel writes
    /// to it. For root filesystems that are mounted read-write and may be stopped hard.
    pub journal: bool,
}

/// A tree laid out as an ext4 filesystem, ready to be written.
#[derive(Debug)]
pub struct Plan<'t> {
    tree: &'t Tree,
    options: Options,
    layout: plan::Layout,
}

impl<'t> Plan<'t> {
    /// Lay out `tree`: assign inodes and blocks and choose the geometry.
    pub fn new(tree: &'t Tree, options: Options) -> Result<Plan<'t>> {
        let layout = plan::plan(tree, &options, None)?;
        Ok(Plan {
            tree,
            options,
            layout,
        })
    }

    /// Like [`Plan::new`], asking `source` which parts of each file hold data
    /// ([`ContentSource::data_ranges`]): the rest become holes, using no blocks.
    pub fn new_sparse(tree: &'t Tree, options: Options, source: &mut dyn ContentSource) -> Result<Plan<'t>> {
        let layout = plan::plan(tree, &options, Some(source))?;
        Ok(Plan {
            tree,
            options,
            layout,
        })
    }

    /// Size of the filesystem in bytes: the image must be at least this large.
    pub fn size_bytes(&self) -> u64 {
        self.layout.geometry.total_blocks * BLOCK_SIZE as u64
    }

    /// Number of inodes in use (including the reserved ones).
    pub fn inodes_used(&self) -> u64 {
        u64::from(FIRST_INO) + self.layout.inodes.len() as u64 - 2
    }

    /// Number of blocks in use.
    pub fn blocks_used(&self) -> u64 {
        let g = &self.layout.geometry;
        let inodes: u64 = self.layout.inodes.iter().map(|p| p.total_blocks()).sum();
        g.first_free() + g.meta_blocks + inodes
    }

    /// Write the filesystem to `image` (which must read as zeroes: a new image), reading
    /// file contents from `source`.
    pub fn write(&self, image: &DiskImage, source: &mut dyn ContentSource) -> Result<()> {
        if image.size() < self.size_bytes() {
            return Err(Error::invalid_argument(format!(
                "image of {} bytes is smaller than the filesystem ({} bytes)",
                image.size(),
                self.size_bytes()
            )));
        }
        inode::write_inodes(self.tree, &self.options, &self.layout, image, source)?;
        superblock::write_metadata(&self.options, &self.layout, image)
    }
}

/// Convenience: plan and write `tree` into `image`.
pub fn write_tree(
    tree: &Tree,
    options: Options,
    image: &DiskImage,
    source: &mut dyn ContentSource,
) -> Result<()> {
    Plan::new(tree, options)?.write(image, source)
}
