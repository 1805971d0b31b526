//! ext2/ext3 block maps: twelve direct pointers, then single, double and triple indirect
//! blocks. A zero pointer is a hole (it reads as zeroes), at any level. The depth is fixed, so
//! a map cannot loop.

use diskkit::{Error, Result};

use super::bytes::le32;
use super::file::{Run, RunKind};
use super::Fs;

const DIRECT: u64 = 12;

/// Maps logical blocks through `i_block`'s pointers.
#[derive(Debug)]
pub(crate) struct IndirectMap {
    ino: u32,
    pointers: [u32; 15],
}

impl IndirectMap {
    pub(crate) fn new(ino: u32, pointers: [u32; 15]) -> IndirectMap {
        IndirectMap { ino, pointers }
    }

    fn check(&self, fs: &Fs, p: u32) -> Result<u64> {
        let p = u64::from(p);
        let sb = fs.sb();
        if p < u64::from(sb.first_data_block) || p >= sb.blocks_count {
            return Err(Error::corrupt(format!(
                "inode {}: block pointer {p} lies outside the filesystem ({} blocks)",
                self.ino, sb.blocks_count
            )));
        }
        Ok(p)
    }

    /// The run of blocks starting at logical block `lblk`.
    pub(crate) fn find(&mut self, fs: &Fs, lblk: u64) -> Result<Run> {
        let per = (fs.sb().block_size() / 4) as u64;
        // (first logical block of this level, blocks one top-level pointer covers, pointer)
        let mut start = DIRECT;
        if lblk < DIRECT {
            return self.scan(fs, &self.pointers[..12], lblk, lblk as usize, 1);
        }
        let mut span = per;
        for level in 0..3usize {
            let level_blocks = span;
            if lblk < start.saturating_add(level_blocks) {
                let top = self.pointers[12usize.saturating_add(level)];
                return self.descend(fs, top, lblk.saturating_sub(start), level_blocks, per, lblk);
            }
            start = start.saturating_add(level_blocks);
            span = span.saturating_mul(per);
        }
        Ok(Run {
            lblk,
            len: u64::MAX.saturating_sub(lblk),
            kind: RunKind::Hole,
        })
    }

    /// Follow pointer `p`, which covers `covers` blocks, to the block at offset `rel` in it.
    fn descend(
        &self,
        fs: &Fs,
        mut p: u32,
        mut rel: u64,
        mut covers: u64,
        per: u64,
        lblk: u64,
    ) -> Result<Run> {
        loop {
            if p == 0 {
                return Ok(Run {
                    lblk,
                    len: covers.saturating_sub(rel),
                    kind: RunKind::Hole,
                });
            }
            let b = self.check(fs, p)?;
            let data = fs.dev().block(b).map_err(|e| {
                Error::new(
                    e.kind(),
                    format!("inode {}: cannot read indirect block {b}", self.ino),
                )
                .with_source(e)
            })?;
            let child = covers.checked_div(per).unwrap_or(1).max(1);
            let i = rel.checked_div(child).unwrap_or(0) as usize;
            if child == 1 {
                let ptrs: Vec<u32> = (0..per as usize)
                    .map(|k| le32(&data, k.saturating_mul(4)))
                    .collect();
                return self.scan(fs, &ptrs, lblk, i, 1);
            }
            p = le32(&data, i.saturating_mul(4));
            rel = rel.checked_rem(child).unwrap_or(0);
            covers = child;
        }
    }

    /// A run from `ptrs[i]` on: contiguous data blocks or consecutive holes.
    fn scan(&self, fs: &Fs, ptrs: &[u32], lblk: u64, i: usize, _step: u64) -> Result<Run> {
        let first = ptrs.get(i).copied().unwrap_or(0);
        let rest = ptrs.get(i.saturating_add(1)..).unwrap_or_default();
        if first == 0 {
            let n = rest.iter().take_while(|&&p| p == 0).count();
            return Ok(Run {
                lblk,
                len: (n as u64).saturating_add(1),
                kind: RunKind::Hole,
            });
        }
        let start = self.check(fs, first)?;
        let mut len = 1u64;
        for &p in rest {
            if u64::from(p) != start.saturating_add(len) || p == 0 {
                break;
            }
            self.check(fs, p)?;
            len = len.saturating_add(1);
        }
        Ok(Run {
            lblk,
            len,
            kind: RunKind::Data(start),
        })
    }
}
