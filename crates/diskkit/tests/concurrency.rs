//! Concurrency: a cache fill racing with a guest write to the same range.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use diskkit::layer::{Layer, LayerInfo, Write, WriteMode, Zeroing};
use diskkit::storage::{MemStorage, Storage};
use diskkit::{CreateOptions, DiskImage, ImageFormat, LayerOptions, Mapping, OpenMode, OpenOptions};

/// A cache layer that stops the filling thread just before its fill is written, so that the
/// test can land a guest write in between.
#[derive(Debug)]
struct PausingLayer {
    inner: Arc<dyn Layer>,
    filler: std::thread::ThreadId,
    /// Told when the filler is about to write what it read beneath.
    reached: std::sync::Mutex<Option<mpsc::Sender<()>>>,
    /// Waited on by the filler before it goes on.
    resume: std::sync::Mutex<Option<mpsc::Receiver<()>>>,
}

impl PausingLayer {
    fn pause_if_filler(&self) {
        if std::thread::current().id() != self.filler {
            return;
        }
        let Some(reached) = self.reached.lock().unwrap().take() else {
            return;
        };
        reached.send(()).unwrap();
        if let Some(resume) = self.resume.lock().unwrap().take() {
            let _ = resume.recv_timeout(Duration::from_secs(30));
        }
    }
}

impl Layer for PausingLayer {
    fn format(&self) -> ImageFormat {
        self.inner.format()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn cluster_size(&self) -> u64 {
        self.inner.cluster_size()
    }
    fn storage(&self) -> &dyn Storage {
        self.inner.storage()
    }
    fn writable(&self) -> bool {
        self.inner.writable()
    }
    fn map(&self, offset: u64, len: u64) -> diskkit::Result<(Mapping, u64)> {
        self.inner.map(offset, len)
    }
    fn begin_modification(&self) -> diskkit::Result<()> {
        self.inner.begin_modification()
    }
    fn allocation_granularity(&self) -> u64 {
        self.inner.allocation_granularity()
    }
    fn write(&self, request: &Write<'_>) -> diskkit::Result<()> {
        // The fill has read beneath and is about to store what it read.
        if request.mode == WriteMode::FillAbsent {
            self.pause_if_filler();
        }
        self.inner.write(request)
    }
    fn zero_granularity(&self, hide_below: bool) -> u64 {
        self.inner.zero_granularity(hide_below)
    }
    fn zero(&self, request: &Zeroing) -> diskkit::Result<()> {
        self.inner.zero(request)
    }
    fn flush(&self) -> diskkit::Result<()> {
        self.inner.flush()
    }
    fn resize(&self, new_size: u64) -> diskkit::Result<()> {
        self.inner.resize(new_size)
    }
    fn layer_info(&self) -> LayerInfo {
        self.inner.layer_info()
    }
    fn set_layer_info(&self, info: &LayerInfo) -> diskkit::Result<()> {
        self.inner.set_layer_info(info)
    }
}

/// A stack of a RAW base (every byte 0x11) and a writable cache layer of `format` on top,
/// the cache wrapped so that the thread `filler` pauses before writing a fill.
fn racy_stack(
    format: ImageFormat,
    filler: std::thread::ThreadId,
) -> (DiskImage, mpsc::Receiver<()>, mpsc::Sender<()>) {
    const SIZE: u64 = 1 << 20;
    let base_storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let base = DiskImage::create_on(base_storage.clone(), &CreateOptions::raw(SIZE)).unwrap();
    base.write_at(&vec![0x11; SIZE as usize], 0).unwrap();
    base.flush().unwrap();
    let cache_storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut maker =
        DiskImage::open_storage(base_storage.clone(), &OpenOptions::new().format(ImageFormat::Raw)).unwrap();
    maker
        .append_new_on(
            cache_storage.clone(),
            &LayerOptions::cache().format(format).chunk_size(64 << 10),
        )
        .unwrap();
    maker.flush().unwrap();
    drop(maker);
    let inner =
        diskkit::open_layer(cache_storage, &OpenOptions::new().writable(true).format(format)).unwrap();
    let (reached_tx, reached_rx) = mpsc::channel();
    let (resume_tx, resume_rx) = mpsc::channel();
    let cache = PausingLayer {
        inner,
        filler,
        reached: std::sync::Mutex::new(Some(reached_tx)),
        resume: std::sync::Mutex::new(Some(resume_rx)),
    };
    let mut stack =
        DiskImage::open_storage(base_storage, &OpenOptions::new().format(ImageFormat::Raw)).unwrap();
    stack
        .append_layer(Arc::new(cache), None, OpenMode::ReadWrite)
        .unwrap();
    (stack, reached_rx, resume_tx)
}

/// A read that fills the cache and a guest write to the same range: whatever the order, the
/// guest's data must win. The filler is stopped after it decided to fill and before its data
/// is stored; the guest write lands in that gap.
fn fill_never_overwrites_a_guest_write(format: ImageFormat) {
    std::thread::scope(|scope| {
        let (filler_tx, filler_rx) = mpsc::channel();
        let (stack_tx, stack_rx) = mpsc::channel::<Arc<DiskImage>>();
        let filler = scope.spawn(move || {
            filler_tx.send(std::thread::current().id()).unwrap();
            let stack = stack_rx.recv().unwrap();
            let mut buf = vec![0u8; 4096];
            stack.read_at(&mut buf, 0).unwrap();
        });
        let (stack, reached, resume) = racy_stack(format, filler_rx.recv().unwrap());
        let stack = Arc::new(stack);
        stack_tx.send(stack.clone()).unwrap();
        // Wait until the filler has read beneath and is about to store it (a fill that never
        // gets there is not a failure of this test).
        let paused = reached.recv_timeout(Duration::from_secs(30)).is_ok();
        stack.write_at(&[0x22; 4096], 0).unwrap();
        resume.send(()).ok();
        filler.join().unwrap();
        let mut after = vec![0u8; 4096];
        stack.read_at(&mut after, 0).unwrap();
        assert!(paused, "{format}: the fill never reached its write");
        assert!(
            after.iter().all(|&b| b == 0x22),
            "{format}: the cache fill overwrote the guest write with stale data from beneath"
        );
    });
}

#[test]
fn asif_cache_fill_never_overwrites_a_guest_write() {
    fill_never_overwrites_a_guest_write(ImageFormat::Asif);
}

#[test]
fn qcow2_cache_fill_never_overwrites_a_guest_write() {
    fill_never_overwrites_a_guest_write(ImageFormat::Qcow2);
}

/// A small deterministic generator (each thread has its own).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const STRESS_SIZE: u64 = 8 << 20;
const THREADS: usize = 8;

/// The units threads own: 4 KiB in the first half of the disk (so threads share every
/// allocation unit there), 64 KiB in the second half (a qcow2 cluster, so whole-cluster zeroing
/// runs next to other threads' allocations).
fn units() -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < STRESS_SIZE {
        let len = if pos < STRESS_SIZE / 2 { 4096 } else { 65536 };
        out.push((pos, len));
        pos += len;
    }
    out
}

/// The stack under test: a RAW base holding a pattern, a cache layer, and (when `overlay`) an
/// overlay on top. Returns the stack and the storages of the layers above the base.
fn stress_stack(format: ImageFormat, overlay: bool, base: &[u8]) -> (DiskImage, Vec<Arc<MemStorage>>) {
    let base_storage = Arc::new(MemStorage::from_bytes(base.to_vec()));
    let mut stack =
        DiskImage::open_storage(base_storage, &OpenOptions::new().format(ImageFormat::Raw)).unwrap();
    let mut storages = Vec::new();
    let mut layers = vec![LayerOptions::cache()];
    if overlay {
        layers.push(LayerOptions::overlay());
    }
    for options in layers {
        let s = Arc::new(MemStorage::new());
        storages.push(s.clone());
        stack
            .append_new_on(s, &options.format(format).chunk_size(64 << 10))
            .unwrap();
    }
    (stack, storages)
}

/// Reopen the stack from its storages (the base from `base`).
fn reopen_stack(format: ImageFormat, base: &[u8], storages: &[Arc<MemStorage>]) -> DiskImage {
    let base_storage = Arc::new(MemStorage::from_bytes(base.to_vec()));
    let mut stack =
        DiskImage::open_storage(base_storage, &OpenOptions::new().format(ImageFormat::Raw)).unwrap();
    for s in storages {
        let layer = diskkit::open_layer(
            Arc::new(MemStorage::from_bytes(s.to_bytes())),
            &OpenOptions::new().writable(true).format(format),
        )
        .unwrap();
        stack.append_layer(layer, None, OpenMode::ReadWrite).unwrap();
    }
    stack
}

/// One thread's work: random writes (any length and offset inside its own units), zeroing and
/// discards of its units, reads of its units checked against its model, reads across everyone's
/// units (which fill the cache), and flushes.
fn stress_thread(stack: &DiskImage, me: usize, units: &[(u64, u64)], model: &mut [u8], ops: usize) {
    let mine: Vec<(u64, u64)> = units
        .iter()
        .enumerate()
        .filter(|(i, _)| i % THREADS == me)
        .map(|(_, u)| *u)
        .collect();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((me as u64 + 1) * 0x1234_5678));
    for step in 0..ops {
        let (start, len) = mine[rng.below(mine.len() as u64) as usize];
        let at = start + rng.below(len);
        let n = 1 + rng.below(start + len - at);
        match rng.below(10) {
            0..=3 => {
                let seed = rng.next() as u8;
                let data: Vec<u8> = (0..n).map(|i| seed.wrapping_add((i * 7) as u8) | 1).collect();
                stack.write_at(&data, at).unwrap();
                model[at as usize..(at + n) as usize].copy_from_slice(&data);
            }
            4 => {
                let unmap = rng.below(2) == 0;
                stack.write_zeroes(at, n, unmap).unwrap();
                model[at as usize..(at + n) as usize].fill(0);
            }
            5 => {
                stack.discard(start, len).unwrap();
                model[start as usize..(start + len) as usize].fill(0);
            }
            6 | 7 => {
                let mut buf = vec![0u8; len as usize];
                stack.read_at(&mut buf, start).unwrap();
                assert!(
                    buf == model[start as usize..(start + len) as usize],
                    "thread {me} step {step}: unit at {start} does not read what was written"
                );
            }
            8 => {
                // Across other threads' units: fills the cache; the own units inside must
                // still read as written.
                let off = rng.below(STRESS_SIZE - (300 << 10));
                let mut buf = vec![0u8; (rng.below(256 << 10) + 1) as usize];
                stack.read_at(&mut buf, off).unwrap();
                for &(s, l) in &mine {
                    let (a, b) = (s.max(off), (s + l).min(off + buf.len() as u64));
                    if a < b {
                        assert!(
                            buf[(a - off) as usize..(b - off) as usize] == model[a as usize..b as usize],
                            "thread {me} step {step}: own range {a}..{b} changed under a wide read"
                        );
                    }
                }
            }
            _ => stack.flush().unwrap(),
        }
    }
}

fn stress(format: ImageFormat, overlay: bool) {
    let base: Vec<u8> = (0..STRESS_SIZE).map(|i| (i / 512 % 251) as u8 + 3).collect();
    let units = units();
    let (stack, storages) = stress_stack(format, overlay, &base);
    let ops = 2000;
    let mut models: Vec<Vec<u8>> = (0..THREADS).map(|_| base.clone()).collect();
    std::thread::scope(|scope| {
        for (me, model) in models.iter_mut().enumerate() {
            let (stack, units) = (&stack, &units);
            scope.spawn(move || stress_thread(stack, me, units, model, ops));
        }
    });
    // Every unit as its owner last left it.
    let mut expect = base.clone();
    for (i, &(start, len)) in units.iter().enumerate() {
        let r = start as usize..(start + len) as usize;
        expect[r.clone()].copy_from_slice(&models[i % THREADS][r]);
    }
    let mut all = vec![0u8; STRESS_SIZE as usize];
    stack.read_at(&mut all, 0).unwrap();
    let first_diff = all.iter().zip(&expect).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "{format} overlay={overlay}: the stack differs from the model"
    );
    stack.flush().unwrap();
    drop(stack);
    let again = reopen_stack(format, &base, &storages);
    again.read_at(&mut all, 0).unwrap();
    let first_diff = all.iter().zip(&expect).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "{format} overlay={overlay}: reopened, the stack differs from the model"
    );
    drop(again);
    if format == ImageFormat::Qcow2 {
        for s in &storages {
            let report = diskkit::formats::qcow2::check(&**s, diskkit::formats::qcow2::Repair::None).unwrap();
            assert!(report.is_clean(), "{format} overlay={overlay}: {report:?}");
        }
    }
}

#[test]
fn eight_threads_on_an_asif_cache_layer_match_the_model() {
    stress(ImageFormat::Asif, false);
}

#[test]
fn eight_threads_on_an_asif_stack_with_cache_and_overlay_match_the_model() {
    stress(ImageFormat::Asif, true);
}

#[test]
fn eight_threads_on_a_qcow2_cache_layer_match_the_model() {
    stress(ImageFormat::Qcow2, false);
}

#[test]
fn eight_threads_on_a_qcow2_stack_with_cache_and_overlay_match_the_model() {
    stress(ImageFormat::Qcow2, true);
}

/// A panic in the middle of a write (here inside the storage) marks the image failed: every
/// later call, from any thread, gets a clear error instead of using half-updated state.
#[test]
fn a_panic_while_writing_marks_the_image_failed() {
    for format in [ImageFormat::Asif, ImageFormat::Qcow2] {
        let storage = Arc::new(MemStorage::new());
        let image = DiskImage::create_on(storage.clone(), &CreateOptions::new(format, 4 << 20)).unwrap();
        image.write_at(&[1; 8192], 0).unwrap();
        image.flush().unwrap();
        storage.inject(diskkit::storage::Fault::PanicAfterWrites(3));
        let panicked = std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..64u64 {
                    let _ = image.write_at(&[2; 70_000], (i * 65_536) % (4 << 20) - (i * 65_536) % 512);
                }
            })
            .join()
            .is_err()
        });
        assert!(panicked, "{format}: the injected panic did not happen");
        storage.clear_faults();
        let mut buf = [0u8; 512];
        let read = image.read_at(&mut buf, 0).unwrap_err();
        assert_eq!(read.kind(), diskkit::ErrorKind::Failed, "{format}: {read}");
        assert!(read.to_string().contains("marked failed"), "{read}");
        let write = image.write_at(&[3; 512], 0).unwrap_err();
        assert_eq!(write.kind(), diskkit::ErrorKind::Failed);
        let flush = image.flush().unwrap_err();
        assert_eq!(flush.kind(), diskkit::ErrorKind::Failed);
        std::thread::scope(|s| {
            s.spawn(|| {
                let e = image.write_zeroes(0, 4096, true).unwrap_err();
                assert_eq!(e.kind(), diskkit::ErrorKind::Failed);
            });
        });
    }
}
