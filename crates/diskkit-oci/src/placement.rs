//! File data written straight to its final blocks in the output image while a layer is read.
//!
//! Every regular file gets a contiguous run of 4 KiB blocks from the data region (from
//! [`reserved_blocks`] on: the superblock and the largest possible descriptor table come
//! first), best fit among the runs earlier layers freed, otherwise from the end. Small files
//! that follow each other are gathered in one buffer and written together. When a layer is
//! done, the files no name reaches any more give their blocks back and the blocks are
//! discarded, so deleted content does not stay in the image and reads as zeroes again. The
//! ext4 writer then maps the files where they are ([`ContentSource::placed`]) and lays out its
//! metadata in the free blocks around them.
//!
//! The image grows as the data does (doubling, up to the limit); the caller sets its final
//! size once the filesystem is planned.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;

use diskkit::{DiskImage, Error, Result};
use diskkit_ext4::writer::{reserved_blocks, ContentSource, PlacedRun};

use crate::decode::Decoded;

const BLOCK: u64 = 4096;
/// Bytes gathered before one write to the image.
const BUFFER: usize = 1 << 20;
/// Files at least this large go to the image straight from the decoder's chunks (no copy);
/// smaller ones are gathered in the buffer.
const DIRECT: u64 = 64 << 10;
/// Size the image starts with (then doubled as needed).
const FIRST_SIZE: u64 = 64 << 20;
/// Most logical runs kept for one sparse file; beyond that it is stored dense.
const MAX_SPARSE_RUNS: usize = 1 << 16;

/// Where one file's data is: `blocks` blocks from `start` (none for an empty file).
#[derive(Clone, Copy, Debug)]
struct Slot {
    start: u64,
    blocks: u64,
    freed: bool,
}

/// Places file data in an image and remembers where (see the module docs).
pub(crate) struct Placer<'i> {
    image: &'i DiskImage,
    /// First block past every run handed out.
    end: u64,
    /// Blocks the filesystem may have.
    limit: u64,
    /// Whether the image has its final size already (`--size`): it never grows.
    fixed: bool,
    /// Freed runs below `end`: start → length, coalesced.
    free: BTreeMap<u64, u64>,
    /// The same runs by (length, start), for best fit.
    by_len: BTreeSet<(u64, u64)>,
    /// Content token → slot.
    slots: Vec<Slot>,
    /// Sparse files: token → logical runs (first block, length) stored one after the other
    /// from the slot's start.
    sparse: HashMap<u64, Vec<(u64, u64)>>,
    /// Gathered bytes for image offset `buf_at` on; `buf[..fill]` holds them.
    buf: Vec<u8>,
    buf_at: u64,
    fill: usize,
}

impl std::fmt::Debug for Placer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placer")
            .field("end", &self.end)
            .field("limit", &self.limit)
            .field("files", &self.slots.len())
            .field("free_runs", &self.free.len())
            .finish()
    }
}

fn truncated(done: u64, size: u64) -> Error {
    Error::corrupt(format!(
        "layer truncated: file data ended after {done} of {size} bytes"
    ))
}

fn read_err(e: std::io::Error, done: u64, size: u64) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        truncated(done, size)
    } else if e.raw_os_error().is_some() {
        Error::io(e).with_operation("reading file data from a layer")
    } else {
        Error::corrupt(format!("reading file data from a layer: {e}"))
    }
}

impl<'i> Placer<'i> {
    /// Place data in `image`, whose filesystem may have at most `limit_blocks` blocks. With
    /// `fixed`, the image already has its final size; otherwise it is grown as needed.
    pub(crate) fn new(image: &'i DiskImage, limit_blocks: u64, fixed: bool) -> Placer<'i> {
        Placer {
            image,
            end: reserved_blocks(limit_blocks),
            limit: limit_blocks,
            fixed,
            free: BTreeMap::new(),
            by_len: BTreeSet::new(),
            slots: Vec::new(),
            sparse: HashMap::new(),
            buf: Vec::new(),
            buf_at: 0,
            fill: 0,
        }
    }

    /// The size a new image should have before any data is placed.
    pub(crate) fn first_size(limit_blocks: u64) -> u64 {
        FIRST_SIZE.min(limit_blocks.saturating_mul(BLOCK))
    }

    /// `n > 0` contiguous blocks: the smallest freed run that holds them, else from the end.
    fn alloc(&mut self, n: u64) -> Result<u64> {
        if let Some(&(len, start)) = self.by_len.range((n, 0)..).next() {
            self.by_len.remove(&(len, start));
            self.free.remove(&start);
            if len > n {
                self.insert_free(start + n, len - n);
            }
            return Ok(start);
        }
        let start = self.end;
        let end = start.checked_add(n).filter(|&e| e <= self.limit).ok_or_else(|| {
            if self.fixed {
                Error::invalid_argument(format!(
                    "the content needs more than the requested size of {} bytes",
                    self.limit * BLOCK
                ))
            } else {
                Error::unsupported("filesystems over 16 TiB (needs the 64bit feature)")
            }
        })?;
        if !self.fixed && end * BLOCK > self.image.size() {
            let grown = (end * BLOCK).max(self.image.size().saturating_mul(2));
            self.image
                .resize(grown.min(self.limit * BLOCK))
                .map_err(|e| e.with_operation("growing the image"))?;
        }
        self.end = end;
        Ok(start)
    }

    fn insert_free(&mut self, start: u64, len: u64) {
        self.free.insert(start, len);
        self.by_len.insert((len, start));
    }

    fn remove_free(&mut self, start: u64) -> Option<u64> {
        let len = self.free.remove(&start)?;
        self.by_len.remove(&(len, start));
        Some(len)
    }

    /// Give `[start, start + len)` back, merging with its free neighbours and the end.
    fn release(&mut self, mut start: u64, mut len: u64) {
        if let Some((&s, &l)) = self.free.range(..start).next_back() {
            if s + l == start {
                self.remove_free(s);
                start = s;
                len += l;
            }
        }
        if let Some(l) = self.remove_free(start + len) {
            len += l;
        }
        if start + len == self.end {
            self.end = start;
        } else {
            self.insert_free(start, len);
        }
    }

    /// Write the gathered bytes (all-zero ones are left out: the blocks read as zeroes).
    fn flush(&mut self) -> Result<()> {
        if self.fill > 0 {
            let data = &self.buf[..self.fill];
            if data.iter().any(|&b| b != 0) {
                self.image
                    .write_at(data, self.buf_at)
                    .map_err(|e| e.with_operation("writing file data"))?;
            }
        }
        self.fill = 0;
        Ok(())
    }

    /// Copy exactly `size` bytes from `from` to image offset `at` through the buffer.
    fn copy_in(&mut self, from: &mut dyn Read, at: u64, size: u64) -> Result<()> {
        if self.buf.is_empty() {
            self.buf = vec![0; BUFFER];
        }
        if self.fill > 0 && self.buf_at + self.fill as u64 != at {
            self.flush()?;
        }
        if self.fill == 0 {
            self.buf_at = at;
        }
        let mut done = 0u64;
        while done < size {
            if self.fill == BUFFER {
                self.flush()?;
                self.buf_at = at + done;
            }
            let n = (size - done).min((BUFFER - self.fill) as u64) as usize;
            from.read_exact(&mut self.buf[self.fill..self.fill + n])
                .map_err(|e| read_err(e, done, size))?;
            self.fill += n;
            done += n as u64;
        }
        Ok(())
    }

    /// Zero the buffered bytes up to the next block boundary (the tail of a file's last block).
    fn pad(&mut self) {
        let end = (self.buf_at + self.fill as u64).next_multiple_of(BLOCK);
        let to = (end - self.buf_at) as usize;
        if to <= BUFFER {
            self.buf[self.fill..to].fill(0);
            self.fill = to;
        }
    }

    /// A new file of `blocks` blocks: its first block (0 when empty) and content token.
    fn new_file(&mut self, blocks: u64) -> Result<(u64, u64)> {
        let start = if blocks > 0 { self.alloc(blocks)? } else { 0 };
        self.slots.push(Slot {
            start,
            blocks,
            freed: false,
        });
        Ok((start, self.slots.len() as u64 - 1))
    }

    /// Place a file of `size` bytes read from `from`; returns its content token.
    pub(crate) fn place(&mut self, from: &mut dyn Read, size: u64) -> Result<u64> {
        let blocks = size.div_ceil(BLOCK);
        let (start, token) = self.new_file(blocks)?;
        if blocks > 0 {
            self.copy_in(from, start * BLOCK, size)?;
            self.pad();
        }
        Ok(token)
    }

    /// Place a file of `size` bytes that comes next in `data` (an external handle of the
    /// layer stream); returns its content token. Large files are written from the decoder's
    /// chunks as they are; small ones are gathered.
    pub(crate) fn place_from(&mut self, data: &Decoded, size: u64) -> Result<u64> {
        if size < DIRECT {
            return self.place(&mut &*data, size);
        }
        let (start, token) = self.new_file(size.div_ceil(BLOCK))?;
        self.flush()?;
        let image = self.image;
        let mut at = start * BLOCK;
        let mut failed: Option<Error> = None;
        let got = data.stream(size, &mut |slice| {
            // The blocks read as zeroes already: all-zero stretches stay holes.
            if slice.iter().any(|&b| b != 0) {
                if let Err(e) = image.write_at(slice, at) {
                    failed = Some(e.with_operation("writing file data"));
                    return Err(std::io::Error::other("write failed"));
                }
            }
            at += slice.len() as u64;
            Ok(())
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let got = got.map_err(|e| read_err(e, 0, size))?;
        if got != size {
            return Err(truncated(got, size));
        }
        Ok(token)
    }

    /// Place a sparse file of `real_size` bytes whose data `chunks` (offset, length;
    /// ascending, not overlapping) follow each other in `from`; only their blocks are stored.
    pub(crate) fn place_sparse(
        &mut self,
        from: &mut dyn Read,
        chunks: &[(u64, u64)],
        real_size: u64,
    ) -> Result<u64> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut end = 0u64;
        for &(off, n) in chunks {
            let chunk_end = off
                .checked_add(n)
                .filter(|&e| off >= end && e <= real_size)
                .ok_or_else(|| {
                    Error::corrupt(format!("bad sparse map entry {off}+{n} (size {real_size})"))
                })?;
            end = chunk_end;
            if n == 0 {
                continue;
            }
            let (b0, b1) = (off / BLOCK, chunk_end.div_ceil(BLOCK));
            match runs.last_mut() {
                Some(last) if b0 <= last.0 + last.1 => last.1 = b1 - last.0,
                _ => runs.push((b0, b1 - b0)),
            }
        }
        if runs.len() > MAX_SPARSE_RUNS {
            runs = vec![(0, real_size.div_ceil(BLOCK))];
        }
        let (start, token) = self.new_file(runs.iter().map(|r| r.1).sum())?;
        let mut run_i = 0usize;
        let mut base = start;
        for &(off, n) in chunks {
            if n == 0 {
                continue;
            }
            // Chunks come in order: move to the run holding this one.
            while run_i < runs.len() && off / BLOCK >= runs[run_i].0 + runs[run_i].1 {
                base += runs[run_i].1;
                run_i += 1;
            }
            // Every chunk lies in a run (the runs were made from the chunks).
            let first = runs.get(run_i).map_or(0, |r| r.0);
            let at = (base + off / BLOCK - first) * BLOCK + off % BLOCK;
            self.copy_in(from, at, n)?;
        }
        self.flush()?;
        if runs != [(0, real_size.div_ceil(BLOCK))] {
            self.sparse.insert(token, runs);
        }
        Ok(token)
    }

    /// Free the blocks of every placed file `live` does not name (called when a layer is
    /// done): they join the free runs and are discarded in the image.
    pub(crate) fn release_unreachable(&mut self, live: &[u64]) -> Result<()> {
        self.flush()?;
        let mut keep = vec![false; self.slots.len()];
        for &t in live {
            if let Some(k) = keep.get_mut(t as usize) {
                *k = true;
            }
        }
        let mut dead: Vec<(u64, u64)> = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if !keep[i] && !s.freed {
                s.freed = true;
                if s.blocks > 0 {
                    dead.push((s.start, s.blocks));
                }
                self.sparse.remove(&(i as u64));
            }
        }
        dead.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, n) in dead {
            match merged.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += n,
                _ => merged.push((s, n)),
            }
        }
        for (s, n) in merged {
            self.image
                .discard(s * BLOCK, n * BLOCK)
                .map_err(|e| e.with_operation("discarding deleted file data"))?;
            self.release(s, n);
        }
        Ok(())
    }

    /// Write what is still gathered; returns the first block past all placed data.
    pub(crate) fn finish(&mut self) -> Result<u64> {
        self.flush()?;
        Ok(self.end)
    }
}

impl ContentSource for Placer<'_> {
    fn read_content(&mut self, content: u64, offset: u64, _buf: &mut [u8]) -> Result<()> {
        // Every file is placed; the writer has nothing to copy.
        Err(Error::invalid_argument(format!(
            "content {content} (offset {offset}) was not placed"
        )))
    }

    fn placed(&mut self, content: u64, size: u64) -> Result<Option<Vec<PlacedRun>>> {
        let slot = self
            .slots
            .get(content as usize)
            .filter(|s| !s.freed)
            .ok_or_else(|| Error::invalid_argument(format!("no placed content {content}")))?;
        let runs = match self.sparse.get(&content) {
            Some(runs) => {
                let mut at = slot.start;
                runs.iter()
                    .map(|&(logical, len)| {
                        let r = PlacedRun {
                            logical,
                            physical: at,
                            len,
                        };
                        at += len;
                        r
                    })
                    .collect()
            }
            None if slot.blocks == size.div_ceil(BLOCK) => vec![PlacedRun {
                logical: 0,
                physical: slot.start,
                len: slot.blocks,
            }],
            None => {
                return Err(Error::invalid_argument(format!(
                    "content {content} holds {} blocks, not a file of {size} bytes",
                    slot.blocks
                )))
            }
        };
        Ok(Some(runs.into_iter().filter(|r| r.len > 0).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskkit::storage::MemStorage;
    use diskkit::CreateOptions;
    use std::sync::Arc;

    fn image(blocks: u64) -> DiskImage {
        DiskImage::create_on(
            Arc::new(MemStorage::new()),
            &CreateOptions::raw(Placer::first_size(blocks)),
        )
        .unwrap()
    }

    fn read(img: &DiskImage, block: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        img.read_at(&mut b, block * BLOCK).unwrap();
        b
    }

    #[test]
    fn files_are_packed_freed_and_reused() {
        let img = image(1 << 20);
        let mut p = Placer::new(&img, 1 << 20, false);
        let base = reserved_blocks(1 << 20);
        let a = p.place(&mut &[1u8; 5000][..], 5000).unwrap();
        let b = p.place(&mut &[2u8; 100][..], 100).unwrap();
        let c = p.place(&mut &[3u8; 9000][..], 9000).unwrap();
        let e = p.place(&mut &[][..], 0).unwrap();
        assert_eq!(p.placed(e, 0).unwrap(), Some(vec![]));
        p.release_unreachable(&[]).unwrap_or(());
        // (Everything was dropped above: start again.)
        assert_eq!(p.end, base);
        let a2 = p.place(&mut &[1u8; 5000][..], 5000).unwrap();
        let b2 = p.place(&mut &[2u8; 100][..], 100).unwrap();
        let c2 = p.place(&mut &[3u8; 9000][..], 9000).unwrap();
        p.finish().unwrap();
        let run = |p: &mut Placer<'_>, t, size| p.placed(t, size).unwrap().unwrap();
        assert_eq!(run(&mut p, a2, 5000)[0].physical, base);
        assert_eq!(run(&mut p, b2, 100)[0].physical, base + 2);
        assert_eq!(run(&mut p, c2, 9000)[0].physical, base + 3);
        assert_eq!(read(&img, base, 5000), vec![1u8; 5000]);
        // The tail of a file's last block is zero.
        assert_eq!(read(&img, base + 1, 4096)[904..], vec![0u8; 3192][..]);
        assert_eq!(read(&img, base + 2, 100), vec![2u8; 100]);
        // Free the middle file: its block is discarded and taken by the next file that fits.
        p.release_unreachable(&[a2, c2]).unwrap();
        assert_eq!(read(&img, base + 2, 100), vec![0u8; 100]);
        assert!(p.placed(b2, 100).is_err());
        let d = p.place(&mut &[4u8; 4096][..], 4096).unwrap();
        assert_eq!(run(&mut p, d, 4096)[0].physical, base + 2);
        // A file too large for any free run goes to the end.
        p.release_unreachable(&[a2, c2, d]).unwrap();
        let big = p.place(&mut &[5u8; 20000][..], 20000).unwrap();
        assert_eq!(run(&mut p, big, 20000)[0].physical, base + 6);
        p.finish().unwrap();
        assert_eq!(read(&img, base + 6, 20000), vec![5u8; 20000]);
        // Freeing the last files moves the end back down (and merges neighbours).
        p.release_unreachable(&[a2]).unwrap();
        assert_eq!(p.end, base + 2);
        assert!(p.free.is_empty() && p.by_len.is_empty());
        let _ = (a, b, c);
    }

    #[test]
    fn sparse_files_store_only_their_data_blocks() {
        let img = image(1 << 20);
        let mut p = Placer::new(&img, 1 << 20, false);
        let base = reserved_blocks(1 << 20);
        // Data at 0..10, 8192..8200 (same block as nothing else), 1 MiB..1 MiB+5000.
        let data: Vec<u8> = (0..10 + 8 + 5000).map(|i| (i % 250 + 1) as u8).collect();
        let chunks = [(0, 10), (8192, 8), (1 << 20, 5000)];
        let t = p.place_sparse(&mut data.as_slice(), &chunks, 4 << 20).unwrap();
        p.finish().unwrap();
        let runs = p.placed(t, 4 << 20).unwrap().unwrap();
        let want = [(0, base, 1), (2, base + 1, 1), (256, base + 2, 2)];
        assert_eq!(
            runs.iter()
                .map(|r| (r.logical, r.physical, r.len))
                .collect::<Vec<_>>(),
            want
        );
        assert_eq!(read(&img, base, 10), data[..10]);
        assert_eq!(read(&img, base + 1, 8), data[10..18]);
        assert_eq!(read(&img, base + 2, 5000), data[18..]);
        // A bad map is an error.
        assert!(p
            .place_sparse(&mut data.as_slice(), &[(10, 5), (0, 5)], 100)
            .is_err());
        assert!(p.place_sparse(&mut data.as_slice(), &[(90, 20)], 100).is_err());
    }

    #[test]
    fn truncated_data_and_limits_are_errors() {
        let img = image(1 << 20);
        let mut p = Placer::new(&img, 1 << 20, false);
        let e = p.place(&mut &[1u8; 10][..], 20).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        // Past the limit: a clear error, the image not grown beyond it.
        let mut small = Placer::new(&img, 100, true);
        let e = small.place(&mut std::io::repeat(1), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("requested size"), "{e}");
        // A large file taken straight from the stream, cut short.
        let d = Decoded::spawn(Box::new(std::io::Cursor::new(vec![7u8; 100_000])), None, false).unwrap();
        let e = p.place_from(&d.external(), 200_000).unwrap_err();
        assert!(e.to_string().contains("after 100000 of 200000"), "{e}");
        // Whole, it lands where the run starts.
        let d = Decoded::spawn(Box::new(std::io::Cursor::new(vec![8u8; 100_000])), None, false).unwrap();
        let t = p.place_from(&d.external(), 100_000).unwrap();
        let r = p.placed(t, 100_000).unwrap().unwrap();
        assert_eq!(read(&img, r[0].physical, 100_000), vec![8u8; 100_000]);
        // Growing: a file past the first size grows the image.
        let big = 80 << 20;
        p.place(&mut std::io::repeat(7).take(big), big).unwrap();
        p.finish().unwrap();
        assert!(img.size() >= big);
    }
}
