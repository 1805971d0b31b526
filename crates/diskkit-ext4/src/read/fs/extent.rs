//! Extent trees: the root in `i_block`, index and leaf blocks below it (checked: magic,
//! entry counts, depth decreasing by one per level and at most 5, keys sorted and inside the
//! parent's range, extents non-empty, non-overlapping and inside the filesystem, block
//! checksums). Unwritten extents read as zeroes. Because every level's depth is one less than
//! its parent's, a tree cannot loop.

use diskkit::{Error, Result};

use super::bytes::{hilo, le16, le32, slice};
use super::file::{Run, RunKind};
use super::Fs;
use crate::crc::crc32c;

const MAGIC: u16 = 0xF30A;
/// The kernel stops at 5 levels; e2fsck accepts deeper trees (it only offers to shorten
/// them), so this reader does too, up to a bound that keeps a lookup short.
const MAX_DEPTH: u16 = 16;
/// Lengths above this mark an unwritten extent (length - 32768 blocks).
const INIT_MAX_LEN: u16 = 32768;
const ENTRY: usize = 12;

#[derive(Debug, Clone, Copy)]
struct Extent {
    lblk: u64,
    len: u64,
    pblk: u64,
    unwritten: bool,
}

#[derive(Debug, Clone)]
enum Entries {
    Index(Vec<(u64, u64)>),
    Leaf(Vec<Extent>),
}

#[derive(Debug, Clone)]
struct Node {
    depth: u16,
    entries: Entries,
    /// Logical range `[lo, hi)` this node answers for.
    lo: u64,
    hi: u64,
}

/// Maps a file's logical blocks through its extent tree, remembering the last leaf so that
/// sequential reads descend the tree once per leaf.
#[derive(Debug)]
pub(crate) struct ExtentMap {
    ino: u32,
    seed: Option<u32>,
    root: Node,
    leaf: Option<Node>,
}

fn err(ino: u32, where_: &str, what: impl std::fmt::Display) -> Error {
    Error::corrupt(format!("inode {ino}: extent tree {where_}: {what}"))
}

impl ExtentMap {
    pub(crate) fn new(fs: &Fs, ino: u32, generation: u32, i_block: &[u8; 60]) -> Result<ExtentMap> {
        let seed = fs.sb().metadata_csum().then(|| fs.inode_seed(ino, generation));
        let root = parse(
            fs,
            ino,
            "root in the inode",
            i_block,
            None,
            0,
            fs.sb().max_file_blocks(),
        )?;
        Ok(ExtentMap {
            ino,
            seed,
            root,
            leaf: None,
        })
    }

    /// The run of blocks starting at logical block `lblk`.
    pub(crate) fn find(&mut self, fs: &Fs, lblk: u64) -> Result<Run> {
        if let Some(leaf) = &self.leaf {
            if leaf.lo <= lblk && lblk < leaf.hi {
                return Ok(leaf_run(leaf, lblk));
            }
        }
        let mut node = self.root.clone();
        loop {
            let Entries::Index(idx) = &node.entries else {
                let run = leaf_run(&node, lblk);
                self.leaf = Some(node);
                return Ok(run);
            };
            if lblk < node.lo || lblk >= node.hi || idx.is_empty() {
                return Ok(hole_to(lblk, node.hi));
            }
            // The last index whose key is <= lblk; the first index covers everything from the
            // node's start (as the kernel's binary search does).
            let i = idx.partition_point(|&(k, _)| k <= lblk).saturating_sub(1);
            let lo = if i == 0 { node.lo } else { idx[i].0 };
            let hi = idx.get(i.saturating_add(1)).map_or(node.hi, |&(k, _)| k);
            let child = idx[i].1;
            let block = fs.dev().block(child).map_err(|e| {
                Error::new(
                    e.kind(),
                    format!("inode {}: cannot read extent block {child}", self.ino),
                )
                .with_source(e)
            })?;
            if let Some(seed) = self.seed {
                check_csum(self.ino, child, &block, seed)?;
            }
            let where_ = format!("block {child}");
            node = parse(
                fs,
                self.ino,
                &where_,
                &block,
                Some(node.depth.saturating_sub(1)),
                lo,
                hi,
            )?;
        }
    }
}

fn hole_to(lblk: u64, end: u64) -> Run {
    Run {
        lblk,
        len: end.saturating_sub(lblk).max(1),
        kind: RunKind::Hole,
    }
}

fn leaf_run(leaf: &Node, lblk: u64) -> Run {
    let Entries::Leaf(ext) = &leaf.entries else {
        return hole_to(lblk, leaf.hi);
    };
    let i = ext.partition_point(|e| e.lblk <= lblk);
    if let Some(e) = i.checked_sub(1).and_then(|j| ext.get(j)) {
        let end = e.lblk.saturating_add(e.len);
        if lblk < end {
            let skip = lblk.saturating_sub(e.lblk);
            return Run {
                lblk,
                len: end.saturating_sub(lblk),
                kind: if e.unwritten {
                    RunKind::Unwritten
                } else {
                    RunKind::Data(e.pblk.saturating_add(skip))
                },
            };
        }
    }
    let next = ext.get(i).map_or(leaf.hi, |e| e.lblk);
    hole_to(lblk, next)
}

fn check_csum(ino: u32, blk: u64, b: &[u8], seed: u32) -> Result<()> {
    let max = usize::from(le16(b, 4));
    let end = max.saturating_mul(ENTRY).saturating_add(ENTRY);
    let Some(body) = b.get(..end).filter(|_| end.saturating_add(4) <= b.len()) else {
        return Err(err(ino, &format!("block {blk}"), "no room for its checksum"));
    };
    let stored = le32(b, end);
    let computed = crc32c(seed, body);
    if stored != computed {
        return Err(err(
            ino,
            &format!("block {blk}"),
            format_args!("checksum mismatch (stored 0x{stored:08x}, computed 0x{computed:08x})"),
        ));
    }
    Ok(())
}

/// Parse and check one node. `depth` is the depth the parent expects (`None` for the root);
/// every key must lie in `[lo, hi)`.
fn parse(fs: &Fs, ino: u32, where_: &str, b: &[u8], depth: Option<u16>, lo: u64, hi: u64) -> Result<Node> {
    let bad = |what: &dyn std::fmt::Display| err(ino, where_, what);
    if le16(b, 0) != MAGIC {
        return Err(bad(&"bad magic number (not an extent node)"));
    }
    let entries = usize::from(le16(b, 2));
    let max = usize::from(le16(b, 4));
    let node_depth = le16(b, 6);
    if entries > max || max.saturating_mul(ENTRY).saturating_add(ENTRY) > b.len() {
        return Err(bad(&format_args!(
            "{entries} entries, room for {max}, in {} bytes",
            b.len()
        )));
    }
    match depth {
        None if node_depth > MAX_DEPTH => {
            return Err(bad(&format_args!("depth {node_depth} is more than {MAX_DEPTH}")))
        }
        Some(d) if node_depth != d => {
            return Err(bad(&format_args!("depth {node_depth} where {d} was expected")))
        }
        Some(_) if entries == 0 => return Err(bad(&"an empty node below the root")),
        _ => {}
    }
    let sb = fs.sb();
    let first = u64::from(sb.first_data_block);
    let total = sb.blocks_count;
    let raw = |i: usize| slice(b, ENTRY.saturating_mul(i.saturating_add(1)), ENTRY).unwrap_or_default();
    let entries = if node_depth == 0 {
        let mut v: Vec<Extent> = Vec::with_capacity(entries);
        for i in 0..entries {
            let e = raw(i);
            let raw_len = le16(e, 4);
            let (len, unwritten) = if raw_len > INIT_MAX_LEN {
                (raw_len.saturating_sub(INIT_MAX_LEN), true)
            } else {
                (raw_len, false)
            };
            let x = Extent {
                lblk: u64::from(le32(e, 0)),
                len: u64::from(len),
                pblk: hilo(le32(e, 8), u32::from(le16(e, 6))),
                unwritten,
            };
            let end = x.lblk.saturating_add(x.len);
            if x.len == 0 {
                return Err(bad(&format_args!(
                    "extent at logical block {} has length 0",
                    x.lblk
                )));
            }
            if x.lblk < lo || end > hi {
                return Err(bad(&format_args!(
                    "extent of logical blocks {}..{end} lies outside its parent's range {lo}..{hi}",
                    x.lblk
                )));
            }
            if let Some(p) = v.last() {
                if x.lblk < p.lblk.saturating_add(p.len) {
                    return Err(bad(&format_args!(
                        "extents overlap or are out of order at logical block {}",
                        x.lblk
                    )));
                }
            }
            if x.pblk < first || x.pblk.checked_add(x.len).is_none_or(|e| e > total) {
                return Err(bad(&format_args!(
                    "extent of {} blocks at block {} lies outside the filesystem ({total} blocks)",
                    x.len, x.pblk
                )));
            }
            v.push(x);
        }
        Entries::Leaf(v)
    } else {
        let mut v: Vec<(u64, u64)> = Vec::with_capacity(entries);
        for i in 0..entries {
            let e = raw(i);
            let key = u64::from(le32(e, 0));
            let child = hilo(le32(e, 4), u32::from(le16(e, 8)));
            if (i > 0 && key < lo) || key >= hi {
                return Err(bad(&format_args!(
                    "index key {key} lies outside its range {lo}..{hi}"
                )));
            }
            if v.last().is_some_and(|&(k, _)| key <= k) {
                return Err(bad(&format_args!("index keys out of order at {key}")));
            }
            if child < first || child >= total {
                return Err(bad(&format_args!(
                    "index points to block {child}, outside the filesystem"
                )));
            }
            v.push((key, child));
        }
        Entries::Index(v)
    };
    Ok(Node {
        depth: node_depth,
        entries,
        lo,
        hi,
    })
}
