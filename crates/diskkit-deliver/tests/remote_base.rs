//! Remote bases behind a cache layer, against nginx (HTTP with Range, HTTPS with a CA made
//! here by openssl) and the fault-injecting proxy: stacks on a remote base read what the same
//! stack on the local file reads, before and after reopening; the cache persists and survives
//! SIGKILL during fills; a replaced object is refused; faults are retried or end in an I/O
//! error with no wrong data; parents are followed only when allowed.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use diskkit::{CreateOptions, DiskImage, ErrorKind, ImageFormat, LayerOptions, OpenOptions, ParentPolicy};
use diskkit_deliver::http::{ClientOptions, RetryPolicy};
use diskkit_deliver::remote::{
    create_cache_layer, prefetch, AllowRemote, CacheLayerOptions, RemoteOptions, RemoteResolver,
};
use support::{Fault, FaultProxy, Nginx, Rng};

const MIB: u64 = 1 << 20;

/// Quick retries, so fault tests end soon.
fn options() -> RemoteOptions {
    RemoteOptions {
        client: ClientOptions {
            read_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            retry: RetryPolicy {
                attempts: 4,
                initial_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(200),
            },
            ..ClientOptions::default()
        },
        readahead: 4 * MIB,
        ..RemoteOptions::default()
    }
}

fn policy_for(port: u16, options: RemoteOptions) -> (ParentPolicy, Arc<RemoteResolver>) {
    let resolver = Arc::new(RemoteResolver::new(
        options,
        AllowRemote::Hosts(vec![format!("127.0.0.1:{port}")]),
    ));
    (
        ParentPolicy::same_directory().with_resolver(resolver.clone()),
        resolver,
    )
}

/// A base image of `format` with random data in places, some zeroes, the rest unallocated;
/// returns its content.
fn make_base(path: &Path, format: ImageFormat, size: u64, seed: u64) -> Vec<u8> {
    {
        let image = DiskImage::create(path, &CreateOptions::new(format, size)).unwrap();
        let mut rng = Rng(seed | 1);
        for _ in 0..24 {
            let len = (rng.below(3 * MIB) + 1) & !511;
            let off = rng.below(size - len) & !511;
            let mut buf = vec![0u8; len as usize];
            rng.fill(&mut buf);
            image.write_at(&buf, off).unwrap();
        }
        image.write_zeroes(size / 2, MIB, true).unwrap();
        image.flush().unwrap();
    }
    read_all(&DiskImage::open(path, &OpenOptions::new()).unwrap())
}

fn read_all(image: &DiskImage) -> Vec<u8> {
    let mut out = vec![0u8; image.size() as usize];
    for (i, c) in out.chunks_mut(4 * MIB as usize).enumerate() {
        image.read_at(c, i as u64 * 4 * MIB).unwrap();
    }
    out
}

fn open_stack(path: &Path, policy: &ParentPolicy) -> diskkit::Result<DiskImage> {
    DiskImage::open(path, &OpenOptions::new().writable(true).parents(policy.clone()))
}

/// GET requests nginx logged for `name` (HEADs are not counted).
fn gets(nginx: &Nginx, name: &str) -> usize {
    nginx.requests_for(name).len()
}

/// A base image made by [`make_base`] in a web root of its own, served by nginx, with a cache
/// layer `cache.asif` made over its URL and a policy that allows nginx's host.
struct Served {
    nginx: Nginx,
    www: tempfile::TempDir,
    work: tempfile::TempDir,
    /// The base's content.
    model: Vec<u8>,
    policy: ParentPolicy,
    cache: PathBuf,
}

impl Served {
    fn new(name: &str, format: ImageFormat, size: u64, seed: u64) -> Served {
        let www = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let model = make_base(&www.path().join(name), format, size, seed);
        let nginx = Nginx::start(www.path());
        let (policy, _) = policy_for(nginx.port, options());
        let cache = work.path().join("cache.asif");
        create_cache_layer(
            &cache,
            &nginx.url(name),
            &options(),
            &CacheLayerOptions::default(),
        )
        .unwrap();
        Served {
            nginx,
            www,
            work,
            model,
            policy,
            cache,
        }
    }
}

#[test]
fn stacks_on_remote_bases_read_like_local_ones_before_and_after_reopening() {
    for (i, (format, name)) in [
        (ImageFormat::Raw, "base.img"),
        (ImageFormat::Asif, "base.asif"),
        (ImageFormat::Qcow2, "base.qcow2"),
    ]
    .into_iter()
    .enumerate()
    {
        let www = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let size = 48 * MIB;
        let mut model = make_base(&www.path().join(name), format, size, 7 + i as u64);
        let nginx = Nginx::start(www.path());
        let (policy, resolver) = policy_for(nginx.port, options());
        let cache = work.path().join("cache.asif");
        let made = create_cache_layer(
            &cache,
            &nginx.url(name),
            &options(),
            &CacheLayerOptions::default(),
        )
        .unwrap();
        assert_eq!((made.base_format, made.size), (format, size));
        assert!(made.identity.etag.is_some(), "nginx sends an ETag");
        let overlay = work.path().join("overlay.asif");
        {
            let mut image = open_stack(&cache, &policy).unwrap();
            assert_eq!(image.layer_count(), 2);
            image.append_new(&overlay, &LayerOptions::overlay()).unwrap();
            let mut rng = Rng(99);
            for i in 0..300 {
                let len = rng.below(256 << 10) + 1;
                let off = rng.below(size - len);
                if i % 4 == 0 {
                    let mut data = vec![0u8; len as usize];
                    rng.fill(&mut data);
                    image.write_at(&data, off).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                } else {
                    let mut got = vec![0u8; len as usize];
                    image.read_at(&mut got, off).unwrap();
                    assert!(
                        got == model[off as usize..(off + len) as usize],
                        "{format}: read {off}+{len}"
                    );
                }
            }
            image.flush().unwrap();
        }
        // Reopened: the overlay over the cache over the remote base.
        {
            let image = open_stack(&overlay, &policy).unwrap();
            assert_eq!(image.layer_count(), 3);
            assert!(read_all(&image) == model, "{format}: whole disk after reopening");
        }
        // Everything is cached now: a fresh open reads the disk without fetching data (only
        // the metadata an ASIF or qcow2 base's driver reads when it opens).
        let before = gets(&nginx, name);
        {
            let image = open_stack(&overlay, &policy).unwrap();
            assert!(read_all(&image) == model, "{format}: whole disk from the cache");
        }
        let opened = resolver.opened();
        let last = opened.last().unwrap().1;
        if format == ImageFormat::Raw {
            assert_eq!(gets(&nginx, name), before, "no GET for a cached RAW base");
        } else {
            // The base's header and tables: a few units, whatever the disk's size.
            assert!(last.requests <= 16, "{format}: {last:?} for metadata");
        }
    }
}

#[test]
fn prefetch_fills_everything_and_resumes() {
    // (Every field bound: what a pattern leaves out is dropped at once, nginx included.)
    let Served {
        nginx: _nginx,
        www: _www,
        work: _work,
        model,
        policy,
        cache,
    } = Served::new("b.qcow2", ImageFormat::Qcow2, 40 * MIB, 3);
    // A partial fill first (as if an earlier prefetch was interrupted).
    {
        let image = open_stack(&cache, &policy).unwrap();
        let mut buf = vec![0u8; 8 << 20];
        image.read_at(&mut buf, 0).unwrap();
        image.flush().unwrap();
    }
    let calls = std::sync::atomic::AtomicU64::new(0);
    let stats = {
        let image = open_stack(&cache, &policy).unwrap();
        prefetch(&image, 4, &|done, total| {
            assert!(done <= total);
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
        .unwrap()
    };
    assert!(stats.filled > 0 && calls.into_inner() > 1);
    let again = {
        let image = open_stack(&cache, &policy).unwrap();
        prefetch(&image, 4, &|_, _| {}).unwrap()
    };
    assert_eq!(again.filled, 0, "nothing left to fetch");
    // The server gone, the cache alone serves the whole disk? The base's identity is still
    // checked on open, so stop short of that: compare through the stack instead.
    let image = open_stack(&cache, &policy).unwrap();
    assert!(read_all(&image) == model);
}

#[test]
fn a_replaced_object_is_refused_on_open_and_fails_reads_while_open() {
    let served = Served::new("base.img", ImageFormat::Raw, 16 * MIB, 5);
    let (www, policy, cache) = (served.www.path(), &served.policy, &served.cache);
    let base = www.join("base.img");
    let image = open_stack(cache, policy).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    image.read_at(&mut buf, 0).unwrap();
    // Replaced by another object of the same size, a second later, so that nginx's ETag (the
    // mtime in seconds and the size) changes.
    std::thread::sleep(Duration::from_millis(1100));
    let other = www.join("other.img");
    make_base(&other, ImageFormat::Raw, 16 * MIB, 6);
    fs::rename(&other, &base).unwrap();
    let e = image.read_at(&mut buf, 12 * MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e:#}");
    let chain = format!(
        "{e}: {}",
        std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(chain.contains("changed"), "{chain}");
    drop(image);
    let e = open_stack(cache, policy).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LayerMismatch, "{e}");
    assert!(e.to_string().contains("no longer the object"), "{e}");
}

#[test]
fn remote_parents_are_followed_only_when_allowed() {
    let Served {
        nginx,
        www,
        work,
        model: _,
        policy: _,
        cache,
    } = Served::new("b.img", ImageFormat::Raw, 4 * MIB, 1);
    // No resolver: the URL is never taken for a file.
    for policy in [ParentPolicy::deny(), ParentPolicy::any()] {
        let e = open_stack(&cache, &policy).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PolicyDenied);
        assert!(e.to_string().contains("--allow-remote"), "{e}");
    }
    // A resolver for other hosts.
    let other = Arc::new(RemoteResolver::new(
        options(),
        AllowRemote::Hosts(vec!["example.com".into()]),
    ));
    let e = open_stack(&cache, &ParentPolicy::deny().with_resolver(other)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PolicyDenied);
    assert!(
        e.to_string()
            .contains(&format!("--allow-remote 127.0.0.1:{}", nginx.port)),
        "{e}"
    );
    let any = Arc::new(RemoteResolver::new(options(), AllowRemote::Any));
    assert!(open_stack(&cache, &ParentPolicy::deny().with_resolver(any)).is_ok());
    // A layer naming a URL without an identity is refused.
    let bare = work.path().join("bare.asif");
    {
        let image = DiskImage::create(&bare, &CreateOptions::new(ImageFormat::Asif, 4 * MIB)).unwrap();
        image
            .top_layer()
            .set_layer_info(&diskkit::LayerInfo {
                layer_type: Some(diskkit::LayerType::Cache),
                parent_path: Some(nginx.url("b.img")),
                parent_format: Some(ImageFormat::Raw),
                ..Default::default()
            })
            .unwrap();
    }
    let (policy, _) = policy_for(nginx.port, options());
    let e = open_stack(&bare, &policy).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PolicyDenied);
    assert!(e.to_string().contains("without recording which version"), "{e}");
    // Redirects are not followed: they could lead to a host that was not allowed. nginx
    // redirects a directory named without its slash (301 to `dir/`).
    fs::create_dir(www.path().join("dir")).unwrap();
    let redirected = work.path().join("redirected.asif");
    let e = create_cache_layer(
        &redirected,
        &nginx.url("dir"),
        &options(),
        &CacheLayerOptions::default(),
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("redirects (HTTP 301)") && text.contains("/dir/") && text.contains("final URL"),
        "{text}"
    );
    assert!(!redirected.exists());
    assert!(
        !nginx.access_log().iter().any(|l| l.contains(" /dir/ ")),
        "the redirect's target was not asked for"
    );
}

#[test]
fn faults_are_retried_or_end_in_an_io_error_without_wrong_data() {
    let www = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let model = make_base(&www.path().join("b.img"), ImageFormat::Raw, 24 * MIB, 11);
    let nginx = Nginx::start(www.path());
    let proxy = FaultProxy::start(nginx.port, &[]);
    let mut opts = options();
    opts.parallel = 2;
    let (policy, resolver) = policy_for(proxy.port, opts.clone());
    let cache = work.path().join("cache.asif");
    create_cache_layer(&cache, &proxy.url("b.img"), &opts, &CacheLayerOptions::default()).unwrap();
    // The faults meet the connections of a fresh open (its client starts with an empty pool;
    // each fault ends its connection, so the next request opens a new one).
    for f in [
        Fault::CutAfter(300 << 10),
        Fault::Status500,
        Fault::Status503RetryAfter,
        Fault::StallAfter(1000, Duration::from_secs(3)),
        Fault::CutAfter(10),
    ] {
        proxy.push(f);
    }
    let image = open_stack(&cache, &policy).unwrap();
    // Each fault ends its connection, so the next request opens a new one and meets the next.
    let mut got = vec![0u8; MIB as usize];
    let mut at = 0;
    while proxy.pending() > 0 && at < 12 * MIB {
        image.read_at(&mut got, at).unwrap();
        assert!(
            got == model[at as usize..(at + MIB) as usize],
            "data after retries at {at}"
        );
        at += MIB;
    }
    assert_eq!(proxy.pending(), 0);
    assert!(
        resolver.opened()[0].1.retries >= 4,
        "{:?}",
        resolver.opened()[0].1
    );
    let mut got = vec![0u8; 6 * MIB as usize];
    // Every connection fails now: the read fails with an I/O error, within the retry limit.
    proxy.set_default(Fault::Status500);
    proxy.cut_all();
    let t = std::time::Instant::now();
    let e = image.read_at(&mut got, 18 * MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e:#}");
    assert!(t.elapsed() < Duration::from_secs(60));
    // Nothing of the failed range was kept: once the server is back, the data is right.
    proxy.set_default(Fault::None);
    image.read_at(&mut got, 18 * MIB).unwrap();
    assert!(got == model[18 * MIB as usize..24 * MIB as usize]);
    drop(image);
    let image = open_stack(&cache, &policy).unwrap();
    assert!(read_all(&image) == model);
}

#[test]
fn a_second_open_of_a_filling_cache_is_refused_as_in_use() {
    let Served {
        nginx: _nginx,
        www: _www,
        work,
        model: _,
        policy,
        cache,
    } = Served::new("b.img", ImageFormat::Raw, 4 * MIB, 1);
    let first = open_stack(&cache, &policy).unwrap();
    let e = open_stack(&cache, &policy).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
    // An overlay on the cache, in another open, is refused too: the cache fills under a
    // writer lock held by the first.
    drop(first);
    let mut a = open_stack(&cache, &policy).unwrap();
    let overlay = work.path().join("vm1.asif");
    a.append_new(&overlay, &LayerOptions::overlay()).unwrap();
    drop(a);
    let a = open_stack(&overlay, &policy).unwrap();
    let e = open_stack(&cache, &policy).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
    drop(a);
}

#[test]
fn https_with_a_test_ca() {
    let www = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path();
    support::sh(
        d,
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=diskkit-test-ca 2>/dev/null
         openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
         printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext.cnf
         openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext.cnf 2>/dev/null",
    );
    let model = make_base(&www.path().join("b.img"), ImageFormat::Raw, 8 * MIB, 2);
    let nginx = Nginx::start_tls(www.path(), &d.join("server.pem"), &d.join("server.key"));
    let url = format!("https://127.0.0.1:{}/b.img", nginx.port);
    let cache = work.path().join("cache.asif");
    // Without the CA the server is not trusted.
    let e = create_cache_layer(&cache, &url, &options(), &CacheLayerOptions::default()).unwrap_err();
    assert_eq!(e.kind(), diskkit_deliver::ErrorKind::Network, "{e}");
    let mut opts = options();
    opts.client.extra_ca_files = vec![d.join("ca.pem")];
    create_cache_layer(&cache, &url, &opts, &CacheLayerOptions::default()).unwrap();
    let (policy, _) = policy_for(nginx.port, opts);
    let image = open_stack(&cache, &policy).unwrap();
    assert!(read_all(&image) == model);
}

#[test]
fn a_sha256_pins_a_server_without_validators_and_a_wrong_one_is_refused() {
    let www = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let model = make_base(&www.path().join("b.img"), ImageFormat::Raw, 4 * MIB, 8);
    let hex: String = support::sha256(&model)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let nginx = Nginx::start(www.path());
    let cache = work.path().join("cache.asif");
    let layer = CacheLayerOptions {
        sha256: Some("00".repeat(32)),
        ..CacheLayerOptions::default()
    };
    let e = create_cache_layer(&cache, &nginx.url("b.img"), &options(), &layer).unwrap_err();
    assert_eq!(e.kind(), diskkit_deliver::ErrorKind::DigestMismatch);
    assert!(!cache.exists());
    let layer = CacheLayerOptions {
        sha256: Some(hex.clone()),
        ..CacheLayerOptions::default()
    };
    let made = create_cache_layer(&cache, &nginx.url("b.img"), &options(), &layer).unwrap();
    assert_eq!(made.identity.sha256.as_deref(), Some(hex.as_str()));
}

/// The child of the SIGKILL test: reads random ranges of the stack forever.
#[test]
fn sigkill_child() {
    let Ok(spec) = std::env::var("DISKKIT_REMOTE_CHILD") else {
        return;
    };
    let (path, port, seed) = {
        let mut it = spec.split(',');
        (
            PathBuf::from(it.next().unwrap()),
            it.next().unwrap().parse::<u16>().unwrap(),
            it.next().unwrap().parse::<u64>().unwrap(),
        )
    };
    let (policy, _) = policy_for(port, options());
    let image = open_stack(&path, &policy).unwrap();
    let mut rng = Rng(seed | 1);
    let size = image.size();
    eprintln!("ready");
    loop {
        let len = rng.below(3 * MIB) + 1;
        let off = rng.below(size - len);
        let mut buf = vec![0u8; len as usize];
        image.read_at(&mut buf, off).unwrap();
        if rng.below(8) == 0 {
            image.flush().unwrap();
        }
    }
}

#[test]
fn sigkill_during_fills_never_leaves_unfetched_data() {
    sigkill_rounds(ImageFormat::Asif, 32);
}

#[test]
fn sigkill_during_fills_of_a_qcow2_cache_layer() {
    sigkill_rounds(ImageFormat::Qcow2, 8);
}

fn sigkill_rounds(cache_format: ImageFormat, rounds: u64) {
    let www = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let model = make_base(&www.path().join("b.img"), ImageFormat::Raw, 64 * MIB, 21);
    let nginx = Nginx::start(www.path());
    // Slow transfers, so kills land in the middle of fetches and fills.
    let proxy = FaultProxy::start(nginx.port, &[]);
    proxy.set_default(Fault::Throttle(40 << 20));
    let cache = work.path().join(format!("cache.{cache_format}"));
    let layer = CacheLayerOptions {
        format: cache_format,
        ..CacheLayerOptions::default()
    };
    create_cache_layer(&cache, &proxy.url("b.img"), &options(), &layer).unwrap();
    let (policy, _) = policy_for(proxy.port, options());
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng(5);
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args(["--exact", "sigkill_child", "--nocapture", "--test-threads=1"])
            .env(
                "DISKKIT_REMOTE_CHILD",
                format!("{},{},{round}", cache.display(), proxy.port),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(150 + rng.below(400)));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "round {round}: the child ended by itself: {status}"
        );
        if round % 8 == 7 {
            let image = open_stack(&cache, &policy).unwrap();
            assert!(read_all(&image) == model, "round {round}");
        }
    }
    let image = open_stack(&cache, &policy).unwrap();
    let filled = image.describe_layers().unwrap()[0].allocated_bytes.unwrap_or(0);
    assert!(read_all(&image) == model);
    assert!(filled > 0, "the children filled the cache");
}

#[test]
fn a_size_bound_evicts_least_recently_used_units_and_refetches_them() {
    let www = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let size = 40 * MIB;
    let name = "b.img";
    {
        // Data everywhere, so every unit takes space in the cache.
        let mut data = vec![0u8; size as usize];
        Rng(31).fill(&mut data);
        fs::write(www.path().join(name), &data).unwrap();
    }
    let model = read_all(&DiskImage::open(www.path().join(name), &OpenOptions::new()).unwrap());
    let nginx = Nginx::start(www.path());
    let (policy, resolver) = policy_for(nginx.port, options());
    let cache = work.path().join("cache.asif");
    create_cache_layer(
        &cache,
        &nginx.url(name),
        &options(),
        &CacheLayerOptions::default(),
    )
    .unwrap();
    let bound = 10 * MIB;
    // Header, metadata and tables.
    let overhead = support::allocated(&cache);
    let open = |bound: Option<u64>| {
        DiskImage::open(
            &cache,
            &OpenOptions::new()
                .writable(true)
                .parents(policy.clone())
                .max_cache_size(bound),
        )
    };
    {
        let image = open(Some(bound)).unwrap();
        // A hot unit, read between every other read, stays cached.
        let mut hot = vec![0u8; 4096];
        let mut buf = vec![0u8; MIB as usize];
        for i in 0..40 {
            image.read_at(&mut buf, i * MIB).unwrap();
            assert!(buf == model[(i * MIB) as usize..((i + 1) * MIB) as usize]);
            image.read_at(&mut hot, 3 * MIB).unwrap();
        }
        let held = image.describe_layers().unwrap()[0].allocated_bytes.unwrap() - overhead;
        assert!(
            held <= bound + MIB,
            "{held} bytes of data allocated ({overhead} overhead)"
        );
        let before = resolver.opened().last().unwrap().1.bytes;
        image.read_at(&mut hot, 3 * MIB).unwrap();
        image.read_at(&mut buf, 38 * MIB).unwrap();
        assert_eq!(
            resolver.opened().last().unwrap().1.bytes,
            before,
            "recent units are cached"
        );
        // The first units were evicted (they map to the base again); the hot one was not.
        // Reading them fills them again, correctly.
        assert_eq!(image.status(0, MIB).unwrap().depth, 2);
        assert_eq!(image.status(3 * MIB, MIB).unwrap().depth, 1);
        image.read_at(&mut buf, 0).unwrap();
        assert!(buf == model[..MIB as usize]);
        assert_eq!(image.status(0, MIB).unwrap().depth, 1);
    }
    // Reopened with a smaller bound: trimmed at once; without a bound, reads are right.
    {
        let image = open(Some(4 * MIB)).unwrap();
        let held = image.describe_layers().unwrap()[0].allocated_bytes.unwrap() - overhead;
        assert!(held <= 5 * MIB, "{held} bytes of data allocated after trimming");
    }
    let image = open(None).unwrap();
    assert!(read_all(&image) == model);
    // A qcow2 cache layer cannot forget: a bound is refused clearly.
    let q = work.path().join("cache.qcow2");
    let layer = CacheLayerOptions {
        format: ImageFormat::Qcow2,
        ..CacheLayerOptions::default()
    };
    create_cache_layer(&q, &nginx.url(name), &options(), &layer).unwrap();
    let e = DiskImage::open(
        &q,
        &OpenOptions::new()
            .writable(true)
            .parents(policy.clone())
            .max_cache_size(Some(bound)),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
}

#[test]
fn a_cache_layer_opened_read_only_still_fills() {
    let served = Served::new("b.img", ImageFormat::Raw, 8 * MIB, 4);
    let (model, policy, cache) = (&served.model, served.policy.clone(), &served.cache);
    {
        let image = DiskImage::open(cache, &OpenOptions::new().parents(policy.clone())).unwrap();
        assert_eq!(image.open_mode(), diskkit::OpenMode::ReadOnly);
        assert!(image.write_at(&[1], 0).is_err(), "read-only all the same");
        assert!(read_all(&image) == *model);
    }
    let image = DiskImage::open(cache, &OpenOptions::new().parents(policy)).unwrap();
    for e in image.extents(0, 8 * MIB).unwrap() {
        assert!(
            e.depth == 1 || e.kind == diskkit::ExtentKind::Zero,
            "not in the cache: {e:?}"
        );
    }
}

#[test]
fn a_cache_opens_while_the_server_is_down_and_serves_what_it_holds() {
    let Served {
        nginx,
        www: _www,
        work,
        model,
        policy,
        cache,
    } = Served::new("b.img", ImageFormat::Raw, 8 * MIB, 12);
    // A second cache layer over the same object that holds nothing.
    let empty = work.path().join("empty.asif");
    create_cache_layer(
        &empty,
        &nginx.url("b.img"),
        &options(),
        &CacheLayerOptions::default(),
    )
    .unwrap();
    {
        let image = open_stack(&cache, &policy).unwrap();
        prefetch(&image, 2, &|_, _| {}).unwrap();
        assert!(image.warnings().is_empty(), "{:?}", image.warnings());
    }
    drop(nginx);
    // The open cannot check the object, says so, and reads everything from the cache.
    let image = open_stack(&cache, &policy).unwrap();
    let warnings = image.warnings().join("\n");
    assert!(
        warnings.contains("could not be reached") && warnings.contains("/b.img"),
        "{warnings}"
    );
    assert!(read_all(&image) == model);
    drop(image);
    // What is not cached fails with an I/O error (EIO to NBD clients), not with zeroes.
    let image = open_stack(&empty, &policy).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = image.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
}
