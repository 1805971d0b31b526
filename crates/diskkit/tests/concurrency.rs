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
