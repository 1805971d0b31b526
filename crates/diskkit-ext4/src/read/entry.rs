//! Files in an open filesystem: metadata (`stat`), directory listings (`ls`) and contents
//! (`cat`).

use std::io::Write;

use diskkit::{Error, ErrorKind, Result};
use serde::Serialize;

use super::fs::{DirEntry, FileReader, FileType, Inode, Lookup, Resolved, Xattr};
use super::volume::Filesystem;

/// Largest symlink target read (Linux's PATH_MAX).
const MAX_LINK: u64 = 4096;

/// The metadata of one file, as `stat` and `ls -l` show it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Entry {
    /// Absolute path inside the filesystem (lossy UTF-8).
    pub path: String,
    /// Last component (lossy UTF-8); `/` for the root.
    pub name: String,
    /// `file`, `dir`, `symlink`, `char`, `block`, `fifo` or `socket`.
    #[serde(rename = "type")]
    pub file_type: &'static str,
    /// Inode number.
    pub ino: u32,
    /// Permission bits (including setuid, setgid, sticky).
    pub mode: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Hard link count.
    pub nlink: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds since the epoch (negative before 1970).
    pub mtime: i64,
    /// Nanoseconds part of the modification time.
    pub mtime_nsec: u32,
    /// Access time, seconds.
    pub atime: i64,
    /// Nanoseconds part of the access time.
    pub atime_nsec: u32,
    /// Status change time, seconds.
    pub ctime: i64,
    /// Nanoseconds part of the status change time.
    pub ctime_nsec: u32,
    /// Creation time, seconds, when the inode records it.
    pub crtime: Option<i64>,
    /// Nanoseconds part of the creation time.
    pub crtime_nsec: Option<u32>,
    /// A device's (major, minor) numbers.
    pub device: Option<(u32, u32)>,
    /// A symlink's target.
    pub target: Option<String>,
}

/// Short name of a file type.
pub fn type_name(t: FileType) -> &'static str {
    match t {
        FileType::Regular => "file",
        FileType::Directory => "dir",
        FileType::Symlink => "symlink",
        FileType::CharDevice => "char",
        FileType::BlockDevice => "block",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
    }
}

/// The `ls -l` type letter.
pub fn type_char(t: &str) -> char {
    match t {
        "dir" => 'd',
        "symlink" => 'l',
        "char" => 'c',
        "block" => 'b',
        "fifo" => 'p',
        "socket" => 's',
        _ => '-',
    }
}

/// `rwxr-xr-x`-style permission string with setuid/setgid/sticky.
pub fn mode_string(file_type: &str, mode: u16) -> String {
    let mut s = String::with_capacity(10);
    s.push(type_char(file_type));
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ];
    for (i, (bit, c)) in bits.iter().enumerate() {
        let set = mode & bit != 0;
        let special = match i {
            2 => Some((0o4000, 's', 'S')),
            5 => Some((0o2000, 's', 'S')),
            8 => Some((0o1000, 't', 'T')),
            _ => None,
        };
        match special {
            Some((sb, lower, upper)) if mode & sb != 0 => s.push(if set { lower } else { upper }),
            _ => s.push(if set { *c } else { '-' }),
        }
    }
    s
}

fn last_component(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rsplit('/').next() {
        Some("") | None => "/".to_owned(),
        Some(n) => n.to_owned(),
    }
}

/// Normalise a user-supplied path inside the image: it must be absolute; repeated and
/// trailing slashes are removed.
pub fn normalize(path: &str) -> Result<String> {
    if !path.starts_with('/') {
        return Err(Error::invalid_argument(format!(
            "path inside the image must be absolute: '{path}'"
        )));
    }
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    Ok(format!("/{}", parts.join("/")))
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// `dir/name` for a directory path and an entry name.
pub(crate) fn join_bytes(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut child = dir.to_vec();
    if child.last() != Some(&b'/') {
        child.push(b'/');
    }
    child.extend_from_slice(name);
    child
}

impl Filesystem {
    /// Look `path` up (following a final symlink when `follow`): found, or why not.
    pub fn lookup(&self, path: impl AsRef<[u8]>, follow: bool) -> Result<Lookup> {
        let raw = path.as_ref();
        self.fs()
            .lookup_path(raw, follow)
            .map_err(|e| e.with_path(lossy(raw)))
    }

    /// Resolve `path` to its inode (following a final symlink when `follow`).
    pub fn resolve(&self, path: impl AsRef<[u8]>, follow: bool) -> Result<Resolved> {
        let raw = path.as_ref();
        self.lookup(raw, follow)?
            .found()
            .map_err(|e| e.with_path(lossy(raw)))
    }

    /// The path with every symlink followed.
    pub fn canonicalize(&self, path: impl AsRef<[u8]>) -> Result<Vec<u8>> {
        Ok(self.resolve(path, true)?.canonical)
    }

    /// The [`Entry`] of an inode found at `path` (named `name`).
    pub fn entry_for(&self, path: &[u8], name: String, inode: &Inode) -> Result<Entry> {
        let target = if inode.file_type() == FileType::Symlink {
            match self.fs().read_link(inode) {
                Ok(t) if t.len() as u64 > MAX_LINK => {
                    return Err(Error::corrupt("symlink target too long").with_path(lossy(path)))
                }
                Ok(t) => Some(lossy(&t)),
                // An encrypted target cannot be shown; the entry still can.
                Err(e) if e.kind() == ErrorKind::Unsupported => None,
                Err(e) => return Err(e.with_path(lossy(path))),
            }
        } else {
            None
        };
        Ok(Entry {
            path: lossy(path),
            name,
            file_type: type_name(inode.file_type()),
            ino: inode.ino(),
            mode: inode.mode(),
            uid: inode.uid(),
            gid: inode.gid(),
            nlink: u32::from(inode.links()),
            size: inode.size(),
            mtime: inode.mtime().secs,
            mtime_nsec: inode.mtime().nsec,
            atime: inode.atime().secs,
            atime_nsec: inode.atime().nsec,
            ctime: inode.ctime().secs,
            ctime_nsec: inode.ctime().nsec,
            crtime: inode.crtime().map(|t| t.secs),
            crtime_nsec: inode.crtime().map(|t| t.nsec),
            device: inode.device(),
            target,
        })
    }

    /// Metadata of `path`, not following a final symlink (like `lstat`).
    pub fn stat(&self, path: &str) -> Result<Entry> {
        let path = normalize(path)?;
        let r = self.resolve(&path, false)?;
        self.entry_for(path.as_bytes(), last_component(&path), &r.inode)
    }

    /// Metadata of `path`, following symlinks inside the image.
    pub fn stat_follow(&self, path: &str) -> Result<Entry> {
        let path = normalize(path)?;
        let r = self.resolve(&path, true)?;
        self.entry_for(path.as_bytes(), last_component(&path), &r.inode)
    }

    /// Whether `path` exists (following symlinks inside the image).
    pub fn exists(&self, path: &str) -> Result<bool> {
        match self.lookup(path, true)? {
            Lookup::Found(_) => Ok(true),
            Lookup::NotFound | Lookup::NotADirectory => Ok(false),
            loop_ @ Lookup::SymlinkLoop => loop_.found().map(|_| true).map_err(|e| e.with_path(path)),
        }
    }

    /// The entries of directory `path` (following symlinks to it), without `.` and `..`,
    /// sorted by name.
    pub fn read_dir(&self, path: impl AsRef<[u8]>) -> Result<Vec<DirEntry>> {
        let raw = path.as_ref();
        let r = self.resolve(raw, true)?;
        let mut v = self
            .fs()
            .read_dir(&r.inode)
            .map_err(|e| e.with_path(lossy(raw)))?;
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// Names in directory `path` (following symlinks to it), without `.` and `..`, sorted.
    /// Names are raw bytes: ext4 does not promise UTF-8.
    pub fn read_dir_names(&self, path: impl AsRef<[u8]>) -> Result<Vec<Vec<u8>>> {
        Ok(self.read_dir(path)?.into_iter().map(|e| e.name).collect())
    }

    /// `ls`: the entries of directory `path`, or the file itself when it is not a directory.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let path = normalize(path)?;
        let r = self.resolve(&path, true)?;
        if r.inode.file_type() != FileType::Directory {
            return Ok(vec![self.stat(&path)?]);
        }
        let mut out = Vec::new();
        for e in self.read_dir(&path)? {
            let child = join_bytes(path.as_bytes(), &e.name);
            let inode = self
                .fs()
                .inode(e.ino)
                .map_err(|err| err.with_path(lossy(&child)))?;
            out.push(self.entry_for(&child, lossy(&e.name), &inode)?);
        }
        Ok(out)
    }

    /// The extended attributes of `path` (not following a final symlink), sorted by name.
    pub fn xattrs(&self, path: impl AsRef<[u8]>) -> Result<Vec<Xattr>> {
        let raw = path.as_ref();
        let r = self.resolve(raw, false)?;
        let mut v = self.fs().xattrs(&r.inode).map_err(|e| e.with_path(lossy(raw)))?;
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// A reader for the regular file at `path` (following symlinks inside the image).
    pub fn open_file(&self, path: impl AsRef<[u8]>) -> Result<FileReader> {
        let raw = path.as_ref();
        let r = self.resolve(raw, true)?;
        if r.inode.file_type() != FileType::Regular {
            return Err(Error::new(ErrorKind::InvalidArgument, "not a regular file").with_path(lossy(raw)));
        }
        self.fs().open_file(&r.inode).map_err(|e| e.with_path(lossy(raw)))
    }

    /// Stream the contents of the regular file at `path` (following symlinks inside the
    /// image) into `out`; returns the byte count.
    pub fn copy_file_to(&self, path: impl AsRef<[u8]>, out: &mut dyn Write) -> Result<u64> {
        self.copy_range_to(path, 0, None, out)
    }

    /// Stream `len` bytes (to the end when `None`) from `offset` of the regular file at `path`.
    pub fn copy_range_to(
        &self,
        path: impl AsRef<[u8]>,
        offset: u64,
        len: Option<u64>,
        out: &mut dyn Write,
    ) -> Result<u64> {
        let raw = path.as_ref();
        let mut file = self.open_file(raw)?;
        copy_reader(&mut file, offset, len, out).map_err(|e| e.with_path(lossy(raw)))
    }

    /// Read a small regular file fully, refusing files larger than `limit` bytes.
    pub fn read_small(&self, path: &str, limit: u64) -> Result<Vec<u8>> {
        let mut file = self.open_file(path)?;
        if file.size() > limit {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "file is {} bytes, more than the {limit} accepted here",
                    file.size()
                ),
            )
            .with_path(path));
        }
        let mut v = Vec::new();
        copy_reader(&mut file, 0, None, &mut v).map_err(|e| e.with_path(path))?;
        Ok(v)
    }
}

/// Stream `len` bytes (to the end when `None`) from `offset` of `file` into `out`.
pub fn copy_reader(file: &mut FileReader, offset: u64, len: Option<u64>, out: &mut dyn Write) -> Result<u64> {
    let size = file.size();
    let end = match len {
        Some(l) => offset.checked_add(l).filter(|&e| e <= size).ok_or_else(|| {
            Error::out_of_bounds(format!(
                "range {offset}+{l} past the end of the file ({size} bytes)"
            ))
        })?,
        None => size,
    };
    if offset > end {
        return Err(Error::out_of_bounds("offset past the end of the file"));
    }
    let mut buf = vec![
        0u8;
        (1usize << 20)
            .min(usize::try_from(end - offset).unwrap_or(usize::MAX))
            .max(1)
    ];
    let mut pos = offset;
    while pos < end {
        let want = ((end - pos) as usize).min(buf.len());
        let n = file.read_at(pos, &mut buf[..want])?;
        if n == 0 {
            return Err(Error::corrupt("file ended before its recorded size"));
        }
        out.write_all(&buf[..n])
            .map_err(|e| Error::io(e).with_operation("writing the output"))?;
        pos += n as u64;
    }
    Ok(pos - offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(mode_string("file", 0o644), "-rw-r--r--");
        assert_eq!(mode_string("dir", 0o1777), "drwxrwxrwt");
        assert_eq!(mode_string("file", 0o4755), "-rwsr-xr-x");
        assert_eq!(mode_string("file", 0o2644), "-rw-r-Sr--");
    }

    #[test]
    fn normalizes() {
        assert_eq!(normalize("/").unwrap(), "/");
        assert_eq!(normalize("//a//b/./").unwrap(), "/a/b");
        assert!(normalize("a").is_err());
    }
}
