//! Downloading blobs into a content store: resumable, verified, visible only when whole.
//!
//! A blob is downloaded into `INGEST/<hex>` (resuming with a ranged GET after what an
//! earlier, interrupted download left there), hashed as it arrives, checked against its
//! digest and size, and only then renamed to `blobs/sha256/<hex>`. A blob whose bytes do
//! not match is deleted and never becomes visible. The partial file is locked (`flock`)
//! while it is written, so two processes pulling into one store never write it at once.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{flock, FlockOperation};
use sha2::{Digest, Sha256};

use super::client::Registry;
use super::manifest::Descriptor;
use crate::error::{Error, ErrorKind, Result};
use crate::http::{self, DownloadOptions, ResumeState};

/// What happened to one blob, for progress reports.
#[derive(Debug)]
pub enum BlobEvent<'a> {
    /// A transfer starts at byte `from` (non-zero when resuming).
    Start {
        /// The blob.
        digest: &'a str,
        /// Its size.
        size: u64,
        /// Where the transfer starts.
        from: u64,
    },
    /// `done` of `size` bytes are in.
    Progress {
        /// The blob.
        digest: &'a str,
        /// Bytes held.
        done: u64,
        /// Its size.
        size: u64,
    },
    /// The blob is in the store; `fetched` is false when it already was.
    Done {
        /// The blob.
        digest: &'a str,
        /// Its size.
        size: u64,
        /// Whether bytes were transferred for it.
        fetched: bool,
    },
    /// A transfer failed and is retried after `wait`.
    Retry {
        /// The blob.
        digest: &'a str,
        /// Why.
        error: &'a Error,
        /// The backoff.
        wait: Duration,
    },
}

/// Hash the first `len` bytes of `file`.
fn hash_prefix(file: &File, len: u64) -> std::io::Result<Sha256> {
    let mut h = Sha256::new();
    let mut r = std::io::BufReader::with_capacity(1 << 20, file.take(len));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h)
}

/// Make sure blob `desc` is at `blobs_dir/<hex>`, downloading it from `registry` through
/// `ingest_dir` if it is not (or has the wrong size). Returns whether bytes were fetched.
pub(crate) fn fetch_blob(
    registry: &Registry,
    desc: &Descriptor,
    blobs_dir: &Path,
    ingest_dir: &Path,
    events: &(dyn Fn(BlobEvent<'_>) + Sync),
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<bool> {
    desc.validate("blob")?;
    let hex = desc.hex();
    let final_path = blobs_dir.join(hex);
    let present = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() == desc.size);
    if present(&final_path) {
        events(BlobEvent::Done {
            digest: &desc.digest,
            size: desc.size,
            fetched: false,
        });
        return Ok(false);
    }
    let partial = ingest_dir.join(hex);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&partial)
        .map_err(|e| Error::io_while(e, "creating a partial download").with_path(&partial))?;
    loop {
        match flock(&file, FlockOperation::LockExclusive) {
            Ok(()) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(Error::io_while(e.into(), "locking a partial download").with_path(&partial)),
        }
    }
    // Another process may have finished it while we waited for the lock.
    if present(&final_path) {
        let _ = std::fs::remove_file(&partial);
        events(BlobEvent::Done {
            digest: &desc.digest,
            size: desc.size,
            fetched: false,
        });
        return Ok(false);
    }
    let url = registry.blob_url(&desc.digest);
    let mut state = ResumeState {
        url: url.clone(),
        validators: Default::default(),
        total: Some(desc.size),
    };
    let mut hasher = Sha256::new();
    let mut hashed = 0u64;
    let mut refreshed = false;
    let outcome = loop {
        let options = DownloadOptions {
            headers: registry.download_headers(&url),
            immutable: true,
        };
        let r = http::download_with(registry.http(), &url, &file, &mut state, &options, &mut |ev| {
            if cancelled() {
                return Err(Error::new(ErrorKind::Io, "cancelled"));
            }
            match ev {
                http::Event::Started { from, .. } => {
                    if from != hashed {
                        hasher = hash_prefix(&file, from).map_err(|e| {
                            Error::io_while(e, "reading a partial download").with_path(&partial)
                        })?;
                        hashed = from;
                    }
                    if from > desc.size {
                        return Err(Error::new(
                            ErrorKind::DigestMismatch,
                            "the partial download is too long",
                        ));
                    }
                    events(BlobEvent::Start {
                        digest: &desc.digest,
                        size: desc.size,
                        from,
                    });
                }
                http::Event::Data { at, data } => {
                    if at != hashed {
                        hasher = hash_prefix(&file, at).map_err(|e| {
                            Error::io_while(e, "reading a partial download").with_path(&partial)
                        })?;
                    }
                    hasher.update(data);
                    hashed = at + data.len() as u64;
                    if hashed > desc.size {
                        return Err(Error::new(
                            ErrorKind::DigestMismatch,
                            format!(
                                "the registry sent more than the {} bytes of blob {}",
                                desc.size, desc.digest
                            ),
                        ));
                    }
                }
                http::Event::Progress { len, .. } => events(BlobEvent::Progress {
                    digest: &desc.digest,
                    done: len,
                    size: desc.size,
                }),
                http::Event::Discarding => {
                    hasher = Sha256::new();
                    hashed = 0;
                }
                http::Event::Retry { error, wait } => events(BlobEvent::Retry {
                    digest: &desc.digest,
                    error,
                    wait,
                }),
            }
            Ok(())
        });
        match r {
            Err(e) if e.http_status() == Some(401) && !refreshed => {
                refreshed = true;
                registry.refresh_auth(&url)?;
            }
            other => break other,
        }
    };
    let outcome = outcome.map_err(|e| {
        if e.http_status() == Some(404) {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "blob {} not found in {}",
                    desc.digest,
                    registry.reference().name()
                ),
            )
        } else {
            e
        }
    })?;
    if hashed != outcome.len {
        hasher = hash_prefix(&file, outcome.len)
            .map_err(|e| Error::io_while(e, "reading a download").with_path(&partial))?;
    }
    let got = format!("sha256:{:x}", hasher.finalize());
    if outcome.len != desc.size || got != desc.digest {
        drop(file);
        let _ = std::fs::remove_file(&partial);
        return Err(Error::new(
            ErrorKind::DigestMismatch,
            format!(
                "blob {} from {} is refused: the bytes received ({} bytes, {got}) do not match its digest{}",
                desc.digest,
                registry.reference().name(),
                outcome.len,
                if outcome.len != desc.size {
                    format!(" and size ({})", desc.size)
                } else {
                    String::new()
                }
            ),
        ));
    }
    std::fs::rename(&partial, &final_path)
        .map_err(|e| Error::io_while(e, "moving a blob into place").with_path(&final_path))?;
    drop(file);
    events(BlobEvent::Done {
        digest: &desc.digest,
        size: desc.size,
        fetched: true,
    });
    Ok(true)
}

/// Write a document (manifest, index) the caller has verified into the blob store.
pub(crate) fn store_bytes(blobs_dir: &Path, digest: &str, bytes: &[u8]) -> Result<PathBuf> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let path = blobs_dir.join(hex);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
        return Ok(path);
    }
    crate::fsutil::write_atomic(&path, bytes, false)?;
    Ok(path)
}
