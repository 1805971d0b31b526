//! Serve a stack on a remote base over NBD on a Unix socket until its standard input ends
//! (then it stops in order, flushing the cache layer):
//! `cargo run --release --example remote_serve -- SOCKET IMAGE [URL]`. IMAGE is a cache layer
//! (or a stack over one); with URL, the cache layer is made first when it does not exist. Any
//! remote host is allowed. The library's path of `diskkit serve`; `DISKKIT_FETCH_UNIT=BYTES`
//! sets another fetch unit, for measurements (`scripts/bench-remote.sh` uses the CLI).

use std::path::PathBuf;
use std::sync::Arc;

use diskkit::{DiskImage, OpenOptions, ParentPolicy};
use diskkit_deliver::remote::{
    create_cache_layer, AllowRemote, CacheLayerOptions, RemoteOptions, RemoteResolver,
};
use diskkit_nbd::{Address, Export, Server, ServerConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let socket = PathBuf::from(&args[1]);
    let image = PathBuf::from(&args[2]);
    let mut options = RemoteOptions::default();
    // For measurements: another fetch unit (bytes).
    if let Some(unit) = std::env::var("DISKKIT_FETCH_UNIT")
        .ok()
        .and_then(|u| u.parse().ok())
    {
        options.fetch_unit = unit;
    }
    if let Some(url) = args.get(3) {
        if !image.exists() {
            create_cache_layer(&image, url, &options, &CacheLayerOptions::default())?;
        }
    }
    let resolver = Arc::new(RemoteResolver::new(options, AllowRemote::Any));
    let policy = ParentPolicy::same_directory().with_resolver(resolver);
    let stack = DiskImage::open(&image, &OpenOptions::new().parents(policy))?;
    let server = Server::bind(
        &Address::Unix(socket),
        ServerConfig::new(vec![Export::new("", Arc::new(stack))]),
    )?;
    let stop = server.shutdown_handle();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        stop.shutdown();
    });
    server.run()?;
    Ok(())
}
