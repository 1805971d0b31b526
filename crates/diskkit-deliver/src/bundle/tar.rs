//! The part of the GNU tar format that bundles use: one 512-byte header per member, and for
//! sparse members the old GNU sparse format that `tar -S --format=gnu` writes.
//!
//! Written by hand because the `tar` crate cannot write sparse members at all, and when it
//! reads old GNU sparse members it fills the holes with zeroes as it reads (so a 50 GiB disk
//! with 1 GiB of data would be read, and written, as 50 GiB). Bundles also need a reader that
//! refuses everything but plain and sparse regular files, and checks every field it uses.
//!
//! Old GNU sparse member (typeflag `S`, magic `"ustar  \0"`): the header holds the file's real
//! size (`realsize`, offset 483) and up to four map entries (offset 386, each a 12-byte data
//! offset and a 12-byte length); when `isextended` (offset 482) is set, extension blocks
//! follow, each with 21 more entries and its own `isextended` flag at byte 504. The header's
//! `size` is the number of data bytes stored, which follow the last extension block: each
//! region's bytes in map order, back to back (every region but the last is a multiple of 512
//! bytes long, so each starts on a block boundary), padded to a whole block at the end. GNU tar
//! ends the map with an entry of length 0 at the real size. Numbers are octal text, or
//! base-256 (first byte 0x80, then big-endian) when octal does not fit, as for offsets and
//! sizes of 8 GiB and more.

use std::io::{self, Read, Write};

use crate::error::{Error, Result};

/// The tar block size.
pub(crate) const BLOCK: usize = 512;
/// Map entries in the main header and in each extension block.
const HEADER_ENTRIES: usize = 4;
const EXT_ENTRIES: usize = 21;
/// Most map entries accepted in one sparse member (16 bytes of memory each).
pub(crate) const MAX_SPARSE_ENTRIES: usize = 1 << 22;
/// GNU tar's record size: archives are padded with zeroes to a multiple of it.
const RECORD: u64 = 20 * BLOCK as u64;

/// A run of stored bytes of a member: `len` bytes at `offset` in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Region {
    /// Offset in the extracted file.
    pub(crate) offset: u64,
    /// Length in bytes.
    pub(crate) len: u64,
}

impl Region {
    pub(crate) fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// What a header says about a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    /// The name field, up to its first NUL (with a ustar prefix joined by `/`).
    pub(crate) name: Vec<u8>,
    /// The typeflag byte.
    pub(crate) typeflag: u8,
    /// Bytes of data stored in the archive after the header (and extension blocks).
    pub(crate) stored: u64,
    /// Whether the link name field is empty.
    pub(crate) has_link_name: bool,
    /// For a sparse member: the real size and the data regions (sorted, not overlapping,
    /// inside the real size, adding up to `stored`). For other members: `None`.
    pub(crate) sparse: Option<(u64, Vec<Region>)>,
}

impl Header {
    /// The member's file size (the real size of a sparse member).
    pub(crate) fn file_size(&self) -> u64 {
        self.sparse.as_ref().map_or(self.stored, |(size, _)| *size)
    }

    /// The regions holding data, in order: a sparse member's map, or all of a plain file.
    pub(crate) fn regions(&self) -> Vec<Region> {
        match &self.sparse {
            Some((_, r)) => r.iter().copied().filter(|r| r.len > 0).collect(),
            None if self.stored > 0 => vec![Region {
                offset: 0,
                len: self.stored,
            }],
            None => Vec::new(),
        }
    }

    /// A short description of the typeflag, for errors.
    pub(crate) fn type_name(&self) -> String {
        match self.typeflag {
            b'0' | 0 => "regular file".into(),
            b'S' => "sparse file".into(),
            b'1' => "hard link".into(),
            b'2' => "symbolic link".into(),
            b'3' => "character device".into(),
            b'4' => "block device".into(),
            b'5' => "directory".into(),
            b'6' => "FIFO".into(),
            b'7' => "contiguous file".into(),
            b'x' => "PAX extended header".into(),
            b'g' => "PAX global header".into(),
            b'L' => "GNU long name".into(),
            b'K' => "GNU long link name".into(),
            b'V' => "volume label".into(),
            b'M' => "multi-volume continuation".into(),
            b'D' => "GNU directory dump".into(),
            t => format!("entry of type {:?}", char::from(t)),
        }
    }
}

/// Parse a numeric field: octal text (leading spaces, ended by NUL or space) or GNU base-256.
pub(crate) fn parse_number(field: &[u8]) -> std::result::Result<u64, String> {
    if let Some(&first) = field.first() {
        if first & 0x80 != 0 {
            if first != 0x80 {
                return Err("negative or malformed base-256 number".into());
            }
            let mut v: u64 = 0;
            for &b in &field[1..] {
                v = v
                    .checked_mul(256)
                    .and_then(|v| v.checked_add(u64::from(b)))
                    .ok_or("base-256 number too large")?;
            }
            return Ok(v);
        }
    }
    let text = field;
    let start = text.iter().position(|&b| b != b' ').unwrap_or(text.len());
    let mut v: u64 = 0;
    let mut digits = 0;
    for &b in &text[start..] {
        match b {
            b'0'..=b'7' => {
                v = v
                    .checked_mul(8)
                    .and_then(|v| v.checked_add(u64::from(b - b'0')))
                    .ok_or("octal number too large")?;
                digits += 1;
            }
            0 | b' ' => break,
            _ => return Err(format!("bad character {:?} in a number", char::from(b))),
        }
    }
    if digits == 0 && text[start..].first().is_some_and(|&b| b != 0 && b != b' ') {
        return Err("empty number".into());
    }
    Ok(v)
}

/// Write `value` into a numeric field of `field.len()` bytes: octal text with a NUL when it
/// fits, base-256 otherwise (as GNU tar does).
fn put_number(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    if digits >= 22 || value < (1u64 << (3 * digits)) {
        let s = format!("{value:0digits$o}");
        field[..digits].copy_from_slice(s.as_bytes());
        field[digits] = 0;
    } else {
        field.fill(0);
        field[0] = 0x80;
        let be = value.to_be_bytes();
        let n = field.len();
        field[n - 8..].copy_from_slice(&be);
    }
}

fn checksum_ok(block: &[u8; BLOCK]) -> std::result::Result<bool, String> {
    let stored = parse_number(&block[148..156])?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    Ok(stored == unsigned || i64::try_from(stored).is_ok_and(|s| s == signed))
}

fn set_checksum(block: &mut [u8; BLOCK]) {
    block[148..156].fill(b' ');
    let sum: u64 = block.iter().map(|&b| u64::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    block[148..156].copy_from_slice(s.as_bytes());
}

fn field_str(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// Reads tar members from a stream, one header at a time; the caller reads each member's data
/// through [`TarReader::data`] and then calls [`TarReader::finish_member`].
pub(crate) struct TarReader<R> {
    inner: R,
    /// Data bytes of the current member not read yet.
    remaining: u64,
    /// Padding after the current member's data.
    padding: u64,
    /// Bytes of the archive consumed.
    position: u64,
}

impl<R: Read> TarReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        TarReader {
            inner,
            remaining: 0,
            padding: 0,
            position: 0,
        }
    }

    /// Bytes of the (decompressed) archive read so far.
    pub(crate) fn position(&self) -> u64 {
        self.position
    }

    fn read_block(&mut self, block: &mut [u8; BLOCK], what: &str) -> Result<bool> {
        let mut filled = 0;
        while filled < BLOCK {
            match self.inner.read(&mut block[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => {
                    return Err(Error::bundle(format!(
                        "the tar stream ends in the middle of {what} (at byte {})",
                        self.position + filled as u64
                    )))
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(stream_error(e, what)),
            }
        }
        self.position += BLOCK as u64;
        Ok(true)
    }

    /// The next member's header, or `None` at the end-of-archive marker (a zero block). A
    /// stream that ends without the marker is an error.
    pub(crate) fn next_header(&mut self) -> Result<Option<Header>> {
        debug_assert_eq!(self.remaining, 0);
        let mut block = [0u8; BLOCK];
        if !self.read_block(&mut block, "a tar header")? {
            return Err(Error::bundle(
                "the tar stream ends without an end-of-archive marker (truncated?)",
            ));
        }
        if block.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let at = self.position - BLOCK as u64;
        let bad = |m: String| Error::bundle(format!("bad tar header at byte {at}: {m}"));
        if !checksum_ok(&block).map_err(bad)? {
            return Err(bad("checksum mismatch".into()));
        }
        let gnu = &block[257..265] == b"ustar  \0";
        let ustar = &block[257..263] == b"ustar\0";
        if !gnu && !ustar {
            return Err(bad("not a ustar or GNU tar header".into()));
        }
        let mut name = field_str(&block[..100]).to_vec();
        if ustar {
            let prefix = field_str(&block[345..500]);
            if !prefix.is_empty() {
                let mut full = prefix.to_vec();
                full.push(b'/');
                full.extend_from_slice(&name);
                name = full;
            }
        }
        let typeflag = block[156];
        let stored = parse_number(&block[124..136]).map_err(|m| bad(format!("size: {m}")))?;
        let has_link_name = block[157] != 0;
        let sparse = if typeflag == b'S' {
            if !gnu {
                return Err(bad("a sparse member needs a GNU header".into()));
            }
            Some(self.read_sparse_map(&block, stored).map_err(|e| {
                let name = String::from_utf8_lossy(&name).into_owned();
                let msg = format!("member '{name}': {}", e.message().unwrap_or("bad sparse map"));
                e.with_message(msg)
            })?)
        } else {
            None
        };
        self.remaining = stored;
        self.padding = (BLOCK as u64 - stored % BLOCK as u64) % BLOCK as u64;
        Ok(Some(Header {
            name,
            typeflag,
            stored,
            has_link_name,
            sparse,
        }))
    }

    fn read_sparse_map(&mut self, header: &[u8; BLOCK], stored: u64) -> Result<(u64, Vec<Region>)> {
        let real_size =
            parse_number(&header[483..495]).map_err(|m| Error::bundle(format!("real size: {m}")))?;
        let mut regions = Vec::new();
        let mut push = |entry: &[u8]| -> Result<()> {
            if entry.iter().all(|&b| b == 0) {
                return Ok(());
            }
            let offset = parse_number(&entry[..12]).map_err(|m| Error::bundle(format!("sparse map: {m}")))?;
            let len = parse_number(&entry[12..24]).map_err(|m| Error::bundle(format!("sparse map: {m}")))?;
            if regions.len() >= MAX_SPARSE_ENTRIES {
                return Err(Error::bundle(format!(
                    "sparse map has more than {MAX_SPARSE_ENTRIES} entries"
                )));
            }
            regions.push(Region { offset, len });
            Ok(())
        };
        for i in 0..HEADER_ENTRIES {
            push(&header[386 + 24 * i..410 + 24 * i])?;
        }
        let mut extended = header[482] != 0;
        while extended {
            let mut block = [0u8; BLOCK];
            if !self.read_block(&mut block, "a sparse map extension block")? {
                return Err(Error::bundle("the tar stream ends in a sparse map"));
            }
            for i in 0..EXT_ENTRIES {
                push(&block[24 * i..24 * i + 24])?;
            }
            extended = block[504] != 0;
        }
        check_map(real_size, &regions, stored)?;
        Ok((real_size, regions))
    }

    /// The current member's data (exactly the header's stored size, then end of file).
    pub(crate) fn data(&mut self) -> MemberData<'_, R> {
        MemberData { reader: self }
    }

    /// Skip what is left of the current member's data and its padding.
    pub(crate) fn finish_member(&mut self) -> Result<()> {
        let mut buf = vec![0u8; 64 << 10];
        while self.remaining > 0 {
            let n = self.remaining.min(buf.len() as u64) as usize;
            self.data()
                .read_exact(&mut buf[..n])
                .map_err(|e| stream_error(e, "member data"))?;
        }
        let pad = self.padding as usize;
        if pad > 0 {
            read_exact_or(&mut self.inner, &mut buf[..pad], "member padding")?;
            self.position += pad as u64;
        }
        self.padding = 0;
        Ok(())
    }

    /// After the first zero block: check that the rest of the stream is zeroes (the second
    /// end-of-archive block and record padding) and not too long. Returns the inner reader.
    pub(crate) fn finish_archive(mut self, max_trailing: u64) -> Result<R> {
        let mut buf = vec![0u8; 64 << 10];
        let mut trailing = 0u64;
        loop {
            let n = match self.inner.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(stream_error(e, "the end of the archive")),
            };
            if n == 0 {
                break;
            }
            if buf[..n].iter().any(|&b| b != 0) {
                return Err(Error::bundle(
                    "data after the end-of-archive marker (only three members are allowed)",
                ));
            }
            trailing += n as u64;
            if trailing > max_trailing {
                return Err(Error::bundle(format!(
                    "more than {max_trailing} bytes of padding after the end of the archive"
                )));
            }
        }
        Ok(self.inner)
    }
}

/// A decompression or read error while parsing the tar stream: a damaged or truncated
/// compressed stream is the bundle's fault, other errors are I/O errors.
fn stream_error(e: io::Error, what: &str) -> Error {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            Error::bundle(format!("the stream ends in the middle of {what} (truncated?)")).with_source(e)
        }
        io::ErrorKind::InvalidData | io::ErrorKind::Other => {
            Error::bundle(format!("damaged compressed stream while reading {what}")).with_source(e)
        }
        _ => Error::io_while(e, format!("reading {what}")),
    }
}

fn read_exact_or(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result<()> {
    r.read_exact(buf).map_err(|e| stream_error(e, what))
}

/// Check a sparse map: sorted, not overlapping, inside the real size, every region but the
/// last (non-empty) one a multiple of the block size, and the lengths adding up to `stored`.
pub(crate) fn check_map(real_size: u64, regions: &[Region], stored: u64) -> Result<()> {
    let mut end = 0u64;
    let mut total = 0u64;
    let last_data = regions.iter().rposition(|r| r.len > 0);
    for (i, r) in regions.iter().enumerate() {
        let r_end = r
            .offset
            .checked_add(r.len)
            .ok_or_else(|| Error::bundle("sparse map entry overflows"))?;
        if r.offset < end {
            return Err(Error::bundle(format!(
                "sparse map entries overlap or are out of order (entry {i} at {})",
                r.offset
            )));
        }
        if r_end > real_size {
            return Err(Error::bundle(format!(
                "sparse map entry {i} ends at {r_end}, past the file's size {real_size}"
            )));
        }
        if r.len > 0 && Some(i) != last_data && r.len % BLOCK as u64 != 0 {
            return Err(Error::bundle(format!(
                "sparse map entry {i} is {} bytes long, not a multiple of 512",
                r.len
            )));
        }
        end = r_end;
        total = total
            .checked_add(r.len)
            .ok_or_else(|| Error::bundle("sparse map lengths overflow"))?;
    }
    if total != stored {
        return Err(Error::bundle(format!(
            "sparse map holds {total} bytes but the header stores {stored}"
        )));
    }
    Ok(())
}

/// Reads the current member's data.
pub(crate) struct MemberData<'a, R> {
    reader: &'a mut TarReader<R>,
}

impl<R: Read> Read for MemberData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = &mut *self.reader;
        if r.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min(r.remaining.min(usize::MAX as u64) as usize);
        let got = r.inner.read(&mut buf[..n])?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside a member's data",
            ));
        }
        r.remaining -= got as u64;
        r.position += got as u64;
        Ok(got)
    }
}

/// Writes a tar archive of plain and sparse members, in GNU format.
pub(crate) struct TarWriter<W: Write> {
    inner: W,
    written: u64,
    mtime: u64,
}

impl<W: Write> TarWriter<W> {
    pub(crate) fn new(inner: W, mtime: u64) -> Self {
        TarWriter {
            inner,
            written: 0,
            mtime,
        }
    }

    /// Write a member's header (and sparse map). `regions` are the data regions of a file of
    /// `size` bytes, sorted, aligned as [`check_map`] requires; when they cover the whole
    /// file the member is written as a plain file. The caller then writes exactly the
    /// regions' bytes in order with [`TarWriter::write_data`] and calls
    /// [`TarWriter::end_member`].
    pub(crate) fn begin_member(&mut self, name: &str, size: u64, regions: &[Region]) -> Result<()> {
        let stored: u64 = regions.iter().map(|r| r.len).sum();
        check_map(size, regions, stored)?;
        let mut block = [0u8; BLOCK];
        block[..name.len()].copy_from_slice(name.as_bytes());
        put_number(&mut block[100..108], 0o644);
        put_number(&mut block[108..116], 0);
        put_number(&mut block[116..124], 0);
        put_number(&mut block[124..136], stored);
        put_number(&mut block[136..148], self.mtime);
        block[257..265].copy_from_slice(b"ustar  \0");
        let dense = stored == size;
        let mut ext_blocks = Vec::new();
        if dense {
            block[156] = b'0';
        } else {
            block[156] = b'S';
            // GNU tar ends every map with an empty entry at the real size.
            let mut entries: Vec<Region> = regions.iter().copied().filter(|r| r.len > 0).collect();
            entries.push(Region { offset: size, len: 0 });
            put_number(&mut block[483..495], size);
            let (head, rest) = entries.split_at(entries.len().min(HEADER_ENTRIES));
            for (i, r) in head.iter().enumerate() {
                put_number(&mut block[386 + 24 * i..398 + 24 * i], r.offset);
                put_number(&mut block[398 + 24 * i..410 + 24 * i], r.len);
            }
            block[482] = u8::from(!rest.is_empty());
            let chunks: Vec<&[Region]> = rest.chunks(EXT_ENTRIES).collect();
            for (c, chunk) in chunks.iter().enumerate() {
                let mut ext = [0u8; BLOCK];
                for (i, r) in chunk.iter().enumerate() {
                    put_number(&mut ext[24 * i..24 * i + 12], r.offset);
                    put_number(&mut ext[24 * i + 12..24 * i + 24], r.len);
                }
                ext[504] = u8::from(c + 1 < chunks.len());
                ext_blocks.push(ext);
            }
        }
        set_checksum(&mut block);
        self.put(&block)?;
        for ext in &ext_blocks {
            self.put(ext)?;
        }
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.inner
            .write_all(bytes)
            .map_err(|e| Error::io_while(e, "writing the bundle"))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Write member data.
    pub(crate) fn write_data(&mut self, bytes: &[u8]) -> Result<()> {
        self.put(bytes)
    }

    /// Pad the member's data to a whole block.
    pub(crate) fn end_member(&mut self) -> Result<()> {
        let pad = (BLOCK as u64 - self.written % BLOCK as u64) % BLOCK as u64;
        self.put(&vec![0u8; pad as usize])
    }

    /// Write the end-of-archive marker and pad to a whole record, as GNU tar does.
    pub(crate) fn finish(mut self) -> Result<W> {
        self.put(&[0u8; 2 * BLOCK])?;
        let pad = (RECORD - self.written % RECORD) % RECORD;
        self.put(&vec![0u8; pad as usize])?;
        Ok(self.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_in_octal_and_base_256() {
        for v in [0u64, 1, 511, 0o77777777777, 1 << 33, 50 << 30, 10 << 40, u64::MAX] {
            let mut f = [0u8; 12];
            put_number(&mut f, v);
            assert_eq!(parse_number(&f).unwrap(), v, "{v}");
        }
        let mut f = [0u8; 8];
        put_number(&mut f, 0o644);
        assert_eq!(&f, b"0000644\0");
    }

    #[test]
    fn bad_numbers_are_refused() {
        assert!(parse_number(b"0000009\0").is_err());
        assert!(parse_number(&[0xff; 12]).is_err());
        assert!(parse_number(b"777777777777777777777777").is_err());
        assert_eq!(parse_number(b"   17 \0").unwrap(), 0o17);
        assert_eq!(parse_number(&[0u8; 12]).unwrap(), 0);
    }

    fn archive(members: &[(&str, u64, Vec<Region>)]) -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new(), 1_700_000_000);
        for (name, size, regions) in members {
            w.begin_member(name, *size, regions).unwrap();
            for r in regions {
                w.write_data(&vec![0xab; r.len as usize]).unwrap();
            }
            w.end_member().unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn sparse_members_round_trip_with_extension_blocks() {
        let regions: Vec<Region> = (0..30)
            .map(|i| Region {
                offset: i * 8192,
                len: 4096,
            })
            .chain(std::iter::once(Region {
                offset: 30 * 8192,
                len: 100,
            }))
            .collect();
        let data = archive(&[
            ("disk.img", 1 << 20, regions.clone()),
            ("m", 3, vec![Region { offset: 0, len: 3 }]),
        ]);
        assert_eq!(data.len() % RECORD as usize, 0);
        let mut r = TarReader::new(&data[..]);
        let h = r.next_header().unwrap().unwrap();
        assert_eq!(h.name, b"disk.img");
        assert_eq!(h.typeflag, b'S');
        assert_eq!(h.file_size(), 1 << 20);
        assert_eq!(h.regions(), regions);
        let mut d = Vec::new();
        r.data().read_to_end(&mut d).unwrap();
        assert_eq!(d.len() as u64, 30 * 4096 + 100);
        r.finish_member().unwrap();
        let h = r.next_header().unwrap().unwrap();
        assert_eq!((h.typeflag, h.file_size()), (b'0', 3));
        r.finish_member().unwrap();
        assert!(r.next_header().unwrap().is_none());
        r.finish_archive(1 << 20).unwrap();
    }

    #[test]
    fn maps_are_checked() {
        let r = |offset, len| Region { offset, len };
        assert!(check_map(100, &[r(0, 10)], 10).is_ok());
        assert!(
            check_map(100, &[r(0, 10), r(512, 10)], 20).is_err(),
            "unaligned middle"
        );
        assert!(
            check_map(1024, &[r(512, 512), r(0, 512)], 1024).is_err(),
            "out of order"
        );
        assert!(
            check_map(1024, &[r(0, 1024), r(512, 0)], 1024).is_err(),
            "overlap"
        );
        assert!(check_map(1024, &[r(512, 1024)], 1024).is_err(), "past the end");
        assert!(check_map(1024, &[r(0, 512)], 100).is_err(), "wrong total");
        assert!(check_map(u64::MAX, &[r(u64::MAX, 2)], 2).is_err(), "overflow");
    }

    #[test]
    fn truncated_and_corrupt_headers_are_errors() {
        let data = archive(&[("a", 3, vec![Region { offset: 0, len: 3 }])]);
        let mut r = TarReader::new(&data[..300]);
        assert!(r.next_header().is_err());
        let mut bad = data.clone();
        bad[0] = b'b';
        assert!(TarReader::new(&bad[..]).next_header().is_err(), "checksum");
        let mut r = TarReader::new(&data[..600]);
        r.next_header().unwrap().unwrap();
        assert!(r.finish_member().is_err(), "data cut short");
        let mut r = TarReader::new(&data[..1024]);
        r.next_header().unwrap();
        r.finish_member().unwrap();
        assert!(r.next_header().is_err(), "no end marker");
    }
}
