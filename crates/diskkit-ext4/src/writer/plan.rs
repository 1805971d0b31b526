//! Planning: inode numbers, link counts, sizes and block addresses of a finished tree.

use diskkit::{Error, Result};

use super::alloc::Allocator;
use super::dir::{self, DirEntry};
use super::extent;
use super::geometry::{self, Geometry};
use super::journal;
use super::tree::{NodeId, NodeKind, PlacedRun, Tree};
use super::xattr::{self, Placed};
use super::{Options, BLOCK_SIZE, FIRST_INO, ROOT_INO};

/// Where an inode's description comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// A tree node.
    Node(NodeId),
    /// The `lost+found` the writer adds when the tree has none.
    LostFound,
}

/// One inode of the plan.
#[derive(Debug)]
pub(crate) struct PlannedInode {
    pub(crate) ino: u32,
    pub(crate) source: Source,
    pub(crate) links: u32,
    /// Directory entries, `.` and `..` first (directories only).
    pub(crate) entries: Vec<DirEntry>,
    pub(crate) data_blocks: u64,
    pub(crate) tree_blocks: u64,
    pub(crate) xattrs: Placed,
    /// First block the writer allocated for the inode: its data blocks (unless placed), then
    /// the extent-tree blocks, then the xattr block.
    pub(crate) first_block: u64,
    /// For files with holes: the runs of blocks that hold data (first logical block,
    /// length); empty means all `data_blocks` from logical block 0.
    pub(crate) runs: Vec<(u64, u64)>,
    /// For files whose data the caller already wrote: where it is (`data_blocks` in all).
    pub(crate) placed: Option<Vec<PlacedRun>>,
}

impl PlannedInode {
    pub(crate) fn tree_start(&self) -> u64 {
        match self.placed {
            Some(_) => self.first_block,
            None => self.first_block + self.data_blocks,
        }
    }

    pub(crate) fn xattr_block(&self) -> Option<u64> {
        self.xattrs
            .block
            .as_ref()
            .map(|_| self.tree_start() + self.tree_blocks)
    }

    /// Every block of the inode (`i_blocks`).
    pub(crate) fn total_blocks(&self) -> u64 {
        self.data_blocks + self.tree_blocks + u64::from(self.xattrs.block.is_some())
    }

    /// The blocks the writer allocates for the inode, from `first_block`.
    pub(crate) fn own_blocks(&self) -> u64 {
        match self.placed {
            Some(_) => self.tree_blocks + u64::from(self.xattrs.block.is_some()),
            None => self.total_blocks(),
        }
    }
}

/// Check the placed runs of a file of `size` bytes: ascending, inside the file, not empty.
fn check_placed(runs: &[PlacedRun], size: u64) -> Result<()> {
    let blocks = size.div_ceil(BLOCK_SIZE as u64);
    let mut next = 0u64;
    for r in runs {
        let ok = r.len > 0
            && r.logical >= next
            && r.logical.checked_add(r.len).is_some_and(|e| e <= blocks)
            && r.physical > 0
            && r.physical.checked_add(r.len).is_some();
        if !ok {
            return Err(Error::invalid_argument(format!(
                "bad placed run {}+{} at block {} for a file of {size} bytes",
                r.logical, r.len, r.physical
            )));
        }
        next = r.logical + r.len;
    }
    Ok(())
}

/// File type codes of directory entries.
pub(crate) fn ftype(kind: &NodeKind) -> u8 {
    match kind {
        NodeKind::File { .. } => 1,
        NodeKind::Directory(_) => 2,
        NodeKind::CharDevice { .. } => 3,
        NodeKind::BlockDevice { .. } => 4,
        NodeKind::Fifo => 5,
        NodeKind::Socket => 6,
        NodeKind::Symlink(_) => 7,
    }
}

/// Longest symlink target kept in the inode.
pub(crate) const FAST_SYMLINK_MAX: usize = 59;

fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty()
        || name.len() > 255
        || name == b"."
        || name == b".."
        || name.iter().any(|&c| c == b'/' || c == 0)
    {
        return Err(Error::invalid_argument(format!(
            "invalid file name {:?}",
            String::from_utf8_lossy(name)
        )));
    }
    Ok(())
}

/// The finished plan: every inode with its blocks, and the geometry.
#[derive(Debug)]
pub(crate) struct Layout {
    pub(crate) inodes: Vec<PlannedInode>,
    pub(crate) geometry: Geometry,
    /// The journal's blocks (first, count), when there is one.
    pub(crate) journal: Option<(u64, u64)>,
}

/// Index in [`Layout::inodes`] of inode `ino`.
pub(crate) fn index_of(ino: u32) -> usize {
    if ino == ROOT_INO {
        0
    } else {
        (ino - FIRST_INO + 1) as usize
    }
}

/// Most data runs accepted for one file (beyond that it is stored dense).
const MAX_RUNS: usize = 1 << 16;

/// Block runs of a file of `size` bytes from its data byte ranges; `None` if not worth it.
fn block_runs(ranges: &[(u64, u64)], size: u64) -> Option<Vec<(u64, u64)>> {
    let bs = BLOCK_SIZE as u64;
    let blocks = size.div_ceil(bs);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &(off, len) in ranges {
        let end = off.checked_add(len)?.min(size);
        if end <= off {
            continue;
        }
        let (b0, b1) = (off / bs, end.div_ceil(bs).min(blocks));
        match runs.last_mut() {
            Some(last) if b0 < last.0 => return None, // not ascending
            Some(last) if b0 <= last.0 + last.1 => last.1 = last.1.max(b1 - last.0),
            _ => runs.push((b0, b1 - b0)),
        }
        if runs.len() > MAX_RUNS {
            return None;
        }
    }
    Some(runs)
}

pub(crate) fn plan(
    tree: &Tree,
    options: &Options,
    mut source: Option<&mut dyn super::tree::ContentSource>,
) -> Result<Layout> {
    let root = tree
        .node(Tree::ROOT)
        .ok_or_else(|| Error::invalid_argument("empty tree"))?;
    if !matches!(root.kind, NodeKind::Directory(_)) {
        return Err(Error::invalid_argument("the root is not a directory"));
    }
    let mut ino_of: Vec<u32> = vec![0; tree.len()];
    let mut inodes: Vec<PlannedInode> = Vec::new();
    let new_inode = |ino: u32, source: Source| PlannedInode {
        ino,
        source,
        links: 0,
        entries: Vec::new(),
        data_blocks: 0,
        tree_blocks: 0,
        xattrs: Placed::default(),
        first_block: 0,
        runs: Vec::new(),
        placed: None,
    };
    inodes.push(new_inode(ROOT_INO, Source::Node(Tree::ROOT)));
    inodes.push(new_inode(FIRST_INO, Source::LostFound));
    ino_of[Tree::ROOT] = ROOT_INO;
    let mut next_ino: u64 = u64::from(FIRST_INO) + 1;
    // Breadth-first over directories: (node, its inode, parent inode).
    let mut queue = std::collections::VecDeque::from([(Tree::ROOT, ROOT_INO, ROOT_INO)]);
    while let Some((dir, dino, parent)) = queue.pop_front() {
        let Some(NodeKind::Directory(children)) = tree.node(dir).map(|n| &n.kind) else {
            continue;
        };
        let mut sorted: Vec<&(Vec<u8>, NodeId)> = children.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut entries: Vec<DirEntry> = vec![(b".".to_vec(), dino, 2), (b"..".to_vec(), parent, 2)];
        let mut subdirs: u32 = 0;
        let mut has_lost_found = false;
        for (i, (name, child)) in sorted.iter().enumerate() {
            check_name(name)?;
            if i > 0 && sorted[i - 1].0 == *name {
                return Err(Error::invalid_argument(format!(
                    "duplicate name {:?}",
                    String::from_utf8_lossy(name)
                )));
            }
            let node = tree
                .node(*child)
                .ok_or_else(|| Error::invalid_argument(format!("no node {child}")))?;
            let is_dir = matches!(node.kind, NodeKind::Directory(_));
            if dino == ROOT_INO && name.as_slice() == b"lost+found" {
                if !is_dir {
                    // Replaced by the filesystem's own lost+found below.
                    continue;
                }
                has_lost_found = true;
                if ino_of[*child] != 0 {
                    return Err(Error::invalid_argument("a directory is linked twice"));
                }
                ino_of[*child] = FIRST_INO;
                inodes[1].source = Source::Node(*child);
                queue.push_back((*child, FIRST_INO, dino));
            }
            let ino = if ino_of[*child] != 0 {
                if is_dir {
                    if dino == ROOT_INO && name.as_slice() == b"lost+found" {
                        FIRST_INO
                    } else {
                        return Err(Error::invalid_argument("a directory is linked twice"));
                    }
                } else {
                    ino_of[*child]
                }
            } else {
                let ino = u32::try_from(next_ino).map_err(|_| Error::unsupported("more than 2^32 inodes"))?;
                next_ino += 1;
                ino_of[*child] = ino;
                inodes.push(new_inode(ino, Source::Node(*child)));
                if is_dir {
                    queue.push_back((*child, ino, dino));
                }
                ino
            };
            if is_dir {
                subdirs += 1;
            } else {
                let p = &mut inodes[index_of(ino)];
                p.links = p
                    .links
                    .checked_add(1)
                    .filter(|&l| l <= 65000)
                    .ok_or_else(|| Error::unsupported("more than 65000 hard links to one file"))?;
            }
            entries.push(((*name).clone(), ino, ftype(&node.kind)));
        }
        if dino == ROOT_INO && !has_lost_found {
            entries.push((b"lost+found".to_vec(), FIRST_INO, 2));
            entries[2..].sort_by(|a, b| a.0.cmp(&b.0));
            subdirs += 1;
            inodes[1].links = 2;
            inodes[1].entries = vec![(b".".to_vec(), FIRST_INO, 2), (b"..".to_vec(), ROOT_INO, 2)];
            inodes[1].data_blocks = 4;
            inodes[1].xattrs = Placed::default();
        }
        let links = subdirs.checked_add(2).filter(|&l| l < 65000).unwrap_or(1);
        let p = &mut inodes[index_of(dino)];
        p.links = links;
        p.data_blocks = dir::block_count(
            entries[2..].iter().map(|e| e.0.len()),
            dir::usable(options.metadata_csum),
        );
        p.tree_blocks = extent::tree_blocks(extent::extent_count(p.data_blocks));
        p.entries = entries;
    }

    // Sizes of files, symlinks and xattrs.
    let mut data_blocks: u64 = 0;
    for p in &mut inodes {
        if let Source::Node(id) = p.source {
            // OK to unwrap-free: every planned node id came from the tree.
            let node = tree
                .node(id)
                .ok_or_else(|| Error::invalid_argument("bad node id"))?;
            match &node.kind {
                NodeKind::File { size, content } => {
                    let blocks = size.div_ceil(BLOCK_SIZE as u64);
                    if blocks > u64::from(u32::MAX) {
                        return Err(Error::unsupported("files of 16 TiB or more"));
                    }
                    let placed = match source.as_deref_mut() {
                        Some(s) if *size > 0 => s.placed(*content, *size)?,
                        _ => None,
                    };
                    if let Some(runs) = placed {
                        check_placed(&runs, *size)?;
                        p.data_blocks = runs.iter().map(|r| r.len).sum();
                        p.tree_blocks =
                            extent::tree_blocks(runs.iter().map(|r| extent::extent_count(r.len)).sum());
                        p.placed = Some(runs);
                    } else {
                        let ranges = match source.as_deref_mut() {
                            Some(s) if *size > 0 => s.data_ranges(*content, *size)?,
                            _ => None,
                        };
                        match ranges.and_then(|r| block_runs(&r, *size)) {
                            Some(runs) if runs != [(0, blocks)] => {
                                p.data_blocks = runs.iter().map(|r| r.1).sum();
                                p.tree_blocks = extent::tree_blocks(extent::runs_extent_count(&runs));
                                p.runs = runs;
                            }
                            _ => {
                                p.data_blocks = blocks;
                                p.tree_blocks = extent::tree_blocks(extent::extent_count(blocks));
                            }
                        }
                    }
                }
                NodeKind::Symlink(target) => {
                    if target.is_empty() || target.len() >= BLOCK_SIZE || target.contains(&0) {
                        return Err(Error::invalid_argument(format!(
                            "invalid symlink target of {} bytes",
                            target.len()
                        )));
                    }
                    p.data_blocks = u64::from(target.len() > FAST_SYMLINK_MAX);
                }
                _ => {}
            }
            p.xattrs = xattr::place(&node.meta.xattrs)?;
        }
        data_blocks = data_blocks
            .checked_add(p.own_blocks())
            .ok_or_else(|| Error::unsupported("filesystem too large"))?;
    }

    // Placed data: where it is, checked not to overlap; the rest of the space is allocated
    // first-fit around it.
    let mut occupied: Vec<(u64, u64)> = inodes
        .iter()
        .filter_map(|p| p.placed.as_ref())
        .flatten()
        .map(|r| (r.physical, r.len))
        .collect();
    occupied.sort_unstable();
    let placed_end = occupied.last().map_or(0, |&(s, n)| s + n);
    let journal_blocks = if options.journal {
        let estimate = match options.size {
            Some(size) => size / BLOCK_SIZE as u64,
            None => data_blocks.max(placed_end),
        };
        journal::blocks_for(estimate)
    } else {
        0
    };
    let data_blocks = data_blocks
        .checked_add(journal_blocks)
        .ok_or_else(|| Error::unsupported("filesystem too large"))?;
    let mut geometry = geometry::compute(next_ino - 1, data_blocks, placed_end, options.size)?;
    if let Some(&(first, _)) = occupied.first() {
        if first < geometry.first_free() {
            return Err(Error::invalid_argument(format!(
                "placed data at block {first} overlaps the group descriptors (blocks up to {})",
                geometry.first_free()
            )));
        }
    }
    if placed_end > geometry.total_blocks {
        return Err(Error::invalid_argument(format!(
            "placed data ends at block {placed_end}, past the filesystem's {} blocks",
            geometry.total_blocks
        )));
    }
    let mut alloc = Allocator::new(geometry.first_free(), &occupied)?;
    geometry.bitmap_start = alloc.take(2 * geometry.groups)?;
    geometry.itable_start = alloc.take(geometry.groups * geometry.itable_blocks)?;
    let journal = match journal_blocks {
        0 => None,
        n => Some((alloc.take(n)?, n)),
    };
    for p in &mut inodes {
        let n = p.own_blocks();
        if n > 0 {
            p.first_block = alloc.take(n)?;
        }
    }
    geometry.used_end = alloc.end();
    if geometry.used_end > geometry.total_blocks {
        return Err(Error::invalid_argument(
            "the content does not fit in the filesystem's blocks",
        ));
    }
    Ok(Layout {
        inodes,
        geometry,
        journal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_from_ranges() {
        assert_eq!(block_runs(&[(0, 10), (5000, 10)], 9000), Some(vec![(0, 2)]));
        assert_eq!(
            block_runs(&[(0, 1), (3 * 4096, 1)], 5 * 4096),
            Some(vec![(0, 1), (3, 1)])
        );
        assert_eq!(block_runs(&[], 100), Some(vec![]));
        assert_eq!(block_runs(&[(8192, 1), (0, 1)], 10_000), None);
    }
}
