//! A proptest model of repair: random writes and discards through diskkit's driver, random
//! damage to the refcounts, then diskkit's repair; the image must read exactly as the model and
//! `qemu-img check` must be clean (and agree with diskkit's counts before the repair).

mod qcow2_support;

use diskkit::formats::qcow2::{self, Repair};
use diskkit::{DiskImage, OpenOptions};
use proptest::prelude::*;
use qcow2_support::*;

/// One random change to a refcount structure.
#[derive(Debug, Clone)]
enum Damage {
    /// Set the refcount of the n-th cluster of the file (modulo its length) to a value.
    Refcount(u64, u16),
    /// Append clusters counted as used.
    LeakAtEnd(u64),
    /// Drop the first refcount block's pointer.
    DropBlock,
    /// Set the dirty bit.
    Dirty,
}

fn damage_strategy() -> impl Strategy<Value = Damage> {
    prop_oneof![
        6 => (any::<u64>(), 0u16..4).prop_map(|(c, v)| Damage::Refcount(c, v)),
        2 => (1u64..4).prop_map(Damage::LeakAtEnd),
        1 => Just(Damage::DropBlock),
        1 => Just(Damage::Dirty),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64, u8),
    Discard(u64, u64),
    Flush,
}

fn op_strategy(size: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..size, 1u64..200_000, 1u8..255).prop_map(move |(o, l, b)| Op::Write(o, l.min(size - o), b)),
        2 => (0..size / 4096, 1u64..64).prop_map(move |(o, l)| {
            let o = o * 4096;
            Op::Discard(o, (l * 4096).min(size - o))
        }),
        1 => Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random writes and discards through diskkit's driver, random refcount damage, repair:
    /// the image reads exactly as the model and qemu-img check is clean.
    #[test]
    fn repair_after_random_damage_keeps_the_data(
        cluster_bits in prop_oneof![Just(9u32), Just(12), Just(16)],
        ops in proptest::collection::vec(op_strategy(4 << 20), 1..30),
        damages in proptest::collection::vec(damage_strategy(), 1..6),
    ) {
        let size = 4u64 << 20;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.qcow2");
        let options = diskkit::CreateOptions::new(diskkit::ImageFormat::Qcow2, size)
            .cluster_size(1 << cluster_bits);
        let image = DiskImage::create(&path, &options).unwrap();
        let mut model = vec![0u8; size as usize];
        for op in &ops {
            match *op {
                Op::Write(o, l, b) => {
                    let data = vec![b; l as usize];
                    image.write_at(&data, o).unwrap();
                    model[o as usize..(o + l) as usize].fill(b);
                }
                Op::Discard(o, l) => {
                    image.write_zeroes(o, l, true).unwrap();
                    model[o as usize..(o + l) as usize].fill(0);
                }
                Op::Flush => image.flush().unwrap(),
            }
        }
        image.flush().unwrap();
        drop(image);
        assert_qemu_clean(&path);
        let g = geo(&path);
        let per_block = g.cs / 2;
        for d in &damages {
            let block = be(&pread(&path, g.reftable, 8), 0, 8);
            match *d {
                Damage::Refcount(..) | Damage::LeakAtEnd(_) if block == 0 => {}
                Damage::Refcount(c, v) => {
                    let clusters = std::fs::metadata(&path).unwrap().len().div_ceil(g.cs);
                    let c = c % clusters.min(per_block);
                    set_refcount(&path, c, v);
                }
                Damage::LeakAtEnd(n) => {
                    let len = std::fs::metadata(&path).unwrap().len().next_multiple_of(g.cs);
                    if len / g.cs + n < per_block {
                        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                        f.set_len(len + n * g.cs).unwrap();
                        for i in 0..n {
                            set_refcount(&path, len / g.cs + i, 1);
                        }
                    }
                }
                Damage::DropBlock => pwrite(&path, g.reftable, &0u64.to_be_bytes()),
                Damage::Dirty => set_incompatible(&path, 1),
            }
        }
        // Counts and statistics as qemu-img check has them.
        assert_counts_agree(&path);
        let r = qcow2::check_file(&path, Repair::All).unwrap();
        prop_assert!(r.is_clean(), "{:#?}", r);
        assert_qemu_clean(&path);
        let image = DiskImage::open(&path, &OpenOptions::new()).unwrap();
        let mut back = vec![0u8; size as usize];
        image.read_at(&mut back, 0).unwrap();
        prop_assert!(back == model, "data changed by the repair");
    }
}
