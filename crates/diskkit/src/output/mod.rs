//! Outputs written under a temporary name and renamed into place when complete.
//!
//! A temporary is named `.NAME.diskkit-<32 hex digits>.tmp` next to its destination `NAME`, and
//! it carries proof of life: the process writing it holds a shared `flock` on it for as long as
//! it exists. So temporaries are:
//!
//! - removed when the output fails (dropped without [`PendingFile::persist`]);
//! - removed when the process gets SIGINT or SIGTERM, if it called
//!   [`remove_temporaries_on_signals`] (the command-line tool does): every temporary is
//!   registered while it exists, and the signal handler removes them and exits with status
//!   128 + the signal number (130, 143);
//! - recognised when a process was killed outright (SIGKILL, a crash): the next diskkit run
//!   that writes an output in the same directory removes every temporary whose name has that
//!   exact form, that belongs to the same user and that no live process holds a lock on. Files
//!   of any other name, of other users, or held by a running diskkit are never touched.
//!
//! A temporary is created under a name that does not match (`….tmp.init`), locked, and only then
//! renamed to its matching name, so a cleaner never sees a matching name without its lock.

mod interrupt;
mod stale;

use std::ffi::OsString;
use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rustix::fs::{FlockOperation, RenameFlags, CWD};

pub use self::interrupt::remove_temporaries_on_signals;
pub(crate) use self::stale::is_temporary_name;
use crate::error::{Error, ErrorKind, Result, ResultExt};

/// What a registered temporary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    /// An extra name of an existing file (removing it removes only the name).
    Link,
}

/// The temporaries of this process that exist now, removed on SIGINT/SIGTERM.
struct Registry {
    next: u64,
    entries: Vec<(u64, PathBuf, Kind)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next: 0,
    entries: Vec::new(),
});

fn registry() -> MutexGuard<'static, Registry> {
    // Only paths are kept here; a panic elsewhere cannot leave them half-changed.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    fn add(&mut self, path: PathBuf, kind: Kind) -> u64 {
        self.next += 1;
        self.entries.push((self.next, path, kind));
        self.next
    }

    fn remove(&mut self, id: u64) {
        self.entries.retain(|(i, _, _)| *i != id);
    }
}

/// Remove a temporary (file, tree or extra name), best effort.
fn remove_path(path: &Path, kind: Kind) {
    match kind {
        Kind::File | Kind::Link => {
            let _ = fs::remove_file(path);
        }
        Kind::Dir => {
            let _ = make_removable(path);
            let _ = fs::remove_dir_all(path);
        }
    }
}

/// Give the owner write access to every directory under `dir` (copied read-only directories
/// could not be emptied otherwise). Does not follow symlinks.
pub(crate) fn make_removable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            make_removable(&entry.path())?;
        }
    }
    Ok(())
}

/// The temporary name for `dest`: `.NAME.diskkit-<hex>.tmp`.
fn temporary_name(dest: &Path) -> Result<PathBuf> {
    let name = dest
        .file_name()
        .ok_or_else(|| Error::invalid_argument("output path has no file name").with_path(dest))?;
    let mut temp_name = OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".diskkit-{}.tmp", uuid::Uuid::new_v4().simple()));
    Ok(dest.with_file_name(temp_name))
}

/// The name a temporary is created under before it is locked.
fn init_name(temp: &Path) -> PathBuf {
    let mut name = temp.as_os_str().to_owned();
    name.push(".init");
    PathBuf::from(name)
}

/// Create the temporary for `dest` (a file, or a directory with `dir`), locked and registered,
/// through the `.init` name. Returns its path and the locked handle.
fn create_temporary(dest: &Path, dir: bool) -> Result<(PathBuf, File, u64)> {
    let temp = temporary_name(dest)?;
    let init = init_name(&temp);
    let mut reg = registry();
    let file = if dir {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&init)
            .map_err(Error::io)
            .path_context(&init)?;
        File::open(&init)
    } else {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&init)
    };
    let kind = if dir { Kind::Dir } else { Kind::File };
    let file = match file {
        Ok(f) => f,
        Err(e) => {
            remove_path(&init, kind);
            return Err(Error::io(e)
                .with_path(&init)
                .with_operation("creating the output"));
        }
    };
    let locked = rustix::fs::flock(&file, FlockOperation::NonBlockingLockShared)
        .map_err(|e| Error::io(e.into()))
        .and_then(|()| {
            rustix::fs::renameat_with(CWD, &init, CWD, &temp, RenameFlags::NOREPLACE)
                .map_err(|e| Error::io(e.into()))
        });
    if let Err(e) = locked {
        remove_path(&init, kind);
        return Err(e.with_path(&temp).with_operation("creating the output"));
    }
    let id = reg.add(temp.clone(), kind);
    drop(reg);
    if let Ok(meta) = file.metadata() {
        stale::clean_once(containing_dir(dest), meta.uid());
    }
    Ok((temp, file, id))
}

/// A file being written at a temporary path next to its destination. Dropping it without
/// [`PendingFile::persist`] removes the temporary file. See the module documentation.
#[derive(Debug)]
pub struct PendingFile {
    temp: PathBuf,
    dest: PathBuf,
    overwrite: bool,
    done: bool,
    /// The created file, holding the lock that shows it is in use.
    file: Option<File>,
    id: u64,
}

impl PendingFile {
    /// Create the temporary file for `dest` (empty, mode 0666 less the umask). Fails at once if
    /// `dest` exists and `overwrite` is false (and again at the rename, should it appear
    /// meanwhile). Leftover temporaries of killed runs in the same directory are removed.
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
        let (temp, file, id) = create_temporary(&dest, false)?;
        Ok(PendingFile {
            temp,
            dest,
            overwrite,
            done: false,
            file: Some(file),
            id,
        })
    }

    /// A value that owns no file (used when moving the real one out).
    pub(crate) fn placeholder() -> PendingFile {
        PendingFile {
            temp: PathBuf::new(),
            dest: PathBuf::new(),
            overwrite: false,
            done: true,
            file: None,
            id: 0,
        }
    }

    /// The temporary path being written.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// The temporary file, open for reading and writing.
    pub fn file(&self) -> Result<File> {
        self.file
            .as_ref()
            .ok_or_else(|| Error::invalid_argument("no temporary file"))?
            .try_clone()
            .map_err(Error::io)
            .path_context(&self.temp)
    }

    /// The final path.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Rename the finished temporary file into place and make the rename durable. The caller
    /// must have synced the file's contents.
    pub fn persist(mut self) -> Result<()> {
        rename_into_place(
            &self.temp,
            &self.dest,
            self.overwrite,
            "output exists (use --force to replace it)",
        )?;
        self.done = true;
        registry().remove(self.id);
        if let Some(f) = self.file.take() {
            unlock(&f);
        }
        Ok(())
    }
}

/// Drop the `flock` that marks a temporary as in use (explicitly: a child process being
/// started elsewhere may hold a copy of the descriptor for a moment).
fn unlock(file: &File) {
    let _ = rustix::fs::flock(file, FlockOperation::Unlock);
}

/// Rename `temp` to `dest` (without replacing unless `overwrite`) and sync the directory;
/// `exists` is the message when `dest` exists.
fn rename_into_place(temp: &Path, dest: &Path, overwrite: bool, exists: &str) -> Result<()> {
    let flags = if overwrite {
        RenameFlags::empty()
    } else {
        RenameFlags::NOREPLACE
    };
    match rustix::fs::renameat_with(CWD, temp, CWD, dest, flags) {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST | rustix::io::Errno::NOTEMPTY) => {
            return Err(Error::new(ErrorKind::AlreadyExists, exists).with_path(dest))
        }
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) if !overwrite => {
            // No RENAME_NOREPLACE on this filesystem: link + unlink never replaces.
            fs::hard_link(temp, dest).map_err(Error::io).path_context(dest)?;
            let _ = fs::remove_file(temp);
        }
        Err(e) => {
            return Err(Error::io(e.into())
                .with_path(dest)
                .with_operation("renaming the output"))
        }
    }
    if let Ok(d) = File::open(containing_dir(dest)) {
        let _ = d.sync_all();
    }
    Ok(())
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.done {
            let mut reg = registry();
            let _ = fs::remove_file(&self.temp);
            reg.remove(self.id);
        }
        if let Some(f) = &self.file {
            unlock(f);
        }
    }
}

/// A directory tree being built at a temporary path next to its destination (or in another
/// directory of the same filesystem). Dropping it without [`PendingDir::persist`] removes the
/// tree. See the module documentation.
#[derive(Debug)]
pub struct PendingDir {
    temp: PathBuf,
    dest: PathBuf,
    done: bool,
    lock: File,
    id: u64,
}

impl PendingDir {
    /// Create the temporary directory (mode 0700) for `dest`, next to it. Fails if `dest`
    /// exists.
    pub fn new(dest: impl AsRef<Path>) -> Result<PendingDir> {
        let dest = dest.as_ref().to_path_buf();
        PendingDir::new_in(&dest, containing_dir(&dest))
    }

    /// Like [`PendingDir::new`], with the temporary directory in `work_dir` (on the same
    /// filesystem as `dest`).
    pub fn new_in(dest: impl AsRef<Path>, work_dir: impl AsRef<Path>) -> Result<PendingDir> {
        let dest = dest.as_ref().to_path_buf();
        if fs::symlink_metadata(&dest).is_ok() {
            return Err(
                Error::new(ErrorKind::AlreadyExists, "destination exists; not replacing it").with_path(&dest),
            );
        }
        let name = dest
            .file_name()
            .ok_or_else(|| Error::invalid_argument("destination has no file name").with_path(&dest))?;
        let (temp, lock, id) = create_temporary(&work_dir.as_ref().join(name), true)?;
        Ok(PendingDir {
            temp,
            dest,
            done: false,
            lock,
            id,
        })
    }

    /// The temporary directory to build in.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// The final path.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Rename the finished tree into place (never replacing anything) and sync the directory.
    /// The caller must have synced the tree's contents.
    pub fn persist(mut self) -> Result<()> {
        rename_into_place(
            &self.temp,
            &self.dest,
            false,
            "destination exists; not replacing it",
        )?;
        self.done = true;
        registry().remove(self.id);
        unlock(&self.lock);
        Ok(())
    }
}

impl Drop for PendingDir {
    fn drop(&mut self) {
        if !self.done {
            let mut reg = registry();
            remove_path(&self.temp, Kind::Dir);
            reg.remove(self.id);
        }
        unlock(&self.lock);
    }
}

/// A temporary extra name of an existing file: removed when dropped (or on SIGINT/SIGTERM)
/// unless [`Temporary::keep`] is called.
#[derive(Debug)]
pub struct Temporary {
    path: PathBuf,
    id: u64,
    kept: bool,
}

impl Temporary {
    /// Link `existing` under the new name `link` (which must not exist).
    pub fn hard_link(existing: &Path, link: &Path) -> Result<Temporary> {
        let mut reg = registry();
        fs::hard_link(existing, link).map_err(|e| {
            Error::io(e)
                .with_path(link)
                .with_operation("linking the frozen layer")
        })?;
        let id = reg.add(link.to_path_buf(), Kind::Link);
        Ok(Temporary {
            path: link.to_path_buf(),
            id,
            kept: false,
        })
    }

    /// Keep the name.
    pub fn keep(mut self) {
        self.kept = true;
        registry().remove(self.id);
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        if !self.kept {
            let mut reg = registry();
            let _ = fs::remove_file(&self.path);
            reg.remove(self.id);
        }
    }
}

/// The directory that holds `path` (`.` for a bare file name).
pub(crate) fn containing_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Remove every registered temporary (the signal handler, holding the registry).
fn remove_all(reg: &Registry) {
    for (_, path, kind) in &reg.entries {
        remove_path(path, *kind);
    }
}
