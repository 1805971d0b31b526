//! Replays the fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz entry points.

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        f(&data);
        n += 1;
    }
    assert!(n > 0, "empty corpus in {}", dir.display());
}

#[test]
fn partition_table_corpus() {
    replay("partition_table", diskkit_ext4::read::fuzzing::partition_table);
}

#[test]
fn pe_sections_corpus() {
    replay("pe_sections", diskkit_ext4::read::fuzzing::pe_sections);
}

#[test]
fn ext4_read_corpus() {
    replay("ext4_read", diskkit_ext4::read::fuzzing::ext4_read);
}

/// Every seed filesystem opens and lists its root (so the mutations below start from images
/// the reader accepts), and 1000 random mutations of each, bytes flipped mostly in the first
/// 64 KiB (superblock, descriptors, inode tables, directories, extent and journal blocks),
/// never panic, hang or allocate without bound.
#[test]
fn ext4_read_mutations() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/ext4_read");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 6, "{} seeds", seeds.len());
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for seed in &seeds {
        let data = std::fs::read(seed).unwrap();
        let fs = diskkit_ext4::read::fs::Fs::open(std::sync::Arc::new(data.clone()))
            .unwrap_or_else(|e| panic!("{}: {e}", seed.display()));
        let root = fs.inode(2).unwrap();
        assert!(fs.read_dir(&root).unwrap().len() > 3, "{}", seed.display());
        for _ in 0..1000 {
            let mut m = data.clone();
            let flips = 1 + next() % 8;
            for _ in 0..flips {
                let r = next();
                let at = if r % 4 == 0 {
                    (r >> 8) as usize % m.len()
                } else {
                    (r >> 8) as usize % m.len().min(64 << 10)
                };
                m[at] ^= 1 << ((r >> 4) % 8);
            }
            diskkit_ext4::read::fuzzing::ext4_read(&m);
        }
    }
}
