//! Apple's LZ4 framing (the Compression framework's `COMPRESSION_LZ4`), which tart uses
//! for each disk slice. It is not the LZ4 frame format: a stream is a sequence of blocks,
//!
//! - `bv41` + decoded size (u32 LE) + encoded size (u32 LE) + a raw LZ4 block,
//! - `bv4-` + size (u32 LE) + that many stored (uncompressed) bytes,
//!
//! ended by `bv4$`. A compressed block may copy from the 64 KiB of output before it
//! (Apple's encoder keeps its window across blocks), so the decoder keeps the last 64 KiB
//! of output as the dictionary of the next block. The encoder here writes blocks of at
//! most 64 KiB of input (as Apple's does), each compressed with the previous 64 KiB as its
//! dictionary; an all-zero block is written in a fixed form without dictionary, so that
//! an all-zero slice always encodes to the same bytes. `lz4_flex` does the raw blocks.

use std::io::{self, Read, Write};

/// Magic of a compressed block.
pub const COMPRESSED: [u8; 4] = *b"bv41";
/// Magic of a stored block.
pub const STORED: [u8; 4] = *b"bv4-";
/// Magic of the end of the stream.
pub const END: [u8; 4] = *b"bv4$";
/// Input bytes per block written.
pub const BLOCK: usize = 64 << 10;
/// The window a block may copy from.
const WINDOW: usize = 64 << 10;
/// The largest block the decoder accepts (decoded or encoded); other encoders use larger
/// blocks than Apple's 64 KiB (4 MiB is common).
pub const MAX_BLOCK: u32 = 64 << 20;

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Decodes an Apple LZ4 stream from a reader; reads the decoded bytes.
pub struct Decoder<R> {
    inner: R,
    /// Decoded bytes not yet handed out: `out[pos..]`.
    out: Vec<u8>,
    pos: usize,
    /// The last `WINDOW` bytes of output (the next block's dictionary).
    window: Vec<u8>,
    encoded: Vec<u8>,
    ended: bool,
    /// Bytes of the compressed stream consumed.
    consumed: u64,
    /// Bytes decoded so far.
    produced: u64,
}

impl<R: Read> Decoder<R> {
    /// A decoder reading the compressed stream from `inner`.
    pub fn new(inner: R) -> Self {
        Decoder {
            inner,
            out: Vec::new(),
            pos: 0,
            window: Vec::with_capacity(WINDOW),
            encoded: Vec::new(),
            ended: false,
            consumed: 0,
            produced: 0,
        }
    }

    /// Bytes decoded so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// After the end marker: check that nothing follows it.
    pub fn finish(mut self) -> io::Result<R> {
        if !self.ended {
            return Err(corrupt("the LZ4 stream has no end marker"));
        }
        let mut one = [0u8; 1];
        if read_full(&mut self.inner, &mut one)? != 0 {
            return Err(corrupt(format!(
                "data follows the end of the LZ4 stream (at byte {})",
                self.consumed
            )));
        }
        Ok(self.inner)
    }

    fn remember(&mut self, from: usize) {
        let new = &self.out[from..];
        if new.len() >= WINDOW {
            self.window.clear();
            self.window.extend_from_slice(&new[new.len() - WINDOW..]);
        } else {
            let keep = WINDOW - new.len();
            if self.window.len() > keep {
                self.window.drain(..self.window.len() - keep);
            }
            self.window.extend_from_slice(new);
        }
    }

    /// Decode the next block into `out`; false at the end marker.
    fn next_block(&mut self) -> io::Result<bool> {
        let at = self.consumed;
        let mut magic = [0u8; 4];
        let n = read_full(&mut self.inner, &mut magic)?;
        if n == 0 {
            return Err(corrupt(format!(
                "the LZ4 stream ends without its end marker (at byte {at})"
            )));
        }
        if n < 4 {
            return Err(corrupt(format!("the LZ4 stream is cut short (at byte {at})")));
        }
        self.consumed += 4;
        let mut u32_at = |what: &str| -> io::Result<u32> {
            let mut b = [0u8; 4];
            if read_full(&mut self.inner, &mut b)? < 4 {
                return Err(corrupt(format!(
                    "the LZ4 stream is cut short in a block header ({what}, at byte {at})"
                )));
            }
            self.consumed += 4;
            Ok(u32::from_le_bytes(b))
        };
        match magic {
            END => {
                self.ended = true;
                Ok(false)
            }
            STORED => {
                let size = u32_at("size")?;
                if size > MAX_BLOCK {
                    return Err(corrupt(format!(
                        "a stored LZ4 block of {size} bytes (at byte {at}) is too large"
                    )));
                }
                self.out.clear();
                self.out.resize(size as usize, 0);
                if read_full(&mut self.inner, &mut self.out)? < size as usize {
                    return Err(corrupt(format!(
                        "the LZ4 stream is cut short in a stored block (at byte {at})"
                    )));
                }
                self.consumed += u64::from(size);
                self.produced += u64::from(size);
                self.pos = 0;
                self.remember(0);
                Ok(true)
            }
            COMPRESSED => {
                let decoded = u32_at("decoded size")?;
                let encoded = u32_at("encoded size")?;
                if decoded > MAX_BLOCK || encoded > MAX_BLOCK {
                    return Err(corrupt(format!(
                        "an LZ4 block of {decoded} bytes ({encoded} encoded, at byte {at}) is too large"
                    )));
                }
                self.encoded.clear();
                self.encoded.resize(encoded as usize, 0);
                if read_full(&mut self.inner, &mut self.encoded)? < encoded as usize {
                    return Err(corrupt(format!(
                        "the LZ4 stream is cut short in a block (at byte {at})"
                    )));
                }
                self.consumed += u64::from(encoded);
                self.out.clear();
                self.out.resize(decoded as usize, 0);
                let n =
                    lz4_flex::block::decompress_into_with_dict(&self.encoded, &mut self.out, &self.window)
                        .map_err(|e| corrupt(format!("a damaged LZ4 block at byte {at}: {e}")))?;
                if n != decoded as usize {
                    return Err(corrupt(format!(
                        "an LZ4 block at byte {at} decodes to {n} bytes, not the {decoded} its header says"
                    )));
                }
                self.produced += u64::from(decoded);
                self.pos = 0;
                self.remember(0);
                Ok(true)
            }
            other => Err(corrupt(format!(
                "not an Apple LZ4 block at byte {at} (magic {other:02x?})"
            ))),
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.out.len() {
            if self.ended || !self.next_block()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Read until `buf` is full or the reader ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The encoding of one all-zero block of `len` bytes (no dictionary).
fn zero_block(len: usize) -> Vec<u8> {
    let zeros = vec![0u8; len];
    let payload = lz4_flex::block::compress(&zeros);
    let mut out = Vec::with_capacity(payload.len() + 12);
    out.extend_from_slice(&COMPRESSED);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Encodes into Apple's LZ4 framing, block by block, writing to `inner`.
pub struct Encoder<W: Write> {
    inner: W,
    /// Input not yet encoded (less than a block).
    pending: Vec<u8>,
    window: Vec<u8>,
    scratch: Vec<u8>,
    zero: Vec<u8>,
    written: u64,
}

impl<W: Write> Encoder<W> {
    /// An encoder writing to `inner`.
    pub fn new(inner: W) -> Self {
        Encoder {
            inner,
            pending: Vec::with_capacity(BLOCK),
            window: Vec::with_capacity(WINDOW),
            scratch: vec![0u8; lz4_flex::block::get_maximum_output_size(BLOCK)],
            zero: zero_block(BLOCK),
            written: 0,
        }
    }

    /// Compressed bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn emit(&mut self, block: &[u8]) -> io::Result<()> {
        if block.len() == BLOCK && crate::tart::is_zero(block) {
            self.inner.write_all(&self.zero)?;
            self.written += self.zero.len() as u64;
        } else {
            let n = lz4_flex::block::compress_into_with_dict(block, &mut self.scratch, &self.window)
                .map_err(|e| io::Error::other(format!("LZ4 compression failed: {e}")))?;
            if n >= block.len() {
                self.inner.write_all(&STORED)?;
                self.inner.write_all(&(block.len() as u32).to_le_bytes())?;
                self.inner.write_all(block)?;
                self.written += 8 + block.len() as u64;
            } else {
                self.inner.write_all(&COMPRESSED)?;
                self.inner.write_all(&(block.len() as u32).to_le_bytes())?;
                self.inner.write_all(&(n as u32).to_le_bytes())?;
                self.inner.write_all(&self.scratch[..n])?;
                self.written += 12 + n as u64;
            }
        }
        // The next block may copy from this one.
        if block.len() >= WINDOW {
            self.window.clear();
            self.window.extend_from_slice(&block[block.len() - WINDOW..]);
        } else {
            let keep = WINDOW - block.len();
            if self.window.len() > keep {
                self.window.drain(..self.window.len() - keep);
            }
            self.window.extend_from_slice(block);
        }
        Ok(())
    }

    /// Write the last block and the end marker; returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.pending.is_empty() {
            let p = std::mem::take(&mut self.pending);
            self.emit(&p)?;
        }
        self.inner.write_all(&END)?;
        self.written += 4;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let total = buf.len();
        if !self.pending.is_empty() {
            let take = (BLOCK - self.pending.len()).min(buf.len());
            self.pending.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.pending.len() == BLOCK {
                let p = std::mem::take(&mut self.pending);
                self.emit(&p)?;
                self.pending = p;
                self.pending.clear();
            }
        }
        while buf.len() >= BLOCK {
            self.emit(&buf[..BLOCK])?;
            buf = &buf[BLOCK..];
        }
        self.pending.extend_from_slice(buf);
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Encode `data` in one go.
pub fn encode(data: &[u8]) -> Vec<u8> {
    let mut e = Encoder::new(Vec::with_capacity(data.len() / 2 + 64));
    // Writing to a Vec cannot fail.
    let _ = e.write_all(data);
    e.finish().unwrap_or_default()
}

/// Decode a whole stream held in memory (at most `limit` decoded bytes).
pub fn decode(data: &[u8], limit: u64) -> io::Result<Vec<u8>> {
    let mut d = Decoder::new(data);
    let mut out = Vec::new();
    (&mut d).take(limit.saturating_add(1)).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(corrupt(format!(
            "the LZ4 stream decodes to more than {limit} bytes"
        )));
    }
    d.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raw LZ4 block of literals only: token, length bytes, the literals.
    fn literals(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let n = data.len();
        if n < 15 {
            out.push((n as u8) << 4);
        } else {
            out.push(0xF0);
            let mut rest = n - 15;
            while rest >= 255 {
                out.push(255);
                rest -= 255;
            }
            out.push(rest as u8);
        }
        out.extend_from_slice(data);
        out
    }

    fn block(magic: [u8; 4], decoded: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = magic.to_vec();
        v.extend_from_slice(&decoded.to_le_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// A stream built by hand from the documented format: a stored block, a compressed
    /// block of literals, a compressed block whose match copies from the previous blocks'
    /// output (the window), and the end marker.
    #[test]
    fn decodes_a_stream_built_from_the_format() {
        let mut s = STORED.to_vec();
        s.extend_from_slice(&16u32.to_le_bytes());
        s.extend_from_slice(b"HELLOWORLD123456");
        s.extend(block(COMPRESSED, 5, &literals(b"ABCDE")));
        // One literal 'X', then a match of 4 + 4 = 8 bytes at offset 22: back to the start
        // of the stored block's output ("HELLOWOR"); then 5 literal bytes to end the block.
        let mut p = vec![0x14, b'X', 22, 0];
        p.extend(literals(b"tail!"));
        s.extend(block(COMPRESSED, 1 + 8 + 5, &p));
        s.extend_from_slice(&END);
        let out = decode(&s, 1 << 20).unwrap();
        assert_eq!(out, b"HELLOWORLD123456ABCDEXHELLOWORtail!");
    }

    #[test]
    fn round_trips() {
        let mut data = Vec::new();
        for i in 0..300_000u32 {
            data.extend_from_slice(&(i / 7).to_le_bytes());
        }
        data.extend(vec![0u8; 3 * BLOCK + 17]);
        data.extend((0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
        let enc = encode(&data);
        assert!(enc.len() < data.len());
        assert_eq!(decode(&enc, data.len() as u64).unwrap(), data);
        assert_eq!(decode(&encode(&[]), 0).unwrap(), Vec::<u8>::new());
        // Deterministic: the same input gives the same bytes (so digests repeat).
        assert_eq!(encode(&data), enc);
        // All-zero input: a fixed, small encoding.
        let z = encode(&vec![0u8; 8 * BLOCK]);
        assert!(z.len() < 8 * 300, "{}", z.len());
        // Incompressible data is stored.
        let noise: Vec<u8> = (0..BLOCK as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8 ^ (i >> 3) as u8)
            .collect();
        let e = encode(&noise);
        assert_eq!(decode(&e, BLOCK as u64).unwrap(), noise);
    }

    #[test]
    fn refuses_damage() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let enc = encode(&data);
        for cut in [0, 3, 4, 11, 20, enc.len() - 4, enc.len() - 1] {
            assert!(decode(&enc[..cut], 1 << 30).is_err(), "cut at {cut}");
        }
        let mut trailing = enc.clone();
        trailing.push(0);
        assert!(decode(&trailing, 1 << 30).is_err());
        let mut bad = enc.clone();
        bad[0] = b'x';
        assert!(decode(&bad, 1 << 30).is_err());
        // A header that claims a huge block.
        let mut huge = COMPRESSED.to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&4u32.to_le_bytes());
        assert!(decode(&huge, 1 << 30).is_err());
        // A match reaching before the start of the output.
        let s = [block(COMPRESSED, 9, &[0x10, b'X', 9, 0, 0x00]), END.to_vec()].concat();
        assert!(decode(&s, 100).is_err());
        // Decoded size that disagrees with the block.
        let s = [block(COMPRESSED, 9, &literals(b"abc")), END.to_vec()].concat();
        assert!(decode(&s, 100).is_err());
        assert!(decode(&enc, 10).is_err());
    }
}
