//! Property: the image spec applies a layer's whiteouts "regardless of the ordering in which
//! the whiteout file was encountered". Random layer stacks (files, directories, hard links,
//! whiteouts, opaque markers over a small name space) are merged three ways — whiteouts where
//! the generator put them, all first in their layer, all last — and must give the same tree:
//! the same names, types, file contents and hard-link groups (directory attributes are left
//! out: an implicit parent gets 0755 when the whiteout comes first and keeps the lower
//! directory's when it comes last, as in umoci). Symlinks are left out: a whiteout of a
//! symlink that same-layer entries were created through is order-dependent everywhere.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

const NAMES: [&str; 3] = ["a", "b", "c"];

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

#[derive(Clone, Debug)]
enum Op {
    File(usize, u64),
    Dir(usize),
    Fifo(usize),
    Link(usize, usize),
    Whiteout(usize),
    Opaque(usize),
}

impl Op {
    fn is_whiteout(&self) -> bool {
        matches!(self, Op::Whiteout(_) | Op::Opaque(_))
    }

    fn entry(&self, all: &[String]) -> Entry {
        let p = |i: &usize| clean_path(all[i % all.len()].as_bytes());
        let meta = Metadata::default();
        let (path, kind) = match self {
            Op::File(i, c) => (p(i), EntryKind::File { size: 1, content: *c }),
            Op::Dir(i) => (p(i), EntryKind::Dir),
            Op::Fifo(i) => (p(i), EntryKind::Fifo),
            Op::Link(i, t) => (p(i), EntryKind::HardLink(p(t))),
            Op::Whiteout(i) => {
                let mut path = p(i);
                let name = path.pop().unwrap_or_default();
                path.push([WHITEOUT, &name].concat());
                (path, EntryKind::File { size: 0, content: 0 })
            }
            Op::Opaque(i) => {
                let mut path = p(i);
                path.push(OPAQUE.to_vec());
                (path, EntryKind::File { size: 0, content: 0 })
            }
        };
        Entry { path, kind, meta }
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<usize>(), 0..4u64).prop_map(|(p, c)| Op::File(p, c)),
        2 => any::<usize>().prop_map(Op::Dir),
        1 => any::<usize>().prop_map(Op::Fifo),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(p, t)| Op::Link(p, t)),
        3 => any::<usize>().prop_map(Op::Whiteout),
        1 => any::<usize>().prop_map(Op::Opaque),
    ]
}

/// Names, types, file contents and hard-link groups, plus `!layer/op` for each refused entry
/// (a hard link to nothing or to a directory), by its position in the generated layer.
fn merge(layers: &[Vec<(usize, Op)>]) -> BTreeMap<String, String> {
    let all = paths();
    let mut t = MergedTree::new();
    let mut out = BTreeMap::new();
    for (i, ops) in layers.iter().enumerate() {
        t.begin_layer(i as u32);
        for (k, op) in ops {
            if t.apply(op.entry(&all)).is_err() {
                out.insert(format!("!{i}/{k}"), "refused".to_owned());
            }
        }
    }
    let mut first_name: BTreeMap<usize, String> = BTreeMap::new();
    let mut stack = vec![(0usize, String::new())];
    while let Some((id, prefix)) = stack.pop() {
        let Some(children) = t.children(id) else {
            continue;
        };
        for (name, ch) in children {
            let path = format!("{prefix}/{}", String::from_utf8_lossy(name));
            let desc = match &t.nodes[ch.id].kind {
                MKind::Dir(_) => {
                    stack.push((ch.id, path.clone()));
                    "dir".to_owned()
                }
                MKind::Other(k) => {
                    let group = first_name.entry(ch.id).or_insert_with(|| path.clone());
                    format!("{k:?} #{group}")
                }
            };
            out.insert(path, desc);
        }
    }
    out
}

/// A layer that makes a path a non-directory and also puts entries or an opaque marker below
/// it says two things of one path: only the order decides which wins, and moving whiteouts
/// changes that order. Such layers are invalid (a tar of one directory tree cannot hold
/// them): the ops that would make one are dropped.
fn valid_only(layers: Vec<Vec<Op>>) -> Vec<Vec<Op>> {
    let all = paths();
    let at = |i: &usize| all[i % all.len()].clone();
    // (non-directory path, path below which entries go / marker directory)
    let parts = |op: &Op| -> (Option<String>, Option<String>) {
        match op {
            Op::File(p, _) | Op::Fifo(p) | Op::Link(p, _) => (Some(at(p)), Some(at(p))),
            Op::Dir(p) => (None, Some(at(p))),
            Op::Opaque(d) => (None, Some(format!("{}/.wh..wh..opq", at(d)))),
            Op::Whiteout(_) => (None, None),
        }
    };
    let clash = |a: &Op, b: &Op| {
        let (fa, pa) = parts(a);
        let (fb, pb) = parts(b);
        let below = |f: &Option<String>, p: &Option<String>| match (f, p) {
            (Some(f), Some(p)) => p.starts_with(&format!("{f}/")),
            _ => false,
        };
        below(&fa, &pb) || below(&fb, &pa)
    };
    layers
        .into_iter()
        .map(|ops| {
            let mut kept: Vec<Op> = Vec::new();
            for op in ops {
                if !kept.iter().any(|k| clash(k, &op)) {
                    kept.push(op);
                }
            }
            kept
        })
        .collect()
}

/// Each layer's ops numbered; whiteouts moved to its start (`Some(true)`) or end
/// (`Some(false)`), otherwise in order.
fn reorder(layers: &[Vec<Op>], first: Option<bool>) -> Vec<Vec<(usize, Op)>> {
    layers
        .iter()
        .map(|ops| {
            let numbered = ops.iter().cloned().enumerate();
            let Some(first) = first else {
                return numbered.collect();
            };
            let (wh, rest): (Vec<_>, Vec<_>) = numbered.partition(|(_, o)| o.is_whiteout());
            if first {
                wh.into_iter().chain(rest).collect()
            } else {
                rest.into_iter().chain(wh).collect()
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn whiteouts_mean_the_same_wherever_they_stand(
        layers in prop::collection::vec(prop::collection::vec(op(), 0..14), 1..4)
            .prop_map(valid_only)
    ) {
        let as_given = merge(&reorder(&layers, None));
        prop_assert_eq!(&merge(&reorder(&layers, Some(true))), &as_given, "whiteouts first");
        prop_assert_eq!(&merge(&reorder(&layers, Some(false))), &as_given, "whiteouts last");
    }
}
