//! Per-entry locks and the processes that hold references.
//!
//! Each cache ID has a lock file `locks/<ID>.lock`, locked with `flock`: exclusively while
//! the entry is fetched, removed or repaired, shared while an instance is made. The kernel
//! drops a lock when its holder dies, however it dies, so a killed fetch never blocks the
//! next one. Lock files of removed entries are unlinked by their last exclusive holder; a
//! process that locked a file which was unlinked meanwhile notices (the path no longer names
//! the locked inode) and locks the new file instead.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How an entry is locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Many holders: making instances.
    Shared,
    /// One holder: fetching, removing, repairing, releasing.
    Exclusive,
}

/// A held lock on one cache ID (released when dropped).
#[derive(Debug)]
pub(crate) struct IdLock {
    /// Held open: closing it releases the lock.
    #[cfg_attr(not(test), allow(dead_code))]
    file: File,
    path: PathBuf,
}

impl IdLock {
    /// Lock `path` in `mode`; with `wait`, block until it is free, otherwise return `None`
    /// when another process holds it in a conflicting mode.
    pub(crate) fn acquire(path: &Path, mode: Mode, wait: bool) -> Result<Option<IdLock>> {
        let op = match (mode, wait) {
            (Mode::Shared, true) => FlockOperation::LockShared,
            (Mode::Shared, false) => FlockOperation::NonBlockingLockShared,
            (Mode::Exclusive, true) => FlockOperation::LockExclusive,
            (Mode::Exclusive, false) => FlockOperation::NonBlockingLockExclusive,
        };
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| Error::io_while(e, "opening a lock file").with_path(path))?;
            match flock(&file, op) {
                Ok(()) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return Err(Error::io_while(e.into(), "locking a cache entry").with_path(path));
                }
            }
            // The file may have been unlinked by its previous holder while we waited.
            let held = file
                .metadata()
                .map_err(|e| Error::io_while(e, "checking a lock file").with_path(path))?;
            match std::fs::metadata(path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(Some(IdLock {
                        file,
                        path: path.to_path_buf(),
                    }))
                }
                _ => continue,
            }
        }
    }

    /// Unlink the lock file (the entry is gone); the lock stays held until dropped.
    pub(crate) fn unlink(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Whether the lock file is still where it was (for tests).
    #[cfg(test)]
    fn linked(&self) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|m| self.file.metadata().is_ok_and(|h| h.ino() == m.ino()))
    }
}

/// A process holding a reference: its PID and its start time (in clock ticks since boot,
/// from `/proc/PID/stat`), so that a recycled PID is not mistaken for the holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The process ID; 0 for a reference held until it is released explicitly.
    pub pid: u32,
    /// The process's start time; 0 when unknown or for PID 0.
    pub start_time: u64,
}

impl Holder {
    /// The process `pid` as it is now (`None` if it does not exist).
    pub fn process(pid: u32) -> Option<Holder> {
        start_time(pid).map(|start_time| Holder { pid, start_time })
    }

    /// The calling process.
    pub fn current() -> Holder {
        let pid = std::process::id();
        Holder {
            pid,
            start_time: start_time(pid).unwrap_or(0),
        }
    }

    /// The calling process's parent (the shell or program that ran the command).
    pub fn parent() -> Holder {
        let ppid = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get() as u32);
        Holder::process(ppid).unwrap_or(Holder {
            pid: 0,
            start_time: 0,
        })
    }

    /// A reference held until `release`, whatever happens to processes.
    pub fn persistent() -> Holder {
        Holder {
            pid: 0,
            start_time: 0,
        }
    }

    /// Whether the holder is still alive (always, for a persistent reference).
    pub fn alive(&self) -> bool {
        if self.pid == 0 {
            return true;
        }
        match start_time(self.pid) {
            Some(t) => self.start_time == 0 || t == self.start_time,
            None => false,
        }
    }
}

/// Field 22 of `/proc/PID/stat` (the fields after the command name, which is in parentheses
/// and may itself contain spaces and parentheses).
fn start_time(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    // After the name: state (field 3) ... starttime (field 22) is the 20th.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let state = fields.first()?;
    if *state == "Z" || *state == "X" {
        return None;
    }
    fields.get(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_locks_exclude_and_unlinked_files_are_relocked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        let a = IdLock::acquire(&p, Mode::Exclusive, false).unwrap().unwrap();
        assert!(IdLock::acquire(&p, Mode::Exclusive, false).unwrap().is_none());
        assert!(IdLock::acquire(&p, Mode::Shared, false).unwrap().is_none());
        a.unlink();
        // The path now names nothing; a new lock creates a new file and is free.
        let b = IdLock::acquire(&p, Mode::Shared, false).unwrap().unwrap();
        let c = IdLock::acquire(&p, Mode::Shared, false).unwrap().unwrap();
        assert!(b.linked() && c.linked());
        assert!(IdLock::acquire(&p, Mode::Exclusive, false).unwrap().is_none());
        drop((a, b, c));
        assert!(IdLock::acquire(&p, Mode::Exclusive, false).unwrap().is_some());
    }

    #[test]
    fn holders_are_recognised_and_dead_ones_noticed() {
        let me = Holder::current();
        assert!(me.start_time > 0 && me.alive());
        assert!(Holder::parent().alive());
        assert!(Holder::persistent().alive());
        let recycled = Holder {
            pid: me.pid,
            start_time: me.start_time + 1,
        };
        assert!(!recycled.alive());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let h = Holder::process(child.id());
        child.wait().unwrap();
        if let Some(h) = h {
            assert!(!h.alive(), "a reaped child is dead");
        }
    }
}
