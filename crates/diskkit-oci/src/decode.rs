//! Reading a layer blob on its own thread: hashing the blob, sniffing and decompressing
//! (gzip, zstd or plain) and handing the uncompressed stream over in chunks, so decompression
//! runs on one core while the tar entries are parsed and their data written on another. The
//! uncompressed stream of a compressed blob (its diff_id) is hashed on a third thread, which
//! gets each chunk once the reader is done with it and then hands the buffer back to the
//! decoder for reuse: three threads with a bounded number of chunks in flight, so the kernel
//! can share the cores between decompression, hashing and writing as the load shifts.

use std::cell::RefCell;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::rc::Rc;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

/// Chunks in flight between the threads (each up to `CHUNK` bytes): 16 MiB, deep enough that
/// no thread waits while the scheduler shares two cores among four (8 was ~5% slower).
const DEPTH: usize = 32;
const CHUNK: usize = 512 << 10;

/// SHA-256 hex digests and sizes of the blob and of its uncompressed stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Digests {
    pub(crate) blob: String,
    pub(crate) blob_bytes: u64,
    pub(crate) diff: String,
}

enum Msg {
    /// Whether the blob is compressed (the first message unless reading fails at once).
    Compressed(bool),
    /// A chunk of the uncompressed stream and the blob bytes read so far.
    Data(Vec<u8>, u64),
    Fail(std::io::Error),
}

/// What the decoder thread returns: the blob's digest and size.
struct BlobDigest {
    hex: String,
    bytes: u64,
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A reader that hashes and counts what passes through it.
struct Hashing<R> {
    inner: R,
    state: Arc<Mutex<(Sha256, u64)>>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        // A poisoned lock only means another reader panicked; the data is still consistent.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0.update(&buf[..n]);
        s.1 += n as u64;
        Ok(n)
    }
}

/// Fill `buf` from `r` as far as it goes; returns the bytes read (fewer only at the end).
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Compressed bytes read (and hashed) per chunk by the read thread.
const READ_CHUNK: usize = 1 << 20;
/// Compressed chunks in flight.
const READ_DEPTH: usize = 8;

/// A compressed blob read and hashed on its own thread and handed to the decompressor in
/// chunks: the blob's hash then does not slow decompression down.
struct Prefetched {
    rx: Option<Receiver<std::io::Result<Vec<u8>>>>,
    /// Buffers handed back to the read thread.
    spare: SyncSender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    handle: Option<JoinHandle<()>>,
}

impl Prefetched {
    fn spawn(mut from: BufReader<Hashing<Box<dyn Read + Send>>>) -> std::io::Result<Prefetched> {
        let (tx, rx) = sync_channel(READ_DEPTH);
        let (spare, spare_rx) = sync_channel::<Vec<u8>>(READ_DEPTH + 2);
        let handle = std::thread::Builder::new()
            .name("layer-read".into())
            .spawn(move || {
                // First what sniffing the magic buffered, then chunks read straight.
                let first = from.buffer().to_vec();
                from.consume(first.len());
                if tx.send(Ok(first)).is_err() {
                    return;
                }
                let mut inner = from.into_inner();
                loop {
                    // A buffer the decompressor is done with, or a new one while filling up.
                    let mut buf = spare_rx.try_recv().unwrap_or_default();
                    buf.resize(READ_CHUNK, 0);
                    let filled = match read_full(&mut inner, &mut buf) {
                        Ok(n) => n,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    if filled == 0 {
                        return;
                    }
                    buf.truncate(filled);
                    if tx.send(Ok(buf)).is_err() {
                        return; // the decompressor gave up
                    }
                }
            })?;
        Ok(Prefetched {
            rx: Some(rx),
            spare,
            cur: Vec::new(),
            pos: 0,
            handle: Some(handle),
        })
    }
}

impl Read for Prefetched {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = {
            let have = self.fill_buf()?;
            let n = have.len().min(buf.len());
            buf[..n].copy_from_slice(&have[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Prefetched {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.pos == self.cur.len() {
            let Some(rx) = &self.rx else { break };
            match rx.recv() {
                Ok(Ok(v)) => {
                    let done = std::mem::replace(&mut self.cur, v);
                    // The read thread may have finished; then the buffer is simply freed.
                    let _ = self.spare.try_send(done);
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    self.rx = None; // end of the blob
                }
            }
        }
        Ok(&self.cur[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.cur.len());
    }
}

impl Drop for Prefetched {
    fn drop(&mut self) {
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn produce(
    blob: Box<dyn Read + Send>,
    digest_checked: bool,
    tx: &SyncSender<Msg>,
    spare: &Receiver<Vec<u8>>,
) -> Option<BlobDigest> {
    let state = Arc::new(Mutex::new((Sha256::new(), 0u64)));
    let mut buffered = BufReader::with_capacity(
        1 << 20,
        Hashing {
            inner: blob,
            state: state.clone(),
        },
    );
    let fail = |e: std::io::Error| {
        let _ = tx.send(Msg::Fail(e));
        None
    };
    let magic = match buffered.fill_buf() {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let gzip = magic.starts_with(&[0x1f, 0x8b]);
    let zstd = magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
    let mut decoded: Box<dyn Read> = if gzip || zstd {
        let input = match Prefetched::spawn(buffered) {
            Ok(p) => p,
            Err(e) => return fail(e),
        };
        if gzip {
            Box::new(flate2::bufread::MultiGzDecoder::new(input))
        } else {
            let mut d = match zstd::stream::read::Decoder::with_buffer(input) {
                Ok(d) => d,
                Err(e) => return fail(e),
            };
            // A frame's XXH64 checksum guards the decompressed bytes; when the blob digest or
            // the diff_id is checked anyway it adds nothing but CPU (~3% of decoding).
            if digest_checked {
                if let Err(e) = d.set_parameter(zstd::zstd_safe::DParameter::ForceIgnoreChecksum(true)) {
                    return fail(e);
                }
            }
            Box::new(d)
        }
    } else {
        Box::new(buffered)
    };
    if tx.send(Msg::Compressed(gzip || zstd)).is_err() {
        return None;
    }
    loop {
        // Reuse a buffer the reader is done with; a new one only while the pipeline fills.
        let mut buf = spare.try_recv().unwrap_or_default();
        buf.resize(CHUNK, 0);
        let filled = match read_full(&mut decoded, &mut buf) {
            Ok(n) => n,
            Err(e) => return fail(e),
        };
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        let read = state.lock().unwrap_or_else(|p| p.into_inner()).1;
        if tx.send(Msg::Data(buf, read)).is_err() {
            return None; // the reader gave up
        }
    }
    drop(decoded);
    let s = state.lock().unwrap_or_else(|p| p.into_inner());
    Some(BlobDigest {
        hex: hex(&s.0.clone().finalize()),
        bytes: s.1,
    })
}

/// The thread hashing the uncompressed stream of a compressed blob.
struct DiffHasher {
    tx: Option<SyncSender<Vec<u8>>>,
    handle: JoinHandle<String>,
}

impl DiffHasher {
    /// Hash every chunk sent, in order, then pass the buffer on to `spare`.
    fn spawn(spare: SyncSender<Vec<u8>>) -> std::io::Result<DiffHasher> {
        let (tx, rx) = sync_channel::<Vec<u8>>(DEPTH);
        let handle = std::thread::Builder::new()
            .name("layer-hash".into())
            .spawn(move || {
                let mut h = Sha256::new();
                for buf in rx {
                    h.update(&buf);
                    // The decoder may have gone; then the buffer is simply freed.
                    let _ = spare.try_send(buf);
                }
                hex(&h.finalize())
            })?;
        Ok(DiffHasher { tx: Some(tx), handle })
    }

    /// The digest of everything sent.
    fn finish(mut self) -> std::io::Result<String> {
        self.tx = None;
        self.handle
            .join()
            .map_err(|_| std::io::Error::other("the diff_id hasher stopped"))
    }
}

/// The receiving end of the decoder: chunks in order, the position in the stream, and the
/// hasher of the uncompressed stream.
struct Stream {
    rx: Option<Receiver<Msg>>,
    /// Buffers handed back to the decoder.
    spare: SyncSender<Vec<u8>>,
    handle: Option<JoinHandle<Option<BlobDigest>>>,
    cur: Vec<u8>,
    pos: usize,
    /// Bytes of the stream consumed so far.
    offset: u64,
    /// Bytes consumed through an [`Decoded::external`] handle since the archive last moved.
    stolen: u64,
    progress: Option<Rc<dyn Fn(u64)>>,
    /// Hashes the uncompressed stream (compressed blobs only; a plain blob is its own).
    diff: Option<DiffHasher>,
}

impl Stream {
    /// Make sure the current chunk has unread bytes; false at the end of the stream.
    fn fill(&mut self) -> std::io::Result<bool> {
        while self.pos == self.cur.len() {
            let Some(rx) = &self.rx else { return Ok(false) };
            match rx.recv() {
                Ok(Msg::Compressed(c)) => {
                    if c {
                        self.diff = Some(DiffHasher::spawn(self.spare.clone())?);
                    }
                }
                Ok(Msg::Data(v, read)) => {
                    if let Some(p) = &self.progress {
                        p(read);
                    }
                    let done = std::mem::replace(&mut self.cur, v);
                    match self.diff.as_ref().and_then(|d| d.tx.as_ref()) {
                        Some(tx) => {
                            if !done.is_empty() && tx.send(done).is_err() {
                                return Err(std::io::Error::other("the diff_id hasher stopped"));
                            }
                        }
                        // The decoder may have gone; then the buffer is simply freed.
                        None => {
                            let _ = self.spare.try_send(done);
                        }
                    }
                    self.pos = 0;
                }
                Ok(Msg::Fail(e)) => return Err(e),
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Hand up to `n` bytes to `f`, slice by slice, without copying; returns the count.
    fn consume(&mut self, n: u64, f: &mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<u64> {
        let mut done = 0u64;
        while done < n && self.fill()? {
            let k = (n - done).min((self.cur.len() - self.pos) as u64) as usize;
            f(&self.cur[self.pos..self.pos + k])?;
            self.pos += k;
            self.offset += k as u64;
            done += k as u64;
        }
        Ok(done)
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.fill()? {
            return Ok(0);
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        self.offset += n as u64;
        Ok(n)
    }

    fn finish(&mut self) -> std::io::Result<Digests> {
        self.consume(u64::MAX, &mut |_| Ok(()))?;
        self.rx = None;
        let blob = self.handle.take().and_then(|h| h.join().ok()).flatten();
        let blob = blob.ok_or_else(|| std::io::Error::other("the layer decoder stopped early"))?;
        let diff = match self.diff.take() {
            Some(d) => {
                // The last chunk is still here: hash it too.
                if let Some(tx) = &d.tx {
                    tx.send(std::mem::take(&mut self.cur))
                        .map_err(|_| std::io::Error::other("the diff_id hasher stopped"))?;
                }
                d.finish()?
            }
            None => blob.hex.clone(),
        };
        Ok(Digests {
            diff,
            blob: blob.hex,
            blob_bytes: blob.bytes,
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Closing the channel stops the producer at its next chunk; wait for it so no thread
        // outlives the unpack.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        if let Some(d) = self.diff.take() {
            let _ = d.finish();
        }
    }
}

/// The uncompressed stream of a blob, decoded on helper threads.
///
/// The tar parser reads headers through one handle and skips what it does not read with
/// [`Seek`] (nothing is copied). The unpacker takes file data through a second handle
/// ([`Decoded::external`]) straight out of the decoder's chunks ([`Decoded::stream`]); the
/// parser's next skip then accounts for the bytes taken behind its back.
pub(crate) struct Decoded {
    s: Rc<RefCell<Stream>>,
    external: bool,
}

impl Decoded {
    /// Start decoding `blob`; `progress` is told how many blob bytes were consumed. With
    /// `digest_checked` (the caller verifies the blob digest or the diff_id), zstd frame
    /// checksums are not computed.
    pub(crate) fn spawn(
        blob: Box<dyn Read + Send>,
        progress: Option<Rc<dyn Fn(u64)>>,
        digest_checked: bool,
    ) -> std::io::Result<Decoded> {
        let (tx, rx) = sync_channel(DEPTH);
        let (spare, spare_rx) = sync_channel(DEPTH + 2);
        let handle = std::thread::Builder::new()
            .name("layer-decode".into())
            .spawn(move || produce(blob, digest_checked, &tx, &spare_rx))?;
        Ok(Decoded {
            s: Rc::new(RefCell::new(Stream {
                rx: Some(rx),
                spare,
                handle: Some(handle),
                cur: Vec::new(),
                pos: 0,
                offset: 0,
                stolen: 0,
                progress,
                diff: None,
            })),
            external: false,
        })
    }

    /// A second handle on the same stream for taking file data past the tar parser.
    pub(crate) fn external(&self) -> Decoded {
        Decoded {
            s: self.s.clone(),
            external: true,
        }
    }

    /// Tell `progress` how many blob bytes were consumed from now on.
    pub(crate) fn set_progress(&self, progress: Option<Rc<dyn Fn(u64)>>) {
        self.s.borrow_mut().progress = progress;
    }

    /// Hand the next `n` bytes (fewer at the end of the stream) to `f` slice by slice, as
    /// they sit in the decoder's chunks; returns how many there were. External handles only.
    pub(crate) fn stream(
        &self,
        n: u64,
        f: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<u64> {
        debug_assert!(self.external);
        let mut s = self.s.borrow_mut();
        let done = s.consume(n, f)?;
        s.stolen += done;
        Ok(done)
    }

    /// Read to the end of the stream and return the digests.
    pub(crate) fn finish(self) -> std::io::Result<Digests> {
        self.s.borrow_mut().finish()
    }
}

impl Read for Decoded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Read for &Decoded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut s = self.s.borrow_mut();
        let n = s.read(buf)?;
        if self.external {
            s.stolen += n as u64;
        }
        Ok(n)
    }
}

impl Seek for Decoded {
    /// Forward skips only (`SeekFrom::Current(n)`, `n >= 0`), relative to where the tar parser
    /// thinks it is: bytes taken through an external handle since count as skipped already.
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let mut s = self.s.borrow_mut();
        let SeekFrom::Current(delta) = pos else {
            return Err(std::io::Error::other("the layer stream only skips forward"));
        };
        let stolen = std::mem::take(&mut s.stolen);
        let skip = u64::try_from(delta)
            .ok()
            .and_then(|d| d.checked_sub(stolen))
            .ok_or_else(|| std::io::Error::other("the layer stream cannot go back"))?;
        if s.consume(skip, &mut |_| Ok(()))? != skip {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(s.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn plain_gzip_and_zstd_give_the_same_stream_and_digests() {
        // Over DEPTH chunks, so buffers come back to the decoder and are reused.
        let data: Vec<u8> = (0..(CHUNK * (DEPTH + 5) + 123) as u32)
            .map(|i| (i % 253) as u8)
            .collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &data).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::stream::encode_all(&data[..], 1).unwrap();
        for blob in [data.clone(), gz, zst] {
            let mut d = Decoded::spawn(Box::new(Cursor::new(blob.clone())), None, false).unwrap();
            let mut out = Vec::new();
            d.read_to_end(&mut out).unwrap();
            assert!(out == data);
            let dg = d.finish().unwrap();
            assert_eq!(dg.blob_bytes, blob.len() as u64);
            assert_eq!(dg.blob, hex(&Sha256::digest(&blob)));
            assert_eq!(dg.diff, hex(&Sha256::digest(&data)));
        }
    }

    #[test]
    fn data_taken_past_the_tar_parser_is_skipped_by_it() {
        let files: Vec<(&str, Vec<u8>)> = vec![
            ("a", vec![1u8; 100 << 10]),
            ("b", b"0123456789".to_vec()),
            ("c", (0..300u32 << 10).map(|i| (i % 251) as u8).collect()),
            ("d", vec![9u8; 5000]),
        ];
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in &files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            builder.append_data(&mut h, name, data.as_slice()).unwrap();
        }
        let plain = builder.into_inner().unwrap();
        let zst = zstd::stream::encode_all(&plain[..], 1).unwrap();
        for blob in [plain.clone(), zst] {
            let decoded = Decoded::spawn(Box::new(Cursor::new(blob)), None, false).unwrap();
            let data = decoded.external();
            let mut archive = tar::Archive::new(decoded);
            let mut got = Vec::new();
            for e in archive.entries_with_seek().unwrap() {
                let mut e = e.unwrap();
                let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
                let mut bytes = Vec::new();
                match name.as_str() {
                    // Taken whole past the parser, from the decoder's chunks.
                    "a" | "c" => {
                        let n = data
                            .stream(e.size(), &mut |s| {
                                bytes.extend_from_slice(s);
                                Ok(())
                            })
                            .unwrap();
                        assert_eq!(n, e.size());
                    }
                    // Read through the parser.
                    "b" => {
                        e.read_to_end(&mut bytes).unwrap();
                    }
                    // Partly taken through the external handle; the parser skips the rest.
                    _ => {
                        bytes.resize(1000, 0);
                        (&data).read_exact(&mut bytes).unwrap();
                    }
                }
                got.push((name, bytes));
            }
            assert_eq!(got.len(), 4);
            for ((name, bytes), (want_name, want)) in got.iter().zip(&files) {
                assert_eq!(name, want_name);
                let want = if name == "d" { &want[..1000] } else { &want[..] };
                assert!(bytes.as_slice() == want, "{name}");
            }
            let dg = archive.into_inner().finish().unwrap();
            assert_eq!(dg.diff, hex(&Sha256::digest(&plain)));
        }
    }

    #[test]
    fn zstd_frame_checksums_are_skipped_only_when_a_digest_is_checked() {
        let data = vec![42u8; 1 << 20];
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        enc.include_checksum(true).unwrap();
        std::io::Write::write_all(&mut enc, &data).unwrap();
        let mut zst = enc.finish().unwrap();
        let intact = hex(&Sha256::digest(&zst));
        // Damage only the frame's checksum (its last 4 bytes).
        let n = zst.len();
        zst[n - 1] ^= 0xff;
        let mut d = Decoded::spawn(Box::new(Cursor::new(zst.clone())), None, false).unwrap();
        assert!(
            d.read_to_end(&mut Vec::new()).is_err(),
            "the frame checksum is checked"
        );
        let mut d = Decoded::spawn(Box::new(Cursor::new(zst.clone())), None, true).unwrap();
        let mut out = Vec::new();
        d.read_to_end(&mut out).unwrap();
        assert!(out == data);
        // The blob digest (what the caller checks instead) sees the damage.
        assert_ne!(d.finish().unwrap().blob, intact);
    }

    #[test]
    fn corrupt_gzip_is_an_error_and_early_drop_does_not_hang() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &vec![7u8; 10_000_000]).unwrap();
        let mut gz = gz.finish().unwrap();
        let mut d = Decoded::spawn(Box::new(Cursor::new(gz.clone())), None, false).unwrap();
        let mut b = [0u8; 10];
        d.read_exact(&mut b).unwrap();
        drop(d);
        let n = gz.len();
        gz.truncate(n / 2);
        let mut d = Decoded::spawn(Box::new(Cursor::new(gz)), None, false).unwrap();
        let mut out = Vec::new();
        assert!(d.read_to_end(&mut out).is_err());
    }
}
