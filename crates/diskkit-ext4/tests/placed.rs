//! File data the caller writes into the image first ([`ContentSource::placed`]), with the
//! writer laying out its metadata around it: e2fsck, debugfs contents and block bitmaps.

mod support;

use std::collections::HashMap;

use diskkit::{CreateOptions, DiskImage};
use diskkit_ext4::writer::{
    reserved_blocks, ContentSource, Metadata, Node, NodeKind, Options, PlacedRun, Plan, Tree,
};
use support::{debugfs, dump, e2fsck};

fn meta(mode: u16) -> Metadata {
    Metadata {
        mode,
        ..Metadata::default()
    }
}

/// Contents already in the image: token → runs, plus the bytes for the checks.
#[derive(Default)]
struct Placed {
    runs: HashMap<u64, Vec<PlacedRun>>,
    bytes: HashMap<u64, Vec<u8>>,
}

impl ContentSource for Placed {
    fn read_content(&mut self, content: u64, _: u64, _: &mut [u8]) -> diskkit::Result<()> {
        panic!("placed content {content} must not be read back");
    }

    fn placed(&mut self, content: u64, _size: u64) -> diskkit::Result<Option<Vec<PlacedRun>>> {
        Ok(self.runs.get(&content).cloned())
    }
}

fn run(logical: u64, physical: u64, len: u64) -> PlacedRun {
    PlacedRun {
        logical,
        physical,
        len,
    }
}

/// Bytes of `len` blocks seeded by `seed` (never all zero).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(31).wrapping_add(seed * 7 + 1) as u8 | 1)
        .collect()
}

struct Case {
    tree: Tree,
    source: Placed,
    /// Blocks between placed runs that nothing uses (as a deleted file leaves them).
    gaps: Vec<(u64, u64)>,
}

/// A tree whose files sit at fixed blocks from `base` on: one contiguous file (hard-linked
/// twice), one in two fragments, one sparse, one in six fragments (an extent block), with
/// free gaps between them, and 3000 directories so the metadata spills past the data.
fn case(base: u64) -> Case {
    let mut t = Tree::new(meta(0o755));
    let mut source = Placed::default();
    let mut add_file =
        |t: &mut Tree, dir: usize, name: &str, content: u64, size: u64, runs: Vec<PlacedRun>| {
            let id = t.add(Node {
                kind: NodeKind::File { size, content },
                meta: meta(0o644),
            });
            t.link(dir, name.as_bytes(), id).unwrap();
            source.runs.insert(content, runs);
            id
        };
    // a: 11 blocks (the last one partial) at base.
    let a = add_file(&mut t, 0, "a", 1, 10 * 4096 + 100, vec![run(0, base, 11)]);
    t.link(0, b"a-link", a).unwrap();
    // gap [base+11, base+16)
    add_file(
        &mut t,
        0,
        "b",
        2,
        6 * 4096,
        vec![run(0, base + 16, 3), run(3, base + 80, 3)],
    );
    // c: 10 MiB with data in logical blocks 0 and 2000 only.
    add_file(
        &mut t,
        0,
        "c",
        3,
        10 << 20,
        vec![run(0, base + 19, 1), run(2000, base + 30, 1)],
    );
    // d: six one-block fragments, every other block from base + 40.
    let d_runs = (0..6).map(|i| run(i, base + 40 + 2 * i, 1)).collect();
    add_file(&mut t, 0, "d", 4, 6 * 4096, d_runs);
    let dirs = t.add(Node {
        kind: NodeKind::Directory(vec![]),
        meta: meta(0o755),
    });
    t.link(0, b"dirs", dirs).unwrap();
    for i in 0..3000 {
        let id = t.add(Node {
            kind: NodeKind::Directory(vec![]),
            meta: meta(0o755),
        });
        t.link(dirs, format!("d{i}").as_bytes(), id).unwrap();
    }
    Case {
        tree: t,
        source,
        gaps: vec![(base + 11, 5), (base + 20, 10), (base + 31, 9), (base + 52, 28)],
    }
}

/// Write the placed bytes of `case` into `image` and return each file's expected content.
fn place(case: &mut Case, image: &DiskImage, sizes: &[(u64, u64)]) {
    for &(content, size) in sizes {
        let mut whole = vec![0u8; size as usize];
        for r in &case.source.runs[&content] {
            let data = pattern(content * 100 + r.logical, (r.len * 4096) as usize);
            let start = (r.logical * 4096) as usize;
            let end = (start + data.len()).min(whole.len());
            whole[start..end].copy_from_slice(&data[..end - start]);
            image.write_at(&data[..end - start], r.physical * 4096).unwrap();
        }
        case.source.bytes.insert(content, whole);
    }
}

const SIZES: [(u64, u64); 4] = [(1, 10 * 4096 + 100), (2, 6 * 4096), (3, 10 << 20), (4, 6 * 4096)];

#[test]
fn placed_files_with_metadata_around_them() {
    for (csum, size) in [(false, None), (true, None), (false, Some(256u64 << 20))] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        // The data starts where a filesystem of the largest size could need descriptors.
        let base = reserved_blocks(size.map_or(u64::from(u32::MAX), |s| s / 4096));
        let mut c = case(base);
        let provisional = size.unwrap_or(64 << 20);
        let pending = DiskImage::create_pending(&img, &CreateOptions::raw(provisional)).unwrap();
        place(&mut c, pending.image(), &SIZES);
        let options = Options {
            size,
            metadata_csum: csum,
            uuid: [7; 16],
            ..Options::default()
        };
        let plan = Plan::new_sparse(&c.tree, options, &mut c.source).unwrap();
        if size.is_none() {
            pending.image().resize(plan.size_bytes()).unwrap();
        }
        plan.write(pending.image(), &mut c.source).unwrap();
        pending.persist().unwrap();
        e2fsck(&img);
        support::read_back(&img);
        for (name, content) in [("a", 1), ("a-link", 1), ("b", 2), ("c", 3), ("d", 4)] {
            assert!(dump(&img, name) == c.source.bytes[&content], "{name}");
        }
        let st = debugfs(&img, "stat a");
        assert!(st.contains("Links: 2"), "{st}");
        // c: two data blocks, holes elsewhere; d: six blocks and one extent block.
        assert!(debugfs(&img, "stat c").contains("Blockcount: 16\n"));
        assert!(debugfs(&img, "stat d").contains("Blockcount: 56\n"));
        assert_eq!(debugfs(&img, "bmap d 5").trim(), (base + 50).to_string());
        // 3000 directory blocks do not fit below the data: they fill the gaps between the
        // placed runs (first fit) and continue past the data.
        let mut gap_used = 0;
        for &(start, len) in &c.gaps {
            let out = debugfs(&img, &format!("testb {start} {len}"));
            gap_used += out.matches("marked in use").count();
            assert_eq!(out.lines().count() as u64, len, "{out}");
        }
        let last: u64 = debugfs(&img, "bmap dirs/d999 0").trim().parse().unwrap();
        if size.is_none() {
            assert_eq!(gap_used, 52, "every gap block is taken");
            assert!(last > base + 86, "{last}");
        } else {
            // With a fixed 256 MiB the descriptors need one block: the data starts at block 2
            // and everything else lands around it.
            assert!(gap_used > 0);
        }
    }
}

#[test]
fn the_gap_below_placed_data_takes_the_metadata_first() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    let mut t = Tree::new(meta(0o755));
    let id = t.add(Node {
        kind: NodeKind::File {
            size: 4096,
            content: 9,
        },
        meta: meta(0o644),
    });
    t.link(0, b"f", id).unwrap();
    let base = reserved_blocks(u64::from(u32::MAX));
    let mut source = Placed::default();
    source.runs.insert(9, vec![run(0, base, 1)]);
    let plan = Plan::new_sparse(&t, Options::default(), &mut source).unwrap();
    let pending = DiskImage::create_pending(&img, &CreateOptions::raw(plan.size_bytes())).unwrap();
    pending.image().write_at(&pattern(9, 4096), base * 4096).unwrap();
    plan.write(pending.image(), &mut source).unwrap();
    pending.persist().unwrap();
    e2fsck(&img);
    assert!(dump(&img, "f") == pattern(9, 4096));
    // Bitmaps, the inode table and the root directory all fit below the data.
    let root = debugfs(&img, "bmap / 0");
    assert!(root.trim().parse::<u64>().unwrap() < base, "{root}");
    assert!(plan.size_bytes() < (base + 1024) * 4096);
}

#[test]
fn bad_placements_are_refused() {
    let mut t = Tree::new(meta(0o755));
    for (name, content) in [("x", 1u64), ("y", 2)] {
        let id = t.add(Node {
            kind: NodeKind::File { size: 8192, content },
            meta: meta(0o644),
        });
        t.link(0, name.as_bytes(), id).unwrap();
    }
    let plan = |runs: Vec<(u64, Vec<PlacedRun>)>, size: Option<u64>| {
        let mut s = Placed::default();
        s.runs.extend(runs);
        Plan::new_sparse(
            &t,
            Options {
                size,
                ..Options::default()
            },
            &mut s,
        )
        .map(|_| ())
    };
    assert!(plan(vec![(1, vec![run(0, 100, 2)]), (2, vec![run(0, 102, 2)])], None).is_ok());
    // On the superblock, overlapping another file, overlapping itself, past the file's end,
    // past a fixed size, an empty run.
    assert!(plan(vec![(1, vec![run(0, 0, 2)])], None).is_err());
    assert!(plan(vec![(1, vec![run(0, 100, 2)]), (2, vec![run(0, 101, 2)])], None).is_err());
    assert!(plan(vec![(1, vec![run(1, 100, 1), run(0, 100, 1)])], None).is_err());
    assert!(plan(vec![(1, vec![run(0, 100, 3)])], None).is_err());
    assert!(plan(vec![(1, vec![run(0, 1 << 20, 2)])], Some(64 << 20)).is_err());
    assert!(plan(vec![(1, vec![run(0, 100, 0)])], None).is_err());
}
