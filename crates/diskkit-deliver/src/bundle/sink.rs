//! Where a member's data goes while a bundle is read: a sparse file, an image, or nowhere.
//!
//! [`copy_regions`] reads the stored regions from the tar stream into buffers and hands them
//! to a writer thread, so decompression and writing overlap; the writer skips all-zero 4 KiB
//! granules (a member stored without holes still lands sparse) and writes the rest.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use diskkit::DiskImage;

use crate::bundle::tar::Region;
use crate::error::{Error, Result};

/// Bytes per buffer handed to the writer thread.
const BUFFER: usize = 1 << 20;
/// Buffers in flight between the reading and the writing thread.
const IN_FLIGHT: usize = 8;
/// All-zero runs of this many bytes (aligned to it) are not written.
const ZERO_GRANULE: usize = 4096;

/// A destination for member data.
pub(crate) trait Sink: Sync {
    /// Write `data` at `offset` of the member's file.
    fn write_at(&self, data: &[u8], offset: u64) -> Result<()>;
}

/// Bytes written between two background syncs of a [`FileSink`].
const SYNC_EVERY: u64 = 64 << 20;

/// A plain file, written sparsely (set to its full length first).
pub(crate) struct FileSink<'a> {
    file: &'a File,
    what: &'static str,
    /// Wakes the background syncer (see [`with_file_sink`]).
    kick: Option<SyncSender<()>>,
    unsynced: AtomicU64,
}

impl Sink for FileSink<'_> {
    fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Error::io_while(e, format!("writing {}", self.what)))?;
        if let Some(kick) = &self.kick {
            let n = data.len() as u64;
            if self.unsynced.fetch_add(n, Ordering::Relaxed) + n >= SYNC_EVERY {
                self.unsynced.store(0, Ordering::Relaxed);
                // A sync already pending covers these bytes too.
                let _ = kick.try_send(());
            }
        }
        Ok(())
    }
}

/// Run `f` with a sink writing `file`. With `durable`, a background thread starts the
/// writeback of the data written so far every 64 MiB (so the disk writes overlap
/// decompression instead of all waiting for the end), and the file is synced (`fsync`) once
/// before returning.
///
/// The background thread only starts writeback (`sync_file_range(SYNC_FILE_RANGE_WRITE)`):
/// an `fdatasync` every 64 MiB made ext4 commit its journal and flush the disk's cache each
/// time (block allocation is metadata), which cost about half the extraction time again on
/// the benchmark's 2 GiB of data; the one `fsync` at the end gives the same durability.
pub(crate) fn with_file_sink<T>(
    file: &File,
    what: &'static str,
    durable: bool,
    f: impl FnOnce(&FileSink<'_>) -> Result<T>,
) -> Result<T> {
    if !durable {
        return f(&FileSink {
            file,
            what,
            kick: None,
            unsynced: AtomicU64::new(0),
        });
    }
    let (kick, kicked) = sync_channel::<()>(1);
    let result = std::thread::scope(|scope| {
        let syncer = scope.spawn(move || {
            for () in kicked {
                // Errors show up again in the final sync below.
                start_writeback(file);
            }
        });
        let sink = FileSink {
            file,
            what,
            kick: Some(kick),
            unsynced: AtomicU64::new(0),
        };
        let r = f(&sink);
        drop(sink);
        let _ = syncer.join();
        r
    })?;
    file.sync_all()
        .map_err(|e| Error::io_while(e, format!("writing {what}")))?;
    Ok(result)
}

/// Start writing `file`'s dirty pages to disk without waiting for them and without a
/// journal commit or cache flush (those are left to the final `fsync`).
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open (it
    // is borrowed from `file` for the call). Offset 0 and length 0 mean the whole file.
    let r = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if r != 0 {
        // Not supported (some file systems): flush the old way.
        let _ = file.sync_data();
    }
}

/// A disk image (the ASIF conversion of disk.img).
pub(crate) struct ImageSink<'a> {
    pub(crate) image: &'a DiskImage,
    pub(crate) what: &'static str,
}

impl Sink for ImageSink<'_> {
    fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.image
            .write_at(data, offset)
            .map_err(|e| Error::image(e, format!("writing {}", self.what)))
    }
}

/// Data that is only checked (`bundle verify`, `bundle info`).
pub(crate) struct Discard;

impl Sink for Discard {
    fn write_at(&self, _data: &[u8], _offset: u64) -> Result<()> {
        Ok(())
    }
}

/// A buffer of member data and the offset it goes to.
type Piece = (u64, Vec<u8>);

/// Read `regions`' bytes from `data` in order and write them at their offsets into `sink`.
/// `tick` is called after every buffer (for progress). Returns the bytes written (all-zero
/// granules are skipped).
pub(crate) fn copy_regions(
    data: &mut dyn Read,
    regions: &[Region],
    sink: &dyn Sink,
    tick: &mut dyn FnMut(),
) -> Result<u64> {
    if regions.is_empty() {
        return Ok(0);
    }
    let (to_writer, from_reader): (SyncSender<Piece>, Receiver<Piece>) = sync_channel(IN_FLIGHT);
    let (to_reader, from_writer) = sync_channel::<Vec<u8>>(IN_FLIGHT + 1);
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<u64> {
            let mut written = 0;
            for (offset, buf) in from_reader {
                written += write_nonzero(sink, &buf, offset)?;
                // The reader may be gone (it failed); then the buffer is just dropped.
                let _ = to_reader.send(buf);
            }
            Ok(written)
        });
        let mut spare = 0usize;
        let mut result = Ok(());
        'regions: for r in regions {
            let mut pos = r.offset;
            while pos < r.end() {
                let n = (r.end() - pos).min(BUFFER as u64) as usize;
                let mut buf = match from_writer.try_recv() {
                    Ok(b) => b,
                    Err(_) if spare < IN_FLIGHT + 1 => {
                        spare += 1;
                        vec![0u8; BUFFER]
                    }
                    Err(_) => match from_writer.recv() {
                        Ok(b) => b,
                        // The writer stopped: its error is reported below.
                        Err(_) => break 'regions,
                    },
                };
                buf.resize(n, 0);
                if let Err(e) = data.read_exact(&mut buf) {
                    result = Err(read_error(e));
                    break 'regions;
                }
                pos += n as u64;
                if to_writer.send((pos - n as u64, buf)).is_err() {
                    break 'regions;
                }
                tick();
            }
        }
        drop(to_writer);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::bundle("the writer thread panicked")));
        result?;
        written
    })
}

fn read_error(e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            Error::bundle("the stream ends inside a member's data (truncated?)").with_source(e)
        }
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::Other => {
            Error::bundle("damaged compressed stream").with_source(e)
        }
        _ => Error::io_while(e, "reading the bundle"),
    }
}

/// Write the parts of `buf` that are not all-zero granules; returns the bytes written.
fn write_nonzero(sink: &dyn Sink, buf: &[u8], offset: u64) -> Result<u64> {
    let mut written = 0;
    let mut run: Option<usize> = None;
    let mut i = 0;
    while i < buf.len() {
        let to_boundary = ZERO_GRANULE - ((offset + i as u64) % ZERO_GRANULE as u64) as usize;
        let end = (i + to_boundary).min(buf.len());
        let zero = diskkit::copy::is_zero(&buf[i..end]);
        match (zero, run) {
            (false, None) => run = Some(i),
            (true, Some(s)) => {
                sink.write_at(&buf[s..i], offset + s as u64)?;
                written += (i - s) as u64;
                run = None;
            }
            _ => {}
        }
        i = end;
    }
    if let Some(s) = run {
        sink.write_at(&buf[s..], offset + s as u64)?;
        written += (buf.len() - s) as u64;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    struct Record(Mutex<Vec<(u64, usize)>>);
    impl Sink for Record {
        fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
            self.0.lock().unwrap().push((offset, data.len()));
            Ok(())
        }
    }

    #[test]
    fn zero_granules_are_skipped_and_order_kept() {
        let mut data = vec![0u8; 3 * BUFFER + 10_000];
        data[100] = 1;
        data[BUFFER + 5000] = 1;
        data[3 * BUFFER + 9999] = 1;
        let regions = [
            Region {
                offset: 1 << 30,
                len: 2 * BUFFER as u64,
            },
            Region {
                offset: 5 << 30,
                len: BUFFER as u64 + 10_000,
            },
        ];
        let sink = Record(Mutex::new(Vec::new()));
        let mut ticks = 0;
        let mut input = &data[..];
        let written = copy_regions(&mut input, &regions, &sink, &mut || ticks += 1).unwrap();
        assert!(input.is_empty());
        let w = sink.0.into_inner().unwrap();
        assert_eq!(
            w,
            vec![
                (1 << 30, 4096),
                ((1 << 30) + BUFFER as u64 + 4096, 4096),
                ((5 << 30) + BUFFER as u64 + 8192, 10_000 - 8192)
            ]
        );
        assert_eq!(written, 4096 + 4096 + 10_000 - 8192);
        assert_eq!(ticks, 4);
    }

    #[test]
    fn durable_sinks_write_back_in_the_background_and_keep_the_data() {
        // More than SYNC_EVERY, so the background writeback runs at least once.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let chunk: Vec<u8> = (0..BUFFER).map(|i| (i % 251) as u8 + 1).collect();
        let n = (SYNC_EVERY as usize / BUFFER) * 2 + 3;
        with_file_sink(&file, "f", true, |sink| {
            for i in 0..n {
                sink.write_at(&chunk, (i * BUFFER) as u64)?;
            }
            Ok(())
        })
        .unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), n * BUFFER);
        assert!(back.chunks(BUFFER).all(|c| c == &chunk[..]));
        // A descriptor that cannot be written back falls back to fdatasync and does not panic.
        start_writeback(&std::fs::File::open("/dev/null").unwrap());
    }

    #[test]
    fn short_input_is_a_bundle_error() {
        let data = vec![1u8; 1000];
        let regions = [Region { offset: 0, len: 2000 }];
        let e = copy_regions(&mut &data[..], &regions, &Discard, &mut || {}).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidBundle);
    }

    #[test]
    fn writer_errors_stop_the_copy() {
        struct Fail;
        impl Sink for Fail {
            fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
                Err(Error::io(std::io::Error::from_raw_os_error(28)))
            }
        }
        let data = vec![1u8; 20 * BUFFER];
        let regions = [Region {
            offset: 0,
            len: data.len() as u64,
        }];
        let e = copy_regions(&mut &data[..], &regions, &Fail, &mut || {}).unwrap_err();
        assert!(e.is_out_of_space());
    }
}
