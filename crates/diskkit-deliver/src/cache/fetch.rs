//! `fetch`: one download per ID however many processes ask, extraction while downloading,
//! resume after a kill, and a failure shared with everyone who waited.
//!
//! A URL is downloaded into `partial/<ID>.part` (with what is needed to resume it beside it),
//! and a bundle is extracted from that file while it grows: the extractor reads what has
//! arrived and waits for more, so the entry is ready shortly after the last byte. If the
//! download has to start over (the resource changed), extraction starts over too. A plain
//! image (RAW, qcow2, ASIF) is converted to a sparse `disk.img` once it has arrived, with an
//! empty `layer.qcow2` and a default machine definition.

use std::fs::{self, File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use diskkit::copy::copy;
use diskkit::{CreateOptions, DiskImage, ImageFormat, OpenOptions, ParentPolicy};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::follow::{FinishOnDrop, Follow, Shared};
use super::lock::Mode;
use super::{check_name, now_secs, Cache, Entry, EntryRecord, ENTRY_JSON, LAST_USE};
use crate::bundle::{self, hex, ExtractOptions, Machine, DEFAULT_MAX_DISK_SIZE, DISK, LAYER, MACHINE};
use crate::error::{Error, ErrorKind, Result};
use crate::fsutil;
use crate::http::{self, Client, ClientOptions, ResumeState};

/// The zstd frame magic number (a bundle) at the start of a source.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An `http://` or `https://` URL.
    Url(String),
    /// A local file: a bundle or a plain image.
    Path(PathBuf),
}

impl Source {
    /// A URL if `text` starts with `http://` or `https://`, else a path.
    pub fn parse(text: &str) -> Source {
        let lower = text.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            Source::Url(text.to_string())
        } else {
            Source::Path(PathBuf::from(text))
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::Url(u) => u.clone(),
            Source::Path(p) => fs::canonicalize(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string(),
        }
    }
}

/// How to fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The SHA-256 the source file must have.
    pub sha256: Option<[u8; 32]>,
    /// The largest disk accepted.
    pub max_disk_size: u64,
    /// The HTTP client's settings (timeouts, retries, CA files).
    pub http: ClientOptions,
    /// Make the entry durable (fsync its files, in the background while they are written)
    /// before it appears in the cache, so that a power failure cannot leave a listed entry
    /// with missing data. Turn off on machines whose disks do not outlive a crash anyway.
    pub sync: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            sha256: None,
            max_disk_size: DEFAULT_MAX_DISK_SIZE,
            http: ClientOptions::default(),
            sync: true,
        }
    }
}

/// What a fetch is doing, for progress displays.
#[derive(Debug)]
pub enum FetchEvent<'a> {
    /// Another process is fetching this ID; waiting for it.
    Waiting,
    /// Bytes of the source received (or read, for a local file) so far.
    Transfer {
        /// Bytes so far.
        done: u64,
        /// The source's size, when known.
        total: Option<u64>,
    },
    /// A download resumes at `from` bytes.
    Resumed {
        /// Bytes already there.
        from: u64,
    },
    /// A transfer failed and is retried after `wait`.
    Retry {
        /// Why.
        error: &'a Error,
        /// The wait.
        wait: Duration,
    },
    /// A plain image is being converted into the entry.
    Converting,
    /// The download finished: the source is `bytes` long, `transferred` of them arrived in
    /// this call, in `seconds` (the entry is ready soon after: it was extracted meanwhile).
    Downloaded {
        /// The source's size.
        bytes: u64,
        /// Bytes received by this call (less after a resume).
        transferred: u64,
        /// Seconds from the first request to the last byte.
        seconds: f64,
    },
}

/// What [`Cache::fetch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The entry.
    pub entry: Entry,
    /// Whether this call made it (false: it was there, or another process made it).
    pub made: bool,
}

/// Why a fetch failed, kept for the processes that waited on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FailureRecord {
    attempt: String,
    kind: String,
    message: String,
}

fn kind_name(kind: ErrorKind) -> String {
    format!("{kind:?}")
}

fn kind_from_name(name: &str) -> ErrorKind {
    match name {
        "InvalidBundle" => ErrorKind::InvalidBundle,
        "Image" => ErrorKind::Image,
        "Network" => ErrorKind::Network,
        "HttpStatus" => ErrorKind::HttpStatus,
        "DigestMismatch" => ErrorKind::DigestMismatch,
        "NotFound" => ErrorKind::NotFound,
        "InvalidArgument" => ErrorKind::InvalidArgument,
        _ => ErrorKind::Io,
    }
}

impl Cache {
    /// Make sure entry `id` exists, fetching it from `source` if it does not. Concurrent
    /// fetches of one ID (in any processes) download once: the others wait and return the
    /// same entry, or the same error.
    pub fn fetch(
        &self,
        id: &str,
        source: &Source,
        options: &FetchOptions,
        events: &mut dyn FnMut(FetchEvent<'_>),
    ) -> Result<Fetched> {
        check_name("cache ID", id)?;
        if let Some(entry) = self.entry(id)? {
            self.touch(id);
            return Ok(Fetched { entry, made: false });
        }
        let failed_before = self.read_failure(id).map(|f| f.attempt);
        let (lock, waited) = match self.lock(id, Mode::Exclusive, false)? {
            Some(l) => (l, false),
            None => {
                events(FetchEvent::Waiting);
                let l = self
                    .lock(id, Mode::Exclusive, true)?
                    .ok_or_else(|| Error::new(ErrorKind::Io, "could not lock the cache entry"))?;
                (l, true)
            }
        };
        if let Some(entry) = self.entry(id)? {
            self.touch(id);
            return Ok(Fetched { entry, made: false });
        }
        if waited {
            if let Some(f) = self.read_failure(id) {
                if Some(&f.attempt) != failed_before.as_ref() {
                    return Err(Error::new(
                        kind_from_name(&f.kind),
                        format!("{} (reported by the concurrent fetch of '{id}')", f.message),
                    ));
                }
            }
        }
        let result = self.fetch_locked(id, source, options, events);
        match result {
            Ok(record) => {
                let _ = fs::remove_file(self.failed_path(id));
                drop(lock);
                let entry = Entry {
                    id: id.to_string(),
                    dir: self.entry_dir(id),
                    record,
                };
                Ok(Fetched { entry, made: true })
            }
            Err(e) => {
                let record = FailureRecord {
                    attempt: fsutil::random_suffix(),
                    kind: kind_name(e.kind()),
                    message: e.full_message(),
                };
                let _ = fsutil::write_atomic(
                    &self.failed_path(id),
                    &serde_json::to_vec(&record).unwrap_or_default(),
                    false,
                );
                drop(lock);
                Err(e)
            }
        }
    }

    fn read_failure(&self, id: &str) -> Option<FailureRecord> {
        fs::read(self.failed_path(id))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// The fetch itself, with `id`'s lock held exclusively and no entry there.
    fn fetch_locked(
        &self,
        id: &str,
        source: &Source,
        options: &FetchOptions,
        events: &mut dyn FnMut(FetchEvent<'_>),
    ) -> Result<EntryRecord> {
        // Staging directories of earlier attempts at this ID (killed processes).
        if let Ok(rd) = fs::read_dir(self.root.join("tmp")) {
            for e in rd.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .rsplit_once('.')
                    .is_some_and(|(i, _)| i == id)
                {
                    fsutil::remove_any(&e.path());
                }
            }
        }
        let staging = self
            .root
            .join("tmp")
            .join(format!("{id}.{}", fsutil::random_suffix()));
        let guard = fsutil::Cleanup::new(&staging);
        let (kind, sha256, disk_size) = match source {
            Source::Path(path) => fetch_path(path, &staging, options, events)?,
            Source::Url(url) => self.fetch_url(id, url, &staging, options, events)?,
        };
        let record = EntryRecord {
            id: id.to_string(),
            source: source.describe(),
            kind: kind.to_string(),
            sha256,
            disk_size,
            created: now_secs(),
        };
        fs::write(
            staging.join(ENTRY_JSON),
            serde_json::to_vec_pretty(&record).unwrap_or_default(),
        )
        .map_err(|e| Error::io_while(e, "writing the entry record"))?;
        fs::write(staging.join(LAST_USE), b"").map_err(|e| Error::io_while(e, "writing the entry record"))?;
        for name in [DISK, LAYER, MACHINE, ENTRY_JSON] {
            let p = staging.join(name);
            if name != ENTRY_JSON {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o444))
                    .map_err(|e| Error::io_while(e, "protecting the entry's files").with_path(&p))?;
            }
            if options.sync {
                // Already synced while written (disk.img, layer.qcow2): cheap.
                File::open(&p)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::io_while(e, "syncing the entry").with_path(&p))?;
            }
        }
        if options.sync {
            fsutil::sync_dir(&staging)?;
        }
        let dest = self.entry_dir(id);
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &staging,
            rustix::fs::CWD,
            &dest,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(|e| Error::io_while(e.into(), "adding the entry to the cache").with_path(&dest))?;
        guard.keep();
        if options.sync {
            fsutil::sync_dir(&self.root.join("entries"))?;
        }
        self.remove_partial(id);
        Ok(record)
    }

    fn fetch_url(
        &self,
        id: &str,
        url: &str,
        staging: &Path,
        options: &FetchOptions,
        events: &mut dyn FnMut(FetchEvent<'_>),
    ) -> Result<(&'static str, String, u64)> {
        let client = Client::new(&options.http)?;
        let part = self.partial_path(id);
        let state_path = self.partial_state_path(id);
        let mut state: ResumeState = fs::read(&state_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let file = FsOpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part)
            .map_err(|e| Error::io_while(e, "opening the partial download").with_path(&part))?;
        let limit = options.max_disk_size.saturating_mul(2).saturating_add(16 << 20);
        let shared = Shared::new();
        let cancel = AtomicBool::new(false);
        let result = std::thread::scope(|scope| {
            let downloader = scope.spawn(|| {
                // Wakes the extractor even if this thread ends unexpectedly.
                let _finish = FinishOnDrop(&shared);
                let began = std::time::Instant::now();
                let r = http::download(&client, url, &file, &mut state, &mut |ev| {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(Error::new(ErrorKind::Io, "fetch cancelled"));
                    }
                    match ev {
                        http::Event::Started { state, from } => {
                            if state.total.is_some_and(|t| t > limit) {
                                return Err(Error::new(
                                    ErrorKind::InvalidArgument,
                                    format!(
                                        "{url} is {} bytes, more than a bundle of the largest disk accepted \
                                         (--max-disk-size)",
                                        state.total.unwrap_or(0)
                                    ),
                                ));
                            }
                            fsutil::write_atomic(
                                &state_path,
                                &serde_json::to_vec(state).unwrap_or_default(),
                                false,
                            )?;
                            shared.started(from, state.total);
                        }
                        http::Event::Progress { len, total } => {
                            if len > limit {
                                return Err(Error::new(
                                    ErrorKind::InvalidArgument,
                                    format!("{url} is larger than a bundle of the largest disk accepted"),
                                ));
                            }
                            shared.progress(len, total);
                        }
                        http::Event::Retry { error, wait } => shared.retry(error, wait),
                        http::Event::Discarding => shared.discarding(),
                        http::Event::Data { .. } => {}
                    }
                    Ok(())
                });
                shared.finish(r.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                r.map(|o| (o, began.elapsed()))
            });
            let extracted = self.consume_download(&file, &shared, staging, options, events);
            if extracted.is_err() {
                cancel.store(true, Ordering::Relaxed);
            }
            let downloaded = downloader
                .join()
                .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "the download thread panicked")));
            match (downloaded, extracted) {
                (Ok(d), Ok(v)) => Ok((v, d)),
                // A download error explains an extraction error (the data stopped coming).
                (Err(d), Err(_)) if d.message() != Some("fetch cancelled") => Err(d),
                (_, Err(e)) => Err(e),
                (Err(d), Ok(_)) => Err(d),
            }
        });
        match result {
            Ok((v, (outcome, elapsed))) => {
                events(FetchEvent::Downloaded {
                    bytes: outcome.len,
                    transferred: outcome.transferred,
                    seconds: elapsed.as_secs_f64(),
                });
                Ok(v)
            }
            Err(e) => {
                // Keep what was downloaded for a later resume only when the transfer failed;
                // bad content is not worth resuming.
                if !matches!(e.kind(), ErrorKind::Network | ErrorKind::Io) {
                    self.remove_partial(id);
                }
                Err(e)
            }
        }
    }

    /// Extract (or, for a plain image, convert) what the downloader writes into `file`.
    fn consume_download(
        &self,
        file: &File,
        shared: &Shared,
        staging: &Path,
        options: &FetchOptions,
        events: &mut dyn FnMut(FetchEvent<'_>),
    ) -> Result<(&'static str, String, u64)> {
        loop {
            let generation = shared.generation();
            // Wait for the first bytes (or the end) to tell a bundle from an image.
            let magic = shared.wait_for(4, generation, events);
            let mut head = [0u8; 4];
            let is_bundle = magic && file.read_exact_at(&mut head, 0).is_ok() && head == ZSTD_MAGIC;
            if !is_bundle {
                shared.wait_done(events);
                if shared.generation() != generation {
                    continue;
                }
                shared.result().map_err(|m| Error::new(ErrorKind::Network, m))?;
                return import_image(file, staging, options, ParentPolicy::deny(), events);
            }
            let mut reader = Follow {
                file,
                shared,
                pos: 0,
                generation,
            };
            let extract = ExtractOptions {
                format: ImageFormat::Raw,
                max_disk_size: options.max_disk_size,
                sha256: options.sha256,
                digest: true,
                sync: options.sync,
            };
            let r = bundle::extract_into(&mut reader, staging, &extract, &mut |_| shared.report_now(events));
            match r {
                Ok(info) => return Ok(("bundle", info.sha256.unwrap_or_default(), info.disk.size)),
                Err(_) if shared.generation() != generation => {
                    fsutil::remove_any(staging);
                    continue;
                }
                Err(e) => {
                    if let Some(Err(m)) = shared.done() {
                        return Err(Error::new(ErrorKind::Network, m));
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// Fetch from a local file: extract a bundle, or convert an image.
fn fetch_path(
    path: &Path,
    staging: &Path,
    options: &FetchOptions,
    events: &mut dyn FnMut(FetchEvent<'_>),
) -> Result<(&'static str, String, u64)> {
    let mut file = bundle::open_bundle(path).map_err(|e| e.with_message("cannot read the source"))?;
    let total = file.metadata().map(|m| m.len()).ok();
    let mut head = [0u8; 4];
    let is_bundle = file.read_exact_at(&mut head, 0).is_ok() && head == ZSTD_MAGIC;
    if !is_bundle {
        return import_image(&file, staging, options, ParentPolicy::same_directory(), events)
            .map_err(|e| e.with_path(path));
    }
    let extract = ExtractOptions {
        format: ImageFormat::Raw,
        max_disk_size: options.max_disk_size,
        sha256: options.sha256,
        digest: true,
        sync: options.sync,
    };
    let info = bundle::extract_into(&mut file, staging, &extract, &mut |done| {
        events(FetchEvent::Transfer { done, total });
    })
    .map_err(|e| e.with_path(path))?;
    Ok(("bundle", info.sha256.unwrap_or_default(), info.disk.size))
}

/// Convert the plain image in `file` into an entry: a sparse RAW `disk.img`, an empty
/// `layer.qcow2` over it and a default machine definition.
fn import_image(
    file: &File,
    staging: &Path,
    options: &FetchOptions,
    parents: ParentPolicy,
    events: &mut dyn FnMut(FetchEvent<'_>),
) -> Result<(&'static str, String, u64)> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = file
            .read_at(&mut buf, pos)
            .map_err(|e| Error::io_while(e, "reading the image"))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        pos += n as u64;
    }
    let digest: [u8; 32] = hash.finalize().into();
    if let Some(want) = &options.sha256 {
        if &digest != want {
            return Err(Error::new(
                ErrorKind::DigestMismatch,
                format!(
                    "the image's SHA-256 is {}, not the expected {}",
                    hex(&digest),
                    hex(want)
                ),
            ));
        }
    }
    events(FetchEvent::Converting);
    // The image is opened through /proc/self/fd so that a local path's parents resolve
    // next to it; downloaded images follow no parent at all.
    let fd_path = PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file)));
    let source_path = fs::read_link(&fd_path).unwrap_or(fd_path);
    let src = DiskImage::open(&source_path, &OpenOptions::new().parents(parents))
        .map_err(|e| Error::image(e, "the source is neither a bundle nor an image diskkit can open"))?;
    let size = src.size().div_ceil(512) * 512;
    if size > options.max_disk_size {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "the image is {size} bytes, larger than the limit of {} bytes (--max-disk-size)",
                options.max_disk_size
            ),
        ));
    }
    fs::create_dir(staging)
        .map_err(|e| Error::io_while(e, "creating a staging directory").with_path(staging))?;
    let disk = DiskImage::create(staging.join(DISK), &CreateOptions::raw(size))
        .map_err(|e| Error::image(e, format!("creating {DISK}")))?;
    copy(&src, &disk, &mut |_| {}).map_err(|e| Error::image(e, format!("converting the image to {DISK}")))?;
    disk.flush()
        .map_err(|e| Error::image(e, format!("writing {DISK}")))?;
    drop(disk);
    let layer = CreateOptions::new(ImageFormat::Qcow2, size).backing_file(DISK, Some(ImageFormat::Raw));
    DiskImage::create_file(staging.join(LAYER), &layer)
        .map_err(|e| Error::image(e, format!("creating {LAYER}")))?;
    fs::write(staging.join(MACHINE), Machine::default_random().to_json())
        .map_err(|e| Error::io_while(e, format!("writing {MACHINE}")))?;
    Ok(("image", hex(&digest), size))
}
