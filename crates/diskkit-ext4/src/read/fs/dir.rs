//! Directories: linear entry blocks, htree (`dir_index`) blocks, inline directories, and the
//! checksums of each (`metadata_csum`: a 12-byte tail on entry blocks, a tail after the
//! index entries on htree blocks).
//!
//! Listing reads every block of the directory in order, as the kernel does when it does not
//! use the hash tree: htree interior blocks look like one empty entry covering the block, and
//! the root's tree data hides inside the `..` entry. Lookups scan the same way, so the hash
//! version (legacy, half-MD4, TEA, their unsigned variants, SipHash) never matters for
//! correctness.

use diskkit::{Error, Result};

use super::bytes::{le16, le32, slice};
use super::file::{BlockMap, RunKind};
use super::inode::{FileType, Inode, FLAG_INDEX};
use super::Fs;
use crate::crc::crc32c;

/// Most entries one directory may list.
pub const MAX_DIR_ENTRIES: usize = 10_000_000;
const TAIL: usize = 12;
const TAIL_TYPE: u8 = 0xDE;

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Inode number.
    pub ino: u32,
    /// Name as stored (raw bytes; ciphertext in an encrypted directory).
    pub name: Vec<u8>,
    /// The type the entry records (`filetype` feature), if any.
    pub file_type: Option<FileType>,
}

impl Fs {
    /// Every entry of directory `dir` except `.` and `..`, in on-disk order.
    pub fn read_dir(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        self.for_each_entry(dir, &mut |e| {
            if e.name != b"." && e.name != b".." {
                if out.len() >= MAX_DIR_ENTRIES {
                    return Err(Error::corrupt(format!(
                        "directory inode {} has more than {MAX_DIR_ENTRIES} entries",
                        dir.ino
                    )));
                }
                out.push(e);
            }
            Ok(true)
        })?;
        Ok(out)
    }

    /// The inode `name` names in directory `dir` (exact bytes; in a case-folded directory a
    /// case-insensitive match of valid UTF-8 names is accepted when there is no exact one).
    pub fn lookup(&self, dir: &Inode, name: &[u8]) -> Result<Option<u32>> {
        let mut found = None;
        let mut folded = None;
        let want_folded = (dir.is_casefolded() && !dir.is_encrypted())
            .then(|| std::str::from_utf8(name).ok().map(str::to_lowercase))
            .flatten();
        self.for_each_entry(dir, &mut |e| {
            if e.name == name {
                found = Some(e.ino);
                return Ok(false);
            }
            if let Some(w) = &want_folded {
                if folded.is_none() && std::str::from_utf8(&e.name).is_ok_and(|n| n.to_lowercase() == *w) {
                    folded = Some(e.ino);
                }
            }
            Ok(true)
        })?;
        Ok(found.or(folded))
    }

    /// Call `f` for each entry (`.` and `..` included) until it returns `false`.
    pub(crate) fn for_each_entry(
        &self,
        dir: &Inode,
        f: &mut dyn FnMut(DirEntry) -> Result<bool>,
    ) -> Result<()> {
        if dir.file_type != FileType::Directory {
            return Err(Error::invalid_argument(format!(
                "inode {} is not a directory",
                dir.ino
            )));
        }
        if dir.has_inline_data() {
            return self.inline_dir(dir, f);
        }
        let bs = self.sb().block_size();
        let bs64 = bs as u64;
        let nblocks = dir.size.div_ceil(bs64);
        if nblocks > self.sb().max_file_blocks() {
            return Err(Error::corrupt(format!(
                "directory inode {} claims {} bytes",
                dir.ino, dir.size
            )));
        }
        let mut map = BlockMap::new(self, dir)?;
        let seed = self
            .sb()
            .metadata_csum()
            .then(|| self.inode_seed(dir.ino, dir.generation));
        let htree = dir.flags & FLAG_INDEX != 0;
        let mut lblk = 0u64;
        while lblk < nblocks {
            let run = map.find(self, lblk)?;
            let len = run.len.min(nblocks.saturating_sub(lblk));
            if let RunKind::Data(p) = run.kind {
                for i in 0..len {
                    let pblk = p.saturating_add(i);
                    let block = self.dev().block(pblk)?;
                    let where_ = DirBlock {
                        ino: dir.ino,
                        lblk: lblk.saturating_add(i),
                    };
                    let usable = match seed {
                        Some(seed) => match check_block(&block, seed, htree, where_)? {
                            Kind::Leaf => bs.saturating_sub(TAIL),
                            // An htree node: no entries but the root's `.` and `..`, which
                            // callers never need from here.
                            Kind::Index => continue,
                        },
                        None => bs,
                    };
                    if !parse_entries(&block, usable, self.sb().filetype(), bs, where_, f)? {
                        return Ok(());
                    }
                }
            }
            lblk = lblk.saturating_add(len.max(1));
        }
        Ok(())
    }

    fn inline_dir(&self, dir: &Inode, f: &mut dyn FnMut(DirEntry) -> Result<bool>) -> Result<()> {
        let data = self.inline_data(dir)?;
        let parent = le32(&data, 0);
        if !f(DirEntry {
            ino: dir.ino,
            name: b".".to_vec(),
            file_type: Some(FileType::Directory),
        })? || !f(DirEntry {
            ino: parent,
            name: b"..".to_vec(),
            file_type: Some(FileType::Directory),
        })? {
            return Ok(());
        }
        let ft = self.sb().filetype();
        let first = data.get(4..60).unwrap_or_default();
        let where_ = DirBlock {
            ino: dir.ino,
            lblk: 0,
        };
        if !parse_entries(first, first.len(), ft, usize::MAX, where_, f)? {
            return Ok(());
        }
        let rest = data.get(60..).unwrap_or_default();
        if !rest.is_empty() {
            parse_entries(rest, rest.len(), ft, usize::MAX, where_, f)?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct DirBlock {
    ino: u32,
    lblk: u64,
}

impl DirBlock {
    fn err(self, what: impl std::fmt::Display) -> Error {
        Error::corrupt(format!(
            "directory inode {}, block {}: {what}",
            self.ino, self.lblk
        ))
    }
}

enum Kind {
    Leaf,
    Index,
}

/// `rec_len` as stored; with 64 KiB blocks the two low bits extend it and 0 or 65535 mean
/// the whole block.
fn rec_len(raw: u16, bs: usize) -> usize {
    if bs < 65536 {
        usize::from(raw)
    } else if raw == 0 || raw == u16::MAX {
        bs
    } else {
        usize::from(raw & 0xFFFC) | (usize::from(raw & 3) << 16)
    }
}

/// Verify a directory block's checksum and say whether it holds entries or htree index
/// data (the same decision e2fsprogs makes: a valid entry tail means entries, else the
/// block must parse as an htree node).
fn check_block(b: &[u8], seed: u32, htree: bool, at: DirBlock) -> Result<Kind> {
    let bs = b.len();
    let top = bs.saturating_sub(TAIL);
    // Walk the entries to see whether they end exactly where the tail begins.
    let mut pos = 0usize;
    let mut ok = true;
    while pos < top {
        let r = rec_len(le16(b, pos.saturating_add(4)), bs);
        if r < 8 || r % 4 != 0 {
            ok = false;
            break;
        }
        pos = pos.saturating_add(r);
    }
    let tail = slice(b, top, TAIL).unwrap_or_default();
    let has_tail = ok
        && pos == top
        && le32(tail, 0) == 0
        && le16(tail, 4) == TAIL as u16
        && tail.get(6) == Some(&0)
        && tail.get(7) == Some(&TAIL_TYPE);
    if has_tail {
        let stored = le32(tail, 8);
        let computed = crc32c(seed, &b[..top]);
        if stored != computed {
            return Err(at.err(format_args!(
                "checksum mismatch (stored 0x{stored:08x}, computed 0x{computed:08x})"
            )));
        }
        return Ok(Kind::Leaf);
    }
    if htree {
        if let Some(count_offset) = dx_count_offset(b) {
            let limit = usize::from(le16(b, count_offset));
            let count = usize::from(le16(b, count_offset.saturating_add(2)));
            let tail_at = count_offset.saturating_add(limit.saturating_mul(8));
            if tail_at.saturating_add(8) <= bs && count <= limit {
                let size = count_offset.saturating_add(count.saturating_mul(8));
                let mut c = crc32c(seed, &b[..size]);
                c = crc32c(c, slice(b, tail_at, 4).unwrap_or_default());
                c = crc32c(c, &[0; 4]);
                let stored = le32(b, tail_at.saturating_add(4));
                if stored != c {
                    return Err(at.err(format_args!(
                        "htree node checksum mismatch (stored 0x{stored:08x}, computed 0x{c:08x})"
                    )));
                }
                return Ok(Kind::Index);
            }
        }
    }
    Err(at.err("no checksum tail (the block is neither an entry block nor an htree node)"))
}

/// Where an htree node's count/limit pair sits: after the fake empty entry of an interior
/// node, or after `.`, `..` and the root info of the root.
fn dx_count_offset(b: &[u8]) -> Option<usize> {
    let bs = b.len();
    let r = rec_len(le16(b, 4), bs);
    let off = if r == bs && b.get(6) == Some(&0) && b.get(7) == Some(&0) {
        8
    } else if r == 12 {
        if rec_len(le16(b, 16), bs) != bs.saturating_sub(12) || le32(b, 24) != 0 || b.get(29) != Some(&8) {
            return None;
        }
        32
    } else {
        return None;
    };
    let max = bs.saturating_sub(off) / 8;
    let limit = usize::from(le16(b, off));
    let count = usize::from(le16(b, off.saturating_add(2)));
    (limit <= max && count <= max).then_some(off)
}

/// Parse the entries in `b[..usable]`; returns `false` when `f` asked to stop.
fn parse_entries(
    b: &[u8],
    usable: usize,
    filetype: bool,
    bs: usize,
    at: DirBlock,
    f: &mut dyn FnMut(DirEntry) -> Result<bool>,
) -> Result<bool> {
    let mut pos = 0usize;
    while pos < usable {
        let head = slice(b, pos, 8).ok_or_else(|| at.err(format_args!("entry at byte {pos} is cut off")))?;
        let ino = le32(head, 0);
        let r = rec_len(le16(head, 4), bs);
        let (name_len, ftype) = if filetype {
            (usize::from(head[6]), head[7])
        } else {
            (usize::from(le16(head, 6)), 0)
        };
        if r < 8 || r % 4 != 0 || pos.saturating_add(r) > usable {
            return Err(at.err(format_args!("entry at byte {pos} has an impossible length {r}")));
        }
        if ino != 0 {
            if name_len.saturating_add(8) > r {
                return Err(at.err(format_args!(
                    "entry at byte {pos}: a {name_len}-byte name does not fit its {r}-byte record"
                )));
            }
            if name_len == 0 {
                return Err(at.err(format_args!("entry at byte {pos} has an empty name")));
            }
            let name = b[pos.saturating_add(8)..pos.saturating_add(8).saturating_add(name_len)].to_vec();
            let e = DirEntry {
                ino,
                name,
                file_type: if filetype {
                    FileType::from_dirent(ftype)
                } else {
                    None
                },
            };
            if !f(e)? {
                return Ok(false);
            }
        }
        pos = pos.saturating_add(r);
    }
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn entry(ino: u32, name: &[u8], rec: u16) -> Vec<u8> {
        let mut e = ino.to_le_bytes().to_vec();
        e.extend_from_slice(&rec.to_le_bytes());
        e.push(name.len() as u8);
        e.push(1);
        e.extend_from_slice(name);
        e.resize(usize::from(rec), 0);
        e
    }

    fn collect(b: &[u8], usable: usize) -> Result<Vec<DirEntry>> {
        let mut v = Vec::new();
        parse_entries(b, usable, true, 1024, DirBlock { ino: 2, lblk: 0 }, &mut |e| {
            v.push(e);
            Ok(true)
        })?;
        Ok(v)
    }

    #[test]
    fn entries_and_rejections() {
        let mut b = entry(12, b"a", 12);
        b.extend(entry(0, b"", 12));
        b.extend(entry(13, b"bcd", 1000));
        let v = collect(&b, 1024).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].name, b"bcd");
        // rec_len past the block
        let mut bad = b.clone();
        bad[4] = 0xFF;
        bad[5] = 0x7;
        assert!(collect(&bad, 1024)
            .unwrap_err()
            .to_string()
            .contains("impossible length"));
        // name longer than its record
        let mut bad = b.clone();
        bad[6] = 9;
        assert!(collect(&bad, 1024)
            .unwrap_err()
            .to_string()
            .contains("does not fit"));
    }

    #[test]
    fn rec_len_64k() {
        assert_eq!(rec_len(12, 65536), 12);
        assert_eq!(rec_len(0, 65536), 65536);
        assert_eq!(rec_len(u16::MAX, 65536), 65536);
        assert_eq!(rec_len(0xFFFC | 1, 65536), 0xFFFC + 65536);
    }
}
