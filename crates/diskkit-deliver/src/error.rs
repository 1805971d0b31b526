//! The error type of the delivery crate.
//!
//! Like the core's error: a small matchable [`ErrorKind`], a message, optional context (the
//! path and the operation), and the cause behind it, reachable through
//! [`std::error::Error::source`]. `Display` prints the message and the context, never the
//! source again: reporters that walk the chain (`anyhow`'s `{:#}`) print it once.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, in a form callers can match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The operating system reported an I/O error.
    Io,
    /// A bundle broke one of the bundle rules (member names and types, sizes, the layer's
    /// backing file, machine.json), or its compressed or tar stream is damaged.
    InvalidBundle,
    /// A disk image inside a bundle or a cache entry could not be used (the core's error is
    /// the source).
    Image,
    /// The network failed: connection refused or reset, a timeout, TLS.
    Network,
    /// The server answered with an HTTP status that is not retried (404, 403, ...).
    HttpStatus,
    /// The downloaded bytes do not have the expected SHA-256 digest.
    DigestMismatch,
    /// A cache entry, instance or file does not exist.
    NotFound,
    /// A cache entry is referenced by an instance or being fetched.
    InUse,
    /// The output or name already exists.
    AlreadyExists,
    /// The caller passed an argument that cannot be honoured.
    InvalidArgument,
    /// A registry sent a manifest or index that is malformed, too large, of a media type
    /// that is not a manifest's, or that points outside its repository.
    InvalidManifest,
    /// The registry wants credentials, or refused the ones given.
    Authentication,
    /// Something valid that this version does not handle (a Docker schema 1 manifest, a
    /// digest algorithm other than sha256).
    Unsupported,
    /// An artifact is not what the command expects (a container image where a VM disk was
    /// asked for, a disk layer that does not decompress).
    InvalidArtifact,
    /// A remote object is no longer the version a cache layer recorded (its size, ETag or
    /// Last-Modified changed).
    Changed,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::InvalidBundle => "invalid bundle",
            ErrorKind::Image => "unusable image",
            ErrorKind::Network => "network error",
            ErrorKind::HttpStatus => "HTTP error",
            ErrorKind::DigestMismatch => "digest mismatch",
            ErrorKind::NotFound => "not found",
            ErrorKind::InUse => "in use",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::InvalidManifest => "invalid manifest",
            ErrorKind::Authentication => "authentication failed",
            ErrorKind::Unsupported => "not supported",
            ErrorKind::InvalidArtifact => "invalid artifact",
            ErrorKind::Changed => "remote object changed",
        }
    }
}

/// An error: a kind, a message, context and an optional cause.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: Option<String>,
    path: Option<PathBuf>,
    operation: Option<&'static str>,
    status: Option<u16>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                message: Some(message.into()),
                path: None,
                operation: None,
                status: None,
                source: None,
            }),
        }
    }

    /// A new error of `kind` without a message of its own.
    pub fn from_kind(kind: ErrorKind) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                message: None,
                path: None,
                operation: None,
                status: None,
                source: None,
            }),
        }
    }

    /// A bundle rule was broken.
    pub fn bundle(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidBundle, message)
    }

    /// An invalid argument.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    /// Wrap an I/O error.
    pub fn io(err: io::Error) -> Self {
        let kind = match err.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            _ => ErrorKind::Io,
        };
        Error::from_kind(kind).with_source(err)
    }

    /// Wrap an I/O error with a message saying what was being done.
    pub fn io_while(err: io::Error, what: impl Into<String>) -> Self {
        let kind = match err.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            _ => ErrorKind::Io,
        };
        Error::new(kind, what).with_source(err)
    }

    /// Wrap an error of the core library about an image, saying what was being done.
    pub fn image(err: diskkit::Error, what: impl Into<String>) -> Self {
        Error::new(ErrorKind::Image, what).with_source(err)
    }

    /// Attach a cause.
    pub fn with_source(mut self, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    /// Attach the path of the file involved (kept if one is already set).
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Self {
        if self.inner.path.is_none() {
            self.inner.path = Some(path.as_ref().to_path_buf());
        }
        self
    }

    /// Attach the operation that failed (kept if one is already set).
    pub fn with_operation(mut self, operation: &'static str) -> Self {
        if self.inner.operation.is_none() {
            self.inner.operation = Some(operation);
        }
        self
    }

    /// Record the HTTP status a server answered with.
    pub fn with_status(mut self, status: u16) -> Self {
        self.inner.status = Some(status);
        self
    }

    /// The HTTP status behind an [`ErrorKind::HttpStatus`] error.
    pub fn http_status(&self) -> Option<u16> {
        self.inner.status
    }

    /// Replace the message, keeping kind, context and cause.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.inner.message = Some(message.into());
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The message, if the error has one of its own.
    pub fn message(&self) -> Option<&str> {
        self.inner.message.as_deref()
    }

    /// The path of the file involved, if known.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The operation that failed, if known.
    pub fn operation(&self) -> Option<&'static str> {
        self.inner.operation
    }

    /// The message followed by every cause (`message: cause: cause...`), for places that
    /// keep only text (such as the failure record other processes read).
    pub fn full_message(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            text.push_str(&format!(": {c}"));
            cause = c.source();
        }
        text
    }

    /// Whether the error, or an error it wraps, is an I/O error that says a file or its
    /// device ran out of space.
    pub fn is_out_of_space(&self) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            if let Some(ioe) = e.downcast_ref::<io::Error>() {
                if matches!(
                    ioe.kind(),
                    io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
                ) {
                    return true;
                }
            }
            cur = e.source();
        }
        false
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        match &i.message {
            Some(m) => f.write_str(m)?,
            None => f.write_str(i.kind.describe())?,
        }
        let mut sep = " (";
        if let Some(p) = &i.path {
            write!(f, "{sep}{}", p.display())?;
            sep = ", ";
        }
        if let Some(op) = i.operation {
            write!(f, "{sep}while {op}")?;
            sep = ", ";
        }
        if sep == ", " {
            f.write_str(")")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        let mut d = f.debug_struct("Error");
        d.field("kind", &i.kind);
        if let Some(m) = &i.message {
            d.field("message", m);
        }
        if let Some(p) = &i.path {
            d.field("path", p);
        }
        if let Some(op) = i.operation {
            d.field("operation", &op);
        }
        if let Some(s) = &i.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner.source.as_deref().map(|e| e as _)
    }
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        Error::io(err)
    }
}

impl From<Error> for io::Error {
    fn from(err: Error) -> Self {
        let kind = match err.kind() {
            ErrorKind::Io | ErrorKind::Image => io::ErrorKind::Other,
            ErrorKind::InvalidBundle
            | ErrorKind::DigestMismatch
            | ErrorKind::InvalidManifest
            | ErrorKind::InvalidArtifact
            | ErrorKind::Changed => io::ErrorKind::InvalidData,
            ErrorKind::Authentication => io::ErrorKind::PermissionDenied,
            ErrorKind::Unsupported => io::ErrorKind::Unsupported,
            ErrorKind::Network | ErrorKind::HttpStatus => io::ErrorKind::ConnectionAborted,
            ErrorKind::NotFound => io::ErrorKind::NotFound,
            ErrorKind::InUse => io::ErrorKind::ResourceBusy,
            ErrorKind::AlreadyExists => io::ErrorKind::AlreadyExists,
            ErrorKind::InvalidArgument => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, err)
    }
}

/// Adds a path to the errors of a result.
pub(crate) trait PathContext<T> {
    /// Attach `path` to the error.
    fn at_path(self, path: &Path) -> Result<T>;
}

impl<T, E: Into<Error>> PathContext<T> for std::result::Result<T, E> {
    fn at_path(self, path: &Path) -> Result<T> {
        self.map_err(|e| e.into().with_path(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_has_context_not_source() {
        let e = Error::bundle("member 'x' is not allowed")
            .with_path("/tmp/b.tar.zst")
            .with_source(io::Error::other("inner"));
        assert_eq!(e.to_string(), "member 'x' is not allowed (/tmp/b.tar.zst)");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn out_of_space_is_found_through_the_chain() {
        let e = Error::io_while(io::Error::from_raw_os_error(28), "writing");
        assert!(e.is_out_of_space());
        // EDQUOT: a quota is out of space too.
        assert!(Error::io(io::Error::from_raw_os_error(122)).is_out_of_space());
        assert!(!Error::io(io::Error::other("x")).is_out_of_space());
    }
}
