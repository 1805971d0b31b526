//! A small synchronous HTTP(S) client for everything diskkit fetches: bundles, remote bases,
//! registry blobs.
//!
//! Built on `ureq` (synchronous, like the rest of diskkit: threads, no async runtime) with
//! rustls and the system's root certificates (plus extra CA files when asked). One
//! [`Client`] keeps connections alive between requests and can be shared by threads.
//!
//! - **Timeouts**: connecting, waiting for the response head, and each read of the body
//!   ([`ClientOptions::read_timeout`]): a transfer that stalls fails, however long the body.
//! - **Retries** ([`RetryPolicy`]): connection failures, resets, timeouts and the statuses 408,
//!   429, 500, 502, 503 and 504 are retried with exponential backoff (honouring `Retry-After`
//!   up to the policy's maximum); other statuses fail at once with [`ErrorKind::HttpStatus`].
//! - **Ranged GETs and validators**: [`Client::get`] with a [`Range`] sends `Range` and
//!   `If-Range` (a strong ETag, else `Last-Modified`), so a changed resource comes back whole
//!   (200) instead of as a mismatched piece (206); [`Validators`] are read from every
//!   response.
//! - **Resumable downloads** ([`download`]): fetch a URL into a file, resuming from what the
//!   file already holds, across connection failures within one call and across processes
//!   (the caller keeps the [`ResumeState`]), with a progress callback.
//!
//! ```no_run
//! use diskkit_deliver::http::{Client, ClientOptions};
//!
//! # fn main() -> diskkit_deliver::Result<()> {
//! let client = Client::new(&ClientOptions::default())?;
//! let head = client.head("https://example.com/image.tar.zst")?;
//! println!("{:?} bytes, etag {:?}", head.length, head.validators.etag);
//! # Ok(())
//! # }
//! ```

mod download;

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use ureq::tls::{Certificate, RootCerts, TlsConfig};

pub use self::download::{download, download_with, DownloadOptions, DownloadOutcome, Event, ResumeState};
use crate::error::{Error, ErrorKind, Result};

/// How often and how patiently to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in a row without progress before giving up (at least 1). A download that
    /// made progress since the last failure starts counting again.
    pub attempts: u32,
    /// The wait before the first retry; doubled for each further one.
    pub initial_backoff: Duration,
    /// The longest wait between attempts (and the most `Retry-After` is honoured).
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 7,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 for the first retry), with a little jitter so
    /// that many clients do not retry in step.
    pub fn backoff(&self, retry: u32) -> Duration {
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20))
            .min(self.max_backoff);
        let jitter = uuid::Uuid::new_v4().as_bytes()[0] as u32 % 64;
        (base + base * jitter / 256).min(self.max_backoff)
    }
}

/// How to build a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Time to establish a connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Time to wait for the response head, and for each read of the body.
    pub read_timeout: Duration,
    /// Retries of failed requests and interrupted transfers.
    pub retry: RetryPolicy,
    /// PEM files of extra CA certificates to trust, besides the system's roots.
    pub extra_ca_files: Vec<PathBuf>,
    /// Trust only the extra CA files, not the system's roots.
    pub only_extra_cas: bool,
    /// The `User-Agent` header.
    pub user_agent: String,
    /// Follow redirects of GET and HEAD requests (at most 10). When off, a redirect is
    /// returned as the response it is.
    pub follow_redirects: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            extra_ca_files: Vec::new(),
            only_extra_cas: false,
            user_agent: format!("diskkit/{}", env!("CARGO_PKG_VERSION")),
            follow_redirects: true,
        }
    }
}

/// What identifies one version of a resource: its ETag and Last-Modified headers.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Validators {
    /// The `ETag` header, as sent (with quotes; `W/` for a weak one).
    pub etag: Option<String>,
    /// The `Last-Modified` header, as sent.
    pub last_modified: Option<String>,
}

impl Validators {
    /// The value for `If-Range`: a strong ETag, else Last-Modified; `None` when neither can
    /// validate a range (weak ETags cannot).
    pub fn if_range(&self) -> Option<&str> {
        match (&self.etag, &self.last_modified) {
            (Some(e), _) if !e.starts_with("W/") => Some(e),
            (_, Some(lm)) => Some(lm),
            _ => None,
        }
    }

    /// Whether `other` (from a later response) names the same version: equal strong ETags,
    /// or, without them, equal Last-Modified dates.
    pub fn same_version(&self, other: &Validators) -> bool {
        match (&self.etag, &other.etag) {
            (Some(a), Some(b)) if !a.starts_with("W/") && !b.starts_with("W/") => a == b,
            _ => match (&self.last_modified, &other.last_modified) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            },
        }
    }

    fn from_headers(h: &ureq::http::HeaderMap) -> Validators {
        let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        Validators {
            etag: get("etag"),
            last_modified: get("last-modified"),
        }
    }
}

/// The head of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The status code.
    pub status: u16,
    /// The body's length (`Content-Length`), when known.
    pub length: Option<u64>,
    /// For a 206: (first byte, last byte, complete length if known) from `Content-Range`.
    pub content_range: Option<(u64, u64, Option<u64>)>,
    /// Whether the server says it serves byte ranges (`Accept-Ranges: bytes`).
    pub accept_ranges: bool,
    /// ETag and Last-Modified.
    pub validators: Validators,
    /// The `Content-Type`, if any.
    pub content_type: Option<String>,
    /// `Retry-After` in seconds, if given as a number.
    pub retry_after: Option<u64>,
    /// Every header, names in lower case, in the order received (values that are not
    /// visible ASCII are left out).
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (case-insensitive), in order.
    pub fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Head {
    fn from_response<B>(r: &ureq::http::Response<B>) -> Head {
        let h = r.headers();
        let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
        Head {
            status: r.status().as_u16(),
            length: get("content-length").and_then(|v| v.trim().parse().ok()),
            content_range: get("content-range").and_then(parse_content_range),
            accept_ranges: get("accept-ranges").is_some_and(|v| v.trim().eq_ignore_ascii_case("bytes")),
            validators: Validators::from_headers(h),
            content_type: get("content-type").map(str::to_string),
            retry_after: get("retry-after").and_then(|v| v.trim().parse().ok()),
            headers: h
                .iter()
                .filter_map(|(n, v)| Some((n.as_str().to_ascii_lowercase(), v.to_str().ok()?.to_string())))
                .collect(),
        }
    }
}

/// Parse `bytes FIRST-LAST/TOTAL` (TOTAL may be `*`).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let first: u64 = first.trim().parse().ok()?;
    let last: u64 = last.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    (first <= last && total.is_none_or(|t| last < t)).then_some((first, last, total))
}

/// A byte range to request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive); `None` for the rest of the resource.
    pub end: Option<u64>,
    /// Send `If-Range` with this value (see [`Validators::if_range`]).
    pub if_range: Option<String>,
}

/// A response whose body has not been read yet.
pub struct Response {
    /// The response head.
    pub head: Head,
    body: ureq::BodyReader<'static>,
}

impl Response {
    /// The body, as it arrives.
    pub fn body(&mut self) -> &mut dyn Read {
        &mut self.body
    }

    /// Read the whole body into memory, refusing one longer than `limit` bytes (checked
    /// against `Content-Length` first, then while reading). `url` names the resource in
    /// errors.
    pub fn read_limited(&mut self, limit: u64, url: &str) -> Result<Vec<u8>> {
        let too_long = || {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("{url}: the response is larger than the {limit} bytes accepted"),
            )
        };
        if self.head.length.is_some_and(|l| l > limit) {
            return Err(too_long());
        }
        let mut buf = Vec::new();
        (&mut self.body)
            .take(limit.saturating_add(1))
            .read_to_end(&mut buf)
            .map_err(|e| body_error(e, url))?;
        if buf.len() as u64 > limit {
            return Err(too_long());
        }
        Ok(buf)
    }

    /// Read and drop the rest of the body (at most 64 KiB; more is left unread), so that the
    /// connection can be reused.
    pub fn discard_body(&mut self) {
        let _ = std::io::copy(&mut (&mut self.body).take(64 << 10), &mut std::io::sink());
    }
}

/// An HTTP method for [`Client::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// HEAD.
    Head,
    /// POST.
    Post,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// DELETE.
    Delete,
}

/// The body of a request sent with [`Client::send`].
pub enum Body<'a> {
    /// No body (a POST or PUT without one still sends `Content-Length: 0`).
    Empty,
    /// These bytes.
    Bytes(&'a [u8]),
    /// `len` bytes read from `reader` (sent with `Content-Length: len`).
    Reader {
        /// Where the bytes come from.
        reader: &'a mut dyn Read,
        /// How many bytes it yields.
        len: u64,
    },
}

impl std::fmt::Debug for Body<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Empty => f.write_str("Empty"),
            Body::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Body::Reader { len, .. } => write!(f, "Reader({len} bytes)"),
        }
    }
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}

/// An HTTP(S) client: a connection pool, TLS roots, timeouts and a retry policy.
#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    options: ClientOptions,
}

/// Whether a status is worth retrying.
pub fn retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

impl Client {
    /// A client with `options`. Loads the system's root certificates and the extra CA files.
    pub fn new(options: &ClientOptions) -> Result<Client> {
        let mut roots: Vec<Certificate<'static>> = Vec::new();
        if !options.only_extra_cas {
            let found = rustls_native_certs::load_native_certs();
            roots.extend(
                found
                    .certs
                    .iter()
                    .map(|c| Certificate::from_der(c.as_ref()).to_owned()),
            );
        }
        for file in &options.extra_ca_files {
            let pem = std::fs::read(file)
                .map_err(|e| Error::io_while(e, "reading a CA certificate file").with_path(file))?;
            let before = roots.len();
            for item in <rustls::pki_types::CertificateDer<'_> as PemObject>::pem_slice_iter(&pem) {
                let der = item.map_err(|e| {
                    Error::invalid_argument(format!("bad PEM in CA file: {e}")).with_path(file)
                })?;
                roots.push(Certificate::from_der(der.as_ref()).to_owned());
            }
            if roots.len() == before {
                return Err(Error::invalid_argument("no certificate in the CA file").with_path(file));
            }
        }
        let tls = TlsConfig::builder()
            .root_certs(RootCerts::Specific(Arc::new(roots)))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(options.connect_timeout))
            .timeout_recv_response(Some(options.read_timeout))
            .timeout_per_read(Some(options.read_timeout))
            .user_agent(options.user_agent.as_str())
            .max_redirects(if options.follow_redirects { 10 } else { 0 })
            // Parallel range requests (remote bases) keep their connections alive.
            .max_idle_connections(64)
            .max_idle_connections_per_host(16)
            .tls_config(tls)
            .build();
        Ok(Client {
            agent: config.into(),
            options: options.clone(),
        })
    }

    /// The options the client was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// One GET (no retries; see [`Client::get_with_retries`]). Any status is returned as a
    /// response; transport failures are errors of kind [`ErrorKind::Network`].
    pub fn get(&self, url: &str, range: Option<&Range>) -> Result<Response> {
        self.get_with_headers(url, range, &[])
    }

    /// One request of any method with extra headers and a body (no retries). Any status is
    /// returned as a response; transport failures are errors of kind [`ErrorKind::Network`].
    /// Redirects are followed for GET and HEAD only; `Authorization` is never sent to the
    /// target of a redirect.
    pub fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
    ) -> Result<Response> {
        use ureq::SendBody;
        let resp = match method {
            Method::Get | Method::Head | Method::Delete => {
                let mut req = match method {
                    Method::Get => self.agent.get(url),
                    Method::Head => self.agent.head(url),
                    _ => self.agent.delete(url),
                };
                for (n, v) in headers {
                    req = req.header(*n, *v);
                }
                req.call()
            }
            Method::Post | Method::Put | Method::Patch => {
                let mut req = match method {
                    Method::Post => self.agent.post(url),
                    Method::Put => self.agent.put(url),
                    _ => self.agent.patch(url),
                };
                // Uploads are not replayed to another place.
                req = req.config().max_redirects(0).build();
                for (n, v) in headers {
                    req = req.header(*n, *v);
                }
                match body {
                    Body::Empty => req.header("Content-Length", "0").send_empty(),
                    Body::Bytes(b) => req.send(b),
                    Body::Reader { reader, len } => req
                        .header("Content-Length", len.to_string())
                        .send(SendBody::from_reader(reader)),
                }
            }
        }
        .map_err(|e| transport_error(e, url))?;
        let head = Head::from_response(&resp);
        Ok(Response {
            head,
            body: resp.into_body().into_reader(),
        })
    }

    /// One GET with extra headers (no retries), optionally of a range.
    pub fn get_with_headers(
        &self,
        url: &str,
        range: Option<&Range>,
        headers: &[(&str, &str)],
    ) -> Result<Response> {
        let mut req = self.agent.get(url);
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        if let Some(r) = range {
            let spec = match r.end {
                Some(end) => format!("bytes={}-{end}", r.start),
                None => format!("bytes={}-", r.start),
            };
            req = req.header("Range", spec);
            if let Some(v) = &r.if_range {
                req = req.header("If-Range", v.as_str());
            }
        }
        let resp = req.call().map_err(|e| transport_error(e, url))?;
        let head = Head::from_response(&resp);
        Ok(Response {
            head,
            body: resp.into_body().into_reader(),
        })
    }

    /// One HEAD request (no retries).
    fn head_once(&self, url: &str) -> Result<Head> {
        let resp = self.agent.head(url).call().map_err(|e| transport_error(e, url))?;
        Ok(Head::from_response(&resp))
    }

    /// HEAD `url`, retrying transport failures and retryable statuses. A final status that
    /// is not 2xx is an [`ErrorKind::HttpStatus`] error.
    pub fn head(&self, url: &str) -> Result<Head> {
        self.with_retries(url, || self.head_once(url).map(|h| (h.clone(), h)))
    }

    /// GET `url` (optionally a range), retrying until the response head is a success (2xx)
    /// or a status that is not retried. The body is not read here, and a failure while the
    /// caller reads it is not retried (use [`download`] for that).
    pub fn get_with_retries(&self, url: &str, range: Option<&Range>) -> Result<Response> {
        self.with_retries(url, || self.get(url, range).map(|r| (r.head.clone(), r)))
    }

    fn with_retries<T>(&self, url: &str, mut attempt: impl FnMut() -> Result<(Head, T)>) -> Result<T> {
        let policy = &self.options.retry;
        let mut failures = 0;
        loop {
            let wait = match attempt() {
                Ok((head, value)) if (200..300).contains(&head.status) => return Ok(value),
                Ok((head, _)) if retryable_status(head.status) => {
                    failures += 1;
                    if failures >= policy.attempts.max(1) {
                        return Err(status_error(head.status, url));
                    }
                    head.retry_after
                        .map(|s| Duration::from_secs(s).min(policy.max_backoff))
                        .unwrap_or_else(|| policy.backoff(failures))
                }
                Ok((head, _)) => return Err(status_error(head.status, url)),
                Err(e) if e.kind() == ErrorKind::Network => {
                    failures += 1;
                    if failures >= policy.attempts.max(1) {
                        return Err(e);
                    }
                    policy.backoff(failures)
                }
                Err(e) => return Err(e),
            };
            std::thread::sleep(wait);
        }
    }
}

/// An error for a final HTTP status.
pub(crate) fn status_error(status: u16, url: &str) -> Error {
    let hint = match status {
        404 => " (not found)",
        401 | 403 => " (access denied)",
        416 => " (range not satisfiable)",
        s if s >= 500 => " (server error)",
        _ => "",
    };
    Error::new(
        ErrorKind::HttpStatus,
        format!("{url}: HTTP status {status}{hint}"),
    )
    .with_status(status)
}

/// A ureq error as a network error (or an invalid argument for a bad URL).
fn transport_error(e: ureq::Error, url: &str) -> Error {
    let kind = match &e {
        ureq::Error::BadUri(_) | ureq::Error::Http(_) => ErrorKind::InvalidArgument,
        _ => ErrorKind::Network,
    };
    // The details are in the source, which reporters print after the message.
    let what = match &e {
        ureq::Error::Timeout(_) => "timed out",
        ureq::Error::ConnectionFailed | ureq::Error::Io(_) => "connection failed",
        ureq::Error::HostNotFound => "host not found",
        ureq::Error::Tls(_) => "TLS failed",
        ureq::Error::BadUri(_) | ureq::Error::Http(_) => "invalid URL",
        _ => "request failed",
    };
    Error::new(kind, format!("{url}: {what}")).with_source(e)
}

/// A body read error as a network error.
pub(crate) fn body_error(e: std::io::Error, url: &str) -> Error {
    Error::new(ErrorKind::Network, format!("{url}: transfer interrupted")).with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("bytes 0-99/1000"), Some((0, 99, Some(1000))));
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5, None)));
        assert_eq!(parse_content_range("bytes 10-5/100"), None);
        assert_eq!(parse_content_range("bytes 0-100/100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn validators_pick_a_strong_etag_then_the_date() {
        let v = Validators {
            etag: Some("\"abc\"".into()),
            last_modified: Some("Mon, 01 Jan 2024 00:00:00 GMT".into()),
        };
        assert_eq!(v.if_range(), Some("\"abc\""));
        let weak = Validators {
            etag: Some("W/\"abc\"".into()),
            ..v.clone()
        };
        assert_eq!(weak.if_range(), Some("Mon, 01 Jan 2024 00:00:00 GMT"));
        assert!(v.same_version(&v));
        assert!(!v.same_version(&Validators {
            etag: Some("\"other\"".into()),
            ..v.clone()
        }));
        assert!(!Validators::default().same_version(&Validators::default()));
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let p = RetryPolicy {
            attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        assert!(p.backoff(1) >= Duration::from_millis(100) && p.backoff(1) < Duration::from_millis(130));
        assert!(p.backoff(3) >= Duration::from_millis(400));
        assert_eq!(p.backoff(30), Duration::from_secs(1));
    }
}
