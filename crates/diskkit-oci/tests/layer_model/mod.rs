//! Random layer stacks for `random_layers_match_umoci`: ops over a small set of paths, written
//! as tar layers, with a model of the merged tree that tells which names each layer may link
//! to. Generated cases avoid the places where umoci knowingly departs from the image spec or
//! fails: a whiteout of a name the same layer already created; a hard link to a name removed
//! earlier in the same layer (umoci fails, diskkit links the lower file: the test checks that
//! separately with [`link_to_removed`]) or deleted by an earlier layer (both fail: checked with
//! [`dangling_link`]); a link to a same-layer replacement that is not a regular file; a link
//! whose target runs through a symlink at, above or below the link's own path. No device
//! nodes either: rootless umoci cannot make them.
//!
//! Hard links reach files of their own layer and, about as often, files the lower layers made
//! ([`Reach::Lower`]), sometimes through a symlink to a parent ([`Reach::ViaSymlink`]);
//! [`Op::Hit`] then deletes (whiteout of the name or of its parent, opaque parent) or replaces
//! (new content, another type) one name of a file that has several, in the same layer after
//! the link or in a later one, so the surviving names must keep the old inode. Every regular
//! file's content names its layer and op, so a wrong inode shows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proptest::prelude::*;

const NAMES: [&str; 3] = ["a", "b", "c"];
const DIR_MODES: [u32; 3] = [0o755, 0o700, 0o1777];
const FILE_MODES: [u32; 4] = [0o644, 0o600, 0o755, 0o4755];
const TARGETS: [&str; 7] = ["a", "../b", "/c/a", "nowhere", ".", "..", "/"];

fn paths() -> Vec<String> {
    let mut out = Vec::new();
    for a in NAMES {
        out.push(a.to_string());
        for b in NAMES {
            out.push(format!("{a}/{b}"));
            for c in NAMES {
                out.push(format!("{a}/{b}/{c}"));
            }
        }
    }
    out
}

/// Which files a hard link may point at.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Reach {
    /// A regular file (or link) this layer made, still at its path.
    Same,
    /// A regular file the lower layers made that this layer has not touched (yet).
    Lower,
    /// Any regular file, named through a symlink to one of its parent directories (or to the
    /// root): the link target's parents resolve through symlinks (clamped at the root).
    ViaSymlink,
}

/// What [`Op::Hit`] does to a name of a file that has several.
#[derive(Clone, Debug)]
pub(crate) enum Hit {
    Whiteout,
    WhiteoutParent,
    OpaqueParent,
    File(Vec<u8>),
    Dir,
    Symlink(usize),
    Fifo,
}

#[derive(Clone, Debug)]
pub(crate) enum Op {
    File(usize, Vec<u8>, usize),
    Dir(usize, usize),
    Symlink(usize, usize),
    Fifo(usize),
    /// A hard link at the first path to a file the second index picks among those `Reach`
    /// allows (the other kind when there are none).
    HardLink(usize, usize, Reach),
    Whiteout(usize),
    Opaque(usize),
    /// `Hit` done to a name picked among the files with more than one name.
    Hit(usize, Hit),
}

fn op() -> impl Strategy<Value = Op> {
    let data = || prop::collection::vec(any::<u8>(), 0..600);
    let hit = prop_oneof![
        2 => Just(Hit::Whiteout),
        1 => Just(Hit::WhiteoutParent),
        2 => Just(Hit::OpaqueParent),
        2 => data().prop_map(Hit::File),
        1 => Just(Hit::Dir),
        1 => any::<usize>().prop_map(Hit::Symlink),
        1 => Just(Hit::Fifo),
    ];
    prop_oneof![
        3 => (any::<usize>(), data(), any::<usize>()).prop_map(|(p, d, m)| Op::File(p, d, m)),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(p, m)| Op::Dir(p, m)),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(p, t)| Op::Symlink(p, t)),
        1 => any::<usize>().prop_map(Op::Fifo),
        3 => (any::<usize>(), any::<usize>(), prop_oneof![
            2 => Just(Reach::Same),
            2 => Just(Reach::Lower),
            2 => Just(Reach::ViaSymlink),
        ])
            .prop_map(|(p, t, r)| Op::HardLink(p, t, r)),
        2 => any::<usize>().prop_map(Op::Whiteout),
        1 => any::<usize>().prop_map(Op::Opaque),
        2 => (any::<usize>(), hit).prop_map(|(p, h)| Op::Hit(p, h)),
    ]
}

pub(crate) fn layers() -> impl Strategy<Value = Vec<Vec<Op>>> {
    prop::collection::vec(prop::collection::vec(op(), 1..10), 1..5)
}

fn ancestors(p: &str) -> Vec<String> {
    let parts: Vec<&str> = p.split('/').collect();
    (1..parts.len()).map(|i| parts[..i].join("/")).collect()
}

fn under(p: &str, root: &str) -> bool {
    p.starts_with(&format!("{root}/"))
}

/// Where the symlink at `at` pointing to `target` leads, lexically, `..` clamped at the root
/// (`""`): the model's paths hold no symlink, so this is where it resolves when a directory
/// is there.
fn resolve(at: &str, target: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    if !target.starts_with('/') {
        out.extend(at.split('/'));
        out.pop();
    }
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.join("/")
}

fn parent(p: &str) -> Option<&str> {
    p.rsplit_once('/').map(|(d, _)| d)
}

/// What the generated layers did with hard links (summed over cases by
/// `random_layers_cover_cross_layer_links`).
#[derive(Clone, Debug, Default)]
pub(crate) struct Stats {
    /// Hard links to a file of their own layer.
    pub(crate) same_links: usize,
    /// Hard links to a file a lower layer made.
    pub(crate) cross_links: usize,
    /// Hard links (of either kind) whose target path goes through a symlink.
    pub(crate) via_symlink: usize,
    /// A name of a file that a cross-layer link gave another name went away while another
    /// name stayed, by how: whiteout of the name or of a parent, opaque parent, replaced by a
    /// regular file, replaced by something else.
    pub(crate) whited_out: usize,
    pub(crate) opaque: usize,
    pub(crate) replaced_by_file: usize,
    pub(crate) replaced_by_other: usize,
    /// Of those, in a layer above the one that made the cross-layer link.
    pub(crate) in_later_layer: usize,
}

impl Stats {
    pub(crate) fn add(&mut self, o: &Stats) {
        self.same_links += o.same_links;
        self.cross_links += o.cross_links;
        self.via_symlink += o.via_symlink;
        self.whited_out += o.whited_out;
        self.opaque += o.opaque;
        self.replaced_by_file += o.replaced_by_file;
        self.replaced_by_other += o.replaced_by_other;
        self.in_later_layer += o.in_later_layer;
    }
}

/// Why a name goes away (for [`Stats`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    Whiteout,
    Opaque,
    ByFile,
    ByOther,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Other,
}

#[derive(Clone, Copy, Debug)]
struct Node {
    kind: Kind,
    /// The layer whose entry made this name (a directory entry over a directory renews it).
    layer: usize,
    /// Inode number; the names of a regular file and of its hard links share it.
    ino: usize,
    /// A symlink's target (index in `TARGETS`).
    symlink: Option<usize>,
}

/// The merged tree after the entries written so far. Paths are literal: the generator
/// writes every parent as a directory entry before an entry below it, so no entry is reached
/// through a symlink.
#[derive(Default)]
struct Model {
    tree: BTreeMap<String, Node>,
    layer: usize,
    next_ino: usize,
    /// Inodes a cross-layer link gave another name -> the layer of that link.
    cross: BTreeMap<usize, usize>,
    /// Paths that held a regular file at the end of some layer.
    ever_files: BTreeSet<String>,
    stats: Stats,
}

impl Model {
    fn node(&mut self, kind: Kind) -> Node {
        self.next_ino += 1;
        Node {
            kind,
            layer: self.layer,
            ino: self.next_ino,
            symlink: None,
        }
    }

    fn names_of(&self, ino: usize) -> usize {
        self.tree.values().filter(|n| n.ino == ino).count()
    }

    /// Remove the names `which` selects among `p` and everything below it.
    fn remove_where(&mut self, p: &str, why: Why, which: impl Fn(&str, &Node) -> bool) {
        let gone: Vec<(String, Node)> = self
            .tree
            .iter()
            .filter(|(k, n)| (*k == p || under(k, p)) && which(k, n))
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        for (k, _) in &gone {
            self.tree.remove(k);
        }
        for (_, n) in gone {
            let Some(&linked_in) = self.cross.get(&n.ino) else {
                continue;
            };
            if n.kind != Kind::File || self.names_of(n.ino) == 0 {
                continue;
            }
            let s = &mut self.stats;
            match why {
                Why::Whiteout => s.whited_out += 1,
                Why::Opaque => s.opaque += 1,
                Why::ByFile => s.replaced_by_file += 1,
                Why::ByOther => s.replaced_by_other += 1,
            }
            if self.layer > linked_in {
                s.in_later_layer += 1;
            }
        }
    }

    /// An entry of this layer at `p`.
    fn set(&mut self, p: &str, node: Node) {
        if node.kind == Kind::Dir {
            if let Some(n) = self.tree.get_mut(p).filter(|n| n.kind == Kind::Dir) {
                n.layer = self.layer; // directory over directory: children kept
                return;
            }
        }
        let why = if node.kind == Kind::File {
            Why::ByFile
        } else {
            Why::ByOther
        };
        self.remove_where(p, why, |_, _| true);
        self.tree.insert(p.to_string(), node);
    }

    /// (name through a symlink `keep` accepts, path) of every regular file below a directory
    /// a symlink resolves to.
    fn via_symlinks(&self, keep: impl Fn(&str) -> bool) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (s, n) in &self.tree {
            let Some(t) = n.symlink.filter(|_| keep(s)) else {
                continue;
            };
            let dir = resolve(s, TARGETS[t]);
            if !dir.is_empty() && self.tree.get(&dir).is_none_or(|d| d.kind != Kind::Dir) {
                continue;
            }
            for (f, n) in &self.tree {
                let rest = if dir.is_empty() {
                    Some(f.as_str())
                } else {
                    f.strip_prefix(&format!("{dir}/"))
                };
                if let Some(rest) = rest.filter(|_| n.kind == Kind::File) {
                    out.push((format!("{s}/{rest}"), f.clone()));
                }
            }
        }
        out
    }

    /// Regular files at their path: made by this layer, or by lower ones.
    fn files(&self, this_layer: bool) -> Vec<String> {
        self.tree
            .iter()
            .filter(|(_, n)| n.kind == Kind::File && (n.layer == self.layer) == this_layer)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn end_layer(&mut self) {
        let files: Vec<String> = self.files(true).into_iter().chain(self.files(false)).collect();
        self.ever_files.extend(files);
    }

    /// Paths that once held a regular file and now resolve to nothing: nothing is there, and
    /// every parent that exists is a directory (no symlink to follow elsewhere).
    fn gone(&self) -> Vec<String> {
        self.ever_files
            .iter()
            .filter(|p| {
                !self.tree.contains_key(*p)
                    && ancestors(p)
                        .iter()
                        .all(|a| self.tree.get(a).is_none_or(|n| n.kind == Kind::Dir))
            })
            .cloned()
            .collect()
    }
}

/// One layer being written.
struct Layer<'m> {
    builder: tar::Builder<Vec<u8>>,
    /// Paths emitted in this layer, with whether they are directories.
    emitted: BTreeMap<String, bool>,
    model: &'m mut Model,
}

impl Layer<'_> {
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        h
    }

    fn put(&mut self, path: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: Option<&str>) {
        let mut h = Self::header(kind, mode, data.len() as u64);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        let name = if kind == tar::EntryType::Directory {
            format!("{path}/")
        } else {
            path.to_string()
        };
        self.builder.append_data(&mut h, name, data).unwrap();
    }

    /// The parents of `p` as directory entries, unless this layer already has them.
    fn parents(&mut self, p: &str) {
        for a in ancestors(p) {
            if self.emitted.get(&a) != Some(&true) {
                self.put(&a, tar::EntryType::Directory, 0o755, &[], None);
                self.emitted.retain(|e, _| !under(e, &a));
                self.emitted.insert(a.clone(), true);
                let node = self.model.node(Kind::Dir);
                self.model.set(&a, node);
            }
        }
    }

    /// Emit `p` (after its parents) and track what it replaces. A hard link names `ino`.
    fn emit(&mut self, p: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: Option<(&str, usize)>) {
        self.parents(p);
        self.put(p, kind, mode, data, link.map(|l| l.0));
        let is_dir = kind == tar::EntryType::Directory;
        if !is_dir {
            self.emitted.retain(|e, _| !under(e, p));
        }
        self.emitted.insert(p.to_string(), is_dir);
        let mut node = self.model.node(match kind {
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Regular | tar::EntryType::Link => Kind::File,
            _ => Kind::Other,
        });
        match (kind, link) {
            (tar::EntryType::Link, Some((_, ino))) => node.ino = ino,
            (tar::EntryType::Symlink, Some((t, _))) => node.symlink = TARGETS.iter().position(|x| *x == t),
            _ => {}
        }
        self.model.set(p, node);
    }

    fn whiteout(&mut self, p: &str) {
        if self.emitted.keys().any(|e| e == p || under(e, p)) {
            return; // umoci would delete same-layer entries; the spec keeps them
        }
        self.parents(p);
        self.put(&whiteout_of(p), tar::EntryType::Regular, 0o644, &[], None);
        self.model.remove_where(p, Why::Whiteout, |_, _| true);
    }

    fn opaque(&mut self, p: &str) {
        // A late marker over same-layer files directly inside is the interesting case;
        // same-layer subdirectories are where umoci's handling is unclear.
        let depth = |x: &str| x.matches('/').count();
        if self
            .emitted
            .iter()
            .any(|(e, &is_dir)| under(e, p) && (is_dir || depth(e) > depth(p) + 1))
        {
            return;
        }
        self.emit(p, tar::EntryType::Directory, 0o755, &[], None);
        self.put(
            &format!("{p}/.wh..wh..opq"),
            tar::EntryType::Regular,
            0o644,
            &[],
            None,
        );
        let layer = self.model.layer;
        self.model
            .remove_where(p, Why::Opaque, |k, n| k != p && n.layer < layer);
    }

    fn hard_link(&mut self, p: &str, pick: usize, reach: Reach) {
        let plain =
            |v: Vec<String>| -> Vec<(String, String)> { v.into_iter().map(|f| (f.clone(), f)).collect() };
        let same = plain(self.model.files(true));
        let lower = plain(self.model.files(false));
        // Symlinks a link at `p` leaves alone: umoci removes what is at `p` and creates its
        // parents before it resolves the target, so a target through a symlink at, below or
        // above `p` fails there (diskkit resolves it first and links).
        let via = self
            .model
            .via_symlinks(|s| s != p && !under(p, s) && !under(s, p));
        let pool = match reach {
            Reach::ViaSymlink if !via.is_empty() => via,
            Reach::Same if !same.is_empty() => same,
            Reach::Lower | Reach::ViaSymlink if !lower.is_empty() => lower,
            Reach::Lower | Reach::ViaSymlink => same,
            Reach::Same => lower,
        };
        if pool.is_empty() {
            return;
        }
        let (name, target) = pool[pick % pool.len()].clone();
        if target == p || under(&target, p) || under(p, &target) {
            return;
        }
        let t = self.model.tree[&target];
        if t.layer < self.model.layer {
            self.model.stats.cross_links += 1;
            self.model.cross.entry(t.ino).or_insert(self.model.layer);
        } else {
            self.model.stats.same_links += 1;
        }
        if name != target {
            self.model.stats.via_symlink += 1;
        }
        self.emit(p, tar::EntryType::Link, 0o644, &[], Some((&name, t.ino)));
    }

    fn hit(&mut self, pick: usize, hit: &Hit, data: &[u8]) {
        let shared: Vec<String> = self
            .model
            .tree
            .iter()
            .filter(|(_, n)| n.kind == Kind::File && self.model.names_of(n.ino) > 1)
            .map(|(k, _)| k.clone())
            .collect();
        if shared.is_empty() {
            return;
        }
        let p = shared[pick % shared.len()].clone();
        match hit {
            Hit::Whiteout => self.whiteout(&p),
            Hit::WhiteoutParent => {
                if let Some(d) = parent(&p) {
                    self.whiteout(d);
                }
            }
            Hit::OpaqueParent => {
                if let Some(d) = parent(&p) {
                    self.opaque(d);
                }
            }
            Hit::File(_) => self.emit(&p, tar::EntryType::Regular, 0o644, data, None),
            Hit::Dir => self.emit(&p, tar::EntryType::Directory, 0o700, &[], None),
            Hit::Symlink(t) => self.emit(
                &p,
                tar::EntryType::Symlink,
                0o777,
                &[],
                Some((TARGETS[t % TARGETS.len()], 0)),
            ),
            Hit::Fifo => self.emit(&p, tar::EntryType::Fifo, 0o644, &[], None),
        }
    }
}

/// The layers written as tar files, and what the model knows about them.
pub(crate) struct Stack {
    pub(crate) tars: Vec<PathBuf>,
    pub(crate) stats: Stats,
    /// Paths that once held a regular file and are gone from the merged tree (a hard link to
    /// one of them in a further layer must fail with `NotFound`).
    pub(crate) gone: Vec<String>,
    /// Regular files of the merged tree.
    pub(crate) files: Vec<String>,
}

/// Write `layers` as `m0.tar`, `m1.tar`... in `dir`.
pub(crate) fn build(dir: &Path, layers: &[Vec<Op>]) -> Stack {
    let all = paths();
    let path = |i: &usize| all[i % all.len()].clone();
    let mut model = Model::default();
    let mut tars = Vec::new();
    for (i, ops) in layers.iter().enumerate() {
        model.layer = i;
        let mut l = Layer {
            builder: tar::Builder::new(Vec::new()),
            emitted: BTreeMap::new(),
            model: &mut model,
        };
        for (j, op) in ops.iter().enumerate() {
            // Every regular file's content is its own: layer and op first.
            let content = |d: &[u8]| [format!("layer {i} op {j}\n").as_bytes(), d].concat();
            match op {
                Op::File(p, d, m) => l.emit(
                    &path(p),
                    tar::EntryType::Regular,
                    FILE_MODES[m % FILE_MODES.len()],
                    &content(d),
                    None,
                ),
                Op::Dir(p, m) => l.emit(
                    &path(p),
                    tar::EntryType::Directory,
                    DIR_MODES[m % DIR_MODES.len()],
                    &[],
                    None,
                ),
                Op::Symlink(p, t) => l.emit(
                    &path(p),
                    tar::EntryType::Symlink,
                    0o777,
                    &[],
                    Some((TARGETS[t % TARGETS.len()], 0)),
                ),
                Op::Fifo(p) => l.emit(&path(p), tar::EntryType::Fifo, 0o644, &[], None),
                Op::HardLink(p, t, r) => l.hard_link(&path(p), *t, *r),
                Op::Whiteout(p) => l.whiteout(&path(p)),
                Op::Opaque(p) => l.opaque(&path(p)),
                Op::Hit(p, h) => {
                    let d = match h {
                        Hit::File(d) => content(d),
                        _ => Vec::new(),
                    };
                    l.hit(*p, h, &d);
                }
            }
        }
        let bytes = l.builder.into_inner().unwrap();
        model.end_layer();
        let path = dir.join(format!("m{i}.tar"));
        std::fs::write(&path, bytes).unwrap();
        tars.push(path);
    }
    Stack {
        tars,
        gone: model.gone(),
        files: model.files(false).into_iter().chain(model.files(true)).collect(),
        stats: model.stats,
    }
}

/// A top-level name that is not `target`'s first component (a link there leaves `target`
/// and its parents alone).
fn link_name_for(target: &str) -> String {
    let first = target.split('/').next().unwrap_or(target);
    NAMES.iter().find(|n| **n != first).unwrap().to_string()
}

fn whiteout_of(p: &str) -> String {
    match p.rsplit_once('/') {
        Some((d, name)) => format!("{d}/.wh.{name}"),
        None => format!(".wh.{p}"),
    }
}

/// An entry of the extra layers the test puts on top of a stack.
#[derive(Clone, Copy)]
enum Extra<'a> {
    /// A hard link to this path.
    Link(&'a str),
    /// An empty regular file: a whiteout or an opaque marker.
    Marker,
    Dir,
}

/// Write a layer of `entries` to `dir/name`.
fn write_entries(dir: &Path, name: &str, entries: &[(&str, Extra)]) -> PathBuf {
    let mut l = tar::Builder::new(Vec::new());
    for (path, e) in entries {
        let (kind, path) = match e {
            Extra::Link(_) => (tar::EntryType::Link, path.to_string()),
            Extra::Marker => (tar::EntryType::Regular, path.to_string()),
            Extra::Dir => (tar::EntryType::Directory, format!("{path}/")),
        };
        let mut h = Layer::header(kind, 0o755, 0);
        if let Extra::Link(t) = e {
            h.set_link_name(t).unwrap();
        }
        l.append_data(&mut h, path, &[][..]).unwrap();
    }
    let path = dir.join(name);
    std::fs::write(&path, l.into_inner().unwrap()).unwrap();
    path
}

/// A layer `dangling.tar` in `dir` holding one hard link to `target`; its path and the link's.
pub(crate) fn dangling_link(dir: &Path, target: &str) -> (PathBuf, String) {
    let link = link_name_for(target);
    (
        write_entries(dir, "dangling.tar", &[(&link, Extra::Link(target))]),
        link,
    )
}

/// Two layers that hard-link a new name to the file `target` and remove `target` as `how`
/// picks (whiteout of it or of its parent, opaque parent, a directory in its place):
/// `removed_first.tar` removes it before the link, which umoci fails (its link finds nothing,
/// or a directory) and diskkit gives the link the lower file as the spec's whatever-the-order
/// whiteouts require; `link_first.tar` links first, which umoci accepts. Also what was done.
pub(crate) fn link_to_removed(dir: &Path, target: &str, how: usize) -> (PathBuf, PathBuf, String) {
    let link = link_name_for(target);
    let parent = parent(target);
    let (removal, what) = match (how % 4, parent) {
        (1, Some(d)) => ((whiteout_of(d), Extra::Marker), "whiteout of its parent"),
        (2, Some(d)) => ((format!("{d}/.wh..wh..opq"), Extra::Marker), "opaque parent"),
        (3, _) => ((target.to_string(), Extra::Dir), "a directory in its place"),
        _ => ((whiteout_of(target), Extra::Marker), "whiteout"),
    };
    let removal = (removal.0.as_str(), removal.1);
    let link_entry = (link.as_str(), Extra::Link(target));
    let first = write_entries(dir, "removed_first.tar", &[removal, link_entry]);
    let second = write_entries(dir, "link_first.tar", &[link_entry, removal]);
    (first, second, format!("{link} -> {target}, {what}"))
}
