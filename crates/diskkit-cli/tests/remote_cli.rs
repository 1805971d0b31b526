//! Remote base images from the command line, against a real nginx: `layer create --type cache
//! --parent URL` (refused without `--allow-remote`, with the fix in one line), an overlay on
//! the cache served by `diskkit serve` and read whole by `nbdcopy --connections=8`, and
//! `diskkit prefetch` filling a cache so that a server started on it keeps reading everything
//! after nginx is stopped; and `--max-cache-size` keeping a cache under its bound.

#[path = "../../diskkit-deliver/tests/support/mod.rs"]
mod net;
mod support;

use std::process::Output;
use std::time::{Duration, Instant};

use support::{cached, diskkit, diskkit_ok, tool_ok, Dir};

const MIB: u64 = 1 << 20;

/// Wait (generously; never a timing assertion) until `cond` holds.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn error_line(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("diskkit: error: "), "{err}");
    err
}

/// `diskkit serve` in the background on a Unix socket; returns the NBD URI and the pid.
fn serve(d: &Dir, name: &str, args: &[&str]) -> (String, String) {
    let sock = d.path(&format!("{name}.sock"));
    let pid_file = d.path(&format!("{name}.pid"));
    let mut all = vec![
        "serve",
        "--read-only",
        "--socket",
        sock.to_str().unwrap(),
        "--pid-file",
        pid_file.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    diskkit_ok(&all);
    let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_owned();
    (format!("nbd+unix:///?socket={}", sock.display()), pid)
}

fn stop(d: &Dir, name: &str, pid: &str) {
    tool_ok("kill", &[pid]);
    let pid_file = d.path(&format!("{name}.pid"));
    wait_for("the server to stop", || !pid_file.exists());
}

/// Read the whole export with eight connections and compare it with `want`.
fn nbdcopy_matches(d: &Dir, uri: &str, want: &[u8], what: &str) {
    let out = d.path("copy.raw");
    let _ = std::fs::remove_file(&out);
    tool_ok("nbdcopy", &["--connections=8", uri, out.to_str().unwrap()]);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), want.len(), "{what}: size");
    assert!(got == want, "{what}: nbdcopy's copy differs from the base");
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn remote_cache_layers_from_the_command_line() {
    let www = Dir::new();
    let d = Dir::new();
    // A 40 MiB base with data in several places (and holes), as qcow2 on the server.
    let raw = d.path("base.raw");
    net::sparse_disk(
        &raw,
        40 * MIB,
        &[
            (0, 3 * MIB),
            (7 * MIB, 5 * MIB),
            (20 * MIB, MIB),
            (33 * MIB, 7 * MIB),
        ],
        15,
    );
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            &www.s("base.qcow2"),
        ],
    );
    let want = std::fs::read(&raw).unwrap();
    let mut nginx = Some(net::Nginx::start(www.0.path()));
    let port = nginx.as_ref().unwrap().port;
    let url = nginx.as_ref().unwrap().url("base.qcow2");
    let host = format!("127.0.0.1:{port}");
    let cache = d.s("cache.asif");

    // Without --allow-remote: refused, in one line naming the fix; nothing is written.
    let err = error_line(&diskkit(&[
        "layer", "create", "--type", "cache", "--parent", &url, &cache,
    ]));
    assert!(err.contains(&format!("--allow-remote {host}")), "{err}");
    assert!(!d.path("cache.asif").exists());
    // An overlay straight on a URL is refused too: remote parents are for cache layers.
    let err = error_line(&diskkit(&[
        "layer",
        "create",
        "--allow-remote",
        &host,
        "--parent",
        &url,
        &d.s("o.qcow2"),
    ]));
    assert!(err.contains("--type cache"), "{err}");

    let out = diskkit_ok(&[
        "layer",
        "create",
        "--type",
        "cache",
        "--allow-remote",
        &host,
        "--parent",
        &url,
        &cache,
    ]);
    assert!(
        out.starts_with(&format!(
            "created cache layer '{cache}' (asif, 40 MiB) over {url} (qcow2, ETag \""
        )),
        "{out}"
    );
    let vm = d.s("vm.qcow2");
    diskkit_ok(&[
        "layer",
        "create",
        "--allow-remote",
        &host,
        "--parent",
        &cache,
        &vm,
    ]);

    // Opening the stack without --allow-remote: one line, with the fix.
    let err = error_line(&diskkit(&["info", &vm]));
    assert!(err.contains(&format!("--allow-remote {host}")), "{err}");

    // A cache bound too small to be safe under concurrent readers is refused by the parser.
    let out = diskkit(&["info", "--allow-remote", &host, "--max-cache-size", "1M", &vm]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("give at least 64M"),
        "{out:?}"
    );

    // Served, and read whole by eight NBD connections at once.
    let (uri, pid) = serve(&d, "vm", &["--allow-remote", &host, &vm]);
    nbdcopy_matches(&d, &uri, &want, "through the cache, filling it");
    stop(&d, "vm", &pid);

    // A second cache, filled by prefetch, then served with nginx stopped after the open.
    let cache2 = d.s("cache2.asif");
    diskkit_ok(&[
        "layer",
        "create",
        "--type",
        "cache",
        "--allow-remote",
        &host,
        "--parent",
        &url,
        &cache2,
    ]);
    let vm2 = d.s("vm2.asif");
    diskkit_ok(&[
        "layer",
        "create",
        "--allow-remote",
        &host,
        "--parent",
        &cache2,
        &vm2,
    ]);
    let out = diskkit_ok(&["prefetch", "--allow-remote", &host, &vm2]);
    assert!(
        out.starts_with(&format!("prefetched '{vm2}' (40 MiB disk): 16 MiB fetched")),
        "{out}"
    );
    assert_eq!(out.lines().count(), 1, "{out}");
    // Again: nothing left to fetch; -q prints nothing.
    let out = diskkit_ok(&["prefetch", "--allow-remote", &host, &cache2]);
    assert!(out.contains("nothing to fetch"), "{out}");
    assert_eq!(
        diskkit_ok(&["prefetch", "-q", "--allow-remote", &host, &cache2]),
        ""
    );

    // An open asks the server for the object's version, so the server starts with nginx up;
    // every read after that is served from the cache.
    let (uri, pid) = serve(&d, "vm2", &["--allow-remote", &host, &vm2]);
    drop(nginx.take());
    nbdcopy_matches(&d, &uri, &want, "from the prefetched cache, nginx stopped");
    stop(&d, "vm2", &pid);
}

#[test]
fn https_needs_the_ca_given_with_ca_cert_and_a_wrong_sha256_is_refused() {
    let pki = Dir::new();
    net::sh(
        pki.0.path(),
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=diskkit-test-ca 2>/dev/null
         openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
         printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext.cnf
         openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext.cnf 2>/dev/null",
    );
    let www = Dir::new();
    let d = Dir::new();
    net::sparse_disk(&www.path("b.img"), 8 * MIB, &[(MIB, 3 * MIB)], 7);
    let want = std::fs::read(www.path("b.img")).unwrap();
    let nginx = net::Nginx::start_tls(www.0.path(), &pki.path("server.pem"), &pki.path("server.key"));
    let host = format!("127.0.0.1:{}", nginx.port);
    let url = format!("https://{host}/b.img");
    let cache = d.s("cache.asif");
    let ca = pki.s("ca.pem");
    let create = |extra: &[&str]| {
        let mut args = vec!["layer", "create", "--type", "cache", "--allow-remote", &host];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--parent", &url, &cache]);
        diskkit(&args)
    };
    // A wrong SHA-256 is refused (the object is read once to check it), and nothing is written.
    let zeros = "0".repeat(64);
    let err = error_line(&create(&["--ca-cert", &ca, "--parent-sha256", &zeros]));
    assert!(err.contains("SHA-256"), "{err}");
    assert!(!d.path("cache.asif").exists());
    // The test CA is not among the system's roots: refused without --ca-cert.
    error_line(&create(&[]));
    assert!(!d.path("cache.asif").exists());
    let out = create(&["--ca-cert", &ca]);
    assert!(out.status.success(), "{out:?}");
    // Read whole through the stack (convert opens it like every command), with the CA.
    let copy = d.s("copy.raw");
    diskkit_ok(&[
        "convert",
        "-q",
        "--allow-remote",
        &host,
        "--ca-cert",
        &ca,
        &cache,
        &copy,
    ]);
    assert!(std::fs::read(&copy).unwrap() == want, "the copy differs");
}

#[test]
fn a_second_process_is_told_the_cache_is_in_use_and_a_cache_works_with_the_server_down() {
    let www = Dir::new();
    let d = Dir::new();
    net::sparse_disk(
        &www.path("b.img"),
        16 * MIB,
        &[(0, 2 * MIB), (9 * MIB, 4 * MIB)],
        23,
    );
    let want = std::fs::read(www.path("b.img")).unwrap();
    let nginx = net::Nginx::start(www.0.path());
    let host = format!("127.0.0.1:{}", nginx.port);
    let url = nginx.url("b.img");
    let cache = d.s("cache.asif");
    let remote = ["--allow-remote", host.as_str()];
    let mut create = vec!["layer", "create", "--type", "cache"];
    create.extend_from_slice(&remote);
    create.extend_from_slice(&["--parent", &url, &cache]);
    diskkit_ok(&create);

    // One process serves (and fills) the cache; a second one that would fill it too is told
    // it is in use, in one line.
    let mut args = remote.to_vec();
    args.push(&cache);
    let (uri, pid) = serve(&d, "first", &args);
    let mut prefetch = vec!["prefetch"];
    prefetch.extend_from_slice(&remote);
    prefetch.push(&cache);
    let err = error_line(&diskkit(&prefetch));
    assert!(err.contains("in use") || err.contains("another process"), "{err}");
    nbdcopy_matches(&d, &uri, &want, "served while the second process was refused");
    stop(&d, "first", &pid);

    // The first server's reads filled the whole cache. With nginx stopped, the stack still
    // opens (a warning says the object could not be checked) and reads everything.
    drop(nginx);
    let mut convert = vec!["convert"];
    convert.extend_from_slice(&remote);
    let copy = d.s("copy.raw");
    convert.extend_from_slice(&[&cache, &copy]);
    let out = diskkit(&convert);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning") && err.contains("could not be reached"),
        "{err}"
    );
    assert!(std::fs::read(&copy).unwrap() == want, "the copy differs");
}

/// Bytes nginx sent for `name` since `since` lines of its access log.
fn fetched(nginx: &net::Nginx, name: &str, since: usize) -> (usize, u64) {
    let all = nginx.requests_for(name);
    let new = &all[since.min(all.len())..];
    (all.len(), new.iter().map(|(_, b)| b).sum())
}

/// `--max-cache-size`: a 192 MiB remote base (all data) read whole through a cache bounded
/// to 64 MiB, by `diskkit serve` + nbdcopy and by `diskkit convert`: what is read is the
/// base, the cache holds between nine tenths of 64 MiB and 64 MiB afterwards (the budget
/// trims to nine tenths of the bound when a fill passes it: `crates/diskkit/src/stack/budget.rs`), after a
/// sequential read the most recently read part of the disk, its file's allocation stays within the bound plus the metadata
/// of an empty cache layer and two table chunks, and a second read fetches again what was
/// evicted. Then an unbounded read fills the cache whole, and an open with the bound trims
/// it at once.
#[test]
fn max_cache_size_evicts_and_refetches() {
    let www = Dir::new();
    let d = Dir::new();
    let size = 192 * MIB;
    let bound = 64 * MIB;
    net::sparse_disk(&www.path("big.img"), size, &[(0, size)], 23);
    let want = std::fs::read(www.path("big.img")).unwrap();
    let nginx = net::Nginx::start(www.0.path());
    let host = format!("127.0.0.1:{}", nginx.port);
    let url = nginx.url("big.img");
    let cache = d.s("cache.asif");
    diskkit_ok(&[
        "layer",
        "create",
        "-q",
        "--type",
        "cache",
        "--allow-remote",
        &host,
        "--parent",
        &url,
        &cache,
    ]);
    // Metadata of the empty layer (header, directories, metadata chunk); each commit writes
    // the changed table to a new chunk and punches the old one after it: two tables.
    let info: serde_json::Value =
        serde_json::from_str(&diskkit_ok(&["info", "--output", "json", "--detached", &cache])).unwrap();
    let chunk = info["cluster_size"].as_u64().unwrap();
    let slack = net::allocated(&d.path("cache.asif")) + 2 * chunk;
    // The budget counts chunks; past the bound it evicts down to nine tenths of them.
    let low = (bound / chunk - bound / chunk / 10) * chunk;
    let within_bound = |what: &str| {
        let (bytes, _) = cached(&cache);
        assert!(
            (low..=bound).contains(&bytes),
            "{what}: {bytes} bytes cached, bound {bound}"
        );
        let alloc = net::allocated(&d.path("cache.asif"));
        eprintln!("{what}: {bytes} bytes cached, {alloc} allocated (bound {bound} + {slack})");
        assert!(
            alloc <= bound + slack,
            "{what}: the cache file has {alloc} bytes allocated, bound {bound} + {slack}"
        );
    };
    let (mut seen, _) = fetched(&nginx, "big.img", 0);

    // Through diskkit serve, with four NBD connections.
    let (uri, pid) = serve(
        &d,
        "bounded",
        &["--allow-remote", &host, "--max-cache-size", "64M", &cache],
    );
    let out = d.path("copy.raw");
    tool_ok("nbdcopy", &["--connections=4", &uri, out.to_str().unwrap()]);
    stop(&d, "bounded", &pid);
    assert!(std::fs::read(&out).unwrap() == want, "nbdcopy's copy differs");
    let (n, bytes) = fetched(&nginx, "big.img", seen);
    assert!(bytes >= size, "the first read fetched only {bytes} bytes");
    seen = n;
    within_bound("after nbdcopy");

    // Again through convert: the part of the base that is not in the cache is fetched again.
    let copy = d.s("copy2.raw");
    diskkit_ok(&[
        "convert",
        "-q",
        "--allow-remote",
        &host,
        "--max-cache-size",
        "64M",
        &cache,
        &copy,
    ]);
    assert!(std::fs::read(&copy).unwrap() == want, "convert's copy differs");
    let (n, bytes) = fetched(&nginx, "big.img", seen);
    assert!(
        bytes >= size - bound,
        "the second read fetched {bytes} bytes: the evicted part is read again"
    );
    seen = n;
    within_bound("after convert");

    // A third read by one reader in disk order (convert and nbdcopy --connections=4 read
    // several places at once): what stays cached is the end of the disk, read last, whether
    // it was cached before (reads mark it used) or fetched now.
    let (uri, pid) = serve(
        &d,
        "sequential",
        &["--allow-remote", &host, "--max-cache-size", "64M", &cache],
    );
    std::fs::remove_file(&out).unwrap();
    tool_ok(
        "nbdcopy",
        &["--connections=1", "--requests=1", &uri, out.to_str().unwrap()],
    );
    stop(&d, "sequential", &pid);
    assert!(
        std::fs::read(&out).unwrap() == want,
        "the sequential copy differs"
    );
    within_bound("after a sequential read");
    let (_, ranges) = cached(&cache);
    assert!(
        ranges.iter().all(|&(s, _)| s >= size - bound),
        "not the most recently read units: {ranges:?}"
    );
    seen = fetched(&nginx, "big.img", seen).0;

    // Unbounded, a read fills the cache with the whole base; an open with the bound trims it
    // (`info` reads nothing but the headers).
    diskkit_ok(&["prefetch", "-q", "--allow-remote", &host, &cache]);
    assert_eq!(cached(&cache).0, size);
    diskkit_ok(&["info", "--allow-remote", &host, "--max-cache-size", "64M", &cache]);
    within_bound("after an open with the bound");
    let (_, bytes) = fetched(&nginx, "big.img", seen);
    assert!(bytes >= size - bound, "prefetch fetched {bytes} bytes");
}

/// The unit of filling: a cold 4 KiB read through a cache layer made with the defaults
/// fetches and stores its 64 KiB chunk (one request of that size); through a cache layer with
/// 1 MiB chunks, the whole chunk (the fetch unit follows the layer's chunk, so chunks are
/// never left partly filled).
#[test]
fn a_cold_4k_read_fetches_and_keeps_one_chunk() {
    let www = Dir::new();
    let d = Dir::new();
    net::sparse_disk(&www.path("u.img"), 8 * MIB, &[(0, 8 * MIB)], 31);
    let want = std::fs::read(www.path("u.img")).unwrap();
    let nginx = net::Nginx::start(www.0.path());
    let host = format!("127.0.0.1:{}", nginx.port);
    let url = nginx.url("u.img");
    let at = 3 * MIB + 5 * 4096;
    for (name, chunk, unit) in [("small.asif", None, 64 << 10), ("big.asif", Some("1M"), MIB)] {
        let cache = d.s(name);
        let mut args = vec![
            "layer",
            "create",
            "-q",
            "--type",
            "cache",
            "--allow-remote",
            &host,
        ];
        if let Some(c) = chunk {
            args.extend(["--chunk-size", c]);
        }
        args.extend(["--parent", &url, &cache]);
        diskkit_ok(&args);
        let info: serde_json::Value =
            serde_json::from_str(&diskkit_ok(&["info", "--output", "json", "--detached", &cache])).unwrap();
        assert_eq!(info["cluster_size"], unit, "{name}: {info}");
        let before = nginx.requests_for("u.img").len();
        let out = d.path("4k.bin");
        diskkit_ok(&[
            "read",
            "--allow-remote",
            &host,
            "--offset",
            &at.to_string(),
            "--length",
            "4096",
            "--to",
            out.to_str().unwrap(),
            &cache,
        ]);
        assert!(std::fs::read(&out).unwrap() == want[at as usize..at as usize + 4096]);
        // The read's own request is one unit (the open may read the first unit for
        // detecting the base's format).
        let sizes: Vec<u64> = nginx.requests_for("u.img")[before..]
            .iter()
            .map(|r| r.1)
            .collect();
        assert!(
            sizes.iter().filter(|&&s| s != unit).all(|&s| s <= unit),
            "{name}: {sizes:?}"
        );
        assert!(sizes.contains(&unit) && sizes.len() <= 2, "{name}: {sizes:?}");
        let (bytes, ranges) = cached(&cache);
        let start = at / unit * unit;
        assert_eq!((bytes, ranges), (unit, vec![(start, start + unit)]), "{name}");
    }
}
