//! The spool: a temporary file holding every regular file's bytes, in archive order.
//!
//! Only files spooled with [`Spool::append_sparse`] have holes, and only they are looked up with
//! `SEEK_DATA`/`SEEK_HOLE`: on tmpfs a `SEEK_HOLE` walks the page cache to the next hole, which
//! for a dense spool is its end, so asking it for every file would make the writer quadratic.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use diskkit::{Error, Result};
use diskkit_ext4::writer::ContentSource;

/// Appends file contents to an unnamed temporary file and reads them back by offset.
#[derive(Debug)]
pub struct Spool {
    writer: BufWriter<File>,
    reader: File,
    len: u64,
    /// (start, length) of every sparse file, ascending and not overlapping.
    sparse: Vec<(u64, u64)>,
}

impl Spool {
    /// A new spool in `dir` (the file is unlinked at once and vanishes on drop).
    pub fn new_in(dir: &Path) -> Result<Spool> {
        let file = tempfile::tempfile_in(dir).map_err(|e| {
            Error::io(e)
                .with_path(dir)
                .with_operation("creating the spool file")
        })?;
        let reader = file
            .try_clone()
            .map_err(|e| Error::io(e).with_operation("creating the spool file"))?;
        Ok(Spool {
            writer: BufWriter::with_capacity(1 << 20, file),
            reader,
            len: 0,
            sparse: Vec::new(),
        })
    }

    /// Copy exactly `size` bytes from `from` into the spool; returns their offset.
    pub fn append(&mut self, from: &mut dyn Read, size: u64) -> Result<u64> {
        let start = self.len;
        let copied = std::io::copy(&mut from.take(size), &mut self.writer).map_err(|e| {
            if e.raw_os_error().is_some() {
                Error::io(e).with_operation("spooling file data")
            } else {
                Error::corrupt(format!("reading file data from a layer: {e}"))
            }
        })?;
        if copied != size {
            return Err(Error::corrupt(format!(
                "layer truncated: file data ended after {copied} of {size} bytes"
            )));
        }
        self.len += size;
        Ok(start)
    }

    /// Spool a sparse file of `real_size` bytes whose data `chunks` (offset, length; ascending,
    /// not overlapping) follow each other in `from`; the gaps become holes. Returns the offset.
    pub fn append_sparse(
        &mut self,
        from: &mut dyn Read,
        chunks: &[(u64, u64)],
        real_size: u64,
    ) -> Result<u64> {
        let start = self.len;
        let mut end = 0u64;
        for &(off, n) in chunks {
            let chunk_end = off
                .checked_add(n)
                .filter(|&e| off >= end && e <= real_size)
                .ok_or_else(|| {
                    Error::corrupt(format!("bad sparse map entry {off}+{n} (size {real_size})"))
                })?;
            let at = start + off;
            self.writer
                .seek(SeekFrom::Start(at))
                .map_err(|e| Error::io(e).with_operation("seeking in the spool file"))?;
            self.len = at;
            self.append(from, n)?;
            end = chunk_end;
        }
        self.len = start
            .checked_add(real_size)
            .ok_or_else(|| Error::corrupt("sparse file too large"))?;
        self.writer
            .flush()
            .map_err(|e| Error::io(e).with_operation("writing the spool file"))?;
        let file = self.writer.get_ref();
        let cur = file
            .metadata()
            .map_err(|e| Error::io(e).with_operation("writing the spool file"))?
            .len();
        if cur < self.len {
            file.set_len(self.len)
                .map_err(|e| Error::io(e).with_operation("extending the spool file"))?;
        }
        self.writer
            .seek(SeekFrom::Start(self.len))
            .map_err(|e| Error::io(e).with_operation("seeking in the spool file"))?;
        if real_size > 0 {
            self.sparse.push((start, real_size));
        }
        Ok(start)
    }

    /// The sparse file whose bytes contain spool offset `at`, if any.
    fn sparse_at(&self, at: u64) -> Option<(u64, u64)> {
        let i = self.sparse.partition_point(|&(s, _)| s <= at).checked_sub(1)?;
        let (s, n) = self.sparse[i];
        (at - s < n).then_some((s, n))
    }

    /// Bytes spooled so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was spooled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Flush buffered bytes so they can be read back.
    pub fn finish(&mut self) -> Result<()> {
        self.writer
            .flush()
            .map_err(|e| Error::io(e).with_operation("writing the spool file"))
    }
}

/// Most data ranges reported for one file.
const MAX_RANGES: usize = 1 << 16;

impl ContentSource for Spool {
    /// Data ranges of a spooled file from `SEEK_DATA`/`SEEK_HOLE`: the holes of sparse files
    /// become holes in the ext4 file.
    fn data_ranges(&mut self, content: u64, size: u64) -> Result<Option<Vec<(u64, u64)>>> {
        use rustix::fs::{seek, SeekFrom};
        // A dense file is one range: `None` says so without a system call.
        if self.sparse_at(content).is_none() {
            return Ok(None);
        }
        let Some(end) = content.checked_add(size).filter(|&e| e <= self.len) else {
            return Ok(None);
        };
        let mut ranges = Vec::new();
        let mut pos = content;
        while pos < end {
            let data = match seek(&self.reader, SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => break,
                Err(_) => return Ok(None),
            };
            if data >= end {
                break;
            }
            let hole = match seek(&self.reader, SeekFrom::Hole(data)) {
                Ok(h) => h.min(end),
                Err(_) => return Ok(None),
            };
            if hole <= data || ranges.len() >= MAX_RANGES {
                return Ok(None);
            }
            ranges.push((data - content, hole - data));
            pos = hole;
        }
        Ok(Some(ranges))
    }

    /// Holes of the spool file (sparse files) are zeroes: found with `SEEK_DATA`, so a sparse
    /// file costs nothing to write however large it claims to be.
    fn is_zero(&mut self, content: u64, offset: u64, len: u64) -> Result<bool> {
        let Some(at) = content.checked_add(offset) else {
            return Ok(false);
        };
        // Only sparse files have holes in the spool.
        if self.sparse_at(at).is_none() {
            return Ok(false);
        }
        match rustix::fs::seek(&self.reader, rustix::fs::SeekFrom::Data(at)) {
            Ok(next) => Ok(next >= at.saturating_add(len)),
            // No data at or after `at`: the rest of the file is a hole.
            Err(rustix::io::Errno::NXIO) => Ok(true),
            // Filesystems without SEEK_DATA: read the bytes instead.
            Err(_) => Ok(false),
        }
    }

    fn read_content(&mut self, content: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let at = content
            .checked_add(offset)
            .filter(|a| a.saturating_add(buf.len() as u64) <= self.len)
            .ok_or_else(|| Error::out_of_bounds("spool read past its end"))?;
        self.reader.read_exact_at(buf, at).map_err(|e| {
            Error::io(e)
                .with_offset(at)
                .with_operation("reading the spool file")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sparse_files_report_holes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::new_in(dir.path()).unwrap();
        let dense = vec![0u8; 3 << 20];
        let a = s.append(&mut dense.as_slice(), dense.len() as u64).unwrap();
        let data = vec![7u8; 4096];
        let b = s
            .append_sparse(&mut data.as_slice(), &[(1 << 20, 4096)], 4 << 20)
            .unwrap();
        let c = s.append(&mut &b"tail"[..], 4).unwrap();
        s.finish().unwrap();
        // A dense file is stored dense even when it is all zeroes (as `tar` gives it).
        assert_eq!(s.data_ranges(a, 3 << 20).unwrap(), None);
        assert!(!s.is_zero(a, 0, 4096).unwrap());
        assert_eq!(s.data_ranges(c, 4).unwrap(), None);
        // The sparse file's holes are found (whole pages around its one data page).
        let r = s.data_ranges(b, 4 << 20).unwrap().unwrap();
        assert!(r
            .iter()
            .all(|&(o, n)| o <= 1 << 20 && o + n >= (1 << 20) + 4096 && n < 1 << 20));
        assert!(s.is_zero(b, 0, 4096).unwrap());
        assert!(!s.is_zero(b, 1 << 20, 4096).unwrap());
        let mut buf = [0u8; 4];
        s.read_content(c, 0, &mut buf).unwrap();
        assert_eq!(&buf, b"tail");
    }
}
