//! The HTTP client and the cache's fetch against nginx, directly and through a proxy that
//! cuts connections, answers 500/503 and stalls.

mod support;

use std::fs;
use std::path::Path;
use std::time::Duration;

use diskkit_deliver::cache::{Cache, FetchEvent, FetchOptions, Holder, Source};
use diskkit_deliver::http::{self, Client, ClientOptions, ResumeState, RetryPolicy};
use diskkit_deliver::ErrorKind;
use support::{Fault, FaultProxy, Nginx, Rng};

fn fast_client(read_timeout: Duration, attempts: u32) -> Client {
    Client::new(&ClientOptions {
        read_timeout,
        connect_timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            attempts,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
        },
        ..ClientOptions::default()
    })
    .unwrap()
}

fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    Rng(seed).fill(&mut data);
    fs::write(path, &data).unwrap();
    data
}

fn download_all(
    client: &Client,
    url: &str,
    file: &Path,
    state: &mut ResumeState,
) -> diskkit_deliver::Result<http::DownloadOutcome> {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(file)
        .unwrap();
    http::download(client, url, &f, state, &mut |_| Ok(()))
}

/// Download until the file holds `stop` bytes, then fail (as a killed process would stop).
fn download_until(client: &Client, url: &str, file: &Path, state: &mut ResumeState, stop: u64) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(file)
        .unwrap();
    let e = http::download(client, url, &f, state, &mut |ev| match ev {
        http::Event::Progress { len, .. } if len >= stop => {
            Err(diskkit_deliver::Error::new(ErrorKind::Io, "stopped"))
        }
        _ => Ok(()),
    })
    .unwrap_err();
    assert_eq!(e.message(), Some("stopped"));
}

#[test]
fn downloads_survive_cuts_errors_and_stalls() {
    let www = tempfile::tempdir().unwrap();
    let data = random_file(&www.path().join("blob"), 20 << 20, 1);
    let nginx = Nginx::start(www.path());
    let proxy = FaultProxy::start(
        nginx.port,
        &[
            Fault::CutAfter(3 << 20),
            Fault::Status500,
            Fault::Status503RetryAfter,
            Fault::StallAfter(9 << 20, Duration::from_secs(4)),
            Fault::CutAfter(100),
            Fault::CutAfter(7 << 20),
        ],
    );
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("blob");
    let mut state = ResumeState::default();
    let client = fast_client(Duration::from_secs(1), 5);
    let o = download_all(&client, &proxy.url("blob"), &out, &mut state).unwrap();
    assert_eq!(fs::read(&out).unwrap(), data);
    assert_eq!(o.len, 20 << 20);
    assert_eq!(state.total, Some(20 << 20));
    assert!(state.validators.etag.is_some() && state.validators.last_modified.is_some());
    assert_eq!(proxy.pending(), 0, "every fault was met");
    // nginx served one full response and ranges for the rest; the bytes add up to about the
    // file once (the cut-off parts were counted by nginx as sent).
    let reqs = nginx.requests_for("blob");
    assert_eq!(reqs.iter().filter(|r| r.0 == 200).count(), 1, "{reqs:?}");
    assert!(reqs.iter().filter(|r| r.0 == 206).count() >= 3, "{reqs:?}");
}

#[test]
fn downloads_resume_later_and_restart_when_the_file_changed() {
    let www = tempfile::tempdir().unwrap();
    let data = random_file(&www.path().join("blob"), 8 << 20, 2);
    let nginx = Nginx::start(www.path());
    let proxy = FaultProxy::start(nginx.port, &[]);
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("blob");
    let mut state = ResumeState::default();
    download_until(
        &fast_client(Duration::from_secs(5), 1),
        &proxy.url("blob"),
        &out,
        &mut state,
        2 << 20,
    );
    let have = fs::metadata(&out).unwrap().len();
    assert!(have > 0 && have < 8 << 20);
    // A later "process" resumes from the file and the saved state.
    let saved: ResumeState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    let mut state2 = saved.clone();
    let o = download_all(
        &fast_client(Duration::from_secs(5), 3),
        &nginx.url("blob"),
        &out,
        &mut state2,
    );
    // The saved URL was the proxy's: a different URL starts over.
    assert_eq!(o.unwrap().resumed_from, 0);
    assert_eq!(fs::read(&out).unwrap(), data);

    // Same URL this time: cut, then resume with a 206 of exactly the rest.
    fs::remove_file(&out).unwrap();
    let proxy2 = FaultProxy::start(nginx.port, &[]);
    let mut st = ResumeState::default();
    download_until(
        &fast_client(Duration::from_secs(5), 1),
        &proxy2.url("blob"),
        &out,
        &mut st,
        3 << 20,
    );
    let have = fs::metadata(&out).unwrap().len();
    let o = download_all(
        &fast_client(Duration::from_secs(5), 3),
        &proxy2.url("blob"),
        &out,
        &mut st,
    )
    .unwrap();
    assert_eq!(o.resumed_from, have);
    assert_eq!(o.transferred, (8 << 20) - have);
    assert_eq!(fs::read(&out).unwrap(), data);
    assert!(nginx.requests_for("blob").contains(&(206, (8 << 20) - have)));

    // The file changes on the server between the cut and the resume: If-Range makes nginx
    // send the new version whole, and the download starts over.
    fs::remove_file(&out).unwrap();
    let proxy3 = FaultProxy::start(nginx.port, &[]);
    let mut st = ResumeState::default();
    download_until(
        &fast_client(Duration::from_secs(5), 1),
        &proxy3.url("blob"),
        &out,
        &mut st,
        1 << 20,
    );
    std::thread::sleep(Duration::from_millis(1100));
    let new = random_file(&www.path().join("blob"), 6 << 20, 3);
    let o = download_all(
        &fast_client(Duration::from_secs(5), 3),
        &proxy3.url("blob"),
        &out,
        &mut st,
    )
    .unwrap();
    assert_eq!(o.resumed_from, 0);
    assert_eq!(fs::read(&out).unwrap(), new);
    assert_eq!(st.total, Some(6 << 20));
}

#[test]
fn final_statuses_fail_at_once_and_retries_give_up() {
    let www = tempfile::tempdir().unwrap();
    let nginx = Nginx::start(www.path());
    let t = tempfile::tempdir().unwrap();
    let client = fast_client(Duration::from_secs(5), 4);
    let e = download_all(
        &client,
        &nginx.url("missing"),
        &t.path().join("x"),
        &mut ResumeState::default(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::HttpStatus);
    assert!(format!("{e}").contains("404"), "{e}");
    assert_eq!(nginx.requests_for("missing").len(), 1, "a 404 is not retried");
    let e = client.head(&nginx.url("missing")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::HttpStatus);
    // 500 four times: four attempts, then the error.
    let proxy = FaultProxy::start(nginx.port, &[Fault::Status500; 4]);
    let e = download_all(
        &client,
        &proxy.url("x"),
        &t.path().join("y"),
        &mut ResumeState::default(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Network);
    assert!(format!("{e}").contains("4 attempts"), "{e}");
    assert_eq!(proxy.connections.load(std::sync::atomic::Ordering::Relaxed), 4);
    // Nothing listening: connection refused, retried, then an error.
    let port = support::free_port();
    let e = client
        .get_with_retries(&format!("http://127.0.0.1:{port}/x"), None)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Network);
    // HEAD gives the validators nginx sends.
    fs::write(www.path().join("f"), b"hello").unwrap();
    let h = client.head(&nginx.url("f")).unwrap();
    assert_eq!((h.status, h.length, h.accept_ranges), (200, Some(5), true));
    assert!(h.validators.if_range().is_some());
}

fn bundle_on(www: &Path, name: &str) -> Vec<u8> {
    let src = www.join(format!("{name}.raw"));
    support::sparse_disk(&src, 64 << 20, &[(0, 1 << 20), (30 << 20, 4 << 20)], 17);
    let out = www.join(name);
    diskkit_deliver::bundle::create(&src, &out, &Default::default(), &mut |_, _| {}).unwrap();
    fs::read(&out).unwrap()
}

fn fetch_options(attempts: u32) -> FetchOptions {
    FetchOptions {
        http: ClientOptions {
            read_timeout: Duration::from_secs(2),
            retry: RetryPolicy {
                attempts,
                initial_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(200),
            },
            ..ClientOptions::default()
        },
        ..FetchOptions::default()
    }
}

#[test]
fn cache_fetches_bundles_over_faulty_http() {
    let www = tempfile::tempdir().unwrap();
    let bytes = bundle_on(www.path(), "b.tar.zst");
    let nginx = Nginx::start(www.path());
    let proxy = FaultProxy::start(
        nginx.port,
        &[
            Fault::CutAfter(1 << 20),
            Fault::Status500,
            Fault::StallAfter(2 << 20, Duration::from_secs(5)),
        ],
    );
    let c = tempfile::tempdir().unwrap();
    let cache = Cache::open(c.path()).unwrap();
    let mut retries = 0;
    let mut options = fetch_options(5);
    options.sha256 = Some(support::sha256(&bytes));
    let f = cache
        .fetch("img", &Source::Url(proxy.url("b.tar.zst")), &options, &mut |e| {
            if let FetchEvent::Retry { .. } = e {
                retries += 1;
            }
        })
        .unwrap();
    assert!(f.made && retries >= 2, "{retries}");
    assert_eq!(f.entry.record.kind, "bundle");
    support::sh(
        c.path(),
        &format!(
            "qemu-img compare -f raw -F raw '{}' '{}'",
            www.path().join("b.tar.zst.raw").display(),
            f.entry.disk().display()
        ),
    );
    assert!(support::tree(&c.path().join("partial")).is_empty());
    assert!(support::tree(&c.path().join("tmp")).is_empty());
    // A wrong digest: no entry, no partial download kept.
    let mut bad = options.clone();
    bad.sha256 = Some([0u8; 32]);
    let e = cache
        .fetch("img2", &Source::Url(nginx.url("b.tar.zst")), &bad, &mut |_| {})
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DigestMismatch, "{e:#}");
    assert!(cache.entry("img2").unwrap().is_none());
    assert!(support::tree(&c.path().join("partial")).is_empty());
    // A 404: the error, and a later fetch of the same ID that works.
    let e = cache
        .fetch("img3", &Source::Url(nginx.url("nope")), &options, &mut |_| {})
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::HttpStatus);
    cache
        .fetch(
            "img3",
            &Source::Url(nginx.url("b.tar.zst")),
            &options,
            &mut |_| {},
        )
        .unwrap();
    // An instance boots from the shared base: qemu-img reads it through both layers.
    let i = cache.instance("img3", Some("vm"), Holder::current()).unwrap();
    support::sh(
        c.path(),
        &format!(
            "qemu-img check '{}' && qemu-img compare -f raw '{}' '{}'",
            i.disk.display(),
            www.path().join("b.tar.zst.raw").display(),
            i.disk.display()
        ),
    );
    assert_eq!(cache.instance_info("vm").unwrap(), i);
}

#[test]
fn cache_fetches_plain_images_over_http() {
    let www = tempfile::tempdir().unwrap();
    let src = www.path().join("img.raw");
    support::sparse_disk(&src, 16 << 20, &[(1 << 20, 1 << 20)], 23);
    support::sh(www.path(), "qemu-img convert -f raw -O qcow2 img.raw img.qcow2 && qemu-img create -q -f qcow2 -F qcow2 -b img.qcow2 child.qcow2");
    let nginx = Nginx::start(www.path());
    let c = tempfile::tempdir().unwrap();
    let cache = Cache::open(c.path()).unwrap();
    let f = cache
        .fetch(
            "q",
            &Source::Url(nginx.url("img.qcow2")),
            &fetch_options(3),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(f.entry.record.kind, "image");
    support::sh(
        c.path(),
        &format!(
            "qemu-img compare -f raw -F raw '{}' '{}'",
            src.display(),
            f.entry.disk().display()
        ),
    );
    f.entry.machine().unwrap();
    // A downloaded qcow2 naming a backing file is refused (it could name any local file).
    let e = cache
        .fetch(
            "child",
            &Source::Url(nginx.url("child.qcow2")),
            &fetch_options(3),
            &mut |_| {},
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Image, "{e:#}");
    assert!(cache.entry("child").unwrap().is_none());
}
