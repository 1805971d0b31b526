//! Inodes and their data: file contents, directory blocks, symlinks, devices, extent trees.

use diskkit::{DiskImage, Error, Result};

use super::checksum::{self, Seeds};
use super::journal::{self, JOURNAL_INO};
use super::plan::{Layout, PlannedInode, Source, FAST_SYMLINK_MAX};
use super::tree::{ContentSource, Metadata, NodeKind, Timestamp, Tree};
use super::{dir, extent, Options, BLOCK_SIZE, INODE_SIZE};

const S_IFIFO: u16 = 0o010000;
const S_IFCHR: u16 = 0o020000;
const S_IFDIR: u16 = 0o040000;
const S_IFBLK: u16 = 0o060000;
const S_IFREG: u16 = 0o100000;
const S_IFLNK: u16 = 0o120000;
const S_IFSOCK: u16 = 0o140000;
const EXTENTS_FL: u32 = 0x0008_0000;
/// Bytes read from the content source per write.
const CHUNK: usize = 1 << 20;

/// Encode a time as the low 32 bits and the `*_extra` word (epoch bits + nanoseconds).
pub(crate) fn encode_time(t: Timestamp) -> (u32, u32) {
    let secs = t.secs.clamp(-(1i64 << 31), (1i64 << 34) - (1i64 << 31) - 1);
    let lo = secs as i32;
    let epoch = ((secs - i64::from(lo)) >> 32) as u32 & 3;
    let nanos = t.nanos.min(999_999_999);
    (lo as u32, epoch | (nanos << 2))
}

struct InodeFields<'a> {
    mode: u16,
    meta: &'a Metadata,
    size: u64,
    links: u32,
    flags: u32,
    i_block: [u8; 60],
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn encode(p: &PlannedInode, f: &InodeFields<'_>, out: &mut [u8]) {
    let m = f.meta;
    put16(out, 0, f.mode);
    put16(out, 2, m.uid as u16);
    put32(out, 4, f.size as u32);
    let (a, ax) = encode_time(m.atime);
    let (c, cx) = encode_time(m.ctime);
    let (mt, mx) = encode_time(m.mtime);
    put32(out, 8, a);
    put32(out, 12, c);
    put32(out, 16, mt);
    put16(out, 24, m.gid as u16);
    put16(out, 26, f.links as u16);
    let blocks512 = p.total_blocks() * (BLOCK_SIZE as u64 / 512);
    put32(out, 28, blocks512 as u32);
    put32(out, 32, f.flags);
    out[40..100].copy_from_slice(&f.i_block);
    let acl = p.xattr_block().unwrap_or(0);
    put32(out, 104, acl as u32);
    put32(out, 108, (f.size >> 32) as u32);
    put16(out, 116, (blocks512 >> 32) as u16);
    put16(out, 118, (acl >> 32) as u16);
    put16(out, 120, (m.uid >> 16) as u16);
    put16(out, 122, (m.gid >> 16) as u16);
    put16(out, 128, 32); // i_extra_isize
    put32(out, 132, cx);
    put32(out, 136, mx);
    put32(out, 140, ax);
    put32(out, 144, c); // crtime = ctime
    put32(out, 148, cx);
    if !p.xattrs.inline.is_empty() {
        out[160..INODE_SIZE].copy_from_slice(&p.xattrs.inline);
    }
}

fn device_block(major: u32, minor: u32) -> [u8; 60] {
    let mut b = [0u8; 60];
    if major < 256 && minor < 256 {
        put32(&mut b, 0, (major << 8) | minor);
    } else {
        let new = (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12);
        put32(&mut b, 4, new);
    }
    b
}

/// Write every inode's data blocks and the inode tables.
pub(crate) fn write_inodes(
    tree: &Tree,
    options: &Options,
    layout: &Layout,
    image: &DiskImage,
    source: &mut dyn ContentSource,
) -> Result<()> {
    let g = &layout.geometry;
    let ipg = u64::from(g.inodes_per_group);
    let table_len = g.itable_blocks as usize * BLOCK_SIZE;
    let mut table = vec![0u8; table_len];
    let mut group = 0u64;
    let mut dirty = false;
    let lost_found_meta = Metadata {
        mode: 0o700,
        atime: Timestamp {
            secs: options.time,
            nanos: 0,
        },
        mtime: Timestamp {
            secs: options.time,
            nanos: 0,
        },
        ctime: Timestamp {
            secs: options.time,
            nanos: 0,
        },
        ..Metadata::default()
    };
    let mut buf = vec![0u8; CHUNK];
    let seeds = options.metadata_csum.then(|| Seeds::new(&options.uuid));
    let write_tree = |ino: u32, blocks: Vec<(u64, Vec<u8>)>| -> Result<()> {
        for (blk, mut data) in blocks {
            if let Some(s) = &seeds {
                checksum::extent_block_csum(s, ino, &mut data, extent::BLOCK_ENTRIES);
            }
            image.write_at(&data, blk * BLOCK_SIZE as u64)?;
        }
        Ok(())
    };
    if let Some((first, blocks)) = layout.journal {
        // Inode 8 lives in group 0, whose table is the first one written below.
        image.write_at(
            &journal::superblock(blocks, &options.uuid),
            first * BLOCK_SIZE as u64,
        )?;
        let planned = PlannedInode {
            ino: JOURNAL_INO,
            source: Source::LostFound,
            links: 1,
            entries: Vec::new(),
            data_blocks: blocks,
            tree_blocks: 0,
            xattrs: Default::default(),
            first_block: first,
            runs: Vec::new(),
            placed: None,
        };
        let (i_block, tree) = extent::build(blocks, first, first + blocks);
        debug_assert!(tree.is_empty(), "a journal is one extent");
        let meta = Metadata {
            mode: 0o600,
            ..lost_found_meta.clone()
        };
        let fields = InodeFields {
            mode: S_IFREG | 0o600,
            meta: &meta,
            size: blocks * BLOCK_SIZE as u64,
            links: 1,
            flags: EXTENTS_FL,
            i_block,
        };
        let at = (JOURNAL_INO - 1) as usize * INODE_SIZE;
        encode(&planned, &fields, &mut table[at..at + INODE_SIZE]);
        if let Some(s) = &seeds {
            checksum::inode_csum(s, JOURNAL_INO, &mut table[at..at + INODE_SIZE]);
        }
        dirty = true;
    }
    for p in &layout.inodes {
        let (kind, meta) = match p.source {
            Source::Node(id) => {
                let n = tree
                    .node(id)
                    .ok_or_else(|| Error::invalid_argument("bad node id"))?;
                (Some(&n.kind), &n.meta)
            }
            Source::LostFound => (None, &lost_found_meta),
        };
        let perm = meta.mode & 0o7777;
        let fields = match kind {
            None | Some(NodeKind::Directory(_)) => {
                let mut data = dir::encode(&p.entries, p.data_blocks, dir::usable(seeds.is_some()));
                if let Some(s) = &seeds {
                    checksum::dir_block_csums(s, p.ino, &mut data, BLOCK_SIZE);
                }
                image.write_at(&data, p.first_block * BLOCK_SIZE as u64)?;
                let (i_block, tree_blocks) = extent::build(p.data_blocks, p.first_block, p.tree_start());
                write_tree(p.ino, tree_blocks)?;
                InodeFields {
                    mode: S_IFDIR | perm,
                    meta,
                    size: p.data_blocks * BLOCK_SIZE as u64,
                    links: p.links,
                    flags: EXTENTS_FL,
                    i_block,
                }
            }
            Some(NodeKind::File { size, content }) => {
                let (i_block, tree_blocks) = match &p.placed {
                    // Already in the image: only mapped.
                    Some(placed) => {
                        let mapped: Vec<(u64, u64, u64)> =
                            placed.iter().map(|r| (r.logical, r.physical, r.len)).collect();
                        extent::build_mapped(&mapped, p.tree_start())
                    }
                    None => {
                        let dense = [(0, p.data_blocks)];
                        let runs: &[(u64, u64)] = if p.runs.is_empty() { &dense } else { &p.runs };
                        let mut phys = p.first_block;
                        for &(logical, blocks) in runs {
                            let start = logical * BLOCK_SIZE as u64;
                            let end = ((logical + blocks) * BLOCK_SIZE as u64).min(*size);
                            write_content(image, source, *content, start, end, phys, &mut buf)?;
                            phys += blocks;
                        }
                        extent::build_runs(runs, p.first_block, p.tree_start())
                    }
                };
                write_tree(p.ino, tree_blocks)?;
                InodeFields {
                    mode: S_IFREG | perm,
                    meta,
                    size: *size,
                    links: p.links,
                    flags: EXTENTS_FL,
                    i_block,
                }
            }
            Some(NodeKind::Symlink(target)) => {
                let (i_block, flags) = if target.len() <= FAST_SYMLINK_MAX {
                    let mut b = [0u8; 60];
                    b[..target.len()].copy_from_slice(target);
                    (b, 0)
                } else {
                    image.write_at(target, p.first_block * BLOCK_SIZE as u64)?;
                    (extent::build(1, p.first_block, p.tree_start()).0, EXTENTS_FL)
                };
                InodeFields {
                    mode: S_IFLNK | 0o777,
                    meta,
                    size: target.len() as u64,
                    links: p.links,
                    flags,
                    i_block,
                }
            }
            Some(NodeKind::CharDevice { major, minor }) => InodeFields {
                mode: S_IFCHR | perm,
                meta,
                size: 0,
                links: p.links,
                flags: 0,
                i_block: device_block(*major, *minor),
            },
            Some(NodeKind::BlockDevice { major, minor }) => InodeFields {
                mode: S_IFBLK | perm,
                meta,
                size: 0,
                links: p.links,
                flags: 0,
                i_block: device_block(*major, *minor),
            },
            Some(NodeKind::Fifo) => InodeFields {
                mode: S_IFIFO | perm,
                meta,
                size: 0,
                links: p.links,
                flags: 0,
                i_block: [0; 60],
            },
            Some(NodeKind::Socket) => InodeFields {
                mode: S_IFSOCK | perm,
                meta,
                size: 0,
                links: p.links,
                flags: 0,
                i_block: [0; 60],
            },
        };
        if let (Some(blk), Some(data)) = (p.xattr_block(), p.xattrs.block.as_ref()) {
            let mut data = data.clone();
            if let Some(s) = &seeds {
                checksum::xattr_block_csum(s, blk, &mut data);
            }
            image.write_at(&data, blk * BLOCK_SIZE as u64)?;
        }
        let idx = u64::from(p.ino - 1);
        let g_of = idx / ipg;
        if g_of != group {
            if dirty {
                image.write_at(&table, g.inode_table(group) * BLOCK_SIZE as u64)?;
                table.fill(0);
            }
            group = g_of;
        }
        let at = (idx % ipg) as usize * INODE_SIZE;
        encode(p, &fields, &mut table[at..at + INODE_SIZE]);
        if let Some(s) = &seeds {
            checksum::inode_csum(s, p.ino, &mut table[at..at + INODE_SIZE]);
        }
        dirty = true;
    }
    if dirty {
        image.write_at(&table, g.inode_table(group) * BLOCK_SIZE as u64)?;
    }
    Ok(())
}

/// Write bytes `[start, end)` of `content` at block `first_block`.
fn write_content(
    image: &DiskImage,
    source: &mut dyn ContentSource,
    content: u64,
    start: u64,
    end: u64,
    first_block: u64,
    buf: &mut [u8],
) -> Result<()> {
    let base = first_block * BLOCK_SIZE as u64;
    let mut off = start;
    while off < end {
        let n = (end - off).min(buf.len() as u64) as usize;
        if source.is_zero(content, off, n as u64)? {
            off += n as u64;
            continue;
        }
        source.read_content(content, off, &mut buf[..n])?;
        // The image is new and reads as zeroes: leave all-zero chunks unwritten (sparse).
        if buf[..n].iter().any(|&b| b != 0) {
            image.write_at(&buf[..n], base + (off - start))?;
        }
        off += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(encode_time(Timestamp { secs: 0, nanos: 5 }), (0, 20));
        assert_eq!(encode_time(Timestamp { secs: -1, nanos: 0 }), (u32::MAX, 0));
        assert_eq!(
            encode_time(Timestamp {
                secs: 1 << 31,
                nanos: 0
            }),
            (1 << 31, 1)
        );
    }

    #[test]
    fn devices() {
        assert_eq!(&device_block(1, 3)[..4], &[3, 1, 0, 0]);
        let b = device_block(300, 70000);
        assert_eq!(&b[..4], &[0; 4]);
    }
}
