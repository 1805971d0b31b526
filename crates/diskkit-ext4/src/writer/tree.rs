//! The input of the writer: a finished tree of nodes (directories, files, links, devices).

use diskkit::{Error, Result};

/// Index of a node in a [`Tree`].
pub type NodeId = usize;

/// A point in time: seconds since the Unix epoch (may be negative) and nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    /// Seconds since 1970-01-01 UTC; negative before it.
    pub secs: i64,
    /// Nanoseconds, below 1,000,000,000.
    pub nanos: u32,
}

/// Ownership, permissions, times and extended attributes of a node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Access time.
    pub atime: Timestamp,
    /// Modification time.
    pub mtime: Timestamp,
    /// Change time.
    pub ctime: Timestamp,
    /// Extended attributes: full name (`user.x`, `security.capability`, ...) and value. POSIX
    /// ACLs (`system.posix_acl_access`/`_default`) are given in the user-space format (version 2)
    /// and converted to ext4's on-disk format.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What a node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory and its entries (name, child). Names are unique, 1–255 bytes, without `/`.
    Directory(Vec<(Vec<u8>, NodeId)>),
    /// A regular file of `size` bytes; `content` is a token passed back to the
    /// [`ContentSource`] to read the bytes.
    File {
        /// Size in bytes.
        size: u64,
        /// Caller's token for the content.
        content: u64,
    },
    /// A symbolic link and its target (stored, never resolved).
    Symlink(Vec<u8>),
    /// A character device.
    CharDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
}

/// One node: a kind and its metadata. A non-directory node named by several directory entries
/// is a hard link; a directory may be named only once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// What the node is.
    pub kind: NodeKind,
    /// Its metadata.
    pub meta: Metadata,
}

/// A whole filesystem tree. Node 0 is the root directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    /// A tree holding only an empty root directory with `meta`.
    pub fn new(root: Metadata) -> Self {
        Tree {
            nodes: vec![Node {
                kind: NodeKind::Directory(Vec::new()),
                meta: root,
            }],
        }
    }

    /// The root directory's id.
    pub const ROOT: NodeId = 0;

    /// Add a node (not yet named by any directory); returns its id.
    pub fn add(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Name `child` as `name` inside directory `dir`.
    pub fn link(&mut self, dir: NodeId, name: &[u8], child: NodeId) -> Result<()> {
        if child >= self.nodes.len() {
            return Err(Error::invalid_argument(format!("no node {child}")));
        }
        match self.nodes.get_mut(dir).map(|n| &mut n.kind) {
            Some(NodeKind::Directory(entries)) => {
                entries.push((name.to_vec(), child));
                Ok(())
            }
            _ => Err(Error::invalid_argument(format!("node {dir} is not a directory"))),
        }
    }

    /// The node `id`.
    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id)
    }

    /// The node `id`, mutable.
    pub fn node_mut(&mut self, id: NodeId) -> Option<&mut Node> {
        self.nodes.get_mut(id)
    }

    /// Number of nodes, named or not.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a tree has a root.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// Where file contents come from: the writer asks for `buf.len()` bytes at `offset` of the
/// file whose token is `content`.
pub trait ContentSource {
    /// Fill `buf` with the bytes at `offset` of the content `content`.
    fn read_content(&mut self, content: u64, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Whether `len` bytes at `offset` of `content` are known to be zeroes without reading
    /// them (a hole). The writer then leaves the range unwritten. Defaults to "unknown".
    fn is_zero(&mut self, content: u64, offset: u64, len: u64) -> Result<bool> {
        let _ = (content, offset, len);
        Ok(false)
    }

    /// The byte ranges (offset, length) of `content`, `size` bytes long, that may hold data;
    /// the rest reads as zeroes and becomes holes in the file (used by
    /// [`crate::writer::Plan::new_sparse`]). `None`, the default, means all of it.
    fn data_ranges(&mut self, content: u64, size: u64) -> Result<Option<Vec<(u64, u64)>>> {
        let _ = (content, size);
        Ok(None)
    }

    /// Where `content` (`size` bytes) already sits in the image being written, when the caller
    /// wrote it there itself: runs of blocks (first logical block, first physical block,
    /// length), ascending and not overlapping. The writer then maps those blocks and copies
    /// nothing; the blocks of unmapped logical ranges are holes. The writer puts its metadata
    /// in blocks no placed run covers, so those must read as zeroes. `None`, the default,
    /// means the writer stores the content itself.
    fn placed(&mut self, content: u64, size: u64) -> Result<Option<Vec<PlacedRun>>> {
        let _ = (content, size);
        Ok(None)
    }
}

/// A run of a file's blocks already written in the image: see [`ContentSource::placed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlacedRun {
    /// First logical block of the file.
    pub logical: u64,
    /// First block of the filesystem holding it.
    pub physical: u64,
    /// Number of blocks.
    pub len: u64,
}
