//! Reading a layer blob on its own thread: hashing the blob, sniffing and decompressing
//! (gzip, zstd or plain) and handing the uncompressed stream over in chunks, so decompression
//! runs on one core while the tar entries are parsed and spooled on another. The uncompressed
//! stream of a compressed blob is hashed by the receiving side as each chunk arrives: the
//! decoder thread is the slower one (decompression plus the blob's hash), so the work is split
//! more evenly. Chunk buffers go back to the decoder to be reused.

use std::io::{BufRead, BufReader, Read};
use std::rc::Rc;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

/// Chunks in flight between the threads (each up to `CHUNK` bytes).
const DEPTH: usize = 8;
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

fn produce(
    blob: Box<dyn Read + Send>,
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
    let mut decoded: Box<dyn Read> = if gzip {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else if zstd {
        match zstd::stream::read::Decoder::with_buffer(buffered) {
            Ok(d) => Box::new(d),
            Err(e) => return fail(e),
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
        let mut filled = 0;
        while filled < CHUNK {
            match decoded.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return fail(e),
            }
        }
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

/// The uncompressed stream of a blob, decoded on a helper thread.
pub(crate) struct Decoded {
    rx: Option<Receiver<Msg>>,
    /// Buffers handed back to the decoder.
    spare: SyncSender<Vec<u8>>,
    handle: Option<JoinHandle<Option<BlobDigest>>>,
    cur: Vec<u8>,
    pos: usize,
    progress: Option<Rc<dyn Fn(u64)>>,
    /// Hash of the uncompressed stream (compressed blobs only; a plain blob is its own).
    diff: Option<Sha256>,
}

impl Decoded {
    /// Start decoding `blob`; `progress` is told how many blob bytes were consumed.
    pub(crate) fn spawn(
        blob: Box<dyn Read + Send>,
        progress: Option<Rc<dyn Fn(u64)>>,
    ) -> std::io::Result<Decoded> {
        let (tx, rx) = sync_channel(DEPTH);
        let (spare, spare_rx) = sync_channel(DEPTH + 2);
        let handle = std::thread::Builder::new()
            .name("layer-decode".into())
            .spawn(move || produce(blob, &tx, &spare_rx))?;
        Ok(Decoded {
            rx: Some(rx),
            spare,
            handle: Some(handle),
            cur: Vec::new(),
            pos: 0,
            progress,
            diff: None,
        })
    }

    /// Read to the end of the stream and return the digests.
    pub(crate) fn finish(mut self) -> std::io::Result<Digests> {
        std::io::copy(&mut self, &mut std::io::sink())?;
        self.rx = None;
        let blob = self.handle.take().and_then(|h| h.join().ok()).flatten();
        let blob = blob.ok_or_else(|| std::io::Error::other("the layer decoder stopped early"))?;
        Ok(Digests {
            diff: match self.diff.take() {
                Some(d) => hex(&d.finalize()),
                None => blob.hex.clone(),
            },
            blob: blob.hex,
            blob_bytes: blob.bytes,
        })
    }
}

impl Read for Decoded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            let Some(rx) = &self.rx else { return Ok(0) };
            match rx.recv() {
                Ok(Msg::Compressed(c)) => self.diff = c.then(Sha256::new),
                Ok(Msg::Data(v, read)) => {
                    if let Some(p) = &self.progress {
                        p(read);
                    }
                    if let Some(d) = &mut self.diff {
                        d.update(&v);
                    }
                    let done = std::mem::replace(&mut self.cur, v);
                    // The decoder may have gone; then the buffer is simply freed.
                    let _ = self.spare.try_send(done);
                    self.pos = 0;
                }
                Ok(Msg::Fail(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for Decoded {
    fn drop(&mut self) {
        // Closing the channel stops the producer at its next chunk; wait for it so no thread
        // outlives the unpack.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
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
            let mut d = Decoded::spawn(Box::new(Cursor::new(blob.clone())), None).unwrap();
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
    fn corrupt_gzip_is_an_error_and_early_drop_does_not_hang() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &vec![7u8; 10_000_000]).unwrap();
        let mut gz = gz.finish().unwrap();
        let mut d = Decoded::spawn(Box::new(Cursor::new(gz.clone())), None).unwrap();
        let mut b = [0u8; 10];
        d.read_exact(&mut b).unwrap();
        drop(d);
        let n = gz.len();
        gz.truncate(n / 2);
        let mut d = Decoded::spawn(Box::new(Cursor::new(gz)), None).unwrap();
        let mut out = Vec::new();
        assert!(d.read_to_end(&mut out).is_err());
    }
}
