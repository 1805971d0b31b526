//! A size-bounded cache layer under parallel readers: evictions run all the time, and no read
//! ever sees a unit's punched space or a chunk already reused for another unit.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use diskkit::storage::{MemStorage, Storage};
use diskkit::{DiskImage, ImageFormat, LayerOptions, OpenOptions, ParentPolicy};

const SIZE: u64 = 16 << 20;
const CHUNK: u32 = 64 << 10;

/// Every 8 bytes hold their own offset (plus one, so nothing in the base reads as zero): a
/// byte read from the wrong place, or zeroes, cannot pass for the right one.
fn pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let at = offset + i as u64;
        let word = (at / 8 + 1).to_le_bytes();
        *b = word[(at % 8) as usize];
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Memory whose reads of data chunks take a while: the time between a reader mapping a
/// cached unit and its bytes arriving, in which another thread may evict that unit. (Reads
/// of the first chunk, the ASIF header and metadata, are not slowed.)
#[derive(Debug)]
struct SlowReads(MemStorage);

impl Storage for SlowReads {
    fn len(&self) -> diskkit::Result<u64> {
        self.0.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> diskkit::Result<()> {
        if offset >= u64::from(CHUNK) * 4 {
            std::thread::sleep(Duration::from_micros(300));
        }
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> diskkit::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> diskkit::Result<()> {
        self.0.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> diskkit::Result<()> {
        self.0.punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> diskkit::Result<()> {
        self.0.write_zeroes(offset, len)
    }
    fn sync(&self) -> diskkit::Result<()> {
        self.0.sync()
    }
}

/// Eight threads of random reads, each checked against the pattern.
fn read_randomly(image: &DiskImage, steps: usize) {
    std::thread::scope(|s| {
        for t in 0..8u64 {
            s.spawn(move || {
                let mut rng = Rng(0x2545_F491_4F6C_DD1D ^ (t + 1).wrapping_mul(0x9E37_79B9));
                let mut want = vec![0u8; 256 << 10];
                let mut got = vec![0u8; 256 << 10];
                for step in 0..steps {
                    // Mostly small reads inside one chunk, some across several.
                    let len = if rng.next() % 4 == 0 {
                        1 + rng.next() % (256 << 10)
                    } else {
                        1 + rng.next() % 8192
                    } as usize;
                    let off = rng.next() % (SIZE - len as u64);
                    image.read_at(&mut got[..len], off).unwrap();
                    pattern(off, &mut want[..len]);
                    if got[..len] != want[..len] {
                        let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
                        panic!(
                            "thread {t} step {step}: read of {len} bytes at {off} is wrong at {}",
                            off + i as u64
                        );
                    }
                }
            });
        }
    });
}

#[test]
fn readers_never_see_a_unit_evicted_between_mapping_and_reading() {
    let mut data = vec![0u8; SIZE as usize];
    pattern(0, &mut data);
    let base = Arc::new(MemStorage::from_bytes(data));
    let mut image = DiskImage::open_storage(base, &OpenOptions::new().format(ImageFormat::Raw)).unwrap();
    image
        .append_new_on(
            Arc::new(SlowReads(MemStorage::new())),
            &LayerOptions::cache().format(ImageFormat::Asif).chunk_size(CHUNK),
        )
        .unwrap();
    image.bound_cache(4 * u64::from(CHUNK)).unwrap();
    read_randomly(&image, 400);
}

fn make_stack(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.img");
    let mut data = vec![0u8; SIZE as usize];
    pattern(0, &mut data);
    std::fs::write(&base, &data).unwrap();
    let cache = dir.join("cache.asif");
    let mut image = DiskImage::open(&base, &OpenOptions::new().format(ImageFormat::Raw)).unwrap();
    image
        .append_new(
            &cache,
            &LayerOptions::cache().format(ImageFormat::Asif).chunk_size(CHUNK),
        )
        .unwrap();
    cache
}

#[test]
fn eight_readers_on_a_file_cache_bounded_to_four_chunks_read_only_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let cache = make_stack(dir.path());
    let bound = 4 * u64::from(CHUNK);
    let image = DiskImage::open(
        &cache,
        &OpenOptions::new()
            .writable(true)
            .parents(ParentPolicy::same_directory())
            .max_cache_size(Some(bound)),
    )
    .unwrap();
    read_randomly(&image, 200);
    image.flush().unwrap();
    let cached = image.describe_layers().unwrap()[0].allocated_bytes.unwrap();
    drop(image);
    // The bound held (metadata aside: the ASIF header, directory and a table are a few chunks).
    assert!(
        cached <= bound + 8 * u64::from(CHUNK),
        "the cache layer holds {cached} bytes; the bound is {bound}"
    );
    // Reopened without a bound: everything reads as the base.
    let image = DiskImage::open(
        &cache,
        &OpenOptions::new().parents(ParentPolicy::same_directory()),
    )
    .unwrap();
    let mut all = vec![0u8; SIZE as usize];
    image.read_at(&mut all, 0).unwrap();
    let mut want = vec![0u8; SIZE as usize];
    pattern(0, &mut want);
    assert!(all == want, "the stack reads as its base after the run");
}
