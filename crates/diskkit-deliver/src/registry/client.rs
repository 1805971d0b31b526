//! One repository of one registry, spoken to over the distribution API: authentication,
//! manifests, blob existence, downloads and uploads.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::auth::{self, parse_challenges, Credentials};
use super::manifest::{self, Fetched, ACCEPT, MAX_MANIFEST};
use super::reference::Reference;
use crate::error::{Error, ErrorKind, Result};
use crate::http::{self, Body, Client, ClientOptions, Method, Response};

/// How to reach a registry.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// HTTP settings (timeouts, retries, extra CAs).
    pub http: ClientOptions,
    /// Credentials given on the command line (`--creds`); they win over the auth files.
    pub credentials: Option<Credentials>,
    /// Auth files to look in (see [`auth::auth_files`]).
    pub auth_files: Vec<PathBuf>,
    /// Allow plain HTTP (and a failed TLS handshake falling back to it) for any registry,
    /// not only for ones on this machine.
    pub insecure: bool,
    /// Blobs transferred at once.
    pub jobs: usize,
    /// Upload chunk size; `None` uploads each blob in one request (monolithic).
    pub chunk_size: Option<u64>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            http: ClientOptions::default(),
            credentials: None,
            auth_files: auth::auth_files(),
            insecure: false,
            jobs: 4,
            chunk_size: None,
        }
    }
}

/// What to send as a request body; files are reopened for each attempt so that a retried
/// request sends the same bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Payload<'a> {
    Empty,
    Bytes(&'a [u8]),
    File { path: &'a Path, offset: u64, len: u64 },
}

#[derive(Debug, Clone)]
enum AuthState {
    /// Nothing asked yet, or the registry needs nothing.
    None,
    /// `Authorization` header to send.
    Header(String),
}

/// A client for one repository.
#[derive(Debug)]
pub struct Registry {
    http: Client,
    /// `https://host[:port]` (or `http://`).
    base: String,
    reference: Reference,
    credentials: Option<Credentials>,
    auth: Mutex<AuthState>,
    /// The scope actions asked for (`pull` or `pull,push`).
    actions: &'static str,
    options: RegistryOptions,
}

/// Percent-encode a query component.
fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Registry {
    /// Connect to the registry of `reference` (pinging `/v2/` to learn its scheme and how
    /// it authenticates). `push` asks for push rights as well as pull.
    pub fn connect(reference: &Reference, options: &RegistryOptions, push: bool) -> Result<Registry> {
        let http = Client::new(&options.http)?;
        let credentials = options.credentials.clone().or_else(|| {
            auth::find_credentials(&options.auth_files, &reference.registry, &reference.repository)
        });
        let host = reference.api_host();
        let plain_ok = options.insecure || reference.is_local();
        let mut reg = Registry {
            http,
            base: format!("https://{host}"),
            reference: reference.clone(),
            credentials,
            auth: Mutex::new(AuthState::None),
            actions: if push { "pull,push" } else { "pull" },
            options: options.clone(),
        };
        let ping = match reg.ping() {
            Err(e) if plain_ok && e.kind() == ErrorKind::Network => {
                reg.base = format!("http://{host}");
                reg.ping().map_err(|e2| {
                    e2.with_message(format!(
                        "cannot reach the registry {host} over HTTPS or HTTP ({})",
                        e.message().unwrap_or("")
                    ))
                })?
            }
            Err(e) if e.kind() == ErrorKind::Network => {
                let msg = format!(
                    "cannot reach the registry {host} over HTTPS{}",
                    if reference.is_local() {
                        ""
                    } else {
                        " (for a registry that only speaks plain HTTP, pass --insecure)"
                    }
                );
                return Err(e.with_message(msg));
            }
            other => other?,
        };
        if let Some(challenge) = ping {
            reg.authenticate(&challenge, None)?;
        }
        Ok(reg)
    }

    /// `GET /v2/`: `Some(challenge header)` when it asks for authentication.
    fn ping(&self) -> Result<Option<String>> {
        let url = format!("{}/v2/", self.base);
        let mut resp = self.http.send(Method::Get, &url, &[], Body::Empty)?;
        resp.discard_body();
        match resp.head.status {
            200..=299 => Ok(None),
            401 => Ok(resp.head.header("www-authenticate").map(str::to_string)),
            404 => Err(Error::new(
                ErrorKind::HttpStatus,
                format!(
                    "{} does not serve the registry API (GET /v2/ answered 404)",
                    self.base
                ),
            )
            .with_status(404)),
            s if http::retryable_status(s) => Ok(None),
            s => Err(http::status_error(s, &url)),
        }
    }

    /// The reference this client was made for.
    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// The options it was made with.
    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// `scheme://host` of the API.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Answer a challenge: fetch a bearer token, or use basic auth.
    fn authenticate(&self, header: &str, failed_before: Option<&str>) -> Result<()> {
        let challenges = parse_challenges(header)?;
        let host = &self.reference.registry;
        let need_creds = || {
            Error::new(
                ErrorKind::Authentication,
                format!(
                    "the registry {host} wants credentials: give --creds USER:PASSWORD or log in \
                     (docker login / podman login)"
                ),
            )
        };
        if let Some(c) = challenges.iter().find(|c| c.scheme == "bearer") {
            let realm = c.param("realm").ok_or_else(|| {
                Error::new(ErrorKind::Authentication, "the bearer challenge names no realm")
            })?;
            let plain_realm = realm.starts_with("http://");
            if !(realm.starts_with("https://") || plain_realm) {
                return Err(Error::new(
                    ErrorKind::Authentication,
                    format!(
                        "the token realm '{}' is not an HTTP(S) URL",
                        realm.escape_default()
                    ),
                ));
            }
            if plain_realm
                && !self.options.insecure
                && !self.reference.is_local()
                && self.credentials.is_some()
            {
                return Err(Error::new(
                    ErrorKind::Authentication,
                    format!("the token service {realm} is plain HTTP; not sending credentials there (--insecure allows it)"),
                ));
            }
            let ours = format!("repository:{}:{}", self.reference.repository, self.actions);
            let scope = match c.param("scope") {
                Some(s) if s.contains(&format!("repository:{}:", self.reference.repository)) => {
                    if self.actions.contains("push") && !s.contains("push") {
                        ours
                    } else {
                        s.to_string()
                    }
                }
                _ => ours,
            };
            let mut url = realm.to_string();
            let mut sep = if url.contains('?') { '&' } else { '?' };
            if let Some(service) = c.param("service") {
                url.push_str(&format!("{sep}service={}", encode_query(service)));
                sep = '&';
            }
            url.push_str(&format!("{sep}scope={}", encode_query(&scope)));
            let basic = self.credentials.as_ref().map(Credentials::basic_header);
            let headers: Vec<(&str, &str)> = basic.iter().map(|b| ("Authorization", b.as_str())).collect();
            let mut resp = self.send_retrying(Method::Get, &url, &headers, Payload::Empty)?;
            match resp.head.status {
                200..=299 => {}
                401 | 403 => {
                    return Err(if self.credentials.is_some() {
                        Error::new(
                            ErrorKind::Authentication,
                            format!("the token service of {host} refused the credentials"),
                        )
                    } else {
                        need_creds()
                    })
                }
                s => return Err(http::status_error(s, realm)),
            }
            let body = resp.read_limited(1 << 20, realm)?;
            let (token, _expires) = auth::parse_token(&body, realm)?;
            let value = format!("Bearer {token}");
            if failed_before == Some(value.as_str()) {
                return Err(Error::new(
                    ErrorKind::Authentication,
                    format!("the registry {host} refused the token its own token service issued (access denied to {})", self.reference.repository),
                ));
            }
            *self.auth.lock().unwrap_or_else(|e| e.into_inner()) = AuthState::Header(value);
            return Ok(());
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let creds = self.credentials.as_ref().ok_or_else(need_creds)?;
            let value = creds.basic_header();
            if failed_before == Some(value.as_str()) {
                return Err(Error::new(
                    ErrorKind::Authentication,
                    format!(
                        "the registry {host} refused the credentials for {}",
                        creds.username
                    ),
                ));
            }
            *self.auth.lock().unwrap_or_else(|e| e.into_inner()) = AuthState::Header(value);
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Authentication,
            format!(
                "the registry {host} asks for an authentication scheme diskkit does not speak ({})",
                challenges
                    .iter()
                    .map(|c| c.scheme.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
    }

    /// The `Authorization` value to send to `url` (only to the registry's own origin).
    pub(crate) fn auth_header(&self, url: &str) -> Option<String> {
        if !url.starts_with(&self.base) {
            return None;
        }
        match &*self.auth.lock().unwrap_or_else(|e| e.into_inner()) {
            AuthState::Header(h) => Some(h.clone()),
            AuthState::None => None,
        }
    }

    /// Send once per attempt, retrying transport failures and retryable statuses.
    fn send_retrying(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        payload: Payload<'_>,
    ) -> Result<Response> {
        let policy = &self.options.http.retry;
        let mut failures = 0u32;
        loop {
            let result = match payload {
                Payload::Empty => self.http.send(method, url, headers, Body::Empty),
                Payload::Bytes(b) => self.http.send(method, url, headers, Body::Bytes(b)),
                Payload::File { path, offset, len } => {
                    let mut f = File::open(path)
                        .map_err(|e| Error::io_while(e, "reading the upload").with_path(path))?;
                    f.seek(SeekFrom::Start(offset))
                        .map_err(|e| Error::io_while(e, "reading the upload").with_path(path))?;
                    let mut r = f.take(len);
                    self.http
                        .send(method, url, headers, Body::Reader { reader: &mut r, len })
                }
            };
            let wait = match result {
                Ok(resp) if http::retryable_status(resp.head.status) => {
                    failures += 1;
                    if failures >= policy.attempts.max(1) {
                        return Ok(resp);
                    }
                    resp.head
                        .retry_after
                        .map(|s| Duration::from_secs(s).min(policy.max_backoff))
                        .unwrap_or_else(|| policy.backoff(failures))
                }
                Ok(resp) => return Ok(resp),
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

    /// A request to the registry with authentication: a 401 is answered (once) by
    /// authenticating again, then the request is repeated.
    pub(crate) fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        payload: Payload<'_>,
    ) -> Result<Response> {
        let mut reauthenticated = false;
        loop {
            let auth = self.auth_header(url);
            let mut all: Vec<(&str, &str)> = headers.to_vec();
            if let Some(a) = &auth {
                all.push(("Authorization", a.as_str()));
            }
            let mut resp = self.send_retrying(method, url, &all, payload)?;
            if resp.head.status != 401 {
                return Ok(resp);
            }
            resp.discard_body();
            let challenge = resp.head.header("www-authenticate").map(str::to_string);
            match challenge {
                Some(c) if !reauthenticated => {
                    self.authenticate(&c, auth.as_deref())?;
                    reauthenticated = true;
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::Authentication,
                        format!(
                            "the registry {} refused access to {} ({})",
                            self.reference.registry,
                            self.reference.repository,
                            if self.credentials.is_some() {
                                "check the credentials and their rights"
                            } else {
                                "it wants credentials: --creds USER:PASSWORD or docker/podman login"
                            }
                        ),
                    )
                    .with_status(401))
                }
            }
        }
    }

    fn url(&self, kind: &str, what: &str) -> String {
        format!("{}/v2/{}/{kind}/{what}", self.base, self.reference.repository)
    }

    /// An error for a status answered to a request about `what`.
    fn status(&self, status: u16, what: &str, url: &str) -> Error {
        match status {
            404 => Error::new(
                ErrorKind::NotFound,
                format!("{what} not found in {}", self.reference.name()),
            )
            .with_status(404),
            403 => Error::new(
                ErrorKind::Authentication,
                format!("access to {what} in {} denied", self.reference.name()),
            )
            .with_status(403),
            s => http::status_error(s, url),
        }
    }

    /// Fetch a manifest or index by tag or digest. `expected` is the media type a
    /// descriptor announced. The bytes are checked against the digest asked for, and
    /// against the `Docker-Content-Digest` the registry sends.
    pub fn get_manifest(&self, reference: &str, expected: Option<&str>) -> Result<Fetched> {
        let url = self.url("manifests", reference);
        let mut resp = self.request(Method::Get, &url, &[("Accept", ACCEPT)], Payload::Empty)?;
        if !(200..300).contains(&resp.head.status) {
            return Err(self.status(resp.head.status, &format!("manifest '{reference}'"), &url));
        }
        let bytes = resp.read_limited(MAX_MANIFEST, &url).map_err(|e| {
            if e.kind() == ErrorKind::InvalidArgument {
                Error::new(
                    ErrorKind::InvalidManifest,
                    format!("the manifest '{reference}' is larger than the {MAX_MANIFEST} bytes accepted"),
                )
            } else {
                e
            }
        })?;
        let digest = manifest::sha256_digest(&bytes);
        if reference.starts_with("sha256:") && reference != digest {
            return Err(Error::new(
                ErrorKind::DigestMismatch,
                format!("the registry sent a manifest whose digest is {digest}, not {reference}"),
            ));
        }
        if let Some(d) = resp.head.header("docker-content-digest") {
            if d.starts_with("sha256:") && d != digest {
                return Err(Error::new(
                    ErrorKind::DigestMismatch,
                    format!(
                        "the manifest '{reference}' does not match the digest the registry announced ({d})"
                    ),
                ));
            }
        }
        let (media_type, document) = manifest::parse(&bytes, resp.head.content_type.as_deref(), expected)
            .map_err(|e| {
                let m = format!(
                    "{}: {}",
                    self.reference.with_manifest(None, None).name(),
                    e.message().unwrap_or("")
                );
                let m = format!("{m} (manifest '{reference}')");
                e.with_message(m)
            })?;
        Ok(Fetched {
            bytes,
            digest,
            media_type,
            document,
        })
    }

    /// Whether the repository has blob `digest` (HEAD).
    pub fn blob_exists(&self, digest: &str) -> Result<bool> {
        let url = self.url("blobs", digest);
        let mut resp = self.request(Method::Head, &url, &[], Payload::Empty)?;
        resp.discard_body();
        match resp.head.status {
            200..=299 => Ok(true),
            404 => Ok(false),
            s => Err(self.status(s, &format!("blob {digest}"), &url)),
        }
    }

    /// The URL of blob `digest`.
    pub fn blob_url(&self, digest: &str) -> String {
        self.url("blobs", digest)
    }

    /// Open blob `digest` for reading from byte `from` (a ranged GET when `from > 0`).
    /// Returns the response (status 200 or 206) whose body starts at `from`.
    pub fn open_blob(&self, digest: &str, from: u64) -> Result<Response> {
        let url = self.url("blobs", digest);
        let range = format!("bytes={from}-");
        let mut headers = vec![];
        if from > 0 {
            headers.push(("Range", range.as_str()));
        }
        let mut resp = self.request(Method::Get, &url, &headers, Payload::Empty)?;
        match resp.head.status {
            200 if from == 0 => Ok(resp),
            206 if from > 0 && resp.head.content_range.is_some_and(|(f, _, _)| f == from) => Ok(resp),
            200 | 206 if from > 0 => {
                // The server ignored the range or sent another piece: skip to `from`.
                let start = match resp.head.content_range {
                    Some((f, _, _)) if resp.head.status == 206 && f <= from => f,
                    _ if resp.head.status == 200 => 0,
                    _ => {
                        return Err(Error::new(
                            ErrorKind::Network,
                            format!("{url}: the server sent a range that does not continue the transfer"),
                        ))
                    }
                };
                let skip = from - start;
                let copied = std::io::copy(&mut resp.body().take(skip), &mut std::io::sink())
                    .map_err(|e| http::body_error(e, &url))?;
                if copied != skip {
                    return Err(Error::new(
                        ErrorKind::Network,
                        format!("{url}: transfer interrupted"),
                    ));
                }
                Ok(resp)
            }
            s => {
                resp.discard_body();
                Err(self.status(s, &format!("blob {digest}"), &url))
            }
        }
    }

    /// The authorization headers to send for a blob download (see [`http::download_with`]).
    pub(crate) fn download_headers(&self, url: &str) -> Vec<(String, String)> {
        self.auth_header(url)
            .map(|a| vec![("Authorization".to_string(), a)])
            .unwrap_or_default()
    }

    /// Re-authenticate after a 401 from a download (the token may have expired).
    pub(crate) fn refresh_auth(&self, url: &str) -> Result<()> {
        let mut resp = self.http.send(Method::Get, url, &[], Body::Empty)?;
        resp.discard_body();
        match resp.head.header("www-authenticate") {
            Some(c) if resp.head.status == 401 => {
                let c = c.to_string();
                self.authenticate(&c, None)
            }
            _ => Ok(()),
        }
    }

    /// The underlying HTTP client.
    pub(crate) fn http(&self) -> &Client {
        &self.http
    }

    /// Resolve an upload `Location` against the registry.
    fn location(&self, resp: &Response, url: &str) -> Result<String> {
        let loc = resp.head.header("location").ok_or_else(|| {
            Error::new(
                ErrorKind::Network,
                format!("{url}: the registry sent no upload location"),
            )
        })?;
        if loc.starts_with("https://") || loc.starts_with("http://") {
            Ok(loc.to_string())
        } else if loc.starts_with('/') {
            Ok(format!("{}{loc}", self.base))
        } else {
            Err(Error::new(
                ErrorKind::Network,
                format!("{url}: unusable upload location '{}'", loc.escape_default()),
            ))
        }
    }

    fn with_digest(location: &str, digest: &str) -> String {
        let sep = if location.contains('?') { '&' } else { '?' };
        format!("{location}{sep}digest={}", encode_query(digest))
    }

    fn start_upload(&self) -> Result<String> {
        let url = format!("{}/v2/{}/blobs/uploads/", self.base, self.reference.repository);
        let mut resp = self.request(Method::Post, &url, &[], Payload::Empty)?;
        resp.discard_body();
        if resp.head.status != 202 {
            return Err(self.status(resp.head.status, "an upload", &url));
        }
        self.location(&resp, &url)
    }

    /// Upload a blob of `len` bytes from `source` (bytes or a file range) unless the
    /// repository has it. Returns whether it was uploaded. Monolithic (one PUT) unless a
    /// chunk size is set; chunks are retried one by one, asking the registry where the
    /// upload stands after a failure.
    pub(crate) fn upload_blob(&self, digest: &str, len: u64, source: Payload<'_>) -> Result<bool> {
        if self.blob_exists(digest)? {
            return Ok(false);
        }
        let policy = self.options.http.retry.clone();
        let mut failures = 0;
        loop {
            let result = match self.options.chunk_size {
                Some(chunk) if chunk > 0 && len > chunk => self.upload_chunked(digest, len, source, chunk),
                _ => self.upload_monolithic(digest, source),
            };
            match result {
                Ok(()) => return Ok(true),
                Err(e)
                    if matches!(e.kind(), ErrorKind::Network)
                        || e.http_status().is_some_and(http::retryable_status) =>
                {
                    failures += 1;
                    if failures >= policy.attempts.max(1) {
                        return Err(e);
                    }
                    std::thread::sleep(policy.backoff(failures));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn upload_monolithic(&self, digest: &str, source: Payload<'_>) -> Result<()> {
        let location = self.start_upload()?;
        let url = Self::with_digest(&location, digest);
        let mut resp = self.request(
            Method::Put,
            &url,
            &[("Content-Type", "application/octet-stream")],
            source,
        )?;
        resp.discard_body();
        match resp.head.status {
            201 | 204 => Ok(()),
            400 => Err(Error::new(
                ErrorKind::DigestMismatch,
                format!("the registry refused blob {digest} (its content does not match the digest?)"),
            )),
            s => Err(self.status(s, &format!("the upload of {digest}"), &location)),
        }
    }

    fn upload_chunked(&self, digest: &str, len: u64, source: Payload<'_>, chunk: u64) -> Result<()> {
        let mut location = self.start_upload()?;
        let mut done = 0u64;
        let policy = self.options.http.retry.clone();
        let mut failures = 0;
        let mut buf = Vec::new();
        while done < len {
            let n = chunk.min(len - done);
            let piece: &[u8] = match source {
                Payload::Bytes(b) => &b[done as usize..(done + n) as usize],
                Payload::File { path, offset, .. } => {
                    buf.resize(n as usize, 0);
                    let f = File::open(path)
                        .map_err(|e| Error::io_while(e, "reading the upload").with_path(path))?;
                    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, offset + done)
                        .map_err(|e| Error::io_while(e, "reading the upload").with_path(path))?;
                    &buf
                }
                Payload::Empty => &[],
            };
            let range = format!("{}-{}", done, done + n - 1);
            let attempt = self.request(
                Method::Patch,
                &location,
                &[
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Range", &range),
                ],
                Payload::Bytes(piece),
            );
            match attempt {
                Ok(mut resp) if resp.head.status == 202 || resp.head.status == 201 => {
                    resp.discard_body();
                    location = self.location(&resp, &location)?;
                    done += n;
                    failures = 0;
                }
                Ok(mut resp) if resp.head.status == 416 || http::retryable_status(resp.head.status) => {
                    resp.discard_body();
                    failures += 1;
                    if failures >= policy.attempts.max(1) {
                        return Err(self.status(
                            resp.head.status,
                            &format!("a chunk of {digest}"),
                            &location,
                        ));
                    }
                    std::thread::sleep(policy.backoff(failures));
                    let mut loc = location.clone();
                    done = self.upload_offset(&location, &mut loc)?;
                    location = loc;
                }
                Ok(mut resp) => {
                    resp.discard_body();
                    return Err(self.status(resp.head.status, &format!("a chunk of {digest}"), &location));
                }
                Err(e) if e.kind() == ErrorKind::Network => {
                    failures += 1;
                    if failures >= policy.attempts.max(1) {
                        return Err(e);
                    }
                    std::thread::sleep(policy.backoff(failures));
                    let mut loc = location.clone();
                    done = self.upload_offset(&location, &mut loc)?;
                    location = loc;
                }
                Err(e) => return Err(e),
            }
        }
        let url = Self::with_digest(&location, digest);
        let mut resp = self.request(Method::Put, &url, &[], Payload::Empty)?;
        resp.discard_body();
        match resp.head.status {
            201 | 204 => Ok(()),
            400 => Err(Error::new(
                ErrorKind::DigestMismatch,
                format!("the registry refused blob {digest} (its content does not match the digest?)"),
            )),
            s => Err(self.status(s, &format!("the upload of {digest}"), &location)),
        }
    }

    /// Ask where an upload stands (`GET location` → `Range: 0-N`): the next byte to send.
    fn upload_offset(&self, location: &str, new_location: &mut String) -> Result<u64> {
        let mut resp = self.request(Method::Get, location, &[], Payload::Empty)?;
        resp.discard_body();
        if resp.head.status != 204 && resp.head.status != 200 {
            return Err(self.status(resp.head.status, "an upload's status", location));
        }
        if let Ok(l) = self.location(&resp, location) {
            *new_location = l;
        }
        Ok(match resp.head.header("range") {
            Some(r) => {
                let r = r.trim().trim_start_matches("bytes=");
                match r.split_once('-') {
                    Some((_, end)) => end.trim().parse::<u64>().map(|e| e + 1).unwrap_or(0),
                    None => 0,
                }
            }
            None => 0,
        })
    }

    /// Store a manifest under `reference` (a tag or its digest).
    pub fn put_manifest(&self, reference: &str, media_type: &str, bytes: &[u8]) -> Result<String> {
        let url = self.url("manifests", reference);
        let mut resp = self.request(
            Method::Put,
            &url,
            &[("Content-Type", media_type)],
            Payload::Bytes(bytes),
        )?;
        resp.discard_body();
        let digest = manifest::sha256_digest(bytes);
        match resp.head.status {
            200..=299 => {
                if let Some(d) = resp.head.header("docker-content-digest") {
                    if d.starts_with("sha256:") && d != digest {
                        return Err(Error::new(
                            ErrorKind::DigestMismatch,
                            format!("the registry stored the manifest as {d}, not {digest}"),
                        ));
                    }
                }
                Ok(digest)
            }
            s => Err(self.status(s, &format!("manifest '{reference}'"), &url)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_encoding() {
        assert_eq!(
            encode_query("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
        assert_eq!(
            Registry::with_digest("/v2/x/blobs/uploads/u?_state=s", "sha256:ab"),
            "/v2/x/blobs/uploads/u?_state=s&digest=sha256%3Aab"
        );
    }
}
