//! I/O benchmark driver for scripts/bench-core.sh.
//!
//! `iobench PATH FORMAT PATTERN BLOCK SECONDS` where PATTERN is seq-read, seq-write,
//! rand-read or rand-write. Runs single-threaded through `DiskImage` for about SECONDS and prints
//! one line: `PATTERN FORMAT MB/s IOPS`. PATH may be the top layer of a stack.

use std::time::{Duration, Instant};

use diskkit::{DiskImage, ImageFormat, OpenOptions, ParentPolicy};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        return Err("usage: iobench PATH FORMAT PATTERN BLOCK SECONDS".into());
    }
    let format: ImageFormat = args[2].parse()?;
    let pattern = args[3].as_str();
    let block: usize = args[4].parse()?;
    let seconds: f64 = args[5].parse()?;
    let write = pattern.ends_with("write");
    // Stacks are followed through parents in the same directory (scripts/bench-stack.sh).
    let options = OpenOptions::new()
        .writable(write)
        .format(format)
        .parents(ParentPolicy::same_directory());
    let image = DiskImage::open(&args[1], &options)?;
    let blocks = image.size() / block as u64;
    let mut buf = vec![0x5au8; block];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let start = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    let mut ops = 0u64;
    let mut next = 0u64;
    while start.elapsed() < limit || ops == 0 {
        for _ in 0..64 {
            let b = if pattern.starts_with("seq") {
                let b = next % blocks;
                next += 1;
                b
            } else {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % blocks
            };
            let off = b * block as u64;
            if write {
                buf[0] = ops as u8;
                image.write_at(&buf, off)?;
            } else {
                image.read_at(&mut buf, off)?;
            }
            ops += 1;
        }
    }
    if write {
        image.flush()?;
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = ops * block as u64;
    println!(
        "{pattern} {} {:.0} {:.0}",
        args[2],
        bytes as f64 / secs / 1e6,
        ops as f64 / secs
    );
    Ok(())
}
