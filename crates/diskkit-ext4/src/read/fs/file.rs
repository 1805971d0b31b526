//! File contents: logical blocks mapped through extents, block pointers or inline data, with
//! holes and unwritten extents reading as zeroes, past the last mapped block up to `i_size`
//! too.

use diskkit::{Error, ErrorKind, Result};

use super::extent::ExtentMap;
use super::indirect::IndirectMap;
use super::inode::{FileType, Inode};
use super::Fs;

/// What a run of logical blocks holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunKind {
    /// Data starting at this filesystem block.
    Data(u64),
    /// Allocated but never written: reads as zeroes.
    Unwritten,
    /// Not allocated: reads as zeroes.
    Hole,
}

/// `len` logical blocks from `lblk` that map the same way.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    /// First logical block (kept for debugging output).
    #[allow(dead_code)]
    pub(crate) lblk: u64,
    pub(crate) len: u64,
    pub(crate) kind: RunKind,
}

/// How a file's blocks are found.
#[derive(Debug)]
pub(crate) enum BlockMap {
    Extents(Box<ExtentMap>),
    Indirect(IndirectMap),
}

impl BlockMap {
    pub(crate) fn new(fs: &Fs, inode: &Inode) -> Result<BlockMap> {
        if inode.uses_extents() {
            Ok(BlockMap::Extents(Box::new(ExtentMap::new(
                fs,
                inode.ino,
                inode.generation,
                &inode.block,
            )?)))
        } else {
            Ok(BlockMap::Indirect(IndirectMap::new(
                inode.ino,
                inode.block_pointers(),
            )))
        }
    }

    pub(crate) fn find(&mut self, fs: &Fs, lblk: u64) -> Result<Run> {
        match self {
            BlockMap::Extents(m) => m.find(fs, lblk),
            BlockMap::Indirect(m) => m.find(fs, lblk),
        }
    }
}

enum Source {
    Blocks(BlockMap),
    Inline(Vec<u8>),
}

/// Reads one file's contents at any offset.
pub struct FileReader {
    fs: Fs,
    ino: u32,
    size: u64,
    source: Source,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for FileReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileReader")
            .field("ino", &self.ino)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl FileReader {
    pub(crate) fn new(fs: &Fs, inode: &Inode) -> Result<FileReader> {
        if inode.is_encrypted() && inode.file_type != FileType::Directory {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "inode {}: the contents are encrypted (fscrypt) and cannot be read without the key",
                    inode.ino
                ),
            ));
        }
        let max = fs
            .sb()
            .max_file_blocks()
            .saturating_mul(fs.sb().block_size() as u64);
        if inode.size > max {
            return Err(Error::corrupt(format!(
                "inode {} is corrupt: its size {} is larger than any file the filesystem can hold ({max} bytes)",
                inode.ino, inode.size
            )));
        }
        let source = if inode.has_inline_data() {
            Source::Inline(fs.inline_data(inode)?)
        } else {
            Source::Blocks(BlockMap::new(fs, inode)?)
        };
        Ok(FileReader {
            fs: fs.clone(),
            ino: inode.ino,
            size: inode.size,
            source,
            scratch: Vec::new(),
        })
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fill `buf` from byte `offset`; returns the bytes read (short only at the end of file).
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let end = offset.saturating_add(buf.len() as u64).min(self.size);
        if offset >= end {
            return Ok(0);
        }
        let want = end.saturating_sub(offset) as usize;
        let buf = &mut buf[..want];
        match &mut self.source {
            Source::Inline(data) => {
                // Past the inline area the kernel reads zeroes (up to i_size).
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                let have = data.get(start..).unwrap_or_default();
                let n = have.len().min(want);
                buf[..n].copy_from_slice(&have[..n]);
                buf[n..].fill(0);
                Ok(want)
            }
            Source::Blocks(map) => {
                read_blocks(&self.fs, self.ino, map, &mut self.scratch, offset, buf)?;
                Ok(want)
            }
        }
    }
}

/// Largest single device read for file data.
const MAX_READ: usize = 4 << 20;

fn read_blocks(
    fs: &Fs,
    ino: u32,
    map: &mut BlockMap,
    scratch: &mut Vec<u8>,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    let bs = fs.sb().block_size();
    let bs64 = bs as u64;
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset.saturating_add(done as u64);
        let lblk = pos.checked_div(bs64).unwrap_or(0);
        let in_block = pos.checked_rem(bs64).unwrap_or(0) as usize;
        let run = map
            .find(fs, lblk)
            .map_err(|e| e.with_operation("mapping file blocks"))?;
        let run_bytes = run.len.saturating_mul(bs64).saturating_sub(in_block as u64);
        let take = usize::try_from(run_bytes)
            .unwrap_or(usize::MAX)
            .min(buf.len().saturating_sub(done))
            .min(MAX_READ);
        let Some(out) = buf.get_mut(done..done.saturating_add(take)) else {
            break;
        };
        match run.kind {
            RunKind::Hole | RunKind::Unwritten => out.fill(0),
            RunKind::Data(pblk) => {
                if in_block == 0 && take.checked_rem(bs) == Some(0) {
                    fs.dev().read_blocks(pblk, out)?;
                } else {
                    // Read the whole blocks covering the range, then copy the part wanted.
                    let nblocks = in_block.saturating_add(take).div_ceil(bs);
                    scratch.resize(nblocks.saturating_mul(bs), 0);
                    fs.dev().read_blocks(pblk, scratch).map_err(|e| {
                        Error::new(e.kind(), format!("inode {ino}: cannot read data block {pblk}"))
                            .with_source(e)
                    })?;
                    let part = scratch
                        .get(in_block..in_block.saturating_add(take))
                        .unwrap_or_default();
                    out.copy_from_slice(part);
                }
            }
        }
        done = done.saturating_add(take);
    }
    Ok(())
}

impl Fs {
    /// A reader for the contents of a regular file, symlink or directory.
    pub fn open_file(&self, inode: &Inode) -> Result<FileReader> {
        FileReader::new(self, inode)
    }
}
