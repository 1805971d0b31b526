//! Path resolution inside the filesystem: absolute paths from the root, `..` never above the
//! root, symlinks followed inside the image (absolute targets from the image's own root) up to
//! 40 links, as Linux allows.

use std::collections::VecDeque;

use diskkit::{Error, ErrorKind, Result};

use super::file::FileReader;
use super::inode::{FileType, Inode};
use super::{Fs, ROOT_INO};

/// Most symlinks followed while resolving one path (Linux's limit).
pub const MAX_SYMLINKS: u32 = 40;

/// A resolved path.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The inode found.
    pub inode: Inode,
    /// The path with every symlink followed (`/` separated, absolute).
    pub canonical: Vec<u8>,
}

/// The result of looking a path up.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The path exists.
    Found(Box<Resolved>),
    /// A component does not exist (a dangling symlink ends here too).
    NotFound,
    /// A component that must be a directory is not one.
    NotADirectory,
    /// More than [`MAX_SYMLINKS`] symlinks.
    SymlinkLoop,
}

impl Lookup {
    /// The resolved path, or the error a missing one deserves.
    pub fn found(self) -> Result<Resolved> {
        match self {
            Lookup::Found(r) => Ok(*r),
            Lookup::NotFound => Err(Error::new(ErrorKind::NotFound, "not found")),
            Lookup::NotADirectory => Err(Error::new(
                ErrorKind::InvalidArgument,
                "a component of the path is not a directory",
            )),
            Lookup::SymlinkLoop => Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("more than {MAX_SYMLINKS} symbolic links (a loop?)"),
            )),
        }
    }
}

fn components(p: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    p.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".")
}

impl Fs {
    /// Look `path` up from the root (a relative path is taken from the root too). The final
    /// component is followed when it is a symlink and `follow` is set.
    pub fn lookup_path(&self, path: &[u8], follow: bool) -> Result<Lookup> {
        let root = self.inode(ROOT_INO)?;
        if root.file_type != FileType::Directory {
            return Err(Error::corrupt("the root inode is not a directory"));
        }
        // (name, inode) from the root down.
        let mut stack: Vec<(Vec<u8>, Inode)> = Vec::new();
        let mut queue: VecDeque<Vec<u8>> = components(path).map(<[u8]>::to_vec).collect();
        let mut links = 0u32;
        while let Some(name) = queue.pop_front() {
            if name == b".." {
                stack.pop();
                continue;
            }
            let dir = stack.last().map_or(&root, |(_, i)| i);
            if dir.file_type != FileType::Directory {
                return Ok(Lookup::NotADirectory);
            }
            let Some(ino) = self.lookup(dir, &name)? else {
                return Ok(Lookup::NotFound);
            };
            let inode = self.inode(ino)?;
            let last = queue.is_empty();
            if inode.file_type == FileType::Symlink && (!last || follow) {
                links = links.saturating_add(1);
                if links > MAX_SYMLINKS {
                    return Ok(Lookup::SymlinkLoop);
                }
                let target = self.read_link(&inode)?;
                if target.is_empty() {
                    return Ok(Lookup::NotFound);
                }
                if target.first() == Some(&b'/') {
                    stack.clear();
                }
                for c in components(&target).rev() {
                    queue.push_front(c.to_vec());
                }
                continue;
            }
            stack.push((name, inode));
        }
        let mut canonical = Vec::new();
        for (n, _) in &stack {
            canonical.push(b'/');
            canonical.extend_from_slice(n);
        }
        if canonical.is_empty() {
            canonical.push(b'/');
        }
        let inode = stack.pop().map_or(root, |(_, i)| i);
        Ok(Lookup::Found(Box::new(Resolved { inode, canonical })))
    }

    /// A symlink's target, as stored.
    pub fn read_link(&self, inode: &Inode) -> Result<Vec<u8>> {
        if inode.file_type != FileType::Symlink {
            return Err(Error::invalid_argument(format!(
                "inode {} is not a symlink",
                inode.ino
            )));
        }
        if inode.is_encrypted() {
            return Err(Error::unsupported(format!(
                "inode {}: the symlink target is encrypted (fscrypt) and cannot be read without the key",
                inode.ino
            )));
        }
        let bs = self.sb().block_size() as u64;
        if inode.size > bs {
            return Err(Error::corrupt(format!(
                "inode {}: a {}-byte symlink target is longer than a block",
                inode.ino, inode.size
            )));
        }
        let len = inode.size as usize;
        if inode.has_inline_data() {
            let data = self.inline_data(inode)?;
            let (target, rest) = data.split_at(len.min(data.len()));
            if target.len() < len || rest.iter().any(|&b| b != 0) {
                return Err(Error::corrupt(format!(
                    "inode {}: the inline symlink target does not match its size {len}",
                    inode.ino
                )));
            }
            return no_nul(inode, target.to_vec());
        }
        // A fast symlink keeps its target in i_block: the kernel's test is that no data block
        // is allocated (an attribute block does not count).
        let ea_blocks = if inode.file_acl != 0 {
            (self.sb().cluster_ratio().saturating_mul(bs)) / 512
        } else {
            0
        };
        if len < inode.block.len() && inode.blocks.saturating_sub(ea_blocks) == 0 {
            return no_nul(inode, inode.block[..len].to_vec());
        }
        let mut buf = vec![0u8; len];
        let mut r = FileReader::new(self, inode)?;
        let n = r.read_at(0, &mut buf)?;
        buf.truncate(n);
        no_nul(inode, buf)
    }
}

/// A target with a NUL inside its recorded size: the kernel would cut it short there and
/// e2fsprogs would not, so it is refused as damaged.
fn no_nul(inode: &Inode, target: Vec<u8>) -> Result<Vec<u8>> {
    if target.contains(&0) {
        return Err(Error::corrupt(format!(
            "inode {}: the symlink target has a NUL byte within its recorded size {}",
            inode.ino,
            target.len()
        )));
    }
    Ok(target)
}
