//! Outputs written under a temporary name and renamed into place when complete.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use rustix::fs::{RenameFlags, CWD};

use crate::error::{Error, ErrorKind, Result, ResultExt};

/// A file being written at a temporary path next to its destination. Dropping it without
/// [`PendingFile::persist`] removes the temporary file.
#[derive(Debug)]
pub struct PendingFile {
    temp: PathBuf,
    dest: PathBuf,
    overwrite: bool,
    done: bool,
}

impl PendingFile {
    /// Reserve a temporary name for `dest`. Fails at once if `dest` exists and `overwrite` is
    /// false (and again at the rename, should it appear meanwhile).
    pub fn new(dest: impl AsRef<Path>, overwrite: bool) -> Result<PendingFile> {
        let dest = dest.as_ref().to_path_buf();
        match fs::symlink_metadata(&dest) {
            Ok(m) if m.is_dir() => {
                return Err(
                    Error::invalid_argument("the output is a directory; name a file in it").with_path(&dest),
                )
            }
            Ok(_) if !overwrite => {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    "output exists (use --force to replace it)",
                )
                .with_path(&dest))
            }
            _ => {}
        }
        let dir = containing_dir(&dest);
        if !dir.is_dir() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("the directory '{}' does not exist", dir.display()),
            )
            .with_path(&dest));
        }
        let name = dest
            .file_name()
            .ok_or_else(|| Error::invalid_argument("output path has no file name").with_path(&dest))?;
        let mut temp_name = OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".diskkit-{}.tmp", uuid::Uuid::new_v4().simple()));
        let temp = dest.with_file_name(temp_name);
        Ok(PendingFile {
            temp,
            dest,
            overwrite,
            done: false,
        })
    }

    /// A value that owns no file (used when moving the real one out).
    pub(crate) fn placeholder() -> PendingFile {
        PendingFile {
            temp: PathBuf::new(),
            dest: PathBuf::new(),
            overwrite: false,
            done: true,
        }
    }

    /// The temporary path to write to.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// The final path.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Rename the finished temporary file into place and make the rename durable. The caller
    /// must have synced the file's contents.
    pub fn persist(mut self) -> Result<()> {
        let flags = if self.overwrite {
            RenameFlags::empty()
        } else {
            RenameFlags::NOREPLACE
        };
        match rustix::fs::renameat_with(CWD, &self.temp, CWD, &self.dest, flags) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) => {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    "output exists (use --force to replace it)",
                )
                .with_path(&self.dest))
            }
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) if !self.overwrite => {
                // No RENAME_NOREPLACE on this filesystem: link + unlink never replaces.
                fs::hard_link(&self.temp, &self.dest)
                    .map_err(Error::io)
                    .path_context(&self.dest)?;
                let _ = fs::remove_file(&self.temp);
            }
            Err(e) => {
                return Err(Error::io(e.into())
                    .with_path(&self.dest)
                    .with_operation("renaming the output"))
            }
        }
        self.done = true;
        if let Ok(d) = fs::File::open(containing_dir(&self.dest)) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// The directory that holds `path` (`.` for a bare file name).
pub(crate) fn containing_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.temp);
        }
    }
}
