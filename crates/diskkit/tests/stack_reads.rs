//! Reads through stacks at random offsets and lengths, against a model: sparse RAW bases (whose
//! holes large reads skip), ASIF overlays with partially written chunks, qcow2 overlays and a
//! cache layer, read through the stack as built and after reopening it read-only.

use diskkit::{CreateOptions, DiskImage, ImageFormat, LayerOptions, OpenOptions, ParentPolicy};
use proptest::prelude::*;

const SIZE: u64 = 4 << 20;

#[derive(Debug, Clone)]
enum Change {
    Write { offset: u64, len: u64, seed: u8 },
    Discard { offset: u64, len: u64 },
}

#[derive(Debug, Clone)]
struct LayerPlan {
    format: ImageFormat,
    chunk: u32,
    cache: bool,
    changes: Vec<Change>,
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => 0..SIZE,
        2 => (0..SIZE / 4096).prop_map(|b| b * 4096),
        1 => (0..SIZE / (128 << 10)).prop_map(|c| c * (128 << 10)),
    ]
}

fn length() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => 1u64..8192,
        2 => (1u64..64).prop_map(|b| b * 4096),
        3 => (100u64 << 10)..(1536 << 10),
    ]
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => (offset(), length(), any::<u8>()).prop_map(|(offset, len, seed)| Change::Write { offset, len, seed }),
        1 => (offset(), length()).prop_map(|(offset, len)| Change::Discard { offset, len }),
    ]
}

fn layer_plan() -> impl Strategy<Value = LayerPlan> {
    (
        prop_oneof![3 => Just(ImageFormat::Asif), 1 => Just(ImageFormat::Qcow2)],
        prop_oneof![Just(64u32 << 10), Just(256 << 10), Just(1 << 20)],
        prop::bool::weighted(0.2),
        prop::collection::vec(change(), 0..12),
    )
        .prop_map(|(format, chunk, cache, changes)| LayerPlan {
            format,
            chunk,
            cache,
            changes,
        })
}

fn pattern(len: usize, seed: u8, offset: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as u64).wrapping_mul(131).wrapping_add(offset + i as u64) as u8 | 1)
        .collect()
}

fn apply(image: &DiskImage, model: &mut [u8], change: &Change) {
    let (offset, len) = match *change {
        Change::Write { offset, len, .. } | Change::Discard { offset, len } => {
            (offset, len.min(SIZE - offset))
        }
    };
    let range = offset as usize..(offset + len) as usize;
    match *change {
        Change::Write { seed, .. } => {
            let data = pattern(len as usize, seed, offset);
            image.write_at(&data, offset).unwrap();
            model[range].copy_from_slice(&data);
        }
        Change::Discard { .. } => {
            image.discard(offset, len).unwrap();
            model[range].fill(0);
        }
    }
}

fn check_reads(image: &DiskImage, model: &[u8], reads: &[(u64, u64)], what: &str) {
    for &(offset, len) in reads {
        let len = len.min(SIZE - offset);
        let mut buf = vec![0x5a; len as usize];
        image.read_at(&mut buf, offset).unwrap();
        let want = &model[offset as usize..(offset + len) as usize];
        if let Some(i) = buf.iter().zip(want).position(|(a, b)| a != b) {
            panic!(
                "{what}: read {offset}+{len}: byte {} is {:#x}, model says {:#x}",
                offset + i as u64,
                buf[i],
                want[i]
            );
        }
    }
}

fn run(base_format: ImageFormat, base: &[Change], layers: &[LayerPlan], reads: &[(u64, u64)]) {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join(format!("base.{base_format}"));
    let mut model = vec![0u8; SIZE as usize];
    {
        let image = DiskImage::create(&base_path, &CreateOptions::new(base_format, SIZE)).unwrap();
        for c in base {
            apply(&image, &mut model, c);
        }
        image.flush().unwrap();
    }
    let same_dir = OpenOptions::new().parents(ParentPolicy::same_directory());
    let mut stack = DiskImage::open(&base_path, &OpenOptions::new()).unwrap();
    let mut has_cache = false;
    for (i, plan) in layers.iter().enumerate() {
        let cache = plan.cache && !has_cache;
        has_cache |= cache;
        let kind = if cache {
            LayerOptions::cache()
        } else {
            LayerOptions::overlay()
        };
        let path = dir.path().join(format!("layer{i}.{}", plan.format));
        stack
            .append_new(&path, &kind.format(plan.format).chunk_size(plan.chunk))
            .unwrap();
        for c in &plan.changes {
            apply(&stack, &mut model, c);
        }
    }
    check_reads(&stack, &model, reads, "read-write stack");
    stack.flush().unwrap();
    let top = stack.path().unwrap().to_path_buf();
    drop(stack);
    let reopened = DiskImage::open(&top, &same_dir).unwrap();
    check_reads(&reopened, &model, reads, "reopened read-only");
    // A second pass reads what a cache layer kept on the first.
    check_reads(&reopened, &model, reads, "reopened, second pass");
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn random_reads_through_stacks_match_the_model(
        base_format in prop_oneof![3 => Just(ImageFormat::Raw), 1 => Just(ImageFormat::Asif), 1 => Just(ImageFormat::Qcow2)],
        base in prop::collection::vec(change(), 0..16),
        layers in prop::collection::vec(layer_plan(), 0..4),
        reads in prop::collection::vec((offset(), length()), 1..24),
    ) {
        run(base_format, &base, &layers, &reads);
    }
}

/// A RAW base with data and holes in 1 MiB pieces under two overlays, read in 1 MiB and
/// unaligned pieces: the layout of `scripts/bench-stack.sh`, small.
#[test]
fn sparse_raw_base_under_overlays() {
    let base: Vec<Change> = (0..SIZE / (1 << 20))
        .step_by(2)
        .map(|c| Change::Write {
            offset: c << 20,
            len: 1 << 20,
            seed: c as u8,
        })
        .collect();
    let layer = |offset: u64, len: u64, seed: u8| LayerPlan {
        format: ImageFormat::Asif,
        chunk: 256 << 10,
        cache: false,
        changes: vec![Change::Write { offset, len, seed }],
    };
    let layers = [
        layer(700 << 10, 1 << 20, 9),
        layer((2 << 20) + 4096, 300 << 10, 10),
    ];
    let mut reads: Vec<(u64, u64)> = (0..SIZE >> 20).map(|c| (c << 20, 1 << 20)).collect();
    reads.extend([(4096, 3 << 20), ((1 << 20) - 512, 1 << 20), (3 << 20, 1 << 20)]);
    run(ImageFormat::Raw, &base, &layers, &reads);
}
