//! Reads never wait for a flush they do not depend on: a flush is held inside the storage's
//! `sync` (a storage whose sync blocks until the test releases it) while another thread reads
//! both a cluster written before the flush and the cluster whose write the flush is committing.
//! The reads must complete while the sync is still blocked (for qcow2 and ASIF with clean
//! metadata, where the data is written in place, and with dirty metadata, where the flush also
//! writes tables; and for RAW). A driver that held its state lock across the sync fails here
//! after 30 s instead of hanging, because the gate is opened before the result is checked.
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use diskkit::layer::ImageFormat;
use diskkit::storage::{MemStorage, Storage};
use diskkit::{CreateOptions, DiskImage};

#[derive(Debug)]
struct Gate {
    inner: MemStorage,
    armed: Mutex<bool>,
    open: Condvar,
    reached: Mutex<Option<mpsc::Sender<()>>>,
}

impl Storage for Gate {
    fn len(&self) -> diskkit::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, b: &mut [u8], o: u64) -> diskkit::Result<()> {
        self.inner.read_at(b, o)
    }
    fn write_at(&self, b: &[u8], o: u64) -> diskkit::Result<()> {
        self.inner.write_at(b, o)
    }
    fn set_len(&self, l: u64) -> diskkit::Result<()> {
        self.inner.set_len(l)
    }
    fn punch_hole(&self, o: u64, l: u64) -> diskkit::Result<()> {
        self.inner.punch_hole(o, l)
    }
    fn write_zeroes(&self, o: u64, l: u64) -> diskkit::Result<()> {
        self.inner.write_zeroes(o, l)
    }
    fn sync(&self) -> diskkit::Result<()> {
        let mut a = self.armed.lock().unwrap();
        if *a {
            if let Some(tx) = self.reached.lock().unwrap().take() {
                tx.send(()).unwrap();
            }
            while *a {
                a = self.open.wait(a).unwrap();
            }
        }
        drop(a);
        self.inner.sync()
    }
}

fn run(format: ImageFormat, dirty: bool) {
    let gate = Arc::new(Gate {
        inner: MemStorage::new(),
        armed: Mutex::new(false),
        open: Condvar::new(),
        reached: Mutex::new(None),
    });
    let img = DiskImage::create_on(gate.clone(), &CreateOptions::new(format, 64 << 20)).unwrap();
    img.write_at(&vec![0x55; 1 << 20], 0).unwrap();
    img.flush().unwrap();
    if dirty {
        img.write_at(&vec![0x66; 4096], 32 << 20).unwrap(); // allocates: the flush writes tables
    } else {
        img.write_at(&vec![0x66; 4096], 8192).unwrap(); // in place: the flush only syncs
    }
    let (tx, rx) = mpsc::channel();
    *gate.reached.lock().unwrap() = Some(tx);
    *gate.armed.lock().unwrap() = true;
    std::thread::scope(|s| {
        let f = s.spawn(|| img.flush());
        rx.recv_timeout(Duration::from_secs(30))
            .expect("flush never reached sync");
        let (dtx, drx) = mpsc::channel();
        let img2 = &img;
        s.spawn(move || {
            let mut b = vec![0u8; 4096];
            img2.read_at(&mut b, 4096 * 7).unwrap();
            let mut c = vec![0u8; 4096];
            img2.read_at(&mut c, 32 << 20).unwrap();
            dtx.send((b[0], c[0])).unwrap();
        });
        let r = drx.recv_timeout(Duration::from_secs(30));
        *gate.armed.lock().unwrap() = false;
        gate.open.notify_all();
        f.join().unwrap().unwrap();
        let (b, c) = r.expect("read waited for the blocked sync");
        assert_eq!(b, 0x55);
        assert_eq!(c, if dirty { 0x66 } else { 0 });
    });
}

#[test]
fn qcow2_clean_metadata() {
    run(ImageFormat::Qcow2, false)
}
#[test]
fn qcow2_dirty_metadata() {
    run(ImageFormat::Qcow2, true)
}
#[test]
fn asif_clean_metadata() {
    run(ImageFormat::Asif, false)
}
#[test]
fn asif_dirty_metadata() {
    run(ImageFormat::Asif, true)
}
#[test]
fn raw() {
    run(ImageFormat::Raw, false)
}
