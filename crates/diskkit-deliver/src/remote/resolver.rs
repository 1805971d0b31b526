//! The parent resolver that opens remote bases named by cache layers.

use std::sync::{Arc, Mutex};

use diskkit::stack::{LayerLocation, ParentResolver, ResolvedParent};
use diskkit::storage::Storage;

use super::identity::RemoteHint;
use super::object::RequestStats;
use super::{open_remote, remote_host, RemoteOptions, RemoteStats};
use crate::error::{Error, ErrorKind};

/// Which remote hosts may be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowRemote {
    /// These hosts (`HOST` or `HOST:PORT` for HTTP(S), the bucket for S3), compared without
    /// regard to case.
    Hosts(Vec<String>),
    /// Any host (the CLI's `--allow-any-parent`).
    Any,
}

impl AllowRemote {
    /// Whether `host` (from [`remote_host`]) is allowed.
    pub fn allows(&self, host: &str) -> bool {
        match self {
            AllowRemote::Any => true,
            AllowRemote::Hosts(hosts) => hosts.iter().any(|h| {
                h.eq_ignore_ascii_case(host)
                    || (!h.contains(':')
                        && host
                            .rsplit_once(':')
                            .is_some_and(|(name, _)| h.eq_ignore_ascii_case(name)))
            }),
        }
    }
}

/// Opens the remote parents cache layers name, for a [`diskkit::ParentPolicy`] (see
/// [`diskkit::ParentPolicy::with_resolver`]). Names that are not `http://`, `https://` or
/// `s3://` URLs are left to the policy's file rules.
#[derive(Debug)]
pub struct RemoteResolver {
    options: RemoteOptions,
    allow: AllowRemote,
    /// The URL and traffic counters of each object opened (not the storages themselves,
    /// which are dropped with their stacks, ending their read-ahead threads).
    opened: Mutex<Vec<(String, Arc<RequestStats>)>>,
}

impl RemoteResolver {
    /// A resolver opening the hosts `allow` names, reading as `options` say.
    pub fn new(options: RemoteOptions, allow: AllowRemote) -> RemoteResolver {
        RemoteResolver {
            options,
            allow,
            opened: Mutex::new(Vec::new()),
        }
    }

    /// The URL and traffic so far of each remote object this resolver has opened, in order.
    pub fn opened(&self) -> Vec<(String, RemoteStats)> {
        self.opened
            .lock()
            .map(|o| o.iter().map(|(u, s)| (u.clone(), s.snapshot())).collect())
            .unwrap_or_default()
    }
}

/// A deliver error as a core error of a fitting kind (the message is complete on its own).
fn core_error(e: Error, hint_url: &str) -> diskkit::Error {
    let kind = match e.kind() {
        ErrorKind::Changed => diskkit::ErrorKind::LayerMismatch,
        ErrorKind::InvalidArgument => diskkit::ErrorKind::InvalidArgument,
        ErrorKind::NotFound => diskkit::ErrorKind::NotFound,
        ErrorKind::HttpStatus if e.http_status() == Some(404) => diskkit::ErrorKind::NotFound,
        ErrorKind::Image => diskkit::ErrorKind::InvalidFormat,
        ErrorKind::Unsupported => diskkit::ErrorKind::Unsupported,
        _ => diskkit::ErrorKind::Io,
    };
    let text = e.to_string();
    let message = if text.contains(hint_url) {
        text
    } else {
        format!("{hint_url}: {text}")
    };
    match e.kind() {
        ErrorKind::Network | ErrorKind::Io => {
            diskkit::Error::new(kind, format!("cannot open the remote base {hint_url}")).with_source(e)
        }
        _ => diskkit::Error::new(kind, message),
    }
}

/// The allocation unit (ASIF chunk, qcow2 cluster) of the layer file at `child`, from its
/// header; `None` when it is not a file or cannot be read (the fetch unit stays as set).
/// Fills smaller than a chunk would leave it partly filled, its zeroes stored as data.
fn allocation_unit(child: &LayerLocation) -> Option<u64> {
    let LayerLocation::File(path) = child else {
        return None;
    };
    // No lock: this process already holds the layer open, with its own lock.
    let storage = diskkit::storage::FileStorage::open_locked(path, false, None).ok()?;
    let layer = diskkit::open_layer(Arc::new(storage), &diskkit::OpenOptions::new()).ok()?;
    Some(layer.cluster_size())
}

impl ParentResolver for RemoteResolver {
    fn resolve(&self, child: &LayerLocation, hint: &str) -> diskkit::Result<Option<ResolvedParent>> {
        let parsed = RemoteHint::parse(hint).map_err(|e| {
            diskkit::Error::new(diskkit::ErrorKind::PolicyDenied, e.to_string()).with_path(child.to_string())
        })?;
        let Some(parsed) = parsed else {
            return Ok(None);
        };
        let host = remote_host(&parsed.url).map_err(|e| core_error(e, &parsed.url))?;
        if !self.allow.allows(&host) {
            return Err(diskkit::Error::new(
                diskkit::ErrorKind::PolicyDenied,
                format!(
                    "remote parent {} named by this layer is not allowed: its host '{host}' is not \
                     among the allowed ones (CLI: --allow-remote {host}, or --allow-any-parent)",
                    parsed.url
                ),
            )
            .with_path(child.to_string()));
        }
        let mut options = self.options.clone();
        if let Some(unit) = allocation_unit(child) {
            options.fetch_unit = options.fetch_unit.max(unit);
        }
        let storage = open_remote(&parsed.url, Some(&parsed.identity), &options)
            .map_err(|e| core_error(e, &parsed.url).with_path(child.to_string()))?;
        if let Ok(mut o) = self.opened.lock() {
            o.push((parsed.url.clone(), storage.counters()));
        }
        let warning = storage.unchecked().map(|why| {
            format!(
                "{} could not be reached ({why}), so it was not checked to be the object the cache \
                 layer recorded: what the cache holds is read, and reads of anything else fail \
                 until the server answers (and fail for good if the object changed)",
                parsed.url
            )
        });
        let storage: Arc<dyn Storage> = Arc::new(storage);
        Ok(Some(ResolvedParent {
            storage,
            location: LayerLocation::Other(parsed.url),
            warning,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let a = AllowRemote::Hosts(vec!["Example.com".into(), "127.0.0.1:8080".into()]);
        assert!(a.allows("example.com"));
        assert!(a.allows("example.com:443"));
        assert!(a.allows("127.0.0.1:8080"));
        assert!(!a.allows("127.0.0.1:8081"));
        assert!(!a.allows("127.0.0.1"));
        assert!(!a.allows("evil.com"));
        assert!(AllowRemote::Any.allows("x"));
    }
}
