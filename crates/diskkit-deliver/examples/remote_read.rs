//! Read a whole remote base through a cache layer with several threads and print the time:
//! `cargo run --release --example remote_read -- URL CACHE [THREADS]` (the cache layer is made
//! when it does not exist). A library-level companion of `scripts/bench-remote.sh`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use diskkit::{DiskImage, OpenOptions, ParentPolicy};
use diskkit_deliver::remote::{
    create_cache_layer, AllowRemote, CacheLayerOptions, RemoteOptions, RemoteResolver,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (url, cache) = (&args[1], std::path::Path::new(&args[2]));
    let threads: u64 = args.get(3).map_or(Ok(4), |t| t.parse())?;
    let options = RemoteOptions::default();
    let resolver = Arc::new(RemoteResolver::new(options.clone(), AllowRemote::Any));
    let image = if args[2] == "-" {
        // The base alone, without a cache layer: the network path only.
        let storage = Arc::new(diskkit_deliver::remote::open_remote(url, None, &options)?);
        DiskImage::open_storage(storage, &OpenOptions::new())?
    } else {
        open_cache(url, cache, &options, &resolver)?
    };
    read_all(&image, threads, &resolver)
}

fn open_cache(
    url: &str,
    cache: &std::path::Path,
    options: &RemoteOptions,
    resolver: &Arc<RemoteResolver>,
) -> Result<DiskImage, Box<dyn std::error::Error>> {
    if !cache.exists() {
        create_cache_layer(cache, url, options, &CacheLayerOptions::default())?;
    }
    let policy = ParentPolicy::deny().with_resolver(resolver.clone());
    Ok(DiskImage::open(cache, &OpenOptions::new().parents(policy))?)
}

fn read_all(
    image: &DiskImage,
    threads: u64,
    resolver: &RemoteResolver,
) -> Result<(), Box<dyn std::error::Error>> {
    let size = image.size();
    let piece = 4u64 << 20;
    let next = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; piece as usize];
                loop {
                    let off = next.fetch_add(piece, Ordering::Relaxed);
                    if off >= size {
                        return;
                    }
                    let n = piece.min(size - off) as usize;
                    image.read_at(&mut buf[..n], off).expect("read");
                }
            });
        }
    });
    image.flush()?;
    let secs = start.elapsed().as_secs_f64();
    let stats = resolver.opened().first().map(|s| s.1).unwrap_or_default();
    println!(
        "{} MiB in {secs:.2} s: {:.0} MiB/s; {} requests, {} MiB fetched, {} retries",
        size >> 20,
        (size >> 20) as f64 / secs,
        stats.requests,
        stats.bytes >> 20,
        stats.retries
    );
    Ok(())
}
