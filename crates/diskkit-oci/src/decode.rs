//! Reading a layer blob on its own thread: hashing the blob, sniffing and decompressing
//! (gzip, zstd or plain), hashing the uncompressed stream, and handing it over in chunks, so
//! decompression runs on one core while the tar entries are parsed and spooled on another.

use std::io::{BufRead, BufReader, Read};
use std::rc::Rc;
use std::sync::mpsc::{sync_channel, Receiver};
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
    Data(Vec<u8>, u64),
    Fail(std::io::Error),
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

fn produce(blob: Box<dyn Read + Send>, tx: &std::sync::mpsc::SyncSender<Msg>) -> Option<Digests> {
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
    // An uncompressed blob is its own diff: hash it once.
    let plain = !magic.starts_with(&[0x1f, 0x8b]) && !magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
    let mut decoded: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        match zstd::stream::read::Decoder::with_buffer(buffered) {
            Ok(d) => Box::new(d),
            Err(e) => return fail(e),
        }
    } else {
        Box::new(buffered)
    };
    let mut diff = Sha256::new();
    loop {
        let mut buf = vec![0u8; CHUNK];
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
        if !plain {
            diff.update(&buf);
        }
        let read = state.lock().unwrap_or_else(|p| p.into_inner()).1;
        if tx.send(Msg::Data(buf, read)).is_err() {
            return None; // the reader gave up
        }
    }
    drop(decoded);
    let s = state.lock().unwrap_or_else(|p| p.into_inner());
    let blob = hex(&s.0.clone().finalize());
    Some(Digests {
        diff: if plain {
            blob.clone()
        } else {
            hex(&diff.finalize())
        },
        blob,
        blob_bytes: s.1,
    })
}

/// The uncompressed stream of a blob, decoded on a helper thread.
pub(crate) struct Decoded {
    rx: Option<Receiver<Msg>>,
    handle: Option<JoinHandle<Option<Digests>>>,
    cur: Vec<u8>,
    pos: usize,
    progress: Option<Rc<dyn Fn(u64)>>,
}

impl Decoded {
    /// Start decoding `blob`; `progress` is told how many blob bytes were consumed.
    pub(crate) fn spawn(
        blob: Box<dyn Read + Send>,
        progress: Option<Rc<dyn Fn(u64)>>,
    ) -> std::io::Result<Decoded> {
        let (tx, rx) = sync_channel(DEPTH);
        let handle = std::thread::Builder::new()
            .name("layer-decode".into())
            .spawn(move || produce(blob, &tx))?;
        Ok(Decoded {
            rx: Some(rx),
            handle: Some(handle),
            cur: Vec::new(),
            pos: 0,
            progress,
        })
    }

    /// Read to the end of the stream and return the digests.
    pub(crate) fn finish(mut self) -> std::io::Result<Digests> {
        std::io::copy(&mut self, &mut std::io::sink())?;
        self.rx = None;
        let digests = self.handle.take().and_then(|h| h.join().ok()).flatten();
        digests.ok_or_else(|| std::io::Error::other("the layer decoder stopped early"))
    }
}

impl Read for Decoded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            let Some(rx) = &self.rx else { return Ok(0) };
            match rx.recv() {
                Ok(Msg::Data(v, read)) => {
                    if let Some(p) = &self.progress {
                        p(read);
                    }
                    self.cur = v;
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
    fn plain_and_gzip_give_the_same_stream() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &data).unwrap();
        let gz = gz.finish().unwrap();
        for blob in [data.clone(), gz] {
            let mut d = Decoded::spawn(Box::new(Cursor::new(blob.clone())), None).unwrap();
            let mut out = Vec::new();
            d.read_to_end(&mut out).unwrap();
            assert!(out == data);
            let dg = d.finish().unwrap();
            assert_eq!(dg.blob_bytes, blob.len() as u64);
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
