//! Multi-threaded I/O benchmark driver for scripts/bench-concurrency.sh.
//!
//! `threadbench PATH FORMAT PATTERN THREADS SECONDS` where PATTERN is rand-read, rand-write or
//! rand-mixed (3 reads to 1 write). THREADS threads share one open `DiskImage` and do random
//! 4 KiB requests for about SECONDS; prints one line: `PATTERN FORMAT THREADS IOPS`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diskkit::{DiskImage, ImageFormat, OpenOptions};

const BLOCK: usize = 4096;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        return Err("usage: threadbench PATH FORMAT PATTERN THREADS SECONDS".into());
    }
    let format: ImageFormat = args[2].parse()?;
    let pattern = args[3].as_str();
    let threads: usize = args[4].parse()?;
    let seconds: f64 = args[5].parse()?;
    let writes = pattern != "rand-read";
    let image = DiskImage::open(&args[1], &OpenOptions::new().writable(writes).format(format))?;
    let blocks = image.size() / BLOCK as u64;
    let stop = AtomicBool::new(false);
    let total = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|scope| -> Result<(), Box<dyn std::error::Error>> {
        let mut handles = Vec::new();
        for t in 0..threads {
            let (image, stop, total) = (&image, &stop, &total);
            handles.push(scope.spawn(move || -> diskkit::Result<()> {
                let mut buf = vec![0x5au8; BLOCK];
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ ((t as u64 + 1) << 32);
                let mut ops = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..32 {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let off = (rng % blocks) * BLOCK as u64;
                        let write = match pattern {
                            "rand-write" => true,
                            "rand-mixed" => rng >> 62 == 0,
                            _ => false,
                        };
                        if write {
                            buf[0] = ops as u8;
                            image.write_at(&buf, off)?;
                        } else {
                            image.read_at(&mut buf, off)?;
                        }
                        ops += 1;
                    }
                }
                total.fetch_add(ops, Ordering::Relaxed);
                Ok(())
            }));
        }
        std::thread::sleep(Duration::from_secs_f64(seconds));
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().map_err(|_| "a benchmark thread panicked")??;
        }
        Ok(())
    })?;
    let secs = start.elapsed().as_secs_f64();
    if writes {
        image.flush()?;
    }
    println!(
        "{pattern} {} {threads} {:.0}",
        args[2],
        total.load(Ordering::Relaxed) as f64 / secs
    );
    Ok(())
}
