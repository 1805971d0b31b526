//! Small file-system helpers for crash-safe outputs: temporary names, directory syncs,
//! atomic small-file writes, and a guard that removes unfinished outputs.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A random suffix for temporary names (unique across processes and calls).
pub(crate) fn random_suffix() -> String {
    let u = uuid::Uuid::new_v4();
    format!("{}-{}", std::process::id(), &u.simple().to_string()[..12])
}

/// `dir/.name.tmp-<suffix>`: a temporary name next to `path`.
pub(crate) fn temp_sibling(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid_argument(format!("'{}' has no file name", path.display())))?;
    let dir = parent_dir(path);
    Ok(dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), random_suffix())))
}

/// The directory holding `path` (`.` for a bare name).
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Make the directory entries of `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io_while(e, format!("syncing directory {}", dir.display())))
}

/// Write `bytes` to `path` under a temporary name, sync, and rename into place (replacing
/// an existing file). The directory is synced too when `durable`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> Result<()> {
    let tmp = temp_sibling(path)?;
    let result = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io_while(e, format!("writing {}", path.display())));
    }
    if durable {
        sync_dir(&parent_dir(path))?;
    }
    Ok(())
}

/// Removes a file or directory tree when dropped, unless [`Cleanup::keep`] was called.
pub(crate) struct Cleanup {
    path: Option<PathBuf>,
}

impl Cleanup {
    pub(crate) fn new(path: impl Into<PathBuf>) -> Self {
        Cleanup {
            path: Some(path.into()),
        }
    }

    /// The guarded path.
    pub(crate) fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// Do not remove the path.
    pub(crate) fn keep(mut self) {
        self.path = None;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            remove_any(&p);
        }
    }
}

/// Remove a file or a directory tree, ignoring errors (best effort).
pub(crate) fn remove_any(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = make_writable(path);
            let _ = fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// Give the owner write permission on a directory tree (cache entries are made read-only),
/// so that it can be removed.
fn make_writable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let m = fs::symlink_metadata(dir)?;
    if m.is_dir() {
        let mode = m.permissions().mode();
        if mode & 0o700 != 0o700 {
            fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o700))?;
        }
        for e in fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                make_writable(&e.path())?;
            }
        }
    }
    Ok(())
}

/// Bytes of disk space a file or directory tree uses (allocated blocks).
pub(crate) fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = fs::symlink_metadata(path) else {
        return 0;
    };
    let own = m.blocks() * 512;
    if !m.is_dir() {
        return own;
    }
    let Ok(rd) = fs::read_dir(path) else {
        return own;
    };
    own + rd.flatten().map(|e| disk_usage(&e.path())).sum::<u64>()
}
