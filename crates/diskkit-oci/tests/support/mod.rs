//! Whole-tree comparison for the unpack tests: one record per path, read three independent
//! ways — from a real directory (the reference merge, e.g. `umoci unpack` run as root), from
//! our image through `debugfs` (batched with `-f`), and from our image through diskkit's own
//! ext4 reader (`diskkit_ext4::read::fs`).
//! At the end: the semantic fixture layers, unpacking, and the simpler listings (mode, size,
//! content hash per path) the unpack tests compare.
#![allow(dead_code)] // each test binary uses its own part

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use diskkit_oci::{unpack, NoProgress, UnpackOptions};

/// What one path is. Directory sizes are 0 (they depend on the writer).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Rec {
    /// `d`, `f`, `l`, `c`, `b`, `p`.
    pub(crate) kind: char,
    /// Permission bits with setuid/setgid/sticky (`mode & 0o7777`).
    pub(crate) perm: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) size: u64,
    /// sha256 of a regular file's content.
    pub(crate) sha: String,
    /// Symlink target.
    pub(crate) target: String,
    pub(crate) nlink: u64,
    /// Device major and minor.
    pub(crate) rdev: (u32, u32),
    /// xattr name -> hex value, without `system.*` (ACLs are stored in ext4's own format,
    /// which debugfs shows raw; `kernel_mount_matches_umoci` checks them).
    pub(crate) xattrs: BTreeMap<String, String>,
}

/// Relative path -> record; `lost+found` and the root itself are left out.
pub(crate) type Tree = BTreeMap<String, Rec>;

pub(crate) fn sha(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn kind_of(mode: u32) -> char {
    match mode & 0o170000 {
        0o040000 => 'd',
        0o100000 => 'f',
        0o120000 => 'l',
        0o020000 => 'c',
        0o060000 => 'b',
        0o010000 => 'p',
        0o140000 => 's',
        _ => '?',
    }
}

/// The listing format the older tests use: path -> (octal mode, size, sha256).
pub(crate) fn brief(t: &Tree) -> BTreeMap<String, (String, u64, String)> {
    t.iter()
        .map(|(k, r)| {
            let ty = match r.kind {
                'd' => 0o040000,
                'f' => 0o100000,
                'l' => 0o120000,
                'c' => 0o020000,
                'b' => 0o060000,
                'p' => 0o010000,
                _ => 0,
            };
            (k.clone(), (format!("{:06o}", ty | r.perm), r.size, r.sha.clone()))
        })
        .collect()
}

/// Assert two trees are equal, naming the first paths that differ.
pub(crate) fn assert_same(what: &str, ours: &Tree, expected: &Tree) {
    let mut diffs = Vec::new();
    for (k, v) in expected {
        match ours.get(k) {
            None => diffs.push(format!("missing in ours: {k} {v:?}")),
            Some(o) if o != v => diffs.push(format!("{k}:\n  ours     {o:?}\n  expected {v:?}")),
            _ => {}
        }
    }
    for k in ours.keys().filter(|k| !expected.contains_key(*k)) {
        diffs.push(format!("extra in ours: {k} {:?}", ours[k]));
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences, first ones:\n{}",
        diffs.len(),
        diffs[..diffs.len().min(20)].join("\n")
    );
}

/// Every path of a real directory tree, with its xattrs (`getxattr` on the link itself).
pub(crate) fn host_tree(root: &Path) -> Tree {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = Tree::new();
    walk_host(root, |rel, p, md| {
        let ft = md.file_type();
        let mut r = Rec {
            kind: kind_of(md.mode()),
            perm: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: md.size(),
            nlink: md.nlink(),
            xattrs: host_xattrs(p),
            ..Rec::default()
        };
        if ft.is_dir() {
            r.size = 0;
        } else if ft.is_file() {
            r.sha = sha(&std::fs::read(p).unwrap());
        } else if ft.is_symlink() {
            r.target = std::fs::read_link(p).unwrap().to_string_lossy().into_owned();
        } else if ft.is_char_device() || ft.is_block_device() {
            let dev = md.rdev();
            r.rdev = (rustix::fs::major(dev), rustix::fs::minor(dev));
        }
        out.insert(rel, r);
    });
    out
}

/// Call `f` with (relative path, path, metadata) for every path of a real directory tree,
/// `lost+found` left out; symlinks are not followed.
fn walk_host(root: &Path, mut f: impl FnMut(String, &Path, &std::fs::Metadata)) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == "lost+found" {
                continue;
            }
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p.clone());
            }
            f(rel, &p, &md);
        }
    }
}

fn host_xattrs(p: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 64 << 10];
    let n = rustix::fs::llistxattr(p, &mut names[..]).unwrap_or(0);
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        if name.starts_with("system.") {
            continue;
        }
        let mut value = vec![0u8; 64 << 10];
        let len = rustix::fs::lgetxattr(p, name.as_str(), &mut value[..])
            .unwrap_or_else(|e| panic!("getxattr {} {name}: {e}", p.display()));
        out.insert(name, hex(&value[..len]));
    }
    out
}

/// The image read through diskkit's ext4 reader: every field debugfs shows.
pub(crate) fn view_tree(img: &Path) -> Tree {
    view_walk(img, true)
}

/// [`view_tree`] without reading file contents (for files too big to hash in a test).
pub(crate) fn view_tree_shallow(img: &Path) -> Tree {
    view_walk(img, false)
}

fn open_view(img: &Path) -> diskkit_ext4::read::fs::Fs {
    let data = std::fs::File::open(img).unwrap();
    let len = data.metadata().unwrap().len();
    diskkit_ext4::read::fs::Fs::open(std::sync::Arc::new(FileBytes(data, len)))
        .unwrap_or_else(|e| panic!("the ext4 reader cannot open {}: {e}", img.display()))
}

/// A file as the reader's byte source.
struct FileBytes(std::fs::File, u64);

impl diskkit_ext4::read::partition::SectorSource for FileBytes {
    fn size(&self) -> u64 {
        self.1
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> diskkit::Result<()> {
        use std::os::unix::fs::FileExt;
        self.0.read_exact_at(buf, offset).map_err(diskkit::Error::io)
    }
}

/// `len` bytes of `path` at `offset`, read through the reader.
pub(crate) fn view_read_at(img: &Path, path: &str, offset: u64, len: usize) -> Vec<u8> {
    let fs = open_view(img);
    let r = fs.lookup_path(path.as_bytes(), true).unwrap().found().unwrap();
    let mut f = fs.open_file(&r.inode).unwrap();
    let mut out = vec![0u8; len];
    let n = f.read_at(offset, &mut out).unwrap();
    assert_eq!(n, len, "{path}: short read at {offset}");
    out
}

fn view_walk(img: &Path, contents: bool) -> Tree {
    use diskkit_ext4::read::fs::FileType;
    let fs = open_view(img);
    let mut out = Tree::new();
    let root = fs.inode(2).unwrap();
    let mut stack = vec![(String::new(), root)];
    while let Some((d, dir)) = stack.pop() {
        for e in fs.read_dir(&dir).unwrap() {
            let name = String::from_utf8_lossy(&e.name).into_owned();
            if d.is_empty() && name == "lost+found" {
                continue;
            }
            let rel = if d.is_empty() { name } else { format!("{d}/{name}") };
            let md = fs
                .inode(e.ino)
                .unwrap_or_else(|err| panic!("reader: {rel}: {err}"));
            let ft = md.file_type();
            let mut r = Rec {
                kind: match ft {
                    FileType::Directory => 'd',
                    FileType::Regular => 'f',
                    FileType::Symlink => 'l',
                    FileType::CharDevice => 'c',
                    FileType::BlockDevice => 'b',
                    FileType::Fifo => 'p',
                    FileType::Socket => 's',
                },
                perm: u32::from(md.mode()),
                uid: md.uid(),
                gid: md.gid(),
                size: md.size(),
                nlink: u64::from(md.links()),
                rdev: md.device().unwrap_or((0, 0)),
                ..Rec::default()
            };
            if let Some(t) = e.file_type {
                assert_eq!(ft, t, "{rel}: dirent type vs inode");
            }
            for x in fs
                .xattrs(&md)
                .unwrap_or_else(|err| panic!("reader: {rel}: {err}"))
            {
                let n = String::from_utf8_lossy(&x.name).into_owned();
                if !n.starts_with("system.") {
                    r.xattrs.insert(n, hex(&x.value));
                }
            }
            match ft {
                FileType::Directory => {
                    r.size = 0;
                    stack.push((rel.clone(), md));
                }
                FileType::Regular if contents => {
                    let mut data = vec![0u8; md.size() as usize];
                    let n = fs.open_file(&md).unwrap().read_at(0, &mut data).unwrap();
                    assert_eq!(n as u64, md.size(), "{rel}");
                    r.sha = sha(&data);
                }
                FileType::Symlink => {
                    r.target = String::from_utf8_lossy(&fs.read_link(&md).unwrap()).into_owned();
                }
                _ => {}
            }
            out.insert(rel, r);
        }
    }
    out
}

/// Run `debugfs -f` with `cmds` on `img`; the output of each command, in order.
fn debugfs_batch(img: &Path, cmds: &[String]) -> Vec<String> {
    if cmds.is_empty() {
        return Vec::new();
    }
    let mut f = tempfile::NamedTempFile::new().unwrap();
    for c in cmds {
        writeln!(f, "{c}").unwrap();
    }
    f.flush().unwrap();
    let out = Command::new("debugfs")
        .arg("-f")
        .arg(f.path())
        .arg(img)
        .output()
        .expect("debugfs (e2fsprogs) must be installed");
    assert!(out.status.success(), "debugfs -f failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut parts: Vec<String> = Vec::new();
    for line in text.split_inclusive('\n') {
        if line.starts_with("debugfs: ") {
            parts.push(String::new());
        } else if let Some(p) = parts.last_mut() {
            p.push_str(line);
        }
    }
    assert_eq!(parts.len(), cmds.len(), "debugfs output: {text}");
    parts
}

fn quoted(path: &str) -> String {
    assert!(!path.contains('"'), "{path}: no quotes in fixture paths");
    format!("\"/{path}\"")
}

/// The image read through debugfs: `ls -p` per directory, then `stat`, `ea_list` and
/// (regular files, long symlinks) `dump` per path, all batched.
pub(crate) fn debugfs_tree(img: &Path) -> Tree {
    debugfs_tree_inodes(img).0
}

/// [`debugfs_tree`], and the inode number of every path.
pub(crate) fn debugfs_tree_inodes(img: &Path) -> (Tree, Inodes) {
    let mut out = Tree::new();
    let mut inodes = Inodes::new();
    let mut level = vec![String::new()];
    while !level.is_empty() {
        let cmds: Vec<String> = level.iter().map(|d| format!("ls -p {}", quoted(d))).collect();
        let mut next = Vec::new();
        for (d, ls) in level.iter().zip(debugfs_batch(img, &cmds)) {
            for line in ls.lines() {
                // /ino/mode/uid/gid/name/size/
                let f: Vec<&str> = line.split('/').collect();
                if f.len() < 7 || f[5] == "." || f[5] == ".." {
                    continue;
                }
                if d.is_empty() && f[5] == "lost+found" {
                    continue;
                }
                let path = if d.is_empty() {
                    f[5].to_owned()
                } else {
                    format!("{d}/{}", f[5])
                };
                let mode = u32::from_str_radix(f[2], 8).unwrap();
                let r = Rec {
                    kind: kind_of(mode),
                    perm: mode & 0o7777,
                    uid: f[3].parse().unwrap(),
                    gid: f[4].parse().unwrap(),
                    size: if kind_of(mode) == 'd' {
                        0
                    } else {
                        f[6].parse().unwrap()
                    },
                    ..Rec::default()
                };
                if r.kind == 'd' {
                    next.push(path.clone());
                }
                inodes.insert(path.clone(), f[1].parse().unwrap());
                out.insert(path, r);
            }
        }
        level = next;
    }
    let dumps = tempfile::tempdir().unwrap();
    let paths: Vec<String> = out.keys().cloned().collect();
    let mut cmds = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        cmds.push(format!("stat {}", quoted(p)));
        cmds.push(format!("ea_list {}", quoted(p)));
        let r = &out[p];
        if r.kind == 'f' || (r.kind == 'l' && r.size >= 60) {
            cmds.push(format!("dump {} {}/{i}", quoted(p), dumps.path().display()));
        }
    }
    let mut results = debugfs_batch(img, &cmds).into_iter();
    let mut long_values = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let st = results.next().unwrap();
        let ea = results.next().unwrap();
        let r = out.get_mut(p).unwrap();
        r.nlink = field(&st, "Links: ").unwrap_or_else(|| panic!("{p}: {st}"));
        if let Some(pos) = st.find("Device major/minor number: ") {
            let v = &st[pos + 27..];
            let v = v.split_whitespace().next().unwrap();
            let (ma, mi) = v.split_once(':').unwrap();
            r.rdev = (ma.parse().unwrap(), mi.parse().unwrap());
        }
        for (name, value) in parse_ea_list(&ea) {
            match value {
                Some(v) => {
                    r.xattrs.insert(name, v);
                }
                None => long_values.push((p.clone(), name)),
            }
        }
        if r.kind == 'f' || (r.kind == 'l' && r.size >= 60) {
            results.next().unwrap();
            let data = std::fs::read(dumps.path().join(i.to_string())).unwrap_or_default();
            if r.kind == 'f' {
                r.sha = sha(&data);
            } else {
                r.target = String::from_utf8_lossy(&data[..(r.size as usize).min(data.len())]).into_owned();
            }
        } else if r.kind == 'l' {
            let pos = st
                .find("Fast link dest: \"")
                .unwrap_or_else(|| panic!("{p}: {st}"));
            let v = &st[pos + 17..];
            r.target = v[..v.rfind('"').unwrap()].to_owned();
        }
    }
    let cmds: Vec<String> = long_values
        .iter()
        .enumerate()
        .map(|(i, (p, name))| format!("ea_get -f {}/ea{i} {} {name}", dumps.path().display(), quoted(p)))
        .collect();
    debugfs_batch(img, &cmds);
    for (i, (p, name)) in long_values.into_iter().enumerate() {
        let v = std::fs::read(dumps.path().join(format!("ea{i}"))).unwrap();
        out.get_mut(&p).unwrap().xattrs.insert(name, hex(&v));
    }
    (out, inodes)
}

/// Relative path -> inode number.
pub(crate) type Inodes = BTreeMap<String, u64>;

/// The inode number of every path of a real directory tree (`lost+found` left out).
pub(crate) fn host_inodes(root: &Path) -> Inodes {
    use std::os::unix::fs::MetadataExt;
    let mut out = Inodes::new();
    walk_host(root, |rel, _, md| {
        out.insert(rel, md.ino());
    });
    out
}

/// Which names share an inode, whatever its number: every path whose inode has more than one
/// name -> all those names, sorted.
pub(crate) fn link_groups(inodes: &Inodes) -> BTreeMap<String, Vec<String>> {
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (p, ino) in inodes {
        by_ino.entry(*ino).or_default().push(p.clone());
    }
    let mut out = BTreeMap::new();
    for names in by_ino.into_values().filter(|n| n.len() > 1) {
        for p in &names {
            out.insert(p.clone(), names.clone());
        }
    }
    out
}

fn field(text: &str, key: &str) -> Option<u64> {
    let pos = text.find(key)?;
    text[pos + key.len()..].split_whitespace().next()?.parse().ok()
}

/// `ea_list` output: `name (len) = "text"` or `name (len) = 01 02 ...`, one per line (the
/// value may continue on following lines).
/// Values debugfs does not print (long ones) come back as `None`.
fn parse_ea_list(text: &str) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    let body = text.trim_start_matches("Extended attributes:").trim();
    let mut entries: Vec<String> = Vec::new();
    for line in body.lines() {
        let l = line.trim();
        let starts_entry = l
            .split_once(" (")
            .is_some_and(|(n, rest)| !n.contains(' ') && rest.contains(") = ") || rest.ends_with(')'));
        if starts_entry || entries.is_empty() {
            entries.push(l.to_owned());
        } else if let Some(last) = entries.last_mut() {
            last.push('\n');
            last.push_str(l);
        }
    }
    for e in entries.iter().filter(|e| !e.is_empty()) {
        let (name, rest) = e.split_once(" (").unwrap();
        let (len, value) = rest.split_once(')').unwrap();
        let len: usize = len.parse().unwrap();
        let value = value.trim_start_matches(" = ").trim();
        if name.starts_with("system.") {
            continue;
        }
        let bytes = if len == 0 {
            Vec::new()
        } else if value.is_empty() {
            out.insert(name.to_owned(), None);
            continue;
        } else if value.starts_with('"') && value.ends_with('"') {
            unescape(&value[1..value.len() - 1])
        } else {
            value
                .split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).unwrap())
                .collect()
        };
        assert_eq!(bytes.len(), len, "{name}: {e}");
        out.insert(name.to_owned(), Some(hex(&bytes)));
    }
    out
}

/// debugfs prints printable values in quotes with C-style octal escapes.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap());
            i += 4;
        } else if b[i] == b'\\' && i + 1 < b.len() {
            out.push(b[i + 1]);
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Everything our image holds, read through both debugfs and diskkit's reader, must equal
/// the reference tree.
pub(crate) fn check_image(what: &str, img: &Path, expected: &Tree) {
    let by_debugfs = debugfs_tree(img);
    assert_same(&format!("{what} (debugfs)"), &by_debugfs, expected);
    check_view(what, img, expected);
}

/// The reader half of [`check_image`].
pub(crate) fn check_view(what: &str, img: &Path, expected: &Tree) {
    let by_view = view_tree(img);
    assert_same(&format!("{what} (diskkit reader)"), &by_view, expected);
}

/// Run `cmd`, which must succeed; its stdout.
pub(crate) fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} must be installed: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An OCI layout at `out` tagged `tag` from the given layer files (`mkoci-layout.sh`).
pub(crate) fn layout(out: &Path, tag: &str, layers: &[&Path]) {
    run(Command::new("bash").arg(mkoci()).arg(out).arg(tag).args(layers));
}

/// A one-layer layout at `out` (tag `v1`) of `src/name` tarred by GNU tar with `--sparse` in
/// PAX format.
pub(crate) fn sparse_layout(src: &Path, name: &str, out: &Path) {
    let tar = out.with_extension("tar");
    run(Command::new("tar")
        .args(["--sparse", "--format=pax", "-C"])
        .arg(src)
        .arg("-cf")
        .arg(&tar)
        .arg(name));
    layout(out, "v1", &[&tar]);
}

/// [`layout`] done in-process for uncompressed tar files, each stored gzip-compressed: what
/// `mkoci-layout.sh` writes, without its dozens of processes per layer (the random-layer
/// tests write hundreds of layouts).
pub(crate) fn layout_gz(out: &Path, tag: &str, tars: &[&Path]) {
    use std::fmt::Write as _;
    let blobs = out.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let digest = sha(data);
        std::fs::write(blobs.join(&digest), data).unwrap();
        (format!("sha256:{digest}"), data.len())
    };
    let (mut layers, mut diff_ids) = (String::new(), String::new());
    for (i, tar) in tars.iter().enumerate() {
        let raw = std::fs::read(tar).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        let (digest, size) = put(&gz.finish().unwrap());
        let sep = if i == 0 { "" } else { "," };
        write!(
            layers,
            r#"{sep}{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{digest}","size":{size}}}"#
        )
        .unwrap();
        write!(diff_ids, r#"{sep}"sha256:{}""#, sha(&raw)).unwrap();
    }
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":[{diff_ids}]}}}}"#
    );
    let (cd, cs) = put(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{cs}}},"layers":[{layers}]}}"#
    );
    let (md, ms) = put(manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{md}","size":{ms},"annotations":{{"org.opencontainers.image.ref.name":"{tag}"}}}}]}}"#
    );
    std::fs::write(out.join("index.json"), index).unwrap();
    std::fs::write(out.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// The reference merge: `umoci unpack` as root (exact owners, devices and xattrs); the
/// rootfs directory, or umoci's error.
pub(crate) fn umoci_unpack(lay: &Path, tag: &str, bundle: &Path) -> Result<std::path::PathBuf, String> {
    let out = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", lay.display()))
        .arg(bundle)
        .output()
        .expect("umoci must be installed");
    if out.status.success() {
        Ok(bundle.join("rootfs"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `e2fsck -fn` must find nothing.
pub(crate) fn e2fsck(img: &Path) {
    run(Command::new("e2fsck").arg("-fn").arg(img));
}

/// Loop-mount `img` at `mnt` with `options`. Returns false (the caller skips its kernel part)
/// only where this machine cannot loop-mount at all; a filesystem the kernel refuses fails.
pub(crate) fn mount(img: &Path, mnt: &Path, options: &str) -> bool {
    let out = Command::new("mount")
        .args(["-o", options, "-t", "ext4"])
        .arg(img)
        .arg(mnt)
        .output()
        .expect("mount must be installed");
    if out.status.success() {
        return true;
    }
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    let environment = [
        "permission denied",
        "only root",
        "must be superuser",
        "not permitted",
        "loop device",
    ];
    assert!(
        environment.iter().any(|e| err.contains(e)),
        "the kernel refused the image: {err}\n{}",
        String::from_utf8_lossy(
            &Command::new("dmesg")
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default()
        )
        .lines()
        .rev()
        .take(5)
        .collect::<Vec<_>>()
        .join("\n")
    );
    eprintln!("SKIPPED kernel check: cannot loop-mount here: {err}");
    false
}

// The semantic fixture (`fixtures/make_layers.py`), unpacking, and listings through debugfs
// and of real directories, for the unpack tests.

const MKOCI: &str = "/work/shared/tools/mkoci-layout.sh";

pub(crate) fn mkoci() -> PathBuf {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mkoci-layout.sh");
    if local.exists() {
        local
    } else {
        PathBuf::from(MKOCI)
    }
}

/// Fixture layers in `dir`: l1.tar.gz, l2.tar.zst, l3.tar plus gz copies of all three.
pub(crate) fn fixtures(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_layers.py");
    run(Command::new("python3").arg(script).arg(dir));
    for l in ["l1.tar", "l2.tar", "l3.tar"] {
        run(Command::new("gzip").args(["-n", "-k", "-f"]).arg(dir.join(l)));
    }
    run(Command::new("zstd").args(["-q", "-f"]).arg(dir.join("l2.tar")));
    let layers = |names: [&str; 3]| names.map(|n| dir.join(n));
    let mixed = layers(["l1.tar.gz", "l2.tar.zst", "l3.tar"]);
    layout(&dir.join("lay"), "v1", &mixed.each_ref().map(PathBuf::as_path));
    let gz = layers(["l1.tar.gz", "l2.tar.gz", "l3.tar.gz"]);
    layout(&dir.join("laygz"), "v1", &gz.each_ref().map(PathBuf::as_path));
}

pub(crate) fn debugfs(img: &Path, req: &str) -> String {
    run(Command::new("debugfs").args(["-R", req]).arg(img))
}

pub(crate) fn dump(img: &Path, file: &str) -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x");
    debugfs(img, &format!("dump {file} {}", out.display()));
    std::fs::read(out).unwrap_or_default()
}

pub(crate) fn do_unpack(src: &Path, reference: Option<&str>, dst: &Path) -> diskkit::Result<()> {
    let options = UnpackOptions {
        reference: reference.map(str::to_owned),
        ..UnpackOptions::default()
    };
    unpack(src, dst, &options, &mut NoProgress).map(|_| ())
}

/// path -> (octal mode, size, sha256 of content for regular files) from debugfs.
pub(crate) fn listing(img: &Path) -> BTreeMap<String, (String, u64, String)> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![String::new()];
    while let Some(d) = dirs.pop() {
        let ls = debugfs(img, &format!("ls -p /{d}"));
        for line in ls.lines() {
            // /ino/mode/uid/gid/name/size/
            let f: Vec<&str> = line.split('/').collect();
            if f.len() < 7 || f[5] == "." || f[5] == ".." || f[5] == "lost+found" {
                continue;
            }
            let path = if d.is_empty() {
                f[5].to_owned()
            } else {
                format!("{d}/{}", f[5])
            };
            let mode = f[2].to_owned();
            let size = f[6].parse().unwrap_or(0);
            let mut hash = String::new();
            if mode.starts_with("04") {
                dirs.push(path.clone());
            } else if mode.starts_with("10") {
                hash = sha(&dump(img, &format!("/{path}")));
            }
            out.insert(path, (mode, size, hash));
        }
    }
    out
}

/// path -> (octal mode, size (0 for directories), sha256 for regular files) of a real tree.
pub(crate) fn walk(root: &Path) -> BTreeMap<String, (String, u64, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    walk_host(root, |rel, p, md| {
        let mut hash = String::new();
        let mut size = md.size();
        if md.is_dir() {
            size = 0;
        } else if md.is_file() {
            hash = sha(&std::fs::read(p).unwrap());
        }
        out.insert(rel, (format!("{:06o}", md.mode()), size, hash));
    });
    out
}

/// The image through diskkit's reader, in `listing`'s format (directory sizes 0).
pub(crate) fn view_listing(img: &Path) -> BTreeMap<String, (String, u64, String)> {
    brief(&view_tree(img))
}
