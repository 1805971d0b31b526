//! Image locks that QEMU understands.
//!
//! QEMU's file driver (`block/file-posix.c`) expresses what an open image may do, and what it
//! lets others do, as open-file-description byte-range locks: for each permission `i`
//! (0 consistent read, 1 write, 2 write unchanged, 3 resize) it holds a shared lock on byte
//! `100 + i` while it has that permission, and on byte `200 + i` while it does *not* share it.
//! Before taking a permission it tests byte `200 + i` ("does anyone refuse to share this?");
//! before refusing to share one it tests byte `100 + i` ("does anyone have it?"). A test is
//! `F_OFD_GETLK` with a write lock, which only reports locks of *other* open file descriptions
//! (other processes, or other opens in this one). Locks go away when the last descriptor of the
//! open file description is closed, so a killed process leaves none behind.
//!
//! diskkit takes the same bytes with the same meaning, so QEMU and diskkit see each other:
//! a writer (`qemu-nbd`, a running VM, `diskkit serve`) holds read, write and resize and shares
//! only read and unchanged writes; a reader holds read and shares everything but write and
//! resize; `-U`/force-share holds read and shares everything (byte 100 only).
//!
//! The `fcntl` calls are the only `unsafe` code in the crate: neither `rustix` nor `std`
//! offers byte-range open-file-description locks (`rustix::fs::fcntl_lock` locks whole files).

#![allow(unsafe_code)]

use std::fmt;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, ErrorKind, Result};

/// A set of QEMU block permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm(u8);

impl Perm {
    /// No permission.
    pub const NONE: Perm = Perm(0);
    /// Reading, with the content consistent (`BLK_PERM_CONSISTENT_READ`).
    pub const READ: Perm = Perm(1);
    /// Changing the content (`BLK_PERM_WRITE`).
    pub const WRITE: Perm = Perm(2);
    /// Writing bytes that do not change what is read (`BLK_PERM_WRITE_UNCHANGED`).
    pub const WRITE_UNCHANGED: Perm = Perm(4);
    /// Changing the size (`BLK_PERM_RESIZE`).
    pub const RESIZE: Perm = Perm(8);
    /// Every permission.
    pub const ALL: Perm = Perm(15);

    /// Whether every permission of `other` is in `self`.
    pub fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// The permissions in either.
    pub fn union(self, other: Perm) -> Perm {
        Perm(self.0 | other.0)
    }

    /// The permissions not in `self`.
    pub fn complement(self) -> Perm {
        Perm(!self.0 & Perm::ALL.0)
    }

    fn bits(self) -> impl Iterator<Item = (u64, Perm)> {
        (0..4u64)
            .map(|i| (i, Perm(1 << i)))
            .filter(move |(_, p)| self.contains(*p))
    }

    /// QEMU's name of a single permission.
    fn name(self) -> &'static str {
        match self {
            Perm::READ => "consistent read",
            Perm::WRITE => "write",
            Perm::WRITE_UNCHANGED => "write unchanged",
            _ => "resize",
        }
    }
}

/// What an open image holds, and what it lets others hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Permissions {
    /// Permissions held.
    pub held: Perm,
    /// Permissions others may hold at the same time.
    pub shared: Perm,
}

impl Permissions {
    /// A reader: reads, and lets nobody change the content or the size meanwhile (QEMU's
    /// read-only open, `qemu-img info`, a backing file).
    pub const fn reader() -> Permissions {
        Permissions {
            held: Perm::READ,
            shared: Perm(Perm::READ.0 | Perm::WRITE_UNCHANGED.0),
        }
    }

    /// A writer: reads, writes and resizes, and lets others only read (QEMU's read-write
    /// open, `qemu-nbd`, a running VM).
    pub const fn writer() -> Permissions {
        Permissions {
            held: Perm(Perm::READ.0 | Perm::WRITE.0 | Perm::RESIZE.0),
            shared: Perm(Perm::READ.0 | Perm::WRITE_UNCHANGED.0),
        }
    }

    /// Force-share (`qemu-img -U`): reads and lets everyone do anything; the content may
    /// change underneath.
    pub const fn force_share() -> Permissions {
        Permissions {
            held: Perm::READ,
            shared: Perm::ALL,
        }
    }

    /// Whether these permissions include writing.
    pub fn writes(&self) -> bool {
        self.held.contains(Perm::WRITE)
    }
}

/// The byte of permission `i` held, and of permission `i` not shared.
const PERM_BASE: u64 = 100;
const SHARED_BASE: u64 = 200;

/// The lock bytes of one open file description.
pub(crate) struct ImageLock {
    /// A duplicate of the file's descriptor (same open file description, so the same locks).
    fd: OwnedFd,
    path: PathBuf,
    /// The permissions the lock bytes stand for now.
    current: Mutex<Permissions>,
}

impl fmt::Debug for ImageLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageLock")
            .field("path", &self.path)
            .field("current", &*self.lock_state())
            .finish()
    }
}

/// Why locking did not happen.
enum LockError {
    /// Another open holds a conflicting lock: the image is in use.
    Conflict(String),
    /// The filesystem does not support these locks.
    Unsupported,
    /// Any other error.
    Os(std::io::Error),
}

impl ImageLock {
    /// Take `perms` on the open file description of `file`. `None` when the filesystem has no
    /// open-file-description locks (the image is then used unlocked, as QEMU does without
    /// lock support); [`ErrorKind::Locked`] when another open conflicts.
    pub(crate) fn acquire(file: &File, path: &Path, perms: Permissions) -> Result<Option<ImageLock>> {
        let fd = file
            .try_clone()
            .map_err(|e| Error::io(e).with_path(path).with_operation("locking"))?;
        let lock = ImageLock {
            fd: fd.into(),
            path: path.to_path_buf(),
            current: Mutex::new(Permissions {
                held: Perm::NONE,
                shared: Perm::ALL,
            }),
        };
        match lock.change(perms) {
            Ok(()) => Ok(Some(lock)),
            Err(e) if e.kind() == ErrorKind::Unsupported => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, Permissions> {
        // Only plain values are kept under this mutex.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The permissions held now.
    pub(crate) fn permissions(&self) -> Permissions {
        *self.lock_state()
    }

    /// Change to `perms`, as QEMU does: lock the bytes of the old and new permissions
    /// together, test the new ones against other opens, then drop the bytes no longer needed.
    /// On a conflict the old permissions stay in force.
    pub(crate) fn change(&self, perms: Permissions) -> Result<()> {
        let mut current = self.lock_state();
        let held = current.held.union(perms.held);
        let unshared = current.shared.complement().union(perms.shared.complement());
        let result = self.apply(held, unshared).and_then(|()| self.test(perms));
        let keep = match &result {
            Ok(()) => perms,
            Err(_) => *current,
        };
        // Dropping bytes cannot conflict; an error here leaves an extra byte locked, which
        // only makes others more careful.
        let _ = self.release_except(keep.held, keep.shared.complement());
        match result {
            Ok(()) => {
                *current = perms;
                Ok(())
            }
            Err(LockError::Conflict(what)) => {
                let hint = if perms.writes() {
                    ""
                } else {
                    " (-U/--force-share reads it anyway, though it may change meanwhile)"
                };
                Err(Error::new(
                    ErrorKind::Locked,
                    format!(
                        "the image is in use: failed to get {what} lock; is another process, \
                         such as QEMU or diskkit serve, using it?{hint}"
                    ),
                )
                .with_path(&self.path))
            }
            Err(LockError::Unsupported) => Err(Error::from_kind(ErrorKind::Unsupported)),
            Err(LockError::Os(e)) => Err(Error::io(e).with_path(&self.path).with_operation("locking")),
        }
    }

    /// Lock the bytes of `held` and `unshared`.
    fn apply(&self, held: Perm, unshared: Perm) -> std::result::Result<(), LockError> {
        for (i, _) in held.bits() {
            self.fcntl(libc::F_OFD_SETLK, libc::F_RDLCK, PERM_BASE + i)?;
        }
        for (i, _) in unshared.bits() {
            self.fcntl(libc::F_OFD_SETLK, libc::F_RDLCK, SHARED_BASE + i)?;
        }
        Ok(())
    }

    /// Unlock every byte except those of `held` and `unshared`.
    fn release_except(&self, held: Perm, unshared: Perm) -> std::result::Result<(), LockError> {
        for (i, _) in held.complement().bits() {
            self.fcntl(libc::F_OFD_SETLK, libc::F_UNLCK, PERM_BASE + i)?;
        }
        for (i, _) in unshared.complement().bits() {
            self.fcntl(libc::F_OFD_SETLK, libc::F_UNLCK, SHARED_BASE + i)?;
        }
        Ok(())
    }

    /// Test `perms` against the locks of other opens: nobody may refuse to share what we
    /// hold, and nobody may hold what we refuse to share.
    fn test(&self, perms: Permissions) -> std::result::Result<(), LockError> {
        for (i, p) in perms.held.bits() {
            if self.fcntl(libc::F_OFD_GETLK, libc::F_WRLCK, SHARED_BASE + i)? {
                return Err(LockError::Conflict(format!("\"{}\"", p.name())));
            }
        }
        for (i, p) in perms.shared.complement().bits() {
            if self.fcntl(libc::F_OFD_GETLK, libc::F_WRLCK, PERM_BASE + i)? {
                return Err(LockError::Conflict(format!("shared \"{}\"", p.name())));
            }
        }
        Ok(())
    }

    /// One `fcntl` on byte `at`: for `F_OFD_SETLK`, set (or clear) a lock of `kind`; for
    /// `F_OFD_GETLK`, test whether a lock of `kind` would conflict. Returns whether another
    /// open holds a conflicting lock.
    fn fcntl(&self, cmd: libc::c_int, kind: libc::c_int, at: u64) -> std::result::Result<bool, LockError> {
        // SAFETY: `libc::flock` is a plain C struct of integers, for which all zero bytes is a
        // valid value (and zeroes any padding or reserved fields some platforms have).
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = at as libc::off_t;
        fl.l_len = 1;
        loop {
            // SAFETY: the descriptor is open for as long as `self` lives, and `fl` is a valid
            // `struct flock` that the kernel reads (SETLK) or fills in (GETLK) during the call;
            // OFD lock commands take exactly that pointer as their third argument.
            let r = unsafe { libc::fcntl(self.fd.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
            if r != -1 {
                break;
            }
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN | libc::EACCES) => Ok(true),
                Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::ENOLCK) => {
                    Err(LockError::Unsupported)
                }
                _ => Err(LockError::Os(e)),
            };
        }
        Ok(cmd == libc::F_OFD_GETLK && fl.l_type != libc::F_UNLCK as libc::c_short)
    }
}

impl Drop for ImageLock {
    /// Unlock every byte before the descriptor is closed. Closing alone would leave the locks
    /// in place for as long as any other descriptor of the same open file exists, such as the
    /// copy a child process being started by another thread holds until it executes.
    fn drop(&mut self) {
        let _ = self.release_except(Perm::NONE, Perm::NONE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn readers_share_writers_exclude() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let (a, b, c) = (open(&path), open(&path), open(&path));
        let r1 = ImageLock::acquire(&a, &path, Permissions::reader())
            .unwrap()
            .unwrap();
        let r2 = ImageLock::acquire(&b, &path, Permissions::reader())
            .unwrap()
            .unwrap();
        let e = ImageLock::acquire(&c, &path, Permissions::writer()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Locked);
        assert!(e.to_string().contains("failed to get \"write\" lock"), "{e}");
        // Force-share coexists with everyone.
        let fs = ImageLock::acquire(&c, &path, Permissions::force_share())
            .unwrap()
            .unwrap();
        drop((r1, r2, a, b));
        // The force-share open does not stop a writer.
        let d = open(&path);
        let w = ImageLock::acquire(&d, &path, Permissions::writer())
            .unwrap()
            .unwrap();
        let e = open(&path);
        let err = ImageLock::acquire(&e, &path, Permissions::reader()).unwrap_err();
        assert!(
            err.to_string().contains("failed to get shared \"write\" lock"),
            "{err}"
        );
        // A writer becomes a reader, and readers can come in.
        w.change(Permissions::reader()).unwrap();
        assert_eq!(w.permissions(), Permissions::reader());
        let r3 = ImageLock::acquire(&e, &path, Permissions::reader())
            .unwrap()
            .unwrap();
        // It cannot become a writer again while another reader is there; it stays a reader.
        assert_eq!(
            w.change(Permissions::writer()).unwrap_err().kind(),
            ErrorKind::Locked
        );
        assert_eq!(w.permissions(), Permissions::reader());
        drop((r3, e));
        w.change(Permissions::writer()).unwrap();
        drop((fs, c));
    }
}
