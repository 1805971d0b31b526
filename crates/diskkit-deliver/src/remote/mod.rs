//! Remote base images behind a persistent cache layer: HTTP(S) URLs and S3 objects.
//!
//! A remote object (a RAW, ASIF or qcow2 image on any HTTP server with Range support, or in S3
//! or an S3-compatible store) is opened as read-only [`diskkit::storage::Storage`]
//! ([`RemoteStorage`]: parallel bounded range requests, read-ahead, merging, retries), and the
//! image on it as the base of a stack. A cache layer ([`create_cache_layer`]) records the URL
//! and the object's identity (size plus ETag or Last-Modified, or a SHA-256 the user gives; see
//! [`identity`]); the core's cache layer keeps every block read through it, persistently and
//! crash-safely (a fill is recorded only after its data is written, and a fill only starts once
//! its whole range has arrived), so the next run reads locally what was read before.
//!
//! Opening goes through the core's parent policy: a [`RemoteResolver`] is the
//! [`diskkit::stack::ParentResolver`] the caller adds, and it opens only hosts the caller
//! allows. On every open it asks the server for the object's current identity and refuses a
//! changed object ([`diskkit::ErrorKind::LayerMismatch`]); while open, every request is
//! conditional on that version, so a replacement fails reads (EIO) instead of mixing blocks.
//!
//! Several processes and one cache layer: a cache layer that fills is locked as a writer (the
//! core's QEMU-compatible locks), so a second process opening the same stack gets a clear
//! "in use" error ([`diskkit::ErrorKind::Locked`]). Sharing one cache between VMs is done by
//! one `diskkit serve` process (any number of NBD connections) with the VMs' overlays on top.

mod cache;
mod credentials;
pub mod identity;
mod object;
mod resolver;
mod s3;
mod storage;

use std::sync::Arc;

pub use self::cache::{
    create_cache_layer, prefetch, CacheLayerOptions, CreatedCache, PrefetchStats, CACHE_CHUNK_SIZE,
    SMALL_CHUNKS_UP_TO,
};
pub use self::identity::{is_remote, Identity, RemoteHint};
use self::object::{Address, RemoteObject, RequestStats};
pub use self::resolver::{AllowRemote, RemoteResolver};
pub use self::s3::{parse_s3_url, S3Location, S3Options};
pub use self::storage::{RemoteStats, RemoteStorage};
use crate::error::{Error, ErrorKind, Result};
use crate::http::{Client, ClientOptions};

/// How remote objects are read.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// The HTTP client: timeouts, retries, extra CA certificates.
    pub client: ClientOptions,
    /// S3 endpoint, region and profile.
    pub s3: S3Options,
    /// The unit of fetching and of cache fills (default 64 KiB, [`CACHE_CHUNK_SIZE`]; raised
    /// to the allocation unit of the layer that names the remote base, so that a cache layer
    /// fills whole chunks).
    pub fetch_unit: u64,
    /// The largest single range request (default 8 MiB).
    pub max_request: u64,
    /// Requests in flight at most (default 8).
    pub parallel: usize,
    /// The largest read-ahead window (default 32 MiB).
    pub readahead: u64,
    /// Memory for fetched units (default 96 MiB; raised to what the other settings need).
    pub memory: u64,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            client: ClientOptions::default(),
            s3: S3Options::default(),
            fetch_unit: CACHE_CHUNK_SIZE as u64,
            max_request: 8 << 20,
            parallel: 8,
            readahead: 32 << 20,
            memory: 96 << 20,
        }
    }
}

/// The host part of a remote URL as `--allow-remote` names it: the host of an `http(s)://`
/// URL (with `:PORT` when the URL has one), the bucket of an `s3://` URL.
pub fn remote_host(url: &str) -> Result<String> {
    if url.len() >= 5 && url[..5].eq_ignore_ascii_case("s3://") {
        return Ok(parse_s3_url(url)?.0);
    }
    let parsed: url::Url = url
        .parse()
        .map_err(|e| Error::invalid_argument(format!("'{url}' is not a valid URL")).with_source(e))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(Error::invalid_argument(format!(
            "'{url}': remote bases are http://, https:// or s3:// URLs"
        )));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(Error::invalid_argument(format!(
            "'{url}': credentials in the URL would be recorded in the cache layer; use a server that does not need them"
        )));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| Error::invalid_argument(format!("'{url}' has no host")))?
        .to_ascii_lowercase();
    Ok(match parsed.port() {
        Some(p) => format!("{host}:{p}"),
        None => host,
    })
}

/// Open the remote object at `url` (without a fragment) for reading.
fn open_object(url: &str, options: &RemoteOptions) -> Result<RemoteObject> {
    remote_host(url)?;
    let address = if url[..5].eq_ignore_ascii_case("s3://") {
        Address::from(S3Location::resolve(url, &options.s3)?)
    } else {
        Address::Http(url.to_string())
    };
    Ok(RemoteObject {
        address,
        name: url.to_string(),
        // A remote base is read from exactly the URL its cache layer records: a redirect could
        // lead to a host `--allow-remote` did not allow, or to content that changes apart from
        // the validators the recorded server gives (see `RemoteObject::status_error`).
        client: Client::new(&ClientOptions {
            follow_redirects: false,
            ..options.client.clone()
        })?,
        stats: Arc::new(RequestStats::default()),
    })
}

/// Whether `e`, from asking a server about an object, says the server could not be reached or
/// could not answer (not that it answered something definite, such as 404 or 403).
fn unreachable(e: &Error) -> bool {
    e.kind() == ErrorKind::Network || e.http_status().is_some_and(crate::http::retryable_status)
}

/// The current identity of the remote object at `url` (size and validators).
pub fn stat(url: &str, options: &RemoteOptions) -> Result<Identity> {
    open_object(url, options)?.stat()
}

/// Open the remote object at `url` as storage. With `expected`, the object must still be
/// that version ([`ErrorKind::Changed`] otherwise); the storage reads the version found now.
///
/// When the server cannot be reached (a network error or a server error, after the retries)
/// and `expected` has a validator, the storage is opened at that version without the check
/// ([`RemoteStorage::unchecked`] says why): what a cache layer holds stays readable while the
/// server is down. Nothing can be mixed: every range request is conditional on the recorded
/// validator, so if the object changed meanwhile, reads fail once the server answers.
pub fn open_remote(url: &str, expected: Option<&Identity>, options: &RemoteOptions) -> Result<RemoteStorage> {
    let object = open_object(url, options)?;
    let mut now = match (object.stat(), expected) {
        (Err(e), Some(expected)) if unreachable(&e) && expected.validator().is_some() => {
            return Ok(RemoteStorage::new(object, expected.clone(), options).unchecked_because(e.to_string()));
        }
        (stat, _) => stat?,
    };
    if let Some(expected) = expected {
        expected.check(&now, url)?;
        now.sha256.clone_from(&expected.sha256);
    }
    if now.size == 0 {
        return Err(Error::new(
            ErrorKind::Image,
            format!("{url}: the object is empty"),
        ));
    }
    Ok(RemoteStorage::new(object, now, options))
}
