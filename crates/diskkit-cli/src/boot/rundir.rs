//! The private runtime directory of one boot: `$XDG_RUNTIME_DIR/diskkit/boot-XXXXXX` (or
//! `$TMPDIR/diskkit-<uid>/boot-XXXXXX`), mode 0700, holding the throwaway overlay, the
//! sockets QEMU and diskkit talk over, the credentials and the SSH key.
//!
//! Each directory holds a `lock` file whose `flock` the run (and its QEMU, which inherits
//! the descriptor) holds for its whole life. The directory is removed when the run ends, on
//! every path that runs destructors (normal exit, errors, SIGINT/SIGTERM/SIGHUP, which the
//! run turns into an orderly stop). A run killed with SIGKILL leaves its directory; QEMU dies
//! with it (`PR_SET_PDEATHSIG`), which releases the lock, and the next run that finds an
//! unlocked `boot-*` directory removes it.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use rustix::fs::FlockOperation;

/// Directories without a (written) lock file younger than this may be a run that is just
/// starting.
const LOCKLESS_GRACE: Duration = Duration::from_secs(60);

/// The per-user base directory, created 0700 and checked to be ours.
pub(crate) fn base() -> Result<PathBuf> {
    let uid = rustix::process::getuid().as_raw();
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) if Path::new(&d).is_absolute() && Path::new(&d).is_dir() => PathBuf::from(d).join("diskkit"),
        _ => std::env::temp_dir().join(format!("diskkit-{uid}")),
    };
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating '{}'", dir.display())),
    }
    let md = fs::symlink_metadata(&dir).with_context(|| format!("'{}'", dir.display()))?;
    if !md.is_dir() || md.uid() != uid || md.mode() & 0o077 != 0 {
        bail!(
            "'{}' must be a directory owned by uid {uid} with mode 0700 (it is not): remove it or set XDG_RUNTIME_DIR",
            dir.display()
        );
    }
    Ok(dir)
}

/// A runtime directory, removed when dropped.
#[derive(Debug)]
pub(crate) struct RunDir {
    path: PathBuf,
    lock: File,
}

impl RunDir {
    /// Remove stale directories in `base`, then make a new one.
    pub(crate) fn create(base: &Path) -> Result<RunDir> {
        remove_stale(base);
        let dir = tempfile::Builder::new()
            .prefix("boot-")
            .tempdir_in(base)
            .with_context(|| format!("creating a runtime directory in '{}'", base.display()))?;
        let path = dir.keep();
        // Unix socket paths are limited to 107 bytes; the longest diskkit uses here is
        // `.../stderr.sock`.
        if path.as_os_str().len() + "/stderr.sock".len() > 107 {
            let _ = fs::remove_dir_all(&path);
            bail!(
                "the runtime directory '{}' is too long a path for Unix sockets: set XDG_RUNTIME_DIR (or TMPDIR) to a shorter one",
                path.display()
            );
        }
        let lock_path = path.join("lock");
        // Lock first, then write our pid: a cleaner that wins the lock before us sees an
        // empty file and leaves the directory alone (blocking here until it lets go).
        let made = File::create(&lock_path).and_then(|mut f| {
            rustix::fs::flock(&f, FlockOperation::LockExclusive)?;
            write!(f, "{}", std::process::id())?;
            Ok(f)
        });
        let lock = match made {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_dir_all(&path);
                return Err(e).with_context(|| format!("locking '{}'", lock_path.display()));
            }
        };
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).ok();
        Ok(RunDir { path, lock })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The lock file, which QEMU inherits so that the directory counts as in use while it
    /// runs.
    pub(crate) fn lock_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.lock.as_fd()
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Remove `boot-*` directories of runs that are gone: their lock is free (or, for a
/// directory old enough, missing). Failures are ignored: another run may be cleaning too.
pub(crate) fn remove_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with("boot-") {
            continue;
        }
        let dir = e.path();
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            _ => continue,
        }
        let old = || {
            fs::symlink_metadata(&dir)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > LOCKLESS_GRACE)
        };
        let stale = match File::open(dir.join("lock")) {
            Ok(mut f) => {
                let mut pid = String::new();
                let written = f.read_to_string(&mut pid).is_ok() && !pid.is_empty();
                let try_lock = || rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive).is_ok();
                let mut free = try_lock();
                // The run that wrote its pid is gone but something holds the lock: its
                // QEMU, killed with it, whose threads are still exiting. Give it a moment.
                let owner_gone = pid
                    .trim()
                    .parse::<u32>()
                    .is_ok_and(|p| !Path::new(&format!("/proc/{p}")).exists());
                let mut waited = 0;
                while !free && owner_gone && waited < 20 {
                    std::thread::sleep(Duration::from_millis(100));
                    waited += 1;
                    free = try_lock();
                }
                free && (written || old())
            }
            Err(_) => old(),
        };
        if stale {
            let _ = fs::remove_dir_all(&dir);
        }
    }
}
