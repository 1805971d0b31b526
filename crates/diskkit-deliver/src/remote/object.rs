//! Remote objects read by byte ranges: a URL over HTTP(S), or an S3 object.
//!
//! Both speak HTTP through the same [`Client`] (keep-alive, timeouts, TLS roots); they differ
//! in how a request is addressed and authorised and in how a changed object shows:
//!
//! - HTTP(S): `Range` with `If-Range` (a strong ETag, else Last-Modified): a changed object
//!   comes back whole (200) and is refused without reading it.
//! - S3: a presigned (SigV4) URL per request, `Range` with `If-Match` (S3 always gives a
//!   strong ETag): a changed object is a 412.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::identity::Identity;
use super::s3::S3Location;
use crate::error::{Error, ErrorKind, Result};
use crate::http::{retryable_status, Client, Method, Range};

/// Counters of what a remote object was asked for.
#[derive(Debug, Default)]
pub(crate) struct RequestStats {
    /// Requests sent (retries included).
    pub(crate) requests: AtomicU64,
    /// Body bytes received.
    pub(crate) bytes: AtomicU64,
    /// Requests that failed and were retried.
    pub(crate) retries: AtomicU64,
}

impl RequestStats {
    /// The counters now.
    pub(crate) fn snapshot(&self) -> super::RemoteStats {
        super::RemoteStats {
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }
}

/// Where a remote object is.
pub(crate) enum Address {
    /// An `http://` or `https://` URL.
    Http(String),
    /// An S3 object.
    S3(Box<S3Location>),
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Http(u) => write!(f, "Http({u})"),
            Address::S3(l) => write!(f, "S3({})", l.url()),
        }
    }
}

/// One remote object.
#[derive(Debug)]
pub(crate) struct RemoteObject {
    pub(crate) address: Address,
    /// The URL as the user wrote it (for messages; never holds credentials).
    pub(crate) name: String,
    pub(crate) client: Client,
    pub(crate) stats: Arc<RequestStats>,
}

/// What a single attempt at a range ended with.
enum Attempt {
    /// The range is complete.
    Done,
    /// Worth retrying: `progress` more bytes were received than before.
    Retry { error: Error, wait: Option<Duration> },
    /// Not worth retrying.
    Fail(Error),
}

impl RemoteObject {
    /// The object's size and validators (a HEAD request, retried).
    pub(crate) fn stat(&self) -> Result<Identity> {
        let policy = self.client.options().retry.clone();
        let mut failures = 0u32;
        loop {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let result = match &self.address {
                Address::Http(url) => self.client.send(Method::Head, url, &[], crate::http::Body::Empty),
                Address::S3(loc) => {
                    let url = loc.presign_head()?;
                    self.client
                        .send(Method::Head, url.as_str(), &[], crate::http::Body::Empty)
                }
            };
            let wait = match result {
                Ok(resp) if (200..300).contains(&resp.head.status) => {
                    let head = resp.head;
                    let size = head.length.ok_or_else(|| {
                        Error::new(
                            ErrorKind::Unsupported,
                            format!(
                                "{}: the server does not say how long the object is (no Content-Length)",
                                self.name
                            ),
                        )
                    })?;
                    return Ok(Identity {
                        size,
                        etag: head.validators.etag,
                        last_modified: head.validators.last_modified,
                        sha256: None,
                    });
                }
                Ok(resp) if retryable_status(resp.head.status) => {
                    let e = crate::http::status_error(resp.head.status, &self.name);
                    (e, resp.head.retry_after.map(Duration::from_secs))
                }
                Ok(resp) => return Err(self.status_error(&resp.head)),
                Err(e) if e.kind() == ErrorKind::Network => (e, None),
                Err(e) => return Err(e),
            };
            failures += 1;
            if failures >= policy.attempts.max(1) {
                return Err(wait.0);
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(
                wait.1
                    .map_or_else(|| policy.backoff(failures), |w| w.min(policy.max_backoff)),
            );
        }
    }

    fn status_error(&self, head: &crate::http::Head) -> Error {
        let status = head.status;
        let mut e = crate::http::status_error(status, &self.name);
        if (300..400).contains(&status) {
            let target = head.header("location").unwrap_or("(no Location header)");
            return e.with_message(format!(
                "{}: the server redirects (HTTP {status}) to {target}; remote bases are not read \
                 through redirects: make the cache layer with the final URL",
                self.name
            ));
        }
        if matches!(self.address, Address::S3(_)) {
            // HEAD answers have no body, so S3 cannot say which of these it is.
            let why = match status {
                401 | 403 => "access denied: check the credentials, the region and the endpoint",
                404 => "not found: no such bucket, or no such key in it",
                _ => return e,
            };
            e = e.with_message(format!("{}: HTTP status {status} ({why})", self.name));
        }
        e
    }

    /// Fill `buf` with the bytes at `offset` of the version `identity` names, retrying
    /// failures with backoff (a retry asks only for what is still missing; a try that made
    /// progress resets the count). A changed object is an [`ErrorKind::Changed`] error at
    /// once.
    pub(crate) fn read_range(&self, buf: &mut [u8], offset: u64, identity: &Identity) -> Result<()> {
        let policy = self.client.options().retry.clone();
        let mut done = 0usize;
        let mut failures = 0u32;
        while done < buf.len() {
            let before = done;
            match self.attempt(&mut buf[done..], offset + done as u64, identity, &mut done) {
                Attempt::Done => return Ok(()),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry { error, wait } => {
                    if done > before {
                        failures = 0;
                    }
                    failures += 1;
                    if failures >= policy.attempts.max(1) {
                        return Err(error);
                    }
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(
                        wait.map_or_else(|| policy.backoff(failures), |w| w.min(policy.max_backoff)),
                    );
                }
            }
        }
        Ok(())
    }

    fn changed(&self, identity: &Identity, why: &str) -> Error {
        Error::new(
            ErrorKind::Changed,
            format!(
                "{}: the object changed while it was being read ({why}; it was {})",
                self.name,
                identity.describe()
            ),
        )
    }

    fn attempt(&self, buf: &mut [u8], offset: u64, identity: &Identity, done: &mut usize) -> Attempt {
        let last = offset + buf.len() as u64 - 1;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let sent = match &self.address {
            Address::Http(url) => {
                let range = Range {
                    start: offset,
                    end: Some(last),
                    if_range: identity.validator().map(str::to_string),
                };
                self.client.get(url, Some(&range))
            }
            Address::S3(loc) => {
                let url = match loc.presign_get() {
                    Ok(u) => u,
                    Err(e) => return Attempt::Fail(e),
                };
                let spec = format!("bytes={offset}-{last}");
                let mut headers = vec![("Range", spec.as_str())];
                if let Some(etag) = identity.strong_etag() {
                    headers.push(("If-Match", etag));
                }
                self.client
                    .send(Method::Get, url.as_str(), &headers, crate::http::Body::Empty)
            }
        };
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::Network => return Attempt::Retry { error: e, wait: None },
            Err(e) => return Attempt::Fail(e),
        };
        let head = &resp.head;
        match head.status {
            206 => {}
            200 => {
                return Attempt::Fail(self.changed(
                    identity,
                    "the server sent the whole object instead of the range asked for: it no longer \
                     matches the recorded version, or it does not serve ranges",
                ))
            }
            412 => return Attempt::Fail(self.changed(identity, "its ETag no longer matches")),
            s if retryable_status(s) => {
                return Attempt::Retry {
                    error: crate::http::status_error(s, &self.name),
                    wait: head.retry_after.map(Duration::from_secs),
                }
            }
            _ => return Attempt::Fail(self.status_error(head)),
        }
        match head.content_range {
            Some((first, l, total))
                if first == offset && l == last && total.is_none_or(|t| t == identity.size) => {}
            other => {
                return Attempt::Fail(self.changed(
                    identity,
                    &format!("the server sent the range {other:?} for bytes {offset}-{last}"),
                ))
            }
        }
        if !matches!(&self.address, Address::S3(_)) && !head_matches(head, identity) {
            return Attempt::Fail(self.changed(identity, "its validators differ"));
        }
        let mut got = 0usize;
        let body = resp.body();
        while got < buf.len() {
            match body.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    *done += n;
                    self.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Attempt::Retry {
                        error: crate::http::body_error(e, &self.name),
                        wait: None,
                    }
                }
            }
        }
        if got == buf.len() {
            // Reading to the end of the body hands the connection back to the pool for the
            // next request (keep-alive); a body longer than announced is not read further.
            let mut probe = [0u8; 1];
            if matches!(body.read(&mut probe), Ok(n) if n > 0) {
                return Attempt::Fail(
                    self.changed(identity, "the server sent more than the range asked for"),
                );
            }
        }
        if got < buf.len() {
            return Attempt::Retry {
                error: Error::new(
                    ErrorKind::Network,
                    format!(
                        "{}: the transfer ended after {got} of {} bytes",
                        self.name,
                        buf.len()
                    ),
                ),
                wait: None,
            };
        }
        Attempt::Done
    }
}

/// Whether a 206's validators (where the server sent them) are the recorded ones.
fn head_matches(head: &crate::http::Head, identity: &Identity) -> bool {
    let v = &head.validators;
    match (identity.strong_etag(), v.etag.as_deref()) {
        (Some(a), Some(b)) if !b.starts_with("W/") => return a == b,
        _ => {}
    }
    match (&identity.last_modified, &v.last_modified) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}
