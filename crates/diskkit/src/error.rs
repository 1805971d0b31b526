//! The error type of the core library.
//!
//! An [`Error`] carries a small, matchable [`ErrorKind`], optional context (the path, the offset
//! and the operation that failed), a message, and the underlying cause, reachable through
//! [`std::error::Error::source`]. `Display` prints the kind's message and the context, never the
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
    /// The bytes are not an image of the expected format (wrong magic, unknown version).
    InvalidFormat,
    /// The image uses a feature diskkit does not implement.
    Unsupported,
    /// The image's structures contradict each other or point outside the file.
    Corrupt,
    /// An offset or length lies outside the virtual disk.
    OutOfBounds,
    /// A write was attempted on an image or layer opened read-only.
    ReadOnly,
    /// The caller passed an argument that cannot be honoured.
    InvalidArgument,
    /// Opening a file named inside an image was refused by the open policy.
    PolicyDenied,
    /// A layer's recorded parent UUID does not match its parent's layer UUID.
    LayerMismatch,
    /// The output already exists and overwriting was not requested.
    AlreadyExists,
    /// A file or object was not found.
    NotFound,
    /// A stack rule was broken (a second cache layer, writing a base image, ...).
    StackRule,
    /// The image is in use: another process (QEMU, another diskkit) holds a lock that
    /// conflicts with the access asked for.
    Locked,
    /// The file is an image of a format diskkit does not read (VMDK, VHDX, ...).
    UnsupportedFormat,
    /// The open image was marked failed (a thread panicked while using it); it must be
    /// closed and opened again.
    Failed,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::InvalidFormat => "not a valid image",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Corrupt => "corrupt image",
            ErrorKind::OutOfBounds => "out of bounds",
            ErrorKind::ReadOnly => "image is read-only",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::PolicyDenied => "refused by the open policy",
            ErrorKind::LayerMismatch => "layer mismatch",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::NotFound => "not found",
            ErrorKind::StackRule => "stack rule violated",
            ErrorKind::Locked => "the image is in use",
            ErrorKind::UnsupportedFormat => "unsupported format",
            ErrorKind::Failed => "the image is marked failed",
        }
    }
}

/// An error from the core library: a kind, context and an optional cause.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: Option<String>,
    path: Option<PathBuf>,
    offset: Option<u64>,
    operation: Option<&'static str>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The result type of the core library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                message: Some(message.into()),
                path: None,
                offset: None,
                operation: None,
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
                offset: None,
                operation: None,
                source: None,
            }),
        }
    }

    /// A corruption error: the image contradicts itself.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, message)
    }

    /// An invalid-format error: the bytes are not this kind of image.
    pub fn invalid_format(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidFormat, message)
    }

    /// An unsupported-feature error.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unsupported, message)
    }

    /// An invalid-argument error.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    /// An out-of-bounds error.
    pub fn out_of_bounds(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::OutOfBounds, message)
    }

    /// Wrap an I/O error.
    pub fn io(err: io::Error) -> Self {
        let kind = match err.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            io::ErrorKind::UnexpectedEof => ErrorKind::Corrupt,
            _ => ErrorKind::Io,
        };
        Error::from_kind(kind).with_source(err)
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

    /// Attach the offset involved (kept if one is already set).
    pub fn with_offset(mut self, offset: u64) -> Self {
        if self.inner.offset.is_none() {
            self.inner.offset = Some(offset);
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

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The path of the file involved, if known.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The offset involved, if known.
    pub fn offset(&self) -> Option<u64> {
        self.inner.offset
    }

    /// The operation that failed, if known.
    pub fn operation(&self) -> Option<&'static str> {
        self.inner.operation
    }

    /// The OS error number behind this error, if there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> =
            self.inner.source.as_deref().map(|e| e as _);
        while let Some(e) = cur {
            if let Some(ioe) = e.downcast_ref::<io::Error>() {
                if let Some(code) = ioe.raw_os_error() {
                    return Some(code);
                }
            }
            cur = e.source();
        }
        None
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
        if let Some(o) = i.offset {
            write!(f, "{sep}at offset {o}")?;
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
        if let Some(o) = i.offset {
            d.field("offset", &o);
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
        if let Some(code) = err.raw_os_error() {
            if err.kind() == ErrorKind::Io {
                return io::Error::from_raw_os_error(code);
            }
        }
        let kind = match err.kind() {
            ErrorKind::Io => io::ErrorKind::Other,
            ErrorKind::InvalidFormat | ErrorKind::Corrupt => io::ErrorKind::InvalidData,
            ErrorKind::Unsupported => io::ErrorKind::Unsupported,
            ErrorKind::OutOfBounds | ErrorKind::InvalidArgument => io::ErrorKind::InvalidInput,
            ErrorKind::ReadOnly | ErrorKind::PolicyDenied => io::ErrorKind::PermissionDenied,
            ErrorKind::AlreadyExists => io::ErrorKind::AlreadyExists,
            ErrorKind::NotFound => io::ErrorKind::NotFound,
            ErrorKind::LayerMismatch | ErrorKind::StackRule => io::ErrorKind::InvalidData,
            ErrorKind::Locked => io::ErrorKind::ResourceBusy,
            ErrorKind::UnsupportedFormat => io::ErrorKind::Unsupported,
            ErrorKind::Failed => io::ErrorKind::Other,
        };
        io::Error::new(kind, err)
    }
}

/// Adds context to results, keeping the error kind.
pub trait ResultExt<T> {
    /// Attach a path.
    fn path_context(self, path: impl AsRef<Path>) -> Result<T>;
    /// Attach an operation name and offset.
    fn op_context(self, operation: &'static str, offset: u64) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn path_context(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| e.into().with_path(path))
    }
    fn op_context(self, operation: &'static str, offset: u64) -> Result<T> {
        self.map_err(|e| e.into().with_operation(operation).with_offset(offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_includes_context_but_not_source() {
        let e = Error::corrupt("table entry points past the end of the file")
            .with_path("/tmp/x.asif")
            .with_offset(4096)
            .with_source(io::Error::other("inner"));
        let s = e.to_string();
        assert_eq!(
            s,
            "table entry points past the end of the file (/tmp/x.asif, at offset 4096)"
        );
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn io_errors_keep_their_os_code() {
        let e = Error::io(io::Error::from_raw_os_error(28));
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.raw_os_error(), Some(28));
        let back: io::Error = e.into();
        assert_eq!(back.raw_os_error(), Some(28));
    }

    #[test]
    fn not_found_maps_to_kind() {
        let e = Error::io(io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }
}
