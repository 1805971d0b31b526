//! Randomised model tests: every format against a flat in-memory byte model.
//!
//! Random sequences of write / write-zeroes / discard / resize / flush / reopen run on an image
//! in memory storage and on a `Vec<u8>`; every read must agree. A second test cuts the power
//! (keeping a random subset of unsynced sector writes) and checks that the image still opens
//! and that everything flushed and not touched since is intact.

use std::sync::Arc;

use diskkit::storage::{Fault, MemStorage, Storage};
use diskkit::{CreateOptions, DiskImage, ImageFormat, OpenMode, OpenOptions};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: u64, seed: u8 },
    Zero { offset: u64, len: u64, unmap: bool },
    Resize { size: u64 },
    Flush,
    Reopen,
}

#[derive(Debug, Clone, Copy)]
struct Config {
    format: ImageFormat,
    block: u32,
    chunk: u32,
}

fn op_strategy(max: u64, block: u64) -> impl Strategy<Value = Op> {
    // Offsets cluster around chunk/block boundaries often, and are arbitrary bytes sometimes.
    let offset = prop_oneof![
        3 => 0..max,
        2 => (0..max / block).prop_map(move |b| b * block),
        1 => (0..max / 65536).prop_map(|c| c * 65536),
    ];
    let len = prop_oneof![
        3 => 1u64..5000,
        2 => (1u64..64).prop_map(move |b| b * block),
        1 => 1u64..(600 << 10),
    ];
    prop_oneof![
        6 => (offset.clone(), len.clone(), any::<u8>()).prop_map(|(offset, len, seed)| Op::Write { offset, len, seed }),
        2 => (offset, len, any::<bool>()).prop_map(|(offset, len, unmap)| Op::Zero { offset, len, unmap }),
        1 => (1..max / block).prop_map(move |b| Op::Resize { size: b * block }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn pattern(len: usize, seed: u8, offset: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as u64).wrapping_mul(31).wrapping_add(offset + i as u64) as u8 | 1)
        .collect()
}

fn open(storage: &Arc<MemStorage>, cfg: Config) -> DiskImage {
    let s: Arc<dyn Storage> = storage.clone();
    let mut opts = OpenOptions::new().mode(OpenMode::ReadWrite).format(cfg.format);
    if cfg.format == ImageFormat::Raw {
        opts = opts.raw_block_size(cfg.block);
    }
    DiskImage::open_storage(s, &opts).expect("reopen")
}

fn create(storage: &Arc<MemStorage>, cfg: Config, size: u64) -> DiskImage {
    let s: Arc<dyn Storage> = storage.clone();
    let mut opts = CreateOptions::new(cfg.format, size).block_size(cfg.block);
    if cfg.format == ImageFormat::Qcow2 {
        // For qcow2 the "chunk" is the cluster size.
        opts = opts.cluster_size(cfg.chunk);
    } else {
        opts = opts.chunk_size(cfg.chunk);
    }
    DiskImage::create_on(s, &opts).expect("create")
}

fn check_all(image: &DiskImage, model: &[u8]) {
    assert_eq!(image.size(), model.len() as u64, "size");
    let mut buf = vec![0u8; model.len()];
    image.read_at(&mut buf, 0).expect("read");
    if let Some(i) = buf.iter().zip(model).position(|(a, b)| a != b) {
        panic!(
            "first difference at byte {i}: image {:#x}, model {:#x}",
            buf[i], model[i]
        );
    }
    // The allocation map must agree with the content where it claims zeroes.
    for e in image.extents(0, model.len() as u64).expect("extents") {
        if e.reads_as_zero() {
            let r = &model[e.offset as usize..e.end() as usize];
            assert!(r.iter().all(|&b| b == 0), "extent {e:?} claims zeroes");
        }
    }
}

fn clamp(offset: u64, len: u64, size: u64) -> Option<(u64, u64)> {
    if offset >= size {
        return None;
    }
    Some((offset, len.min(size - offset)))
}

fn run(cfg: Config, initial: u64, ops: &[Op]) {
    let storage = Arc::new(MemStorage::new());
    let mut image = create(&storage, cfg, initial);
    let mut model = vec![0u8; initial as usize];
    for op in ops {
        match *op {
            Op::Write { offset, len, seed } => {
                let Some((o, l)) = clamp(offset, len, model.len() as u64) else {
                    continue;
                };
                let data = pattern(l as usize, seed, o);
                image.write_at(&data, o).expect("write");
                model[o as usize..(o + l) as usize].copy_from_slice(&data);
            }
            Op::Zero { offset, len, unmap } => {
                let Some((o, l)) = clamp(offset, len, model.len() as u64) else {
                    continue;
                };
                image.write_zeroes(o, l, unmap).expect("zero");
                model[o as usize..(o + l) as usize].fill(0);
            }
            Op::Resize { size } => {
                image.resize(size).expect("resize");
                model.resize(size as usize, 0);
            }
            Op::Flush => image.flush().expect("flush"),
            Op::Reopen => {
                image.flush().expect("flush");
                drop(image);
                image = open(&storage, cfg);
            }
        }
        let probe = (model.len() / 3) as u64;
        let mut b = vec![0u8; 4096.min(model.len() - probe as usize)];
        image.read_at(&mut b, probe).expect("probe read");
        assert_eq!(
            &b[..],
            &model[probe as usize..probe as usize + b.len()],
            "after {op:?}"
        );
    }
    check_all(&image, &model);
    image.flush().expect("flush");
    drop(image);
    check_all(&open(&storage, cfg), &model);
}

const CONFIGS: [Config; 8] = [
    Config {
        format: ImageFormat::Raw,
        block: 512,
        chunk: 1 << 20,
    },
    Config {
        format: ImageFormat::Asif,
        block: 512,
        chunk: 64 << 10,
    },
    Config {
        format: ImageFormat::Asif,
        block: 4096,
        chunk: 256 << 10,
    },
    Config {
        format: ImageFormat::Asif,
        block: 512,
        chunk: 1 << 20,
    },
    Config {
        format: ImageFormat::Asif,
        block: 4096,
        chunk: 1 << 20,
    },
    Config {
        format: ImageFormat::Qcow2,
        block: 512,
        chunk: 512,
    },
    Config {
        format: ImageFormat::Qcow2,
        block: 512,
        chunk: 4096,
    },
    Config {
        format: ImageFormat::Qcow2,
        block: 512,
        chunk: 64 << 10,
    },
];

fn cases() -> u32 {
    std::env::var("DISKKIT_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn formats_match_the_model(
        which in 0usize..CONFIGS.len(),
        blocks in 64u64..6000,
        ops in proptest::collection::vec(op_strategy(4 << 20, 512), 1..40),
    ) {
        let cfg = CONFIGS[which];
        let size = (blocks * 512).next_multiple_of(u64::from(cfg.block));
        let ops: Vec<Op> = ops.into_iter().map(|op| match op {
            Op::Resize { size } => Op::Resize { size: size.next_multiple_of(u64::from(cfg.block)) },
            other => other,
        }).collect();
        run(cfg, size, &ops);
    }

    #[test]
    fn power_loss_keeps_flushed_data(
        which in 1usize..CONFIGS.len(),
        ops in proptest::collection::vec(op_strategy(2 << 20, 512), 1..30),
        cut_at_sync in proptest::option::of(0u64..4),
        keep_seed in any::<u64>(),
    ) {
        power_loss(CONFIGS[which], &ops, cut_at_sync, keep_seed)?;
    }
}

/// Run `ops`; then cut the power, either now or (with `cut_at_sync`) in the middle of the last
/// flush, just before its n-th sync. Reopen and compare with the last completed flush.
fn power_loss(
    cfg: Config,
    ops: &[Op],
    cut_at_sync: Option<u64>,
    keep_seed: u64,
) -> Result<(), TestCaseError> {
    let size = 2u64 << 20;
    let storage = Arc::new(MemStorage::new());
    let image = create(&storage, cfg, size);
    image.flush().unwrap();
    storage.track_crashes();
    let mut model = vec![0u8; size as usize];
    let mut flushed = model.clone();
    let mut dirty = vec![false; size as usize];
    let mut cur_size = size;
    let mut flushed_size = size;
    for op in ops {
        match *op {
            Op::Write { offset, len, seed } => {
                let Some((o, l)) = clamp(offset, len, cur_size) else {
                    continue;
                };
                let data = pattern(l as usize, seed, o);
                image.write_at(&data, o).unwrap();
                model[o as usize..(o + l) as usize].copy_from_slice(&data);
                dirty[o as usize..(o + l) as usize].fill(true);
            }
            Op::Zero { offset, len, unmap } => {
                let Some((o, l)) = clamp(offset, len, cur_size) else {
                    continue;
                };
                image.write_zeroes(o, l, unmap).unwrap();
                model[o as usize..(o + l) as usize].fill(0);
                dirty[o as usize..(o + l) as usize].fill(true);
            }
            Op::Resize { size: s } => {
                let s = s.next_multiple_of(u64::from(cfg.block)).min(size);
                image.resize(s).unwrap();
                for i in s.min(cur_size)..size {
                    model[i as usize] = 0;
                    dirty[i as usize] = true;
                }
                cur_size = s;
            }
            Op::Flush | Op::Reopen => {
                image.flush().unwrap();
                flushed.clone_from(&model);
                dirty.fill(false);
                flushed_size = cur_size;
            }
        }
    }
    if let Some(n) = cut_at_sync {
        storage.inject(Fault::SyncsAfter(n));
        // The flush fails at the injected sync; the power goes out right there.
        let _ = image.flush();
    }
    // Keep each unsynced sector write with probability 1/2.
    let mut x = keep_seed | 1;
    let crashed = Arc::new(storage.crash(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x & 1 == 1
    }));
    let reopened = open(&crashed, cfg);
    let n = reopened.size().min(flushed_size) as usize;
    let mut buf = vec![0u8; n];
    reopened.read_at(&mut buf, 0).unwrap();
    for i in 0..n {
        if !dirty[i] {
            prop_assert_eq!(buf[i], flushed[i], "flushed byte {} lost", i);
        }
    }
    Ok(())
}

#[test]
fn crash_at_every_point_of_a_commit() {
    // For one workload, cut the power before each sync of a flush and keep every prefix of the
    // unsynced sector writes: each crashed image must open with the earlier flushed data.
    for cfg in &CONFIGS[1..] {
        for sync_index in 0..4u64 {
            let storage = Arc::new(MemStorage::new());
            let image = create(&storage, *cfg, 2 << 20);
            image.write_at(&[7u8; 100_000], 10_000).unwrap();
            image.write_at(&[8u8; 512], 600_000).unwrap();
            image.flush().unwrap();
            storage.track_crashes();
            image.write_at(&[9u8; 70_000], 300_000).unwrap();
            image.discard(0, 1 << 20).unwrap();
            image.write_at(&[5u8; 512], 1 << 20).unwrap();
            storage.inject(Fault::SyncsAfter(sync_index));
            let _ = image.flush();
            let pending = storage.pending_sectors();
            for prefix in prefixes(pending) {
                for skip_one in [false, true] {
                    let crashed = Arc::new(storage.crash(|i| i < prefix && !(skip_one && i + 1 == prefix)));
                    let img = open(&crashed, *cfg);
                    let mut b = vec![0u8; 512];
                    img.read_at(&mut b, 1 << 20).unwrap();
                    assert!(
                        b.iter().all(|&x| x == 5) || b.iter().all(|&x| x == 0),
                        "{cfg:?} sync {sync_index} prefix {prefix}"
                    );
                    let mut b = vec![0u8; 100_000];
                    img.read_at(&mut b, 10_000).unwrap();
                    // The discard may or may not have happened, but never half a table.
                    assert!(
                        b.iter().all(|&x| x == 7 || x == 0),
                        "{cfg:?} sync {sync_index} prefix {prefix}"
                    );
                }
            }
        }
    }
}

#[test]
fn flushed_data_survives_a_cut_in_the_next_flush() {
    // Data flushed earlier, in a chunk the next flush does not touch, must survive any cut.
    for cfg in &CONFIGS[1..] {
        for sync_index in 0..4u64 {
            let storage = Arc::new(MemStorage::new());
            let image = create(&storage, *cfg, 2 << 20);
            image.write_at(&[7u8; 4096], 1_500_000).unwrap();
            image.flush().unwrap();
            storage.track_crashes();
            image.write_at(&[9u8; 70_000], 0).unwrap();
            storage.inject(Fault::SyncsAfter(sync_index));
            let _ = image.flush();
            let pending = storage.pending_sectors();
            for prefix in prefixes(pending) {
                let crashed = Arc::new(storage.crash(|i| i < prefix));
                let img = open(&crashed, *cfg);
                let mut b = vec![0u8; 4096];
                img.read_at(&mut b, 1_500_000).unwrap();
                assert!(
                    b.iter().all(|&x| x == 7),
                    "{cfg:?} sync {sync_index} prefix {prefix}"
                );
            }
        }
    }
}

/// Crash points to try among `pending` sector writes: all of them when few, else an even spread
/// plus every point near the start and the end (where the directory writes are).
fn prefixes(pending: usize) -> Vec<usize> {
    if pending <= 200 {
        return (0..=pending).collect();
    }
    let mut v: Vec<usize> = (0..40).chain(pending - 40..=pending).collect();
    v.extend((0..pending).step_by(pending / 60));
    v.sort_unstable();
    v.dedup();
    v
}
