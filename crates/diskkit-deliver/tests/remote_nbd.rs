//! Remote bases served over NBD (the library's server, as `diskkit serve` runs it) to libnbd's
//! tools: eight concurrent connections (`nbdcopy --connections=8`) read a stack of a remote
//! base, its cache layer and an overlay with writes exactly; a server that keeps failing
//! reaches the client as EIO, within the retry limit, never as a hang or wrong data.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diskkit::{CreateOptions, DiskImage, ImageFormat, LayerOptions, OpenOptions, ParentPolicy};
use diskkit_deliver::http::{ClientOptions, RetryPolicy};
use diskkit_deliver::remote::{
    create_cache_layer, AllowRemote, CacheLayerOptions, RemoteOptions, RemoteResolver,
};
use diskkit_nbd::{Address, Export, Server, ServerConfig, ShutdownHandle};
use support::{Fault, FaultProxy, Nginx, Rng};

const MIB: u64 = 1 << 20;

fn options() -> RemoteOptions {
    RemoteOptions {
        client: ClientOptions {
            read_timeout: Duration::from_secs(2),
            retry: RetryPolicy {
                attempts: 3,
                initial_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(100),
            },
            ..ClientOptions::default()
        },
        ..RemoteOptions::default()
    }
}

/// `nbdsh` is `python3 -m nbd`; Debian's python3-libnbd is the system interpreter's module
/// (a `python3` earlier on PATH may not have it).
fn nbdsh() -> Command {
    let mut c = Command::new("/usr/bin/python3");
    c.args(["-m", "nbd"]);
    c
}

/// Serve `image` on a Unix socket in `dir` from a thread; returns the URI and the stopper.
fn serve(image: DiskImage, dir: &Path) -> (String, ShutdownHandle, std::thread::JoinHandle<()>) {
    let sock = dir.join("nbd.sock");
    let server = Server::bind(
        &Address::Unix(sock.clone()),
        ServerConfig::new(vec![Export::new("", Arc::new(image))]),
    )
    .unwrap();
    let stop = server.shutdown_handle();
    let thread = std::thread::spawn(move || server.run().unwrap());
    (format!("nbd+unix:///?socket={}", sock.display()), stop, thread)
}

#[test]
fn nbdcopy_with_eight_connections_reads_a_remote_stack_exactly() {
    let www = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let base = www.path().join("base.qcow2");
    {
        let image = DiskImage::create(&base, &CreateOptions::new(ImageFormat::Qcow2, size)).unwrap();
        let mut data = vec![0u8; 40 * MIB as usize];
        Rng(3).fill(&mut data);
        image.write_at(&data, 8 * MIB).unwrap();
    }
    let mut model = vec![0u8; size as usize];
    DiskImage::open(&base, &OpenOptions::new())
        .unwrap()
        .read_at(&mut model, 0)
        .unwrap();
    let nginx = Nginx::start(www.path());
    let resolver = Arc::new(RemoteResolver::new(
        options(),
        AllowRemote::Hosts(vec![format!("127.0.0.1:{}", nginx.port)]),
    ));
    let policy = ParentPolicy::same_directory().with_resolver(resolver.clone());
    let cache = work.path().join("cache.asif");
    create_cache_layer(
        &cache,
        &nginx.url("base.qcow2"),
        &options(),
        &CacheLayerOptions::default(),
    )
    .unwrap();
    let overlay = work.path().join("vm.asif");
    {
        let mut image =
            DiskImage::open(&cache, &OpenOptions::new().writable(true).parents(policy.clone())).unwrap();
        image.append_new(&overlay, &LayerOptions::overlay()).unwrap();
        let w = vec![0x5au8; 3 * MIB as usize + 17];
        image.write_at(&w, 30 * MIB - 5).unwrap();
        model[(30 * MIB - 5) as usize..(30 * MIB - 5) as usize + w.len()].copy_from_slice(&w);
        image.flush().unwrap();
    }
    for round in ["cold", "warm"] {
        let image = DiskImage::open(
            &overlay,
            &OpenOptions::new().writable(true).parents(policy.clone()),
        )
        .unwrap();
        let (uri, stop, thread) = serve(image, work.path());
        let out = work.path().join("out.raw");
        support::tool_ok(
            "nbdcopy",
            &["--connections=8", "--requests=16", &uri, out.to_str().unwrap()],
        );
        stop.shutdown();
        thread.join().unwrap();
        assert!(
            std::fs::read(&out).unwrap() == model,
            "{round}: nbdcopy's copy differs"
        );
        std::fs::remove_file(&out).unwrap();
    }
    // The warm round read nothing remote beyond the base's metadata.
    let warm = resolver.opened().last().unwrap().1;
    assert!(warm.bytes <= 8 * MIB, "{warm:?}");
}

#[test]
fn a_failing_server_reaches_nbd_clients_as_eio() {
    let www = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    support::sparse_disk(&www.path().join("b.img"), 16 * MIB, &[(0, 16 * MIB)], 9);
    let nginx = Nginx::start(www.path());
    let proxy = FaultProxy::start(nginx.port, &[]);
    let resolver = Arc::new(RemoteResolver::new(options(), AllowRemote::Any));
    let policy = ParentPolicy::deny().with_resolver(resolver);
    let cache = work.path().join("cache.asif");
    create_cache_layer(
        &cache,
        &proxy.url("b.img"),
        &options(),
        &CacheLayerOptions::default(),
    )
    .unwrap();
    let image = DiskImage::open(&cache, &OpenOptions::new().parents(policy)).unwrap();
    let (uri, stop, thread) = serve(image, work.path());
    proxy.set_default(Fault::Status500);
    proxy.cut_all();
    let started = Instant::now();
    let out = nbdsh()
        .args(["-u", &uri, "-c", "h.pread(65536, 8 << 20)"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("Input/output error") || stderr.contains("EIO"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    // Back to normal: the same range reads right.
    proxy.set_default(Fault::None);
    let out = nbdsh()
        .args([
            "-u",
            &uri,
            "-c",
            "import sys; sys.stdout.buffer.write(h.pread(65536, 8 << 20))",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expect = std::fs::read(www.path().join("b.img")).unwrap();
    assert!(out.stdout == expect[8 << 20..(8 << 20) + 65536]);
    stop.shutdown();
    thread.join().unwrap();
}
