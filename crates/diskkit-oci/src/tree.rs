//! A directory on the host read as one layer: a thread walks it and writes a tar stream that
//! the layer pipeline reads like any other blob (so a directory becomes a disk image the way
//! `mkfs.ext4 -d` makes one, through the same merge, placement and ext4 writer as OCI layers).
//!
//! The walk is deterministic (names in byte order), never follows symlinks, and keeps what a
//! root filesystem needs: types (regular, directory, symlink, character and block devices,
//! FIFOs), hard links (files with several names become tar links to the first name), mode
//! with setuid/setgid/sticky, owner, modification time and extended attributes (PAX
//! `SCHILY.xattr.*` records). Sockets cannot be stored in tar and are skipped. Writing the
//! stream instead of building the tree directly reuses every check the tar path already has
//! (names, links, sizes) and costs one copy of the file data, through a bounded channel.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

/// Chunks of tar stream in flight between the walking thread and the reader.
const DEPTH: usize = 16;
const CHUNK: usize = 256 << 10;

/// Start walking `root` on a thread; returns the tar stream it writes.
pub(crate) fn stream(root: &Path) -> io::Result<Box<dyn Read + Send>> {
    let (tx, rx) = sync_channel(DEPTH);
    let root = root.to_path_buf();
    std::thread::Builder::new()
        .name("layer-from-directory".into())
        .spawn(move || {
            let mut out = ChannelWriter {
                tx: tx.clone(),
                buf: Vec::with_capacity(CHUNK),
            };
            let result = write_tree(&root, &mut out).and_then(|()| out.flush());
            if let Err(e) = result {
                let _ = tx.send(Err(e));
            }
        })?;
    Ok(Box::new(ChannelReader {
        rx,
        cur: Vec::new(),
        pos: 0,
        done: false,
    }))
}

/// The walking thread's end of the channel: chunks of stream, or the error that stopped it.
struct ChannelWriter {
    tx: SyncSender<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the layer reader stopped"))
    }
}

/// The reading end: the tar stream, then end of file once the walker is done.
struct ChannelReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
    done: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.cur = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                // The walker finished (its sender is gone).
                Err(_) => self.done = true,
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// An I/O error naming the host path it concerns.
fn at(path: &Path, e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Write the tar stream of the tree at `root` (the root directory itself as `./`).
fn write_tree(root: &Path, out: &mut ChannelWriter) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(root).map_err(|e| at(root, &e))?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory", root.display()),
        ));
    }
    let mut builder = tar::Builder::new(out);
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    append(&mut builder, root, Path::new("."), &meta, &mut links)?;
    // Depth-first, names in byte order; directories are listed before their contents.
    let mut stack = vec![(root.to_path_buf(), PathBuf::new())];
    while let Some((dir, name)) = stack.pop() {
        let mut children: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| at(&dir, &e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .map_err(|e| at(&dir, &e))?;
        children.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut subdirs = Vec::new();
        for child in children {
            let host = dir.join(&child);
            // Names relative to the root, without a `./` prefix.
            let inner = name.join(&child);
            let meta = std::fs::symlink_metadata(&host).map_err(|e| at(&host, &e))?;
            append(&mut builder, &host, &inner, &meta, &mut links)?;
            if meta.is_dir() {
                subdirs.push((host, inner));
            }
        }
        // Popped in byte order.
        stack.extend(subdirs.into_iter().rev());
    }
    builder.finish()?;
    Ok(())
}

/// Append one entry (`host` on the host, `name` in the layer).
fn append<W: Write>(
    builder: &mut tar::Builder<W>,
    host: &Path,
    name: &Path,
    meta: &Metadata,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> io::Result<()> {
    let ft = meta.file_type();
    let mut header = tar::Header::new_gnu();
    header.set_mode(meta.mode() & 0o7777);
    header.set_uid(u64::from(meta.uid()));
    header.set_gid(u64::from(meta.gid()));
    header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
    header.set_size(0);
    let xattrs = xattrs(host)?;
    if !xattrs.is_empty() {
        append_pax(builder, &xattrs)?;
    }
    if ft.is_file() && meta.nlink() > 1 {
        let key = (meta.dev(), meta.ino());
        if let Some(first) = links.get(&key) {
            header.set_entry_type(tar::EntryType::Link);
            return builder.append_link(&mut header, name, first);
        }
        links.insert(key, name.to_path_buf());
    }
    if ft.is_file() {
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(meta.len());
        let file = File::open(host).map_err(|e| at(host, &e))?;
        // A file that changes size while it is read would corrupt the stream: read exactly
        // the size the header announces, and fail if it is shorter.
        let mut data = Exact {
            inner: file.take(meta.len()),
            left: meta.len(),
            path: host,
        };
        return builder.append_data(&mut header, name, &mut data);
    }
    if ft.is_symlink() {
        let target = std::fs::read_link(host).map_err(|e| at(host, &e))?;
        header.set_entry_type(tar::EntryType::Symlink);
        return builder.append_link(&mut header, name, target);
    }
    let kind = if ft.is_dir() {
        tar::EntryType::Directory
    } else if ft.is_char_device() {
        tar::EntryType::Char
    } else if ft.is_block_device() {
        tar::EntryType::Block
    } else if ft.is_fifo() {
        tar::EntryType::Fifo
    } else {
        // A socket: tar has no type for it (mkfs.ext4 -d skips it too).
        return Ok(());
    };
    header.set_entry_type(kind);
    if ft.is_char_device() || ft.is_block_device() {
        let rdev = meta.rdev();
        header.set_device_major(libc_major(rdev))?;
        header.set_device_minor(libc_minor(rdev))?;
    }
    builder.append_data(&mut header, name, io::empty())
}

/// Major number of a Linux `dev_t` (glibc's encoding).
fn libc_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32
}

/// Minor number of a Linux `dev_t` (glibc's encoding).
fn libc_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32
}

/// Reads exactly `left` bytes or fails naming the file.
struct Exact<'a, R> {
    inner: R,
    left: u64,
    path: &'a Path,
}

impl<R: Read> Read for Exact<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf).map_err(|e| at(self.path, &e))?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: the file shrank while it was read", self.path.display()),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// The extended attributes of `path` (not following a symlink), in name order.
fn xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = vec![0u8; 64 << 10];
    let n = match rustix::fs::llistxattr(path, &mut names[..]) {
        Ok(n) => n,
        // No xattr support on this filesystem, or none to read.
        Err(rustix::io::Errno::NOTSUP | rustix::io::Errno::NODATA) => return Ok(Vec::new()),
        Err(e) => return Err(at(path, &e.into())),
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 64 << 10];
        let name_str = std::ffi::OsStr::from_bytes(name);
        match rustix::fs::lgetxattr(path, name_str, &mut value[..]) {
            Ok(len) => {
                value.truncate(len);
                out.push((name.to_vec(), value));
            }
            // Removed meanwhile, or not readable by this user (trusted.*): left out.
            Err(rustix::io::Errno::NODATA | rustix::io::Errno::PERM | rustix::io::Errno::ACCESS) => {}
            Err(e) => return Err(at(path, &e.into())),
        }
    }
    out.sort();
    Ok(out)
}

/// A PAX extended header carrying `SCHILY.xattr.NAME=VALUE` records for the next entry.
fn append_pax<W: Write>(builder: &mut tar::Builder<W>, xattrs: &[(Vec<u8>, Vec<u8>)]) -> io::Result<()> {
    let mut records = Vec::new();
    for (name, value) in xattrs {
        let mut body = b"SCHILY.xattr.".to_vec();
        body.extend_from_slice(name);
        body.push(b'=');
        body.extend_from_slice(value);
        body.push(b'\n');
        // "LEN BODY": LEN counts itself, the space and the body.
        let mut len = body.len() + 2;
        while len != body.len() + 1 + len.to_string().len() {
            len = body.len() + 1 + len.to_string().len();
        }
        records.extend_from_slice(format!("{len} ").as_bytes());
        records.extend_from_slice(&body);
    }
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::XHeader);
    header.set_path("././@PaxHeader")?;
    header.set_mode(0o644);
    header.set_size(records.len() as u64);
    header.set_cksum();
    builder.append(&header, records.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers() {
        // makedev(8, 1) and makedev(259, 70000) as glibc encodes them.
        let make = |ma: u64, mi: u64| {
            ((ma & 0xffff_f000) << 32) | ((ma & 0xfff) << 8) | ((mi & 0xffff_ff00) << 12) | (mi & 0xff)
        };
        assert_eq!((libc_major(make(8, 1)), libc_minor(make(8, 1))), (8, 1));
        assert_eq!(
            (libc_major(make(259, 70000)), libc_minor(make(259, 70000))),
            (259, 70000)
        );
    }

    #[test]
    fn tree_streams_as_tar() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc/sub")).unwrap();
        std::fs::write(root.join("etc/motd"), b"hello\n").unwrap();
        std::fs::hard_link(root.join("etc/motd"), root.join("etc/motd2")).unwrap();
        std::os::unix::fs::symlink("motd", root.join("etc/link")).unwrap();
        let long = "x".repeat(150);
        std::fs::write(root.join("etc/sub").join(&long), b"long").unwrap();
        let mut r = stream(root).unwrap();
        let mut data = Vec::new();
        r.read_to_end(&mut data).unwrap();
        let mut ar = tar::Archive::new(data.as_slice());
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().into_owned();
            let kind = e.header().entry_type();
            let mut body = Vec::new();
            e.read_to_end(&mut body).unwrap();
            seen.push((path.to_string_lossy().into_owned(), kind, body));
        }
        let names: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
        let long_name = format!("etc/sub/{long}");
        assert_eq!(
            names,
            [
                ".",
                "etc",
                "etc/link",
                "etc/motd",
                "etc/motd2",
                "etc/sub",
                &long_name
            ]
        );
        assert_eq!(seen[2].1, tar::EntryType::Symlink);
        assert_eq!(seen[3].2, b"hello\n");
        assert_eq!(seen[4].1, tar::EntryType::Link);
        assert_eq!(seen[6].2, b"long");
    }

    #[test]
    fn unreadable_root_is_an_error() {
        let mut r = stream(Path::new("/nonexistent/diskkit-tree")).unwrap();
        let mut data = Vec::new();
        let e = r.read_to_end(&mut data).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/diskkit-tree"), "{e}");
    }
}
