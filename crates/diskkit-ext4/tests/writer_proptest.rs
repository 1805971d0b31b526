//! Model test: random trees written by the writer, then read back with debugfs and checked by
//! e2fsck.

mod support;

use std::collections::BTreeMap;

use diskkit::ImageFormat;
use diskkit_ext4::writer::{Metadata, Node, NodeKind, Options, Tree};
use proptest::prelude::*;
use support::{build, debugfs, e2fsck, Contents};

/// A generated entry: parent directory index (into the directories made so far), and kind.
#[derive(Clone, Debug)]
enum Gen {
    Dir(usize, u16),
    File(usize, Vec<u8>, u16, u32),
    Symlink(usize, usize),
    HardLink(usize, usize),
    Fifo(usize),
}

fn gen() -> impl Strategy<Value = Gen> {
    prop_oneof![
        (any::<usize>(), 0u16..0o7777).prop_map(|(p, m)| Gen::Dir(p, m)),
        (
            any::<usize>(),
            prop::collection::vec(any::<u8>(), 0..9000),
            0u16..0o7777,
            any::<u32>()
        )
            .prop_map(|(p, d, m, u)| Gen::File(p, d, m, u)),
        (any::<usize>(), 1usize..300).prop_map(|(p, n)| Gen::Symlink(p, n)),
        (any::<usize>(), any::<usize>()).prop_map(|(p, t)| Gen::HardLink(p, t)),
        any::<usize>().prop_map(Gen::Fifo),
    ]
}

/// Expected: path -> (debugfs mode string, size, uid, link target / content).
type Expect = BTreeMap<String, (String, u64, u32, Vec<u8>)>;

fn realize(gens: &[Gen], contents: &mut Contents) -> (Tree, Expect, BTreeMap<String, u32>) {
    let mut tree = Tree::new(Metadata {
        mode: 0o755,
        ..Metadata::default()
    });
    let mut dirs: Vec<(usize, String)> = vec![(Tree::ROOT, String::new())];
    let mut files: Vec<(usize, String)> = Vec::new();
    let mut expect = Expect::new();
    let mut links: BTreeMap<String, u32> = BTreeMap::new();
    for (i, g) in gens.iter().enumerate() {
        let name = format!("n{i}");
        let pick = |p: usize| dirs[p % dirs.len()].clone();
        let (parent, ppath) = match g {
            Gen::Dir(p, _) | Gen::File(p, ..) | Gen::Symlink(p, _) | Gen::HardLink(p, _) | Gen::Fifo(p) => {
                pick(*p)
            }
        };
        let path = if ppath.is_empty() {
            name.clone()
        } else {
            format!("{ppath}/{name}")
        };
        let meta = |mode: u16, uid: u32| Metadata {
            mode,
            uid,
            ..Metadata::default()
        };
        match g {
            Gen::Dir(_, m) => {
                let id = tree.add(Node {
                    kind: NodeKind::Directory(vec![]),
                    meta: meta(*m, 0),
                });
                tree.link(parent, name.as_bytes(), id).unwrap();
                dirs.push((id, path.clone()));
                expect.insert(path, (format!("04{m:04o}"), 0, 0, vec![]));
            }
            Gen::File(_, data, m, uid) => {
                let c = contents.add(data.clone());
                let id = tree.add(Node {
                    kind: NodeKind::File {
                        size: data.len() as u64,
                        content: c,
                    },
                    meta: meta(*m, *uid),
                });
                tree.link(parent, name.as_bytes(), id).unwrap();
                files.push((id, path.clone()));
                links.insert(path.clone(), 1);
                expect.insert(
                    path,
                    (format!("10{m:04o}"), data.len() as u64, *uid, data.clone()),
                );
            }
            Gen::Symlink(_, n) => {
                let target = vec![b'a' + (*n % 26) as u8; *n];
                let id = tree.add(Node {
                    kind: NodeKind::Symlink(target.clone()),
                    meta: meta(0o777, 0),
                });
                tree.link(parent, name.as_bytes(), id).unwrap();
                expect.insert(path, ("120777".into(), *n as u64, 0, target));
            }
            Gen::HardLink(_, t) => {
                if files.is_empty() {
                    continue;
                }
                let (id, tpath) = files[t % files.len()].clone();
                tree.link(parent, name.as_bytes(), id).unwrap();
                let e = expect[&tpath].clone();
                expect.insert(path.clone(), e);
                // Every name of the inode gets one more link.
                let same: Vec<String> = files.iter().filter(|f| f.0 == id).map(|f| f.1.clone()).collect();
                files.push((id, path.clone()));
                let n = same.len() as u32 + 1;
                for s in same.iter().chain(std::iter::once(&path)) {
                    links.insert(s.clone(), n);
                }
            }
            Gen::Fifo(_) => {
                let id = tree.add(Node {
                    kind: NodeKind::Fifo,
                    meta: meta(0o600, 0),
                });
                tree.link(parent, name.as_bytes(), id).unwrap();
                expect.insert(path, ("010600".into(), 0, 0, vec![]));
            }
        }
    }
    (tree, expect, links)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_read_back(gens in prop::collection::vec(gen(), 1..40), csum in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        let mut contents = Contents::default();
        let (tree, expect, links) = realize(&gens, &mut contents);
        let options = Options { metadata_csum: csum, uuid: [3; 16], ..Options::default() };
        build(&tree, &mut contents, &img, ImageFormat::Raw, options);
        e2fsck(&img);
        // Walk the image with debugfs.
        let mut seen = Expect::new();
        let mut stack = vec![String::new()];
        while let Some(d) = stack.pop() {
            for line in debugfs(&img, &format!("ls -p /{d}")).lines() {
                let f: Vec<&str> = line.split('/').collect();
                if f.len() < 7 || f[5] == "." || f[5] == ".." || (d.is_empty() && f[5] == "lost+found") {
                    continue;
                }
                let path = if d.is_empty() { f[5].to_owned() } else { format!("{d}/{}", f[5]) };
                let mode = f[2].to_owned();
                // debugfs prints ids as signed 32-bit numbers.
                let uid = f[3].parse::<i64>().unwrap() as u32;
                let mut size: u64 = f[6].parse().unwrap_or(0);
                let mut data = vec![];
                if mode.starts_with("04") {
                    stack.push(path.clone());
                    size = 0;
                } else if mode.starts_with("10") {
                    data = support::dump(&img, &format!("/{path}"));
                    let st = debugfs(&img, &format!("stat /{path}"));
                    prop_assert!(st.contains(&format!("Links: {}", links[&path])), "{path}: {st}");
                } else if mode.starts_with("12") {
                    // Fast symlinks: debugfs prints the target in stat (dump would read
                    // i_block as block numbers); slow ones are dumped.
                    let st = debugfs(&img, &format!("stat /{path}"));
                    data = match st.split("Fast link dest: \"").nth(1) {
                        Some(rest) => rest.split('"').next().unwrap_or("").as_bytes().to_vec(),
                        None => support::dump(&img, &format!("/{path}")),
                    };
                }
                seen.insert(path, (mode, size, uid, data));
            }
        }
        prop_assert_eq!(seen, expect);
    }
}
