//! The merged tree: layers applied in order with OCI whiteout semantics.
//!
//! Entries are applied in archive order, like containerd does, and every directory entry
//! (name) carries the number of the layer that created it. A whiteout only removes what lower
//! layers made: `.wh.NAME` removes NAME if a lower layer created it, and otherwise (NAME was
//! re-created in this layer, or is a lower directory this layer put entries in) only the
//! lower-layer content merged beneath it; the opaque marker `.wh..wh..opq` removes the
//! directory's lower-layer children, recursing into directories this layer created or put
//! entries in. So whiteouts may come before or after the entries of their layer, as the spec
//! requires. File contents are referenced (content tokens of the placed data), so
//! deleted files cost nothing in the output: only what the final tree reaches is written.
//!
//! Hard links. The spec applies a layer's whiteouts "regardless of the ordering in which the
//! whiteout file was encountered", so a hard link entry must mean the same before or after a
//! whiteout of its target in the same layer. umoci and containerd link `b` to a lower `a` when
//! `b -> a` comes before `.wh.a`; diskkit gives that result in both orders: a link target is
//! looked up in the tree as it stands, and when it is not there (or is a directory), in the
//! tree as it stood before this layer (the lower-layer names the layer removed or replaced are
//! remembered until it ends). The inode survives under its new name, as an
//! unlinked-but-still-linked file does. `order_tests` checks that random layers merge to the
//! same tree with their whiteouts where they are, all first or all last. A target
//! that an *earlier* layer deleted is gone for good: the link fails with `NotFound`, as it does
//! in umoci and containerd ("extracting a layer with hardlink references to files outside of
//! the layer may fail").

use std::collections::{BTreeMap, HashMap};

use diskkit::{Error, Result};
use diskkit_ext4::writer::{Metadata, Node, NodeKind, Tree};

/// Most symlinks followed while resolving one path.
const MAX_SYMLINK_HOPS: u32 = 40;
/// Whiteout prefix.
pub(crate) const WHITEOUT: &[u8] = b".wh.";
/// Opaque-directory marker.
pub(crate) const OPAQUE: &[u8] = b".wh..wh..opq";

/// What an entry creates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum EntryKind {
    Dir,
    /// Regular file: size and the token of its placed data.
    File {
        size: u64,
        content: u64,
    },
    Symlink(Vec<u8>),
    /// Hard link to another path (relative to the root).
    HardLink(Vec<Vec<u8>>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// One layer entry, path already cleaned into components.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) path: Vec<Vec<u8>>,
    pub(crate) kind: EntryKind,
    pub(crate) meta: Metadata,
}

/// A directory entry: the node it names and the layer that created the name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Child {
    id: usize,
    stamp: u32,
    /// The last layer that put entries below this (lower) directory without an entry for the
    /// directory itself: a whiteout of the same layer then keeps the directory and those
    /// entries, and hides only the lower content.
    through: u32,
}

/// How [`MergedTree::resolve_dir_in`] walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Walk {
    /// Only existing directories.
    Find,
    /// Only existing directories, as the tree was before this layer: lower-layer names it
    /// removed or replaced are seen again.
    FindBeforeLayer,
    /// Missing components (and non-directories in the way) become directories, and the
    /// lower directories passed through record that this layer put something below them.
    Create,
}

#[derive(Debug)]
enum MKind {
    Dir(BTreeMap<Vec<u8>, Child>),
    Other(NodeKind),
}

#[derive(Debug)]
struct MNode {
    kind: MKind,
    meta: Metadata,
}

/// Split a tar path into clean components: no empty, `.` or `..` component; `..` never climbs
/// above the root.
pub(crate) fn clean_path(path: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c.to_vec()),
        }
    }
    out
}

fn lossy(path: &[Vec<u8>]) -> String {
    let v: Vec<String> = path
        .iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!("/{}", v.join("/"))
}

/// The merged filesystem tree.
#[derive(Debug)]
pub struct MergedTree {
    nodes: Vec<MNode>,
    /// The layer being applied (stamps new names).
    layer: u32,
    /// Lower-layer names this layer removed (whiteouts) or replaced: (directory node, name)
    /// -> what it named. Hard links of the same layer may still name them (module docs).
    hidden: HashMap<(usize, Vec<u8>), Child>,
}

impl Default for MergedTree {
    fn default() -> Self {
        Self::new()
    }
}

impl MergedTree {
    /// An empty tree: a root directory, mode 0755, owned by root.
    pub fn new() -> Self {
        MergedTree {
            nodes: vec![MNode {
                kind: MKind::Dir(BTreeMap::new()),
                meta: implicit_dir_meta(),
            }],
            layer: 0,
            hidden: HashMap::new(),
        }
    }

    /// Start applying layer `layer` (numbered from 0, increasing).
    pub(crate) fn begin_layer(&mut self, layer: u32) {
        self.layer = layer;
        self.hidden.clear();
    }

    fn children(&self, id: usize) -> Option<&BTreeMap<Vec<u8>, Child>> {
        match &self.nodes[id].kind {
            MKind::Dir(c) => Some(c),
            MKind::Other(_) => None,
        }
    }

    fn children_mut(&mut self, id: usize) -> Option<&mut BTreeMap<Vec<u8>, Child>> {
        match &mut self.nodes[id].kind {
            MKind::Dir(c) => Some(c),
            MKind::Other(_) => None,
        }
    }

    fn push(&mut self, kind: MKind, meta: Metadata) -> usize {
        self.nodes.push(MNode { kind, meta });
        self.nodes.len() - 1
    }

    /// Resolve `comps` as a directory, following symlinks (clamped at the root). With
    /// `create`, missing components and non-directories in the way become directories;
    /// without it, `None` is returned for them.
    #[cfg(test)]
    fn resolve_dir(&mut self, comps: &[Vec<u8>], create: bool) -> Result<Option<usize>> {
        self.resolve_dir_in(comps, if create { Walk::Create } else { Walk::Find })
    }

    /// Resolve `comps` as a directory, following symlinks (clamped at the root), walking as
    /// `walk` says. With [`Walk::FindBeforeLayer`], lower-layer names this layer removed or
    /// replaced are seen again (and win over what the layer put in their place).
    fn resolve_dir_in(&mut self, comps: &[Vec<u8>], walk: Walk) -> Result<Option<usize>> {
        let before_layer = walk == Walk::FindBeforeLayer;
        let create = walk == Walk::Create;
        let mut stack = vec![0usize];
        let mut queue: std::collections::VecDeque<Vec<u8>> = comps.iter().cloned().collect();
        let mut hops = 0;
        while let Some(c) = queue.pop_front() {
            match c.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    if stack.len() > 1 {
                        stack.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let cur = *stack.last().unwrap_or(&0);
            let child = self.child(cur, &c, before_layer);
            match child.map(|id| &self.nodes[id].kind) {
                Some(MKind::Dir(_)) => {
                    if create {
                        let layer = self.layer;
                        if let Some(ch) = self.children_mut(cur).and_then(|m| m.get_mut(&c)) {
                            ch.through = layer;
                        }
                    }
                    stack.push(child.unwrap_or(0));
                }
                Some(MKind::Other(NodeKind::Symlink(target))) => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(Error::invalid_argument(format!(
                            "too many levels of symbolic links resolving {}",
                            lossy(comps)
                        )));
                    }
                    if target.first() == Some(&b'/') {
                        stack.truncate(1);
                    }
                    let target = target.clone();
                    for t in target.split(|&b| b == b'/').rev() {
                        queue.push_front(t.to_vec());
                    }
                }
                _ => {
                    if !create {
                        return Ok(None);
                    }
                    self.remember_replaced(cur, &c);
                    let id = self.push(MKind::Dir(BTreeMap::new()), implicit_dir_meta());
                    let stamp = self.layer;
                    if let Some(m) = self.children_mut(cur) {
                        m.insert(c, Child::new(id, stamp));
                    }
                    stack.push(id);
                }
            }
        }
        Ok(Some(*stack.last().unwrap_or(&0)))
    }

    /// Apply a whiteout entry (`.wh.NAME` or the opaque marker) of the current layer.
    pub(crate) fn whiteout(&mut self, path: &[Vec<u8>]) -> Result<()> {
        let Some((name, parent)) = path.split_last() else {
            return Ok(());
        };
        // The opaque marker's directory exists in this layer even without its own entry: the
        // marker is an entry below it, like any other.
        let walk = if name.as_slice() == OPAQUE {
            Walk::Create
        } else {
            Walk::Find
        };
        let Some(dir) = self.resolve_dir_in(parent, walk)? else {
            return Ok(()); // nothing below to hide
        };
        if name.as_slice() == OPAQUE {
            self.hide_lower(dir);
        } else if let Some(target) = name.strip_prefix(WHITEOUT) {
            if target.starts_with(WHITEOUT) || target.is_empty() {
                return Ok(()); // AUFS metadata such as .wh..wh.plnk
            }
            let layer = self.layer;
            let Some(child) = self.children(dir).and_then(|m| m.get(target)).copied() else {
                return Ok(());
            };
            let is_dir = matches!(self.nodes[child.id].kind, MKind::Dir(_));
            if child.stamp < layer && !(is_dir && child.through == layer) {
                if let Some(m) = self.children_mut(dir) {
                    m.remove(target);
                }
                self.hidden.entry((dir, target.to_vec())).or_insert(child);
            } else {
                // Created, or filled, by this layer: only what lower layers put there goes
                // (the directory keeps its attributes, as in umoci).
                self.remember_replaced(dir, target);
                if let Some(ch) = self.children_mut(dir).and_then(|m| m.get_mut(target)) {
                    ch.stamp = layer;
                }
                self.hide_lower(child.id);
            }
        }
        Ok(())
    }

    /// Remove the lower-layer names under directory `dir`, recursing into directories the
    /// current layer created, merged or put entries in (those become this layer's).
    fn hide_lower(&mut self, dir: usize) {
        let layer = self.layer;
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            let Some(m) = self.children(d) else {
                continue;
            };
            let mut removed = Vec::new();
            let mut kept_dirs = Vec::new();
            for (name, ch) in m {
                let is_dir = matches!(self.nodes[ch.id].kind, MKind::Dir(_));
                if ch.stamp >= layer || (is_dir && ch.through == layer) {
                    if is_dir {
                        kept_dirs.push((name.clone(), ch.id));
                    }
                } else {
                    removed.push((name.clone(), *ch));
                }
            }
            for (name, _) in &kept_dirs {
                self.remember_replaced(d, name);
            }
            if let Some(m) = self.children_mut(d) {
                for (name, _) in &removed {
                    m.remove(name);
                }
                for (name, _) in &kept_dirs {
                    if let Some(ch) = m.get_mut(name) {
                        ch.stamp = layer;
                    }
                }
            }
            for (name, ch) in removed {
                self.hidden.entry((d, name)).or_insert(ch);
            }
            stack.extend(kept_dirs.into_iter().map(|(_, id)| id));
        }
    }

    /// Apply one non-whiteout entry of a layer.
    pub(crate) fn apply(&mut self, entry: Entry) -> Result<()> {
        let Some((name, parent)) = entry.path.split_last() else {
            // The root itself: only a directory entry can set its attributes.
            if entry.kind == EntryKind::Dir {
                self.nodes[0].meta = entry.meta;
            }
            return Ok(());
        };
        if name.starts_with(WHITEOUT) {
            return self.whiteout(&entry.path);
        }
        let dir = self
            .resolve_dir_in(parent, Walk::Create)?
            .ok_or_else(|| Error::invalid_argument("unreachable: create resolves"))?;
        let existing = self.children(dir).and_then(|m| m.get(name)).map(|ch| ch.id);
        let stamp = self.layer;
        let id = match entry.kind {
            EntryKind::Dir => {
                if let Some(id) = existing.filter(|&id| matches!(self.nodes[id].kind, MKind::Dir(_))) {
                    // dir over dir: new attributes, children kept, the name is now this layer's.
                    self.remember_replaced(dir, name);
                    self.nodes[id].meta = entry.meta;
                    if let Some(ch) = self.children_mut(dir).and_then(|m| m.get_mut(name)) {
                        ch.stamp = stamp;
                    }
                    return Ok(());
                }
                self.push(MKind::Dir(BTreeMap::new()), entry.meta)
            }
            EntryKind::HardLink(target) => {
                // The current tree, then (absent or a directory there) the tree as it was
                // before this layer: a name the layer whited out, or replaced by a
                // directory, still reaches the lower inode (see the module docs).
                let found = match self.lookup(&target, false)? {
                    Some(id) if !matches!(self.nodes[id].kind, MKind::Dir(_)) => Some(id),
                    current => self.lookup(&target, true)?.or(current),
                };
                let id = found.ok_or_else(|| {
                    Error::new(
                        diskkit::ErrorKind::NotFound,
                        format!(
                            "hard link {} -> {}: target not found",
                            lossy(&entry.path),
                            lossy(&target)
                        ),
                    )
                })?;
                if matches!(self.nodes[id].kind, MKind::Dir(_)) {
                    return Err(Error::invalid_argument(format!(
                        "hard link {} -> {}: target is a directory",
                        lossy(&entry.path),
                        lossy(&target)
                    )));
                }
                id
            }
            EntryKind::File { size, content } => {
                self.push(MKind::Other(NodeKind::File { size, content }), entry.meta)
            }
            EntryKind::Symlink(t) => self.push(MKind::Other(NodeKind::Symlink(t)), entry.meta),
            EntryKind::Char(major, minor) => {
                self.push(MKind::Other(NodeKind::CharDevice { major, minor }), entry.meta)
            }
            EntryKind::Block(major, minor) => {
                self.push(MKind::Other(NodeKind::BlockDevice { major, minor }), entry.meta)
            }
            EntryKind::Fifo => self.push(MKind::Other(NodeKind::Fifo), entry.meta),
        };
        self.remember_replaced(dir, name);
        if let Some(m) = self.children_mut(dir) {
            m.insert(name.clone(), Child::new(id, stamp));
        }
        Ok(())
    }

    /// Find `path` (parents through symlinks, the last component not followed), in the
    /// current tree or, with `before_layer`, as it was before this layer (see `hidden`).
    fn lookup(&mut self, path: &[Vec<u8>], before_layer: bool) -> Result<Option<usize>> {
        let Some((name, parent)) = path.split_last() else {
            return Ok(Some(0));
        };
        let walk = if before_layer {
            Walk::FindBeforeLayer
        } else {
            Walk::Find
        };
        let Some(dir) = self.resolve_dir_in(parent, walk)? else {
            return Ok(None);
        };
        Ok(self.child(dir, name, before_layer))
    }

    /// Before `name` in `dir` is replaced: remember what a lower layer put there, for the
    /// hard links of this layer (see the module docs).
    fn remember_replaced(&mut self, dir: usize, name: &[u8]) {
        let layer = self.layer;
        if let Some(old) = self.children(dir).and_then(|m| m.get(name)).copied() {
            if old.stamp < layer {
                self.hidden.entry((dir, name.to_vec())).or_insert(old);
            }
        }
    }

    /// The node `name` names in directory `dir`.
    fn child(&self, dir: usize, name: &[u8], before_layer: bool) -> Option<usize> {
        if before_layer {
            if let Some(ch) = self.hidden.get(&(dir, name.to_vec())) {
                return Some(ch.id);
            }
        }
        self.children(dir).and_then(|m| m.get(name)).map(|ch| ch.id)
    }

    /// The content tokens of every file a name still reaches.
    pub(crate) fn live_contents(&self) -> Vec<u64> {
        let mut out = Vec::new();
        let mut seen = vec![false; self.nodes.len()];
        let mut stack = vec![0usize];
        while let Some(id) = stack.pop() {
            for &Child { id: child, .. } in self.children(id).into_iter().flat_map(|c| c.values()) {
                if std::mem::replace(&mut seen[child], true) {
                    continue;
                }
                match &self.nodes[child].kind {
                    MKind::Dir(_) => stack.push(child),
                    MKind::Other(NodeKind::File { content, .. }) => out.push(*content),
                    MKind::Other(_) => {}
                }
            }
        }
        out
    }

    /// Convert to the writer's tree (only nodes reachable from the root).
    pub fn to_tree(&self) -> Result<Tree> {
        let mut tree = Tree::new(self.nodes[0].meta.clone());
        let mut map: Vec<Option<usize>> = vec![None; self.nodes.len()];
        map[0] = Some(Tree::ROOT);
        let mut stack = vec![0usize];
        while let Some(id) = stack.pop() {
            let Some(children) = self.children(id) else {
                continue;
            };
            let tid = map[id].unwrap_or(Tree::ROOT);
            for (name, &Child { id: child, .. }) in children {
                let cid = match map[child] {
                    Some(c) => c,
                    None => {
                        let n = &self.nodes[child];
                        let kind = match &n.kind {
                            MKind::Dir(_) => {
                                stack.push(child);
                                NodeKind::Directory(Vec::new())
                            }
                            MKind::Other(k) => k.clone(),
                        };
                        let c = tree.add(Node {
                            kind,
                            meta: n.meta.clone(),
                        });
                        map[child] = Some(c);
                        c
                    }
                };
                tree.link(tid, name, cid)?;
            }
        }
        Ok(tree)
    }
}

impl Child {
    fn new(id: usize, stamp: u32) -> Self {
        Child {
            id,
            stamp,
            through: stamp,
        }
    }
}

fn implicit_dir_meta() -> Metadata {
    Metadata {
        mode: 0o755,
        ..Metadata::default()
    }
}

#[cfg(test)]
mod order_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: clean_path(path.as_bytes()),
            kind,
            meta: Metadata::default(),
        }
    }

    fn names(t: &mut MergedTree, path: &str) -> Vec<String> {
        let d = t
            .resolve_dir(&clean_path(path.as_bytes()), false)
            .unwrap()
            .unwrap();
        t.children(d)
            .unwrap()
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    #[test]
    fn paths_are_contained() {
        assert_eq!(
            clean_path(b"/../a/./b//../c/"),
            vec![b"a".to_vec(), b"c".to_vec()]
        );
        assert!(clean_path(b"../..").is_empty());
    }

    #[test]
    fn symlinked_parent_and_opaque() {
        let mut t = MergedTree::new();
        t.apply(e("usr/lib/", EntryKind::Dir)).unwrap();
        t.apply(e("lib", EntryKind::Symlink(b"usr/lib".to_vec())))
            .unwrap();
        t.apply(e("lib/x", EntryKind::Fifo)).unwrap();
        assert_eq!(names(&mut t, "usr/lib"), ["x"]);
        // Next layer: opaque usr/lib after a sibling of the same layer.
        t.begin_layer(1);
        t.apply(e("usr/lib/y", EntryKind::Fifo)).unwrap();
        t.apply(e("usr/lib/.wh..wh..opq", EntryKind::File { size: 0, content: 0 }))
            .unwrap();
        assert_eq!(names(&mut t, "usr/lib"), ["y"]);
    }

    #[test]
    fn same_layer_whiteouts_only_hide_lower_layers() {
        let mut t = MergedTree::new();
        t.apply(e("d/", EntryKind::Dir)).unwrap();
        t.apply(e("d/old", EntryKind::Fifo)).unwrap();
        t.apply(e("x", EntryKind::Fifo)).unwrap();
        t.begin_layer(1);
        // Re-created in this layer, then whited out: only the lower content goes.
        t.apply(e("d/", EntryKind::Dir)).unwrap();
        t.apply(e("d/new", EntryKind::Fifo)).unwrap();
        t.apply(e(".wh.d", EntryKind::File { size: 0, content: 0 }))
            .unwrap();
        assert_eq!(names(&mut t, "d"), ["new"]);
        // Whiteout first, then re-created: fresh.
        t.apply(e(".wh.x", EntryKind::File { size: 0, content: 0 }))
            .unwrap();
        t.apply(e("x/", EntryKind::Dir)).unwrap();
        assert!(names(&mut t, "x").is_empty());
        // Opaque marker for a directory with no entry of its own, over a lower file.
        t.begin_layer(2);
        t.apply(e("x/.wh..wh..opq", EntryKind::File { size: 0, content: 0 }))
            .unwrap();
        assert!(names(&mut t, "x").is_empty());
    }

    /// File contents of every name under the root, as `name=content token`.
    fn files(t: &mut MergedTree, path: &str) -> Vec<String> {
        let d = t
            .resolve_dir(&clean_path(path.as_bytes()), false)
            .unwrap()
            .unwrap();
        t.children(d)
            .unwrap()
            .iter()
            .map(|(k, ch)| match &t.nodes[ch.id].kind {
                MKind::Other(NodeKind::File { content, .. }) => {
                    format!("{}={content}", String::from_utf8_lossy(k))
                }
                _ => String::from_utf8_lossy(k).into_owned(),
            })
            .collect()
    }

    fn wh(path: &str) -> Entry {
        e(path, EntryKind::File { size: 0, content: 0 })
    }

    fn link(path: &str, target: &str) -> Entry {
        e(path, EntryKind::HardLink(clean_path(target.as_bytes())))
    }

    #[test]
    fn hard_link_to_a_name_whited_out_in_the_same_layer() {
        let lower = |t: &mut MergedTree| {
            t.apply(e("a", EntryKind::File { size: 1, content: 7 })).unwrap();
            t.apply(e("d/x", EntryKind::File { size: 1, content: 8 }))
                .unwrap();
            t.apply(e("o/y", EntryKind::File { size: 1, content: 9 }))
                .unwrap();
            t.begin_layer(1);
        };
        // Whiteouts first, links after: the links reach the lower inodes.
        let mut t = MergedTree::new();
        lower(&mut t);
        for entry in [
            wh(".wh.a"),
            wh(".wh.d"),
            wh("o/.wh..wh..opq"),
            link("b", "a"),
            link("dx", "d/x"),
            link("oy", "o/y"),
        ] {
            t.apply(entry).unwrap();
        }
        let first = files(&mut t, "");
        assert_eq!(first, ["b=7", "dx=8", "o", "oy=9"]);
        assert!(names(&mut t, "o").is_empty());
        // Links first, whiteouts after (what umoci and containerd accept): the same tree.
        let mut t = MergedTree::new();
        lower(&mut t);
        for entry in [
            link("b", "a"),
            link("dx", "d/x"),
            link("oy", "o/y"),
            wh(".wh.a"),
            wh(".wh.d"),
            wh("o/.wh..wh..opq"),
        ] {
            t.apply(entry).unwrap();
        }
        assert_eq!(files(&mut t, ""), first);
        // A name re-created in this layer wins over the whited-out lower one.
        let mut t = MergedTree::new();
        lower(&mut t);
        t.apply(wh(".wh.a")).unwrap();
        t.apply(e("a", EntryKind::File { size: 1, content: 42 })).unwrap();
        t.apply(link("b", "a")).unwrap();
        assert_eq!(files(&mut t, ""), ["a=42", "b=42", "d", "o"]);
        // A name an earlier layer deleted is gone: NotFound, as in umoci and containerd.
        let mut t = MergedTree::new();
        lower(&mut t);
        t.apply(wh(".wh.a")).unwrap();
        t.begin_layer(2);
        let err = t.apply(link("b", "a")).unwrap_err();
        assert_eq!(err.kind(), diskkit::ErrorKind::NotFound);
        assert!(err.to_string().contains("/b -> /a"), "{err}");
    }

    #[test]
    fn whiteout_after_same_layer_entries_below_it_keeps_them() {
        let lower = |t: &mut MergedTree| {
            t.apply(e("d/old", EntryKind::Fifo)).unwrap();
            t.apply(e("o/e/old", EntryKind::Fifo)).unwrap();
            t.apply(e("o/f/old", EntryKind::Fifo)).unwrap();
            t.apply(e("usr/lib/old", EntryKind::Fifo)).unwrap();
            t.apply(e("lib", EntryKind::Symlink(b"usr/lib".to_vec())))
                .unwrap();
            t.begin_layer(1);
        };
        let check = |t: &mut MergedTree| {
            assert_eq!(names(t, "d"), ["y"]);
            assert_eq!(names(t, "o"), ["e"]);
            assert_eq!(names(t, "o/e"), ["y"]);
            assert_eq!(names(t, "usr"), ["lib"]);
            assert_eq!(names(t, "usr/lib"), ["y"]);
        };
        // Entries below lower directories first (no entry for the directories), whiteouts
        // after: the same-layer entries stay, the lower ones go.
        let mut t = MergedTree::new();
        lower(&mut t);
        for entry in [
            e("d/y", EntryKind::Fifo),
            e("o/e/y", EntryKind::Fifo),
            e("lib/y", EntryKind::Fifo),
            wh(".wh.d"),
            wh("o/.wh..wh..opq"),
            wh(".wh.usr"),
        ] {
            t.apply(entry).unwrap();
        }
        check(&mut t);
        // Whiteouts first: the same tree.
        let mut t = MergedTree::new();
        lower(&mut t);
        for entry in [
            wh(".wh.d"),
            wh("o/.wh..wh..opq"),
            wh(".wh.usr"),
            e("d/y", EntryKind::Fifo),
            e("o/e/y", EntryKind::Fifo),
            e("lib/y", EntryKind::Fifo),
        ] {
            t.apply(entry).unwrap();
        }
        check(&mut t);
        // Only this layer is kept: the next layer's whiteout removes the directory.
        t.begin_layer(2);
        t.apply(wh(".wh.d")).unwrap();
        assert!(t.resolve_dir(&clean_path(b"d"), false).unwrap().is_none());
    }

    #[test]
    fn hard_link_survives_deletion_and_symlink_loops_fail() {
        let mut t = MergedTree::new();
        t.apply(e("a", EntryKind::File { size: 1, content: 0 })).unwrap();
        t.apply(e("b", EntryKind::HardLink(clean_path(b"a")))).unwrap();
        t.begin_layer(1);
        t.whiteout(&clean_path(b".wh.a")).unwrap();
        assert_eq!(names(&mut t, ""), ["b"]);
        t.apply(e("l1", EntryKind::Symlink(b"l2".to_vec()))).unwrap();
        t.apply(e("l2", EntryKind::Symlink(b"l1".to_vec()))).unwrap();
        assert!(t.apply(e("l1/x", EntryKind::Fifo)).is_err());
        assert!(t
            .apply(e("c", EntryKind::HardLink(clean_path(b"missing"))))
            .is_err());
    }
}
