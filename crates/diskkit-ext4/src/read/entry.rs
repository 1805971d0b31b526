//! Files in an open filesystem: metadata (`stat`), directory listings (`ls`) and contents
//! (`cat`).

use std::io::Write;

use diskkit::{Error, ErrorKind, Result};
use ext4_view::{FileType, Metadata};
use serde::Serialize;

use super::volume::{ext4_error, Filesystem};

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
    /// Permission bits (including setuid, setgid, sticky).
    pub mode: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds part of the modification time.
    pub mtime_nsec: u32,
    /// Access time, seconds.
    pub atime: i64,
    /// Creation time, seconds, when the inode records it.
    pub crtime: Option<i64>,
    /// A symlink's target.
    pub target: Option<String>,
}

/// Short name of a file type.
pub fn type_name(t: FileType) -> &'static str {
    match t {
        FileType::Regular => "file",
        FileType::Directory => "dir",
        FileType::Symlink => "symlink",
        FileType::CharacterDevice => "char",
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

impl Filesystem {
    fn entry_from(&self, raw: &[u8], name: String, md: &Metadata) -> Result<Entry> {
        let lossy = String::from_utf8_lossy(raw);
        let path = lossy.as_ref();
        let target = if md.is_symlink() {
            let t = self.ext4().read_link(raw).map_err(|e| ext4_error(&e, path))?;
            let bytes: &[u8] = t.as_ref();
            if bytes.len() as u64 > MAX_LINK {
                return Err(Error::corrupt("symlink target too long").with_path(path));
            }
            Some(String::from_utf8_lossy(bytes).into_owned())
        } else {
            None
        };
        Ok(Entry {
            path: path.to_owned(),
            name,
            file_type: type_name(md.file_type()),
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            size: md.len(),
            mtime: md.modified().seconds(),
            mtime_nsec: md.modified().nanoseconds(),
            atime: md.accessed().seconds(),
            crtime: md.created().map(|t| t.seconds()),
            target,
        })
    }

    /// Metadata of `path`, not following a final symlink (like `lstat`).
    pub fn stat(&self, path: &str) -> Result<Entry> {
        let path = normalize(path)?;
        let md = self
            .ext4()
            .symlink_metadata(path.as_str())
            .map_err(|e| ext4_error(&e, &path))?;
        self.entry_from(path.as_bytes(), last_component(&path), &md)
    }

    /// Metadata of `path`, following symlinks inside the image.
    pub fn stat_follow(&self, path: &str) -> Result<Entry> {
        let path = normalize(path)?;
        let md = self
            .ext4()
            .metadata(path.as_str())
            .map_err(|e| ext4_error(&e, &path))?;
        self.entry_from(path.as_bytes(), last_component(&path), &md)
    }

    /// Whether `path` exists (following symlinks inside the image).
    pub fn exists(&self, path: &str) -> Result<bool> {
        match self.ext4().metadata(path) {
            Ok(_) => Ok(true),
            Err(ext4_view::Ext4Error::NotFound) => Ok(false),
            Err(e) => Err(ext4_error(&e, path)),
        }
    }

    /// Names in directory `path` (following symlinks to it), without `.` and `..`, sorted.
    /// Names are raw bytes: ext4 does not promise UTF-8.
    pub fn read_dir_names(&self, path: impl AsRef<[u8]>) -> Result<Vec<Vec<u8>>> {
        let raw = path.as_ref();
        let lossy = String::from_utf8_lossy(raw);
        let path = lossy.as_ref();
        let iter = self.ext4().read_dir(raw).map_err(|e| ext4_error(&e, path))?;
        let mut names = Vec::new();
        for entry in iter {
            let entry = entry.map_err(|e| ext4_error(&e, path))?;
            let name = entry.file_name();
            let name: &[u8] = name.as_ref();
            if name == b"." || name == b".." {
                continue;
            }
            names.push(name.to_vec());
        }
        names.sort();
        Ok(names)
    }

    /// `ls`: the entries of directory `path`, or the file itself when it is not a directory.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let path = normalize(path)?;
        let md = self
            .ext4()
            .metadata(path.as_str())
            .map_err(|e| ext4_error(&e, &path))?;
        if !md.is_dir() {
            return Ok(vec![self.stat(&path)?]);
        }
        let mut out = Vec::new();
        for raw_name in self.read_dir_names(&path)? {
            let name = String::from_utf8_lossy(&raw_name).into_owned();
            let mut child = path.as_bytes().to_vec();
            if child != b"/" {
                child.push(b'/');
            }
            child.extend_from_slice(&raw_name);
            let md = self
                .ext4()
                .symlink_metadata(child.as_slice())
                .map_err(|e| ext4_error(&e, &String::from_utf8_lossy(&child)))?;
            out.push(self.entry_from(&child, name, &md)?);
        }
        Ok(out)
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
        let path = String::from_utf8_lossy(raw);
        let path = path.as_ref();
        let mut file = self.ext4().open(raw).map_err(|e| ext4_error(&e, path))?;
        let size = file.metadata().len();
        if !file.metadata().file_type().is_regular_file() {
            return Err(Error::new(ErrorKind::InvalidArgument, "not a regular file").with_path(path));
        }
        let end = match len {
            Some(l) => offset.checked_add(l).filter(|&e| e <= size).ok_or_else(|| {
                Error::out_of_bounds(format!(
                    "range {offset}+{l} past the end of the file ({size} bytes)"
                ))
                .with_path(path)
            })?,
            None => size,
        };
        if offset > end {
            return Err(Error::out_of_bounds("offset past the end of the file").with_path(path));
        }
        file.seek_to(offset).map_err(|e| ext4_error(&e, path))?;
        let mut buf = vec![0u8; 1 << 16];
        let mut pos = offset;
        while pos < end {
            let want = ((end - pos) as usize).min(buf.len());
            let n = file
                .read_bytes(&mut buf[..want])
                .map_err(|e| ext4_error(&e, path))?;
            if n == 0 {
                return Err(Error::corrupt("file ended before its recorded size").with_path(path));
            }
            out.write_all(&buf[..n])
                .map_err(|e| Error::io(e).with_operation("writing the output"))?;
            pos += n as u64;
        }
        Ok(pos - offset)
    }

    /// Read a small regular file fully, refusing files larger than `limit` bytes.
    pub fn read_small(&self, path: &str, limit: u64) -> Result<Vec<u8>> {
        let md = self.ext4().metadata(path).map_err(|e| ext4_error(&e, path))?;
        if md.len() > limit {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("file is {} bytes, more than the {limit} accepted here", md.len()),
            )
            .with_path(path));
        }
        let mut v = Vec::new();
        self.copy_file_to(path, &mut v)?;
        Ok(v)
    }
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
