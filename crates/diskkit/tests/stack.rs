//! Stacked images: the stack rules, the parent policy, cache layers, and a randomised model
//! test of stacks of mixed formats with snapshots, restores, commits and reopens.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskkit::operations::stack as operations;
use diskkit::storage::{MemStorage, Storage};
use diskkit::{
    CreateOptions, DiskImage, ErrorKind, ExtentKind, ImageFormat, LayerOptions, LayerType, OpenOptions,
    ParentPolicy,
};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

/// Appending in the builder style DiskImageKit uses (`base.appending(layer)`).
trait Appending: Sized {
    fn with_new(self, path: impl AsRef<Path>, options: &LayerOptions) -> diskkit::Result<DiskImage>;
    fn with_new_on(self, storage: Arc<dyn Storage>, options: &LayerOptions) -> diskkit::Result<DiskImage>;
    fn with_existing(self, path: impl AsRef<Path>, options: &OpenOptions) -> diskkit::Result<DiskImage>;
}

impl Appending for DiskImage {
    fn with_new(mut self, path: impl AsRef<Path>, options: &LayerOptions) -> diskkit::Result<DiskImage> {
        self.append_new(path, options)?;
        Ok(self)
    }
    fn with_new_on(
        mut self,
        storage: Arc<dyn Storage>,
        options: &LayerOptions,
    ) -> diskkit::Result<DiskImage> {
        self.append_new_on(storage, options)?;
        Ok(self)
    }
    fn with_existing(mut self, path: impl AsRef<Path>, options: &OpenOptions) -> diskkit::Result<DiskImage> {
        self.append_existing(path, options)?;
        Ok(self)
    }
}

fn same_dir() -> OpenOptions {
    OpenOptions::new().parents(ParentPolicy::same_directory())
}

fn rw() -> OpenOptions {
    same_dir().writable(true)
}

fn fill(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i / 512) as u8) | 1).collect()
}

fn read_all(image: &DiskImage) -> Vec<u8> {
    let mut buf = vec![0u8; image.size() as usize];
    image.read_at(&mut buf, 0).unwrap();
    buf
}

fn base_asif(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("base.asif");
    let image = DiskImage::create(&path, &CreateOptions::asif(size / 512, 512).chunk_size(64 << 10)).unwrap();
    image.write_at(&fill(200 << 10, 7), 100 << 10).unwrap();
    image.flush().unwrap();
    path
}

#[test]
fn overlay_reads_through_and_takes_writes() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_asif(dir.path(), 4 * MIB);
    let base_uuid = DiskImage::open(&base, &OpenOptions::new()).unwrap().layer_uuid();
    let base_bytes = std::fs::read(&base).unwrap();
    let top = dir.path().join("top.asif");
    let mut stack = DiskImage::open(&base, &OpenOptions::new()).unwrap();
    stack
        .append_new(&top, &LayerOptions::overlay().chunk_size(64 << 10))
        .unwrap();
    assert_eq!(stack.layer_count(), 2);
    assert_eq!(stack.layer_type(), Some(LayerType::Overlay));
    assert_eq!(stack.parent_uuid(), base_uuid);
    let mut expect = read_all(&stack);
    // A 512-byte write inside a chunk the base holds: the overlay keeps just that block
    // (bitmap), the rest of the chunk still comes from the base.
    stack.write_at(&[0xAB; 512], 128 << 10).unwrap();
    expect[(128 << 10)..(128 << 10) + 512].fill(0xAB);
    let here = stack.status(128 << 10, 512).unwrap();
    assert_eq!((here.kind, here.depth), (ExtentKind::Data, 1));
    let next = stack.status((128 << 10) + 512, 512).unwrap();
    assert_eq!((next.kind, next.depth), (ExtentKind::Data, 2));
    // Discard in the overlay hides the base.
    stack.discard(192 << 10, 64 << 10).unwrap();
    expect[(192 << 10)..(256 << 10)].fill(0);
    let hidden = stack.status(192 << 10, 64 << 10).unwrap();
    assert_eq!((hidden.kind, hidden.depth), (ExtentKind::Zero, 1));
    assert_eq!(read_all(&stack), expect);
    stack.flush().unwrap();
    drop(stack);
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_bytes,
        "the base was written through the stack"
    );

    // Reopening follows the parent only through a policy.
    let denied = DiskImage::open(&top, &OpenOptions::new()).unwrap_err();
    assert_eq!(denied.kind(), ErrorKind::PolicyDenied, "{denied}");
    let again = DiskImage::open(&top, &same_dir()).unwrap();
    assert_eq!(again.layer_count(), 2);
    assert_eq!(read_all(&again), expect);
}

#[test]
fn parent_written_later_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_asif(dir.path(), 2 * MIB);
    let top = dir.path().join("top.asif");
    DiskImage::open(&base, &OpenOptions::new())
        .unwrap()
        .with_new(&top, &LayerOptions::overlay())
        .unwrap();
    let recorded = DiskImage::open(&top, &same_dir()).unwrap().parent_uuid().unwrap();
    let b = DiskImage::open(&base, &OpenOptions::new().writable(true)).unwrap();
    b.write_at(&[1; 512], 0).unwrap();
    b.flush().unwrap();
    let now = b.layer_uuid().unwrap();
    drop(b);
    assert_ne!(recorded, now);
    let err = DiskImage::open(&top, &same_dir()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LayerMismatch);
    let msg = err.to_string();
    for u in [recorded, now] {
        // In lowercase, as `diskkit info` prints UUIDs.
        assert!(msg.contains(&u.hyphenated().to_string()), "{msg}");
    }
    // Appending the existing layer onto the changed base fails the same way.
    let err = DiskImage::open(&base, &OpenOptions::new())
        .unwrap()
        .with_existing(&top, &OpenOptions::new())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LayerMismatch);
}

#[test]
fn append_existing_layer_and_one_cache_rule() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_asif(dir.path(), 2 * MIB);
    let cache = dir.path().join("cache.asif");
    DiskImage::open(&base, &OpenOptions::new())
        .unwrap()
        .with_new(&cache, &LayerOptions::cache())
        .unwrap();
    let stack = DiskImage::open(&base, &OpenOptions::new())
        .unwrap()
        .with_existing(&cache, &OpenOptions::new().writable(true))
        .unwrap();
    assert_eq!(stack.layer_types(), vec![None, Some(LayerType::Cache)]);
    let err = stack
        .with_new(dir.path().join("cache2.asif"), &LayerOptions::cache())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StackRule);
    assert!(!dir.path().join("cache2.asif").exists());
    // An overlay over the cache is fine.
    let stack = DiskImage::open(&cache, &rw()).unwrap();
    let stack = stack
        .with_new(dir.path().join("over.asif"), &LayerOptions::overlay())
        .unwrap();
    assert_eq!(stack.layer_count(), 3);
    drop(stack);
    let reopened = DiskImage::open(dir.path().join("over.asif"), &same_dir()).unwrap();
    assert_eq!(
        reopened.layer_types(),
        vec![None, Some(LayerType::Cache), Some(LayerType::Overlay)]
    );
}

#[test]
fn cache_layer_serves_second_reads() {
    let base_store = Arc::new(MemStorage::new());
    let s: Arc<dyn Storage> = base_store.clone();
    let base = DiskImage::create_on(s, &CreateOptions::raw(4 * MIB)).unwrap();
    let data = fill(4 * MIB as usize, 3);
    base.write_at(&data, 0).unwrap();
    base.write_zeroes(MIB, MIB, false).unwrap();
    let mut expect = data.clone();
    expect[MIB as usize..2 * MIB as usize].fill(0);
    let cache_store: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let stack = base
        .with_new_on(cache_store, &LayerOptions::cache().chunk_size(64 << 10))
        .unwrap();
    let mut buf = vec![0u8; 3 * MIB as usize];
    stack.read_at(&mut buf, 1000).unwrap();
    assert_eq!(&buf[..], &expect[1000..1000 + buf.len()]);
    let (reads_before, bytes_before, _, _) = base_store.counters();
    assert!(bytes_before >= 3 * MIB, "the first read came from the base");
    stack.read_at(&mut buf, 1000).unwrap();
    assert_eq!(&buf[..], &expect[1000..1000 + buf.len()]);
    let (reads_after, _, _, _) = base_store.counters();
    assert_eq!(reads_before, reads_after, "second read touched the base");
    // The cache holds what was read, rounded out to its chunks; the rest is still absent.
    let filled = stack.status(64 << 10, 4096).unwrap();
    assert_eq!(filled.depth, 1);
    let untouched = stack.status(4 * MIB - 4096, 4096).unwrap();
    assert_eq!(untouched.depth, 2);
    // Zeroes read from the base are kept as zeroes, not data.
    let zero = stack.status(MIB + (64 << 10), 64 << 10).unwrap();
    assert_eq!((zero.kind, zero.depth), (ExtentKind::Zero, 1));
}

#[test]
fn raw_cannot_be_a_layer() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_asif(dir.path(), MIB);
    let err = DiskImage::open(&base, &OpenOptions::new())
        .unwrap()
        .with_new(
            dir.path().join("x.raw"),
            &LayerOptions::overlay().format(ImageFormat::Raw),
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[test]
fn snapshot_restore_commit_rebase() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_asif(dir.path(), 2 * MIB);
    let vm = dir.path().join("vm.asif");
    DiskImage::open(&base, &OpenOptions::new())
        .unwrap()
        .with_new(&vm, &LayerOptions::overlay().chunk_size(64 << 10))
        .unwrap();
    let write = |data: &[u8], at: u64| {
        let s = DiskImage::open(&vm, &rw()).unwrap();
        s.write_at(data, at).unwrap();
        s.flush().unwrap();
        read_all(&s)
    };
    let v1 = write(&[0x11; 4096], 0);
    let frozen = operations::snapshot(&vm, &same_dir()).unwrap();
    assert_eq!(frozen, dir.path().join("vm.snap1.asif"));
    let s = DiskImage::open(&vm, &same_dir()).unwrap();
    assert_eq!(s.layer_count(), 3);
    assert_eq!(read_all(&s), v1);
    drop(s);
    let v2 = write(&[0x22; 8192], 4096);
    assert_ne!(v1, v2);
    operations::restore(&vm, &same_dir()).unwrap();
    assert_eq!(read_all(&DiskImage::open(&vm, &same_dir()).unwrap()), v1);
    let v3 = write(&[0x33; 70000], 60000);
    let stats = operations::commit(&vm, &same_dir()).unwrap();
    assert!(stats.data_bytes >= 70000);
    let s = DiskImage::open(&vm, &same_dir()).unwrap();
    assert_eq!(read_all(&s), v3);
    assert_eq!(s.layer_count(), 3);
    assert!(
        s.extents(0, s.size()).unwrap().iter().all(|e| e.depth != 1),
        "top not emptied"
    );
    drop(s);
    // The frozen layer now holds v3 on its own (over the base).
    assert_eq!(read_all(&DiskImage::open(&frozen, &same_dir()).unwrap()), v3);

    // Rebase the top onto a flattened copy of the base with a change: the stack reads the same.
    let other = dir.path().join("other.asif");
    {
        let b = DiskImage::open(&base, &OpenOptions::new()).unwrap();
        let o = DiskImage::create(&other, &CreateOptions::asif(b.block_count(), 512)).unwrap();
        diskkit::copy::copy(&b, &o, &mut |_| {}).unwrap();
        o.write_at(&[0x44; 1000], 300 << 10).unwrap();
        o.flush().unwrap();
    }
    operations::rebase(&vm, &other, &same_dir(), operations::RebaseMode::Safe).unwrap();
    let s = DiskImage::open(&vm, &same_dir()).unwrap();
    assert_eq!(s.layer_count(), 2);
    assert_eq!(read_all(&s), v3);
}

#[test]
fn interrupted_commit_still_reads_the_same_and_can_be_finished() {
    // Simulate a crash after the parent took part of the top's data: the top no longer pins the
    // parent's UUID, the parent changed, and the stack must read the top's content.
    let dir = tempfile::tempdir().unwrap();
    let base = base_asif(dir.path(), MIB);
    let top = dir.path().join("top.asif");
    let stack = DiskImage::open(&base, &OpenOptions::new().writable(true))
        .unwrap()
        .with_new(&top, &LayerOptions::overlay())
        .unwrap();
    stack.write_at(&[9; 8192], 0).unwrap();
    stack.flush().unwrap();
    let expect = read_all(&stack);
    let layer = stack.top_layer();
    let mut info = layer.layer_info();
    info.parent_uuid = None;
    layer.set_layer_info(&info).unwrap();
    layer.flush().unwrap();
    drop(stack);
    let b = DiskImage::open(&base, &OpenOptions::new().writable(true)).unwrap();
    b.write_at(&[9; 4096], 0).unwrap();
    b.flush().unwrap();
    drop(b);
    assert_eq!(read_all(&DiskImage::open(&top, &same_dir()).unwrap()), expect);
    operations::commit(&top, &same_dir()).unwrap();
    assert_eq!(read_all(&DiskImage::open(&top, &same_dir()).unwrap()), expect);
    assert_eq!(
        read_all(&DiskImage::open(&base, &OpenOptions::new()).unwrap()),
        expect
    );
}

// ---- randomised model test ----

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: u64, seed: u8 },
    Discard { offset: u64, len: u64 },
    Resize { size: u64 },
    Snapshot,
    Restore,
    Commit,
    Overlay { chunk: u32, qcow2: bool },
    Cache { chunk: u32, qcow2: bool },
    Reopen,
}

const SIZE: u64 = 2 * MIB;

fn op_strategy() -> impl Strategy<Value = Op> {
    let offset = prop_oneof![
        2 => 0..SIZE,
        2 => (0..SIZE / 512).prop_map(|b| b * 512),
        1 => (0..SIZE / 65536).prop_map(|c| c * 65536),
    ];
    let len = prop_oneof![3 => 1u64..5000, 2 => (1u64..64).prop_map(|b| b * 512), 1 => 1u64..(300 << 10)];
    let chunk = prop_oneof![Just(64u32 << 10), Just(256 << 10), Just(1 << 20)];
    prop_oneof![
        8 => (offset.clone(), len.clone(), any::<u8>()).prop_map(|(offset, len, seed)| Op::Write { offset, len, seed }),
        2 => (offset, len).prop_map(|(offset, len)| Op::Discard { offset, len }),
        1 => (SIZE / 4096..SIZE * 2 / 4096).prop_map(|b| Op::Resize { size: b * 4096 }),
        2 => Just(Op::Snapshot),
        1 => Just(Op::Restore),
        1 => Just(Op::Commit),
        1 => (chunk.clone(), any::<bool>()).prop_map(|(chunk, qcow2)| Op::Overlay { chunk, qcow2 }),
        1 => (chunk, any::<bool>()).prop_map(|(chunk, qcow2)| Op::Cache { chunk, qcow2 }),
        1 => Just(Op::Reopen),
    ]
}

fn pattern(len: usize, seed: u8, offset: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as u64).wrapping_mul(131).wrapping_add(offset + i as u64) as u8 | 1)
        .collect()
}

/// The model: what the stack reads now, and what the layer beneath the top reads.
struct Model {
    now: Vec<u8>,
    below: Option<Vec<u8>>,
}

fn check(stack: &DiskImage, model: &Model, step: usize) {
    assert_eq!(stack.size(), model.now.len() as u64, "size after step {step}");
    let got = read_all(stack);
    if let Some(i) = got.iter().zip(&model.now).position(|(a, b)| a != b) {
        panic!(
            "after step {step}: byte {i} is {:#x}, model says {:#x}",
            got[i], model.now[i]
        );
    }
    for e in stack.extents(0, stack.size()).unwrap() {
        if e.reads_as_zero() {
            assert!(
                model.now[e.offset as usize..e.end() as usize]
                    .iter()
                    .all(|&b| b == 0),
                "after step {step}: {e:?} claims zeroes"
            );
        }
    }
}

fn run_model(base_format: ImageFormat, ops: &[Op]) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join(format!("base.{base_format}"));
    let format = base_format;
    {
        let b = DiskImage::create(&base, &CreateOptions::new(format, SIZE).chunk_size(64 << 10)).unwrap();
        b.write_at(&pattern(300 << 10, 1, 0), 0).unwrap();
        b.write_at(&pattern(100 << 10, 2, MIB), MIB).unwrap();
        b.flush().unwrap();
    }
    let top = dir.path().join("vm.asif");
    let mut model = Model {
        now: read_all(&DiskImage::open(&base, &OpenOptions::new()).unwrap()),
        below: None,
    };
    model.below = Some(model.now.clone());
    let mut stack = DiskImage::open(&base, &OpenOptions::new())
        .unwrap()
        .with_new(&top, &LayerOptions::overlay().chunk_size(64 << 10))
        .unwrap();
    let mut has_cache = false;
    let mut extra = 0;
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Write { offset, len, seed } => {
                let size = model.now.len() as u64;
                if *offset >= size {
                    continue;
                }
                let len = (*len).min(size - offset);
                let data = pattern(len as usize, *seed, *offset);
                stack.write_at(&data, *offset).unwrap();
                model.now[*offset as usize..(*offset + len) as usize].copy_from_slice(&data);
            }
            Op::Discard { offset, len } => {
                let size = model.now.len() as u64;
                if *offset >= size {
                    continue;
                }
                let len = (*len).min(size - offset);
                stack.discard(*offset, len).unwrap();
                model.now[*offset as usize..(*offset + len) as usize].fill(0);
            }
            Op::Resize { size } => {
                stack.resize(*size).unwrap();
                model.now.resize(*size as usize, 0);
            }
            Op::Snapshot => {
                stack.flush().unwrap();
                drop(stack);
                operations::snapshot(&top, &same_dir()).unwrap();
                model.below = Some(model.now.clone());
                stack = DiskImage::open(&top, &rw()).unwrap();
            }
            Op::Restore => {
                stack.flush().unwrap();
                drop(stack);
                operations::restore(&top, &same_dir()).unwrap();
                model.now = model.below.clone().unwrap();
                stack = DiskImage::open(&top, &rw()).unwrap();
            }
            Op::Commit => {
                stack.flush().unwrap();
                let types = stack.layer_types();
                drop(stack);
                let r = operations::commit(&top, &same_dir());
                if types[types.len() - 2] == Some(LayerType::Cache) {
                    assert_eq!(r.unwrap_err().kind(), ErrorKind::StackRule);
                } else {
                    r.unwrap();
                    model.below = Some(model.now.clone());
                }
                stack = DiskImage::open(&top, &rw()).unwrap();
            }
            Op::Overlay { chunk, qcow2 } | Op::Cache { chunk, qcow2 } => {
                // Freeze the current top under a new name, then add the new layer at `top`.
                let is_cache = matches!(op, Op::Cache { .. });
                if is_cache && has_cache {
                    let err = stack
                        .append_new(dir.path().join("x.asif"), &LayerOptions::cache())
                        .unwrap_err();
                    assert_eq!(err.kind(), ErrorKind::StackRule);
                    // The stack is unchanged and still usable.
                    check(&stack, &model, step);
                    continue;
                }
                stack.flush().unwrap();
                drop(stack);
                extra += 1;
                let frozen = dir.path().join(format!("layer{extra}.asif"));
                std::fs::rename(&top, &frozen).unwrap();
                let lower = DiskImage::open(&frozen, &same_dir());
                let lower = match lower {
                    Ok(l) => l,
                    Err(e) => panic!("step {step}: {e}"),
                };
                let kind = if is_cache {
                    LayerOptions::cache()
                } else {
                    LayerOptions::overlay()
                };
                // The renamed file keeps its parent path, relative to the same directory.
                let format = if *qcow2 {
                    ImageFormat::Qcow2
                } else {
                    ImageFormat::Asif
                };
                stack = lower
                    .with_new(&top, &kind.chunk_size(*chunk).format(format))
                    .unwrap();
                has_cache |= is_cache;
                model.below = Some(model.now.clone());
            }
            Op::Reopen => {
                stack.flush().unwrap();
                drop(stack);
                stack = DiskImage::open(&top, &rw()).unwrap();
            }
        }
        check(&stack, &model, step);
    }
    drop(stack);
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
    fn stacks_match_the_model(
        base in prop_oneof![Just(ImageFormat::Raw), Just(ImageFormat::Asif), Just(ImageFormat::Qcow2)],
        ops in proptest::collection::vec(op_strategy(), 1..40),
    ) {
        run_model(base, &ops);
    }
}

#[test]
fn layer_uuid_changes_on_first_write_only() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_asif(dir.path(), MIB);
    let top = dir.path().join("top.asif");
    DiskImage::open(&base, &OpenOptions::new())
        .unwrap()
        .with_new(&top, &LayerOptions::overlay())
        .unwrap();
    let stack = DiskImage::open(&top, &rw()).unwrap();
    let u0 = stack.layer_uuid().unwrap();
    stack.read_at(&mut [0u8; 4096], 0).unwrap();
    stack.flush().unwrap();
    assert_eq!(
        stack.layer_uuid(),
        Some(u0),
        "reading or flushing changed the UUID"
    );
    stack.write_at(&[1; 512], 0).unwrap();
    let u1 = stack.layer_uuid().unwrap();
    assert_ne!(u0, u1, "the first write must change the layer UUID");
    stack.write_at(&[2; 512], 512).unwrap();
    assert_eq!(
        stack.layer_uuid(),
        Some(u1),
        "later writes in the same session keep it"
    );
    drop(stack);
    // Persisted: reopening sees the new UUID.
    assert_eq!(DiskImage::open(&top, &same_dir()).unwrap().layer_uuid(), Some(u1));
}

#[test]
fn raw_parent_has_no_uuid() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    DiskImage::create(&base, &CreateOptions::raw(MIB)).unwrap();
    let top = dir.path().join("top.asif");
    let stack = DiskImage::open(&base, &OpenOptions::new())
        .unwrap()
        .with_new(&top, &LayerOptions::overlay())
        .unwrap();
    assert_eq!(stack.parent_uuid(), None);
    assert!(stack.layer_uuid().is_some());
    let layers = stack.describe_layers().unwrap();
    assert_eq!(layers[1].info.layer_uuid, None);
    assert_eq!(layers[0].info.parent_format, Some(ImageFormat::Raw));
    assert_eq!(layers[0].info.parent_path.as_deref(), Some("base.raw"));
    // A RAW base can be written after the layer was made without detection: documented.
    drop(stack);
    assert_eq!(DiskImage::open(&top, &same_dir()).unwrap().layer_count(), 2);
}

#[test]
fn cache_reads_each_base_block_once_and_survives_reopen() {
    let size = 8 * MIB;
    let base_store = Arc::new(MemStorage::new());
    let s: Arc<dyn Storage> = base_store.clone();
    let base = DiskImage::create_on(s, &CreateOptions::raw(size)).unwrap();
    let data = fill(size as usize, 9);
    base.write_at(&data, 0).unwrap();
    drop(base);
    let open_base = || {
        let s: Arc<dyn Storage> = base_store.clone();
        DiskImage::open_storage(s, &OpenOptions::new().format(ImageFormat::Raw)).unwrap()
    };
    let cache_store = Arc::new(MemStorage::new());
    let c: Arc<dyn Storage> = cache_store.clone();
    let stack = open_base().with_new_on(c, &LayerOptions::cache()).unwrap();
    let (_, bytes0, _, _) = base_store.counters();
    let mut buf = vec![0u8; 192 << 10];
    for _ in 0..2 {
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(buf.len() as u64) as usize;
            stack.read_at(&mut buf[..n], pos).unwrap();
            assert_eq!(&buf[..n], &data[pos as usize..pos as usize + n]);
            pos += n as u64;
        }
    }
    let (_, bytes1, _, _) = base_store.counters();
    assert_eq!(
        bytes1 - bytes0,
        size,
        "each base byte read exactly once over two passes"
    );
    drop(stack);
    // Reopen the cache over the base: nothing more is read from the base.
    let c: Arc<dyn Storage> = cache_store.clone();
    let cache_layer =
        diskkit::open_layer(c, &OpenOptions::new().writable(true).format(ImageFormat::Asif)).unwrap();
    let mut stack = open_base();
    stack
        .append_layer(cache_layer, None, diskkit::OpenMode::ReadWrite)
        .unwrap();
    let mut all = vec![0u8; size as usize];
    stack.read_at(&mut all, 0).unwrap();
    assert_eq!(all, data);
    let (_, bytes2, _, _) = base_store.counters();
    assert_eq!(bytes2, bytes1, "the reopened cache went back to the base");
}

/// A resolver that opens parents named `mem:NAME` from memory (standing in for remote bases,
/// which other crates resolve: this crate has no network code).
#[derive(Debug)]
struct MemResolver {
    images: Vec<(String, Arc<MemStorage>)>,
    asked: std::sync::Mutex<Vec<(String, String)>>,
}

impl diskkit::stack::ParentResolver for MemResolver {
    fn resolve(
        &self,
        child: &diskkit::stack::LayerLocation,
        hint: &str,
    ) -> diskkit::Result<Option<diskkit::stack::ResolvedParent>> {
        self.asked
            .lock()
            .unwrap()
            .push((child.to_string(), hint.to_string()));
        let Some(name) = hint.strip_prefix("mem:") else {
            return Ok(None);
        };
        let (_, storage) = self
            .images
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| diskkit::Error::new(ErrorKind::NotFound, format!("no image {name}")))?;
        Ok(Some(diskkit::stack::ResolvedParent {
            storage: Arc::new(MemStorage::from_bytes(storage.to_bytes())),
            location: diskkit::stack::LayerLocation::Other(hint.to_string()),
            warning: None,
        }))
    }
}

#[test]
fn parents_open_from_storage_a_resolver_supplies() {
    // A remote-like chain: mem:base (ASIF) <- mem:mid (qcow2 naming mem:base), and a local
    // overlay file naming mem:mid.
    let base = Arc::new(MemStorage::new());
    let b = DiskImage::create_on(base.clone(), &CreateOptions::asif(4 * MIB / 512, 512)).unwrap();
    b.write_at(&fill(256 << 10, 5), 0).unwrap();
    b.flush().unwrap();
    let base_uuid = b.layer_uuid();
    drop(b);
    let mid = Arc::new(MemStorage::new());
    let m = diskkit::open_layer(
        {
            let s: Arc<dyn Storage> = mid.clone();
            DiskImage::create_on(s.clone(), &CreateOptions::new(ImageFormat::Qcow2, 4 * MIB)).unwrap();
            s
        },
        &OpenOptions::new().writable(true).format(ImageFormat::Qcow2),
    )
    .unwrap();
    m.set_layer_info(&diskkit::LayerInfo {
        layer_type: Some(LayerType::Overlay),
        parent_uuid: base_uuid,
        parent_path: Some("mem:base".into()),
        parent_format: Some(ImageFormat::Asif),
        ..diskkit::LayerInfo::default()
    })
    .unwrap();
    m.flush().unwrap();
    let mid_uuid = m.layer_info().layer_uuid;
    drop(m);
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("top.asif");
    {
        let t = DiskImage::create(&top, &CreateOptions::asif(4 * MIB / 512, 512)).unwrap();
        t.top_layer()
            .set_layer_info(&diskkit::LayerInfo {
                layer_type: Some(LayerType::Overlay),
                parent_uuid: mid_uuid,
                parent_path: Some("mem:mid".into()),
                parent_format: Some(ImageFormat::Qcow2),
                ..diskkit::LayerInfo::default()
            })
            .unwrap();
    }
    // Without a resolver the default policy refuses, and the file rules cannot find them.
    assert_eq!(
        DiskImage::open(&top, &OpenOptions::new()).unwrap_err().kind(),
        ErrorKind::PolicyDenied
    );
    assert!(DiskImage::open(&top, &same_dir()).is_err());
    let resolver = Arc::new(MemResolver {
        images: vec![("base".into(), base), ("mid".into(), mid)],
        asked: std::sync::Mutex::new(Vec::new()),
    });
    let policy = ParentPolicy::deny().with_resolver(resolver.clone());
    let stack = DiskImage::open(&top, &OpenOptions::new().parents(policy)).unwrap();
    assert_eq!(stack.layer_count(), 3);
    assert_eq!(stack.layer_paths(), vec![None, None, Some(top.clone())]);
    let mut expect = fill(256 << 10, 5);
    expect.resize(4 * MIB as usize, 0);
    assert_eq!(read_all(&stack), expect);
    assert_eq!(
        *resolver.asked.lock().unwrap(),
        vec![
            (top.display().to_string(), "mem:mid".to_string()),
            ("mem:mid".to_string(), "mem:base".to_string()),
        ]
    );
}
