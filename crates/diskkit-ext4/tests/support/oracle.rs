//! The oracle for reader tests: a whole filesystem tree as `debugfs` (e2fsprogs) reads it,
//! the same tree as diskkit's reader reads it, and a field-by-field comparison (names, types,
//! modes, owners, sizes, link counts, times, symlink targets, device numbers, xattrs, bytes).
//!
//! debugfs runs batched (`-f`): one run lists every directory of a level (`ls -p <ino>`), one
//! runs `stat <ino>` for every inode, one dumps every file and xattr value into a scratch
//! directory.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use diskkit_ext4::read::fs::{FileType, Fs, Inode};
use diskkit_ext4::read::partition::SectorSource;

/// A time as both sides can state it: `full` when debugfs printed the extra field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Time {
    pub secs: i64,
    pub nsec: u32,
    pub full: bool,
}

/// Everything compared about one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub ino: u32,
    pub kind: &'static str,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub links: u32,
    pub atime: Time,
    pub ctime: Time,
    pub mtime: Time,
    pub crtime: Option<Time>,
    pub device: Option<(u32, u32)>,
    pub target: Option<Vec<u8>>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Length and a hash of the contents.
    pub content: Option<(u64, u64)>,
}

/// What went wrong reading one path (debugfs or reader side).
pub type Tree = BTreeMap<Vec<u8>, Result<Node, String>>;

fn kind_of(t: FileType) -> &'static str {
    match t {
        FileType::Regular => "regular",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::CharDevice => "character special",
        FileType::BlockDevice => "block special",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if p.last() != Some(&b'/') {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Limits so that a damaged image cannot make the walk endless.
const MAX_NODES: usize = 200_000;
const MAX_DEPTH: usize = 64;

// ---------------------------------------------------------------------------------------
// debugfs side

fn run_debugfs(img: &Path, cmds: &[String], scratch: &Path) -> Vec<u8> {
    let file = scratch.join("cmds");
    std::fs::write(&file, cmds.join("\n") + "\n").unwrap();
    // Bounded: debugfs can spin on some damaged images.
    let out = Command::new("timeout")
        .args(["120", "debugfs", "-f"])
        .arg(&file)
        .arg(img)
        .output()
        .expect("debugfs must be installed");
    out.stdout
}

/// Split debugfs `-f` output into (command, output) pairs.
fn split_outputs(out: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = Vec::new();
    for line in out.split_inclusive(|&b| b == b'\n') {
        if let Some(cmd) = line.strip_prefix(b"debugfs: ") {
            let cmd = String::from_utf8_lossy(cmd).trim_end().to_owned();
            v.push((cmd, Vec::new()));
        } else if let Some(last) = v.last_mut() {
            last.1.extend_from_slice(line);
        }
    }
    v
}

/// Parse `ls -p` output: (ino, name, is_dir).
fn parse_ls(out: &[u8]) -> Vec<(u32, Vec<u8>, bool)> {
    let mut v = Vec::new();
    let mut rest = out;
    while let Some(start) = rest.iter().position(|&b| b == b'/') {
        rest = &rest[start + 1..];
        let mut fields = Vec::new();
        for _ in 0..4 {
            let Some(i) = rest.iter().position(|&b| b == b'/') else {
                return v;
            };
            fields.push(String::from_utf8_lossy(&rest[..i]).into_owned());
            rest = &rest[i + 1..];
        }
        let Some(i) = rest.iter().position(|&b| b == b'/') else {
            return v;
        };
        let name = rest[..i].to_vec();
        rest = &rest[i + 1..];
        // size field then "/\n", or "/\n" for a directory.
        let Some(i) = rest.iter().position(|&b| b == b'\n') else {
            return v;
        };
        rest = &rest[i + 1..];
        let is_dir = u32::from_str_radix(&fields[1], 8).is_ok_and(|m| m & 0o170000 == 0o040000);
        if let Ok(ino) = fields[0].parse::<u32>() {
            if ino != 0 && name != b"." && name != b".." {
                v.push((ino, name, is_dir));
            }
        }
    }
    v
}

fn num_after(text: &str, key: &str) -> Option<u64> {
    let i = text.find(key)? + key.len();
    text[i..].split_whitespace().next()?.parse().ok()
}

fn time_line(text: &str, key: &str) -> Option<Time> {
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix(key) {
            let v = rest.split_whitespace().next()?;
            let v = v.strip_prefix("0x")?;
            let (base, extra) = match v.split_once(':') {
                Some((b, e)) => (b, Some(e)),
                None => (v, None),
            };
            let base = u32::from_str_radix(base, 16).ok()?;
            let mut secs = i64::from(base as i32);
            let mut nsec = 0;
            let full = extra.is_some();
            if let Some(e) = extra {
                let e = u32::from_str_radix(e, 16).ok()?;
                secs += i64::from(e & 3) << 32;
                nsec = e >> 2;
            }
            return Some(Time { secs, nsec, full });
        }
    }
    None
}

fn parse_stat(ino: u32, text: &str) -> Result<Node, String> {
    let type_start = text.find("Type: ").ok_or("no Type")? + 6;
    let type_end = text[type_start..].find("Mode:").ok_or("no Mode")? + type_start;
    let kind: &'static str = match text[type_start..type_end].trim() {
        "regular" => "regular",
        "directory" => "directory",
        "symlink" => "symlink",
        "character special" => "character special",
        "block special" => "block special",
        "FIFO" => "FIFO",
        "socket" => "socket",
        other => return Err(format!("debugfs type {other:?}")),
    };
    let mode_s = text[type_end + 5..].split_whitespace().next().ok_or("mode")?;
    let mode = u16::from_str_radix(mode_s, 8).map_err(|e| e.to_string())?;
    let device = text
        .lines()
        .find(|l| l.contains("Device major/minor number:"))
        .and_then(|l| {
            let v = l.split("number:").nth(1)?.split_whitespace().next()?;
            let (a, b) = v.split_once(':')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        });
    let fast_target = text.find("Fast link dest: \"").map(|i| {
        let s = &text[i + 17..];
        let end = s.rfind("\"\n").unwrap_or(s.len());
        s.as_bytes()[..end].to_vec()
    });
    Ok(Node {
        ino,
        kind,
        mode,
        uid: num_after(text, "User:").ok_or("uid")? as u32,
        gid: num_after(text, "Group:").ok_or("gid")? as u32,
        size: num_after(text, "Size: ").ok_or("size")?,
        links: num_after(text, "Links:").ok_or("links")? as u32,
        atime: time_line(text, "atime:").ok_or("atime")?,
        ctime: time_line(text, "ctime:").ok_or("ctime")?,
        mtime: time_line(text, "mtime:").ok_or("mtime")?,
        crtime: time_line(text, "crtime:"),
        device,
        target: fast_target,
        xattrs: BTreeMap::new(),
        content: None,
    })
}

/// Attribute names listed in `stat` output.
fn xattr_names(text: &str) -> Vec<String> {
    let Some(i) = text.find("Extended attributes:\n") else {
        return Vec::new();
    };
    let mut v = Vec::new();
    for line in text[i..].lines().skip(1) {
        let Some(rest) = line.strip_prefix("  ") else {
            break;
        };
        let Some(p) = rest.find(" (") else { break };
        v.push(rest[..p].to_owned());
    }
    v
}

/// An attribute name as debugfs printed it: text, or hex bytes when mostly unprintable.
fn decode_name(printed: &str) -> Vec<u8> {
    let parts: Vec<&str> = printed.split(' ').filter(|p| !p.is_empty()).collect();
    let hex = parts.len() > 1
        && parts
            .iter()
            .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok());
    if hex {
        parts.iter().map(|p| u8::from_str_radix(p, 16).unwrap()).collect()
    } else {
        printed.as_bytes().to_vec()
    }
}

/// The tree as debugfs reads it.
pub fn debugfs_tree(img: &Path) -> Tree {
    let scratch = tempfile::tempdir().unwrap();
    let s = scratch.path();
    let mut paths: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
    let mut level: Vec<(Vec<u8>, u32)> = vec![(b"/".to_vec(), 2)];
    let mut seen_dirs = BTreeSet::from([2u32]);
    let mut depth = 0;
    paths.insert(b"/".to_vec(), 2);
    // Directory inodes are only known after stat; list each inode that `ls -p` reports as a
    // directory (mode 04xxxx) by listing every entry's mode.
    while !level.is_empty() && depth < MAX_DEPTH && paths.len() < MAX_NODES {
        depth += 1;
        let cmds: Vec<String> = level.iter().map(|(_, ino)| format!("ls -p <{ino}>")).collect();
        let out = run_debugfs(img, &cmds, s);
        let by_cmd: BTreeMap<String, Vec<u8>> = split_outputs(&out).into_iter().collect();
        let mut next = Vec::new();
        for (dir, ino) in &level {
            let Some(o) = by_cmd.get(&format!("ls -p <{ino}>")) else {
                continue;
            };
            for (child, name, is_dir) in parse_ls(o) {
                let p = join(dir, &name);
                paths.insert(p.clone(), child);
                if is_dir && seen_dirs.insert(child) {
                    next.push((p, child));
                }
            }
        }
        level = next;
    }
    // stat every inode
    let inos: BTreeSet<u32> = paths.values().copied().collect();
    let cmds: Vec<String> = inos.iter().map(|i| format!("stat <{i}>")).collect();
    let out = run_debugfs(img, &cmds, s);
    let stats: BTreeMap<String, Vec<u8>> = split_outputs(&out).into_iter().collect();
    let mut nodes: BTreeMap<u32, Result<Node, String>> = BTreeMap::new();
    let mut dumps = Vec::new();
    for &ino in &inos {
        let text = stats
            .get(&format!("stat <{ino}>"))
            .map(|t| String::from_utf8_lossy(t).into_owned())
            .unwrap_or_default();
        let node = parse_stat(ino, &text);
        if let Ok(n) = &node {
            if n.kind == "regular" || (n.kind == "symlink" && n.target.is_none()) {
                dumps.push(format!("dump <{ino}> {}/c{ino}", s.display()));
            }
            for (k, name) in xattr_names(&text).into_iter().enumerate() {
                if name != "system.data" {
                    let raw = decode_name(&name);
                    dumps.push(format!(
                        "ea_get -f {}/x{ino}_{k} <{ino}> {}",
                        s.display(),
                        String::from_utf8_lossy(&raw)
                    ));
                }
            }
        }
        nodes.insert(ino, node);
    }
    run_debugfs(img, &dumps, s);
    for (&ino, node) in nodes.iter_mut() {
        let Ok(n) = node else { continue };
        let text = stats
            .get(&format!("stat <{ino}>"))
            .map(|t| String::from_utf8_lossy(t).into_owned())
            .unwrap_or_default();
        for (k, name) in xattr_names(&text).into_iter().enumerate() {
            if name == "system.data" {
                continue;
            }
            match std::fs::read(s.join(format!("x{ino}_{k}"))) {
                Ok(v) => {
                    n.xattrs.insert(decode_name(&name), v);
                }
                Err(_) => {
                    *node = Err(format!("debugfs could not read xattr {name}"));
                    break;
                }
            }
        }
        let Ok(n) = node else { continue };
        if n.kind == "regular" || (n.kind == "symlink" && n.target.is_none()) {
            let dumped = if n.kind == "symlink" {
                std::fs::read(s.join(format!("c{ino}")))
            } else {
                Err(std::io::Error::other("stream it"))
            };
            match dumped {
                Ok(c) if c.len() as u64 == n.size && n.kind == "symlink" => n.target = Some(c),
                Ok(c) => *node = Err(format!("debugfs dumped {} of {} bytes", c.len(), n.size)),
                Err(_) => {
                    let f = std::fs::File::open(s.join(format!("c{ino}")));
                    // debugfs 1.47.0 dumps a whole inline-data area (60 bytes and more) rather
                    // than i_size bytes: the rest must be zeroes, and is left out.
                    let inline = flags(&stats, ino) & 0x1000_0000 != 0;
                    match f.map(|f| hash_stream(f, if inline { n.size } else { u64::MAX })) {
                        Ok(Ok(h)) if h.0 == n.size => n.content = Some(h),
                        Ok(Ok(h)) => *node = Err(format!("debugfs dumped {} of {} bytes", h.0, n.size)),
                        _ => *node = Err("debugfs could not dump it".into()),
                    }
                }
            }
        }
    }
    paths
        .into_iter()
        .map(|(p, ino)| {
            (
                p,
                nodes.get(&ino).cloned().unwrap_or_else(|| Err("no stat".into())),
            )
        })
        .collect()
}

/// FNV-1a over 8-byte words: fast enough for gigabytes of zeroes, and only ever compared
/// between two readings of the same bytes.
#[derive(Default)]
pub struct Hasher {
    h: u64,
    tail: Vec<u8>,
}

impl Hasher {
    pub fn update(&mut self, mut data: &[u8]) {
        if !self.tail.is_empty() {
            let need = 8 - self.tail.len();
            let take = need.min(data.len());
            self.tail.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.tail.len() == 8 {
                let w = u64::from_le_bytes(self.tail[..].try_into().unwrap());
                self.word(w);
                self.tail.clear();
            }
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().unwrap()));
        }
        self.tail.extend_from_slice(chunks.remainder());
    }

    fn word(&mut self, w: u64) {
        self.h = (self.h ^ w).wrapping_mul(0x0100_0000_01b3).rotate_left(5) ^ 0xcbf2_9ce4_8422_2325;
    }

    pub fn finish(&self) -> u64 {
        let mut h = self.h;
        for &b in &self.tail {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        h
    }
}

/// Length and hash of a dumped file, up to `limit` bytes (past it, only zeroes may follow).
fn hash_stream(mut f: std::fs::File, limit: u64) -> std::io::Result<(u64, u64)> {
    use std::io::Read;
    let mut h = Hasher::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((total, h.finish()));
        }
        let keep = (limit.saturating_sub(total)).min(n as u64) as usize;
        if buf[keep..n].iter().any(|&b| b != 0) {
            return Ok((total + n as u64, 0));
        }
        h.update(&buf[..keep]);
        total += keep as u64;
    }
}

/// `Flags:` of an inode's `stat` output.
fn flags(stats: &BTreeMap<String, Vec<u8>>, ino: u32) -> u32 {
    stats
        .get(&format!("stat <{ino}>"))
        .and_then(|t| {
            let t = String::from_utf8_lossy(t);
            let v = t.split("Flags: 0x").nth(1)?.split_whitespace().next()?.to_owned();
            u32::from_str_radix(&v, 16).ok()
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// reader side

fn t(ts: diskkit_ext4::read::fs::Timestamp) -> Time {
    Time {
        secs: ts.secs,
        nsec: ts.nsec,
        full: true,
    }
}

/// An error and its causes, `: `-joined.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn read_node(fs: &Fs, inode: &Inode) -> Result<Node, String> {
    let e = |e: diskkit::Error| chain(&e);
    let mut xattrs = BTreeMap::new();
    for x in fs.xattrs(inode).map_err(e)? {
        xattrs.insert(x.name, x.value);
    }
    let target = if inode.file_type() == FileType::Symlink {
        Some(fs.read_link(inode).map_err(e)?)
    } else {
        None
    };
    let content = if inode.file_type() == FileType::Regular {
        let mut r = fs.open_file(inode).map_err(e)?;
        let mut h = Hasher::default();
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0u64;
        while pos < inode.size() {
            let n = r.read_at(pos, &mut buf).map_err(e)?;
            if n == 0 {
                return Err(format!("read {pos} of {} bytes", inode.size()));
            }
            h.update(&buf[..n]);
            pos += n as u64;
        }
        Some((pos, h.finish()))
    } else {
        None
    };
    Ok(Node {
        ino: inode.ino(),
        kind: kind_of(inode.file_type()),
        mode: inode.mode(),
        uid: inode.uid(),
        gid: inode.gid(),
        size: inode.size(),
        links: u32::from(inode.links()),
        atime: t(inode.atime()),
        ctime: t(inode.ctime()),
        mtime: t(inode.mtime()),
        crtime: inode.crtime().map(t),
        device: inode.device(),
        target,
        xattrs,
        content,
    })
}

/// A file as a byte source.
pub struct FileSource(pub std::fs::File, pub u64);

impl SectorSource for FileSource {
    fn size(&self) -> u64 {
        self.1
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> diskkit::Result<()> {
        use std::os::unix::fs::FileExt;
        self.0.read_exact_at(buf, offset).map_err(diskkit::Error::io)
    }
}

/// Open a raw image file with the reader.
pub fn open(img: &Path) -> diskkit::Result<Fs> {
    let f = std::fs::File::open(img).map_err(diskkit::Error::io)?;
    let len = f.metadata().map_err(diskkit::Error::io)?.len();
    Fs::open(Arc::new(FileSource(f, len)))
}

/// The tree as diskkit's reader reads it. `Err` for the whole image when it cannot be opened.
pub fn reader_tree(img: &Path) -> Result<Tree, String> {
    let fs = open(img).map_err(|e| chain(&e))?;
    let mut out = Tree::new();
    let root = fs.inode(2).map_err(|e| chain(&e))?;
    out.insert(b"/".to_vec(), read_node(&fs, &root));
    let mut level = vec![(b"/".to_vec(), root)];
    let mut seen = BTreeSet::from([2u32]);
    let mut depth = 0;
    while !level.is_empty() && depth < MAX_DEPTH && out.len() < MAX_NODES {
        depth += 1;
        let mut next = Vec::new();
        for (dir, inode) in level {
            let entries = match fs.read_dir(&inode) {
                Ok(e) => e,
                Err(e) => {
                    out.insert(join(&dir, b"<listing>"), Err(chain(&e)));
                    continue;
                }
            };
            for ent in entries {
                let p = join(&dir, &ent.name);
                match fs.inode(ent.ino) {
                    Ok(child) => {
                        out.insert(p.clone(), read_node(&fs, &child));
                        if child.file_type() == FileType::Directory && seen.insert(ent.ino) {
                            next.push((p, child));
                        }
                    }
                    Err(e) => {
                        out.insert(p, Err(chain(&e)));
                    }
                }
            }
        }
        level = next;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// comparison

/// ACL values as debugfs gives them (ids of the owner/group/mask/other entries 0, where the
/// kernel and diskkit give !0).
fn acl_as_debugfs(name: &[u8], v: &[u8]) -> Vec<u8> {
    if name != b"system.posix_acl_access" && name != b"system.posix_acl_default" {
        return v.to_vec();
    }
    let mut out = v.to_vec();
    let mut i = 4;
    while i + 8 <= out.len() {
        let tag = u16::from_le_bytes([out[i], out[i + 1]]);
        if matches!(tag, 0x01 | 0x04 | 0x10 | 0x20) {
            out[i + 4..i + 8].fill(0);
        }
        i += 8;
    }
    out
}

fn same_time(ours: Time, theirs: Time) -> bool {
    if theirs.full {
        ours.secs == theirs.secs && ours.nsec == theirs.nsec
    } else {
        (ours.secs as u32) == (theirs.secs as u32)
    }
}

/// Differences between the reader's node and debugfs's (empty when equal).
pub fn diff_node(ours: &Node, theirs: &Node) -> Vec<String> {
    let mut d = Vec::new();
    macro_rules! cmp {
        ($f:ident) => {
            if ours.$f != theirs.$f {
                d.push(format!(
                    "{}: ours {:?}, debugfs {:?}",
                    stringify!($f),
                    ours.$f,
                    theirs.$f
                ));
            }
        };
    }
    cmp!(ino);
    cmp!(kind);
    cmp!(mode);
    cmp!(uid);
    cmp!(gid);
    cmp!(size);
    cmp!(links);
    cmp!(device);
    for (name, a, b) in [
        ("atime", ours.atime, theirs.atime),
        ("ctime", ours.ctime, theirs.ctime),
        ("mtime", ours.mtime, theirs.mtime),
    ] {
        if !same_time(a, b) {
            d.push(format!("{name}: ours {a:?}, debugfs {b:?}"));
        }
    }
    if let Some(b) = theirs.crtime {
        match ours.crtime {
            Some(a) if same_time(a, b) => {}
            a => d.push(format!("crtime: ours {a:?}, debugfs {b:?}")),
        }
    }
    if ours.target != theirs.target {
        d.push(format!(
            "target: ours {:?}, debugfs {:?}",
            ours.target.as_deref().map(String::from_utf8_lossy),
            theirs.target.as_deref().map(String::from_utf8_lossy)
        ));
    }
    let ours_x: BTreeMap<Vec<u8>, Vec<u8>> = ours
        .xattrs
        .iter()
        .map(|(k, v)| (k.clone(), acl_as_debugfs(k, v)))
        .collect();
    if ours_x != theirs.xattrs {
        d.push(format!(
            "xattrs: ours {:?}, debugfs {:?}",
            ours_x
                .keys()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect::<Vec<_>>(),
            theirs
                .xattrs
                .keys()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect::<Vec<_>>()
        ));
    }
    if ours.content != theirs.content {
        d.push(format!(
            "content differs: ours {:?}, debugfs {:?} (length, hash)",
            ours.content, theirs.content
        ));
    }
    d
}

/// The outcome of comparing one image.
#[derive(Debug, Default)]
pub struct Comparison {
    /// Paths whose every field matched.
    pub matched: usize,
    /// Paths where both sides read something different.
    pub mismatches: Vec<String>,
    /// Paths debugfs read that the reader refused (with its message).
    pub reader_errors: Vec<String>,
    /// Paths one side listed and the other did not.
    pub missing: Vec<String>,
}

impl Comparison {
    pub fn is_exact(&self) -> bool {
        self.mismatches.is_empty() && self.reader_errors.is_empty() && self.missing.is_empty()
    }

    pub fn summary(&self) -> String {
        let mut s = format!("{} paths matched", self.matched);
        for (what, v) in [
            ("mismatch", &self.mismatches),
            ("reader error", &self.reader_errors),
            ("missing", &self.missing),
        ] {
            for m in v.iter().take(8) {
                s.push_str(&format!("\n  {what}: {m}"));
            }
            if v.len() > 8 {
                s.push_str(&format!("\n  ... {} more {what}s", v.len() - 8));
            }
        }
        s
    }
}

/// Compare the reader on `ours_img` with debugfs on `theirs_img` (the same image after a
/// journal replay by e2fsck, or the same file).
pub fn compare(ours: &Tree, theirs: &Tree) -> Comparison {
    let mut c = Comparison::default();
    for (p, t) in theirs {
        let ps = String::from_utf8_lossy(p);
        match (ours.get(p), t) {
            (None, _) => c.missing.push(format!("{ps}: listed by debugfs only")),
            (Some(Ok(o)), Ok(t)) => {
                let d = diff_node(o, t);
                if d.is_empty() {
                    c.matched += 1;
                } else {
                    c.mismatches.push(format!("{ps}: {}", d.join("; ")));
                }
            }
            (Some(Err(e)), Ok(_)) => c.reader_errors.push(format!("{ps}: {e}")),
            (Some(_), Err(_)) => {}
        }
    }
    for (p, o) in ours {
        if !theirs.contains_key(p) && !p.ends_with(b"<listing>") {
            let _ = o;
            c.missing.push(format!(
                "{}: listed by the reader only",
                String::from_utf8_lossy(p)
            ));
        }
    }
    for (p, o) in ours {
        if p.ends_with(b"<listing>") {
            if let Err(e) = o {
                c.reader_errors
                    .push(format!("{}: {e}", String::from_utf8_lossy(p)));
            }
        }
    }
    c
}
