//! File-backed storage.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rustix::fs::{FallocateFlags, SeekFrom};

use super::lock::ImageLock;
use super::{write_zero_bytes, Permissions, Storage, StorageExtent};
use crate::error::{Error, ErrorKind, Result, ResultExt};

/// A regular file (or block device) used positionally.
///
/// A sync with nothing written since the last one costs nothing (no `fdatasync`). A sync that
/// fails makes every later one fail too: Linux may drop the pages it could not write back and
/// report success next time, so the data's durability can no longer be promised.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    writable: bool,
    durability: Durability,
    /// The image lock, shared with the storages [`Storage::reopen`] makes.
    lock: Option<Arc<ImageLock>>,
}

/// What [`FileStorage::sync`] knows about writes since the last sync.
#[derive(Debug, Default)]
struct Durability {
    /// Changes made (writes, size changes, holes) so far.
    changes: AtomicU64,
    /// The value of `changes` that the last successful sync covered.
    synced: AtomicU64,
    /// A sync failed: the page cache may have lost writes.
    failed: AtomicBool,
}

impl Durability {
    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Release);
    }
}

impl FileStorage {
    /// Open an existing file, read-only or read-write.
    pub fn open(path: impl AsRef<Path>, writable: bool) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(Error::io)
            .path_context(path)?;
        let meta = file.metadata().map_err(Error::io).path_context(path)?;
        if meta.is_dir() {
            return Err(Error::invalid_argument("is a directory").with_path(path));
        }
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            writable,
            durability: Durability::default(),
            lock: None,
        })
    }

    /// Open an existing file and lock it with `perms` (QEMU's lock bytes), or without a lock
    /// when `perms` is `None`. Fails with [`ErrorKind::Locked`] when the image is in use.
    pub fn open_locked(path: impl AsRef<Path>, writable: bool, perms: Option<Permissions>) -> Result<Self> {
        let mut storage = FileStorage::open(path, writable)?;
        if let Some(perms) = perms {
            storage.lock = ImageLock::acquire(&storage.file, &storage.path, perms)?.map(Arc::new);
        }
        Ok(storage)
    }

    /// Create a new file; fails if it exists.
    pub fn create_new(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(Error::io)
            .path_context(path)?;
        // Nobody else can have the new file open yet; the lock shows it is being written.
        let lock = ImageLock::acquire(&file, path, Permissions::writer())?.map(Arc::new);
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            writable: true,
            durability: Durability::default(),
            lock,
        })
    }

    /// The temporary file of `pending`, for writing a new image into (locked as a writer).
    pub fn create_in(pending: &crate::output::PendingFile) -> Result<Self> {
        let path = pending.temp_path();
        let file = pending.file()?;
        let lock = ImageLock::acquire(&file, path, Permissions::writer())?.map(Arc::new);
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            writable: true,
            durability: Durability::default(),
            lock,
        })
    }

    /// Wrap an already open file.
    pub fn from_file(file: File, path: impl AsRef<Path>, writable: bool) -> Self {
        FileStorage {
            file,
            path: path.as_ref().to_path_buf(),
            writable,
            durability: Durability::default(),
            lock: None,
        }
    }

    /// The same file opened again for writing, sharing this storage's lock. Fails if the
    /// file cannot be opened for writing or if `path` now names another file.
    pub fn reopen_writable(&self) -> Result<FileStorage> {
        let mut rw = FileStorage::open(&self.path, true)?;
        let id = |f: &File| {
            f.metadata()
                .map(|m| (m.dev(), m.ino()))
                .map_err(Error::io)
                .path_context(&self.path)
        };
        if id(&self.file)? != id(&rw.file)? {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "the file was replaced while it was being opened",
            )
            .with_path(&self.path));
        }
        rw.lock = self.lock.clone();
        Ok(rw)
    }

    /// The same open file (and lock), known by `path` from now on: after the file was renamed.
    pub fn renamed_to(&self, path: impl AsRef<Path>) -> Result<FileStorage> {
        let file = self
            .file
            .try_clone()
            .map_err(Error::io)
            .path_context(&self.path)?;
        Ok(FileStorage {
            file,
            path: path.as_ref().to_path_buf(),
            writable: self.writable,
            durability: Durability::default(),
            lock: self.lock.clone(),
        })
    }

    /// The same open file, read-only, sharing this storage's lock.
    pub fn reopen_read_only(&self) -> Result<FileStorage> {
        let file = self
            .file
            .try_clone()
            .map_err(Error::io)
            .path_context(&self.path)?;
        Ok(FileStorage {
            file,
            path: self.path.clone(),
            writable: false,
            durability: Durability::default(),
            lock: self.lock.clone(),
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::from_kind(ErrorKind::ReadOnly).with_path(&self.path))
        }
    }

    fn fallocate(&self, flags: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        let result = rustix::fs::fallocate(&self.file, flags, offset, len).map_err(io::Error::from);
        self.durability.changed();
        result
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::OPNOTSUPP.raw_os_error()
        || code == rustix::io::Errno::NOSYS.raw_os_error()
        || code == rustix::io::Errno::INVAL.raw_os_error())
}

impl Storage for FileStorage {
    fn len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(Error::io)
            .path_context(&self.path)?
            .len())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            let e = Error::io(e).with_path(&self.path).with_offset(offset);
            if e.kind() == ErrorKind::Corrupt {
                Error::corrupt(format!("file is truncated: {} bytes wanted", buf.len()))
                    .with_path(&self.path)
                    .with_offset(offset)
            } else {
                e.with_operation("reading")
            }
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let result = self.file.write_all_at(buf, offset);
        self.durability.changed();
        result.map_err(|e| {
            Error::io(e)
                .with_path(&self.path)
                .with_operation("writing")
                .with_offset(offset)
        })
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.check_writable()?;
        let result = self.file.set_len(len);
        self.durability.changed();
        result.map_err(|e| Error::io(e).with_path(&self.path).with_operation("resizing"))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match self.fallocate(flags, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => write_zero_bytes(self, offset, len),
            Err(e) => Err(Error::io(e)
                .with_path(&self.path)
                .with_operation("punching a hole")
                .with_offset(offset)),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let file_len = self.len()?;
        let flags = if offset.saturating_add(len) <= file_len {
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
        } else {
            FallocateFlags::ZERO_RANGE
        };
        match self.fallocate(flags, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => write_zero_bytes(self, offset, len),
            Err(e) => Err(Error::io(e)
                .with_path(&self.path)
                .with_operation("writing zeroes")
                .with_offset(offset)),
        }
    }

    fn sync(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let d = &self.durability;
        if d.failed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Io,
                "an earlier sync of this file failed, so writes since then may be lost",
            )
            .with_path(&self.path)
            .with_operation("syncing"));
        }
        let changes = d.changes.load(Ordering::Acquire);
        if changes == d.synced.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.file.sync_data() {
            Ok(()) => {
                d.synced.fetch_max(changes, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                d.failed.store(true, Ordering::Release);
                Err(Error::io(e).with_path(&self.path).with_operation("syncing"))
            }
        }
    }

    fn extent(&self, offset: u64) -> Result<StorageExtent> {
        let len = self.len()?;
        if offset >= len {
            return Ok(StorageExtent {
                hole: true,
                end: offset,
            });
        }
        // The file position is never used for I/O here (all I/O is positional), so moving it
        // while other threads read or write is harmless.
        let data = match rustix::fs::seek(&self.file, SeekFrom::Data(offset)) {
            Ok(pos) => pos,
            Err(rustix::io::Errno::NXIO) => len,
            Err(e) if unsupported(&io::Error::from(e)) => {
                return Ok(StorageExtent {
                    hole: false,
                    end: len,
                })
            }
            Err(e) => {
                return Err(Error::io(e.into())
                    .with_path(&self.path)
                    .with_operation("seeking data"))
            }
        };
        if data > offset {
            return Ok(StorageExtent {
                hole: true,
                end: data.min(len),
            });
        }
        let hole = match rustix::fs::seek(&self.file, SeekFrom::Hole(offset)) {
            Ok(pos) => pos,
            Err(e) => {
                return Err(Error::io(e.into())
                    .with_path(&self.path)
                    .with_operation("seeking a hole"))
            }
        };
        Ok(StorageExtent {
            hole: false,
            end: hole.clamp(offset + 1, len),
        })
    }

    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        // As in `extent`, the file position is never used for I/O.
        match rustix::fs::seek(&self.file, SeekFrom::Data(offset)) {
            Ok(pos) => Ok(Some(pos)),
            Err(rustix::io::Errno::NXIO) => Ok(None),
            Err(e) if unsupported(&io::Error::from(e)) => Ok(Some(offset)),
            Err(e) => Err(Error::io(e.into())
                .with_path(&self.path)
                .with_offset(offset)
                .with_operation("seeking data")),
        }
    }

    fn allocated_bytes(&self) -> Result<Option<u64>> {
        let meta = self.file.metadata().map_err(Error::io).path_context(&self.path)?;
        Ok(Some(meta.blocks().saturating_mul(512)))
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn read_only(&self) -> bool {
        !self.writable
    }

    fn set_permissions(&self, perms: Permissions) -> Result<()> {
        match &self.lock {
            Some(lock) => lock.change(perms),
            None => Ok(()),
        }
    }

    fn permissions(&self) -> Option<Permissions> {
        self.lock.as_ref().map(|l| l.permissions())
    }

    fn reopen(&self, writable: bool) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(if writable {
            self.reopen_writable()?
        } else {
            self.reopen_read_only()?
        }))
    }
}
