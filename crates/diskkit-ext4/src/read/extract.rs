//! Copying files and directory trees out of an image onto the host (`diskkit cp`).
//!
//! Safety rules, because the image is hostile:
//! - every output is first built under a fresh temporary name next to the destination and
//!   renamed into place (never replacing anything) when complete;
//! - entries are created only inside directories this code just created, by names taken from
//!   the image that are checked to be single components (no `/`, `.`, `..` or NUL), and always
//!   with exclusive creation, so nothing is ever written through a symlink or outside DEST;
//! - symlinks are recreated as symlinks, their targets copied verbatim and never followed;
//! - depth and entry counts are bounded (a corrupt image could loop a directory into itself);
//! - devices, FIFOs and sockets are skipped and reported; setuid/setgid bits are dropped;
//!   ownership is not copied (no root needed); hard links become separate files.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use diskkit::output::{PendingDir, PendingFile};
use diskkit::{Error, ErrorKind, Result};
use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};

use super::entry::{copy_reader, join_bytes, normalize, type_name};
use super::fs::{FileType, Inode};
use super::volume::Filesystem;

/// Deepest directory nesting copied.
pub const MAX_DEPTH: usize = 256;
/// Most entries copied in one tree.
pub const MAX_ENTRIES: u64 = 10_000_000;

/// What a copy did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CopyReport {
    /// Final path written.
    pub dest: PathBuf,
    /// Regular files written.
    pub files: u64,
    /// Directories created.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Bytes of file data written.
    pub bytes: u64,
    /// Paths inside the image that were skipped (devices, FIFOs, sockets).
    pub skipped: Vec<String>,
}

fn io_err(e: std::io::Error, path: &Path, op: &'static str) -> Error {
    Error::io(e).with_path(path).with_operation(op)
}

/// Check that `name` (from a directory entry) is one plain path component.
fn safe_name(name: &[u8], dir: &str) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(Error::corrupt(format!(
            "directory entry with an unusable name {:?}",
            String::from_utf8_lossy(name)
        ))
        .with_path(dir));
    }
    Ok(())
}

fn to_timespec(secs: i64, nsec: u32) -> Timespec {
    Timespec {
        tv_sec: secs,
        tv_nsec: i64::from(nsec.min(999_999_999)),
    }
}

/// Set atime and mtime of `path` without following a final symlink.
fn set_times(path: &Path, atime: i64, mtime: i64, mtime_nsec: u32) -> Result<()> {
    let ts = Timestamps {
        last_access: to_timespec(atime, 0),
        last_modification: to_timespec(mtime, mtime_nsec),
    };
    rustix::fs::utimensat(CWD, path, &ts, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| io_err(e.into(), path, "setting times"))
}

fn host_mode(mode: u16) -> u32 {
    u32::from(mode) & 0o1777
}

/// Copy `src` (a file or directory in the image; a symlink given here is followed inside
/// the image) to `dest` on the host. When `dest` is an existing directory the copy lands in
/// it under the source's name. Refuses to replace anything.
pub fn copy_out(fs: &Filesystem, src: &str, dest: &Path) -> Result<CopyReport> {
    let src = normalize(src)?;
    let resolved = fs.resolve(&src, true)?;
    let canonical_bytes: &[u8] = &resolved.canonical;
    let given_name = src.rsplit('/').next().unwrap_or("");
    let name: Vec<u8> = if given_name.is_empty() || given_name == ".." {
        canonical_bytes
            .rsplit(|&b| b == b'/')
            .next()
            .unwrap_or(b"")
            .to_vec()
    } else {
        given_name.as_bytes().to_vec()
    };
    let target = match fs::metadata(dest) {
        Ok(m) if m.is_dir() => {
            if name.is_empty() {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    "copying the root directory needs a destination that does not exist yet",
                )
                .with_path(dest));
            }
            dest.join(OsStr::from_bytes(&name))
        }
        _ => dest.to_path_buf(),
    };
    if fs::symlink_metadata(&target).is_ok() {
        return Err(
            Error::new(ErrorKind::AlreadyExists, "destination exists; not replacing it").with_path(&target),
        );
    }
    let inode = resolved.inode;
    let mut report = CopyReport {
        dest: target.clone(),
        ..CopyReport::default()
    };
    match inode.file_type() {
        FileType::Directory => copy_tree(fs, canonical_bytes, &inode, &target, &mut report)?,
        FileType::Regular => {
            let pending = PendingFile::new(&target, false)?;
            report.bytes = fill_file(
                fs,
                canonical_bytes,
                &inode,
                pending.file()?,
                pending.temp_path(),
                true,
            )?;
            report.files = 1;
            pending.persist()?;
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("cannot copy a {}", type_name(other)),
            )
            .with_path(&src))
        }
    }
    Ok(report)
}

/// Write the regular file `inode` (at `src` in the image) to the new file `path` (created
/// exclusively), with its mode and times.
fn write_file(fs: &Filesystem, src: &[u8], inode: &Inode, path: &Path, sync: bool) -> Result<u64> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_err(e, path, "creating"))?;
    fill_file(fs, src, inode, file, path, sync)
}

/// Write the regular file `inode` (at `src` in the image) into `file` (new and empty, at
/// `path`), with its mode and times.
fn fill_file(
    fs: &Filesystem,
    src: &[u8],
    inode: &Inode,
    file: fs::File,
    path: &Path,
    sync: bool,
) -> Result<u64> {
    let src_display = String::from_utf8_lossy(src);
    if inode.size() > MAX_FILE_SIZE {
        return Err(Error::corrupt(format!(
            "corrupt inode: the file claims {} bytes, more than ext4 allows ({MAX_FILE_SIZE})",
            inode.size()
        ))
        .with_path(src_display.as_ref()));
    }
    let mut reader = fs
        .fs()
        .open_file(inode)
        .map_err(|e| e.with_path(src_display.as_ref()))?;
    let mut w = SparseWriter::new(file);
    let n = copy_reader(&mut reader, 0, None, &mut w).map_err(|e| e.with_path(src_display.as_ref()))?;
    let file = w.finish().map_err(|e| io_err(e, path, "writing"))?;
    file.set_permissions(fs::Permissions::from_mode(host_mode(inode.mode())))
        .map_err(|e| io_err(e, path, "setting the mode"))?;
    if sync {
        file.sync_all().map_err(|e| io_err(e, path, "syncing"))?;
    }
    drop(file);
    set_times(path, inode.atime().secs, inode.mtime().secs, inode.mtime().nsec)?;
    Ok(n)
}

/// Largest file size ext4 can record (16 TiB with 4 KiB blocks); anything larger is corrupt.
pub const MAX_FILE_SIZE: u64 = 16 << 40;

/// Writes a file, leaving holes where whole 64 KiB pieces are zero (an image's sparse files
/// stay sparse on the host).
struct SparseWriter {
    file: fs::File,
    buf: Vec<u8>,
    pos: u64,
}

const PIECE: usize = 64 << 10;

impl SparseWriter {
    fn new(file: fs::File) -> SparseWriter {
        SparseWriter {
            file,
            buf: Vec::new(),
            pos: 0,
        }
    }

    fn drain(&mut self, all: bool) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut start = 0;
        while self.buf.len() - start >= PIECE || (all && start < self.buf.len()) {
            let end = (start + PIECE).min(self.buf.len());
            let piece = &self.buf[start..end];
            if piece.iter().any(|&b| b != 0) {
                self.file.write_all_at(piece, self.pos)?;
            }
            self.pos += piece.len() as u64;
            start = end;
        }
        self.buf.drain(..start);
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<fs::File> {
        self.drain(true)?;
        self.file.set_len(self.pos)?;
        Ok(self.file)
    }
}

impl std::io::Write for SparseWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 1 << 20 {
            self.drain(false)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Build the tree under a temporary sibling of `target`, then rename it into place.
fn copy_tree(
    fs: &Filesystem,
    src: &[u8],
    inode: &Inode,
    target: &Path,
    report: &mut CopyReport,
) -> Result<()> {
    // A temporary tree next to the target (removed if anything fails, or on SIGINT/SIGTERM),
    // renamed into place when complete.
    let pending = PendingDir::new(target)?;
    let temp = pending.temp_path().to_path_buf();
    let mut entries = 0u64;
    copy_dir(fs, src, inode, &temp, 0, &mut entries, report)?;
    let dir = fs::File::open(&temp).map_err(|e| io_err(e, &temp, "opening"))?;
    rustix::fs::syncfs(&dir).map_err(|e| io_err(e.into(), &temp, "syncing"))?;
    pending.persist()
}

fn copy_dir(
    fs: &Filesystem,
    src: &[u8],
    inode: &Inode,
    dir: &Path,
    depth: usize,
    entries: &mut u64,
    report: &mut CopyReport,
) -> Result<()> {
    let src_display = String::from_utf8_lossy(src).into_owned();
    if depth > MAX_DEPTH {
        return Err(
            Error::corrupt(format!("directories nested deeper than {MAX_DEPTH}")).with_path(&src_display),
        );
    }
    report.dirs += 1;
    let mut list = fs.fs().read_dir(inode).map_err(|e| e.with_path(&src_display))?;
    list.sort_by(|a, b| a.name.cmp(&b.name));
    for e in list {
        let name = e.name;
        safe_name(&name, &src_display)?;
        *entries += 1;
        if *entries > MAX_ENTRIES {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("more than {MAX_ENTRIES} entries; refusing to continue"),
            )
            .with_path(&src_display));
        }
        let child = join_bytes(src, &name);
        let child_display = String::from_utf8_lossy(&child).into_owned();
        let out = dir.join(OsStr::from_bytes(&name));
        let md = fs
            .fs()
            .inode(e.ino)
            .map_err(|err| err.with_path(&child_display))?;
        match md.file_type() {
            FileType::Directory => {
                fs::create_dir(&out).map_err(|e| io_err(e, &out, "creating"))?;
                copy_dir(fs, &child, &md, &out, depth + 1, entries, report)?;
            }
            FileType::Regular => {
                report.bytes += write_file(fs, &child, &md, &out, false)?;
                report.files += 1;
            }
            FileType::Symlink => {
                let target = fs
                    .fs()
                    .read_link(&md)
                    .map_err(|err| err.with_path(&child_display))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &out)
                    .map_err(|e| io_err(e, &out, "creating a symlink"))?;
                set_times(&out, md.atime().secs, md.mtime().secs, md.mtime().nsec)?;
                report.symlinks += 1;
            }
            _ => report.skipped.push(child_display),
        }
    }
    // Mode and times last: a read-only directory must still receive its children.
    fs::set_permissions(dir, fs::Permissions::from_mode(host_mode(inode.mode())))
        .map_err(|e| io_err(e, dir, "setting the mode"))?;
    set_times(dir, inode.atime().secs, inode.mtime().secs, inode.mtime().nsec)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_single_components_are_created() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"/etc", b"x\0y"] {
            assert!(safe_name(bad, "/d").is_err(), "{bad:?}");
        }
        for good in [&b"a"[..], b"...", b"caf\xe9", b" sp ace"] {
            assert!(safe_name(good, "/d").is_ok(), "{good:?}");
        }
    }

    #[test]
    fn sparse_writer_leaves_holes_and_keeps_data() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w = SparseWriter::new(fs::File::create(&path).unwrap());
        let mut expected = vec![0u8; 3 << 20];
        expected[100] = 1;
        expected[(2 << 20) + 7] = 2;
        for chunk in expected.chunks(7000) {
            w.write_all(chunk).unwrap();
        }
        w.finish().unwrap();
        assert_eq!(fs::read(&path).unwrap(), expected);
    }
}
