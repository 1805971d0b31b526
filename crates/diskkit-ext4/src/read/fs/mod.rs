//! The ext2/3/4 reader: a filesystem inside any byte source, read the way the kernel and
//! e2fsprogs read it.
//!
//! One file per on-disk concept: [`superblock`], [`group`] descriptors, [`inode`]s, the
//! [`extent`] tree, [`indirect`] block maps, [`inline`] data, [`dir`]ectories (linear and
//! htree), [`xattr`]s and the [`journal`] (recovered in memory into an overlay that the
//! [`device`] layer consults). [`file`] reads contents; [`path`] resolves names.
//!
//! Checked with `metadata_csum` (crc32c): the superblock, every group descriptor read, every
//! inode read, extent tree blocks, directory entry blocks and htree nodes, and attribute
//! blocks; `uninit_bg` descriptors (crc16); the journal's superblock, descriptor, revoke and
//! commit blocks and every logged block's tag (csum v2/v3), or v1 transaction checksums.
//! Bitmaps are never read, so their checksums are not checked.
//!
//! Hostile images: every block number is checked against the filesystem's size, every
//! structure's length against its container, extent trees descend by exactly one level per
//! node (no loops), block maps have a fixed depth, the journal walk is bounded by the
//! journal's length, directory listings by [`dir::MAX_DIR_ENTRIES`], symlink chains by 40
//! links, and the metadata cache by 16 MiB.

#![warn(clippy::arithmetic_side_effects)]

mod bytes;
mod device;
mod dir;
mod extent;
mod file;
mod group;
mod indirect;
mod inline;
mod inode;
mod journal;
mod path;
mod superblock;
mod xattr;

use std::collections::BTreeMap;
use std::sync::Arc;

use diskkit::{Error, Result};

use crate::read::partition::SectorSource;
use device::Device;
pub use dir::{DirEntry, MAX_DIR_ENTRIES};
pub use file::FileReader;
pub use inode::{FileType, Inode, Timestamp};
pub use path::{Lookup, Resolved, MAX_SYMLINKS};
use superblock::{Superblock, COMPAT_HAS_JOURNAL, INCOMPAT_RECOVER, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE};
pub use xattr::Xattr;

/// The root directory's inode number.
pub const ROOT_INO: u32 = 2;

/// An open ext2/3/4 filesystem. Cheap to clone; safe to share between threads.
#[derive(Clone)]
pub struct Fs {
    inner: Arc<Inner>,
}

struct Inner {
    dev: Device,
    sb: Superblock,
    csum_seed: u32,
    notes: Vec<String>,
    replayed_transactions: u32,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("device", &self.inner.dev)
            .field("notes", &self.inner.notes)
            .finish_non_exhaustive()
    }
}

fn read_superblock(src: &(dyn SectorSource + Send + Sync)) -> Result<Superblock> {
    let end = SUPERBLOCK_OFFSET.saturating_add(SUPERBLOCK_SIZE as u64);
    if src.size() < end {
        return Err(Error::invalid_format("too small to hold an ext2/3/4 superblock"));
    }
    let mut b = vec![0u8; SUPERBLOCK_SIZE];
    src.read_exact_at(&mut b, SUPERBLOCK_OFFSET)?;
    Superblock::parse(&b)
}

impl Fs {
    /// Open the filesystem at the start of `src`, recovering its journal in memory when it
    /// needs recovery.
    pub fn open(src: Arc<dyn SectorSource + Send + Sync>) -> Result<Fs> {
        let sb = read_superblock(&*src)?;
        let fs = Fs::build(Arc::clone(&src), sb.clone(), BTreeMap::new(), Vec::new(), 0);
        if !sb.has_compat(COMPAT_HAS_JOURNAL) {
            return Ok(fs);
        }
        if sb.journal_inum == 0 && !sb.has_incompat(INCOMPAT_RECOVER) {
            return Ok(fs);
        }
        let Some(rec) = fs.recover_journal()? else {
            return Ok(fs);
        };
        if rec.overlay.is_empty() {
            return Ok(Fs::build(
                src,
                sb,
                BTreeMap::new(),
                rec.warnings,
                rec.transactions,
            ));
        }
        // The superblock itself may have been logged.
        let bs = sb.block_size();
        let (block, at) = if bs == 1024 { (1u64, 0usize) } else { (0, 1024) };
        let sb = match rec.overlay.get(&block) {
            Some(_) => {
                let tmp = Device::new(Arc::clone(&src), bs, sb.blocks_count, rec.overlay.clone());
                let data = tmp.block(block)?;
                let raw = bytes::slice(&data, at, SUPERBLOCK_SIZE).unwrap_or_default();
                Superblock::parse(raw)
                    .map_err(|e| e.with_operation("reading the superblock the journal replayed"))?
            }
            None => sb,
        };
        Ok(Fs::build(src, sb, rec.overlay, rec.warnings, rec.transactions))
    }

    fn build(
        src: Arc<dyn SectorSource + Send + Sync>,
        sb: Superblock,
        overlay: BTreeMap<u64, device::Replayed>,
        notes: Vec<String>,
        replayed_transactions: u32,
    ) -> Fs {
        let dev = Device::new(src, sb.block_size(), sb.blocks_count, overlay);
        Fs {
            inner: Arc::new(Inner {
                dev,
                csum_seed: sb.csum_seed(),
                sb,
                notes,
                replayed_transactions,
            }),
        }
    }

    pub(crate) fn sb(&self) -> &Superblock {
        &self.inner.sb
    }

    pub(crate) fn dev(&self) -> &Device {
        &self.inner.dev
    }

    pub(crate) fn csum_seed(&self) -> u32 {
        self.inner.csum_seed
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> usize {
        self.inner.sb.block_size()
    }

    /// Volume label (raw bytes, NULs trimmed).
    pub fn label(&self) -> &[u8] {
        let l = &self.inner.sb.label;
        let end = l.iter().position(|&b| b == 0).unwrap_or(l.len());
        &l[..end]
    }

    /// Filesystem UUID.
    pub fn uuid(&self) -> [u8; 16] {
        self.inner.sb.uuid
    }

    /// How many journal transactions were replayed in memory when the filesystem was opened.
    pub fn replayed_transactions(&self) -> u32 {
        self.inner.replayed_transactions
    }

    /// Blocks the journal replay superseded.
    pub fn replayed_blocks(&self) -> usize {
        self.inner.dev.overlay().len()
    }

    /// Problems found while opening that did not stop it (a damaged journal e2fsck would
    /// also have skipped or cut short).
    pub fn notes(&self) -> &[String] {
        &self.inner.notes
    }
}
