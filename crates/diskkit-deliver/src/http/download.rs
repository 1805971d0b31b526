//! Resumable downloads into a file.
//!
//! [`download`] appends to what the file already holds with a ranged GET validated by
//! `If-Range` (a strong ETag or Last-Modified), and checks the answer: a 206 must start
//! exactly where the file ends, name the same complete length and carry the same validators;
//! a 200 (the server ignored the range, or the resource changed) starts the file over. A
//! transfer that fails (reset, timeout, short body, retryable status) is resumed after a
//! backoff; the attempt count restarts whenever bytes arrived since the last failure.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{body_error, retryable_status, status_error, Client, Range, Validators};
use crate::error::{Error, ErrorKind, Result};

/// Bytes read from the body per call.
const CHUNK: usize = 256 << 10;

/// What a partly downloaded file holds: enough to resume it later, in another process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeState {
    /// The URL the bytes came from.
    pub url: String,
    /// The validators of the version being downloaded.
    pub validators: Validators,
    /// The complete length, when the server said.
    pub total: Option<u64>,
}

/// What happened during a [`download`], reported as it happens.
#[derive(Debug)]
pub enum Event<'a> {
    /// A response's body is about to be written from byte `from` of the file (0 after the
    /// file was started over: it was truncated first). `state` describes the version being
    /// fetched; persist it before more bytes are written to be able to resume later.
    Started {
        /// The version being downloaded.
        state: &'a ResumeState,
        /// Where the body's bytes go.
        from: u64,
    },
    /// The file now holds `len` bytes (of `total`, when known).
    Progress {
        /// Bytes in the file.
        len: u64,
        /// The complete length, when known.
        total: Option<u64>,
    },
    /// The file's bytes are about to be discarded: the download starts over (the resource
    /// changed, or the server would not continue it). Sent before the file is truncated.
    Discarding,
    /// These bytes were just written to the file at `at` (sent before the matching
    /// [`Event::Progress`]); lets a caller hash while downloading.
    Data {
        /// Where in the file they went.
        at: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// A transfer failed and will be retried after `wait`.
    Retry {
        /// Why.
        error: &'a Error,
        /// The backoff before the next attempt.
        wait: Duration,
    },
}

/// What [`download`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadOutcome {
    /// The file's final length.
    pub len: u64,
    /// The file's length when the call started (0 if it was started over).
    pub resumed_from: u64,
    /// Bytes received in this call.
    pub transferred: u64,
    /// The version that was downloaded.
    pub state: ResumeState,
}

/// Extra settings of [`download_with`].
#[derive(Debug, Clone, Default)]
pub struct DownloadOptions {
    /// Headers sent with every request (e.g. `Authorization`).
    pub headers: Vec<(String, String)>,
    /// The resource never changes (it is named by its digest): resume without validators
    /// and without `If-Range`. What arrives must still be checked by the caller.
    pub immutable: bool,
}

/// Download `url` into `file` (opened for reading and writing), resuming after what it
/// holds if `state` says those bytes came from the same URL and carries validators.
/// `events` is told when a body starts (with the state to persist), as bytes arrive, and
/// before retries; an error it returns stops the download.
pub fn download(
    client: &Client,
    url: &str,
    file: &File,
    state: &mut ResumeState,
    events: &mut dyn FnMut(Event<'_>) -> Result<()>,
) -> Result<DownloadOutcome> {
    download_with(client, url, file, state, &DownloadOptions::default(), events)
}

/// [`download`] with extra headers, and for resources that never change.
pub fn download_with(
    client: &Client,
    url: &str,
    file: &File,
    state: &mut ResumeState,
    options: &DownloadOptions,
    events: &mut dyn FnMut(Event<'_>) -> Result<()>,
) -> Result<DownloadOutcome> {
    let io = |e: std::io::Error| Error::io_while(e, "writing the download");
    let headers: Vec<(&str, &str)> = options
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let mut len = file.metadata().map_err(io)?.len();
    let usable = state.url == url
        && (options.immutable || state.validators.if_range().is_some())
        && state.total.is_none_or(|t| len <= t);
    if len > 0 && !usable {
        events(Event::Discarding)?;
        file.set_len(0).map_err(io)?;
        len = 0;
    }
    if len > 0 && state.total == Some(len) {
        events(Event::Started { state, from: len })?;
    }
    let mut resumed_from = len;
    let mut transferred = 0u64;
    let policy = client.options().retry.clone();
    let mut failures = 0u32;
    let mut buf = vec![0u8; CHUNK];
    let mut retry_after: Option<u64> = None;
    loop {
        if len > 0 && state.total == Some(len) {
            break;
        }
        let range = (len > 0).then(|| Range {
            start: len,
            end: None,
            if_range: if options.immutable {
                None
            } else {
                state.validators.if_range().map(str::to_string)
            },
        });
        let attempt = (|| -> Result<bool> {
            let mut resp = client.get_with_headers(url, range.as_ref(), &headers)?;
            let head = resp.head.clone();
            match head.status {
                206 if len > 0 => {
                    let ok_range = head.content_range.is_some_and(|(first, _, total)| {
                        first == len && (total.is_none() || state.total.is_none() || total == state.total)
                    });
                    let same = options.immutable
                        || head.validators == Validators::default()
                        || state.validators.same_version(&head.validators);
                    if !ok_range || !same {
                        // Not the piece asked for: start over.
                        events(Event::Discarding)?;
                        file.set_len(0).map_err(io)?;
                        len = 0;
                        resumed_from = 0;
                        return Err(Error::new(
                            ErrorKind::Network,
                            format!("{url}: the server sent a range that does not continue the download"),
                        ));
                    }
                    if state.total.is_none() {
                        state.total = head.content_range.and_then(|(_, _, t)| t);
                    }
                    events(Event::Started { state, from: len })?;
                }
                200 => {
                    if len > 0 {
                        events(Event::Discarding)?;
                        file.set_len(0).map_err(io)?;
                        len = 0;
                        resumed_from = 0;
                    }
                    *state = ResumeState {
                        url: url.to_string(),
                        validators: head.validators.clone(),
                        total: head.length,
                    };
                    events(Event::Started { state, from: 0 })?;
                }
                416 if len > 0 => {
                    events(Event::Discarding)?;
                    file.set_len(0).map_err(io)?;
                    len = 0;
                    resumed_from = 0;
                    return Err(Error::new(
                        ErrorKind::Network,
                        format!("{url}: the server refused to resume; starting over"),
                    ));
                }
                s if retryable_status(s) => {
                    retry_after = head.retry_after;
                    let e = status_error(s, url);
                    return Err(Error::new(ErrorKind::Network, e.to_string()));
                }
                s => return Err(status_error(s, url)),
            }
            let mut progressed = false;
            loop {
                let n = match resp.body().read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let err = body_error(e, url);
                        return if progressed { Ok(false) } else { Err(err) };
                    }
                };
                if state.total.is_some_and(|t| len + n as u64 > t) {
                    return Err(Error::new(
                        ErrorKind::Network,
                        format!("{url}: the server sent more than the announced length"),
                    ));
                }
                file.write_all_at(&buf[..n], len).map_err(io)?;
                events(Event::Data {
                    at: len,
                    data: &buf[..n],
                })?;
                len += n as u64;
                transferred += n as u64;
                progressed = true;
                events(Event::Progress {
                    len,
                    total: state.total,
                })?;
            }
            match state.total {
                Some(t) if len < t => Ok(false),
                None => {
                    state.total = Some(len);
                    Ok(true)
                }
                _ => Ok(true),
            }
        })();
        match attempt {
            Ok(true) => break,
            Ok(false) => {
                // Bytes arrived, then the transfer stopped: resume at once.
                failures = 0;
                let e = Error::new(ErrorKind::Network, format!("{url}: transfer interrupted"));
                events(Event::Retry {
                    error: &e,
                    wait: Duration::ZERO,
                })?;
            }
            Err(e) if e.kind() == ErrorKind::Network => {
                failures += 1;
                if failures >= policy.attempts.max(1) {
                    let msg = format!(
                        "{} (gave up after {failures} attempts)",
                        e.message().unwrap_or("transfer failed")
                    );
                    return Err(e.with_message(msg));
                }
                let wait = retry_after
                    .take()
                    .map(|s| Duration::from_secs(s).min(policy.max_backoff))
                    .unwrap_or_else(|| policy.backoff(failures));
                events(Event::Retry { error: &e, wait })?;
                std::thread::sleep(wait);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(DownloadOutcome {
        len,
        resumed_from,
        transferred,
        state: state.clone(),
    })
}
