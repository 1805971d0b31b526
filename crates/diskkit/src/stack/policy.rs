//! Which parent (backing) files a layer may name: the open policy for stacks.
//!
//! Image files are untrusted input, and a parent path written inside one could point anywhere
//! (`/etc/shadow`, a device, another user's disk). diskkit therefore follows a parent only
//! through an explicit [`ParentPolicy`]. The library default denies every parent; the CLI allows
//! parents in the child's own directory and in directories the user names.
//!
//! Parents that are not local files (a URL a remote base is found at, say) are opened through
//! the same policy by a [`ParentResolver`] the caller supplies: it turns the name a layer
//! records into a [`Storage`] of its choosing, and the stack opens the parent from that
//! storage like any other (locked as the storage allows, checked against the recorded UUID).
//! This crate has no network code; resolvers live in the crates that do.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::output::containing_dir;
use crate::storage::Storage;

/// Where a layer of a stack comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LayerLocation {
    /// A local file.
    File(PathBuf),
    /// Anything a [`ParentResolver`] opened (a URL, an object name).
    Other(String),
}

impl fmt::Display for LayerLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerLocation::File(p) => write!(f, "{}", p.display()),
            LayerLocation::Other(s) => f.write_str(s),
        }
    }
}

/// A parent a [`ParentResolver`] opened.
#[derive(Debug)]
pub struct ResolvedParent {
    /// The parent image's bytes.
    pub storage: Arc<dyn Storage>,
    /// Where it is: the names its own parent hints give are resolved against this.
    pub location: LayerLocation,
    /// Something the user should know about how it was opened (the stack's
    /// [`crate::DiskImage::warnings`] carry it).
    pub warning: Option<String>,
}

/// Opens parents that are not local files, for a [`ParentPolicy`].
pub trait ParentResolver: Send + Sync + fmt::Debug {
    /// The parent named `hint` by the layer at `child`: `Ok(None)` when this resolver does not
    /// handle such names (the file rules of the policy decide then), the parent's storage and
    /// location when it does, an error when it refuses or fails.
    fn resolve(&self, child: &LayerLocation, hint: &str) -> Result<Option<ResolvedParent>>;
}

/// Which parent files may be opened while following a stack's chain.
#[derive(Debug, Clone, Default)]
pub struct ParentPolicy {
    same_directory: bool,
    directories: Vec<PathBuf>,
    any: bool,
    resolver: Option<Arc<dyn ParentResolver>>,
}

impl PartialEq for ParentPolicy {
    fn eq(&self, other: &Self) -> bool {
        self.same_directory == other.same_directory
            && self.directories == other.directories
            && self.any == other.any
            && match (&self.resolver, &other.resolver) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl Eq for ParentPolicy {}

impl ParentPolicy {
    /// Follow no parent: opening a layer that names one fails (the library default).
    pub fn deny() -> Self {
        ParentPolicy::default()
    }

    /// Follow parents that resolve to a file in the same directory as the layer naming them
    /// (the CLI default).
    pub fn same_directory() -> Self {
        ParentPolicy {
            same_directory: true,
            ..ParentPolicy::default()
        }
    }

    /// Follow any parent path, absolute or relative, wherever it leads.
    pub fn any() -> Self {
        ParentPolicy {
            any: true,
            ..ParentPolicy::default()
        }
    }

    /// Also follow parents that resolve to a file under `dir` (at any depth).
    pub fn allow_directory(mut self, dir: impl Into<PathBuf>) -> Self {
        self.directories.push(dir.into());
        self
    }

    /// Also open parents through `resolver` (asked first, for every parent name).
    pub fn with_resolver(mut self, resolver: Arc<dyn ParentResolver>) -> Self {
        self.resolver = Some(resolver);
        self
    }

    /// The resolver, if any.
    pub fn resolver(&self) -> Option<&Arc<dyn ParentResolver>> {
        self.resolver.as_ref()
    }

    /// Whether this policy can follow any parent at all.
    pub fn allows_parents(&self) -> bool {
        self.allows_files() || self.resolver.is_some()
    }

    /// Whether this policy can follow parent files.
    fn allows_files(&self) -> bool {
        self.any || self.same_directory || !self.directories.is_empty()
    }

    /// Resolve the parent `hint` recorded in the layer at `child`, and check it against the
    /// policy. Returns the parent's canonical path.
    pub fn resolve(&self, child: &Path, hint: &str) -> Result<PathBuf> {
        let denied = |why: String| {
            Error::new(
                ErrorKind::PolicyDenied,
                format!("parent '{hint}' named by this layer is not allowed: {why}"),
            )
            .with_path(child)
        };
        if hint.contains("://") {
            return Err(denied(
                "it is a remote object; remote parents are opened only through a resolver that \
                 allows their host (CLI: --allow-remote HOST or --allow-any-parent)"
                    .into(),
            ));
        }
        if !self.allows_files() {
            return Err(denied(
                "parents are only opened through an explicit policy (CLI: the same directory, \
                 --allow-parent-dir DIR or --allow-any-parent)"
                    .into(),
            ));
        }
        if hint.is_empty() || hint.contains('\0') {
            return Err(denied("empty or invalid path".into()));
        }
        let hint_path = Path::new(hint);
        let child_dir = containing_dir(child);
        let joined = child_dir.join(hint_path);
        let target = joined.canonicalize().map_err(|e| {
            Error::new(ErrorKind::NotFound, format!("parent '{hint}' cannot be found"))
                .with_path(&joined)
                .with_source(e)
        })?;
        if self.any {
            return Ok(target);
        }
        if hint_path.is_absolute() {
            return Err(denied("absolute parent paths need --allow-any-parent".into()));
        }
        let escapes = hint_path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
        let child_dir = child_dir
            .canonicalize()
            .map_err(|e| Error::io(e).with_path(child_dir))?;
        if self.same_directory && !escapes && target.parent() == Some(child_dir.as_path()) {
            return Ok(target);
        }
        for dir in &self.directories {
            if let Ok(dir) = dir.canonicalize() {
                if target.starts_with(&dir) {
                    return Ok(target);
                }
            }
        }
        Err(denied(format!(
            "it resolves to '{}', outside the allowed directories",
            target.display()
        )))
    }
}

/// The path of `target` relative to the directory `from_dir` (both made absolute first), for
/// recording a parent hint in a new layer.
pub(crate) fn relative_path(from_dir: &Path, target: &Path) -> Result<PathBuf> {
    let from = from_dir
        .canonicalize()
        .map_err(|e| Error::io(e).with_path(from_dir))?;
    let to = target
        .canonicalize()
        .map_err(|e| Error::io(e).with_path(target))?;
    let from_parts: Vec<_> = from.components().collect();
    let to_parts: Vec<_> = to.components().collect();
    let common = from_parts
        .iter()
        .zip(&to_parts)
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = PathBuf::new();
    for _ in common..from_parts.len() {
        out.push("..");
    }
    for part in &to_parts[common..] {
        out.push(part.as_os_str());
    }
    Ok(out)
}

/// The parent hint a layer at `child` records for `parent`: the parent's path relative to the
/// child's directory, as UTF-8.
pub(crate) fn parent_hint(child: &Path, parent: &Path) -> Result<String> {
    let rel = relative_path(containing_dir(child), parent)?;
    rel.to_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::invalid_argument("parent path is not valid UTF-8").with_path(parent))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("base"), b"x").unwrap();
        std::fs::write(a.join("child"), b"x").unwrap();
        std::fs::write(b.join("other"), b"x").unwrap();
        (dir, a, b)
    }

    #[test]
    fn deny_by_default() {
        let (_d, a, _b) = setup();
        let e = ParentPolicy::default()
            .resolve(&a.join("child"), "base")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PolicyDenied);
    }

    #[test]
    fn same_directory_only() {
        let (_d, a, b) = setup();
        let p = ParentPolicy::same_directory();
        let child = a.join("child");
        assert_eq!(
            p.resolve(&child, "base").unwrap(),
            a.join("base").canonicalize().unwrap()
        );
        assert_eq!(
            p.resolve(&child, "./base").unwrap(),
            a.join("base").canonicalize().unwrap()
        );
        for bad in ["../b/other", "../a/base"] {
            assert_eq!(
                p.resolve(&child, bad).unwrap_err().kind(),
                ErrorKind::PolicyDenied,
                "{bad}"
            );
        }
        let abs = b.join("other");
        assert_eq!(
            p.resolve(&child, abs.to_str().unwrap()).unwrap_err().kind(),
            ErrorKind::PolicyDenied
        );
        assert_eq!(
            p.resolve(&child, "missing").unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }

    #[test]
    fn symlink_escape_is_caught() {
        let (_d, a, b) = setup();
        std::os::unix::fs::symlink(b.join("other"), a.join("link")).unwrap();
        let e = ParentPolicy::same_directory()
            .resolve(&a.join("child"), "link")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PolicyDenied);
        let ok = ParentPolicy::same_directory()
            .allow_directory(&b)
            .resolve(&a.join("child"), "link")
            .unwrap();
        assert_eq!(ok, b.join("other").canonicalize().unwrap());
    }

    #[test]
    fn allowed_directories_and_any() {
        let (_d, a, b) = setup();
        let child = a.join("child");
        let p = ParentPolicy::deny().allow_directory(&b);
        assert!(p.resolve(&child, "../b/other").is_ok());
        assert_eq!(
            p.resolve(&child, "base").unwrap_err().kind(),
            ErrorKind::PolicyDenied
        );
        let abs = b.join("other");
        assert!(ParentPolicy::any().resolve(&child, abs.to_str().unwrap()).is_ok());
    }

    #[test]
    fn relative_paths() {
        let (_d, a, b) = setup();
        assert_eq!(relative_path(&a, &a.join("base")).unwrap(), PathBuf::from("base"));
        assert_eq!(
            relative_path(&a, &b.join("other")).unwrap(),
            PathBuf::from("../b/other")
        );
    }
}
